//! The block-device abstraction that every storage stage implements, and the errors it returns.
//!
//! A [`BlockDevice`] is an offset-addressed disk of fixed size. The NBD transmission layer
//! validates every request (range, flags, read-only, length limits) before it reaches a device,
//! so a device may assume that `offset + len <= info().size`, that `len > 0`, that lengths of
//! reads and writes fit in the maximum payload, and that writes never reach a read-only device.
//!
//! Wrappers (block layers such as a cache or retry) hold the next device as
//! `Arc<dyn BlockDevice>` and must implement every method: silently passing an operation
//! through that a layer does not understand corrupts data (nbdkit's warning, kept here).

pub mod buffers;
pub mod cache;
pub mod fault;
pub mod inline;
pub mod mapped;
pub mod retry;
pub mod sync_group;

use std::fmt;
use std::fs::File;
use std::io;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use rustix::io::Errno;

use self::inline::InlineWrites;
use crate::store::StoreError;

/// Block size constraints advertised to clients in `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Smallest alignment for offsets and lengths (a power of two, at most 64 KiB).
    pub minimum: u32,
    /// The size that performs best (a power of two, at least 512 and `minimum`).
    pub preferred: u32,
    /// The largest READ or WRITE payload accepted.
    pub maximum: u32,
}

/// The largest payload a request may carry: 32 MiB, the size the NBD spec says a server should
/// never treat as a denial of service.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

impl Default for BlockSizes {
    fn default() -> Self {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: MAX_PAYLOAD,
        }
    }
}

/// What a device is and what it can do. Fixed for the device's lifetime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Size in bytes.
    pub size: u64,
    /// Writes, trims and zeroing are refused with `EPERM`.
    pub read_only: bool,
    /// `trim` does something useful (it is always safe to call).
    pub can_trim: bool,
    /// `write_zeroes` with `fast` either succeeds quickly or fails with
    /// [`BlockError::FastZeroUnsupported`] without touching the data.
    pub can_fast_zero: bool,
    /// FLUSH and FUA on one connection are visible to every other connection to the same
    /// device when they return (no per-connection cache): `NBD_FLAG_CAN_MULTI_CONN`.
    pub multi_conn: bool,
    /// Seeks are slow: a hint to clients (`NBD_FLAG_ROTATIONAL`).
    pub rotational: bool,
    /// Constraints for clients.
    pub block_sizes: BlockSizes,
}

/// Flags of a `write_zeroes` request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Data must be on stable storage before returning.
    pub fua: bool,
    /// The range must stay allocated: do not punch a hole.
    pub no_hole: bool,
    /// Fail quickly with [`BlockError::FastZeroUnsupported`] unless zeroing is faster than
    /// writing zeroes; leave the data unchanged when failing.
    pub fast: bool,
}

/// A piece of a read result, in order. Holes let the server send `NBD_REPLY_TYPE_OFFSET_HOLE`
/// instead of zero bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadChunk {
    /// These bytes.
    Data(Bytes),
    /// This many zero bytes.
    Zero(u32),
}

impl ReadChunk {
    /// Number of bytes this chunk covers.
    pub fn len(&self) -> u32 {
        match self {
            // A chunk never exceeds a read, which is at most `MAX_PAYLOAD` bytes.
            ReadChunk::Data(b) => b.len() as u32,
            ReadChunk::Zero(n) => *n,
        }
    }

    /// True if the chunk covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The result of a read: chunks that together cover exactly the requested range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadData {
    chunks: Vec<ReadChunk>,
}

impl ReadData {
    /// A read result of one data buffer.
    pub fn data(bytes: Bytes) -> Self {
        ReadData {
            chunks: vec![ReadChunk::Data(bytes)],
        }
    }

    /// Appends a chunk, merging it with the previous one when both are zeroes.
    pub fn push(&mut self, chunk: ReadChunk) {
        if chunk.is_empty() {
            return;
        }
        if let (Some(ReadChunk::Zero(prev)), ReadChunk::Zero(n)) = (self.chunks.last_mut(), &chunk)
        {
            *prev += n;
            return;
        }
        self.chunks.push(chunk);
    }

