//! Group commit for syncs that make durable everything done before they began.
//!
//! An `fdatasync` that is already running may have passed the pages of a write that finished
//! after it began, so a FLUSH that arrives meanwhile cannot count on it; but any sync that
//! begins after the FLUSH arrived covers everything the FLUSH must make durable. When many
//! FLUSHes (or FUA writes) queue behind a running sync, the first to get the lock syncs for
//! all of them: one sync instead of one each. This is how a journaling file system commits.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Syncs of one file (or one set of files), one at a time, shared by those that queue.
#[derive(Debug, Default)]
pub struct SyncGroup {
    /// Held while a sync runs.
    lock: Mutex<()>,
    /// Syncs begun.
    started: AtomicU64,
    /// The number of the last sync that succeeded.
    done: AtomicU64,
    /// Tests: callers that asked for the lock.
    #[cfg(test)]
    waiters: std::sync::atomic::AtomicUsize,
}

impl SyncGroup {
    /// Taken when a request that needs a sync arrives, after the writes it must make durable
    /// finished: a sync begun later covers them.
    pub fn ticket(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }

    /// Blocks until the sync under way, if any, is over; then returns at once if a sync begun
    /// after `ticket` was taken has succeeded, and runs `sync` otherwise. `sync` returns
    /// whether it synced: `Ok(false)` (nothing to do, for a caller that may skip) is not
    /// counted as a sync for the others.
    pub fn sync(&self, ticket: u64, sync: impl FnOnce() -> io::Result<bool>) -> io::Result<()> {
        #[cfg(test)]
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let _one = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.done.load(Ordering::SeqCst) > ticket {
            return Ok(());
        }
        let number = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        if sync()? {
            self.done.store(number, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Tests: holds the lock as a running sync would.
    #[cfg(test)]
    pub fn hold(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tests: syncs begun so far.
    #[cfg(test)]
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }

    /// Tests: callers that asked for the lock so far.
    #[cfg(test)]
    pub fn waiters(&self) -> usize {
        self.waiters.load(Ordering::SeqCst)
    }

    /// Tests: waits (up to 5 s, blocking the thread) until `n` callers asked for the lock.
    #[cfg(test)]
    pub fn until_waiting(&self, n: usize) {
        for _ in 0..500 {
            if self.waiters() >= n {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("only {} of {n} callers reached the sync", self.waiters());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn callers_queued_behind_a_sync_share_the_next_one() {
        let g = Arc::new(SyncGroup::default());
        let ran = Arc::new(AtomicU64::new(0));
        let held = g.hold();
        let callers: Vec<_> = (0..6)
            .map(|_| {
                let (g, ran) = (Arc::clone(&g), Arc::clone(&ran));
                let ticket = g.ticket();
                std::thread::spawn(move || {
                    g.sync(ticket, || {
                        ran.fetch_add(1, Ordering::SeqCst);
                        Ok(true)
                    })
                })
            })
            .collect();
        g.until_waiting(6);
        drop(held);
        for c in callers {
            c.join().unwrap().unwrap();
        }
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_sync_begun_before_the_ticket_does_not_count() {
        let g = SyncGroup::default();
        let ran = AtomicU64::new(0);
        let count = || {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok(true)
        };
        let early = g.ticket();
        g.sync(early, count).unwrap();
        // Taken after that sync began: it needs one of its own.
        let late = g.ticket();
        g.sync(late, count).unwrap();
        // Taken before the second began: covered.
        g.sync(early + 1, count).unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_failed_or_skipped_sync_covers_nobody() {
        let g = SyncGroup::default();
        let ticket = g.ticket();
        let e = g
            .sync(ticket, || Err(io::Error::other("disk gone")))
            .unwrap_err();
        assert_eq!(e.to_string(), "disk gone");
        g.sync(ticket, || Ok(false)).unwrap();
        let ran = AtomicU64::new(0);
        g.sync(ticket, || {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok(true)
        })
        .unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }
}
