//! The cache over a sharded volume with a flush journal: what FLUSH and FUA write, what
//! settled and zeroed ranges do to older records, and crashes with and without the cache's
//! disk.

use std::sync::Mutex as StdMutex;

use super::*;
use crate::block::retry::SplitMix64;
use crate::layout::sharded::{ShardedOptions, ShardedVolume};
use crate::store::memory::MemoryStore;
use crate::store::{ObjectStore, StoreError};

/// Chunk size and cache block size.
const CS: u64 = 4096;
/// Sectors per block.
const SPB: u64 = CS / SECTOR;

/// A memory store that behaves like S3 (no `put_range`), remembers the keys it was asked to
/// put, and fails puts: of keys containing a given text, or at random.
#[derive(Debug)]
struct S3ish {
    inner: MemoryStore,
    puts: StdMutex<Vec<String>>,
    fail_key: StdMutex<Option<String>>,
    /// Per mille of journal record puts and of chunk puts that fail.
    fail_rates: StdMutex<(u64, u64)>,
    rng: SplitMix64,
    /// Journal record puts are stored, then reported failed (a lost answer).
    ghost: std::sync::atomic::AtomicBool,
    /// Puts of keys containing this text wait for a permit.
    gate: StdMutex<Option<(String, Arc<tokio::sync::Semaphore>)>>,
}

impl S3ish {
    fn new() -> Arc<Self> {
        Arc::new(S3ish {
            inner: MemoryStore::new(),
            puts: StdMutex::new(Vec::new()),
            fail_key: StdMutex::new(None),
            fail_rates: StdMutex::new((0, 0)),
            rng: SplitMix64::new(1),
            ghost: std::sync::atomic::AtomicBool::new(false),
            gate: StdMutex::new(None),
        })
    }

    fn take_puts(&self) -> Vec<String> {
        std::mem::take(&mut *self.puts.lock().unwrap())
    }

    fn fail_puts_of(&self, key: Option<&str>) {
        *self.fail_key.lock().unwrap() = key.map(str::to_owned);
    }

    async fn records(&self) -> Vec<String> {
        let mut k: Vec<String> = self
            .inner
            .list("")
            .await
            .unwrap()
            .into_iter()
            .filter(|k| k.ends_with(".journal"))
            .collect();
        k.sort();
        k
    }
}

