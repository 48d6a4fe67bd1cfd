//! `retry`: a block layer that tries transient failures again, with jittered exponential backoff.
//!
//! This file also holds what the store wrapper `crate::store::retry` shares with it: the
//! parameters ([`RetryParams`]), the backoff policy ([`Backoff`]), the retry loop, the duration
//! syntax ([`parse_duration`]), a small PRNG ([`SplitMix64`]) and the [`Clock`] that sleeps.
//!
//! # What is retried
//!
//! Only errors whose `is_transient()` is true (timeouts, resets, a remote store's 5xx or
//! throttling); a permanent error (`EIO` from a disk, a bad key, no space, read-only, fast zero
//! unsupported) is returned at once, untouched. When the retries run out the last error is
//! returned unchanged, so the client sees the same NBD error code it would have seen without
//! this layer.
//!
//! Retrying is safe for every operation of a [`BlockDevice`]:
//! - `read` and `block_status` change nothing, they only return data.
//! - `write`, `trim` and `write_zeroes` are idempotent at an offset: doing one twice leaves the
//!   same bytes as doing it once, even if the first attempt landed in part. An overlapping
//!   request from the client that races with a retried one was in flight at the same time, and
//!   NBD gives no order to overlapping requests in flight, so a retry cannot break a guarantee.
//! - `flush` and `close` only make already-written data durable; doing that twice is harmless.
//!   (`close` is retried on the assumption that a close that failed did not complete.)
//!
//! `cache` is the one operation that is *not* retried: it is a prefetch hint whose failure
//! changes nothing and which the transmission layer ignores, so retrying would only delay the
//! client's reply.
//!
//! # Time
//!
//! Delays follow "decorrelated jitter" (AWS architecture blog, "Exponential Backoff and
//! Jitter"): each delay is drawn uniformly from `initial_delay ..= 3 × previous delay` and
//! capped at `max_delay`, so retries from many connections spread out instead of arriving in
//! lock step. The retry loop never sleeps past `budget`, counted from the start of the first
//! attempt: when the next delay would end beyond it, the loop gives up at once. An attempt in
//! progress is never cancelled (a write abandoned half-way could land after a later write to
//! the same range), so a single slow attempt can still outlast the budget; keep the budget below
//! the clients' own timeout.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;
use tracing::{info, warn};

use super::{
    BlockDevice, BlockError, DeviceInfo, Extent, Journal, JournalEntry, ReadData, ZeroFlags,
};

/// Default for [`RetryParams::attempts`].
pub const DEFAULT_ATTEMPTS: u32 = 5;
/// Default for [`RetryParams::initial_delay`].
pub const DEFAULT_INITIAL_DELAY: Duration = Duration::from_millis(100);
/// Default for [`RetryParams::max_delay`].
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(2);
/// Default for [`RetryParams::budget`].
pub const DEFAULT_BUDGET: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Durations
// ---------------------------------------------------------------------------------------------

/// Parses a duration such as `100ms`, `2s`, `1.5s` or `1m`: a non-negative number and a unit,
/// `ms` (milliseconds), `s` (seconds) or `m` (minutes). A bare `0` is accepted; any other
/// number needs a unit. The error message quotes the text.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = |why: &str| {
        format!(
            "bad duration {text:?}: {why} (expected a number and a unit ms, s or m, like 100ms, 2s or 1m)"
        )
    };
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim_start());
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return Err(bad("no number"));
    }
    let value: f64 = number.parse().map_err(|_| bad("not a number"))?;
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "" if value == 0.0 => 0.0,
        "" => return Err(bad("missing unit")),
        _ => return Err(bad("unknown unit")),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|_| bad("too long"))
}

/// Serde helpers that read durations written as strings in the [`parse_duration`] syntax.
///
/// Use as `#[serde(deserialize_with = "duration_text::deserialize")]`, or
/// `duration_text::deserialize_option` for an `Option<Duration>`. The integer `0` is accepted
/// too, because environment variables turn `"0"` into a number; any other number is refused
/// since it has no unit.
pub mod duration_text {
    use std::fmt;
    use std::time::Duration;

    use serde::Deserializer;
    use serde::de::{self, Visitor};

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration with a unit, like \"100ms\", \"2s\" or \"1m\"")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            super::parse_duration(v).map_err(E::custom)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            if v == 0 {
                Ok(Duration::ZERO)
            } else {
                Err(E::custom(format!(
                    "bad duration {v}: missing unit (write it as a string like \"{v}ms\" or \"{v}s\")"
                )))
            }
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            match u64::try_from(v) {
                Ok(u) => self.visit_u64(u),
                Err(_) => Err(E::custom(format!(
                    "bad duration {v}: a duration cannot be negative"
                ))),
            }
        }
    }

    /// Reads a required duration.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }

    /// Reads an optional duration (a present value is parsed like [`deserialize`]).
    pub fn deserialize_option<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        deserialize(d).map(Some)
    }
}

