//! Group commit for syncs that make durable everything done before they began.
//!
//! An `fdatasync` that is already running may have passed the pages of a write that finished
//! after it began, so a FLUSH that arrives meanwhile cannot count on it; but any sync that
//! begins after the FLUSH arrived covers everything the FLUSH must make durable. When many
//! FLUSHes (or FUA writes) queue behind a running sync, the first to get the lock syncs for
//! all of them: one sync instead of one each. This is how a journaling file system commits.
//!
//! A failed `fdatasync` may have dropped the pages it could not write and marked them clean
//! (Linux does), so a later sync that succeeds proves nothing about them. A group made with
//! [`SyncGroup::sticky`] therefore fails every sync after the first that failed, as qemu does
//! for its image files; only requests that an earlier, successful sync covered still succeed.
//!
//! Requests on the async side ([`SyncGroup::sync_async`]) wait for the running sync without a
//! thread: only the one chosen to run the next sync takes a thread of the blocking pool. A
//! client that sends a FLUSH every few writes (fio's `--fsync` at depth 32 sends one for
//! every ten) would otherwise park a pool thread per FLUSH on the lock, and wake them one at a
//! time when the sync ends.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Syncs of one file (or one set of files), one at a time, shared by those that queue.
#[derive(Debug, Default)]
pub struct SyncGroup {
    /// Held while a sync runs.
    lock: Mutex<()>,
    /// Numbers taken by syncs, whether they ran, failed or had nothing to do.
    started: AtomicU64,
    /// The number of the last sync that succeeded.
    done: AtomicU64,
    /// Someone holds `lock` to sync, or was chosen to take it (`sync_async`): async callers
    /// wait for it to be cleared.
    busy: AtomicBool,
    /// Notified when `busy` is cleared.
    idle: Notify,
    /// Every sync after a failed one fails.
    sticky: bool,
    /// A sync failed (only set when `sticky`).
    failed: AtomicBool,
    /// Tests: callers that asked for the lock.
    #[cfg(test)]
    waiters: std::sync::atomic::AtomicUsize,
    /// Tests: callers that took it (`hold` aside).
    #[cfg(test)]
    locked: std::sync::atomic::AtomicUsize,
}

