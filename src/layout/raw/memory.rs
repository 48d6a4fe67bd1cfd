//! `raw -> memory`: a sparse disk in RAM that costs only the pages written to it.
//!
//! The disk is cut into 32 KiB pages kept in 64 independently locked shards (page `n` lives in
//! shard `n % 64`, so sequential I/O spreads over all of them). A page that was never written,
//! or was trimmed or zeroed whole, is absent and reads as a hole. Each shard is a `BTreeMap` so
//! that block status can find the present pages in a range without visiting the absent ones.
//!
//! Reads copy nothing: a reply holds a reference to each page it covers, and the socket write
//! copies straight from the page. A write to a page that a reply still holds copies the page
//! first (copy on write), so a reply always carries the data as it was when the read ran.
//!
//! Large writes copy once: on a plain socket the connection reads their payloads straight into
//! new pages ([`PagedWrite`]), which replace the old ones whole; the bytes before the first page
//! boundary and after the last, and any the connection had already read ahead, are copied. A
//! reply holding an old page keeps it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;

use crate::block::{
    BlockDevice, BlockError, BlockSizes, DeviceInfo, Extent, PagedWrite, ReadChunk, ReadData,
    STATE_HOLE, STATE_ZERO, ZeroFlags,
};

const PAGE: u64 = 32 * 1024;
const SHARDS: u64 = 64;
/// Block status looks at most this far ahead in one call; clients ask again for the rest.
const STATUS_SPAN: u64 = 1 << 30;

/// A page: its bytes in an allocation of their own, which the allocator places at a page
/// boundary. (In a plain `Arc<[u8]>` they would follow the counts, and large copies into them,
/// `rep movsb`, ran 15% slower.)
type Page = Arc<Box<[u8]>>;

/// A page lent to a reply, as the owner of a `Bytes`.
struct Lent(Page);

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// A new page holding `data` at `start`, zeroes elsewhere.
fn new_page(start: usize, data: &[u8]) -> Page {
    if data.len() == PAGE as usize {
        return Arc::new(Box::from(data));
    }
    let mut p = vec![0; PAGE as usize].into_boxed_slice();
    p[start..start + data.len()].copy_from_slice(data);
    Arc::new(p)
}

/// A sparse in-memory disk.
pub struct MemoryImage {
    info: DeviceInfo,
    shards: Box<[Mutex<BTreeMap<u64, Page>>]>,
}

impl std::fmt::Debug for MemoryImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryImage")
            .field("size", &self.info.size)
            .finish_non_exhaustive()
    }
}

/// One page's share of a byte range: page number, offset in the page, length.
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize)> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let page = pos / PAGE;
        let in_page = pos % PAGE;
        let n = (PAGE - in_page).min(end - pos);
        pos += n;
        // Both fit in usize: they are below PAGE.
        Some((page, in_page as usize, n as usize))
    })
}

impl MemoryImage {
    /// A zero-filled disk of `size` bytes.
    pub fn new(size: u64, read_only: bool) -> Self {
        MemoryImage {
            info: DeviceInfo {
                size,
                read_only,
                can_trim: true,
                can_fast_zero: true,
                multi_conn: true,
                rotational: false,
                block_sizes: BlockSizes::default(),
            },
            shards: (0..SHARDS).map(|_| Mutex::new(BTreeMap::new())).collect(),
        }
    }

