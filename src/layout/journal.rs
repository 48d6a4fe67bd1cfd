//! Flush journal records of a sharded volume: their format, and the plan that applies them.
//!
//! A record is the object `{name}.{n}.journal` (see [`crate::block::Journal`] for what records
//! mean). Integers are little-endian:
//!
//! ```text
//! header, 64 bytes:
//!   0  magic "NBDRSJR1"
//!   8  the volume's id, 36 ASCII bytes (the UUID in its volume metadata)
//!   44 entry count (u32)       48 record number n (u64)      56 keep_from (u64)
//! entries, 24 bytes each:
//!   0  kind (u32): 0 settled, 1 zero, 2 data      4 zero (u32)
//!   8  offset (u64)            16 length (u64)
//! the bytes of the data entries, in entry order
//! CRC-32 (IEEE) of everything before it (u32)
//! ```
//!
//! `keep_from` is the oldest record still needed when this one was written (at most `n`):
//! whoever opens the volume applies the records from the newest one's `keep_from` to the
//! newest, and deletes the older ones.
//!
//! Applying records is done in two passes, so that memory stays bounded by what the records
//! describe rather than by their data: [`Overlay`] first folds every record's entries into one
//! map of the final source of each byte (the newest data, zeroes, or "as stored"); the data is
//! then copied from the records into the chunks it lands in.

use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};

use crate::block::JournalEntry;
use crate::le::{u32_at, u64_at};

/// The magic at the start of every record.
const MAGIC: &[u8; 8] = b"NBDRSJR1";
/// Length of the header.
const HEADER_LEN: usize = 64;
/// Length of one entry's description.
const ENTRY_LEN: usize = 24;
/// Length of the checksum at the end.
const SUM_LEN: usize = 4;
/// Length of a volume id (a hyphenated UUID).
pub const ID_LEN: usize = 36;

const KIND_SETTLED: u32 = 0;
const KIND_ZERO: u32 = 1;
const KIND_DATA: u32 = 2;

/// The key of record `n` of the volume `name`.
pub fn record_key(name: &str, n: u64) -> String {
    format!("{name}.{n}.journal")
}

/// Parses a record key's number: `{name}.{n}.journal` with `n` in canonical decimal, where
/// `prefix` is `{name}.`.
pub fn record_number(prefix: &str, key: &str) -> Option<u64> {
    let n = key.strip_prefix(prefix)?.strip_suffix(".journal")?;
    let canonical =
        !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && (n == "0" || !n.starts_with('0'));
    if canonical { n.parse().ok() } else { None }
}

/// Encodes a record. `id` is the volume's id ([`ID_LEN`] bytes).
pub fn encode(id: &str, n: u64, keep_from: u64, entries: &[JournalEntry]) -> Bytes {
    let data_len: usize = entries
        .iter()
        .map(|e| match e {
            JournalEntry::Data { data, .. } => data.len(),
            _ => 0,
        })
        .sum();
    let mut out =
        BytesMut::with_capacity(HEADER_LEN + entries.len() * ENTRY_LEN + data_len + SUM_LEN);
    out.put_slice(MAGIC);
    let mut id_field = [b' '; ID_LEN];
    let id = id.as_bytes();
    let take = id.len().min(ID_LEN);
    id_field[..take].copy_from_slice(&id[..take]);
    out.put_slice(&id_field);
    // A record never holds 4 billion entries: the cache caps a record's data.
    out.put_u32_le(entries.len() as u32);
    out.put_u64_le(n);
    out.put_u64_le(keep_from);
    for e in entries {
        let (kind, offset, len) = match e {
            JournalEntry::Settled { offset, len } => (KIND_SETTLED, *offset, *len),
            JournalEntry::Zero { offset, len } => (KIND_ZERO, *offset, *len),
            JournalEntry::Data { offset, data } => (KIND_DATA, *offset, data.len() as u64),
        };
        out.put_u32_le(kind);
        out.put_u32_le(0);
        out.put_u64_le(offset);
        out.put_u64_le(len);
    }
    for e in entries {
        if let JournalEntry::Data { data, .. } = e {
            out.put_slice(data);
        }
    }
    let sum = crc32fast::hash(&out);
    out.put_u32_le(sum);
    out.freeze()
}

