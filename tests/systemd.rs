//! nbd-rs under systemd, with a datagram socket standing in for the service manager's
//! `NOTIFY_SOCKET`: readiness once listening, `STOPPING=1` and a clean exit on SIGTERM, the
//! watchdog; socket activation through libnbd (nbdinfo, nbdsh's Python binding) and
//! `systemd-socket-activate` (TCP and Unix); a qemu client with `reconnect-delay` that does not
//! notice two restarts; and the unit file's verification and security rating.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{NotifySocket, Scratch, Server, bin, free_port, root, run, signal};

const PY: &str = "/usr/bin/python3";

fn lines(msgs: &[String]) -> Vec<&str> {
    msgs.iter().flat_map(|m| m.lines()).collect()
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A tool the test needs, or a failure naming the Debian package that has it.
fn need(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: apt-get install {package} (scripts/test installs the test tools)"
    );
}

// ---------------------------------------------------------------------------------------------
// Readiness, stopping, watchdog

#[test]
fn ready_names_the_exports_once_listening_and_sigterm_stops_with_exit_0() {
    let notify = NotifySocket::new();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let s = Server::spawn_unwaited(
        &[
            "--listen",
            &listen,
            "-e",
            "disk",
            "raw",
            "memory:1MiB",
            "-e",
            "vol",
            "raw",
            "memory:2MiB",
        ],
        &[notify.env()],
        &listen,
    );
    let before = notify.wait_for("READY=1", Duration::from_secs(30));
    let ready = before.last().unwrap();
    assert!(
        ready
            .lines()
            .any(|l| l == "STATUS=serving 2 exports: disk, vol"),
        "READY=1 without the exports' status: {ready:?}"
    );
    assert!(
        !lines(&before).contains(&"STOPPING=1"),
        "stopping before ready: {before:?}"
    );

    // At READY=1 the listener accepts at once: the first connection gets the NBD greeting.
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect right after READY=1");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 16];
    c.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"NBDMAGICIHAVEOPT");
    drop(c);
    let size = run(
        Command::new("nbdinfo").args(["--size", &format!("nbd://{listen}/vol")]),
        Duration::from_secs(30),
    );
    assert_eq!(String::from_utf8_lossy(&size.stdout).trim(), "2097152");

    signal(s.pid(), "TERM");
    let after = notify.wait_for("STOPPING=1", Duration::from_secs(5));
    let stopping = after.last().unwrap();
    assert!(
        stopping.lines().any(|l| l == "STATUS=stopping"),
        "STOPPING=1 without STATUS=stopping: {stopping:?}"
    );
    assert!(
        !lines(&after).contains(&"READY=1"),
        "a second READY=1 before stopping: {after:?}"
    );
    let log = s.log();
    let (status, took) = s.wait_exit(Duration::from_secs(10));
    assert!(
        status.success(),
        "exit status {status} after SIGTERM:\n{log}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?} to stop");
    // Nothing is announced after STOPPING=1.
    let late = notify.collect(Duration::from_millis(200));
    assert!(
        !lines(&late).contains(&"READY=1"),
        "READY=1 after STOPPING=1: {late:?}"
    );
}

#[test]
fn no_notify_socket_changes_nothing() {
    // Without NOTIFY_SOCKET the helpers are no-ops: the server starts and stops as always.
    let s = Server::start_with_env(
        &[
            "--listen",
            "127.0.0.1:0",
            "-e",
            "disk",
            "raw",
            "memory:1MiB",
        ],
        &env(&[("WATCHDOG_USEC", "200000")]),
    );
    std::thread::sleep(Duration::from_millis(300));
    let log = s.log();
    assert!(!log.contains("cannot notify"), "{log}");
    assert!(s.stop().success(), "{log}");
}

