//! The NBD protocol: wire format without I/O, the handshake, and the transmission phase.

pub mod handshake;
pub mod lowat;
pub mod proto;
pub mod splice;
pub mod transmission;
pub mod wire;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::model::Limits;
use crate::export::{ClientId, ExportTable};
use handshake::{HandshakeError, Outcome, Session, Tls};
use transmission::{End, FileReads, Settings};

/// How long a connection told to stop (server shutdown, or its export reloaded or removed)
/// has to finish the requests it has sent before it is cut: a client that stalls in the middle
/// of a request, or stops reading replies, must not hold up a reload or a stop for ever.
pub const DRAIN_GRACE: Duration = Duration::from_secs(30);

/// A connection that can be split into a read half and a write half for the transmission
/// phase: TCP and Unix sockets by their owned halves, TLS streams through `tokio::io::split`.
pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The read half.
    type Read: splice::RequestReader;
    /// The write half.
    type Write: transmission::ReplyWriter;
    /// Splits the connection.
    fn halves(self) -> (Self::Read, Self::Write);
}

impl Connection for tokio::net::TcpStream {
    type Read = lowat::TcpReader;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn halves(self) -> (Self::Read, Self::Write) {
        let (rd, wr) = self.into_split();
        (lowat::TcpReader::new(rd), wr)
    }
}

impl Connection for tokio::net::UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl<S: Connection> Connection for tokio_rustls::server::TlsStream<S> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

/// Serves one client connection from greeting to close. `addr` is the client's address
/// (`None` for a Unix-socket client), for allow lists. Never panics on client input; every
/// outcome is logged as one line.
pub async fn serve_connection<S: Connection>(
    mut io: S,
    peer: &str,
    addr: Option<IpAddr>,
    exports: &ArcSwap<ExportTable>,
    shutdown: CancellationToken,
) {
    let started = Instant::now();
    let (limits, acceptor) = {
        let table = exports.load();
        (table.limits, table.tls.clone())
    };
    let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
    let mut buf = BytesMut::with_capacity(4096);
    let mut client = ClientId {
        addr,
        names: Vec::new(),
    };
    let plain = async {
        let no_zeroes = handshake::greet(&mut io, &mut buf).await?;
        let o = handshake::options(
            &mut io,
            &mut buf,
            exports,
            peer,
            &client,
            no_zeroes,
            Tls::Off(acceptor.as_ref()),
        )
        .await?;
        Ok::<_, HandshakeError>((o, no_zeroes))
    };
    let Some(outcome) = bounded(plain, &shutdown, deadline, &limits, peer).await else {
        return;
    };
    match outcome {
        Ok((Outcome::StartTls(acceptor), no_zeroes)) => {
            let secure = async {
                let mut tls = acceptor.accept(io).await.map_err(HandshakeError::Tls)?;
                if let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                    client.names = crate::tls::certificate_names(cert);
                }
                let o = handshake::options(
                    &mut tls,
                    &mut buf,
                    exports,
                    peer,
                    &client,
                    no_zeroes,
                    Tls::Active,
                )
                .await?;
                Ok::<_, HandshakeError>((o, tls))
            };
            let Some(outcome) = bounded(secure, &shutdown, deadline, &limits, peer).await else {
                return;
            };
            match outcome {
                Ok((Outcome::Transmission(session), tls)) => {
                    debug!(peer, names = ?client.names, "TLS established");
                    // TLS streams cannot sendfile: their bytes are encrypted in user space.
                    let settings = Settings {
                        idle: limits.idle_timeout,
                        file_reads: FileReads::Copied,
                    };
                    transmit(tls, buf, session, peer, started, settings, shutdown).await;
                }
                Ok((Outcome::StartTls(_), _)) => {
                    warn!(peer, "handshake failed: STARTTLS over TLS");
                }
                Ok((Outcome::Aborted, mut tls)) => {
                    debug!(peer, "client ended the handshake with NBD_OPT_ABORT");
                    // Soft close: close_notify, then the socket.
                    let _ = tls.shutdown().await;
                }
                Err(e) => handshake_failed(peer, &e),
            }
        }
        Ok((Outcome::Transmission(session), _)) => {
            let settings = Settings {
                idle: limits.idle_timeout,
                file_reads: if limits.sendfile.allows(addr) {
                    FileReads::Sendfile
                } else if limits.sendfile.maps(addr) {
                    FileReads::Mapped
                } else {
                    FileReads::Copied
                },
            };
            transmit(io, buf, session, peer, started, settings, shutdown).await;
        }
        Ok((Outcome::Aborted, _)) => {
            debug!(peer, "client ended the handshake with NBD_OPT_ABORT");
        }
        Err(e) => handshake_failed(peer, &e),
    }
}

