//! The `cache` block layer: a size-bounded local-disk cache of the device below, write-back by
//! default (writes acknowledged from local disk and uploaded in the background) or write-through.
//!
//! # Blocks, slots and the index
//!
//! The device is cut into cache blocks of `block_size` bytes (4 MiB by default, the sharded
//! layout's chunk size, so one cache block is one object below; the last block may be shorter).
//! A cached block lives in one slot of the sparse file `DIR/cache.data`, which never holds more
//! than `size / block_size` slots. Clean blocks are evicted least recently used first; a dirty
//! block is never evicted. A block may be cached only in part: a write to a block that is not
//! cached does not read it from below, it records which 512-byte sectors it filled, and the rest
//! is read from below only when something needs it (a read of a missing part, or the upload).
//!
//! `DIR/cache.index` records, per slot, which block it holds and which of its sectors are dirty
//! data, so that a restart finds the dirty blocks again:
//!
//! ```text
//! header, 4096 bytes at 0 (integers little-endian):
//!   0  magic "NBDRSCI1"     8  format (1)          12 state: 1 in use, 2 closed cleanly
//!   16 block_size          24 slots              28 record length
//!   32 volume key length   36 volume key (at most 1024 bytes)
//!   4088 FNV-1a 64 of bytes 0..4088
//! record of slot s, at 4096 + s * record length:
//!   0  block    8  generation (the index sync that wrote it)    16 kind: 0 empty, 1 dirty, 2 clean
//!   17 1 if every sector is present (no bitmap)    24 bitmap, one bit per 512-byte sector
//!   last 8 bytes: FNV-1a 64 of the slot number and the record before it
//! ```
//!
//! A record that fails its checksum (torn, never written) is an empty slot.
//!
//! # Write-back
//!
//! A write lands in the block's slot (the block gets a slot if it had none, without reading it
//! from below) and returns. Dirty blocks are uploaded whole by a background task, oldest first,
//! at most `upload_concurrency` at a time, once they have rested for a moment (or at once when
//! dirty data passes half of `max_dirty`), so a block written in several pieces is uploaded once.
//! A whole block is one PUT below with no read-modify-write; a dirty block that is all zeroes is
//! sent as WRITE_ZEROES instead, which deletes the chunk.
//!
//! A block cached only in part is completed before its upload: the missing sectors are read from
//! below (one GET, none if the chunk does not exist) into the slot, then the block is written
//! whole (one PUT). Zeroes from below are not written where the slot is still a hole (a slot
//! never used since `open`), and are punched out of it elsewhere when they run 64 KiB or more,
//! so completing the blocks of a fresh volume writes no megabytes of zeroes to the local disk.
//! The alternative, writing only the dirty ranges, costs one read-modify-write (GET + PUT) per
//! range below, so it is never cheaper on S3, and it leaves the block partial.
//! Completing keeps one PUT per block, makes later reads hits, and happens in the background, not
//! on the write path. Only a write that covers part of a 512-byte sector not yet cached completes
//! the block first (rare: clients align to 512 bytes).
//!
//! FLUSH uploads every block that was dirty when it arrived, flushes the device below, then
//! syncs the index; it fails (EIO) if any of those uploads failed, and the blocks stay dirty to be
//! retried later. FUA uploads the blocks of its request before it returns. That is, unless the
//! device below keeps a journal (see The flush journal).
//!
//! With `flush = "local"`, FLUSH and FUA run the index sync instead (see Crash safety), and flush
//! the device below only for the TRIMs and zeroing passed down to it: they return once the
//! cache's disk holds every write they cover, and the uploads go on in the background. A random
//! write workload that flushes often then runs at local-disk speed, where uploading every block
//! it touched (4 MiB for each 4 KiB written) on each FLUSH is 100 times slower. The price: until
//! a block is uploaded, losing the cache's disk loses it. `close` uploads everything either way.
//! At most `max_dirty` bytes of blocks are dirty: a writer that needs another dirty block waits
//! for uploads.
//!
//! TRIM and WRITE_ZEROES pass whole blocks down (they delete whole chunks; nothing is uploaded)
//! and drop the cached copies, dirty or not. The partial blocks at their ends are zeroed in the
//! cache if cached there (becoming dirty) and passed down if not. FAST_ZERO is refused (ENOTSUP,
//! nothing changed) where it would zero part of a dirty block, which is a write; elsewhere the
//! device below decides, as it does on presence.
//!
//! Since every upload writes a whole chunk, and an all-zero one is deleted, a cached export
//! behaves like a sharded volume on a store without partial writes (S3). BLOCK_STATUS says so
//! before the upload too: a dirty block is data, or a hole if it is all zeroes (the cache keeps
//! a per-sector "may be non-zero" bitmap for that); other blocks are as the device below says.
//!
//! # The flush journal
//!
//! When the device below keeps a journal ([`Journal`]: a sharded volume) and `flush = "store"`,
//! FLUSH and FUA append one record of what changed since the previous record, read from the
//! slots, instead of uploading every dirty block (4 MiB for each 4 KiB written), and run the
//! index sync at the same time (so that what a restart replays from the slots is never older
//! than what the journal holds). Concurrent callers share a record: each waits for one captured
//! after it arrived. What a record holds, per block, since the previous one:
//!
//! - *settled*: an upload of the block's whole current content finished (no write since it
//!   read the slot): what older records say of the block no longer applies, and the sectors
//!   written before it need not be recorded;
//! - *zero ranges*: TRIMs and zeroing passed down (whole blocks dropped, partial blocks not
//!   cached), so that older records cannot bring back data there. A zero range recorded before
//!   a block is settled is cut out of that block, since a record applies settled ranges first;
//! - *data*: the sectors written since, which are always in the block's dirty entry, and
//!   valid there (a write, the only thing that adds them, dirties the entry; only an upload
//!   that settles the block or a TRIM that drops it ends that).
//!
//! A capture that fails puts back what it took under what changed since. Each record counts
//! the blocks it holds data of, with their content version; once every one of them has been
//! uploaded at that version or later (or dropped), the next record lets it and every older
//! one go. Records wait for their blocks' uploads: when they hold more than `max_dirty` bytes,
//! blocks are uploaded without waiting to rest. If no FLUSH comes, the index syncer writes the
//! record that lets go of what can be, and a clean close leaves one empty record that needs
//! nothing, which the volume then deletes.
//!
//! # Ordering
//!
//! Every operation below that concerns a block (an upload, a fetch, the completion of a partial
//! block, a TRIM or WRITE_ZEROES passed down) holds a lock on the block range it concerns
//! ([`RangeLocks`], first come first served), so an upload of older data can never land after a
//! TRIM passed down, and a fetch never reads below while a change to that block is in flight.
//! Dirty state and slot contents change under the state mutex and a per-block content lock; an
//! upload marks a block clean only if no write touched it since the upload read it.
//!
//! # Crash safety
//!
//! The index is written only by the index sync: `fdatasync(cache.data)`, then the records that
//! changed, then `fdatasync(cache.index)`. It runs at least every second while anything changes,
//! at every FLUSH, at FUA when an earlier record of its blocks exists, and when a slot must be
//! recycled. So a dirty record always describes sectors whose data reached the disk before the
//! record did. A slot whose record may still say dirty is not reused until a later sync has
//! durably emptied that record, so a record never describes another block's data; and FLUSH and
//! FUA sync the index after their uploads, so a surviving record never holds data older than
//! what a FLUSH or FUA made durable below. A record is emptied only once the device below has
//! been flushed after its block was uploaded (or dropped): a store that buffers writes, like
//! `file`, may otherwise lose in a power loss a block that the index no longer names. After a
//! kill -9, a power loss or a crash:
//!
//! - everything acknowledged before a successful FLUSH, and every FUA operation, is in the store
//!   below, whatever happened to the local disk (with `flush = "local"`: in the slots recorded
//!   by the sync that FLUSH or FUA ran, and replayed from there as below);
//! - dirty blocks recorded by the last index sync are replayed from their slots: reads of them
//!   are served from the cache (missing sectors from below) and they are uploaded in the
//!   background, so no read falls through to older data below. After a kill -9 the slots hold
//!   the latest acknowledged data; after a power loss, data at least as new as that sync;
//! - writes acknowledged in the last second without FLUSH or FUA, to blocks not dirty at the
//!   last sync, may be lost (NBD promises nothing for them);
//! - clean blocks are kept only after a clean close (header state 2, written after everything
//!   was uploaded and synced); after a crash they are dropped, never served unchecked.
//!
//! A cache records its volume key; a cache found with another key (or an unreadable index) is
//! never replayed: the directory is renamed to `DIR.orphan-<unix time>` with a warning and an
//! empty cache starts. A cache recorded with another `block_size` or `size` is replayed at open
//! with its old geometry, then started empty.
//!
//! # Write-through
//!
//! Writes, trims and zeroing go to the device below first and invalidate the cache blocks they
//! touch; FLUSH and FUA are the device below's. A read that misses fetches the whole block and
//! may race with a write to the same block: every block being fetched has a registration (a
//! "fill"); a write, trim or zeroing removes the registrations and cached copies of the blocks it
//! touches both before and after calling the device below, and a fill installs its bytes only if
//! its registration is still there. Concurrent misses of one block share one fetch.
//!
//! Requests that change anything run in their own task, so a cancelled request cannot stop
//! halfway; a small write that can land at once without waiting for anything is done in the
//! request's first poll instead, which nothing can cut short. Small slot writes go to the page
//! cache from the async worker (`block::inline`); other slot I/O runs on tokio's blocking pool,
//! and the slot map is updated from there too.
//! A slot being read or written is pinned and is not reused until that is done. A local disk
//! failure on a clean block is a miss (read from below, with a warning); on dirty data it is an
//! error.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Deserializer};
use tokio::sync::{Notify, Semaphore, watch};

use crate::block::buffers::read_exact_at_unzeroed;
use crate::block::inline::InlineWrites;
use crate::block::is_zero;
use crate::block::sync_group::SyncGroup;
use crate::block::{
    BlockDevice, BlockError, DeviceInfo, Extent, Journal, JournalEntry, MAX_PAYLOAD, ReadChunk,
    ReadData, STATE_HOLE, STATE_ZERO, ZeroFlags,
};
use crate::config::size::parse_size;
use crate::le::{u32_at, u64_at};

/// The cache block size when none is configured: 4 MiB, the sharded layout's chunk size.
pub const DEFAULT_BLOCK_SIZE: u64 = 4 << 20;
/// The cache size when none is configured: 1 GiB.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// The most dirty bytes when none is configured: 256 MiB, or a quarter of `size` if smaller.
pub const DEFAULT_MAX_DIRTY: u64 = 256 << 20;
/// Uploads at once when none is configured.
pub const DEFAULT_UPLOAD_CONCURRENCY: usize = 8;
/// The most uploads at once.
pub const MAX_UPLOAD_CONCURRENCY: usize = 256;
/// The smallest cache block size: 4 KiB.
pub const MIN_BLOCK_SIZE: u64 = 4096;
/// The largest cache block size: the largest read a device accepts.
pub const MAX_BLOCK_SIZE: u64 = MAX_PAYLOAD as u64;
/// The most slots a cache may have. Each cached block costs about 200 bytes of memory, plus
/// one bit per 512 bytes of block.
pub const MAX_SLOTS: u64 = 1 << 20;
/// Name of the slot file inside the cache directory.
pub const DATA_FILE: &str = "cache.data";
/// Name of the index file inside the cache directory.
pub const INDEX_FILE: &str = "cache.index";
/// Name of the file, inside the cache directory, that names the cached volume (for people).
pub const ID_FILE: &str = "cache.id";
/// Blocks of one request fetched, read or written at the same time.
const PARALLEL_BLOCKS: usize = 16;
/// The granularity of partially cached blocks.
const SECTOR: u64 = 512;
/// How often the index is synced while anything changes.
const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// How long a dirty block rests untouched before it is uploaded, unless dirty data is short.
const WRITEBACK_DELAY: Duration = Duration::from_millis(200);
/// The longest the uploader waits between looks at the dirty blocks.
const UPLOADER_IDLE: Duration = Duration::from_secs(1);
/// Backoff after a failed upload: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_LAST: Duration = Duration::from_secs(30);
/// Read-ahead fetches in flight at once.
const READAHEAD_MAX: usize = 2;
/// The most data bytes in one journal record: a capture of more is appended as several.
const RECORD_MAX: u64 = 16 << 20;
/// The most settled and zero ranges in one journal record.
const RECORD_ENTRIES: usize = 1 << 16;

const INDEX_MAGIC: &[u8; 8] = b"NBDRSCI1";
const INDEX_FORMAT: u32 = 1;
const HEADER_LEN: u64 = 4096;
const HEADER_SUM_AT: usize = 4088;
const MAX_KEY_LEN: usize = 1024;
const STATE_IN_USE: u32 = 1;
const STATE_CLOSED: u32 = 2;
const KIND_EMPTY: u8 = 0;
const KIND_DIRTY: u8 = 1;
const KIND_CLEAN: u8 = 2;
const RECORD_FIXED: usize = 24;

/// When writes reach the device below.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheMode {
    /// Writes are acknowledged from local disk and uploaded in the background; FLUSH and FUA
    /// wait for the uploads they need.
    #[default]
    WriteBack,
    /// A write returns once the device below has it; the cache is only a copy.
    WriteThrough,
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CacheMode::WriteBack => "write-back",
            CacheMode::WriteThrough => "write-through",
        })
    }
}

/// Where write-back FLUSH and FUA make data durable before they return.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlushTo {
    /// In the store below: the dirty blocks concerned are uploaded first.
    #[default]
    Store,
    /// On the cache's local disk (the index sync); uploads go on in the background.
    Local,
}

impl fmt::Display for FlushTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FlushTo::Store => "store",
            FlushTo::Local => "local",
        })
    }
}

/// The `cache` stage's parameters, as written in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheParams {
    /// Where the cache lives. Resolved by the caller (with the state-directory default) and
    /// passed to [`CacheLayer::open`] as its `dir`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// The most bytes the cache file holds: a number of bytes or a size such as `"2GiB"`.
    #[serde(default = "default_size", deserialize_with = "deserialize_size")]
    pub size: u64,
    /// The cache granularity: a power of two from 4 KiB to 32 MiB, 4 MiB by default.
    #[serde(default = "default_block_size", deserialize_with = "deserialize_size")]
    pub block_size: u64,
    /// `"write-back"` (the default) or `"write-through"`.
    #[serde(default)]
    pub mode: CacheMode,
    /// `"store"` (the default): FLUSH and FUA return once their data is in the store below.
    /// `"local"` (write-back only): once it is durable on the cache's disk.
    #[serde(default)]
    pub flush: FlushTo,
    /// The most bytes of dirty blocks (write-back): from one block to `size`. By default 256 MiB
    /// or a quarter of `size`, whichever is smaller.
    #[serde(default, deserialize_with = "deserialize_opt_size")]
    pub max_dirty: Option<u64>,
    /// Uploads at once (write-back), from 1 to 256; 8 by default.
    #[serde(default = "default_upload_concurrency")]
    pub upload_concurrency: usize,
    /// With `flush = "store"` (write-back), make FLUSH and FUA durable by appending a record of
    /// the changes to the device's journal when it keeps one (a sharded volume), rather than
    /// uploading every block they touched. True by default.
    #[serde(default = "default_journal")]
    pub journal: bool,
}

fn default_journal() -> bool {
    true
}

fn default_size() -> u64 {
    DEFAULT_SIZE
}

fn default_block_size() -> u64 {
    DEFAULT_BLOCK_SIZE
}

fn default_upload_concurrency() -> usize {
    DEFAULT_UPLOAD_CONCURRENCY
}

impl Default for CacheParams {
    fn default() -> Self {
        CacheParams {
            path: None,
            size: DEFAULT_SIZE,
            block_size: DEFAULT_BLOCK_SIZE,
            mode: CacheMode::WriteBack,
            flush: FlushTo::Store,
            max_dirty: None,
            upload_concurrency: DEFAULT_UPLOAD_CONCURRENCY,
            journal: true,
        }
    }
}

/// Reads a size given either as a number of bytes or as a string such as `"2GiB"`.
pub fn deserialize_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct SizeVisitor;

    impl serde::de::Visitor<'_> for SizeVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a size in bytes, or a string such as \"64MiB\" or \"2GiB\"")
        }

        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
            parse_size(&v.to_string()).map_err(E::custom)
        }

        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
            match u64::try_from(v) {
                Ok(v) => self.visit_u64(v),
                Err(_) => Err(E::custom(format!(
                    "bad size {v}: a size must be greater than zero"
                ))),
            }
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u64, E> {
            parse_size(v).map_err(E::custom)
        }
    }

    d.deserialize_any(SizeVisitor)
}

fn deserialize_opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    deserialize_size(d).map(Some)
}

impl CacheParams {
    /// Checks the parameters on their own (the device below is checked by `open`). Messages
    /// begin with the key they are about.
    pub fn validate(&self) -> Result<(), CacheError> {
        if !self.block_size.is_power_of_two()
            || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&self.block_size)
        {
            return Err(CacheError::BadBlockSize(self.block_size));
        }
        let slots = self.size / self.block_size;
        if slots == 0 {
            return Err(CacheError::TooSmall {
                size: self.size,
                block_size: self.block_size,
            });
        }
        if slots > MAX_SLOTS {
            return Err(CacheError::TooManySlots {
                size: self.size,
                block_size: self.block_size,
            });
        }
        if let Some(m) = self.max_dirty {
            if m < self.block_size {
                return Err(CacheError::MaxDirtyTooSmall {
                    max_dirty: m,
                    block_size: self.block_size,
                });
            }
            if m > self.size {
                return Err(CacheError::MaxDirtyTooLarge {
                    max_dirty: m,
                    size: self.size,
                });
            }
        }
        if !(1..=MAX_UPLOAD_CONCURRENCY).contains(&self.upload_concurrency) {
            return Err(CacheError::BadUploadConcurrency(self.upload_concurrency));
        }
        if self.flush == FlushTo::Local && self.mode == CacheMode::WriteThrough {
            return Err(CacheError::LocalFlushWriteThrough);
        }
        Ok(())
    }

    /// The dirty bound in effect: `max_dirty`, or 256 MiB or a quarter of `size` (whichever is
    /// smaller, and at least one block).
    pub fn effective_max_dirty(&self) -> u64 {
        self.max_dirty.unwrap_or_else(|| {
            DEFAULT_MAX_DIRTY
                .min(self.size / 4)
                .max(self.block_size)
                .min(self.size)
        })
    }
}

/// Why a cache could not be set up. Each message names the parameter or the path.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// `block_size` is not a power of two in range.
    #[error("block_size {0} must be a power of two from 4 KiB (4096) to 32 MiB (33554432)")]
    BadBlockSize(u64),
    /// `size` is below one block.
    #[error("size {size} must hold at least one cache block (block_size {block_size})")]
    TooSmall {
        /// The configured size.
        size: u64,
        /// The configured block size.
        block_size: u64,
    },
    /// `size / block_size` is beyond [`MAX_SLOTS`].
    #[error(
        "size {size} with block_size {block_size} makes more than 1048576 cache blocks; use a larger block_size"
    )]
    TooManySlots {
        /// The configured size.
        size: u64,
        /// The configured block size.
        block_size: u64,
    },
    /// `max_dirty` is below one block.
    #[error("max_dirty {max_dirty} must be at least one cache block (block_size {block_size})")]
    MaxDirtyTooSmall {
        /// The configured bound.
        max_dirty: u64,
        /// The configured block size.
        block_size: u64,
    },
    /// `max_dirty` is beyond the cache size.
    #[error("max_dirty {max_dirty} must not exceed the cache size {size}")]
    MaxDirtyTooLarge {
        /// The configured bound.
        max_dirty: u64,
        /// The configured size.
        size: u64,
    },
    /// `upload_concurrency` is out of range.
    #[error("upload_concurrency must be from 1 to 256, got {0}")]
    BadUploadConcurrency(usize),
    /// `flush = "local"` with `mode = "write-through"`, where every write is below already.
    #[error(
        "flush = \"local\" needs mode = \"write-back\": in write-through mode every write is in the store when it returns"
    )]
    LocalFlushWriteThrough,
    /// The device below cannot read a whole cache block at once.
    #[error(
        "block_size {block_size} is not a read the device below accepts (from {minimum} to {maximum} bytes)"
    )]
    BlockSizeVsDevice {
        /// The configured block size.
        block_size: u64,
        /// The device's smallest block.
        minimum: u32,
        /// The device's largest read.
        maximum: u32,
    },
    /// Another cache holds the directory.
    #[error("cache directory {0} is in use by another cache")]
    Busy(PathBuf),
    /// Dirty blocks left by an earlier run could not be written below; the directory is kept.
    #[error(
        "cache {dir}: {blocks} dirty blocks left by an earlier run could not be written to the device below (the cache is kept for the next try): {source}"
    )]
    Replay {
        /// The cache directory.
        dir: PathBuf,
        /// How many dirty blocks it holds.
        blocks: usize,
        /// Why writing them failed.
        #[source]
        source: BlockError,
    },
    /// The system refused.
    #[error("cache {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

// ---------------------------------------------------------------------------------------------
// The on-disk index.

/// FNV-1a, 64 bits: detects torn and unwritten index entries.
fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Bytes of a sector bitmap for blocks of `block_size`.
fn bitmap_len(block_size: u64) -> usize {
    // At most 32 MiB / 512 / 8 = 8 KiB.
    (block_size / SECTOR).div_ceil(8) as usize
}

/// Bytes of one slot's record for blocks of `block_size`.
fn record_len(block_size: u64) -> usize {
    (RECORD_FIXED + bitmap_len(block_size) + 8).next_multiple_of(8)
}

/// The volume key as recorded: long keys are replaced by a digest.
fn stored_key(key: &str) -> String {
    if key.len() <= MAX_KEY_LEN {
        key.to_owned()
    } else {
        format!("fnv64:{:016x}:{}", fnv64(&[key.as_bytes()]), key.len())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    state: u32,
    block_size: u64,
    slots: u32,
    record_len: u32,
    key: String,
}

fn encode_header(h: &Header) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_LEN as usize];
    let key = h.key.as_bytes();
    let key_len = key.len().min(MAX_KEY_LEN);
    b[0..8].copy_from_slice(INDEX_MAGIC);
    b[8..12].copy_from_slice(&INDEX_FORMAT.to_le_bytes());
    b[12..16].copy_from_slice(&h.state.to_le_bytes());
    b[16..24].copy_from_slice(&h.block_size.to_le_bytes());
    b[24..28].copy_from_slice(&h.slots.to_le_bytes());
    b[28..32].copy_from_slice(&h.record_len.to_le_bytes());
    // At most MAX_KEY_LEN.
    b[32..36].copy_from_slice(&(key_len as u32).to_le_bytes());
    b[36..36 + key_len].copy_from_slice(&key[..key_len]);
    let sum = fnv64(&[&b[..HEADER_SUM_AT]]);
    b[HEADER_SUM_AT..].copy_from_slice(&sum.to_le_bytes());
    b
}

fn decode_header(b: &[u8]) -> Result<Header, String> {
    if b.len() < HEADER_LEN as usize {
        return Err(format!("{} bytes, shorter than its header", b.len()));
    }
    if &b[0..8] != INDEX_MAGIC {
        return Err("not a cache index".to_owned());
    }
    if fnv64(&[&b[..HEADER_SUM_AT]]) != u64_at(b, HEADER_SUM_AT) {
        return Err("its header fails its checksum".to_owned());
    }
    let format = u32_at(b, 8);
    if format != INDEX_FORMAT {
        return Err(format!(
            "format {format}, but this version reads only format 1"
        ));
    }
    let key_len = u32_at(b, 32) as usize;
    if key_len > MAX_KEY_LEN {
        return Err(format!("a volume key of {key_len} bytes"));
    }
    let key = std::str::from_utf8(&b[36..36 + key_len])
        .map_err(|_| "a volume key that is not UTF-8".to_owned())?
        .to_owned();
    Ok(Header {
        state: u32_at(b, 12),
        block_size: u64_at(b, 16),
        slots: u32_at(b, 24),
        record_len: u32_at(b, 28),
        key,
    })
}

/// One slot's record as found on disk. `bitmap` is `None` when every sector is present.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RawRecord {
    block: u64,
    generation: u64,
    kind: u8,
    bitmap: Option<Vec<u8>>,
}

fn encode_record(slot: u32, r: &RawRecord, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    b[0..8].copy_from_slice(&r.block.to_le_bytes());
    b[8..16].copy_from_slice(&r.generation.to_le_bytes());
    b[16] = r.kind;
    match &r.bitmap {
        None => b[17] = 1,
        Some(bits) => {
            let n = bits.len().min(len - RECORD_FIXED - 8);
            b[RECORD_FIXED..RECORD_FIXED + n].copy_from_slice(&bits[..n]);
        }
    }
    let sum = fnv64(&[&slot.to_le_bytes(), &b[..len - 8]]);
    b[len - 8..].copy_from_slice(&sum.to_le_bytes());
    b
}

fn decode_record(slot: u32, b: &[u8], bitmap_bytes: usize) -> Option<RawRecord> {
    let len = b.len();
    if len < RECORD_FIXED + bitmap_bytes + 8
        || fnv64(&[&slot.to_le_bytes(), &b[..len - 8]]) != u64_at(b, len - 8)
    {
        return None;
    }
    let kind = b[16];
    if kind != KIND_DIRTY && kind != KIND_CLEAN {
        return None;
    }
    Some(RawRecord {
        block: u64_at(b, 0),
        generation: u64_at(b, 8),
        kind,
        bitmap: (b[17] == 0).then(|| b[RECORD_FIXED..RECORD_FIXED + bitmap_bytes].to_vec()),
    })
}

// ---------------------------------------------------------------------------------------------
// Which sectors of a block are in its slot.

/// The sectors of a cached block that its slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Valid {
    /// All of them.
    Full,
    /// Those whose bit is set (bit `i % 64` of word `i / 64` for sector `i`).
    Partial(Vec<u64>),
}

impl Valid {
    fn empty(sectors: u64) -> Valid {
        // At most 65536 sectors per block.
        Valid::Partial(vec![0; sectors.div_ceil(64) as usize])
    }

    fn is_full(&self) -> bool {
        matches!(self, Valid::Full)
    }

    fn is_empty(&self) -> bool {
        match self {
            Valid::Full => false,
            Valid::Partial(w) => w.iter().all(|&x| x == 0),
        }
    }