#[test]
fn watchdog_pings_at_half_the_interval_while_serving() {
    let notify = NotifySocket::new();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut vars = vec![notify.env()];
    vars.extend(env(&[("WATCHDOG_USEC", "200000")]));
    let s = Server::spawn_unwaited(
        &["--listen", &listen, "-e", "disk", "raw", "memory:1MiB"],
        &vars,
        &listen,
    );
    notify.wait_for("READY=1", Duration::from_secs(30));
    // Every 100 ms: about 15 in 1.5 s; a loaded machine may delay some, never all.
    let window = notify.collect(Duration::from_millis(1500));
    let pings = lines(&window)
        .iter()
        .filter(|l| **l == "WATCHDOG=1")
        .count();
    assert!(
        (5..=20).contains(&pings),
        "{pings} WATCHDOG=1 pings in 1.5 s at WATCHDOG_USEC=200000: {window:?}"
    );
    // Still pinging while a client is connected and working.
    let size = run(
        Command::new("nbdinfo").args(["--size", &format!("nbd://{listen}/disk")]),
        Duration::from_secs(30),
    );
    assert_eq!(String::from_utf8_lossy(&size.stdout).trim(), "1048576");
    notify.wait_for("WATCHDOG=1", Duration::from_secs(2));

    signal(s.pid(), "TERM");
    notify.wait_for("STOPPING=1", Duration::from_secs(5));
    let log = s.log();
    let (status, _) = s.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{log}");
    assert!(log.contains("systemd watchdog enabled"), "{log}");
    assert!(!log.contains("did not answer"), "{log}");
}

#[test]
fn a_watchdog_meant_for_another_process_is_ignored() {
    let notify = NotifySocket::new();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut vars = vec![notify.env()];
    // WATCHDOG_PID names another process (pid 1): its watchdog is not ours.
    vars.extend(env(&[("WATCHDOG_USEC", "200000"), ("WATCHDOG_PID", "1")]));
    let s = Server::spawn_unwaited(
        &["--listen", &listen, "-e", "disk", "raw", "memory:1MiB"],
        &vars,
        &listen,
    );
    notify.wait_for("READY=1", Duration::from_secs(30));
    let window = notify.collect(Duration::from_millis(600));
    assert!(
        !lines(&window).contains(&"WATCHDOG=1"),
        "pinged a watchdog meant for pid 1: {window:?}"
    );
    signal(s.pid(), "TERM");
    let (status, _) = s.wait_exit(Duration::from_secs(10));
    assert!(status.success());
}

// ---------------------------------------------------------------------------------------------
// Logging to the journal

/// Runs in a private mount namespace with a tmpfs on /run, so that a datagram socket bound
/// at /run/systemd/journal/socket stands in for journald: starts nbd-rs with stderr on a file
/// and JOURNAL_STREAM naming that file, as systemd does, collects the journal entries until
/// the server listens, stops it, and prints every entry, then what reached stderr.
const FAKE_JOURNALD: &str = r#"
import os, socket, subprocess, sys, tempfile
j = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
j.bind("/run/systemd/journal/socket")
j.settimeout(20)
d = tempfile.mkdtemp(dir="/run")  # the private tmpfs: gone with the namespace
err = open(os.path.join(d, "stderr"), "wb+")
st = os.fstat(err.fileno())
env = dict(os.environ, JOURNAL_STREAM="%d:%d" % (st.st_dev, st.st_ino), RUST_LOG="info")
p = subprocess.Popen([sys.argv[1], "--listen", "127.0.0.1:0", "-e", "disk", "raw", "memory:1MiB"],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env)
entries = []
try:
    while not any(b"listening on" in e for e in entries):
        e = j.recv(1 << 20)
        if e:
            entries.append(e)
finally:
    p.terminate()
    code = p.wait(20)
j.settimeout(0.5)
try:
    while True:
        e = j.recv(1 << 20)
        if e:
            entries.append(e)
except socket.timeout:
    pass
def fields(e):
    # The native protocol: KEY=VALUE lines, or KEY, a 64-bit little-endian length and the bytes.
    i, out = 0, []
    while i < len(e):
        nl = e.index(b"\n", i)
        line = e[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            i = nl + 1
        else:
            n = int.from_bytes(e[nl + 1:nl + 9], "little")
            k, v = line, e[nl + 9:nl + 9 + n]
            i = nl + 9 + n + 1
        out.append("%s=%s\n" % (k.decode(), v.decode("utf-8", "replace").replace("\n", " ")))
    return "".join(out)
for e in entries:
    sys.stdout.write("--- entry\n" + fields(e))
err.seek(0)
sys.stdout.write("--- stderr\n" + err.read().decode("utf-8", "replace"))
sys.stdout.write("--- exit %d\n" % code)
"#;

#[test]
fn logs_go_to_the_journal_with_fields_when_stderr_is_the_journal() {
    need("unshare", "util-linux");
    let out = run(
        Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && exec \"$0\" -c \"$1\" \"$2\"",
                PY,
                FAKE_JOURNALD,
                bin(),
            ]),
        Duration::from_secs(60),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the fake journald failed ({}); this test needs root (unshare --mount):\n{}\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let (journal, rest) = text.split_once("--- stderr\n").unwrap();
    let entries: Vec<&str> = journal.split("--- entry\n").skip(1).collect();
    let entry = |needle: &str| {
        entries
            .iter()
            .find(|e| e.contains(needle))
            .unwrap_or_else(|| panic!("no journal entry with {needle:?}:\n{journal}"))
    };
    let ready = entry("export ready");
    for field in ["SYSLOG_IDENTIFIER=nbd-rs\n", "EXPORT=disk\n", "PRIORITY="] {
        assert!(ready.contains(field), "{field:?} missing in {ready:?}");
    }
    entry("listening on 127.0.0.1:");
    entry("stopped");
    assert!(
        entries
            .iter()
            .all(|e| e.contains("SYSLOG_IDENTIFIER=nbd-rs\n")),
        "{journal}"
    );
    // Nothing was written to stderr: the journal took it all.
    let (stderr, exit) = rest.split_once("--- exit ").unwrap();
    assert!(stderr.trim().is_empty(), "stderr got: {stderr}");
    assert_eq!(exit.trim(), "0", "nbd-rs exit status");
}

