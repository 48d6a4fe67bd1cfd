//! The `sharded` layout: a disk cut into fixed-size chunks, each an object (`{name}.{n}.chunk`).
//!
//! A volume named `vm1` is the object `vm1.volume`, its metadata, and the chunk objects
//! `vm1.0.chunk`, `vm1.1.chunk`, ... Chunk `n` holds bytes `n * chunk_size ..` of the disk and
//! is `chunk_size` bytes long, except the last when the disk size is not a multiple of the chunk
//! size: that one holds only what is left (so any size is accepted and nothing past the end of
//! the disk is ever stored). A chunk that does not exist reads as zeroes.
//!
//! The metadata is TOML, written (durably) when the volume is created, and again once with
//! `format = 2` when its journal is first used:
//!
//! ```toml
//! format = 1
//! size = 1073741824
//! chunk_size = 4194304
//! id = "0e0a1c5e-2a3b-4c6d-8e9f-0a1b2c3d4e5f"
//! ```
//!
//! Opening a volume lists `{name}.` once and keeps the set of present chunks in memory: this
//! pipeline is the only writer of the volume, so the set stays exact and reads of absent chunks,
//! block status and zeroing of absent ranges never reach the store.
//!
//! # The flush journal
//!
//! A write-back cache above makes a FLUSH durable by appending one record of what changed since
//! the last one to the volume's journal ([`crate::block::Journal`]), the objects
//! `{name}.{n}.journal` (format in [`crate::layout::journal`]), instead of uploading every chunk
//! it touched. Records are applied when the volume is opened: the newest one names the oldest
//! record still needed, those are folded into one map of where each changed byte's final
//! content comes from, the chunks that changes land in are rewritten, and then a record that
//! needs nothing before it is written and the others are deleted (it last, so that a crash
//! during the deletions leaves a set that still applies correctly). A read-only export of a
//! volume with records not yet applied is refused: it cannot apply them and would serve older
//! data. A volume that has had a journal says `format = 2` in its metadata, which versions that
//! do not know journals refuse to open.
//!
//! Before it writes a record, the journal makes every change already written to the store
//! durable (`flush`): a record may say that the store holds a range ("settled"), and the
//! records it lets go may be deleted only once the chunks hold their data.
//!
//! Writes go through `put_range` when the store supports it (local stores write in place);
//! otherwise each touched chunk is read, modified and written back whole under a per-chunk
//! lock, so that concurrent writes to different parts of one chunk never undo each other.
//! TRIM and WRITE_ZEROES delete the chunks they cover whole and zero the partial pieces of
//! present chunks; NO_HOLE is ignored, as an object store has no allocation to keep.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt, TryStreamExt, stream};
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use crate::block::{
    BlockDevice, BlockError, BlockSizes, DeviceInfo, Extent, Journal, JournalEntry, ReadChunk,
    ReadData, STATE_HOLE, STATE_ZERO, ZeroFlags, is_zero,
};
use crate::layout::journal::{self, Overlay, Source, record_key, record_number};
use crate::layout::readahead::{ForgetOnDrop, ReadAhead};
use crate::store::{ObjectStore, StoreError, check_key};

/// The default chunk size: 4 MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
/// Bytes of chunks fetched ahead of a stream of reads, by default, on stores of whole objects.
pub const DEFAULT_READAHEAD: u64 = 32 << 20;
/// The most `readahead` may be.
pub const MAX_READAHEAD: u64 = 1 << 30;
/// The smallest chunk size: 4 KiB.
pub const MIN_CHUNK_SIZE: u64 = 4 << 10;
/// The largest chunk size: 1 GiB.
pub const MAX_CHUNK_SIZE: u64 = 1 << 30;
/// The largest volume: what a TOML integer holds.
const MAX_SIZE: u64 = i64::MAX as u64;
/// The metadata format of a volume that has never had a journal.
const FORMAT: i64 = 1;
/// The metadata format of a volume that may have journal records: versions that do not know
/// journals must not open it.
const FORMAT_JOURNAL: i64 = 2;
/// Journal records applied at open are kept in memory up to this many bytes; beyond that,
/// their data is read again, range by range, when it is copied into the chunks.
#[cfg(not(test))]
const REPLAY_MEMORY: u64 = 256 << 20;
/// Small in tests, so that they read records both ways.
#[cfg(test)]
const REPLAY_MEMORY: u64 = 64 << 10;
/// Chunks rewritten at once when journal records are applied at open.
const REPLAY_PARALLEL: usize = 16;
/// Deletions of records that are no longer needed, at once.
const DELETE_PARALLEL: usize = 8;
/// Per-chunk locks, shared by chunks `n`, `n + STRIPES`, ...
const STRIPES: usize = 256;
/// Store calls one request runs at once.
const PARALLEL: usize = 64;
/// Block status examines at most this many present chunks per call; clients ask again for the
/// rest. Absent chunks cost nothing, so the work per call is bounded whatever the volume size.
const STATUS_MAX_CHUNKS: usize = 4096;

/// How to open a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardedOptions {
    /// The volume's name: the prefix of its object keys.
    pub name: String,
    /// Bytes per chunk: a power of two from 4 KiB to 1 GiB. If given, it must match the
    /// volume's; if not, an existing volume's is used and a new one gets 4 MiB.
    pub chunk_size: Option<u64>,
    /// Create the volume with this size if it does not exist; if it does, its size must match.
    pub size: Option<u64>,
    /// Refuse writes, trims and zeroing.
    pub read_only: bool,
    /// False for a dry run: check everything but never create or change anything (the volume
    /// returned is read-only, and reads as zeroes if it does not exist yet).
    pub create: bool,
}

impl ShardedOptions {
    /// Options for the volume `name`: 4 MiB chunks, no size, writable, created if missing.
    pub fn new(name: impl Into<String>) -> Self {
        ShardedOptions {
            name: name.into(),
            chunk_size: None,
            size: None,
            read_only: false,
            create: true,
        }
    }
}

/// Why a volume could not be opened. Each message names the volume and, where one is involved,
/// the object.
#[derive(Debug, thiserror::Error)]
pub enum ShardedError {
    /// The name cannot be the prefix of object keys.
    #[error(
        "invalid volume name {0:?}: it must be printable ASCII without a leading or trailing \
         '/', empty, '.' or '..' components, and at most 997 bytes"
    )]
    BadName(String),
    /// The chunk size is out of bounds.
    #[error(
        "volume \"{name}\": chunk size {chunk_size} is not a power of two from 4096 to 1073741824"
    )]
    BadChunkSize {
        /// The volume.
        name: String,
        /// The chunk size asked for.
        chunk_size: u64,
    },
    /// The size is out of bounds.
    #[error("volume \"{name}\": size {size} is not between 1 and 9223372036854775807 bytes")]
    BadSize {
        /// The volume.
        name: String,
        /// The size asked for.
        size: u64,
    },
    /// The volume does not exist and no size was given.
    #[error("volume \"{name}\" does not exist (no object {key}); give a size to create it")]
    Missing {
        /// The volume.
        name: String,
        /// Its metadata object.
        key: String,
    },
    /// The volume does not exist and the export is read-only.
    #[error(
        "volume \"{name}\" does not exist (no object {key}), and a read-only export does not create it"
    )]
    MissingReadOnly {
        /// The volume.
        name: String,
        /// Its metadata object.
        key: String,
    },
    /// The volume exists with another size than the one asked for.
    #[error(
        "volume \"{name}\" was created with size {recorded} bytes, but size {wanted} was asked for \
         (recorded in {key})"
    )]
    SizeMismatch {
        /// The volume.
        name: String,
        /// Its metadata object.
        key: String,
        /// The size it has.
        recorded: u64,
        /// The size asked for.
        wanted: u64,
    },
    /// The volume exists with another chunk size than the one asked for.
    #[error(
        "volume \"{name}\" was created with chunk size {recorded} bytes, but chunk size {wanted} \
         was asked for (recorded in {key})"
    )]
    ChunkSizeMismatch {
        /// The volume.
        name: String,
        /// Its metadata object.
        key: String,
        /// The chunk size it has.
        recorded: u64,
        /// The chunk size asked for.
        wanted: u64,
    },
    /// The metadata object cannot be understood.
    #[error("volume \"{name}\": {key} is not valid volume metadata: {reason}")]
    BadMetadata {
        /// The volume.
        name: String,
        /// Its metadata object.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The metadata is of a format this version does not know.
    #[error(
        "volume \"{name}\": {key} has format {format}, but this version reads only formats 1 \
         and 2"
    )]
    UnsupportedFormat {
        /// The volume.
        name: String,
        /// Its metadata object.
        key: String,
        /// The format found.
        format: i64,
    },
    /// Chunks or journal records exist without metadata: creating a volume would adopt them as
    /// its content.
    #[error(
        "volume \"{name}\" has no {key}, but {count} chunk or journal objects such as {example} \
         exist; refusing to create a volume over them (restore {key} or delete them)"
    )]
    Orphans {
        /// The volume.
        name: String,
        /// Its metadata object.
        key: String,
        /// How many chunks were found.
        count: usize,
        /// One of them.
        example: String,
    },
    /// A journal record cannot be read or applied: opening would lose flushed writes.
    #[error(
        "volume \"{name}\": journal record {key}: {reason}; refusing to open the volume, as the \
         flushed writes it holds could not be applied"
    )]
    Journal {
        /// The volume.
        name: String,
        /// The record's key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A read-only export of a volume whose journal holds writes not yet in its chunks.
    #[error(
        "volume \"{name}\" has {count} journal records ({first} to {last}) with flushed writes \
         not yet applied to its chunks (left by a server that did not close the volume); a \
         read-only export cannot apply them: serve the volume writable once"
    )]
    UnappliedJournal {
        /// The volume.
        name: String,
        /// How many records.
        count: usize,
        /// The oldest record's key.
        first: String,
        /// The newest record's key.
        last: String,
    },
    /// The store failed.
    #[error("volume \"{name}\": {source}")]
    Store {
        /// The volume.
        name: String,
        /// What the store said.
        #[source]
        source: StoreError,
    },
}

/// The metadata object's content.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    format: i64,
    size: u64,
    chunk_size: u64,
    id: String,
}

/// A disk made of chunk objects in a store.
pub struct ShardedVolume {
    info: DeviceInfo,
    store: Arc<dyn ObjectStore>,
    name: String,
    id: String,
    chunk_size: u64,
    put_range: bool,
    /// The chunks that exist in the store.
    present: Mutex<BTreeSet<u64>>,
    /// Per-chunk locks: shared for `put_range` writes (the store keeps non-overlapping ranges
    /// apart), exclusive for read-modify-write and deletion.
    locks: Box<[RwLock<()>]>,
    /// The flush journal (offered to layers above only when the volume is writable).
    journal: Arc<VolumeJournal>,
    /// Fetches of chunks ahead of streams of reads (`layout::readahead`), on stores of whole
    /// objects; local stores have the page cache's.
    readahead: Option<ReadAhead>,
}

