//! Listeners (TCP and Unix sockets), the accept loops, and connection limits.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::model::Limits;
use crate::export::ExportTable;
use crate::nbd;

/// The default listen address, as the NBD port is registered with IANA.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:10809";

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
    /// A Unix socket.
    Unix {
        /// The socket.
        listener: UnixListener,
        /// Its path, as clients reach it (`@name` for an abstract socket).
        path: PathBuf,
        /// True for a socket nbd-rs bound itself: its file is removed when the server stops.
        /// A socket passed by the service manager is its own and stays.
        remove_on_stop: bool,
    },
}

impl Listener {
    /// The address clients reach, with the real port when port 0 was asked for.
    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            Listener::Unix { path, .. } => format!("unix:{}", path.display()),
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
            Ok(Listener::Unix {
                listener: UnixListener::bind(p).map_err(fail)?,
                path: p.clone(),
                remove_on_stop: true,
            })
        }
    }
}

/// The export table clients choose from, swapped whole by a reload; each connection takes a
/// snapshot when it starts.
pub type SharedExports = Arc<ArcSwap<ExportTable>>;

/// Probes every accept loop answers while it runs, so that a watchdog can tell a server that
/// serves from a wedged one (see `systemd::spawn_watchdog`). Cheap to clone; clones share the
/// loops.
#[derive(Debug, Clone)]
pub struct Liveness {
    inner: Arc<LivenessInner>,
}

#[derive(Debug)]
struct LivenessInner {
    /// The number of the latest probe; every loop answers by storing it in its beat.
    probe: watch::Sender<u64>,
    /// Each running loop's last answer; a loop that has ended is dropped.
    beats: Mutex<Vec<Weak<AtomicU64>>>,
    /// Woken at every answer.
    answered: Notify,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            inner: Arc::new(LivenessInner {
                probe: watch::Sender::new(0),
                beats: Mutex::new(Vec::new()),
                answered: Notify::new(),
            }),
        }
    }
}

impl Liveness {
    /// Liveness with no loop yet.
    pub fn new() -> Self {
        Liveness::default()
    }

    /// Registers a loop; it answers probes through the returned beat while it runs.
    pub fn register(&self) -> Beat {
        let answered = Arc::new(AtomicU64::new(*self.inner.probe.borrow()));
        if let Ok(mut beats) = self.inner.beats.lock() {
            beats.retain(|b| b.strong_count() > 0);
            beats.push(Arc::downgrade(&answered));
        }
        Beat {
            probes: self.inner.probe.subscribe(),
            answered,
            inner: Arc::clone(&self.inner),
        }
    }

    /// Sends a new probe and waits at most `within` for every running loop to answer it. False
    /// if one did not, or if no loop runs.
    pub async fn probe(&self, within: Duration) -> bool {
        let mut n = 0;
        self.inner.probe.send_modify(|p| {
            *p += 1;
            n = *p;
        });
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let woken = self.inner.answered.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.all_answered(n) {
                return true;
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return self.all_answered(n);
            }
        }
    }

    fn all_answered(&self, n: u64) -> bool {
        let Ok(beats) = self.inner.beats.lock() else {
            return false;
        };
        let mut running = 0;
        for b in beats.iter().filter_map(Weak::upgrade) {
            running += 1;
            if b.load(Ordering::Acquire) < n {
                return false;
            }
        }
        running > 0
    }
}

/// One accept loop's side of [`Liveness`].
#[derive(Debug)]
pub struct Beat {
    probes: watch::Receiver<u64>,
    answered: Arc<AtomicU64>,
    inner: Arc<LivenessInner>,
}

impl Beat {
    /// Waits for the next probe and answers it. Cancel-safe: meant as a `select!` branch.
    pub async fn answer(&mut self) {
        // The sender lives in `inner`, which this beat holds: `changed` cannot fail.
        if self.probes.changed().await.is_err() {
            return std::future::pending().await;
        }
        let n = *self.probes.borrow_and_update();
        self.answered.store(n, Ordering::Release);
        self.inner.answered.notify_waiters();
    }
}

/// Serves `exports` on `listeners` until `shutdown` fires, then waits for every connection to
/// finish its requests in flight.
pub async fn run(listeners: Vec<Listener>, exports: SharedExports, shutdown: CancellationToken) {
    let max = Limits::default().max_connections;
    run_watched(listeners, exports, shutdown, Liveness::new(), max).await;
}