// ---------------------------------------------------------------------------------------------
// Socket activation

#[test]
fn socket_activation_through_nbdinfo() {
    need("nbdinfo", "libnbd-bin");
    let out = run(
        Command::new("nbdinfo").args([
            "--size",
            "--",
            "[",
            bin(),
            "-e",
            "x",
            "raw",
            "memory:1MiB",
            "]",
        ]),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "nbdinfo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1048576");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("socket activation: serving on the passed sockets"),
        "{err}"
    );
}

#[test]
fn socket_activation_through_the_python_binding_writes_and_reads() {
    let script = r#"
import sys, nbd
h = nbd.NBD()
h.connect_systemd_socket_activation([sys.argv[1], "-e", "disk", "raw", "memory:1MiB"])
assert h.get_size() == 1048576, h.get_size()
data = bytes(range(256)) * 256
h.pwrite(data, 65536)
if h.can_flush():
    h.flush()
assert h.pread(len(data), 65536) == data, "read back differs"
assert h.pread(4096, 0) == bytes(4096), "unwritten data is not zero"
h.shutdown()
print("ok")
"#;
    let out = run(
        Command::new(PY).args(["-c", script, bin()]),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "python3 nbd failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

/// `systemd-socket-activate -l ADDR nbd-rs ARGS...`, with its stderr drained; returns once it
/// listens. It execs nbd-rs in place at the first connection, so its PID becomes the server's.
fn socket_activate(addr: &str, args: &[&str]) -> (Child, std::sync::mpsc::Receiver<String>) {
    need("systemd-socket-activate", "systemd");
    let mut child = Command::new("systemd-socket-activate")
        .args(["-l", addr, bin()])
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("[socket-activate] {line}");
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with("Listening on") => return (child, rx),
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                panic!("systemd-socket-activate did not listen on {addr}");
            }
        }
    }
}

