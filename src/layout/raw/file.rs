//! `raw -> file`: a plain image file served with positioned reads and writes.
//!
//! TRIM punches holes, WRITE_ZEROES punches holes or zeroes a range in place (NO_HOLE), block
//! status comes from `SEEK_DATA` / `SEEK_HOLE`, FLUSH and FUA are `fdatasync`. One file
//! descriptor is shared by every connection, so a flush on one connection covers writes made on
//! all of them (multi-conn is safe). Blocking system calls run on tokio's blocking pool.
//!
//! Reads try `preadv2(RWF_NOWAIT)` before the pool. Reads of 64 KiB and more whose pages are
//! all in the page cache (by `cachestat(2)`, Linux 6.5 and later) are not read at all: the
//! connection sends them with `sendfile` (the server copies none of their bytes) or, to a
//! client on this machine, from a mapping of the image (`block::mapped`: copied once). Large
//! writes without FUA are offered to the connection as a [`WriteTarget`]: on a plain socket it
//! splices their payloads into the file, copied once instead of twice.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use rustix::fs::{FallocateFlags, SeekFrom};
use rustix::io::Errno;
use tracing::info;

use crate::block::buffers::{Buffer, read_exact_at_unzeroed};
use crate::block::inline::InlineWrites;
use crate::block::mapped::Windows;
use crate::block::sync_group::SyncGroup;
use crate::block::{
    BlockDevice, BlockError, BlockSizes, DeviceInfo, Extent, FileRange, ReadData, STATE_HOLE,
    STATE_ZERO, WriteTarget, ZeroFlags,
};

/// Block status reports at most this many extents per call; clients ask again for the rest.
const MAX_EXTENTS: usize = 1024;
/// Zeroes written per call when the file system cannot zero a range itself.
const ZERO_BUF: usize = 1 << 20;
static ZEROES: [u8; ZERO_BUF] = [0; ZERO_BUF];

/// Why an image could not be opened. Each message names the path.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The image does not exist and no size was given to create it.
    #[error("image {0} does not exist (give a size to create it)")]
    Missing(PathBuf),
    /// The path is not a regular file or block device.
    #[error("{0} is not a regular file")]
    NotAFile(PathBuf),
    /// The image exists with another size than the one configured.
    #[error("image {path} is {actual} bytes, but a size of {wanted} bytes was asked for")]
    SizeMismatch {
        /// The image.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// The configured size.
        wanted: u64,
    },
    /// The image is empty: there is nothing to serve.
    #[error("image {0} is empty")]
    Empty(PathBuf),
    /// The system refused.
    #[error("cannot open image {path}: {source}")]
    Io {
        /// The image.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

/// A raw image file.
pub struct FileImage {
    info: DeviceInfo,
    path: PathBuf,
    file: Arc<File>,
    /// Reads try `RWF_NOWAIT` first (cleared if the kernel refuses the flag).
    nowait: AtomicBool,
    /// Whether small writes run on the async worker.
    inline: InlineWrites,
    /// `fdatasync`s, shared by FLUSHes and FUA requests that queue behind one; after one
    /// fails, every later one fails.
    syncs: Arc<SyncGroup>,
    /// Large reads are offered for `sendfile` when `cachestat(2)` says they are in the page
    /// cache (cleared, and logged once, if `cachestat` fails for this image).
    cachestat: AtomicBool,
    /// Mappings of the image, for large cached reads sent from them (`block::mapped`).
    windows: Arc<Windows>,
}

impl std::fmt::Debug for FileImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileImage")
            .field("path", &self.path)
            .field("size", &self.info.size)
            .finish_non_exhaustive()
    }
}

