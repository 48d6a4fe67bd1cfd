//! When a write may run on the async worker instead of the blocking pool.
//!
//! A buffered `pwrite` into the page cache is a copy: microseconds for a few KiB, a few hundred
//! for 1 MiB. Handing it to a thread of the blocking pool and back costs two thread switches on
//! top (server CPU per 4 KiB random write to an image file fell from 51 to 14 us when those ran
//! inline; per 1 MiB sequential write from 328 to 255 us, and fio's throughput rose by a sixth,
//! when writes up to 1 MiB did too: `bench/cpuop.sh` and `bench/abtput.sh`). So writes up to
//! [`INLINE_WRITE_MAX`] run where they are, unless one recently took longer than
//! [`SLOW_WRITE`]: the kernel is then throttling dirty pages, a worker must not wait for it,
//! and for [`INLINE_PAUSE`] every write goes through the pool.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The largest write run inline.
pub const INLINE_WRITE_MAX: usize = 1024 * 1024;
/// An inline write slower than this means the kernel is pushing back.
const SLOW_WRITE: Duration = Duration::from_millis(2);
/// How long writes then go through the pool.
const INLINE_PAUSE: Duration = Duration::from_secs(1);

/// One file's inline-write state.
#[derive(Debug)]
pub struct InlineWrites {
    /// The clock for `from`.
    start: Instant,
    /// Nanoseconds after `start` from which writes may run inline again.
    from: AtomicU64,
}

impl Default for InlineWrites {
    fn default() -> Self {
        InlineWrites {
            start: Instant::now(),
            from: AtomicU64::new(0),
        }
    }
}

impl InlineWrites {
    /// True if a write of `len` bytes may run inline now.
    pub fn allowed(&self, len: usize) -> bool {
        len <= INLINE_WRITE_MAX && !self.paused()
    }

    /// True while a slow write keeps writes off the async worker.
    pub fn paused(&self) -> bool {
        (self.start.elapsed().as_nanos() as u64) < self.from.load(Ordering::Relaxed)
    }

    /// Runs an inline write, pausing inline writes if it was slow.
    pub fn run<T>(&self, write: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let out = write();
        if started.elapsed() > SLOW_WRITE {
            self.pause();
        }
        out
    }

    /// Sends writes through the pool for [`INLINE_PAUSE`].
    pub fn pause(&self) {
        let until = self.start.elapsed() + INLINE_PAUSE;
        self.from.store(until.as_nanos() as u64, Ordering::Relaxed);
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

    #[test]
    fn small_writes_run_inline_until_one_is_slow() {
        let w = InlineWrites::default();
        assert!(w.allowed(4096));
        assert!(w.allowed(INLINE_WRITE_MAX));
        assert!(!w.allowed(INLINE_WRITE_MAX + 1));
        assert_eq!(w.run(|| 7), 7);
        assert!(w.allowed(4096), "a fast write changes nothing");
        w.run(|| std::thread::sleep(SLOW_WRITE + Duration::from_millis(1)));
        assert!(!w.allowed(4096), "a slow one pauses inline writes");
        w.resume();
        assert!(w.allowed(4096));
    }
}
