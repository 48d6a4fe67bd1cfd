//! The transmission phase: requests read in batches, run concurrently, answered as they finish.
//!
//! One reader loop parses every request already buffered before reading the socket again, and
//! reads write payloads straight into their own buffers; on a plain socket, a large write to an
//! image file is moved from the socket into the file instead (`nbd::splice`), and while large
//! writes keep coming only each request's header is read. Each valid request runs as its own
//! task, so independent requests on one connection proceed in parallel. A writer task sends
//! replies as they complete, many per vectored write. A per-connection budget bounds the bytes
//! in flight, so a connection costs no more than its in-flight requests. On a plain socket, and
//! when `[server] sendfile` allows it for the client, a large read the device can serve from
//! the page cache goes out by `sendfile`, not copied (see [`ReplyWriter`] and
//! `BlockDevice::file_range`).

use std::future::{Future, poll_fn};
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::handshake::Session;
use super::proto::{BASE_ALLOCATION_ID, cflag, cmd, reply, tflag};
use super::splice::{self, RequestReader, SPLICE_MIN};
use super::wire::{self, Frames, ReplyMode, Request};
use crate::block::{
    BlockError, Extent, FileRange, MAX_PAYLOAD, PagedWrite, ReadChunk, ZeroFlags, errno,
};

/// Budget units per connection; a request costs one unit plus one per 64 KiB it carries, so
/// at most about 64 MiB or 1024 requests are in flight on one connection.
const BUDGET_UNITS: u32 = 1024;
const UNIT_BYTES: u64 = 64 * 1024;
/// Replies gathered into one vectored write at most.
const MAX_BATCH: usize = 128;
/// `IOV_MAX` on Linux.
const MAX_IOVECS: usize = 1024;
/// Read-ahead buffer: refilled in steps of this size.
const READ_CHUNK: usize = 128 * 1024;

/// Write payloads from this size up are read straight into the pages of a device that keeps
/// its bytes in memory (`BlockDevice::page_bytes`).
const PAGED_MIN: u64 = 64 * 1024;
/// A connection that sends nothing for this long gives its read-ahead buffer back and waits
/// with an [`IDLE_BUF`]-byte one, so that idle connections cost a few KiB each, not
/// [`READ_CHUNK`]: the allocator hands the memory to busy ones. The next request that does not
/// fit takes a full buffer again.
const IDLE_RELEASE: std::time::Duration = std::time::Duration::from_secs(1);
const IDLE_BUF: usize = 1024;

static ZEROES: [u8; 1 << 20] = [0; 1 << 20];

/// The write half of a connection. A plain socket can also send file bytes with
/// `sendfile(2)`, straight from the page cache: large file reads are answered that way.
pub trait ReplyWriter: AsyncWrite + Unpin + Send + 'static {
    /// The socket, if replies may carry file bytes by `sendfile`. TLS streams have none to
    /// offer: their bytes must be encrypted in user space.
    fn sendfile_socket(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// A vectored write followed at once by more (a `sendfile`): a socket holds the bytes
    /// back (`MSG_MORE`) so that a reply header and its payload leave together.
    fn poll_write_more(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self).poll_write_vectored(cx, bufs)
    }
}

/// Plain sockets: `sendmsg` with `MSG_MORE`, waiting for room as tokio's own writes do.
macro_rules! socket_reply_writer {
    ($half:ty, $stream:ty) => {
        impl ReplyWriter for $half {
            fn sendfile_socket(&self) -> Option<BorrowedFd<'_>> {
                let sock: &$stream = self.as_ref();
                Some(sock.as_fd())
            }

            fn poll_write_more(
                &mut self,
                cx: &mut Context<'_>,
                bufs: &[IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                let sock: &$stream = self.as_ref();
                loop {
                    std::task::ready!(sock.poll_write_ready(cx))?;
                    match sock.try_io(Interest::WRITABLE, || {
                        let mut none = rustix::net::SendAncillaryBuffer::default();
                        let flags = rustix::net::SendFlags::MORE | rustix::net::SendFlags::NOSIGNAL;
                        rustix::net::sendmsg(sock, bufs, &mut none, flags).map_err(io::Error::from)
                    }) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        r => return Poll::Ready(r),
                    }
                }
            }
        }
    };
}

socket_reply_writer!(tokio::net::tcp::OwnedWriteHalf, tokio::net::TcpStream);
socket_reply_writer!(tokio::net::unix::OwnedWriteHalf, tokio::net::UnixStream);

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> ReplyWriter for tokio::io::WriteHalf<S> {}

/// How a transmission phase ended.
#[derive(Debug)]
pub enum End {
    /// The client sent NBD_CMD_DISC.
    Disconnect,
    /// The client closed the socket without NBD_CMD_DISC.
    ClientGone,
    /// The server is shutting down, or the export was retired.
    Shutdown,
    /// Told to stop, the client did not let its requests finish in time.
    Cut,
    /// No request for longer than the idle timeout, and none in flight.
    Idle,
}

/// Why a transmission phase ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum TransmissionError {
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The request stream is out of sync.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// Counters for the connection's closing log line.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Requests received.
    pub requests: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Read payload bytes sent straight from the page cache (`sendfile`), not copied.
    pub sendfile_bytes: u64,
    /// Read payload bytes copied once into the socket from a mapping of the image file.
    pub mapped_bytes: u64,
    /// Write payload bytes moved from the socket into a file by `splice`, not read.
    pub spliced_bytes: u64,
    /// Write payload bytes that went into whole pages of the device's memory (read straight
    /// from a plain socket, or copied from bytes already read ahead or decrypted).
    pub paged_bytes: u64,
    /// Times the connection, idle, gave its read-ahead buffer back.
    pub buffer_releases: u64,
}