    /// The chunks in order.
    pub fn chunks(&self) -> &[ReadChunk] {
        &self.chunks
    }

    /// Total length covered.
    pub fn len(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.len())).sum()
    }

    /// True if no bytes are covered.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// The whole range as contiguous bytes (zeroes filled in). Used by tests and by layers
    /// that need a flat buffer.
    pub fn to_bytes(&self) -> Bytes {
        if let [ReadChunk::Data(b)] = self.chunks.as_slice() {
            return b.clone();
        }
        let mut out = Vec::with_capacity(self.len() as usize);
        for c in &self.chunks {
            match c {
                ReadChunk::Data(b) => out.extend_from_slice(b),
                ReadChunk::Zero(n) => out.resize(out.len() + *n as usize, 0),
            }
        }
        Bytes::from(out)
    }
}

/// Bytes of a file that a reply can carry straight from the page cache, so that the server
/// copies them once (from a mapping) or not at all (`sendfile(2)`): see
/// [`BlockDevice::file_range`].
#[derive(Debug, Clone)]
pub struct FileRange {
    /// The file.
    pub file: Arc<File>,
    /// Where the bytes start in it.
    pub offset: u64,
    /// How many.
    pub len: u32,
    /// The file's mappings, to send the bytes from.
    pub windows: Arc<mapped::Windows>,
}

/// Where a write's payload can go straight from the client's socket into a file (`splice(2)`),
/// so that the server copies it once, into the page cache, instead of twice: see
/// [`BlockDevice::write_target`].
#[derive(Debug)]
pub struct WriteTarget<'a> {
    /// The file.
    pub file: &'a Arc<File>,
    /// Where the write starts in it.
    pub offset: u64,
    /// The file's inline-write state: where writes to it may run now (on the async worker, or
    /// on the blocking pool while the kernel makes them wait).
    pub inline: &'a InlineWrites,
}

/// A write's payload read from the socket straight into pages of a device that keeps its bytes
/// in memory pages (see [`BlockDevice::page_bytes`]): the bytes up to the first page boundary,
/// the whole pages, and the bytes after the last whole page. The device takes the whole pages as
/// they are instead of copying them.
#[derive(Debug)]
pub struct PagedWrite {
    /// Where the write starts.
    pub offset: u64,
    /// The bytes before the first page boundary (empty if `offset` is on one).
    pub head: Bytes,
    /// Whole pages, each `page_bytes` long, the first starting at `offset + head.len()`.
    pub pages: Vec<Box<[u8]>>,
    /// The bytes after the last whole page.
    pub tail: Bytes,
}

impl PagedWrite {
    /// How many bytes the write holds.
    pub fn len(&self) -> u64 {
        let pages: usize = self.pages.iter().map(|p| p.len()).sum();
        (self.head.len() + pages + self.tail.len()) as u64
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The payload in one buffer, for a device that copies it anyway.
    pub fn into_bytes(self) -> Bytes {
        let mut all = Vec::with_capacity(self.len() as usize);
        all.extend_from_slice(&self.head);
        for p in &self.pages {
            all.extend_from_slice(p);
        }
        all.extend_from_slice(&self.tail);
        Bytes::from(all)
    }
}

/// `base:allocation` state of an extent: `NBD_STATE_HOLE`.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` state of an extent: `NBD_STATE_ZERO`.
pub const STATE_ZERO: u32 = 2;

/// A run of bytes with one allocation state, for `NBD_CMD_BLOCK_STATUS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes, never zero.
    pub length: u64,
    /// `STATE_HOLE` and/or `STATE_ZERO`; 0 means allocated data.
    pub flags: u32,
}

