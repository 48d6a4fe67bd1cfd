//! Listeners (TCP and Unix sockets), the accept loops, and connection limits.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::export::ExportTable;
use crate::nbd;

/// The default listen address, as the NBD port is registered with IANA.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:10809";
/// Connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 4096;

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `HOST:PORT`.
    Tcp(String),
    /// `unix:PATH`.
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => f.write_str(a),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl std::str::FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(format!("bad listen address {s:?}: unix: needs a path"));
            }
            return Ok(ListenAddr::Unix(p.into()));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(ListenAddr::Tcp(s.to_owned()))
            }
            _ => Err(format!(
                "bad listen address {s:?}: expected HOST:PORT (like 0.0.0.0:10809) or unix:PATH"
            )),
        }
    }
}

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix socket, removed again when the server stops.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// The address clients reach, with the real port when port 0 was asked for.
    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

/// Binds an address. The error names it.
pub async fn bind(addr: &ListenAddr) -> Result<Listener, String> {
    let fail = |e: io::Error| format!("cannot listen on {addr}: {e}");
    match addr {
        ListenAddr::Tcp(a) => Ok(Listener::Tcp(
            TcpListener::bind(a.as_str()).await.map_err(fail)?,
        )),
        ListenAddr::Unix(p) => {
            // A socket file left by a server that died is replaced; a live one is not.
            if std::fs::symlink_metadata(p).is_ok() {
                if std::os::unix::net::UnixStream::connect(p).is_ok() {
                    return Err(fail(io::ErrorKind::AddrInUse.into()));
                }
                use std::os::unix::fs::FileTypeExt;
                let is_socket = std::fs::symlink_metadata(p)
                    .map(|m| m.file_type().is_socket())
                    .unwrap_or(false);
                if !is_socket {
                    return Err(format!(
                        "cannot listen on {addr}: the path exists and is not a socket"
                    ));
                }
                std::fs::remove_file(p).map_err(fail)?;
            }
            Ok(Listener::Unix(
                UnixListener::bind(p).map_err(fail)?,
                p.clone(),
            ))
        }
    }
}

/// Serves `exports` on `listeners` until `shutdown` fires, then waits for every connection to
/// finish its requests in flight.
pub async fn run(listeners: Vec<Listener>, exports: Arc<ExportTable>, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut loops = Vec::new();
    for l in listeners {
        info!("listening on {}", l.local_addr());
        loops.push(tokio::spawn(accept_loop(
            l,
            Arc::clone(&exports),
            shutdown.clone(),
            tracker.clone(),
            Arc::clone(&limit),
        )));
    }
    for l in loops {
        let _ = l.await;
    }
    tracker.close();
    tracker.wait().await;
}

async fn accept_loop(
    listener: Listener,
    exports: Arc<ExportTable>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    limit: Arc<Semaphore>,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = Arc::clone(&limit).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = accept(&listener) => a,
        };
        let (conn, peer) = match accepted {
            Ok(c) => {
                backoff = Duration::from_millis(10);
                c
            }
            Err(e) => {
                // Out of file descriptors and the like: wait, then try again.
                warn!(listener = %listener.local_addr(), error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let exports = Arc::clone(&exports);
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            match conn {
                Conn::Tcp(s) => {
                    let (rd, wr) = s.into_split();
                    nbd::serve_connection(rd, wr, &peer, &exports, shutdown).await;
                }
                Conn::Unix(s) => {
                    let (rd, wr) = s.into_split();
                    nbd::serve_connection(rd, wr, &peer, &exports, shutdown).await;
                }
            }
            drop(permit);
        });
    }
    if let Listener::Unix(_, p) = &listener {
        let _ = std::fs::remove_file(p);
    }
}

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> io::Result<(Conn, String)> {
    match l {
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            // Replies are written whole; waiting to coalesce them only adds latency. A socket
            // that refuses the option still works.
            let _ = s.set_nodelay(true);
            Ok((Conn::Tcp(s), peer.to_string()))
        }
        Listener::Unix(l, p) => {
            let (s, _) = l.accept().await?;
            Ok((Conn::Unix(s), format!("unix:{}", p.display())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse_or_say_why_not() {
        assert_eq!(
            "127.0.0.1:0".parse(),
            Ok(ListenAddr::Tcp("127.0.0.1:0".into()))
        );
        assert_eq!(
            "[::1]:10809".parse(),
            Ok(ListenAddr::Tcp("[::1]:10809".into()))
        );
        assert_eq!(
            "unix:/run/n.sock".parse(),
            Ok(ListenAddr::Unix("/run/n.sock".into()))
        );
        assert_eq!(
            "10809".parse::<ListenAddr>(),
            Err("bad listen address \"10809\": expected HOST:PORT (like 0.0.0.0:10809) or unix:PATH".into())
        );
        assert_eq!(
            "unix:".parse::<ListenAddr>(),
            Err("bad listen address \"unix:\": unix: needs a path".into())
        );
    }
}