    fn bit(words: &[u64], i: u64) -> bool {
        words
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn all_set(words: &[u64], sectors: u64) -> bool {
        let whole = (sectors / 64) as usize;
        let rest = sectors % 64;
        words.len() >= sectors.div_ceil(64) as usize
            && words[..whole].iter().all(|&x| x == u64::MAX)
            && (rest == 0 || words[whole] & ((1u64 << rest) - 1) == (1u64 << rest) - 1)
    }

    /// True if sectors `lo..hi` are all present.
    fn covers(&self, lo: u64, hi: u64) -> bool {
        match self {
            Valid::Full => true,
            Valid::Partial(w) => (lo..hi).all(|i| Valid::bit(w, i)),
        }
    }

    /// Marks sectors `lo..hi` present, of a block of `sectors`. True if anything changed.
    fn set(&mut self, lo: u64, hi: u64, sectors: u64) -> bool {
        let Valid::Partial(w) = self else {
            return false;
        };
        let mut changed = false;
        for i in lo..hi.min(sectors) {
            let (word, bit) = ((i / 64) as usize, 1u64 << (i % 64));
            if let Some(x) = w.get_mut(word)
                && *x & bit == 0
            {
                *x |= bit;
                changed = true;
            }
        }
        if Valid::all_set(w, sectors) {
            *self = Valid::Full;
        }
        changed
    }

    /// Runs of sectors (of a block of `sectors`) that are present (`want`) or missing.
    fn runs(&self, sectors: u64, want: bool) -> Vec<(u64, u64)> {
        let w = match self {
            Valid::Full if want => return vec![(0, sectors)],
            Valid::Full => return Vec::new(),
            Valid::Partial(w) => w,
        };
        let mut out = Vec::new();
        let mut start = None;
        for i in 0..sectors {
            match (Valid::bit(w, i) == want, start) {
                (true, None) => start = Some(i),
                (false, Some(s)) => {
                    out.push((s, i));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            out.push((s, sectors));
        }
        out
    }

    /// The on-disk form: `None` when full, else `bytes` bytes of bitmap.
    fn to_bitmap(&self, bytes: usize) -> Option<Vec<u8>> {
        let Valid::Partial(w) = self else {
            return None;
        };
        let mut out = vec![0u8; bytes];
        for (i, byte) in out.iter_mut().enumerate() {
            let word = w.get(i / 8).copied().unwrap_or(0);
            *byte = (word >> ((i % 8) * 8)) as u8;
        }
        Some(out)
    }

    fn from_bitmap(bitmap: Option<&[u8]>, sectors: u64) -> Valid {
        let Some(bits) = bitmap else {
            return Valid::Full;
        };
        let mut v = Valid::empty(sectors);
        if let Valid::Partial(w) = &mut v {
            for i in 0..sectors {
                let byte = bits.get((i / 8) as usize).copied().unwrap_or(0);
                if byte & (1 << (i % 8)) != 0
                    && let Some(x) = w.get_mut((i / 64) as usize)
                {
                    *x |= 1 << (i % 64);
                }
            }
        }
        v.set(0, 0, sectors);
        v
    }
}

/// Sectors in a block of `len` bytes.
fn sectors_of(len: u32) -> u64 {
    u64::from(len).div_ceil(SECTOR)
}

/// Sets (may be non-zero) or clears (all zeroes) the bits of these sectors.
fn set_bits(bits: &mut [u64], changes: &[(u64, bool)]) {
    for &(sector, nonzero) in changes {
        if let Some(w) = bits.get_mut((sector / 64) as usize) {
            let bit = 1u64 << (sector % 64);
            if nonzero {
                *w |= bit;
            } else {
                *w &= !bit;
            }
        }
    }
}

/// The non-zero bits of the sectors of a whole block.
fn nonzero_bits(block: &[u8]) -> Vec<u64> {
    let mut bits = vec![0u64; (block.len() as u64).div_ceil(SECTOR).div_ceil(64) as usize];
    for (i, sector) in block.chunks(SECTOR as usize).enumerate() {
        if !is_zero(sector) {
            bits[i / 64] |= 1 << (i % 64);
        }
    }
    bits
}

/// Zero stretches at least this long are punched out of a slot rather than written.
const PUNCH_MIN: u64 = 64 * 1024;

/// Writes the missing sectors of a block into its slot at `base` from `below` (the whole block
/// as read from below), given each missing sector with whether it may be non-zero. Zeroes are
/// not written where the slot already reads as zeroes (`zero_rest`), and stretches of at least
/// [`PUNCH_MIN`] zero bytes are punched out of the file elsewhere. A block that does not exist
/// below (every block of a fresh volume) is then completed without writing its megabytes of
/// zeroes, which the next index sync would otherwise have to push to the disk (a burst of 4 KiB
/// random writes onto a fresh cache, until idle: 0.71 of the bytes written to disk, 0.39 of the
/// cache file's allocation, `bench/abfresh.sh`). `punch` is cleared, and the zeroes written, if
/// the file system cannot punch holes.
fn fill_runs(
    data: &File,
    base: u64,
    below: &[u8],
    sectors: &[(u64, bool)],
    zero_rest: bool,
    punch: &AtomicBool,
) -> io::Result<()> {
    // Maximal stretches of consecutive sectors, zero or not: (first, end, nonzero).
    let mut stretches: Vec<(u64, u64, bool)> = Vec::new();
    for &(sector, nonzero) in sectors {
        match stretches.last_mut() {
            Some((_, end, nz)) if *end == sector && *nz == nonzero => *end += 1,
            _ => stretches.push((sector, sector + 1, nonzero)),
        }
    }
    for (lo, hi, nonzero) in stretches {
        if !nonzero && zero_rest {
            continue;
        }
        // Within the block.
        let (a, b) = (
            (lo * SECTOR) as usize,
            ((hi * SECTOR) as usize).min(below.len()),
        );
        if !nonzero && (b - a) as u64 >= PUNCH_MIN && punch.load(Ordering::Relaxed) {
            let flags =
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
            match rustix::fs::fallocate(data, flags, base + a as u64, (b - a) as u64) {
                Ok(()) => continue,
                Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => {
                    punch.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e.into()),
            }
        }
        data.write_all_at(&below[a..b], base + a as u64)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Ordering of operations below, per block range.

/// Exclusive locks on ranges of blocks, granted first come first served: a request waits for
/// every held range and every earlier waiting range it overlaps, so a large TRIM is not starved
/// by a stream of single-block uploads. Nobody holds a range while waiting for another, so the
/// queue cannot deadlock.
#[derive(Default)]
struct RangeLocks {
    state: Mutex<RangeState>,
    released: Notify,
}

#[derive(Default)]
struct RangeState {
    next: u64,
    /// ticket, first block, last block
    held: Vec<(u64, u64, u64)>,
    /// ticket → (first block, last block)
    waiting: BTreeMap<u64, (u64, u64)>,
}

/// A range held (or being waited for: dropping it withdraws the request).
struct RangeGuard {
    locks: Arc<RangeLocks>,
    ticket: u64,
    held: bool,
}

impl RangeLocks {
    fn lock_state(&self) -> MutexGuard<'_, RangeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn lock(self: &Arc<Self>, first: u64, last: u64) -> RangeGuard {
        let overlaps = |a: u64, b: u64| a <= last && first <= b;
        let mut guard = {
            let mut st = self.lock_state();
            st.next += 1;
            let ticket = st.next;
            st.waiting.insert(ticket, (first, last));
            RangeGuard {
                locks: Arc::clone(self),
                ticket,
                held: false,
            }
        };
        loop {
            let notified = self.released.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock_state();
                let blocked = st.held.iter().any(|&(_, a, b)| overlaps(a, b))
                    || st
                        .waiting
                        .range(..guard.ticket)
                        .any(|(_, &(a, b))| overlaps(a, b));
                if !blocked {
                    st.waiting.remove(&guard.ticket);
                    st.held.push((guard.ticket, first, last));
                    guard.held = true;
                    return guard;
                }
            }
            notified.await;
        }
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let mut st = self.locks.lock_state();
        if self.held {
            st.held.retain(|h| h.0 != self.ticket);
        } else {
            st.waiting.remove(&self.ticket);
        }
        drop(st);
        self.locks.released.notify_waiters();
    }
}

// ---------------------------------------------------------------------------------------------
// The slot map.

/// What the outcome of a fill looks like to readers waiting for it: `None` while fetching,
/// then the block's bytes, or `Some(None)` if the fetch failed.
type FillResult = Option<Option<Bytes>>;

/// What waiters of an upload see: `None` while it runs, then its outcome.
type UploadResult = Option<Result<(), String>>;

/// A cached block.
struct Entry {
    /// Unique for the cache's lifetime: tells a block's entries apart across drops.
    id: u64,
    slot: u32,
    /// The block's length (the last block may be short).
    len: u32,
    /// LRU position while clean.
    tick: u64,
    /// Readers and writers of the slot: a pinned slot is not reused.
    pins: u32,
    /// Writes claimed but not finished. An upload does not mark the block clean while any runs.
    writers: u32,
    valid: Valid,
    /// Sectors that may hold a non-zero byte (of those present), or `None` if unknown (a
    /// block recovered from disk). Block status reports a dirty block that is all zeroes as a
    /// hole, which is what it becomes below once uploaded.
    nonzero: Option<Vec<u64>>,
    /// The slot reads as zeroes wherever `valid` has no sector: it was a hole when the block got
    /// it, and only completing the block writes there. Completing it then writes only the
    /// non-zero sectors from below (none for a block that does not exist below).
    zero_rest: bool,
    /// Changes whenever `valid` does: the index record is rewritten when it differs.
    stamp: u64,
    /// Content version, new at every change of the slot's data.
    seq: u64,
    /// The content version last uploaded.
    uploaded: u64,
    dirty: bool,
    /// Position in the dirty queue (oldest first) while dirty.
    dirty_tick: u64,
    last_write: Instant,
    upload: Option<watch::Receiver<UploadResult>>,
    failures: u32,
    retry_at: Option<Instant>,
    /// Held while the slot's data changes and while an upload reads it.
    content: Arc<tokio::sync::Mutex<()>>,
}

/// What the index on disk may say about a slot: dirty data of this entry at this stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DiskRec {
    block: u64,
    id: u64,
    stamp: u64,
}

/// Sorted, disjoint, non-adjacent ranges of sectors.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Runs(Vec<(u64, u64)>);

impl Runs {
    /// Adds sectors `lo..hi`.
    fn add(&mut self, lo: u64, hi: u64) {
        if lo >= hi {
            return;
        }
        // The first run that ends at or after `lo`, and the first that starts after `hi`.
        let a = self.0.partition_point(|r| r.1 < lo);
        let b = self.0.partition_point(|r| r.0 <= hi);
        if a == b {
            self.0.insert(a, (lo, hi));
            return;
        }
        let merged = (lo.min(self.0[a].0), hi.max(self.0[b - 1].1));
        self.0.splice(a..b, [merged]);
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds every run of `other`.
    fn union(&mut self, other: &Runs) {
        for &(lo, hi) in &other.0 {
            self.add(lo, hi);
        }
    }

    /// The sectors of `self` that are also in `other` (sorted, disjoint ranges).
    fn intersect(&self, other: &[(u64, u64)]) -> Runs {
        let mut out = Runs::default();
        for &(a, b) in &self.0 {
            for &(c, d) in other {
                let (lo, hi) = (a.max(c), b.min(d));
                if lo < hi {
                    out.add(lo, hi);
                }
            }
        }
        out
    }
}

/// Removes bytes `start..end` from a list of ranges (offset, length).
fn clip(ranges: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    if !ranges.iter().any(|&(o, l)| o < end && start < o + l) {
        return;
    }
    let mut out = Vec::with_capacity(ranges.len() + 1);
    for &(o, l) in ranges.iter() {
        let e = o + l;
        if e <= start || o >= end {
            out.push((o, l));
            continue;
        }
        if o < start {
            out.push((o, start - o));
        }
        if e > end {
            out.push((end, e - end));
        }
    }
    *ranges = out;
}

/// What changed in a block since the last journal record.
#[derive(Debug, Default, Clone)]
struct Pending {
    /// An upload of the block's whole content, as it is now, finished: the device below holds
    /// it, so what earlier records say of the block no longer applies.
    settled: bool,
    /// Sectors written since (always cached, and valid, in the block's dirty entry).
    runs: Runs,
}

/// A block whose written sectors a journal capture reads from its (pinned) slot.
#[derive(Debug, Clone)]
struct Captured {
    block: u64,
    /// The entry and its content version at the capture.
    id: u64,
    seq: u64,
    slot: u32,
    /// The block's length.
    len: u32,
    runs: Runs,
}

impl Captured {
    fn bytes(&self) -> u64 {
        self.runs.0.iter().map(|&(lo, hi)| (hi - lo) * SECTOR).sum()
    }
}

/// A journal record appended and not yet known to be held by the device below.
#[derive(Debug)]
struct LiveRecord {
    n: u64,
    /// Its data bytes.
    bytes: u64,
    /// The blocks it holds data of: block, entry id, content version at the capture. The record
    /// is settled once each of them is uploaded at that version or later, or dropped.
    blocks: Vec<(u64, u64, u64)>,
}

/// The journal's bookkeeping (write-back with `flush = "store"` over a device that keeps a
/// journal; see the module documentation).
#[derive(Debug, Default)]
struct JournalBook {
    /// Set at open: the rest is used only then.
    on: bool,
    /// The cache's block size and the device's size (set at open).
    block_size: u64,
    size: u64,
    /// Per block, what changed since the last record.
    blocks: HashMap<u64, Pending>,
    /// Ranges zeroed below since the last record (device offsets, offset and length), in
    /// order.
    zeroed: Vec<(u64, u64)>,
    /// Records appended and not yet settled, oldest first.
    live: std::collections::VecDeque<LiveRecord>,
    /// Data bytes of `live`.
    live_bytes: u64,
    /// The number of the newest record, once one was appended.
    last: Option<u64>,
    /// The newest record is empty and needs nothing before it.
    tail_clean: bool,
    /// What the newest record kept (the journal deletes records below it).
    announced: u64,
    /// An append failed since the last one that succeeded: the journal may hold a record that
    /// only the next append replaces.
    append_failed: bool,
}

impl JournalBook {
    /// Drops the settled records at the front of `live`, and returns the oldest record still
    /// needed (`u64::MAX`: none).
    fn keep_from(&mut self, entries: &HashMap<u64, Entry>) -> u64 {
        while let Some(r) = self.live.front() {
            let settled = r.blocks.iter().all(|&(b, id, seq)| {
                entries
                    .get(&b)
                    .is_none_or(|e| e.id != id || e.uploaded >= seq)
            });
            if !settled {
                return r.n;
            }
            self.live_bytes -= r.bytes;
            self.live.pop_front();
        }
        u64::MAX
    }

    /// True if a record appended now would let an older one go that holds anything.
    fn can_let_go(&mut self, entries: &HashMap<u64, Entry>) -> bool {
        let Some(last) = self.last else {
            return false;
        };
        let keep = self.keep_from(entries);
        if keep == u64::MAX && self.tail_clean {
            return false;
        }
        keep.min(last + 1) > self.announced
    }

    /// Records a write of sectors `lo..hi` of `block`.
    fn wrote(&mut self, block: u64, lo: u64, hi: u64) {
        if self.on {
            self.blocks.entry(block).or_default().runs.add(lo, hi);
        }
    }

    /// The device bytes of `block`.
    fn range(&self, block: u64) -> (u64, u64) {
        let start = block * self.block_size;
        (start, (start + self.block_size).min(self.size))
    }

    /// Records that the device below now holds `block` as it is. Zero ranges recorded before
    /// are cut out of the block: they happened before the upload, which holds their effect,
    /// and a record applies settled ranges before zero ranges.
    fn settled(&mut self, block: u64) {
        if self.on {
            let p = self.blocks.entry(block).or_default();
            p.settled = true;
            p.runs = Runs::default();
            let (start, end) = self.range(block);
            clip(&mut self.zeroed, start, end);
        }
    }

    /// Records a range zeroed below, whose blocks `first..=last` (if any) were dropped whole.
    fn zeroed(&mut self, offset: u64, len: u64, dropped: Option<(u64, u64)>) {
        if !self.on {
            return;
        }
        match self.zeroed.last_mut() {
            // A TRIM right after the previous one (fstrim, mkfs): one range.
            Some((o, l)) if *o + *l == offset => *l += len,
            _ => self.zeroed.push((offset, len)),
        }
        if let Some((first, last)) = dropped {
            // The zero range says all there is to say of them.
            self.blocks.retain(|b, _| !(first..=last).contains(b));
        }
    }

    /// Puts back what a failed capture took, under what changed since: a block settled since
    /// stays settled; sectors of a block that is no longer dirty (dropped by a TRIM or
    /// zeroing, whose zero range is recorded) or no longer valid in its entry are left out.
    fn put_back(
        &mut self,
        entries: &HashMap<u64, Entry>,
        taken: HashMap<u64, Pending>,
        zeroed: Vec<(u64, u64)>,
    ) {
        let mut zeroed = zeroed;
        for (b, p) in taken {
            let cur = self.blocks.entry(b).or_default();
            if cur.settled {
                // Settled since the capture: the older zero ranges in it happened before.
                let (start, end) = (
                    b * self.block_size,
                    ((b + 1) * self.block_size).min(self.size),
                );
                clip(&mut zeroed, start, end);
                continue;
            }
            cur.settled = p.settled;
            if let Some(e) = entries.get(&b).filter(|e| e.dirty) {
                let valid = e.valid.runs(sectors_of(e.len), true);
                cur.runs.union(&p.runs.intersect(&valid));
            }
        }
        let newer = std::mem::replace(&mut self.zeroed, zeroed);
        self.zeroed.extend(newer);
    }
}

/// The slot map. Every slot is in exactly one place: never used (`fresh..slots`), `free`,
/// `pending` (free, but the index may still name it dirty), held by an entry, reserved by a
/// fill that is writing it, or in `orphans` (dropped while pinned).
#[derive(Default)]
struct State {
    entries: HashMap<u64, Entry>,
    /// Clean entries, least recently used first: tick → block.
    lru: BTreeMap<u64, u64>,
    /// Dirty entries, oldest first: dirty tick → block.
    dirty_order: BTreeMap<u64, u64>,
    tick: u64,
    next_id: u64,
    next_seq: u64,
    free: Vec<u32>,
    fresh: u32,
    pending: Vec<u32>,
    /// Slots whose index record may say dirty.
    disk: HashMap<u32, DiskRec>,
    /// Slots of dropped entries still pinned: slot → pins.
    orphans: HashMap<u32, u32>,
    /// Blocks being fetched from below: block → registration.
    fills: HashMap<u64, FillReg>,
    next_fill: u64,
    /// Bytes of dirty blocks, and of blocks reserved by writers about to dirty them.
    dirty_bytes: u64,
    /// Upload tasks running or queued.
    uploads: usize,
    /// Writes, trims and zeroing in flight (close waits for them).
    mutations: usize,
    closed: bool,
    /// `close` has finished: the directory is unlocked and must not be written.
    released: bool,
    /// Something the index or the data file's durability depends on changed.
    sync_wanted: bool,
    /// When the uploader will look at the dirty blocks next, unless kicked (None: not planned).
    upload_wake: Option<Instant>,
    /// Slots the index names dirty whose blocks no longer are (uploaded, or dropped after a
    /// TRIM or zeroing passed down), with the number of flushes below begun by then: their
    /// records are emptied only after a later one succeeded.
    unwanted: HashMap<u32, u64>,
    /// Some records wait for a flush below before they are emptied.
    removals_held: bool,
    /// Flushes of the device below begun, and the highest number of one that succeeded.
    below_started: u64,
    below_durable: u64,
    /// Generation of the last index sync.
    generation: u64,
    /// The flush journal's bookkeeping.
    journal: JournalBook,
}

struct FillReg {
    id: u64,
    rx: watch::Receiver<FillResult>,
}

/// What a read finds for a block.
enum Lookup {
    /// Cached in this slot (pinned if asked); `dirty` if only the cache has the data.
    Hit { slot: u32, dirty: bool },
    /// Cached in part, without the range asked for: complete the entry first.
    Complete(u64),
    /// Being fetched by someone else.
    Join(watch::Receiver<FillResult>),
    /// Not cached: the caller fetches it.
    Fill(FillGuard),
}

/// What a writer gets for a block.
enum Claim {
    /// The entry, dirty, pinned and counted as written to; `complete` if a sector the write
    /// covers in part is missing.
    Ready {
        id: u64,
        slot: u32,
        content: Arc<tokio::sync::Mutex<()>>,
        complete: bool,
    },
    /// Dirty data is at its bound: wait for uploads.
    WaitBudget,
    /// Every slot is dirty, pinned or waiting for the index: wait. `sync` if an index sync
    /// would free one.
    WaitSlot { sync: bool },
}

impl State {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn entry_mut(&mut self, block: u64, id: u64) -> Option<&mut Entry> {
        self.entries.get_mut(&block).filter(|e| e.id == id)
    }

    fn is_entry(&self, block: u64, id: u64) -> bool {
        self.entries.get(&block).is_some_and(|e| e.id == id)
    }

    fn touch(&mut self, block: u64) {
        let tick = self.next_tick();
        if let Some(e) = self.entries.get_mut(&block)
            && !e.dirty
        {
            self.lru.remove(&e.tick);
            e.tick = tick;
            self.lru.insert(tick, block);
        }
    }

    /// A slot nobody uses any more: free, or pending if the index may still name it dirty.
    fn release_slot(&mut self, slot: u32) {
        if self.disk.contains_key(&slot) {
            self.pending.push(slot);
            self.sync_wanted = true;
        } else {
            self.free.push(slot);
        }
    }

    /// Drops a block's entry, dirty or not. True if the index may name it dirty.
    fn remove_entry(&mut self, block: u64) -> bool {
        let Some(e) = self.entries.remove(&block) else {
            return false;
        };
        if e.dirty {
            self.dirty_order.remove(&e.dirty_tick);
            self.dirty_bytes -= u64::from(e.len);
        } else {
            self.lru.remove(&e.tick);
        }
        let recorded = self.disk.contains_key(&e.slot);
        self.went_unwanted(e.slot);
        if e.pins == 0 {
            self.release_slot(e.slot);
        } else {
            self.orphans.insert(e.slot, e.pins);
        }
        recorded
    }

    /// Drops the entries of blocks `first..=last`. True if the index may name one dirty.
    fn drop_range(&mut self, first: u64, last: u64) -> bool {
        let count = last - first + 1;
        let doomed: Vec<u64> = if count <= self.entries.len() as u64 {
            (first..=last)
                .filter(|b| self.entries.contains_key(b))
                .collect()
        } else {
            self.entries
                .keys()
                .copied()
                .filter(|b| (first..=last).contains(b))
                .collect()
        };
        let mut recorded = false;
        for b in doomed {
            recorded |= self.remove_entry(b);
        }
        recorded
    }

    /// Forgets cached copies and fills of blocks `first..=last` (write-through).
    fn invalidate(&mut self, first: u64, last: u64) {
        self.drop_range(first, last);
        let count = last - first + 1;
        if count <= self.fills.len() as u64 {
            for b in first..=last {
                self.fills.remove(&b);
            }
        } else {
            self.fills.retain(|b, _| !(first..=last).contains(b));
        }
    }

    fn is_current(&self, block: u64, id: u64) -> bool {
        self.fills.get(&block).is_some_and(|r| r.id == id)
    }

    /// A slot for a new block: a free one, a never used one, or the least recently used clean
    /// block's if nobody is reading it. The second value asks for an index sync: a clean block
    /// whose record may still say dirty was evicted to `pending`.
    fn alloc_slot(&mut self, slots: u32) -> (Option<u32>, bool) {
        if let Some(s) = self.free.pop() {
            return (Some(s), false);
        }
        if self.fresh < slots {
            self.fresh += 1;
            return (Some(self.fresh - 1), false);
        }
        let mut plain = None;
        let mut recorded = None;
        for &b in self.lru.values() {
            let Some(e) = self.entries.get(&b) else {
                continue;
            };
            if e.pins > 0 {
                continue;
            }
            if !self.disk.contains_key(&e.slot) {
                plain = Some(b);
                break;
            }
            if recorded.is_none() {
                recorded = Some(b);
            }
        }
        if let Some(b) = plain {
            // Not recorded: its slot goes to the free list, and from there to the caller.
            self.remove_entry(b);
            return (self.free.pop(), false);
        }
        if let Some(b) = recorded {
            self.remove_entry(b);
            return (None, true);
        }
        (None, !self.pending.is_empty())
    }

    /// Installs a fetched block as a clean, whole entry.
    fn install_clean(&mut self, block: u64, slot: u32, len: u32, nonzero: Vec<u64>) {
        self.next_id += 1;
        let id = self.next_id;
        let tick = self.next_tick();
        self.entries.insert(
            block,
            Entry {
                id,
                slot,
                len,
                tick,
                pins: 0,
                writers: 0,
                valid: Valid::Full,
                nonzero: Some(nonzero),
                zero_rest: false,
                stamp: 0,
                seq: 0,
                uploaded: 0,
                dirty: false,
                dirty_tick: 0,
                last_write: Instant::now(),
                upload: None,
                failures: 0,
                retry_at: None,
                content: Arc::new(tokio::sync::Mutex::new(())),
            },
        );
        self.lru.insert(tick, block);
    }

    /// Makes a clean entry dirty (its bytes are already counted by the caller).
    fn make_dirty(&mut self, block: u64) {
        let tick = self.next_tick();
        if let Some(e) = self.entries.get_mut(&block)
            && !e.dirty
        {
            self.lru.remove(&e.tick);
            e.dirty = true;
            e.dirty_tick = tick;
            e.last_write = Instant::now();
            self.dirty_order.insert(tick, block);
            self.unwanted.remove(&e.slot);
        }
    }

    /// Marks `slot`, whose entry just went clean or was dropped, for `local_sync`: if the
    /// index names it dirty, its record may go after a flush below that begins from now on.
    /// An entry marked when it went clean keeps that older mark when it is dropped; one made
    /// dirty again lost it.
    fn went_unwanted(&mut self, slot: u32) {
        if self.disk.contains_key(&slot) {
            self.unwanted.entry(slot).or_insert(self.below_started);
        }
    }

    fn make_clean(&mut self, block: u64) {
        let tick = self.next_tick();
        if let Some(e) = self.entries.get_mut(&block)
            && e.dirty
        {
            self.dirty_order.remove(&e.dirty_tick);
            self.dirty_bytes -= u64::from(e.len);
            e.dirty = false;
            e.tick = tick;
            self.lru.insert(tick, block);
            self.sync_wanted = true;
            let slot = e.slot;
            self.went_unwanted(slot);
        }
    }

    /// Takes `block` for a write of sectors where `edges` are the sectors it covers only in
    /// part: reserves dirty bytes (or a slot and dirty bytes for a new entry) and pins it.
    fn claim(&mut self, block: u64, len: u32, edges: &[u64], max_dirty: u64, slots: u32) -> Claim {
        let need = u64::from(len);
        match self.entries.get(&block) {
            Some(e) if !e.dirty && self.dirty_bytes + need > max_dirty => {
                return Claim::WaitBudget;
            }
            Some(e) => {
                if !e.dirty {
                    self.dirty_bytes += need;
                    self.make_dirty(block);
                }
            }
            None => {
                if self.dirty_bytes + need > max_dirty {
                    return Claim::WaitBudget;
                }
                let never_used = self.fresh;
                let (slot, sync) = self.alloc_slot(slots);
                let Some(slot) = slot else {
                    return Claim::WaitSlot { sync };
                };
                // Slots past those ever used are holes (`open` cuts the file there).
                let zero_rest = slot >= never_used;
                // A fetch in flight is older than this write: it must not install.
                self.fills.remove(&block);
                self.dirty_bytes += need;
                self.next_id += 1;
                let id = self.next_id;
                let tick = self.next_tick();
                self.entries.insert(
                    block,
                    Entry {
                        id,
                        slot,
                        len,
                        tick: 0,
                        pins: 0,
                        writers: 0,
                        valid: Valid::empty(sectors_of(len)),
                        nonzero: Some(vec![0; sectors_of(len).div_ceil(64) as usize]),
                        zero_rest,
                        stamp: 0,
                        seq: 0,
                        uploaded: 0,
                        dirty: true,
                        dirty_tick: tick,
                        last_write: Instant::now(),
                        upload: None,
                        failures: 0,
                        retry_at: None,
                        content: Arc::new(tokio::sync::Mutex::new(())),
                    },
                );
                self.dirty_order.insert(tick, block);
            }
        }
        let Some(e) = self.entries.get_mut(&block) else {
            return Claim::WaitSlot { sync: false };
        };
        e.writers += 1;
        e.pins += 1;
        let complete = !e.valid.is_full() && edges.iter().any(|&s| !e.valid.covers(s, s + 1));
        Claim::Ready {
            id: e.id,
            slot: e.slot,
            content: Arc::clone(&e.content),
            complete,
        }
    }

    fn unpin(&mut self, block: u64, slot: u32) {
        if let Some(e) = self.entries.get_mut(&block)
            && e.slot == slot
        {
            e.pins -= 1;
            return;
        }
        if let Some(pins) = self.orphans.get_mut(&slot) {
            *pins -= 1;
            if *pins == 0 {
                self.orphans.remove(&slot);
                self.release_slot(slot);
            }
        }
    }

    /// Gives back a claim that did not write.
    fn release_claim(&mut self, block: u64, id: u64, slot: u32) {
        if let Some(e) = self.entry_mut(block, id) {
            e.writers -= 1;
        }
        self.unpin(block, slot);
    }

    /// Records a finished write of sectors `lo..hi` (whole ones) into the claimed entry.
    /// Returns the entry's new content version, or 0 if the entry was dropped meanwhile.
    fn finish_write(
        &mut self,
        block: u64,
        id: u64,
        slot: u32,
        ok: bool,
        (lo, hi): (u64, u64),
        zeroness: &[(u64, bool)],
    ) -> u64 {
        let mut seq = 0;
        let mut drop_it = false;
        if self.is_entry(block, id) {
            self.next_seq += 1;
            seq = self.next_seq;
            if let Some(e) = self.entry_mut(block, id) {
                e.writers -= 1;
                // Even a failed write may have changed the slot: upload it again.
                e.seq = seq;
                e.last_write = Instant::now();
                let sectors = sectors_of(e.len);
                if ok && lo < hi && e.valid.set(lo, hi, sectors) {
                    e.stamp += 1;
                }
                match (&mut e.nonzero, ok) {
                    (Some(bits), true) => set_bits(bits, zeroness),
                    // A failed write leaves unknown bytes.
                    (nz, _) => *nz = None,
                }
                drop_it = !ok && e.writers == 0 && e.valid.is_empty();
            }
            self.sync_wanted = true;
        }
        self.unpin(block, slot);
        if drop_it {
            self.remove_entry(block);
        }
        seq
    }
}

/// The right to fetch a block and install it. Dropping it (a failed or cancelled fetch)
/// withdraws the registration, and waiting readers then read for themselves.
struct FillGuard {
    shared: Arc<Shared>,
    block: u64,
    id: u64,
    tx: watch::Sender<FillResult>,
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if st.is_current(self.block, self.id) {
            st.fills.remove(&self.block);
        }
    }
}

/// An upload recorded in the state but not yet running. It is spawned only once the state
/// lock is released: a runtime that is shutting down drops a task the moment it is spawned,
/// and the guard's drop takes the lock (spawning under the lock deadlocked on shutdown).
#[must_use = "an upload recorded in the state must be spawned"]
struct NewUpload(UploadGuard);

impl NewUpload {
    fn spawn(self) {
        let NewUpload(mut guard) = self;
        let block = guard.block;
        let id = guard.id;
        tokio::spawn(async move {
            let shared = Arc::clone(&guard.shared);
            let result = shared.upload_once(block, id).await;
            // The guard's drop reports it.
            guard.result.replace(result);
        });
    }
}

/// Finishes an upload, even a cancelled one: clears the entry's upload, counts failures and
/// tells the waiters.
struct UploadGuard {
    shared: Arc<Shared>,
    block: u64,
    id: u64,
    tx: watch::Sender<UploadResult>,
    result: Option<Result<(), BlockError>>,
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        let result = self.result.take().unwrap_or_else(|| {
            Err(BlockError::io(
                "upload",
                self.block * self.shared.block_size,
                io::Error::other("the upload was cancelled"),
            ))
        });
        let failures = {
            let mut st = self.shared.lock();
            st.uploads -= 1;
            let mut failures = 0;
            if let Some(e) = st.entry_mut(self.block, self.id) {
                e.upload = None;
                match &result {
                    Ok(()) => {
                        e.failures = 0;
                        e.retry_at = None;
                    }
                    Err(_) => {
                        e.failures += 1;
                        failures = e.failures;
                        let backoff = RETRY_FIRST
                            .saturating_mul(1 << e.failures.min(16).saturating_sub(1))
                            .min(RETRY_LAST);
                        e.retry_at = Some(Instant::now() + backoff);
                    }
                }
            }
            failures
        };
        if let Err(e) = &result {
            tracing::warn!(dir = %self.shared.dir.display(), block = self.block, failures,
                error = %e, "cannot upload a dirty cache block; it stays dirty and is retried");
        }
        self.tx
            .send_replace(Some(result.map_err(|e| e.to_string())));
        self.shared.changed.notify_waiters();
        self.shared.kick.notify_one();
    }
}

/// Slots pinned for a journal capture: unpinned when dropped.
struct PinGuard {
    shared: Arc<Shared>,
    /// block, slot
    pins: Vec<(u64, u32)>,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if self.pins.is_empty() {
            return;
        }
        let mut st = self.shared.lock();
        for (block, slot) in self.pins.drain(..) {
            st.unpin(block, slot);
        }
        drop(st);
        self.shared.changed.notify_waiters();
    }
}

