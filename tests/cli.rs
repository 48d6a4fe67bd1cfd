//! The command line as a user meets it: every bad invocation's exact message and exit status,
//! listening on TCP and Unix sockets, logging, and a clean stop on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Scratch, Server, bin, run};

/// Runs nbd-rs with `args` and returns (exit code, stderr).
fn fails(args: &[&str]) -> (i32, String) {
    let out = run(Command::new(bin()).args(args), Duration::from_secs(20));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).trim_end().to_owned(),
    )
}

#[test]
fn no_export_is_a_usage_error() {
    assert_eq!(
        fails(&[]),
        (
            2,
            "nbd-rs: error: no export given: add -e NAME DRIVER CONN, for example -e disk raw memory:1GiB"
                .into()
        )
    );
}

#[test]
fn unknown_driver_names_the_export_and_the_known_drivers() {
    assert_eq!(
        fails(&["-e", "vm1", "qcow9", "memory:1GiB"]),
        (
            2,
            "nbd-rs: error: export \"vm1\": unknown driver \"qcow9\" (known drivers: raw, sharded)"
                .into()
        )
    );
}

#[test]
fn bad_size_quotes_the_text() {
    assert_eq!(
        fails(&["-e", "d", "raw", "memory:12XB"]),
        (
            2,
            "nbd-rs: error: export \"d\": bad size \"12XB\": invalid digit found in string (expected a number with an optional unit, like 512, 64KiB, 20GiB or 1T)".into()
        )
    );
    assert_eq!(
        fails(&["-e", "d", "raw", "memory:0"]),
        (
            2,
            "nbd-rs: error: export \"d\": bad size \"0\": a size must be greater than zero".into()
        )
    );
}

#[test]
fn missing_file_says_how_to_create_it() {
    let dir = Scratch::new("cli-missing");
    let img = dir.path("nope.img");
    let conn = format!("file:{}", img.display());
    assert_eq!(
        fails(&["-e", "d", "raw", &conn]),
        (
            2,
            format!(
                "nbd-rs: error: command line (-e d): export \"d\": image {} does not exist (give a size to create it)",
                img.display()
            )
        )
    );
    assert!(!img.exists(), "a failed start must not create the image");
}

#[test]
fn unknown_storage_and_parameters_are_refused() {
    assert_eq!(
        fails(&["-e", "d", "raw", "s4:http://h/b"]),
        (
            2,
            "nbd-rs: error: export \"d\": unknown storage \"s4:http://h/b\" (expected memory:SIZE, file:PATH or s3:URL, optionally after block layers like cache:) in \"s4:http://h/b\"".into()
        )
    );
    assert_eq!(
        fails(&["-e", "d", "raw", "s3:http://KEY:hush@h:9000/bkt"]),
        (
            2,
            "nbd-rs: error: export \"d\": raw serves memory or file; use the sharded driver for s3 in \"s3:http://KEY:<redacted>@h:9000/bkt\"".into()
        )
    );
    assert_eq!(
        fails(&["-e", "d", "raw", "memory:1M?sise=2"]),
        (
            2,
            "nbd-rs: error: export \"d\": unknown parameter \"sise\" (known: size, read_only, description) in \"memory:1M?sise=2\"".into()
        )
    );
}

#[test]
fn duplicate_export_names_are_refused() {
    assert_eq!(
        fails(&["-e", "a", "raw", "memory:1M", "-e", "a", "raw", "memory:2M"]),
        (2, "nbd-rs: error: export \"a\" is given twice".into())
    );
}

#[test]
fn incomplete_export_and_bad_listen_address_are_clap_usage_errors() {
    let (code, err) = fails(&["-e", "a", "raw"]);
    assert_eq!(code, 2);
    assert!(
        err.starts_with(
            "error: 3 values required for '--export <NAME> <DRIVER> <CONN>' but 2 were provided"
        ),
        "{err}"
    );
    let (code, err) = fails(&["--listen", "10809", "-e", "a", "raw", "memory:1M"]);
    assert_eq!(code, 2);
    assert!(
        err.starts_with("error: invalid value '10809' for '--listen <ADDR>': bad listen address \"10809\": expected HOST:PORT (like 0.0.0.0:10809) or unix:PATH"),
        "{err}"
    );
}

