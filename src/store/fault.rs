//! `fault` as a store wrapper: injects errors and latency into store requests, one at a time.
//!
//! The parameters are the block layer's ([`FaultParams`], see [`crate::block::fault`]), with
//! store operations mapped onto its kinds: `get`, `head` and `list` are reads; `put` and
//! `put_range` are writes; `delete` (what a layout does for a trim or zero of a whole chunk)
//! uses the trim rate; `flush` the flush rate. `zero_error_rate`, `block_status_error_rate` and
//! `cache_error_rate` have no store operation and are refused by
//! [`FaultParams::validate_for_store`]. `supports_put_range` is a capability, passed through.
//!
//! Injected errors never reach the store below and say "injected fault": `transient` is a
//! [`StoreError::Remote`] with `transient: true` (like a throttled S3 request), `eio` a
//! permanent [`StoreError::Io`], and `enospc` an I/O error of kind `StorageFull`.

use std::io;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ObjectStore, StoreError};
use crate::block::fault::{FaultKind, FaultParams, Injector, OpKind};
use crate::block::retry::{Clock, TokioClock};

/// The store error for an injected fault in `op` on `key`.
pub fn store_error(kind: FaultKind, op: &'static str, key: &str) -> StoreError {
    match kind {
        FaultKind::Transient => StoreError::Remote {
            op,
            key: key.to_owned(),
            message: kind.message(),
            transient: true,
        },
        FaultKind::Eio => StoreError::io(op, key, io::Error::other(kind.message())),
        FaultKind::Enospc => StoreError::io(
            op,
            key,
            io::Error::new(io::ErrorKind::StorageFull, kind.message()),
        ),
    }
}

/// A store wrapper that injects errors and delays into the store below.
#[derive(Debug)]
pub struct FaultStore {
    inner: Arc<dyn ObjectStore>,
    injector: Injector,
}

impl FaultStore {
    /// Wraps `inner`. Validate `params` first ([`FaultParams::validate_for_store`]).
    pub fn new(inner: Arc<dyn ObjectStore>, params: FaultParams) -> Self {
        Self::with_clock(inner, params, Arc::new(TokioClock::new()))
    }

    /// Wraps `inner`, sleeping on `clock` (tests, simulations).
    pub fn with_clock(
        inner: Arc<dyn ObjectStore>,
        params: FaultParams,
        clock: Arc<dyn Clock>,
    ) -> Self {
        FaultStore {
            inner,
            injector: Injector::new(params, clock, "store"),
        }
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.injector.injected()
    }

