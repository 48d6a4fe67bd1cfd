//! The transmission-phase wire format, without I/O: request headers in, reply frames out.

use crate::block::FileRange;
use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::proto::{
    EXTENDED_REPLY_MAGIC, EXTENDED_REQUEST_MAGIC, REPLY_FLAG_DONE, REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, cflag, cmd, reply,
};

/// Size of a compact request header.
pub const COMPACT_REQUEST_LEN: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;

/// How replies are framed on a connection, fixed at the end of the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    /// 16-byte simple replies only.
    Simple,
    /// Structured replies with 20-byte chunk headers (and simple replies where allowed).
    Structured,
    /// Extended headers: 32-byte requests and 32-byte chunk headers, nothing else.
    Extended,
}

impl ReplyMode {
    /// Size of a request header in this mode.
    pub fn request_len(self) -> usize {
        match self {
            ReplyMode::Extended => EXTENDED_REQUEST_LEN,
            _ => COMPACT_REQUEST_LEN,
        }
    }

    /// True if structured (or extended) chunks are in use.
    pub fn structured(self) -> bool {
        self != ReplyMode::Simple
    }
}

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length: the effect length, or the payload length for writes (and, in extended mode,
    /// whenever `PAYLOAD_LEN` is set).
    pub length: u64,
    /// Bytes of payload that follow the header on the wire.
    pub payload: u64,
}

/// A request header that cannot be understood: the stream is out of sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x}")]
pub struct BadMagic(pub u32);

/// Parses one request header from the front of `buf`, if it holds a whole one, and consumes it.
pub fn parse_request(buf: &mut BytesMut, mode: ReplyMode) -> Result<Option<Request>, BadMagic> {
    let need = mode.request_len();
    if buf.len() < need {
        return Ok(None);
    }
    let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let want = if mode == ReplyMode::Extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != want {
        return Err(BadMagic(magic));
    }
    let mut h = buf.split_to(need);
    h.advance(4);
    let flags = h.get_u16();
    let kind = h.get_u16();
    let cookie = h.get_u64();
    let offset = h.get_u64();
    let (length, payload) = if mode == ReplyMode::Extended {
        let length = h.get_u64();
        // A write always carries its data; qemu 10 does not set PAYLOAD_LEN on writes.
        let payload = if flags & cflag::PAYLOAD_LEN != 0 || kind == cmd::WRITE {
            length
        } else {
            0
        };
        (length, payload)
    } else {
        let length = u64::from(h.get_u32());
        let payload = if kind == cmd::WRITE { length } else { 0 };
        (length, payload)
    };
    Ok(Some(Request {
        flags,
        kind,
        cookie,
        offset,
        length,
        payload,
    }))
}

/// Encodes a request header (for tests and tools that play the client).
pub fn encode_request(buf: &mut BytesMut, mode: ReplyMode, r: &Request) {
    if mode == ReplyMode::Extended {
        buf.put_u32(EXTENDED_REQUEST_MAGIC);
    } else {
        buf.put_u32(REQUEST_MAGIC);
    }
    buf.put_u16(r.flags);
    buf.put_u16(r.kind);
    buf.put_u64(r.cookie);
    buf.put_u64(r.offset);
    if mode == ReplyMode::Extended {
        buf.put_u64(r.length);
    } else {
        buf.put_u32(r.length as u32);
    }
}

/// Encodes a 16-byte simple reply header.
pub fn simple_reply(buf: &mut BytesMut, error: u32, cookie: u64) {
    buf.put_u32(SIMPLE_REPLY_MAGIC);
    buf.put_u32(error);
    buf.put_u64(cookie);
}

/// Encodes a structured (20-byte) or extended (32-byte) chunk header. `offset` is the
/// request's offset (extended headers echo it). Must not be called in simple mode.
pub fn chunk_header(
    buf: &mut BytesMut,
    mode: ReplyMode,
    done: bool,
    kind: u16,
    cookie: u64,
    offset: u64,
    payload_len: u64,
) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    if mode == ReplyMode::Extended {
        buf.put_u32(EXTENDED_REPLY_MAGIC);
        buf.put_u16(flags);
        buf.put_u16(kind);
        buf.put_u64(cookie);
        buf.put_u64(offset);
        buf.put_u64(payload_len);
    } else {
        debug_assert_eq!(mode, ReplyMode::Structured);
        buf.put_u32(STRUCTURED_REPLY_MAGIC);
        buf.put_u16(flags);
        buf.put_u16(kind);
        buf.put_u64(cookie);
        // Structured chunks never exceed the maximum payload plus a few bytes of fixed part.
        buf.put_u32(payload_len as u32);
    }
}

/// The frames of one reply: header and payload pieces, written in order with one vectored
/// write together with other replies, then possibly payload bytes sent from a file.
#[derive(Debug, Default)]
pub struct Frames {
    /// Pieces in wire order.
    pub parts: Vec<Bytes>,
    /// Payload that follows `parts`, sent from the page cache with `sendfile(2)`.
    pub tail: Option<FileRange>,
    /// How many bytes of `parts` are mapped from a file (`block::mapped`), for the closing line.
    pub mapped: u32,
}

impl Frames {
    /// Frames of these pieces only.
    pub fn of(parts: Vec<Bytes>) -> Frames {
        Frames {
            parts,
            tail: None,
            mapped: 0,
        }
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum::<usize>()
            + self.tail.as_ref().map_or(0, |t| t.len as usize)
    }

