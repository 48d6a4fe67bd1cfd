//! Read-ahead of whole chunks for a sharded volume on a store of whole objects (S3).
//!
//! Each chunk read from S3 is a GET of some milliseconds on loopback and of many round trips
//! across a network (a 4 MiB GET took 190 ms at 20 ms round trips, `bench/s3wan.sh`), and a
//! client reading a disk in order keeps only a few reads in flight: `nbdcopy` keeps 16 MiB,
//! four chunks, and sometimes one. So once a read starts where one of the last few ended (a
//! stream, as the kernel's read-ahead sees it), the chunks after it are fetched whole, in
//! parallel, up to a fixed number held ahead (`readahead` bytes of chunks). Scattered reads
//! fetch nothing more than they ask for.
//! A read of a chunk fetched ahead takes its bytes from the fetch (sliced, not copied); the
//! read that reaches the chunk's end lets it go.
//!
//! A chunk's fetch is forgotten once a write, trim or zeroing of that chunk has ended (or been
//! dropped): a read that starts after the change then reads the store again, and a fetch
//! started before the change is never served after it. (A fetch started after the change sees
//! it: S3 reads what was written before.) A fetch that fails or finds nothing is simply not
//! used: the read asks the store itself and gets the store's own answer.
//!
//! Memory: each stream has at most `depth` chunks (64 at most) fetched ahead of its read, and
//! at most `2 * depth` are held in all (the oldest let go first), plus those that reads are
//! still slicing. A fetch taken by a read that is then dropped is stopped.
//!
//! Like the rest of the layout, this assumes the volume has no other writer.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::task::AbortHandle;

/// A chunk being fetched, or fetched: its bytes, or `None` if the fetch failed or found
/// nothing.
pub(crate) type Fetch = Shared<BoxFuture<'static, Option<Bytes>>>;

/// The most chunks a stream has fetched ahead, whatever `readahead` says: with small chunks,
/// each look ahead scans this many, and a stream starts this many GETs at once.
pub(crate) const MAX_DEPTH: usize = 64;

/// How many reads' ends are remembered, to tell a stream from scattered reads: a few streams
/// at once, each with several reads in flight.
const RECENT: usize = 16;

/// One chunk held ahead.
struct Ahead {
    chunk: u64,
    fetch: Fetch,
    abort: AbortHandle,
}

#[derive(Default)]
struct State {
    /// Where the latest reads ended, the latest last.
    ends: VecDeque<u64>,
    /// Chunks held ahead, the oldest first.
    ahead: VecDeque<Ahead>,
}

/// The read-ahead of one volume.
pub(crate) struct ReadAhead {
    /// Chunks kept ahead of a stream.
    depth: usize,
    chunk_size: u64,
    state: Mutex<State>,
}

impl ReadAhead {
    /// Keeps `depth` chunks of `chunk_size` bytes ahead: at least one, at most [`MAX_DEPTH`].
    pub(crate) fn new(depth: usize, chunk_size: u64) -> ReadAhead {
        ReadAhead {
            depth: depth.clamp(1, MAX_DEPTH),
            chunk_size,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic during a queue operation; the queues are still sound.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A read of `offset..end` (not empty) of a volume of `chunks` chunks begins. If it
    /// continues a stream, starts fetching the chunks after it that `wanted` says are worth a
    /// fetch (those in the store), with `fetch`: those of the next `depth` chunks not held yet.
    pub(crate) fn on_read(
        &self,
        offset: u64,
        end: u64,
        chunks: u64,
        wanted: impl Fn(u64) -> bool,
        fetch: impl Fn(u64) -> BoxFuture<'static, Option<Bytes>>,
    ) {
        let (first, last) = (offset / self.chunk_size, (end - 1) / self.chunk_size);
        let mut st = self.state();
        let stream = st.ends.contains(&offset) || st.ahead.iter().any(|a| a.chunk == first);
        if st.ends.len() == RECENT {
            st.ends.pop_front();
        }
        st.ends.push_back(end);
        if !stream {
            return;
        }
        let stop = last.saturating_add(1 + self.depth as u64).min(chunks);
        for c in last + 1..stop {
            if st.ahead.iter().any(|a| a.chunk == c) || !wanted(c) {
                continue;
            }
            if st.ahead.len() >= 2 * self.depth {
                // Make room: the oldest fetch that is neither this read's nor after it.
                let Some(i) = st
                    .ahead
                    .iter()
                    .position(|a| a.chunk < first || a.chunk >= stop)
                else {
                    break;
                };
                if let Some(a) = st.ahead.remove(i) {
                    a.abort.abort();
                }
            }
            let task = tokio::spawn(fetch(c));
            let abort = task.abort_handle();
            let fetch = async move { task.await.ok().flatten() }.boxed().shared();
            st.ahead.push_back(Ahead {
                chunk: c,
                fetch,
                abort,
            });
        }
    }

    /// The fetch of `chunk`, if one was started. A read that goes through the chunk's end
    /// takes it away, with the task, which stops if that read is dropped before it is done;
    /// others leave it for the rest of the chunk.
    pub(crate) fn take(
        &self,
        chunk: u64,
        through_end: bool,
    ) -> Option<(Fetch, Option<StopOnDrop>)> {
        let mut st = self.state();
        let i = st.ahead.iter().position(|a| a.chunk == chunk)?;
        if through_end {
            st.ahead
                .remove(i)
                .map(|a| (a.fetch, Some(StopOnDrop(a.abort))))
        } else {
            Some((st.ahead[i].fetch.clone(), None))
        }
    }

    /// Forgets (and stops) the fetches of chunks `first..=last`: they have changed.
    pub(crate) fn forget(&self, first: u64, last: u64) {
        let mut st = self.state();
        st.ahead.retain(|a| {
            let keep = a.chunk < first || a.chunk > last;
            if !keep {
                a.abort.abort();
            }
            keep
        });
    }

    /// How many chunks are held ahead.
    #[cfg(test)]
    pub(crate) fn held(&self) -> Vec<u64> {
        self.state().ahead.iter().map(|a| a.chunk).collect()
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        for a in self.state().ahead.drain(..) {
            a.abort.abort();
        }
    }
}

/// Stops a fetch's task when dropped (nothing, once it is done).
pub(crate) struct StopOnDrop(AbortHandle);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Forgets the fetches of a range of chunks when dropped: after a change to them has ended,
/// whether it succeeded, failed or was cancelled.
pub(crate) struct ForgetOnDrop<'a> {
    pub(crate) ahead: Option<&'a ReadAhead>,
    pub(crate) first: u64,
    pub(crate) last: u64,
}

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(ra) = self.ahead {
            ra.forget(self.first, self.last);
        }
    }
}