impl FileImage {
    /// Opens the image at `path`. With `create_size`, a missing image is created (sparse) with
    /// that size, and an existing one must already have it.
    pub fn open(path: &Path, create_size: Option<u64>, read_only: bool) -> Result<Self, OpenError> {
        let io_err = |source| OpenError::Io {
            path: path.to_owned(),
            source,
        };
        let exists = match std::fs::metadata(path) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err(e)),
        };
        let file = if exists {
            OpenOptions::new()
                .read(true)
                .write(!read_only)
                .open(path)
                .map_err(io_err)?
        } else {
            let Some(size) = create_size else {
                return Err(OpenError::Missing(path.to_owned()));
            };
            if read_only {
                return Err(OpenError::Missing(path.to_owned()));
            }
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(io_err)?;
            f.set_len(size).map_err(io_err)?;
            f
        };
        let meta = file.metadata().map_err(io_err)?;
        if !meta.file_type().is_file() {
            return Err(OpenError::NotAFile(path.to_owned()));
        }
        let size = meta.len();
        if let Some(wanted) = create_size
            && wanted != size
        {
            return Err(OpenError::SizeMismatch {
                path: path.to_owned(),
                actual: size,
                wanted,
            });
        }
        if size == 0 {
            return Err(OpenError::Empty(path.to_owned()));
        }
        let file = Arc::new(file);
        Ok(FileImage {
            info: DeviceInfo {
                size,
                read_only,
                can_trim: true,
                can_fast_zero: true,
                multi_conn: true,
                rotational: false,
                block_sizes: BlockSizes::default(),
            },
            path: path.to_owned(),
            windows: Arc::new(Windows::new(Arc::clone(&file), size)),
            file,
            nowait: AtomicBool::new(true),
            inline: InlineWrites::default(),
            syncs: Arc::new(SyncGroup::sticky()),
            cachestat: AtomicBool::new(true),
        })
    }

    /// Checks what [`FileImage::open`] would find, without creating or changing anything.
    /// Returns the size the image has or would be created with.
    pub fn check(path: &Path, create_size: Option<u64>, read_only: bool) -> Result<u64, OpenError> {
        match std::fs::metadata(path) {
            Ok(meta) => {
                if !meta.file_type().is_file() {
                    return Err(OpenError::NotAFile(path.to_owned()));
                }
                let size = meta.len();
                if let Some(wanted) = create_size
                    && wanted != size
                {
                    return Err(OpenError::SizeMismatch {
                        path: path.to_owned(),
                        actual: size,
                        wanted,
                    });
                }
                if size == 0 {
                    return Err(OpenError::Empty(path.to_owned()));
                }
                OpenOptions::new()
                    .read(true)
                    .write(!read_only)
                    .open(path)
                    .map_err(|source| OpenError::Io {
                        path: path.to_owned(),
                        source,
                    })?;
                Ok(size)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let Some(size) = create_size.filter(|_| !read_only) else {
                    return Err(OpenError::Missing(path.to_owned()));
                };
                let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
                if let Some(dir) = parent
                    && !dir.is_dir()
                {
                    return Err(OpenError::Io {
                        path: path.to_owned(),
                        source: io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("directory {} does not exist", dir.display()),
                        ),
                    });
                }
                Ok(size)
            }
            Err(source) => Err(OpenError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A read the page cache can answer whole, done here without handing it to a thread:
    /// `RWF_NOWAIT` makes the kernel refuse (EAGAIN) instead of waiting for the disk. Only for
    /// reads up to 1 MiB, where a refusal costs little. `None` when it cannot, and then for
    /// good on a kernel or file system without `RWF_NOWAIT`.
    fn read_cached(&self, offset: u64, len: u32) -> Option<Bytes> {
        if len > NOWAIT_MAX || !self.nowait.load(Ordering::Relaxed) {
            return None;
        }
        let len = len as usize;
        // Large reads reuse a buffer; small ones are cheaper to zero than to pool.
        let mut pooled = Buffer::take(len);
        let mut small = Vec::new();
        let into = match &mut pooled {
            Some(b) => &mut b.as_mut_slice()[..len],
            None => {
                small.resize(len, 0);
                &mut small[..]
            }
        };
        let flags = rustix::io::ReadWriteFlags::NOWAIT;
        match rustix::io::preadv2(&*self.file, &mut [IoSliceMut::new(into)], offset, flags) {
            Ok(n) if n == len => Some(match pooled {
                Some(b) => b.freeze(len),
                None => Bytes::from(small),
            }),
            Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => {
                self.nowait.store(false, Ordering::Relaxed);
                None
            }
            // Not cached, partly cached, past the end, or failing: the blocking path reads it
            // and reports any error.
            _ => None,
        }
    }

    /// Runs a blocking call on the blocking pool with the shared file.
    async fn blocking<T, F>(&self, op: &'static str, offset: u64, f: F) -> Result<T, BlockError>
    where
        T: Send + 'static,
        F: FnOnce(&File) -> io::Result<T> + Send + 'static,
    {
        let file = Arc::clone(&self.file);
        match tokio::task::spawn_blocking(move || f(&file)).await {
            Ok(r) => r.map_err(|e| BlockError::io(op, offset, e)),
            Err(join) => Err(BlockError::io(
                op,
                offset,
                io::Error::other(join.to_string()),
            )),
        }
    }

    /// `fdatasync` for a request that arrived (FLUSH) or finished its change (FUA) when
    /// `ticket` was taken, shared with others that queue behind one; waits for a sync under way
    /// without a thread (see `SyncGroup::sync_async`).
    async fn sync_from(
        &self,
        op: &'static str,
        offset: u64,
        ticket: u64,
    ) -> Result<(), BlockError> {
        let file = Arc::clone(&self.file);
        self.syncs
            .sync_async(ticket, move || file.sync_data().map(|()| true))
            .await
            .map_err(|e| BlockError::io(op, offset, e))
    }
}

/// Reads larger than this skip the `RWF_NOWAIT` attempt.
const NOWAIT_MAX: u32 = 1 << 20;

/// Reads from this size up are offered for `sendfile`. Below it, copying the bytes costs less
/// than the extra system calls (residency check, a `sendfile` of their own instead of a share
/// of a vectored write with other replies).
const SENDFILE_MIN: u32 = 64 * 1024;

/// Whether every page of `[offset, offset + len)` of `file` is in the page cache, by
/// `cachestat(2)`; `Err` if the kernel cannot tell. A page counts from the moment it is added,
/// so one still being read in (readahead) counts too: callers must be ready to wait for it.
#[allow(unsafe_code)]
fn resident(file: &File, offset: u64, len: u32) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    /// `__NR_cachestat` (Linux 6.5): 451 in the table every architecture shares for system
    /// calls added since 5.1, except mips (offset by its ABI's base) and alpha, which Rust
    /// does not target. On mips the copying path is taken.
    const SYS_CACHESTAT: libc::c_long = if cfg!(any(
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "mips32r6",
        target_arch = "mips64r6"
    )) {
        -1
    } else {
        451
    };
    if SYS_CACHESTAT < 0 {
        return Err(io::Error::from_raw_os_error(libc::ENOSYS));
    }
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    let page = rustix::param::page_size() as u64;
    let Some(end) = offset.checked_add(u64::from(len)) else {
        return Ok(false);
    };
    let first = offset / page;
    let pages = end.div_ceil(page) - first;
    let range = Range {
        off: first * page,
        len: pages * page,
    };
    let mut stat = Stat::default();
    // SAFETY: `cachestat(fd, const struct cachestat_range *, struct cachestat *, flags)` reads
    // `range` and writes `stat`, both live `repr(C)` values of the kernel's layout (u64 fields),
    // and keeps no pointer after returning; `file` keeps the descriptor open during the call.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.nr_cache >= pages)
}

fn errno_to_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

/// True if the file system cannot do this kind of fallocate.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        Errno::from_io_error(e),
        Some(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL)
    )
}

