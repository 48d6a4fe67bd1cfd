//! `retry` as a store wrapper: tries transient store failures again, one request at a time.
//!
//! Between a layout and a remote store, this wrapper sees each request on its own (one chunk's
//! `get` or `put`), so a throttled or reset request is repeated without redoing the whole block
//! operation above. Parameters, backoff, budget and logging are those of the block layer
//! ([`crate::block::retry`]): only errors whose [`StoreError::is_transient`] is true are
//! retried, and the last error is returned unchanged when giving up.
//!
//! Every store operation is safe to repeat: `get`, `head` and `list` change nothing; `put`
//! replaces the whole object, `put_range` writes the same bytes at the same place and `delete`
//! of a missing object succeeds, so doing any of them twice equals doing it once; `flush` only
//! makes completed calls durable. `supports_put_range` is a capability, passed through.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ObjectStore, StoreError};
use crate::block::retry::{Clock, Retrier, RetryParams, Retryable, Target};

impl Retryable for StoreError {
    fn is_transient(&self) -> bool {
        StoreError::is_transient(self)
    }
}

/// A store wrapper that retries transient failures of the store below.
#[derive(Debug)]
pub struct RetryStore {
    inner: Arc<dyn ObjectStore>,
    retrier: Retrier,
}

impl RetryStore {
    /// Wraps `inner`. Validate `params` first ([`RetryParams::validate`]).
    pub fn new(inner: Arc<dyn ObjectStore>, params: RetryParams) -> Self {
        RetryStore {
            inner,
            retrier: Retrier::new(params),
        }
    }

    /// Wraps `inner` with a given clock and jitter seed (tests, simulations).
    pub fn with_clock(
        inner: Arc<dyn ObjectStore>,
        params: RetryParams,
        clock: Arc<dyn Clock>,
        seed: u64,
    ) -> Self {
        RetryStore {
            inner,
            retrier: Retrier::with_clock(params, clock, seed),
        }
    }

    async fn retry<T, F, Fut>(
        &self,
        op: &'static str,
        target: Target<'_>,
        f: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        self.retrier.run("store", op, target, f).await
    }
}

#[async_trait]
impl ObjectStore for RetryStore {
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Option<Bytes>, StoreError> {
        self.retry("get", Target::Key(key), || {
            self.inner.get(key, range.clone())
        })
        .await
    }

    async fn put(&self, key: &str, data: Bytes, sync: bool) -> Result<(), StoreError> {
        // `Bytes` clones share the buffer: each attempt costs a reference count.
        self.retry("put", Target::Key(key), || {
            self.inner.put(key, data.clone(), sync)
        })
        .await
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
        self.retry("put_range", Target::Key(key), || {
            self.inner.put_range(key, offset, data.clone(), size, sync)
        })
        .await
    }