/// Counts a write, trim or zeroing in flight, for `close`.
struct Mutation {
    shared: Arc<Shared>,
}

impl Drop for Mutation {
    fn drop(&mut self) {
        self.shared.lock().mutations -= 1;
        self.shared.changed.notify_waiters();
    }
}

// ---------------------------------------------------------------------------------------------
// The layer.

/// The cache layer. See the module documentation.
pub struct CacheLayer {
    shared: Arc<Shared>,
}

impl fmt::Debug for CacheLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheLayer")
            .field("dir", &self.shared.dir)
            .field("mode", &self.shared.mode)
            .field("block_size", &self.shared.block_size)
            .field("slots", &self.shared.slots)
            .field("max_dirty", &self.shared.max_dirty)
            .field("inner", &self.shared.inner)
            .finish()
    }
}

/// What the layer, its tasks and its blocking-pool jobs share.
struct Shared {
    inner: Arc<dyn BlockDevice>,
    info: DeviceInfo,
    dir: PathBuf,
    /// The volume key as recorded in the index.
    key: String,
    data: File,
    /// Whether zeroes completing a block are punched out of `data` (until it says it cannot).
    punch_holes: AtomicBool,
    index: File,
    block_size: u64,
    slots: u32,
    record_len: usize,
    mode: CacheMode,
    flush_to: FlushTo,
    /// Whether small writes into slots run on the async worker.
    inline: InlineWrites,
    max_dirty: u64,
    upload_concurrency: usize,
    state: Mutex<State>,
    ranges: Arc<RangeLocks>,
    upload_permits: Semaphore,
    /// Dirty bytes, slots or mutations went down, or an upload finished.
    changed: Notify,
    /// Wakes the uploader.
    kick: Notify,
    /// Wakes the index syncer.
    sync_kick: Notify,
    /// One index sync at a time; FLUSHes that queue share the next one.
    syncs: Arc<SyncGroup>,
    shutdown: watch::Sender<bool>,
    /// The uploader and the index syncer, awaited by `close`.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Writers waiting for dirty bytes or slots: the uploader stops waiting for blocks to rest.
    waiting_writers: AtomicUsize,
    last_read_end: AtomicU64,
    readaheads: AtomicUsize,
    /// The device's journal, when FLUSH and FUA use it.
    journal: Option<Arc<dyn Journal>>,
    /// One journal capture at a time.
    commit_lock: tokio::sync::Mutex<()>,
    /// Journal captures begun, and the number of the last one that succeeded.
    captures_started: AtomicU64,
    captures_done: AtomicU64,
    /// The index syncer's capture that lets records go is running.
    retiring: AtomicBool,
    /// Tests: the uploader starts nothing (FLUSH and FUA still upload).
    #[cfg(test)]
    background_paused: AtomicBool,
    /// Tests: the index syncer does not sync.
    #[cfg(test)]
    syncer_paused: AtomicBool,
}

fn flatten<T>(r: Result<io::Result<T>, tokio::task::JoinError>) -> io::Result<T> {
    r.map_err(|e| io::Error::other(format!("cache job failed: {e}")))?
}

/// Runs file I/O on the blocking pool. The job runs to completion even if the caller is
/// cancelled.
async fn blocking<T, F>(f: F) -> io::Result<T>
where
    F: FnOnce() -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    flatten(tokio::task::spawn_blocking(f).await)
}

/// Awaits a spawned task.
async fn joined<T>(
    op: &'static str,
    offset: u64,
    task: tokio::task::JoinHandle<Result<T, BlockError>>,
) -> Result<T, BlockError> {
    task.await.map_err(|e| {
        BlockError::io(
            op,
            offset,
            io::Error::other(format!("cache task failed: {e}")),
        )
    })?
}

