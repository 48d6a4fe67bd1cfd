//! The object-store conformance suite: one behaviour every store and store wrapper must show.
//!
//! [`run`] takes any `Arc<dyn ObjectStore>` and panics on the first deviation. Every key it
//! touches starts with a fresh random prefix (`c{uuid}-`), so it may run against a shared
//! bucket or directory; it deletes what it created. `put_range` is exercised only when the store
//! says it supports it.

use std::sync::Arc;

use bytes::Bytes;

use super::{ObjectStore, StoreError};

/// Keys no store may accept, for every method.
const BAD_KEYS: &[&str] = &[
    "",
    "../x",
    "a/../../x",
    "/abs",
    "a//b",
    "a/./b",
    ".",
    "..",
    "trailing/",
    "a\nb",
    "a\u{1}b",
    "tab\tkey",
    "del\u{7f}",
    "caf\u{e9}",
];

/// Prefixes no store may list: they are the start of no valid key.
const BAD_PREFIXES: &[&str] = &["../x", "/abs", "a//b", "a/./", "a\nb", "x\u{1}"];

/// Runs the whole suite against `store`.
pub(crate) async fn run(store: Arc<dyn ObjectStore>) {
    let base = format!("c{}-", uuid::Uuid::new_v4().simple());
    missing(&*store, &base).await;
    put_get_and_ranges(&*store, &base).await;
    put_replaces(&*store, &base).await;
    if store.supports_put_range() {
        put_range(&*store, &base).await;
        concurrent_put_range(Arc::clone(&store), &base).await;
    }
    delete(&*store, &base).await;
    list(&*store, &base).await;
    bad_keys(&*store).await;
    concurrent_puts(Arc::clone(&store), &base).await;
    flush(&*store, &base).await;
    cleanup(&*store, &base).await;
}

fn b(s: &'static [u8]) -> Bytes {
    Bytes::from_static(s)
}

async fn get(store: &dyn ObjectStore, key: &str) -> Option<Vec<u8>> {
    store
        .get(key, None)
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e}"))
        .map(|b| b.to_vec())
}

async fn missing(store: &dyn ObjectStore, base: &str) {
    let key = format!("{base}missing");
    assert!(get(store, &key).await.is_none(), "get of a missing object");
    assert!(
        store.get(&key, Some(0..1)).await.unwrap().is_none(),
        "range get of a missing object"
    );
    assert_eq!(
        store.head(&key).await.unwrap(),
        None,
        "head of a missing object"
    );
    let nested = format!("{base}no/such/dir");
    assert!(
        get(store, &nested).await.is_none(),
        "get under a missing directory"
    );
    assert_eq!(store.head(&nested).await.unwrap(), None);
}

async fn put_get_and_ranges(store: &dyn ObjectStore, base: &str) {
    let key = format!("{base}hello");
    store.put(&key, b(b"hello world"), false).await.unwrap();
    assert_eq!(get(store, &key).await.as_deref(), Some(&b"hello world"[..]));
    assert_eq!(store.head(&key).await.unwrap(), Some(11));
    let range = |r| store.get(&key, Some(r));
    assert_eq!(&range(0..5).await.unwrap().unwrap()[..], b"hello");
    assert_eq!(&range(6..11).await.unwrap().unwrap()[..], b"world");
    assert_eq!(&range(11..11).await.unwrap().unwrap()[..], b"");
    for (start, end) in [(5, 12), (20, 30), (11, 12), (6, 5)] {
        match range(start..end).await {
            Err(StoreError::OutOfRange {
                key: k,
                start: s,
                end: e,
                size,
            }) => {
                assert_eq!((k.as_str(), s, e, size), (key.as_str(), start, end, 11));
            }
            other => panic!("range {start}..{end} of an 11-byte object: {other:?}"),
        }
    }

    let empty = format!("{base}empty");
    store.put(&empty, Bytes::new(), true).await.unwrap();
    assert_eq!(get(store, &empty).await.as_deref(), Some(&b""[..]));
    assert_eq!(store.head(&empty).await.unwrap(), Some(0));

    let nested = format!("{base}deep/er/obj");
    store.put(&nested, b(b"nested"), true).await.unwrap();
    assert_eq!(get(store, &nested).await.as_deref(), Some(&b"nested"[..]));
}