struct Outgoing {
    frames: Frames,
    _permit: Option<OwnedSemaphorePermit>,
}

type Tx = mpsc::UnboundedSender<Outgoing>;

/// A validated request.
enum Op {
    Read {
        offset: u64,
        len: u32,
        df: bool,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    /// A write whose payload was read straight into the device's pages.
    WritePages {
        data: PagedWrite,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Zero {
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    },
    Cache {
        offset: u64,
        len: u64,
    },
    BlockStatus {
        offset: u64,
        len: u64,
        req_one: bool,
    },
}

/// How a connection's transmission phase behaves, beyond its export.
#[derive(Debug, Clone, Copy, Default)]
pub struct Settings {
    /// Close the connection once it has been silent this long, with nothing in flight
    /// (`None`: never).
    pub idle: Option<std::time::Duration>,
    /// How large reads of cached file pages go out (`[server] sendfile`).
    pub file_reads: FileReads,
}

/// How a read that the device can answer with cached pages of a file goes out. Only plain
/// sockets take anything but `Copied`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FileReads {
    /// Read into memory, then written, like any other reply.
    #[default]
    Copied,
    /// Written from a mapping of the range: copied once, by the kernel (`block::mapped`).
    Mapped,
    /// Sent by `sendfile`: not copied by the server at all.
    Sendfile,
}

/// Bytes the writer sent other than from memory, for the closing line.
#[derive(Debug, Default)]
struct Sent {
    sendfile: AtomicU64,
    mapped: AtomicU64,
}

impl Sent {
    fn count(&self, stats: &mut Stats) {
        stats.sendfile_bytes = self.sendfile.load(Ordering::Relaxed);
        stats.mapped_bytes = self.mapped.load(Ordering::Relaxed);
    }
}

/// An answer to a bad request: the error code and a message for the client.
type Refusal = (u32, &'static str);

/// Serves requests until the client disconnects or `shutdown` fires. Requests in flight are
/// finished and answered before returning, unless `cut` fires first: then the connection is
/// dropped at once (requests already running still finish against the device, unanswered).
pub async fn serve<R, W>(
    mut rd: R,
    wr: W,
    mut buf: BytesMut,
    session: Session,
    shutdown: CancellationToken,
    cut: CancellationToken,
    settings: Settings,
) -> (Result<End, TransmissionError>, Stats)
where
    R: RequestReader,
    W: ReplyWriter,
{
    let Settings { idle, file_reads } = settings;
    // A TLS stream has no socket to give: its bytes are encrypted in user space.
    let file_reads = if wr.sendfile_socket().is_some() {
        file_reads
    } else {
        FileReads::Copied
    };
    let (tx, rx) = mpsc::unbounded_channel();
    // Counted by the writer as it goes, so that a cut connection reports it too.
    let sent = Arc::new(Sent::default());
    let mut writer = tokio::spawn(write_loop(wr, rx, Arc::clone(&sent)));
    let budget = Arc::new(Semaphore::new(BUDGET_UNITS as usize));
    let session = Arc::new(session);
    let mut stats = Stats::default();

    let result = tokio::select! {
        r = read_loop(&mut rd, &mut buf, &session, file_reads, &tx, &budget, &shutdown, idle, &mut stats) => r,
        _ = cut.cancelled() => Ok(End::Cut),
    };
    // Dropping our sender lets the writer finish once every running request has answered.
    drop(tx);
    let written = tokio::select! {
        w = &mut writer => match w {
            Ok(r) => r,
            Err(join) => Err(io::Error::other(join.to_string())),
        },
        _ = cut.cancelled() => {
            writer.abort();
            sent.count(&mut stats);
            return (Ok(End::Cut), stats);
        }
    };
    sent.count(&mut stats);
    let result = match (result, written) {
        (Ok(end), Ok(())) => Ok(end),
        (Ok(End::ClientGone), Err(_)) => Ok(End::ClientGone),
        (Ok(_), Err(e)) => Err(e.into()),
        (Err(e), _) => Err(e),
    };
    (result, stats)
}

// The reader's whole state, borrowed from `serve`: a struct would only move the list.
#[allow(clippy::too_many_arguments)]
async fn read_loop<R: RequestReader>(
    rd: &mut R,
    buf: &mut BytesMut,
    session: &Arc<Session>,
    file_reads: FileReads,
    tx: &Tx,
    budget: &Arc<Semaphore>,
    shutdown: &CancellationToken,
    idle: Option<std::time::Duration>,
    stats: &mut Stats,
) -> Result<End, TransmissionError> {
    let mode = session.mode;
    let release_timer = tokio::time::sleep(IDLE_RELEASE);
    tokio::pin!(release_timer);
    let mut stop_seen = false;
    // Whether `buf` may hold a READ_CHUNK allocation (its capacity is only what is left of it).
    let mut holds_chunk = false;
    // Whether the last request was a spliced write.
    let mut lean = false;
    loop {
        let req = match wire::parse_request(buf, mode) {
            Ok(Some(r)) => r,
            Ok(None) => {
                if buf.capacity() - buf.len() < mode.request_len() {
                    buf.reserve(READ_CHUNK);
                    holds_chunk = true;
                }
                // The idle timeout counts only the time nothing is in flight: a slow request is
                // not idleness, and the count starts again when it is answered. Checked on a
                // tick a quarter of the timeout long. (`read_buf` is cancel-safe.)
                let tick = idle.map(|d| (d / 4).max(std::time::Duration::from_millis(10)));
                let busy = |buf: &BytesMut| {
                    !buf.is_empty() || budget.available_permits() != BUDGET_UNITS as usize
                };
                let mut quiet_since = (!busy(buf)).then(tokio::time::Instant::now);
                // One timer for the connection, pushed back at each wait: moving a deadline
                // later costs no timer-wheel work.
                let mut release = buf.is_empty() && holds_chunk;
                if release {
                    release_timer
                        .as_mut()
                        .reset(tokio::time::Instant::now() + IDLE_RELEASE);
                }
                // After a spliced write, only the next request's header is read: what follows
                // it is likely another large payload, to be spliced rather than copied.
                let want = if lean {
                    mode.request_len().saturating_sub(buf.len()).max(1)
                } else {
                    usize::MAX
                };
                let n = loop {
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => {
                            // Requests the client sent before the stop are answered: what the
                            // socket holds when the stop comes is read once, not what a busy
                            // client sends after it.
                            if stop_seen {
                                return Ok(End::Shutdown);
                            }
                            stop_seen = true;
                            buf.reserve(READ_CHUNK);
                            holds_chunk = true;
                            match poll_once(std::pin::pin!(rd.read_buf(buf))).await {
                                Poll::Ready(Ok(n)) if n > 0 => break n,
                                _ => return Ok(End::Shutdown),
                            }
                        }
                        n = read_some(rd, buf, want) => break n?,
                        _ = release_timer.as_mut(), if release => {
                            // Still empty: `read_buf` would have returned first.
                            *buf = BytesMut::with_capacity(IDLE_BUF);
                            release = false;
                            holds_chunk = false;
                            stats.buffer_releases += 1;
                        }
                        _ = sleep_or_never(tick) => {
                            let now = tokio::time::Instant::now();
                            if busy(buf) {
                                quiet_since = None;
                            } else if let (Some(since), Some(limit)) = (quiet_since, idle) {
                                if now.duration_since(since) >= limit {
                                    return Ok(End::Idle);
                                }
                            } else {
                                quiet_since = Some(now);
                            }
                        }
                    }
                };
                if n == 0 {
                    return if buf.is_empty() {
                        Ok(End::ClientGone)
                    } else {
                        Err(TransmissionError::Protocol(format!(
                            "client closed the connection inside a request header ({} bytes)",
                            buf.len()
                        )))
                    };
                }
                continue;
            }
            Err(bad) => return Err(TransmissionError::Protocol(bad.to_string())),
        };
        stats.requests += 1;

        if req.kind == cmd::DISC {
            return Ok(End::Disconnect);
        }

        // Payloads beyond the maximum are never buffered: in compact mode the stream is kept in
        // sync by discarding them; with extended headers the spec says to disconnect.
        if req.payload > u64::from(MAX_PAYLOAD) {
            if mode == ReplyMode::Extended {
                return Err(TransmissionError::Protocol(format!(
                    "payload of {} bytes exceeds the maximum of {MAX_PAYLOAD}",
                    req.payload
                )));
            }
            discard(rd, buf, req.payload).await?;
            stats.errors += 1;
            send(
                tx,
                refuse(
                    session,
                    &req,
                    (errno::EINVAL, "request payload exceeds 32 MiB"),
                ),
                None,
            );
            continue;
        }

        let units = 1 + (req.payload.max(read_len(&req)) / UNIT_BYTES) as u32;
        let permit = match Arc::clone(budget).acquire_many_owned(units).await {
            Ok(p) => p,
            Err(_) => return Err(TransmissionError::Protocol("budget closed".into())),
        };
        if let Some(frames) = splice_write(rd, buf, session, &req, stats).await? {
            send(tx, frames, Some(permit));
            lean = true;
            continue;
        }
        let paged = paged_write(rd, buf, session, &req).await?;
        // After a large write, as after a spliced one, only the next header is read: the next
        // payload then goes straight into its pages too.
        lean = paged.is_some();
        let op = match paged {
            Some((data, fua)) => {
                stats.paged_bytes += data.pages.iter().map(|p| p.len() as u64).sum::<u64>();
                Ok(Op::WritePages { data, fua })
            }
            None => {
                let payload = if req.payload > 0 {
                    read_payload(rd, buf, req.payload as usize).await?
                } else {
                    Bytes::new()
                };
                validate(session, &req, payload)
            }
        };

        match op {
            Ok(op) => {
                // Polled once here: a request the device finishes at once (memory, a page-cache
                // hit) is answered without a task or a wake-up on another worker. One that has
                // to wait goes on as its own task, so it never holds up the next request.
                let session = Arc::clone(session);
                let mut running =
                    Box::pin(async move { execute(&session, file_reads, &req, op).await });
                match poll_once(running.as_mut()).await {
                    Poll::Ready(frames) => send(tx, frames, Some(permit)),
                    Poll::Pending => {
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let frames = running.await;
                            send(&tx, frames, Some(permit));
                        });
                    }
                }
            }
            Err(refusal) => {
                stats.errors += 1;
                debug!(
                    export = %session.export.name,
                    kind = req.kind,
                    flags = req.flags,
                    offset = req.offset,
                    length = req.length,
                    error = refusal.0,
                    "refused request: {}",
                    refusal.1
                );
                send(tx, refuse(session, &req, refusal), Some(permit));
            }
        }
    }
}

