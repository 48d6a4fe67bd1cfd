//! `fault`: a block layer that injects errors and latency, like nbdkit's error and delay filters.
//!
//! For tests and drills: put it under a `retry` layer to watch retries work, or at the bottom of
//! a pipeline to see how clients take `EIO`. The parameters ([`FaultParams`]) and the injector
//! are shared with the store wrapper `crate::store::fault`.
//!
//! Each operation first waits for its delay, then draws one random number; if it falls below the
//! operation's error rate, the operation fails with the configured error *without reaching the
//! device below*, so an injected failure never changes data. Every injected error says
//! "injected fault" in its message. `info` is passed through (faults change no capability), and
//! `close` is neither delayed nor failed: it is the export's retirement, not I/O a client waits
//! for, and failing it would only hide the real close's errors.
//!
//! With `seed` set, a run is reproducible: the n-th operation through the layer always draws the
//! same number (for concurrent operations, "n-th" is the order in which they reach the layer).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;
use tracing::{debug, info};

use super::retry::{Clock, SplitMix64, TokioClock, duration_text};
use super::{
    BlockDevice, BlockError, DeviceInfo, Extent, Journal, JournalEntry, ReadData, ZeroFlags,
};

/// Which failure to inject.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultKind {
    /// A permanent I/O error (`EIO`, not transient): a retry layer passes it on at once.
    Eio,
    /// A timeout (`EIO` to the client, but transient): a retry layer tries again.
    #[default]
    Transient,
    /// No space left (`ENOSPC`, permanent).
    Enospc,
}

impl FaultKind {
    /// The name used in parameters and messages.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Eio => "eio",
            FaultKind::Transient => "transient",
            FaultKind::Enospc => "enospc",
        }
    }

    /// The text of an injected error.
    pub fn message(self) -> String {
        format!("injected fault ({})", self.name())
    }

    /// The block error for an injected fault in `op` at `offset`.
    pub fn block_error(self, op: &'static str, offset: u64) -> BlockError {
        match self {
            FaultKind::Eio => BlockError::io(op, offset, io::Error::other(self.message())),
            FaultKind::Transient => BlockError::io(
                op,
                offset,
                io::Error::new(io::ErrorKind::TimedOut, self.message()),
            ),
            FaultKind::Enospc => {
                BlockError::NoSpace(format!("{} in {op} at offset {offset}", self.message()))
            }
        }
    }
}

/// The kinds of operation that have their own error rate or delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Block `read`; store `get`, `head`, `list`.
    Read,
    /// Block `write`; store `put`, `put_range`.
    Write,
    /// `flush`.
    Flush,
    /// Block `trim`; store `delete`.
    Trim,
    /// Block `write_zeroes`.
    Zero,
    /// Block `block_status`.
    BlockStatus,
    /// Block `cache`.
    Cache,
}

/// Parameters of `fault`, as a block layer and as a store wrapper.
///
/// In TOML: `[exports.NAME.fault]` with for example `error_rate = 0.1`, `error = "transient"`,
/// `read_delay = "20ms"`, `seed = 42`. Every key is optional; unknown keys are refused.
/// Rates are probabilities per operation, from 0 (never) to 1 (always).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultParams {
    /// Error rate of every operation without a rate of its own. Default 0.
    pub error_rate: f64,
    /// Overrides `error_rate` for reads (store: `get`, `head`, `list`).
    pub read_error_rate: Option<f64>,
    /// Overrides `error_rate` for writes (store: `put`, `put_range`).
    pub write_error_rate: Option<f64>,
    /// Overrides `error_rate` for `flush`.
    pub flush_error_rate: Option<f64>,
    /// Overrides `error_rate` for `trim` (store: `delete`).
    pub trim_error_rate: Option<f64>,
    /// Overrides `error_rate` for `write_zeroes` (block layer only).
    pub zero_error_rate: Option<f64>,
    /// Overrides `error_rate` for `block_status` (block layer only).
    pub block_status_error_rate: Option<f64>,
    /// Overrides `error_rate` for `cache` (block layer only).
    pub cache_error_rate: Option<f64>,
    /// The failure to inject: `"transient"` (default), `"eio"` or `"enospc"`.
    pub error: FaultKind,
    /// Delay before every operation without a delay of its own. Default `0`.
    #[serde(deserialize_with = "duration_text::deserialize")]
    pub delay: Duration,
    /// Overrides `delay` for reads (store: `get`, `head`, `list`).
    #[serde(deserialize_with = "duration_text::deserialize_option")]
    pub read_delay: Option<Duration>,
    /// Overrides `delay` for writes (store: `put`, `put_range`).
    #[serde(deserialize_with = "duration_text::deserialize_option")]
    pub write_delay: Option<Duration>,
    /// Seed of the random draws, for reproducible runs. Default: random, and logged.
    pub seed: Option<u64>,
}

