//! When a write may run on the async worker instead of the blocking pool.
//!
//! A buffered `pwrite` into the page cache is a copy: microseconds for a few KiB, a few hundred
//! for 1 MiB. Handing it to a thread of the blocking pool and back costs two thread switches on
//! top (server CPU per 4 KiB random write to an image file fell from 51 to 14 us when those ran
//! inline; per 1 MiB sequential write from 328 to 255 us, and fio's throughput rose by a sixth,
//! when writes up to 1 MiB did too: `bench/cpuop.sh` and `bench/abtput.sh`). So writes up to
//! [`INLINE_WRITE_MAX`] run where they are, unless the kernel has lately been pushing back: then
//! a worker must not wait for it, and for [`INLINE_PAUSE`] every write goes through the pool.
//!
//! Pushing back means one write slower than [`STALLED_WRITE`] (the kernel throttling dirty pages
//! puts a writer to sleep for tens of milliseconds), or [`SLOW_BURST`] writes slower than
//! [`SLOW_WRITE`] within [`SLOW_WINDOW`]. A single write of a few milliseconds is not: on a busy
//! machine the thread is preempted mid-copy, or waits for the inode lock another writer of the
//! same file holds. Pausing on each of those kept small writes on the pool much of the time (a
//! write-back cache saw 8 pauses in 9 s of 4 KiB random writes): server CPU per 4 KiB random
//! write to an image file was 33 us against 18 us now, and a write-back cache (`flush = "store"`,
//! an fsync every 256 writes) did 18 % fewer writes a second at 75 us against 57 us
//! (`bench/cpuop.sh`; the cache's own A/B is described in the README's benchmark notes).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The largest write run inline.
pub const INLINE_WRITE_MAX: usize = 1024 * 1024;
/// An inline write slower than this is slow: one of a burst means the kernel is pushing back.
const SLOW_WRITE: Duration = Duration::from_millis(2);
/// This many slow writes ...
const SLOW_BURST: u32 = 3;
/// ... within this long pause inline writes.
const SLOW_WINDOW: Duration = Duration::from_millis(100);
/// A single inline write slower than this pauses inline writes on its own.
const STALLED_WRITE: Duration = Duration::from_millis(20);
/// How long writes then go through the pool.
const INLINE_PAUSE: Duration = Duration::from_secs(1);

/// One file's inline-write state.
#[derive(Debug)]
pub struct InlineWrites {
    /// The clock for `from` and `slow`.
    start: Instant,
    /// Nanoseconds after `start` from which writes may run inline again.
    from: AtomicU64,
    /// The recent slow writes: when the first of them ended (nanoseconds after `start`), and
    /// how many there were since. Only slow writes take this lock.
    slow: Mutex<(u64, u32)>,
}

impl Default for InlineWrites {
    fn default() -> Self {
        InlineWrites {
            start: Instant::now(),
            from: AtomicU64::new(0),
            slow: Mutex::new((0, 0)),
        }
    }
}

impl InlineWrites {
    /// True if a write of `len` bytes may run inline now.
    pub fn allowed(&self, len: usize) -> bool {
        len <= INLINE_WRITE_MAX && !self.paused()
    }

    /// True while the kernel's pushing back keeps writes off the async worker.
    pub fn paused(&self) -> bool {
        self.now() < self.from.load(Ordering::Relaxed)
    }

    /// Runs an inline write, pausing inline writes if it shows the kernel pushing back.
    pub fn run<T>(&self, write: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let out = write();
        self.took(started.elapsed(), self.now());
        out
    }

    /// Counts an inline write that took `took` and ended at `now` (nanoseconds after `start`).
    fn took(&self, took: Duration, now: u64) {
        if took <= SLOW_WRITE {
            return;
        }
        if took > STALLED_WRITE {
            return self.pause();
        }
        let burst = {
            // A poisoned lock only means a panic elsewhere mid-count: the count is still usable.
            let mut slow = self.slow.lock().unwrap_or_else(|e| e.into_inner());
            if slow.1 == 0 || now.saturating_sub(slow.0) > SLOW_WINDOW.as_nanos() as u64 {
                *slow = (now, 0);
            }
            slow.1 += 1;
            let burst = slow.1 >= SLOW_BURST;
            if burst {
                *slow = (0, 0);
            }
            burst
        };
        if burst {
            self.pause();
        }
    }

    /// Sends writes through the pool for [`INLINE_PAUSE`].
    pub fn pause(&self) {
        let until = self.now() + INLINE_PAUSE.as_nanos() as u64;
        self.from.store(until, Ordering::Relaxed);
    }

    /// Nanoseconds since `start`.
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Ends a pause now (tests).
    #[cfg(test)]
    pub fn resume(&self) {
        self.from.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A_LITTLE: Duration = Duration::from_micros(100);

    #[test]
    fn small_writes_run_inline() {
        let w = InlineWrites::default();
        assert!(w.allowed(4096));
        assert!(w.allowed(INLINE_WRITE_MAX));
        assert!(!w.allowed(INLINE_WRITE_MAX + 1));
        assert_eq!(w.run(|| 7), 7);
        assert!(w.allowed(4096), "a fast write changes nothing");
        w.pause();
        assert!(!w.allowed(4096));
        w.resume();
        assert!(w.allowed(4096));
    }

    #[test]
    fn one_stalled_write_pauses_inline_writes() {
        let w = InlineWrites::default();
        w.run(|| std::thread::sleep(STALLED_WRITE + A_LITTLE));
        assert!(!w.allowed(4096));
    }

    #[test]
    fn a_burst_of_slow_writes_pauses_inline_writes() {
        let w = InlineWrites::default();
        let slow = SLOW_WRITE + A_LITTLE;
        let step = SLOW_WINDOW.as_nanos() as u64 / u64::from(SLOW_BURST);
        for n in 1..SLOW_BURST {
            w.took(slow, u64::from(n) * step);
            assert!(w.allowed(4096), "{n} slow writes are not a burst");
        }
        w.took(slow, u64::from(SLOW_BURST) * step);
        assert!(!w.allowed(4096), "{SLOW_BURST} within {SLOW_WINDOW:?} are");
        w.resume();
        w.took(slow, 10 * step);
        assert!(w.allowed(4096), "a pause starts a new count");
    }

    #[test]
    fn slow_writes_far_apart_are_not_a_burst() {
        let w = InlineWrites::default();
        let apart = SLOW_WINDOW.as_nanos() as u64 * 2 / u64::from(SLOW_BURST);
        for n in 1..=2 * u64::from(SLOW_BURST) {
            w.took(SLOW_WRITE + A_LITTLE, n * apart);
        }
        assert!(w.allowed(4096), "slow writes {apart} ns apart");
    }

    #[test]
    fn a_real_slow_write_counts() {
        let w = InlineWrites::default();
        w.run(|| std::thread::sleep(SLOW_WRITE + A_LITTLE));
        let counted = w.slow.lock().map(|s| s.1).unwrap_or(0);
        // A busy machine may stretch the sleep past `STALLED_WRITE`: that pauses at once.
        assert!(counted == 1 || !w.allowed(4096), "counted {counted}");
    }
}