// ---------------------------------------------------------------------------------------------
// Randomness and time
// ---------------------------------------------------------------------------------------------

/// SplitMix64 (Steele, Lea and Flood): a small, fast, statistically sound PRNG, not for
/// cryptography. Lock-free: every draw is one atomic add, so a layer can share one generator
/// between connections. From a given seed, the sequence of draws is fixed.
#[derive(Debug)]
pub struct SplitMix64 {
    state: AtomicU64,
}

const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

impl SplitMix64 {
    /// A generator whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 {
            state: AtomicU64::new(seed),
        }
    }

    /// A seed that differs between calls and between runs: the wall clock, the process id and
    /// a counter, mixed.
    pub fn entropy_seed() -> u64 {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        mix64(nanos ^ mix64(u64::from(std::process::id()) ^ n.wrapping_mul(GOLDEN_GAMMA)))
    }

    /// The next 64 random bits.
    pub fn next_u64(&self) -> u64 {
        let z = self
            .state
            .fetch_add(GOLDEN_GAMMA, Ordering::Relaxed)
            .wrapping_add(GOLDEN_GAMMA);
        mix64(z)
    }

    /// A number uniformly distributed in `[0, 1)`.
    pub fn next_f64(&self) -> f64 {
        // The top 53 bits fill an f64 mantissa exactly.
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Where a layer gets the time and how it sleeps. Production uses [`TokioClock`]; tests use a
/// virtual clock so that backoff and injected delays cost no real time.
#[async_trait]
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Monotonic time since an arbitrary fixed origin.
    fn now(&self) -> Duration;
    /// Waits for `d`.
    async fn sleep(&self, d: Duration);
}

/// The real clock: `tokio::time`.
#[derive(Debug)]
pub struct TokioClock {
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        TokioClock {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Clock for TokioClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    async fn sleep(&self, d: Duration) {
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }
}

/// A clock for tests: `sleep` advances virtual time at once (like `tokio::time::pause` with
/// auto-advance) and yields, so tests of backoff, budgets and delays take no real time.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct VirtualClock {
    now: std::sync::Mutex<Duration>,
}

#[cfg(test)]
#[async_trait]
impl Clock for VirtualClock {
    fn now(&self) -> Duration {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn sleep(&self, d: Duration) {
        {
            let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
            *now = now.saturating_add(d);
        }
        tokio::task::yield_now().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Parameters and policy
// ---------------------------------------------------------------------------------------------

/// Parameters of `retry`, as a block layer and as a store wrapper.
///
/// In TOML: `[exports.NAME.retry]` with `attempts = 8`, `initial_delay = "50ms"`,
/// `max_delay = "1s"`, `budget = "10s"`; every key is optional, unknown keys are refused.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryParams {
    /// Maximum number of tries, the first one included; 1 means never retry. Default 5.
    pub attempts: u32,
    /// Lower bound of every delay and the scale of the first one. Default `100ms`.
    #[serde(deserialize_with = "duration_text::deserialize")]
    pub initial_delay: Duration,
    /// Upper bound of any one delay. Default `2s`.
    #[serde(deserialize_with = "duration_text::deserialize")]
    pub max_delay: Duration,
    /// Total time one operation may spend, counted from its first attempt; no retry is started
    /// if its delay would end beyond it. Default `20s`, below the 30 s or more that clients
    /// usually wait.
    #[serde(deserialize_with = "duration_text::deserialize")]
    pub budget: Duration,
}

impl Default for RetryParams {
    fn default() -> Self {
        RetryParams {
            attempts: DEFAULT_ATTEMPTS,
            initial_delay: DEFAULT_INITIAL_DELAY,
            max_delay: DEFAULT_MAX_DELAY,
            budget: DEFAULT_BUDGET,
        }
    }
}

impl RetryParams {
    /// Checks the parameters together; the message names the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.attempts < 1 {
            return Err("attempts must be at least 1".to_owned());
        }
        if self.initial_delay > self.max_delay {
            return Err(format!(
                "initial_delay ({:?}) must not exceed max_delay ({:?})",
                self.initial_delay, self.max_delay
            ));
        }
        if self.budget.is_zero() {
            return Err("budget must be greater than zero".to_owned());
        }
        if self.attempts > 1 && self.initial_delay > self.budget {
            return Err(format!(
                "initial_delay ({:?}) must not exceed budget ({:?}), or no retry could ever start",
                self.initial_delay, self.budget
            ));
        }
        Ok(())
    }
}

/// The backoff policy: the delays before successive retries of one operation, with
/// decorrelated jitter. Each delay lies in `initial_delay ..= max_delay`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    prev: Duration,
}

impl Backoff {
    /// The policy for one operation, before its first retry.
    pub fn new(params: &RetryParams) -> Self {
        Backoff {
            initial: params.initial_delay,
            max: params.max_delay.max(params.initial_delay),
            prev: params.initial_delay,
        }
    }

