//! Shared harness for the nbd-rs fuzz targets: an in-memory connection, a small export table,
//! a paused-clock runtime, and checks on what the server writes back.
//!
//! Every target runs the server against one end of a `tokio::io::duplex`; the fuzz input is
//! written into the other end, which is then closed, and everything the server writes is read
//! until it closes its end. With the input closed the server has nothing left to wait for, so
//! a connection still open after [`HANG`] of (virtual) time is a hang: the target panics with a
//! message starting with `HANG:` and libFuzzer keeps the input as a crash artifact.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use nbd_rs::block::BlockDevice;
use nbd_rs::config::model::Allowed;
use nbd_rs::export::{Clients, Export, ExportTable};
use nbd_rs::layout::raw::MemoryImage;
use nbd_rs::nbd::Connection;
use nbd_rs::nbd::proto::{
    EXTENDED_REPLY_MAGIC, IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC, info, opt, rep, reply,
};
use nbd_rs::nbd::wire::ReplyMode;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

/// How long, in the runtime's virtual time, a connection may stay open once the client's
/// bytes are all sent and closed.
pub const HANG: Duration = Duration::from_secs(1);

/// The address the fuzzed client connects from.
pub const CLIENT_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

/// Size of the in-memory pipe between client and server, each way.
pub const PIPE: usize = 64 * 1024;

/// A current-thread runtime whose clock is paused: timers fire as soon as nothing else can run,
/// so a stalled connection shows up immediately and the same way on a loaded machine.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime")
}

/// The exports:
/// - `a`: 1 MiB, writable, everyone may use it (also the default export, name `""`);
/// - `b`: 64 KiB, read-only, allowed to 192.0.2.0/24 (the fuzzed client's network);
/// - `c`: 64 KiB, writable, allowed to 10.0.0.0/8 only: the client must never see or get it.
pub fn exports() -> ArcSwap<ExportTable> {
    fn export(name: &str, size: u64, ro: bool, desc: &str, allow: Option<&str>) -> Arc<Export> {
        let device: Arc<dyn BlockDevice> = Arc::new(MemoryImage::new(size, ro));
        Arc::new(Export {
            name: name.into(),
            description: desc.into(),
            block_sizes: device.info().block_sizes,
            device,
            allow: allow.map(|a| vec![Allowed::parse(a).expect("allow entry")]),
            allow_names: None,
            clients: Clients::default(),
        })
    }
    ArcSwap::from_pointee(ExportTable::new(vec![
        export("a", 1 << 20, false, "fuzz disk a", None),
        export("b", 64 << 10, true, "", Some("192.0.2.0/24")),
        export("c", 64 << 10, false, "hidden", Some("10.0.0.0/8")),
    ]))
}

/// The name of the export the client may never see.
pub const HIDDEN: &str = "c";

/// A duplex stream as an nbd-rs [`Connection`] (split with `tokio::io::split`, like TLS).
pub struct Pipe(pub DuplexStream);

impl AsyncRead for Pipe {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Pipe {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Connection for Pipe {
    type Read = tokio::io::ReadHalf<DuplexStream>;
    type Write = tokio::io::WriteHalf<DuplexStream>;
    fn halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self.0)
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}
fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().expect("2 bytes"))
}

/// Checks the greeting at the front of the server's handshake output and returns the rest.
pub fn check_greeting(out: &[u8]) -> &[u8] {
    assert!(out.len() >= 18, "greeting cut short: {} bytes", out.len());
    assert_eq!(be64(&out[0..]), NBDMAGIC, "greeting magic");
    assert_eq!(be64(&out[8..]), IHAVEOPT, "greeting newstyle magic");
    &out[18..]
}