/// [`run`], with every accept loop answering `liveness`'s probes while it runs.
pub async fn run_watched(
    listeners: Vec<Listener>,
    exports: SharedExports,
    shutdown: CancellationToken,
    liveness: Liveness,
    max_connections: usize,
) {
    let tracker = TaskTracker::new();
    // Connections served at once; more wait in the kernel's backlog until one ends.
    let limit = Arc::new(Semaphore::new(max_connections));
    let mut loops = Vec::new();
    for l in listeners {
        info!("listening on {}", l.local_addr());
        loops.push(tokio::spawn(accept_loop(
            l,
            Arc::clone(&exports),
            shutdown.clone(),
            tracker.clone(),
            Arc::clone(&limit),
            liveness.register(),
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
    exports: SharedExports,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    limit: Arc<Semaphore>,
    mut beat: Beat,
) {
    let mut backoff = Duration::from_millis(10);
    'serve: loop {
        // Probes are answered while waiting, so a loop that is idle, or held at the connection
        // limit, is still alive.
        let permit = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break 'serve,
                () = beat.answer() => {}
                p = Arc::clone(&limit).acquire_owned() => match p {
                    Ok(p) => break p,
                    Err(_) => break 'serve,
                },
            }
        };
        let accepted = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break 'serve,
                () = beat.answer() => {}
                a = accept(&listener) => break a,
            }
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
                Conn::Tcp(s, addr) => {
                    nbd::serve_connection(s, &peer, Some(addr), &exports, shutdown).await;
                }
                Conn::Unix(s) => {
                    nbd::serve_connection(s, &peer, None, &exports, shutdown).await;
                }
            }
            drop(permit);
        });
    }
    if let Listener::Unix {
        path,
        remove_on_stop: true,
        ..
    } = &listener
    {
        let _ = std::fs::remove_file(path);
    }
}

enum Conn {
    Tcp(tokio::net::TcpStream, std::net::IpAddr),
    Unix(tokio::net::UnixStream),
}

/// TCP keepalive after a minute of silence, so that a client that vanished (a host powered
/// off) is noticed within about two minutes even when no idle timeout is set: an NBD client
/// with nothing to do sends nothing for hours, and that alone must not close it.
fn keepalive(s: &tokio::net::TcpStream) {
    use rustix::net::sockopt;
    let _ = sockopt::set_socket_keepalive(s, true);
    let _ = sockopt::set_tcp_keepidle(s, Duration::from_secs(60));
    let _ = sockopt::set_tcp_keepintvl(s, Duration::from_secs(10));
    let _ = sockopt::set_tcp_keepcnt(s, 6);
}

async fn accept(l: &Listener) -> io::Result<(Conn, String)> {
    match l {
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            // Replies are written whole; waiting to coalesce them only adds latency. A socket
            // that refuses the option still works.
            let _ = s.set_nodelay(true);
            keepalive(&s);
            Ok((Conn::Tcp(s, peer.ip()), peer.to_string()))
        }
        Listener::Unix { listener, path, .. } => {
            let (s, _) = listener.accept().await?;
            Ok((Conn::Unix(s), format!("unix:{}", path.display())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn liveness_needs_every_running_loop_to_answer() {
        let live = Liveness::new();
        // No loop runs: nothing proves the server alive.
        assert!(!live.probe(Duration::from_millis(20)).await);

        let stop = CancellationToken::new();
        let answering = |mut beat: Beat, stop: CancellationToken| async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    () = beat.answer() => {}
                }
            }
        };
        let a = tokio::spawn(answering(live.register(), stop.clone()));
        let b = tokio::spawn(answering(live.register(), stop.clone()));
        for _ in 0..3 {
            assert!(live.probe(Duration::from_secs(5)).await);
        }

        // A loop that is no longer polled (wedged) withholds the answer.
        let wedged = live.register();
        assert!(!live.probe(Duration::from_millis(50)).await);
        // Once it has ended, the others speak for the server again.
        drop(wedged);
        assert!(live.probe(Duration::from_secs(5)).await);

        stop.cancel();
        let _ = a.await;
        let _ = b.await;
    }

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