/// Puts a large write's payload straight from the socket into the image file
/// (`nbd::splice`), when the connection is a plain socket, the request is valid, and the device
/// offers a file to put it in; `None` when the payload is still to be read.
async fn splice_write<R: RequestReader>(
    rd: &mut R,
    buf: &mut BytesMut,
    session: &Session,
    req: &Request,
    stats: &mut Stats,
) -> io::Result<Option<Frames>> {
    if req.kind != cmd::WRITE
        || req.payload < SPLICE_MIN
        || buf.len() as u64 >= req.payload
        || !rd.can_splice()
    {
        return Ok(None);
    }
    // Asked first: most devices have no file to offer, and answer at once.
    let Some(target) = session.export.device.write_target(req.offset) else {
        return Ok(None);
    };
    // An invalid request is refused the usual way, after its payload is read.
    let Ok(Op::Write {
        offset, fua: false, ..
    }) = validate(session, req, Bytes::new())
    else {
        return Ok(None);
    };
    let Ok(pipe) = splice::Pipe::take() else {
        return Ok(None);
    };
    Ok(Some(
        match splice::splice_payload(rd, buf, &target, pipe, req.payload as usize).await? {
            Ok(spliced) => {
                stats.spliced_bytes += spliced;
                wire::ok_reply(session.mode, req.cookie, req.offset)
            }
            Err(e) => failed(session, req, BlockError::io("write", offset, e)),
        },
    ))
}