impl SyncGroup {
    /// A group in which a failed sync makes every later one fail (see the module documentation).
    pub fn sticky() -> Self {
        SyncGroup {
            sticky: true,
            ..SyncGroup::default()
        }
    }

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
        self.sync_now(ticket, sync)
    }

    /// `sync` from the async side: waits for the sync under way without holding a thread, and
    /// runs `sync` on the blocking pool only if it is chosen to run the next one (the first
    /// to find the group idle) and no sync begun after `ticket` has succeeded by then.
    pub async fn sync_async<F>(self: &Arc<Self>, ticket: u64, sync: F) -> io::Result<()>
    where
        F: FnOnce() -> io::Result<bool> + Send + 'static,
    {
        #[cfg(test)]
        self.waiters.fetch_add(1, Ordering::SeqCst);
        loop {
            // Registered before `busy` is read, so that clearing it cannot be missed.
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.done.load(Ordering::SeqCst) > ticket {
                return Ok(());
            }
            if self.failed.load(Ordering::SeqCst) {
                return Err(failed_before());
            }
            if self
                .busy
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                // The job clears `busy` when it ends, even if this caller is gone by then.
                let group = Arc::clone(self);
                return tokio::task::spawn_blocking(move || group.sync_now(ticket, sync))
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
            }
            idle.await;
        }
    }

    /// `sync`, not counted as a caller (tests).
    fn sync_now(&self, ticket: u64, sync: impl FnOnce() -> io::Result<bool>) -> io::Result<()> {
        let _one = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        #[cfg(test)]
        self.locked.fetch_add(1, Ordering::SeqCst);
        // Dropped before `_one`: idle again when the lock is given up.
        let _busy = Busy::set(self);
        if self.done.load(Ordering::SeqCst) > ticket {
            return Ok(());
        }
        if self.failed.load(Ordering::SeqCst) {
            return Err(failed_before());
        }
        let number = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        match sync() {
            Ok(true) => self.done.store(number, Ordering::SeqCst),
            Ok(false) => {}
            Err(e) => {
                if self.sticky {
                    self.failed.store(true, Ordering::SeqCst);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Tests: holds the lock as a running sync would.
    #[cfg(test)]
    pub fn hold(&self) -> Held<'_> {
        let lock = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        Held {
            _busy: Busy::set(self),
            _lock: lock,
        }
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

    /// Tests: callers that took the lock so far (`hold` aside).
    #[cfg(test)]
    pub fn locked(&self) -> usize {
        self.locked.load(Ordering::SeqCst)
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

/// The error of every sync after a failed one in a sticky group.
fn failed_before() -> io::Error {
    io::Error::other(
        "an earlier sync of this file failed, and the kernel may have dropped what it \
         could not write: nothing more can be made durable until the file is opened again",
    )
}

/// `busy` set for as long as it lives; clearing it wakes the async callers.
struct Busy<'a>(&'a SyncGroup);

impl<'a> Busy<'a> {
    fn set(group: &'a SyncGroup) -> Self {
        group.busy.store(true, Ordering::SeqCst);
        Busy(group)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::SeqCst);
        self.0.idle.notify_waiters();
    }
}

/// Tests: the lock, held as a running sync holds it (see [`SyncGroup::hold`]).
#[cfg(test)]
pub struct Held<'a> {
    // Fields drop in order: idle again, then unlocked.
    _busy: Busy<'a>,
    _lock: std::sync::MutexGuard<'a, ()>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sync that only counts its runs.
    fn counted(ran: &AtomicU64) -> impl FnOnce() -> io::Result<bool> + '_ {
        || {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok(true)
        }
    }

    /// `n` callers of `g` on threads of their own, each with the ticket of when it was started,
    /// counting the syncs they run in `ran`.
    fn blocking_callers(
        g: &Arc<SyncGroup>,
        ran: &Arc<AtomicU64>,
        n: usize,
    ) -> Vec<std::thread::JoinHandle<io::Result<()>>> {
        (0..n)
            .map(|_| {
                let (g, ran) = (Arc::clone(g), Arc::clone(ran));
                let ticket = g.ticket();
                std::thread::spawn(move || g.sync(ticket, counted(&ran)))
            })
            .collect()
    }

    #[test]
    fn callers_queued_behind_a_sync_share_the_next_one() {
        let g = Arc::new(SyncGroup::default());
        let ran = Arc::new(AtomicU64::new(0));
        let held = g.hold();
        let callers = blocking_callers(&g, &ran, 6);
        g.until_waiting(6);
        drop(held);
        for c in callers {
            c.join().unwrap().unwrap();
        }
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_request_that_arrives_while_a_sync_runs_waits_for_the_next() {
        let g = Arc::new(SyncGroup::default());
        let (running_tx, running) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let first = {
            let g = Arc::clone(&g);
            let ticket = g.ticket();
            std::thread::spawn(move || {
                g.sync(ticket, || {
                    running_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                    Ok(true)
                })
            })
        };
        running.recv().unwrap();
        // The running sync may have passed this request's writes already.
        let late = g.ticket();
        go.send(()).unwrap();
        first.join().unwrap().unwrap();
        let ran = AtomicU64::new(0);
        g.sync(late, counted(&ran)).unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn after_a_failed_sync_a_sticky_group_syncs_nothing_more() {
        let g = SyncGroup::sticky();
        let covered = g.ticket();
        g.sync(covered, || Ok(true)).unwrap();
        let ticket = g.ticket();
        let e = g
            .sync(ticket, || Err(io::Error::other("disk gone")))
            .unwrap_err();
        assert_eq!(e.to_string(), "disk gone");
        let ran = AtomicU64::new(0);
        let e = g.sync(g.ticket(), counted(&ran)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "an earlier sync of this file failed, and the kernel may have dropped what it could \
             not write: nothing more can be made durable until the file is opened again"
        );
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        // A request the good sync covered is still answered as it was.
        g.sync(covered, || Ok(true)).unwrap();
    }

    #[test]
    fn a_sync_begun_before_the_ticket_does_not_count() {
        let g = SyncGroup::default();
        let ran = AtomicU64::new(0);
        let early = g.ticket();
        g.sync(early, counted(&ran)).unwrap();
        // Taken after that sync began: it needs one of its own.
        let late = g.ticket();
        g.sync(late, counted(&ran)).unwrap();
        // Taken before the second began: covered.
        g.sync(early + 1, counted(&ran)).unwrap();
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
        g.sync(ticket, counted(&ran)).unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    /// `n` async callers of `g`, each with the ticket of when it was started, counting the
    /// syncs they run in `ran`.
    fn async_callers(
        g: &Arc<SyncGroup>,
        ran: &Arc<AtomicU64>,
        n: usize,
    ) -> Vec<tokio::task::JoinHandle<io::Result<()>>> {
        (0..n)
            .map(|_| {
                let (g, ran) = (Arc::clone(g), Arc::clone(ran));
                let ticket = g.ticket();
                tokio::spawn(async move {
                    g.sync_async(ticket, move || {
                        ran.fetch_add(1, Ordering::SeqCst);
                        Ok(true)
                    })
                    .await
                })
            })
            .collect()
    }

    /// Awaits `f`, failing the test after 5 s rather than hanging it.
    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(5), f)
            .await
            .expect("not done within 5 s")
    }

    #[test]
    fn async_callers_wait_without_a_thread_and_one_syncs_for_all() {
        // One pool thread: callers parked on it would keep the probe below from running.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(1)
            .enable_time()
            .build()
            .unwrap();
        let g = Arc::new(SyncGroup::default());
        let ran = Arc::new(AtomicU64::new(0));
        let held = g.hold();
        let callers = rt.block_on(async { async_callers(&g, &ran, 6) });
        g.until_waiting(6);
        // Its thread is free for other work meanwhile.
        rt.block_on(async { within(tokio::task::spawn_blocking(|| ())).await })
            .unwrap();
        drop(held);
        rt.block_on(async {
            for c in callers {
                within(c).await.unwrap().unwrap();
            }
        });
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        // Only the one that synced took the lock.
        assert_eq!(g.locked(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn async_and_blocking_callers_share_a_sync() {
        let g = Arc::new(SyncGroup::default());
        let ran = Arc::new(AtomicU64::new(0));
        let held = g.hold();
        let callers = async_callers(&g, &ran, 3);
        let blocking = blocking_callers(&g, &ran, 3);
        g.until_waiting(6);
        drop(held);
        for c in callers {
            within(c).await.unwrap().unwrap();
        }
        for b in blocking {
            b.join().unwrap().unwrap();
        }
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sync_whose_caller_is_gone_still_ends_and_lets_the_next_run() {
        let g = Arc::new(SyncGroup::default());
        let (running_tx, running) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let first = {
            let g = Arc::clone(&g);
            let ticket = g.ticket();
            tokio::spawn(async move {
                g.sync_async(ticket, move || {
                    running_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                    Ok(true)
                })
                .await
            })
        };
        tokio::task::spawn_blocking(move || running.recv().unwrap())
            .await
            .unwrap();
        // The client went away; its sync goes on.
        first.abort();
        assert!(within(first).await.unwrap_err().is_cancelled());
        let ran = Arc::new(AtomicU64::new(0));
        let late = async_callers(&g, &ran, 1);
        go.send(()).unwrap();
        for c in late {
            within(c).await.unwrap().unwrap();
        }
        // The late caller's writes may have been passed by the first sync: it ran its own.
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        assert_eq!(g.started(), 2);
    }

    #[tokio::test]
    async fn after_a_failed_sync_async_callers_fail_without_the_lock() {
        let g = Arc::new(SyncGroup::sticky());
        let e = g
            .sync_async(g.ticket(), || Err(io::Error::other("disk gone")))
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "disk gone");
        let locked = g.locked();
        let ran = Arc::new(AtomicU64::new(0));
        for c in async_callers(&g, &ran, 2) {
            let e = within(c).await.unwrap().unwrap_err();
            assert_eq!(
                e.to_string(),
                "an earlier sync of this file failed, and the kernel may have dropped what it \
                 could not write: nothing more can be made durable until the file is opened again"
            );
        }
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        assert_eq!(g.locked(), locked);
    }
}