    fn shard(&self, page: u64) -> MutexGuard<'_, BTreeMap<u64, Page>> {
        // A poisoned lock means a panic while copying bytes; the map itself is still sound.
        self.shards[(page % SHARDS) as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes held in pages: what this disk costs.
    pub fn allocated(&self) -> u64 {
        (0..SHARDS).map(|s| self.shard(s).len() as u64 * PAGE).sum()
    }

    fn read_sync(&self, offset: u64, len: u32) -> ReadData {
        let mut out = ReadData::default();
        for (page, start, n) in pieces(offset, u64::from(len)) {
            let lent = self.shard(page).get(&page).map(Arc::clone);
            out.push(match lent {
                Some(p) => ReadChunk::Data(Bytes::from_owner(Lent(p)).slice(start..start + n)),
                None => ReadChunk::Zero(n as u32),
            });
        }
        out
    }

    fn write_sync(&self, offset: u64, data: &[u8]) {
        let mut src = data;
        for (page, start, n) in pieces(offset, data.len() as u64) {
            let mut shard = self.shard(page);
            match shard.get_mut(&page) {
                // Copies the page first if a reply still holds it.
                Some(p) => Arc::make_mut(p)[start..start + n].copy_from_slice(&src[..n]),
                None => {
                    shard.insert(page, new_page(start, &src[..n]));
                }
            }
            src = &src[n..];
        }
    }

    fn write_pages_sync(&self, w: PagedWrite) {
        let mut at = w.offset;
        self.write_sync(at, &w.head);
        at += w.head.len() as u64;
        for p in w.pages {
            let n = p.len() as u64;
            if at.is_multiple_of(PAGE) && n == PAGE {
                self.shard(at / PAGE).insert(at / PAGE, Arc::new(p));
            } else {
                // Not cut at this image's pages: copied, as any write.
                self.write_sync(at, &p);
            }
            at += n;
        }
        self.write_sync(at, &w.tail);
    }

    fn zero_sync(&self, offset: u64, len: u64) {
        // Whole pages are dropped; the partial pages at either end are zeroed in place.
        let first_whole = offset.div_ceil(PAGE);
        let end_whole = (offset + len) / PAGE;
        let head_end = (first_whole * PAGE).min(offset + len);
        if offset < head_end {
            self.zero_partial(offset, head_end - offset);
        }
        if first_whole < end_whole {
            for s in 0..SHARDS {
                let mut shard = self.shard(s);
                let doomed: Vec<u64> = shard
                    .range(first_whole..end_whole)
                    .map(|(k, _)| *k)
                    .collect();
                for k in doomed {
                    shard.remove(&k);
                }
            }
        }
        let tail_start = (end_whole * PAGE).max(head_end);
        if tail_start < offset + len {
            self.zero_partial(tail_start, offset + len - tail_start);
        }
    }

    fn zero_partial(&self, offset: u64, len: u64) {
        for (page, start, n) in pieces(offset, len) {
            if let Some(p) = self.shard(page).get_mut(&page) {
                Arc::make_mut(p)[start..start + n].fill(0);
            }
        }
    }

    fn block_status_sync(&self, offset: u64, len: u64) -> Vec<Extent> {
        let end = offset + len.min(STATUS_SPAN);
        let first = offset / PAGE;
        let last = end.div_ceil(PAGE);
        let mut present: Vec<u64> = Vec::new();
        for s in 0..SHARDS {
            present.extend(self.shard(s).range(first..last).map(|(k, _)| *k));
        }
        present.sort_unstable();

        let mut extents: Vec<Extent> = Vec::new();
        let mut push = |length: u64, flags: u32| {
            if length == 0 {
                return;
            }
            match extents.last_mut() {
                Some(e) if e.flags == flags => e.length += length,
                _ => extents.push(Extent { length, flags }),
            }
        };
        let mut pos = offset;
        for page in present {
            let start = (page * PAGE).max(offset);
            let stop = ((page + 1) * PAGE).min(end);
            push(start - pos, STATE_HOLE | STATE_ZERO);
            push(stop - start, 0);
            pos = stop;
        }
        push(end - pos, STATE_HOLE | STATE_ZERO);
        extents
    }
}

#[async_trait]
impl BlockDevice for MemoryImage {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    async fn read(&self, offset: u64, len: u32) -> Result<ReadData, BlockError> {
        Ok(self.read_sync(offset, len))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), BlockError> {
        if self.info.read_only {
            return Err(BlockError::ReadOnly);
        }
        self.write_sync(offset, &data);
        Ok(())
    }