/// Waits for `notify` until `check` gives a value. `check` runs after the waiter is
/// registered, so no notification between the check and the wait is lost.
async fn wait_until<T>(notify: &Notify, mut check: impl FnMut() -> Option<T>) -> T {
    loop {
        let notified = notify.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        if let Some(t) = check() {
            return t;
        }
        notified.await;
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while the map is half-updated; a poisoned lock leaves it sound.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn size(&self) -> u64 {
        self.info.size
    }

    fn block_count(&self) -> u64 {
        self.size().div_ceil(self.block_size)
    }

    /// Length of a block, clipped at the end of the device.
    fn block_len(&self, block: u64) -> u32 {
        // At most block_size, which is at most MAX_PAYLOAD.
        self.block_size.min(self.size() - block * self.block_size) as u32
    }

    /// The blocks a non-empty byte range touches, first and last.
    fn blocks_of(&self, offset: u64, len: u64) -> (u64, u64) {
        let end = offset.saturating_add(len).min(self.size()).max(offset + 1);
        (offset / self.block_size, (end - 1) / self.block_size)
    }

    fn slot_offset(&self, slot: u32) -> u64 {
        u64::from(slot) * self.block_size
    }

    fn record_offset(&self, slot: u32) -> u64 {
        HEADER_LEN + u64::from(slot) * self.record_len as u64
    }

    fn begin_mutation(
        self: &Arc<Self>,
        op: &'static str,
        offset: u64,
    ) -> Result<Mutation, BlockError> {
        let mut st = self.lock();
        if st.closed {
            return Err(BlockError::io(
                op,
                offset,
                io::Error::other("the cache is closed"),
            ));
        }
        st.mutations += 1;
        Ok(Mutation {
            shared: Arc::clone(self),
        })
    }

    /// Finds bytes `range` (within the block; `None`: all of it) of `block` for a read.
    fn lookup(self: &Arc<Self>, block: u64, range: Option<(u64, u64)>, pin: bool) -> Lookup {
        let mut st = self.lock();
        if let Some(e) = st.entries.get_mut(&block) {
            let (lo, hi) = match range {
                Some((a, b)) => (a / SECTOR, b.div_ceil(SECTOR)),
                None => (0, sectors_of(e.len)),
            };
            if !e.valid.covers(lo, hi) {
                return Lookup::Complete(e.id);
            }
            if pin {
                e.pins += 1;
            }
            let (slot, dirty) = (e.slot, e.dirty);
            st.touch(block);
            return Lookup::Hit { slot, dirty };
        }
        if let Some(reg) = st.fills.get(&block) {
            return Lookup::Join(reg.rx.clone());
        }
        st.next_fill += 1;
        let id = st.next_fill;
        let (tx, rx) = watch::channel(None);
        st.fills.insert(block, FillReg { id, rx });
        drop(st);
        Lookup::Fill(FillGuard {
            shared: Arc::clone(self),
            block,
            id,
            tx,
        })
    }

    /// Runs on the blocking pool: writes a fetched block into a slot and installs it if no
    /// write has touched the block since the fetch began, then hands the bytes to waiters.
    fn store(&self, guard: FillGuard, data: Bytes) {
        let block = guard.block;
        let bits = nonzero_bits(&data);
        let installable = |st: &State| {
            st.is_current(block, guard.id) && !st.closed && !st.entries.contains_key(&block)
        };
        let (slot, sync) = {
            let mut st = self.lock();
            if installable(&st) {
                st.alloc_slot(self.slots)
            } else {
                (None, false)
            }
        };
        if sync {
            self.sync_kick.notify_one();
        }
        if let Some(slot) = slot {
            let written = self.data.write_all_at(&data, self.slot_offset(slot));
            let mut st = self.lock();
            match written {
                Ok(()) if installable(&st) => {
                    // A block is at most MAX_PAYLOAD bytes.
                    st.install_clean(block, slot, data.len() as u32, bits);
                    st.fills.remove(&block);
                }
                Ok(()) => st.release_slot(slot),
                Err(e) => {
                    st.release_slot(slot);
                    drop(st);
                    tracing::warn!(dir = %self.dir.display(), block, error = %e,
                        "cannot write to the cache file; the block stays uncached");
                }
            }
            self.changed.notify_waiters();
        }
        guard.tx.send_replace(Some(Some(data)));
    }

    /// Runs on the blocking pool, after `data` was written at `start` of the block in `slot`
    /// (under its content lock): whether each sector it touched may now hold a non-zero
    /// byte. A sector it covers in part is read back.
    fn zeroness(&self, slot: u32, start: u64, data: &[u8], block_len: u64) -> Vec<(u64, bool)> {
        let end = start + data.len() as u64;
        let mut out = Vec::new();
        let mut sector = start / SECTOR;
        while sector * SECTOR < end {
            let (a, b) = (sector * SECTOR, ((sector + 1) * SECTOR).min(block_len));
            let nonzero = if a >= start && b <= end {
                // Within the request.
                !is_zero(&data[(a - start) as usize..(b - start) as usize])
            } else {
                // At most a sector.
                let mut buf = vec![0u8; (b - a) as usize];
                self.data
                    .read_exact_at(&mut buf, self.slot_offset(slot) + a)
                    .map_or(true, |()| !is_zero(&buf))
            };
            out.push((sector, nonzero));
            sector += 1;
        }
        out
    }

    /// Runs on the blocking pool: reads part of a block from its pinned slot, then unpins it.
    /// A clean block that cannot be read is dropped (it is read from below instead).
    fn read_slot(&self, block: u64, slot: u32, start: u64, len: usize) -> io::Result<Bytes> {
        let r = read_exact_at_unzeroed(&self.data, len, self.slot_offset(slot) + start);
        let mut st = self.lock();
        st.unpin(block, slot);
        if r.is_err()
            && st
                .entries
                .get(&block)
                .is_some_and(|e| e.slot == slot && !e.dirty)
        {
            st.remove_entry(block);
        }
        drop(st);
        self.changed.notify_waiters();
        r.map(Bytes::from)
    }

    /// Reads `len` bytes at `start` within `block`.
    async fn read_part(
        self: &Arc<Self>,
        block: u64,
        start: u64,
        len: usize,
    ) -> Result<Bytes, BlockError> {
        // Both bounded by the block, which is at most MAX_PAYLOAD.
        let (lo, hi) = (start as usize, start as usize + len);
        let offset = block * self.block_size + start;
        loop {
            match self.lookup(block, Some((start, start + len as u64)), true) {
                Lookup::Hit { slot, dirty } => {
                    let shared = Arc::clone(self);
                    match blocking(move || shared.read_slot(block, slot, start, len)).await {
                        Ok(data) => return Ok(data),
                        Err(e) if dirty => {
                            tracing::error!(dir = %self.dir.display(), block, error = %e,
                                "cannot read dirty data from the cache file");
                            return Err(BlockError::io("read", offset, e));
                        }
                        Err(e) => tracing::warn!(dir = %self.dir.display(), block,
                            error = %e, "cannot read the cache file; reading from the device below"),
                    }
                    break;
                }
                Lookup::Complete(id) => self.complete(block, id).await?,
                Lookup::Join(mut rx) => {
                    let data = match rx.wait_for(Option::is_some).await {
                        Ok(v) => v.as_ref().and_then(Option::clone),
                        Err(_) => None,
                    };
                    match data {
                        Some(data) => return Ok(data.slice(lo..hi)),
                        None => break,
                    }
                }
                Lookup::Fill(guard) => return Ok(self.fill(guard).await?.slice(lo..hi)),
            }
        }
        // The shared fetch failed or a clean slot could not be read: read for ourselves.
        // len <= block_size <= MAX_PAYLOAD.
        Ok(self.inner.read(offset, len as u32).await?.to_bytes())
    }

    /// Fetches a whole block from below and stores it.
    async fn fill(self: &Arc<Self>, guard: FillGuard) -> Result<Bytes, BlockError> {
        let block = guard.block;
        let offset = block * self.block_size;
        let len = self.block_len(block);
        // Write-back: nothing changes the block below while this is held (a TRIM passed down,
        // an upload). Write-through orders fills by their registration alone, so that a read
        // after a write never waits for a fetch that the write made stale.
        let _range = match self.mode {
            CacheMode::WriteBack => Some(self.ranges.lock(block, block).await),
            CacheMode::WriteThrough => None,
        };
        let data = self.inner.read(offset, len).await?.to_bytes();
        if data.len() != len as usize {
            return Err(short_read(offset, data.len(), len));
        }
        let shared = Arc::clone(self);
        let stored = data.clone();
        // The job runs to completion even if this request is cancelled; its failure is
        // only a block left uncached.
        let _ = tokio::task::spawn_blocking(move || shared.store(guard, stored)).await;
        Ok(data)
    }

    /// Makes sure `block` is cached whole (or being fetched by someone else).
    async fn prefetch(self: &Arc<Self>, block: u64) -> Result<(), BlockError> {
        loop {
            match self.lookup(block, None, false) {
                Lookup::Hit { .. } => return Ok(()),
                Lookup::Complete(id) => self.complete(block, id).await?,
                Lookup::Join(mut rx) => {
                    let _ = rx.wait_for(Option::is_some).await;
                    return Ok(());
                }
                Lookup::Fill(guard) => return self.fill(guard).await.map(|_| ()),
            }
        }
    }

    /// Starts fetching the block after a sequential read, if it is not cached.
    fn read_ahead(self: &Arc<Self>, offset: u64, end: u64) {
        let previous = self.last_read_end.swap(end, Ordering::Relaxed);
        let next = (end - 1) / self.block_size + 1;
        if previous != offset
            || next >= self.block_count()
            || self.readaheads.load(Ordering::Relaxed) >= READAHEAD_MAX
        {
            return;
        }
        {
            let st = self.lock();
            if st.closed || st.entries.contains_key(&next) || st.fills.contains_key(&next) {
                return;
            }
        }
        let Lookup::Fill(guard) = self.lookup(next, None, false) else {
            return;
        };
        self.readaheads.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            let _ = shared.fill(guard).await;
            shared.readaheads.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// Fills the sectors of a partly cached block that its slot lacks, from below.
    async fn complete(self: &Arc<Self>, block: u64, id: u64) -> Result<(), BlockError> {
        let shared = Arc::clone(self);
        let task = tokio::spawn(async move {
            let _range = shared.ranges.lock(block, block).await;
            shared.complete_locked(block, id).await
        });
        joined("read", block * self.block_size, task).await
    }

    /// [`Shared::complete`] for a caller that holds the block's range lock, so the block
    /// below cannot change until the completed block is uploaded or dropped.
    async fn complete_locked(self: &Arc<Self>, block: u64, id: u64) -> Result<(), BlockError> {
        let offset = block * self.block_size;
        let (len, content, zero_rest) = {
            let st = self.lock();
            if st.released {
                // Closed: the directory may belong to a new cache already.
                return Err(BlockError::io(
                    "read",
                    offset,
                    io::Error::other("the cache is closed"),
                ));
            }
            match st.entries.get(&block) {
                Some(e) if e.id == id && !e.valid.is_full() => {
                    (e.len, Arc::clone(&e.content), e.zero_rest)
                }
                _ => return Ok(()),
            }
        };
        let read = self.inner.read(offset, len).await?;
        if read.len() != u64::from(len) {
            // At most len.
            return Err(short_read(offset, read.len() as usize, len));
        }
        // Nothing to write where the slot already reads as the zeroes below.
        let nothing = zero_rest
            && read
                .chunks()
                .iter()
                .all(|c| matches!(c, ReadChunk::Zero(_)));
        let below = if nothing {
            Bytes::new()
        } else {
            read.to_bytes()
        };
        // Writers change the slot under the content lock: the missing sectors stay missing
        // until the bytes from below are in.
        let _content = content.lock_owned().await;
        let (slot, runs) = {
            let mut st = self.lock();
            let Some(e) = st.entry_mut(block, id) else {
                return Ok(());
            };
            if e.valid.is_full() {
                return Ok(());
            }
            e.pins += 1;
            (e.slot, e.valid.runs(sectors_of(len), false))
        };
        let shared = Arc::clone(self);
        blocking(move || {
            // Each missing sector, and whether it may be non-zero.
            let zeroness: Vec<(u64, bool)> = runs
                .iter()
                .flat_map(|&(lo, hi)| lo..hi)
                .map(|sector| {
                    if nothing {
                        return (sector, false);
                    }
                    // Within the block.
                    let a = (sector * SECTOR) as usize;
                    let b = (a + SECTOR as usize).min(below.len());
                    (sector, !is_zero(&below[a..b]))
                })
                .collect();
            let result = if nothing {
                Ok(())
            } else {
                fill_runs(
                    &shared.data,
                    shared.slot_offset(slot),
                    &below,
                    &zeroness,
                    zero_rest,
                    &shared.punch_holes,
                )
            };
            let mut st = shared.lock();
            if result.is_ok()
                && let Some(e) = st.entry_mut(block, id)
            {
                e.valid = Valid::Full;
                e.stamp += 1;
                if let Some(bits) = &mut e.nonzero {
                    set_bits(bits, &zeroness);
                }
                st.sync_wanted = true;
            }
            st.unpin(block, slot);
            drop(st);
            shared.changed.notify_waiters();
            result
        })
        .await
        .map_err(|e| BlockError::io("read", offset, e))
    }

    /// Write-back: writes a request into the cache; with `fua`, uploads it before returning.
    async fn write_back(
        self: Arc<Self>,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), BlockError> {
        let bs = self.block_size;
        let end = offset + data.len() as u64;
        let pieces: Vec<(u64, u64, Bytes)> = (offset / bs..=(end - 1) / bs)
            .map(|b| {
                let from = offset.max(b * bs);
                let to = end.min((b + 1) * bs);
                // Within the request, so within usize.
                let piece = data.slice((from - offset) as usize..(to - offset) as usize);
                (b, from - b * bs, piece)
            })
            .collect();
        let touched: Vec<(u64, u64, u64)> = futures::stream::iter(pieces)
            .map(|(b, start, piece)| {
                let shared = Arc::clone(&self);
                async move {
                    let (id, seq) = shared.write_piece(b, start, piece).await?;
                    Ok::<_, BlockError>((b, id, seq))
                }
            })
            .buffered(PARALLEL_BLOCKS)
            .try_collect()
            .await?;
        if fua {
            self.make_durable(&touched).await?;
        }
        Ok(())
    }

    /// Writes `data` at `start` within `block` into the cache, waiting for dirty room or a slot
    /// if needed. Returns the entry and its content version after the write.
    async fn write_piece(
        self: &Arc<Self>,
        block: u64,
        start: u64,
        data: Bytes,
    ) -> Result<(u64, u64), BlockError> {
        let len = self.block_len(block);
        let offset = block * self.block_size + start;
        let edges = self.edges(block, start, data.len() as u64);
        let (id, slot, content) = loop {
            let notified = self.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let claim = self
                .lock()
                .claim(block, len, &edges, self.max_dirty, self.slots);
            match claim {
                Claim::Ready {
                    id,
                    slot,
                    content,
                    complete: false,
                } => break (id, slot, content),
                Claim::Ready { id, slot, .. } => {
                    self.lock().release_claim(block, id, slot);
                    self.complete(block, id).await?;
                }
                Claim::WaitBudget | Claim::WaitSlot { .. } => {
                    if let Claim::WaitSlot { sync: true } = claim {
                        self.sync_kick.notify_one();
                    }
                    self.waiting_writers.fetch_add(1, Ordering::SeqCst);
                    self.kick.notify_one();
                    notified.await;
                    self.waiting_writers.fetch_sub(1, Ordering::SeqCst);
                }
            }
        };
        let _content = content.lock_owned().await;
        let shared = Arc::clone(self);
        let inline = self.inline.allowed(data.len());
        let write = move || shared.write_claimed(block, id, slot, start, &data, inline);
        // A small write goes straight to the page cache, as on a raw image (`block::inline`).
        let result = if inline {
            write()
        } else {
            blocking(write).await
        };
        result
            .map(|seq| (id, seq))
            .map_err(|e| self.write_failed(block, offset, e))
    }

    /// Write-back of a write that can land at once, if it can: a small write within one block
    /// (see `block::inline`), with dirty room and a slot that needs no eviction, whose sectors
    /// need nothing from below, into a slot nobody else is writing or reading. It runs to the
    /// end without waiting, so it needs no task of its own to be safe from cancellation, and
    /// the connection sends its reply with the others of its batch instead of being woken by
    /// that task (for 4 KiB random writes: 0.33 reply writes per write instead of 0.84).
    ///
    /// Takes the write's [`Mutation`], and gives it back (`Err`) for the general path.
    fn write_now(
        self: &Arc<Self>,
        mutation: Mutation,
        offset: u64,
        data: &[u8],
    ) -> Result<Result<(), BlockError>, Mutation> {
        let bs = self.block_size;
        let len = data.len() as u64;
        let block = offset / bs;
        if len == 0 || (offset + len - 1) / bs != block || !self.inline.allowed(data.len()) {
            return Err(mutation);
        }
        let start = offset - block * bs;
        let edges = self.edges(block, start, len);
        let claimed = {
            let mut st = self.lock();
            if !st.entries.contains_key(&block) && st.free.is_empty() && st.fresh >= self.slots {
                // A slot would have to be taken from another block: the general path does
                // that, once.
                None
            } else {
                match st.claim(
                    block,
                    self.block_len(block),
                    &edges,
                    self.max_dirty,
                    self.slots,
                ) {
                    Claim::Ready {
                        id,
                        slot,
                        content,
                        complete: false,
                    } => Some((id, slot, content)),
                    Claim::Ready { id, slot, .. } => {
                        st.release_claim(block, id, slot);
                        None
                    }
                    Claim::WaitBudget | Claim::WaitSlot { .. } => None,
                }
            }
        };
        let Some((id, slot, content)) = claimed else {
            return Err(mutation);
        };
        let Ok(_content) = content.try_lock_owned() else {
            self.lock().release_claim(block, id, slot);
            return Err(mutation);
        };
        let result = self.write_claimed(block, id, slot, start, data, true);
        drop(mutation);
        Ok(result
            .map(|_| ())
            .map_err(|e| self.write_failed(block, offset, e)))
    }

    /// The sectors a write of `len` bytes at `start` within `block` covers only in part: they
    /// must be cached before it lands.
    fn edges(&self, block: u64, start: u64, len: u64) -> Vec<u64> {
        let end = start + len;
        let mut edges = Vec::new();
        if !start.is_multiple_of(SECTOR) {
            edges.push(start / SECTOR);
        }
        if !end.is_multiple_of(SECTOR) && end != u64::from(self.block_len(block)) {
            edges.push(end / SECTOR);
        }
        edges
    }

    /// Writes a claimed piece into its slot (timed for `block::inline` if `inline`) and
    /// records it under the state lock; the end of every write into the cache, on the async
    /// worker or the blocking pool. Returns the entry's new content version.
    fn write_claimed(
        self: &Arc<Self>,
        block: u64,
        id: u64,
        slot: u32,
        start: u64,
        data: &[u8],
        inline: bool,
    ) -> io::Result<u64> {
        let block_len = self.block_len(block);
        let block_end = u64::from(block_len);
        let end = start + data.len() as u64;
        // The sectors it writes whole.
        let whole_lo = start.div_ceil(SECTOR);
        let whole_hi = if end == block_end {
            sectors_of(block_len)
        } else {
            end / SECTOR
        };
        let at = self.slot_offset(slot) + start;
        // Only the write itself tells whether the kernel pushes back: time spent waiting for
        // the state lock (its holder may be preempted on a busy machine) does not.
        let r = if inline {
            self.inline.run(|| self.data.write_all_at(data, at))
        } else {
            self.data.write_all_at(data, at)
        };
        let zeroness = match r {
            Ok(()) => self.zeroness(slot, start, data, block_end),
            Err(_) => Vec::new(),
        };
        let mut st = self.lock();
        let seq = st.finish_write(block, id, slot, r.is_ok(), (whole_lo, whole_hi), &zeroness);
        if r.is_ok() && seq != 0 {
            // Every sector it wrote to, whole or in part.
            st.journal
                .wrote(block, start / SECTOR, end.div_ceil(SECTOR));
        }
        let kick = r.is_err() || self.upload_kick_needed(&st);
        drop(st);
        self.changed.notify_waiters();
        if kick {
            self.kick.notify_one();
        }
        r.map(|()| seq)
    }

    /// The error of a write the cache file refused.
    fn write_failed(&self, block: u64, offset: u64, e: io::Error) -> BlockError {
        tracing::error!(dir = %self.dir.display(), block, error = %e,
            "cannot write to the cache file; the write fails");
        BlockError::io("write", offset, e)
    }

    /// FUA: uploads the given versions of these blocks and makes them durable below, and
    /// syncs the index if it may hold older dirty data of them.
    async fn make_durable(self: &Arc<Self>, touched: &[(u64, u64, u64)]) -> Result<(), BlockError> {
        if self.journal.is_some() {
            return self.journal_flush().await;
        }
        if self.flush_to == FlushTo::Local {
            // Below first: what was passed down or uploaded before is durable there, so the
            // index sync may let those records go. It records the blocks just written as
            // dirty, data first.
            self.flush_below().await?;
            return self.sync_local(true).await;
        }
        let errors: Vec<BlockError> = futures::stream::iter(touched.iter().copied())
            .map(|(b, id, seq)| self.ensure_uploaded(b, id, seq))
            .buffer_unordered(self.upload_concurrency)
            .filter_map(|r| async move { r.err() })
            .collect()
            .await;
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
        let recorded = {
            let st = self.lock();
            st.disk
                .values()
                .any(|r| touched.iter().any(|t| t.0 == r.block))
        };
        self.flush_below().await?;
        if recorded {
            self.sync_local(true).await?;
        }
        Ok(())
    }

    /// Returns once content version `seq` of entry `id` of `block` (or a later one) is below,
    /// or the entry is gone (dropped by a TRIM or zeroing that was passed down, or evicted
    /// clean). Fails if an upload it waited for failed.
    async fn ensure_uploaded(
        self: &Arc<Self>,
        block: u64,
        id: u64,
        seq: u64,
    ) -> Result<(), BlockError> {
        loop {
            let (mut rx, started) = {
                let mut st = self.lock();
                let Some(e) = st.entry_mut(block, id) else {
                    return Ok(());
                };
                if e.uploaded >= seq {
                    return Ok(());
                }
                match self.start_upload(&mut st, block) {
                    Some(upload) => upload,
                    None => return Ok(()),
                }
            };
            if let Some(upload) = started {
                upload.spawn();
            }
            let outcome = match rx.wait_for(Option::is_some).await {
                Ok(v) => v.clone().unwrap_or(Ok(())),
                Err(_) => Err("the upload was abandoned".to_owned()),
            };
            if let Err(msg) = outcome {
                return Err(BlockError::io(
                    "flush",
                    block * self.block_size,
                    io::Error::other(format!("cache block {block} was not uploaded: {msg}")),
                ));
            }
        }
    }

    /// The upload of `block` in flight, or a new one: then also the upload to spawn once `st`
    /// is unlocked.
    #[must_use = "a new upload must be spawned once the state lock is released"]
    fn start_upload(
        self: &Arc<Self>,
        st: &mut State,
        block: u64,
    ) -> Option<(watch::Receiver<UploadResult>, Option<NewUpload>)> {
        let e = st.entries.get_mut(&block)?;
        if let Some(rx) = &e.upload {
            return Some((rx.clone(), None));
        }
        let (tx, rx) = watch::channel(None);
        e.upload = Some(rx.clone());
        let id = e.id;
        st.uploads += 1;
        let guard = UploadGuard {
            shared: Arc::clone(self),
            block,
            id,
            tx,
            result: None,
        };
        Some((rx, Some(NewUpload(guard))))
    }

    /// Writes a dirty block below, whole, completing it from below first if it is cached in
    /// part; marks it clean if nothing wrote to it meanwhile.
    async fn upload_once(self: &Arc<Self>, block: u64, id: u64) -> Result<(), BlockError> {
        let offset = block * self.block_size;
        let _permit = self.upload_permits.acquire().await.map_err(|_| {
            BlockError::io("upload", offset, io::Error::other("the cache is closed"))
        })?;
        let _range = self.ranges.lock(block, block).await;
        let (partial, content) = {
            let st = self.lock();
            match st.entries.get(&block) {
                Some(e) if e.id == id && e.dirty => (!e.valid.is_full(), Arc::clone(&e.content)),
                _ => return Ok(()),
            }
        };
        if partial {
            self.complete_locked(block, id).await?;
        }
        let guard = content.lock_owned().await;
        let (slot, seq, len) = {
            let mut st = self.lock();
            let Some(e) = st.entry_mut(block, id) else {
                return Ok(());
            };
            if !e.dirty {
                return Ok(());
            }
            if !e.valid.is_full() {
                return Err(BlockError::io(
                    "upload",
                    offset,
                    io::Error::other("the block could not be completed from below"),
                ));
            }
            e.pins += 1;
            (e.slot, e.seq, e.len)
        };
        let shared = Arc::clone(self);
        let data = blocking(move || shared.read_slot(block, slot, 0, len as usize)).await;
        drop(guard);
        let data = data.map_err(|e| {
            tracing::error!(dir = %self.dir.display(), block, error = %e,
                "cannot read dirty data from the cache file");
            BlockError::io("upload", offset, e)
        })?;
        if is_zero(&data) {
            // A zero chunk is a deleted chunk.
            self.inner
                .write_zeroes(offset, u64::from(len), ZeroFlags::default())
                .await?;
        } else {
            self.inner.write(offset, data, false).await?;
        }
        let mut st = self.lock();
        if let Some(e) = st.entry_mut(block, id) {
            e.uploaded = e.uploaded.max(seq);
            if e.seq == seq && e.writers == 0 {
                st.make_clean(block);
                st.journal.settled(block);
            }
        }
        drop(st);
        self.changed.notify_waiters();
        Ok(())
    }

    /// Starts uploads of dirty blocks that are due, oldest first, within the concurrency: those
    /// that rested for [`WRITEBACK_DELAY`], and when dirty data passes half its bound also
    /// those cached whole. A block still being written in pieces (recent and partial) is taken
    /// only if writers wait and nothing else can make room: uploading it now would cost a read
    /// below. Returns when to look again.
    fn schedule_uploads(self: &Arc<Self>) -> Duration {
        let now = Instant::now();
        let mut st = self.lock();
        st.upload_wake = None;
        #[cfg(test)]
        if self.background_paused.load(Ordering::SeqCst) {
            return UPLOADER_IDLE;
        }
        if st.closed {
            return UPLOADER_IDLE;
        }
        let waiting = self.waiting_writers.load(Ordering::SeqCst) > 0;
        {
            let State {
                entries, journal, ..
            } = &mut *st;
            if journal.on {
                journal.keep_from(entries);
            }
        }
        let pressure = waiting || self.short_of_room(&st);
        let room = self.upload_concurrency.saturating_sub(st.uploads);
        let mut picks = Vec::new();
        let mut fallback = Vec::new();
        let mut next: Option<Instant> = None;
        for &block in st.dirty_order.values() {
            if picks.len() >= room {
                break;
            }
            let Some(e) = st.entries.get(&block) else {
                continue;
            };
            if e.upload.is_some() || e.writers > 0 {
                continue;
            }
            if let Some(t) = e.retry_at
                && t > now
            {
                next = Some(next.map_or(t, |n| n.min(t)));
                continue;
            }
            let due = e.last_write + WRITEBACK_DELAY;
            if due <= now || (pressure && e.valid.is_full()) {
                picks.push(block);
                continue;
            }
            next = Some(next.map_or(due, |n| n.min(due)));
            if waiting && fallback.len() < room {
                fallback.push(block);
            }
        }
        if picks.is_empty() && st.uploads == 0 {
            picks = fallback;
        }
        let started: Vec<NewUpload> = picks
            .into_iter()
            .filter_map(|block| self.start_upload(&mut st, block).and_then(|(_, new)| new))
            .collect();
        let wait = next
            .map_or(UPLOADER_IDLE, |t| t.saturating_duration_since(now))
            .clamp(Duration::from_millis(1), UPLOADER_IDLE);
        st.upload_wake = Some(now + wait);
        drop(st);
        for upload in started {
            upload.spawn();
        }
        wait
    }

    /// True if blocks are uploaded without waiting to rest: dirty data passed half of
    /// `max_dirty`, or journal records (which wait for the uploads of their blocks) all of it.
    fn short_of_room(&self, st: &State) -> bool {
        st.dirty_bytes.saturating_mul(2) >= self.max_dirty
            || (st.journal.on && st.journal.live_bytes > self.max_dirty)
    }

    /// True if a write just finished must wake the uploader: under pressure, or when the
    /// uploader's next look would come later than the written block is due. Otherwise the
    /// uploader finds the block when it next looks anyway, and a stream of small writes does
    /// not make it walk every dirty block once a write.
    fn upload_kick_needed(&self, st: &State) -> bool {
        self.short_of_room(st)
            || st
                .upload_wake
                .is_none_or(|wake| wake > Instant::now() + WRITEBACK_DELAY)
    }

    /// Write-back TRIM and WRITE_ZEROES: whole blocks are passed down and their cached copies
    /// dropped; the partial blocks at the ends are zeroed in the cache if cached, else passed
    /// down.
    async fn zero_back(
        self: Arc<Self>,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
        trim: bool,
    ) -> Result<(), BlockError> {
        let bs = self.block_size;
        let end = offset + len;
        let (first, last) = self.blocks_of(offset, len);
        let whole = |b: u64| offset <= b * bs && end >= b * bs + u64::from(self.block_len(b));
        let mut edges = Vec::new();
        if !whole(first) {
            edges.push(first);
        }
        if last != first && !whole(last) {
            edges.push(last);
        }
        let range = self.ranges.lock(first, last).await;
        // No fetch or upload of these blocks runs now, and none starts until the range is
        // released; writes may still add entries, which are newer than this request.
        // A partial block cached here is zeroed here; with FAST_ZERO that is a write, not
        // faster than one: refused if the block is dirty, else left to the device below.
        let local: Vec<u64> = {
            let st = self.lock();
            if flags.fast
                && edges
                    .iter()
                    .any(|b| st.entries.get(b).is_some_and(|e| e.dirty))
            {
                return Err(BlockError::FastZeroUnsupported);
            }
            edges
                .iter()
                .copied()
                .filter(|b| !flags.fast && st.entries.contains_key(b))
                .collect()
        };
        let mut lo = offset;
        let mut hi = end;
        if local.contains(&first) {
            lo = ((first + 1) * bs).min(end);
        }
        if local.contains(&last) {
            hi = (last * bs).max(lo);
        }
        let passed = if lo >= hi {
            Ok(())
        } else if trim {
            self.inner.trim(lo, hi - lo, flags.fua).await
        } else {
            self.inner.write_zeroes(lo, hi - lo, flags).await
        };
        let mut recorded = false;
        if passed.is_ok() {
            let w_first = if whole(first) { first } else { first + 1 };
            let w_last = if whole(last) {
                Some(last)
            } else {
                last.checked_sub(1)
            };
            let dropped = w_last
                .filter(|&w_last| w_first <= w_last)
                .map(|w_last| (w_first, w_last));
            let mut st = self.lock();
            // Clean copies of partial blocks passed down are stale now (entries added by
            // writes meanwhile are dirty, and newer).
            for b in edges.iter().filter(|b| !local.contains(b)) {
                if st.entries.get(b).is_some_and(|e| !e.dirty) {
                    st.remove_entry(*b);
                }
            }
            if let Some((w_first, w_last)) = dropped {
                recorded = st.drop_range(w_first, w_last);
            }
            // A record may also outlive its entry (evicted clean, its record waiting for a
            // flush below): it names older data than the zeroing too.
            recorded |= st.disk.values().any(|r| (first..=last).contains(&r.block));
            if lo < hi {
                // In the same step as the drop: a capture sees both or neither.
                st.journal.zeroed(lo, hi - lo, dropped);
                // A write racing this request may have cached an edge block passed down, and a
                // capture may have taken it already: record what it holds in the range again,
                // after the zero range, as the cache serves it.
                for &b in edges.iter().filter(|b| !local.contains(b)) {
                    let State {
                        entries, journal, ..
                    } = &mut *st;
                    let Some(e) = entries.get(&b).filter(|e| e.dirty) else {
                        continue;
                    };
                    let start = b * bs;
                    let (a, z) = (lo.max(start), hi.min(start + u64::from(e.len)));
                    if a >= z {
                        continue;
                    }
                    let range = [((a - start) / SECTOR, (z - start).div_ceil(SECTOR))];
                    let held = Runs(e.valid.runs(sectors_of(e.len), true)).intersect(&range);
                    for &(x, y) in &held.0 {
                        journal.wrote(b, x, y);
                    }
                }
            }
            drop(st);
            self.changed.notify_waiters();
        }
        drop(range);
        passed?;
        let mut touched = Vec::new();
        for b in local {
            let from = offset.max(b * bs);
            let to = end.min(b * bs + u64::from(self.block_len(b)));
            // At most a block.
            let zeroes = Bytes::from(vec![0u8; (to - from) as usize]);
            let (id, seq) = self.write_piece(b, from - b * bs, zeroes).await?;
            touched.push((b, id, seq));
        }
        if flags.fua {
            if self.journal.is_some() {
                // The zero range must reach the journal: older records may hold data there.
                return self.journal_flush().await;
            }
            if recorded {
                // The zeroing passed down must be durable before the records of the blocks it
                // dropped go, or a crash would replay their older data over it.
                self.flush_below().await?;
                self.sync_local(true).await?;
            }
            if !touched.is_empty() {
                self.make_durable(&touched).await?;
            }
        }
        Ok(())
    }

    /// Write-back FLUSH: uploads every block dirty now, flushes below, syncs the index. With
    /// `flush = "local"`, only flushes below (for TRIMs and zeroing passed down, and so that
    /// records of uploaded blocks may go) and syncs the index (which makes every write
    /// acknowledged so far durable in the cache).
    async fn flush_back(self: &Arc<Self>) -> Result<(), BlockError> {
        if self.lock().released {
            return self.flush_to_store().await;
        }
        if self.journal.is_some() {
            return self.journal_flush().await;
        }
        if self.flush_to == FlushTo::Local {
            // Below first, as in `make_durable`.
            self.flush_below().await?;
            return self.sync_local(true).await;
        }
        self.flush_to_store().await
    }

    /// FLUSH and FUA with a journal: the index sync (so that what a restart replays from the
    /// cache is never older than what the journal holds) and a journal record of everything
    /// written since the last one, at once.
    async fn journal_flush(self: &Arc<Self>) -> Result<(), BlockError> {
        let local = async {
            // Below first, as in `make_durable`.
            self.flush_below().await?;
            self.sync_local(true).await
        };
        let (local, committed) = tokio::join!(local, self.commit());
        local?;
        committed
    }

    /// Makes everything written so far durable in the journal: waits for a record captured
    /// after this call to be appended, writing it if none is under way (one capture at a time;
    /// callers that arrive meanwhile share the next one).
    async fn commit(self: &Arc<Self>) -> Result<(), BlockError> {
        let arrived = self.captures_started.load(Ordering::SeqCst);
        let shared = Arc::clone(self);
        // In its own task: a capture abandoned halfway would lose what it took.
        let task = tokio::spawn(async move {
            let _one = shared.commit_lock.lock().await;
            if shared.captures_done.load(Ordering::SeqCst) > arrived {
                return Ok(());
            }
            shared.capture(false).await
        });
        joined("flush", 0, task).await
    }

    /// Takes what changed since the last record and appends it to the journal (in records of
    /// at most [`RECORD_MAX`] data bytes), telling the journal which older records it still
    /// needs. Appends nothing if nothing changed and no record can be let go, unless `close`:
    /// then, with nothing live, it leaves one empty record that needs nothing before it. The
    /// caller holds `commit_lock`.
    async fn capture(self: &Arc<Self>, close: bool) -> Result<(), BlockError> {
        let Some(journal) = self.journal.clone() else {
            return Ok(());
        };
        let bs = self.block_size;
        let (number, taken, zeroed, mut pins, mut keep_from) = {
            let mut st = self.lock();
            if st.released {
                return Err(BlockError::io(
                    "flush",
                    0,
                    io::Error::other("the cache is closed"),
                ));
            }
            let number = self.captures_started.fetch_add(1, Ordering::SeqCst) + 1;
            let State {
                entries, journal, ..
            } = &mut *st;
            let keep_from = journal.keep_from(entries);
            let nothing = journal.zeroed.is_empty()
                && journal
                    .blocks
                    .values()
                    .all(|p| p.runs.is_empty() && !p.settled);
            // After an append that failed, the journal may hold a record nobody replaced yet:
            // the next capture must write, whatever else.
            let skip = nothing
                && !journal.append_failed
                && if close {
                    journal.last.is_none() || (journal.tail_clean && keep_from == u64::MAX)
                } else {
                    !journal.can_let_go(entries)
                };
            if skip {
                self.captures_done.store(number, Ordering::SeqCst);
                return Ok(());
            }
            let taken = std::mem::take(&mut journal.blocks);
            let zeroed = std::mem::take(&mut journal.zeroed);
            let mut pins = Vec::new();
            let mut lost = Vec::new();
            for (&b, p) in &taken {
                if p.runs.is_empty() {
                    continue;
                }
                match entries.get_mut(&b) {
                    Some(e) if e.dirty => {
                        e.pins += 1;
                        pins.push(Captured {
                            block: b,
                            id: e.id,
                            seq: e.seq,
                            slot: e.slot,
                            len: e.len,
                            runs: p.runs.clone(),
                        });
                    }
                    _ => lost.push(b),
                }
            }
            if !lost.is_empty() {
                // Never expected: written sectors always belong to a dirty entry.
                tracing::error!(dir = %self.dir.display(), blocks = ?lost,
                    "journal bookkeeping names blocks that are not dirty in the cache");
            }
            (number, taken, zeroed, pins, keep_from)
        };
        pins.sort_unstable_by_key(|p| p.block);
        let mut unpin = PinGuard {
            shared: Arc::clone(self),
            pins: pins.iter().map(|p| (p.block, p.slot)).collect(),
        };
        // With nothing older kept, settled ranges and zero ranges mask nothing: leave them out.
        let mut first: Vec<JournalEntry> = Vec::new();
        if keep_from != u64::MAX {
            let mut settled: Vec<u64> = taken
                .iter()
                .filter(|(_, p)| p.settled)
                .map(|(&b, _)| b)
                .collect();
            settled.sort_unstable();
            first.extend(settled.into_iter().map(|b| JournalEntry::Settled {
                offset: b * bs,
                len: u64::from(self.block_len(b)),
            }));
            first.extend(
                zeroed
                    .iter()
                    .map(|&(offset, len)| JournalEntry::Zero { offset, len }),
            );
        }
        let result: Result<(), BlockError> = async {
            let mut batches: Vec<Vec<Captured>> = vec![Vec::new()];
            let mut size = 0u64;
            for p in pins.drain(..) {
                let bytes = p.bytes();
                if size > 0 && size + bytes > RECORD_MAX {
                    batches.push(Vec::new());
                    size = 0;
                }
                size += bytes;
                if let Some(b) = batches.last_mut() {
                    b.push(p);
                }
            }
            // Settled and zero ranges beyond what one record should describe go first, alone.
            while first.len() > RECORD_ENTRIES {
                let rest = first.split_off(RECORD_ENTRIES);
                let head = std::mem::replace(&mut first, rest);
                let n = journal.append(head, keep_from).await?;
                self.appended(n, 0, Vec::new(), false, &mut keep_from);
            }
            let mut first = Some(std::mem::take(&mut first));
            for batch in batches {
                let shared = Arc::clone(self);
                // Batches take the pins in order.
                let release: Vec<(u64, u32)> = unpin.pins.drain(..batch.len()).collect();
                let reads = batch.clone();
                let data = blocking(move || {
                    let guard = PinGuard {
                        shared: Arc::clone(&shared),
                        pins: release,
                    };
                    let r = shared.read_runs(&reads);
                    drop(guard);
                    r
                })
                .await
                .map_err(|e| {
                    tracing::error!(dir = %self.dir.display(), error = %e,
                        "cannot read dirty data from the cache file");
                    BlockError::io("flush", 0, e)
                })?;
                let mut entries = first.take().unwrap_or_default();
                let bytes = data.iter().map(|(_, d)| d.len() as u64).sum();
                entries.extend(
                    data.into_iter()
                        .map(|(offset, data)| JournalEntry::Data { offset, data }),
                );
                // Empty, and needing nothing before it.
                let clean = entries.is_empty() && keep_from == u64::MAX;
                let n = journal.append(entries, keep_from).await?;
                let blocks = batch.iter().map(|p| (p.block, p.id, p.seq)).collect();
                self.appended(n, bytes, blocks, clean, &mut keep_from);
            }
            Ok(())
        }
        .await;
        drop(unpin);
        match result {
            Ok(()) => {
                self.captures_done.store(number, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => {
                let mut st = self.lock();
                let State {
                    entries, journal, ..
                } = &mut *st;
                journal.put_back(entries, taken, zeroed);
                journal.append_failed = true;
                Err(e)
            }
        }
    }

    /// Records a record appended by a capture: `blocks` (block, entry id, content version) are
    /// those it holds data of, `bytes` its data; `clean` if it is empty and needs nothing before
    /// it. Later records of the same capture keep it.
    fn appended(
        &self,
        n: u64,
        bytes: u64,
        blocks: Vec<(u64, u64, u64)>,
        clean: bool,
        keep_from: &mut u64,
    ) {
        let mut st = self.lock();
        let book = &mut st.journal;
        book.append_failed = false;
        book.tail_clean = clean;
        book.last = Some(n);
        book.announced = (*keep_from).min(n);
        if *keep_from == u64::MAX {
            *keep_from = n;
        }
        if !blocks.is_empty() {
            book.live_bytes += bytes;
            book.live.push_back(LiveRecord { n, bytes, blocks });
        }
    }

    /// True if the oldest journal record still counted as needed is settled now, so that the
    /// next record would let it go.
    fn journal_retirable(&self) -> bool {
        let mut st = self.lock();
        let State {
            entries, journal, ..
        } = &mut *st;
        journal.can_let_go(entries)
    }

    /// Runs on the blocking pool: reads the written sectors of captured (pinned) slots as
    /// journal data: device offset and bytes.
    fn read_runs(&self, reads: &[Captured]) -> io::Result<Vec<(u64, Bytes)>> {
        let mut out = Vec::new();
        for c in reads {
            for &(lo, hi) in &c.runs.0 {
                let a = lo * SECTOR;
                let b = (hi * SECTOR).min(u64::from(c.len));
                if a >= b {
                    continue;
                }
                // Within a block.
                let buf = read_exact_at_unzeroed(
                    &self.data,
                    (b - a) as usize,
                    self.slot_offset(c.slot) + a,
                )?;
                out.push((c.block * self.block_size + a, Bytes::from(buf)));
            }
        }
        Ok(out)
    }

    /// Uploads every block dirty now, flushes below, syncs the index.
    async fn flush_to_store(self: &Arc<Self>) -> Result<(), BlockError> {
        let snapshot: Vec<(u64, u64, u64)> = {
            let st = self.lock();
            if st.released {
                // After close: the directory may belong to a new cache already.
                if !st.dirty_order.is_empty() {
                    return Err(BlockError::io(
                        "flush",
                        0,
                        io::Error::other("the cache is closed with dirty blocks not uploaded"),
                    ));
                }
                Vec::new()
            } else {
                st.dirty_order
                    .values()
                    .filter_map(|b| st.entries.get(b).map(|e| (*b, e.id, e.seq)))
                    .filter(|&(b, _, seq)| st.entries.get(&b).is_some_and(|e| seq > e.uploaded))
                    .collect()
            }
        };
        let errors: Vec<BlockError> = futures::stream::iter(snapshot)
            .map(|(b, id, seq)| self.ensure_uploaded(b, id, seq))
            .buffer_unordered(self.upload_concurrency)
            .filter_map(|r| async move { r.err() })
            .collect()
            .await;
        // Durable below, then the index lets their records go; even if something failed,
        // for what did upload.
        let below = self.flush_below().await;
        let synced = self.sync_local(false).await;
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
        below?;
        synced
    }

    /// Flushes the device below, counting it for the records that wait for one (see
    /// `local_sync`).
    async fn flush_below(&self) -> Result<(), BlockError> {
        let number = {
            let mut st = self.lock();
            st.below_started += 1;
            st.below_started
        };
        self.inner.flush().await?;
        let mut st = self.lock();
        st.below_durable = st.below_durable.max(number);
        if st.removals_held {
            st.sync_wanted = true;
        }
        Ok(())
    }

    /// Runs the index sync on the blocking pool; waits for one under way without a thread.
    async fn sync_local(self: &Arc<Self>, force: bool) -> Result<(), BlockError> {
        let shared = Arc::clone(self);
        // A forced sync (FLUSH, FUA) is done by any that begins after it is asked for.
        let ticket = if force { self.syncs.ticket() } else { u64::MAX };
        self.syncs
            .sync_async(ticket, move || shared.local_sync(force))
            .await
            .map_err(|e| {
                tracing::error!(dir = %self.dir.display(), error = %e, "cannot sync the cache index");
                BlockError::io("flush", 0, e)
            })
    }

    /// The index sync (see the module documentation): snapshot what the index should say,
    /// `fdatasync` the data, write the records that differ, `fdatasync` the index. Slots
    /// whose dirty records are now durably gone become free. Runs under `syncs`; returns
    /// whether it synced.
    fn local_sync(&self, force: bool) -> io::Result<bool> {
        let (writes, generation) = {
            let mut st = self.lock();
            if st.released || (!st.sync_wanted && !force) {
                return Ok(false);
            }
            st.sync_wanted = false;
            st.generation += 1;
            let generation = st.generation;
            let mut writes: Vec<(u32, Option<RawRecord>)> = Vec::new();
            let mut wanted = HashSet::new();
            let State {
                entries,
                disk,
                dirty_order,
                ..
            } = &mut *st;
            for &block in dirty_order.values() {
                let Some(e) = entries.get(&block) else {
                    continue;
                };
                if e.valid.is_empty() {
                    continue;
                }
                wanted.insert(e.slot);
                let rec = DiskRec {
                    block,
                    id: e.id,
                    stamp: e.stamp,
                };
                if disk.get(&e.slot) != Some(&rec) {
                    // From now on the slot may be named dirty on disk.
                    disk.insert(e.slot, rec);
                    let raw = RawRecord {
                        block,
                        generation,
                        kind: KIND_DIRTY,
                        bitmap: e.valid.to_bitmap(bitmap_len(self.block_size)),
                    };
                    writes.push((e.slot, Some(raw)));
                }
            }
            // A block no longer dirty was uploaded (or dropped) below; its record goes once a
            // flush below that began after that succeeded, or a power loss could lose it. (A
            // slot not marked when that happened is marked now, which is later: safe.)
            let (below_started, below_durable) = (st.below_started, st.below_durable);
            let mut held = false;
            let State { disk, unwanted, .. } = &mut *st;
            unwanted.retain(|slot, _| disk.contains_key(slot) && !wanted.contains(slot));
            for &slot in disk.keys() {
                if wanted.contains(&slot) {
                    continue;
                }
                let seen = *unwanted.entry(slot).or_insert(below_started);
                if below_durable > seen {
                    writes.push((slot, None));
                } else {
                    held = true;
                }
            }
            st.removals_held = held;
            (writes, generation)
        };
        let result = (|| {
            self.data.sync_data()?;
            if writes.is_empty() {
                return Ok(());
            }
            for (slot, raw) in &writes {
                let raw = raw.clone().unwrap_or(RawRecord {
                    block: 0,
                    generation,
                    kind: KIND_EMPTY,
                    bitmap: None,
                });
                let bytes = encode_record(*slot, &raw, self.record_len);
                self.index.write_all_at(&bytes, self.record_offset(*slot))?;
            }
            self.index.sync_data()
        })();
        let mut st = self.lock();
        match &result {
            Ok(()) => {
                for (slot, raw) in &writes {
                    if raw.is_none() {
                        st.disk.remove(slot);
                    }
                }
                let pending = std::mem::take(&mut st.pending);
                for slot in pending {
                    if st.disk.contains_key(&slot) {
                        st.pending.push(slot);
                    } else {
                        st.free.push(slot);
                    }
                }
            }
            Err(_) => {
                // Write these records again next time.
                for (slot, raw) in &writes {
                    if raw.is_some()
                        && let Some(r) = st.disk.get_mut(slot)
                    {
                        r.stamp = u64::MAX;
                    }
                }
                st.sync_wanted = true;
            }
        }
        drop(st);
        self.changed.notify_waiters();
        result.map(|()| true)
    }

    /// At a clean close, after everything was uploaded and synced: records every cached block
    /// as clean and marks the index closed cleanly, so the next open keeps them.
    fn write_clean_index(&self) -> io::Result<bool> {
        let mut clean = false;
        // Alone, and standing in for no FLUSH.
        self.syncs.sync(u64::MAX, || {
            clean = self.write_clean_records()?;
            Ok(false)
        })?;
        Ok(clean)
    }

    /// `write_clean_index`, under `syncs`.
    fn write_clean_records(&self) -> io::Result<bool> {
        let (clean, generation) = {
            let mut st = self.lock();
            if !st.disk.is_empty() || !st.dirty_order.is_empty() {
                return Ok(false);
            }
            st.generation += 1;
            let clean: Vec<(u32, u64)> = st
                .entries
                .iter()
                .filter(|(_, e)| !e.dirty && e.valid.is_full())
                .map(|(&b, e)| (e.slot, b))
                .collect();
            (clean, st.generation)
        };
        self.data.sync_data()?;
        for (slot, block) in clean {
            let raw = RawRecord {
                block,
                generation,
                kind: KIND_CLEAN,
                bitmap: None,
            };
            self.index.write_all_at(
                &encode_record(slot, &raw, self.record_len),
                self.record_offset(slot),
            )?;
        }
        self.index.sync_data()?;
        let header = Header {
            state: STATE_CLOSED,
            block_size: self.block_size,
            slots: self.slots,
            // At most a few KiB.
            record_len: self.record_len as u32,
            key: self.key.clone(),
        };
        self.index.write_all_at(&encode_header(&header), 0)?;
        self.index.sync_data()?;
        Ok(true)
    }

    /// Write-through: runs a change to the device below in its own task, invalidating the
    /// blocks it touches before and after it.
    async fn mutate<F, Fut>(
        self: &Arc<Self>,
        op: &'static str,
        offset: u64,
        len: u64,
        change: F,
    ) -> Result<(), BlockError>
    where
        F: FnOnce(Arc<dyn BlockDevice>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), BlockError>> + Send + 'static,
    {
        let mutation = self.begin_mutation(op, offset)?;
        let shared = Arc::clone(self);
        let task = tokio::spawn(async move {
            let _mutation = mutation;
            let (first, last) = shared.blocks_of(offset, len);
            // Not needed for coherency (the invalidation after is), but it stops fetches
            // that are about to be stale from taking slots.
            shared.lock().invalidate(first, last);
            let result = change(Arc::clone(&shared.inner)).await;
            // Even a failed change may have changed some of the range.
            shared.lock().invalidate(first, last);
            shared.changed.notify_waiters();
            result
        });
        joined(op, offset, task).await
    }
}

fn short_read(offset: u64, got: usize, len: u32) -> BlockError {
    BlockError::io(
        "read",
        offset,
        io::Error::other(format!(
            "the device below returned {got} bytes instead of {len}"
        )),
    )
}

// ---------------------------------------------------------------------------------------------
// Opening: the directory, recovery, replay.

/// The locked data file and what the index said, if it belongs to this volume.
struct Prepared {
    data: File,
    found: Option<(Header, Vec<u8>)>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + use<> {
    let path = path.to_owned();
    move |source| CacheError::Io { path, source }
}

/// Creates the directory if needed, opens the data file and locks it. Also says whether the
/// data file existed.
fn open_locked(dir: &Path) -> Result<(File, bool), CacheError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    let data_path = dir.join(DATA_FILE);
    let existed = data_path.exists();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&data_path)
        .map_err(io_err(&data_path))?;
    // Lock before anything else, so a cache in use elsewhere is not clobbered.
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok((file, existed)),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(CacheError::Busy(dir.to_owned())),
        Err(e) => Err(io_err(&data_path)(e.into())),
    }
}

fn valid_geometry(h: &Header) -> bool {
    h.block_size.is_power_of_two()
        && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&h.block_size)
        && (1..=MAX_SLOTS).contains(&u64::from(h.slots))
        && h.record_len as usize == record_len(h.block_size)
}

/// The records of an index, those that pass their checksum.
fn read_records(h: &Header, raw: &[u8]) -> Vec<(u32, RawRecord)> {
    let len = h.record_len as usize;
    let bits = bitmap_len(h.block_size);
    (0..h.slots)
        .filter_map(|slot| {
            let at = HEADER_LEN as usize + slot as usize * len;
            let bytes = raw.get(at..at + len)?;
            decode_record(slot, bytes, bits).map(|r| (slot, r))
        })
        .collect()
}

/// The records recovery trusts: dirty ones, clean ones after a clean close; for a block named
/// twice, the later sync's.
fn trusted_records(h: &Header, raw: &[u8], device_size: u64) -> Vec<(u32, RawRecord)> {
    let blocks = device_size.div_ceil(h.block_size);
    let mut best: HashMap<u64, (u32, RawRecord)> = HashMap::new();
    for (slot, r) in read_records(h, raw) {
        if r.kind == KIND_CLEAN && h.state != STATE_CLOSED {
            continue;
        }
        if r.block >= blocks {
            if r.kind == KIND_DIRTY {
                tracing::warn!(
                    block = r.block,
                    blocks,
                    "ignoring a dirty cache block beyond the end of the device"
                );
            }
            continue;
        }
        let rank = |r: &RawRecord| (r.generation, r.kind == KIND_DIRTY);
        match best.get(&r.block) {
            Some((_, old)) if rank(old) >= rank(&r) => {}
            _ => {
                best.insert(r.block, (slot, r));
            }
        }
    }
    let mut out: Vec<(u32, RawRecord)> = best.into_values().collect();
    out.sort_by_key(|(slot, _)| *slot);
    out
}

/// Renames `dir` to `dir.orphan-<unix time>` (with a counter if taken).
fn set_aside(dir: &Path) -> Result<PathBuf, CacheError> {
    let name = dir.file_name().ok_or_else(|| CacheError::Io {
        path: dir.to_owned(),
        source: io::Error::other("the cache directory has no name to set it aside under"),
    })?;
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for n in 0u32.. {
        let mut target = OsString::from(name);
        target.push(format!(".orphan-{secs}"));
        if n > 0 {
            target.push(format!("-{n}"));
        }
        let target = dir.with_file_name(target);
        if !target.exists() {
            std::fs::rename(dir, &target).map_err(io_err(dir))?;
            return Ok(target);
        }
    }
    Err(CacheError::Io {
        path: dir.to_owned(),
        source: io::Error::other("no name left to set the cache directory aside"),
    })
}

/// Locks the directory and reads its index. A cache of another volume, or one that cannot be
/// understood, is set aside and an empty one started.
fn prepare(dir: &Path, key: &str) -> Result<Prepared, CacheError> {
    let (data, existed) = open_locked(dir)?;
    let index_path = dir.join(INDEX_FILE);
    let raw = match std::fs::read(&index_path) {
        Ok(raw) => raw,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Nothing recorded (a new cache, or one from before the index): nothing to keep.
            let data_path = dir.join(DATA_FILE);
            data.set_len(0).map_err(io_err(&data_path))?;
            return Ok(Prepared { data, found: None });
        }
        Err(e) => return Err(io_err(&index_path)(e)),
    };
    let header = decode_header(&raw);
    let why = match &header {
        Err(why) => format!("its index is unreadable: {why}"),
        Ok(h) if h.key != key => format!("it belongs to volume {:?}", h.key),
        Ok(_) if !existed => "its data file is missing".to_owned(),
        Ok(h) if !valid_geometry(h) => "its index has an impossible geometry".to_owned(),
        Ok(h) => {
            return Ok(Prepared {
                data,
                found: Some((h.clone(), raw)),
            });
        }
    };
    let dirty = match &header {
        Ok(h) if valid_geometry(h) => read_records(h, &raw)
            .iter()
            .filter(|(_, r)| r.kind == KIND_DIRTY)
            .count(),
        _ => 0,
    };
    let aside = set_aside(dir)?;
    drop(data);
    tracing::warn!(dir = %dir.display(), moved_to = %aside.display(), volume = key,
        dirty_blocks = dirty, reason = %why,
        "cache directory set aside and never replayed; starting an empty cache");
    let (data, _) = open_locked(dir)?;
    data.set_len(0).map_err(io_err(&dir.join(DATA_FILE)))?;
    Ok(Prepared { data, found: None })
}

