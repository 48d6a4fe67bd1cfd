//! Shared test harness: start the real `nbd-rs` binary on a free port, learn its address from
//! its log, stop it by PID, and run external client tools against it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_nbd-rs")
}

/// A running server, killed when dropped.
pub struct Server {
    child: Option<Child>,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `nbd-rs --listen 127.0.0.1:0 ARGS...` and waits until it listens.
    pub fn start(args: &[&str]) -> Server {
        let mut full = vec!["--listen", "127.0.0.1:0"];
        full.extend_from_slice(args);
        Server::start_with_env(&full, &[])
    }

    /// Starts `nbd-rs ARGS...` with extra environment variables (over `RUST_LOG=info`; an empty
    /// `RUST_LOG` counts as unset) and waits until it listens.
    pub fn start_with_env(full: &[&str], env: &[(String, String)]) -> Server {
        let mut child = Command::new(bin())
            .args(full)
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nbd-rs");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[nbd-rs] {line}");
                if let Some(i) = line.find("listening on ") {
                    let addr = line[i + 13..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_owned();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "nbd-rs {full:?} did not start listening; log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        Server {
            child: Some(child),
            addr,
            log,
        }
    }

    /// The NBD URI of an export.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }

    /// The port.
    pub fn port(&self) -> &str {
        self.addr.rsplit(':').next().unwrap()
    }

    /// The server's PID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// True if the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().unwrap().try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits (at most 30 s) for the exit status.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("nbd-rs did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends a signal to a process we started.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -{sig} {pid} failed");
}

/// A scratch directory removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A new empty directory under the system temp dir.
    pub fn new(tag: &str) -> Scratch {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("nbd-rs-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    /// A path inside.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The directory as a string.
    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The repository root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a command to completion (at most `timeout`), returning its output; panics on timeout.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let out_pipe = child.stdout.take().unwrap();
    let err_pipe = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || read_all(out_pipe));
    let err_t = std::thread::spawn(move || read_all(err_pipe));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

fn read_all(mut r: impl std::io::Read) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = r.read_to_end(&mut v);
    v
}

/// Runs a client script from `tests/clients/` and fails the test with its output unless it
/// exits 0.
pub fn run_script(interpreter: &str, script: &str, args: &[&str], timeout: Duration) -> String {
    let path = root().join("tests/clients").join(script);
    let out = run(
        Command::new(interpreter)
            .arg(&path)
            .args(args)
            // Debian's libnbd binding and tools come first: pyenv's python3 lacks `nbd`.
            .env(
                "PATH",
                format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()),
            ),
        timeout,
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} {args:?} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    stdout
}

/// A real S3 server (`moto_server`, PyPI `moto[server]`) on a free loopback port, killed by PID
/// when dropped. A missing `moto_server` fails the test: `scripts/test` installs it.
pub struct Moto {
    child: Option<Child>,
    /// The port.
    pub port: u16,
}

impl Moto {
    /// Starts moto and waits until it answers.
    pub fn start() -> Moto {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .unwrap();
            let child = match Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
            {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    panic!(
                        "moto_server is not installed: run scripts/test (pip install 'moto[server]')"
                    )
                }
                Err(e) => panic!("cannot start moto_server: {e}"),
            };
            let mut m = Moto {
                child: Some(child),
                port,
            };
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if m.http("GET", "/moto-api/")
                    .is_some_and(|s| s.starts_with("HTTP/1.1 200"))
                {
                    return m;
                }
                if !matches!(m.child.as_mut().unwrap().try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("moto_server did not start");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket.
    pub fn create_bucket(&self, bucket: &str) {
        let answer = self.http("PUT", &format!("/{bucket}")).unwrap_or_default();
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "create bucket {bucket}: {answer}"
        );
    }

    /// The server's PID (for SIGSTOP / SIGCONT).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// One plain HTTP request; the whole answer.
    fn http(&self, method: &str, path: &str) -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        );
        s.write_all(req.as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A stopped server must be continued to die promptly.
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released for the server to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

impl Server {
    /// Starts `nbd-rs ARGS...` with extra environment variables and returns at once, without
    /// waiting for it to listen: for tests that wait on something else (`READY=1`). `addr` is
    /// what [`Server::addr`] reports.
    pub fn spawn_unwaited(full: &[&str], env: &[(String, String)], addr: &str) -> Server {
        let mut child = Command::new(bin())
            .args(full)
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nbd-rs");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[nbd-rs] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        Server {
            child: Some(child),
            addr: addr.to_owned(),
            log,
        }
    }

    /// Waits at most `limit` for the process to exit by itself (after a signal the test sent),
    /// returning its status and how long it took; kills it and panics past `limit`.
    pub fn wait_exit(mut self, limit: Duration) -> (ExitStatus, Duration) {
        let mut child = self.child.take().unwrap();
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "nbd-rs did not exit within {limit:?}; log:\n{}",
                    self.log.lock().unwrap().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A Unix datagram socket standing in for systemd's `NOTIFY_SOCKET`: pass [`NotifySocket::env`]
/// to the server and read what it tells the service manager, one datagram per notification.
pub struct NotifySocket {
    sock: std::os::unix::net::UnixDatagram,
    path: PathBuf,
    _dir: Scratch,
}

impl NotifySocket {
    /// A socket bound in a fresh scratch directory.
    pub fn new() -> NotifySocket {
        let dir = Scratch::new("notify");
        let path = dir.path("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        NotifySocket {
            sock,
            path,
            _dir: dir,
        }
    }

    /// `("NOTIFY_SOCKET", path)`.
    pub fn env(&self) -> (String, String) {
        ("NOTIFY_SOCKET".into(), self.path.to_str().unwrap().into())
    }

    /// The next message, or `None` if none arrives within `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<String> {
        self.sock
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        match self.sock.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("notify socket: {e}"),
        }
    }

    /// Receives until a message has the line `line` (like `READY=1`), within `timeout`;
    /// returns every message received, that one last. Panics with what was seen on timeout.
    pub fn wait_for(&self, line: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("no {line} within {timeout:?}; received: {seen:?}");
            }
            if let Some(m) = self.recv(left) {
                let found = m.lines().any(|l| l == line);
                seen.push(m);
                if found {
                    return seen;
                }
            }
        }
    }

    /// Every message received during `window`.
    pub fn collect(&self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return seen;
            }
            if let Some(m) = self.recv(left) {
                seen.push(m);
            }
        }
    }
}

/// A test's random seed: from the environment variable `var` when set (to replay a run), else
/// from the clock. Tests print it.
pub fn seed(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
                .into()
        })
}