    fn page_bytes(&self) -> Option<usize> {
        // PAGE fits in usize.
        Some(PAGE as usize)
    }

    async fn write_pages(&self, data: PagedWrite, _fua: bool) -> Result<(), BlockError> {
        if self.info.read_only {
            return Err(BlockError::ReadOnly);
        }
        self.write_pages_sync(data);
        Ok(())
    }

    async fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), BlockError> {
        if self.info.read_only {
            return Err(BlockError::ReadOnly);
        }
        self.zero_sync(offset, len);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _flags: ZeroFlags,
    ) -> Result<(), BlockError> {
        if self.info.read_only {
            return Err(BlockError::ReadOnly);
        }
        // Dropping pages is always fast, and NO_HOLE has no meaning for memory: a page is
        // never "provisioned" in a way a later write could fail to get.
        self.zero_sync(offset, len);
        Ok(())
    }

    async fn cache(&self, _offset: u64, _len: u64) -> Result<(), BlockError> {
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BlockError> {
        Ok(self.block_status_sync(offset, len))
    }

    async fn close(&self) -> Result<(), BlockError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(m: &MemoryImage, offset: u64, len: u32) -> Vec<u8> {
        m.read_sync(offset, len).to_bytes().to_vec()
    }

    /// Whole pages of a paged write replace the old ones (a reply holding an old page keeps its
    /// bytes), the bytes before and after them are copied in, and a page not cut at this
    /// image's boundaries is copied like any write.
    #[tokio::test]
    async fn paged_writes_land_where_they_belong_and_leave_lent_pages_alone() {
        let m = MemoryImage::new(1 << 20, false);
        let old: Vec<u8> = vec![0x11; 4 * PAGE as usize];
        m.write_sync(0, &old);
        let lent = m.read_sync(PAGE, PAGE as u32).to_bytes();
        let p = PAGE as usize;
        let data: Vec<u8> = (0..(100 + 2 * p + 300)).map(|i| (i % 253) as u8).collect();
        let w = PagedWrite {
            offset: PAGE - 100,
            head: Bytes::copy_from_slice(&data[..100]),
            pages: vec![
                data[100..100 + p].to_vec().into_boxed_slice(),
                data[100 + p..100 + 2 * p].to_vec().into_boxed_slice(),
            ],
            tail: Bytes::copy_from_slice(&data[100 + 2 * p..]),
        };
        assert_eq!(w.len(), data.len() as u64);
        m.write_pages(w, false).await.unwrap();
        let mut want = old.clone();
        want.resize(8 * p, 0);
        want[p - 100..p - 100 + data.len()].copy_from_slice(&data);
        assert_eq!(read_all(&m, 0, 8 * PAGE as u32), want);
        assert_eq!(&lent[..], &old[..p]);

        // Pages that do not start on a page boundary are copied.
        let w = PagedWrite {
            offset: 10,
            head: Bytes::new(),
            pages: vec![vec![0x22; p].into_boxed_slice()],
            tail: Bytes::new(),
        };
        m.write_pages(w, false).await.unwrap();
        want[10..10 + p].fill(0x22);
        assert_eq!(read_all(&m, 0, 8 * PAGE as u32), want);

        // The default for other devices: one buffer, in order.
        let w = PagedWrite {
            offset: 0,
            head: Bytes::from_static(b"ab"),
            pages: vec![Box::from(&b"cd"[..]), Box::from(&b"e"[..])],
            tail: Bytes::from_static(b"f"),
        };
        assert_eq!(&w.into_bytes()[..], b"abcdef");

        let ro = MemoryImage::new(1 << 20, true);
        let w = PagedWrite {
            offset: 0,
            head: Bytes::new(),
            pages: vec![vec![1; p].into_boxed_slice()],
            tail: Bytes::new(),
        };
        assert!(matches!(
            ro.write_pages(w, false).await,
            Err(BlockError::ReadOnly)
        ));
    }

    #[test]
    fn unwritten_reads_as_one_hole() {
        let m = MemoryImage::new(1 << 40, false);
        let r = m.read_sync(12345, 100_000);
        assert_eq!(r.chunks(), &[ReadChunk::Zero(100_000)]);
        assert_eq!(m.allocated(), 0);
    }

    #[test]
    fn write_across_pages_reads_back_with_holes_around() {
        let m = MemoryImage::new(1 << 20, false);
        let data: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8 + 1).collect();
        m.write_sync(PAGE - 10, &data);
        assert_eq!(read_all(&m, PAGE - 10, 60_000), data);
        let r = m.read_sync(0, 4 * PAGE as u32);
        let kinds: Vec<(bool, u32)> = r
            .chunks()
            .iter()
            .map(|c| (matches!(c, ReadChunk::Data(_)), c.len()))
            .collect();
        // Page 0 is present (written from PAGE-10), pages 1 and 2 too, page 3 is absent.
        let page = PAGE as u32;
        assert_eq!(
            kinds,
            vec![(true, page), (true, page), (true, page), (false, page)]
        );
        assert_eq!(m.allocated(), 3 * PAGE);
    }