    /// The delay before the next retry: uniform in `initial ..= 3 × previous`, capped at the
    /// maximum.
    pub fn next_delay(&mut self, rng: &SplitMix64) -> Duration {
        let lo = self.initial;
        let hi = self.prev.saturating_mul(3).clamp(lo, self.max);
        let span = hi - lo;
        let jitter = Duration::try_from_secs_f64(span.as_secs_f64() * rng.next_f64())
            .unwrap_or(span)
            .min(span);
        let d = lo + jitter;
        self.prev = d;
        d
    }
}

// ---------------------------------------------------------------------------------------------
// The retry mechanism, shared with the store wrapper
// ---------------------------------------------------------------------------------------------

/// An error a retry loop can judge.
pub trait Retryable: fmt::Display {
    /// True if trying again may succeed.
    fn is_transient(&self) -> bool;
}

impl Retryable for BlockError {
    fn is_transient(&self) -> bool {
        BlockError::is_transient(self)
    }
}

/// What an operation touched, for log lines.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// A byte offset of a block device.
    Offset(u64),
    /// An object key (or a key prefix, for `list`).
    Key(&'a str),
    /// The whole device or store (`flush`, `close`).
    Whole,
}

impl fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Offset(o) => write!(f, "offset {o}"),
            Target::Key(k) => write!(f, "key {k:?}"),
            Target::Whole => f.write_str("all"),
        }
    }
}

/// The retry mechanism: runs an operation until it succeeds, fails permanently, runs out of
/// attempts or would run out of budget. Used by [`RetryLayer`] and `RetryStore`.
#[derive(Debug)]
pub struct Retrier {
    params: RetryParams,
    rng: SplitMix64,
    clock: Arc<dyn Clock>,
}

impl Retrier {
    /// A retrier with the real clock and a random seed for the jitter.
    pub fn new(params: RetryParams) -> Self {
        Self::with_clock(
            params,
            Arc::new(TokioClock::new()),
            SplitMix64::entropy_seed(),
        )
    }

    /// A retrier with a given clock and jitter seed (tests, simulations). `attempts` below 1
    /// counts as 1; call [`RetryParams::validate`] first to refuse such parameters instead.
    pub fn with_clock(mut params: RetryParams, clock: Arc<dyn Clock>, seed: u64) -> Self {
        params.attempts = params.attempts.max(1);
        Retrier {
            params,
            rng: SplitMix64::new(seed),
            clock,
        }
    }

    /// The parameters in force.
    pub fn params(&self) -> &RetryParams {
        &self.params
    }