/// Reads a large write's payload straight into pages of the device's size, when the device
/// keeps its bytes in memory pages (`BlockDevice::page_bytes`), the request is valid, and the
/// payload is not all buffered already: the payload and the request's FUA flag, or `None` when
/// the payload is still to be read.
async fn paged_write<R: RequestReader>(
    rd: &mut R,
    buf: &mut BytesMut,
    session: &Session,
    req: &Request,
) -> io::Result<Option<(PagedWrite, bool)>> {
    if req.kind != cmd::WRITE || req.payload < PAGED_MIN || buf.len() as u64 >= req.payload {
        return Ok(None);
    }
    let Some(page) = session.export.device.page_bytes().filter(|&p| p > 0) else {
        return Ok(None);
    };
    // An invalid request is refused the usual way, after its payload is read.
    let Ok(Op::Write { fua, .. }) = validate(session, req, Bytes::new()) else {
        return Ok(None);
    };
    // The payload is at most MAX_PAYLOAD, and page sizes fit in u64.
    let n = req.payload as usize;
    let head = (page - (req.offset % page as u64) as usize) % page;
    let head = head.min(n);
    let whole = (n - head) / page;
    let head_bytes = read_payload(rd, buf, head).await?;
    let pages = read_pages(rd, buf, whole, page).await?;
    let tail = read_payload(rd, buf, n - head - whole * page).await?;
    let data = PagedWrite {
        offset: req.offset,
        head: head_bytes,
        pages,
        tail,
    };
    Ok(Some((data, fua)))
}

/// Reads `count` pages of `size` bytes each, taking what is buffered first, then from the
/// socket straight into the pages (`RequestReader::poll_fill`).
async fn read_pages<R: RequestReader>(
    rd: &mut R,
    buf: &mut BytesMut,
    count: usize,
    size: usize,
) -> io::Result<Vec<Box<[u8]>>> {
    let mut pages: Vec<Vec<u8>> = (0..count).map(|_| Vec::with_capacity(size)).collect();
    // The first page with room.
    let mut at = 0;
    while at < count {
        if !buf.is_empty() {
            let take = buf.len().min(size - pages[at].len());
            pages[at].extend_from_slice(&buf.split_to(take));
        } else if poll_fn(|cx| rd.poll_fill(cx, &mut pages[at..], size)).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client closed the connection inside a write payload",
            ));
        }
        while at < count && pages[at].len() == size {
            at += 1;
        }
    }
    Ok(pages.into_iter().map(Vec::into_boxed_slice).collect())
}

/// The reply to a request the device failed, logged unless it is an expected answer.
fn failed(session: &Session, req: &Request, e: BlockError) -> Frames {
    if !matches!(e, BlockError::FastZeroUnsupported) {
        warn!(export = %session.export.name, kind = req.kind, error = %e, "request failed");
    }
    wire::error_reply(
        session.mode,
        req.cookie,
        req.offset,
        e.nbd_errno(),
        &e.to_string(),
    )
}

fn send(tx: &Tx, frames: Frames, permit: Option<OwnedSemaphorePermit>) {
    // If the writer is gone the client is too; the reader notices on its next read.
    let _ = tx.send(Outgoing {
        frames,
        _permit: permit,
    });
}

fn read_len(req: &Request) -> u64 {
    if req.kind == cmd::READ {
        req.length.min(u64::from(MAX_PAYLOAD))
    } else {
        0
    }
}

fn refuse(session: &Session, req: &Request, (code, msg): Refusal) -> Frames {
    wire::error_reply(session.mode, req.cookie, req.offset, code, msg)
}

/// Polls `fut` once: its output if it is ready now.
async fn poll_once<F: Future + ?Sized>(mut fut: Pin<&mut F>) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await
}