/// Runs a part of the handshake until the handshake deadline; `None` if the server is
/// shutting down.
async fn bounded<T>(
    part: impl std::future::Future<Output = Result<T, HandshakeError>>,
    shutdown: &CancellationToken,
    deadline: tokio::time::Instant,
    limits: &Limits,
    peer: &str,
) -> Option<Result<T, HandshakeError>> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            debug!(peer, "closing connection in handshake: server shutting down");
            None
        }
        o = tokio::time::timeout_at(deadline, part) => {
            Some(o.unwrap_or(Err(HandshakeError::Timeout(limits.handshake_timeout))))
        }
    }
}

fn handshake_failed(peer: &str, e: &HandshakeError) {
    match e {
        HandshakeError::ClientGone => {
            debug!(peer, "client closed the connection during the handshake");
        }
        e => warn!(peer, error = %e, "handshake failed"),
    }
}

/// The transmission phase of a connection, and its closing log line.
async fn transmit<S: Connection>(
    io: S,
    buf: BytesMut,
    session: Session,
    peer: &str,
    started: Instant,
    settings: Settings,
    shutdown: CancellationToken,
) {
    let (rd, wr) = io.halves();
    let retiring = Arc::clone(&session.export);
    let export = session.export.name.clone();
    let mode = session.mode;
    debug!(
        peer,
        export,
        ?mode,
        flags = session.flags,
        "transmission started"
    );
    // Stop on shutdown or when the export is retired; cut the connection if it has not
    // finished its requests within the grace period.
    let (stop, cut, done) = (
        CancellationToken::new(),
        CancellationToken::new(),
        CancellationToken::new(),
    );
    tokio::spawn({
        let (stop, cut, done) = (stop.clone(), cut.clone(), done.clone());
        let draining = retiring.draining().clone();
        async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = draining.cancelled() => {}
                _ = done.cancelled() => return,
            }
            stop.cancel();
            tokio::select! {
                _ = tokio::time::sleep(DRAIN_GRACE) => cut.cancel(),
                _ = done.cancelled() => {}
            }
        }
    });
    let _done = done.drop_guard();
    let (result, stats) = transmission::serve(rd, wr, buf, session, stop, cut, settings).await;
    let secs = started.elapsed().as_secs_f64();
    match result {
        Ok(end) => {
            let how = match end {
                End::Disconnect => "client disconnected",
                End::ClientGone => "client closed the connection without NBD_CMD_DISC",
                End::Shutdown if retiring.is_retired() => {
                    "connection closed: its export was reloaded or removed"
                }
                End::Shutdown => "connection closed for server shutdown",
                End::Cut => "connection cut: requests unfinished when the grace period ended",
                End::Idle => "connection closed: idle for longer than idle_timeout",
            };
            info!(
                peer,
                export,
                requests = stats.requests,
                errors = stats.errors,
                sendfile_bytes = stats.sendfile_bytes,
                mapped_bytes = stats.mapped_bytes,
                spliced_bytes = stats.spliced_bytes,
                paged_bytes = stats.paged_bytes,
                buffer_releases = stats.buffer_releases,
                secs,
                "{how}"
            );
        }
        Err(e) => {
            warn!(peer, export, requests = stats.requests, errors = stats.errors, sendfile_bytes = stats.sendfile_bytes, mapped_bytes = stats.mapped_bytes, spliced_bytes = stats.spliced_bytes, paged_bytes = stats.paged_bytes, buffer_releases = stats.buffer_releases, secs, error = %e, "connection ended");
        }
    }
}