    #[test]
    fn a_read_keeps_its_data_when_the_page_is_written_after_it() {
        let m = MemoryImage::new(1 << 20, false);
        m.write_sync(0, &vec![1u8; 2 * PAGE as usize]);
        let before = m.read_sync(100, PAGE as u32);
        // Partly overwritten, partly zeroed, while the read's reply still holds both pages.
        m.write_sync(0, &vec![2u8; PAGE as usize + 50]);
        m.zero_sync(PAGE + 50, 10);
        assert_eq!(before.to_bytes().to_vec(), vec![1u8; PAGE as usize]);
        let after = read_all(&m, 0, 2 * PAGE as u32);
        assert!(after[..PAGE as usize + 50].iter().all(|&b| b == 2));
        assert!(
            after[PAGE as usize + 50..PAGE as usize + 60]
                .iter()
                .all(|&b| b == 0)
        );
        assert!(after[PAGE as usize + 60..].iter().all(|&b| b == 1));
    }

    #[test]
    fn zero_drops_whole_pages_and_zeroes_partial_ones() {
        let m = MemoryImage::new(1 << 20, false);
        m.write_sync(0, &vec![7u8; 4 * PAGE as usize]);
        m.zero_sync(100, 2 * PAGE);
        let got = read_all(&m, 0, 4 * PAGE as u32);
        assert!(got[..100].iter().all(|&b| b == 7));
        assert!(got[100..100 + 2 * PAGE as usize].iter().all(|&b| b == 0));
        assert!(got[100 + 2 * PAGE as usize..].iter().all(|&b| b == 7));
        // Page 1 was covered whole and is gone; 0 and 2 were partial and stay.
        assert_eq!(m.allocated(), 3 * PAGE);
    }

    #[test]
    fn block_status_describes_pages_and_holes() {
        let m = MemoryImage::new(1 << 20, false);
        m.write_sync(PAGE, b"x");
        let e = m.block_status_sync(0, 1 << 20);
        assert_eq!(
            e,
            vec![
                Extent {
                    length: PAGE,
                    flags: 3
                },
                Extent {
                    length: PAGE,
                    flags: 0
                },
                Extent {
                    length: (1 << 20) - 2 * PAGE,
                    flags: 3
                },
            ]
        );
        let e = m.block_status_sync(PAGE + 5, 10);
        assert_eq!(
            e,
            vec![Extent {
                length: 10,
                flags: 0
            }]
        );
    }

    #[test]
    fn block_status_of_a_huge_empty_disk_is_bounded() {
        let m = MemoryImage::new(1 << 50, false);
        let e = m.block_status_sync(0, 1 << 50);
        assert_eq!(
            e,
            vec![Extent {
                length: STATUS_SPAN,
                flags: 3
            }]
        );
    }
}