async fn put_replaces(store: &dyn ObjectStore, base: &str) {
    let key = format!("{base}replace");
    store
        .put(&key, b(b"a long first version"), false)
        .await
        .unwrap();
    store.put(&key, b(b"short"), false).await.unwrap();
    assert_eq!(get(store, &key).await.as_deref(), Some(&b"short"[..]));
    assert_eq!(store.head(&key).await.unwrap(), Some(5));
    store.put(&key, b(b"durable"), true).await.unwrap();
    assert_eq!(get(store, &key).await.as_deref(), Some(&b"durable"[..]));
}

async fn put_range(store: &dyn ObjectStore, base: &str) {
    // Creates a zero-filled object of `size`, written inside.
    let key = format!("{base}ranged");
    store
        .put_range(&key, 10, b(b"abc"), 32, false)
        .await
        .unwrap();
    assert_eq!(store.head(&key).await.unwrap(), Some(32));
    let mut want = vec![0u8; 32];
    want[10..13].copy_from_slice(b"abc");
    assert_eq!(get(store, &key).await, Some(want.clone()));

    // Later writes keep the other bytes, at both ends too.
    store.put_range(&key, 0, b(b"zz"), 32, true).await.unwrap();
    store
        .put_range(&key, 30, b(b"yy"), 32, false)
        .await
        .unwrap();
    want[..2].copy_from_slice(b"zz");
    want[30..].copy_from_slice(b"yy");
    assert_eq!(get(store, &key).await, Some(want.clone()));
    assert_eq!(
        &store.get(&key, Some(9..14)).await.unwrap().unwrap()[..],
        b"\0abc\0"
    );

    // Beyond `size`: refused, object unchanged.
    for (offset, data) in [(31, b(b"xx")), (40, b(b"x")), (u64::MAX, b(b"x"))] {
        match store.put_range(&key, offset, data, 32, false).await {
            Err(StoreError::OutOfRange { .. }) => {}
            other => panic!("put_range at {offset} past size 32: {other:?}"),
        }
    }
    assert_eq!(get(store, &key).await, Some(want));

    // An existing shorter object is extended with zeroes to `size`.
    let short = format!("{base}short");
    store.put(&short, b(b"12345"), false).await.unwrap();
    store.put_range(&short, 6, b(b"x"), 8, false).await.unwrap();
    assert_eq!(
        get(store, &short).await.as_deref(),
        Some(&b"12345\0x\0"[..])
    );

    // Nested keys get their "directories".
    let nested = format!("{base}pr/deep/r.0.chunk");
    store.put_range(&nested, 1, b(b"n"), 4, true).await.unwrap();
    assert_eq!(get(store, &nested).await.as_deref(), Some(&b"\0n\0\0"[..]));
}

