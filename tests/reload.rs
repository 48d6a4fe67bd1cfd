//! Hot reload on SIGHUP with real clients: exports added, removed and kept while a client holds
//! a connection to a kept export; a broken file changes nothing; a size change under connected
//! clients is refused naming them, and applies once they have gone; a changed write-back cached
//! export is drained under a writing client with nothing lost; sixteen reloads in eight seconds
//! leave a verifying fio run on a kept export untouched; SIGTERM with writes in flight and a
//! dirty cache loses nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Scratch, Server, run, run_script, signal};

fn wait_for(s: &Server, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !s.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn list(s: &Server) -> String {
    let out = run(
        Command::new("nbdinfo").args(["--list", &format!("nbd://{}", s.addr)]),
        Duration::from_secs(30),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn config(exports: &[(&str, &str)]) -> String {
    let mut t = String::new();
    for (name, size) in exports {
        t.push_str(&format!(
            "[exports.{name}]\npipeline = \"raw -> memory\"\nsize = \"{size}\"\n\n"
        ));
    }
    t
}

/// A client that connects, writes, then waits for `go` before reading its data back.
const CLIENT: &str = r#"
import nbd, os, sys, time
uri, ready, go = sys.argv[1:4]
h = nbd.NBD()
h.connect_uri(uri)
data = os.urandom(1 << 20)
h.pwrite(data, 4096)
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.02)
assert h.pread(1 << 20, 4096) == data, "data changed across the reload"
h.pwrite(b"after" * 100, 0)
assert h.pread(500, 0) == b"after" * 100
h.shutdown()
print("ok")
"#;

#[test]
fn reload_adds_removes_and_keeps_exports_around_a_connected_client() {
    let dir = Scratch::new("reload");
    let cfg = dir.path("nbd-rs.toml");
    std::fs::write(&cfg, config(&[("a", "64MiB"), ("b", "8MiB")])).unwrap();
    let s = Server::start(&["--config", cfg.to_str().unwrap()]);
    assert!(list(&s).contains("export=\"b\""));

    let (ready, go) = (dir.path("ready"), dir.path("go"));
    let client = Command::new("/usr/bin/python3")
        .args([
            "-c",
            CLIENT,
            &s.uri("a"),
            ready.to_str().unwrap(),
            go.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed if the test fails before the client is done.
    struct Guard(Option<std::process::Child>);
    impl Drop for Guard {
        fn drop(&mut self) {
            if let Some(mut c) = self.0.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let mut client = Guard(Some(client));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "the client never got ready");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Keep a, remove b, add c.
    std::fs::write(&cfg, config(&[("a", "64MiB"), ("c", "16MiB")])).unwrap();
    signal(s.pid(), "HUP");
    wait_for(
        &s,
        "configuration reloaded: added: c; changed: none; removed: b; unchanged: a",
    );
    let l = list(&s);
    assert!(
        l.contains("export=\"a\"") && l.contains("export=\"c\""),
        "{l}"
    );
    assert!(!l.contains("export=\"b\""), "{l}");

    // A broken file changes nothing.
    std::fs::write(&cfg, "[exports.a]\npipeline = \"raw -> nowhere\"\n").unwrap();
    signal(s.pid(), "HUP");
    wait_for(
        &s,
        "reload failed: serving on with the previous configuration",
    );
    assert!(s.log().contains("unknown stage \"nowhere\""), "{}", s.log());
    assert!(list(&s).contains("export=\"c\""));

    // Changing a's size while the client is connected is refused, naming the client.
    std::fs::write(&cfg, config(&[("a", "128MiB"), ("c", "16MiB")])).unwrap();
    signal(s.pid(), "HUP");
    wait_for(&s, "export \"a\" has clients (127.0.0.1:");
    wait_for(
        &s,
        "a reload cannot change its size from 64 MiB to 128 MiB under them; the change applies once they have disconnected (reload again then)",
    );

    // The client still reads what it wrote, and writes more.
    std::fs::File::create(&go).unwrap();
    let out = client.0.take().unwrap().wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");

    // Once it has gone, the change applies.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        signal(s.pid(), "HUP");
        std::thread::sleep(Duration::from_millis(300));
        if s.log().contains("changed: a;") {
            break;
        }
        assert!(Instant::now() < deadline, "{}", s.log());
    }
    let out = run(
        Command::new("nbdinfo").args(["--size", &s.uri("a")]),
        Duration::from_secs(30),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "134217728");
    assert!(!s.log().contains("panicked"));
    assert!(s.stop().success());
}

/// Kills a client process if the test fails before it is done.
struct Child(Option<std::process::Child>);

impl Drop for Child {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Child {
    /// Waits for the client; fails the test with its output unless it exits 0. Returns stdout.
    fn finish(mut self) -> String {
        let out = self.0.take().unwrap().wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "client failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

/// Starts `tests/clients/writer.py write` against `uri`.
fn writer(uri: &str, dir: &Scratch, extra: &[&str]) -> Child {
    let script = common::root().join("tests/clients/writer.py");
    let (ready, stop, model) = (dir.path("ready"), dir.path("stop"), dir.path("model.json"));
    let child = Command::new("/usr/bin/python3")
        .arg(script)
        .args(["write", uri, "--slots", "512", "--slot-size", "65536"])
        .args(["--ready", ready.to_str().unwrap()])
        .args(["--stop", stop.to_str().unwrap()])
        .args(["--model", model.to_str().unwrap()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let c = Child(Some(child));
    wait_path(&ready);
    c
}

fn wait_path(p: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A 32 MiB write-back cached volume of 1 MiB chunks in `dir/store/`; `store_delay` slows
/// every upload so that the cache stays dirty.
fn cached(dir: &Scratch, description: &str, cache_size: &str, store_delay: &str) -> String {
    format!(
        r#"[exports.vol]
pipeline = "cache -> sharded -> fault -> file"
size = "32MiB"
description = "{description}"
[exports.vol.file]
path = "{root}/store/"
[exports.vol.sharded]
chunk_size = "1MiB"
[exports.vol.fault]
write_delay = "{store_delay}"
[exports.vol.cache]
path = "{root}/cache"
size = "{cache_size}"
"#,
        root = dir.as_str()
    )
}

/// Serves `dir/store/` with no cache (a fresh process) and checks every slot against the model.
fn verify_store(dir: &Scratch) {
    let cfg = dir.path("plain.toml");
    std::fs::write(
        &cfg,
        format!(
            "[exports.vol]\npipeline = \"sharded -> file\"\n[exports.vol.file]\npath = \"{}/store/\"\n",
            dir.as_str()
        ),
    )
    .unwrap();
    let s = Server::start(&["--config", cfg.to_str().unwrap()]);
    let model = dir.path("model.json");
    let out = run_script(
        "/usr/bin/python3",
        "writer.py",
        &["verify", &s.uri("vol"), "--model", model.to_str().unwrap()],
        Duration::from_secs(120),
    );
    assert!(out.contains("\"verified\": 512"), "{out}");
    assert!(s.stop().success());
}

fn reloads(s: &Server) -> usize {
    s.log().matches("configuration reloaded:").count()
}

#[test]
fn reload_drains_a_changed_cached_export_under_a_writing_client_and_loses_nothing() {
    let dir = Scratch::new("reload-cached");
    let cfg = dir.path("nbd-rs.toml");
    std::fs::write(&cfg, cached(&dir, "v0", "64MiB", "5ms")).unwrap();
    let s = Server::start(&["--config", cfg.to_str().unwrap()]);
    let client = writer(&s.uri("vol"), &dir, &["--reconnect", "--fua-every", "50"]);

    // Change the export four times (its cache size and description) while the client writes.
    for round in 1..=4 {
        let size = if round % 2 == 1 { "48MiB" } else { "64MiB" };
        std::fs::write(&cfg, cached(&dir, &format!("v{round}"), size, "5ms")).unwrap();
        signal(s.pid(), "HUP");
        let deadline = Instant::now() + Duration::from_secs(60);
        while reloads(&s) < round {
            assert!(Instant::now() < deadline, "{}", s.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(s.log().matches("changed: vol;").count(), 4, "{}", s.log());
    assert!(
        s.log()
            .contains("connection closed: its export was reloaded or removed"),
        "{}",
        s.log()
    );
    std::fs::File::create(dir.path("stop")).unwrap();
    let out = client.finish();
    eprintln!("writer: {out}");
    // Every drain closed the client's connection; it came back each time and re-sent what was
    // unanswered.
    assert!(out.contains("\"reconnects\": 4"), "{out}");
    assert!(!s.log().contains("panicked"), "{}", s.log());
    assert!(s.stop().success());
    verify_store(&dir);
}

#[test]
fn sigterm_with_writes_in_flight_and_a_dirty_cache_loses_nothing() {
    let dir = Scratch::new("sigterm-dirty");
    let cfg = dir.path("nbd-rs.toml");
    // Uploads take 50 ms each: most of what the client writes is dirty in the cache.
    std::fs::write(&cfg, cached(&dir, "v0", "64MiB", "50ms")).unwrap();
    let s = Server::start(&["--config", cfg.to_str().unwrap()]);
    let client = writer(&s.uri("vol"), &dir, &["--depth", "16"]);
    std::thread::sleep(Duration::from_millis(500));
    let chunks_before = std::fs::read_dir(dir.path("store"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".chunk")
        })
        .count();
    assert!(
        chunks_before < 32,
        "the cache was not dirty: {chunks_before} chunks were already stored"
    );
    let pid = s.pid();
    signal(pid, "TERM");
    let (status, _) = s.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status}");
    let out = client.finish();
    eprintln!("writer: {out}");
    verify_store(&dir);
}

/// `keep` is served to fio all along; `churn` changes on every reload.
fn churn_config(round: usize) -> String {
    let mut t = config(&[("keep", "256MiB")]);
    t.push_str(&format!(
        "[exports.churn]\npipeline = \"raw -> memory\"\nsize = \"{}MiB\"\ndescription = \"round {round}\"\n",
        8 << (round % 3)
    ));
    t
}

#[test]
fn sixteen_reloads_in_eight_seconds_leave_a_verifying_fio_on_a_kept_export_alone() {
    let dir = Scratch::new("reload-fio");
    let cfg = dir.path("nbd-rs.toml");
    std::fs::write(&cfg, churn_config(0)).unwrap();
    let s = Server::start(&["--config", cfg.to_str().unwrap()]);
    // One fio connection for the whole run: random writes, each block verified soon after it
    // is written, any mismatch fatal.
    let fio = Command::new("fio")
        .args([
            "--name=kept",
            "--ioengine=nbd",
            &format!("--uri={}", s.uri("keep")),
            "--rw=randwrite",
            "--bs=16k",
            "--size=128m",
            "--iodepth=16",
            "--time_based",
            "--runtime=11",
            "--verify=crc32c",
            "--verify_backlog=512",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--exitall_on_error",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let fio = Child(Some(fio));
    std::thread::sleep(Duration::from_millis(1000));
    let started = Instant::now();
    for round in 1..=16 {
        let tick = Instant::now();
        std::fs::write(&cfg, churn_config(round)).unwrap();
        signal(s.pid(), "HUP");
        let deadline = Instant::now() + Duration::from_secs(30);
        while reloads(&s) < round {
            assert!(Instant::now() < deadline, "{}", s.log());
            std::thread::sleep(Duration::from_millis(10));
        }
        let spent = tick.elapsed();
        if spent < Duration::from_millis(500) {
            std::thread::sleep(Duration::from_millis(500) - spent);
        }
    }
    let took = started.elapsed();
    let out = fio.finish();
    assert!(took < Duration::from_secs(12), "16 reloads took {took:?}");
    assert_eq!(
        s.log()
            .matches("changed: churn; removed: none; unchanged: keep")
            .count(),
        16,
        "{}",
        s.log()
    );
    assert!(out.contains("err= 0"), "{out}");
    // fio's connection was never closed by a reload.
    assert!(!s.log().contains("export was reloaded"), "{}", s.log());
    assert!(s.stop().success());
}

/// A client stalled in the middle of a write payload cannot hold a reload up for ever: it is
/// cut after the grace period and the changed export is reopened.
#[test]
fn a_client_stalled_mid_request_is_cut_after_the_grace_period() {
    use std::io::{Read, Write};
    let dir = Scratch::new("reload-stalled");
    let cfg = dir.path("nbd-rs.toml");
    let with = |description: &str| {
        format!(
            "{}description = \"{description}\"\n",
            config(&[("a", "8MiB")])
        )
    };
    std::fs::write(&cfg, with("before")).unwrap();
    let s = Server::start(&["--config", cfg.to_str().unwrap()]);

    // Fixed newstyle by hand: NO_ZEROES, NBD_OPT_EXPORT_NAME "a".
    let mut c = std::net::TcpStream::connect(&s.addr).unwrap();
    let mut greeting = [0u8; 18];
    c.read_exact(&mut greeting).unwrap();
    let mut hello = Vec::new();
    hello.extend_from_slice(&3u32.to_be_bytes());
    hello.extend_from_slice(b"IHAVEOPT");
    hello.extend_from_slice(&1u32.to_be_bytes());
    hello.extend_from_slice(&1u32.to_be_bytes());
    hello.push(b'a');
    c.write_all(&hello).unwrap();
    let mut export = [0u8; 10];
    c.read_exact(&mut export).unwrap();
    assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), 8 << 20);
    // A 1 MiB WRITE with only 1000 bytes of its payload, then nothing.
    let mut req = Vec::new();
    req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&1u16.to_be_bytes());
    req.extend_from_slice(&7u64.to_be_bytes());
    req.extend_from_slice(&0u64.to_be_bytes());
    req.extend_from_slice(&(1u32 << 20).to_be_bytes());
    req.extend_from_slice(&[0xab; 1000]);
    c.write_all(&req).unwrap();

    std::fs::write(&cfg, with("after")).unwrap();
    let started = Instant::now();
    signal(s.pid(), "HUP");
    wait_for(&s, "waiting 5 s for clients to finish their requests");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !s.log().contains("configuration reloaded") {
        assert!(Instant::now() < deadline, "{}", s.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(29), "cut after {took:?}");
    let log = s.log();
    assert!(
        log.contains("connection cut: requests unfinished when the grace period ended"),
        "{log}"
    );
    assert!(
        log.contains(
            "configuration reloaded: added: none; changed: a; removed: none; unchanged: none"
        ),
        "{log}"
    );
    // The cut connection is closed; the new export serves.
    let mut rest = Vec::new();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(c.read_to_end(&mut rest).unwrap(), 0, "{rest:?}");
    assert!(list(&s).contains("description: after"), "{}", list(&s));
    assert!(s.stop().success());
}

/// Renaming a busy export that keeps its storage: the old pipeline is drained and closed
/// before the new one opens, so the new one finds its cache unlocked and the data there.
#[test]
fn a_renamed_export_opens_its_storage_only_after_the_old_one_closed() {
    let dir = Scratch::new("reload-rename");
    let cfg = dir.path("nbd-rs.toml");
    // The volume keeps its name (`sharded.name`), so the renamed export serves the same
    // chunks through the same cache directory.
    let named = |name: &str| {
        cached(&dir, "v0", "64MiB", "0ms")
            .replace("[exports.vol", &format!("[exports.{name}"))
            .replace(
                "chunk_size = \"1MiB\"",
                "chunk_size = \"1MiB\"\nname = \"vol\"",
            )
    };
    std::fs::write(&cfg, named("vol")).unwrap();
    let s = Server::start(&["--config", cfg.to_str().unwrap()]);
    let client = writer(&s.uri("vol"), &dir, &[]);
    std::fs::write(&cfg, named("renamed")).unwrap();
    signal(s.pid(), "HUP");
    wait_for(
        &s,
        "configuration reloaded: added: renamed; changed: none; removed: vol; unchanged: none",
    );
    // The writer was disconnected by the drain; every write it had answered is in the volume.
    std::fs::File::create(dir.path("stop")).unwrap();
    client.finish();
    assert!(!s.log().contains("is not served"), "{}", s.log());
    let out = run_script(
        "/usr/bin/python3",
        "writer.py",
        &[
            "verify",
            &s.uri("renamed"),
            "--model",
            dir.path("model.json").to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    assert!(out.contains("\"verified\": 512"), "{out}");
    assert!(s.stop().success());
}

/// When a reload changes what the empty export name selects, the log says so.
#[test]
fn a_reload_that_moves_the_default_export_warns() {
    let dir = Scratch::new("reload-default");
    let cfg = dir.path("nbd-rs.toml");
    std::fs::write(&cfg, config(&[("b", "1MiB"), ("c", "1MiB")])).unwrap();
    let s = Server::start(&["--config", cfg.to_str().unwrap()]);
    std::fs::write(&cfg, config(&[("a", "1MiB"), ("b", "1MiB"), ("c", "1MiB")])).unwrap();
    signal(s.pid(), "HUP");
    wait_for(&s, "configuration reloaded: added: a;");
    assert!(
        s.log().contains("the empty export name now selects \"a\" instead of \"b\": a client that connected with nbd://host/ and reconnects gets another disk (set [server] default_export to pin it)"),
        "{}",
        s.log()
    );
    assert!(s.stop().success());
}