/// Writes dirty blocks recorded with another block size straight to the device below.
async fn replay_foreign(
    inner: &Arc<dyn BlockDevice>,
    data: &File,
    old_block_size: u64,
    records: &[(u32, RawRecord)],
) -> Result<(), BlockError> {
    let size = inner.info().size;
    let piece = u64::from(inner.info().block_sizes.maximum.max(1));
    for (slot, r) in records {
        let start = r.block * old_block_size;
        // At most old_block_size, at most MAX_PAYLOAD.
        let len = old_block_size.min(size - start) as u32;
        let sectors = sectors_of(len);
        let valid = Valid::from_bitmap(r.bitmap.as_deref(), sectors);
        for (lo, hi) in valid.runs(sectors, true) {
            let (a, b) = (lo * SECTOR, (hi * SECTOR).min(u64::from(len)));
            let file = data
                .try_clone()
                .map_err(|e| BlockError::io("read", start, e))?;
            let at = u64::from(*slot) * old_block_size + a;
            let bytes = blocking(move || {
                // Within a block.
                let mut buf = vec![0u8; (b - a) as usize];
                file.read_exact_at(&mut buf, at)?;
                Ok(Bytes::from(buf))
            })
            .await
            .map_err(|e| BlockError::io("read", start + a, e))?;
            let mut done = 0u64;
            while done < b - a {
                let n = piece.min(b - a - done);
                // Within the buffer.
                let part = bytes.slice(done as usize..(done + n) as usize);
                inner.write(start + a + done, part, false).await?;
                done += n;
            }
        }
    }
    inner.flush().await
}

/// Replaces the index with a new one (header, then these records), atomically and durably,
/// after syncing the data the records describe.
fn write_fresh_index(
    dir: &Path,
    data: &File,
    header: &Header,
    records: &[(u32, Vec<u8>)],
) -> io::Result<File> {
    data.sync_data()?;
    let tmp = dir.join(format!("{INDEX_FILE}.tmp"));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all_at(&encode_header(header), 0)?;
    let len = u64::from(header.record_len);
    for (slot, bytes) in records {
        f.write_all_at(bytes, HEADER_LEN + u64::from(*slot) * len)?;
    }
    f.set_len(HEADER_LEN + u64::from(header.slots) * len)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(INDEX_FILE))?;
    File::open(dir)?.sync_all()?;
    Ok(f)
}

/// Records the volume for people reading the directory.
fn write_id_file(dir: &Path, volume_key: &str) -> Result<(), CacheError> {
    let id_path = dir.join(ID_FILE);
    let tmp_path = dir.join(format!("{ID_FILE}.tmp"));
    std::fs::write(&tmp_path, format!("{volume_key}\n")).map_err(io_err(&tmp_path))?;
    std::fs::rename(&tmp_path, &id_path).map_err(io_err(&id_path))
}

impl CacheLayer {
    /// Opens the cache in `dir` (created if missing) over `inner`, for the volume named by
    /// `volume_key`. A cache left there for the same volume is recovered: its dirty blocks are
    /// served from the cache and uploaded (in write-through mode, uploaded before this
    /// returns), and its clean blocks are kept if it was closed cleanly. A cache of another
    /// volume is set aside, never replayed. The directory is locked while the layer lives, so
    /// two caches cannot share it.
    pub async fn open(
        inner: Arc<dyn BlockDevice>,
        params: CacheParams,
        dir: &Path,
        volume_key: &str,
    ) -> Result<CacheLayer, CacheError> {
        Self::open_with(inner, params, dir, volume_key, false).await
    }

    /// Tests: opens with background uploads paused from the start, so that blocks replayed
    /// from an earlier run stay dirty until the test lets them go.
    #[cfg(test)]
    async fn open_paused(
        inner: Arc<dyn BlockDevice>,
        params: CacheParams,
        dir: &Path,
        volume_key: &str,
    ) -> Result<CacheLayer, CacheError> {
        Self::open_with(inner, params, dir, volume_key, true).await
    }

    async fn open_with(
        inner: Arc<dyn BlockDevice>,
        params: CacheParams,
        dir: &Path,
        volume_key: &str,
        #[cfg_attr(not(test), allow(unused_variables))] paused: bool,
    ) -> Result<CacheLayer, CacheError> {
        params.validate()?;
        let bs = inner.info().block_sizes;
        if params.block_size > u64::from(bs.maximum) || params.block_size < u64::from(bs.minimum) {
            return Err(CacheError::BlockSizeVsDevice {
                block_size: params.block_size,
                minimum: bs.minimum,
                maximum: bs.maximum,
            });
        }
        let block_size = params.block_size;
        // validate() bounds this by MAX_SLOTS.
        let slots = (params.size / block_size) as u32;
        let rec_len = record_len(block_size);
        let key = stored_key(volume_key);
        let size = inner.info().size;
        let job_failed = |e: tokio::task::JoinError| CacheError::Io {
            path: dir.to_owned(),
            source: io::Error::other(format!("cache job failed: {e}")),
        };

        let (d, k) = (dir.to_owned(), key.clone());
        let Prepared { data, found } = tokio::task::spawn_blocking(move || prepare(&d, &k))
            .await
            .map_err(job_failed)??;
        let mut recovered = Vec::new();
        if let Some((header, raw)) = found {
            let trusted = trusted_records(&header, &raw, size);
            if header.block_size == block_size && header.slots == slots {
                recovered = trusted;
            } else {
                let dirty: Vec<(u32, RawRecord)> = trusted
                    .into_iter()
                    .filter(|(_, r)| r.kind == KIND_DIRTY)
                    .collect();
                if !dirty.is_empty() {
                    tracing::warn!(dir = %dir.display(), dirty_blocks = dirty.len(),
                        old_block_size = header.block_size, old_slots = header.slots,
                        "writing dirty blocks of a cache with another geometry to the device below");
                    replay_foreign(&inner, &data, header.block_size, &dirty)
                        .await
                        .map_err(|source| CacheError::Replay {
                            dir: dir.to_owned(),
                            blocks: dirty.len(),
                            source,
                        })?;
                }
                data.set_len(0).map_err(io_err(&dir.join(DATA_FILE)))?;
            }
        }
        let dirty_count = recovered
            .iter()
            .filter(|(_, r)| r.kind == KIND_DIRTY)
            .count();
        if dirty_count > 0 && inner.info().read_only {
            return Err(CacheError::Replay {
                dir: dir.to_owned(),
                blocks: dirty_count,
                source: BlockError::ReadOnly,
            });
        }

        // The slot map, from what was recovered.
        let mut st = State {
            next_seq: 1,
            generation: 1,
            ..State::default()
        };
        let mut used = vec![false; slots as usize];
        let mut records = Vec::new();
        let now = Instant::now();
        let rested = now.checked_sub(WRITEBACK_DELAY).unwrap_or(now);
        for (slot, r) in recovered {
            let start = r.block * block_size;
            // At most block_size.
            let len = block_size.min(size - start) as u32;
            let valid = Valid::from_bitmap(r.bitmap.as_deref(), sectors_of(len));
            let dirty = r.kind == KIND_DIRTY;
            if valid.is_empty() || (!dirty && !valid.is_full()) {
                continue;
            }
            st.next_id += 1;
            let id = st.next_id;
            let tick = st.next_tick();
            if dirty {
                st.dirty_bytes += u64::from(len);
                st.dirty_order.insert(tick, r.block);
                st.disk.insert(
                    slot,
                    DiskRec {
                        block: r.block,
                        id,
                        stamp: 0,
                    },
                );
                let raw = RawRecord {
                    generation: 1,
                    ..r.clone()
                };
                records.push((slot, encode_record(slot, &raw, rec_len)));
            } else {
                st.lru.insert(tick, r.block);
            }
            st.entries.insert(
                r.block,
                Entry {
                    id,
                    slot,
                    len,
                    tick,
                    pins: 0,
                    writers: 0,
                    valid,
                    nonzero: None,
                    zero_rest: false,
                    stamp: 0,
                    seq: u64::from(dirty),
                    uploaded: 0,
                    dirty,
                    dirty_tick: tick,
                    last_write: rested,
                    upload: None,
                    failures: 0,
                    retry_at: None,
                    content: Arc::new(tokio::sync::Mutex::new(())),
                },
            );
            used[slot as usize] = true;
        }
        let clean_count = st.entries.len() - dirty_count;
        // Slots past the highest one in use are fresh; the unused ones below it are free.
        st.fresh = used.iter().rposition(|&u| u).map_or(0, |i| i as u32 + 1);
        st.free = (0..st.fresh).rev().filter(|&s| !used[s as usize]).collect();

        let header = Header {
            state: STATE_IN_USE,
            block_size,
            slots,
            // A few KiB at most.
            record_len: rec_len as u32,
            key: key.clone(),
        };
        let (d, data) = (dir.to_owned(), Arc::new(data));
        let data_for_job = Arc::clone(&data);
        let index = tokio::task::spawn_blocking(move || {
            write_fresh_index(&d, &data_for_job, &header, &records)
        })
        .await
        .map_err(job_failed)?
        .map_err(io_err(&dir.join(INDEX_FILE)))?;
        write_id_file(dir, volume_key)?;
        let data = Arc::try_unwrap(data).map_err(|_| CacheError::Io {
            path: dir.join(DATA_FILE),
            source: io::Error::other("the data file is still shared"),
        })?;
        // Slots from `fresh` on hold nothing any record names: cut them off, so that each is a
        // hole when a block first gets it (see `Entry::zero_rest`), and make the file as long
        // as all the slots, so that the holes of a slot read as zeroes, never short.
        let data_len = |len: u64| data.set_len(len).map_err(io_err(&dir.join(DATA_FILE)));
        data_len(u64::from(st.fresh) * block_size)?;
        data_len(u64::from(slots) * block_size)?;

        let max_dirty = params.effective_max_dirty();
        let journal = if params.journal
            && params.mode == CacheMode::WriteBack
            && params.flush == FlushTo::Store
        {
            inner.journal()
        } else {
            None
        };
        st.journal.on = journal.is_some();
        st.journal.block_size = block_size;
        st.journal.size = size;
        if st.journal.on {
            // Dirty blocks replayed from the slots are in no record: the next FLUSH must write
            // them (the journal applied at open holds older data, or none).
            let State {
                entries, journal, ..
            } = &mut st;
            for (&b, e) in entries.iter().filter(|(_, e)| e.dirty) {
                for (lo, hi) in e.valid.runs(sectors_of(e.len), true) {
                    journal.wrote(b, lo, hi);
                }
            }
        }
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            info: DeviceInfo {
                multi_conn: true,
                ..inner.info().clone()
            },
            inner,
            dir: dir.to_owned(),
            key,
            data,
            punch_holes: AtomicBool::new(true),
            index,
            block_size,
            slots,
            record_len: rec_len,
            mode: params.mode,
            max_dirty,
            flush_to: params.flush,
            inline: InlineWrites::default(),
            upload_concurrency: params.upload_concurrency,
            state: Mutex::new(st),
            ranges: Arc::new(RangeLocks::default()),
            upload_permits: Semaphore::new(params.upload_concurrency),
            changed: Notify::new(),
            kick: Notify::new(),
            sync_kick: Notify::new(),
            syncs: Arc::new(SyncGroup::default()),
            shutdown,
            tasks: Mutex::new(Vec::new()),
            waiting_writers: AtomicUsize::new(0),
            last_read_end: AtomicU64::new(u64::MAX),
            readaheads: AtomicUsize::new(0),
            journal,
            commit_lock: tokio::sync::Mutex::new(()),
            captures_started: AtomicU64::new(0),
            captures_done: AtomicU64::new(0),
            retiring: AtomicBool::new(false),
            #[cfg(test)]
            background_paused: AtomicBool::new(paused),
            #[cfg(test)]
            syncer_paused: AtomicBool::new(false),
        });
        let tasks = vec![
            tokio::spawn(uploader(Arc::clone(&shared))),
            tokio::spawn(syncer(Arc::clone(&shared))),
        ];
        *shared.tasks.lock().unwrap_or_else(|e| e.into_inner()) = tasks;
        let layer = CacheLayer { shared };
        tracing::info!(dir = %dir.display(), mode = %params.mode, flush = %params.flush, size = params.size,
            block_size, slots, max_dirty, upload_concurrency = params.upload_concurrency,
            journal = layer.shared.journal.is_some(), clean_blocks = clean_count,
            dirty_blocks = dirty_count, "cache opened");
        if dirty_count > 0 {
            tracing::warn!(dir = %dir.display(), dirty_blocks = dirty_count,
                "uploading dirty blocks left by an earlier run");
            match params.mode {
                CacheMode::WriteBack => layer.shared.kick.notify_one(),
                CacheMode::WriteThrough => {
                    layer
                        .shared
                        .flush_back()
                        .await
                        .map_err(|source| CacheError::Replay {
                            dir: dir.to_owned(),
                            blocks: dirty_count,
                            source,
                        })?;
                }
            }
        }
        Ok(layer)
    }

    /// How many blocks are cached now.
    pub fn cached_blocks(&self) -> usize {
        self.shared.lock().entries.len()
    }

    /// Bytes of dirty blocks now (write-back).
    pub fn dirty_bytes(&self) -> u64 {
        self.shared.lock().dirty_bytes
    }

    /// Tests: stops background uploads, so that what reaches the device below is exactly what
    /// FLUSH and FUA send.
    #[cfg(test)]
    fn pause_background(&self) {
        self.shared.background_paused.store(true, Ordering::SeqCst);
    }

    /// Runs an index sync now (tests: a crash after this replays what was dirty).
    #[cfg(test)]
    async fn sync_index(&self) -> Result<(), BlockError> {
        self.shared.sync_local(true).await
    }
}

impl Drop for CacheLayer {
    fn drop(&mut self) {
        // Stops the background tasks; writes nothing (a drop without close is a crash).
        self.shared.shutdown.send_replace(true);
    }
}

/// Uploads dirty blocks as they become due.
async fn uploader(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let wait = shared.schedule_uploads();
        tokio::select! {
            _ = shared.kick.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            r = shutdown.changed() => if r.is_err() {
                return;
            },
        }
    }
}

/// Syncs the index every [`SYNC_INTERVAL`] while anything changes, and when asked.
async fn syncer(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = shared.sync_kick.notified() => {}
            _ = tokio::time::sleep(SYNC_INTERVAL) => {}
            r = shutdown.changed() => if r.is_err() {
                return;
            },
        }
        if *shutdown.borrow() {
            return;
        }
        #[cfg(test)]
        if shared.syncer_paused.load(Ordering::SeqCst) {
            continue;
        }
        // A failure is logged; the next round tries again.
        let _ = shared.sync_local(false).await;
        // Records of blocks uploaded since go once the device below has them durably.
        let held = shared.lock().removals_held;
        if held && shared.flush_below().await.is_ok() {
            let _ = shared.sync_local(false).await;
        }
        // Journal records whose blocks were all uploaded since are let go by the next record:
        // write one if no FLUSH has for a while. In its own task, one at a time, so that a
        // slow store never holds up the index syncs.
        if shared.journal.is_some()
            && shared.journal_retirable()
            && !shared.retiring.swap(true, Ordering::SeqCst)
        {
            let s = Arc::clone(&shared);
            tokio::spawn(async move {
                let _ = s.commit().await;
                s.retiring.store(false, Ordering::SeqCst);
            });
        }
    }
}

/// What block status says of a dirty block (which the device below does not have yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DirtyKind {
    /// It holds data.
    Data,
    /// It is all zeroes: once uploaded it is a deleted chunk, a hole.
    Zero,
    /// What it holds is zeroes; the rest comes from below: a hole if below is zeroes there.
    ZeroIfBelow,
}

fn dirty_kind(e: &Entry) -> DirtyKind {
    match &e.nonzero {
        Some(bits) if bits.iter().all(|&w| w == 0) => {
            if e.valid.is_full() {
                DirtyKind::Zero
            } else {
                DirtyKind::ZeroIfBelow
            }
        }
        _ => DirtyKind::Data,
    }
}

/// True if the extents (from `offset`) say `a..b` reads as zeroes.
fn zero_below(offset: u64, extents: &[Extent], a: u64, b: u64) -> bool {
    let mut pos = offset;
    for e in extents {
        let end = pos + e.length;
        if end > a && pos < b && e.flags & STATE_ZERO == 0 {
            return false;
        }
        pos = end;
    }
    true
}

/// Replaces what the device below says about the byte ranges of dirty blocks (sorted, not
/// overlapping) with what they will be once uploaded.
fn overlay_dirty(
    offset: u64,
    extents: Vec<Extent>,
    dirty: &[(u64, u64, DirtyKind)],
) -> Vec<Extent> {
    let flags_of = |&(a, b, kind): &(u64, u64, DirtyKind)| match kind {
        DirtyKind::Data => 0,
        DirtyKind::Zero => STATE_HOLE | STATE_ZERO,
        DirtyKind::ZeroIfBelow if zero_below(offset, &extents, a, b) => STATE_HOLE | STATE_ZERO,
        DirtyKind::ZeroIfBelow => 0,
    };
    let dirty: Vec<(u64, u64, u32)> = dirty.iter().map(|d| (d.0, d.1, flags_of(d))).collect();
    let mut out: Vec<Extent> = Vec::new();
    let mut push = |length: u64, flags: u32| {
        if length == 0 {
            return;
        }
        match out.last_mut() {
            Some(e) if e.flags == flags => e.length += length,
            _ => out.push(Extent { length, flags }),
        }
    };
    let mut pos = offset;
    let mut d = 0;
    for e in &extents {
        let e_end = pos + e.length;
        let mut p = pos;
        while p < e_end {
            while d < dirty.len() && dirty[d].1 <= p {
                d += 1;
            }
            if d < dirty.len() && dirty[d].0 <= p {
                let stop = dirty[d].1.min(e_end);
                push(stop - p, dirty[d].2);
                p = stop;
            } else {
                let stop = dirty.get(d).map_or(e_end, |r| r.0.min(e_end));
                push(stop - p, e.flags);
                p = stop;
            }
        }
        pos = e_end;
    }
    out
}

#[async_trait]
impl BlockDevice for CacheLayer {
    fn info(&self) -> &DeviceInfo {
        &self.shared.info
    }

    async fn read(&self, offset: u64, len: u32) -> Result<ReadData, BlockError> {
        let s = &self.shared;
        let bs = s.block_size;
        let end = offset + u64::from(len);
        s.read_ahead(offset, end);
        let parts: Vec<(u64, u64, usize)> = (offset / bs..=(end - 1) / bs)
            .map(|b| {
                let from = offset.max(b * bs);
                let to = end.min((b + 1) * bs);
                // Below the block size.
                (b, from - b * bs, (to - from) as usize)
            })
            .collect();
        if let [(b, start, n)] = parts[..] {
            return Ok(ReadData::data(s.read_part(b, start, n).await?));
        }
        let pieces: Vec<Bytes> = futures::stream::iter(parts)
            .map(|(b, start, n)| s.read_part(b, start, n))
            .buffered(PARALLEL_BLOCKS)
            .try_collect()
            .await?;
        let mut out = BytesMut::with_capacity(len as usize);
        for p in pieces {
            out.extend_from_slice(&p);
        }
        Ok(ReadData::data(out.freeze()))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        let s = &self.shared;
        match s.mode {
            CacheMode::WriteThrough => {
                let len = data.len() as u64;
                s.mutate("write", offset, len, move |inner| async move {
                    inner.write(offset, data, fua).await
                })
                .await
            }
            CacheMode::WriteBack => {
                let mut mutation = s.begin_mutation("write", offset)?;
                if !fua {
                    match s.write_now(mutation, offset, &data) {
                        Ok(done) => return done,
                        Err(m) => mutation = m,
                    }
                }
                let shared = Arc::clone(s);
                let task = tokio::spawn(async move {
                    let _mutation = mutation;
                    shared.write_back(offset, data, fua).await
                });
                joined("write", offset, task).await
            }
        }
    }