    async fn delete(&self, key: &str, sync: bool) -> Result<(), StoreError> {
        self.retry("delete", Target::Key(key), || self.inner.delete(key, sync))
            .await
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.retry("head", Target::Key(key), || self.inner.head(key))
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.retry("list", Target::Key(prefix), || self.inner.list(prefix))
            .await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.retry("flush", Target::Whole, || self.inner.flush())
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::block::fault::{FaultKind, FaultParams};
    use crate::block::retry::VirtualClock;
    use crate::store::fault::FaultStore;
    use crate::store::memory::MemoryStore;

    /// Fails the first `failures` calls with `make_error`, then behaves like a memory store.
    #[derive(Debug)]
    struct Flaky {
        inner: MemoryStore,
        failures: AtomicU32,
        calls: AtomicU32,
        make_error: fn(&'static str, &str) -> StoreError,
    }

    fn throttled(op: &'static str, key: &str) -> StoreError {
        StoreError::Remote {
            op,
            key: key.to_owned(),
            message: "503 slow down".to_owned(),
            transient: true,
        }
    }

    fn denied(op: &'static str, key: &str) -> StoreError {
        StoreError::Remote {
            op,
            key: key.to_owned(),
            message: "403 access denied".to_owned(),
            transient: false,
        }
    }

    impl Flaky {
        fn new(failures: u32, make_error: fn(&'static str, &str) -> StoreError) -> Arc<Self> {
            Arc::new(Flaky {
                inner: MemoryStore::new(),
                failures: AtomicU32::new(failures),
                calls: AtomicU32::new(0),
                make_error,
            })
        }

        fn calls(&self) -> u32 {
            self.calls.load(Ordering::SeqCst)
        }

        fn step(&self, op: &'static str, key: &str) -> Result<(), StoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let failed = self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |f| f.checked_sub(1))
                .is_ok();
            if failed {
                Err((self.make_error)(op, key))
            } else {
                Ok(())
            }
        }
    }

    #[async_trait]
    impl ObjectStore for Flaky {
        async fn get(
            &self,
            key: &str,
            range: Option<Range<u64>>,
        ) -> Result<Option<Bytes>, StoreError> {
            self.step("get", key)?;
            self.inner.get(key, range).await
        }
        async fn put(&self, key: &str, data: Bytes, sync: bool) -> Result<(), StoreError> {
            self.step("put", key)?;
            self.inner.put(key, data, sync).await
        }
        fn supports_put_range(&self) -> bool {
            false
        }
        async fn put_range(
            &self,
            key: &str,
            offset: u64,
            data: Bytes,
            size: u64,
            sync: bool,
        ) -> Result<(), StoreError> {
            self.step("put_range", key)?;
            self.inner.put_range(key, offset, data, size, sync).await
        }
        async fn delete(&self, key: &str, sync: bool) -> Result<(), StoreError> {
            self.step("delete", key)?;
            self.inner.delete(key, sync).await
        }
        async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
            self.step("head", key)?;
            self.inner.head(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
            self.step("list", prefix)?;
            self.inner.list(prefix).await
        }
        async fn flush(&self) -> Result<(), StoreError> {
            self.step("flush", "")?;
            self.inner.flush().await
        }
    }

    fn wrap(inner: Arc<dyn ObjectStore>, params: RetryParams) -> (RetryStore, Arc<VirtualClock>) {
        let clock = Arc::new(VirtualClock::default());
        (
            RetryStore::with_clock(inner, params, clock.clone(), 1),
            clock,
        )
    }

    #[tokio::test]
    async fn recovers_from_attempts_minus_one_transient_failures() {
        let flaky = Flaky::new(4, throttled);
        let (s, clock) = wrap(flaky.clone(), RetryParams::default());
        s.put("a.0.chunk", Bytes::from_static(b"hello"), true)
            .await
            .unwrap();
        assert_eq!(flaky.calls(), 5);
        assert!(clock.now() >= Duration::from_millis(400));
        let got = s.get("a.0.chunk", Some(1..4)).await.unwrap().unwrap();
        assert_eq!(&got[..], b"ell");
    }

    #[tokio::test]
    async fn gives_up_after_attempts_with_the_last_error() {
        let flaky = Flaky::new(5, throttled);
        let (s, _) = wrap(flaky.clone(), RetryParams::default());
        let e = s.get("k", None).await.unwrap_err();
        assert!(e.is_transient());
        assert_eq!(e.to_string(), "get k: 503 slow down");
        assert_eq!(flaky.calls(), 5);
    }

    #[tokio::test]
    async fn never_retries_a_permanent_error() {
        let flaky = Flaky::new(10, denied);
        let (s, clock) = wrap(flaky.clone(), RetryParams::default());
        assert!(!s.delete("k", false).await.unwrap_err().is_transient());
        assert_eq!(flaky.calls(), 1);
        assert_eq!(clock.now(), Duration::ZERO);

        // Errors of the store's own making are permanent too.
        let (s, _) = wrap(Arc::new(MemoryStore::new()), RetryParams::default());
        assert!(matches!(
            s.get("../etc", None).await,
            Err(StoreError::BadKey(_))
        ));
        s.put("k", Bytes::from_static(b"ab"), false).await.unwrap();
        assert!(matches!(
            s.get("k", Some(0..5)).await,
            Err(StoreError::OutOfRange { .. })
        ));
    }

    #[tokio::test]
    async fn local_timeouts_are_retried() {
        fn timed_out(op: &'static str, key: &str) -> StoreError {
            StoreError::io(
                op,
                key,
                io::Error::new(io::ErrorKind::TimedOut, "slow disk"),
            )
        }
        let flaky = Flaky::new(2, timed_out);
        let (s, _) = wrap(flaky.clone(), RetryParams::default());
        assert_eq!(s.head("k").await.unwrap(), None);
        assert_eq!(flaky.calls(), 3);
    }

    #[tokio::test]
    async fn respects_the_budget() {
        let flaky = Flaky::new(u32::MAX, throttled);
        let params = RetryParams {
            attempts: 1000,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            budget: Duration::from_secs(5),
        };
        let (s, clock) = wrap(flaky.clone(), params);
        assert!(s.list("a.").await.unwrap_err().is_transient());
        assert!(clock.now() <= Duration::from_secs(5), "{:?}", clock.now());
        assert!(clock.now() > Duration::from_secs(3), "{:?}", clock.now());
        assert!(flaky.calls() < 100);
    }

    #[tokio::test]
    async fn every_operation_is_retried() {
        let flaky = Flaky::new(0, throttled);
        let (s, _) = wrap(flaky.clone(), RetryParams::default());
        let mut expected = 0;
        macro_rules! twice {
            ($call:expr) => {{
                flaky.failures.store(1, Ordering::SeqCst);
                $call.await.unwrap();
                expected += 2;
                assert_eq!(flaky.calls(), expected, "{}", stringify!($call));
            }};
        }
        twice!(s.put("k", Bytes::from_static(b"abcd"), false));
        twice!(s.put_range("k", 1, Bytes::from_static(b"X"), 4, false));
        twice!(s.get("k", None));
        twice!(s.head("k"));
        twice!(s.list(""));
        twice!(s.flush());
        twice!(s.delete("k", true));
        // A capability, not a call: asked of the store below, never retried or counted.
        assert!(!s.supports_put_range());
        assert!(
            RetryStore::new(Arc::new(MemoryStore::new()), RetryParams::default())
                .supports_put_range()
        );
        assert_eq!(flaky.calls(), expected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn conformance_over_memory() {
        let (s, _) = wrap(Arc::new(MemoryStore::new()), RetryParams::default());
        crate::store::conformance::run(Arc::new(s)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn conformance_over_transient_faults() {
        // With retry above, a store that fails 30% of its requests transiently still behaves.
        let clock = Arc::new(VirtualClock::default());
        let fault = FaultStore::with_clock(
            Arc::new(MemoryStore::new()),
            FaultParams {
                error_rate: 0.3,
                seed: Some(23),
                ..FaultParams::default()
            },
            clock.clone(),
        );
        let params = RetryParams {
            attempts: 40,
            budget: Duration::from_secs(24 * 3600),
            ..RetryParams::default()
        };
        let s = RetryStore::with_clock(Arc::new(fault), params, clock, 9);
        crate::store::conformance::run(Arc::new(s)).await;
    }

    /// Random puts, partial puts, gets, deletes, heads and lists through retry over fault over
    /// memory, against a map.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn retry_over_transient_faults_matches_a_plain_model() {
        let memory = Arc::new(MemoryStore::new());
        let clock = Arc::new(VirtualClock::default());
        let fault = Arc::new(FaultStore::with_clock(
            memory.clone(),
            FaultParams {
                error_rate: 0.3,
                error: FaultKind::Transient,
                seed: Some(17),
                ..FaultParams::default()
            },
            clock.clone(),
        ));
        let retry: Arc<dyn ObjectStore> = Arc::new(RetryStore::with_clock(
            fault.clone(),
            RetryParams {
                attempts: 40,
                initial_delay: Duration::from_millis(1),
                max_delay: Duration::from_millis(10),
                budget: Duration::from_secs(3600),
            },
            clock,
            3,
        ));
        let tasks: Vec<_> = (0..6u64)
            .map(|t| {
                let store = retry.clone();
                tokio::spawn(async move {
                    let g = crate::block::retry::SplitMix64::new(t);
                    let mut model: HashMap<String, Vec<u8>> = HashMap::new();
                    let prefix = format!("t{t}.");
                    for i in 0..300u64 {
                        let key = format!("{prefix}{}", g.next_u64() % 8);
                        match g.next_u64() % 6 {
                            0 => {
                                let data = vec![(i % 251) as u8; (g.next_u64() % 300) as usize];
                                store
                                    .put(&key, Bytes::from(data.clone()), false)
                                    .await
                                    .unwrap();
                                model.insert(key, data);
                            }
                            1 => {
                                let size = 256u64;
                                let off = g.next_u64() % 200;
                                let data = vec![(i % 13) as u8 + 1; 50];
                                store
                                    .put_range(&key, off, Bytes::from(data.clone()), size, false)
                                    .await
                                    .unwrap();
                                let obj = model.entry(key).or_insert_with(|| vec![0; 256]);
                                if obj.len() < 256 {
                                    obj.resize(256, 0);
                                }
                                obj[off as usize..off as usize + 50].copy_from_slice(&data);
                            }
                            2 => {
                                let got = store.get(&key, None).await.unwrap();
                                assert_eq!(got.map(|b| b.to_vec()), model.get(&key).cloned());
                            }
                            3 => {
                                store.delete(&key, false).await.unwrap();
                                model.remove(&key);
                            }
                            4 => {
                                let got = store.head(&key).await.unwrap();
                                assert_eq!(got, model.get(&key).map(|o| o.len() as u64));
                            }
                            _ => {
                                let mut got = store.list(&prefix).await.unwrap();
                                got.sort();
                                let mut want: Vec<String> = model.keys().cloned().collect();
                                want.sort();
                                assert_eq!(got, want);
                            }
                        }
                    }
                    store.flush().await.unwrap();
                    model
                })
            })
            .collect();
        let mut all = HashMap::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        assert!(fault.injected() > 100, "{}", fault.injected());
        assert_eq!(memory.len(), all.len());
        for (k, v) in all {
            assert_eq!(memory.get(&k, None).await.unwrap().unwrap().to_vec(), v);
        }
    }
}
