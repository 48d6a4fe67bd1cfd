//! Raw-socket protocol tests: everything well-behaved clients (libnbd, qemu) never send.
//!
//! Every test starts its own server on an ephemeral port and speaks NBD over a blocking
//! `TcpStream` with timeouts, so a hang fails instead of blocking. Requests and options are
//! encoded here from the specification, independently of the server's own wire module, so a
//! bug shared by encoder and decoder cannot hide.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Constants, from the NBD protocol specification (doc/proto.md).

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const EXT_REPLY_MAGIC: u32 = 0x6e8a_278c;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;
const OPT_EXTENDED_HEADERS: u32 = 11;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
const REP_ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;

const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
const INFO_BLOCK_SIZE: u16 = 3;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_CACHE: u16 = 5;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;

const CMD_FLAG_FUA: u16 = 0x01;
const CMD_FLAG_NO_HOLE: u16 = 0x02;
const CMD_FLAG_DF: u16 = 0x04;
const CMD_FLAG_REQ_ONE: u16 = 0x08;
const CMD_FLAG_FAST_ZERO: u16 = 0x10;
const CMD_FLAG_PAYLOAD_LEN: u16 = 0x20;

const REPLY_FLAG_DONE: u16 = 1;
const TYPE_NONE: u16 = 0;
const TYPE_OFFSET_DATA: u16 = 1;
const TYPE_OFFSET_HOLE: u16 = 2;
const TYPE_BLOCK_STATUS: u16 = 5;
const TYPE_BLOCK_STATUS_EXT: u16 = 6;
const TYPE_ERROR: u16 = 0x8001;

const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

const STATE_DATA: u64 = 0;
const STATE_HOLE_ZERO: u64 = 3;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
/// Size of the `disk` export.
const DISK_SIZE: u64 = 64 * MIB;
/// Size of the `ro` export.
const RO_SIZE: u64 = MIB;
/// The memory export's page: unwritten pages are holes (tests/clients/EXPECTED.md).
const PAGE: u64 = 32 * KIB;
/// The maximum payload advertised in NBD_INFO_BLOCK_SIZE.
const MAX_PAYLOAD: u64 = 32 * MIB;

/// Transmission flags of a read-write memory export (EXPECTED.md): 0xded with structured
/// replies (SEND_DF included), the same without SEND_DF otherwise.
const FLAGS_RW: u16 = 0x0ded;
const FLAGS_RW_SIMPLE: u16 = 0x0d6d;
/// Read-only memory export: HAS_FLAGS|READ_ONLY|FLUSH|FUA|MULTI_CONN|CACHE (+DF).
const FLAGS_RO: u16 = 0x058f;
const FLAGS_RO_SIMPLE: u16 = 0x050f;

const TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The server under test.

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Server {
    addr: SocketAddr,
    child: KillOnDrop,
    /// Every line the server has logged so far.
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// `disk` (64 MiB) and `ro` (1 MiB, read-only), both in memory.
    fn start() -> Server {
        Server::with_exports(&[])
    }

    /// The standard exports plus `extra` (NAME, DRIVER, CONN triples).
    fn with_exports(extra: &[[&str; 3]]) -> Server {
        Self::with_exports_env(extra, &[])
    }

    /// [`Server::with_exports`] with extra environment variables.
    fn with_exports_env(extra: &[[&str; 3]], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nbd-rs"));
        cmd.envs(env.iter().copied());
        cmd.args(["--listen", "127.0.0.1:0"])
            .args(["-e", "disk", "raw", "memory:64MiB"])
            .args(["-e", "ro", "raw", "memory:1MiB?read_only=true"]);
        for e in extra {
            cmd.arg("-e").args(e);
        }
        cmd.env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("cannot start nbd-rs");
        let stderr = child.stderr.take().expect("piped stderr");
        let guard = KillOnDrop(child);
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&log);
        thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[nbd-rs] {line}");
                lines.lock().unwrap().push(line.clone());
                if let Some(at) = line.find("listening on ")
                    && let Some(tx) = tx.take()
                {
                    let rest = &line[at + "listening on ".len()..];
                    let addr = rest.split_whitespace().next().unwrap_or("").to_owned();
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = rx
            .recv_timeout(TIMEOUT)
            .expect("the server did not log `listening on ADDR` within 10 s");
        let addr: SocketAddr = addr
            .parse()
            .unwrap_or_else(|e| panic!("bad listen address {addr:?} in the log: {e}"));
        assert!(addr.ip().is_loopback(), "listening on {addr}");
        Server {
            addr,
            child: guard,
            log,
        }
    }

    /// The lines logged so far that contain `what`.
    fn logged(&self, what: &str) -> Vec<String> {
        let log = self.log.lock().unwrap();
        log.iter().filter(|l| l.contains(what)).cloned().collect()
    }

    /// Waits for `n` connections' closing lines, and returns the counter `field` of each.
    fn closing_counts(&self, n: usize, field: &str) -> Vec<u64> {
        let deadline = Instant::now() + TIMEOUT;
        while self.logged("client disconnected").len() < n {
            assert!(
                Instant::now() < deadline,
                "no closing lines:\n{:?}",
                self.logged("")
            );
            thread::sleep(Duration::from_millis(20));
        }
        let closing = self.logged("client disconnected");
        assert_eq!(closing.len(), n, "{closing:?}");
        closing
            .iter()
            .map(|l| {
                let v = l.split(&format!("{field}=")).nth(1).expect(field);
                v.split_whitespace().next().unwrap().parse().unwrap()
            })
            .collect()
    }

    /// Sends a 1 MiB WRITE at `offset` with the first 3,000 of `data` and then the rest, and
    /// goes away partway through its payload; waits for the server to say so.
    fn write_partly_and_vanish(&self, export: &str, offset: u64, data: &[u8]) {
        let mut n = connect_go(self, export, Mode::Structured, false);
        let mut b = request_bytes(Mode::Structured, 0, CMD_WRITE, 9, offset, MIB);
        b.extend_from_slice(&data[..3000]);
        n.c.send(&b);
        thread::sleep(Duration::from_millis(100));
        n.c.send(&data[3000..]);
        thread::sleep(Duration::from_millis(100));
        drop(n);
        let deadline = Instant::now() + TIMEOUT;
        while self.logged("inside a write payload").is_empty() {
            assert!(
                Instant::now() < deadline,
                "no log line for the broken write"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    fn tcp(&self) -> TcpStream {
        let s = TcpStream::connect_timeout(&self.addr, TIMEOUT).expect("connect");
        s.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
        s.set_write_timeout(Some(TIMEOUT)).expect("write timeout");
        s.set_nodelay(true).expect("TCP_NODELAY");
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Byte helpers.

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// Deterministic nonzero test data.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (i ^ seed.rotate_left(17))
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(seed);
            ((x >> 29) as u8) | 1
        })
        .collect()
}

/// An option request: IHAVEOPT, option, length, data.
fn option_bytes(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// INFO/GO data: name length, name, request count, requests.
fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        b.extend_from_slice(&r.to_be_bytes());
    }
    b
}

/// LIST/SET_META_CONTEXT data: name length, name, query count, queries.
fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Simple,
    Structured,
    Extended,
}

/// A request header in the framing of `mode`.
fn request_bytes(mode: Mode, flags: u16, kind: u16, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    let ext = mode == Mode::Extended;
    b.extend_from_slice(
        &(if ext {
            EXT_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        })
        .to_be_bytes(),
    );
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    if ext {
        b.extend_from_slice(&len.to_be_bytes());
    } else {
        let len = u32::try_from(len).expect("compact length fits 32 bits");
        b.extend_from_slice(&len.to_be_bytes());
    }
    b
}

// ---------------------------------------------------------------------------------------------
// A raw connection in the handshake phase.

#[derive(Debug)]
struct OptReply {
    kind: u32,
    data: Vec<u8>,
}

struct Conn {
    s: TcpStream,
}

impl Conn {
    /// Connects without reading anything.
    fn raw(srv: &Server) -> Conn {
        Conn { s: srv.tcp() }
    }

    /// Connects, checks the greeting and sends `client_flags`.
    fn new(srv: &Server, client_flags: u32) -> Conn {
        let mut c = Conn::raw(srv);
        c.greeting();
        c.send(&client_flags.to_be_bytes());
        c
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send to the server");
    }

    fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s
            .read_exact(&mut b)
            .unwrap_or_else(|e| panic!("reading {n} bytes from the server: {e}"));
        b
    }

    fn greeting(&mut self) {
        let g = self.recv(18);
        assert_eq!(be64(&g[0..]), NBDMAGIC, "greeting magic: {g:02x?}");
        assert_eq!(be64(&g[8..]), IHAVEOPT, "greeting newstyle magic: {g:02x?}");
        assert_eq!(
            be16(&g[16..]),
            0x0003,
            "handshake flags must be FIXED_NEWSTYLE|NO_ZEROES"
        );
    }

    fn opt(&mut self, option: u32, data: &[u8]) {
        self.send(&option_bytes(option, data));
    }

    /// One option reply, checking the magic and the echoed option.
    fn reply(&mut self, option: u32) -> OptReply {
        let h = self.recv(20);
        assert_eq!(
            be64(&h[0..]),
            OPT_REPLY_MAGIC,
            "option reply magic: {h:02x?}"
        );
        assert_eq!(be32(&h[8..]), option, "echoed option: {h:02x?}");
        let kind = be32(&h[12..]);
        let len = be32(&h[16..]) as usize;
        assert!(len <= 64 * 1024, "option reply of {len} bytes");
        let data = self.recv(len);
        if kind & 0x8000_0000 != 0 {
            assert!(
                std::str::from_utf8(&data).is_ok(),
                "error message is not UTF-8: {data:02x?}"
            );
        }
        OptReply { kind, data }
    }

    /// Replies up to and including the final one (an ACK or an error).
    fn replies(&mut self, option: u32) -> Vec<OptReply> {
        let mut all = Vec::new();
        loop {
            let r = self.reply(option);
            let last = r.kind == REP_ACK || r.kind & 0x8000_0000 != 0;
            all.push(r);
            if last {
                return all;
            }
            assert!(all.len() < 100, "more than 100 replies to option {option}");
        }
    }

    /// Sends an option and expects exactly one reply of `kind`; returns its data.
    fn expect(&mut self, option: u32, data: &[u8], kind: u32) -> Vec<u8> {
        self.opt(option, data);
        let r = self.reply(option);
        assert_eq!(
            r.kind,
            kind,
            "option {option} with {} bytes of data: reply {:#x} ({:?}), expected {kind:#x}",
            data.len(),
            r.kind,
            String::from_utf8_lossy(&r.data)
        );
        r.data
    }

    /// The server must close the connection without sending anything more.
    fn expect_closed(&mut self, what: &str) {
        let mut buf = [0u8; 4096];
        match self.s.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!(
                "{what}: expected the server to close the connection, got {n} bytes: {:02x?}",
                &buf[..n.min(64)]
            ),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::BrokenPipe
                ) => {}
            Err(e) => panic!("{what}: expected the server to close the connection: {e}"),
        }
    }

    /// Negotiates structured replies or extended headers for `mode`.
    fn negotiate(&mut self, mode: Mode) {
        match mode {
            Mode::Simple => {}
            Mode::Structured => {
                self.expect(OPT_STRUCTURED_REPLY, &[], REP_ACK);
            }
            Mode::Extended => {
                self.expect(OPT_EXTENDED_HEADERS, &[], REP_ACK);
            }
        }
    }

    /// Optionally selects `base:allocation`, then GO; `mode` must already be negotiated.
    fn go(mut self, export: &str, mode: Mode, meta: bool) -> Nbd {
        let ctx = meta.then(|| self.set_base_allocation(export));
        self.opt(OPT_GO, &info_data(export, &[INFO_BLOCK_SIZE]));
        let replies = self.replies(OPT_GO);
        let last = replies.last().expect("at least one reply");
        assert_eq!(last.kind, REP_ACK, "GO {export:?} failed: {replies:?}");
        let info = export_info(&replies);
        Nbd {
            c: self,
            mode,
            size: info.0,
            flags: info.1,
            ctx,
            cookie: 0x1000,
        }
    }

    /// SET_META_CONTEXT base:allocation; returns the context id.
    fn set_base_allocation(&mut self, export: &str) -> u32 {
        self.opt(
            OPT_SET_META_CONTEXT,
            &meta_data(export, &["base:allocation"]),
        );
        let r = self.replies(OPT_SET_META_CONTEXT);
        assert_eq!(r.len(), 2, "SET_META_CONTEXT base:allocation: {r:?}");
        assert_eq!(r[0].kind, REP_META_CONTEXT);
        assert_eq!(&r[0].data[4..], b"base:allocation");
        let id = be32(&r[0].data);
        assert_ne!(id, 0, "a selected context needs a nonzero id");
        assert_eq!(r[1].kind, REP_ACK);
        assert!(r[1].data.is_empty());
        id
    }
}

/// The (size, flags) of the single NBD_INFO_EXPORT among `replies`.
fn export_info(replies: &[OptReply]) -> (u64, u16) {
    let infos = infos(replies);
    let export = infos
        .get(&INFO_EXPORT)
        .expect("NBD_INFO_EXPORT is mandatory before the ACK");
    assert_eq!(export.len(), 10, "NBD_INFO_EXPORT data must be 12 bytes");
    (be64(export), be16(&export[8..]))
}

/// The NBD_REP_INFO replies by info type (each must appear once).
fn infos(replies: &[OptReply]) -> HashMap<u16, Vec<u8>> {
    let mut m = HashMap::new();
    for r in replies.iter().filter(|r| r.kind == REP_INFO) {
        assert!(r.data.len() >= 2, "NBD_REP_INFO without a type");
        let t = be16(&r.data);
        assert!(
            m.insert(t, r.data[2..].to_vec()).is_none(),
            "info type {t} sent twice"
        );
    }
    for r in &replies[..replies.len() - 1] {
        assert_eq!(
            r.kind, REP_INFO,
            "unexpected reply before the final one: {r:?}"
        );
    }
    m
}

