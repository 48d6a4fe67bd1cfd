//! Read-only mappings of an image file, for sending cached pages to a socket copied once.
//!
//! A read answered the usual way is copied twice on the server: from the page cache into a
//! buffer (`pread`), then from the buffer into the socket. `sendfile` copies nothing on the
//! server, but a client on the same machine then copies from page-cache pages that no CPU
//! cache holds, which halved 1 MiB sequential reads here (see `[server] sendfile`). From a
//! mapping, the kernel copies the bytes once, from the page cache into the socket's buffers,
//! where a local client finds them still warm.
//!
//! An image is mapped in windows of [`WINDOW`] bytes, made when a read first needs one and
//! kept for the next reads: a mapping made and unmapped for each reply cost as much as the copy
//! it saved (filling and clearing the page table every time). At most [`MAX_WINDOWS`] windows
//! stay mapped per image and [`MAX_TOTAL`] in the server, the least recently used going first
//! if it rested [`EVICT_AFTER`] (else the read is read the usual way), and a window unused for
//! [`IDLE`] is unmapped, so an idle server holds none: the cached pages a window maps count in
//! the server's resident size (as `RssFile`) while it is mapped (and a window given up stays
//! mapped until the replies that hold it are written).
//!
//! The device offers a range only when `cachestat(2)` counts its pages as cached, which
//! includes pages still being read from the disk; `mincore(2)` on the mapping, which counts
//! only pages up to date, is asked again before the bytes are handed out. A page evicted
//! between that check and the write to the socket would make the write wait for the disk on
//! an async worker; that takes memory pressure within a few milliseconds of a read of the
//! page, and costs one disk read.
//!
//! The mapped bytes must only ever be read by the kernel, in a write to a socket: the caller
//! takes this path on plain sockets only (a TLS stream would encrypt them in user space), and
//! the `Bytes` goes nowhere but into its reply. That is what makes a mapping safe against an
//! image shrunk by someone else meanwhile: the kernel's copy from a page past the end of the
//! file fails the write with `EFAULT` (and the connection ends), where a read in user space
//! would kill the server with `SIGBUS` (a test below shows the first). Bytes written to the range
//! after the read ran may be sent, as with `sendfile`: the bytes are taken when the reply is
//! written, still within the read's lifetime for the client.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use memmap2::{Mmap, MmapOptions};
use tokio::time::Instant;

/// The span of one window, and the alignment of its start.
pub const WINDOW: u64 = 64 << 20;
/// Windows mapped at most per image: 512 MiB of address space, and a megabyte of page table.
pub const MAX_WINDOWS: usize = 8;
/// Windows mapped at most in the server, all images together: 2 GiB, 4 MiB of page table.
pub const MAX_TOTAL: usize = 32;
/// A window unused this long is unmapped (by a sweep every as long: after 2 to 4 seconds).
pub const IDLE: Duration = Duration::from_secs(2);
/// A full table gives up its least recently used window only if it rested this long: reads
/// spread over more windows than may be mapped are read the usual way rather than have
/// windows mapped and unmapped in turn.
pub const EVICT_AFTER: Duration = Duration::from_millis(100);

/// A count of mapped windows with a bound, shared by the images of a server.
#[derive(Debug)]
pub struct Budget {
    mapped: AtomicUsize,
    max: usize,
}

impl Budget {
    /// Room for `max` windows.
    pub const fn new(max: usize) -> Budget {
        Budget {
            mapped: AtomicUsize::new(0),
            max,
        }
    }

    /// A window's share, if there is room.
    fn take(&'static self) -> Option<Share> {
        self.mapped
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Share(self))
    }
}

/// The server's budget.
static SERVER: Budget = Budget::new(MAX_TOTAL);

