//! The NBD protocol: wire format without I/O, the handshake, and the transmission phase.

pub mod handshake;
pub mod proto;
pub mod transmission;
pub mod wire;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::export::ExportTable;
use handshake::{HandshakeError, Outcome};
use transmission::End;

/// How long a connection told to stop (server shutdown, or its export reloaded or removed)
/// has to finish the requests it has sent before it is cut: a client that stalls in the middle
/// of a request, or stops reading replies, must not hold up a reload or a stop for ever.
pub const DRAIN_GRACE: Duration = Duration::from_secs(30);

/// Serves one client connection from greeting to close. Never panics on client input; every
/// outcome is logged as one line.
pub async fn serve_connection<R, W>(
    mut rd: R,
    mut wr: W,
    peer: &str,
    exports: &ArcSwap<ExportTable>,
    shutdown: CancellationToken,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let started = Instant::now();
    let mut buf = BytesMut::with_capacity(4096);
    let outcome = tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            debug!(peer, "closing connection in handshake: server shutting down");
            return;
        }
        o = handshake::negotiate(&mut rd, &mut wr, &mut buf, exports, peer) => o,
    };
    let session = match outcome {
        Ok(Outcome::Transmission(s)) => s,
        Ok(Outcome::Aborted) => {
            debug!(peer, "client ended the handshake with NBD_OPT_ABORT");
            return;
        }
        Err(HandshakeError::ClientGone) => {
            debug!(peer, "client closed the connection during the handshake");
            return;
        }
        Err(e) => {
            warn!(peer, error = %e, "handshake failed");
            return;
        }
    };
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
    let (result, stats) = transmission::serve(rd, wr, buf, session, stop, cut).await;
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
            };
            info!(
                peer,
                export,
                requests = stats.requests,
                errors = stats.errors,
                secs,
                "{how}"
            );
        }
        Err(e) => {
            warn!(peer, export, requests = stats.requests, errors = stats.errors, secs, error = %e, "connection ended");
        }
    }
}
