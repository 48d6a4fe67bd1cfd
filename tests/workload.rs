//! A randomised workload (writes, reads, trims, zeroes, flushes and block status from three
//! connections) against every built-in pipeline, checked against an in-memory model of the
//! disk, with transient faults injected under the retry layers: any difference fails and
//! prints the seed. `NBD_RS_WORKLOAD_SEED=N cargo test --test workload` replays one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Moto, Scratch, Server, run_script};

/// Serves `config` (an export named `vol`) and runs the workload on it.
fn workload(tag: &str, config: &str) {
    let seed = common::seed("NBD_RS_WORKLOAD_SEED");
    eprintln!("workload {tag}: seed {seed} (NBD_RS_WORKLOAD_SEED={seed} replays it)");
    let dir = Scratch::new(tag);
    let cfg = dir.path("nbd-rs.toml");
    std::fs::write(&cfg, config.replace("DIR", dir.as_str())).unwrap();
    let s = Server::start(&["--config", cfg.to_str().unwrap()]);
    let out = run_script(
        "/usr/bin/python3",
        "workload.py",
        &[&s.uri("vol"), "--seed", &seed.to_string(), "--ops", "1500"],
        Duration::from_secs(300),
    );
    eprintln!("{}", out.trim());
    assert!(out.contains("all consistent"), "{out}");
    assert!(!s.log().contains("panicked"), "{}", s.log());
    assert!(s.stop().success());
}

/// Transient failures on a fifth of the operations, hidden by the retries above them.
const FAULTS: &str = "[exports.vol.fault]\nerror_rate = 0.2\nerror = \"transient\"\n[exports.vol.retry]\nattempts = 25\ninitial_delay = \"1ms\"\nmax_delay = \"5ms\"\n";

#[test]
fn raw_memory_matches_the_model() {
    workload(
        "wl-memory",
        "[exports.vol]\npipeline = \"raw -> memory\"\nsize = \"48MiB\"\n",
    );
}

#[test]
fn raw_file_under_block_faults_matches_the_model() {
    workload(
        "wl-file",
        &format!(
            "[exports.vol]\npipeline = \"retry -> fault -> raw -> file\"\nsize = \"48MiB\"\n[exports.vol.file]\npath = \"DIR/disk.img\"\n{FAULTS}"
        ),
    );
}

#[test]
fn sharded_memory_under_store_faults_matches_the_model() {
    workload(
        "wl-sharded",
        &format!(
            "[exports.vol]\npipeline = \"sharded -> retry -> fault -> memory\"\nsize = \"48MiB\"\n[exports.vol.sharded]\nchunk_size = \"1MiB\"\n{FAULTS}"
        ),
    );
}

#[test]
fn cached_sharded_file_under_store_faults_matches_the_model() {
    workload(
        "wl-cached",
        &format!(
            "[exports.vol]\npipeline = \"cache -> sharded -> retry -> fault -> file\"\nsize = \"48MiB\"\n[exports.vol.sharded]\nchunk_size = \"1MiB\"\n[exports.vol.file]\npath = \"DIR/store/\"\n[exports.vol.cache]\npath = \"DIR/cache\"\nsize = \"16MiB\"\n{FAULTS}"
        ),
    );
}

#[test]
fn cached_sharded_s3_matches_the_model() {
    let m = Moto::start();
    m.create_bucket("workload");
    workload(
        "wl-s3",
        &format!(
            "[exports.vol]\npipeline = \"cache -> retry -> sharded -> s3\"\nsize = \"48MiB\"\n[exports.vol.sharded]\nchunk_size = \"1MiB\"\n[exports.vol.cache]\npath = \"DIR/cache\"\nsize = \"16MiB\"\n[exports.vol.retry]\nattempts = 5\n[exports.vol.s3]\nendpoint = \"{}\"\nbucket = \"workload\"\nprefix = \"vol\"\naccess_key_id = \"KEY\"\nsecret_access_key = \"SECRET\"\n",
            m.endpoint()
        ),
    );
}