    async fn check(&self, kind: OpKind, op: &'static str, key: &str) -> Result<(), StoreError> {
        match self.injector.before(kind).await {
            Some(fault) => Err(store_error(fault, op, key)),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl ObjectStore for FaultStore {
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Option<Bytes>, StoreError> {
        self.check(OpKind::Read, "get", key).await?;
        self.inner.get(key, range).await
    }

    async fn put(&self, key: &str, data: Bytes, sync: bool) -> Result<(), StoreError> {
        self.check(OpKind::Write, "put", key).await?;
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
        self.check(OpKind::Write, "put_range", key).await?;
        self.inner.put_range(key, offset, data, size, sync).await
    }

    async fn delete(&self, key: &str, sync: bool) -> Result<(), StoreError> {
        self.check(OpKind::Trim, "delete", key).await?;
        self.inner.delete(key, sync).await
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.check(OpKind::Read, "head", key).await?;
        self.inner.head(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.check(OpKind::Read, "list", prefix).await?;
        self.inner.list(prefix).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.check(OpKind::Flush, "flush", "").await?;
        self.inner.flush().await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::block::BlockError;
    use crate::block::errno;
    use crate::block::retry::VirtualClock;
    use crate::store::memory::MemoryStore;

    fn wrap(params: FaultParams) -> (FaultStore, Arc<MemoryStore>, Arc<VirtualClock>) {
        let memory = Arc::new(MemoryStore::new());
        let clock = Arc::new(VirtualClock::default());
        (
            FaultStore::with_clock(memory.clone(), params, clock.clone()),
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

    /// One call of each operation; true where it failed.
    async fn outcomes(s: &FaultStore) -> Vec<(&'static str, bool)> {
        vec![
            (
                "put",
                s.put("k", Bytes::from_static(b"abcd"), false)
                    .await
                    .is_err(),
            ),
            (
                "put_range",
                s.put_range("k", 0, Bytes::from_static(b"x"), 4, false)
                    .await
                    .is_err(),
            ),
            ("get", s.get("k", None).await.is_err()),
            ("head", s.head("k").await.is_err()),
            ("list", s.list("").await.is_err()),
            ("delete", s.delete("k", false).await.is_err()),
            ("flush", s.flush().await.is_err()),
        ]
    }

    #[tokio::test]
    async fn rate_one_always_fails_with_a_transient_remote_error() {
        let (s, memory, _) = wrap(always(FaultKind::Transient));
        for (op, failed) in outcomes(&s).await {
            assert!(failed, "{op}");
        }
        let e = s.get("a.0.chunk", None).await.unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::Remote {
                    transient: true,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.is_transient());
        assert_eq!(e.to_string(), "get a.0.chunk: injected fault (transient)");
        // Nothing reached the store.
        assert!(memory.is_empty());
        assert_eq!(s.injected(), 8);
    }

    #[tokio::test]
    async fn rate_one_with_eio_or_enospc_fails_permanently() {
        let (s, _, _) = wrap(always(FaultKind::Eio));
        let e = s
            .put("k", Bytes::from_static(b"x"), true)
            .await
            .unwrap_err();
        assert!(!e.is_transient() && !e.is_no_space());
        assert_eq!(e.to_string(), "put k: injected fault (eio)");
        assert_eq!(BlockError::from(e).nbd_errno(), errno::EIO);

        let (s, _, _) = wrap(always(FaultKind::Enospc));
        let e = s
            .put("k", Bytes::from_static(b"x"), true)
            .await
            .unwrap_err();
        assert!(!e.is_transient() && e.is_no_space());
        assert!(e.to_string().contains("injected fault (enospc)"), "{e}");
        assert_eq!(BlockError::from(e).nbd_errno(), errno::ENOSPC);
    }

    #[tokio::test]
    async fn rate_zero_never_fails() {
        let (s, _, _) = wrap(FaultParams::default());
        for _ in 0..100 {
            for (op, failed) in outcomes(&s).await {
                assert!(!failed, "{op}");
            }
        }
        assert_eq!(s.injected(), 0);
        assert!(s.supports_put_range());
    }

    #[tokio::test]
    async fn seeded_runs_are_reproducible() {
        async fn pattern(seed: u64) -> Vec<bool> {
            let (s, _, _) = wrap(FaultParams {
                error_rate: 0.4,
                seed: Some(seed),
                ..FaultParams::default()
            });
            let mut out = Vec::new();
            for _ in 0..100 {
                out.extend(outcomes(&s).await.into_iter().map(|(_, f)| f));
            }
            out
        }
        let a = pattern(11).await;
        assert_eq!(a, pattern(11).await);
        assert_ne!(a, pattern(12).await);
        let failed = a.iter().filter(|f| **f).count();
        assert!((200..360).contains(&failed), "{failed}");
    }

    #[tokio::test]
    async fn per_operation_rates_override_and_map_store_operations() {
        let (s, _, _) = wrap(FaultParams {
            error_rate: 1.0,
            read_error_rate: Some(0.0),
            seed: Some(2),
            ..FaultParams::default()
        });
        for (op, failed) in outcomes(&s).await {
            assert_eq!(failed, !matches!(op, "get" | "head" | "list"), "{op}");
        }
        let (s, _, _) = wrap(FaultParams {
            trim_error_rate: Some(1.0),
            flush_error_rate: Some(1.0),
            seed: Some(2),
            ..FaultParams::default()
        });
        for (op, failed) in outcomes(&s).await {
            assert_eq!(failed, matches!(op, "delete" | "flush"), "{op}");
        }
        let (s, _, _) = wrap(FaultParams {
            write_error_rate: Some(1.0),
            seed: Some(2),
            ..FaultParams::default()
        });
        for (op, failed) in outcomes(&s).await {
            assert_eq!(failed, matches!(op, "put" | "put_range"), "{op}");
        }
    }

    #[tokio::test]
    async fn delays_are_applied() {
        let (s, _, clock) = wrap(FaultParams {
            delay: Duration::from_millis(100),
            read_delay: Some(Duration::from_secs(1)),
            write_delay: Some(Duration::from_secs(2)),
            ..FaultParams::default()
        });
        s.put("k", Bytes::from_static(b"x"), false).await.unwrap();
        assert_eq!(clock.now(), Duration::from_secs(2));
        s.get("k", None).await.unwrap();
        s.head("k").await.unwrap();
        s.list("").await.unwrap();
        assert_eq!(clock.now(), Duration::from_secs(5));
        s.delete("k", false).await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(clock.now(), Duration::from_millis(5200));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn conformance_with_no_faults_but_delays() {
        let (s, _, _) = wrap(FaultParams {
            delay: Duration::from_millis(5),
            ..FaultParams::default()
        });
        crate::store::conformance::run(Arc::new(s)).await;
    }

    #[test]
    fn block_only_rates_are_refused_for_stores() {
        for p in [
            FaultParams {
                zero_error_rate: Some(0.1),
                ..FaultParams::default()
            },
            FaultParams {
                block_status_error_rate: Some(0.1),
                ..FaultParams::default()
            },
            FaultParams {
                cache_error_rate: Some(0.0),
                ..FaultParams::default()
            },
        ] {
            let e = p.validate_for_store().unwrap_err();
            assert!(e.contains("has no meaning for a store"), "{e}");
        }
        let p = FaultParams {
            write_error_rate: Some(2.0),
            ..FaultParams::default()
        };
        assert_eq!(
            p.validate_for_store().unwrap_err(),
            "write_error_rate must be between 0 and 1, got 2"
        );
        assert_eq!(FaultParams::default().validate_for_store(), Ok(()));
    }
}
