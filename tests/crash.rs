//! Crash safety: the server is killed with SIGKILL at a random moment while a client keeps
//! writes in flight (some with FUA, a FLUSH every so often); a new server on the same storage
//! must then hold every write that was acknowledged with FUA or covered by an acknowledged
//! FLUSH, for every durable pipeline: raw and sharded files, the write-back cache over files
//! and over S3 (with `flush = "store"` and `"local"`), and a pipeline with faults injected
//! under its retries.
//!
//! The moment of the kill and the client's writes come from a seed, printed by each test;
//! `NBD_RS_CRASH_SEED=N cargo test --test crash` replays one. (`raw -> memory` is left out: a
//! memory disk does not outlive its process, by design.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Moto, Scratch, Server, root, run_script, signal};

/// A step of xorshift: enough randomness to place a kill.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Serves `config`, writes until a random moment, kills the server with SIGKILL, serves the
/// same config again and checks every durable write; then, for configs with a cache,
/// `after` (a config without it) is served too and checked, so the replayed cache reached
/// the store. Two rounds, each writing over what the one before left.
fn crash_and_check(
    tag: &str,
    config: &dyn Fn(&Scratch) -> String,
    after: Option<&dyn Fn(&Scratch) -> String>,
) {
    let seed = common::seed("NBD_RS_CRASH_SEED");
    eprintln!("crash test {tag}: seed {seed} (NBD_RS_CRASH_SEED={seed} replays it)");
    let mut rng = seed | 1;
    let dir = Scratch::new(tag);
    let cfg = dir.path("nbd-rs.toml");
    std::fs::write(&cfg, config(&dir)).unwrap();
    let model = dir.path("model.json");
    for round in 0..2 {
        let s = Server::start(&["--config", cfg.to_str().unwrap()]);
        let ready = dir.path(&format!("ready-{round}"));
        let mut client = Command::new("/usr/bin/python3")
            .arg(root().join("tests/clients/writer.py"))
            .args(["write", &s.uri("vol"), "--crash", "--slots", "256"])
            .args(["--slot-size", "65536", "--depth", "16"])
            .args(["--fua-every", "13", "--flush-every", "97"])
            .args(["--seed", &(seed + round).to_string()])
            .args(["--ready", ready.to_str().unwrap()])
            .args(["--model", model.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready.exists() {
            assert!(
                Instant::now() < deadline,
                "the writer never got going: {}",
                s.log()
            );
            assert!(
                client.try_wait().unwrap().is_none(),
                "the writer stopped early"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // Somewhere in the next 1.5 s.
        let wait = Duration::from_millis(next(&mut rng) % 1500);
        std::thread::sleep(wait);
        signal(s.pid(), "KILL");
        let (status, _) = s.wait_exit(Duration::from_secs(10));
        assert!(!status.success());
        let out = client.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "writer: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "round {round}: killed after {wait:?}; writer: {}",
            stdout.trim()
        );

        let s = Server::start(&["--config", cfg.to_str().unwrap()]);
        verify(&s, &model);
        assert!(s.stop().success());
        // The next round starts from what is there now: what verify read is what the model
        // allows, so the model carries over as it is.
    }
    if let Some(after) = after {
        let plain = dir.path("plain.toml");
        std::fs::write(&plain, after(&dir)).unwrap();
        let s = Server::start(&["--config", plain.to_str().unwrap()]);
        verify(&s, &model);
        assert!(s.stop().success());
    }
}

fn verify(s: &Server, model: &std::path::Path) {
    let out = run_script(
        "/usr/bin/python3",
        "writer.py",
        &["verify", &s.uri("vol"), "--model", model.to_str().unwrap()],
        Duration::from_secs(120),
    );
    assert!(out.contains("\"verified\": 256"), "{out}");
}

fn file_store(dir: &Scratch) -> String {
    format!("[exports.vol.file]\npath = \"{}/store/\"\n", dir.as_str())
}

/// The same volume through a plain `sharded -> file` pipeline, with no cache.
fn plain_file(dir: &Scratch) -> String {
    format!(
        "[exports.vol]\npipeline = \"sharded -> file\"\n{}",
        file_store(dir)
    )
}

fn cache(dir: &Scratch) -> String {
    format!(
        "[exports.vol.cache]\npath = \"{}/cache\"\nsize = \"64MiB\"\n",
        dir.as_str()
    )
}

#[test]
fn raw_file_keeps_every_durable_write_across_sigkill() {
    crash_and_check(
        "crash-raw",
        &|d| {
            format!(
                "[exports.vol]\npipeline = \"raw -> file\"\nsize = \"16MiB\"\n[exports.vol.file]\npath = \"{}/disk.img\"\n",
                d.as_str()
            )
        },
        None,
    );
}

#[test]
fn sharded_file_keeps_every_durable_write_across_sigkill() {
    crash_and_check(
        "crash-sharded",
        &|d| {
            format!(
                "[exports.vol]\npipeline = \"sharded -> file\"\nsize = \"16MiB\"\n[exports.vol.sharded]\nchunk_size = \"1MiB\"\n{}",
                file_store(d)
            )
        },
        None,
    );
}

#[test]
fn cached_sharded_file_keeps_every_durable_write_across_sigkill() {
    let config = |d: &Scratch| {
        format!(
            "[exports.vol]\npipeline = \"cache -> sharded -> fault -> file\"\nsize = \"16MiB\"\n[exports.vol.sharded]\nchunk_size = \"1MiB\"\n[exports.vol.fault]\nwrite_delay = \"20ms\"\n{}{}",
            file_store(d),
            cache(d)
        )
    };
    crash_and_check("crash-cached", &config, Some(&plain_file));
}

#[test]
fn faulty_store_under_retries_keeps_every_durable_write_across_sigkill() {
    let config = |d: &Scratch| {
        format!(
            "[exports.vol]\npipeline = \"cache -> sharded -> retry -> fault -> file\"\nsize = \"16MiB\"\n[exports.vol.sharded]\nchunk_size = \"256KiB\"\n[exports.vol.fault]\nerror_rate = 0.2\nerror = \"transient\"\n[exports.vol.retry]\nattempts = 20\ninitial_delay = \"1ms\"\nmax_delay = \"10ms\"\n{}{}",
            file_store(d),
            cache(d)
        )
    };
    crash_and_check("crash-faulty", &config, Some(&plain_file));
}

#[test]
fn cached_sharded_s3_keeps_every_durable_write_across_sigkill() {
    cached_s3_crash("crash-s3", "crash", "");
}

/// `flush = "local"`: FLUSH and FUA return once the cache's disk holds the data, so what they
/// acknowledged survives a SIGKILL in the cache, and reaches S3 after the restart.
#[test]
fn cached_sharded_s3_with_local_flush_keeps_every_durable_write_across_sigkill() {
    cached_s3_crash("crash-s3-local", "crash-local", "flush = \"local\"\n");
}

/// `cache -> sharded -> s3` on a bucket of its own, with `cache_keys` added to the cache's
/// table; afterwards the volume is read through plain `sharded -> s3`.
fn cached_s3_crash(tag: &str, bucket: &str, cache_keys: &str) {
    let m = Moto::start();
    m.create_bucket(bucket);
    let endpoint = m.endpoint();
    let s3 = move |_: &Scratch| {
        format!(
            "[exports.vol.s3]\nendpoint = \"{endpoint}\"\nbucket = \"{bucket}\"\nprefix = \"vol\"\naccess_key_id = \"KEY\"\nsecret_access_key = \"SECRET\"\n"
        )
    };
    let config = |d: &Scratch| {
        format!(
            "[exports.vol]\npipeline = \"cache -> sharded -> s3\"\nsize = \"16MiB\"\n[exports.vol.sharded]\nchunk_size = \"1MiB\"\n{}{}{cache_keys}",
            s3(d),
            cache(d)
        )
    };
    let plain = |d: &Scratch| format!("[exports.vol]\npipeline = \"sharded -> s3\"\n{}", s3(d));
    crash_and_check(tag, &config, Some(&plain));
}