async fn sleep_or_never(d: Option<std::time::Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Reads what the socket has into `buf`, at most `want` bytes. Cancel-safe, as `read_buf`.
async fn read_some<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    want: usize,
) -> io::Result<usize> {
    rd.read_buf(&mut buf.limit(want)).await
}

/// Reads exactly `n` payload bytes, taking what is buffered first: the rest as one page
/// (`RequestReader::poll_fill`), so that a TCP socket wakes the reader once it has arrived.
async fn read_payload<R: RequestReader>(
    rd: &mut R,
    buf: &mut BytesMut,
    n: usize,
) -> io::Result<Bytes> {
    if buf.len() >= n {
        return Ok(buf.split_to(n).freeze());
    }
    let mut payload = Vec::with_capacity(n);
    payload.extend_from_slice(&buf.split());
    while payload.len() < n {
        let page = std::slice::from_mut(&mut payload);
        if poll_fn(|cx| rd.poll_fill(cx, page, n)).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client closed the connection inside a write payload",
            ));
        }
    }
    Ok(Bytes::from(payload))
}

/// Reads and drops `n` payload bytes.
pub(super) async fn discard<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    mut n: u64,
) -> io::Result<()> {
    let take = (buf.len() as u64).min(n) as usize;
    let _ = buf.split_to(take);
    n -= take as u64;
    let mut scratch = vec![0u8; READ_CHUNK];
    while n > 0 {
        let want = (scratch.len() as u64).min(n) as usize;
        let got = rd.read(&mut scratch[..want]).await?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client closed the connection inside a write payload",
            ));
        }
        n -= got as u64;
    }
    Ok(())
}