impl Default for FaultParams {
    fn default() -> Self {
        FaultParams {
            error_rate: 0.0,
            read_error_rate: None,
            write_error_rate: None,
            flush_error_rate: None,
            trim_error_rate: None,
            zero_error_rate: None,
            block_status_error_rate: None,
            cache_error_rate: None,
            error: FaultKind::Transient,
            delay: Duration::ZERO,
            read_delay: None,
            write_delay: None,
            seed: None,
        }
    }
}

impl FaultParams {
    fn rates(&self) -> [(&'static str, Option<f64>); 8] {
        [
            ("error_rate", Some(self.error_rate)),
            ("read_error_rate", self.read_error_rate),
            ("write_error_rate", self.write_error_rate),
            ("flush_error_rate", self.flush_error_rate),
            ("trim_error_rate", self.trim_error_rate),
            ("zero_error_rate", self.zero_error_rate),
            ("block_status_error_rate", self.block_status_error_rate),
            ("cache_error_rate", self.cache_error_rate),
        ]
    }

    /// Checks the parameters for the block layer; the message names the key and the value.
    pub fn validate(&self) -> Result<(), String> {
        for (key, rate) in self.rates() {
            if let Some(r) = rate
                && !(0.0..=1.0).contains(&r)
            {
                return Err(format!("{key} must be between 0 and 1, got {r}"));
            }
        }
        Ok(())
    }

    /// Checks the parameters for the store wrapper: as [`FaultParams::validate`], and refuses
    /// the rates of operations a store does not have rather than ignoring them.
    pub fn validate_for_store(&self) -> Result<(), String> {
        self.validate()?;
        for (key, rate) in [
            ("zero_error_rate", self.zero_error_rate),
            ("block_status_error_rate", self.block_status_error_rate),
            ("cache_error_rate", self.cache_error_rate),
        ] {
            if rate.is_some() {
                return Err(format!(
                    "{key} has no meaning for a store wrapper (its operations are read: get, head, \
                     list; write: put, put_range; trim: delete; flush); put fault above the layout \
                     to fail that operation"
                ));
            }
        }
        Ok(())
    }

    /// The error rate of one kind of operation.
    pub fn rate(&self, kind: OpKind) -> f64 {
        let specific = match kind {
            OpKind::Read => self.read_error_rate,
            OpKind::Write => self.write_error_rate,
            OpKind::Flush => self.flush_error_rate,
            OpKind::Trim => self.trim_error_rate,
            OpKind::Zero => self.zero_error_rate,
            OpKind::BlockStatus => self.block_status_error_rate,
            OpKind::Cache => self.cache_error_rate,
        };
        specific.unwrap_or(self.error_rate)
    }

    /// The delay of one kind of operation.
    pub fn delay(&self, kind: OpKind) -> Duration {
        let specific = match kind {
            OpKind::Read => self.read_delay,
            OpKind::Write => self.write_delay,
            _ => None,
        };
        specific.unwrap_or(self.delay)
    }
}

/// The injection mechanism shared by [`FaultLayer`] and `FaultStore`: delays, draws and counts.
#[derive(Debug)]
pub struct Injector {
    params: FaultParams,
    rng: SplitMix64,
    clock: Arc<dyn Clock>,
    injected: AtomicU64,
}

impl Injector {
    /// An injector; `layer` (`"block"` or `"store"`) labels the log line announcing the seed.
    pub fn new(params: FaultParams, clock: Arc<dyn Clock>, layer: &'static str) -> Self {
        let seed = params.seed.unwrap_or_else(SplitMix64::entropy_seed);
        info!(
            stage = "fault",
            layer,
            seed,
            error = params.error.name(),
            "fault injection enabled"
        );
        Injector {
            params,
            rng: SplitMix64::new(seed),
            clock,
            injected: AtomicU64::new(0),
        }
    }

