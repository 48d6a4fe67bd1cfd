//! Object stores: key-addressed storage under a layout (`memory`, `file`, later `s3`), and the
//! errors they return.
//!
//! A store holds objects (byte strings) under keys. Keys are printable ASCII without `/` at
//! the start, `..` components or control characters ([`check_key`]). A store is used by one
//! pipeline at a time; every method may be called concurrently for different keys.
//!
//! Durability: with `sync = false`, a completed `put`, `put_range` or `delete` is visible to
//! every later call but may be lost in a crash until the next `flush`. With `sync = true` it is
//! durable when it returns. Wrappers hold the next store as `Arc<dyn ObjectStore>` and must
//! implement every method.

#[cfg(test)]
mod conformance;
pub mod fault;
pub mod file;
pub mod memory;
pub mod retry;
pub mod s3;

use std::fmt;
use std::io;
use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A local I/O error.
    #[error("{op} {key}: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The object.
        key: String,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// A remote store answered with an error or could not be reached.
    #[error("{op} {key}: {message}")]
    Remote {
        /// The operation.
        op: &'static str,
        /// The object.
        key: String,
        /// What happened (never contains credentials).
        message: String,
        /// Trying again may succeed (connection errors, timeouts, 5xx, throttling).
        transient: bool,
    },
    /// The key is not acceptable.
    #[error("invalid object key {0:?}")]
    BadKey(String),
    /// A range read asked for bytes beyond the end of the object.
    #[error("{key}: range {start}..{end} is beyond the object's {size} bytes")]
    OutOfRange {
        /// The object.
        key: String,
        /// Requested start.
        start: u64,
        /// Requested end.
        end: u64,
        /// The object's size.
        size: u64,
    },
}

impl StoreError {
    /// Wraps an I/O error.
    pub fn io(op: &'static str, key: &str, source: io::Error) -> Self {
        StoreError::Io {
            op,
            key: key.to_owned(),
            source,
        }
    }

    /// True if trying again may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Remote { transient, .. } => *transient,
            StoreError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
            _ => false,
        }
    }

    /// True if the failure means the storage is full.
    pub fn is_no_space(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::StorageFull
                    | io::ErrorKind::QuotaExceeded
                    | io::ErrorKind::FileTooLarge
            ),
            _ => false,
        }
    }
}

/// Checks that a key is safe on every store (no path escapes on `file`).
pub fn check_key(key: &str) -> Result<(), StoreError> {
    let ok = !key.is_empty()
        && key.len() <= 1024
        && !key.starts_with('/')
        && !key.ends_with('/')
        && key
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && key.bytes().all(|b| (0x20..0x7f).contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadKey(key.to_owned()))
    }
}

/// Key-addressed storage. See the module documentation for keys and durability.
#[async_trait]
pub trait ObjectStore: Send + Sync + fmt::Debug + 'static {
    /// Reads the object, or `range` of it. `Ok(None)` if it does not exist. A range reaching
    /// past the end of the object is [`StoreError::OutOfRange`].
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Option<Bytes>, StoreError>;

    /// Creates or replaces the whole object.
    async fn put(&self, key: &str, data: Bytes, sync: bool) -> Result<(), StoreError>;

    /// True if [`ObjectStore::put_range`] is supported (local stores); otherwise layouts
    /// read, modify and write whole objects.
    fn supports_put_range(&self) -> bool;

    /// Writes `data` at `offset` inside the object, creating it as `size` zero bytes first if it
    /// does not exist. `offset + data.len()` must not exceed `size`. Only called when
    /// [`ObjectStore::supports_put_range`] is true.
    async fn put_range(
        &self,
        key: &str,
        offset: u64,
        data: Bytes,
        size: u64,
        sync: bool,
    ) -> Result<(), StoreError>;

    /// Deletes the object; deleting a missing object succeeds.
    async fn delete(&self, key: &str, sync: bool) -> Result<(), StoreError>;

    /// The object's size, or `None` if it does not exist.
    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError>;

    /// Every key starting with `prefix`, in no particular order.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;

    /// Makes every completed `put`, `put_range` and `delete` durable.
    async fn flush(&self) -> Result<(), StoreError>;
}