    async fn flush(&self) -> Result<(), BlockError> {
        match self.shared.mode {
            CacheMode::WriteThrough => self.shared.inner.flush().await,
            CacheMode::WriteBack => self.shared.flush_back().await,
        }
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        let s = &self.shared;
        match s.mode {
            CacheMode::WriteThrough => {
                s.mutate("trim", offset, len, move |inner| async move {
                    inner.trim(offset, len, fua).await
                })
                .await
            }
            CacheMode::WriteBack => {
                let mutation = s.begin_mutation("trim", offset)?;
                let shared = Arc::clone(s);
                let flags = ZeroFlags {
                    fua,
                    ..ZeroFlags::default()
                };
                let task = tokio::spawn(async move {
                    let _mutation = mutation;
                    shared.zero_back(offset, len, flags, true).await
                });
                joined("trim", offset, task).await
            }
        }
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), BlockError> {
        let s = &self.shared;
        match s.mode {
            CacheMode::WriteThrough => {
                s.mutate("write_zeroes", offset, len, move |inner| async move {
                    inner.write_zeroes(offset, len, flags).await
                })
                .await
            }
            CacheMode::WriteBack => {
                let mutation = s.begin_mutation("write_zeroes", offset)?;
                let shared = Arc::clone(s);
                let task = tokio::spawn(async move {
                    let _mutation = mutation;
                    shared.zero_back(offset, len, flags, false).await
                });
                joined("write_zeroes", offset, task).await
            }
        }
    }

    /// Reads the range into the cache, up to what the cache holds.
    async fn cache(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let s = &self.shared;
        let (first, last) = s.blocks_of(offset, len);
        let last = last.min(first + u64::from(s.slots) - 1);
        futures::stream::iter(first..=last)
            .map(|b| s.prefetch(b))
            .buffered(PARALLEL_BLOCKS)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }

    /// The device below's answer, with dirty blocks (not below yet) described as they will be
    /// once uploaded: data, or a hole if all zeroes.
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BlockError> {
        let s = &self.shared;
        let extents = s.inner.block_status(offset, len).await?;
        let covered: u64 = extents.iter().map(|e| e.length).sum();
        if covered == 0 {
            return Ok(extents);
        }
        let end = offset + covered;
        let bs = s.block_size;
        let mut dirty: Vec<(u64, u64, DirtyKind)> = {
            let st = s.lock();
            let (first, last) = (offset / bs, (end - 1) / bs);
            st.dirty_order
                .values()
                .filter(|b| (first..=last).contains(*b))
                .filter_map(|&b| {
                    let e = st.entries.get(&b)?;
                    Some(((b * bs).max(offset), (b * bs + bs).min(end), dirty_kind(e)))
                })
                .collect()
        };
        if dirty.is_empty() {
            return Ok(extents);
        }
        dirty.sort_unstable_by_key(|d| d.0);
        Ok(overlay_dirty(offset, extents, &dirty))
    }