    /// Waits for the delay of `kind`, then decides: `Some` is the fault to inject.
    pub async fn before(&self, kind: OpKind) -> Option<FaultKind> {
        let delay = self.params.delay(kind);
        if !delay.is_zero() {
            self.clock.sleep(delay).await;
        }
        // Draw even when the rate is 0 or 1, so that the sequence of draws does not depend on
        // the rates and a seed reproduces the same run under different rates.
        let draw = self.rng.next_f64();
        if draw < self.params.rate(kind) {
            self.injected.fetch_add(1, Ordering::Relaxed);
            debug!(stage = "fault", op = ?kind, error = self.params.error.name(), "injecting a fault");
            Some(self.params.error)
        } else {
            None
        }
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// The parameters in force.
    pub fn params(&self) -> &FaultParams {
        &self.params
    }
}

/// A block layer that injects errors and delays into the device below.
#[derive(Debug)]
pub struct FaultLayer {
    inner: Arc<dyn BlockDevice>,
    injector: Arc<Injector>,
}

impl FaultLayer {
    /// Wraps `inner`. Validate `params` first ([`FaultParams::validate`]); a rate outside
    /// `[0, 1]` acts like the nearest bound.
    pub fn new(inner: Arc<dyn BlockDevice>, params: FaultParams) -> Self {
        Self::with_clock(inner, params, Arc::new(TokioClock::new()))
    }

    /// Wraps `inner`, sleeping on `clock` (tests, simulations).
    pub fn with_clock(
        inner: Arc<dyn BlockDevice>,
        params: FaultParams,
        clock: Arc<dyn Clock>,
    ) -> Self {
        FaultLayer {
            inner,
            injector: Arc::new(Injector::new(params, clock, "block")),
        }
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.injector.injected()
    }

