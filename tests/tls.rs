//! TLS and access control with real clients: libnbd (`nbds://...?tls-certificates=DIR`) and
//! qemu (`tls-creds-x509`) over STARTTLS; plaintext clients, clients with a certificate from
//! another CA, without a certificate, and outside an allow list are each refused; the raw
//! option answers of a TLS-only server; the handshake and idle timeouts; `check` on bad TLS
//! settings.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Scratch, Server, bin, root, run, run_script};

/// A scratch directory with a PKI made by `tests/clients/make-pki.sh`.
fn pki(tag: &str) -> Scratch {
    let dir = Scratch::new(tag);
    let out = run(
        Command::new("bash")
            .arg(root().join("tests/clients/make-pki.sh"))
            .arg(dir.path("pki")),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// `[server.tls]` with client certificates, and three exports: `disk` for everyone, `alice`
/// for alice's certificate only, `tennet` for 10.0.0.0/8 only.
fn tls_config(dir: &Scratch, client_ca: bool) -> String {
    let p = dir.path("pki");
    let p = p.display();
    let ca = if client_ca {
        format!("client_ca = \"{p}/ca-cert.pem\"\n")
    } else {
        String::new()
    };
    let alice = if client_ca {
        "[exports.alice]\npipeline = \"raw -> memory\"\nsize = \"1MiB\"\nallow_names = [\"ALICE.example\"]\n"
    } else {
        ""
    };
    let text = format!(
        r#"[server.tls]
certificate = "{p}/server/server-cert.pem"
key = "{p}/server/server-key.pem"
{ca}
[exports.disk]
pipeline = "raw -> memory"
size = "64MiB"

{alice}
[exports.tennet]
pipeline = "raw -> memory"
size = "1MiB"
allow = ["10.0.0.0/8", "unix"]
"#
    );
    let cfg = dir.path("tls.toml");
    std::fs::write(&cfg, text).unwrap();
    cfg.display().to_string()
}

fn nbds(s: &Server, export: &str, dir: &Scratch, who: &str) -> String {
    format!(
        "nbds://{}/{export}?tls-certificates={}",
        s.addr,
        dir.path("pki").join(who).display()
    )
}

/// Runs a command; returns (success, stdout, stderr).
fn try_run(cmd: &mut Command) -> (bool, String, String) {
    let out = run(cmd, Duration::from_secs(60));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn libnbd_and_qemu_use_tls_and_strangers_are_refused() {
    let dir = pki("tls-clients");
    let s = Server::start(&["--config", &tls_config(&dir, true)]);

    // libnbd with alice's certificate: TLS, and the data goes both ways.
    let (ok, out, err) = try_run(Command::new("nbdinfo").arg(nbds(&s, "disk", &dir, "alice")));
    assert!(ok, "{err}");
    assert!(
        out.contains("protocol: newstyle-fixed with TLS, using structured packets"),
        "{out}"
    );
    let img = dir.path("img");
    std::fs::write(
        &img,
        (0..1u32 << 20).map(|i| (i % 251) as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    let (ok, _, err) = try_run(
        Command::new("nbdcopy")
            .arg(&img)
            .arg(nbds(&s, "disk", &dir, "alice")),
    );
    assert!(ok, "{err}");
    let back = dir.path("back");
    let (ok, _, err) = try_run(
        Command::new("nbdcopy")
            .arg(nbds(&s, "disk", &dir, "bob"))
            .arg(&back),
    );
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read(&back).unwrap()[..1 << 20],
        std::fs::read(&img).unwrap()[..]
    );

    // Writes of every size and alignment, read from TLS records into the memory export's pages,
    // read back as written.
    let out = run_script(
        "/usr/bin/python3",
        "paged_writes.py",
        &[&nbds(&s, "disk", &dir, "alice"), "8388608"],
        Duration::from_secs(300),
    );
    assert_eq!(out.trim(), "checked 110 writes");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s
        .log()
        .lines()
        .any(|l| l.contains("client disconnected") && !l.contains(" paged_bytes=0 "))
    {
        assert!(
            Instant::now() < deadline,
            "no connection counted paged bytes:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // qemu with x509 credentials writes and reads back.
    let creds = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        dir.path("pki/alice").display()
    );
    let opts = format!(
        "driver=nbd,host=127.0.0.1,port={},export=disk,tls-creds=tls0",
        s.port()
    );
    let (ok, out, err) = try_run(Command::new("qemu-io").args([
        "--object",
        &creds,
        "--image-opts",
        &opts,
        "-c",
        "write -P 7 1M 64k",
        "-c",
        "read -P 7 1M 64k",
    ]));
    assert!(
        ok && !out.contains("Pattern verification failed"),
        "{out}{err}"
    );

    // Plaintext clients get TLS_REQD, and see no export.
    let (ok, _, err) = try_run(Command::new("nbdinfo").arg(s.uri("disk")));
    assert!(!ok);
    assert!(
        err.contains(
            "nbd_opt_go: server replied with error to opt_go request: Operation not supported"
        ),
        "{err}"
    );
    let (ok, _, err) = try_run(Command::new("nbdinfo").args(["--list", &s.uri("")]));
    assert!(!ok);
    assert!(
        err.contains(
            "nbd_opt_list: server replied with error to list request: Operation not supported"
        ),
        "{err}"
    );
    let (ok, _, err) = try_run(Command::new("qemu-img").args(["info", &s.uri("disk")]));
    assert!(!ok);
    assert!(
        err.contains("server reported: this server requires TLS: send NBD_OPT_STARTTLS first"),
        "{err}"
    );

    // A client certificate from another CA, and no client certificate: refused in the TLS
    // handshake.
    for who in ["mallory", "anonymous"] {
        let (ok, out, err) = try_run(Command::new("nbdinfo").arg(nbds(&s, "disk", &dir, who)));
        assert!(!ok, "{who} got in: {out}");
        assert!(err.contains("gnutls"), "{who}: {err}");
    }
    // A client that does not trust the server's CA stops by itself.
    let (ok, _, err) = try_run(Command::new("nbdinfo").arg(nbds(&s, "disk", &dir, "wrong-ca")));
    assert!(!ok);
    assert!(err.contains("certificate"), "{err}");
    wait_log(&s, "TLS handshake failed: peer sent no certificates");

    // Allow lists: alice sees `alice`, bob does not, and nobody on 127.0.0.1 sees `tennet`.
    let list = |who: &str| {
        let (ok, out, err) = try_run(
            Command::new("nbdinfo")
                .arg("--list")
                .arg(nbds(&s, "", &dir, who)),
        );
        assert!(ok, "{err}");
        let mut names: Vec<String> = out
            .lines()
            .filter_map(|l| {
                l.strip_prefix("export=\"")?
                    .split('"')
                    .next()
                    .map(str::to_owned)
            })
            .collect();
        names.sort();
        names
    };
    assert_eq!(list("alice"), ["alice", "disk"]);
    assert_eq!(list("bob"), ["disk"]);
    let (ok, out, _) = try_run(
        Command::new("nbdinfo")
            .arg("--size")
            .arg(nbds(&s, "alice", &dir, "alice")),
    );
    assert!(ok);
    assert_eq!(out.trim(), "1048576");
    for (export, who) in [("alice", "bob"), ("tennet", "alice")] {
        let (ok, _, err) = try_run(
            Command::new("nbdinfo")
                .arg("--size")
                .arg(nbds(&s, export, &dir, who)),
        );
        assert!(!ok, "{who} got {export}");
        // The same answer as for an export that does not exist.
        assert!(
            err.contains(&format!("server has no export named '{export}'")),
            "{err}"
        );
    }
    assert!(!s.log().contains("panicked"));
    assert!(s.stop().success());
}

/// Reads one option reply: (option, type, data).
fn reply(c: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    c.read_exact(&mut h).unwrap();
    assert_eq!(h[..8], 0x0003_e889_0455_65a9u64.to_be_bytes());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut data = vec![0u8; len];
    c.read_exact(&mut data).unwrap();
    (
        u32::from_be_bytes(h[8..12].try_into().unwrap()),
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
        data,
    )
}

fn option(c: &mut TcpStream, option: u32, data: &[u8]) {
    let mut o = Vec::new();
    o.extend_from_slice(b"IHAVEOPT");
    o.extend_from_slice(&option.to_be_bytes());
    o.extend_from_slice(&(data.len() as u32).to_be_bytes());
    o.extend_from_slice(data);
    c.write_all(&o).unwrap();
}

fn hello(s: &Server) -> TcpStream {
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    c.read_exact(&mut g).unwrap();
    c.write_all(&3u32.to_be_bytes()).unwrap();
    c
}

const ERR_TLS_REQD: u32 = 0x8000_0005;
const ERR_INVALID: u32 = 0x8000_0003;

#[test]
fn a_tls_only_server_answers_options_before_starttls_with_tls_reqd() {
    let dir = pki("tls-raw");
    let s = Server::start(&["--config", &tls_config(&dir, false)]);
    let mut c = hello(&s);
    let go = [&4u32.to_be_bytes()[..], b"disk", &0u16.to_be_bytes()].concat();
    // LIST, STRUCTURED_REPLY, INFO, GO, LIST_META_CONTEXT, an unknown option: TLS_REQD, and
    // the message says what to do.
    for (opt, data) in [
        (3u32, &[][..]),
        (8, &[][..]),
        (6, &go[..]),
        (7, &go[..]),
        (9, &[][..]),
        (99, &[][..]),
    ] {
        option(&mut c, opt, data);
        let (o, kind, msg) = reply(&mut c);
        assert_eq!((o, kind), (opt, ERR_TLS_REQD), "option {opt}");
        assert_eq!(
            String::from_utf8_lossy(&msg),
            "this server requires TLS: send NBD_OPT_STARTTLS first"
        );
    }
    // STARTTLS with data is invalid.
    option(&mut c, 5, b"x");
    assert_eq!(reply(&mut c).1, ERR_INVALID);
    // EXPORT_NAME before TLS: the connection is closed without an answer.
    option(&mut c, 1, b"disk");
    let mut rest = Vec::new();
    assert_eq!(c.read_to_end(&mut rest).unwrap(), 0);
    wait_log(
        &s,
        "client used NBD_OPT_EXPORT_NAME without TLS on a server that requires TLS",
    );
    // STARTTLS is acknowledged, then a client that speaks no TLS fails the TLS handshake.
    let mut c = hello(&s);
    option(&mut c, 5, &[]);
    assert_eq!(reply(&mut c), (5, 1, Vec::new()));
    c.write_all(b"this is not a TLS client hello").unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    wait_log(&s, "TLS handshake failed");
    assert!(s.stop().success());
}

fn wait_log(s: &Server, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.log().contains(needle) {
        assert!(Instant::now() < deadline, "no {needle:?} in:\n{}", s.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn stalled_handshakes_and_idle_connections_are_closed() {
    let dir = Scratch::new("timeouts");
    let cfg = dir.path("t.toml");
    std::fs::write(
        &cfg,
        "[server]\nhandshake_timeout = \"1s\"\nidle_timeout = \"2s\"\nmax_connections = 2\n[exports.disk]\npipeline = \"raw -> memory\"\nsize = \"1MiB\"\n",
    )
    .unwrap();
    let s = Server::start(&["--config", cfg.to_str().unwrap()]);
    // A client that sends nothing after the greeting is closed after the handshake timeout.
    let started = Instant::now();
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut all = Vec::new();
    c.read_to_end(&mut all).unwrap();
    assert_eq!(all.len(), 18, "only the greeting");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    wait_log(&s, "handshake not finished within 1s");

    // An idle client (nbdsh with a sleep between requests) is closed after 2 s of silence; one
    // that keeps talking is not.
    let script = format!(
        r#"
import nbd, time
h = nbd.NBD()
h.connect_uri("{}")
for i in range(4):
    h.pread(512, 0)
    time.sleep(0.5)
time.sleep(3)
try:
    h.pread(512, 0)
    print("still open")
except nbd.Error as e:
    print("closed:", e)
"#,
        s.uri("disk")
    );
    let out = run(
        Command::new("/usr/bin/python3").args(["-c", &script]),
        Duration::from_secs(30),
    );
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.starts_with("closed:"), "{out}");
    wait_log(&s, "connection closed: idle for longer than idle_timeout");

    // With max_connections = 2, a third client waits until one of the others leaves, and the
    // server stays healthy.
    let a = hello_to(&s);
    let b = hello_to(&s);
    let mut third = TcpStream::connect(&s.addr).unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut g = [0u8; 18];
    assert!(
        third.read_exact(&mut g).is_err(),
        "a third client was served"
    );
    drop(a);
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    third.read_exact(&mut g).unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    drop(b);
    assert!(s.stop().success());
}

/// A connection that has read its greeting.
fn hello_to(s: &Server) -> TcpStream {
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    c.read_exact(&mut g).unwrap();
    c
}

/// Runs `nbd-rs check` on `text`; returns (exit code, stdout, stderr).
fn check(dir: &Scratch, text: &str) -> (i32, String, String, String) {
    let cfg = dir.path("check.toml");
    std::fs::write(&cfg, text).unwrap();
    let out = run(
        Command::new(bin()).args(["check", "--config", cfg.to_str().unwrap()]),
        Duration::from_secs(30),
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        cfg.display().to_string(),
    )
}

#[test]
fn check_reports_bad_tls_settings_and_access_lists_with_their_lines() {
    let dir = pki("tls-check");
    let p = dir.path("pki");
    let p = p.display();
    let export = "[exports.disk]\npipeline = \"raw -> memory\"\nsize = \"1MiB\"\n";

    // A key that does not go with the certificate, a missing CA file.
    let (code, _, err, cfg) = check(
        &dir,
        &format!(
            "[server.tls]\ncertificate = \"{p}/server/server-cert.pem\"\nkey = \"{p}/alice/client-key.pem\"\nclient_ca = \"{p}/nowhere.pem\"\n{export}"
        ),
    );
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "nbd-rs: error: {cfg}:4: key \"server.tls.client_ca\": cannot read {p}/nowhere.pem: No such file or directory"
        )),
        "{err}"
    );
    let (code, _, err, cfg) = check(
        &dir,
        &format!(
            "[server.tls]\ncertificate = \"{p}/server/server-cert.pem\"\nkey = \"{p}/alice/client-key.pem\"\n{export}"
        ),
    );
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "nbd-rs: error: {cfg}:3: key \"server.tls.key\": {p}/alice/client-key.pem does not go with the certificate {p}/server/server-cert.pem"
        )),
        "{err}"
    );
    // A certificate file that is not PEM, a missing key, an unknown key.
    let (code, _, err, cfg) = check(
        &dir,
        &format!(
            "[server.tls]\ncertificate = \"{cfg_self}\"\nkeys = \"x\"\n{export}",
            cfg_self = dir.path("check.toml").display()
        ),
    );
    assert_eq!(code, 1);
    let mut got: Vec<&str> = err.lines().collect();
    got.sort_unstable();
    let mut want = vec![
        format!(
            "nbd-rs: error: {cfg}:1: key \"server.tls\": missing key \"key\": TLS needs a certificate and its private key"
        ),
        format!(
            "nbd-rs: error: {cfg}:3: key \"server.tls.keys\": unknown key (known: certificate, key, client_ca)"
        ),
        "nbd-rs: 2 problem(s) found".to_owned(),
    ];
    want.sort_unstable();
    assert_eq!(got, want, "{err}");

    // allow lists: bad entries, and names without client certificates.
    let (code, _, err, cfg) = check(
        &dir,
        "[exports.disk]\npipeline = \"raw -> memory\"\nsize = \"1MiB\"\nallow = [\"10.0.0.0/33\", \"localhost\", 7]\n",
    );
    assert_eq!(code, 1);
    let mut got: Vec<&str> = err.lines().collect();
    got.sort_unstable();
    let mut want = vec![
        format!(
            "nbd-rs: error: {cfg}:4: export \"disk\", key \"allow\": bad allow entry \"10.0.0.0/33\": expected an address (192.0.2.7, ::1), a network (10.0.0.0/8, fd00::/8) or \"unix\""
        ),
        format!(
            "nbd-rs: error: {cfg}:4: export \"disk\", key \"allow\": bad allow entry \"localhost\": expected an address (192.0.2.7, ::1), a network (10.0.0.0/8, fd00::/8) or \"unix\""
        ),
        format!(
            "nbd-rs: error: {cfg}:4: export \"disk\", key \"allow\": expected addresses as strings, found a number"
        ),
        "nbd-rs: 3 problem(s) found".to_owned(),
    ];
    want.sort_unstable();
    assert_eq!(got, want, "{err}");
    let (code, _, err, cfg) = check(&dir, &format!("{export}allow = []\n"));
    assert_eq!(code, 1);
    assert_eq!(
        err,
        format!(
            "nbd-rs: error: {cfg}:4: export \"disk\", key \"allow\": an empty allow list lets no one in: leave the key out to allow everyone\nnbd-rs: 1 problem(s) found\n"
        )
    );
    let (code, _, err, cfg) = check(&dir, &format!("{export}allow_names = [\"alice\"]\n"));
    assert_eq!(code, 1);
    assert_eq!(
        err,
        format!(
            "nbd-rs: error: {cfg}:4: export \"disk\", key \"allow_names\": certificate names need client certificates: set [server.tls] client_ca\nnbd-rs: 1 problem(s) found\n"
        )
    );

    // Limits.
    let (code, _, err, cfg) = check(
        &dir,
        &format!(
            "[server]\nmax_connections = 0\nhandshake_timeout = \"0\"\nidle_timeout = \"soon\"\n{export}"
        ),
    );
    assert_eq!(code, 1);
    let mut got: Vec<&str> = err.lines().collect();
    got.sort_unstable();
    let mut want = vec![
        format!(
            "nbd-rs: error: {cfg}:2: key \"server.max_connections\": expected a number of connections from 1 to 65536, found 0"
        ),
        format!(
            "nbd-rs: error: {cfg}:3: key \"server.handshake_timeout\": a handshake timeout cannot be 0: a client that never finishes its handshake would hold its connection for ever"
        ),
        format!(
            "nbd-rs: error: {cfg}:4: key \"server.idle_timeout\": bad duration \"soon\": no number (expected a number and a unit ms, s or m, like 100ms, 2s or 1m)"
        ),
        "nbd-rs: 3 problem(s) found".to_owned(),
    ];
    want.sort_unstable();
    assert_eq!(got, want, "{err}");

    // A private key every user can read works, with a warning.
    let key = dir.path("pki/server/server-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out, err, _) = check(
        &dir,
        &format!(
            "[server.tls]\ncertificate = \"{p}/server/server-cert.pem\"\nkey = \"{p}/server/server-key.pem\"\n{export}"
        ),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("is valid: 1 export(s)"), "{out}");
    assert_eq!(
        err.trim(),
        format!(
            "nbd-rs: warning: the private key {p}/server/server-key.pem is readable by every user: chmod o-r it (0600 or 0640)"
        )
    );
}

/// TLS bytes are encrypted in user space, so large reads of a file export are read into memory
/// rather than sent by `sendfile` or from a mapping of the image: the data matches a model of
/// the image, cached or evicted, and the connection's closing line counts no bytes sent either
/// way.
#[test]
fn large_file_reads_over_tls_are_copied_and_match_the_image() {
    let dir = pki("tls-file");
    let p = dir.path("pki");
    let img = dir.path("disk.img");
    let cfg = dir.path("tls-file.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server.tls]\ncertificate = \"{p}/server/server-cert.pem\"\nkey = \"{p}/server/server-key.pem\"\n\n\
             [exports.disk]\npipeline = \"raw -> file\"\nsize = \"64MiB\"\n[exports.disk.file]\npath = \"{img}\"\n",
            p = p.display(),
            img = img.display()
        ),
    )
    .unwrap();
    let s = Server::start(&["--config", cfg.to_str().unwrap()]);
    let uri = nbds(&s, "disk", &dir, "alice");
    let out = run_script(
        "/usr/bin/python3",
        "zero_copy.py",
        &[&uri, img.to_str().unwrap()],
        Duration::from_secs(600),
    );
    assert_eq!(out.trim(), "checked 150 reads");
    wait_log(&s, "client disconnected");
    let log = s.log();
    let line = log
        .lines()
        .find(|l| l.contains("client disconnected"))
        .unwrap();
    assert!(line.contains(" sendfile_bytes=0 "), "{line}");
    assert!(line.contains(" mapped_bytes=0 "), "{line}");
    // Large writes are decrypted in user space too, so none is spliced into the file.
    let src = dir.path("src");
    std::fs::write(
        &src,
        (0..4u32 << 20).map(|i| (i % 253) as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    let (ok, _, err) = try_run(Command::new("nbdcopy").arg(&src).arg(&uri));
    assert!(ok, "{err}");
    assert!(std::fs::read(&img).unwrap()[..4 << 20] == std::fs::read(&src).unwrap()[..]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.log().matches("client disconnected").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "no closing line for nbdcopy:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = s.log();
    let closing: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("client disconnected"))
        .collect();
    assert!(
        closing.iter().all(|l| l.contains(" spliced_bytes=0 ")),
        "{closing:?}"
    );
    let status = s.stop();
    assert!(status.success(), "{status}");
}

/// A client slower than the server keeps the server's socket full, so the last bytes of a
/// reply may find no room: the TLS stream keeps their records back until it is flushed, and a
/// client that waits for that reply before asking anything more waits forever unless the
/// server flushes after each batch of replies.
#[test]
fn every_reply_over_tls_reaches_a_slow_client_that_waits_for_it() {
    let dir = pki("tls-slow");
    let cfg = tls_config(&dir, false);
    let s = Server::start(&["--config", &cfg]);
    let (host, port) = s.addr.rsplit_once(':').unwrap();
    let ca = dir.path("pki").join("ca-cert.pem");
    let out = run_script(
        "/usr/bin/python3",
        "tls_slow_reader.py",
        &[host, port, ca.to_str().unwrap(), "disk"],
        Duration::from_secs(300),
    );
    assert_eq!(out.trim(), format!("read {} bytes", 64 * (8 << 20)));
    let status = s.stop();
    assert!(status.success(), "{status}");
}