fn stop_child(mut child: Child) -> std::process::ExitStatus {
    signal(child.id(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the socket-activated server did not stop within 10 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn socket_activation_over_tcp_and_unix_by_systemd_socket_activate() {
    // TCP.
    let port = free_port();
    let (child, rx) = socket_activate(
        &format!("127.0.0.1:{port}"),
        &["--listen", "127.0.0.1:1", "-e", "x", "raw", "memory:1MiB"],
    );
    let out = run(
        Command::new("nbdinfo").args(["--size", &format!("nbd://127.0.0.1:{port}/x")]),
        Duration::from_secs(30),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1048576",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = stop_child(child);
    let log: Vec<String> = rx.try_iter().collect();
    assert!(status.success(), "exit {status}: {log:#?}");
    assert!(
        log.iter()
            .any(|l| l.contains(&format!("listening on 127.0.0.1:{port}"))),
        "{log:#?}"
    );
    assert!(
        log.iter().any(|l| l.contains(
            "serving on the passed sockets instead of the configured listen addresses (127.0.0.1:1)"
        )),
        "{log:#?}"
    );

    // Unix: the socket is the service manager's and stays when the server stops.
    let dir = Scratch::new("activate-unix");
    let sock = dir.path("nbd.sock");
    let (child, rx) = socket_activate(sock.to_str().unwrap(), &["-e", "x", "raw", "memory:1MiB"]);
    let out = run(
        Command::new("nbdinfo").args([
            "--size",
            &format!("nbd+unix:///x?socket={}", sock.display()),
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1048576",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = stop_child(child);
    let log: Vec<String> = rx.try_iter().collect();
    assert!(status.success(), "exit {status}: {log:#?}");
    assert!(
        sock.exists(),
        "the passed Unix socket was removed on stop: {log:#?}"
    );
}

#[test]
fn listen_fds_meant_for_another_process_are_ignored() {
    // LISTEN_PID names another process: nothing is taken, the listen address is bound.
    let s = Server::start_with_env(
        &[
            "--listen",
            "127.0.0.1:0",
            "-e",
            "disk",
            "raw",
            "memory:1MiB",
        ],
        &env(&[("LISTEN_PID", "1"), ("LISTEN_FDS", "1")]),
    );
    assert!(s.addr.starts_with("127.0.0.1:"), "{}", s.addr);
    let out = run(
        Command::new("nbdinfo").args(["--size", &s.uri("disk")]),
        Duration::from_secs(30),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1048576");
    assert!(!s.log().contains("socket activation"), "{}", s.log());
    assert!(s.stop().success());
}

// ---------------------------------------------------------------------------------------------
// A qemu client with reconnect-delay across restarts

const BLOCK: u64 = 64 * 1024;

fn pattern(block: u64) -> u8 {
    (block % 251) as u8 + 1
}

/// SIGTERM `old` (it must exit 0: in-flight requests answered, the export flushed and
/// closed), then start the same server again on the same port.
fn restart(old: Server, args: &[&str], vars: &[(String, String)]) -> Server {
    signal(old.pid(), "TERM");
    let log = old.log();
    let (status, _) = old.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit {status} on SIGTERM:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    Server::start_with_env(args, vars)
}

/// qemu-io, its stdout line-buffered (stdbuf) and read live, so that the test sees each
/// write complete.
struct QemuIo {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: std::thread::JoinHandle<Vec<u8>>,
}

impl QemuIo {
    fn start(image_opts: &str, cmds: &[String]) -> QemuIo {
        need("qemu-io", "qemu-utils");
        let mut cmd = Command::new("stdbuf");
        cmd.args(["-oL", "qemu-io", "--image-opts", image_opts]);
        for c in cmds {
            cmd.args(["-c", c]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = err.read_to_end(&mut v);
            v
        });
        QemuIo {
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    /// Waits for the output line `line`.
    fn wait_for(&mut self, line: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let found = l == line;
                    self.seen.push(l);
                    if found {
                        return;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    panic!(
                        "qemu-io did not print {line:?} within {limit:?}; last lines:\n{}",
                        self.seen
                            .iter()
                            .rev()
                            .take(10)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join("\n")
                    );
                }
            }
        }
    }

    /// Waits for the exit; returns the status, every stdout line and stderr.
    fn finish(mut self, limit: Duration) -> (std::process::ExitStatus, Vec<String>, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("qemu-io did not finish within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr = String::from_utf8_lossy(&self.stderr.join().unwrap()).into_owned();
        // The reader ends at EOF, after the process has exited.
        self.seen.extend(self.lines.iter());
        (status, self.seen, stderr)
    }
}

fn wrote(block: u64) -> String {
    format!("wrote {BLOCK}/{BLOCK} bytes at offset {}", block * BLOCK)
}

/// qemu-io (reconnect-delay=20) writes 576 blocks of 64 KiB through a server that is restarted
/// twice: once while qemu-io sleeps between two batches of writes, and once while it streams
/// the second batch. Then it reads every block back with pattern checks, from the third server.
/// Returns the stopped third server's log.
fn qemu_survives_restarts(tag: &str, driver: &str, conn: &str) -> String {
    let state = Scratch::new(tag);
    let vars = vec![("STATE_DIRECTORY".to_owned(), state.as_str().to_owned())];
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["--listen", &listen, "-e", "disk", driver, conn];
    let a = Server::start_with_env(&args, &vars);

    let (first, second) = (64u64, 512u64);
    let total = first + second;
    let mut cmds: Vec<String> = Vec::new();
    for b in 0..first {
        cmds.push(format!("write -P {} {} {BLOCK}", pattern(b), b * BLOCK));
    }
    cmds.push("sleep 4000".into());
    for b in first..total {
        cmds.push(format!("write -P {} {} {BLOCK}", pattern(b), b * BLOCK));
    }
    for b in 0..total {
        cmds.push(format!("read -P {} {} {BLOCK}", pattern(b), b * BLOCK));
    }
    let mut qemu = QemuIo::start(
        &format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk,reconnect-delay=20"
        ),
        &cmds,
    );

    // Restart 1: the first batch is written and qemu-io sleeps for 4 s, its connection idle.
    qemu.wait_for(&wrote(first - 1), Duration::from_secs(60));
    let b = restart(a, &args, &vars);
    // Restart 2: while qemu-io streams the second batch (if the stream is quicker than the
    // stop, the restart lands after it: nothing may be lost either way).
    qemu.wait_for(&wrote(first + 8), Duration::from_secs(60));
    let c = restart(b, &args, &vars);

    let (status, out, stderr) = qemu.finish(Duration::from_secs(300));
    let tail = out
        .iter()
        .rev()
        .take(20)
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        status.success(),
        "qemu-io failed ({status}):\n{stderr}\n{tail}"
    );
    assert!(
        !out.iter().any(|l| l.contains("verification failed")) && stderr.trim().is_empty(),
        "qemu-io saw bad data or errors:\n{stderr}\n{tail}"
    );
    let writes = out.iter().filter(|l| l.starts_with("wrote ")).count() as u64;
    let reads = out.iter().filter(|l| l.starts_with("read ")).count() as u64;
    assert_eq!((writes, reads), (total, total), "{tail}");

    signal(c.pid(), "TERM");
    let log = c.log();
    let (status, _) = c.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{log}");
    log
}

#[test]
fn qemu_with_reconnect_delay_does_not_notice_restarts_of_a_file_export() {
    use std::os::unix::fs::FileExt;
    let dir = Scratch::new("qemu-restart-file");
    let img = dir.path("disk.img");
    let conn = format!("file:{}?size=64MiB", img.display());
    qemu_survives_restarts("qemu-restart-file-state", "raw", &conn);
    // The image itself holds every block.
    let f = std::fs::File::open(&img).unwrap();
    let mut buf = vec![0u8; BLOCK as usize];
    for b in 0..576 {
        f.read_exact_at(&mut buf, b * BLOCK).unwrap();
        assert!(
            buf.iter().all(|x| *x == pattern(b)),
            "block {b} of the image is not intact"
        );
    }
}

#[test]
fn qemu_with_reconnect_delay_does_not_notice_restarts_through_a_write_back_cache() {
    let dir = Scratch::new("qemu-restart-cache");
    let conn = format!("cache:file:{}?size=64MiB", dir.as_str());
    qemu_survives_restarts("qemu-restart-cache-state", "sharded", &conn);
}

// ---------------------------------------------------------------------------------------------
// The unit files

fn unit(name: &str) -> PathBuf {
    root().join("systemd").join(name)
}

#[test]
fn the_service_is_rated_2_0_or_better_by_systemd_analyze_security() {
    need("systemd-analyze", "systemd");
    let service = unit("nbd-rs.service");
    let out = run(
        Command::new("systemd-analyze").args([
            "security",
            "--offline=true",
            "--no-pager",
            service.to_str().unwrap(),
        ]),
        Duration::from_secs(60),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let level = text
        .lines()
        .find_map(|l| {
            let rest = l
                .split("Overall exposure level for nbd-rs.service:")
                .nth(1)?;
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(
        level <= 2.0,
        "exposure level {level} > 2.0: tighten systemd/nbd-rs.service\n{text}"
    );
}

#[test]
fn the_unit_files_pass_systemd_analyze_verify() {
    need("systemd-analyze", "systemd");
    // The installed binary and the man page come with the package: point ExecStart at the
    // binary under test and leave man pages out; everything else must verify cleanly.
    let dir = Scratch::new("units");
    let service = std::fs::read_to_string(unit("nbd-rs.service"))
        .unwrap()
        .replace("/usr/bin/nbd-rs", bin());
    std::fs::write(dir.path("nbd-rs.service"), service).unwrap();
    std::fs::copy(unit("nbd-rs.socket"), dir.path("nbd-rs.socket")).unwrap();
    let out = run(
        Command::new("systemd-analyze").args([
            "verify",
            "--man=no",
            dir.path("nbd-rs.service").to_str().unwrap(),
            dir.path("nbd-rs.socket").to_str().unwrap(),
        ]),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify ({}):\n{stderr}",
        out.status
    );
}

#[test]
fn the_service_is_a_notify_service_with_a_watchdog_and_a_checked_start() {
    let text = std::fs::read_to_string(unit("nbd-rs.service")).unwrap();
    for want in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=",
        "ExecStartPre=/usr/bin/nbd-rs check --config /etc/nbd-rs.toml",
        "ExecStart=/usr/bin/nbd-rs --config /etc/nbd-rs.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=nbd-rs",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(want)),
            "nbd-rs.service lacks {want}"
        );
    }
}