fn write_zeroes_slow(file: &File, mut offset: u64, len: u64) -> io::Result<()> {
    let end = offset + len;
    while offset < end {
        let n = ZERO_BUF.min((end - offset) as usize);
        file.write_all_at(&ZEROES[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

fn extents(file: &File, offset: u64, end: u64) -> io::Result<Vec<Extent>> {
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end && out.len() < MAX_EXTENTS {
        let data = match rustix::fs::seek(file, SeekFrom::Data(pos)) {
            Ok(d) => d.min(end),
            // No data at or after pos: the rest is a hole.
            Err(Errno::NXIO) => end,
            Err(e) => return Err(errno_to_io(e)),
        };
        if data > pos {
            out.push(Extent {
                length: data - pos,
                flags: STATE_HOLE | STATE_ZERO,
            });
            pos = data;
            continue;
        }
        let hole = match rustix::fs::seek(file, SeekFrom::Hole(pos)) {
            Ok(h) => h.min(end),
            Err(Errno::NXIO) => end,
            Err(e) => return Err(errno_to_io(e)),
        };
        // A file system without hole support reports the end of the file; never loop forever.
        let hole = hole.max(pos + 1).min(end);
        out.push(Extent {
            length: hole - pos,
            flags: 0,
        });
        pos = hole;
    }
    Ok(out)
}

#[async_trait]
impl BlockDevice for FileImage {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    async fn read(&self, offset: u64, len: u32) -> Result<ReadData, BlockError> {
        if let Some(cached) = self.read_cached(offset, len) {
            return Ok(ReadData::data(cached));
        }
        let bytes = self
            .blocking("read", offset, move |f| {
                read_exact_at_unzeroed(f, len as usize, offset)
            })
            .await?;
        Ok(ReadData::data(Bytes::from(bytes)))
    }

    fn file_range(&self, offset: u64, len: u32) -> Option<FileRange> {
        if len < SENDFILE_MIN || !self.cachestat.load(Ordering::Relaxed) {
            return None;
        }
        match resident(&self.file, offset, len) {
            Ok(true) => Some(FileRange {
                file: Arc::clone(&self.file),
                offset,
                len,
                windows: Arc::clone(&self.windows),
            }),
            Ok(false) => None,
            Err(e) => {
                // ENOSYS before Linux 6.5 (or under a seccomp filter); EPERM on an image this
                // process may not write and does not own. Either way: copy, as before.
                if self.cachestat.swap(false, Ordering::Relaxed) {
                    info!(
                        image = %self.path.display(),
                        error = %e,
                        "cachestat is not available for this image: large reads are copied, not sent with sendfile"
                    );
                }
                None
            }
        }
    }

    fn write_target(&self, offset: u64) -> Option<WriteTarget<'_>> {
        (!self.info.read_only).then_some(WriteTarget {
            file: &self.file,
            offset,
            inline: &self.inline,
        })
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        if self.info.read_only {
            return Err(BlockError::ReadOnly);
        }
        // Small writes go straight to the page cache (see `block::inline`).
        if self.inline.allowed(data.len()) {
            self.inline
                .run(|| self.file.write_all_at(&data, offset))
                .map_err(|e| BlockError::io("write", offset, e))?;
        } else {
            self.blocking("write", offset, move |f| f.write_all_at(&data, offset))
                .await?;
        }
        if fua {
            // Taken now that the write is done: a sync begun from here on covers it.
            self.sync_from("write", offset, self.syncs.ticket()).await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), BlockError> {
        if self.info.read_only {
            return Ok(());
        }
        self.sync_from("flush", 0, self.syncs.ticket()).await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        if self.info.read_only {
            return Err(BlockError::ReadOnly);
        }
        let punched = self
            .blocking("trim", offset, move |f| {
                let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
                match rustix::fs::fallocate(f, flags, offset, len) {
                    Ok(()) => Ok(true),
                    // TRIM is a hint: a file system that cannot punch holes ignores it.
                    Err(e) if unsupported(&errno_to_io(e)) => Ok(false),
                    Err(e) => Err(errno_to_io(e)),
                }
            })
            .await?;
        if fua && punched {
            self.sync_from("trim", offset, self.syncs.ticket()).await?;
        }
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), BlockError> {
        if self.info.read_only {
            return Err(BlockError::ReadOnly);
        }
        let result = self
            .blocking("write_zeroes", offset, move |f| {
                let mode = if flags.no_hole {
                    FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
                } else {
                    FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
                };
                match rustix::fs::fallocate(f, mode, offset, len) {
                    Ok(()) => {}
                    Err(e) if unsupported(&errno_to_io(e)) => {
                        if flags.fast {
                            return Ok(false);
                        }
                        write_zeroes_slow(f, offset, len)?;
                    }
                    Err(e) => return Err(errno_to_io(e)),
                }
                Ok(true)
            })
            .await?;
        if !result {
            return Err(BlockError::FastZeroUnsupported);
        }
        if flags.fua {
            self.sync_from("write_zeroes", offset, self.syncs.ticket())
                .await?;
        }
        Ok(())
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.blocking("cache", offset, move |f| {
            let len = std::num::NonZeroU64::new(len);
            rustix::fs::fadvise(f, offset, len, rustix::fs::Advice::WillNeed).map_err(errno_to_io)
        })
        .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BlockError> {
        let end = offset + len;
        self.blocking("block_status", offset, move |f| extents(f, offset, end))
            .await
    }

    async fn close(&self) -> Result<(), BlockError> {
        self.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nbd-rs-file-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        dir
    }

    #[tokio::test]
    async fn small_writes_run_inline_until_one_is_slow_and_reach_the_file_either_way() {
        let p = tmp("inline");
        let img = FileImage::open(&p, Some(1 << 20), false).unwrap();
        assert!(img.inline.allowed(4096));
        img.write(4096, Bytes::from(vec![7u8; 4096]), false)
            .await
            .unwrap();
        // A slow write sends the next ones through the pool for a while.
        img.inline.pause();
        assert!(!img.inline.allowed(4096));
        img.write(8192, Bytes::from(vec![9u8; 4096]), false)
            .await
            .unwrap();
        let back = std::fs::read(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        assert!(back[4096..8192].iter().all(|&b| b == 7));
        assert!(back[8192..12288].iter().all(|&b| b == 9));
        img.inline.resume();
        assert!(img.inline.allowed(4096));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flushes_and_fua_requests_that_queue_behind_a_sync_share_the_next_one() {
        let p = tmp("sync-group");
        let img = Arc::new(FileImage::open(&p, Some(1 << 20), false).unwrap());
        img.write(0, Bytes::from(vec![3u8; 16 * 4096]), false)
            .await
            .unwrap();
        let started = img.syncs.started();
        let held = img.syncs.hold();
        let waiting = img.syncs.waiters();
        let mut queued = Vec::new();
        for i in 0..8u64 {
            let img = Arc::clone(&img);
            let at = (i + 1) * 4096;
            queued.push(tokio::spawn(async move {
                match i % 4 {
                    0 => img.flush().await,
                    1 => img.write(at, Bytes::from(vec![i as u8; 4096]), true).await,
                    2 => img.trim(at, 4096, true).await,
                    _ => {
                        let flags = ZeroFlags {
                            fua: true,
                            no_hole: true,
                            fast: false,
                        };
                        img.write_zeroes(at, 4096, flags).await
                    }
                }
            }));
        }
        img.syncs.until_waiting(waiting + 8);
        drop(held);
        for q in queued {
            q.await.unwrap().unwrap();
        }
        assert_eq!(img.syncs.started(), started + 1);
        let back = std::fs::read(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        let block = |n: usize| &back[n * 4096..(n + 1) * 4096];
        assert!(block(0).iter().all(|&b| b == 3));
        assert!(block(2).iter().all(|&b| b == 1));
        assert!(block(6).iter().all(|&b| b == 5));
        for n in [3, 4, 7, 8] {
            assert!(block(n).iter().all(|&b| b == 0), "block {n}");
        }
    }

    #[tokio::test]
    async fn only_large_ranges_wholly_in_the_page_cache_are_offered_for_sendfile() {
        let p = tmp("zero-copy");
        let img = FileImage::open(&p, Some(4 << 20), false).unwrap();
        // Written through the page cache: resident.
        img.write(0, Bytes::from(vec![5u8; 2 << 20]), false)
            .await
            .unwrap();
        if let Err(e) = resident(&img.file, 0, 4096) {
            // A kernel before 6.5, or a seccomp filter: nothing is ever offered.
            eprintln!("cachestat unavailable here ({e}): checking the fallback only");
            assert!(img.file_range(0, 1 << 20).is_none());
            assert!(!img.cachestat.load(Ordering::Relaxed));
            std::fs::remove_file(&p).unwrap();
            return;
        }
        let r = img
            .file_range(4095, 1 << 20)
            .expect("a cached range is offered");
        assert_eq!((r.offset, r.len), (4095, 1 << 20));
        assert!(Arc::ptr_eq(&r.file, &img.file));
        // Below the threshold, copying is cheaper.
        assert!(img.file_range(0, SENDFILE_MIN - 1).is_none());
        // Partly outside the cache: the last page of the range was never written.
        assert!(img.file_range((2 << 20) - 65536, 65537).is_none());
        // Written back and dropped from the cache: read (and copied) again.
        img.flush().await.unwrap();
        rustix::fs::fadvise(&*img.file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        // (tmpfs keeps its pages whatever the advice: nothing to check there.)
        let tmpfs = rustix::fs::fstatfs(&*img.file).unwrap().f_type == 0x0102_1994;
        if !tmpfs {
            assert!(img.file_range(0, 1 << 20).is_none());
        }
        assert_eq!(
            img.read(0, 1 << 20).await.unwrap().to_bytes(),
            vec![5u8; 1 << 20]
        );
        // An image shrunk behind the server's back: nothing past its end is offered, and the
        // read fails instead of returning short.
        img.file.set_len(1 << 20).unwrap();
        assert!(img.file_range((1 << 20) - 4096, 1 << 20).is_none());
        let e = img.read((1 << 20) - 4096, 1 << 20).await.unwrap_err();
        assert!(
            e.to_string().contains("the file ended before the read did"),
            "{e}"
        );
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn missing_image_without_size_is_an_error_naming_it() {
        let p = tmp("missing");
        let e = FileImage::open(&p, None, false).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "image {} does not exist (give a size to create it)",
                p.display()
            )
        );
    }

    #[test]
    fn size_mismatch_is_refused() {
        let p = tmp("mismatch");
        std::fs::write(&p, vec![1u8; 4096]).unwrap();
        let e = FileImage::open(&p, Some(8192), false).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "image {} is 4096 bytes, but a size of 8192 bytes was asked for",
                p.display()
            )
        );
        std::fs::remove_file(&p).unwrap();
    }

    #[tokio::test]
    async fn created_image_is_sparse_and_round_trips() {
        let p = tmp("roundtrip");
        let img = FileImage::open(&p, Some(8 << 20), false).unwrap();
        assert_eq!(img.info().size, 8 << 20);
        let st = img.block_status(0, 8 << 20).await.unwrap();
        assert_eq!(
            st,
            vec![Extent {
                length: 8 << 20,
                flags: 3
            }]
        );
        img.write(1 << 20, Bytes::from(vec![9u8; 4096]), true)
            .await
            .unwrap();
        let r = img.read(1 << 20, 4096).await.unwrap().to_bytes();
        assert!(r.iter().all(|&b| b == 9));
        let st = img.block_status(0, 8 << 20).await.unwrap();
        assert!(st.iter().any(|e| e.flags == 0), "{st:?}");
        img.trim(0, 8 << 20, false).await.unwrap();
        let r = img.read(1 << 20, 4096).await.unwrap().to_bytes();
        assert!(r.iter().all(|&b| b == 0));
        std::fs::remove_file(&p).unwrap();
    }
}
