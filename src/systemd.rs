//! Living under systemd: readiness and state notifications (`sd_notify`), the watchdog, socket
//! activation (`LISTEN_FDS`), and logging to the journal.
//!
//! Every notification helper is a no-op when `NOTIFY_SOCKET` is not set, so the server runs the
//! same from a shell, a test or a unit.
//!
//! `NOTIFY_SOCKET` is read at every notification and deliberately left in the environment:
//! the reload, status and watchdog messages need it for the life of the process, and nbd-rs
//! starts no child process that could inherit it and talk to systemd in its name (systemd
//! would refuse such messages anyway with `NotifyAccess=main`). Socket activation's
//! `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`, on the other hand, describe file
//! descriptors that are taken exactly once, so they are removed once taken.

use std::io;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::export::ExportTable;
use crate::server::{Listener, Liveness};

/// The syslog identifier of every journal entry.
pub const SYSLOG_IDENTIFIER: &str = "nbd-rs";

// ---------------------------------------------------------------------------------------------
// Notifications

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        // The watchdog would repeat this every few seconds; the state changes are rare.
        let is_watchdog = states.iter().any(|s| matches!(s, NotifyState::Watchdog));
        if is_watchdog {
            debug!(error = %e, "cannot notify the service manager");
        } else {
            warn!(error = %e, "cannot notify the service manager");
        }
    }
}

