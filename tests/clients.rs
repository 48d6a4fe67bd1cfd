//! Real NBD clients against the real binary: libnbd (nbdsh script, nbdinfo, nbdcopy), qemu
//! (qemu-img, qemu-io, qemu-nbd -L) and fio, over memory and file exports, read-write and
//! read-only. The scripts live in `tests/clients/` and state their checks; each exits nonzero
//! with the failing check's name and what it saw.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Scratch, Server, run_script};

const PY: &str = "/usr/bin/python3";
const LIMIT: Duration = Duration::from_secs(600);

/// A file export backed by a sparse image of `size` in a scratch directory.
fn file_server(dir: &Scratch, size: &str, read_only: bool) -> Server {
    let img = dir.path("disk.img");
    let mut conn = format!("file:{}?size={size}", img.display());
    if read_only {
        // Create it first, then serve it read-only.
        drop(Server::start(&["-e", "disk", "raw", &conn]));
        conn = format!("file:{}?read_only=true", img.display());
    }
    Server::start(&["-e", "disk", "raw", &conn])
}

/// A 64 MiB image in `dir` served as `disk` over TCP and over a Unix socket, with `env`: the
/// server, its two URIs, and the image's path.
fn image_over_tcp_and_unix(
    dir: &Scratch,
    env: &[(String, String)],
) -> (Server, [String; 2], std::path::PathBuf) {
    let img = dir.path("disk.img");
    let image = format!("file:{}?size=64MiB", img.display());
    let (s, uris) = over_tcp_and_unix(dir, &image, env);
    (s, uris, img)
}

/// A server with one raw export `disk` of `conn` on loopback TCP and on a Unix socket in
/// `dir`, and the URIs of both.
fn over_tcp_and_unix(dir: &Scratch, conn: &str, env: &[(String, String)]) -> (Server, [String; 2]) {
    let sock = dir.path("nbd.sock");
    let unix = format!("unix:{}", sock.display());
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--listen",
        &unix,
        "-e",
        "disk",
        "raw",
        conn,
    ];
    let s = Server::start_with_env(&args, env);
    let uris = [
        s.uri("disk"),
        format!("nbd+unix:///disk?socket={}", sock.display()),
    ];
    (s, uris)
}

/// The value of a counter (`sendfile_bytes`, `mapped_bytes`, `spliced_bytes`, `paged_bytes`) in
/// each connection's closing line
/// so far.
fn closing_counts(s: &Server, field: &str) -> Vec<u64> {
    s.log()
        .lines()
        .filter(|l| l.contains("client disconnected"))
        .map(|l| {
            let v = l.split(&format!(" {field}=")).nth(1).expect(field);
            v.split_whitespace().next().unwrap().parse().unwrap()
        })
        .collect()
}

fn stop_cleanly(s: Server) {
    let log = s.log();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
    let status = s.stop();
    assert!(status.success(), "server exit status {status}:\n{log}");
}

#[test]
fn conformance_memory() {
    let s = Server::start(&["-e", "disk", "raw", "memory:4GiB"]);
    run_script(
        PY,
        "conformance.py",
        &[&s.uri("disk"), "--kind", "memory", "--size", "4294967296"],
        LIMIT,
    );
    // The default export "" is the first one.
    run_script(
        PY,
        "conformance.py",
        &[&format!("nbd://{}", s.addr), "--kind", "memory"],
        LIMIT,
    );
    stop_cleanly(s);
}

#[test]
fn conformance_memory_read_only() {
    let s = Server::start(&["--read-only", "-e", "disk", "raw", "memory:128MiB"]);
    run_script(
        PY,
        "conformance.py",
        &[&s.uri("disk"), "--kind", "memory", "--read-only"],
        LIMIT,
    );
    stop_cleanly(s);
}

#[test]
fn conformance_file() {
    let dir = Scratch::new("conf-file");
    let s = file_server(&dir, "4GiB", false);
    run_script(
        PY,
        "conformance.py",
        &[&s.uri("disk"), "--kind", "file"],
        LIMIT,
    );
    stop_cleanly(s);
}

#[test]
fn conformance_file_read_only() {
    let dir = Scratch::new("conf-file-ro");
    let s = file_server(&dir, "128MiB", true);
    run_script(
        PY,
        "conformance.py",
        &[&s.uri("disk"), "--kind", "file", "--read-only"],
        LIMIT,
    );
    stop_cleanly(s);
}

#[test]
fn qemu_memory() {
    let dir = Scratch::new("qemu-mem");
    let s = Server::start(&["-e", "disk", "raw", "memory:512MiB"]);
    run_script("bash", "qemu.sh", &[&s.uri("disk"), dir.as_str()], LIMIT);
    stop_cleanly(s);
}