/// What an entry of a decoded record does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Earlier records no longer apply here.
    Settled,
    /// Reads as zeroes.
    Zero,
    /// The record's bytes from this position in the record object.
    Data(u64),
}

/// A record's header and entries (its data stays in the object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The volume id it was written for.
    pub id: String,
    /// Its number.
    pub n: u64,
    /// The oldest record still needed when it was written.
    pub keep_from: u64,
    /// Its entries in order: offset, length, what happens there.
    pub entries: Vec<(u64, u64, Change)>,
}

/// Decodes and checks a record of a volume of `size` bytes. The error says what is wrong.
pub fn decode(raw: &[u8], size: u64) -> Result<Record, String> {
    if raw.len() < HEADER_LEN + SUM_LEN {
        return Err(format!("only {} bytes long", raw.len()));
    }
    if &raw[..8] != MAGIC {
        return Err("not a journal record (bad magic)".to_owned());
    }
    let body = raw.len() - SUM_LEN;
    let sum = u32_at(raw, body);
    if crc32fast::hash(&raw[..body]) != sum {
        return Err("checksum mismatch (the record is damaged)".to_owned());
    }
    let id = std::str::from_utf8(&raw[8..8 + ID_LEN])
        .map_err(|_| "volume id is not ASCII".to_owned())?
        .trim_end()
        .to_owned();
    let count = u32_at(raw, 44) as usize;
    let n = u64_at(raw, 48);
    let keep_from = u64_at(raw, 56);
    if keep_from > n {
        return Err(format!("keep_from {keep_from} is past its own number {n}"));
    }
    let table_end = count
        .checked_mul(ENTRY_LEN)
        .and_then(|t| t.checked_add(HEADER_LEN))
        .filter(|&e| e <= body)
        .ok_or_else(|| format!("{count} entries do not fit in {} bytes", raw.len()))?;
    let mut pos = table_end as u64;
    let mut entries = Vec::with_capacity(count);
    for i in 0..count {
        let at = HEADER_LEN + i * ENTRY_LEN;
        let kind = u32_at(raw, at);
        let offset = u64_at(raw, at + 8);
        let len = u64_at(raw, at + 16);
        if offset.checked_add(len).is_none_or(|end| end > size) || len == 0 {
            return Err(format!(
                "entry {i} (offset {offset}, length {len}) is empty or past the volume's {size} bytes"
            ));
        }
        let change = match kind {
            KIND_SETTLED => Change::Settled,
            KIND_ZERO => Change::Zero,
            KIND_DATA => {
                let at = pos;
                pos = pos
                    .checked_add(len)
                    .filter(|&p| p <= body as u64)
                    .ok_or_else(|| format!("entry {i}'s {len} bytes run past the record"))?;
                Change::Data(at)
            }
            k => return Err(format!("entry {i} has unknown kind {k}")),
        };
        entries.push((offset, len, change));
    }
    if pos != body as u64 {
        return Err(format!(
            "{} bytes after the last entry's data",
            body as u64 - pos
        ));
    }
    Ok(Record {
        id,
        n,
        keep_from,
        entries,
    })
}

/// Where the final content of a byte range comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Zeroes.
    Zero,
    /// Record `n`'s bytes from position `pos` of its object.
    Data {
        /// The record.
        n: u64,
        /// Where the range's first byte is in the record object.
        pos: u64,
    },
}

impl Source {
    /// The source of the byte `by` bytes further on.
    pub fn advanced_by(self, by: u64) -> Source {
        match self {
            Source::Zero => Source::Zero,
            Source::Data { n, pos } => Source::Data { n, pos: pos + by },
        }
    }
}

/// The final source of every byte that records change: records are folded in oldest first,
/// so a later entry replaces what earlier ones said of the same bytes, and a settled range
/// reverts to what the storage holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// start → (end, source); ranges are disjoint and non-empty.
    ranges: BTreeMap<u64, (u64, Source)>,
}