/// Checks a request against the spec and the export; returns what to run, or the refusal.
fn validate(session: &Session, req: &Request, payload: Bytes) -> Result<Op, Refusal> {
    let info = session.export.device.info();
    let has = |f: u16| session.flags & f != 0;
    let mut allowed = cflag::FUA;
    match req.kind {
        cmd::READ if has(tflag::SEND_DF) => allowed |= cflag::DF,
        cmd::WRITE if session.mode == ReplyMode::Extended => allowed |= cflag::PAYLOAD_LEN,
        cmd::WRITE_ZEROES => {
            allowed |= cflag::NO_HOLE;
            if has(tflag::SEND_FAST_ZERO) {
                allowed |= cflag::FAST_ZERO;
            }
        }
        cmd::BLOCK_STATUS => allowed |= cflag::REQ_ONE,
        cmd::READ | cmd::WRITE | cmd::FLUSH | cmd::TRIM | cmd::CACHE => {}
        _ => return Err((errno::EINVAL, "unknown command")),
    }
    // Writing to a read-only export is EPERM whatever the flags (FAST_ZERO is not advertised
    // there, but EPERM is the answer that tells the client what is wrong).
    let writes = matches!(req.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && info.read_only {
        return Err((errno::EPERM, "the export is read-only"));
    }
    if req.flags & !allowed != 0 {
        return Err((errno::EINVAL, "flag not valid for this command"));
    }
    let fua = req.flags & cflag::FUA != 0;
    if req.payload > 0 && req.kind != cmd::WRITE {
        return Err((errno::EINVAL, "payload on a command that takes none"));
    }
    if req.kind == cmd::FLUSH {
        if req.offset != 0 || req.length != 0 {
            return Err((errno::EINVAL, "flush with nonzero offset or length"));
        }
        return Ok(Op::Flush);
    }
    if req.length == 0 {
        return Err((errno::EINVAL, "zero-length request"));
    }
    let in_range = req
        .offset
        .checked_add(req.length)
        .is_some_and(|end| end <= info.size);
    if !in_range {
        return Err(if matches!(req.kind, cmd::WRITE | cmd::WRITE_ZEROES) {
            (errno::ENOSPC, "request extends past the end of the export")
        } else {
            (errno::EINVAL, "request extends past the end of the export")
        });
    }
    let (offset, len) = (req.offset, req.length);
    let sizes = &session.export.block_sizes;
    let min = u64::from(sizes.minimum);
    if min > 1 && (offset % min != 0 || len % min != 0) {
        return Err((
            errno::EINVAL,
            "request not aligned to the minimum block size",
        ));
    }
    if matches!(req.kind, cmd::READ | cmd::WRITE) && len > u64::from(sizes.maximum) {
        return Err((errno::EINVAL, "request larger than the maximum block size"));
    }
    Ok(match req.kind {
        cmd::READ => {
            if len > u64::from(MAX_PAYLOAD) {
                return Err((errno::EINVAL, "read larger than 32 MiB"));
            }
            Op::Read {
                offset,
                len: len as u32,
                df: req.flags & cflag::DF != 0,
            }
        }
        cmd::WRITE => Op::Write {
            offset,
            data: payload,
            fua,
        },
        cmd::TRIM => Op::Trim { offset, len, fua },
        cmd::WRITE_ZEROES => Op::Zero {
            offset,
            len,
            flags: ZeroFlags {
                fua,
                no_hole: req.flags & cflag::NO_HOLE != 0,
                fast: req.flags & cflag::FAST_ZERO != 0,
            },
        },
        cmd::CACHE => Op::Cache { offset, len },
        cmd::BLOCK_STATUS => {
            if !session.base_allocation {
                return Err((errno::EINVAL, "no metadata context was negotiated"));
            }
            Op::BlockStatus {
                offset,
                len,
                req_one: req.flags & cflag::REQ_ONE != 0,
            }
        }
        _ => return Err((errno::EINVAL, "unknown command")),
    })
}

/// Runs a validated request on the export's device and builds its reply. Unless reads are
/// `Copied` (the connection is a plain socket), a read the device can serve from the page cache
/// is answered from the file range itself: by `sendfile`, or from a mapping of it.
async fn execute(session: &Session, file_reads: FileReads, req: &Request, op: Op) -> Frames {
    let dev = &session.export.device;
    let mode = session.mode;
    if file_reads != FileReads::Copied
        && let Op::Read { offset, len, df } = op
        && let Some(range) = dev.file_range(offset, len)
    {
        if file_reads == FileReads::Sendfile {
            return file_reply(mode, req, range);
        }
        match range.windows.bytes(range.offset, range.len) {
            Some(Ok(bytes)) => {
                let mut frames = read_reply(mode, req, &[ReadChunk::Data(bytes)], df);
                frames.mapped = range.len;
                return frames;
            }
            // Said once per image: its reads are read from now on.
            Some(Err(e)) => warn!(export = %session.export.name, error = %e,
                "cannot map the image to send reads from it: large reads are read into memory"),
            // Read the usual way, below.
            None => {}
        }
    }
    let ok = || wire::ok_reply(mode, req.cookie, req.offset);
    let result = match op {
        Op::Read { offset, len, df } => match dev.read(offset, len).await {
            Ok(data) if data.len() == u64::from(len) => {
                return read_reply(mode, req, data.chunks(), df);
            }
            Ok(data) => Err(BlockError::io(
                "read",
                offset,
                io::Error::other(format!(
                    "device returned {} bytes for a {len}-byte read",
                    data.len()
                )),
            )),
            Err(e) => Err(e),
        },
        Op::Write { offset, data, fua } => dev.write(offset, data, fua).await.map(|()| ok()),
        Op::WritePages { data, fua } => dev.write_pages(data, fua).await.map(|()| ok()),
        Op::Flush => dev.flush().await.map(|()| ok()),
        Op::Trim { offset, len, fua } => dev.trim(offset, len, fua).await.map(|()| ok()),
        Op::Zero { offset, len, flags } => {
            dev.write_zeroes(offset, len, flags).await.map(|()| ok())
        }
        // CACHE is a hint: a failure to prefetch changes nothing for the client.
        Op::Cache { offset, len } => {
            if let Err(e) = dev.cache(offset, len).await {
                debug!(export = %session.export.name, error = %e, "cache hint failed");
            }
            Ok(ok())
        }
        Op::BlockStatus {
            offset,
            len,
            req_one,
        } => match dev.block_status(offset, len).await {
            Ok(extents) => status_reply(mode, req, &extents, len, req_one),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(frames) => frames,
        Err(e) => failed(session, req, e),
    }
}

/// Zero bytes as shared static slices.
fn push_zeroes(parts: &mut Vec<Bytes>, mut n: usize) {
    while n > 0 {
        let k = n.min(ZEROES.len());
        parts.push(Bytes::from_static(&ZEROES[..k]));
        n -= k;
    }
}

fn read_reply(mode: ReplyMode, req: &Request, chunks: &[ReadChunk], df: bool) -> Frames {
    let mut parts = Vec::with_capacity(2 * chunks.len() + 1);
    let mut hdr = BytesMut::with_capacity(40 * chunks.len().max(1));
    if mode == ReplyMode::Simple {
        wire::simple_reply(&mut hdr, 0, req.cookie);
        parts.push(hdr.freeze());
        for c in chunks {
            match c {
                ReadChunk::Data(b) => parts.push(b.clone()),
                ReadChunk::Zero(n) => push_zeroes(&mut parts, *n as usize),
            }
        }
        return Frames::of(parts);
    }
    if df && chunks.len() > 1 {
        // DF allows a single content chunk: send the holes as explicit zeroes.
        let len = chunks.iter().map(|c| u64::from(c.len())).sum::<u64>();
        whole_data_header(&mut hdr, mode, req, len);
        parts.push(hdr.freeze());
        for c in chunks {
            match c {
                ReadChunk::Data(b) => parts.push(b.clone()),
                ReadChunk::Zero(n) => push_zeroes(&mut parts, *n as usize),
            }
        }
        return Frames::of(parts);
    }
    // One chunk per run of data (a device may hand a range over in several buffers), one
    // per hole.
    let mut pos = req.offset;
    let mut rest = chunks;
    while let Some(first) = rest.first() {
        let run = match first {
            ReadChunk::Data(_) => rest
                .iter()
                .take_while(|c| matches!(c, ReadChunk::Data(_)))
                .count(),
            ReadChunk::Zero(_) => 1,
        };
        let (now, later) = rest.split_at(run);
        rest = later;
        let len: u64 = now.iter().map(|c| u64::from(c.len())).sum();
        let done = rest.is_empty();
        if let ReadChunk::Zero(n) = first {
            wire::chunk_header(
                &mut hdr,
                mode,
                done,
                reply::OFFSET_HOLE,
                req.cookie,
                req.offset,
                12,
            );
            hdr.put_u64(pos);
            hdr.put_u32(*n);
            parts.push(hdr.split().freeze());
        } else {
            wire::chunk_header(
                &mut hdr,
                mode,
                done,
                reply::OFFSET_DATA,
                req.cookie,
                req.offset,
                8 + len,
            );
            hdr.put_u64(pos);
            parts.push(hdr.split().freeze());
            parts.extend(now.iter().filter_map(|c| match c {
                ReadChunk::Data(b) => Some(b.clone()),
                ReadChunk::Zero(_) => None,
            }));
        }
        pos += len;
    }
    Frames::of(parts)
}

/// The header of a structured READ reply that is one OFFSET_DATA chunk of `len` bytes, the
/// last: its length counts the 8-byte offset field that follows the header.
fn whole_data_header(hdr: &mut BytesMut, mode: ReplyMode, req: &Request, len: u64) {
    wire::chunk_header(
        hdr,
        mode,
        true,
        reply::OFFSET_DATA,
        req.cookie,
        req.offset,
        8 + len,
    );
    hdr.put_u64(req.offset);
}

/// A read answered from a file: the header, then the bytes by `sendfile`. One data chunk in
/// structured modes (a file's holes go as zeroes, as a copied read sends them).
fn file_reply(mode: ReplyMode, req: &Request, range: FileRange) -> Frames {
    let mut hdr = BytesMut::with_capacity(40);
    if mode == ReplyMode::Simple {
        wire::simple_reply(&mut hdr, 0, req.cookie);
    } else {
        whole_data_header(&mut hdr, mode, req, u64::from(range.len));
    }
    Frames {
        parts: vec![hdr.freeze()],
        tail: Some(range),
        mapped: 0,
    }
}

fn status_reply(
    mode: ReplyMode,
    req: &Request,
    extents: &[Extent],
    len: u64,
    req_one: bool,
) -> Result<Frames, BlockError> {
    // Keep what lies within the request; the device promised no more, this makes it certain.
    let mut kept: Vec<Extent> = Vec::with_capacity(extents.len());
    let mut total = 0u64;
    for e in extents {
        if e.length == 0 || total >= len {
            continue;
        }
        let length = e.length.min(len - total);
        total += length;
        kept.push(Extent {
            length,
            flags: e.flags,
        });
        if req_one {
            break;
        }
    }
    if kept.is_empty() {
        return Err(BlockError::io(
            "block_status",
            req.offset,
            io::Error::other("device described no extent"),
        ));
    }
    let mut b = BytesMut::with_capacity(40 + 16 * kept.len());
    if mode == ReplyMode::Extended {
        wire::chunk_header(
            &mut b,
            mode,
            true,
            reply::BLOCK_STATUS_EXT,
            req.cookie,
            req.offset,
            8 + 16 * kept.len() as u64,
        );
        b.put_u32(BASE_ALLOCATION_ID);
        b.put_u32(kept.len() as u32);
        for e in &kept {
            b.put_u64(e.length);
            b.put_u64(u64::from(e.flags));
        }
    } else {
        wire::chunk_header(
            &mut b,
            mode,
            true,
            reply::BLOCK_STATUS,
            req.cookie,
            req.offset,
            4 + 8 * kept.len() as u64,
        );
        b.put_u32(BASE_ALLOCATION_ID);
        for e in &kept {
            // Compact requests are at most 4 GiB - 1 long, and `kept` lies within the request.
            b.put_u32(e.length as u32);
            b.put_u32(e.flags);
        }
    }
    Ok(Frames::of(vec![b.freeze()]))
}

/// Sends replies as they arrive, batching those that are ready together, and counts in `sent`
/// the bytes that went by `sendfile` or from a mapping.
async fn write_loop<W: ReplyWriter>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    sent: Arc<Sent>,
) -> io::Result<()> {
    let mut batch: Vec<Outgoing> = Vec::with_capacity(MAX_BATCH);
    let mut sock: Option<SendfileSocket> = None;
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        // One vectored write for everything up to (and including the header of) a reply
        // whose payload comes from a file; then that payload; and so on.
        let mut parts: Vec<&Bytes> = Vec::with_capacity(2 * batch.len());
        for o in &batch {
            parts.extend(o.frames.parts.iter().filter(|b| !b.is_empty()));
            if let Some(range) = &o.frames.tail {
                write_all_vectored(&mut wr, &parts, true).await?;
                parts.clear();
                let sock = match &mut sock {
                    Some(s) => s,
                    none => none.insert(sendfile_socket(&wr)?),
                };
                send_file(sock, range).await?;
                sent.sendfile
                    .fetch_add(u64::from(range.len), Ordering::Relaxed);
            }
        }
        write_all_vectored(&mut wr, &parts, false).await?;
        let mapped: u64 = batch.iter().map(|o| u64::from(o.frames.mapped)).sum();
        if mapped > 0 {
            sent.mapped.fetch_add(mapped, Ordering::Relaxed);
        }
        // A TLS stream may have taken the last bytes and kept their records back, the socket
        // being full: without a flush they would wait for the next reply, which the client,
        // waiting for this one, may never cause. (For a plain socket this does nothing.)
        wr.flush().await?;
        drop(parts);
        // Dropping the batch returns its budget to the reader.
        batch.clear();
    }
    wr.flush().await?;
    wr.shutdown().await
}