impl std::fmt::Debug for ShardedVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedVolume")
            .field("name", &self.name)
            .field("id", &self.id)
            .field("size", &self.info.size)
            .field("chunk_size", &self.chunk_size)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// One chunk's share of a byte range.
#[derive(Debug, Clone, Copy)]
struct Piece {
    /// The chunk.
    chunk: u64,
    /// Where the piece starts in the chunk.
    start: u64,
    /// Its length.
    len: u64,
    /// Where it starts in the request.
    pos: u64,
}

/// What zeroing does to one chunk.
#[derive(Debug, Clone, Copy)]
enum ZeroJob {
    /// Covered whole: delete it.
    Delete(u64),
    /// Covered in part: zero that part.
    Partial(Piece),
}

/// Parses a chunk key's index: `{name}.{n}.chunk` with `n` in canonical decimal.
fn chunk_index(prefix: &str, key: &str) -> Option<u64> {
    let n = key.strip_prefix(prefix)?.strip_suffix(".chunk")?;
    let canonical =
        !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && (n == "0" || !n.starts_with('0'));
    if canonical { n.parse().ok() } else { None }
}

fn valid_chunk_size(c: u64) -> bool {
    c.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&c)
}

fn valid_size(s: u64) -> bool {
    (1..=MAX_SIZE).contains(&s)
}

impl ShardedVolume {
    /// Opens the volume `opts.name` in `store`, creating it when it is missing and a size is
    /// given (unless `opts.create` is false or the volume is read-only).
    pub async fn open(
        store: Arc<dyn ObjectStore>,
        opts: ShardedOptions,
    ) -> Result<ShardedVolume, ShardedError> {
        let name = opts.name;
        // The longest key the volume can have must be valid: this checks the name.
        if check_key(&name).is_err() || check_key(&format!("{name}.{}.chunk", u64::MAX)).is_err() {
            return Err(ShardedError::BadName(name));
        }
        if let Some(c) = opts.chunk_size
            && !valid_chunk_size(c)
        {
            return Err(ShardedError::BadChunkSize {
                name,
                chunk_size: c,
            });
        }
        if let Some(size) = opts.size
            && !valid_size(size)
        {
            return Err(ShardedError::BadSize { name, size });
        }
        let key = format!("{name}.volume");
        let prefix = format!("{name}.");
        let store_err = |source| ShardedError::Store {
            name: name.clone(),
            source,
        };
        let meta = store.get(&key, None).await.map_err(store_err)?;
        let listed = store.list(&prefix).await.map_err(store_err)?;
        let records: Vec<u64> = listed
            .iter()
            .filter_map(|k| record_number(&prefix, k))
            .collect();
        let mut chunks: Vec<(u64, String)> = listed
            .into_iter()
            .filter_map(|k| chunk_index(&prefix, &k).map(|n| (n, k)))
            .collect();

        let (size, id, chunk_size, format) = match meta {
            Some(raw) => {
                let m = parse_metadata(&name, &key, &raw)?;
                if let Some(wanted) = opts.chunk_size
                    && m.chunk_size != wanted
                {
                    return Err(ShardedError::ChunkSizeMismatch {
                        name,
                        key,
                        recorded: m.chunk_size,
                        wanted,
                    });
                }
                if let Some(wanted) = opts.size
                    && wanted != m.size
                {
                    return Err(ShardedError::SizeMismatch {
                        name,
                        key,
                        recorded: m.size,
                        wanted,
                    });
                }
                (m.size, m.id, m.chunk_size, m.format)
            }
            None => {
                let chunk_size = opts.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
                let Some(size) = opts.size else {
                    return Err(ShardedError::Missing { name, key });
                };
                if opts.read_only {
                    return Err(ShardedError::MissingReadOnly { name, key });
                }
                let example = chunks
                    .first()
                    .map(|(_, k)| k.clone())
                    .or_else(|| records.first().map(|&n| record_key(&name, n)));
                if let Some(example) = example {
                    return Err(ShardedError::Orphans {
                        name,
                        key,
                        count: chunks.len() + records.len(),
                        example,
                    });
                }
                if opts.create {
                    let id = uuid::Uuid::new_v4().to_string();
                    let m = Metadata {
                        format: FORMAT,
                        size,
                        chunk_size,
                        id,
                    };
                    let text = toml::to_string(&m).map_err(|e| ShardedError::BadMetadata {
                        name: name.clone(),
                        key: key.clone(),
                        reason: e.to_string(),
                    })?;
                    store
                        .put(&key, Bytes::from(text), true)
                        .await
                        .map_err(store_err)?;
                    tracing::info!(
                        volume = %name,
                        size,
                        chunk_size,
                        id = %m.id,
                        "created sharded volume"
                    );
                    (size, m.id, chunk_size, FORMAT)
                } else {
                    // Dry run: the volume would be created; nothing is.
                    (size, String::new(), chunk_size, FORMAT)
                }
            }
        };

        let count = size.div_ceil(chunk_size);
        chunks.retain(|(n, k)| {
            if *n >= count {
                tracing::warn!(volume = %name, key = %k, "ignoring chunk beyond the volume's end");
            }
            *n < count
        });
        let read_only = opts.read_only || !opts.create;
        if opts.read_only && opts.create && !records.is_empty() {
            let (first, last) = (records.iter().min(), records.iter().max());
            return Err(ShardedError::UnappliedJournal {
                count: records.len(),
                first: record_key(&name, first.copied().unwrap_or(0)),
                last: record_key(&name, last.copied().unwrap_or(0)),
                name,
            });
        }
        let journal = Arc::new(VolumeJournal {
            store: Arc::clone(&store),
            name: name.clone(),
            id: id.clone(),
            meta_key: key,
            size,
            chunk_size,
            state: tokio::sync::Mutex::new(JournalState {
                next: 1,
                floor: 1,
                upgraded: format == FORMAT_JOURNAL,
                last_empty: false,
            }),
            deletions: Mutex::new(Vec::new()),
            deletions_failed: Arc::new(AtomicBool::new(false)),
        });
        let volume = ShardedVolume {
            info: DeviceInfo {
                size,
                read_only,
                can_trim: true,
                can_fast_zero: true,
                multi_conn: true,
                rotational: false,
                block_sizes: BlockSizes::default(),
            },
            put_range: store.supports_put_range(),
            store,
            name,
            id,
            chunk_size,
            present: Mutex::new(chunks.into_iter().map(|(n, _)| n).collect()),
            locks: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            journal,
            readahead: None,
        }
        .with_readahead(DEFAULT_READAHEAD);
        // A dry run changes nothing, and needs no data.
        if !records.is_empty() && !read_only {
            volume.apply_journal(records).await?;
        }
        Ok(volume)
    }

    /// The volume's unique id (a UUID), recorded when it was created. Empty in a dry run of a
    /// volume that does not exist yet.
    pub fn volume_id(&self) -> &str {
        &self.id
    }

    /// Bytes per chunk.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Fetches up to `bytes` of whole chunks ahead of a stream of reads (none if that is less
    /// than a chunk), when the store holds whole objects; local stores never do.
    pub fn with_readahead(mut self, bytes: u64) -> Self {
        let depth = bytes.min(MAX_READAHEAD) / self.chunk_size;
        self.readahead = (depth > 0 && !self.put_range).then(|| {
            ReadAhead::new(
                usize::try_from(depth).unwrap_or(usize::MAX),
                self.chunk_size,
            )
        });
        self
    }

    /// Chunks fetched ahead for a stream of reads, in the order they were started.
    #[cfg(test)]
    fn held_ahead(&self) -> Vec<u64> {
        self.readahead
            .as_ref()
            .map_or_else(Vec::new, |ra| ra.held())
    }