/// Checks one option reply's data; panics on a malformed one.
pub fn check_option_reply(option: u32, kind: u32, data: &[u8]) {
    match kind {
        rep::ACK => assert!(data.is_empty(), "ACK with data to option {option}"),
        rep::SERVER => {
            assert_eq!(option, opt::LIST, "NBD_REP_SERVER to option {option}");
            assert!(data.len() >= 4, "short NBD_REP_SERVER");
            let n = be32(data) as usize;
            assert!(n <= data.len() - 4, "NBD_REP_SERVER name longer than the reply");
            let name = &data[4..4 + n];
            assert_ne!(name, HIDDEN.as_bytes(), "LIST shows an export the client may not see");
        }
        rep::INFO => {
            assert!(
                option == opt::INFO || option == opt::GO,
                "NBD_REP_INFO to option {option}"
            );
            assert!(data.len() >= 2, "short NBD_REP_INFO");
            match be16(data) {
                info::EXPORT => assert_eq!(data.len(), 12, "NBD_INFO_EXPORT length"),
                info::BLOCK_SIZE => {
                    assert_eq!(data.len(), 14, "NBD_INFO_BLOCK_SIZE length");
                    let (min, pref, max) = (be32(&data[2..]), be32(&data[6..]), be32(&data[10..]));
                    assert!(
                        min.is_power_of_two() && pref >= min && max >= pref,
                        "bad block sizes {min} {pref} {max}"
                    );
                }
                info::NAME => {
                    assert_ne!(&data[2..], HIDDEN.as_bytes(), "INFO names a hidden export")
                }
                info::DESCRIPTION => {}
                t => panic!("unknown NBD_INFO type {t}"),
            }
        }
        rep::META_CONTEXT => {
            assert!(
                option == opt::LIST_META_CONTEXT || option == opt::SET_META_CONTEXT,
                "NBD_REP_META_CONTEXT to option {option}"
            );
            assert!(data.len() > 4, "short NBD_REP_META_CONTEXT");
        }
        k if k & 0x8000_0000 != 0 => {}
        k => panic!("unknown option reply type {k:#x} to option {option}"),
    }
}

/// Walks a whole option-phase output (after the greeting): option replies, possibly ended by
/// the EXPORT_NAME answer (8 + 2 bytes, plus 124 zeroes unless `no_zeroes`). Returns the
/// number of replies.
pub fn check_option_stream(mut rest: &[u8], no_zeroes: bool) -> usize {
    let mut n = 0;
    while !rest.is_empty() {
        if rest.len() >= 8 && be64(rest) == OPTION_REPLY_MAGIC {
            assert!(rest.len() >= 20, "option reply header cut short");
            let (option, kind, len) = (be32(&rest[8..]), be32(&rest[12..]), be32(&rest[16..]));
            let len = len as usize;
            assert!(rest.len() - 20 >= len, "option reply data cut short");
            check_option_reply(option, kind, &rest[20..20 + len]);
            rest = &rest[20 + len..];
            n += 1;
        } else {
            // Only the EXPORT_NAME answer may be something else, and it ends the handshake.
            let want = if no_zeroes { 10 } else { 134 };
            assert_eq!(
                rest.len(),
                want,
                "bytes that are not an option reply: {:02x?}",
                &rest[..rest.len().min(32)]
            );
            assert!(rest[10..].iter().all(|&b| b == 0), "EXPORT_NAME padding not zero");
            rest = &[];
        }
    }
    n
}

/// Checks a stream of transmission replies in structured or extended mode, fed in pieces as
/// they are read (a READ reply may be megabytes; its data is skipped, not kept).
pub struct ChunkChecker {
    mode: ReplyMode,
    hdr: Vec<u8>,
    /// Payload bytes to skip (OFFSET_DATA).
    skip: u64,
    /// A small payload being gathered for checking: its chunk type and wanted length.
    small: Option<(u16, usize)>,
    body: Vec<u8>,
    /// Replies completed (simple replies and chunks with the DONE flag).
    pub replies: u64,
}

impl ChunkChecker {
    /// A checker for this (structured or extended) mode.
    pub fn new(mode: ReplyMode) -> Self {
        assert!(mode != ReplyMode::Simple);
        ChunkChecker {
            mode,
            hdr: Vec::with_capacity(32),
            skip: 0,
            small: None,
            body: Vec::new(),
            replies: 0,
        }
    }

    fn header_len(&self) -> usize {
        if self.hdr.len() < 4 {
            return 4;
        }
        match be32(&self.hdr) {
            SIMPLE_REPLY_MAGIC => {
                assert_eq!(self.mode, ReplyMode::Structured, "simple reply with extended headers");
                16
            }
            STRUCTURED_REPLY_MAGIC => {
                assert_eq!(self.mode, ReplyMode::Structured, "compact chunk with extended headers");
                20
            }
            EXTENDED_REPLY_MAGIC => {
                assert_eq!(self.mode, ReplyMode::Extended, "extended chunk without extended headers");
                32
            }
            m => panic!("bad reply magic {m:#010x}"),
        }
    }