/// Why a block operation failed. Each variant maps to exactly one NBD error code.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// An I/O error from the storage below.
    #[error("{op} at offset {offset}: {source}")]
    Io {
        /// The operation that failed.
        op: &'static str,
        /// Where it failed.
        offset: u64,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// `write_zeroes` with `fast` cannot be done faster than writing zeroes.
    #[error("fast zeroing is not supported here")]
    FastZeroUnsupported,
    /// The device is read-only.
    #[error("the export is read-only")]
    ReadOnly,
    /// No room left in the storage below.
    #[error("no space left: {0}")]
    NoSpace(String),
    /// The object store below failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// NBD error codes (protocol section "Error values").
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Cannot allocate memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left on device.
    pub const ENOSPC: u32 = 28;
    /// Value too large (DF reads, over-long effect lengths).
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported (only for FAST_ZERO).
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

impl BlockError {
    /// Wraps an I/O error with the operation and offset where it happened.
    pub fn io(op: &'static str, offset: u64, source: io::Error) -> Self {
        BlockError::Io { op, offset, source }
    }

    /// The NBD error code sent to the client.
    pub fn nbd_errno(&self) -> u32 {
        match self {
            BlockError::Io { source, .. } => match Errno::from_io_error(source) {
                Some(Errno::NOSPC | Errno::DQUOT | Errno::FBIG) => errno::ENOSPC,
                Some(Errno::PERM | Errno::ACCESS | Errno::ROFS) => errno::EPERM,
                Some(Errno::NOMEM) => errno::ENOMEM,
                Some(Errno::INVAL) => errno::EINVAL,
                _ => errno::EIO,
            },
            BlockError::FastZeroUnsupported => errno::ENOTSUP,
            BlockError::ReadOnly => errno::EPERM,
            BlockError::NoSpace(_) => errno::ENOSPC,
            BlockError::Store(e) if e.is_no_space() => errno::ENOSPC,
            BlockError::Store(_) => errno::EIO,
        }
    }

    /// True if trying again may succeed (a retry layer's question).
    pub fn is_transient(&self) -> bool {
        match self {
            BlockError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::WouldBlock
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::ConnectionRefused
            ),
            BlockError::Store(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// An offset-addressed disk. See the module documentation for what callers guarantee.
///
/// Every method may be called concurrently from many connections. A write that has returned
/// is visible to every later read on any connection; `flush` makes every write that returned
/// before it durable; `fua` makes one operation durable before it returns.
#[async_trait]
pub trait BlockDevice: Send + Sync + fmt::Debug + 'static {
    /// Size and capabilities.
    fn info(&self) -> &DeviceInfo;

    /// Reads `len` bytes at `offset`. The chunks cover exactly that range.
    async fn read(&self, offset: u64, len: u32) -> Result<ReadData, BlockError>;

    /// Where a read of `len` bytes at `offset` can be sent from without reading it into memory
    /// (by `sendfile`, or from a mapping: see [`mapped`]): a file range
    /// that holds exactly those bytes, all of it in the page cache now (a hint, not a promise:
    /// the sender must still be ready to wait for a disk). `None` (the default) means "read
    /// it": layers that transform or cache data never answer, only a store whose bytes are the
    /// device's bytes. The bytes are taken when the reply is written, which is still within
    /// the read's lifetime for the client.
    fn file_range(&self, _offset: u64, _len: u32) -> Option<FileRange> {
        None
    }

    /// Where a write at `offset`, without FUA, can be put by the connection
    /// itself, straight from its socket (see [`WriteTarget`]). `None` (the default) means "call
    /// `write`": only a store whose bytes are the device's bytes answers. Bytes put there are
    /// as written as `write` would have left them: visible to every read, made durable by the
    /// next `flush`. A write whose payload stops coming partway may be left partly done, in
    /// whole 4 KiB blocks of the file.
    fn write_target(&self, _offset: u64) -> Option<WriteTarget<'_>> {
        None
    }

    /// Writes `data` at `offset`; with `fua`, durably.
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError>;

    /// The size of the pages a device keeps its bytes in, if it takes the whole pages of a large
    /// write's payload as they are (see [`PagedWrite`]): the connection then reads the payload
    /// from the socket straight into pages of that size and calls [`write_pages`], and the
    /// bytes are copied once instead of twice. `None` (the default) means "call `write`": only
    /// a store that keeps the device's bytes in memory answers.
    ///
    /// [`write_pages`]: BlockDevice::write_pages
    fn page_bytes(&self) -> Option<usize> {
        None
    }

    /// `write`, with the payload already cut at the page boundaries [`page_bytes`] gave.
    ///
    /// [`page_bytes`]: BlockDevice::page_bytes
    async fn write_pages(&self, data: PagedWrite, fua: bool) -> Result<(), BlockError> {
        let offset = data.offset;
        self.write(offset, data.into_bytes(), fua).await
    }

    /// Makes every write that has returned durable.
    async fn flush(&self) -> Result<(), BlockError>;

    /// Hints that the range is no longer needed. Afterwards its content is unspecified
    /// (the built-in stores make it read as zeroes).
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError>;

    /// Makes the range read as zeroes.
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags)
    -> Result<(), BlockError>;

    /// Hints that the range will be read soon. Failure changes nothing.
    async fn cache(&self, offset: u64, len: u64) -> Result<(), BlockError>;

    /// Describes allocation from `offset`: at least one extent, starting at `offset`, of total
    /// length at most `len` (a device may describe less than asked, never more).
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BlockError>;

    /// Flushes what is dirty and releases resources. Called once, when the export retires.
    async fn close(&self) -> Result<(), BlockError>;

    /// The device's flush journal, if it keeps one (see [`Journal`]). `None` (the default)
    /// for devices that do not; a layer between a cache and such a device hands it on,
    /// wrapped with what the layer does (retries, faults), or hides it.
    fn journal(&self) -> Option<Arc<dyn Journal>> {
        None
    }
}

/// One change in a [`Journal`] record. Offsets are the device's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalEntry {
    /// The device's storage already holds this range as it reads now (a block was uploaded
    /// whole since the previous record): what earlier records say of it no longer applies.
    Settled {
        /// Where the range starts.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// The range reads as zeroes.
    Zero {
        /// Where the range starts.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// These bytes, at this offset.
    Data {
        /// Where the bytes go.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
}

/// A flush journal: durable records of changes, made before the device's own storage holds
/// them, so that a write-back cache above can make a FLUSH durable with one small record
/// instead of writing every block it touched.
///
/// What the device reads as is its storage with every record that is still kept applied on
/// top, oldest first, entries in order. Whoever opens the device next (with or without a cache)
/// applies the kept records before serving anything, so a record is as durable as the
/// device's storage. The writer of the records tells, at each append, from which record on
/// they are still needed (`keep_from`): records below it are deleted once the new record is
/// durable. So the writer may let a record go only when the storage holds everything it says
/// (or newer data): the device below makes what was written to it durable before it writes
/// a record, so "written to the device" is enough.
#[async_trait]
pub trait Journal: Send + Sync + fmt::Debug {
    /// Appends a record of `entries` durably and returns its number (numbers increase by one
    /// per record). Records numbered below `keep_from` are no longer needed once this one is
    /// durable; `u64::MAX` keeps only this one. Appends must not run concurrently. A failed
    /// append may still have stored its record (an answer lost on the way): the next append
    /// takes the same number and replaces it, so after a failure the writer appends again
    /// before it relies on what the journal holds.
    async fn append(&self, entries: Vec<JournalEntry>, keep_from: u64) -> Result<u64, BlockError>;
}

/// True if every byte is zero. Checks 64 bytes at a time, which the compiler vectorises, and
/// stops at the first block with data. (Looking at the first 16 bytes before the rest made no
/// difference in a profile of the cache's writes: what a sector's check costs is the first
/// touch of its memory.)
pub fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    let whole = blocks
        .by_ref()
        .all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0);
    whole && blocks.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_finds_any_nonzero_byte() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 7]));
        assert!(is_zero(&[0; 1000]));
        for len in [1, 15, 16, 17, 300, 1000] {
            for at in [0, 15, 16, 63, 64, 271, 272, 999] {
                if at >= len {
                    continue;
                }
                let mut v = vec![0u8; len];
                v[at] = 1;
                assert!(!is_zero(&v), "{len} {at}");
            }
        }
    }
}