/// A window's place in its budget, given back when dropped.
#[derive(Debug)]
struct Share(&'static Budget);

impl Drop for Share {
    fn drop(&mut self) {
        self.0.mapped.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The windows of one image file.
#[derive(Debug)]
pub struct Windows {
    file: Arc<File>,
    /// The image's size: no window reaches past it.
    size: u64,
    budget: &'static Budget,
    /// Set when the image could not be mapped: its reads are read from then on.
    failed: AtomicBool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    windows: Vec<Window>,
    /// Counts uses: the window with the lowest `last` is the least recently used.
    uses: u64,
    /// Whether a task is unmapping idle windows.
    sweeping: bool,
}

#[derive(Debug)]
struct Window {
    /// The window's number: it maps `[index * WINDOW, (index + 1) * WINDOW)`, cut at the end.
    index: u64,
    map: Arc<Mmap>,
    share: Share,
    /// When it was last used, and its use count then.
    used: Instant,
    last: u64,
}

/// A window lent to a reply, as the owner of a `Bytes`: unmapped when the last goes.
struct Lent(Arc<Mmap>);

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Windows {
    /// No windows yet, for `file` of `size` bytes, within the server's budget.
    pub fn new(file: Arc<File>, size: u64) -> Windows {
        Windows::with_budget(file, size, &SERVER)
    }

    /// No windows yet, within `budget`.
    pub fn with_budget(file: Arc<File>, size: u64, budget: &'static Budget) -> Windows {
        Windows {
            file,
            size,
            budget,
            failed: AtomicBool::new(false),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Only pushes, removals and time stamps happen under the lock.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The `len` bytes at `offset`, backed by the window that holds them, for a write to a
    /// socket and nothing else (see the module documentation). `None` when the caller should
    /// read them instead: the range is empty, runs past the image, or crosses from one window
    /// into the next; no window can be had (every one in use lately, here or in the server);
    /// a page of it is not in the page cache, or still on its way from the disk; or the image
    /// could not be mapped before. An error, once, when the image cannot be mapped (a file
    /// system without `mmap`, or the process out of address space or mappings).
    pub fn bytes(self: &Arc<Self>, offset: u64, len: u32) -> Option<io::Result<Bytes>> {
        let end = offset.checked_add(u64::from(len))?;
        let index = offset / WINDOW;
        if len == 0 || end > self.size || (end - 1) / WINDOW != index {
            return None;
        }
        let start = index * WINDOW;
        let now = Instant::now();
        let found = {
            let mut st = self.lock();
            st.uses += 1;
            let last = st.uses;
            st.windows.iter_mut().find(|w| w.index == index).map(|w| {
                w.used = now;
                w.last = last;
                Arc::clone(&w.map)
            })
        };
        let map = match found {
            Some(map) => map,
            None => match self.add(index, now)? {
                Ok(map) => map,
                Err(e) => return Some(Err(e)),
            },
        };
        let at = (offset - start) as usize;
        let bytes = Bytes::from_owner(Lent(map)).slice(at..at + len as usize);
        // The range was in the page cache when the device offered it; a page may have gone
        // since, or be on its way from the disk still (which the device's check counts as
        // cached). Either would make the write to the socket wait for the disk, on the
        // connection's async worker.
        in_memory(&bytes).then_some(Ok(bytes))
    }

    /// Maps window `index` and adds it to the table, giving up the least recently used one
    /// if the table or the server's budget is full. `None` if no window can be had, or the
    /// image could not be mapped before.
    fn add(self: &Arc<Self>, index: u64, now: Instant) -> Option<io::Result<Arc<Mmap>>> {
        if self.failed.load(Ordering::Relaxed) {
            return None;
        }
        // Mapped out of the lock: `mmap` waits for the process's memory map lock, which a
        // fault in another thread may hold while it reads from the disk.
        let map = match self.map(index * WINDOW) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                return (!self.failed.swap(true, Ordering::Relaxed)).then_some(Err(e));
            }
        };
        // A window given up goes after the lock (its unmapping may take a while), unless a
        // reply still holds it.
        let mut evicted = None;
        let mut st = self.lock();
        if let Some(w) = st.windows.iter_mut().find(|w| w.index == index) {
            // Another read mapped it meanwhile: ours goes.
            w.used = now;
            return Some(Ok(Arc::clone(&w.map)));
        }
        let share = if st.windows.len() < MAX_WINDOWS
            && let Some(share) = self.budget.take()
        {
            share
        } else {
            let i = st
                .windows
                .iter()
                .enumerate()
                .min_by_key(|(_, w)| w.last)
                .map(|(i, _)| i)?;
            if now.duration_since(st.windows[i].used) < EVICT_AFTER {
                return None;
            }
            let Window { map, share, .. } = st.windows.swap_remove(i);
            evicted = Some(map);
            share
        };
        st.uses += 1;
        let last = st.uses;
        st.windows.push(Window {
            index,
            map: Arc::clone(&map),
            share,
            used: now,
            last,
        });
        if !st.sweeping
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            st.sweeping = true;
            rt.spawn(sweep(Arc::downgrade(self)));
        }
        drop(st);
        drop(evicted);
        Some(Ok(map))
    }

    /// Maps the window that starts at `start`.
    #[allow(unsafe_code)]
    fn map(&self, start: u64) -> io::Result<Mmap> {
        let len = WINDOW.min(self.size - start);
        let mut options = MmapOptions::new();
        // Both fit: `len` is at most WINDOW.
        options.offset(start).len(len as usize);
        // SAFETY: `map` is unsafe because the file may change, or shrink, while mapped, under
        // a slice that Rust assumes does not. Here the bytes are never read in user space: they
        // go to the kernel in a write to a socket (see the module documentation), which copies
        // what the pages hold at that moment, and fails with EFAULT for pages past a shrunken
        // end.
        unsafe { options.map(&*self.file) }
    }

    /// How many windows are mapped now.
    pub fn mapped(&self) -> usize {
        self.lock().windows.len()
    }

    /// Unmaps the windows unused for [`IDLE`]; false once none is left, and the sweeping ends.
    fn sweep_idle(&self) -> bool {
        let now = Instant::now();
        let mut st = self.lock();
        let (keep, idle): (Vec<Window>, Vec<Window>) = std::mem::take(&mut st.windows)
            .into_iter()
            .partition(|w| now.duration_since(w.used) < IDLE);
        st.windows = keep;
        st.sweeping = !st.windows.is_empty();
        let more = st.sweeping;
        drop(st);
        drop(idle);
        more
    }
}

/// Whether every page under `bytes`, a slice of a mapping, is in the page cache and up to
/// date (`mincore(2)`). The kernel answers "yes" for the pages of a file this process may
/// neither write nor owns (it keeps page-cache contents of others' files private); false if
/// the call fails.
#[allow(unsafe_code)]
fn in_memory(bytes: &[u8]) -> bool {
    let page = rustix::param::page_size();
    let addr = bytes.as_ptr() as usize;
    let first = addr & !(page - 1);
    let len = addr + bytes.len() - first;
    let mut pages = vec![0u8; len.div_ceil(page)];
    // SAFETY: `[first, first + len)` lies within one live mapping (the window `bytes` slices,
    // starting at a page boundary, and kept mapped by `bytes`), and `pages` has a byte for
    // each of its pages. `mincore` reads no byte of the mapping.
    let r = unsafe { libc::mincore(first as *mut libc::c_void, len, pages.as_mut_ptr()) };
    r == 0 && pages.iter().all(|&p| p & 1 == 1)
}

/// Unmaps idle windows every [`IDLE`] while any is mapped and the image is open.
async fn sweep(windows: Weak<Windows>) {
    loop {
        tokio::time::sleep(IDLE).await;
        let Some(w) = windows.upgrade() else {
            return;
        };
        if !w.sweep_idle() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    /// A file of `size` bytes with `bytes` at its start, the rest a hole; the first 4 KiB of
    /// each window are read, so that they are in the page cache (as the device checks before
    /// it offers a range).
    fn image(tag: &str, bytes: &[u8], size: u64) -> (std::path::PathBuf, Arc<File>) {
        let path =
            std::env::temp_dir().join(format!("nbd-rs-mapped-{tag}-{}.img", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        file.set_len(size).unwrap();
        for w in 0..size.div_ceil(WINDOW) {
            let mut page = vec![0u8; 4096.min((size - w * WINDOW) as usize)];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut page, w * WINDOW).unwrap();
        }
        (path, Arc::new(file))
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn a_range_within_a_window_holds_the_bytes_of_the_file() {
        // Two windows and a short third one; data across the first boundary.
        let size = 2 * WINDOW + 12345;
        let mut bytes = vec![0u8; (WINDOW + (1 << 20)) as usize];
        let tail = pattern(2 << 20);
        let at = (WINDOW - (1 << 20)) as usize;
        bytes[at..at + tail.len()].copy_from_slice(&tail);
        let (path, file) = image("bytes", &bytes, size);
        let w = Arc::new(Windows::with_budget(Arc::clone(&file), size, budget(4)));
        let want = |offset: u64, len: u32| {
            let mut v = vec![0u8; len as usize];
            std::os::unix::fs::FileExt::read_exact_at(&*file, &mut v, offset).unwrap();
            v
        };
        for (offset, len) in [
            (0u64, 65536u32),
            (WINDOW - (1 << 20), 1 << 20),
            (WINDOW - (1 << 20) + 1, 65536),
            (WINDOW, 1 << 20),
            (WINDOW + 4095, 65537),
            (2 * WINDOW, 12345),
            (2 * WINDOW + 45, 12300),
        ] {
            // Read first: into the page cache.
            let want = want(offset, len);
            let got = w.bytes(offset, len).unwrap().unwrap();
            assert!(got[..] == want[..], "{offset} +{len}");
        }
        assert_eq!(w.mapped(), 3);
        // Across a boundary, past the end, empty: the caller reads these.
        assert!(w.bytes(WINDOW - 1, 2).is_none());
        assert!(w.bytes(2 * WINDOW, 12346).is_none());
        assert!(w.bytes(size, 1).is_none());
        assert!(w.bytes(u64::MAX - 10, 100).is_none());
        assert!(w.bytes(0, 0).is_none());
        std::fs::remove_file(path).unwrap();
    }

    /// A budget of its own, so that tests running at once do not share the server's.
    fn budget(max: usize) -> &'static Budget {
        Box::leak(Box::new(Budget::new(max)))
    }

    fn indexes(w: &Windows) -> Vec<u64> {
        let mut v: Vec<u64> = w.lock().windows.iter().map(|w| w.index).collect();
        v.sort_unstable();
        v
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_max_windows_stay_mapped_and_the_least_recently_used_goes_first() {
        let n = MAX_WINDOWS as u64 + 3;
        let (path, file) = image("lru", b"x", n * WINDOW);
        let w = Arc::new(Windows::with_budget(file, n * WINDOW, budget(100)));
        // Window 0 is kept in use while the others come and go.
        let held = w.bytes(0, 4096).unwrap().unwrap();
        for i in 1..n {
            tokio::time::sleep(EVICT_AFTER).await;
            w.bytes(i * WINDOW, 4096).unwrap().unwrap();
            w.bytes(0, 4096).unwrap().unwrap();
            assert!(w.mapped() <= MAX_WINDOWS);
        }
        let kept = indexes(&w);
        assert_eq!(kept.len(), MAX_WINDOWS);
        assert_eq!(kept[0], 0, "{kept:?}");
        assert_eq!(
            kept[1..],
            (n - MAX_WINDOWS as u64 + 1..n).collect::<Vec<_>>()[..]
        );
        assert_eq!(held[0], b'x');
        std::fs::remove_file(path).unwrap();
    }

    /// Reads spread over more windows than may be mapped: a window used less than EVICT_AFTER
    /// ago is not given up, the read is left to the caller instead.
    #[tokio::test(start_paused = true)]
    async fn a_full_table_gives_up_only_a_window_that_rested() {
        let n = MAX_WINDOWS as u64 + 1;
        let (path, file) = image("thrash", b"x", n * WINDOW);
        let w = Arc::new(Windows::with_budget(file, n * WINDOW, budget(100)));
        for i in 0..MAX_WINDOWS as u64 {
            w.bytes(i * WINDOW, 4096).unwrap().unwrap();
        }
        assert!(w.bytes(MAX_WINDOWS as u64 * WINDOW, 4096).is_none());
        assert_eq!(w.mapped(), MAX_WINDOWS);
        tokio::time::sleep(EVICT_AFTER).await;
        assert!(w.bytes(MAX_WINDOWS as u64 * WINDOW, 4096).unwrap().is_ok());
        assert_eq!(w.mapped(), MAX_WINDOWS);
        assert!(!indexes(&w).contains(&0));
        std::fs::remove_file(path).unwrap();
    }

    /// The server's windows are counted across images: an image finds none left while others
    /// hold them all, until it has one of its own to give up, or they rest and go.
    #[tokio::test(start_paused = true)]
    async fn images_share_the_budget_of_the_server() {
        let b = budget(3);
        let (path, file) = image("budget", b"x", 4 * WINDOW);
        let one = Arc::new(Windows::with_budget(Arc::clone(&file), 4 * WINDOW, b));
        let two = Arc::new(Windows::with_budget(file, 4 * WINDOW, b));
        for i in 0..3 {
            one.bytes(i * WINDOW, 4096).unwrap().unwrap();
        }
        assert!(two.bytes(0, 4096).is_none(), "no room in the server");
        tokio::time::sleep(EVICT_AFTER).await;
        assert!(
            two.bytes(0, 4096).is_none(),
            "and none of its own to give up"
        );
        // One image's windows rest and are unmapped: the other gets room.
        tokio::time::sleep(IDLE * 3).await;
        assert_eq!(one.mapped(), 0);
        two.bytes(0, 4096).unwrap().unwrap();
        assert_eq!(b.mapped.load(Ordering::Relaxed), 1);
        drop(two);
        std::fs::remove_file(path).unwrap();
    }

    /// A range whose pages left the page cache is not handed out (writing it would wait for
    /// the disk): the caller reads it.
    #[test]
    fn pages_not_in_the_page_cache_are_left_to_the_caller() {
        let (path, file) = image("evicted", &pattern(4 << 20), 4 << 20);
        let w = Arc::new(Windows::with_budget(Arc::clone(&file), 4 << 20, budget(4)));
        assert!(w.bytes(0, 1 << 20).unwrap().is_ok());
        file.sync_all().unwrap();
        rustix::fs::fadvise(&*file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        // Unless the kernel keeps this file's page cache private from us (not as its owner).
        assert!(w.bytes(0, 1 << 20).is_none());
        std::fs::remove_file(path).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn idle_windows_are_unmapped_and_a_reply_keeps_its_own() {
        let (path, file) = image("idle", &pattern(1 << 20), 2 * WINDOW);
        let w = Arc::new(Windows::with_budget(file, 2 * WINDOW, budget(4)));
        let held = w.bytes(4096, 65536).unwrap().unwrap();
        w.bytes(WINDOW, 4096).unwrap().unwrap();
        assert_eq!(w.mapped(), 2);
        // Window 1 stays in use; window 0 rests.
        for _ in 0..4 {
            tokio::time::sleep(IDLE / 2).await;
            w.bytes(WINDOW, 4096).unwrap().unwrap();
        }
        let indexes: Vec<u64> = w.lock().windows.iter().map(|w| w.index).collect();
        assert_eq!(indexes, [1]);
        // Out of the list, but mapped for the reply that holds it.
        assert!(held[..] == pattern(1 << 20)[4096..4096 + 65536]);
        tokio::time::sleep(IDLE * 3).await;
        assert_eq!(w.mapped(), 0);
        assert!(!w.lock().sweeping, "the sweeper ended");
        // A new read maps again, and sweeping starts again.
        w.bytes(0, 4096).unwrap().unwrap();
        assert!(w.lock().sweeping);
        std::fs::remove_file(path).unwrap();
    }

    /// Why the bytes go only to the kernel: an image cut short under a mapping fails the write
    /// that carries them (EFAULT), and the process goes on.
    #[test]
    fn an_image_cut_short_under_a_window_fails_the_write_and_nothing_else() {
        let (path, file) = image("shrunk", &pattern(2 << 20), 2 << 20);
        let w = Arc::new(Windows::with_budget(Arc::clone(&file), 2 << 20, budget(4)));
        let mapped = w.bytes(0, 1 << 20).unwrap().unwrap();
        file.set_len(0).unwrap();
        let (mut tx, _rx) = UnixStream::pair().unwrap();
        let err = tx.write(&mapped).unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(rustix::io::Errno::FAULT.raw_os_error()),
            "{err}"
        );
        std::fs::remove_file(path).unwrap();
    }
}
