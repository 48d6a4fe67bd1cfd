//! Sharded volumes in a real S3 server (`moto_server` on loopback): durability across stops and
//! `kill -9`, object counts after writes, zeroing and TRIM, retries hiding injected faults, the
//! S3 server vanishing for a while, and the requests a GiB costs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use common::{Moto, Scratch, Server, run, run_script, signal};
use nbd_rs::block::BlockDevice;
use nbd_rs::block::cache::{CacheLayer, CacheParams};
use nbd_rs::layout::sharded::{ShardedOptions, ShardedVolume};
use nbd_rs::store::s3::{S3Config, S3Store};
use nbd_rs::store::{ObjectStore, StoreError};

const KEY: &str = "AKIDNBDRSTEST";
/// The secret, percent-encoded for a URL, and as the store sees it. It must never be logged.
const SECRET_URL: &str = "nbd%2Frs+Sup3rSecret=42";
const SECRET: &str = "nbd/rs+Sup3rSecret=42";
const PY: &str = "/usr/bin/python3";
const LIMIT: Duration = Duration::from_secs(600);

fn url(m: &Moto, bucket: &str, prefix: &str, query: &str) -> String {
    format!(
        "s3:http://{KEY}:{SECRET_URL}@127.0.0.1:{}/{bucket}/{prefix}?{query}",
        m.port
    )
}

fn s3_config(m: &Moto, bucket: &str, prefix: &str) -> S3Config {
    let mut c = S3Config::new(bucket);
    c.endpoint = Some(m.endpoint());
    c.prefix = prefix.to_owned();
    c.access_key_id = Some(KEY.to_owned());
    c.secret_access_key = Some(SECRET.to_owned());
    c
}

async fn objects(m: &Moto, bucket: &str, prefix: &str) -> Vec<String> {
    let store = S3Store::open(s3_config(m, bucket, prefix)).await.unwrap();
    let mut keys = store.list("").await.unwrap();
    keys.sort();
    keys
}

fn pattern(uri: &str, args: &[&str]) -> String {
    let mut full = vec![uri];
    full.extend_from_slice(args);
    run_script(PY, "pattern.py", &full, LIMIT)
}