#[test]
fn qemu_file() {
    let dir = Scratch::new("qemu-file");
    let s = file_server(&dir, "512MiB", false);
    run_script("bash", "qemu.sh", &[&s.uri("disk"), dir.as_str()], LIMIT);
    stop_cleanly(s);
}

#[test]
fn libnbd_tools_memory() {
    let dir = Scratch::new("tools-mem");
    let s = Server::start(&["-e", "disk", "raw", "memory:512MiB"]);
    run_script(
        "bash",
        "libnbd-tools.sh",
        &[&s.uri("disk"), dir.as_str()],
        LIMIT,
    );
    stop_cleanly(s);
}

#[test]
fn libnbd_tools_file() {
    let dir = Scratch::new("tools-file");
    let s = file_server(&dir, "512MiB", false);
    run_script(
        "bash",
        "libnbd-tools.sh",
        &[&s.uri("disk"), dir.as_str()],
        LIMIT,
    );
    stop_cleanly(s);
}

#[test]
fn fio_memory() {
    let dir = Scratch::new("fio-mem");
    let s = Server::start(&["-e", "disk", "raw", "memory:512MiB"]);
    run_script("bash", "fio.sh", &[&s.uri("disk"), dir.as_str()], LIMIT);
    stop_cleanly(s);
}

#[test]
fn fio_file() {
    let dir = Scratch::new("fio-file");
    let s = file_server(&dir, "512MiB", false);
    run_script("bash", "fio.sh", &[&s.uri("disk"), dir.as_str()], LIMIT);
    stop_cleanly(s);
}

#[test]
fn conformance_sharded_memory_and_file() {
    let dir = Scratch::new("conf-sharded");
    let conn = format!("file:{}/?size=4GiB", dir.as_str());
    let s = Server::start(&[
        "-e",
        "mem",
        "sharded",
        "memory:4GiB",
        "-e",
        "files",
        "sharded",
        &conn,
    ]);
    run_script(
        PY,
        "conformance.py",
        &[&s.uri("mem"), "--kind", "sharded"],
        LIMIT,
    );
    run_script(
        PY,
        "conformance.py",
        &[&s.uri("files"), "--kind", "sharded"],
        LIMIT,
    );
    stop_cleanly(s);
}