#[test]
fn a_port_in_use_fails_with_the_address() {
    let s = Server::start(&["-e", "a", "raw", "memory:1M"]);
    let (code, err) = fails(&["--listen", &s.addr, "-e", "a", "raw", "memory:1M"]);
    assert_eq!(code, 1);
    assert_eq!(
        err.lines().last().unwrap(),
        format!(
            "nbd-rs: error: cannot listen on {}: Address already in use (os error 98)",
            s.addr
        )
    );
}

#[test]
fn file_image_is_created_with_size_and_reopened_without() {
    let dir = Scratch::new("cli-create");
    let conn = format!("file:{}?size=3MiB", dir.path("new.img").display());
    let s = Server::start(&["-e", "d", "raw", &conn]);
    assert_eq!(
        std::fs::metadata(dir.path("new.img")).unwrap().len(),
        3 << 20
    );
    assert!(s.stop().success());
    // A directory serves DIR/NAME.
    let conn = format!("file:{}/", dir.as_str());
    let s = Server::start(&["-e", "new.img", "raw", &conn]);
    let out = run(
        Command::new("nbdinfo").args(["--size", &s.uri("new.img")]),
        Duration::from_secs(20),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3145728");
    // Reopening with a different size is an error, not a silent resize.
    let conn = format!("file:{}?size=4MiB", dir.path("new.img").display());
    let (code, err) = fails(&["-e", "d", "raw", &conn]);
    assert_eq!(code, 2);
    assert_eq!(
        err,
        format!(
            "nbd-rs: error: command line (-e d): export \"d\": image {} is 3145728 bytes, but a size of 4194304 bytes was asked for",
            dir.path("new.img").display()
        )
    );
}

#[test]
fn serves_on_a_unix_socket_and_removes_it_on_stop() {
    let dir = Scratch::new("cli-unix");
    let sock = dir.path("nbd.sock");
    let listen = format!("unix:{}", sock.display());
    let mut child = Command::new(bin())
        .args(["--listen", &listen, "-e", "d", "raw", "memory:2MiB"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///d?socket={}", sock.display());
    let out = run(
        Command::new("nbdinfo").args(["--size", &uri]),
        Duration::from_secs(20),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2097152");
    common::signal(child.id(), "TERM");
    assert!(child.wait().unwrap().success());
    assert!(!sock.exists(), "the socket file is removed on stop");
}

#[test]
fn one_log_line_per_connection_and_clean_stop() {
    let s = Server::start(&["-e", "d", "raw", "memory:8MiB"]);
    let out = run(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            &s.uri("d"),
            "-c",
            "write -P 7 0 64k",
            "-c",
            "read -P 7 0 64k",
            "-c",
            "flush",
        ]),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !s.log().contains("client disconnected") {
        assert!(
            std::time::Instant::now() < deadline,
            "no disconnect line:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = s.log();
    let conn_lines: Vec<&str> = log.lines().filter(|l| l.contains("peer=")).collect();
    assert_eq!(conn_lines.len(), 1, "{log}");
    assert!(conn_lines[0].contains("export=\"d\""), "{log}");
    assert!(s.stop().success());
}

/// A service's soft limit on open files (often 1024) is below the default `max_connections`:
/// the server raises it to the hard limit.
#[test]
fn the_open_files_limit_is_raised_to_the_hard_limit() {
    let port = common::free_port();
    let mut child = std::process::Command::new("bash")
        .args([
            "-c",
            &format!(
                "ulimit -Sn 256 && exec {} -l 127.0.0.1:{port} -e d raw memory:1MiB",
                common::bin()
            ),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Once it listens, it is nbd-rs (not the shell before `exec`) and has set its limits.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "nbd-rs did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    let (soft, max) = (f[3], f[4]);
    assert_ne!(max, "256", "the test needs a hard limit above 256");
    assert_eq!(soft, max);
    let _ = child.kill();
    let _ = child.wait();
}