/// A status line fit for one `STATUS=` field: one line, no control characters.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// `READY=1` with `STATUS=status`: startup (or a reload) is complete.
pub fn ready(status: &str) {
    let status = one_line(status);
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// `STATUS=text`: a free-form line `systemctl status` shows.
pub fn status(text: &str) {
    let text = one_line(text);
    notify(&[NotifyState::Status(&text)]);
}

/// `RELOADING=1` with `MONOTONIC_USEC=` (CLOCK_MONOTONIC, in µs) in the same datagram, as
/// systemd wants at the start of a reload; `READY=1` ([`ready`]) ends it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        // CLOCK_MONOTONIC does not fail on Linux; without it systemd still takes the message.
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

/// `STOPPING=1` with `STATUS=stopping`: shutdown has begun.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// `WATCHDOG=1`: the server is alive. Sent by the task [`spawn_watchdog`] starts.
pub fn watchdog() {
    notify(&[NotifyState::Watchdog]);
}

/// The `STATUS=` line naming the exports being served, like `serving 2 exports: disk, vol`.
pub fn serving_status(table: &ExportTable) -> String {
    let names: Vec<&str> = table.iter().map(|e| e.name.as_str()).collect();
    let noun = if names.len() == 1 {
        "export"
    } else {
        "exports"
    };
    format!("serving {} {noun}: {}", names.len(), names.join(", "))
}

// ---------------------------------------------------------------------------------------------
// Watchdog

/// The watchdog interval systemd expects pings within (`WATCHDOG_USEC`, for this process if
/// `WATCHDOG_PID` is set), or `None` when the unit sets no `WatchdogSec`.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// When systemd asks for a watchdog, starts a task that pings it every half interval, each
/// time only after every accept loop has answered a probe from `liveness` (within a quarter
/// interval). A server whose accept loops stop being polled (a runtime whose workers are all
/// blocked, a loop stuck outside its `select!`) stops pinging, and systemd restarts it. The
/// task ends when `stop` fires: the watchdog applies to a running service, not to one that is
/// stopping.
pub fn spawn_watchdog(liveness: Liveness, stop: CancellationToken) -> Option<JoinHandle<()>> {
    let interval = watchdog_interval()?;
    info!(
        interval_ms = interval.as_millis() as u64,
        "systemd watchdog enabled: pinging after every accept loop answers a probe"
    );
    Some(tokio::spawn(watchdog_loop(interval, liveness, stop)))
}

async fn watchdog_loop(interval: Duration, liveness: Liveness, stop: CancellationToken) {
    let period = (interval / 2).max(Duration::from_millis(1));
    // The first probe after one period: the accept loops start as this task does.
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let alive = tokio::select! {
            _ = stop.cancelled() => return,
            a = liveness.probe(period / 2) => a,
        };
        if alive {
            if failing {
                info!("accept loops answer again: resuming watchdog pings");
                failing = false;
            }
            watchdog();
        } else if !failing {
            warn!("an accept loop did not answer its probe: withholding the watchdog ping");
            failing = true;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Socket activation

/// Sockets passed by the service manager (or by a tool such as `nbdinfo -- [ nbd-rs ... ]`
/// or `systemd-socket-activate`), checked to be listening stream sockets, not yet registered
/// with the runtime.
#[derive(Debug)]
pub struct ListenFds {
    sockets: Vec<Passed>,
}

#[derive(Debug)]
enum Passed {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

/// Takes the sockets passed for socket activation: when `LISTEN_PID` is this process and
/// `LISTEN_FDS` is n > 0, file descriptors 3..3+n (marked close-on-exec), each checked to be a
/// listening TCP or Unix stream socket and made non-blocking. `None` when nothing was passed
/// to this process (the listen addresses are bound as usual). Later calls return `None`:
/// descriptors are owned once. [`ListenFds::into_listeners`] then registers the sockets with
/// the runtime.
///
/// `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` are removed from the environment when the
/// process has a single thread, as it has when `main` calls this before starting the runtime:
/// changing the environment is only sound then. Called later, they stay, which is harmless
/// (`LISTEN_PID` names this process alone).
pub fn listen_fds() -> Result<Option<ListenFds>, String> {
    let claimed = claim_listen_fds()
        .map_err(|e| format!("socket activation: bad LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES: {e}"))?;
    if claimed.is_empty() {
        return Ok(None);
    }
    let mut sockets = Vec::with_capacity(claimed.len());
    for (i, (fd, name)) in claimed.into_iter().enumerate() {
        let which = format!("socket activation: file descriptor {} ({name:?})", 3 + i);
        sockets.push(passed_socket(fd).map_err(|e| format!("{which}: {e}"))?);
    }
    Ok(Some(ListenFds { sockets }))
}

/// Set once the passed descriptors have been claimed: they can be owned only once.
static CLAIMED: AtomicBool = AtomicBool::new(false);

/// True if the calling thread is the process's only one (false if that cannot be told).
fn single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| tasks.count() == 1)
        .unwrap_or(false)
}

/// One of the six `unsafe` functions in nbd-rs (the others call `cachestat`,
/// `ioctl(SIOCATMARK)`, `mmap` and `mincore`, and count what `recvmsg` put in spare
/// capacity): claiming ownership of the descriptors systemd passed, and
/// removing the variables that describe them.
#[allow(unsafe_code)]
fn claim_listen_fds() -> io::Result<Vec<(OwnedFd, String)>> {
    if CLAIMED.swap(true, Ordering::SeqCst) {
        return Ok(Vec::new());
    }
    let passed: Vec<(RawFd, String)> = sd_notify::listen_fds_with_names()?.collect();
    if single_threaded() {
        for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            // SAFETY: this is the process's only thread, so no other can read or write the
            // environment meanwhile (and none can be started but by this one).
            unsafe { std::env::remove_var(var) };
        }
    } else if !passed.is_empty() {
        debug!(
            "other threads run: LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES stay in the environment"
        );
    }
    Ok(passed
        .into_iter()
        .map(|(fd, name)| {
            // SAFETY: `LISTEN_PID` named this process, so by the socket-activation protocol
            // descriptors 3..3+LISTEN_FDS are open and were handed to us; nothing else in the
            // process knows them, and `CLAIMED` makes sure they are owned once.
            (
                unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) },
                name,
            )
        })
        .collect())
}