    /// Forgets the chunks of `offset..offset + len` fetched ahead once dropped: a change to
    /// them has ended.
    fn forget_after(&self, offset: u64, len: u64) -> ForgetOnDrop<'_> {
        ForgetOnDrop {
            ahead: self.readahead.as_ref(),
            first: offset / self.chunk_size,
            last: (offset + len.max(1) - 1) / self.chunk_size,
        }
    }

    fn key(&self, chunk: u64) -> String {
        format!("{}.{chunk}.chunk", self.name)
    }

    /// Length of chunk `n`: the chunk size, or what is left for the last chunk.
    fn chunk_len(&self, n: u64) -> u64 {
        self.chunk_size.min(self.info.size - n * self.chunk_size)
    }

    fn present(&self) -> MutexGuard<'_, BTreeSet<u64>> {
        // A poisoned lock means a panic during a set operation; the set is still sound.
        self.present.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_present(&self, n: u64) -> bool {
        self.present().contains(&n)
    }

    fn lock(&self, n: u64) -> &RwLock<()> {
        // The modulo keeps the index below STRIPES.
        &self.locks[(n % STRIPES as u64) as usize]
    }

    /// The chunks' shares of `offset..offset + len`, in order.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = Piece> + use<> {
        let cs = self.chunk_size;
        let end = offset + len;
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let chunk = at / cs;
            let start = at % cs;
            let len = (cs - start).min(end - at);
            let piece = Piece {
                chunk,
                start,
                len,
                pos: at - offset,
            };
            at += len;
            Some(piece)
        })
    }

    async fn read_piece(&self, p: Piece) -> Result<ReadChunk, BlockError> {
        // A piece is at most one request long, which fits in u32.
        let zero = ReadChunk::Zero(p.len as u32);
        if !self.is_present(p.chunk) {
            return Ok(zero);
        }
        if let Some(ra) = &self.readahead {
            let chunk_len = self.chunk_len(p.chunk);
            if let Some((fetch, _stop_if_dropped)) = ra.take(p.chunk, p.start + p.len == chunk_len)
                && let Some(whole) = fetch.await
                && whole.len() as u64 == chunk_len
            {
                // Within the chunk, so within usize.
                let (from, to) = (p.start as usize, (p.start + p.len) as usize);
                return Ok(ReadChunk::Data(whole.slice(from..to)));
            }
        }
        let key = self.key(p.chunk);
        match self.store.get(&key, Some(p.start..p.start + p.len)).await? {
            Some(b) if b.len() as u64 == p.len => Ok(ReadChunk::Data(b)),
            Some(b) => Err(BlockError::io(
                "read",
                p.chunk * self.chunk_size + p.start,
                io::Error::other(format!(
                    "store returned {} bytes of {key} for a {}-byte range",
                    b.len(),
                    p.len
                )),
            )),
            // Deleted by a concurrent trim.
            None => Ok(zero),
        }
    }

    /// The whole chunk, zero-filled if absent, as a buffer to modify.
    async fn load(&self, n: u64, key: &str) -> Result<Vec<u8>, StoreError> {
        // Chunk lengths are at most 1 GiB and fit in usize.
        let len = self.chunk_len(n) as usize;
        if !self.is_present(n) {
            return Ok(vec![0; len]);
        }
        let Some(bytes) = self.store.get(key, None).await? else {
            return Ok(vec![0; len]);
        };
        let mut buf = Vec::from(bytes);
        if buf.len() != len {
            tracing::warn!(
                volume = %self.name,
                key,
                found = buf.len(),
                expected = len,
                "chunk has the wrong length; treating the missing part as zeroes"
            );
            buf.resize(len, 0);
        }
        Ok(buf)
    }

    async fn write_piece(&self, p: Piece, data: Bytes, sync: bool) -> Result<(), StoreError> {
        let key = self.key(p.chunk);
        let chunk_len = self.chunk_len(p.chunk);
        // A chunk of zeroes is a deleted chunk: never stored, never uploaded.
        if p.len == chunk_len && is_zero(&data) {
            let _exclusive = self.lock(p.chunk).write().await;
            if self.is_present(p.chunk) {
                self.store.delete(&key, sync).await?;
                self.present().remove(&p.chunk);
            }
            return Ok(());
        }
        if self.put_range {
            let _shared = self.lock(p.chunk).read().await;
            self.store
                .put_range(&key, p.start, data, chunk_len, sync)
                .await?;
            self.present().insert(p.chunk);
            return Ok(());
        }
        let _exclusive = self.lock(p.chunk).write().await;
        let whole = if p.len == chunk_len {
            data
        } else {
            let mut buf = self.load(p.chunk, &key).await?;
            // Within the chunk, so within usize.
            let start = p.start as usize;
            buf[start..start + data.len()].copy_from_slice(&data);
            if is_zero(&buf) {
                if self.is_present(p.chunk) {
                    self.store.delete(&key, sync).await?;
                    self.present().remove(&p.chunk);
                }
                return Ok(());
            }
            Bytes::from(buf)
        };
        self.store.put(&key, whole, sync).await?;
        self.present().insert(p.chunk);
        Ok(())
    }

    async fn zero_job(&self, job: ZeroJob, sync: bool) -> Result<(), StoreError> {
        match job {
            ZeroJob::Delete(n) => {
                let _exclusive = self.lock(n).write().await;
                if self.is_present(n) {
                    self.store.delete(&self.key(n), sync).await?;
                    self.present().remove(&n);
                }
            }
            ZeroJob::Partial(p) if self.put_range => {
                let _shared = self.lock(p.chunk).read().await;
                // An absent chunk already reads as zeroes.
                if self.is_present(p.chunk) {
                    // Pieces are at most a chunk, at most 1 GiB: fits in usize.
                    let zeroes = Bytes::from(vec![0u8; p.len as usize]);
                    let key = self.key(p.chunk);
                    let chunk_len = self.chunk_len(p.chunk);
                    self.store
                        .put_range(&key, p.start, zeroes, chunk_len, sync)
                        .await?;
                }
            }
            ZeroJob::Partial(p) => {
                let _exclusive = self.lock(p.chunk).write().await;
                if self.is_present(p.chunk) {
                    let key = self.key(p.chunk);
                    let mut buf = self.load(p.chunk, &key).await?;
                    let start = p.start as usize;
                    buf[start..start + p.len as usize].fill(0);
                    if buf.iter().all(|&b| b == 0) {
                        self.store.delete(&key, sync).await?;
                        self.present().remove(&p.chunk);
                    } else {
                        self.store.put(&key, Bytes::from(buf), sync).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes `offset..offset + len` read as zeroes. With `fast`, fails without changing
    /// anything unless that only means deleting chunks or leaving absent ones alone.
    async fn zero(&self, offset: u64, len: u64, sync: bool, fast: bool) -> Result<(), BlockError> {
        if self.info.read_only {
            return Err(BlockError::ReadOnly);
        }
        if len == 0 {
            return Ok(());
        }
        let _forget = self.forget_after(offset, len);
        let cs = self.chunk_size;
        let end = offset + len;
        let first = offset / cs;
        let last = (end - 1) / cs;
        let whole = |n: u64| offset <= n * cs && end >= n * cs + self.chunk_len(n);

        let mut partial: Vec<Piece> = Vec::new();
        if !whole(first) {
            partial.extend(self.pieces(offset, len).next());
        }
        if last != first && !whole(last) {
            let start = last * cs;
            partial.push(Piece {
                chunk: last,
                start: 0,
                len: end - start,
                pos: start - offset,
            });
        }
        let lo = if whole(first) { first } else { first + 1 };
        let hi = if whole(last) { last + 1 } else { last };
        let doomed: Vec<u64> = if lo < hi {
            self.present().range(lo..hi).copied().collect()
        } else {
            Vec::new()
        };
        if fast && partial.iter().any(|p| self.is_present(p.chunk)) {
            return Err(BlockError::FastZeroUnsupported);
        }
        let jobs = doomed
            .into_iter()
            .map(ZeroJob::Delete)
            .chain(partial.into_iter().map(ZeroJob::Partial));
        stream::iter(jobs)
            .map(|job| self.zero_job(job, sync))
            .buffer_unordered(PARALLEL)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    fn block_status_sync(&self, offset: u64, len: u64) -> Vec<Extent> {
        let cs = self.chunk_size;
        let end = offset + len;
        let mut extents: Vec<Extent> = Vec::new();
        let mut push = |length: u64, flags: u32| {
            if length == 0 {
                return;
            }
            match extents.last_mut() {
                Some(e) if e.flags == flags => e.length += length,
                _ => extents.push(Extent { length, flags }),
            }
        };
        let mut at = offset;
        let present = self.present();
        for (examined, &n) in present.range(offset / cs..end.div_ceil(cs)).enumerate() {
            if examined == STATUS_MAX_CHUNKS {
                // Described up to `at`: enough for one call.
                return extents;
            }
            let start = (n * cs).max(offset);
            let stop = (n * cs + self.chunk_len(n)).min(end);
            push(start - at, STATE_HOLE | STATE_ZERO);
            push(stop - start, 0);
            at = stop;
        }
        drop(present);
        push(end - at, STATE_HOLE | STATE_ZERO);
        extents
    }
}

/// What the journal's appends share: the next record number, and the oldest that may exist.
#[derive(Debug)]
struct JournalState {
    /// The number of the next record.
    next: u64,
    /// No record below this one is needed (older ones are deleted or being deleted).
    floor: u64,
    /// The metadata says format 2.
    upgraded: bool,
    /// The newest record is empty and needs nothing before it.
    last_empty: bool,
}

/// The flush journal of a volume: see the module documentation.
#[derive(Debug)]
struct VolumeJournal {
    store: Arc<dyn ObjectStore>,
    name: String,
    id: String,
    meta_key: String,
    size: u64,
    chunk_size: u64,
    /// Held by each append, so appends run one at a time.
    state: tokio::sync::Mutex<JournalState>,
    /// Deletions of records no longer needed, running in the background.
    deletions: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// A deletion failed: an old record may be left over, so the newest one must stay.
    deletions_failed: Arc<AtomicBool>,
}

impl VolumeJournal {
    fn key(&self, n: u64) -> String {
        record_key(&self.name, n)
    }

    /// Rewrites the metadata as format 2, so that versions that do not apply journals refuse
    /// the volume.
    async fn upgrade(&self, st: &mut JournalState) -> Result<(), StoreError> {
        if st.upgraded {
            return Ok(());
        }
        let m = Metadata {
            format: FORMAT_JOURNAL,
            size: self.size,
            chunk_size: self.chunk_size,
            id: self.id.clone(),
        };
        let text = toml::to_string(&m).map_err(|e| StoreError::Io {
            op: "put",
            key: self.meta_key.clone(),
            source: io::Error::other(e.to_string()),
        })?;
        self.store
            .put(&self.meta_key, Bytes::from(text), true)
            .await?;
        tracing::info!(volume = %self.name, "volume metadata now says format 2 (it has a journal)");
        st.upgraded = true;
        Ok(())
    }

    /// Deletes these records in the background.
    fn delete(&self, numbers: Vec<u64>) {
        if numbers.is_empty() {
            return;
        }
        let keys: Vec<String> = numbers.into_iter().map(|n| self.key(n)).collect();
        let store = Arc::clone(&self.store);
        let failed = Arc::clone(&self.deletions_failed);
        let name = self.name.clone();
        let task = tokio::spawn(async move {
            let errors: Vec<StoreError> = stream::iter(keys)
                .map(|k| {
                    let store = Arc::clone(&store);
                    async move { store.delete(&k, false).await }
                })
                .buffer_unordered(DELETE_PARALLEL)
                .filter_map(|r| async move { r.err() })
                .collect()
                .await;
            if let Some(e) = errors.first() {
                failed.store(true, Ordering::SeqCst);
                tracing::warn!(volume = %name, failed = errors.len(), error = %e,
                    "cannot delete journal records that are no longer needed; the next open \
                     deletes them");
            }
        });
        let mut running = self.deletions.lock().unwrap_or_else(|e| e.into_inner());
        running.retain(|t| !t.is_finished());
        running.push(task);
    }

    /// Waits for the deletions in flight; then, if the newest record is empty and needs
    /// nothing before it, and every deletion succeeded, deletes it too, leaving no record.
    async fn finish(&self) -> Result<(), StoreError> {
        let running =
            std::mem::take(&mut *self.deletions.lock().unwrap_or_else(|e| e.into_inner()));
        for t in running {
            let _ = t.await;
        }
        let mut st = self.state.lock().await;
        if st.last_empty && st.floor + 1 == st.next && !self.deletions_failed.load(Ordering::SeqCst)
        {
            self.store.delete(&self.key(st.floor), true).await?;
            st.floor = st.next;
            st.last_empty = false;
        }
        Ok(())
    }
}

#[async_trait]
impl Journal for VolumeJournal {
    async fn append(&self, entries: Vec<JournalEntry>, keep_from: u64) -> Result<u64, BlockError> {
        let mut st = self.state.lock().await;
        self.upgrade(&mut st).await?;
        // What the record may settle, and what the records it lets go held, must be durable
        // in the chunks first.
        self.store.flush().await?;
        let n = st.next;
        let keep = keep_from.clamp(st.floor, n);
        let empty = entries.is_empty();
        let raw = journal::encode(&self.id, n, keep, &entries);
        if let Err(e) = self.store.put(&self.key(n), raw, true).await {
            // The record may have been stored all the same (a lost answer): it is the newest
            // now, until the next append replaces it.
            st.last_empty = false;
            return Err(e.into());
        }
        st.next = n.checked_add(1).ok_or_else(|| {
            BlockError::io(
                "journal",
                0,
                io::Error::other(format!("record number {n} is the last there can be")),
            )
        })?;
        st.last_empty = empty && keep == n;
        let floor = std::mem::replace(&mut st.floor, keep);
        self.delete((floor..keep).collect());
        Ok(n)
    }
}

impl ShardedVolume {
    /// Applies the journal records found at open (see the module documentation).
    async fn apply_journal(&self, mut numbers: Vec<u64>) -> Result<(), ShardedError> {
        numbers.sort_unstable();
        let Some(&newest) = numbers.last() else {
            return Ok(());
        };
        let bad = |n: u64, reason: String| ShardedError::Journal {
            name: self.name.clone(),
            key: record_key(&self.name, n),
            reason,
        };
        let store_err = |source| ShardedError::Store {
            name: self.name.clone(),
            source,
        };
        // The newest record says which are needed; every one of those must be there.
        let mut kept: HashMap<u64, Bytes> = HashMap::new();
        let mut kept_bytes = 0u64;
        let mut overlay = Overlay::default();
        let mut needed = newest..=newest;
        let mut n = newest;
        let mut records = Vec::new();
        loop {
            let raw = self
                .store
                .get(&record_key(&self.name, n), None)
                .await
                .map_err(store_err)?
                .ok_or_else(|| {
                    bad(
                        n,
                        format!(
                            "missing (records {} to {newest} are needed)",
                            needed.start()
                        ),
                    )
                })?;
            let r = journal::decode(&raw, self.info.size)
                .map_err(|e| bad(n, format!("not a valid record: {e}")))?;
            if r.id != self.id {
                return Err(bad(
                    n,
                    format!(
                        "belongs to volume id {}, not to this volume ({})",
                        r.id, self.id
                    ),
                ));
            }
            if r.n != n {
                return Err(bad(n, format!("says it is record {}", r.n)));
            }
            if n == newest {
                needed = r.keep_from..=newest;
            }
            if kept_bytes + raw.len() as u64 <= REPLAY_MEMORY {
                kept_bytes += raw.len() as u64;
                kept.insert(n, raw);
            }
            records.push(r);
            if n == *needed.start() {
                break;
            }
            n -= 1;
        }
        records.reverse();
        for r in &records {
            overlay.apply(r);
        }
        let first = *needed.start();
        let Some(after) = newest.checked_add(1) else {
            return Err(bad(
                newest,
                "its number leaves no room for another".to_owned(),
            ));
        };
        tracing::warn!(volume = %self.name, records = records.len(), first, last = newest,
            "applying journal records left by a server that did not close the volume");
        // Every changed range (start, end, source), by chunk.
        type Pieces = Vec<(u64, u64, Source)>;
        let mut by_chunk: Vec<(u64, Pieces)> = Vec::new();
        let cs = self.chunk_size;
        let mut add = |chunk: u64, piece: (u64, u64, Source)| match by_chunk.last_mut() {
            Some((c, pieces)) if *c == chunk => pieces.push(piece),
            _ => by_chunk.push((chunk, vec![piece])),
        };
        for (start, end, src) in overlay.iter() {
            if src == Source::Zero {
                // Zeroes change only chunks that exist: a TRIM of a whole large volume costs
                // what is stored, not what it spans.
                let present: Vec<u64> = self
                    .present()
                    .range(start / cs..end.div_ceil(cs))
                    .copied()
                    .collect();
                for chunk in present {
                    add(
                        chunk,
                        (
                            start.max(chunk * cs),
                            end.min((chunk + 1) * cs),
                            Source::Zero,
                        ),
                    );
                }
                continue;
            }
            // Data ranges are bounded by the records' bytes.
            let mut at = start;
            while at < end {
                let chunk = at / cs;
                let stop = end.min((chunk + 1) * cs);
                add(chunk, (at, stop, src.advanced_by(at - start)));
                at = stop;
            }
        }
        // Zero pieces came in order among themselves, and so did data pieces; together they
        // must be in chunk order for the grouping above.
        by_chunk.sort_by_key(|(c, _)| *c);
        let mut merged: Vec<(u64, Pieces)> = Vec::with_capacity(by_chunk.len());
        for (c, pieces) in by_chunk {
            match merged.last_mut() {
                Some((m, all)) if *m == c => all.extend(pieces),
                _ => merged.push((c, pieces)),
            }
        }
        let by_chunk = merged;
        let kept = &kept;
        stream::iter(by_chunk)
            .map(|(chunk, pieces)| self.rewrite_chunk(chunk, pieces, kept))
            .buffer_unordered(REPLAY_PARALLEL)
            .try_collect::<Vec<()>>()
            .await?;
        // Then a record that needs nothing before it, then the deletions, it last.
        let journal = &self.journal;
        {
            let mut st = journal.state.lock().await;
            st.upgraded = true;
            st.next = after;
            st.floor = after;
        }
        journal
            .append(Vec::new(), u64::MAX)
            .await
            .map_err(|e| ShardedError::Store {
                name: self.name.clone(),
                source: match e {
                    BlockError::Store(source) => source,
                    other => StoreError::io(
                        "put",
                        &journal.key(after),
                        io::Error::other(other.to_string()),
                    ),
                },
            })?;
        journal.delete(numbers);
        journal.finish().await.map_err(store_err)?;
        tracing::info!(volume = %self.name, records = records.len(), "journal records applied");
        Ok(())
    }

    /// Writes the final content of the changed `pieces` (start, end, source; device offsets,
    /// in order, within `chunk`) into the chunk.
    async fn rewrite_chunk(
        &self,
        chunk: u64,
        pieces: Vec<(u64, u64, Source)>,
        kept: &HashMap<u64, Bytes>,
    ) -> Result<(), ShardedError> {
        let store_err = |source| ShardedError::Store {
            name: self.name.clone(),
            source,
        };
        let key = self.key(chunk);
        let base = chunk * self.chunk_size;
        let len = self.chunk_len(chunk);
        let covered: u64 = pieces.iter().map(|&(a, b, _)| b - a).sum();
        if covered == len && pieces.iter().all(|p| p.2 == Source::Zero) {
            return self
                .zero_job(ZeroJob::Delete(chunk), true)
                .await
                .map_err(store_err);
        }
        let mut buf = self.load(chunk, &key).await.map_err(store_err)?;
        for (start, end, src) in pieces {
            // Within the chunk, so within usize.
            let (a, b) = ((start - base) as usize, (end - base) as usize);
            match src {
                Source::Zero => buf[a..b].fill(0),
                Source::Data { n, pos } => {
                    let len = end - start;
                    let bytes = match kept.get(&n) {
                        // Bounds checked when the record was decoded.
                        Some(raw) => raw.slice(pos as usize..(pos + len) as usize),
                        None => self
                            .store
                            .get(&record_key(&self.name, n), Some(pos..pos + len))
                            .await
                            .map_err(store_err)?
                            .filter(|b| b.len() as u64 == len)
                            .ok_or_else(|| ShardedError::Journal {
                                name: self.name.clone(),
                                key: record_key(&self.name, n),
                                reason: "changed while it was being applied".to_owned(),
                            })?,
                    };
                    buf[a..b].copy_from_slice(&bytes);
                }
            }
        }
        let whole = Piece {
            chunk,
            start: 0,
            len,
            pos: 0,
        };
        self.write_piece(whole, Bytes::from(buf), true)
            .await
            .map_err(store_err)
    }
}

fn parse_metadata(name: &str, key: &str, raw: &[u8]) -> Result<Metadata, ShardedError> {
    let bad = |reason: String| ShardedError::BadMetadata {
        name: name.to_owned(),
        key: key.to_owned(),
        reason,
    };
    let text = std::str::from_utf8(raw).map_err(|e| bad(format!("not UTF-8 ({e})")))?;
    // The format first, so that a newer format is reported as such, not as odd fields.
    let table: toml::Table = toml::from_str(text).map_err(|e| bad(e.message().to_owned()))?;
    match table.get("format") {
        Some(toml::Value::Integer(FORMAT | FORMAT_JOURNAL)) => {}
        Some(toml::Value::Integer(format)) => {
            return Err(ShardedError::UnsupportedFormat {
                name: name.to_owned(),
                key: key.to_owned(),
                format: *format,
            });
        }
        _ => return Err(bad("no integer `format`".to_owned())),
    }
    let m: Metadata = toml::from_str(text).map_err(|e| bad(e.message().to_owned()))?;
    if !valid_size(m.size) {
        return Err(bad(format!("size {} is out of range", m.size)));
    }
    if !valid_chunk_size(m.chunk_size) {
        return Err(bad(format!("chunk size {} is out of range", m.chunk_size)));
    }
    if uuid::Uuid::parse_str(&m.id).is_err() {
        return Err(bad(format!("id {:?} is not a UUID", m.id)));
    }
    Ok(m)
}

#[async_trait]
impl BlockDevice for ShardedVolume {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    async fn read(&self, offset: u64, len: u32) -> Result<ReadData, BlockError> {
        if let Some(ra) = &self.readahead
            && len > 0
        {
            let chunks = self.info.size.div_ceil(self.chunk_size);
            let fetch = |c: u64| {
                let store = Arc::clone(&self.store);
                let key = self.key(c);
                async move { store.get(&key, None).await.ok().flatten() }.boxed()
            };
            ra.on_read(
                offset,
                offset + u64::from(len),
                chunks,
                |c| self.is_present(c),
                fetch,
            );
        }
        let pieces: Vec<ReadChunk> = stream::iter(self.pieces(offset, u64::from(len)))
            .map(|p| self.read_piece(p))
            .buffered(PARALLEL)
            .try_collect()
            .await?;
        let mut out = ReadData::default();
        for p in pieces {
            out.push(p);
        }
        Ok(out)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        if self.info.read_only {
            return Err(BlockError::ReadOnly);
        }
        let _forget = self.forget_after(offset, data.len() as u64);
        stream::iter(self.pieces(offset, data.len() as u64))
            .map(|p| {
                // Within the request, so within usize.
                let (from, to) = (p.pos as usize, (p.pos + p.len) as usize);
                self.write_piece(p, data.slice(from..to), fua)
            })
            .buffer_unordered(PARALLEL)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), BlockError> {
        if self.info.read_only {
            return Ok(());
        }
        Ok(self.store.flush().await?)
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        self.zero(offset, len, fua, false).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), BlockError> {
        self.zero(offset, len, flags.fua, flags.fast).await
    }

    async fn cache(&self, _offset: u64, _len: u64) -> Result<(), BlockError> {
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BlockError> {
        Ok(self.block_status_sync(offset, len))
    }

    async fn close(&self) -> Result<(), BlockError> {
        self.flush().await?;
        if !self.info.read_only {
            self.journal.finish().await?;
        }
        Ok(())
    }

    fn journal(&self) -> Option<Arc<dyn Journal>> {
        if self.info.read_only {
            return None;
        }
        Some(Arc::clone(&self.journal) as Arc<dyn Journal>)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::store::file::FileStore;
    use crate::store::memory::MemoryStore;

    const KIB: u64 = 1024;
    const CS: u64 = 64 * KIB;

    /// A store over another that counts calls, yields before each (to let races happen) and
    /// can pretend not to support `put_range`, like S3.
    #[derive(Debug)]
    struct TestStore {
        inner: Arc<dyn ObjectStore>,
        put_range: bool,
        gets: AtomicUsize,
        changes: AtomicUsize,
    }

    impl TestStore {
        fn new(inner: Arc<dyn ObjectStore>, put_range: bool) -> Arc<Self> {
            Arc::new(TestStore {
                inner,
                put_range,
                gets: AtomicUsize::new(0),
                changes: AtomicUsize::new(0),
            })
        }

        fn whole_objects() -> Arc<Self> {
            Self::new(Arc::new(MemoryStore::new()), false)
        }
    }

    #[async_trait]
    impl ObjectStore for TestStore {
        async fn get(
            &self,
            key: &str,
            range: Option<std::ops::Range<u64>>,
        ) -> Result<Option<Bytes>, StoreError> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            self.inner.get(key, range).await
        }

        async fn put(&self, key: &str, data: Bytes, sync: bool) -> Result<(), StoreError> {
            self.changes.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            self.inner.put(key, data, sync).await
        }

        fn supports_put_range(&self) -> bool {
            self.put_range
        }

        async fn put_range(
            &self,
            key: &str,
            offset: u64,
            data: Bytes,
            size: u64,
            sync: bool,
        ) -> Result<(), StoreError> {
            if !self.put_range {
                return Err(StoreError::Remote {
                    op: "put_range",
                    key: key.to_owned(),
                    message: "not supported".to_owned(),
                    transient: false,
                });
            }
            self.changes.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            self.inner.put_range(key, offset, data, size, sync).await
        }

        async fn delete(&self, key: &str, sync: bool) -> Result<(), StoreError> {
            self.changes.fetch_add(1, Ordering::SeqCst);
            self.inner.delete(key, sync).await
        }

        async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
            self.inner.head(key).await
        }

        async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
            self.inner.list(prefix).await
        }

        async fn flush(&self) -> Result<(), StoreError> {
            self.inner.flush().await
        }
    }

    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            TempDir(std::env::temp_dir().join(format!(
                "nbd-rs-sharded-{name}-{}-{}",
                std::process::id(),
                uuid::Uuid::new_v4().simple()
            )))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn opts(name: &str, size: Option<u64>) -> ShardedOptions {
        ShardedOptions {
            chunk_size: Some(CS),
            size,
            ..ShardedOptions::new(name)
        }
    }

    async fn open(store: &Arc<dyn ObjectStore>, o: ShardedOptions) -> ShardedVolume {
        ShardedVolume::open(Arc::clone(store), o).await.unwrap()
    }

    async fn open_err(store: &Arc<dyn ObjectStore>, o: ShardedOptions) -> String {
        ShardedVolume::open(Arc::clone(store), o)
            .await
            .unwrap_err()
            .to_string()
    }

    fn pattern(len: u64, seed: u8) -> Bytes {
        (0..len)
            .map(|i| (i % 251) as u8 ^ seed | 1)
            .collect::<Vec<u8>>()
            .into()
    }

    async fn read(v: &ShardedVolume, offset: u64, len: u64) -> Vec<u8> {
        v.read(offset, len as u32)
            .await
            .unwrap()
            .to_bytes()
            .to_vec()
    }

    async fn keys(store: &Arc<dyn ObjectStore>) -> Vec<String> {
        let mut k = store.list("").await.unwrap();
        k.sort();
        k
    }

    fn status(v: &ShardedVolume, offset: u64, len: u64) -> Vec<(u64, u32)> {
        v.block_status_sync(offset, len)
            .into_iter()
            .map(|e| (e.length, e.flags))
            .collect()
    }

    const HOLE: u32 = STATE_HOLE | STATE_ZERO;

    /// The block-device behaviour of a volume, on any store. The volume is ten 64 KiB chunks
    /// and a short 12 KiB one.
    async fn device_behaviour(store: Arc<dyn ObjectStore>) {
        let size = 10 * CS + 12 * KIB;
        let v = open(&store, opts("disk", Some(size))).await;
        assert_eq!(v.info().size, size);
        assert!(v.info().multi_conn && v.info().can_trim && v.info().can_fast_zero);
        assert!(!v.info().read_only);
        assert_eq!(keys(&store).await, ["disk.volume"]);

        // Nothing written: everything is a hole, and reading creates nothing.
        let r = v.read(0, size as u32).await.unwrap();
        assert_eq!(r.chunks(), &[ReadChunk::Zero(size as u32)]);
        assert_eq!(status(&v, 0, size), [(size, HOLE)]);
        assert_eq!(keys(&store).await, ["disk.volume"]);

        // Round trip across chunk boundaries: chunks 0, 1 and 2.
        let data = pattern(100 * KIB, 7);
        v.write(60 * KIB, data.clone(), false).await.unwrap();
        assert_eq!(read(&v, 60 * KIB, 100 * KIB).await, data);
        let around = read(&v, 0, 4 * CS).await;
        assert!(around[..60 * KIB as usize].iter().all(|&b| b == 0));
        assert_eq!(&around[60 * KIB as usize..160 * KIB as usize], &data[..]);
        assert!(around[160 * KIB as usize..].iter().all(|&b| b == 0));
        assert_eq!(
            keys(&store).await,
            [
                "disk.0.chunk",
                "disk.1.chunk",
                "disk.2.chunk",
                "disk.volume"
            ]
        );
        for n in 0..3 {
            assert_eq!(
                store.head(&format!("disk.{n}.chunk")).await.unwrap(),
                Some(CS)
            );
        }
        assert_eq!(status(&v, 0, size), [(3 * CS, 0), (size - 3 * CS, HOLE)]);
        assert_eq!(status(&v, CS + 5, 10), [(10, 0)]);
        assert_eq!(
            status(&v, 2 * CS + 5, 2 * CS),
            [(CS - 5, 0), (CS + 5, HOLE)]
        );

        // The short last chunk holds only what is left of the disk.
        let tail = pattern(12 * KIB, 3);
        v.write(10 * CS, tail.clone(), true).await.unwrap();
        assert_eq!(store.head("disk.10.chunk").await.unwrap(), Some(12 * KIB));
        assert_eq!(read(&v, 10 * CS, 12 * KIB).await, tail);
        v.write(size - 1, Bytes::from_static(b"!"), false)
            .await
            .unwrap();
        assert_eq!(read(&v, size - 2, 2).await, [tail[12 * 1024 - 2], b'!']);

        // A read mixes data and holes.
        let r = v.read(2 * CS, 2 * CS as u32).await.unwrap();
        assert!(
            matches!(r.chunks(), [ReadChunk::Data(_), ReadChunk::Zero(z)] if u64::from(*z) == CS)
        );

        // Trimming a whole chunk deletes its object; partial pieces are zeroed, rest kept.
        v.trim(CS - 10, CS + 20, false).await.unwrap();
        assert_eq!(store.head("disk.1.chunk").await.unwrap(), None);
        assert!(store.head("disk.0.chunk").await.unwrap().is_some());
        let got = read(&v, 60 * KIB, 100 * KIB).await;
        let cut = (CS - 60 * KIB) as usize;
        assert_eq!(&got[..cut - 10], &data[..cut - 10]);
        assert!(
            got[cut - 10..cut + CS as usize + 10]
                .iter()
                .all(|&b| b == 0)
        );
        assert_eq!(
            &got[cut + CS as usize + 10..],
            &data[cut + CS as usize + 10..]
        );
        assert_eq!(status(&v, 0, 3 * CS), [(CS, 0), (CS, HOLE), (CS, 0)]);

        // WRITE_ZEROES inside one chunk keeps the rest of it and the object.
        v.write_zeroes(2 * CS + 100, 200, ZeroFlags::default())
            .await
            .unwrap();
        let got = read(&v, 2 * CS, CS).await;
        // (The first 10 bytes were trimmed above.)
        assert!(got[..10].iter().all(|&b| b == 0));
        assert!(got[100..300].iter().all(|&b| b == 0));
        let off = (2 * CS - 60 * KIB) as usize;
        assert_eq!(&got[10..100], &data[off + 10..off + 100]);
        assert_eq!(&got[300..1024], &data[off + 300..off + 1024]);
        assert!(store.head("disk.2.chunk").await.unwrap().is_some());

        // Zeroing part of an absent chunk creates nothing.
        let before = keys(&store).await;
        v.write_zeroes(5 * CS + 1, 100, ZeroFlags::default())
            .await
            .unwrap();
        v.trim(6 * CS + 1, 2 * CS - 2, true).await.unwrap();
        assert_eq!(keys(&store).await, before);

        // FAST_ZERO: refused without change where it would have to write zeroes...
        let fast = ZeroFlags {
            fast: true,
            ..ZeroFlags::default()
        };
        let snapshot = read(&v, 0, size).await;
        for (offset, len) in [(10, 10), (CS + 5, CS), (3 * CS - 1, 2), (0, size - 1)] {
            assert!(
                matches!(
                    v.write_zeroes(offset, len, fast).await,
                    Err(BlockError::FastZeroUnsupported)
                ),
                "fast zero of {offset}+{len}"
            );
        }
        assert_eq!(read(&v, 0, size).await, snapshot);
        // ...and done where it only deletes whole chunks or touches absent ones.
        v.write_zeroes(CS, CS, fast).await.unwrap();
        v.write_zeroes(4 * CS + 3, 4 * CS, fast).await.unwrap();
        v.write_zeroes(2 * CS, CS + 7, fast).await.unwrap();
        assert_eq!(store.head("disk.2.chunk").await.unwrap(), None);
        // The short last chunk is covered whole by a range ending at the disk's end.
        v.write_zeroes(10 * CS, 12 * KIB, fast).await.unwrap();
        assert_eq!(store.head("disk.10.chunk").await.unwrap(), None);
        assert_eq!(keys(&store).await, ["disk.0.chunk", "disk.volume"]);
        assert_eq!(status(&v, 0, size), [(CS, 0), (size - CS, HOLE)]);

        v.flush().await.unwrap();

        // Reopening sees the same content, with the recorded size.
        let id = v.volume_id().to_owned();
        v.close().await.unwrap();
        let w = open(&store, opts("disk", None)).await;
        assert_eq!(w.info().size, size);
        assert_eq!(w.volume_id(), id);
        assert_eq!(read(&w, 0, size).await, read(&v, 0, size).await);
        assert_eq!(status(&w, 0, size), status(&v, 0, size));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn behaviour_on_memory() {
        device_behaviour(Arc::new(MemoryStore::new())).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn behaviour_on_file() {
        let dir = TempDir::new("behaviour");
        device_behaviour(Arc::new(FileStore::open(&dir.0, true).unwrap())).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn behaviour_on_a_store_without_put_range() {
        device_behaviour(TestStore::whole_objects()).await;
    }

    // -----------------------------------------------------------------------------------------
    // Read-ahead (`layout::readahead`), on stores of whole objects

    /// A volume of 16 chunks, every one written with its own pattern, on a counting store of
    /// whole objects, reopened with `ahead` chunks of read-ahead: the volume, the store, and
    /// the bytes.
    async fn streamed(ahead: u64) -> (ShardedVolume, Arc<TestStore>, Vec<u8>) {
        let counted = TestStore::whole_objects();
        let store: Arc<dyn ObjectStore> = counted.clone();
        let v = open(&store, opts("ra", Some(16 * CS))).await;
        let mut all = Vec::new();
        for n in 0..16 {
            let data = pattern(CS, n as u8);
            v.write(n * CS, data.clone(), false).await.unwrap();
            all.extend_from_slice(&data);
        }
        drop(v);
        let v = open(&store, opts("ra", None))
            .await
            .with_readahead(ahead * CS);
        (v, counted, all)
    }

    /// Waits until the store has been asked for `n` objects in all (fetches run as tasks).
    async fn gets_reach(store: &TestStore, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while store.gets.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "gets stuck at {}",
                store.gets.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A read that starts where the last ended fetches the chunks after it, up to the depth;
    /// reads of them are then served from those fetches, each read moving the window on.
    #[tokio::test]
    async fn a_stream_of_reads_fetches_the_chunks_after_it() {
        let (v, store, all) = streamed(4).await;
        let before = store.gets.load(Ordering::SeqCst);
        assert_eq!(read(&v, 0, CS).await, all[..CS as usize]);
        // One read is not yet a stream.
        assert_eq!(v.held_ahead(), Vec::<u64>::new());
        assert_eq!(read(&v, CS, CS).await, all[CS as usize..2 * CS as usize]);
        assert_eq!(v.held_ahead(), vec![2, 3, 4, 5]);
        gets_reach(&store, before + 6).await;
        for n in 2..16u64 {
            let at = (n * CS) as usize;
            assert_eq!(
                read(&v, n * CS, CS).await,
                all[at..at + CS as usize],
                "chunk {n}"
            );
            let held = v.held_ahead();
            assert!(held.len() <= 4, "{held:?}");
            assert_eq!(held, (n + 1..(n + 5).min(16)).collect::<Vec<_>>());
        }
        // Every chunk was asked for once: the reads of 2..16 all came from fetches ahead.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(store.gets.load(Ordering::SeqCst), before + 16);
    }

    /// Reads in pieces of a chunk share its one fetch, and the piece that reaches the end of
    /// the chunk lets it go.
    #[tokio::test]
    async fn pieces_of_a_chunk_share_its_fetch() {
        let (v, store, all) = streamed(2).await;
        let before = store.gets.load(Ordering::SeqCst);
        let q = CS / 4;
        for i in 0..12u64 {
            let at = (i * q) as usize;
            assert_eq!(
                read(&v, i * q, q).await,
                all[at..at + q as usize],
                "piece {i}"
            );
        }
        // Chunk 0 was read by its pieces (4 GETs of ranges), chunks 1 and 2 fetched whole
        // ahead by the reads of chunk 0, 3 by those of chunk 1 and 4 by those of chunk 2.
        gets_reach(&store, before + 8).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(store.gets.load(Ordering::SeqCst), before + 8);
        assert_eq!(v.held_ahead(), vec![3, 4]);
    }

    /// Scattered reads fetch only what they ask for, and neither do chunks nobody wrote.
    #[tokio::test]
    async fn scattered_reads_and_holes_fetch_nothing_ahead() {
        let (v, store, all) = streamed(4).await;
        let before = store.gets.load(Ordering::SeqCst);
        for n in [7u64, 2, 12, 5, 0, 9] {
            let at = (n * CS) as usize;
            assert_eq!(read(&v, n * CS, 4096).await, all[at..at + 4096]);
        }
        assert_eq!(v.held_ahead(), Vec::<u64>::new());
        assert_eq!(store.gets.load(Ordering::SeqCst), before + 6);
        // A stream into holes: of the next four chunks, 5 and 6 are trimmed.
        v.trim(5 * CS, 2 * CS, false).await.unwrap();
        read(&v, 3 * CS, CS).await;
        read(&v, 4 * CS, CS).await;
        assert_eq!(v.held_ahead(), vec![7, 8]);
    }

    /// A write, trim or zeroing of a chunk fetched ahead forgets the fetch: a read after it
    /// reads the store again and sees the change, never the bytes fetched before it.
    #[tokio::test]
    async fn a_change_to_a_chunk_fetched_ahead_is_what_later_reads_see() {
        let (v, store, _) = streamed(8).await;
        let before = store.gets.load(Ordering::SeqCst);
        read(&v, 0, CS).await;
        read(&v, CS, CS).await;
        assert_eq!(v.held_ahead(), (2..10).collect::<Vec<_>>());
        gets_reach(&store, before + 10).await;
        // Let the fetches finish: they hold the bytes from before the changes.
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Chunk 2 in part, 3 whole, 4 trimmed (then absent: a hole whatever is held), 5
        // zeroed in part.
        let new = pattern(CS, 0xa5);
        v.write(2 * CS + 100, new.slice(..1000), false)
            .await
            .unwrap();
        v.write(3 * CS, new.clone(), false).await.unwrap();
        v.trim(4 * CS, CS, false).await.unwrap();
        let flags = ZeroFlags {
            fua: false,
            fast: false,
            no_hole: false,
        };
        v.write_zeroes(5 * CS + 10, 20, flags).await.unwrap();
        let two = read(&v, 2 * CS, CS).await;
        assert_eq!(two[100..1100], new[..1000]);
        assert_eq!(two[..100], pattern(CS, 2)[..100]);
        assert_eq!(read(&v, 3 * CS, CS).await, new[..]);
        assert_eq!(read(&v, 4 * CS, CS).await, vec![0u8; CS as usize]);
        let five = read(&v, 5 * CS, CS).await;
        assert_eq!(five[10..30], [0u8; 20]);
        assert_eq!(five[30..], pattern(CS, 5)[30..]);
    }

    /// A fetch started while a write of its chunk is under way is forgotten when the write
    /// ends; a write dropped halfway forgets too.
    #[tokio::test]
    async fn fetches_overlapping_a_write_or_a_dropped_write_are_forgotten() {
        let (v, _, _) = streamed(4).await;
        let new = pattern(CS, 0x5a);
        {
            let mut write = std::pin::pin!(v.write(3 * CS, new.clone(), false));
            // The write waits in the store (its PUT yields once).
            assert!(futures::poll!(write.as_mut()).is_pending());
            read(&v, 0, CS).await;
            read(&v, CS, CS).await;
            assert_eq!(v.held_ahead(), vec![2, 3, 4, 5]);
            write.await.unwrap();
        }
        assert_eq!(v.held_ahead(), vec![2, 4, 5]);
        assert_eq!(read(&v, 3 * CS, CS).await, new[..]);
        {
            let mut write = std::pin::pin!(v.write(5 * CS + 7, new.slice(..9), false));
            assert!(futures::poll!(write.as_mut()).is_pending());
        }
        assert!(!v.held_ahead().contains(&5), "{:?}", v.held_ahead());
    }

    /// Local stores have the page cache's read-ahead, and a read-ahead of less than a chunk
    /// is none.
    #[tokio::test]
    async fn local_stores_and_small_settings_read_nothing_ahead() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let v = open(&store, opts("local", Some(16 * CS)))
            .await
            .with_readahead(8 * CS);
        v.write(0, pattern(4 * CS, 1), false).await.unwrap();
        read(&v, 0, CS).await;
        read(&v, CS, CS).await;
        assert_eq!(v.held_ahead(), Vec::<u64>::new());
        let (v, _, _) = streamed(0).await;
        read(&v, 0, CS).await;
        read(&v, CS, CS).await;
        assert_eq!(v.held_ahead(), Vec::<u64>::new());
    }

    #[tokio::test]
    async fn absent_chunks_never_reach_the_store() {
        let counted = TestStore::new(Arc::new(MemoryStore::new()), true);
        let store: Arc<dyn ObjectStore> = counted.clone();
        let v = open(&store, opts("v", Some(1 << 30))).await;
        let gets = counted.gets.load(Ordering::SeqCst);
        let changes = counted.changes.load(Ordering::SeqCst);
        v.read(0, 8 << 20).await.unwrap();
        v.block_status(0, 1 << 30).await.unwrap();
        v.trim(0, 1 << 30, false).await.unwrap();
        v.write_zeroes(100, 1 << 20, ZeroFlags::default())
            .await
            .unwrap();
        assert_eq!(counted.gets.load(Ordering::SeqCst), gets);
        assert_eq!(counted.changes.load(Ordering::SeqCst), changes);
        assert_eq!(keys(&store).await, ["v.volume"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn concurrent_writes_into_one_chunk_without_put_range_lose_nothing() {
        let store: Arc<dyn ObjectStore> = TestStore::whole_objects();
        let v = Arc::new(open(&store, opts("rmw", Some(4 * CS))).await);
        const BLOCK: u64 = 1024;
        // Chunk 1 gets 64 writers at once, each to its own KiB.
        let mut tasks = Vec::new();
        for i in 0..CS / BLOCK {
            let v = Arc::clone(&v);
            tasks.push(tokio::spawn(async move {
                let data = Bytes::from(vec![i as u8 + 1; BLOCK as usize]);
                v.write(CS + i * BLOCK, data, false).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let got = read(&v, CS, CS).await;
        for (i, block) in got.chunks(BLOCK as usize).enumerate() {
            assert!(block.iter().all(|&b| b == i as u8 + 1), "block {i} lost");
        }
    }

    #[tokio::test]
    async fn block_status_of_a_1_tib_volume_is_quick() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let tib = 1u64 << 40;
        let v = open(
            &store,
            ShardedOptions {
                size: Some(tib),
                ..ShardedOptions::new("big")
            },
        )
        .await;
        let cs = DEFAULT_CHUNK_SIZE;
        v.write(tib / 2, Bytes::from_static(b"x"), false)
            .await
            .unwrap();
        let t = Instant::now();
        let e = v.block_status(0, tib).await.unwrap();
        assert_eq!(
            e,
            [
                Extent {
                    length: tib / 2,
                    flags: HOLE
                },
                Extent {
                    length: cs,
                    flags: 0
                },
                Extent {
                    length: tib / 2 - cs,
                    flags: HOLE
                },
            ]
        );
        // Every chunk present (as if the whole TiB was written): still bounded work.
        v.present().extend(0..tib / cs);
        for _ in 0..10 {
            let e = v.block_status(0, tib).await.unwrap();
            assert_eq!(
                e,
                [Extent {
                    length: STATUS_MAX_CHUNKS as u64 * cs,
                    flags: 0
                }]
            );
        }
        // Alternating chunks: one extent each, bounded too.
        v.present().retain(|n| n % 2 == 0);
        let e = v.block_status(cs, tib - cs).await.unwrap();
        assert!(e.len() <= 2 * STATUS_MAX_CHUNKS, "{}", e.len());
        assert_eq!(
            e[0],
            Extent {
                length: cs,
                flags: HOLE
            }
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        // Trimming the whole TiB deletes the one real chunk and forgets the others.
        v.trim(0, tib, false).await.unwrap();
        assert_eq!(keys(&store).await, ["big.volume"]);
        assert_eq!(status(&v, 0, tib), [(tib, HOLE)]);
    }

    #[tokio::test]
    async fn reopen_without_size_uses_the_recorded_one() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let v = open(&store, opts("vm1", Some(3 * CS + 5))).await;
        assert!(uuid::Uuid::parse_str(v.volume_id()).is_ok());
        v.write(3 * CS, Bytes::from_static(b"hello"), false)
            .await
            .unwrap();
        let w = open(&store, opts("vm1", None)).await;
        assert_eq!(w.info().size, 3 * CS + 5);
        assert_eq!(w.volume_id(), v.volume_id());
        assert_eq!(read(&w, 3 * CS, 5).await, b"hello");
        // Giving the same size again is fine too.
        open(&store, opts("vm1", Some(3 * CS + 5))).await;
        let meta = store.get("vm1.volume", None).await.unwrap().unwrap();
        let meta = std::str::from_utf8(&meta).unwrap();
        assert!(meta.contains("format = 1\n"), "{meta}");
        assert!(meta.contains(&format!("size = {}\n", 3 * CS + 5)), "{meta}");
        assert!(meta.contains(&format!("chunk_size = {CS}\n")), "{meta}");
        assert!(
            meta.contains(&format!("id = \"{}\"", v.volume_id())),
            "{meta}"
        );
    }

    #[tokio::test]
    async fn zero_chunks_are_never_stored() {
        for put_range in [true, false] {
            let counting = TestStore::new(Arc::new(MemoryStore::new()), put_range);
            let store: Arc<dyn ObjectStore> = counting.clone();
            let v = open(&store, opts("z", Some(4 * CS))).await;
            let base = counting.changes.load(Ordering::SeqCst);
            // A whole chunk of zeroes on an absent chunk: nothing is stored at all.
            v.write(0, Bytes::from(vec![0u8; CS as usize]), false)
                .await
                .unwrap();
            assert_eq!(
                counting.changes.load(Ordering::SeqCst),
                base,
                "put_range={put_range}"
            );
            assert_eq!(keys(&store).await, ["z.volume"]);
            // Data, then a whole chunk of zeroes over it: the chunk is deleted.
            v.write(CS, pattern(CS, 3), false).await.unwrap();
            assert_eq!(keys(&store).await, ["z.1.chunk", "z.volume"]);
            v.write(CS, Bytes::from(vec![0u8; CS as usize]), false)
                .await
                .unwrap();
            assert_eq!(keys(&store).await, ["z.volume"]);
            assert_eq!(read(&v, CS, CS).await, vec![0u8; CS as usize]);
            assert_eq!(
                v.block_status(0, 4 * CS).await.unwrap(),
                [Extent {
                    length: 4 * CS,
                    flags: STATE_HOLE | STATE_ZERO
                }]
            );
        }
        // Without put_range, a partial write whose chunk ends up all zeroes deletes it too.
        let store: Arc<dyn ObjectStore> = TestStore::whole_objects();
        let v = open(&store, opts("p", Some(4 * CS))).await;
        v.write(10, pattern(100, 1), false).await.unwrap();
        assert_eq!(keys(&store).await, ["p.0.chunk", "p.volume"]);
        v.write(10, Bytes::from(vec![0u8; 100]), false)
            .await
            .unwrap();
        assert_eq!(keys(&store).await, ["p.volume"]);
        v.write(CS + 7, Bytes::from(vec![0u8; 9]), false)
            .await
            .unwrap();
        assert_eq!(keys(&store).await, ["p.volume"]);
    }

    #[tokio::test]
    async fn reopen_without_chunk_size_uses_the_recorded_one() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let v = open(
            &store,
            ShardedOptions {
                size: Some(1 << 20),
                chunk_size: Some(64 << 10),
                ..ShardedOptions::new("small")
            },
        )
        .await;
        assert_eq!(v.chunk_size(), 64 << 10);
        let w = open(&store, ShardedOptions::new("small")).await;
        assert_eq!(w.chunk_size(), 64 << 10);
        // A new volume without a chunk size gets the default.
        let x = open(
            &store,
            ShardedOptions {
                size: Some(1 << 20),
                ..ShardedOptions::new("other")
            },
        )
        .await;
        assert_eq!(x.chunk_size(), DEFAULT_CHUNK_SIZE);
    }

    #[tokio::test]
    async fn mismatches_say_both_values_and_the_key() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        open(
            &store,
            ShardedOptions {
                size: Some(1 << 30),
                ..ShardedOptions::new("vm1")
            },
        )
        .await;
        let e = open_err(
            &store,
            ShardedOptions {
                size: Some(2 << 30),
                ..ShardedOptions::new("vm1")
            },
        )
        .await;
        assert_eq!(
            e,
            "volume \"vm1\" was created with size 1073741824 bytes, but size 2147483648 was \
             asked for (recorded in vm1.volume)"
        );
        let e = open_err(
            &store,
            ShardedOptions {
                chunk_size: Some(1 << 20),
                ..ShardedOptions::new("vm1")
            },
        )
        .await;
        assert_eq!(
            e,
            "volume \"vm1\" was created with chunk size 4194304 bytes, but chunk size 1048576 \
             was asked for (recorded in vm1.volume)"
        );
    }

    #[tokio::test]
    async fn missing_volume_without_size_says_how_to_create_it() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let e = open_err(&store, ShardedOptions::new("images/vm2")).await;
        assert_eq!(
            e,
            "volume \"images/vm2\" does not exist (no object images/vm2.volume); give a size to \
             create it"
        );
        let e = open_err(
            &store,
            ShardedOptions {
                read_only: true,
                ..opts("vm2", Some(CS))
            },
        )
        .await;
        assert_eq!(
            e,
            "volume \"vm2\" does not exist (no object vm2.volume), and a read-only export does \
             not create it"
        );
        assert!(keys(&store).await.is_empty());
    }

    #[tokio::test]
    async fn dry_run_creates_nothing() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let dry = ShardedOptions {
            create: false,
            ..opts("vm3", Some(4 * CS))
        };
        let v = open(&store, dry.clone()).await;
        assert!(v.info().read_only);
        assert_eq!(v.volume_id(), "");
        assert_eq!(read(&v, 0, CS).await, vec![0; CS as usize]);
        assert!(matches!(
            v.write(0, Bytes::from_static(b"x"), false).await,
            Err(BlockError::ReadOnly)
        ));
        assert!(matches!(
            v.trim(0, CS, false).await,
            Err(BlockError::ReadOnly)
        ));
        v.close().await.unwrap();
        assert!(keys(&store).await.is_empty());

        // A dry run over an existing volume checks it like a real open.
        let real = open(&store, opts("vm3", Some(4 * CS))).await;
        real.write(0, Bytes::from_static(b"x"), false)
            .await
            .unwrap();
        let before = keys(&store).await;
        let v = open(&store, dry.clone()).await;
        assert_eq!(v.volume_id(), real.volume_id());
        assert_eq!(read(&v, 0, 1).await, b"x");
        let e = open_err(
            &store,
            ShardedOptions {
                size: Some(8 * CS),
                ..dry
            },
        )
        .await;
        assert!(e.contains("was created with size"), "{e}");
        assert_eq!(keys(&store).await, before);
    }

    #[tokio::test]
    async fn read_only_volumes_refuse_changes() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        open(&store, opts("ro", Some(2 * CS))).await;
        let v = open(
            &store,
            ShardedOptions {
                read_only: true,
                ..opts("ro", None)
            },
        )
        .await;
        assert!(v.info().read_only);
        let fast = ZeroFlags {
            fast: true,
            ..ZeroFlags::default()
        };
        assert!(matches!(
            v.write(0, Bytes::from_static(b"x"), true).await,
            Err(BlockError::ReadOnly)
        ));
        assert!(matches!(
            v.write_zeroes(0, CS, fast).await,
            Err(BlockError::ReadOnly)
        ));
        assert!(matches!(
            v.trim(0, 2 * CS, false).await,
            Err(BlockError::ReadOnly)
        ));
        v.flush().await.unwrap();
        assert_eq!(keys(&store).await, ["ro.volume"]);
    }

    #[tokio::test]
    async fn bad_options_are_refused_before_touching_the_store() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        for cs in [0, 1000, 2048, 3 << 20, 2 << 30] {
            let e = open_err(
                &store,
                ShardedOptions {
                    chunk_size: Some(cs),
                    ..opts("v", Some(1 << 30))
                },
            )
            .await;
            assert_eq!(
                e,
                format!(
                    "volume \"v\": chunk size {cs} is not a power of two from 4096 to 1073741824"
                )
            );
        }
        for size in [0, u64::MAX] {
            let e = open_err(&store, opts("v", Some(size))).await;
            assert_eq!(
                e,
                format!("volume \"v\": size {size} is not between 1 and 9223372036854775807 bytes")
            );
        }
        for name in [
            "",
            "../v",
            "/v",
            "v/",
            "a//b",
            "bad\nname",
            &"n".repeat(1000),
        ] {
            let e = open_err(&store, opts(name, Some(CS))).await;
            assert!(
                e.starts_with(&format!("invalid volume name {name:?}")),
                "{e}"
            );
        }
        assert!(keys(&store).await.is_empty());
    }

    #[tokio::test]
    async fn chunks_without_metadata_are_not_adopted() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        store
            .put("lost.7.chunk", Bytes::from_static(b"old"), false)
            .await
            .unwrap();
        // Other volumes' objects sharing the prefix are not chunks of this one.
        store
            .put("lost.2.3.chunk", Bytes::from_static(b"?"), false)
            .await
            .unwrap();
        let e = open_err(&store, opts("lost", Some(16 * CS))).await;
        assert_eq!(
            e,
            "volume \"lost\" has no lost.volume, but 1 chunk or journal objects such as \
             lost.7.chunk exist; refusing to create a volume over them (restore lost.volume or \
             delete them)"
        );
        assert_eq!(keys(&store).await, ["lost.2.3.chunk", "lost.7.chunk"]);
    }

    #[tokio::test]
    async fn only_this_volumes_chunks_count() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let a = open(&store, opts("a", Some(4 * CS))).await;
        let a1 = open(&store, opts("a.1", Some(4 * CS))).await;
        a1.write(0, Bytes::from_static(b"x"), false).await.unwrap();
        a.write(CS, Bytes::from_static(b"y"), false).await.unwrap();
        let a = open(&store, opts("a", None)).await;
        assert_eq!(status(&a, 0, 4 * CS), [(CS, HOLE), (CS, 0), (2 * CS, HOLE)]);
        assert_eq!(chunk_index("a.", "a.1.0.chunk"), None);
        assert_eq!(chunk_index("a.", "a.01.chunk"), None);
        assert_eq!(chunk_index("a.", "a..chunk"), None);
        assert_eq!(chunk_index("a.", "a.volume"), None);
        assert_eq!(chunk_index("a.", "a.0.chunk"), Some(0));
        assert_eq!(chunk_index("a.", "a.123.chunk"), Some(123));
    }

    #[tokio::test]
    async fn bad_metadata_is_reported() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let cases: [(&str, &[u8]); 5] = [
            ("format", b"format = 3\nsize = 1\n"),
            ("garbage", b"\xff\xfe"),
            ("nofmt", b"size = 65536\n"),
            (
                "noid",
                b"format = 1\nsize = 65536\nchunk_size = 65536\nid = \"x\"\n",
            ),
            (
                "odd",
                b"format = 1\nsize = 65536\nchunk_size = 1000\nid = \"x\"\n",
            ),
        ];
        for (name, body) in cases {
            store
                .put(&format!("{name}.volume"), Bytes::from_static(body), false)
                .await
                .unwrap();
        }
        assert_eq!(
            open_err(&store, opts("format", None)).await,
            "volume \"format\": format.volume has format 3, but this version reads only formats \
             1 and 2"
        );
        for name in ["garbage", "nofmt", "noid", "odd"] {
            let e = open_err(&store, opts(name, None)).await;
            assert!(
                e.starts_with(&format!(
                    "volume \"{name}\": {name}.volume is not valid volume metadata: "
                )),
                "{e}"
            );
        }
    }

    fn data(offset: u64, b: Bytes) -> JournalEntry {
        JournalEntry::Data { offset, data: b }
    }

    fn records(keys: &[String]) -> Vec<String> {
        keys.iter()
            .filter(|k| k.ends_with(".journal"))
            .cloned()
            .collect()
    }

    #[tokio::test]
    async fn journal_records_are_applied_at_the_next_open_and_then_deleted() {
        for put_range in [false, true] {
            let store: Arc<dyn ObjectStore> =
                TestStore::new(Arc::new(MemoryStore::new()), put_range);
            let v = open(&store, opts("j", Some(4 * CS))).await;
            v.write(0, pattern(CS, 1), false).await.unwrap();
            let j = v.journal().unwrap();
            // Across chunks 0 and 1 (chunk 1 does not exist yet), then zeroes inside chunk 0.
            let n1 = j
                .append(
                    vec![
                        data(CS - 100, pattern(300, 2)),
                        JournalEntry::Zero {
                            offset: 10,
                            len: 20,
                        },
                    ],
                    1,
                )
                .await
                .unwrap();
            // Larger than what is kept in memory while applying: read back range by range.
            let big = pattern(3 * CS / 2, 4);
            let n2 = j
                .append(
                    vec![data(CS + 50, pattern(10, 3)), data(2 * CS, big.clone())],
                    n1,
                )
                .await
                .unwrap();
            assert_eq!((n1, n2), (1, 2));
            let meta = store.get("j.volume", None).await.unwrap().unwrap();
            assert!(String::from_utf8_lossy(&meta).contains("format = 2"));
            assert_eq!(records(&keys(&store).await), ["j.1.journal", "j.2.journal"]);
            // A crash: the chunks below still hold what was written before the records.
            drop(j);
            drop(v);
            let mut want = vec![0u8; 4 * CS as usize];
            let cs = CS as usize;
            want[..cs].copy_from_slice(&pattern(CS, 1));
            want[cs - 100..cs + 200].copy_from_slice(&pattern(300, 2));
            want[10..30].fill(0);
            want[cs + 50..cs + 60].copy_from_slice(&pattern(10, 3));
            want[2 * cs..2 * cs + big.len()].copy_from_slice(&big);
            let w = open(&store, opts("j", None)).await;
            assert_eq!(read(&w, 0, 4 * CS).await, want, "put_range: {put_range}");
            w.close().await.unwrap();
            assert_eq!(records(&keys(&store).await), Vec::<String>::new());
            let again = open(&store, opts("j", None)).await;
            assert_eq!(read(&again, 0, 4 * CS).await, want);
        }
    }

    #[tokio::test]
    async fn a_settled_range_keeps_what_the_chunks_hold_and_keep_from_drops_older_records() {
        let store: Arc<dyn ObjectStore> = TestStore::whole_objects();
        let v = open(&store, opts("s", Some(4 * CS))).await;
        let j = v.journal().unwrap();
        // Record 1: data in chunks 0 and 2. Then chunk 0 is written whole below and record 2
        // says so: record 1's data there no longer applies; in chunk 2 it still does.
        let n1 = j
            .append(
                vec![data(100, pattern(50, 1)), data(2 * CS, pattern(50, 2))],
                1,
            )
            .await
            .unwrap();
        v.write(0, pattern(CS, 3), false).await.unwrap();
        let n2 = j
            .append(vec![JournalEntry::Settled { offset: 0, len: CS }], n1)
            .await
            .unwrap();
        // Record 3 needs nothing before record 3 ... of what record 2 left: 2 and 3 apply.
        let n3 = j
            .append(vec![data(3 * CS, pattern(8, 5))], n2)
            .await
            .unwrap();
        assert_eq!(n3, 3);
        drop(j);
        drop(v);
        let w = open(&store, opts("s", None)).await;
        assert_eq!(read(&w, 0, CS).await, pattern(CS, 3).to_vec());
        // Record 1 was let go by record 2: its data in chunk 2 is not applied.
        assert_eq!(read(&w, 2 * CS, 50).await, vec![0; 50]);
        assert_eq!(read(&w, 3 * CS, 8).await, pattern(8, 5).to_vec());
        assert_eq!(records(&keys(&store).await), Vec::<String>::new());
    }

    #[tokio::test]
    async fn records_let_go_are_deleted_and_a_clean_close_leaves_none() {
        let store: Arc<dyn ObjectStore> = TestStore::whole_objects();
        let v = open(&store, opts("c", Some(2 * CS))).await;
        let j = v.journal().unwrap();
        for i in 1..=3u64 {
            assert_eq!(j.append(vec![data(i, pattern(1, 1))], 1).await.unwrap(), i);
        }
        // Record 4 needs 3 and itself: 1 and 2 go.
        j.append(Vec::new(), 3).await.unwrap();
        v.journal.finish().await.unwrap();
        assert_eq!(records(&keys(&store).await), ["c.3.journal", "c.4.journal"]);
        // Everything written below: an empty record that needs nothing else, then close.
        j.append(Vec::new(), u64::MAX).await.unwrap();
        v.close().await.unwrap();
        assert_eq!(records(&keys(&store).await), Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_read_only_open_of_a_volume_with_unapplied_records_is_refused() {
        let store: Arc<dyn ObjectStore> = TestStore::whole_objects();
        let v = open(&store, opts("ro", Some(2 * CS))).await;
        let j = v.journal().unwrap();
        j.append(vec![data(0, pattern(10, 1))], 1).await.unwrap();
        j.append(vec![data(5, pattern(10, 2))], 1).await.unwrap();
        drop(j);
        drop(v);
        let e = open_err(
            &store,
            ShardedOptions {
                read_only: true,
                ..opts("ro", None)
            },
        )
        .await;
        assert_eq!(
            e,
            "volume \"ro\" has 2 journal records (ro.1.journal to ro.2.journal) with flushed \
             writes not yet applied to its chunks (left by a server that did not close the \
             volume); a read-only export cannot apply them: serve the volume writable once"
        );
        // A read-only volume offers no journal; a dry run does not apply one.
        let dry = open(
            &store,
            ShardedOptions {
                create: false,
                ..opts("ro", None)
            },
        )
        .await;
        assert!(dry.journal().is_none());
        assert_eq!(records(&keys(&store).await).len(), 2);
        let w = open(&store, opts("ro", None)).await;
        let mut want = pattern(10, 1).to_vec();
        want.extend_from_slice(&[0; 5]);
        want[5..15].copy_from_slice(&pattern(10, 2));
        assert_eq!(read(&w, 0, 15).await, want);
    }

    #[tokio::test]
    async fn records_that_cannot_be_applied_stop_the_open_and_say_why() {
        let store: Arc<dyn ObjectStore> = TestStore::whole_objects();
        let v = open(&store, opts("bad", Some(2 * CS))).await;
        let id = v.volume_id().to_owned();
        let j = v.journal().unwrap();
        j.append(vec![data(0, pattern(10, 1))], 1).await.unwrap();
        j.append(vec![data(0, pattern(10, 2))], 1).await.unwrap();
        drop(j);
        drop(v);
        let tail = "; refusing to open the volume, as the flushed writes it holds could not be \
                    applied";
        // Damaged.
        let good = store.get("bad.2.journal", None).await.unwrap().unwrap();
        let mut damaged = good.to_vec();
        damaged[70] ^= 0x40;
        store
            .put("bad.2.journal", Bytes::from(damaged), false)
            .await
            .unwrap();
        assert_eq!(
            open_err(&store, opts("bad", None)).await,
            format!(
                "volume \"bad\": journal record bad.2.journal: not a valid record: checksum \
                 mismatch (the record is damaged){tail}"
            )
        );
        store.put("bad.2.journal", good, false).await.unwrap();
        // Missing.
        let first = store.get("bad.1.journal", None).await.unwrap().unwrap();
        store.delete("bad.1.journal", false).await.unwrap();
        assert_eq!(
            open_err(&store, opts("bad", None)).await,
            format!(
                "volume \"bad\": journal record bad.1.journal: missing (records 1 to 2 are \
                 needed){tail}"
            )
        );
        store.put("bad.1.journal", first, false).await.unwrap();
        // Another volume's, or under another number.
        let other = journal::encode("11111111-2222-3333-4444-555555555555", 3, 1, &[]);
        store.put("bad.3.journal", other, false).await.unwrap();
        assert_eq!(
            open_err(&store, opts("bad", None)).await,
            format!(
                "volume \"bad\": journal record bad.3.journal: belongs to volume id \
                 11111111-2222-3333-4444-555555555555, not to this volume ({id}){tail}"
            )
        );
        let renamed = journal::encode(&id, 9, 1, &[]);
        store.put("bad.3.journal", renamed, false).await.unwrap();
        assert_eq!(
            open_err(&store, opts("bad", None)).await,
            format!("volume \"bad\": journal record bad.3.journal: says it is record 9{tail}")
        );
        store.delete("bad.3.journal", false).await.unwrap();
        // Nothing was changed by the refused opens: the records still apply.
        let w = open(&store, opts("bad", None)).await;
        assert_eq!(read(&w, 0, 10).await, pattern(10, 2).to_vec());
    }

    #[tokio::test]
    async fn a_zero_range_over_a_whole_large_volume_costs_what_is_stored() {
        let test = TestStore::whole_objects();
        let store: Arc<dyn ObjectStore> = test.clone();
        let size = 1 << 40;
        let v = open(&store, opts("big", Some(size))).await;
        v.write(5 * CS + 7, pattern(100, 1), false).await.unwrap();
        v.write(size - CS, pattern(CS, 2), false).await.unwrap();
        let j = v.journal().unwrap();
        j.append(
            vec![JournalEntry::Zero {
                offset: 0,
                len: size,
            }],
            1,
        )
        .await
        .unwrap();
        drop(j);
        drop(v);
        test.changes.store(0, Ordering::SeqCst);
        let w = open(&store, opts("big", None)).await;
        // Two chunks deleted, the record that needs nothing written, two records deleted: not
        // sixteen million chunks visited.
        assert_eq!(test.changes.load(Ordering::SeqCst), 5);
        assert_eq!(read(&w, 5 * CS, 200).await, vec![0; 200]);
        assert_eq!(status(&w, 0, size), [(size, STATE_HOLE | STATE_ZERO)]);
    }

    #[tokio::test]
    async fn journal_records_without_metadata_are_not_adopted() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        store
            .put("gone.4.journal", Bytes::from_static(b"x"), false)
            .await
            .unwrap();
        assert_eq!(
            open_err(&store, opts("gone", Some(CS))).await,
            "volume \"gone\" has no gone.volume, but 1 chunk or journal objects such as \
             gone.4.journal exist; refusing to create a volume over them (restore gone.volume \
             or delete them)"
        );
    }
}