    async fn check(&self, kind: OpKind, op: &'static str, offset: u64) -> Result<(), BlockError> {
        match self.injector.before(kind).await {
            Some(fault) => Err(fault.block_error(op, offset)),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl BlockDevice for FaultLayer {
    /// The device below's: faults change no capability.
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<ReadData, BlockError> {
        self.check(OpKind::Read, "read", offset).await?;
        self.inner.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        self.check(OpKind::Write, "write", offset).await?;
        self.inner.write(offset, data, fua).await
    }

    async fn flush(&self) -> Result<(), BlockError> {
        self.check(OpKind::Flush, "flush", 0).await?;
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        self.check(OpKind::Trim, "trim", offset).await?;
        self.inner.trim(offset, len, fua).await
    }

    /// An injected failure leaves the data unchanged, which also keeps the `fast` contract.
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), BlockError> {
        self.check(OpKind::Zero, "write_zeroes", offset).await?;
        self.inner.write_zeroes(offset, len, flags).await
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check(OpKind::Cache, "cache", offset).await?;
        self.inner.cache(offset, len).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BlockError> {
        self.check(OpKind::BlockStatus, "block_status", offset)
            .await?;
        self.inner.block_status(offset, len).await
    }

    /// Never delayed or failed (see the module documentation).
    async fn close(&self) -> Result<(), BlockError> {
        self.inner.close().await
    }

    /// The device below's journal, its appends failed and delayed like writes.
    fn journal(&self) -> Option<Arc<dyn Journal>> {
        let inner = self.inner.journal()?;
        Some(Arc::new(FaultJournal {
            inner,
            injector: Arc::clone(&self.injector),
        }))
    }
}

/// A journal whose appends fail and are delayed like writes. An injected failure happens
/// before the append, so it leaves nothing behind.
#[derive(Debug)]
struct FaultJournal {
    inner: Arc<dyn Journal>,
    injector: Arc<Injector>,
}

#[async_trait]
impl Journal for FaultJournal {
    async fn append(&self, entries: Vec<JournalEntry>, keep_from: u64) -> Result<u64, BlockError> {
        if let Some(fault) = self.injector.before(OpKind::Write).await {
            return Err(fault.block_error("journal", 0));
        }
        self.inner.append(entries, keep_from).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::errno;
    use crate::block::retry::VirtualClock;
    use crate::layout::raw::MemoryImage;

    fn layer(params: FaultParams) -> (FaultLayer, Arc<MemoryImage>, Arc<VirtualClock>) {
        let memory = Arc::new(MemoryImage::new(1 << 20, false));
        let clock = Arc::new(VirtualClock::default());
        (
            FaultLayer::with_clock(memory.clone(), params, clock.clone()),
            memory,
            clock,
        )
    }

    fn always(error: FaultKind) -> FaultParams {
        FaultParams {
            error_rate: 1.0,
            error,
            seed: Some(1),
            ..FaultParams::default()
        }
    }

    /// Runs one operation of each kind (except close); true where it failed.
    async fn outcomes(f: &FaultLayer) -> Vec<(&'static str, bool)> {
        vec![
            ("read", f.read(0, 10).await.is_err()),
            (
                "write",
                f.write(0, Bytes::from_static(b"x"), false).await.is_err(),
            ),
            ("flush", f.flush().await.is_err()),
            ("trim", f.trim(0, 10, false).await.is_err()),
            (
                "zero",
                f.write_zeroes(0, 10, ZeroFlags::default()).await.is_err(),
            ),
            ("block_status", f.block_status(0, 10).await.is_err()),
            ("cache", f.cache(0, 10).await.is_err()),
        ]
    }

    #[test]
    fn params_have_documented_defaults() {
        let p: FaultParams = toml::from_str("").unwrap();
        assert_eq!(p, FaultParams::default());
        assert_eq!(p.error_rate, 0.0);
        assert_eq!(p.error, FaultKind::Transient);
        assert_eq!(p.delay, Duration::ZERO);
        assert_eq!(p.seed, None);
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn params_deserialize_from_toml() {
        let p: FaultParams = toml::from_str(
            "error_rate = 0.5\nwrite_error_rate = 1\nerror = \"eio\"\ndelay = \"5ms\"\n\
             read_delay = \"1s\"\nseed = 42",
        )
        .unwrap();
        assert_eq!(p.error_rate, 0.5);
        assert_eq!(p.rate(OpKind::Write), 1.0);
        assert_eq!(p.rate(OpKind::Read), 0.5);
        assert_eq!(p.error, FaultKind::Eio);
        assert_eq!(p.delay(OpKind::Read), Duration::from_secs(1));
        assert_eq!(p.delay(OpKind::Write), Duration::from_millis(5));
        assert_eq!(p.delay(OpKind::Flush), Duration::from_millis(5));
        assert_eq!(p.seed, Some(42));
        let e = toml::from_str::<FaultParams>("error = \"boom\"").unwrap_err();
        assert!(e.to_string().contains("boom"), "{e}");
        let e = toml::from_str::<FaultParams>("eror_rate = 0.1").unwrap_err();
        assert!(e.to_string().contains("eror_rate"), "{e}");
        let e = toml::from_str::<FaultParams>("read_delay = \"fast\"").unwrap_err();
        assert!(e.to_string().contains("bad duration \"fast\""), "{e}");
    }

    #[test]
    fn validate_names_the_key_and_the_value() {
        let p = FaultParams {
            error_rate: 1.5,
            ..FaultParams::default()
        };
        assert_eq!(
            p.validate().unwrap_err(),
            "error_rate must be between 0 and 1, got 1.5"
        );
        let p = FaultParams {
            trim_error_rate: Some(-0.1),
            ..FaultParams::default()
        };
        assert_eq!(
            p.validate().unwrap_err(),
            "trim_error_rate must be between 0 and 1, got -0.1"
        );
        let p = FaultParams {
            read_error_rate: Some(f64::NAN),
            ..FaultParams::default()
        };
        assert_eq!(
            p.validate().unwrap_err(),
            "read_error_rate must be between 0 and 1, got NaN"
        );
        let p = FaultParams {
            zero_error_rate: Some(0.5),
            ..FaultParams::default()
        };
        assert_eq!(p.validate(), Ok(()));
        assert!(
            p.validate_for_store()
                .unwrap_err()
                .starts_with("zero_error_rate has no meaning")
        );
    }

    #[tokio::test]
    async fn rate_one_always_fails_with_a_transient_error() {
        let (f, _, _) = layer(always(FaultKind::Transient));
        for _ in 0..20 {
            let e = f.read(0, 10).await.unwrap_err();
            assert!(e.is_transient());
            assert_eq!(e.nbd_errno(), errno::EIO);
            assert_eq!(
                e.to_string(),
                "read at offset 0: injected fault (transient)"
            );
        }
        assert!(outcomes(&f).await.iter().all(|(_, failed)| *failed));
        assert_eq!(f.injected(), 27);
    }

    #[tokio::test]
    async fn rate_one_with_eio_fails_permanently() {
        let (f, _, _) = layer(always(FaultKind::Eio));
        let e = f
            .write(512, Bytes::from_static(b"x"), false)
            .await
            .unwrap_err();
        assert!(!e.is_transient());
        assert_eq!(e.nbd_errno(), errno::EIO);
        assert_eq!(e.to_string(), "write at offset 512: injected fault (eio)");
    }

    #[tokio::test]
    async fn rate_one_with_enospc_fails_with_no_space() {
        let (f, _, _) = layer(always(FaultKind::Enospc));
        let e = f.trim(512, 1, false).await.unwrap_err();
        assert!(!e.is_transient());
        assert_eq!(e.nbd_errno(), errno::ENOSPC);
        assert!(e.to_string().contains("injected fault (enospc)"), "{e}");
    }

    #[tokio::test]
    async fn rate_zero_never_fails() {
        let (f, _, _) = layer(FaultParams::default());
        for _ in 0..200 {
            assert!(outcomes(&f).await.iter().all(|(_, failed)| !*failed));
        }
        assert_eq!(f.injected(), 0);
    }

    #[tokio::test]
    async fn injected_failures_do_not_reach_the_device() {
        let (f, memory, _) = layer(always(FaultKind::Transient));
        assert!(
            f.write(0, Bytes::from_static(b"data"), false)
                .await
                .is_err()
        );
        assert_eq!(memory.allocated(), 0);
        memory
            .write(0, Bytes::from_static(b"keep"), false)
            .await
            .unwrap();
        assert!(f.trim(0, 4, false).await.is_err());
        assert!(f.write_zeroes(0, 4, ZeroFlags::default()).await.is_err());
        assert_eq!(&memory.read(0, 4).await.unwrap().to_bytes()[..], b"keep");
    }

    #[tokio::test]
    async fn close_is_never_failed_or_delayed() {
        let (f, _, clock) = layer(FaultParams {
            delay: Duration::from_secs(1),
            ..always(FaultKind::Eio)
        });
        f.close().await.unwrap();
        assert_eq!(clock.now(), Duration::ZERO);
        assert_eq!(f.info().size, 1 << 20);
    }

    async fn pattern(seed: u64, rate: f64) -> Vec<bool> {
        let (f, _, _) = layer(FaultParams {
            error_rate: rate,
            seed: Some(seed),
            ..FaultParams::default()
        });
        let mut out = Vec::new();
        for i in 0..200 {
            out.push(f.read(i, 1).await.is_err());
        }
        out
    }

    #[tokio::test]
    async fn seeded_runs_are_reproducible() {
        let a = pattern(42, 0.3).await;
        assert_eq!(a, pattern(42, 0.3).await);
        assert_ne!(a, pattern(43, 0.3).await);
        let failed = a.iter().filter(|x| **x).count();
        assert!((30..90).contains(&failed), "{failed}");
        // The draws do not depend on the rate: a higher rate fails a superset.
        let b = pattern(42, 0.6).await;
        assert!(a.iter().zip(&b).all(|(x, y)| !*x || *y));
    }

    #[tokio::test]
    async fn the_rate_is_respected() {
        let (f, _, _) = layer(FaultParams {
            error_rate: 0.25,
            seed: Some(7),
            ..FaultParams::default()
        });
        let mut n = 0;
        for _ in 0..10_000 {
            if f.flush().await.is_err() {
                n += 1;
            }
        }
        assert!((2_200..2_800).contains(&n), "{n}");
        assert_eq!(f.injected(), n);
    }

    #[tokio::test]
    async fn delays_are_applied_per_operation() {
        let (f, _, clock) = layer(FaultParams {
            delay: Duration::from_secs(1),
            read_delay: Some(Duration::from_secs(3)),
            write_delay: Some(Duration::from_millis(500)),
            ..FaultParams::default()
        });
        let mut last = clock.now();
        let mut step = || {
            let now = clock.now();
            let d = now - last;
            last = now;
            d
        };
        f.read(0, 1).await.unwrap();
        assert_eq!(step(), Duration::from_secs(3));
        f.write(0, Bytes::from_static(b"x"), false).await.unwrap();
        assert_eq!(step(), Duration::from_millis(500));
        f.flush().await.unwrap();
        assert_eq!(step(), Duration::from_secs(1));
        f.trim(0, 1, false).await.unwrap();
        f.write_zeroes(0, 1, ZeroFlags::default()).await.unwrap();
        f.block_status(0, 1).await.unwrap();
        f.cache(0, 1).await.unwrap();
        assert_eq!(step(), Duration::from_secs(4));
    }

    #[tokio::test]
    async fn delay_happens_before_a_failure_too() {
        let (f, _, clock) = layer(FaultParams {
            delay: Duration::from_millis(250),
            ..always(FaultKind::Transient)
        });
        assert!(f.flush().await.is_err());
        assert_eq!(clock.now(), Duration::from_millis(250));
    }

    #[tokio::test]
    async fn the_real_clock_really_waits() {
        let memory = Arc::new(MemoryImage::new(4096, false));
        let f = FaultLayer::new(
            memory,
            FaultParams {
                read_delay: Some(Duration::from_millis(30)),
                ..FaultParams::default()
            },
        );
        let start = std::time::Instant::now();
        f.read(0, 1).await.unwrap();
        assert!(start.elapsed() >= Duration::from_millis(30));
    }

    #[tokio::test]
    async fn per_operation_rates_override_the_default() {
        let (f, _, _) = layer(FaultParams {
            error_rate: 1.0,
            read_error_rate: Some(0.0),
            block_status_error_rate: Some(0.0),
            seed: Some(5),
            ..FaultParams::default()
        });
        let got = outcomes(&f).await;
        for (op, failed) in got {
            assert_eq!(failed, !matches!(op, "read" | "block_status"), "{op}");
        }

        let (f, _, _) = layer(FaultParams {
            write_error_rate: Some(1.0),
            flush_error_rate: Some(1.0),
            trim_error_rate: Some(1.0),
            zero_error_rate: Some(1.0),
            cache_error_rate: Some(1.0),
            seed: Some(5),
            ..FaultParams::default()
        });
        let got = outcomes(&f).await;
        for (op, failed) in got {
            assert_eq!(failed, !matches!(op, "read" | "block_status"), "{op}");
        }
    }
}
