//! Hot reload on SIGHUP with real clients: exports added, removed and kept while a client holds
//! a connection to a kept export; a broken file changes nothing; a change to an export with
//! connected clients is refused naming them, and applies once they have gone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Scratch, Server, run, signal};

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

    // Changing a while the client is connected is refused, naming the client.
    std::fs::write(&cfg, config(&[("a", "128MiB"), ("c", "16MiB")])).unwrap();
    signal(s.pid(), "HUP");
    wait_for(&s, "export \"a\" changed but has clients (127.0.0.1:");

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