/// Checks a passed descriptor and wraps it as a std listener.
fn passed_socket(fd: OwnedFd) -> Result<Passed, String> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketType, sockopt};
    let ty = sockopt::socket_type(&fd).map_err(|e| format!("not a socket: {e}"))?;
    if ty != SocketType::STREAM {
        return Err("not a stream socket (nbd-rs needs ListenStream=)".into());
    }
    if !sockopt::socket_acceptconn(&fd).map_err(|e| e.to_string())? {
        return Err(
            "not a listening socket (an Accept=yes unit passes connections: use Accept=no)".into(),
        );
    }
    let addr = rustix::net::getsockname(&fd).map_err(|e| format!("getsockname: {e}"))?;
    let family = addr.address_family();
    let passed = if family == AddressFamily::INET || family == AddressFamily::INET6 {
        Passed::Tcp(std::net::TcpListener::from(fd))
    } else if family == AddressFamily::UNIX {
        let path = match SocketAddrUnix::try_from(addr) {
            Ok(u) => unix_name(&u),
            Err(_) => PathBuf::from("(unknown)"),
        };
        Passed::Unix(std::os::unix::net::UnixListener::from(fd), path)
    } else {
        return Err(format!(
            "address family {} is neither TCP nor Unix",
            family.as_raw()
        ));
    };
    let nonblocking = match &passed {
        Passed::Tcp(l) => l.set_nonblocking(true),
        Passed::Unix(l, _) => l.set_nonblocking(true),
    };
    nonblocking.map_err(|e| format!("cannot make it non-blocking: {e}"))?;
    Ok(passed)
}

/// How a Unix socket address is shown: its path, `@name` for an abstract one.
fn unix_name(u: &rustix::net::SocketAddrUnix) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    if let Some(p) = u.path_bytes() {
        return PathBuf::from(std::ffi::OsStr::from_bytes(p));
    }
    if let Some(a) = u.abstract_name() {
        return PathBuf::from(format!("@{}", String::from_utf8_lossy(a)));
    }
    PathBuf::from("(unnamed)")
}