/// The connection's socket as the blocking pool's `sendfile` calls see it: a duplicate
/// descriptor, so that it stays open while a call runs even if the connection is dropped
/// meanwhile. It shares the socket's non-blocking mode.
type SendfileSocket = Arc<OwnedFd>;

fn sendfile_socket<W: ReplyWriter>(wr: &W) -> io::Result<SendfileSocket> {
    let fd = wr
        .sendfile_socket()
        .ok_or_else(|| io::Error::other("a file reply on a connection that cannot sendfile"))?
        .try_clone_to_owned()?;
    Ok(Arc::new(fd))
}

/// Tells a `sendfile` job that its reply is abandoned (the writer was dropped).
struct Abandon(Arc<AtomicBool>);

impl Drop for Abandon {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// How long a `sendfile` job waits for room in the send buffer before it looks whether its
/// reply was abandoned.
const SENDFILE_WAIT: rustix::time::Timespec = rustix::time::Timespec {
    tv_sec: 0,
    tv_nsec: 100_000_000,
};

/// Sends a whole file range, in one job on the blocking pool: pages `cachestat` counted as
/// cached may still be on their way from the disk (readahead), or evicted since, and then
/// `sendfile` waits for them; that must not stall the async worker. The job also waits there
/// for room in the send buffer, so that a reply costs one hand-off to the pool, not one per
/// send buffer's worth (on a busy machine those hand-offs halved the throughput of 1 MiB
/// reads). A dropped writer (a connection cut) makes the job give up within
/// [`SENDFILE_WAIT`]. The reply's header is already on the wire, so a file that ends early
/// (shrunk behind the server's back) or fails to read can only end the connection.
async fn send_file(sock: &SendfileSocket, range: &FileRange) -> io::Result<()> {
    let abandoned = Arc::new(AtomicBool::new(false));
    let _abandon = Abandon(Arc::clone(&abandoned));
    let (fd, file) = (Arc::clone(sock), Arc::clone(&range.file));
    let (start, end) = (range.offset, range.offset + u64::from(range.len));
    tokio::task::spawn_blocking(move || {
        let mut offset = start;
        while offset < end {
            if abandoned.load(Ordering::Relaxed) {
                return Err(io::Error::other("the reply was abandoned"));
            }
            // At most a reply's length.
            let want = (end - offset) as usize;
            match rustix::fs::sendfile(&*fd, &*file, Some(&mut offset), want) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the image ended at {offset}, inside a read reply already begun"),
                    ));
                }
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => {
                    let mut fds = [rustix::event::PollFd::new(
                        &*fd,
                        rustix::event::PollFlags::OUT,
                    )];
                    match rustix::event::poll(&mut fds, Some(&SENDFILE_WAIT)) {
                        Ok(_) | Err(rustix::io::Errno::INTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    })
    .await
    .map_err(|join| io::Error::other(join.to_string()))?
}

/// Writes `parts` in order, as few vectored writes as `IOV_MAX` allows. With `more`, the
/// socket is told that more follows at once (the payload of the last reply's header).
async fn write_all_vectored<W: ReplyWriter>(
    wr: &mut W,
    parts: &[&Bytes],
    more: bool,
) -> io::Result<()> {
    for group in parts.chunks(MAX_IOVECS) {
        let mut slices: Vec<IoSlice<'_>> = group.iter().map(|b| IoSlice::new(b)).collect();
        let mut rest: &mut [IoSlice<'_>] = &mut slices;
        while !rest.is_empty() {
            let n = if more {
                std::future::poll_fn(|cx| wr.poll_write_more(cx, rest)).await?
            } else {
                wr.write_vectored(rest).await?
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut rest, n);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto::{REPLY_FLAG_DONE, STRUCTURED_REPLY_MAGIC};

    fn wire_bytes(frames: &Frames) -> Vec<u8> {
        frames
            .parts
            .iter()
            .flat_map(|b| b.iter().copied())
            .collect()
    }

    fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn a_read_sends_one_chunk_per_run_of_data_and_one_per_hole() {
        let req = Request {
            flags: 0,
            kind: cmd::READ,
            cookie: 7,
            offset: 1000,
            length: 10,
            payload: 0,
        };
        // A device that hands a range over in pieces: two buffers, a hole, one more buffer.
        let chunks = [
            ReadChunk::Data(Bytes::from_static(b"abc")),
            ReadChunk::Data(Bytes::from_static(b"de")),
            ReadChunk::Zero(4),
            ReadChunk::Data(Bytes::from_static(b"f")),
        ];
        let got = wire_bytes(&read_reply(ReplyMode::Structured, &req, &chunks, false));
        let mut want = Vec::new();
        want.extend(chunk(
            0,
            reply::OFFSET_DATA,
            7,
            b"\0\0\0\0\0\0\x03\xe8abcde",
        ));
        want.extend(chunk(
            0,
            reply::OFFSET_HOLE,
            7,
            b"\0\0\0\0\0\0\x03\xed\0\0\0\x04",
        ));
        want.extend(chunk(
            REPLY_FLAG_DONE,
            reply::OFFSET_DATA,
            7,
            b"\0\0\0\0\0\0\x03\xf1f",
        ));
        assert_eq!(got, want);

        // With DF, one chunk carries everything, the hole as zeroes.
        let got = wire_bytes(&read_reply(ReplyMode::Structured, &req, &chunks, true));
        let want = chunk(
            REPLY_FLAG_DONE,
            reply::OFFSET_DATA,
            7,
            b"\0\0\0\0\0\0\x03\xe8abcde\0\0\0\0f",
        );
        assert_eq!(got, want);
    }
}
