//! `file`: an object store in a local directory, one file per object (key `a/b` is `DIR/a/b`).
//!
//! `put` writes a temporary file next to the object and renames it over the object, so a
//! reader sees the old object or the new one, never a mix. `put_range` writes in place with
//! positioned writes into a sparse file of the object's full size. Parent directories are
//! created on demand and left in place when their objects are deleted.
//!
//! Durability: with `sync = true` the file's data is `fdatasync`ed, and when a directory entry
//! was created, renamed or removed, the directories from the object's up to the store's root
//! are `fsync`ed. With `sync = false` the file and those directories are remembered as dirty
//! and `flush` syncs them (files first, then directories). Until then a crash may leave the
//! old object, the new one, or (with `put`, on some file systems) an empty file.
//!
//! Temporary files are named `.tmp·{uuid}`: the `·` (U+00B7) can never appear in a key, so
//! `list` can tell them apart from objects with certainty. A crash may leave one behind; it is
//! never listed and may be removed by hand. Because objects are files, a key cannot be both an
//! object and a "directory" of other objects (`a` and `a/b`): the second `put` fails. Only
//! regular files are objects; symbolic links and other files in the tree are ignored.
//!
//! Every blocking system call runs on tokio's blocking pool.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ObjectStore, StoreError, check_key};

/// Marks temporary files; not a printable ASCII character, so never part of a key.
const TMP_PREFIX: &str = ".tmp\u{b7}";

/// Checks a `list` prefix: the empty prefix (every key) or the beginning of some valid key.
///
/// Every complete component (one followed by `/`) must be a valid key component; the last,
/// possibly partial, component may be anything printable.
pub(crate) fn check_prefix(prefix: &str) -> Result<(), StoreError> {
    if prefix.is_empty() {
        return Ok(());
    }
    let mut parts: Vec<&str> = prefix.split('/').collect();
    parts.pop();
    let ok = prefix.len() <= 1024
        && !prefix.starts_with('/')
        && parts
            .iter()
            .all(|c| !c.is_empty() && *c != "." && *c != "..")
        && prefix.bytes().all(|b| (0x20..0x7f).contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadKey(prefix.to_owned()))
    }
}

/// Checks a range read against an object's size and returns it as buffer indices.
pub(crate) fn check_range(
    key: &str,
    range: &Range<u64>,
    size: u64,
) -> Result<(usize, usize), StoreError> {
    let out_of_range = || StoreError::OutOfRange {
        key: key.to_owned(),
        start: range.start,
        end: range.end,
        size,
    };
    if range.start > range.end || range.end > size {
        return Err(out_of_range());
    }
    let start = usize::try_from(range.start).map_err(|_| out_of_range())?;
    let end = usize::try_from(range.end).map_err(|_| out_of_range())?;
    Ok((start, end))
}

/// Why a store directory could not be opened. Each message names the path.
#[derive(Debug, thiserror::Error)]
pub enum FileStoreError {
    /// The directory does not exist and was not to be created.
    #[error("store directory {0} does not exist")]
    Missing(PathBuf),
    /// The path exists but is not a directory.
    #[error("store path {0} is not a directory")]
    NotADirectory(PathBuf),
    /// The system refused.
    #[error("cannot open store directory {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

/// An object store in a directory.
pub struct FileStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    dirty: Mutex<Dirty>,
    /// One flush at a time: a flush that began while another was syncing what it took must
    /// wait for it, or it would find nothing dirty and return before those files are durable.
    flushing: Mutex<()>,
}

/// What `flush` must sync: files written and directories changed with `sync = false`.
#[derive(Default)]
struct Dirty {
    files: HashSet<PathBuf>,
    dirs: HashSet<PathBuf>,
}

impl Dirty {
    fn is_empty(&self) -> bool {
        self.files.is_empty() && self.dirs.is_empty()
    }
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore")
            .field("dir", &self.inner.root)
            .finish_non_exhaustive()
    }
}