    fn header_done(&mut self) {
        let h = std::mem::take(&mut self.hdr);
        if be32(&h) == SIMPLE_REPLY_MAGIC {
            self.replies += 1;
            self.hdr = h;
            self.hdr.clear();
            return;
        }
        let flags = be16(&h[4..]);
        let kind = be16(&h[6..]);
        let len = if self.mode == ReplyMode::Extended {
            be64(&h[24..])
        } else {
            u64::from(be32(&h[16..]))
        };
        assert!(flags & !1 == 0, "unknown reply flags {flags:#x}");
        if flags & 1 != 0 {
            self.replies += 1;
        }
        match kind {
            reply::NONE => {
                assert_eq!(len, 0, "NBD_REPLY_TYPE_NONE with payload");
                assert!(flags & 1 != 0, "NBD_REPLY_TYPE_NONE without DONE");
            }
            reply::OFFSET_DATA => {
                assert!(len >= 9, "OFFSET_DATA chunk of {len} bytes");
                self.skip = len;
            }
            reply::OFFSET_HOLE => {
                assert_eq!(len, 12, "OFFSET_HOLE length");
                self.small = Some((kind, 12));
            }
            reply::BLOCK_STATUS => {
                assert_eq!(self.mode, ReplyMode::Structured, "32-bit block status with extended headers");
                assert!(len >= 12 && (len - 4) % 8 == 0, "BLOCK_STATUS chunk of {len} bytes");
                assert!(len < 1 << 24, "BLOCK_STATUS chunk of {len} bytes");
                self.small = Some((kind, len as usize));
            }
            reply::BLOCK_STATUS_EXT => {
                assert_eq!(self.mode, ReplyMode::Extended, "64-bit block status without extended headers");
                assert!(len >= 24 && (len - 8) % 16 == 0, "BLOCK_STATUS_EXT chunk of {len} bytes");
                assert!(len < 1 << 24, "BLOCK_STATUS_EXT chunk of {len} bytes");
                self.small = Some((kind, len as usize));
            }
            reply::ERROR => {
                assert!((6..=6 + 4096).contains(&len), "ERROR chunk of {len} bytes");
                self.small = Some((kind, len as usize));
            }
            k => panic!("unknown reply chunk type {k:#x}"),
        }
        self.hdr = h;
        self.hdr.clear();
    }

    fn body_done(&mut self, kind: u16) {
        let b = std::mem::take(&mut self.body);
        match kind {
            reply::OFFSET_HOLE => assert_ne!(be32(&b[8..]), 0, "empty hole"),
            reply::BLOCK_STATUS => {
                assert_eq!(be32(&b), 1, "block status for an unknown context id");
                for e in b[4..].chunks_exact(8) {
                    assert_ne!(be32(e), 0, "zero-length extent");
                }
            }
            reply::BLOCK_STATUS_EXT => {
                assert_eq!(be32(&b), 1, "block status for an unknown context id");
                let count = be32(&b[4..]) as usize;
                assert_eq!(count, (b.len() - 8) / 16, "extent count does not match the length");
                for e in b[8..].chunks_exact(16) {
                    assert_ne!(be64(e), 0, "zero-length extent");
                }
            }
            reply::ERROR => {
                assert_ne!(be32(&b), 0, "ERROR chunk with error 0");
                let n = usize::from(be16(&b[4..]));
                assert_eq!(n, b.len() - 6, "ERROR message length does not match the chunk");
            }
            _ => unreachable!(),
        }
        self.body = b;
        self.body.clear();
    }

    /// Feeds the next bytes read from the server.
    pub fn feed(&mut self, mut b: &[u8]) {
        while !b.is_empty() {
            if self.skip > 0 {
                let n = (self.skip.min(b.len() as u64)) as usize;
                self.skip -= n as u64;
                b = &b[n..];
                continue;
            }
            if let Some((kind, want)) = self.small {
                let n = (want - self.body.len()).min(b.len());
                self.body.extend_from_slice(&b[..n]);
                b = &b[n..];
                if self.body.len() == want {
                    self.small = None;
                    self.body_done(kind);
                }
                continue;
            }
            let want = self.header_len();
            let n = (want - self.hdr.len()).min(b.len());
            self.hdr.extend_from_slice(&b[..n]);
            b = &b[n..];
            if self.hdr.len() == self.header_len() {
                self.header_done();
            }
        }
    }

    /// The server closed: the stream must not end inside a reply.
    pub fn finish(&self) {
        assert!(
            self.hdr.is_empty() && self.skip == 0 && self.small.is_none(),
            "reply stream ends inside a reply"
        );
    }
}

/// Appends an option request.
pub fn put_option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Option data for INFO/GO: the name and no information requests.
pub fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// Option data for LIST/SET_META_CONTEXT.
pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}