    /// Runs `attempt` (which starts one try each time it is called) under the policy. `layer`
    /// (`"block"` or `"store"`), `op` and `target` only label the log lines. Returns the first
    /// success, the first permanent error, or the last transient error when giving up.
    pub async fn run<T, E, F, Fut>(
        &self,
        layer: &'static str,
        op: &'static str,
        target: Target<'_>,
        mut attempt: F,
    ) -> Result<T, E>
    where
        E: Retryable,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let start = self.clock.now();
        let attempts = self.params.attempts;
        let mut backoff = Backoff::new(&self.params);
        let mut n: u32 = 1;
        loop {
            let error = match attempt().await {
                Ok(v) => {
                    if n > 1 {
                        info!(stage = "retry", layer, op, at = %target, attempts = n, "recovered after retrying");
                    }
                    return Ok(v);
                }
                Err(e) => e,
            };
            if !error.is_transient() {
                return Err(error);
            }
            if n >= attempts {
                warn!(stage = "retry", layer, op, at = %target, attempt = n, %error, "giving up: no attempts left");
                return Err(error);
            }
            let delay = backoff.next_delay(&self.rng);
            let spent = self.clock.now().saturating_sub(start);
            if spent.saturating_add(delay) > self.params.budget {
                warn!(
                    stage = "retry", layer, op, at = %target, attempt = n, %error, ?delay, ?spent,
                    budget = ?self.params.budget,
                    "giving up: the next retry would end beyond the budget"
                );
                return Err(error);
            }
            warn!(stage = "retry", layer, op, at = %target, attempt = n, of = attempts, %error, ?delay, "transient failure, retrying");
            self.clock.sleep(delay).await;
            n += 1;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The block layer
// ---------------------------------------------------------------------------------------------

/// A block layer that retries transient failures of the device below. See the module
/// documentation for what is retried and why that is safe.
#[derive(Debug)]
pub struct RetryLayer {
    inner: Arc<dyn BlockDevice>,
    retrier: Arc<Retrier>,
}

impl RetryLayer {
    /// Wraps `inner`. Validate `params` first ([`RetryParams::validate`]).
    pub fn new(inner: Arc<dyn BlockDevice>, params: RetryParams) -> Self {
        RetryLayer {
            inner,
            retrier: Arc::new(Retrier::new(params)),
        }
    }

    /// Wraps `inner` with a given clock and jitter seed (tests, simulations).
    pub fn with_clock(
        inner: Arc<dyn BlockDevice>,
        params: RetryParams,
        clock: Arc<dyn Clock>,
        seed: u64,
    ) -> Self {
        RetryLayer {
            inner,
            retrier: Arc::new(Retrier::with_clock(params, clock, seed)),
        }
    }

    async fn retry<T, F, Fut>(
        &self,
        op: &'static str,
        target: Target<'_>,
        f: F,
    ) -> Result<T, BlockError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, BlockError>>,
    {
        self.retrier.run("block", op, target, f).await
    }
}

#[async_trait]
impl BlockDevice for RetryLayer {
    /// The device below's: retrying changes no capability.
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<ReadData, BlockError> {
        self.retry("read", Target::Offset(offset), || {
            self.inner.read(offset, len)
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        // `Bytes` clones share the buffer: each attempt costs a reference count.
        self.retry("write", Target::Offset(offset), || {
            self.inner.write(offset, data.clone(), fua)
        })
        .await
    }

    async fn flush(&self) -> Result<(), BlockError> {
        self.retry("flush", Target::Whole, || self.inner.flush())
            .await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        self.retry("trim", Target::Offset(offset), || {
            self.inner.trim(offset, len, fua)
        })
        .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), BlockError> {
        // `FastZeroUnsupported` is permanent, so a fast-zero refusal reaches the client at once.
        self.retry("write_zeroes", Target::Offset(offset), || {
            self.inner.write_zeroes(offset, len, flags)
        })
        .await
    }

    /// Not retried: a prefetch hint whose failure changes nothing (see the module docs).
    async fn cache(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.inner.cache(offset, len).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BlockError> {
        self.retry("block_status", Target::Offset(offset), || {
            self.inner.block_status(offset, len)
        })
        .await
    }

    async fn close(&self) -> Result<(), BlockError> {
        self.retry("close", Target::Whole, || self.inner.close())
            .await
    }

    /// The device below's journal, its appends retried like writes.
    fn journal(&self) -> Option<Arc<dyn Journal>> {
        let inner = self.inner.journal()?;
        Some(Arc::new(RetryJournal {
            inner,
            retrier: Arc::clone(&self.retrier),
        }))
    }
}

/// A journal whose appends are retried. An append is safe to retry: a failed one leaves
/// nothing that the next one does not replace (see [`Journal::append`]).
#[derive(Debug)]
struct RetryJournal {
    inner: Arc<dyn Journal>,
    retrier: Arc<Retrier>,
}

#[async_trait]
impl Journal for RetryJournal {
    async fn append(&self, entries: Vec<JournalEntry>, keep_from: u64) -> Result<u64, BlockError> {
        self.retrier
            .run("block", "journal", Target::Whole, || {
                self.inner.append(entries.clone(), keep_from)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicU32;

    use super::*;
    use crate::block::errno;
    use crate::block::fault::{FaultKind, FaultLayer, FaultParams};
    use crate::layout::raw::MemoryImage;

    // ----- durations and parameters -----

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration(" 250 ms "), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0ms"), Ok(Duration::ZERO));
    }

    #[test]
    fn bad_durations_are_refused_with_the_text_quoted() {
        for (text, why) in [
            ("", "no number"),
            ("ms", "no number"),
            ("10", "missing unit"),
            ("5h", "unknown unit"),
            ("-1s", "no number"),
            ("1.2.3s", "not a number"),
            (".5s", "no number"),
            ("1e999m", "unknown unit"),
        ] {
            let e = parse_duration(text).unwrap_err();
            assert!(
                e.starts_with(&format!("bad duration {text:?}: {why}")),
                "{text}: {e}"
            );
        }
        let huge = format!("{}m", "9".repeat(30));
        let e = parse_duration(&huge).unwrap_err();
        assert!(e.contains("too long"), "{e}");
    }

    #[test]
    fn params_have_documented_defaults() {
        let p = RetryParams::default();
        assert_eq!(p.attempts, 5);
        assert_eq!(p.initial_delay, Duration::from_millis(100));
        assert_eq!(p.max_delay, Duration::from_secs(2));
        assert_eq!(p.budget, Duration::from_secs(20));
        assert_eq!(p.validate(), Ok(()));
        let empty: RetryParams = toml::from_str("").unwrap();
        assert_eq!(empty, p);
    }

    #[test]
    fn params_deserialize_from_toml() {
        let p: RetryParams = toml::from_str(
            "attempts = 8\ninitial_delay = \"50ms\"\nmax_delay = \"1s\"\nbudget = \"1m\"",
        )
        .unwrap();
        assert_eq!(
            p,
            RetryParams {
                attempts: 8,
                initial_delay: Duration::from_millis(50),
                max_delay: Duration::from_secs(1),
                budget: Duration::from_secs(60),
            }
        );
        let zero: RetryParams = toml::from_str("initial_delay = 0").unwrap();
        assert_eq!(zero.initial_delay, Duration::ZERO);
    }

    #[test]
    fn params_extract_through_figment_with_env_style_values() {
        use figment::Figment;
        use figment::providers::{Format, Toml};
        let p: RetryParams = Figment::from(Toml::string(
            "attempts = 3\nmax_delay = \"500ms\"\ninitial_delay = 0",
        ))
        .extract()
        .unwrap();
        assert_eq!(p.attempts, 3);
        assert_eq!(p.max_delay, Duration::from_millis(500));
        assert_eq!(p.initial_delay, Duration::ZERO);
        assert_eq!(p.budget, DEFAULT_BUDGET);
        let e = Figment::from(Toml::string("budget = \"soon\""))
            .extract::<RetryParams>()
            .unwrap_err();
        assert!(e.to_string().contains("bad duration \"soon\""), "{e}");
    }

    #[test]
    fn params_refuse_unknown_keys_and_bad_values() {
        let e = toml::from_str::<RetryParams>("atempts = 3").unwrap_err();
        assert!(e.to_string().contains("atempts"), "{e}");
        let e = toml::from_str::<RetryParams>("budget = \"20\"").unwrap_err();
        assert!(e.to_string().contains("bad duration \"20\""), "{e}");
        let e = toml::from_str::<RetryParams>("budget = 20").unwrap_err();
        assert!(e.to_string().contains("missing unit"), "{e}");
    }

    #[test]
    fn validate_names_the_key() {
        let check = |p: RetryParams| p.validate().unwrap_err();
        let d = RetryParams::default();
        assert_eq!(
            check(RetryParams {
                attempts: 0,
                ..d.clone()
            }),
            "attempts must be at least 1"
        );
        assert!(
            check(RetryParams {
                initial_delay: Duration::from_secs(3),
                ..d.clone()
            })
            .starts_with("initial_delay (3s) must not exceed max_delay (2s)")
        );
        assert_eq!(
            check(RetryParams {
                budget: Duration::ZERO,
                ..d.clone()
            }),
            "budget must be greater than zero"
        );
        assert!(
            check(RetryParams {
                budget: Duration::from_millis(50),
                ..d.clone()
            })
            .starts_with("initial_delay (100ms) must not exceed budget (50ms)")
        );
        // One attempt never sleeps, so a tiny budget is fine then.
        let once = RetryParams {
            attempts: 1,
            budget: Duration::from_millis(50),
            ..d
        };
        assert_eq!(once.validate(), Ok(()));
    }

    // ----- the policy -----

    #[test]
    fn backoff_stays_within_bounds_and_grows() {
        let p = RetryParams::default();
        let rng = SplitMix64::new(7);
        let mut b = Backoff::new(&p);
        let delays: Vec<Duration> = (0..200).map(|_| b.next_delay(&rng)).collect();
        assert!(
            delays
                .iter()
                .all(|d| *d >= p.initial_delay && *d <= p.max_delay)
        );
        // Growth: within a few steps the delays leave the first interval behind.
        assert!(
            delays.iter().any(|d| *d > Duration::from_millis(600)),
            "{delays:?}"
        );
        assert!(
            delays.contains(&p.max_delay)
                || delays.iter().any(|d| *d > Duration::from_millis(1500))
        );
        // The first delay is within initial ..= 3 × initial.
        assert!(delays[0] <= Duration::from_millis(300));
        // Reproducible from the seed, different from another seed.
        let again: Vec<Duration> = {
            let rng = SplitMix64::new(7);
            let mut b = Backoff::new(&p);
            (0..200).map(|_| b.next_delay(&rng)).collect()
        };
        assert_eq!(delays, again);
        let other: Vec<Duration> = {
            let rng = SplitMix64::new(8);
            let mut b = Backoff::new(&p);
            (0..200).map(|_| b.next_delay(&rng)).collect()
        };
        assert_ne!(delays, other);
    }

    #[test]
    fn backoff_with_equal_bounds_is_constant_and_zero_is_zero() {
        let rng = SplitMix64::new(1);
        let fixed = RetryParams {
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(10),
            ..RetryParams::default()
        };
        let mut b = Backoff::new(&fixed);
        assert!((0..10).all(|_| b.next_delay(&rng) == Duration::from_millis(10)));
        let zero = RetryParams {
            initial_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
            ..RetryParams::default()
        };
        let mut b = Backoff::new(&zero);
        assert!((0..10).all(|_| b.next_delay(&rng).is_zero()));
    }

    #[test]
    fn splitmix_is_uniform_enough() {
        let rng = SplitMix64::new(42);
        let n = 100_000;
        let below_quarter = (0..n).filter(|_| rng.next_f64() < 0.25).count();
        assert!((24_000..26_000).contains(&below_quarter), "{below_quarter}");
        assert_ne!(SplitMix64::entropy_seed(), SplitMix64::entropy_seed());
    }

    // ----- a scripted device -----

    /// Fails the first `failures` calls (of any operation except `info`) with `make_error`,
    /// then behaves like the memory image inside. Counts every call.
    #[derive(Debug)]
    struct Flaky {
        inner: MemoryImage,
        failures: AtomicU32,
        calls: AtomicU32,
        make_error: fn() -> BlockError,
    }

    fn transient() -> BlockError {
        BlockError::io(
            "test",
            0,
            io::Error::new(io::ErrorKind::TimedOut, "scripted timeout"),
        )
    }

    fn permanent() -> BlockError {
        BlockError::io("test", 0, io::Error::other("scripted EIO"))
    }

    impl Flaky {
        fn new(failures: u32, make_error: fn() -> BlockError) -> Arc<Self> {
            Arc::new(Flaky {
                inner: MemoryImage::new(1 << 20, false),
                failures: AtomicU32::new(failures),
                calls: AtomicU32::new(0),
                make_error,
            })
        }

        fn calls(&self) -> u32 {
            self.calls.load(Ordering::SeqCst)
        }

        fn step(&self) -> Result<(), BlockError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let failed = self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |f| f.checked_sub(1))
                .is_ok();
            if failed {
                Err((self.make_error)())
            } else {
                Ok(())
            }
        }
    }

    #[async_trait]
    impl BlockDevice for Flaky {
        fn info(&self) -> &DeviceInfo {
            self.inner.info()
        }
        async fn read(&self, offset: u64, len: u32) -> Result<ReadData, BlockError> {
            self.step()?;
            self.inner.read(offset, len).await
        }
        async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
            self.step()?;
            self.inner.write(offset, data, fua).await
        }
        async fn flush(&self) -> Result<(), BlockError> {
            self.step()?;
            self.inner.flush().await
        }
        async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
            self.step()?;
            self.inner.trim(offset, len, fua).await
        }
        async fn write_zeroes(
            &self,
            offset: u64,
            len: u64,
            flags: ZeroFlags,
        ) -> Result<(), BlockError> {
            self.step()?;
            self.inner.write_zeroes(offset, len, flags).await
        }
        async fn cache(&self, offset: u64, len: u64) -> Result<(), BlockError> {
            self.step()?;
            self.inner.cache(offset, len).await
        }
        async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BlockError> {
            self.step()?;
            self.inner.block_status(offset, len).await
        }
        async fn close(&self) -> Result<(), BlockError> {
            self.step()?;
            self.inner.close().await
        }
    }

    fn layer(inner: Arc<dyn BlockDevice>, params: RetryParams) -> (RetryLayer, Arc<VirtualClock>) {
        let clock = Arc::new(VirtualClock::default());
        (
            RetryLayer::with_clock(inner, params, clock.clone(), 1),
            clock,
        )
    }

    // ----- the mechanism -----

    #[tokio::test]
    async fn recovers_from_attempts_minus_one_transient_failures() {
        let flaky = Flaky::new(4, transient);
        let (r, clock) = layer(flaky.clone(), RetryParams::default());
        r.write(4096, Bytes::from_static(b"hello"), false)
            .await
            .unwrap();
        assert_eq!(flaky.calls(), 5);
        // Four delays, each at least the initial delay and at most the maximum.
        assert!(clock.now() >= 4 * DEFAULT_INITIAL_DELAY && clock.now() <= 4 * DEFAULT_MAX_DELAY);
        let got = r.read(4096, 5).await.unwrap().to_bytes();
        assert_eq!(&got[..], b"hello");
    }

    #[tokio::test]
    async fn gives_up_after_attempts_with_the_last_error() {
        let flaky = Flaky::new(5, transient);
        let (r, _) = layer(flaky.clone(), RetryParams::default());
        let e = r.read(0, 512).await.unwrap_err();
        assert!(e.is_transient());
        assert_eq!(e.nbd_errno(), errno::EIO);
        assert!(e.to_string().contains("scripted timeout"), "{e}");
        assert_eq!(flaky.calls(), 5);
        // The device has recovered: the next call succeeds at once.
        r.read(0, 512).await.unwrap();
        assert_eq!(flaky.calls(), 6);
    }

    #[tokio::test]
    async fn one_attempt_means_no_retry() {
        let flaky = Flaky::new(1, transient);
        let (r, clock) = layer(
            flaky.clone(),
            RetryParams {
                attempts: 1,
                ..RetryParams::default()
            },
        );
        assert!(r.flush().await.is_err());
        assert_eq!(flaky.calls(), 1);
        assert_eq!(clock.now(), Duration::ZERO);
    }

    #[tokio::test]
    async fn never_retries_a_permanent_error() {
        let flaky = Flaky::new(100, permanent);
        let (r, clock) = layer(flaky.clone(), RetryParams::default());
        let e = r
            .write(0, Bytes::from_static(b"x"), true)
            .await
            .unwrap_err();
        assert!(!e.is_transient());
        assert!(e.to_string().contains("scripted EIO"), "{e}");
        assert_eq!(flaky.calls(), 1);
        assert_eq!(clock.now(), Duration::ZERO);

        // Nor the other permanent kinds.
        #[derive(Debug)]
        struct Refuses(MemoryImage, AtomicU32);
        #[async_trait]
        impl BlockDevice for Refuses {
            fn info(&self) -> &DeviceInfo {
                self.0.info()
            }
            async fn read(&self, _: u64, _: u32) -> Result<ReadData, BlockError> {
                unreachable!()
            }
            async fn write(&self, _: u64, _: Bytes, _: bool) -> Result<(), BlockError> {
                self.1.fetch_add(1, Ordering::SeqCst);
                Err(BlockError::ReadOnly)
            }
            async fn flush(&self) -> Result<(), BlockError> {
                unreachable!()
            }
            async fn trim(&self, _: u64, _: u64, _: bool) -> Result<(), BlockError> {
                self.1.fetch_add(1, Ordering::SeqCst);
                Err(BlockError::NoSpace("full".into()))
            }
            async fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> Result<(), BlockError> {
                self.1.fetch_add(1, Ordering::SeqCst);
                Err(BlockError::FastZeroUnsupported)
            }
            async fn cache(&self, _: u64, _: u64) -> Result<(), BlockError> {
                unreachable!()
            }
            async fn block_status(&self, _: u64, _: u64) -> Result<Vec<Extent>, BlockError> {
                unreachable!()
            }
            async fn close(&self) -> Result<(), BlockError> {
                unreachable!()
            }
        }
        let refuses = Arc::new(Refuses(MemoryImage::new(4096, false), AtomicU32::new(0)));
        let (r, _) = layer(refuses.clone(), RetryParams::default());
        assert!(matches!(
            r.write(0, Bytes::from_static(b"x"), false).await,
            Err(BlockError::ReadOnly)
        ));
        assert!(matches!(
            r.trim(0, 1, false).await,
            Err(BlockError::NoSpace(_))
        ));
        let fast = ZeroFlags {
            fast: true,
            ..ZeroFlags::default()
        };
        assert!(matches!(
            r.write_zeroes(0, 1, fast).await,
            Err(BlockError::FastZeroUnsupported)
        ));
        assert_eq!(refuses.1.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn respects_the_budget() {
        let flaky = Flaky::new(u32::MAX, transient);
        let params = RetryParams {
            attempts: 1000,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            budget: Duration::from_secs(5),
        };
        let (r, clock) = layer(flaky.clone(), params);
        assert!(r.read(0, 1).await.unwrap_err().is_transient());
        let spent = clock.now();
        assert!(spent <= Duration::from_secs(5), "{spent:?}");
        // It did use the budget: the next delay (at most 2 s) would have passed it.
        assert!(spent > Duration::from_secs(3), "{spent:?}");
        let calls = flaky.calls();
        assert!(calls > 3 && calls < 100, "{calls}");
    }

    #[tokio::test]
    async fn every_operation_but_cache_is_retried() {
        let flaky = Flaky::new(0, transient);
        let (r, _) = layer(flaky.clone(), RetryParams::default());
        let mut expected = 0;
        macro_rules! twice {
            ($call:expr) => {{
                flaky.failures.store(1, Ordering::SeqCst);
                $call.await.unwrap();
                expected += 2;
                assert_eq!(flaky.calls(), expected, "{}", stringify!($call));
            }};
        }
        twice!(r.read(0, 10));
        twice!(r.write(0, Bytes::from_static(b"abc"), false));
        twice!(r.flush());
        twice!(r.trim(0, 10, false));
        twice!(r.write_zeroes(0, 10, ZeroFlags::default()));
        twice!(r.block_status(0, 10));
        twice!(r.close());
        flaky.failures.store(1, Ordering::SeqCst);
        assert!(r.cache(0, 10).await.is_err());
        assert_eq!(flaky.calls(), expected + 1);
        assert_eq!(r.info(), flaky.info());
    }

    // ----- retry over fault over memory, against a model -----

    /// A tiny deterministic generator for workloads.
    struct Gen(u64);
    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
            mix64(self.0)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    async fn check_region(dev: &dyn BlockDevice, model: &[u8], base: u64) {
        let got = dev.read(base, model.len() as u32).await.unwrap().to_bytes();
        assert!(
            got[..] == model[..],
            "region at {base} differs from the model"
        );
    }

    /// Random reads, writes, trims, zeroes, flushes and block-status calls within one region,
    /// checked against a byte vector.
    async fn workload(dev: Arc<dyn BlockDevice>, base: u64, region: u64, seed: u64, ops: usize) {
        let mut g = Gen(seed);
        let mut model = vec![0u8; region as usize];
        for _ in 0..ops {
            let off = g.below(region);
            let len = 1 + g.below((region - off).min(20_000));
            let (o, l) = (off as usize, len as usize);
            match g.below(7) {
                0 | 1 => {
                    let fill = (g.next() | 1) as u8;
                    let data: Vec<u8> = (0..l).map(|i| fill.wrapping_add(i as u8)).collect();
                    dev.write(base + off, Bytes::from(data.clone()), g.below(2) == 0)
                        .await
                        .unwrap();
                    model[o..o + l].copy_from_slice(&data);
                }
                2 => {
                    let got = dev.read(base + off, len as u32).await.unwrap().to_bytes();
                    assert!(
                        got[..] == model[o..o + l],
                        "read at {} of {len}",
                        base + off
                    );
                }
                3 => {
                    dev.trim(base + off, len, false).await.unwrap();
                    model[o..o + l].fill(0);
                }
                4 => {
                    dev.write_zeroes(base + off, len, ZeroFlags::default())
                        .await
                        .unwrap();
                    model[o..o + l].fill(0);
                }
                5 => {
                    let extents = dev.block_status(base + off, len).await.unwrap();
                    let total: u64 = extents.iter().map(|e| e.length).sum();
                    assert!(!extents.is_empty() && total <= len);
                    let mut pos = o;
                    for e in extents {
                        let end = pos + e.length as usize;
                        if e.flags & crate::block::STATE_ZERO != 0 {
                            assert!(model[pos..end].iter().all(|&b| b == 0));
                        }
                        pos = end;
                    }
                }
                _ => dev.flush().await.unwrap(),
            }
        }
        check_region(&*dev, &model, base).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn retry_over_transient_faults_matches_a_plain_model() {
        const REGION: u64 = 256 * 1024;
        const TASKS: u64 = 8;
        let memory = Arc::new(MemoryImage::new(REGION * TASKS, false));
        let clock = Arc::new(VirtualClock::default());
        let fault = FaultLayer::with_clock(
            memory.clone(),
            FaultParams {
                error_rate: 0.3,
                error: FaultKind::Transient,
                seed: Some(99),
                ..FaultParams::default()
            },
            clock.clone(),
        );
        let fault = Arc::new(fault);
        let retry: Arc<dyn BlockDevice> = Arc::new(RetryLayer::with_clock(
            fault.clone(),
            RetryParams {
                // 0.3^40: never, in practice.
                attempts: 40,
                initial_delay: Duration::from_millis(1),
                max_delay: Duration::from_millis(10),
                budget: Duration::from_secs(3600),
            },
            clock,
            5,
        ));
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| tokio::spawn(workload(retry.clone(), t * REGION, REGION, 1000 + t, 300)))
            .collect();
        for t in futures::future::join_all(tasks).await {
            t.unwrap();
        }
        // Faults did happen, and the layers above the memory image agree with it.
        assert!(fault.injected() > 100, "{}", fault.injected());
        let direct = memory
            .read(0, (REGION * TASKS) as u32)
            .await
            .unwrap()
            .to_bytes();
        let through = retry
            .read(0, (REGION * TASKS) as u32)
            .await
            .unwrap()
            .to_bytes();
        assert!(direct == through);
    }

    #[tokio::test]
    async fn without_retry_transient_faults_do_surface() {
        // The control for the test above: the fault layer alone fails some operations.
        let memory = Arc::new(MemoryImage::new(1 << 20, false));
        let clock = Arc::new(VirtualClock::default());
        let fault = FaultLayer::with_clock(
            memory,
            FaultParams {
                error_rate: 0.3,
                seed: Some(99),
                ..FaultParams::default()
            },
            clock,
        );
        let mut failed = 0;
        for i in 0..100 {
            if fault.read(i * 512, 512).await.is_err() {
                failed += 1;
            }
        }
        assert!((10..60).contains(&failed), "{failed}");
    }

    #[tokio::test]
    async fn retry_never_hides_injected_permanent_faults() {
        let memory = Arc::new(MemoryImage::new(1 << 20, false));
        let clock = Arc::new(VirtualClock::default());
        let fault = Arc::new(FaultLayer::with_clock(
            memory,
            FaultParams {
                write_error_rate: Some(1.0),
                error: FaultKind::Eio,
                seed: Some(3),
                ..FaultParams::default()
            },
            clock.clone(),
        ));
        let r = RetryLayer::with_clock(fault.clone(), RetryParams::default(), clock.clone(), 1);
        let e = r
            .write(0, Bytes::from_static(b"x"), false)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("injected fault"), "{e}");
        assert_eq!(fault.injected(), 1);
        assert_eq!(clock.now(), Duration::ZERO);
        // Reads are not affected by the write rate.
        r.read(0, 1).await.unwrap();
    }

    #[tokio::test]
    async fn retry_state_is_shared_safely() {
        // Many concurrent operations through one layer, each failing a few times.
        let flaky = Flaky::new(50, transient);
        let (r, _) = layer(
            flaky.clone(),
            RetryParams {
                attempts: 100,
                budget: Duration::from_secs(3600),
                ..RetryParams::default()
            },
        );
        let r = Arc::new(r);
        let seen = Arc::new(Mutex::new(0));
        let tasks: Vec<_> = (0..20u64)
            .map(|i| {
                let r = r.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    r.write(i * 100, Bytes::from(vec![i as u8; 100]), false)
                        .await
                        .unwrap();
                    *seen.lock().unwrap() += 1;
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*seen.lock().unwrap(), 20);
        assert_eq!(flaky.calls(), 70);
    }
}
