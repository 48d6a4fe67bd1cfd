//! Reusable read buffers, and reads into new buffers that are not zeroed first.
//!
//! A large read into fresh memory pays twice before a byte arrives: the memory is zeroed (or
//! faulted in and cleared by the kernel), then overwritten. A buffer taken from here was used
//! before, so it is neither, and it is often still in the CPU cache from its last use. A buffer
//! goes back when the last `Bytes` made from it is dropped, that is once its reply is sent.
//!
//! Buffers come in power-of-two classes from [`MIN`] to [`MAX`]; each class keeps at most
//! [`KEEP`] idle buffers, so the pool holds at most about 30 MiB however busy the server was.

use std::fs::File;
use std::io;
use std::sync::Mutex;

use bytes::Bytes;

/// The smallest pooled buffer: below this, zeroing costs less than the bookkeeping.
pub const MIN: usize = 64 * 1024;
/// The largest pooled buffer.
pub const MAX: usize = 1 << 20;
/// Idle buffers kept per class.
const KEEP: usize = 16;
const CLASSES: usize = (MAX / MIN).trailing_zeros() as usize + 1;

/// Idle buffers by class.
struct Pool {
    idle: [Mutex<Vec<Vec<u8>>>; CLASSES],
}

impl Pool {
    const fn new() -> Pool {
        Pool {
            idle: [const { Mutex::new(Vec::new()) }; CLASSES],
        }
    }

    fn idle(&self, class: usize) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        // Only pushes and pops happen under the lock: a poisoned one still holds a sound list.
        self.idle[class].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&'static self, len: usize) -> Option<Buffer> {
        let class = class_of(len)?;
        let bytes = self
            .idle(class)
            .pop()
            .unwrap_or_else(|| vec![0; MIN << class]);
        Some(Buffer {
            bytes,
            class,
            pool: self,
        })
    }
}

static POOL: Pool = Pool::new();

/// A pooled buffer of at least the asked length; back to the pool when dropped.
pub struct Buffer {
    bytes: Vec<u8>,
    class: usize,
    pool: &'static Pool,
}

fn class_of(len: usize) -> Option<usize> {
    if !(MIN..=MAX).contains(&len) {
        return None;
    }
    let size = len.next_power_of_two();
    Some((size / MIN).trailing_zeros() as usize)
}

impl Buffer {
    /// A buffer for `len` bytes (contents unspecified), or `None` if `len` is not within
    /// [`MIN`]..=[`MAX`].
    pub fn take(len: usize) -> Option<Buffer> {
        POOL.take(len)
    }

    /// The whole buffer, to read into.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    /// The first `len` bytes, as a `Bytes` that returns the buffer when dropped.
    pub fn freeze(self, len: usize) -> Bytes {
        Bytes::from_owner(self).slice(..len)
    }
}

impl AsRef<[u8]> for Buffer {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let mut idle = self.pool.idle(self.class);
        if idle.len() < KEEP {
            idle.push(std::mem::take(&mut self.bytes));
        }
    }
}

/// `len` bytes of `file` at `offset`, read into a new buffer that is not zeroed first (zeroing
/// a cold 4 MiB buffer costs about what reading into it does). Fails as `read_exact_at` does
/// when the file ends first.
pub fn read_exact_at_unzeroed(file: &File, len: usize, offset: u64) -> io::Result<Vec<u8>> {
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let at = offset + buf.len() as u64;
        // rustix reads into the spare capacity and counts what it read into the length; a
        // capacity larger than asked is read into too, and cut off below.
        match rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file ended before the read did",
                ));
            }
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unzeroed_reads_read_exactly_and_fail_past_the_end() {
        let dir = std::env::temp_dir().join(format!("nbd-rs-buffers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = File::open(&path).unwrap();
        assert_eq!(
            read_exact_at_unzeroed(&f, 200_000, 4097).unwrap(),
            &data[4097..204_097]
        );
        assert_eq!(read_exact_at_unzeroed(&f, 0, 10).unwrap(), Vec::<u8>::new());
        let e = read_exact_at_unzeroed(&f, 1000, 299_500).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn classes_cover_min_to_max_in_powers_of_two() {
        assert_eq!(class_of(MIN - 1), None);
        assert_eq!(class_of(MIN), Some(0));
        assert_eq!(class_of(MIN + 1), Some(1));
        assert_eq!(class_of(MAX), Some(CLASSES - 1));
        assert_eq!(class_of(MAX + 1), None);
        assert!(Buffer::take(MAX + 1).is_none());
        assert!(Buffer::take(4096).is_none());
    }

    #[test]
    fn a_buffer_returns_when_its_last_bytes_is_dropped() {
        // A pool of its own, so that other tests cannot take or return buffers meanwhile.
        let pool: &'static Pool = Box::leak(Box::new(Pool::new()));
        let len = 3 * MIN;
        let class = class_of(len).unwrap();
        let mut b = pool.take(len).unwrap();
        assert_eq!(b.as_mut_slice().len(), 4 * MIN);
        b.as_mut_slice()[..3].copy_from_slice(b"abc");
        let ptr = b.as_mut_slice().as_ptr();
        let bytes = b.freeze(3);
        let copy = bytes.clone();
        assert_eq!(&bytes[..], b"abc");
        drop(bytes);
        assert_eq!(pool.idle(class).len(), 0, "a clone still holds it");
        drop(copy);
        assert_eq!(pool.idle(class).len(), 1);
        // The next taker of that class gets it back.
        let mut again = pool.take(len).unwrap();
        assert_eq!(again.as_mut_slice().as_ptr(), ptr);
        assert_eq!(pool.idle(class).len(), 0);
    }

    #[test]
    fn a_class_keeps_a_bounded_number_of_idle_buffers() {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new()));
        let all: Vec<Buffer> = (0..KEEP + 5).map(|_| pool.take(MAX).unwrap()).collect();
        drop(all);
        assert_eq!(pool.idle(CLASSES - 1).len(), KEEP);
    }
}