/// Reads of 64 KiB and more from a file export go out by `sendfile` when the image is in the
/// page cache (with `[server] sendfile = "always"`; by default only remote clients get it):
/// over TCP and a Unix socket, with structured and simple replies, the bytes match a model of
/// the image, whether the pages were cached or had just been evicted, and each connection's
/// closing line counts the bytes it sent that way.
#[test]
fn large_file_reads_are_sent_from_the_page_cache_and_match_the_image() {
    let dir = Scratch::new("zero-copy");
    let (s, uris, img) =
        image_over_tcp_and_unix(&dir, &[("NBD_RS_SERVER__SENDFILE".into(), "always".into())]);
    for uri in &uris {
        for mode in [&[][..], &["--no-structured"][..]] {
            let mut args = vec![uri.as_str(), img.to_str().unwrap()];
            args.extend_from_slice(mode);
            let out = run_script(PY, "zero_copy.py", &args, LIMIT);
            assert_eq!(out.trim(), "checked 150 reads", "{uri} {mode:?}");
        }
    }
    // The closing lines are logged as the connections end; wait for all four.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let sent = loop {
        let sent = closing_counts(&s, "sendfile_bytes");
        if sent.len() == 4 || std::time::Instant::now() > deadline {
            break sent;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(sent.len(), 4, "closing lines:\n{}", s.log());
    if s.log()
        .contains("cachestat is not available for this image")
    {
        // A kernel before 6.5: every read was copied, and said so once.
        assert!(sent.iter().all(|&n| n == 0), "sendfile_bytes {sent:?}");
    } else {
        assert!(sent.iter().all(|&n| n > 0), "sendfile_bytes {sent:?}");
    }
    stop_cleanly(s);
}

/// Large writes to an image file move from the socket into the file by `splice`, over TCP and
/// over a Unix socket: what nbdcopy copies in (requests of 256 KiB and 2 MiB, on several
/// connections) lands intact, and the connections' closing lines count nearly every byte as
/// spliced (after a spliced write, only the next request's header is read, not its payload).
#[test]
fn large_writes_are_spliced_into_an_image_file_and_land_intact() {
    let dir = Scratch::new("splice");
    let (s, uris, img) = image_over_tcp_and_unix(&dir, &[]);
    let mut copied = 0u64;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for uri in &uris {
        for size in ["262144", "2097152"] {
            // Other bytes each time, so that every copy has to land.
            seed += 1;
            let mut x = seed;
            let bytes: Vec<u8> = (0..64 << 20)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let src = dir.path("src");
            std::fs::write(&src, &bytes).unwrap();
            let out = common::run(
                std::process::Command::new("nbdcopy")
                    .arg(format!("--request-size={size}"))
                    .arg(&src)
                    .arg(uri),
                LIMIT,
            );
            assert!(out.status.success(), "nbdcopy {uri}: {out:?}");
            assert!(
                std::fs::read(&img).unwrap() == bytes,
                "{uri} --request-size={size}"
            );
            copied += bytes.len() as u64;
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let spliced = loop {
        let sum: u64 = closing_counts(&s, "spliced_bytes").iter().sum();
        if sum >= copied * 9 / 10 || std::time::Instant::now() > deadline {
            break sum;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        spliced >= copied * 9 / 10 && spliced <= copied,
        "{spliced} of {copied}:\n{}",
        s.log()
    );
    stop_cleanly(s);
}

/// Large writes to a memory export are read from the socket straight into its pages, over TCP
/// and over a Unix socket: writes of 1 byte to 2 MiB, on and off page boundaries, overlapping
/// earlier ones, read back as written (`paged_writes.py`), and the closing lines count the whole
/// pages as `paged_bytes`.
#[test]
fn large_writes_to_memory_go_straight_into_its_pages_and_read_back_intact() {
    let dir = Scratch::new("paged");
    let (s, uris) = over_tcp_and_unix(&dir, "memory:64MiB", &[]);
    for uri in &uris {
        let out = run_script(PY, "paged_writes.py", &[uri, "8388608"], LIMIT);
        assert_eq!(out.trim(), "checked 110 writes", "{uri}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while closing_counts(&s, "paged_bytes").len() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let paged = closing_counts(&s, "paged_bytes");
    // Each connection wrote nearly 40 MiB in payloads of 64 KiB and more.
    assert_eq!(paged.len(), 2, "{}", s.log());
    assert!(paged.iter().all(|&n| n > 16 << 20), "paged_bytes {paged:?}");
    stop_cleanly(s);
}

/// Runs `zero_copy.py` over TCP and a Unix socket against a file export served with `env`,
/// and returns the server and the `sendfile_bytes` and `mapped_bytes` of the two connections.
fn local_reads(tag: &str, env: &[(String, String)]) -> (Server, Vec<u64>, Vec<u64>) {
    let dir = Scratch::new(tag);
    let (s, uris, img) = image_over_tcp_and_unix(&dir, env);
    for uri in &uris {
        let out = run_script(PY, "zero_copy.py", &[uri, img.to_str().unwrap()], LIMIT);
        assert_eq!(out.trim(), "checked 150 reads", "{uri}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while closing_counts(&s, "mapped_bytes").len() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent = closing_counts(&s, "sendfile_bytes");
    let mapped = closing_counts(&s, "mapped_bytes");
    assert_eq!(mapped.len(), 2, "{}", s.log());
    (s, sent, mapped)
}

/// By default (`sendfile = "auto"`), clients on this machine get no `sendfile`: over loopback
/// the client's kernel copying from page-cache pages halved 1 MiB sequential reads. Their large
/// reads of cached pages are copied once instead, from a mapping of the image (the first reads
/// after the eviction are read the usual way); the bytes match the image either way.
#[test]
fn local_clients_get_large_cached_reads_from_a_mapping_by_default() {
    let (s, sent, mapped) = local_reads("mapped", &[]);
    assert_eq!(sent, [0, 0], "sendfile_bytes");
    if s.log()
        .contains("cachestat is not available for this image")
    {
        // A kernel before 6.5: every read was read, and it said so once.
        assert_eq!(mapped, [0, 0], "mapped_bytes");
    } else {
        // 150 reads of which most are 64 KiB or more: tens of MiB each way, short of the
        // bytes read from an evicted image.
        assert!(
            mapped.iter().all(|&n| n > 16 << 20),
            "mapped_bytes {mapped:?}"
        );
    }
    stop_cleanly(s);
}

/// `sendfile = "never"` reads every reply into memory: neither `sendfile` nor a mapping.
#[test]
fn with_sendfile_never_every_read_is_read_into_memory() {
    let env = [("NBD_RS_SERVER__SENDFILE".to_owned(), "never".to_owned())];
    let (s, sent, mapped) = local_reads("never", &env);
    assert_eq!(sent, [0, 0], "sendfile_bytes");
    assert_eq!(mapped, [0, 0], "mapped_bytes");
    stop_cleanly(s);
}