fn assert_no_secret(s: &Server) {
    let log = s.log();
    assert!(
        !log.contains(SECRET) && !log.contains(SECRET_URL),
        "the secret was logged:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn flushed_writes_through_the_cache_survive_stop_and_kill_and_read_back_without_it() {
    let m = Moto::start();
    m.create_bucket("nbdrs");
    let state = Scratch::new("s3-state");
    let env = [("STATE_DIRECTORY".to_owned(), state.as_str().to_owned())];
    let conn = format!("cache:retry:{}", url(&m, "nbdrs", "vol1", "size=256MiB"));

    // Clean stop: SIGTERM flushes the write-back cache.
    let s = Server::start_with_env(
        &["--listen", "127.0.0.1:0", "-e", "vol", "sharded", &conn],
        &env,
    );
    pattern(
        &s.uri("vol"),
        &[
            "write",
            "1",
            "--flush",
            "--count",
            "48",
            "--span",
            "200000000",
        ],
    );
    // More writes without a flush: a clean stop must still make them durable.
    pattern(
        &s.uri("vol"),
        &[
            "write",
            "2",
            "--count",
            "16",
            "--block",
            "4096",
            "--span",
            "200000000",
        ],
    );
    assert_no_secret(&s);
    assert!(s.stop().success());

    // A fresh process with no cache reads everything back from S3.
    let plain = url(&m, "nbdrs", "vol1", "");
    let s = Server::start(&["-e", "vol", "sharded", &plain]);
    pattern(
        &s.uri("vol"),
        &["check", "1", "--count", "48", "--span", "200000000"],
    );
    pattern(
        &s.uri("vol"),
        &[
            "check",
            "2",
            "--count",
            "16",
            "--block",
            "4096",
            "--span",
            "200000000",
        ],
    );
    assert!(s.stop().success());

    // kill -9 right after a flush: what the flush acknowledged is in S3.
    let s = Server::start_with_env(
        &["--listen", "127.0.0.1:0", "-e", "vol", "sharded", &conn],
        &env,
    );
    pattern(
        &s.uri("vol"),
        &[
            "write",
            "3",
            "--flush",
            "--count",
            "32",
            "--span",
            "200000000",
        ],
    );
    signal(s.pid(), "KILL");
    drop(s);
    let s = Server::start(&["-e", "vol", "sharded", &plain]);
    pattern(
        &s.uri("vol"),
        &["check", "3", "--count", "32", "--span", "200000000"],
    );
    assert!(s.stop().success());
}

#[test]
fn object_counts_follow_writes_zeroing_and_trim() {
    let m = Moto::start();
    m.create_bucket("nbdrs");
    let s = Server::start(&["-e", "vol", "sharded", &url(&m, "nbdrs", "v", "size=64MiB")]);
    let uri = s.uri("vol");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let count = |rt: &tokio::runtime::Runtime| rt.block_on(objects(&m, "nbdrs", "v/")).len();
    assert_eq!(count(&rt), 1, "only the volume's metadata at first");
    let nbdsh = |code: &str| {
        let out = run(
            Command::new(PY).args(["-c", &format!("import nbd\nh = nbd.NBD()\nh.connect_uri({uri:?})\n{code}\nh.flush()\nh.shutdown()")]),
            LIMIT,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // Three whole chunks and part of a fourth.
    nbdsh("h.pwrite(b'\\x01' * (12 << 20), 0)\nh.pwrite(b'\\x02' * 4096, 20 << 20)");
    assert_eq!(count(&rt), 5);
    // A whole chunk of zeroes written as data is no object.
    nbdsh("h.pwrite(bytes(4 << 20), 28 << 20)");
    assert_eq!(count(&rt), 5);
    // WRITE_ZEROES and TRIM of whole chunks delete them; partial ones keep them.
    nbdsh("h.zero(4 << 20, 0)");
    assert_eq!(count(&rt), 4);
    nbdsh("h.trim(4 << 20, 4 << 20)\nh.trim(4096, 8 << 20)");
    assert_eq!(count(&rt), 3);
    // Zeroing the data that is left in a chunk removes the chunk.
    nbdsh("h.zero(4096, 20 << 20)");
    assert_eq!(count(&rt), 2);
    // A whole-volume TRIM, as mkfs sends it.
    nbdsh("h.trim(64 << 20, 0)");
    assert_eq!(count(&rt), 1);
    assert_no_secret(&s);
    assert!(s.stop().success());
}

#[test]
fn whole_volume_trim_of_a_large_volume_takes_seconds() {
    let m = Moto::start();
    m.create_bucket("nbdrs");
    let s = Server::start(&[
        "-e",
        "big",
        "sharded",
        &url(&m, "nbdrs", "big", "size=1TiB"),
    ]);
    let uri = s.uri("big");
    // Data in a few far-apart chunks, then one TRIM of the whole TiB (in 2 GiB requests, as
    // libnbd limits a request to 32 bits).
    let code = format!(
        "import nbd, time\nh = nbd.NBD()\nh.connect_uri({uri:?})\n\
         for i in range(8): h.pwrite(b'x' * 65536, i * (100 << 30))\n\
         h.flush()\nt = time.time()\n\
         for off in range(0, 1 << 40, 2 << 30): h.trim(2 << 30, off)\n\
         h.flush()\nprint(time.time() - t)\nh.shutdown()"
    );
    let out = run(Command::new(PY).args(["-c", &code]), LIMIT);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secs: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(secs < 30.0, "trimming 1 TiB took {secs} s");
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(objects(&m, "nbdrs", "big/")).len(), 1);
    assert!(s.stop().success());
}

#[test]
fn retry_hides_twenty_percent_injected_faults_from_clients() {
    let m = Moto::start();
    m.create_bucket("nbdrs");
    let dir = Scratch::new("s3-faults");
    let cfg = dir.path("faults.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[exports.vol]
pipeline = "retry -> fault -> sharded -> s3"
size = "4GiB"
[exports.vol.fault]
error_rate = 0.2
error = "transient"
seed = 7
[exports.vol.retry]
attempts = 12
initial_delay = "1ms"
max_delay = "20ms"
[exports.vol.s3]
endpoint = "{}"
bucket = "nbdrs"
prefix = "faulty"
access_key_id = "{KEY}"
secret_access_key = "{SECRET}"
"#,
            m.endpoint()
        ),
    )
    .unwrap();
    let s = Server::start(&["--config", cfg.to_str().unwrap()]);
    run_script(
        PY,
        "conformance.py",
        &[&s.uri("vol"), "--kind", "sharded", "--whole-objects"],
        LIMIT,
    );
    pattern(&s.uri("vol"), &["write", "5", "--flush", "--count", "64"]);
    pattern(&s.uri("vol"), &["check", "5", "--count", "64"]);
    let log = s.log();
    assert!(
        log.contains("injected fault"),
        "no fault was injected:\n{log}"
    );
    assert_no_secret(&s);
    assert!(s.stop().success());
}

#[test]
fn conformance_on_sharded_s3_with_and_without_the_cache() {
    let m = Moto::start();
    m.create_bucket("nbdrs");
    let state = Scratch::new("s3-conf");
    let env = [("STATE_DIRECTORY".to_owned(), state.as_str().to_owned())];
    let s = Server::start_with_env(
        &[
            "--listen",
            "127.0.0.1:0",
            "-e",
            "plain",
            "sharded",
            &url(&m, "nbdrs", "plain", "size=4GiB"),
            "-e",
            "cached",
            "sharded",
            &format!("cache:retry:{}", url(&m, "nbdrs", "cached", "size=4GiB")),
        ],
        &env,
    );
    run_script(
        PY,
        "conformance.py",
        &[&s.uri("plain"), "--kind", "sharded", "--whole-objects"],
        LIMIT,
    );
    run_script(
        PY,
        "conformance.py",
        &[
            &s.uri("cached"),
            "--kind",
            "sharded",
            "--whole-objects",
            "--cached",
        ],
        LIMIT,
    );
    assert_no_secret(&s);
    assert!(s.stop().success());
}

#[test]
fn the_s3_server_vanishing_for_a_while_loses_no_acknowledged_write() {
    let m = Moto::start();
    m.create_bucket("nbdrs");
    let dir = Scratch::new("s3-outage");
    let cfg = dir.path("outage.toml");
    let write_cfg = |budget: &str| {
        std::fs::write(
            &cfg,
            format!(
                r#"[exports.vol]
pipeline = "retry -> sharded -> s3"
size = "256MiB"
[exports.vol.retry]
attempts = 1000
initial_delay = "50ms"
max_delay = "500ms"
budget = "{budget}"
[exports.vol.s3]
endpoint = "{}"
bucket = "nbdrs"
prefix = "outage"
access_key_id = "{KEY}"
secret_access_key = "{SECRET}"
request_timeout = "1s"
connect_timeout = "1s"
"#,
                m.endpoint()
            ),
        )
        .unwrap();
    };

    // An outage shorter than the retry budget is invisible to the client.
    write_cfg("30s");
    let s = Server::start(&["--config", cfg.to_str().unwrap()]);
    let uri = s.uri("vol");
    let writer = {
        let uri = uri.clone();
        std::thread::spawn(move || {
            pattern(
                &uri,
                &[
                    "write",
                    "11",
                    "--fua",
                    "--count",
                    "96",
                    "--span",
                    "200000000",
                ],
            )
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    signal(m.pid(), "STOP");
    std::thread::sleep(Duration::from_secs(4));
    signal(m.pid(), "CONT");
    let out = writer.join().unwrap();
    assert!(out.contains("wrote 96 blocks"), "{out}");
    pattern(
        &uri,
        &["check", "11", "--count", "96", "--span", "200000000"],
    );
    assert!(
        s.log().contains("stage=\"retry\""),
        "no retry was logged:\n{}",
        s.log()
    );
    assert!(s.stop().success());

    // An outage longer than the budget: clear errors, nothing acknowledged is lost, and the
    // export works again when S3 is back.
    write_cfg("2s");
    let s = Server::start(&["--config", cfg.to_str().unwrap()]);
    let uri = s.uri("vol");
    signal(m.pid(), "STOP");
    let acked = dir.path("acked.txt");
    let out = run_script(
        PY,
        "pattern.py",
        &[
            &uri,
            "write",
            "12",
            "--fua",
            "--count",
            "4",
            "--tolerate-errors",
        ],
        LIMIT,
    );
    signal(m.pid(), "CONT");
    std::fs::write(&acked, &out).unwrap();
    assert!(
        out.contains("failed"),
        "writes during a long outage must fail:\n{out}"
    );
    let log = s.log();
    assert!(log.contains("request failed"), "{log}");
    // Recovery: new writes succeed, and what was acknowledged before is intact.
    pattern(&uri, &["write", "13", "--flush", "--count", "16"]);
    pattern(&uri, &["check", "13", "--count", "16"]);
    pattern(
        &uri,
        &[
            "check",
            "12",
            "--count",
            "4",
            "--only-acked",
            acked.to_str().unwrap(),
        ],
    );
    assert_no_secret(&s);
    assert!(s.stop().success());
}

/// Counts the requests that reach a store.
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn ObjectStore>,
    gets: AtomicU64,
    puts: AtomicU64,
    other: AtomicU64,
    /// Of `puts`, those of journal records.
    journal_puts: AtomicU64,
}

impl Counting {
    fn over(inner: Arc<dyn ObjectStore>) -> Arc<Self> {
        Arc::new(Counting {
            inner,
            gets: AtomicU64::new(0),
            puts: AtomicU64::new(0),
            other: AtomicU64::new(0),
            journal_puts: AtomicU64::new(0),
        })
    }
}

#[async_trait]
impl ObjectStore for Counting {
    async fn get(
        &self,
        key: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<Option<Bytes>, StoreError> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.inner.get(key, range).await
    }
    async fn put(&self, key: &str, data: Bytes, sync: bool) -> Result<(), StoreError> {
        self.puts.fetch_add(1, Ordering::Relaxed);
        if key.ends_with(".journal") {
            self.journal_puts.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.put(key, data, sync).await
    }
    fn supports_put_range(&self) -> bool {
        self.inner.supports_put_range()
    }
    async fn put_range(
        &self,
        key: &str,
        offset: u64,
        data: Bytes,
        size: u64,
        sync: bool,
    ) -> Result<(), StoreError> {
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.inner.put_range(key, offset, data, size, sync).await
    }
    async fn delete(&self, key: &str, sync: bool) -> Result<(), StoreError> {
        self.other.fetch_add(1, Ordering::Relaxed);
        self.inner.delete(key, sync).await
    }
    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.other.fetch_add(1, Ordering::Relaxed);
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.other.fetch_add(1, Ordering::Relaxed);
        self.inner.list(prefix).await
    }
    async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }
}

/// The S3 requests a GiB costs (the README quotes these figures): whole-chunk writes and reads
/// take one request per 4 MiB chunk; 64 KiB writes read-modify-write each chunk they touch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_requests_per_gib() {
    let m = tokio::task::spawn_blocking(|| {
        let m = Moto::start();
        m.create_bucket("nbdrs");
        m
    })
    .await
    .unwrap();
    let s3 = Arc::new(
        S3Store::open(s3_config(&m, "nbdrs", "count"))
            .await
            .unwrap(),
    );
    let counting = Counting::over(s3);
    let store: Arc<dyn ObjectStore> = counting.clone();
    let size = 64u64 << 20;
    let vol = ShardedVolume::open(
        store,
        ShardedOptions {
            size: Some(size),
            ..ShardedOptions::new("vol")
        },
    )
    .await
    .unwrap();
    let reset = |c: &Counting| {
        (
            c.gets.swap(0, Ordering::Relaxed),
            c.puts.swap(0, Ordering::Relaxed),
            c.other.swap(0, Ordering::Relaxed),
        )
    };
    reset(&counting);
    let per_gib = |n: u64| n * (1 << 30) / size;

    // Sequential 4 MiB writes: one PUT per chunk, no GET.
    let t = Instant::now();
    for off in (0..size).step_by(4 << 20) {
        vol.write(off, Bytes::from(vec![7u8; 4 << 20]), false)
            .await
            .unwrap();
    }
    let (g, p, _) = reset(&counting);
    assert_eq!((g, p), (0, 16), "4 MiB writes");
    eprintln!(
        "4 MiB writes: {} GET + {} PUT per GiB ({:?})",
        per_gib(g),
        per_gib(p),
        t.elapsed()
    );

    // Sequential 4 MiB reads: one GET per chunk.
    for off in (0..size).step_by(4 << 20) {
        vol.read(off, 4 << 20).await.unwrap();
    }
    let (g, p, _) = reset(&counting);
    assert_eq!((g, p), (16, 0), "4 MiB reads");
    eprintln!("4 MiB reads: {} GET per GiB", per_gib(g));

    // Sequential 64 KiB writes without a cache: each rewrites its whole chunk.
    for off in (0..size).step_by(64 << 10) {
        vol.write(off, Bytes::from(vec![9u8; 64 << 10]), false)
            .await
            .unwrap();
    }
    let (g, p, _) = reset(&counting);
    assert_eq!((g, p), (1024, 1024), "64 KiB writes, no cache");
    eprintln!(
        "64 KiB writes without a cache: {} GET + {} PUT per GiB",
        per_gib(g),
        per_gib(p)
    );
}

/// What a FLUSH through the write-back cache costs in S3 requests after 64 random 4 KiB writes
/// (the README quotes these figures): one PUT of a journal record, where uploading the blocks it
/// covers costs one PUT per 4 MiB block written to. What the records hold is then applied by
/// a volume opened without the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_through_the_cache_costs_one_put() {
    let m = tokio::task::spawn_blocking(|| {
        let m = Moto::start();
        m.create_bucket("nbdrs");
        m
    })
    .await
    .unwrap();
    let size = 256u64 << 20;
    let seed = common::seed("NBD_RS_FLUSH_SEED");
    eprintln!("seed {seed} (NBD_RS_FLUSH_SEED replays it)");
    let mut written: Vec<(u64, u8)> = Vec::new();
    for journal in [true, false] {
        let s3: Arc<dyn ObjectStore> = Arc::new(
            S3Store::open(s3_config(&m, "nbdrs", &format!("flush-{journal}")))
                .await
                .unwrap(),
        );
        let counting = Counting::over(s3);
        let vol = ShardedVolume::open(
            counting.clone(),
            ShardedOptions {
                size: Some(size),
                ..ShardedOptions::new("vol")
            },
        )
        .await
        .unwrap();
        let dir = Scratch::new("flush-cost");
        let cache = CacheLayer::open(
            Arc::new(vol),
            CacheParams {
                journal,
                ..CacheParams::default()
            },
            &dir.path("cache"),
            "vol",
        )
        .await
        .unwrap();
        let mut rng = seed;
        let (mut puts, mut journal_puts) = (0, 0);
        let t = Instant::now();
        written.clear();
        for round in 0..8u8 {
            for _ in 0..64 {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let offset = (rng >> 33) % (size / 4096) * 4096;
                cache
                    .write(offset, Bytes::from(vec![round + 1; 4096]), false)
                    .await
                    .unwrap();
                written.retain(|w| w.0 != offset);
                written.push((offset, round + 1));
            }
            let before = (
                counting.puts.load(Ordering::Relaxed),
                counting.journal_puts.load(Ordering::Relaxed),
            );
            cache.flush().await.unwrap();
            puts += counting.puts.load(Ordering::Relaxed) - before.0;
            journal_puts += counting.journal_puts.load(Ordering::Relaxed) - before.1;
        }
        let per_flush = t.elapsed() / 8;
        eprintln!(
            "journal = {journal}: {} PUTs per FLUSH after 64 random 4 KiB writes, of which {} of \
             journal records ({per_flush:?} per round)",
            puts as f64 / 8.0,
            journal_puts as f64 / 8.0
        );
        if journal {
            // One record per FLUSH, and the volume's metadata once (format 2).
            assert_eq!((puts, journal_puts), (9, 8));
            // A crash: nothing closed. A volume opened without the cache applies the records.
            drop(cache);
            let fresh = ShardedVolume::open(
                Arc::new(
                    S3Store::open(s3_config(&m, "nbdrs", "flush-true"))
                        .await
                        .unwrap(),
                ),
                ShardedOptions::new("vol"),
            )
            .await
            .unwrap();
            for &(offset, v) in &written {
                let got = fresh.read(offset, 4096).await.unwrap().to_bytes();
                assert_eq!(got, vec![v; 4096], "at {offset}, seed {seed}");
            }
            let left = objects(&m, "nbdrs", "flush-true").await;
            assert!(!left.iter().any(|k| k.ends_with(".journal")), "{left:?}");
        } else {
            // Every block written to since the previous FLUSH, whole.
            assert_eq!(journal_puts, 0);
            // About 40 blocks each time (fewer if some were uploaded while it wrote).
            assert!(
                puts > 8 * 8,
                "{puts} PUTs for 8 FLUSHes of 64 random writes each"
            );
            cache.close().await.unwrap();
        }
    }
}