    /// True if there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A successful reply without payload.
pub fn ok_reply(mode: ReplyMode, cookie: u64, offset: u64) -> Frames {
    let mut b = BytesMut::with_capacity(32);
    match mode {
        // Simple replies are allowed for non-READ success in structured mode, and are shorter.
        ReplyMode::Simple | ReplyMode::Structured => simple_reply(&mut b, 0, cookie),
        ReplyMode::Extended => chunk_header(&mut b, mode, true, reply::NONE, cookie, offset, 0),
    }
    Frames::of(vec![b.freeze()])
}

/// An error reply. In structured and extended modes it is an `NBD_REPLY_TYPE_ERROR` chunk
/// carrying `message` (cut to fit), which clients show to users.
pub fn error_reply(mode: ReplyMode, cookie: u64, offset: u64, error: u32, message: &str) -> Frames {
    let mut b = BytesMut::with_capacity(64 + message.len());
    match mode {
        ReplyMode::Simple => simple_reply(&mut b, error, cookie),
        ReplyMode::Structured | ReplyMode::Extended => {
            let msg = truncate_utf8(message, 1024);
            chunk_header(
                &mut b,
                mode,
                true,
                reply::ERROR,
                cookie,
                offset,
                6 + msg.len() as u64,
            );
            b.put_u32(error);
            b.put_u16(msg.len() as u16);
            b.put_slice(msg.as_bytes());
        }
    }
    Frames::of(vec![b.freeze()])
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_request_round_trips_and_only_write_has_payload() {
        for kind in [cmd::READ, cmd::WRITE, cmd::TRIM] {
            let r = Request {
                flags: cflag::FUA,
                kind,
                cookie: 0x0102_0304_0506_0708,
                offset: 1 << 40,
                length: 4096,
                payload: if kind == cmd::WRITE { 4096 } else { 0 },
            };
            let mut b = BytesMut::new();
            encode_request(&mut b, ReplyMode::Structured, &r);
            assert_eq!(b.len(), COMPACT_REQUEST_LEN);
            b.put_slice(b"tail");
            assert_eq!(parse_request(&mut b, ReplyMode::Structured), Ok(Some(r)));
            assert_eq!(&b[..], b"tail");
        }
    }

    #[test]
    fn extended_request_payload_follows_payload_len_flag() {
        let mut r = Request {
            flags: cflag::PAYLOAD_LEN,
            kind: cmd::WRITE,
            cookie: 7,
            offset: 0,
            length: 1 << 33,
            payload: 1 << 33,
        };
        let mut b = BytesMut::new();
        encode_request(&mut b, ReplyMode::Extended, &r);
        assert_eq!(b.len(), EXTENDED_REQUEST_LEN);
        assert_eq!(parse_request(&mut b, ReplyMode::Extended), Ok(Some(r)));
        r.flags = 0;
        r.kind = cmd::WRITE_ZEROES;
        r.payload = 0;
        encode_request(&mut b, ReplyMode::Extended, &r);
        assert_eq!(parse_request(&mut b, ReplyMode::Extended), Ok(Some(r)));
    }

    #[test]
    fn partial_header_waits_and_bad_magic_is_reported() {
        let mut b = BytesMut::from(&[0x25u8, 0x60, 0x95][..]);
        assert_eq!(parse_request(&mut b, ReplyMode::Simple), Ok(None));
        let mut b = BytesMut::from(&[0xffu8; 28][..]);
        assert_eq!(
            parse_request(&mut b, ReplyMode::Simple),
            Err(BadMagic(0xffff_ffff))
        );
        // A compact magic on an extended connection is out of sync too.
        let mut b = BytesMut::new();
        encode_request(
            &mut b,
            ReplyMode::Simple,
            &Request {
                flags: 0,
                kind: 0,
                cookie: 0,
                offset: 0,
                length: 0,
                payload: 0,
            },
        );
        b.put_slice(&[0; 4]);
        assert_eq!(
            parse_request(&mut b, ReplyMode::Extended),
            Err(BadMagic(REQUEST_MAGIC))
        );
    }

    #[test]
    fn reply_layouts_match_the_spec() {
        let f = ok_reply(ReplyMode::Simple, 9, 0);
        assert_eq!(
            &f.parts[0][..],
            &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]
        );
        let f = ok_reply(ReplyMode::Extended, 9, 512);
        let h = &f.parts[0];
        assert_eq!(h.len(), 32);
        assert_eq!(&h[0..4], &[0x6e, 0x8a, 0x27, 0x8c]);
        assert_eq!(&h[4..6], &[0, 1]); // DONE
        assert_eq!(&h[6..8], &[0, 0]); // NONE
        assert_eq!(&h[16..24], &512u64.to_be_bytes());
        assert_eq!(&h[24..32], &0u64.to_be_bytes());

        let f = error_reply(ReplyMode::Structured, 3, 0, 22, "bad");
        let h = &f.parts[0];
        assert_eq!(h.len(), 20 + 6 + 3);
        assert_eq!(&h[0..4], &[0x66, 0x8e, 0x33, 0xef]);
        assert_eq!(&h[6..8], &[0x80, 0x01]);
        assert_eq!(&h[16..20], &9u32.to_be_bytes());
        assert_eq!(&h[20..24], &22u32.to_be_bytes());
        assert_eq!(&h[24..26], &3u16.to_be_bytes());
        assert_eq!(&h[26..], b"bad");

        let f = error_reply(ReplyMode::Simple, 3, 0, 28, "ignored");
        assert_eq!(&f.parts[0][4..8], &28u32.to_be_bytes());
        assert_eq!(f.len(), 16);
    }

    #[test]
    fn truncation_respects_characters() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("héllo", 3), "hé");
        assert_eq!(truncate_utf8("abc", 10), "abc");
    }
}