impl Overlay {
    /// Folds in a record's entries, after everything folded in so far.
    pub fn apply(&mut self, record: &Record) {
        for &(offset, len, change) in &record.entries {
            let end = offset + len;
            self.cut(offset, end);
            match change {
                Change::Settled => {}
                Change::Zero => {
                    self.ranges.insert(offset, (end, Source::Zero));
                }
                Change::Data(pos) => {
                    self.ranges
                        .insert(offset, (end, Source::Data { n: record.n, pos }));
                }
            }
        }
    }

    /// Removes `start..end` from every range, keeping what lies outside it.
    fn cut(&mut self, start: u64, end: u64) {
        let mut hit: Vec<u64> = Vec::new();
        if let Some((&s, &(e, _))) = self.ranges.range(..start).next_back()
            && e > start
        {
            hit.push(s);
        }
        hit.extend(self.ranges.range(start..end).map(|(&s, _)| s));
        for s in hit {
            let Some((e, src)) = self.ranges.remove(&s) else {
                continue;
            };
            if s < start {
                self.ranges.insert(s, (start, src));
            }
            if e > end {
                self.ranges.insert(end, (e, src.advanced_by(end - s)));
            }
        }
    }

    /// True if no byte changes.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The ranges in order: start, end, source.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, Source)> + '_ {
        self.ranges.iter().map(|(&s, &(e, src))| (s, e, src))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0e0a1c5e-2a3b-4c6d-8e9f-0a1b2c3d4e5f";

    fn data(offset: u64, b: &[u8]) -> JournalEntry {
        JournalEntry::Data {
            offset,
            data: Bytes::copy_from_slice(b),
        }
    }

    #[test]
    fn records_round_trip() {
        let entries = vec![
            JournalEntry::Settled {
                offset: 0,
                len: 4096,
            },
            JournalEntry::Zero {
                offset: 8192,
                len: 512,
            },
            data(100, b"hello"),
            data(200, b"world!"),
        ];
        let raw = encode(ID, 7, 3, &entries);
        let r = decode(&raw, 1 << 20).unwrap();
        assert_eq!(r.id, ID);
        assert_eq!((r.n, r.keep_from), (7, 3));
        let first_data = (HEADER_LEN + 4 * ENTRY_LEN) as u64;
        assert_eq!(
            r.entries,
            vec![
                (0, 4096, Change::Settled),
                (8192, 512, Change::Zero),
                (100, 5, Change::Data(first_data)),
                (200, 6, Change::Data(first_data + 5)),
            ]
        );
        let at = first_data as usize;
        assert_eq!(&raw[at..at + 11], b"helloworld!");
    }

    #[test]
    fn damaged_or_foreign_records_are_refused_with_the_reason() {
        let raw = encode(ID, 1, 1, &[data(0, b"abc")]).to_vec();
        let mut flipped = raw.clone();
        flipped[HEADER_LEN + ENTRY_LEN] ^= 1;
        assert_eq!(
            decode(&flipped, 4096).unwrap_err(),
            "checksum mismatch (the record is damaged)"
        );
        assert_eq!(decode(&raw[..20], 4096).unwrap_err(), "only 20 bytes long");
        let mut magic = raw.clone();
        magic[0] = b'X';
        assert_eq!(
            decode(&magic, 4096).unwrap_err(),
            "not a journal record (bad magic)"
        );
        assert_eq!(
            decode(&raw, 2).unwrap_err(),
            "entry 0 (offset 0, length 3) is empty or past the volume's 2 bytes"
        );
        let past = encode(ID, 1, 2, &[]);
        assert_eq!(
            decode(&past, 4096).unwrap_err(),
            "keep_from 2 is past its own number 1"
        );
    }