// ---------------------------------------------------------------------------------------------
// The transmission phase.

#[derive(Debug)]
struct Chunk {
    flags: u16,
    kind: u16,
    payload: Vec<u8>,
}

#[derive(Debug)]
enum Frame {
    Simple { error: u32, cookie: u64 },
    Chunk { cookie: u64, chunk: Chunk },
}

/// The whole answer to one request.
#[derive(Debug)]
struct Reply {
    /// The error of a simple reply.
    simple: Option<u32>,
    /// Data following a successful simple READ reply.
    data: Vec<u8>,
    /// Structured or extended chunks, the last one with DONE.
    chunks: Vec<Chunk>,
}

struct Nbd {
    c: Conn,
    mode: Mode,
    size: u64,
    flags: u16,
    ctx: Option<u32>,
    cookie: u64,
}

impl Nbd {
    fn next_cookie(&mut self) -> u64 {
        self.cookie += 1;
        // Use all 64 bits, to catch a cookie cut short.
        self.cookie | 0xc0de_0000_0000_0000
    }

    /// Sends one request; a write payload goes in the same `write`.
    fn send(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u64, payload: &[u8]) {
        let mut b = request_bytes(self.mode, flags, kind, cookie, offset, len);
        b.extend_from_slice(payload);
        self.c.send(&b);
    }