/// True if the error means "no such object": the file or one of its parents is missing, or a
/// parent is a file.
fn is_missing(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// Creates `dir` and its missing parents. Returns the directories that gained an entry.
fn create_dirs(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut p = dir;
    loop {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => return Err(io::Error::from(io::ErrorKind::NotADirectory)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing.push(p);
                match p.parent() {
                    Some(q) => p = q,
                    None => break,
                }
            }
            Err(e) => return Err(e),
        }
    }
    let mut changed = Vec::new();
    for d in missing.iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => changed.extend(d.parent().map(Path::to_owned)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(changed)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl FileStore {
    /// Opens the store in `dir`. The directory must exist unless `create` is set, in which case
    /// it is created with its parents.
    pub fn open(dir: &Path, create: bool) -> Result<Self, FileStoreError> {
        let io_err = |source| FileStoreError::Io {
            path: dir.to_owned(),
            source,
        };
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(FileStoreError::NotADirectory(dir.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !create {
                    return Err(FileStoreError::Missing(dir.to_owned()));
                }
                for changed in create_dirs(dir).map_err(io_err)? {
                    sync_dir(&changed).map_err(io_err)?;
                }
            }
            Err(e) => return Err(io_err(e)),
        }
        Ok(FileStore {
            inner: Arc::new(Inner {
                root: dir.to_owned(),
                dirty: Mutex::new(Dirty::default()),
                flushing: Mutex::new(()),
            }),
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.root
    }

    /// Runs `f` on the blocking pool with the store and an owned copy of `key`.
    async fn blocking<T, F>(&self, op: &'static str, key: &str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner, &str) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let k = key.to_owned();
        match tokio::task::spawn_blocking(move || f(&inner, &k)).await {
            Ok(r) => r,
            Err(join) => Err(StoreError::io(op, key, io::Error::other(join.to_string()))),
        }
    }
}

impl Inner {
    fn path(&self, key: &str) -> PathBuf {
        // `check_key` guarantees a relative path without `.` or `..` components.
        self.root.join(key)
    }

    fn dirty(&self) -> MutexGuard<'_, Dirty> {
        // A poisoned lock means a panic while inserting a path; the sets are still sound.
        self.dirty.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The directories from `dir` up to the root: all must be synced for a new entry in `dir`
    /// to survive a crash (any of them may have been created just before, by another call).
    fn chain(&self, dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut d = Some(dir);
        while let Some(p) = d {
            out.push(p.to_owned());
            if p == self.root {
                break;
            }
            d = p.parent();
        }
        out
    }

    /// After a change: syncs now (`sync`), or remembers what `flush` must sync. `file` is the
    /// object's file if its data changed, `dirs` the directories whose entries changed.
    fn settle(
        &self,
        file: Option<(&File, PathBuf)>,
        dirs: Vec<PathBuf>,
        sync: bool,
    ) -> io::Result<()> {
        if sync {
            if let Some((f, _)) = file {
                f.sync_data()?;
            }
            for d in &dirs {
                sync_dir(d)?;
            }
        } else {
            let mut dirty = self.dirty();
            if let Some((_, p)) = file {
                dirty.files.insert(p);
            }
            dirty.dirs.extend(dirs);
        }
        Ok(())
    }

    fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Option<Bytes>, StoreError> {
        let io_err = |e| StoreError::io("get", key, e);
        let mut f = match File::open(self.path(key)) {
            Ok(f) => f,
            Err(e) if is_missing(&e) => return Ok(None),
            Err(e) => return Err(io_err(e)),
        };
        let meta = f.metadata().map_err(io_err)?;
        if !meta.is_file() {
            return Ok(None);
        }
        let Some(range) = range else {
            let mut buf = Vec::new();
            f.read_to_end(&mut buf).map_err(io_err)?;
            return Ok(Some(Bytes::from(buf)));
        };
        let (start, end) = check_range(key, &range, meta.len())?;
        let mut buf = vec![0u8; end - start];
        f.read_exact_at(&mut buf, range.start).map_err(io_err)?;
        Ok(Some(Bytes::from(buf)))
    }

    fn put(&self, key: &str, data: &[u8], sync: bool) -> io::Result<()> {
        let path = self.path(key);
        let parent = path.parent().unwrap_or(&self.root).to_owned();
        create_dirs(&parent)?;
        let tmp = parent.join(format!("{TMP_PREFIX}{}", uuid::Uuid::new_v4().simple()));
        let written = (|| {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(data)?;
            if sync {
                // Before the rename, so that a crash never leaves a renamed, empty file.
                f.sync_data()?;
            }
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let dirs = self.chain(&parent);
        if sync {
            self.settle(None, dirs, true)
        } else {
            let mut dirty = self.dirty();
            dirty.files.insert(path);
            dirty.dirs.extend(dirs);
            Ok(())
        }
    }

    fn put_range(
        &self,
        key: &str,
        offset: u64,
        data: &[u8],
        size: u64,
        sync: bool,
    ) -> io::Result<()> {
        let path = self.path(key);
        let parent = path.parent().unwrap_or(&self.root).to_owned();
        create_dirs(&parent)?;
        let (f, created) = match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => (f, true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                (OpenOptions::new().write(true).open(&path)?, false)
            }
            Err(e) => return Err(e),
        };
        // Only ever grown: concurrent calls for one object (same `size`) never cut each
        // other's data.
        if f.metadata()?.len() < size {
            f.set_len(size)?;
        }
        f.write_all_at(data, offset)?;
        let dirs = if created {
            self.chain(&parent)
        } else if sync {
            // The file may have been created by an earlier call with `sync = false`: its
            // entry is durable only once the directories that call left dirty are synced. A
            // flush under way may have taken them and not synced them yet: it ends first.
            let _flushed = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
            let dirty = self.dirty();
            let mut chain = self.chain(&parent);
            chain.retain(|d| dirty.dirs.contains(d));
            chain
        } else {
            Vec::new()
        };
        self.settle(Some((&f, path)), dirs, sync)
    }

    fn delete(&self, key: &str, sync: bool) -> io::Result<()> {
        let path = self.path(key);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            // A directory is not an object: there is no object by that key to delete.
            Err(e) if is_missing(&e) || e.kind() == io::ErrorKind::IsADirectory => return Ok(()),
            Err(e) => return Err(e),
        }
        let parent = path.parent().unwrap_or(&self.root).to_owned();
        self.settle(None, vec![parent], sync)
    }

    fn head(&self, key: &str) -> io::Result<Option<u64>> {
        match std::fs::metadata(self.path(key)) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        // Only the directory named by the prefix's complete components can hold matches.
        let dir_part = prefix.rfind('/').map_or("", |i| &prefix[..=i]);
        let mut out = Vec::new();
        let mut todo = vec![(self.root.join(dir_part), dir_part.to_owned())];
        while let Some((dir, key_prefix)) = todo.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                // Missing: nothing under this prefix.
                Err(e) if is_missing(&e) => continue,
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                let file_type = match entry.file_type() {
                    Ok(t) => t,
                    Err(e) if is_missing(&e) => continue,
                    Err(e) => return Err(e),
                };
                let key = format!("{key_prefix}{name}");
                if file_type.is_dir() {
                    let sub = format!("{key}/");
                    if sub.starts_with(prefix) || prefix.starts_with(&sub) {
                        todo.push((entry.path(), sub));
                    }
                } else if file_type.is_file() && key.starts_with(prefix) && check_key(&key).is_ok()
                {
                    out.push(key);
                }
            }
        }
        Ok(out)
    }

    fn flush(&self) -> Result<(), StoreError> {
        // Nothing is guarded but the order of flushes: a poisoned lock is as good.
        let _one = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        let Dirty { files, dirs } = std::mem::take(&mut *self.dirty());
        let synced = (|| {
            for f in &files {
                match File::open(f) {
                    Ok(h) => h.sync_data().map_err(|e| (f, e))?,
                    // Deleted since: its directory entry is what counts now.
                    Err(e) if is_missing(&e) => {}
                    Err(e) => return Err((f, e)),
                }
            }
            for d in &dirs {
                match sync_dir(d) {
                    Ok(()) => {}
                    Err(e) if is_missing(&e) => {}
                    Err(e) => return Err((d, e)),
                }
            }
            Ok(())
        })();
        match synced {
            Ok(()) => Ok(()),
            Err((path, e)) => {
                let key = path
                    .strip_prefix(&self.root)
                    .unwrap_or(path)
                    .display()
                    .to_string();
                let err = StoreError::io("flush", &key, e);
                // Keep everything dirty: the next flush tries again.
                let mut dirty = self.dirty();
                dirty.files.extend(files);
                dirty.dirs.extend(dirs);
                Err(err)
            }
        }
    }
}

#[async_trait]
impl ObjectStore for FileStore {
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Option<Bytes>, StoreError> {
        check_key(key)?;
        self.blocking("get", key, move |s, k| s.get(k, range)).await
    }

    async fn put(&self, key: &str, data: Bytes, sync: bool) -> Result<(), StoreError> {
        check_key(key)?;
        self.blocking("put", key, move |s, k| {
            s.put(k, &data, sync)
                .map_err(|e| StoreError::io("put", k, e))
        })
        .await
    }

    fn supports_put_range(&self) -> bool {
        true
    }

    async fn put_range(
        &self,
        key: &str,
        offset: u64,
        data: Bytes,
        size: u64,
        sync: bool,
    ) -> Result<(), StoreError> {
        check_key(key)?;
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|end| end > size) {
            return Err(StoreError::OutOfRange {
                key: key.to_owned(),
                start: offset,
                end: end.unwrap_or(u64::MAX),
                size,
            });
        }
        self.blocking("put_range", key, move |s, k| {
            s.put_range(k, offset, &data, size, sync)
                .map_err(|e| StoreError::io("put_range", k, e))
        })
        .await
    }

    async fn delete(&self, key: &str, sync: bool) -> Result<(), StoreError> {
        check_key(key)?;
        self.blocking("delete", key, move |s, k| {
            s.delete(k, sync)
                .map_err(|e| StoreError::io("delete", k, e))
        })
        .await
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        check_key(key)?;
        self.blocking("head", key, |s, k| {
            s.head(k).map_err(|e| StoreError::io("head", k, e))
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        check_prefix(prefix)?;
        self.blocking("list", prefix, |s, p| {
            s.list(p).map_err(|e| StoreError::io("list", p, e))
        })
        .await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        // Nothing written since the last flush, and none under way (whose files may not be
        // durable yet): nothing to wait for, and no thread to take for it. A cache over a
        // sharded volume flushes the store before every journal record.
        if let Ok(_idle) = self.inner.flushing.try_lock()
            && self.inner.dirty().is_empty()
        {
            return Ok(());
        }
        self.blocking("flush", "", |s, _| s.flush()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system's temporary directory, removed on drop.
    pub(crate) struct TempDir(pub(crate) PathBuf);

    impl TempDir {
        pub(crate) fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "nbd-rs-store-{name}-{}-{}",
                std::process::id(),
                uuid::Uuid::new_v4().simple()
            ));
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn conformance() {
        let dir = TempDir::new("conformance");
        let store = FileStore::open(&dir.0, true).unwrap();
        crate::store::conformance::run(Arc::new(store)).await;
        // No temporary file is left behind.
        let mut todo = vec![dir.0.clone()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    todo.push(e.path());
                } else {
                    panic!("left behind: {}", e.path().display());
                }
            }
        }
    }

    #[test]
    fn open_errors_name_the_path() {
        let dir = TempDir::new("open");
        let e = FileStore::open(&dir.0, false).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("store directory {} does not exist", dir.0.display())
        );
        std::fs::write(&dir.0, b"not a dir").unwrap();
        let e = FileStore::open(&dir.0, true).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("store path {} is not a directory", dir.0.display())
        );
        std::fs::remove_file(&dir.0).unwrap();
        let nested = dir.0.join("a/b");
        let s = FileStore::open(&nested, true).unwrap();
        assert_eq!(s.dir(), nested);
        assert!(nested.is_dir());
        // Opening an existing directory without `create` works.
        FileStore::open(&nested, false).unwrap();
    }

    #[tokio::test]
    async fn objects_are_plain_files() {
        let dir = TempDir::new("plain");
        let s = FileStore::open(&dir.0, true).unwrap();
        s.put("a/b/c.1.chunk", Bytes::from_static(b"data"), true)
            .await
            .unwrap();
        assert_eq!(std::fs::read(dir.0.join("a/b/c.1.chunk")).unwrap(), b"data");
        s.put_range(
            "sparse.0.chunk",
            4096,
            Bytes::from_static(b"x"),
            1 << 20,
            false,
        )
        .await
        .unwrap();
        let meta = std::fs::metadata(dir.0.join("sparse.0.chunk")).unwrap();
        assert_eq!(meta.len(), 1 << 20);
        // A file put there by hand is an object too; a reopened store sees everything.
        std::fs::write(dir.0.join("by-hand"), b"hi").unwrap();
        let s = FileStore::open(&dir.0, false).unwrap();
        let mut keys = s.list("").await.unwrap();
        keys.sort();
        assert_eq!(keys, ["a/b/c.1.chunk", "by-hand", "sparse.0.chunk"]);
    }

    #[tokio::test]
    async fn temp_files_and_odd_names_are_not_listed() {
        let dir = TempDir::new("tmp");
        let s = FileStore::open(&dir.0, true).unwrap();
        s.put("k", Bytes::from_static(b"1"), false).await.unwrap();
        std::fs::write(dir.0.join(format!("{TMP_PREFIX}0123")), b"torn").unwrap();
        std::fs::write(dir.0.join("bad\u{1}name"), b"?").unwrap();
        std::os::unix::fs::symlink("k", dir.0.join("link")).unwrap();
        assert_eq!(s.list("").await.unwrap(), ["k"]);
        assert_eq!(s.list(".").await.unwrap(), Vec::<String>::new());
    }

    #[tokio::test]
    async fn bad_keys_touch_nothing_outside() {
        let dir = TempDir::new("escape");
        let inner = dir.0.join("store");
        let s = FileStore::open(&inner, true).unwrap();
        for key in ["../x", "/tmp/x", "a/../../x"] {
            assert!(matches!(
                s.put(key, Bytes::from_static(b"x"), true).await,
                Err(StoreError::BadKey(_))
            ));
        }
        assert!(!dir.0.join("x").exists());
        assert_eq!(std::fs::read_dir(&inner).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn an_object_cannot_be_a_directory_too() {
        let dir = TempDir::new("filedir");
        let s = FileStore::open(&dir.0, true).unwrap();
        s.put("a", Bytes::from_static(b"1"), false).await.unwrap();
        let e = s
            .put("a/b", Bytes::from_static(b"2"), false)
            .await
            .unwrap_err();
        assert!(e.to_string().starts_with("put a/b: "), "{e}");
        // Reads through the file find nothing rather than failing.
        assert!(s.get("a/b", None).await.unwrap().is_none());
        assert_eq!(s.head("a/b").await.unwrap(), None);
        s.delete("a/b", true).await.unwrap();
        // A directory is not an object.
        s.put("d/x", Bytes::from_static(b"3"), false).await.unwrap();
        assert_eq!(s.head("d").await.unwrap(), None);
        assert!(s.get("d", None).await.unwrap().is_none());
        s.delete("d", false).await.unwrap();
        assert_eq!(s.head("d/x").await.unwrap(), Some(1));
    }

    #[test]
    fn a_flush_with_nothing_to_sync_needs_no_thread_but_waits_for_one_under_way() {
        let dir = TempDir::new("flush-idle");
        // The only pool thread is taken.
        let rt = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .enable_time()
            .build()
            .unwrap();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (s, blocker) = rt.block_on(async {
            let s = Arc::new(FileStore::open(&dir.0, true).unwrap());
            s.put("a", Bytes::from_static(b"1"), false).await.unwrap();
            s.flush().await.unwrap();
            let blocker = tokio::task::spawn_blocking(move || held.recv());
            (s, blocker)
        });
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(5), s.flush())
                .await
                .expect("a flush with nothing dirty waits for no thread")
                .unwrap();
        });
        release.send(()).unwrap();
        rt.block_on(blocker).unwrap().unwrap();
        // With one under way, even a flush that finds nothing dirty waits for it: the files
        // it took may not be durable yet.
        let syncing = s.inner.flushing.lock().unwrap();
        let waited = rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_millis(200), s.flush())
                .await
                .is_err()
        });
        assert!(
            waited,
            "a flush must not report before the one under way is done"
        );
        drop(syncing);
        rt.block_on(s.flush()).unwrap();
    }

    /// Runs `call` on a thread of its own while `syncing` (the flushing lock, held as by a
    /// flush under way) is held: it must not return (`why`) until the lock is given up, and
    /// then it must. Returns what it returned.
    fn waits_for_the_flush<T: Send + 'static>(
        syncing: MutexGuard<'_, ()>,
        call: impl FnOnce() -> T + Send + 'static,
        why: &str,
    ) -> T {
        let (done, finished) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let r = call();
            let _ = done.send(());
            r
        });
        assert!(
            finished
                .recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "{why}"
        );
        drop(syncing);
        finished
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("it goes on once the flush is done");
        t.join().unwrap()
    }

    #[test]
    fn a_durable_range_write_waits_for_a_flush_that_took_its_directories() {
        let dir = TempDir::new("range-sync");
        let s = FileStore::open(&dir.0, true).unwrap();
        let inner = Arc::clone(&s.inner);
        // Created without a sync: its directories are left to the next flush.
        inner.put_range("d/x", 0, b"1", 8, false).unwrap();
        // That flush is under way: it took them and has not synced them yet.
        let syncing = inner.flushing.lock().unwrap();
        let taken = std::mem::take(&mut *inner.dirty());
        assert!(taken.dirs.contains(&dir.0.join("d")));
        let writer = Arc::clone(&inner);
        waits_for_the_flush(
            syncing,
            move || writer.put_range("d/x", 1, b"2", 8, true),
            "a durable write must not report before the entry that holds it is durable",
        )
        .unwrap();
    }

    #[test]
    fn a_flush_waits_for_one_that_is_still_syncing() {
        let dir = TempDir::new("flush-order");
        let s = FileStore::open(&dir.0, true).unwrap();
        let inner = Arc::clone(&s.inner);
        // A flush under way: it took the dirty set and is syncing it.
        let syncing = inner.flushing.lock().unwrap();
        let second = Arc::clone(&inner);
        waits_for_the_flush(
            syncing,
            move || second.flush(),
            "a second flush must not report before the first one's files are durable",
        )
        .unwrap();
    }

    #[tokio::test]
    async fn flush_syncs_what_is_dirty_and_forgets_it() {
        let dir = TempDir::new("flush");
        let s = FileStore::open(&dir.0, true).unwrap();
        s.put("n/a", Bytes::from_static(b"1"), false).await.unwrap();
        s.put_range("n/b", 0, Bytes::from_static(b"2"), 8, false)
            .await
            .unwrap();
        s.delete("n/a", false).await.unwrap();
        {
            let dirty = s.inner.dirty();
            assert_eq!(dirty.files.len(), 2);
            assert!(dirty.dirs.contains(&dir.0));
            assert!(dirty.dirs.contains(&dir.0.join("n")));
        }
        // `n/a` is gone: flush skips it.
        s.flush().await.unwrap();
        {
            let dirty = s.inner.dirty();
            assert!(dirty.files.is_empty() && dirty.dirs.is_empty());
        }
        // Synchronous calls leave nothing for flush.
        s.put("n/c", Bytes::from_static(b"3"), true).await.unwrap();
        s.put_range("n/d", 0, Bytes::from_static(b"4"), 8, true)
            .await
            .unwrap();
        s.delete("n/c", true).await.unwrap();
        let dirty = s.inner.dirty();
        assert!(dirty.files.is_empty() && dirty.dirs.is_empty());
    }

    #[test]
    fn prefixes() {
        for ok in ["", "a", "a/", "a/b.", "a/.", "a/..", "vm1.", "x/y/z"] {
            assert!(check_prefix(ok).is_ok(), "{ok:?}");
        }
        for bad in ["/", "/a", "a//", "../", "a/./b", "a\n", "\u{e9}"] {
            assert!(check_prefix(bad).is_err(), "{bad:?}");
        }
    }
}