impl ListenFds {
    /// How many sockets were passed.
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    /// True if none were (never, as [`listen_fds`] returns `None` then).
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Registers the sockets with the tokio runtime; call inside it. A passed Unix socket is
    /// the service manager's: it is not removed when the server stops.
    pub fn into_listeners(self) -> Result<Vec<Listener>, String> {
        let mut out = Vec::with_capacity(self.sockets.len());
        for s in self.sockets {
            out.push(match s {
                Passed::Tcp(l) => Listener::Tcp(
                    tokio::net::TcpListener::from_std(l)
                        .map_err(|e| format!("socket activation: {e}"))?,
                ),
                Passed::Unix(l, path) => Listener::Unix {
                    listener: tokio::net::UnixListener::from_std(l)
                        .map_err(|e| format!("socket activation: {e}"))?,
                    path,
                    remove_on_stop: false,
                },
            });
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Logging

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSink {
    /// The systemd journal, natively, with structured fields.
    Journal,
    /// Formatted lines on stderr.
    Stderr,
}

/// True if `journal_stream` (the value of `JOURNAL_STREAM`, `DEVICE:INODE`) names the file
/// whose device and inode are `dev` and `ino`.
pub fn journal_stream_matches(journal_stream: Option<&str>, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = journal_stream.and_then(|s| s.trim().split_once(':')) else {
        return false;
    };
    matches!((d.parse::<u64>(), i.parse::<u64>()), (Ok(d), Ok(i)) if d == dev && i == ino)
}

/// Where to log given `journal_stream`: the journal when it names the file stderr is (systemd
/// connected stderr to the journal), stderr otherwise (a terminal, a pipe, a redirected
/// stderr whose `JOURNAL_STREAM` was inherited from a parent).
pub fn choose_sink(journal_stream: Option<&str>) -> LogSink {
    match rustix::fs::fstat(io::stderr().as_fd()) {
        Ok(st) if journal_stream_matches(journal_stream, st.st_dev, st.st_ino) => LogSink::Journal,
        _ => LogSink::Stderr,
    }
}

/// The crates under the S3 store whose debug output shows request headers with credentials:
/// held at `info` whatever level is asked for.
const QUIET: &str = "rusoto_core=info,rusoto_signature=info,rusoto_credential=info,hyper=info";

/// The log filter: `RUST_LOG` when set (it wins, for debugging a service without editing its
/// file), else the configuration's `[log] level`, else `info`.
pub fn log_filter(configured: Option<&str>) -> tracing_subscriber::EnvFilter {
    let env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let base = env.as_deref().or(configured).unwrap_or("info");
    tracing_subscriber::EnvFilter::try_new(format!("{base},{QUIET}"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("info,{QUIET}")))
}

/// Changes the level of the installed subscriber, for a configuration's `[log] level`.
#[derive(Clone)]
pub struct LogControl(
    Option<
        tracing_subscriber::reload::Handle<
            tracing_subscriber::EnvFilter,
            tracing_subscriber::Registry,
        >,
    >,
);

impl LogControl {
    /// Applies `[log] level` (or its absence) unless `RUST_LOG` overrides it.
    pub fn apply(&self, configured: Option<&str>) {
        if let Some(h) = &self.0
            && let Err(e) = h.reload(log_filter(configured))
        {
            warn!(error = %e, "cannot change the log level");
        }
    }
}

/// Installs the global log subscriber filtered by `filter`: to the journal (syslog
/// identifier `nbd-rs`; structured fields such as `export` and `peer` become the journal
/// fields `EXPORT` and `PEER`) when `JOURNAL_STREAM` says stderr is the journal, to stderr
/// otherwise. Returns where logs go, and a handle to change the filter later.
pub fn init_logging(filter: tracing_subscriber::EnvFilter) -> (LogSink, LogControl) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let control = LogControl(Some(handle));
    let wanted = choose_sink(std::env::var("JOURNAL_STREAM").ok().as_deref());
    let mut journal_error = None;
    if wanted == LogSink::Journal {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_syslog_identifier(SYSLOG_IDENTIFIER.to_owned())
                    .with_field_prefix(None);
                let _ = tracing_subscriber::registry()
                    .with(filter)
                    .with(layer)
                    .try_init();
                return (LogSink::Journal, control);
            }
            Err(e) => journal_error = Some(e),
        }
    }
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(io::stderr))
        .try_init();
    if let Some(e) = journal_error {
        warn!(error = %e, "stderr is the journal but its socket cannot be reached: logging to stderr");
    }
    (LogSink::Stderr, control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_name_stderr_exactly() {
        assert!(journal_stream_matches(Some("8:1234"), 8, 1234));
        assert!(journal_stream_matches(Some("8:1234\n"), 8, 1234));
        assert!(!journal_stream_matches(Some("8:1235"), 8, 1234));
        assert!(!journal_stream_matches(Some("9:1234"), 8, 1234));
        assert!(!journal_stream_matches(Some("8"), 8, 1234));
        assert!(!journal_stream_matches(Some("x:y"), 8, 1234));
        assert!(!journal_stream_matches(Some(""), 8, 1234));
        assert!(!journal_stream_matches(None, 8, 1234));
    }

    #[test]
    fn a_journal_stream_that_is_not_stderr_logs_to_stderr() {
        // Whatever stderr is under the test runner, no file has inode 0.
        assert_eq!(choose_sink(Some("0:0")), LogSink::Stderr);
        assert_eq!(choose_sink(Some("garbage")), LogSink::Stderr);
        assert_eq!(choose_sink(None), LogSink::Stderr);
        // The value systemd would set for the real stderr selects the journal.
        let st = rustix::fs::fstat(io::stderr().as_fd()).unwrap();
        let real = format!("{}:{}", st.st_dev, st.st_ino);
        assert_eq!(choose_sink(Some(&real)), LogSink::Journal);
    }

    #[test]
    fn nothing_passed_means_no_activation() {
        // The test process was not socket-activated (a LISTEN_PID it inherited is not its own);
        // the harness runs threads, so the environment is left alone.
        assert!(!single_threaded());
        assert!(listen_fds().unwrap().is_none());
        assert!(listen_fds().unwrap().is_none());
    }

    #[test]
    fn status_lines_are_one_line() {
        assert_eq!(one_line("a\nb\tc"), "a b c");
    }
}