/// Non-overlapping `put_range`s into one object at once all land (layouts rely on it).
async fn concurrent_put_range(store: Arc<dyn ObjectStore>, base: &str) {
    const N: usize = 32;
    const PIECE: usize = 4096;
    let key = format!("{base}shared.chunk");
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let store = Arc::clone(&store);
            let key = key.clone();
            tokio::spawn(async move {
                let data = Bytes::from(vec![i as u8 + 1; PIECE]);
                store
                    .put_range(&key, (i * PIECE) as u64, data, (N * PIECE) as u64, false)
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let got = get(&*store, &key).await.unwrap();
    assert_eq!(got.len(), N * PIECE);
    for (i, piece) in got.chunks(PIECE).enumerate() {
        assert!(
            piece.iter().all(|&x| x == i as u8 + 1),
            "piece {i} of a concurrently written object was lost"
        );
    }
}

async fn delete(store: &dyn ObjectStore, base: &str) {
    let key = format!("{base}doomed");
    store.delete(&key, false).await.unwrap();
    store.delete(&key, true).await.unwrap();
    store
        .delete(&format!("{base}no/such/parent"), false)
        .await
        .unwrap();
    store.put(&key, b(b"x"), false).await.unwrap();
    store.delete(&key, false).await.unwrap();
    assert!(get(store, &key).await.is_none());
    assert_eq!(store.head(&key).await.unwrap(), None);
    store.delete(&key, true).await.unwrap();
    store.put(&key, b(b"again"), true).await.unwrap();
    store.delete(&key, true).await.unwrap();
    assert!(get(store, &key).await.is_none());
}

async fn list(store: &dyn ObjectStore, base: &str) {
    let keys = [
        "vol.0.chunk",
        "vol.1.chunk",
        "vol.volume",
        "vol2.0.chunk",
        "ab/x.1.chunk",
        "ab/cd/y",
        "abc",
    ];
    for k in keys {
        store
            .put(&format!("{base}lst/{k}"), b(b"."), false)
            .await
            .unwrap();
    }
    let ls = |p: &'static str| async move {
        let prefix = format!("{base}lst/{p}");
        let mut got: Vec<String> = store
            .list(&prefix)
            .await
            .unwrap_or_else(|e| panic!("list {prefix}: {e}"))
            .into_iter()
            .map(|k| {
                k.strip_prefix(&format!("{base}lst/"))
                    .unwrap_or_else(|| panic!("list {prefix} returned {k}"))
                    .to_owned()
            })
            .collect();
        got.sort();
        got
    };
    assert_eq!(
        ls("vol.").await,
        ["vol.0.chunk", "vol.1.chunk", "vol.volume"]
    );
    assert_eq!(
        ls("vol").await,
        ["vol.0.chunk", "vol.1.chunk", "vol.volume", "vol2.0.chunk"]
    );
    assert_eq!(ls("ab/").await, ["ab/cd/y", "ab/x.1.chunk"]);
    assert_eq!(ls("ab").await, ["ab/cd/y", "ab/x.1.chunk", "abc"]);
    assert_eq!(ls("ab/x").await, ["ab/x.1.chunk"]);
    assert_eq!(ls("ab/cd/").await, ["ab/cd/y"]);
    assert_eq!(ls("ab/x.1.chunk").await, ["ab/x.1.chunk"]);
    assert!(ls("zz").await.is_empty());
    assert!(ls("nodir/").await.is_empty());
    assert!(ls("abc/").await.is_empty());
    assert_eq!(ls("").await.len(), keys.len());

    for k in keys {
        store
            .delete(&format!("{base}lst/{k}"), false)
            .await
            .unwrap();
    }
    assert!(ls("").await.is_empty(), "deleted keys are still listed");
}

async fn bad_keys(store: &dyn ObjectStore) {
    let long = "k".repeat(1025);
    let keys = BAD_KEYS.iter().copied().chain([long.as_str()]);
    for key in keys {
        let bad = |what: &str, r: Result<(), StoreError>| match r {
            Err(StoreError::BadKey(k)) => assert_eq!(k, key, "{what} names the key"),
            other => panic!("{what} {key:?}: expected BadKey, got {other:?}"),
        };
        bad("get", store.get(key, None).await.map(drop));
        bad("range get", store.get(key, Some(0..1)).await.map(drop));
        bad("put", store.put(key, b(b"x"), false).await);
        bad("put sync", store.put(key, b(b"x"), true).await);
        if store.supports_put_range() {
            bad(
                "put_range",
                store.put_range(key, 0, b(b"x"), 1, false).await,
            );
        }
        bad("delete", store.delete(key, false).await);
        bad("head", store.head(key).await.map(drop));
    }
    for prefix in BAD_PREFIXES {
        match store.list(prefix).await {
            Err(StoreError::BadKey(k)) => assert_eq!(&k, prefix),
            other => panic!("list {prefix:?}: expected BadKey, got {other:?}"),
        }
    }
}

async fn concurrent_puts(store: Arc<dyn ObjectStore>, base: &str) {
    const N: usize = 32;
    let key = |i: usize| format!("{base}par/{}/{i}", i % 4);
    let content = |i: usize| vec![i as u8; 65536 + i];
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let store = Arc::clone(&store);
            let (k, data) = (key(i), content(i));
            tokio::spawn(async move { store.put(&k, Bytes::from(data), i % 2 == 0).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    for i in 0..N {
        assert_eq!(get(&*store, &key(i)).await, Some(content(i)), "object {i}");
    }
    let mut listed = store.list(&format!("{base}par/")).await.unwrap();
    listed.sort();
    let mut want: Vec<String> = (0..N).map(key).collect();
    want.sort();
    assert_eq!(listed, want);
}

async fn flush(store: &dyn ObjectStore, base: &str) {
    store.flush().await.unwrap();
    let key = format!("{base}flushed");
    store.put(&key, b(b"x"), false).await.unwrap();
    store.delete(&format!("{base}hello"), false).await.unwrap();
    store.flush().await.unwrap();
    store.flush().await.unwrap();
    assert_eq!(get(store, &key).await.as_deref(), Some(&b"x"[..]));
}

async fn cleanup(store: &dyn ObjectStore, base: &str) {
    for key in store.list(base).await.unwrap() {
        store.delete(&key, false).await.unwrap();
    }
    store.flush().await.unwrap();
    assert!(store.list(base).await.unwrap().is_empty());
}