#[async_trait]
impl ObjectStore for S3ish {
    async fn get(
        &self,
        key: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<Option<Bytes>, StoreError> {
        self.inner.get(key, range).await
    }

    async fn put(&self, key: &str, data: Bytes, sync: bool) -> Result<(), StoreError> {
        let fail = |why: &str| StoreError::Remote {
            op: "put",
            key: key.to_owned(),
            message: why.to_owned(),
            transient: true,
        };
        if self
            .fail_key
            .lock()
            .unwrap()
            .as_deref()
            .is_some_and(|f| key.contains(f))
        {
            return Err(fail("refused by the test"));
        }
        let (journal, chunk) = *self.fail_rates.lock().unwrap();
        let rate = if key.ends_with(".journal") {
            journal
        } else {
            chunk
        };
        if rate > 0 && self.rng.next_u64() % 1000 < rate {
            return Err(fail("random failure"));
        }
        let gate = self
            .gate
            .lock()
            .unwrap()
            .as_ref()
            .filter(|(k, _)| key.contains(k.as_str()))
            .map(|(_, g)| Arc::clone(g));
        if let Some(g) = gate {
            g.acquire().await.unwrap().forget();
        }
        self.puts.lock().unwrap().push(key.to_owned());
        self.inner.put(key, data, sync).await?;
        if key.ends_with(".journal") && self.ghost.load(Ordering::SeqCst) {
            return Err(fail("answer lost (the object was stored)"));
        }
        Ok(())
    }

    fn supports_put_range(&self) -> bool {
        false
    }

    async fn put_range(
        &self,
        key: &str,
        _offset: u64,
        _data: Bytes,
        _size: u64,
        _sync: bool,
    ) -> Result<(), StoreError> {
        Err(StoreError::BadKey(key.to_owned()))
    }

    async fn delete(&self, key: &str, sync: bool) -> Result<(), StoreError> {
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

async fn volume(store: &Arc<S3ish>, blocks: u64) -> Arc<ShardedVolume> {
    let opts = ShardedOptions {
        chunk_size: Some(CS),
        size: Some(blocks * CS),
        ..ShardedOptions::new("v")
    };
    Arc::new(
        ShardedVolume::open(Arc::clone(store) as Arc<dyn ObjectStore>, opts)
            .await
            .unwrap(),
    )
}

fn jparams(slots: u64) -> CacheParams {
    CacheParams {
        size: slots * CS,
        block_size: CS,
        max_dirty: Some(slots / 2 * CS),
        ..CacheParams::default()
    }
}

async fn cached(store: &Arc<S3ish>, dir: &Path, blocks: u64, slots: u64) -> CacheLayer {
    let v = volume(store, blocks).await;
    let c = CacheLayer::open(v, jparams(slots), dir, "v").await.unwrap();
    assert!(c.shared.journal.is_some());
    c
}

/// Waits until every dirty block is uploaded.
async fn uploaded(c: &CacheLayer, dirty_left: u64) {
    eventually("the dirty blocks are uploaded", || {
        c.dirty_bytes() == dirty_left
    })
    .await;
}

#[test]
fn a_flush_appends_one_record_and_uploads_no_chunk() {
    let dir = tmp_dir("journal-flush");
    let store = S3ish::new();
    let c = crashing(async {
        let c = cached(&store, &dir, 64, 32).await;
        c.pause_background();
        store.take_puts();
        c.write(0, pattern(1, 4096), false).await.unwrap();
        c.write(5 * CS + 512, pattern(2, 1024), false)
            .await
            .unwrap();
        c.write(9 * CS, pattern(3, CS as usize), false)
            .await
            .unwrap();
        c.flush().await.unwrap();
        // The first record also marks the volume as one with a journal.
        assert_eq!(store.take_puts(), ["v.volume", "v.1.journal"]);
        c.flush().await.unwrap();
        assert_eq!(store.take_puts(), Vec::<String>::new(), "nothing new");
        c.write(20 * CS + 100, pattern(4, 300), true).await.unwrap();
        assert_eq!(store.take_puts(), ["v.2.journal"], "FUA");
        c
    });
    // Killed, and the cache's disk lost: only the store is left.
    drop(c);
    drop(dir);
    crashing(async {
        let v = volume(&store, 64).await;
        assert_eq!(read(&*v, 0, 4096).await, pattern(1, 4096));
        assert_eq!(read(&*v, 5 * CS + 512, 1024).await, pattern(2, 1024));
        assert_eq!(read(&*v, 9 * CS, CS as u32).await, pattern(3, CS as usize));
        assert_eq!(read(&*v, 20 * CS + 100, 300).await, pattern(4, 300));
        assert_eq!(read(&*v, 20 * CS, 100).await, vec![0; 100]);
        assert_eq!(store.records().await, Vec::<String>::new());
    });
}

#[test]
fn a_block_uploaded_after_a_record_is_settled_by_the_next_flush() {
    let dir = tmp_dir("journal-settled");
    let store = S3ish::new();
    let c = crashing(async {
        let c = cached(&store, &dir, 16, 8).await;
        // Block 1 cannot be uploaded: record 1 stays needed.
        store.fail_puts_of(Some("v.1.chunk"));
        c.write(0, pattern(1, CS as usize), false).await.unwrap();
        c.write(CS, pattern(2, CS as usize), false).await.unwrap();
        c.flush().await.unwrap();
        c.write(0, pattern(3, 1024), false).await.unwrap();
        uploaded(&c, CS).await;
        store.take_puts();
        // Nothing was written since block 0 was uploaded, and yet the flush must tell the
        // journal: record 1's old data for block 0 would come back otherwise.
        c.flush().await.unwrap();
        assert_eq!(store.take_puts(), ["v.2.journal"]);
        c
    });
    drop(c);
    drop(dir);
    store.fail_puts_of(None);
    crashing(async {
        let v = volume(&store, 16).await;
        let mut b0 = pattern(1, CS as usize).to_vec();
        b0[..1024].copy_from_slice(&pattern(3, 1024));
        assert_eq!(read(&*v, 0, CS as u32).await, b0);
        assert_eq!(read(&*v, CS, CS as u32).await, pattern(2, CS as usize));
    });
}

#[test]
fn a_trim_after_a_record_is_journaled_so_that_older_data_cannot_come_back() {
    let dir = tmp_dir("journal-trim");
    let store = S3ish::new();
    let c = crashing(async {
        let c = cached(&store, &dir, 16, 8).await;
        c.pause_background();
        c.write(0, pattern(1, 2 * CS as usize), false)
            .await
            .unwrap();
        c.write(5 * CS, pattern(2, CS as usize), false)
            .await
            .unwrap();
        c.flush().await.unwrap();
        // Block 0 whole and half of block 1, passed down (block 1 is cached: zeroed there).
        c.trim(0, CS + CS / 2, false).await.unwrap();
        c.flush().await.unwrap();
        c
    });
    drop(c);
    drop(dir);
    crashing(async {
        let v = volume(&store, 16).await;
        let mut want = vec![0u8; 2 * CS as usize];
        want[(CS + CS / 2) as usize..]
            .copy_from_slice(&pattern(1, 2 * CS as usize)[(CS + CS / 2) as usize..]);
        assert_eq!(read(&*v, 0, 2 * CS as u32).await, want);
        assert_eq!(read(&*v, 5 * CS, CS as u32).await, pattern(2, CS as usize));
    });
}

#[test]
fn a_zero_range_before_an_upload_does_not_undo_it() {
    let dir = tmp_dir("journal-zero-then-upload");
    let store = S3ish::new();
    let c = crashing(async {
        let c = cached(&store, &dir, 16, 8).await;
        // Block 5 cannot be uploaded: record 1 stays needed, so later records mask it.
        store.fail_puts_of(Some("v.5.chunk"));
        c.write(5 * CS, pattern(1, 4096), false).await.unwrap();
        c.flush().await.unwrap();
        // Block 2, not cached, is zeroed below; then written and uploaded.
        c.trim(2 * CS, CS, false).await.unwrap();
        c.write(2 * CS, pattern(2, CS as usize), false)
            .await
            .unwrap();
        uploaded(&c, CS).await;
        c.flush().await.unwrap();
        c
    });
    drop(c);
    drop(dir);
    store.fail_puts_of(None);
    crashing(async {
        let v = volume(&store, 16).await;
        assert_eq!(read(&*v, 2 * CS, CS as u32).await, pattern(2, CS as usize));
        assert_eq!(read(&*v, 5 * CS, 4096).await, pattern(1, 4096));
    });
}

#[test]
fn dirty_blocks_replayed_after_a_restart_are_in_the_next_record() {
    let dir = tmp_dir("journal-replayed");
    let store = S3ish::new();
    let c = crashing(async {
        let c = cached(&store, &dir, 16, 8).await;
        c.pause_background();
        c.write(3 * CS, pattern(1, CS as usize), false)
            .await
            .unwrap();
        c.flush().await.unwrap();
        c.write(3 * CS, pattern(2, CS as usize), false)
            .await
            .unwrap();
        // The index records block 3 dirty, as it would within a second.
        c.sync_index().await.unwrap();
        c
    });
    // Killed; the cache's disk is kept and replays block 3, which a FLUSH then covers.
    drop(c);
    let c = crashing(async {
        // Paused from the start: an upload of the replayed block would race the FLUSH.
        let c = CacheLayer::open_paused(volume(&store, 16).await, jparams(8), &dir, "v")
            .await
            .unwrap();
        assert_eq!(read(&c, 3 * CS, CS as u32).await, pattern(2, CS as usize));
        store.take_puts();
        c.flush().await.unwrap();
        assert_eq!(store.take_puts(), ["v.3.journal"]);
        c
    });
    // Killed again, and now the cache's disk is lost.
    drop(c);
    drop(dir);
    crashing(async {
        let v = volume(&store, 16).await;
        assert_eq!(read(&*v, 3 * CS, CS as u32).await, pattern(2, CS as usize));
    });
}

#[test]
fn a_record_stored_by_an_append_that_failed_is_replaced_by_the_close() {
    let dir = tmp_dir("journal-ghost");
    let store = S3ish::new();
    crashing(async {
        let c = cached(&store, &dir, 16, 8).await;
        c.pause_background();
        c.write(0, pattern(1, CS as usize), false).await.unwrap();
        // The record lands, but the answer is lost: the FLUSH fails.
        store.ghost.store(true, Ordering::SeqCst);
        assert!(c.flush().await.is_err());
        store.ghost.store(false, Ordering::SeqCst);
        // Never flushed by the client, but uploaded by the clean close.
        c.write(0, pattern(2, CS as usize), false).await.unwrap();
        c.close().await.unwrap();
        assert_eq!(store.records().await, Vec::<String>::new());
    });
    crashing(async {
        let v = volume(&store, 16).await;
        assert_eq!(read(&*v, 0, CS as u32).await, pattern(2, CS as usize));
    });
}

#[test]
fn a_write_racing_a_trim_of_its_block_is_recorded_after_the_zero_range() {
    let dir = tmp_dir("journal-race");
    let store = S3ish::new();
    let c = crashing(async {
        // Block 2 exists below and is not cached.
        let v = volume(&store, 16).await;
        v.write(2 * CS, pattern(1, CS as usize), false)
            .await
            .unwrap();
        let c = Arc::new(CacheLayer::open(v, jparams(8), &dir, "v").await.unwrap());
        c.pause_background();
        // Block 5 keeps record 1 needed, so later records mask it.
        c.write(5 * CS, pattern(9, 4096), false).await.unwrap();
        c.flush().await.unwrap();
        // The TRIM of half of block 2 is passed down, and held there ...
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        *store.gate.lock().unwrap() = Some(("v.2.chunk".to_owned(), Arc::clone(&gate)));
        let trim = {
            let c = Arc::clone(&c);
            tokio::spawn(async move { c.trim(2 * CS, CS / 2, false).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        // ... while a write to the same range lands in the cache and a FLUSH records it.
        c.write(2 * CS, pattern(2, 1024), false).await.unwrap();
        c.flush().await.unwrap();
        gate.add_permits(1);
        trim.await.unwrap().unwrap();
        *store.gate.lock().unwrap() = None;
        c.flush().await.unwrap();
        let served = read(&*c, 2 * CS, CS as u32).await;
        (c, served)
    });
    let (c, served) = c;
    drop(c);
    drop(dir);
    crashing(async {
        let v = volume(&store, 16).await;
        assert_eq!(read(&*v, 2 * CS, CS as u32).await, served);
    });
}

#[test]
fn a_failed_append_fails_the_flush_and_the_next_one_writes_it_all() {
    let dir = tmp_dir("journal-fail");
    let store = S3ish::new();
    let c = crashing(async {
        let c = cached(&store, &dir, 16, 8).await;
        c.pause_background();
        c.write(0, pattern(1, 4096), false).await.unwrap();
        store.fail_puts_of(Some(".journal"));
        let e = c.flush().await.unwrap_err();
        assert_eq!(e.nbd_errno(), crate::block::errno::EIO);
        assert!(e.to_string().contains("v.1.journal"), "{e}");
        c.write(CS, pattern(2, 4096), false).await.unwrap();
        store.fail_puts_of(None);
        c.flush().await.unwrap();
        c
    });
    drop(c);
    drop(dir);
    crashing(async {
        let v = volume(&store, 16).await;
        assert_eq!(read(&*v, 0, 4096).await, pattern(1, 4096));
        assert_eq!(read(&*v, CS, 4096).await, pattern(2, 4096));
    });
}

#[test]
fn uploads_let_records_go_and_a_close_leaves_none() {
    let dir = tmp_dir("journal-gc");
    let store = S3ish::new();
    crashing(async {
        let c = cached(&store, &dir, 16, 8).await;
        c.write(0, pattern(1, 4096), false).await.unwrap();
        c.flush().await.unwrap();
        assert_eq!(store.records().await, ["v.1.journal"]);
        uploaded(&c, 0).await;
        // No FLUSH comes: the index syncer writes the record that lets record 1 go.
        for _ in 0..500 {
            if store.records().await == ["v.2.journal"] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(store.records().await, ["v.2.journal"]);
        // It needs nothing, so it is not rewritten while nothing changes.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(store.records().await, ["v.2.journal"]);
        c.write(CS, pattern(2, 4096), false).await.unwrap();
        c.flush().await.unwrap();
        c.close().await.unwrap();
        assert_eq!(store.records().await, Vec::<String>::new());
    });
    crashing(async {
        let v = volume(&store, 16).await;
        assert_eq!(read(&*v, 0, 4096).await, pattern(1, 4096));
        assert_eq!(read(&*v, CS, 4096).await, pattern(2, 4096));
    });
}

/// Sector `s` written by operation `id`: 8-byte words of the id and the sector number, so that
/// a sector written to the wrong place, or half-written, is noticed.
fn sector_bytes(id: u32, s: u64) -> [u8; SECTOR as usize] {
    let mut b = [0u8; SECTOR as usize];
    if id != 0 {
        let word = (u64::from(id) << 32 | s).to_le_bytes();
        for w in b.chunks_exact_mut(8) {
            w.copy_from_slice(&word);
        }
    }
    b
}

/// The id a sector holds (0: zeroes), or `None` if it holds anything else.
fn sector_id(b: &[u8], s: u64) -> Option<u32> {
    if b.iter().all(|&x| x == 0) {
        return Some(0);
    }
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    let id = (u64::from_le_bytes(w) >> 32) as u32;
    (b == sector_bytes(id, s)).then_some(id)
}

/// What a sector may hold after a crash: what the last successful FLUSH (or FUA) saw, or
/// anything written since.
#[derive(Clone, Default)]
struct Model {
    durable: u32,
    current: u32,
    since: Vec<u32>,
}

fn check_sectors(what: &str, seed: u64, data: &[u8], model: &[Model]) {
    for (s, m) in model.iter().enumerate() {
        let s = s as u64;
        let at = (s * SECTOR) as usize;
        let got = sector_id(&data[at..at + SECTOR as usize], s);
        let ok = got.is_some_and(|g| g == m.durable || m.since.contains(&g));
        assert!(
            ok,
            "{what} (seed {seed}): sector {s} holds {got:?}, but only {} (flushed) or {:?} (since) \
             may be there",
            m.durable, m.since
        );
    }
}

/// Random writes, FUA writes, trims and flushes through the cache while uploads run (and one
/// in ten fails, as do one in five record appends), then a crash; reopened with the cache's
/// disk (its dirty blocks replayed) or without it (only the store), every sector must hold
/// what the last FLUSH or FUA made durable, or something written since.
#[test]
fn random_changes_survive_a_crash_with_or_without_the_cache_disk() {
    const BLOCKS: u64 = 48;
    let seeds: Vec<u64> = match std::env::var("NBD_RS_JOURNAL_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => (0..4).map(|_| SplitMix64::entropy_seed()).collect(),
    };
    for seed in seeds {
        for keep_disk in [true, false] {
            eprintln!("journal model: seed {seed}, cache disk kept: {keep_disk}");
            let dir = tmp_dir(&format!("journal-model-{keep_disk}"));
            let store = S3ish::new();
            let rng = SplitMix64::new(seed);
            let sectors = (BLOCKS * SPB) as usize;
            let mut model = vec![Model::default(); sectors];
            let c = crashing(async {
                let c = cached(&store, &dir, BLOCKS, 24).await;
                *store.fail_rates.lock().unwrap() = (200, 100);
                let ops = 60 + rng.next_u64() % 200;
                for op in 1..=ops as u32 {
                    let roll = rng.next_u64() % 100;
                    let first = rng.next_u64() % (BLOCKS * SPB);
                    let count = (1 + rng.next_u64() % (3 * SPB)).min(BLOCKS * SPB - first);
                    match roll {
                        0..=69 => {
                            let fua = roll < 10;
                            let mut buf = Vec::with_capacity((count * SECTOR) as usize);
                            for s in first..first + count {
                                buf.extend_from_slice(&sector_bytes(op, s));
                            }
                            let r = c.write(first * SECTOR, Bytes::from(buf), fua).await;
                            // A FUA write whose record could not be appended is in the cache,
                            // not durable.
                            let durable = match r {
                                Ok(()) => fua,
                                Err(e) if fua => {
                                    assert!(e.to_string().contains("random failure"), "{e}");
                                    false
                                }
                                Err(e) => panic!("write: {e}"),
                            };
                            for s in first..first + count {
                                let m = &mut model[s as usize];
                                m.current = op;
                                if durable {
                                    m.durable = op;
                                    m.since.clear();
                                } else {
                                    m.since.push(op);
                                }
                            }
                        }
                        70..=79 => {
                            // Sometimes whole blocks, which are passed down.
                            let (first, count) = if roll < 75 {
                                let b = first / SPB;
                                (b * SPB, (count / SPB).max(1).min(BLOCKS - b) * SPB)
                            } else {
                                (first, count)
                            };
                            // A trim that fails may have happened in part: do it until it
                            // succeeds.
                            while c.trim(first * SECTOR, count * SECTOR, false).await.is_err() {}
                            for s in first..first + count {
                                let m = &mut model[s as usize];
                                m.current = 0;
                                m.since.push(0);
                            }
                        }
                        _ => {
                            if c.flush().await.is_ok() {
                                for m in &mut model {
                                    m.durable = m.current;
                                    m.since.clear();
                                }
                            }
                        }
                    }
                }
                c
            });
            drop(c);
            *store.fail_rates.lock().unwrap() = (0, 0);
            let total = (BLOCKS * CS) as u32;
            if keep_disk {
                crashing(async {
                    let v = volume(&store, BLOCKS).await;
                    let c = CacheLayer::open(v, jparams(24), &dir, "v").await.unwrap();
                    let served = read(&c, 0, total).await;
                    check_sectors("through the replayed cache", seed, &served, &model);
                    c.close().await.unwrap();
                    let v = volume(&store, BLOCKS).await;
                    assert_eq!(read(&*v, 0, total).await, served, "seed {seed}");
                });
            } else {
                drop(dir);
                crashing(async {
                    let v = volume(&store, BLOCKS).await;
                    let data = read(&*v, 0, total).await;
                    check_sectors("from the store alone", seed, &data, &model);
                });
            }
        }
    }
}