    /// One reply frame (a simple reply header, or a whole chunk).
    fn frame(&mut self, request_offset: Option<u64>) -> Frame {
        let magic = be32(&self.c.recv(4));
        match magic {
            SIMPLE_REPLY_MAGIC => {
                assert_ne!(
                    self.mode,
                    Mode::Extended,
                    "simple reply with extended headers"
                );
                let h = self.c.recv(12);
                Frame::Simple {
                    error: be32(&h),
                    cookie: be64(&h[4..]),
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                assert_eq!(
                    self.mode,
                    Mode::Structured,
                    "structured chunk in {:?} mode",
                    self.mode
                );
                let h = self.c.recv(16);
                let len = be32(&h[12..]) as usize;
                assert!(len as u64 <= MAX_PAYLOAD + 64, "chunk of {len} bytes");
                Frame::Chunk {
                    cookie: be64(&h[4..]),
                    chunk: Chunk {
                        flags: be16(&h),
                        kind: be16(&h[2..]),
                        payload: self.c.recv(len),
                    },
                }
            }
            EXT_REPLY_MAGIC => {
                assert_eq!(
                    self.mode,
                    Mode::Extended,
                    "extended chunk in {:?} mode",
                    self.mode
                );
                let h = self.c.recv(28);
                if let Some(o) = request_offset {
                    assert_eq!(
                        be64(&h[12..]),
                        o,
                        "extended chunk must echo the request offset"
                    );
                }
                let len = be64(&h[20..]);
                assert!(len <= MAX_PAYLOAD + 64, "chunk of {len} bytes");
                Frame::Chunk {
                    cookie: be64(&h[4..]),
                    chunk: Chunk {
                        flags: be16(&h),
                        kind: be16(&h[2..]),
                        payload: self.c.recv(len as usize),
                    },
                }
            }
            m => panic!("bad reply magic {m:#010x}"),
        }
    }

    /// Reads the reply to `cookie`; `read_len` is the length of a READ (for simple replies).
    fn reply(&mut self, cookie: u64, offset: u64, read_len: Option<u64>) -> Reply {
        let mut chunks = Vec::new();
        loop {
            match self.frame(Some(offset)) {
                Frame::Simple { error, cookie: c } => {
                    assert_eq!(c, cookie, "simple reply for another cookie");
                    assert!(chunks.is_empty(), "simple reply after chunks");
                    let mut data = Vec::new();
                    if let Some(n) = read_len
                        && error == 0
                    {
                        assert_eq!(self.mode, Mode::Simple, "READ answered by a simple reply");
                        data = self.c.recv(n as usize);
                    }
                    return Reply {
                        simple: Some(error),
                        data,
                        chunks,
                    };
                }
                Frame::Chunk { cookie: c, chunk } => {
                    assert_eq!(c, cookie, "chunk for another cookie: {chunk:?}");
                    assert_eq!(chunk.flags & !REPLY_FLAG_DONE, 0, "unknown chunk flags");
                    let done = chunk.flags & REPLY_FLAG_DONE != 0;
                    chunks.push(chunk);
                    if done {
                        return Reply {
                            simple: None,
                            data: Vec::new(),
                            chunks,
                        };
                    }
                    assert!(chunks.len() < 100_000, "endless reply");
                }
            }
        }
    }

    /// Sends a request and reads its reply.
    fn call(&mut self, flags: u16, kind: u16, offset: u64, len: u64, payload: &[u8]) -> Reply {
        let cookie = self.next_cookie();
        self.send(flags, kind, cookie, offset, len, payload);
        let read_len = (kind == CMD_READ).then_some(len);
        self.reply(cookie, offset, read_len)
    }

    /// The request succeeded without data.
    fn expect_ok(&mut self, r: &Reply, what: &str) {
        match self.mode {
            Mode::Simple => assert_eq!(r.simple, Some(0), "{what}: {r:?}"),
            Mode::Structured if r.simple.is_some() => {
                assert_eq!(r.simple, Some(0), "{what}: {r:?}")
            }
            Mode::Structured | Mode::Extended => {
                assert!(r.simple.is_none(), "{what}: {r:?}");
                assert_eq!(r.chunks.len(), 1, "{what}: {r:?}");
                let c = &r.chunks[0];
                assert_eq!(c.kind, TYPE_NONE, "{what}: {r:?}");
                assert_eq!(c.flags, REPLY_FLAG_DONE, "{what}: {r:?}");
                assert!(c.payload.is_empty(), "{what}: {r:?}");
            }
        }
    }

    /// The request failed with `errno`: a simple reply in simple mode, else one error chunk.
    fn expect_err(&mut self, r: &Reply, errno: u32, what: &str) {
        if self.mode == Mode::Simple {
            assert_eq!(r.simple, Some(errno), "{what}: {r:?}");
            assert!(r.data.is_empty());
            return;
        }
        assert!(
            r.simple.is_none(),
            "{what}: expected an error chunk with errno {errno}, got {r:?}"
        );
        assert_eq!(r.chunks.len(), 1, "{what}: {r:?}");
        let c = &r.chunks[0];
        assert_eq!(c.flags, REPLY_FLAG_DONE, "{what}: {r:?}");
        assert_eq!(c.kind, TYPE_ERROR, "{what}: {r:?}");
        assert!(c.payload.len() >= 6, "{what}: {r:?}");
        assert_eq!(be32(&c.payload), errno, "{what}: errno; {r:?}");
        let msg_len = be16(&c.payload[4..]) as usize;
        assert_eq!(c.payload.len(), 6 + msg_len, "{what}: error message length");
        assert!(std::str::from_utf8(&c.payload[6..]).is_ok());
    }

    fn ok(&mut self, flags: u16, kind: u16, offset: u64, len: u64, what: &str) {
        let r = self.call(flags, kind, offset, len, &[]);
        self.expect_ok(&r, what);
    }

    fn err(&mut self, flags: u16, kind: u16, offset: u64, len: u64, errno: u32, what: &str) {
        let r = self.call(flags, kind, offset, len, &[]);
        self.expect_err(&r, errno, what);
    }

    fn write_flags(&self) -> u16 {
        if self.mode == Mode::Extended {
            CMD_FLAG_PAYLOAD_LEN
        } else {
            0
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let r = self.call(
            self.write_flags(),
            CMD_WRITE,
            offset,
            data.len() as u64,
            data,
        );
        self.expect_ok(&r, &format!("write {} bytes at {offset}", data.len()));
    }

    fn write_err(&mut self, offset: u64, data: &[u8], errno: u32, what: &str) {
        let r = self.call(
            self.write_flags(),
            CMD_WRITE,
            offset,
            data.len() as u64,
            data,
        );
        self.expect_err(&r, errno, what);
    }

    fn read_reply(&mut self, flags: u16, offset: u64, len: u64) -> Reply {
        self.call(flags, CMD_READ, offset, len, &[])
    }

    fn read(&mut self, offset: u64, len: u64) -> Vec<u8> {
        let r = self.read_reply(0, offset, len);
        self.read_data(&r, offset, len)
    }

    fn read_data(&self, r: &Reply, offset: u64, len: u64) -> Vec<u8> {
        if self.mode == Mode::Simple {
            assert_eq!(r.simple, Some(0), "read {len} at {offset}: {r:?}");
            r.data.clone()
        } else {
            assemble(r, offset, len)
        }
    }

    /// BLOCK_STATUS; returns the extents (length, flags) of the one context.
    fn block_status(&mut self, flags: u16, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let r = self.call(flags, CMD_BLOCK_STATUS, offset, len, &[]);
        let want_kind = if self.mode == Mode::Extended {
            TYPE_BLOCK_STATUS_EXT
        } else {
            TYPE_BLOCK_STATUS
        };
        assert!(
            r.simple.is_none(),
            "BLOCK_STATUS answered by a simple reply: {r:?}"
        );
        let status: Vec<&Chunk> = r.chunks.iter().filter(|c| c.kind == want_kind).collect();
        for c in &r.chunks {
            assert!(
                c.kind == want_kind || (c.kind == TYPE_NONE && c.payload.is_empty()),
                "unexpected chunk in a BLOCK_STATUS reply: {c:?}"
            );
        }
        assert_eq!(status.len(), 1, "one status chunk per context: {r:?}");
        let p = &status[0].payload;
        assert_eq!(Some(be32(p)), self.ctx, "context id");
        let mut extents = Vec::new();
        if self.mode == Mode::Extended {
            assert!(
                p.len() >= 8 + 16 && (p.len() - 8).is_multiple_of(16),
                "{p:02x?}"
            );
            let n = be32(&p[4..]) as usize;
            assert_eq!(p.len(), 8 + 16 * n, "descriptor count");
            for d in p[8..].chunks_exact(16) {
                extents.push((be64(d), be64(&d[8..])));
            }
        } else {
            assert!(
                p.len() >= 4 + 8 && (p.len() - 4).is_multiple_of(8),
                "{p:02x?}"
            );
            for d in p[4..].chunks_exact(8) {
                extents.push((u64::from(be32(d)), u64::from(be32(&d[4..]))));
            }
        }
        assert!(!extents.is_empty());
        for (i, e) in extents.iter().enumerate() {
            assert_ne!(e.0, 0, "zero-length extent {i}: {extents:?}");
            assert!(
                e.1 == STATE_DATA || e.1 & !3 == 0,
                "unknown state bits: {extents:?}"
            );
        }
        if flags & CMD_FLAG_REQ_ONE != 0 {
            assert_eq!(extents.len(), 1, "REQ_ONE gives exactly one extent");
            assert!(
                extents[0].0 <= len,
                "REQ_ONE extent longer than the request"
            );
        }
        // Every extent but the last lies inside the request.
        let inner: u64 = extents[..extents.len() - 1].iter().map(|e| e.0).sum();
        assert!(inner < len, "extents beyond the request: {extents:?}");
        extents
    }
}

/// Puts a structured READ reply together, checking the chunks tile the range exactly.
fn assemble(r: &Reply, offset: u64, len: u64) -> Vec<u8> {
    assert!(r.simple.is_none(), "READ answered by a simple reply: {r:?}");
    assert!(!r.chunks.is_empty());
    let mut out = vec![0u8; len as usize];
    let mut pieces = Vec::new();
    for c in &r.chunks {
        let (at, n) = match c.kind {
            TYPE_OFFSET_DATA => {
                assert!(c.payload.len() >= 9, "OFFSET_DATA too short: {c:?}");
                let at = be64(&c.payload);
                let data = &c.payload[8..];
                assert!(
                    at >= offset && at + data.len() as u64 <= offset + len,
                    "chunk outside the request: at {at}, {} bytes",
                    data.len()
                );
                let s = (at - offset) as usize;
                out[s..s + data.len()].copy_from_slice(data);
                (at, data.len() as u64)
            }
            TYPE_OFFSET_HOLE => {
                assert_eq!(c.payload.len(), 12, "OFFSET_HOLE length: {c:?}");
                let at = be64(&c.payload);
                let n = u64::from(be32(&c.payload[8..]));
                assert_ne!(n, 0, "empty hole");
                assert!(
                    at >= offset && at + n <= offset + len,
                    "hole outside the request"
                );
                (at, n)
            }
            k => panic!(
                "chunk type {k:#x} in a READ reply that should have succeeded: {:?}",
                r.chunks
                    .iter()
                    .map(|c| (c.kind, c.payload.len()))
                    .collect::<Vec<_>>()
            ),
        };
        pieces.push((at, n));
    }
    pieces.sort_unstable();
    let mut pos = offset;
    for (at, n) in &pieces {
        assert_eq!(*at, pos, "chunks overlap or leave a gap: {pieces:?}");
        pos += n;
    }
    assert_eq!(
        pos,
        offset + len,
        "chunks do not cover the range: {pieces:?}"
    );
    out
}

fn connect_go(srv: &Server, export: &str, mode: Mode, meta: bool) -> Nbd {
    let mut c = Conn::new(srv, 3);
    c.negotiate(mode);
    c.go(export, mode, meta)
}

/// A quick check that the server still serves: GO, write, read back, DISC.
fn still_serves(srv: &Server) {
    let mut n = connect_go(srv, "disk", Mode::Structured, false);
    let data = pattern(77, 4096);
    n.write(60 * MIB, &data);
    assert_eq!(n.read(60 * MIB, 4096), data);
    n.send(0, CMD_DISC, 0, 0, 0, &[]);
    n.c.expect_closed("after NBD_CMD_DISC");
}

// ---------------------------------------------------------------------------------------------
// Handshake.

#[test]
fn greeting_is_fixed_newstyle_with_no_zeroes() {
    let srv = Server::start();
    let mut c = Conn::raw(&srv);
    let g = c.recv(18);
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(&g[16..], &[0, 3]);
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let srv = Server::start();
    for flags in [0x4u32, 0x7, 0x8000_0001] {
        let mut c = Conn::new(&srv, flags);
        c.expect_closed(&format!("client flags {flags:#x}"));
    }
    // Flags 0 (no FIXED_NEWSTYLE) may be honoured as fixed newstyle, as nbdkit does; either way
    // a well-formed client still works afterwards.
    let mut c = Conn::new(&srv, 1);
    c.expect(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    still_serves(&srv);
}

#[test]
fn bad_option_magic_closes_the_connection() {
    let srv = Server::start();
    let mut c = Conn::new(&srv, 3);
    let mut b = option_bytes(OPT_LIST, &[]);
    b[0] ^= 0xff;
    c.send(&b);
    c.expect_closed("bad option magic");

    // A transmission request during the option phase is a bad option magic too.
    let mut c = Conn::new(&srv, 3);
    c.send(&request_bytes(Mode::Structured, 0, CMD_READ, 1, 0, 512));
    c.expect_closed("request during the option phase");

    // After a good option, a bad one still ends it.
    let mut c = Conn::new(&srv, 3);
    c.expect(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    c.send(&[0u8; 16]);
    c.expect_closed("zero option magic");
    still_serves(&srv);
}

#[test]
fn oversized_option_closes_the_connection() {
    let srv = Server::start();
    let mut c = Conn::new(&srv, 3);
    let mut h = option_bytes(OPT_GO, &[]);
    h[12..16].copy_from_slice(&(MIB as u32).to_be_bytes());
    c.send(&h);
    c.expect_closed("option announcing 1 MiB of data");

    let mut c = Conn::new(&srv, 3);
    let mut h = option_bytes(0x1234, &[]);
    h[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
    c.send(&h);
    c.expect_closed("unknown option announcing 4 GiB of data");

    // Exactly 64 KiB of data is still an option the server reads (and skips, as unknown).
    let mut c = Conn::new(&srv, 3);
    c.expect(0x1234, &vec![0xab; 64 * 1024], REP_ERR_UNSUP);
    c.expect(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    still_serves(&srv);
}

#[test]
fn unknown_option_is_unsupported_and_next_option_works() {
    let srv = Server::start();
    let mut c = Conn::new(&srv, 3);
    c.expect(0x1234, b"some data the server must skip", REP_ERR_UNSUP);
    c.expect(0x1234, &[], REP_ERR_UNSUP);
    // Withdrawn NBD_OPT_PEEK_EXPORT (4), and an option number with the high bit set.
    c.expect(4, &[0, 0, 0, 0], REP_ERR_UNSUP);
    c.expect(0x8000_0000, &[1, 2, 3], REP_ERR_UNSUP);
    c.negotiate(Mode::Structured);
    let mut n = c.go("disk", Mode::Structured, true);
    assert_eq!((n.size, n.flags), (DISK_SIZE, FLAGS_RW));
    assert_eq!(n.read(0, 512), vec![0u8; 512]);
}

#[test]
fn list_with_data_is_invalid_and_without_lists_exports() {
    let srv = Server::with_exports(&[["described", "raw", "memory:1MiB?description=a disk"]]);
    let mut c = Conn::new(&srv, 3);
    c.expect(OPT_LIST, b"x", REP_ERR_INVALID);
    c.opt(OPT_LIST, &[]);
    let r = c.replies(OPT_LIST);
    let mut listed = Vec::new();
    for s in &r[..r.len() - 1] {
        assert_eq!(s.kind, REP_SERVER, "{r:?}");
        let n = be32(&s.data) as usize;
        assert!(4 + n <= s.data.len(), "name length beyond the reply: {s:?}");
        let name = String::from_utf8(s.data[4..4 + n].to_vec()).unwrap();
        let desc = String::from_utf8(s.data[4 + n..].to_vec()).unwrap();
        listed.push((name, desc));
    }
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    assert!(r.last().unwrap().data.is_empty());
    assert_eq!(
        listed,
        [
            ("disk".to_owned(), String::new()),
            ("ro".to_owned(), String::new()),
            ("described".to_owned(), "a disk".to_owned()),
        ]
    );
    // LIST changes nothing: GO still works.
    c.negotiate(Mode::Structured);
    let mut n = c.go("described", Mode::Structured, false);
    assert_eq!((n.size, n.flags), (MIB, FLAGS_RW));
    n.write(0, b"hello");
}

#[test]
fn info_and_go_reject_malformed_requests() {
    let srv = Server::start();
    let mut c = Conn::new(&srv, 3);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // Name length beyond the data.
    let mut d = info_data("disk", &[]);
    d[..4].copy_from_slice(&100u32.to_be_bytes());
    cases.push(("name length beyond the data", d));
    let mut d = info_data("disk", &[]);
    d[..4].copy_from_slice(&u32::MAX.to_be_bytes());
    cases.push(("name length 0xffffffff", d));
    // Request count not matching the data.
    let mut d = info_data("disk", &[INFO_NAME]);
    d[8..10].copy_from_slice(&2u16.to_be_bytes());
    cases.push(("count 2 with one request", d));
    let mut d = info_data("disk", &[INFO_NAME, INFO_DESCRIPTION]);
    d[8..10].copy_from_slice(&1u16.to_be_bytes());
    cases.push(("count 1 with two requests", d));
    let mut d = info_data("disk", &[INFO_NAME]);
    d.push(0);
    cases.push(("odd trailing byte", d));
    // Shorter than 6 bytes.
    cases.push(("no data", Vec::new()));
    cases.push(("3 bytes", vec![0, 0, 0]));
    cases.push(("4 bytes (no count)", vec![0, 0, 0, 0]));
    cases.push(("5 bytes (half a count)", vec![0, 0, 0, 0, 0]));
    // A name with the count missing.
    let mut d = info_data("disk", &[]);
    d.truncate(8);
    cases.push(("name without count", d));
    for option in [OPT_INFO, OPT_GO] {
        for (what, data) in &cases {
            c.opt(option, data);
            let r = c.replies(option);
            assert_eq!(r.len(), 1, "option {option}, {what}: {r:?}");
            assert_eq!(r[0].kind, REP_ERR_INVALID, "option {option}, {what}: {r:?}");
        }
    }
    // The connection is still in the option phase and usable.
    c.negotiate(Mode::Structured);
    let n = c.go("disk", Mode::Structured, false);
    assert_eq!(n.flags, FLAGS_RW);
}

#[test]
fn info_and_go_for_an_unknown_export_are_err_unknown() {
    let srv = Server::start();
    let mut c = Conn::new(&srv, 3);
    for option in [OPT_INFO, OPT_GO] {
        for name in ["nope", "disk ", "DISK", "dis"] {
            c.opt(option, &info_data(name, &[INFO_NAME, INFO_BLOCK_SIZE]));
            let r = c.replies(option);
            assert_eq!(r.len(), 1, "no NBD_REP_INFO before ERR_UNKNOWN: {r:?}");
            assert_eq!(r[0].kind, REP_ERR_UNKNOWN, "{option} {name:?}: {r:?}");
        }
    }
    let n = c.go("ro", Mode::Simple, false);
    assert_eq!((n.size, n.flags), (RO_SIZE, FLAGS_RO_SIMPLE));
}

#[test]
fn info_answers_export_name_description_and_block_size() {
    let srv = Server::with_exports(&[["described", "raw", "memory:2MiB?description=my disk"]]);
    let mut c = Conn::new(&srv, 3);

    // No requests, before structured replies: INFO_EXPORT without SEND_DF, BLOCK_SIZE.
    c.opt(OPT_INFO, &info_data("disk", &[]));
    let r = c.replies(OPT_INFO);
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    assert_eq!(export_info(&r), (DISK_SIZE, FLAGS_RW_SIMPLE));

    // Everything requested (plus unknown info types, which must be ignored).
    let all = [
        INFO_NAME,
        INFO_DESCRIPTION,
        INFO_BLOCK_SIZE,
        0x4242,
        INFO_EXPORT,
    ];
    c.opt(OPT_INFO, &info_data("described", &all));
    let r = c.replies(OPT_INFO);
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    assert!(r.last().unwrap().data.is_empty());
    let i = infos(&r);
    assert_eq!(export_info(&r), (2 * MIB, FLAGS_RW_SIMPLE));
    assert_eq!(
        i.get(&INFO_NAME).map(Vec::as_slice),
        Some(&b"described"[..])
    );
    assert_eq!(
        i.get(&INFO_DESCRIPTION).map(Vec::as_slice),
        Some(&b"my disk"[..])
    );
    let bs = i
        .get(&INFO_BLOCK_SIZE)
        .expect("NBD_INFO_BLOCK_SIZE was requested");
    assert_eq!(bs.len(), 12, "NBD_INFO_BLOCK_SIZE data must be 14 bytes");
    assert_eq!(
        (be32(bs), be32(&bs[4..]), be32(&bs[8..])),
        (1, 4096, 32 * 1024 * 1024)
    );
    assert!(!i.contains_key(&0x4242));

    // The empty name selects the first export; NAME gives its real name.
    c.opt(OPT_INFO, &info_data("", &[INFO_NAME]));
    let r = c.replies(OPT_INFO);
    assert_eq!(export_info(&r), (DISK_SIZE, FLAGS_RW_SIMPLE));
    assert_eq!(
        infos(&r).get(&INFO_NAME).map(Vec::as_slice),
        Some(&b"disk"[..])
    );

    // Read-only export, after structured replies: SEND_DF appears.
    c.expect(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    c.opt(OPT_INFO, &info_data("ro", &[]));
    assert_eq!(export_info(&c.replies(OPT_INFO)), (RO_SIZE, FLAGS_RO));
    c.opt(OPT_INFO, &info_data("disk", &[]));
    assert_eq!(export_info(&c.replies(OPT_INFO)), (DISK_SIZE, FLAGS_RW));

    // An INFO followed by an identical GO gives the same information.
    let req = info_data("", &[INFO_NAME, INFO_BLOCK_SIZE]);
    c.opt(OPT_INFO, &req);
    let info = c.replies(OPT_INFO);
    c.opt(OPT_GO, &req);
    let go = c.replies(OPT_GO);
    assert_eq!(infos(&info), infos(&go));
    assert_eq!(go.last().unwrap().kind, REP_ACK);
    // Transmission on the first export ("disk").
    let mut n = Nbd {
        c,
        mode: Mode::Structured,
        size: DISK_SIZE,
        flags: FLAGS_RW,
        ctx: None,
        cookie: 0,
    };
    n.write(DISK_SIZE - 512, &[7; 512]);
    assert_eq!(n.read(DISK_SIZE - 512, 512), vec![7; 512]);
}

#[test]
fn starttls_without_tls_configured() {
    let srv = Server::start();
    let mut c = Conn::new(&srv, 3);
    c.expect(OPT_STARTTLS, b"junk", REP_ERR_INVALID);
    c.expect(OPT_STARTTLS, &[], REP_ERR_UNSUP);
    // Still in plain text, still negotiating.
    c.negotiate(Mode::Structured);
    let n = c.go("disk", Mode::Structured, true);
    assert_eq!(n.flags, FLAGS_RW);
}

#[test]
fn structured_reply_and_extended_headers_option_errors() {
    let srv = Server::start();
    let mut c = Conn::new(&srv, 3);
    c.expect(OPT_STRUCTURED_REPLY, &[0], REP_ERR_INVALID);
    c.expect(OPT_EXTENDED_HEADERS, &[0, 0, 0, 0], REP_ERR_INVALID);
    c.expect(OPT_EXTENDED_HEADERS, &[], REP_ACK);
    c.expect(OPT_STRUCTURED_REPLY, &[], REP_ERR_EXT_HEADER_REQD);
    // Extended headers stay in force.
    let mut n = c.go("disk", Mode::Extended, true);
    assert_eq!(n.flags, FLAGS_RW);
    n.write(0, &[1; 512]);
    assert_eq!(n.read(0, 512), vec![1; 512]);
}

#[test]
fn list_meta_context_queries() {
    let srv = Server::start();
    let mut c = Conn::new(&srv, 3);
    c.expect(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    let base_allocation = |r: &OptReply| {
        assert_eq!(r.kind, REP_META_CONTEXT, "{r:?}");
        assert_eq!(be32(&r.data), 0, "LIST context ids SHOULD be 0");
        assert_eq!(&r.data[4..], b"base:allocation");
    };
    for (queries, expect_base) in [
        (&[][..], true),
        (&["base:"][..], true),
        (&["base:allocation"][..], true),
        (&["x-unknown:thing"][..], false),
        (&["qemu:dirty-bitmap:foo"][..], false),
        (&["base:nonexistent"][..], false),
    ] {
        c.opt(OPT_LIST_META_CONTEXT, &meta_data("disk", queries));
        let r = c.replies(OPT_LIST_META_CONTEXT);
        if expect_base {
            assert_eq!(r.len(), 2, "{queries:?}: {r:?}");
            base_allocation(&r[0]);
        } else {
            assert_eq!(r.len(), 1, "{queries:?}: {r:?}");
        }
        assert_eq!(r.last().unwrap().kind, REP_ACK, "{queries:?}: {r:?}");
    }

    // Syntactically invalid: a query length beyond the option, a missing query, a count cut.
    let mut truncated = meta_data("disk", &["base:allocation"]);
    truncated.truncate(truncated.len() - 3);
    let mut long_query = meta_data("disk", &["base:"]);
    let at = long_query.len() - 5 - 4;
    long_query[at..at + 4].copy_from_slice(&1000u32.to_be_bytes());
    let mut missing = meta_data("disk", &["base:allocation"]);
    let at = 4 + 4;
    missing[at..at + 4].copy_from_slice(&2u32.to_be_bytes());
    let mut no_count = meta_data("disk", &[]);
    no_count.truncate(no_count.len() - 2);
    let mut bad_name = meta_data("disk", &[]);
    bad_name[..4].copy_from_slice(&50u32.to_be_bytes());
    for (what, data) in [
        ("truncated query", truncated),
        ("query length beyond the data", long_query),
        ("count 2 with one query", missing),
        ("half a count", no_count),
        ("name length beyond the data", bad_name),
        ("empty", Vec::new()),
    ] {
        c.opt(OPT_LIST_META_CONTEXT, &data);
        let r = c.replies(OPT_LIST_META_CONTEXT);
        assert_eq!(r.len(), 1, "{what}: {r:?}");
        assert_eq!(r[0].kind, REP_ERR_INVALID, "{what}: {r:?}");
    }
    // Unknown export: an error, nothing listed.
    c.opt(OPT_LIST_META_CONTEXT, &meta_data("nope", &[]));
    let r = c.replies(OPT_LIST_META_CONTEXT);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_ne!(r[0].kind & 0x8000_0000, 0, "{r:?}");

    // LIST does not select anything: BLOCK_STATUS after GO fails with EINVAL.
    let mut n = c.go("disk", Mode::Structured, false);
    n.err(
        0,
        CMD_BLOCK_STATUS,
        0,
        4096,
        EINVAL,
        "block status without SET_META_CONTEXT",
    );
}

#[test]
fn set_meta_context_needs_structured_replies() {
    let srv = Server::start();
    let mut c = Conn::new(&srv, 3);
    let base = meta_data("disk", &["base:allocation"]);
    c.expect(OPT_SET_META_CONTEXT, &base, REP_ERR_INVALID);
    c.expect(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    // "base:" is a wildcard only for LIST; SET ignores it, and unknown namespaces.
    c.expect(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:"]),
        REP_ACK,
    );
    c.expect(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["x-foo:bar", "base:nothing"]),
        REP_ACK,
    );
    c.expect(OPT_SET_META_CONTEXT, &meta_data("disk", &[]), REP_ACK);
    let mut bad = base.clone();
    bad.truncate(bad.len() - 1);
    c.expect(OPT_SET_META_CONTEXT, &bad, REP_ERR_INVALID);
    c.set_base_allocation("disk");
    // SET again with a bad query: the earlier selection is gone.
    c.expect(OPT_SET_META_CONTEXT, &bad, REP_ERR_INVALID);
    let id2 = c.set_base_allocation("disk");
    let mut n = c.go("disk", Mode::Structured, false);
    n.ctx = Some(id2);
    let e = n.block_status(0, 0, MIB);
    assert_eq!(e, [(MIB, STATE_HOLE_ZERO)]);
}

#[test]
fn meta_context_for_another_export_does_not_apply() {
    let srv = Server::start();
    let mut c = Conn::new(&srv, 3);
    c.expect(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    c.set_base_allocation("ro");
    let mut n = c.go("disk", Mode::Structured, false);
    n.err(
        0,
        CMD_BLOCK_STATUS,
        0,
        4096,
        EINVAL,
        "context chosen for another export",
    );
}

#[test]
fn export_name_unknown_closes_the_connection() {
    let srv = Server::start();
    for name in ["nope", "disk2", "\u{e9}"] {
        let mut c = Conn::new(&srv, 3);
        c.opt(OPT_EXPORT_NAME, name.as_bytes());
        c.expect_closed(&format!("EXPORT_NAME {name:?}"));
    }
    let mut c = Conn::new(&srv, 3);
    c.opt(OPT_EXPORT_NAME, &[0xff, 0xfe]);
    c.expect_closed("EXPORT_NAME that is not UTF-8");
    still_serves(&srv);
}

#[test]
fn export_name_known_with_and_without_no_zeroes() {
    let srv = Server::start();
    // Without NO_ZEROES: size, flags, 124 zero bytes (134 in all).
    let mut c = Conn::new(&srv, 1);
    c.opt(OPT_EXPORT_NAME, b"disk");
    let r = c.recv(134);
    assert_eq!(be64(&r), DISK_SIZE);
    assert_eq!(be16(&r[8..]), FLAGS_RW_SIMPLE);
    assert!(r[10..].iter().all(|&b| b == 0));
    let mut n = Nbd {
        c,
        mode: Mode::Simple,
        size: DISK_SIZE,
        flags: FLAGS_RW_SIMPLE,
        ctx: None,
        cookie: 0,
    };
    n.write(4096, &[9; 100]);
    assert_eq!(n.read(4096, 100), vec![9; 100]);

    // With NO_ZEROES: exactly 10 bytes, then the first reply comes right after.
    let mut c = Conn::new(&srv, 3);
    c.opt(OPT_EXPORT_NAME, b"ro");
    let r = c.recv(10);
    assert_eq!((be64(&r), be16(&r[8..])), (RO_SIZE, FLAGS_RO_SIMPLE));
    let mut n = Nbd {
        c,
        mode: Mode::Simple,
        size: RO_SIZE,
        flags: FLAGS_RO_SIMPLE,
        ctx: None,
        cookie: 0,
    };
    assert_eq!(n.read(0, 16), vec![0; 16]);

    // The empty name, after structured replies: the first export with SEND_DF.
    let mut c = Conn::new(&srv, 3);
    c.expect(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    c.opt(OPT_EXPORT_NAME, b"");
    let r = c.recv(10);
    assert_eq!((be64(&r), be16(&r[8..])), (DISK_SIZE, FLAGS_RW));
    let mut n = Nbd {
        c,
        mode: Mode::Structured,
        size: DISK_SIZE,
        flags: FLAGS_RW,
        ctx: None,
        cookie: 0,
    };
    assert_eq!(n.read(4096, 100), vec![9; 100]);
}

#[test]
fn export_name_after_extended_headers_closes_the_connection() {
    let srv = Server::start();
    let mut c = Conn::new(&srv, 3);
    c.expect(OPT_EXTENDED_HEADERS, &[], REP_ACK);
    c.opt(OPT_EXPORT_NAME, b"disk");
    c.expect_closed("EXPORT_NAME after EXTENDED_HEADERS");
    still_serves(&srv);
}

#[test]
fn abort_is_acknowledged_then_closed() {
    let srv = Server::start();
    for data in [&b""[..], &b"ignored"[..]] {
        let mut c = Conn::new(&srv, 3);
        c.expect(OPT_STRUCTURED_REPLY, &[], REP_ACK);
        let r = c.expect(OPT_ABORT, data, REP_ACK);
        assert!(r.is_empty());
        c.expect_closed("after NBD_OPT_ABORT");
    }
    // A client closing right after sending ABORT, without waiting.
    let mut c = Conn::new(&srv, 3);
    c.opt(OPT_ABORT, &[]);
    drop(c);
    still_serves(&srv);
}

#[test]
fn clients_vanishing_mid_handshake_or_mid_write_do_not_hurt_the_server() {
    let srv = Server::start();
    // Right after connecting, without reading the greeting.
    drop(Conn::raw(&srv));
    // After the greeting.
    let mut c = Conn::raw(&srv);
    c.greeting();
    drop(c);
    // After two bytes of the client flags.
    let mut c = Conn::raw(&srv);
    c.greeting();
    c.send(&[0, 0]);
    drop(c);
    // After half an option header.
    let mut c = Conn::new(&srv, 3);
    c.send(&option_bytes(OPT_GO, &info_data("disk", &[]))[..8]);
    drop(c);
    // After the header of an option, in its data.
    let mut c = Conn::new(&srv, 3);
    let go = option_bytes(OPT_GO, &info_data("disk", &[]));
    c.send(&go[..go.len() - 3]);
    drop(c);
    // In the middle of a request header.
    let mut n = connect_go(&srv, "disk", Mode::Structured, false);
    n.c.send(&request_bytes(Mode::Structured, 0, CMD_READ, 1, 0, 512)[..20]);
    drop(n);
    // In the middle of a 1 MiB write payload.
    let mut n = connect_go(&srv, "disk", Mode::Structured, false);
    let mut b = request_bytes(Mode::Structured, 0, CMD_WRITE, 1, 0, MIB);
    b.extend_from_slice(&[0x55; 1000]);
    n.c.send(&b);
    drop(n);
    // Same with extended headers.
    let mut n = connect_go(&srv, "disk", Mode::Extended, false);
    let mut b = request_bytes(Mode::Extended, CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 1, 0, MIB);
    b.extend_from_slice(&[0x55; 1000]);
    n.c.send(&b);
    drop(n);
    still_serves(&srv);
    still_serves(&srv);
}

// ---------------------------------------------------------------------------------------------
// Transmission: bad requests.

#[test]
fn bad_requests_get_errors_and_the_connection_stays_usable() {
    let srv = Server::start();
    let mut n = connect_go(&srv, "disk", Mode::Structured, true);
    assert_eq!((n.size, n.flags), (DISK_SIZE, FLAGS_RW));
    let data = pattern(1, 4096);
    n.write(0, &data);

    n.err(0, 42, 0, 4096, EINVAL, "unknown command 42");
    assert_eq!(n.read(0, 4096), data, "after unknown command");
    n.err(0, 9, 0, 0, EINVAL, "unknown command 9");
    n.err(0, 0xffff, 0, 0, EINVAL, "unknown command 0xffff");

    n.err(0x100, CMD_READ, 0, 4096, EINVAL, "READ with flag 0x100");
    n.err(0x8000, CMD_READ, 0, 4096, EINVAL, "READ with flag 0x8000");
    n.err(
        CMD_FLAG_REQ_ONE,
        CMD_READ,
        0,
        4096,
        EINVAL,
        "READ with REQ_ONE",
    );
    n.err(
        CMD_FLAG_PAYLOAD_LEN,
        CMD_READ,
        0,
        4096,
        EINVAL,
        "READ with PAYLOAD_LEN",
    );
    n.err(
        CMD_FLAG_DF,
        CMD_BLOCK_STATUS,
        0,
        4096,
        EINVAL,
        "BLOCK_STATUS with DF",
    );
    n.err(
        CMD_FLAG_NO_HOLE,
        CMD_TRIM,
        0,
        4096,
        EINVAL,
        "TRIM with NO_HOLE",
    );
    let r = n.call(CMD_FLAG_REQ_ONE, CMD_WRITE, 0, 4096, &pattern(2, 4096));
    n.expect_err(&r, EINVAL, "WRITE with REQ_ONE (payload consumed)");
    assert_eq!(n.read(0, 4096), data, "refused write must not write");

    n.err(0, CMD_FLUSH, 0, 1, EINVAL, "FLUSH with length 1");
    n.err(0, CMD_FLUSH, 512, 0, EINVAL, "FLUSH with offset 512");
    n.ok(0, CMD_FLUSH, 0, 0, "FLUSH");
    n.ok(CMD_FLAG_FUA, CMD_FLUSH, 0, 0, "FLUSH with FUA");

    n.err(0, CMD_READ, 0, 0, EINVAL, "zero-length READ");
    n.err(0, CMD_WRITE, 0, 0, EINVAL, "zero-length WRITE");
    n.err(0, CMD_TRIM, 0, 0, EINVAL, "zero-length TRIM");
    n.err(
        0,
        CMD_WRITE_ZEROES,
        0,
        0,
        EINVAL,
        "zero-length WRITE_ZEROES",
    );
    n.err(
        0,
        CMD_BLOCK_STATUS,
        0,
        0,
        EINVAL,
        "zero-length BLOCK_STATUS",
    );
    n.err(0, CMD_CACHE, 0, 0, EINVAL, "zero-length CACHE");

    n.err(
        0,
        CMD_READ,
        DISK_SIZE - 512,
        1024,
        EINVAL,
        "READ straddling the end",
    );
    n.err(0, CMD_READ, DISK_SIZE, 1, EINVAL, "READ at the end");
    n.err(
        0,
        CMD_READ,
        u64::MAX - 100,
        4096,
        EINVAL,
        "READ with offset overflow",
    );
    n.err(
        0,
        CMD_TRIM,
        DISK_SIZE - 512,
        1024,
        EINVAL,
        "TRIM straddling the end",
    );
    n.err(0, CMD_CACHE, DISK_SIZE, 512, EINVAL, "CACHE past the end");
    n.err(
        0,
        CMD_BLOCK_STATUS,
        DISK_SIZE,
        512,
        EINVAL,
        "BLOCK_STATUS past the end",
    );
    n.err(
        0,
        CMD_WRITE_ZEROES,
        DISK_SIZE - 512,
        1024,
        ENOSPC,
        "WRITE_ZEROES straddling the end",
    );

    let r = n.call(0, CMD_WRITE, DISK_SIZE - 2048, 4096, &pattern(3, 4096));
    n.expect_err(&r, ENOSPC, "WRITE straddling the end");
    let r = n.call(0, CMD_WRITE, u64::MAX - 10, 4096, &pattern(3, 4096));
    n.expect_err(&r, ENOSPC, "WRITE with offset overflow");
    assert_eq!(
        n.read(DISK_SIZE - 2048, 2048),
        vec![0; 2048],
        "refused write must not write"
    );

    n.err(0, CMD_READ, 0, MAX_PAYLOAD + MIB, EINVAL, "33 MiB READ");
    n.err(
        CMD_FLAG_DF,
        CMD_READ,
        0,
        u64::from(u32::MAX),
        EINVAL,
        "4 GiB READ",
    );

    // Accepted: FUA everywhere, CACHE, DF reads.
    let r = n.read_reply(CMD_FLAG_FUA, 0, 4096);
    assert_eq!(assemble(&r, 0, 4096), data);
    let r = n.read_reply(CMD_FLAG_DF, 0, 4096);
    assert_eq!(r.chunks.len(), 1);
    assert_eq!(assemble(&r, 0, 4096), data);
    n.ok(0, CMD_CACHE, 0, DISK_SIZE, "CACHE of the whole disk");
    n.ok(CMD_FLAG_FUA, CMD_CACHE, 0, 4096, "CACHE with FUA");
    let e = n.block_status(CMD_FLAG_FUA, 0, 4096);
    assert_eq!(e, [(4096, STATE_DATA)]);
    let r = n.call(CMD_FLAG_FUA, CMD_WRITE, 4096, 4096, &data);
    n.expect_ok(&r, "WRITE with FUA");
    assert_eq!(n.read(4096, 4096), data);
}

#[test]
fn oversized_write_is_refused_with_its_payload_consumed() {
    let srv = Server::start();
    let mut n = connect_go(&srv, "disk", Mode::Structured, true);
    let big = vec![0xa5u8; (MAX_PAYLOAD + MIB) as usize];
    let r = n.call(0, CMD_WRITE, 0, big.len() as u64, &big);
    n.expect_err(&r, EINVAL, "33 MiB WRITE");
    // The stream is in sync and nothing was written.
    assert_eq!(n.read(0, 4096), vec![0; 4096]);
    assert_eq!(n.read(MAX_PAYLOAD, 4096), vec![0; 4096]);
    let data = pattern(4, 8192);
    n.write(MIB, &data);
    assert_eq!(n.read(MIB, 8192), data);
    // Exactly 32 MiB is fine.
    let max = pattern(5, MAX_PAYLOAD as usize);
    n.write(0, &max);
    assert_eq!(n.read(0, MAX_PAYLOAD), max);

    // Simple-reply mode too.
    let mut n = connect_go(&srv, "disk", Mode::Simple, false);
    let r = n.call(0, CMD_WRITE, 0, big.len() as u64, &big);
    n.expect_err(&r, EINVAL, "33 MiB WRITE, simple replies");
    assert_eq!(n.read(0, 4096), max[..4096]);
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let srv = Server::start();
    let mut n = connect_go(&srv, "ro", Mode::Structured, true);
    assert_eq!((n.size, n.flags), (RO_SIZE, FLAGS_RO));
    n.write_err(0, &[1; 4096], EPERM, "WRITE on a read-only export");
    n.write_err(0, &[1; 1], EPERM, "1-byte WRITE on a read-only export");
    n.err(0, CMD_TRIM, 0, 4096, EPERM, "TRIM on a read-only export");
    n.err(
        0,
        CMD_WRITE_ZEROES,
        0,
        4096,
        EPERM,
        "WRITE_ZEROES on a read-only export",
    );
    n.err(
        CMD_FLAG_FUA,
        CMD_WRITE_ZEROES,
        0,
        4096,
        EPERM,
        "WRITE_ZEROES|FUA on a read-only export",
    );
    // FLUSH, CACHE, reads and block status work.
    n.ok(0, CMD_FLUSH, 0, 0, "FLUSH on a read-only export");
    n.ok(0, CMD_CACHE, 0, RO_SIZE, "CACHE on a read-only export");
    assert_eq!(n.read(0, 4096), vec![0; 4096]);
    assert_eq!(n.block_status(0, 0, RO_SIZE), [(RO_SIZE, STATE_HOLE_ZERO)]);

    // The same in simple-reply mode.
    let mut n = connect_go(&srv, "ro", Mode::Simple, false);
    assert_eq!(n.flags, FLAGS_RO_SIMPLE);
    n.write_err(512, &[1; 512], EPERM, "WRITE on a read-only export, simple");
    assert_eq!(n.read(0, 1024), vec![0; 1024]);
}

/// Large writes to a memory export are read straight into its pages, with FUA or without:
/// every one lands where it should, over each reply mode, whether its payload comes with its
/// header or in pieces after it. Bad ones get the same answers as anywhere else, with their
/// payloads consumed. A client gone partway through a payload leaves the export as it was.
#[test]
fn large_writes_to_memory_land_and_bad_ones_are_refused() {
    let srv = Server::start();
    let mut seed = 40;
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut n = connect_go(&srv, "disk", mode, false);
        seed += 1;
        // Unaligned at both ends, then on page boundaries, then with FUA.
        let data = pattern(seed, (MIB + 1000) as usize);
        n.write(32 * KIB - 7, &data);
        assert_eq!(n.read(32 * KIB - 7, data.len() as u64), data, "{mode:?}");
        let aligned = pattern(seed + 50, 2 * MIB as usize);
        n.write(4 * MIB, &aligned);
        assert_eq!(n.read(4 * MIB, 2 * MIB), aligned, "{mode:?}");
        let fua = pattern(seed + 100, 96 * KIB as usize);
        let r = n.call(
            n.write_flags() | CMD_FLAG_FUA,
            CMD_WRITE,
            3 * MIB + 1,
            fua.len() as u64,
            &fua,
        );
        n.expect_ok(&r, "96 KiB WRITE with FUA");
        assert_eq!(n.read(3 * MIB + 1, fua.len() as u64), fua, "{mode:?}");
        // A payload sent in pieces, the header alone first.
        let pieces = pattern(seed + 150, (256 * KIB + 3) as usize);
        let cookie = 77;
        n.c.send(&request_bytes(
            mode,
            n.write_flags(),
            CMD_WRITE,
            cookie,
            10 * MIB + 5,
            pieces.len() as u64,
        ));
        for part in pieces.chunks(50_000) {
            thread::sleep(Duration::from_millis(10));
            n.c.send(part);
        }
        let r = n.reply(cookie, 10 * MIB + 5, None);
        n.expect_ok(&r, "WRITE whose payload came in pieces");
        assert_eq!(
            n.read(10 * MIB + 5, pieces.len() as u64),
            pieces,
            "{mode:?}"
        );
        let big = pattern(seed + 200, MIB as usize);
        n.write_err(
            63 * MIB + 4096,
            &big,
            ENOSPC,
            "1 MiB WRITE straddling the end of the export",
        );
        let r = n.call(
            n.write_flags() | CMD_FLAG_NO_HOLE,
            CMD_WRITE,
            20 * MIB,
            MIB,
            &big,
        );
        n.expect_err(&r, EINVAL, "1 MiB WRITE with NO_HOLE");
        assert_eq!(n.read(20 * MIB, MIB), vec![0; MIB as usize], "{mode:?}");
        assert_eq!(n.read(63 * MIB, MIB), vec![0; MIB as usize], "{mode:?}");
        n.send(0, CMD_DISC, 0, 0, 0, &[]);
        n.c.expect_closed("after NBD_CMD_DISC");
    }
    let mut n = connect_go(&srv, "ro", Mode::Structured, false);
    n.write_err(
        0,
        &pattern(50, 512 * KIB as usize),
        EPERM,
        "512 KiB WRITE on a read-only memory export",
    );
    assert_eq!(n.read(0, 512 * KIB), vec![0; 512 * KIB as usize]);
    n.send(0, CMD_DISC, 0, 0, 0, &[]);
    n.c.expect_closed("after NBD_CMD_DISC");

    // Gone after 100,000 bytes of a 1 MiB payload at 30 MiB + 1000, sent in two pieces:
    // nothing of it lands.
    srv.write_partly_and_vanish("disk", 30 * MIB + 1000, &pattern(51, 100_000));
    let mut n = connect_go(&srv, "disk", Mode::Structured, false);
    assert_eq!(n.read(30 * MIB, 2 * MIB), vec![0; 2 * MIB as usize]);
    n.send(0, CMD_DISC, 0, 0, 0, &[]);
    n.c.expect_closed("after NBD_CMD_DISC");

    let paged = srv.closing_counts(5, "paged_bytes");
    // Each connection of the three modes took its good writes' whole pages straight from the
    // socket (its refused ones none): at least the 2 MiB aligned write and more, not more than
    // all it wrote; the read-only one and the last reader none.
    assert!(
        paged[..3].iter().all(|n| (3 * MIB..=4 * MIB).contains(n)),
        "{paged:?}"
    );
    assert_eq!(paged[3..], [0, 0], "{paged:?}");
}

/// Large writes to an image file go from the socket into the file (`splice`), except those
/// with FUA: every one lands where it should, over each reply mode. Bad ones get the same
/// answers as anywhere else, with their payloads consumed. A client gone partway through a
/// payload leaves the file's 4 KiB blocks whole: the complete ones written, the rest untouched.
#[test]
fn large_writes_to_an_image_file_land_and_bad_ones_are_refused() {
    let dir = std::env::temp_dir().join(format!("nbd-rs-protocol-splice-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (img, ro) = (dir.join("img"), dir.join("ro"));
    std::fs::write(&ro, vec![0u8; 4 * MIB as usize]).unwrap();
    let srv = Server::with_exports(&[
        ["img", "raw", &format!("file:{}?size=8MiB", img.display())],
        [
            "roimg",
            "raw",
            &format!("file:{}?read_only=true", ro.display()),
        ],
    ]);
    let on_disk = |offset: u64, len: usize| {
        std::fs::read(&img).unwrap()[offset as usize..offset as usize + len].to_vec()
    };
    let mut seed = 20;
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut n = connect_go(&srv, "img", mode, false);
        seed += 1;
        // Unaligned at both ends.
        let data = pattern(seed, (MIB + 1000) as usize);
        n.write(4097, &data);
        assert_eq!(n.read(4097, data.len() as u64), data, "{mode:?}");
        assert_eq!(on_disk(4097, data.len()), data, "{mode:?}");
        let fua = pattern(seed + 100, 256 * KIB as usize);
        let r = n.call(
            n.write_flags() | CMD_FLAG_FUA,
            CMD_WRITE,
            3 * MIB,
            fua.len() as u64,
            &fua,
        );
        n.expect_ok(&r, "256 KiB WRITE with FUA");
        assert_eq!(on_disk(3 * MIB, fua.len()), fua, "{mode:?}");
        let big = pattern(seed + 200, MIB as usize);
        n.write_err(
            7 * MIB + 4096,
            &big,
            ENOSPC,
            "1 MiB WRITE straddling the end of the image",
        );
        let r = n.call(
            n.write_flags() | CMD_FLAG_NO_HOLE,
            CMD_WRITE,
            6 * MIB,
            MIB,
            &big,
        );
        n.expect_err(&r, EINVAL, "1 MiB WRITE with NO_HOLE");
        assert_eq!(
            n.read(6 * MIB, 2 * MIB),
            vec![0; 2 * MIB as usize],
            "{mode:?}"
        );
        n.send(0, CMD_DISC, 0, 0, 0, &[]);
        n.c.expect_closed("after NBD_CMD_DISC");
    }
    let mut n = connect_go(&srv, "roimg", Mode::Structured, false);
    n.write_err(
        0,
        &pattern(30, MIB as usize),
        EPERM,
        "1 MiB WRITE on a read-only image",
    );
    assert_eq!(n.read(0, MIB), vec![0; MIB as usize]);
    n.send(0, CMD_DISC, 0, 0, 0, &[]);
    n.c.expect_closed("after NBD_CMD_DISC");

    // Gone after 10,000 bytes of a 1 MiB payload at 5 MiB + 1000, sent in two pieces.
    let data = pattern(31, 10_000);
    srv.write_partly_and_vanish("img", 5 * MIB + 1000, &data);
    assert_eq!(on_disk(5 * MIB, 1000), vec![0; 1000]);
    assert_eq!(on_disk(5 * MIB + 1000, 8192 - 1000), data[..8192 - 1000]);
    assert_eq!(on_disk(5 * MIB + 8192, 8192), vec![0; 8192]);

    let spliced = srv.closing_counts(4, "spliced_bytes");
    // Each image connection spliced most of its 1 MiB write (some of it came with the header);
    // the read-only one spliced nothing.
    assert!(
        spliced[..3].iter().all(|&n| n > MIB / 2 && n <= MIB + 1000),
        "{spliced:?}"
    );
    assert_eq!(spliced[3], 0, "{spliced:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn read_only_export_refuses_fast_zero_with_eperm() {
    // EXPECTED.md: write_zeroes with or without FAST_ZERO on a read-only export -> EPERM.
    let srv = Server::start();
    let mut n = connect_go(&srv, "ro", Mode::Structured, true);
    n.err(
        CMD_FLAG_FAST_ZERO,
        CMD_WRITE_ZEROES,
        0,
        4096,
        EPERM,
        "WRITE_ZEROES|FAST_ZERO on a read-only export",
    );
    assert_eq!(n.read(0, 512), vec![0; 512]);
}

#[test]
fn trim_and_write_zeroes_of_the_whole_export() {
    let srv = Server::start();
    let mut n = connect_go(&srv, "disk", Mode::Structured, true);
    let data = pattern(6, 64 * 1024);
    for at in [0, 10 * MIB + 123, DISK_SIZE - data.len() as u64] {
        n.write(at, &data);
    }
    n.ok(0, CMD_TRIM, 0, DISK_SIZE, "TRIM of 64 MiB");
    n.ok(CMD_FLAG_FUA, CMD_TRIM, 0, DISK_SIZE, "TRIM|FUA of 64 MiB");
    for at in [0, 10 * MIB + 123, DISK_SIZE - data.len() as u64] {
        n.write(at, &data);
    }
    n.ok(0, CMD_WRITE_ZEROES, 0, DISK_SIZE, "WRITE_ZEROES of 64 MiB");
    assert_eq!(n.read(10 * MIB, MIB), vec![0; MIB as usize]);
    assert_eq!(
        n.block_status(0, 0, DISK_SIZE),
        [(DISK_SIZE, STATE_HOLE_ZERO)]
    );
    n.write(0, &data);
    n.ok(
        CMD_FLAG_NO_HOLE,
        CMD_WRITE_ZEROES,
        0,
        DISK_SIZE,
        "WRITE_ZEROES|NO_HOLE",
    );
    n.ok(
        CMD_FLAG_FAST_ZERO,
        CMD_WRITE_ZEROES,
        0,
        DISK_SIZE,
        "WRITE_ZEROES|FAST_ZERO",
    );
    n.ok(
        CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_WRITE_ZEROES,
        0,
        DISK_SIZE,
        "WRITE_ZEROES|FUA|NO_HOLE|FAST_ZERO",
    );
    assert_eq!(n.read(0, 64 * 1024), vec![0; 64 * 1024]);
    // Unaligned partial zeroing keeps the bytes around it.
    n.write(0, &data);
    n.ok(0, CMD_WRITE_ZEROES, 100, 50_000, "unaligned WRITE_ZEROES");
    let mut want = data.clone();
    want[100..50_100].fill(0);
    assert_eq!(n.read(0, 64 * 1024), want);
}

#[test]
fn bad_request_magic_closes_the_connection() {
    let srv = Server::start();
    let mut n = connect_go(&srv, "disk", Mode::Structured, true);
    let mut b = request_bytes(Mode::Structured, 0, CMD_READ, 1, 0, 512);
    b[3] ^= 1;
    n.c.send(&b);
    n.c.expect_closed("bad request magic");

    // An extended request on a compact connection is out of sync too.
    let mut n = connect_go(&srv, "disk", Mode::Structured, false);
    n.c.send(&request_bytes(Mode::Extended, 0, CMD_READ, 1, 0, 512));
    n.c.expect_closed("extended request magic without extended headers");

    // And a compact request on an extended connection.
    let mut n = connect_go(&srv, "disk", Mode::Extended, false);
    let mut b = request_bytes(Mode::Simple, 0, CMD_READ, 1, 0, 512);
    b.extend_from_slice(&[0; 4]);
    n.c.send(&b);
    n.c.expect_closed("compact request magic with extended headers");

    // Replies to earlier requests are still delivered before the close.
    let mut n = connect_go(&srv, "disk", Mode::Structured, false);
    let mut b = request_bytes(Mode::Structured, 0, CMD_FLUSH, 7, 0, 0);
    b.extend_from_slice(&[0xee; 28]);
    n.c.send(&b);
    let r = n.reply(7, 0, None);
    n.expect_ok(&r, "FLUSH before a bad request");
    n.c.expect_closed("bad magic after FLUSH");
    still_serves(&srv);
}

// ---------------------------------------------------------------------------------------------
// Transmission: reply formats.

#[test]
fn simple_reply_mode() {
    let srv = Server::start();
    let mut n = connect_go(&srv, "disk", Mode::Simple, false);
    assert_eq!((n.size, n.flags), (DISK_SIZE, FLAGS_RW_SIMPLE));
    let data = pattern(7, 10_000);

    // WRITE: a 16-byte simple reply, checked byte for byte.
    n.send(0, CMD_WRITE, 0x0102_0304_0506_0708, 5000, 10_000, &data);
    let r = n.c.recv(16);
    assert_eq!(
        r,
        [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
        "simple WRITE reply"
    );
    // READ: 16-byte header, then exactly the data.
    n.send(0, CMD_READ, 0xffff_ffff_ffff_fffe, 5000, 10_000, &[]);
    let r = n.c.recv(16);
    assert_eq!(&r[..8], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0]);
    assert_eq!(be64(&r[8..]), 0xffff_ffff_ffff_fffe);
    assert_eq!(n.c.recv(10_000), data);
    // Unwritten: zeroes, also where a read covers written and unwritten parts.
    assert_eq!(n.read(20 * MIB, 64 * 1024), vec![0; 64 * 1024]);
    let mixed = n.read(0, 20_000);
    assert!(mixed[..5000].iter().all(|&b| b == 0));
    assert_eq!(mixed[5000..15_000], data);
    assert!(mixed[15_000..].iter().all(|&b| b == 0));

    // Errors are simple replies carrying the errno, with no data after them.
    n.send(0, CMD_READ, 0xaa, DISK_SIZE - 1, 2, &[]);
    assert_eq!(
        n.c.recv(16),
        [
            0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 0xaa
        ]
    );
    n.send(0, CMD_WRITE, 0xbb, DISK_SIZE - 1, 2, &[1, 2]);
    assert_eq!(
        n.c.recv(16),
        [
            0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28, 0, 0, 0, 0, 0, 0, 0, 0xbb
        ]
    );
    n.err(CMD_FLAG_DF, CMD_READ, 0, 512, EINVAL, "DF without SEND_DF");
    n.err(
        0,
        CMD_BLOCK_STATUS,
        0,
        512,
        EINVAL,
        "BLOCK_STATUS without a context",
    );
    n.err(0, 42, 0, 512, EINVAL, "unknown command");
    n.err(0, CMD_READ, 0, 0, EINVAL, "zero-length READ");
    n.err(0, CMD_READ, 0, MAX_PAYLOAD + 1, EINVAL, "READ above 32 MiB");
    n.ok(0, CMD_FLUSH, 0, 0, "FLUSH");
    n.ok(0, CMD_TRIM, 0, 4096, "TRIM");
    assert_eq!(n.read(5000, 10_000), data, "after errors");

    // DISC: no reply, the server closes.
    n.send(0, CMD_DISC, 0, 0, 0, &[]);
    n.c.expect_closed("after NBD_CMD_DISC");
}

#[test]
fn structured_read_of_a_half_written_region() {
    let srv = Server::start();
    let mut n = connect_go(&srv, "disk", Mode::Structured, true);
    let at = 2 * MIB;
    let data = pattern(8, PAGE as usize);
    n.write(at, &data);
    let mut want = data.clone();
    want.resize(64 * 1024, 0);

    let cookie = n.next_cookie();
    n.send(0, CMD_READ, cookie, at, 64 * KIB, &[]);
    let r = n.reply(cookie, at, Some(64 * KIB));
    assert_eq!(assemble(&r, at, 64 * KIB), want);
    let kinds: Vec<u16> = r.chunks.iter().map(|c| c.kind).collect();
    assert!(kinds.contains(&TYPE_OFFSET_DATA), "{kinds:?}");
    assert!(
        kinds.contains(&TYPE_OFFSET_HOLE),
        "a never-written page is a hole: {kinds:?}"
    );
    for (i, c) in r.chunks.iter().enumerate() {
        let last = i == r.chunks.len() - 1;
        assert_eq!(
            c.flags & REPLY_FLAG_DONE != 0,
            last,
            "DONE only on the last chunk"
        );
    }
    // The data chunk holds the written page, the hole the other one.
    let data_chunk = r
        .chunks
        .iter()
        .find(|c| c.kind == TYPE_OFFSET_DATA)
        .unwrap();
    assert_eq!(be64(&data_chunk.payload), at);
    assert_eq!(data_chunk.payload.len() as u64, 8 + PAGE);
    let hole = r
        .chunks
        .iter()
        .find(|c| c.kind == TYPE_OFFSET_HOLE)
        .unwrap();
    assert_eq!(
        (be64(&hole.payload), be32(&hole.payload[8..])),
        (at + PAGE, PAGE as u32)
    );

    // An unaligned read across the boundary.
    assert_eq!(n.read(at + 1000, 40_000), want[1000..41_000]);

    // DF: exactly one chunk, the holes sent as zeroes.
    let r = n.read_reply(CMD_FLAG_DF, at, 64 * KIB);
    assert_eq!(
        r.chunks.len(),
        1,
        "DF allows one chunk: {:?}",
        r.chunks.len()
    );
    assert_eq!(r.chunks[0].kind, TYPE_OFFSET_DATA);
    assert_eq!(r.chunks[0].flags, REPLY_FLAG_DONE);
    assert_eq!(assemble(&r, at, 64 * KIB), want);
    // DF on a range that is all hole: one chunk (a hole or zero data).
    let r = n.read_reply(CMD_FLAG_DF, 30 * MIB, 64 * KIB);
    assert_eq!(r.chunks.len(), 1);
    assert_eq!(assemble(&r, 30 * MIB, 64 * KIB), vec![0; 64 * 1024]);
    // Errors on a READ are structured error chunks.
    let r = n.read_reply(0, DISK_SIZE, 512);
    n.expect_err(&r, EINVAL, "READ past the end, structured");
}

#[test]
fn block_status_with_and_without_req_one() {
    let srv = Server::start();
    let mut n = connect_go(&srv, "disk", Mode::Structured, true);
    let at = 4 * MIB;
    n.write(at, &pattern(9, PAGE as usize));
    n.write(at + 3 * PAGE + 100, &[1; 10]);

    assert_eq!(
        n.block_status(0, at, 2 * PAGE),
        [(PAGE, STATE_DATA), (PAGE, STATE_HOLE_ZERO)]
    );
    assert_eq!(
        n.block_status(0, at, 8 * PAGE),
        [
            (PAGE, STATE_DATA),
            (2 * PAGE, STATE_HOLE_ZERO),
            (PAGE, STATE_DATA),
            (4 * PAGE, STATE_HOLE_ZERO)
        ]
    );
    assert_eq!(
        n.block_status(0, at - PAGE, 2 * PAGE),
        [(PAGE, STATE_HOLE_ZERO), (PAGE, STATE_DATA)]
    );
    // Unaligned start inside the data page.
    assert_eq!(
        n.block_status(0, at + 1000, PAGE),
        [(PAGE - 1000, STATE_DATA), (1000, STATE_HOLE_ZERO)]
    );
    // REQ_ONE: one extent, never longer than asked.
    assert_eq!(
        n.block_status(CMD_FLAG_REQ_ONE, at, 8 * PAGE),
        [(PAGE, STATE_DATA)]
    );
    assert_eq!(
        n.block_status(CMD_FLAG_REQ_ONE, at, 4096),
        [(4096, STATE_DATA)]
    );
    assert_eq!(
        n.block_status(CMD_FLAG_REQ_ONE, at + PAGE, 8 * PAGE),
        [(2 * PAGE, STATE_HOLE_ZERO)]
    );
    assert_eq!(
        n.block_status(CMD_FLAG_REQ_ONE, at + PAGE, 100),
        [(100, STATE_HOLE_ZERO)]
    );
    // The whole disk: everything but the two data pages is a hole.
    let e = n.block_status(0, 0, DISK_SIZE);
    let total: u64 = e.iter().map(|e| e.0).sum();
    assert_eq!(total, DISK_SIZE, "{e:?}");
    let data: u64 = e.iter().filter(|e| e.1 == STATE_DATA).map(|e| e.0).sum();
    assert_eq!(data, 2 * PAGE, "{e:?}");
    // Last byte of the export.
    assert_eq!(
        n.block_status(CMD_FLAG_REQ_ONE, DISK_SIZE - 1, 1),
        [(1, STATE_HOLE_ZERO)]
    );
    // Trimmed data is a hole again.
    n.ok(0, CMD_TRIM, at, PAGE, "TRIM a page");
    assert_eq!(
        n.block_status(CMD_FLAG_REQ_ONE, at, PAGE),
        [(PAGE, STATE_HOLE_ZERO)]
    );
}

// ---------------------------------------------------------------------------------------------
// Extended headers.

#[test]
fn extended_headers_requests_and_replies() {
    let srv = Server::start();
    let mut c = Conn::new(&srv, 3);
    c.expect(OPT_EXTENDED_HEADERS, &[], REP_ACK);
    let id = c.set_base_allocation("disk");
    let mut n = c.go("disk", Mode::Extended, false);
    n.ctx = Some(id);
    assert_eq!((n.size, n.flags), (DISK_SIZE, FLAGS_RW));
    let at = 8 * MIB;
    let a = pattern(10, PAGE as usize);
    let b = pattern(11, PAGE as usize);

    // WRITE with PAYLOAD_LEN: a 32-byte NONE chunk, checked byte for byte.
    let mut req = request_bytes(
        Mode::Extended,
        CMD_FLAG_PAYLOAD_LEN,
        CMD_WRITE,
        0xabcd,
        at,
        PAGE,
    );
    assert_eq!(req.len(), 32);
    req.extend_from_slice(&a);
    n.c.send(&req);
    let mut want = Vec::new();
    want.extend_from_slice(&EXT_REPLY_MAGIC.to_be_bytes());
    want.extend_from_slice(&[0, 1, 0, 0]);
    want.extend_from_slice(&0xabcdu64.to_be_bytes());
    want.extend_from_slice(&at.to_be_bytes());
    want.extend_from_slice(&0u64.to_be_bytes());
    assert_eq!(n.c.recv(32), want, "extended NONE reply to a WRITE");

    // WRITE without PAYLOAD_LEN (as qemu 10 sends it): the same answer.
    let cookie = n.next_cookie();
    n.send(0, CMD_WRITE, cookie, at + PAGE, PAGE, &b);
    let r = n.reply(cookie, at + PAGE, None);
    n.expect_ok(&r, "extended WRITE without PAYLOAD_LEN");
    let r = n.call(CMD_FLAG_FUA, CMD_WRITE, at + 100, 3, b"xyz");
    n.expect_ok(&r, "extended WRITE with FUA, no PAYLOAD_LEN");
    let mut all = a.clone();
    all.extend_from_slice(&b);
    all[100..103].copy_from_slice(b"xyz");

    // READ: 32-byte chunk headers, OFFSET_DATA then OFFSET_HOLE.
    let r = n.read_reply(0, at, 4 * PAGE);
    let mut want = all.clone();
    want.resize(4 * PAGE as usize, 0);
    assert_eq!(assemble(&r, at, 4 * PAGE), want);
    assert!(r.chunks.iter().any(|c| c.kind == TYPE_OFFSET_HOLE));
    assert!(r.chunks.iter().any(|c| c.kind == TYPE_OFFSET_DATA));
    let r = n.read_reply(CMD_FLAG_DF, at, 4 * PAGE);
    assert_eq!(r.chunks.len(), 1);
    assert_eq!(assemble(&r, at, 4 * PAGE), want);

    // BLOCK_STATUS: BLOCK_STATUS_EXT with 64-bit extents.
    assert_eq!(
        n.block_status(0, at, 4 * PAGE),
        [(2 * PAGE, STATE_DATA), (2 * PAGE, STATE_HOLE_ZERO)]
    );
    assert_eq!(
        n.block_status(CMD_FLAG_REQ_ONE, at, 4 * PAGE),
        [(2 * PAGE, STATE_DATA)]
    );
    let e = n.block_status(0, 0, DISK_SIZE);
    assert_eq!(e.iter().map(|e| e.0).sum::<u64>(), DISK_SIZE);

    // Errors are 32-byte ERROR chunks echoing the offset.
    n.err(
        0,
        CMD_READ,
        DISK_SIZE,
        512,
        EINVAL,
        "extended READ past the end",
    );
    n.err(0, 42, 12345, 0, EINVAL, "extended unknown command");
    let r = n.call(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, DISK_SIZE - 1, 2, &[1, 2]);
    n.expect_err(&r, ENOSPC, "extended WRITE past the end");
    // PAYLOAD_LEN on a command without payload: the payload is consumed, then EINVAL.
    let r = n.call(CMD_FLAG_PAYLOAD_LEN, CMD_READ, 0, 16, &[0x77; 16]);
    n.expect_err(&r, EINVAL, "READ with PAYLOAD_LEN and a payload");
    let r = n.call(CMD_FLAG_PAYLOAD_LEN, CMD_TRIM, 0, 8, &[0; 8]);
    n.expect_err(&r, EINVAL, "TRIM with PAYLOAD_LEN and a payload");
    n.err(
        0,
        CMD_READ,
        0,
        MAX_PAYLOAD + 1,
        EINVAL,
        "extended READ above 32 MiB",
    );
    n.err(0, CMD_READ, 0, 1 << 40, EINVAL, "extended READ of 1 TiB");
    n.err(
        0,
        CMD_TRIM,
        0,
        DISK_SIZE + 1,
        EINVAL,
        "extended TRIM past the end",
    );
    n.err(
        0,
        CMD_TRIM,
        1,
        u64::MAX,
        EINVAL,
        "extended TRIM with length overflow",
    );

    // TRIM and WRITE_ZEROES with 64-bit lengths inside the export.
    n.ok(
        0,
        CMD_TRIM,
        0,
        DISK_SIZE,
        "extended TRIM of the whole export",
    );
    n.ok(
        0,
        CMD_WRITE_ZEROES,
        0,
        DISK_SIZE,
        "extended WRITE_ZEROES of the whole export",
    );
    n.ok(0, CMD_FLUSH, 0, 0, "extended FLUSH");
    n.ok(0, CMD_CACHE, 0, DISK_SIZE, "extended CACHE");
    assert_eq!(n.read(at, 2 * PAGE), vec![0; 2 * PAGE as usize]);
    n.send(0, CMD_DISC, 0, 0, 0, &[]);
    n.c.expect_closed("extended DISC");
}

#[test]
fn extended_payload_above_32_mib_closes_the_connection() {
    let srv = Server::start();
    let mut n = connect_go(&srv, "disk", Mode::Extended, true);
    n.send(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 1, 0, MAX_PAYLOAD + 1, &[]);
    n.c.expect_closed("extended WRITE with a 32 MiB + 1 payload");

    let mut n = connect_go(&srv, "disk", Mode::Extended, true);
    n.send(CMD_FLAG_PAYLOAD_LEN, CMD_BLOCK_STATUS, 1, 0, 1 << 40, &[]);
    n.c.expect_closed("BLOCK_STATUS with a 1 TiB payload");

    // Exactly 32 MiB is served.
    let mut n = connect_go(&srv, "disk", Mode::Extended, true);
    let max = pattern(12, MAX_PAYLOAD as usize);
    n.write(0, &max);
    assert_eq!(n.read(0, MAX_PAYLOAD), max);
    still_serves(&srv);
}

#[test]
fn extended_headers_with_lengths_above_4_gib() {
    let srv = Server::with_exports(&[["big", "raw", "memory:8GiB"]]);
    let mut n = connect_go(&srv, "big", Mode::Extended, true);
    let size = 8 * GIB;
    assert_eq!(n.size, size);
    let data = pattern(13, 4096);
    n.write(5 * GIB, &data);
    n.write(size - 4096, &data);
    n.ok(0, CMD_TRIM, 0, 5 * GIB, "TRIM of 5 GiB");
    n.ok(
        0,
        CMD_WRITE_ZEROES,
        5 * GIB + PAGE,
        3 * GIB - 2 * PAGE,
        "WRITE_ZEROES of 3 GiB",
    );
    n.ok(0, CMD_CACHE, 0, size, "CACHE of 8 GiB");
    n.err(0, CMD_TRIM, 1, size, EINVAL, "TRIM past the end of 8 GiB");
    n.err(
        0,
        CMD_WRITE_ZEROES,
        4 * GIB,
        5 * GIB,
        ENOSPC,
        "WRITE_ZEROES past the end",
    );
    assert_eq!(n.read(5 * GIB, 4096), data);
    assert_eq!(n.read(size - 4096, 4096), data);

    // Block status of more than 4 GiB: starts at the offset, descriptors are 64-bit.
    let e = n.block_status(0, 0, size);
    assert_eq!(e[0].1, STATE_HOLE_ZERO, "{e:?}");
    let e = n.block_status(0, 5 * GIB, size - 5 * GIB);
    assert_eq!(e[0], (PAGE, STATE_DATA), "{e:?}");
    assert_eq!(e[1].1, STATE_HOLE_ZERO, "{e:?}");
    let e = n.block_status(CMD_FLAG_REQ_ONE, GIB, 5 * GIB);
    assert_eq!(e, [(e[0].0, STATE_HOLE_ZERO)]);
    assert!(e[0].0 >= 512, "{e:?}");

    // A compact-mode connection cannot express it, but gets the same data.
    let mut n = connect_go(&srv, "big", Mode::Structured, false);
    assert_eq!(n.read(5 * GIB, 4096), data);
    n.ok(
        0,
        CMD_TRIM,
        0,
        u64::from(u32::MAX),
        "compact TRIM of 4 GiB - 1",
    );
}

// ---------------------------------------------------------------------------------------------
// Concurrency.

#[test]
fn pipelined_writes_then_reads() {
    let srv = Server::start();
    let mut n = connect_go(&srv, "disk", Mode::Structured, true);
    const N: u64 = 64;
    const LEN: u64 = 64 * KIB;
    let blob = |i: u64| pattern(1000 + i, LEN as usize);
    let offset = |i: u64| i * 3 * LEN / 2; // overlapping neighbours would race: keep apart
    let mut batch = Vec::new();
    for i in 0..N {
        let flags = if i % 3 == 0 { CMD_FLAG_FUA } else { 0 };
        batch.extend(request_bytes(
            n.mode,
            flags,
            CMD_WRITE,
            0x1_0000 + i,
            offset(i),
            LEN,
        ));
        batch.extend(blob(i));
    }
    n.c.send(&batch);
    let mut pending: Vec<u64> = (0..N).map(|i| 0x1_0000 + i).collect();
    while !pending.is_empty() {
        match n.frame(None) {
            Frame::Simple { error, cookie } => {
                assert_eq!(error, 0, "write {cookie:#x}");
                let at = pending
                    .iter()
                    .position(|&c| c == cookie)
                    .expect("unknown or repeated cookie");
                pending.swap_remove(at);
            }
            Frame::Chunk { cookie, chunk } => {
                assert_eq!(
                    (chunk.kind, chunk.flags),
                    (TYPE_NONE, REPLY_FLAG_DONE),
                    "{cookie:#x}"
                );
                let at = pending
                    .iter()
                    .position(|&c| c == cookie)
                    .expect("unknown or repeated cookie");
                pending.swap_remove(at);
            }
        }
    }

    let mut batch = Vec::new();
    for i in 0..N {
        // Each read covers its block plus part of the gap after it (a hole).
        batch.extend(request_bytes(
            n.mode,
            0,
            CMD_READ,
            0x2_0000 + i,
            offset(i),
            LEN + LEN / 4,
        ));
    }
    n.c.send(&batch);
    let mut replies: HashMap<u64, Reply> = HashMap::new();
    let mut done = 0;
    while done < N {
        match n.frame(None) {
            Frame::Simple { error, cookie } => panic!("simple reply {error} to READ {cookie:#x}"),
            Frame::Chunk { cookie, chunk } => {
                assert!(
                    (0x2_0000..0x2_0000 + N).contains(&cookie),
                    "cookie {cookie:#x}"
                );
                let r = replies.entry(cookie).or_insert_with(|| Reply {
                    simple: None,
                    data: Vec::new(),
                    chunks: Vec::new(),
                });
                assert!(
                    r.chunks
                        .last()
                        .is_none_or(|c| c.flags & REPLY_FLAG_DONE == 0),
                    "chunk after DONE for {cookie:#x}"
                );
                if chunk.flags & REPLY_FLAG_DONE != 0 {
                    done += 1;
                }
                r.chunks.push(chunk);
            }
        }
    }
    for i in 0..N {
        let r = &replies[&(0x2_0000 + i)];
        let got = assemble(r, offset(i), LEN + LEN / 4);
        assert_eq!(got[..LEN as usize], blob(i), "block {i}");
        assert!(
            got[LEN as usize..].iter().all(|&b| b == 0),
            "gap after block {i}"
        );
    }
}

#[test]
fn many_abrupt_clients_while_one_client_works() {
    let srv = Arc::new(Server::start());
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let worker = {
        let srv = Arc::clone(&srv);
        let stop = Arc::clone(&stop);
        let rounds = Arc::clone(&rounds);
        thread::spawn(move || {
            let mut n = connect_go(&srv, "disk", Mode::Structured, true);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) || i < 5 {
                let data = pattern(i, 16 * 1024);
                let at = (i % 64) * 16 * KIB;
                n.write(at, &data);
                assert_eq!(n.read(at, 16 * KIB), data, "round {i}");
                i += 1;
                rounds.store(i as usize, Ordering::Relaxed);
            }
        })
    };

    const CLIENTS: usize = 200;
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let srv = Arc::clone(&srv);
            let barrier = Arc::clone(&barrier);
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    barrier.wait();
                    let mut c = Conn::raw(&srv);
                    match i % 6 {
                        // Gone before reading the greeting.
                        0 => {}
                        // After the greeting.
                        1 => c.greeting(),
                        // Mid-option header.
                        2 => {
                            c.greeting();
                            c.send(&3u32.to_be_bytes());
                            c.send(&option_bytes(OPT_LIST, &[])[..10]);
                        }
                        // A whole GO, without reading the answer.
                        3 => {
                            c.greeting();
                            c.send(&3u32.to_be_bytes());
                            c.send(&option_bytes(OPT_GO, &info_data("disk", &[])));
                        }
                        // Mid-option data, after a successful option.
                        4 => {
                            c.greeting();
                            c.send(&3u32.to_be_bytes());
                            c.expect(OPT_STRUCTURED_REPLY, &[], REP_ACK);
                            let go = option_bytes(OPT_GO, &info_data("disk", &[]));
                            c.send(&go[..20]);
                        }
                        // In transmission, mid-write.
                        _ => {
                            c.greeting();
                            c.send(&3u32.to_be_bytes());
                            c.negotiate(Mode::Structured);
                            let mut n = c.go("disk", Mode::Structured, false);
                            let mut b = request_bytes(n.mode, 0, CMD_WRITE, 1, 32 * MIB, MIB);
                            b.extend_from_slice(&[0xcc; 3000]);
                            n.c.send(&b);
                        }
                    }
                })
                .expect("spawn a client thread")
        })
        .collect();
    for t in threads {
        t.join().expect("an abrupt client failed before closing");
    }
    stop.store(true, Ordering::Relaxed);
    worker.join().expect("the well-behaved client failed");
    assert!(rounds.load(Ordering::Relaxed) >= 5);

    // A fresh client: handshake, GO, I/O; and the abandoned partial writes wrote nothing.
    let mut n = connect_go(&srv, "disk", Mode::Structured, true);
    assert_eq!(n.block_status(0, 32 * MIB, MIB), [(MIB, STATE_HOLE_ZERO)]);
    still_serves(&srv);
}

#[test]
fn requests_sent_right_behind_go_or_export_name_are_served() {
    let srv = Server::start();
    // GO and the first requests in one segment: the server must keep the bytes after GO.
    let mut c = Conn::new(&srv, 3);
    c.expect(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    let mut b = option_bytes(OPT_GO, &info_data("disk", &[]));
    b.extend(request_bytes(Mode::Structured, 0, CMD_WRITE, 1, 0, 5));
    b.extend_from_slice(b"hello");
    b.extend(request_bytes(Mode::Structured, 0, CMD_READ, 2, 0, 5));
    c.send(&b);
    let r = c.replies(OPT_GO);
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    let mut n = Nbd {
        c,
        mode: Mode::Structured,
        size: DISK_SIZE,
        flags: FLAGS_RW,
        ctx: None,
        cookie: 10,
    };
    // The WRITE and READ may be answered in any order; each is a single frame here.
    let mut cookies = Vec::new();
    for _ in 0..2 {
        match n.frame(None) {
            Frame::Simple { error, cookie } => {
                assert_eq!(error, 0);
                cookies.push(cookie);
            }
            Frame::Chunk { cookie, chunk } => {
                assert_eq!(chunk.flags, REPLY_FLAG_DONE);
                cookies.push(cookie);
            }
        }
    }
    cookies.sort_unstable();
    assert_eq!(cookies, [1, 2]);
    assert_eq!(n.read(0, 5), b"hello");

    // The same behind EXPORT_NAME (with NO_ZEROES).
    let mut c = Conn::new(&srv, 3);
    let mut b = option_bytes(OPT_EXPORT_NAME, b"disk");
    b.extend(request_bytes(Mode::Simple, 0, CMD_READ, 3, 0, 5));
    c.send(&b);
    let r = c.recv(10);
    assert_eq!(be64(&r), DISK_SIZE);
    let r = c.recv(16 + 5);
    assert_eq!(be64(&r[8..]), 3);
    assert_eq!(&r[16..], b"hello");
}

#[test]
fn disc_finishes_requests_in_flight() {
    let srv = Server::start();
    let mut n = connect_go(&srv, "disk", Mode::Structured, false);
    let mut b = Vec::new();
    for i in 0..16u64 {
        b.extend(request_bytes(
            n.mode,
            0,
            CMD_WRITE,
            100 + i,
            i * 8 * KIB,
            8 * KIB,
        ));
        b.extend(pattern(500 + i, 8 * 1024));
    }
    b.extend(request_bytes(n.mode, 0, CMD_DISC, 999, 0, 0));
    n.c.send(&b);
    let mut cookies = Vec::new();
    for _ in 0..16 {
        match n.frame(None) {
            Frame::Simple { error, cookie } => {
                assert_eq!(error, 0);
                cookies.push(cookie);
            }
            Frame::Chunk { cookie, chunk } => {
                assert_eq!((chunk.kind, chunk.flags), (TYPE_NONE, REPLY_FLAG_DONE));
                cookies.push(cookie);
            }
        }
    }
    cookies.sort_unstable();
    assert_eq!(cookies, (100..116).collect::<Vec<u64>>());
    n.c.expect_closed("after NBD_CMD_DISC");
    let mut n = connect_go(&srv, "disk", Mode::Structured, false);
    for i in 0..16u64 {
        assert_eq!(n.read(i * 8 * KIB, 8 * KIB), pattern(500 + i, 8 * 1024));
    }
}

#[test]
fn replies_are_sent_after_the_client_half_closes() {
    let srv = Server::start();
    let mut n = connect_go(&srv, "disk", Mode::Structured, false);
    let data = pattern(14, 4096);
    let mut b = request_bytes(n.mode, 0, CMD_WRITE, 1, 0, 4096);
    b.extend_from_slice(&data);
    n.c.send(&b);
    let r = n.reply(1, 0, None);
    n.expect_ok(&r, "write");
    n.c.send(&request_bytes(n.mode, 0, CMD_READ, 2, 0, 4096));
    n.c.s.shutdown(std::net::Shutdown::Write).unwrap();
    let r = n.reply(2, 0, Some(4096));
    assert_eq!(assemble(&r, 0, 4096), data);
    n.c.expect_closed("after the client's half-close");
}

#[test]
fn option_edge_cases() {
    let srv = Server::start();
    let mut c = Conn::new(&srv, 3);
    // Repeated info requests: each info type still comes once.
    let req = [
        INFO_NAME,
        INFO_NAME,
        INFO_BLOCK_SIZE,
        INFO_BLOCK_SIZE,
        INFO_EXPORT,
    ];
    c.opt(OPT_INFO, &info_data("disk", &req));
    let r = c.replies(OPT_INFO);
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    let i = infos(&r);
    assert_eq!(i.get(&INFO_NAME).map(Vec::as_slice), Some(&b"disk"[..]));
    // A description that was requested but is empty need not be sent; if sent it is empty.
    c.opt(OPT_INFO, &info_data("disk", &[INFO_DESCRIPTION]));
    let r = c.replies(OPT_INFO);
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    if let Some(d) = infos(&r).get(&INFO_DESCRIPTION) {
        assert!(d.is_empty());
    }
    // A name longer than 4096 bytes is refused (not looked up).
    let long = "x".repeat(5000);
    c.opt(OPT_INFO, &info_data(&long, &[]));
    let r = c.replies(OPT_INFO);
    assert_eq!(r.len(), 1);
    assert!(
        r[0].kind == REP_ERR_INVALID || r[0].kind == REP_ERR_UNKNOWN,
        "{r:?}"
    );
    // The same query twice selects one context.
    c.negotiate(Mode::Structured);
    c.opt(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation", "base:allocation"]),
    );
    let r = c.replies(OPT_SET_META_CONTEXT);
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(r[0].kind, REP_META_CONTEXT);
    let id = be32(&r[0].data);
    // Extended headers after structured replies are fine; GO then uses them.
    c.negotiate(Mode::Extended);
    let mut n = c.go("disk", Mode::Extended, false);
    n.ctx = Some(id);
    assert_eq!(n.block_status(0, 0, MIB), [(MIB, STATE_HOLE_ZERO)]);
    let r = n.call(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 0, 0, &[]);
    n.expect_err(&r, EINVAL, "extended zero-length WRITE");
    n.write(0, b"ok");
    assert_eq!(n.read(0, 2), b"ok");
}

#[test]
fn fragmented_32_mib_reads_in_every_mode() {
    let srv = Server::start();
    // Every other page written: a 32 MiB read is 1024 pieces, more than one vectored write.
    let mut n = connect_go(&srv, "disk", Mode::Structured, false);
    let pages = MAX_PAYLOAD / PAGE;
    let mut batch = Vec::new();
    let mut want = vec![0u8; MAX_PAYLOAD as usize];
    for p in (0..pages).step_by(2) {
        let data = pattern(p, PAGE as usize);
        want[(p * PAGE) as usize..((p + 1) * PAGE) as usize].copy_from_slice(&data);
        batch.extend(request_bytes(n.mode, 0, CMD_WRITE, p, p * PAGE, PAGE));
        batch.extend(data);
    }
    n.c.send(&batch);
    for _ in (0..pages).step_by(2) {
        match n.frame(None) {
            Frame::Simple { error, .. } => assert_eq!(error, 0),
            Frame::Chunk { chunk, .. } => assert_eq!(chunk.kind, TYPE_NONE),
        }
    }
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut n = connect_go(&srv, "disk", mode, false);
        assert!(n.read(0, MAX_PAYLOAD) == want, "{mode:?}: 32 MiB read");
        // Unaligned, straddling pages.
        let (at, len) = (PAGE / 2 + 7, 3 * PAGE + 11);
        assert!(
            n.read(at, len) == want[at as usize..(at + len) as usize],
            "{mode:?}: unaligned read"
        );
        if mode != Mode::Simple {
            let r = n.read_reply(CMD_FLAG_DF, 0, MAX_PAYLOAD);
            assert_eq!(r.chunks.len(), 1, "{mode:?}: DF");
            assert!(assemble(&r, 0, MAX_PAYLOAD) == want, "{mode:?}: DF read");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Resources.

fn resident_kib(pid: u32) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the server runs");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

#[test]
fn idle_connections_give_their_read_buffers_back() {
    // The second of two 1 MiB writes streams through the connection's 128 KiB read-ahead buffer
    // (the first comes through the handshake's) and leaves it touched. A connection idle for a
    // second hands it back, which its closing line counts (`buffer_releases`). Without the
    // release every idle connection kept about 170 KiB resident, whatever else was going on.
    // Resident size is reported and bounded loosely only: how much the allocator reuses
    // depends on which worker thread frees and allocates, which load on the machine changes.
    const CONNS: u64 = 150;
    let srv = Server::start();
    let data = pattern(5, MIB as usize);
    let open_batch = |conns: &mut Vec<Nbd>| {
        for i in 0..CONNS {
            let mut n = connect_go(&srv, "disk", Mode::Structured, false);
            // Offsets within 32 MiB: later batches overwrite the first one's pages.
            n.write((i % 32) * MIB, &data);
            n.write((i % 32) * MIB, &data);
            conns.push(n);
        }
        // Longer than the server's release delay (1 s).
        thread::sleep(Duration::from_millis(2500));
    };
    let mut conns = Vec::new();
    open_batch(&mut conns);
    open_batch(&mut conns);
    let before = resident_kib(srv.pid());
    open_batch(&mut conns);
    let after = resident_kib(srv.pid());
    let per_conn = (after - before) / CONNS as i64;
    eprintln!("each idle connection added {per_conn} KiB ({before} -> {after} KiB for {CONNS})");
    assert!(
        per_conn < 512,
        "each idle connection added {per_conn} KiB ({before} -> {after} KiB for {CONNS})"
    );
    // They all still work.
    for n in conns.iter_mut().step_by(37) {
        assert_eq!(n.read(0, 4096), data[..4096]);
    }
    // Every connection gave its buffer back while idle.
    let total = conns.len();
    drop(conns);
    let deadline = Instant::now() + TIMEOUT;
    let closing = loop {
        let closing = srv.logged("buffer_releases=");
        if closing.len() >= total || Instant::now() > deadline {
            break closing;
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(closing.len(), total, "closing lines");
    let kept: Vec<&String> = closing
        .iter()
        .filter(|l| l.contains(" buffer_releases=0 "))
        .collect();
    assert!(
        kept.is_empty(),
        "{} kept their buffers: {:?}",
        kept.len(),
        kept.first()
    );
}

/// Reads of a file export large enough to go out from the page cache are framed like any
/// other, in every reply mode, whether by `sendfile` (`sendfile = "always"`) or from a mapping
/// of the image (`"auto"`, for this client on loopback): in simple mode the bytes follow the
/// header; in structured and extended modes (with DF or without) they come as one OFFSET_DATA
/// chunk flagged DONE, whose length counts its offset field. A request sent right behind is
/// answered on the same connection, so the stream stays in step.
#[test]
fn large_file_reads_are_framed_alike_in_every_reply_mode() {
    for (policy, counter) in [("always", "sendfile_bytes"), ("auto", "mapped_bytes")] {
        large_file_reads_framed(policy, counter);
    }
}

fn large_file_reads_framed(policy: &str, counter: &str) {
    let img = std::env::temp_dir().join(format!(
        "nbd-rs-protocol-{}-{policy}-sendfile.img",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&img);
    let conn = format!("file:{}?size=8MiB", img.display());
    let srv = Server::with_exports_env(
        &[["file", "raw", &conn]],
        &[("NBD_RS_SERVER__SENDFILE", policy)],
    );
    for (i, (mode, flags)) in [
        (Mode::Simple, 0),
        (Mode::Structured, 0),
        (Mode::Structured, CMD_FLAG_DF),
        (Mode::Extended, 0),
        (Mode::Extended, CMD_FLAG_DF),
    ]
    .into_iter()
    .enumerate()
    {
        let mut n = connect_go(&srv, "file", mode, false);
        let data = pattern(40 + i as u64, 300_000);
        n.write(4097, &data);
        let (offset, len) = (4097 + 5, 200_000u64);
        let r = n.read_reply(flags, offset, len);
        let want = &data[5..5 + len as usize];
        if mode == Mode::Simple {
            assert_eq!(r.simple, Some(0), "{mode:?}");
            assert!(r.data == want, "{mode:?}: the bytes differ");
        } else {
            assert_eq!(r.chunks.len(), 1, "{mode:?}: one chunk");
            let c = &r.chunks[0];
            assert_eq!(
                (c.kind, c.flags),
                (TYPE_OFFSET_DATA, REPLY_FLAG_DONE),
                "{mode:?}"
            );
            assert_eq!(c.payload.len() as u64, 8 + len, "{mode:?}: chunk length");
            assert_eq!(be64(&c.payload), offset, "{mode:?}: chunk offset");
            assert!(c.payload[8..] == *want, "{mode:?}: the bytes differ");
        }
        assert_eq!(n.read(0, 4096), vec![0u8; 4096], "{mode:?}: the next reply");
    }
    // A client that sends 48 MiB of reads before reading a byte: the replies fill the socket,
    // and sending resumes when it drains. Every reply arrives whole and in place.
    let mut n = connect_go(&srv, "file", Mode::Structured, false);
    let image = pattern(50, 8 << 20);
    n.write(0, &image);
    let reads: Vec<(u64, u64)> = (0..48u64)
        .map(|i| (n.next_cookie(), (i % 7) * MIB + i))
        .collect();
    for &(cookie, at) in &reads {
        n.send(0, CMD_READ, cookie, at, MIB, &[]);
    }
    thread::sleep(Duration::from_millis(300));
    for &(cookie, at) in &reads {
        let r = n.reply(cookie, at, None);
        let got = assemble(&r, at, MIB);
        assert!(
            got == image[at as usize..(at + MIB) as usize],
            "read at {at}"
        );
    }
    drop(n);
    // The closing lines count the bytes that went by the policy's way.
    let sent = |l: &String| -> u64 {
        l.split(&format!(" {counter}="))
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !srv.logged(counter).iter().any(|l| sent(l) >= 48 * MIB) {
        assert!(
            std::time::Instant::now() < deadline,
            "{policy}: no connection counts 48 MiB of {counter}: {:?}",
            srv.logged(counter)
        );
        thread::sleep(Duration::from_millis(20));
    }
    drop(srv);
    std::fs::remove_file(&img).unwrap();
}
