//! `memory`: an object store in RAM, for tests and throw-away volumes.
//!
//! Objects are plain byte buffers in 64 independently locked maps (a key lives in the map its
//! hash picks), so calls on different keys rarely wait for each other and never for long: a
//! lock is held only while one object is looked up and copied. Objects are mutable in place,
//! so [`ObjectStore::put_range`] is supported. Nothing is ever durable; `sync` and `flush`
//! have nothing to do.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;

use super::file::{check_prefix, check_range};
use super::{ObjectStore, StoreError, check_key};

const SHARDS: usize = 64;

type Shard = HashMap<String, Vec<u8>>;

/// An object store in RAM.
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("objects", &self.len())
            .finish_non_exhaustive()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        // The modulo keeps the index below SHARDS, so the cast cannot truncate.
        let i = (self.hasher.hash_one(key) % SHARDS as u64) as usize;
        lock(&self.shards[i])
    }

    /// Number of objects held.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// True if the store holds no object.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A poisoned lock means a panic while copying bytes; the map itself is still sound.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `size` as a buffer length, or the error a too-large range gets.
fn buffer_len(key: &str, start: u64, end: u64, size: u64) -> Result<usize, StoreError> {
    usize::try_from(size).map_err(|_| StoreError::OutOfRange {
        key: key.to_owned(),
        start,
        end,
        size,
    })
}

#[async_trait]
impl ObjectStore for MemoryStore {
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Option<Bytes>, StoreError> {
        check_key(key)?;
        let shard = self.shard(key);
        let Some(obj) = shard.get(key) else {
            return Ok(None);
        };
        let Some(range) = range else {
            return Ok(Some(Bytes::copy_from_slice(obj)));
        };
        let (start, end) = check_range(key, &range, obj.len() as u64)?;
        Ok(Some(Bytes::copy_from_slice(&obj[start..end])))
    }

    async fn put(&self, key: &str, data: Bytes, _sync: bool) -> Result<(), StoreError> {
        check_key(key)?;
        // Converting outside the lock: this copies unless `data` is the only handle.
        let data = Vec::from(data);
        self.shard(key).insert(key.to_owned(), data);
        Ok(())
    }

    fn supports_put_range(&self) -> bool {
        true
    }

    async fn put_range(
        &self,
        key: &str,
        offset: u64,
        data: Bytes,
        size: u64,
        _sync: bool,
    ) -> Result<(), StoreError> {
        check_key(key)?;
        let end = offset.checked_add(data.len() as u64);
        let end = match end {
            Some(end) if end <= size => end,
            _ => {
                return Err(StoreError::OutOfRange {
                    key: key.to_owned(),
                    start: offset,
                    end: end.unwrap_or(u64::MAX),
                    size,
                });
            }
        };
        let len = buffer_len(key, offset, end, size)?;
        // Both fit: they are at most `size`, which fits in usize.
        let (start, end) = (offset as usize, end as usize);
        let mut shard = self.shard(key);
        let obj = shard.entry(key.to_owned()).or_default();
        if obj.len() < len {
            obj.resize(len, 0);
        }
        obj[start..end].copy_from_slice(&data);
        Ok(())
    }

    async fn delete(&self, key: &str, _sync: bool) -> Result<(), StoreError> {
        check_key(key)?;
        let removed = self.shard(key).remove(key);
        // Free a large buffer outside the lock.
        drop(removed);
        Ok(())
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        check_key(key)?;
        Ok(self.shard(key).get(key).map(|o| o.len() as u64))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        check_prefix(prefix)?;
        let mut keys = Vec::new();
        for shard in self.shards.iter() {
            keys.extend(
                lock(shard)
                    .keys()
                    .filter(|k| k.starts_with(prefix))
                    .cloned(),
            );
        }
        Ok(keys)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn conformance() {
        crate::store::conformance::run(Arc::new(MemoryStore::new())).await;
    }

    #[tokio::test]
    async fn put_range_never_shrinks_a_longer_object() {
        let s = MemoryStore::new();
        s.put("k", Bytes::from_static(b"0123456789"), false)
            .await
            .unwrap();
        s.put_range("k", 2, Bytes::from_static(b"ab"), 4, false)
            .await
            .unwrap();
        let got = s.get("k", None).await.unwrap().unwrap();
        assert_eq!(&got[..], b"01ab456789");
        assert_eq!(s.len(), 1);
    }
}