    /// Refuses further changes, uploads everything dirty, syncs the index and marks it
    /// closed cleanly (so the next open keeps the clean blocks), then closes the device below.
    /// If an upload fails, the dirty blocks stay recorded and are replayed at the next open.
    async fn close(&self) -> Result<(), BlockError> {
        let s = &self.shared;
        s.lock().closed = true;
        wait_until(&s.changed, || (s.lock().mutations == 0).then_some(())).await;
        let mut result = match s.mode {
            // Whatever `flush` says: a closed cache leaves nothing behind to upload.
            CacheMode::WriteBack => s.flush_to_store().await,
            CacheMode::WriteThrough => match s.inner.flush().await {
                Ok(()) => s.sync_local(false).await,
                Err(e) => Err(e),
            },
        };
        let mut last_record_failed = false;
        if result.is_ok() && s.journal.is_some() {
            // Everything is uploaded: a last record lets every other one go.
            let _one = s.commit_lock.lock().await;
            result = s.capture(true).await;
            last_record_failed = result.is_err();
        }
        if result.is_ok() {
            let shared = Arc::clone(s);
            match blocking(move || shared.write_clean_index()).await {
                Ok(true) => {}
                Ok(false) => tracing::debug!(dir = %s.dir.display(),
                    "cache closed with blocks still recorded dirty; they are replayed at the next start"),
                Err(e) => result = Err(BlockError::io("close", 0, e)),
            }
        }
        // Nothing of this layer touches the directory or the device below after this: the
        // background tasks end, uploads in flight finish, and the directory is unlocked so a
        // new cache (a reload) can open it at once.
        s.shutdown.send_replace(true);
        let tasks = std::mem::take(&mut *s.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
        wait_until(&s.changed, || (s.lock().uploads == 0).then_some(())).await;
        s.lock().released = true;
        if let Err(e) = rustix::fs::flock(&s.data, rustix::fs::FlockOperation::Unlock) {
            tracing::warn!(dir = %s.dir.display(), error = %e, "cannot unlock the cache directory");
        }
        if let Err(e) = &result {
            let dirty_blocks = s.lock().dirty_order.len();
            if last_record_failed {
                tracing::error!(dir = %s.dir.display(), error = %e,
                    "cache closed with every block uploaded, but without its last journal record: \
                     the next start applies the older records again, which can undo writes made \
                     after the last FLUSH");
            } else if dirty_blocks > 0 {
                tracing::error!(dir = %s.dir.display(), dirty_blocks, error = %e,
                    "cache closed with dirty blocks not uploaded; they are replayed at the next start");
            } else {
                tracing::error!(dir = %s.dir.display(), error = %e, "cache closed with an error");
            }
        }
        let closed = s.inner.close().await;
        result.and(closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::raw::MemoryImage;

    mod journal;

    const BS: u64 = 4096;

    /// Holds one read of the device below after it has taken its snapshot of the data.
    struct Gate {
        entered: Arc<Notify>,
        release: Arc<Notify>,
    }

    /// A memory disk that counts what reaches it, can hold a read (see [`Gate`]), hold or fail
    /// writes, and yield around every operation so that concurrent requests interleave.
    struct Probe {
        mem: MemoryImage,
        reads: AtomicU64,
        writes: AtomicU64,
        zero_writes: AtomicU64,
        zeroings: AtomicU64,
        flushes: AtomicU64,
        gate: Mutex<Option<Gate>>,
        jitter: AtomicBool,
        writes_open: watch::Sender<bool>,
        held: AtomicU64,
        max_held: AtomicU64,
        fail_writes: AtomicBool,
        /// Writes, trims and zeroings since the last flush began: a power loss may lose them.
        unflushed: AtomicU64,
    }

    impl fmt::Debug for Probe {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("Probe")
        }
    }

    impl Probe {
        fn new(size: u64) -> Arc<Probe> {
            Arc::new(Probe {
                mem: MemoryImage::new(size, false),
                reads: AtomicU64::new(0),
                writes: AtomicU64::new(0),
                zero_writes: AtomicU64::new(0),
                zeroings: AtomicU64::new(0),
                flushes: AtomicU64::new(0),
                gate: Mutex::new(None),
                jitter: AtomicBool::new(false),
                writes_open: watch::channel(true).0,
                held: AtomicU64::new(0),
                max_held: AtomicU64::new(0),
                fail_writes: AtomicBool::new(false),
                unflushed: AtomicU64::new(0),
            })
        }

        fn reads(&self) -> u64 {
            self.reads.load(Ordering::SeqCst)
        }

        fn writes(&self) -> u64 {
            self.writes.load(Ordering::SeqCst)
        }

        fn held(&self) -> u64 {
            self.held.load(Ordering::SeqCst)
        }

        /// Writes wait until `open_writes`.
        fn hold_writes(&self) {
            self.writes_open.send_replace(false);
        }

        fn open_writes(&self) {
            self.writes_open.send_replace(true);
        }

        /// Holds the next read; returns (entered, release).
        fn hold_next_read(&self) -> (Arc<Notify>, Arc<Notify>) {
            let g = Gate {
                entered: Arc::new(Notify::new()),
                release: Arc::new(Notify::new()),
            };
            let pair = (g.entered.clone(), g.release.clone());
            *self.gate.lock().unwrap() = Some(g);
            pair
        }

        async fn jitter(&self) {
            if self.jitter.load(Ordering::Relaxed) {
                for _ in 0..(rand_u64() % 3) {
                    tokio::task::yield_now().await;
                }
            }
        }
    }

    fn rand_u64() -> u64 {
        use std::cell::Cell;
        thread_local!(static S: Cell<u64> = const { Cell::new(0x9E37_79B9_7F4A_7C15) });
        S.with(|s| {
            let mut x = s.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.set(x);
            x
        })
    }

    #[async_trait]
    impl BlockDevice for Probe {
        fn info(&self) -> &DeviceInfo {
            self.mem.info()
        }
        async fn read(&self, offset: u64, len: u32) -> Result<ReadData, BlockError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.jitter().await;
            let snapshot = self.mem.read(offset, len).await?;
            let gate = self.gate.lock().unwrap().take();
            if let Some(g) = gate {
                g.entered.notify_one();
                g.release.notified().await;
            }
            self.jitter().await;
            Ok(snapshot)
        }
        async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
            self.jitter().await;
            let mut open = self.writes_open.subscribe();
            if !*open.borrow() {
                let now = self.held.fetch_add(1, Ordering::SeqCst) + 1;
                self.max_held.fetch_max(now, Ordering::SeqCst);
                let _ = open.wait_for(|&o| o).await;
                self.held.fetch_sub(1, Ordering::SeqCst);
            }
            if self.fail_writes.load(Ordering::SeqCst) {
                return Err(BlockError::io(
                    "write",
                    offset,
                    io::Error::other("injected failure"),
                ));
            }
            if is_zero(&data) {
                self.zero_writes.fetch_add(1, Ordering::SeqCst);
            }
            self.writes.fetch_add(1, Ordering::SeqCst);
            if !fua {
                self.unflushed.fetch_add(1, Ordering::SeqCst);
            }
            let r = self.mem.write(offset, data, fua).await;
            self.jitter().await;
            r
        }
        async fn flush(&self) -> Result<(), BlockError> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            self.unflushed.store(0, Ordering::SeqCst);
            self.mem.flush().await
        }
        async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
            self.zeroings.fetch_add(1, Ordering::SeqCst);
            if !fua {
                self.unflushed.fetch_add(1, Ordering::SeqCst);
            }
            self.jitter().await;
            let r = self.mem.trim(offset, len, fua).await;
            self.jitter().await;
            r
        }
        async fn write_zeroes(
            &self,
            offset: u64,
            len: u64,
            flags: ZeroFlags,
        ) -> Result<(), BlockError> {
            self.zeroings.fetch_add(1, Ordering::SeqCst);
            if !flags.fua {
                self.unflushed.fetch_add(1, Ordering::SeqCst);
            }
            self.jitter().await;
            let r = self.mem.write_zeroes(offset, len, flags).await;
            self.jitter().await;
            r
        }
        async fn cache(&self, offset: u64, len: u64) -> Result<(), BlockError> {
            self.mem.cache(offset, len).await
        }
        async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BlockError> {
            self.mem.block_status(offset, len).await
        }
        async fn close(&self) -> Result<(), BlockError> {
            self.mem.close().await
        }
    }

    /// A scratch directory for one test, removed when the test is done with it (pass or
    /// fail), so that test runs leave nothing in `/tmp`.
    struct TempDir(PathBuf);

    impl std::ops::Deref for TempDir {
        type Target = PathBuf;
        fn deref(&self) -> &PathBuf {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tmp_dir(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("nbd-rs-cache-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }

    fn params(slots: u64, mode: CacheMode) -> CacheParams {
        CacheParams {
            size: slots * BS,
            block_size: BS,
            mode,
            // Half the cache, so that tests are not slowed by the bound unless they mean it.
            max_dirty: Some((slots / 2).max(1) * BS),
            ..CacheParams::default()
        }
    }

    async fn open(probe: &Arc<Probe>, p: CacheParams, dir: &Path) -> CacheLayer {
        CacheLayer::open(probe.clone(), p, dir, "vol-1")
            .await
            .unwrap()
    }

    async fn layer(probe: &Arc<Probe>, slots: u64, dir: &Path) -> CacheLayer {
        open(probe, params(slots, CacheMode::WriteThrough), dir).await
    }

    async fn back(probe: &Arc<Probe>, slots: u64, dir: &Path) -> CacheLayer {
        open(probe, params(slots, CacheMode::WriteBack), dir).await
    }

    async fn read(dev: &dyn BlockDevice, offset: u64, len: u32) -> Vec<u8> {
        let r = dev.read(offset, len).await.unwrap();
        assert_eq!(r.len(), u64::from(len));
        r.to_bytes().to_vec()
    }

    fn pattern(seed: u8, len: usize) -> Bytes {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect::<Vec<u8>>()
            .into()
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// Waits (up to 5 s) until `f` holds.
    async fn eventually(what: &str, f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting until {what}");
    }

    /// Checks the slot map once nothing is in flight (background uploads and read-ahead
    /// fetches finish on their own).
    async fn assert_quiet(c: &CacheLayer) {
        eventually("background work settles", || {
            let st = c.shared.lock();
            st.uploads == 0
                && c.shared.readaheads.load(Ordering::SeqCst) == 0
                && st.fills.is_empty()
                && st.orphans.is_empty()
                && st.entries.values().all(|e| e.pins == 0)
        })
        .await;
        let st = c.shared.lock();
        assert!(st.fills.is_empty());
        assert!(st.orphans.is_empty());
        assert!(st.entries.values().all(|e| e.pins == 0 && e.writers == 0));
        assert_eq!(
            st.entries.len() + st.free.len() + st.pending.len(),
            st.fresh as usize,
            "slots leaked"
        );
        let dirty: u64 = st
            .entries
            .values()
            .filter(|e| e.dirty)
            .map(|e| u64::from(e.len))
            .sum();
        assert_eq!(dirty, st.dirty_bytes);
        assert_eq!(
            st.dirty_order.len(),
            st.entries.values().filter(|e| e.dirty).count()
        );
    }

    // ---- write-through and shared behaviour ------------------------------------------------

    async fn coherent(mode: CacheMode) {
        let dir = tmp_dir(&format!("coherent-{mode}"));
        let probe = Probe::new(10 * BS + 100);
        let c = open(&probe, params(4, mode), &dir).await;
        assert_eq!(read(&c, 0, 3 * BS as u32).await, vec![0; 3 * BS as usize]);
        let data = pattern(7, 5000);
        c.write(BS - 10, data.clone(), false).await.unwrap();
        assert_eq!(read(&c, BS - 10, 5000).await, data);
        if mode == CacheMode::WriteBack {
            c.flush().await.unwrap();
        }
        // The write reached the device below.
        assert_eq!(read(&probe.mem, BS - 10, 5000).await, data);
        c.trim(BS, 100, false).await.unwrap();
        let got = read(&c, BS - 10, 5000).await;
        assert_eq!(&got[..10], &data[..10]);
        assert!(got[10..110].iter().all(|&b| b == 0));
        assert_eq!(&got[110..], &data[110..]);
        c.write_zeroes(0, 10 * BS + 100, ZeroFlags::default())
            .await
            .unwrap();
        assert_eq!(
            read(&c, 0, 10 * BS as u32 + 100).await,
            vec![0; 10 * BS as usize + 100]
        );
        // The short last block.
        c.write(10 * BS + 90, pattern(1, 10), false).await.unwrap();
        assert_eq!(read(&c, 10 * BS + 90, 10).await, pattern(1, 10));
        c.flush().await.unwrap();
        assert_eq!(read(&probe.mem, 10 * BS + 90, 10).await, pattern(1, 10));
        assert_eq!(
            read(&probe.mem, 0, 10 * BS as u32).await,
            vec![0; 10 * BS as usize]
        );
        assert_quiet(&c).await;
        c.close().await.unwrap();
    }

    #[tokio::test]
    async fn reads_see_earlier_writes_and_trims() {
        coherent(CacheMode::WriteThrough).await;
        coherent(CacheMode::WriteBack).await;
    }

    #[tokio::test]
    async fn cached_reads_do_not_reach_the_device_below() {
        let dir = tmp_dir("hits");
        let probe = Probe::new(8 * BS);
        probe
            .mem
            .write(0, pattern(3, 8 * BS as usize), false)
            .await
            .unwrap();
        let c = layer(&probe, 4, &dir).await;
        assert_eq!(
            read(&c, 100, 10).await,
            pattern(3, 8 * BS as usize)[100..110]
        );
        assert_eq!(probe.reads(), 1);
        for i in 0..10 {
            assert_eq!(
                read(&c, i * 300, 200).await,
                pattern(3, 8 * BS as usize)[(i * 300) as usize..(i * 300 + 200) as usize]
            );
        }
        assert_eq!(probe.reads(), 1);
        // A read over two blocks fetches only the one not cached yet.
        read(&c, BS - 1, 2).await;
        assert_eq!(probe.reads(), 2);
        // CMD_CACHE prefetches; the reads that follow are hits.
        c.cache(2 * BS, 2 * BS).await.unwrap();
        assert_eq!(probe.reads(), 4);
        read(&c, 2 * BS, 2 * BS as u32).await;
        assert_eq!(probe.reads(), 4);
        // Write-through: a write invalidates, and the next read goes below again, once.
        c.write(0, Bytes::from_static(b"x"), false).await.unwrap();
        assert_eq!(read(&c, 0, 2).await[0], b'x');
        read(&c, 0, 2).await;
        assert_eq!(probe.reads(), 5);
    }

    #[tokio::test]
    async fn eviction_keeps_the_file_within_size_and_drops_the_oldest() {
        let dir = tmp_dir("evict");
        let probe = Probe::new(64 * BS);
        let c = back(&probe, 4, &dir).await;
        let allocated = || {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(dir.join(DATA_FILE)).unwrap().blocks() * 512
        };
        for b in 0..64 {
            read(&c, b * BS, BS as u32).await;
            assert!(c.cached_blocks() <= 4);
            let len = std::fs::metadata(dir.join(DATA_FILE)).unwrap().len();
            assert!(len <= 4 * BS, "cache file is {len} bytes");
            assert!(allocated() <= 4 * BS + 4096);
        }
        // Sequential reads fetch ahead, but each block is fetched once.
        eventually("read-ahead settles", || {
            c.shared.readaheads.load(Ordering::SeqCst) == 0
        })
        .await;
        assert_eq!(probe.reads(), 64);
        // The last four are cached, the first is not.
        read(&c, 60 * BS, 4 * BS as u32).await;
        assert_eq!(probe.reads(), 64);
        read(&c, 0, 1).await;
        assert_eq!(probe.reads(), 65);
        // Touching block 61 keeps it over blocks 62 and 63.
        read(&c, 61 * BS, 1).await;
        read(&c, 5 * BS, 1).await;
        read(&c, 6 * BS, 1).await;
        assert_eq!(probe.reads(), 67);
        read(&c, 61 * BS, 1).await;
        assert_eq!(probe.reads(), 67);
        read(&c, 62 * BS, 1).await;
        assert_eq!(probe.reads(), 68);
    }

    #[tokio::test]
    async fn sequential_reads_fetch_the_next_block_ahead() {
        let dir = tmp_dir("readahead");
        let probe = Probe::new(8 * BS);
        let c = back(&probe, 8, &dir).await;
        read(&c, 0, 1024).await;
        read(&c, 1024, 1024).await;
        eventually("block 1 is fetched ahead", || c.cached_blocks() == 2).await;
        assert_eq!(probe.reads(), 2);
        // Block 1 is a hit; block 2 is fetched ahead in turn.
        read(&c, 2048, 4096).await;
        eventually("block 2 is fetched ahead", || c.cached_blocks() == 3).await;
        assert_eq!(probe.reads(), 3);
        // Not sequential: nothing ahead.
        read(&c, 6 * BS, 10).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!((probe.reads(), c.cached_blocks()), (4, 4));
    }

    #[tokio::test]
    async fn a_fetch_that_raced_a_write_is_not_installed() {
        for mode in [CacheMode::WriteThrough, CacheMode::WriteBack] {
            let dir = tmp_dir(&format!("race-{mode}"));
            let probe = Probe::new(4 * BS);
            let c = Arc::new(open(&probe, params(4, mode), &dir).await);
            probe
                .mem
                .write(0, pattern(1, BS as usize), false)
                .await
                .unwrap();
            let (entered, release) = probe.hold_next_read();
            let reader = tokio::spawn({
                let c = c.clone();
                async move { read(&*c, 0, BS as u32).await }
            });
            // The read has fetched the old block and is held.
            entered.notified().await;
            c.write(0, pattern(2, BS as usize), false).await.unwrap();
            // A read after the write must not join the stale fetch.
            let fresh = tokio::time::timeout(Duration::from_secs(5), read(&*c, 0, BS as u32))
                .await
                .expect("a read after the write waited for the stale fetch");
            assert_eq!(fresh, pattern(2, BS as usize));
            release.notify_one();
            // The held read was concurrent with the write: either is right.
            let old = reader.await.unwrap();
            assert!(old == pattern(1, BS as usize) || old == pattern(2, BS as usize));
            assert_eq!(read(&*c, 0, BS as u32).await, pattern(2, BS as usize));
            assert_eq!(read(&*c, 100, 10).await, pattern(2, BS as usize)[100..110]);
        }
    }

    #[tokio::test]
    async fn a_fetch_that_raced_a_trim_is_not_installed() {
        for mode in [CacheMode::WriteThrough, CacheMode::WriteBack] {
            let dir = tmp_dir(&format!("race-trim-{mode}"));
            let probe = Probe::new(4 * BS);
            let c = Arc::new(open(&probe, params(4, mode), &dir).await);
            probe
                .mem
                .write(BS, pattern(1, BS as usize), false)
                .await
                .unwrap();
            let (entered, release) = probe.hold_next_read();
            let reader = tokio::spawn({
                let c = c.clone();
                async move { read(&*c, BS, 10).await }
            });
            entered.notified().await;
            // Write-back orders the trim after the fetch (it waits for the block's range).
            let trim = tokio::spawn({
                let c = c.clone();
                async move { c.trim(BS + 5, 1, false).await }
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
            release.notify_one();
            reader.await.unwrap();
            trim.await.unwrap().unwrap();
            let got = read(&*c, BS, 10).await;
            assert_eq!(&got[..5], &pattern(1, BS as usize)[..5]);
            assert_eq!(got[5], 0);
            c.flush().await.unwrap();
            assert_eq!(read(&probe.mem, BS, 10).await, got);
        }
    }

    #[tokio::test]
    async fn concurrent_misses_of_one_block_fetch_once() {
        let dir = tmp_dir("single-flight");
        let probe = Probe::new(4 * BS);
        probe
            .mem
            .write(0, pattern(9, BS as usize), false)
            .await
            .unwrap();
        let c = Arc::new(back(&probe, 4, &dir).await);
        let (entered, release) = probe.hold_next_read();
        let first = tokio::spawn({
            let c = c.clone();
            async move { read(&*c, 0, 100).await }
        });
        entered.notified().await;
        let second = tokio::spawn({
            let c = c.clone();
            async move { read(&*c, 200, 100).await }
        });
        tokio::task::yield_now().await;
        release.notify_one();
        assert_eq!(first.await.unwrap(), pattern(9, BS as usize)[..100]);
        assert_eq!(second.await.unwrap(), pattern(9, BS as usize)[200..300]);
        assert_eq!(probe.reads(), 1);
    }

    #[tokio::test]
    async fn a_cancelled_fetch_lets_waiters_read_for_themselves() {
        let dir = tmp_dir("cancel");
        let probe = Probe::new(4 * BS);
        probe
            .mem
            .write(0, pattern(4, BS as usize), false)
            .await
            .unwrap();
        let c = Arc::new(back(&probe, 4, &dir).await);
        let (entered, _release) = probe.hold_next_read();
        let first = tokio::spawn({
            let c = c.clone();
            async move { read(&*c, 0, 100).await }
        });
        entered.notified().await;
        let second = tokio::spawn({
            let c = c.clone();
            async move { read(&*c, 0, 100).await }
        });
        tokio::task::yield_now().await;
        first.abort();
        let got = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the waiter hung")
            .unwrap();
        assert_eq!(got, pattern(4, BS as usize)[..100]);
        // Nothing is left registered: the block can be cached again.
        read(&*c, 0, 1).await;
        let n = probe.reads();
        read(&*c, 0, 1).await;
        assert_eq!(probe.reads(), n);
    }

    #[tokio::test]
    async fn passes_info_status_flush_and_close_through() {
        let dir = tmp_dir("passthrough");
        let probe = Probe::new(8 * BS);
        probe
            .mem
            .write(BS, Bytes::from_static(b"a"), false)
            .await
            .unwrap();
        let c = back(&probe, 4, &dir).await;
        assert_eq!(c.info(), probe.mem.info());
        assert!(c.info().multi_conn);
        assert_eq!(
            c.block_status(0, 8 * BS).await.unwrap(),
            probe.mem.block_status(0, 8 * BS).await.unwrap()
        );
        c.flush().await.unwrap();
        assert_eq!(probe.flushes.load(Ordering::SeqCst), 1);
        c.close().await.unwrap();
        // Closed: changes are refused, and the directory is free for the next cache.
        assert!(c.write(0, Bytes::from_static(b"b"), false).await.is_err());
        let again = back(&probe, 4, &dir).await;
        again.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_second_cache_cannot_share_the_directory() {
        let dir = tmp_dir("busy");
        let probe = Probe::new(8 * BS);
        let c = back(&probe, 4, &dir).await;
        let e = CacheLayer::open(
            probe.clone(),
            params(4, CacheMode::WriteBack),
            &dir,
            "vol-1",
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "cache directory {} is in use by another cache",
                dir.display()
            )
        );
        c.close().await.unwrap();
    }

    // ---- write-back -------------------------------------------------------------------------

    #[tokio::test]
    async fn write_back_acknowledges_before_the_store_has_the_data() {
        let dir = tmp_dir("wb-ack");
        let probe = Probe::new(8 * BS);
        let c = back(&probe, 8, &dir).await;
        probe.hold_writes();
        tokio::time::timeout(
            Duration::from_secs(5),
            c.write(BS, pattern(1, 2 * BS as usize), false),
        )
        .await
        .expect("a write-back write waited for the store")
        .unwrap();
        assert_eq!(probe.writes(), 0);
        assert_eq!(
            read(&probe.mem, BS, 2 * BS as u32).await,
            vec![0; 2 * BS as usize]
        );
        // Served from the cache, without reading below.
        assert_eq!(
            read(&c, BS, 2 * BS as u32).await,
            pattern(1, 2 * BS as usize)
        );
        assert_eq!(probe.reads(), 0);
        assert_eq!(c.dirty_bytes(), 2 * BS);
        // FLUSH returns once the store has it.
        let flush = tokio::spawn({
            let c = Arc::new(c);
            let c2 = Arc::clone(&c);
            async move {
                c2.flush().await.unwrap();
                c
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!flush.is_finished(), "FLUSH returned before the upload");
        probe.open_writes();
        let c = flush.await.unwrap();
        assert_eq!(
            read(&probe.mem, BS, 2 * BS as u32).await,
            pattern(1, 2 * BS as usize)
        );
        assert_eq!(c.dirty_bytes(), 0);
        assert_eq!(probe.writes(), 2, "one upload per block");
        assert_eq!(probe.flushes.load(Ordering::SeqCst), 1);
        assert_quiet(&c).await;
    }

    #[tokio::test]
    async fn dirty_blocks_are_uploaded_in_the_background() {
        let dir = tmp_dir("wb-background");
        let probe = Probe::new(8 * BS);
        let c = back(&probe, 8, &dir).await;
        c.write(0, pattern(2, 3 * BS as usize), false)
            .await
            .unwrap();
        eventually("the uploader drains", || c.dirty_bytes() == 0).await;
        assert_eq!(
            read(&probe.mem, 0, 3 * BS as u32).await,
            pattern(2, 3 * BS as usize)
        );
        assert_eq!(probe.writes(), 3);
    }

    #[tokio::test]
    async fn writes_wake_the_uploader_only_when_it_would_look_too_late() {
        let dir = tmp_dir("wb-kicks");
        let probe = Probe::new(8 * BS);
        let c = back(&probe, 8, &dir).await;
        let s = &c.shared;
        {
            let mut st = s.lock();
            st.upload_wake = None;
            assert!(s.upload_kick_needed(&st), "no look planned");
            st.upload_wake = Some(Instant::now() + UPLOADER_IDLE);
            assert!(
                s.upload_kick_needed(&st),
                "a look later than a new block is due"
            );
            st.upload_wake = Some(Instant::now() + WRITEBACK_DELAY / 2);
            assert!(!s.upload_kick_needed(&st), "a look before the block is due");
            st.dirty_bytes = s.max_dirty / 2;
            assert!(
                s.upload_kick_needed(&st),
                "dirty data short: every write wakes it"
            );
            st.dirty_bytes = 0;
        }
        // The first write wakes the uploader; the ones after it, to other blocks and within
        // the delay, are found when it looks again.
        for b in 0..3 {
            c.write(b * BS, pattern(b as u8, BS as usize), false)
                .await
                .unwrap();
        }
        eventually("the uploader drains", || c.dirty_bytes() == 0).await;
        for b in 0..3 {
            assert_eq!(
                read(&probe.mem, b * BS, BS as u32).await,
                pattern(b as u8, BS as usize)
            );
        }
    }

    #[tokio::test]
    async fn an_uploaded_block_stays_recorded_until_the_device_below_is_flushed() {
        let dir = tmp_dir("wb-below-durable");
        let probe = Probe::new(8 * BS);
        let p = CacheParams {
            flush: FlushTo::Local,
            ..params(8, CacheMode::WriteBack)
        };
        let c = open(&probe, p, &dir).await;
        c.shared.syncer_paused.store(true, Ordering::SeqCst);
        c.write(0, pattern(5, BS as usize), false).await.unwrap();
        c.flush().await.unwrap();
        assert_eq!(
            c.shared.lock().disk.len(),
            1,
            "FLUSH recorded the block dirty"
        );
        eventually("the uploader drains", || c.dirty_bytes() == 0).await;
        assert!(
            probe.unflushed.load(Ordering::SeqCst) > 0,
            "the upload is not durable below yet"
        );
        c.sync_index().await.unwrap();
        assert_eq!(
            c.shared.lock().disk.len(),
            1,
            "so a power loss now must still find the block in the cache"
        );
        c.flush().await.unwrap();
        assert_eq!(probe.unflushed.load(Ordering::SeqCst), 0);
        c.sync_index().await.unwrap();
        assert!(
            c.shared.lock().disk.is_empty(),
            "once below has it durably, the record goes"
        );
        assert_quiet(&c).await;
    }

    #[tokio::test]
    async fn a_fua_write_is_below_when_it_returns() {
        let dir = tmp_dir("wb-fua");
        let probe = Probe::new(8 * BS);
        let c = back(&probe, 8, &dir).await;
        c.write(2 * BS + 512, pattern(3, 1024), true).await.unwrap();
        assert_eq!(read(&probe.mem, 2 * BS + 512, 1024).await, pattern(3, 1024));
        assert!(probe.flushes.load(Ordering::SeqCst) >= 1);
        // FUA trims and zeroing of partial cached blocks are durable too.
        c.write_zeroes(
            2 * BS + 600,
            100,
            ZeroFlags {
                fua: true,
                ..ZeroFlags::default()
            },
        )
        .await
        .unwrap();
        assert!(
            read(&probe.mem, 2 * BS + 600, 100)
                .await
                .iter()
                .all(|&b| b == 0)
        );
        assert_eq!(c.dirty_bytes(), 0);
    }

    #[tokio::test]
    async fn uploads_run_in_parallel_up_to_the_limit() {
        let dir = tmp_dir("wb-parallel");
        let probe = Probe::new(32 * BS);
        let c = Arc::new(
            open(
                &probe,
                CacheParams {
                    upload_concurrency: 4,
                    max_dirty: Some(16 * BS),
                    ..params(32, CacheMode::WriteBack)
                },
                &dir,
            )
            .await,
        );
        probe.hold_writes();
        c.write(0, pattern(4, 12 * BS as usize), false)
            .await
            .unwrap();
        let flush = tokio::spawn({
            let c = c.clone();
            async move { c.flush().await }
        });
        eventually("four uploads are in flight", || probe.held() == 4).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(probe.held(), 4);
        probe.open_writes();
        flush.await.unwrap().unwrap();
        assert_eq!(probe.max_held.load(Ordering::SeqCst), 4);
        assert_eq!(probe.writes(), 12);
        assert_eq!(
            read(&probe.mem, 0, 12 * BS as u32).await,
            pattern(4, 12 * BS as usize)
        );
    }

    #[tokio::test]
    async fn the_dirty_bound_holds_a_writer_until_uploads_make_room() {
        let dir = tmp_dir("wb-bound");
        let probe = Probe::new(16 * BS);
        let c = Arc::new(
            open(
                &probe,
                CacheParams {
                    max_dirty: Some(2 * BS),
                    ..params(8, CacheMode::WriteBack)
                },
                &dir,
            )
            .await,
        );
        probe.hold_writes();
        c.write(0, pattern(1, 2 * BS as usize), false)
            .await
            .unwrap();
        assert_eq!(c.dirty_bytes(), 2 * BS);
        let third = tokio::spawn({
            let c = c.clone();
            async move { c.write(5 * BS, pattern(2, BS as usize), false).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!third.is_finished(), "a writer went past the dirty bound");
        assert!(c.dirty_bytes() <= 2 * BS);
        // Under pressure the uploader does not wait for blocks to rest.
        assert_eq!(probe.held(), 2);
        probe.open_writes();
        tokio::time::timeout(Duration::from_secs(5), third)
            .await
            .expect("the writer was not released")
            .unwrap()
            .unwrap();
        assert!(c.dirty_bytes() <= 2 * BS);
        c.flush().await.unwrap();
        assert_eq!(
            read(&probe.mem, 0, 2 * BS as u32).await,
            pattern(1, 2 * BS as usize)
        );
        assert_eq!(
            read(&probe.mem, 5 * BS, BS as u32).await,
            pattern(2, BS as usize)
        );
    }

    #[tokio::test]
    async fn a_failed_upload_keeps_the_data_and_fails_flush_until_the_device_heals() {
        let dir = tmp_dir("wb-fail");
        let probe = Probe::new(8 * BS);
        let c = back(&probe, 8, &dir).await;
        probe.fail_writes.store(true, Ordering::SeqCst);
        c.write(BS, pattern(5, BS as usize), false).await.unwrap();
        let e = c.flush().await.unwrap_err();
        assert_eq!(e.nbd_errno(), crate::block::errno::EIO);
        assert!(e.to_string().contains("injected failure"), "{e}");
        assert_eq!(c.dirty_bytes(), BS);
        assert_eq!(read(&c, BS, BS as u32).await, pattern(5, BS as usize));
        // A FUA write fails the same way.
        let e = c.write(2 * BS, pattern(6, 10), true).await.unwrap_err();
        assert_eq!(e.nbd_errno(), crate::block::errno::EIO);
        probe.fail_writes.store(false, Ordering::SeqCst);
        c.flush().await.unwrap();
        assert_eq!(
            read(&probe.mem, BS, BS as u32).await,
            pattern(5, BS as usize)
        );
        assert_eq!(read(&probe.mem, 2 * BS, 10).await, pattern(6, 10));
        assert_eq!(c.dirty_bytes(), 0);
        assert_quiet(&c).await;
    }

    #[tokio::test]
    async fn full_block_writes_never_read_from_below() {
        let dir = tmp_dir("wb-noread");
        let probe = Probe::new(16 * BS);
        probe
            .mem
            .write(0, pattern(9, 16 * BS as usize), false)
            .await
            .unwrap();
        let c = back(&probe, 16, &dir).await;
        c.pause_background();
        c.write(0, pattern(1, BS as usize), false).await.unwrap();
        c.write(2 * BS, pattern(2, 5 * BS as usize), true)
            .await
            .unwrap();
        // A block written in sector-aligned pieces is whole too.
        for i in 0..8 {
            c.write(10 * BS + i * 512, pattern(i as u8, 512), false)
                .await
                .unwrap();
        }
        c.flush().await.unwrap();
        assert_eq!(read(&c, 10 * BS, BS as u32).await.len(), BS as usize);
        assert_eq!(probe.reads(), 0);
        assert_eq!(
            read(&probe.mem, 2 * BS, 5 * BS as u32).await,
            pattern(2, 5 * BS as usize)
        );
        assert_eq!(probe.writes(), 1 + 5 + 1);
    }

    #[tokio::test]
    async fn a_partial_block_is_completed_from_below_once() {
        let dir = tmp_dir("wb-partial");
        let probe = Probe::new(8 * BS);
        let old = pattern(9, 8 * BS as usize);
        probe.mem.write(0, old.clone(), false).await.unwrap();
        let c = back(&probe, 8, &dir).await;
        c.pause_background();
        // Sector-aligned: no read on the write path, and reads of it are hits.
        c.write(1024, pattern(1, 512), false).await.unwrap();
        assert_eq!(read(&c, 1024, 512).await, pattern(1, 512));
        assert_eq!(probe.reads(), 0);
        // A read of what is missing completes the block once.
        let mut want = old[..BS as usize].to_vec();
        want[1024..1536].copy_from_slice(&pattern(1, 512));
        assert_eq!(read(&c, 0, BS as u32).await, want);
        assert_eq!(read(&c, 3000, 10).await, want[3000..3010]);
        assert_eq!(probe.reads(), 1);
        // The upload is one whole write.
        c.flush().await.unwrap();
        assert_eq!(probe.writes(), 1);
        assert_eq!(read(&probe.mem, 0, BS as u32).await, want);
        // Not read by anyone: completed by the upload, with one read.
        c.write(BS + 2048, pattern(2, 1024), false).await.unwrap();
        c.flush().await.unwrap();
        assert_eq!(probe.reads(), 2);
        let mut want = old[BS as usize..2 * BS as usize].to_vec();
        want[2048..3072].copy_from_slice(&pattern(2, 1024));
        assert_eq!(read(&probe.mem, BS, BS as u32).await, want);
        // Unaligned: the sector must be cached first, so the block is completed at once.
        c.write(2 * BS + 100, pattern(3, 10), false).await.unwrap();
        assert_eq!(probe.reads(), 3);
        let mut want = old[2 * BS as usize..3 * BS as usize].to_vec();
        want[100..110].copy_from_slice(&pattern(3, 10));
        assert_eq!(read(&c, 2 * BS, BS as u32).await, want);
        assert_eq!(probe.reads(), 3);
        c.flush().await.unwrap();
        assert_eq!(read(&probe.mem, 2 * BS, BS as u32).await, want);
    }

    #[tokio::test]
    async fn completing_a_block_writes_no_zeroes_where_the_slot_reads_as_zeroes() {
        const MB: u64 = 1 << 20;
        // Equal, or the first byte that differs (not megabytes of both in the failure).
        let same = |got: &[u8], want: &[u8]| {
            let at = got.iter().zip(want).position(|(a, b)| a != b);
            assert!(got.len() == want.len() && at.is_none(), "differ at {at:?}");
        };
        let dir = tmp_dir("wb-holes");
        let probe = Probe::new(4 * MB);
        let p = CacheParams {
            size: 2 * MB,
            block_size: MB,
            max_dirty: Some(2 * MB),
            ..params(2, CacheMode::WriteBack)
        };
        let c = open(&probe, p, &dir).await;
        c.pause_background();
        let allocated = || {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(dir.join(DATA_FILE)).unwrap().blocks() * 512
        };
        // A block that does not exist below, in a never used slot: the upload completes it
        // without writing its zeroes.
        c.write(8192, pattern(1, 4096), false).await.unwrap();
        c.flush().await.unwrap();
        assert_eq!(probe.reads(), 1);
        let mut want = vec![0; MB as usize];
        want[8192..12288].copy_from_slice(&pattern(1, 4096));
        same(&read(&probe.mem, 0, MB as u32).await, &want);
        same(&read(&c, 0, MB as u32).await, &want);
        assert_eq!(
            probe.reads(),
            1,
            "the completed block is read from its slot"
        );
        assert!(allocated() <= 16384, "{} bytes allocated", allocated());

        // A slot that held another block: the zeroes from below must replace its old bytes.
        c.write(MB, pattern(2, MB as usize), false).await.unwrap();
        c.flush().await.unwrap();
        let mut below = vec![0; MB as usize];
        below[..4096].copy_from_slice(&pattern(3, 4096));
        below[300_000..300_512].copy_from_slice(&pattern(4, 512));
        probe
            .mem
            .write(2 * MB, below.clone().into(), false)
            .await
            .unwrap();
        // Block 2 takes the least recently used slot: block 0's, which is not all zeroes.
        c.write(2 * MB + 200_000, pattern(5, 1024), false)
            .await
            .unwrap();
        assert!(
            !c.shared.lock().entries.contains_key(&0),
            "block 0 was evicted"
        );
        let before = allocated();
        c.flush().await.unwrap();
        below[200_000..201_024].copy_from_slice(&pattern(5, 1024));
        same(&read(&probe.mem, 2 * MB, MB as u32).await, &below);
        let reads = probe.reads();
        same(&read(&c, 2 * MB, MB as u32).await, &below);
        assert_eq!(
            probe.reads(),
            reads,
            "the completed block is read from its slot"
        );
        if c.shared.punch_holes.load(Ordering::Relaxed) {
            // Block 1's slot is full; block 2's keeps its few written pages.
            assert!(
                allocated() <= MB + 64 * 1024,
                "{} bytes allocated",
                allocated()
            );
            assert!(allocated() <= before);
        }
    }

    #[tokio::test]
    async fn a_write_that_can_land_at_once_needs_no_task_and_others_wait() {
        use futures::FutureExt;
        let dir = tmp_dir("wb-now");
        let probe = Probe::new(8 * BS);
        let old = pattern(9, 8 * BS as usize);
        probe.mem.write(0, old.clone(), false).await.unwrap();
        let c = back(&probe, 4, &dir).await;
        c.pause_background();
        // Sector-aligned, within one block, with room and a free slot: done in its first poll.
        let done = c.write(512, pattern(1, 1024), false).now_or_never();
        assert!(matches!(done, Some(Ok(()))), "{done:?}");
        // Part of a sector not cached: the block is completed from below first, which waits.
        let mut w = Box::pin(c.write(BS + 100, pattern(2, 10), false));
        assert!((&mut w).now_or_never().is_none());
        w.await.unwrap();
        // A slot someone holds (an upload reading it, say): the write waits its turn.
        let content = Arc::clone(&c.shared.lock().entries[&0].content);
        let held = content.try_lock_owned().unwrap();
        let mut w = Box::pin(c.write(2048, pattern(3, 512), false));
        assert!((&mut w).now_or_never().is_none());
        drop(held);
        w.await.unwrap();
        assert_quiet(&c).await;
        // Parts of sectors already cached, in a whole block: at once, and readable.
        let done = c.write(BS + 90, pattern(7, 30), false).now_or_never();
        assert!(matches!(done, Some(Ok(()))), "{done:?}");
        // FUA waits for its upload (which needs the background tasks).
        c.shared.background_paused.store(false, Ordering::SeqCst);
        let mut w = Box::pin(c.write(3 * BS, pattern(4, 512), true));
        assert!((&mut w).now_or_never().is_none());
        w.await.unwrap();
        let mut want = old[..4 * BS as usize].to_vec();
        want[512..1536].copy_from_slice(&pattern(1, 1024));
        want[2048..2560].copy_from_slice(&pattern(3, 512));
        let b = BS as usize;
        want[b + 100..b + 110].copy_from_slice(&pattern(2, 10));
        want[b + 90..b + 120].copy_from_slice(&pattern(7, 30));
        want[3 * b..3 * b + 512].copy_from_slice(&pattern(4, 512));
        assert_eq!(read(&c, 0, 4 * BS as u32).await, want);
        c.flush().await.unwrap();
        assert_eq!(read(&probe.mem, 0, 4 * BS as u32).await, want);
        // A clean cached block: dirtied at once.
        let done = c.write(2 * BS, pattern(8, 512), false).now_or_never();
        assert!(matches!(done, Some(Ok(()))), "{done:?}");
        assert!(c.shared.lock().entries[&2].dirty);
        want[2 * b..2 * b + 512].copy_from_slice(&pattern(8, 512));
        c.flush().await.unwrap();
        assert_eq!(read(&probe.mem, 0, 4 * BS as u32).await, want);
        // Every slot holds a block (the read above cached block 2 too): a write to another
        // block takes the general path, which evicts a clean block for it.
        assert_eq!(c.cached_blocks(), 4);
        let mut w = Box::pin(c.write(6 * BS, pattern(6, 512), false));
        assert!((&mut w).now_or_never().is_none());
        w.await.unwrap();
        assert_eq!(c.cached_blocks(), 4);
        assert_eq!(read(&c, 6 * BS, 512).await, pattern(6, 512));
        assert_quiet(&c).await;
    }

    #[tokio::test]
    async fn whole_block_trims_and_zero_blocks_never_upload_zeroes() {
        let dir = tmp_dir("wb-trim");
        let probe = Probe::new(8 * BS);
        let c = back(&probe, 8, &dir).await;
        c.pause_background();
        c.write(0, pattern(1, 4 * BS as usize), false)
            .await
            .unwrap();
        c.trim(0, 2 * BS, false).await.unwrap();
        c.write_zeroes(2 * BS, BS, ZeroFlags::default())
            .await
            .unwrap();
        // A block written as zeroes is deleted below, not uploaded.
        c.write(5 * BS, Bytes::from(vec![0u8; BS as usize]), false)
            .await
            .unwrap();
        c.flush().await.unwrap();
        assert_eq!(probe.writes(), 1, "only block 3 is uploaded");
        assert_eq!(probe.zero_writes.load(Ordering::SeqCst), 0);
        let mut want = vec![0u8; 6 * BS as usize];
        want[3 * BS as usize..4 * BS as usize]
            .copy_from_slice(&pattern(1, 4 * BS as usize)[3 * BS as usize..]);
        assert_eq!(read(&probe.mem, 0, 6 * BS as u32).await, want);
        assert_eq!(read(&c, 0, 6 * BS as u32).await, want);
        // A whole-device trim is one request below.
        let before = probe.zeroings.load(Ordering::SeqCst);
        c.trim(0, 8 * BS, false).await.unwrap();
        assert_eq!(probe.zeroings.load(Ordering::SeqCst), before + 1);
        c.flush().await.unwrap();
        assert_eq!(
            read(&probe.mem, 0, 8 * BS as u32).await,
            vec![0; 8 * BS as usize]
        );
        assert_eq!(probe.zero_writes.load(Ordering::SeqCst), 0);
        assert_quiet(&c).await;
    }

    #[tokio::test]
    async fn a_trim_passed_down_is_not_overtaken_by_an_older_upload() {
        let dir = tmp_dir("wb-order");
        let probe = Probe::new(8 * BS);
        let c = Arc::new(back(&probe, 8, &dir).await);
        c.write(BS, pattern(1, BS as usize), false).await.unwrap();
        probe.hold_writes();
        let flush = tokio::spawn({
            let c = c.clone();
            async move { c.flush().await }
        });
        eventually("the upload is in flight", || probe.held() == 1).await;
        let trim = tokio::spawn({
            let c = c.clone();
            async move { c.trim(BS, BS, false).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !trim.is_finished(),
            "the trim did not wait for the upload in flight"
        );
        probe.open_writes();
        flush.await.unwrap().unwrap();
        trim.await.unwrap().unwrap();
        c.flush().await.unwrap();
        assert_eq!(read(&probe.mem, BS, BS as u32).await, vec![0; BS as usize]);
        assert_eq!(read(&*c, BS, BS as u32).await, vec![0; BS as usize]);
        assert_eq!(probe.writes(), 1);
    }

    #[tokio::test]
    async fn block_status_shows_dirty_blocks_as_data() {
        let dir = tmp_dir("wb-status");
        let probe = Probe::new(8 * BS);
        let c = back(&probe, 8, &dir).await;
        probe.hold_writes();
        c.write(BS + 10, pattern(1, 10), false).await.unwrap();
        c.write(3 * BS, pattern(1, BS as usize), false)
            .await
            .unwrap();
        let hole = crate::block::STATE_HOLE | crate::block::STATE_ZERO;
        let ext = |length, flags| Extent { length, flags };
        assert_eq!(
            c.block_status(0, 8 * BS).await.unwrap(),
            vec![
                ext(BS, hole),
                ext(BS, 0),
                ext(BS, hole),
                ext(BS, 0),
                ext(4 * BS, hole)
            ]
        );
        assert_eq!(
            c.block_status(BS + 100, 200).await.unwrap(),
            vec![ext(200, 0)]
        );
        probe.open_writes();
        c.flush().await.unwrap();
    }

    #[tokio::test]
    async fn block_status_shows_dirty_zero_blocks_as_the_holes_they_become() {
        let dir = tmp_dir("wb-status-zero");
        let probe = Probe::new(16 * BS);
        let c = back(&probe, 8, &dir).await;
        c.pause_background();
        let hole = crate::block::STATE_HOLE | crate::block::STATE_ZERO;
        let ext = |length, flags| Extent { length, flags };
        // Zeroes into an absent block: still a hole (in part, with zeroes below; then whole).
        c.write(BS + 1024, Bytes::from(vec![0u8; 512]), false)
            .await
            .unwrap();
        assert_eq!(
            c.block_status(0, 4 * BS).await.unwrap(),
            vec![ext(4 * BS, hole)]
        );
        // Data, then zeroes over it in unaligned pieces: data until the last byte is zero.
        c.write(2 * BS + 1000, pattern(1, 512), false)
            .await
            .unwrap();
        c.write(2 * BS + 1000, Bytes::from(vec![0u8; 256]), false)
            .await
            .unwrap();
        assert_eq!(
            c.block_status(0, 4 * BS).await.unwrap(),
            vec![ext(2 * BS, hole), ext(BS, 0), ext(BS, hole)]
        );
        c.write(2 * BS + 1256, Bytes::from(vec![0u8; 256]), false)
            .await
            .unwrap();
        assert_eq!(
            c.block_status(0, 4 * BS).await.unwrap(),
            vec![ext(4 * BS, hole)]
        );
        // A block with data below (in a memory page of its own), zeroes written over part of
        // it: data.
        probe
            .mem
            .write(8 * BS, pattern(2, BS as usize), false)
            .await
            .unwrap();
        c.write(8 * BS, Bytes::from(vec![0u8; 512]), false)
            .await
            .unwrap();
        assert_eq!(
            c.block_status(4 * BS, 8 * BS).await.unwrap(),
            // (the memory page of block 8 covers blocks 8 to 15: data below)
            vec![ext(4 * BS, hole), ext(4 * BS, 0)]
        );
        // Uploaded, the zero blocks are holes below too.
        c.flush().await.unwrap();
        assert_eq!(probe.zero_writes.load(Ordering::SeqCst), 0);
        assert_eq!(
            c.block_status(0, 16 * BS).await.unwrap(),
            probe.mem.block_status(0, 16 * BS).await.unwrap()
        );
        assert_eq!(
            c.block_status(0, 8 * BS).await.unwrap(),
            vec![ext(8 * BS, hole)]
        );
    }

    #[tokio::test]
    async fn fast_zero_is_refused_where_it_would_write_and_changes_nothing() {
        let dir = tmp_dir("wb-fast");
        let probe = Probe::new(8 * BS);
        let c = back(&probe, 8, &dir).await;
        c.pause_background();
        let fast = ZeroFlags {
            fast: true,
            ..ZeroFlags::default()
        };
        c.write(0, pattern(1, 3 * BS as usize), false)
            .await
            .unwrap();
        // Part of a dirty block: a write of zeroes, not faster than one.
        let e = c.write_zeroes(BS + 512, 1024, fast).await.unwrap_err();
        assert!(matches!(e, BlockError::FastZeroUnsupported));
        let e = c.write_zeroes(BS, BS + 512, fast).await.unwrap_err();
        assert!(matches!(e, BlockError::FastZeroUnsupported));
        assert_eq!(
            read(&c, 0, 3 * BS as u32).await,
            pattern(1, 3 * BS as usize)
        );
        // A whole block: passed down (a deleted chunk), its copy dropped.
        c.write_zeroes(BS, BS, fast).await.unwrap();
        let mut want = pattern(1, 3 * BS as usize).to_vec();
        want[BS as usize..2 * BS as usize].fill(0);
        assert_eq!(read(&c, 0, 3 * BS as u32).await, want);
        // A clean cached block: the device below decides (memory zeroes it), and the copy
        // does not outlive the change.
        c.flush().await.unwrap();
        c.write_zeroes(100, 200, fast).await.unwrap();
        want[100..300].fill(0);
        assert_eq!(read(&c, 0, 3 * BS as u32).await, want);
        c.flush().await.unwrap();
        assert_eq!(read(&probe.mem, 0, 3 * BS as u32).await, want);
    }

    // ---- persistence ------------------------------------------------------------------------

    fn orphans_of(dir: &Path) -> Vec<PathBuf> {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        std::fs::read_dir(dir.parent().unwrap())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{name}.orphan-"))
            })
            .map(|e| e.path())
            .collect()
    }

    #[tokio::test]
    async fn a_clean_close_keeps_the_cached_blocks() {
        let dir = tmp_dir("close-keep");
        let probe = Probe::new(16 * BS);
        let c = back(&probe, 8, &dir).await;
        c.write(0, pattern(1, 2 * BS as usize), false)
            .await
            .unwrap();
        read(&c, 5 * BS, BS as u32).await;
        read(&c, 9 * BS, 100).await;
        c.close().await.unwrap();
        assert_eq!(
            read(&probe.mem, 0, 2 * BS as u32).await,
            pattern(1, 2 * BS as usize)
        );
        let c = back(&probe, 8, &dir).await;
        assert_eq!(c.cached_blocks(), 4);
        assert_eq!(c.dirty_bytes(), 0);
        let n = probe.reads();
        assert_eq!(
            read(&c, 0, 2 * BS as u32).await,
            pattern(1, 2 * BS as usize)
        );
        read(&c, 5 * BS, BS as u32).await;
        read(&c, 9 * BS + 50, 10).await;
        assert_eq!(probe.reads(), n, "kept blocks are hits");
        c.close().await.unwrap();
        // Another volume's cache is set aside, not used.
        let c = CacheLayer::open(
            probe.clone(),
            params(8, CacheMode::WriteBack),
            &dir,
            "vol-2",
        )
        .await
        .unwrap();
        assert_eq!(c.cached_blocks(), 0);
        assert_eq!(orphans_of(&dir).len(), 1);
        c.close().await.unwrap();
        for o in orphans_of(&dir) {
            std::fs::remove_dir_all(o).unwrap();
        }
    }

    /// Runs `f` in a runtime of its own, then drops the runtime: every task of the cache
    /// stops where it is, like a `kill -9` (the page cache survives, as it does then).
    fn crashing<T>(f: impl Future<Output = T>) -> T {
        let rt = runtime();
        let out = rt.block_on(f);
        drop(rt);
        out
    }

    #[test]
    fn flushes_that_queue_behind_an_index_sync_share_the_next_one() {
        let dir = tmp_dir("sync-group");
        let probe = Probe::new(16 * BS);
        let rt = runtime();
        let c = rt.block_on(async {
            let c = open(
                &probe,
                CacheParams {
                    flush: FlushTo::Local,
                    ..params(8, CacheMode::WriteBack)
                },
                &dir,
            )
            .await;
            // Only the FLUSHes sync (the syncer's first round is a second away).
            c.shared.syncer_paused.store(true, Ordering::SeqCst);
            c.write(BS, pattern(1, 4096), false).await.unwrap();
            c.flush().await.unwrap();
            // The next write stays dirty.
            probe.fail_writes.store(true, Ordering::SeqCst);
            c.write(2 * BS, pattern(2, 4096), false).await.unwrap();
            Arc::new(c)
        });
        let started = c.shared.syncs.started();
        let flushes = {
            // As if a sync were running: the FLUSHes wait for it.
            let _running = c.shared.syncs.hold();
            let waiting = c.shared.syncs.waiters();
            let flushes: Vec<_> = (0..8)
                .map(|_| {
                    let c = Arc::clone(&c);
                    rt.spawn(async move { c.flush().await })
                })
                .collect();
            c.shared.syncs.until_waiting(waiting + 8);
            flushes
        };
        rt.block_on(async {
            for f in flushes {
                f.await.unwrap().unwrap();
            }
            // One sync, begun after they all asked, did for all eight.
            assert_eq!(c.shared.syncs.started(), started + 1);
            // And it named the dirty block in the index: a restart replays it.
            let c = Arc::into_inner(c).unwrap();
            let named = c.shared.lock().disk.values().any(|r| r.block == 2);
            assert!(named);
            probe.fail_writes.store(false, Ordering::SeqCst);
            c.close().await.unwrap();
        });
    }

    #[test]
    fn a_local_flush_is_durable_in_the_cache_and_reaches_the_store_later() {
        let dir = tmp_dir("local-flush");
        let probe = Probe::new(16 * BS);
        let local = || CacheParams {
            flush: FlushTo::Local,
            ..params(8, CacheMode::WriteBack)
        };
        let below = |o, l| {
            futures::executor::block_on(probe.mem.read(o, l))
                .unwrap()
                .to_bytes()
                .to_vec()
        };
        let c = crashing(async {
            let c = open(&probe, local(), &dir).await;
            // Every upload fails, and yet FLUSH and FUA succeed: the cache's disk holds it.
            probe.fail_writes.store(true, Ordering::SeqCst);
            c.write(BS, pattern(5, BS as usize), false).await.unwrap();
            c.write(3 * BS + 512, pattern(6, 1024), false)
                .await
                .unwrap();
            c.flush().await.unwrap();
            c.write(5 * BS, pattern(7, 4096), true).await.unwrap();
            assert_eq!(probe.writes(), 0);
            c
        });
        // Killed with nothing uploaded.
        drop(c);
        assert_eq!(below(BS, BS as u32), vec![0; BS as usize]);
        probe.fail_writes.store(false, Ordering::SeqCst);
        crashing(async {
            // What FLUSH and FUA acknowledged is replayed from the cache ...
            let c = open(&probe, local(), &dir).await;
            assert_eq!(read(&c, BS, BS as u32).await, pattern(5, BS as usize));
            assert_eq!(read(&c, 3 * BS + 512, 1024).await, pattern(6, 1024));
            assert_eq!(read(&c, 5 * BS, 4096).await, pattern(7, 4096));
            // ... and a close uploads all of it, whatever `flush` says.
            c.close().await.unwrap();
        });
        assert_eq!(below(BS, BS as u32), pattern(5, BS as usize));
        assert_eq!(below(3 * BS + 512, 1024), pattern(6, 1024));
        assert_eq!(below(5 * BS, 4096), pattern(7, 4096));
    }

    #[test]
    fn a_fua_trim_of_a_recorded_block_is_not_undone_by_a_crash() {
        let dir = tmp_dir("crash-fua-trim");
        let probe = Probe::new(16 * BS);
        let c = crashing(async {
            let p = CacheParams {
                flush: FlushTo::Local,
                ..params(8, CacheMode::WriteBack)
            };
            let c = open(&probe, p, &dir).await;
            c.shared.syncer_paused.store(true, Ordering::SeqCst);
            c.shared.background_paused.store(true, Ordering::SeqCst);
            c.write(BS, pattern(1, BS as usize), false).await.unwrap();
            c.flush().await.unwrap();
            assert_eq!(c.shared.lock().disk.len(), 1, "the block is recorded dirty");
            c.trim(BS, BS, true).await.unwrap();
            c
        });
        drop(c);
        crashing(async {
            let c = back(&probe, 8, &dir).await;
            assert_eq!(
                read(&c, BS, BS as u32).await,
                vec![0; BS as usize],
                "the FUA TRIM stands; the dropped block's record is not replayed"
            );
            c.close().await.unwrap();
        });
    }

    #[test]
    fn a_crash_replays_recorded_dirty_blocks_and_serves_no_stale_data() {
        let dir = tmp_dir("crash");
        let probe = Probe::new(16 * BS);
        let old = pattern(9, BS as usize);
        let c = crashing(async {
            probe.mem.write(2 * BS, old.clone(), false).await.unwrap();
            let c = back(&probe, 8, &dir).await;
            c.write(0, pattern(1, BS as usize), false).await.unwrap();
            c.flush().await.unwrap();
            probe.hold_writes();
            c.write(BS, pattern(2, BS as usize), false).await.unwrap();
            c.write(2 * BS + 1024, pattern(3, 512), false)
                .await
                .unwrap();
            c.sync_index().await.unwrap();
            // After the sync: newer data in a recorded block, and a block not recorded.
            c.write(BS + 100, pattern(4, 50), false).await.unwrap();
            c.write(3 * BS, pattern(5, BS as usize), false)
                .await
                .unwrap();
            c
        });
        drop(c);
        // What was flushed is below; the rest is not.
        let below = |o, l| {
            futures::executor::block_on(probe.mem.read(o, l))
                .unwrap()
                .to_bytes()
                .to_vec()
        };
        assert_eq!(below(0, BS as u32), pattern(1, BS as usize));
        assert_eq!(below(BS, BS as u32), vec![0; BS as usize]);
        assert_eq!(below(2 * BS, BS as u32), old);
        crashing(async {
            let c = back(&probe, 8, &dir).await;
            // Writes are still held, so that the replayed blocks cannot be uploaded (and
            // clean) before they are counted.
            assert!(c.dirty_bytes() >= 2 * BS);
            probe.open_writes();
            let mut b1 = pattern(2, BS as usize).to_vec();
            b1[100..150].copy_from_slice(&pattern(4, 50));
            let mut b2 = old.to_vec();
            b2[1024..1536].copy_from_slice(&pattern(3, 512));
            // Served from the replayed blocks, never from the older data below.
            assert_eq!(read(&c, BS, BS as u32).await, b1);
            assert_eq!(read(&c, 2 * BS, BS as u32).await, b2);
            assert_eq!(read(&c, 0, BS as u32).await, pattern(1, BS as usize));
            let b3 = read(&c, 3 * BS, BS as u32).await;
            assert!(b3 == pattern(5, BS as usize) || b3 == vec![0; BS as usize]);
            c.flush().await.unwrap();
            assert_eq!(read(&probe.mem, BS, BS as u32).await, b1);
            assert_eq!(read(&probe.mem, 2 * BS, BS as u32).await, b2);
            assert_eq!(read(&probe.mem, 3 * BS, BS as u32).await, b3);
            c.close().await.unwrap();
        });
    }

    #[test]
    fn an_upload_started_as_the_runtime_shuts_down_is_dropped_without_a_deadlock() {
        // A runtime that is shutting down drops a task the moment it is spawned, and an
        // upload's drop takes the state lock: spawned under that lock, it deadlocked (this
        // hung CI once, in the test below).
        let dir = tmp_dir("shutdown-spawn");
        let probe = Probe::new(4 * BS);
        let rt = runtime();
        let c = rt.block_on(async {
            let c = open(
                &probe,
                CacheParams {
                    max_dirty: Some(BS),
                    ..params(2, CacheMode::WriteBack)
                },
                &dir,
            )
            .await;
            c.pause_background();
            c.write(0, pattern(1, BS as usize), false).await.unwrap();
            c
        });
        let handle = rt.handle().clone();
        drop(rt);
        let (done, finished) = std::sync::mpsc::channel();
        let shared = Arc::clone(&c.shared);
        std::thread::spawn(move || {
            let _runtime = handle.enter();
            shared.background_paused.store(false, Ordering::SeqCst);
            // Over the write-back bound: the block is due, and its upload is spawned.
            shared.schedule_uploads();
            let _ = done.send(shared.lock().uploads);
        });
        let uploads = finished
            .recv_timeout(Duration::from_secs(30))
            .expect("scheduling an upload on a runtime that shut down returns");
        assert_eq!(uploads, 0, "the dropped upload is no longer counted");
        assert_eq!(c.dirty_bytes(), BS, "and the block stays dirty");
        assert_eq!(probe.writes(), 0);
        drop(c);
    }

    #[test]
    fn a_recycled_slot_never_replays_another_blocks_data() {
        let dir = tmp_dir("crash-recycle");
        let probe = Probe::new(16 * BS);
        crashing(async {
            let c = open(
                &probe,
                CacheParams {
                    max_dirty: Some(2 * BS),
                    ..params(2, CacheMode::WriteBack)
                },
                &dir,
            )
            .await;
            c.write(0, pattern(1, BS as usize), false).await.unwrap();
            c.sync_index().await.unwrap();
            // Uploaded in the background: clean, but the index may still name it dirty.
            eventually("block 0 is uploaded", || c.dirty_bytes() == 0).await;
            // Fill the cache with other blocks, then write another one.
            read(&c, 5 * BS, BS as u32).await;
            read(&c, 6 * BS, BS as u32).await;
            probe.hold_writes();
            c.write(7 * BS, pattern(2, BS as usize), false)
                .await
                .unwrap();
            c
        });
        probe.open_writes();
        crashing(async {
            let c = back(&probe, 2, &dir).await;
            assert_eq!(read(&c, 0, BS as u32).await, pattern(1, BS as usize));
            let b7 = read(&c, 7 * BS, BS as u32).await;
            assert!(b7 == pattern(2, BS as usize) || b7 == vec![0; BS as usize]);
            c.flush().await.unwrap();
            assert_eq!(
                read(&probe.mem, 0, BS as u32).await,
                pattern(1, BS as usize)
            );
            c.close().await.unwrap();
        });
    }

    #[test]
    fn a_cache_of_another_volume_is_set_aside_and_never_replayed() {
        let dir = tmp_dir("orphan");
        let probe = Probe::new(8 * BS);
        probe.hold_writes();
        crashing(async {
            let c = back(&probe, 4, &dir).await;
            c.write(0, pattern(1, BS as usize), false).await.unwrap();
            c.sync_index().await.unwrap();
            c
        });
        probe.open_writes();
        crashing(async {
            let c = CacheLayer::open(
                probe.clone(),
                params(4, CacheMode::WriteBack),
                &dir,
                "vol-2",
            )
            .await
            .unwrap();
            assert_eq!((c.cached_blocks(), c.dirty_bytes()), (0, 0));
            assert_eq!(read(&c, 0, BS as u32).await, vec![0; BS as usize]);
            c.flush().await.unwrap();
            assert_eq!(probe.writes(), 0, "nothing was replayed");
            c.close().await.unwrap();
        });
        assert_eq!(
            std::fs::read_to_string(dir.join(ID_FILE)).unwrap(),
            "vol-2\n"
        );
        let orphans = orphans_of(&dir);
        assert_eq!(orphans.len(), 1);
        assert!(orphans[0].join(INDEX_FILE).exists());
        for o in orphans {
            std::fs::remove_dir_all(o).unwrap();
        }
    }

    #[test]
    fn a_cache_with_another_geometry_is_replayed_at_open() {
        let dir = tmp_dir("geometry");
        let probe = Probe::new(16 * BS);
        probe.hold_writes();
        crashing(async {
            let c = back(&probe, 8, &dir).await;
            c.write(BS, pattern(1, 2 * BS as usize), false)
                .await
                .unwrap();
            c.write(5 * BS + 512, pattern(2, 512), false).await.unwrap();
            c.sync_index().await.unwrap();
            c
        });
        probe.open_writes();
        crashing(async {
            let p = CacheParams {
                block_size: 2 * BS,
                ..params(8, CacheMode::WriteBack)
            };
            let c = open(&probe, p, &dir).await;
            // Written below before the open returned.
            assert_eq!(
                read(&probe.mem, BS, 2 * BS as u32).await,
                pattern(1, 2 * BS as usize)
            );
            assert_eq!(read(&probe.mem, 5 * BS + 512, 512).await, pattern(2, 512));
            assert_eq!(read(&probe.mem, 5 * BS, 512).await, vec![0; 512]);
            assert_eq!((c.cached_blocks(), c.dirty_bytes()), (0, 0));
            c.close().await.unwrap();
        });
    }

    #[test]
    fn write_through_replays_dirty_blocks_before_serving() {
        let dir = tmp_dir("wt-replay");
        let probe = Probe::new(8 * BS);
        probe.hold_writes();
        crashing(async {
            let c = back(&probe, 4, &dir).await;
            c.write(2 * BS, pattern(3, BS as usize), false)
                .await
                .unwrap();
            c.sync_index().await.unwrap();
            c
        });
        probe.open_writes();
        crashing(async {
            let c = layer(&probe, 4, &dir).await;
            assert_eq!(
                read(&probe.mem, 2 * BS, BS as u32).await,
                pattern(3, BS as usize)
            );
            assert_eq!(c.dirty_bytes(), 0);
            c.close().await.unwrap();
        });
    }

    #[test]
    fn clean_blocks_are_dropped_after_a_crash() {
        let dir = tmp_dir("crash-clean");
        let probe = Probe::new(8 * BS);
        crashing(async {
            let c = back(&probe, 4, &dir).await;
            read(&c, 0, 2 * BS as u32).await;
            c.close().await.unwrap();
            let c = back(&probe, 4, &dir).await;
            assert_eq!(c.cached_blocks(), 2);
            c
        });
        // Changed below while no cache was running: only a clean close vouches for copies.
        crashing(async {
            let c = back(&probe, 4, &dir).await;
            assert_eq!(c.cached_blocks(), 0);
            c.close().await.unwrap();
        });
    }

    // ---- parameters and formats -------------------------------------------------------------

    #[test]
    fn params_come_from_toml_with_sizes_as_strings_or_numbers() {
        let p: CacheParams = toml::from_str("size = \"2GiB\"").unwrap();
        assert_eq!(
            p,
            CacheParams {
                size: 2 << 30,
                ..CacheParams::default()
            }
        );
        p.validate().unwrap();
        assert_eq!(p.mode, CacheMode::WriteBack);
        assert_eq!(p.effective_max_dirty(), 256 << 20);
        let p: CacheParams = toml::from_str(
            "path = \"/var/cache/x\"\nsize = 8388608\nblock_size = \"64KiB\"\nmode = \"write-through\"\nmax_dirty = \"1MiB\"\nupload_concurrency = 16",
        )
        .unwrap();
        assert_eq!(p.path.as_deref(), Some(Path::new("/var/cache/x")));
        assert_eq!((p.size, p.block_size), (8 << 20, 64 << 10));
        assert_eq!(p.mode, CacheMode::WriteThrough);
        assert_eq!((p.max_dirty, p.upload_concurrency), (Some(1 << 20), 16));
        p.validate().unwrap();
        let d = CacheParams::default();
        assert_eq!(
            (d.block_size, d.size, d.upload_concurrency),
            (4 << 20, 1 << 30, 8)
        );
        assert_eq!(d.effective_max_dirty(), 256 << 20);
        let small = CacheParams {
            size: 64 << 20,
            ..CacheParams::default()
        };
        assert_eq!(small.effective_max_dirty(), 16 << 20);
        let e = toml::from_str::<CacheParams>("size = \"2GiB\"\nsise = 1").unwrap_err();
        assert!(e.to_string().contains("unknown field `sise`"), "{e}");
        let e = toml::from_str::<CacheParams>("size = \"lots\"").unwrap_err();
        assert!(e.to_string().contains("bad size \"lots\""), "{e}");
        let e = toml::from_str::<CacheParams>("size = -1").unwrap_err();
        assert!(e.to_string().contains("greater than zero"), "{e}");
        let e = toml::from_str::<CacheParams>("mode = \"write-around\"").unwrap_err();
        assert!(e.to_string().contains("write-back"), "{e}");
        let p: CacheParams = toml::from_str("flush = \"local\"").unwrap();
        assert_eq!(p.flush, FlushTo::Local);
        assert_eq!(CacheParams::default().flush, FlushTo::Store);
        let e = toml::from_str::<CacheParams>("flush = \"disk\"").unwrap_err();
        assert!(e.to_string().contains("expected `store` or `local`"), "{e}");
    }

    #[test]
    fn bad_parameters_are_refused_naming_the_key() {
        let check = |p: CacheParams| p.validate().map_err(|e| e.to_string());
        let geometry = |size, block_size| CacheParams {
            size,
            block_size,
            ..CacheParams::default()
        };
        assert_eq!(check(geometry(1 << 20, 1 << 20)), Ok(()));
        assert_eq!(
            check(geometry(1 << 20, 3000)),
            Err(
                "block_size 3000 must be a power of two from 4 KiB (4096) to 32 MiB (33554432)"
                    .into()
            )
        );
        assert!(check(geometry(1 << 30, 1 << 26)).is_err());
        assert_eq!(
            check(geometry(1000, 4096)),
            Err("size 1000 must hold at least one cache block (block_size 4096)".into())
        );
        assert!(
            check(geometry(1 << 33, 4096))
                .unwrap_err()
                .starts_with("size 8589934592 with block_size 4096 makes more than")
        );
        let dirty = |m| CacheParams {
            max_dirty: Some(m),
            ..CacheParams::default()
        };
        assert_eq!(
            check(dirty(1 << 20)),
            Err("max_dirty 1048576 must be at least one cache block (block_size 4194304)".into())
        );
        assert_eq!(
            check(dirty(2 << 30)),
            Err("max_dirty 2147483648 must not exceed the cache size 1073741824".into())
        );
        let uploads = |n| CacheParams {
            upload_concurrency: n,
            ..CacheParams::default()
        };
        assert_eq!(
            check(uploads(0)),
            Err("upload_concurrency must be from 1 to 256, got 0".into())
        );
        assert_eq!(check(uploads(256)), Ok(()));
        assert_eq!(
            check(CacheParams {
                flush: FlushTo::Local,
                mode: CacheMode::WriteThrough,
                ..CacheParams::default()
            }),
            Err("flush = \"local\" needs mode = \"write-back\": in write-through mode every write is in the store when it returns".into())
        );
    }

    #[tokio::test]
    async fn a_block_size_the_device_cannot_read_is_refused() {
        let dir = tmp_dir("too-big");
        let probe = Probe::new(1 << 30);
        let p = CacheParams {
            block_size: 32 << 20,
            ..CacheParams::default()
        };
        // MemoryImage accepts 32 MiB reads: fine.
        CacheLayer::open(probe.clone(), p, &dir, "v")
            .await
            .unwrap()
            .close()
            .await
            .unwrap();
    }

    #[test]
    fn index_entries_round_trip_and_detect_damage() {
        let h = Header {
            state: STATE_IN_USE,
            block_size: 1 << 22,
            slots: 256,
            record_len: record_len(1 << 22) as u32,
            key: "sharded:0e0a1c5e".into(),
        };
        let mut b = encode_header(&h);
        assert_eq!(decode_header(&b), Ok(h.clone()));
        b[20] ^= 1;
        assert!(decode_header(&b).unwrap_err().contains("checksum"));
        assert_eq!(record_len(4096), 40);
        assert_eq!(record_len(1 << 22), 1056);
        let bits = bitmap_len(1 << 22);
        let mut v = Valid::empty(8192);
        v.set(3, 70, 8192);
        let r = RawRecord {
            block: 77,
            generation: 5,
            kind: KIND_DIRTY,
            bitmap: v.to_bitmap(bits),
        };
        let e = encode_record(9, &r, record_len(1 << 22));
        assert_eq!(decode_record(9, &e, bits), Some(r.clone()));
        assert_eq!(
            Valid::from_bitmap(r.bitmap.as_deref(), 8192).runs(8192, true),
            vec![(3, 70)]
        );
        // A record read at another slot, torn, or never written is not one.
        assert_eq!(decode_record(10, &e, bits), None);
        let mut torn = e.clone();
        torn[30] ^= 4;
        assert_eq!(decode_record(9, &torn, bits), None);
        assert_eq!(decode_record(9, &vec![0; e.len()], bits), None);
        assert!(stored_key(&"k".repeat(5000)).starts_with("fnv64:"));
    }

    #[test]
    fn valid_sectors() {
        let mut v = Valid::empty(10);
        assert!(v.is_empty() && !v.covers(0, 1) && v.covers(3, 3));
        assert!(v.set(2, 5, 10));
        assert!(!v.set(3, 4, 10));
        assert!(v.covers(2, 5) && !v.covers(1, 5));
        assert_eq!(v.runs(10, false), vec![(0, 2), (5, 10)]);
        v.set(0, 2, 10);
        v.set(5, 64, 10);
        assert_eq!(v, Valid::Full);
        assert_eq!(v.runs(10, true), vec![(0, 10)]);
        let mut w = Valid::empty(128);
        w.set(0, 128, 128);
        assert!(w.is_full());
    }

    #[tokio::test]
    async fn range_locks_are_first_come_first_served() {
        let locks = Arc::new(RangeLocks::default());
        let a = locks.lock(5, 5).await;
        let big = tokio::spawn({
            let locks = locks.clone();
            async move { locks.lock(0, 100).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        // A later request overlapping the waiting one queues behind it.
        let later = tokio::spawn({
            let locks = locks.clone();
            async move { locks.lock(50, 50).await }
        });
        // One overlapping nothing does not.
        let other = locks.lock(200, 300).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!big.is_finished() && !later.is_finished());
        drop(a);
        let big = big.await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!later.is_finished());
        drop(big);
        drop(later.await.unwrap());
        drop(other);
        assert!(locks.lock_state().held.is_empty() && locks.lock_state().waiting.is_empty());
    }

    // ---- randomized -------------------------------------------------------------------------

    /// One step of a random workload, applied to the cache and to a reference disk.
    async fn random_step(c: &dyn BlockDevice, model: &MemoryImage, size: u64, seed: u8) {
        let mut offset = rand_u64() % size;
        let mut len = (1 + rand_u64() % (3 * BS)).min(size - offset);
        if rand_u64().is_multiple_of(2) {
            // Sector-aligned, as most clients do.
            offset -= offset % SECTOR;
            len = len.div_ceil(SECTOR) * SECTOR;
            len = len.min(size - offset);
        }
        let fua = rand_u64().is_multiple_of(8);
        match rand_u64() % 12 {
            0..=3 => {
                let got = read(c, offset, len as u32).await;
                let want = read(model, offset, len as u32).await;
                assert!(got == want, "read {offset}+{len} differs from the model");
            }
            4..=6 => {
                let data = pattern(seed, len as usize);
                c.write(offset, data.clone(), fua).await.unwrap();
                model.write(offset, data, false).await.unwrap();
            }
            7 => {
                c.trim(offset, len, fua).await.unwrap();
                model.trim(offset, len, false).await.unwrap();
            }
            8 => {
                let f = ZeroFlags {
                    fua,
                    ..ZeroFlags::default()
                };
                c.write_zeroes(offset, len, f).await.unwrap();
                model.write_zeroes(offset, len, f).await.unwrap();
            }
            9 => c.flush().await.unwrap(),
            10 => c.cache(offset, len).await.unwrap(),
            _ => {
                // Whole blocks.
                let first = offset / BS;
                let n = (1 + rand_u64() % 3).min(size / BS - first.min(size / BS));
                if n > 0 && (first + n) * BS <= size {
                    let data = pattern(seed, (n * BS) as usize);
                    c.write(first * BS, data.clone(), fua).await.unwrap();
                    model.write(first * BS, data, false).await.unwrap();
                }
            }
        }
    }

    async fn assert_same(c: &dyn BlockDevice, model: &MemoryImage, size: u64, what: &str) {
        let got = read(c, 0, size as u32).await;
        let want = read(model, 0, size as u32).await;
        assert!(got == want, "{what}: the device differs from the model");
    }

    /// Rounds of random steps; each round ends with a clean close or with an index sync and a
    /// crash, and the next round's cache must read exactly as the model.
    #[test]
    fn random_workload_matches_a_model_across_restarts() {
        for mode in [CacheMode::WriteThrough, CacheMode::WriteBack] {
            let dir = tmp_dir(&format!("random-{mode}"));
            let size = 37 * BS + 1234;
            let probe = Probe::new(size);
            let model = MemoryImage::new(size, false);
            for round in 0..4u32 {
                let c = crashing(async {
                    let c = open(&probe, params(6, mode), &dir).await;
                    assert_same(&c, &model, size, &format!("{mode} round {round} start")).await;
                    for i in 0..500u32 {
                        random_step(&c, &model, size, (i + round * 7) as u8).await;
                        assert!(c.cached_blocks() <= 6);
                        assert!(c.dirty_bytes() <= 3 * BS);
                    }
                    assert_same(&c, &model, size, &format!("{mode} round {round} end")).await;
                    if round % 2 == 0 {
                        c.close().await.unwrap();
                        assert_same(&probe.mem, &model, size, "below after close").await;
                    } else {
                        c.sync_index().await.unwrap();
                    }
                    c
                });
                drop(c);
            }
            let allocated = {
                use std::os::unix::fs::MetadataExt;
                std::fs::metadata(dir.join(DATA_FILE)).unwrap().blocks() * 512
            };
            assert!(
                allocated <= 6 * BS + 4096,
                "cache file holds {allocated} bytes"
            );
        }
    }

    /// Tasks share cache blocks but each owns its own 512-byte stripes, so each can check its
    /// reads against its own model while the others write, trim, flush and evict the same
    /// blocks. Between rounds the cache closes or crashes after an index sync.
    #[test]
    fn concurrent_tasks_with_flushes_and_restarts_match_their_models() {
        const TASKS: u64 = 6;
        const UNIT: u64 = 512;
        for mode in [CacheMode::WriteThrough, CacheMode::WriteBack] {
            let dir = tmp_dir(&format!("concurrent-{mode}"));
            let size = 16 * BS;
            let probe = Probe::new(size);
            probe.jitter.store(true, Ordering::Relaxed);
            let units = size / UNIT / TASKS;
            let mut models: Vec<Vec<Vec<u8>>> =
                vec![vec![vec![0u8; UNIT as usize]; units as usize]; TASKS as usize];
            for round in 0..3u64 {
                let (c, back_models) = crashing(async {
                    let c = Arc::new(open(&probe, params(4, mode), &dir).await);
                    let mut tasks = Vec::new();
                    for (t, mut model) in std::mem::take(&mut models).into_iter().enumerate() {
                        let t = t as u64;
                        let c = c.clone();
                        tasks.push(tokio::spawn(async move {
                            for u in 0..units {
                                let offset = (u * TASKS + t) * UNIT;
                                let got = c.read(offset, UNIT as u32).await.unwrap().to_bytes();
                                assert!(got == model[u as usize], "task {t} unit {u} at start");
                            }
                            for i in 0..300u64 {
                                let u = rand_u64() % units;
                                let offset = (u * TASKS + t) * UNIT;
                                match rand_u64() % 10 {
                                    0..=3 => {
                                        let got =
                                            c.read(offset, UNIT as u32).await.unwrap().to_bytes();
                                        assert!(
                                            got == model[u as usize],
                                            "task {t} unit {u} step {i}"
                                        );
                                    }
                                    4..=6 => {
                                        let seed = (t * 31 + i + round * 7) as u8;
                                        let data = pattern(seed, UNIT as usize);
                                        let fua = i.is_multiple_of(8);
                                        c.write(offset, data.clone(), fua).await.unwrap();
                                        model[u as usize] = data.to_vec();
                                    }
                                    7 => {
                                        c.trim(offset, UNIT, false).await.unwrap();
                                        model[u as usize] = vec![0; UNIT as usize];
                                    }
                                    8 => {
                                        c.write_zeroes(offset, UNIT, ZeroFlags::default())
                                            .await
                                            .unwrap();
                                        model[u as usize] = vec![0; UNIT as usize];
                                    }
                                    _ => c.flush().await.unwrap(),
                                }
                            }
                            model
                        }));
                    }
                    let mut out = Vec::new();
                    for t in tasks {
                        out.push(t.await.unwrap());
                    }
                    assert_quiet(&c).await;
                    if round % 2 == 0 {
                        c.close().await.unwrap();
                    } else {
                        c.sync_index().await.unwrap();
                    }
                    (c, out)
                });
                drop(c);
                models = back_models;
            }
            // What the last round left is below once a cache closes.
            crashing(async {
                let c = open(&probe, params(4, mode), &dir).await;
                c.close().await.unwrap();
                for (t, model) in models.iter().enumerate() {
                    for (u, want) in model.iter().enumerate() {
                        let offset = (u as u64 * TASKS + t as u64) * UNIT;
                        assert_eq!(&read(&probe.mem, offset, UNIT as u32).await, want);
                    }
                }
            });
        }
    }
}
