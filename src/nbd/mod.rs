//! The NBD protocol: wire format without I/O, the handshake, and the transmission phase.

pub mod handshake;
pub mod proto;
pub mod transmission;
pub mod wire;

use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::export::ExportTable;
use handshake::{HandshakeError, Outcome};
use transmission::End;

/// Serves one client connection from greeting to close. Never panics on client input; every
/// outcome is logged as one line.
pub async fn serve_connection<R, W>(
    mut rd: R,
    mut wr: W,
    peer: &str,
    exports: &ExportTable,
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
        o = handshake::negotiate(&mut rd, &mut wr, &mut buf, exports) => o,
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
    let _lease = session.export.lease(peer);
    let export = session.export.name.clone();
    let mode = session.mode;
    debug!(
        peer,
        export,
        ?mode,
        flags = session.flags,
        "transmission started"
    );
    let (result, stats) = transmission::serve(rd, wr, buf, session, shutdown).await;
    let secs = started.elapsed().as_secs_f64();
    match result {
        Ok(end) => {
            let how = match end {
                End::Disconnect => "client disconnected",
                End::ClientGone => "client closed the connection without NBD_CMD_DISC",
                End::Shutdown => "connection closed for server shutdown",
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