    #[test]
    fn a_forged_entry_table_cannot_point_outside_the_record() {
        // A table that claims more data than the record holds, with a valid checksum.
        let mut raw = encode(ID, 1, 1, &[data(0, b"abc")]).to_vec();
        raw.truncate(raw.len() - SUM_LEN);
        raw[HEADER_LEN + 16..HEADER_LEN + 24].copy_from_slice(&1000u64.to_le_bytes());
        let sum = crc32fast::hash(&raw);
        raw.extend_from_slice(&sum.to_le_bytes());
        assert_eq!(
            decode(&raw, 1 << 20).unwrap_err(),
            "entry 0's 1000 bytes run past the record"
        );
        let mut count = encode(ID, 1, 1, &[]).to_vec();
        count.truncate(count.len() - SUM_LEN);
        count[44..48].copy_from_slice(&u32::MAX.to_le_bytes());
        let sum = crc32fast::hash(&count);
        count.extend_from_slice(&sum.to_le_bytes());
        assert_eq!(
            decode(&count, 1 << 20).unwrap_err(),
            "4294967295 entries do not fit in 68 bytes"
        );
    }

    #[test]
    fn record_keys_parse_only_canonical_numbers() {
        assert_eq!(record_key("vm1", 12), "vm1.12.journal");
        assert_eq!(record_number("vm1.", "vm1.12.journal"), Some(12));
        assert_eq!(record_number("vm1.", "vm1.0.journal"), Some(0));
        assert_eq!(record_number("vm1.", "vm1.012.journal"), None);
        assert_eq!(record_number("vm1.", "vm1.12.chunk"), None);
        assert_eq!(record_number("vm1.", "vm1.x.journal"), None);
    }

    fn rec(n: u64, entries: Vec<(u64, u64, Change)>) -> Record {
        Record {
            id: ID.to_owned(),
            n,
            keep_from: 0,
            entries,
        }
    }

    #[test]
    fn later_entries_replace_earlier_ones_and_settled_ranges_fall_back_to_storage() {
        let mut o = Overlay::default();
        o.apply(&rec(1, vec![(0, 100, Change::Data(1000))]));
        o.apply(&rec(2, vec![(40, 20, Change::Zero)]));
        assert_eq!(
            o.iter().collect::<Vec<_>>(),
            vec![
                (0, 40, Source::Data { n: 1, pos: 1000 }),
                (40, 60, Source::Zero),
                (60, 100, Source::Data { n: 1, pos: 1060 }),
            ]
        );
        o.apply(&rec(
            3,
            vec![(30, 40, Change::Settled), (90, 20, Change::Data(64))],
        ));
        assert_eq!(
            o.iter().collect::<Vec<_>>(),
            vec![
                (0, 30, Source::Data { n: 1, pos: 1000 }),
                (70, 90, Source::Data { n: 1, pos: 1070 }),
                (90, 110, Source::Data { n: 3, pos: 64 }),
            ]
        );
        o.apply(&rec(4, vec![(0, 200, Change::Settled)]));
        assert!(o.is_empty());
    }

    #[test]
    fn the_overlay_matches_applying_records_byte_by_byte() {
        // A model: apply random entries to an array of "sources" directly, and compare.
        let mut rng = 0x1234_5678_9abc_def0u64;
        let mut next = |m: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % m
        };
        const SIZE: u64 = 256;
        for _ in 0..200 {
            let mut o = Overlay::default();
            let mut model: Vec<Option<Source>> = vec![None; SIZE as usize];
            for n in 1..=6 {
                let mut entries = Vec::new();
                for _ in 0..next(5) {
                    let offset = next(SIZE);
                    let len = 1 + next(SIZE - offset);
                    let change = match next(3) {
                        0 => Change::Settled,
                        1 => Change::Zero,
                        _ => Change::Data(next(10_000)),
                    };
                    entries.push((offset, len, change));
                    for b in offset..offset + len {
                        model[b as usize] = match change {
                            Change::Settled => None,
                            Change::Zero => Some(Source::Zero),
                            Change::Data(pos) => Some(Source::Data {
                                n,
                                pos: pos + b - offset,
                            }),
                        };
                    }
                }
                o.apply(&rec(n, entries));
            }
            let mut seen: Vec<Option<Source>> = vec![None; SIZE as usize];
            let mut last_end = 0;
            for (s, e, src) in o.iter() {
                assert!(s < e && s >= last_end, "ranges overlap or are empty");
                last_end = e;
                for b in s..e {
                    seen[b as usize] = Some(src.advanced_by(b - s));
                }
            }
            assert_eq!(seen, model);
        }
    }
}
