//! Write payloads moved from the socket into an image file by `splice(2)`, through a pipe.
//!
//! Read into a buffer and then written, a payload is copied twice: from the socket into the
//! buffer, and from the buffer into the page cache. Spliced, the socket's pages move into a
//! pipe and are copied once, into the page cache. For 1 MiB writes over loopback that is about
//! a fifth less server CPU per write (a C loop of 4,000 writes: 160-178 against 190-236 us per
//! MiB, and a quarter more throughput).
//!
//! A write takes a pipe from a small pool for the time of its payload and gives it back empty.
//! Each step moves what the socket holds into the pipe, then the pipe's whole blocks out: into
//! the file on the async worker, as other small writes do (`block::inline`), or on the blocking
//! pool while the kernel is making writes to that file wait.
//!
//! Only whole 4 KiB blocks of the file ([`BLOCK`]) are written before the payload has all
//! arrived: the bytes of a block not yet complete stay in the pipe, and are written with the
//! rest of their block. So a client that goes away partway through a payload leaves each
//! block of the file either as it was or as it was being written, as a disk does with its
//! sectors when the power goes during a write; it was never told that write was done.
//!
//! A pipe holds a number of pages, not of bytes, and a few bytes may take a page each: when a
//! splice finds no room, the bytes waiting in the pipe are copied out to memory (at most one
//! block's worth), and the splice is tried again with the pipe empty.

use std::fs::File;
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::{BufMut, BytesMut};
use rustix::pipe::{PipeFlags, SpliceFlags};
use socket2::MaybeUninitSlice;
use tokio::io::{AsyncRead, Interest};

use super::lowat::TcpReader;
use crate::block::WriteTarget;
use crate::block::inline::InlineWrites;

/// Writes are cut at multiples of this many bytes of the file until the payload is complete.
const BLOCK: u64 = 4096;

/// The size each pipe asks for. 1 MiB, the default `pipe-max-size`, takes a 1 MiB payload in
/// one step; a smaller pipe (the kernel refuses larger ones past a user's allowance) only takes
/// more steps.
const PIPE_BYTES: usize = 1 << 20;

/// The most a splice waits for (`nbd::lowat`): less than the 1 MiB a read into memory waits
/// for, so that copying what has come into the page cache overlaps what is still coming. fio's
/// 1 MiB writes to an image: 1.10 times the throughput of waiting for whole payloads, and 0.98
/// and 1.01 of that of waking for every piece (`bench/abtput.sh 10 seqwrite 4`, 2026-12-08).
const SPLICE_MARK: usize = 256 << 10;

/// Payloads from this size up are spliced; below it the system calls cost more than the copy.
pub const SPLICE_MIN: u64 = 64 * 1024;

/// Pipes at most, in use or idle: 32 pipes of 1 MiB stay within the 64 MiB of pipe buffers an
/// unprivileged user gets by default, and take 64 file descriptors. Writes that find none
/// free read their payloads the usual way.
const MAX_PIPES: usize = 32;

/// Idle pipes kept for the next writes; more are closed when given back.
const IDLE_PIPES: usize = 16;

/// The server's pipes.
static PIPES: Pool = Pool::new(MAX_PIPES, PIPE_BYTES);

/// A bounded set of pipes.
#[derive(Debug)]
struct Pool {
    /// Empty pipes, waiting for a write.
    idle: Mutex<Vec<Pipe>>,
    /// Pipes that exist, idle or in use.
    live: AtomicUsize,
    /// How many may.
    max: usize,
    /// The size each asks for.
    pipe_bytes: usize,
}

impl Pool {
    const fn new(max: usize, pipe_bytes: usize) -> Pool {
        Pool {
            idle: Mutex::new(Vec::new()),
            live: AtomicUsize::new(0),
            max,
            pipe_bytes,
        }
    }

    /// An idle pipe, or a new one: an error if there are as many as may be, or the process is
    /// out of file descriptors.
    fn take(&'static self) -> io::Result<Pipe> {
        if let Some(p) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(p);
        }
        if self.live.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.live.fetch_sub(1, Ordering::Relaxed);
            return Err(io::Error::other("every pipe is in use"));
        }
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)
            .inspect_err(|_| {
                self.live.fetch_sub(1, Ordering::Relaxed);
            })?;
        // Counted from here on: dropped, the pipe uncounts itself.
        let mut pipe = Pipe {
            read,
            write,
            capacity: 0,
            pool: self,
        };
        pipe.capacity = match rustix::pipe::fcntl_setpipe_size(&pipe.write, self.pipe_bytes) {
            Ok(n) => n,
            // Over the user's allowance: the pipe keeps the size it was given.
            Err(_) => rustix::pipe::fcntl_getpipe_size(&pipe.write)?,
        };
        Ok(pipe)
    }
}

/// A pipe, owned by one write at a time: empty when it goes back to its pool, and between steps
/// holding at most the bytes of one incomplete block.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What it holds at most.
    capacity: usize,
    pool: &'static Pool,
}

impl Pipe {
    /// A pipe for a write's payload; an error if there is none to be had, and the payload is
    /// to be read the usual way.
    pub fn take() -> io::Result<Pipe> {
        PIPES.take()
    }

    /// Back to its pool, empty.
    fn give_back(self) {
        let pool = self.pool;
        let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < IDLE_PIPES {
            idle.push(self);
        }
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.pool.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The read half of a connection. A plain socket can also move its bytes into a pipe with
/// `splice(2)`, uncopied: large write payloads for image files are taken that way.
pub trait RequestReader: AsyncRead + Unpin + Send + 'static {
    /// Whether payloads can be spliced. TLS streams cannot: their bytes are decrypted in user
    /// space.
    fn can_splice(&self) -> bool {
        false
    }

    /// Moves up to `max` bytes into `pipe`, which holds `held` bytes, when the socket has some;
    /// `Ok(0)` at end of stream. If the pipe takes nothing while the socket has bytes, it is
    /// full of pages: `make_room` empties it, and the splice is tried again. The client must
    /// owe at least `max` more bytes: a TCP socket may wait until they have all arrived
    /// (`nbd::lowat`).
    fn poll_splice(
        &mut self,
        _cx: &mut Context<'_>,
        _pipe: BorrowedFd<'_>,
        _max: usize,
        _held: usize,
        _make_room: &mut dyn FnMut() -> io::Result<()>,
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::ErrorKind::Unsupported.into()))
    }

    /// Appends what the stream has to `pages`, each filled to `size` bytes before the next
    /// gets any: in one system call on a plain socket, straight into the pages' spare capacity
    /// (not zeroed first), and into the first page with room otherwise. `Ok(0)` at end of
    /// stream, or when no page has room. The client must owe at least the room the pages
    /// have: a TCP socket may wait until it has all arrived (`nbd::lowat`).
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        pages: &mut [Vec<u8>],
        size: usize,
    ) -> Poll<io::Result<usize>> {
        let Some(page) = pages.iter_mut().find(|p| p.len() < size) else {
            return Poll::Ready(Ok(0));
        };
        let room = size - page.len();
        tokio_util::io::poll_read_buf(std::pin::Pin::new(self), cx, &mut page.limit(room))
    }
}

/// Plain sockets: `splice` from the socket, waiting for data as tokio's own reads do, but
/// for the rest of a payload at once where the socket allows (`PayloadWait`).
macro_rules! socket_request_reader {
    ($half:ty, $stream:ty) => {
        impl RequestReader for $half {
            fn can_splice(&self) -> bool {
                SIOCATMARK.is_some()
            }

            fn poll_fill(
                &mut self,
                cx: &mut Context<'_>,
                pages: &mut [Vec<u8>],
                size: usize,
            ) -> Poll<io::Result<usize>> {
                let sock: &$stream = self.as_ref();
                loop {
                    ready!(sock.poll_read_ready(cx))?;
                    match sock.try_io(Interest::READABLE, || {
                        recv_into_pages(sock.as_fd(), pages, size)
                    }) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            let due = pages.iter().map(|p| size.saturating_sub(p.len())).sum();
                            PayloadWait::before_wait(self, due)?;
                        }
                        r => return Poll::Ready(r),
                    }
                }
            }

            fn poll_splice(
                &mut self,
                cx: &mut Context<'_>,
                pipe: BorrowedFd<'_>,
                max: usize,
                held: usize,
                make_room: &mut dyn FnMut() -> io::Result<()>,
            ) -> Poll<io::Result<usize>> {
                let sock: &$stream = self.as_ref();
                let mut held = held;
                loop {
                    ready!(sock.poll_read_ready(cx))?;
                    let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
                    match sock.try_io(Interest::READABLE, || {
                        loop {
                            match rustix::pipe::splice(sock, None, pipe, None, max, flags) {
                                Err(rustix::io::Errno::AGAIN)
                                    if held > 0
                                        && rustix::io::ioctl_fionread(sock)
                                            .is_ok_and(|n| n > 0) =>
                                {
                                    // The pipe is full: try again with it empty.
                                    make_room().map_err(io::Error::other)?;
                                    held = 0;
                                }
                                Err(rustix::io::Errno::AGAIN) => {
                                    return urgent_or_empty(sock.as_fd());
                                }
                                r => return r.map_err(io::Error::from),
                            }
                        }
                    }) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            PayloadWait::before_wait(self, max.min(SPLICE_MARK))?;
                        }
                        r => return Poll::Ready(r),
                    }
                }
            }
        }
    };
}

/// What a socket reader does before it waits, on an empty socket, for `due` more bytes of a
/// payload: a TCP socket raises its `SO_RCVLOWAT` (`nbd::lowat`).
trait PayloadWait {
    fn before_wait(&self, due: usize) -> io::Result<()>;
}

impl PayloadWait for TcpReader {
    fn before_wait(&self, due: usize) -> io::Result<()> {
        self.set_due(due)
    }
}

impl PayloadWait for tokio::net::unix::OwnedReadHalf {
    fn before_wait(&self, _due: usize) -> io::Result<()> {
        Ok(())
    }
}

/// At most this many pages take part in one `recvmsg` (the kernel's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// One `recvmsg(2)` into the room left in `pages` (each at most `size` bytes long), in order;
/// each page's length then counts the bytes it got. `unsafe` for that count: the bytes are
/// written by the kernel, not by Rust.
#[allow(unsafe_code)]
fn recv_into_pages(sock: BorrowedFd<'_>, pages: &mut [Vec<u8>], size: usize) -> io::Result<usize> {
    let got = {
        let mut room: Vec<MaybeUninitSlice<'_>> = pages
            .iter_mut()
            .filter(|p| p.len() < size)
            .take(MAX_IOVECS)
            .map(|p| {
                let n = size - p.len();
                p.reserve_exact(n);
                MaybeUninitSlice::new(&mut p.spare_capacity_mut()[..n])
            })
            .collect();
        if room.is_empty() {
            return Ok(0);
        }
        socket2::SockRef::from(&sock).recv_vectored(&mut room)?.0
    };
    let mut left = got;
    for p in pages.iter_mut().filter(|p| p.len() < size) {
        if left == 0 {
            break;
        }
        let n = (size - p.len()).min(left);
        // SAFETY: `recvmsg` wrote `got` bytes into the pages' spare capacity, in the order the
        // slices were given: these `n` are the first bytes after this page's length, within the
        // capacity reserved above.
        unsafe { p.set_len(p.len() + n) };
        left -= n;
    }
    Ok(got)
}

/// Why a splice from a socket, into an empty pipe, would block: the socket is empty
/// (`WouldBlock`), or its next byte is TCP urgent data, where `splice` stops for good (`recv`
/// would skip the urgent byte, and the stream would no longer make sense either).
fn urgent_or_empty(sock: BorrowedFd<'_>) -> io::Result<usize> {
    if at_urgent_mark(sock) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the client sent urgent (out-of-band) data inside a write payload",
        ));
    }
    Err(io::ErrorKind::WouldBlock.into())
}

/// `SIOCATMARK`, where it is 0x8905 (`None`: another value, on architectures that nbd-rs does
/// not splice on).
const SIOCATMARK: Option<libc::c_ulong> = if cfg!(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "mips32r6",
    target_arch = "mips64r6",
    target_arch = "sparc",
    target_arch = "sparc64"
)) {
    None
} else {
    Some(0x8905)
};

/// Whether the next byte of `sock` is TCP urgent data (`ioctl(SIOCATMARK)`). Unlike a peek
/// at what the socket holds, this cannot mistake bytes that arrived after the splice for
/// bytes it could not take.
#[allow(unsafe_code)]
fn at_urgent_mark(sock: BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    let Some(request) = SIOCATMARK else {
        return false;
    };
    let mut at: libc::c_int = 0;
    // SAFETY: SIOCATMARK writes one int through the pointer, which points at one.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, &mut at as *mut libc::c_int) };
    r == 0 && at != 0
}

socket_request_reader!(TcpReader, tokio::net::TcpStream);
socket_request_reader!(tokio::net::unix::OwnedReadHalf, tokio::net::UnixStream);

impl<S: AsyncRead + Send + Unpin + 'static> RequestReader for tokio::io::ReadHalf<S> {}

/// Takes the `n` payload bytes of a write, those already in `buf` first, and puts them in the
/// target file through `pipe`. The outer error is the connection's (the socket failed or
/// closed: the stream is lost). The inner one is the file's: the rest of the payload has then
/// been read and dropped, so the stream is still in step, and the write is to be answered with
/// the error. `Ok(Ok(k))`: done, `k` bytes of it spliced.
pub async fn splice_payload<R: RequestReader>(
    rd: &mut R,
    buf: &mut BytesMut,
    target: &WriteTarget<'_>,
    pipe: Pipe,
    n: usize,
) -> io::Result<io::Result<u64>> {
    let put = Put {
        file: Arc::clone(target.file),
        pipe,
        pos: target.offset,
        carry: Vec::new(),
        in_pipe: 0,
    };
    let buffered = buf.len().min(n);
    let mut left = n - buffered;
    let (mut put, mut written) = if buffered == 0 {
        // Usual after a spliced write: only the next header was read.
        (put, Ok(()))
    } else {
        let prefix = buf.split_to(buffered).freeze();
        let last = left == 0;
        step(target.inline, put, move |p| p.absorb_slice(&prefix, last)).await?
    };
    let mut spliced = 0u64;
    while left > 0 && written.is_ok() {
        let max = left.min(put.pipe.capacity - put.in_pipe);
        let got = {
            let Put {
                pipe,
                carry,
                in_pipe,
                ..
            } = &mut put;
            let pipe: &Pipe = pipe;
            let held = *in_pipe;
            let mut make_room = || -> io::Result<()> {
                read_pipe(pipe, carry, *in_pipe)?;
                *in_pipe = 0;
                #[cfg(test)]
                ROOM_MADE.fetch_add(1, Ordering::Relaxed);
                Ok(())
            };
            poll_fn(|cx| rd.poll_splice(cx, pipe.write.as_fd(), max, held, &mut make_room)).await?
        };
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client closed the connection inside a write payload",
            ));
        }
        left -= got;
        spliced += got as u64;
        let last = left == 0;
        (put, written) = step(target.inline, put, move |p| p.absorb_pipe(got, last)).await?;
    }
    match written {
        Ok(()) => {
            put.pipe.give_back();
            Ok(Ok(spliced))
        }
        Err(e) => {
            // The pipe may still hold bytes: it is closed with `put`.
            drop(put);
            super::transmission::discard(rd, buf, left as u64).await?;
            Ok(Err(e))
        }
    }
}

/// Runs `f` where writes to the file may run now: here, or on the blocking pool while the
/// kernel makes them wait.
async fn step<F>(inline: &InlineWrites, mut put: Put, f: F) -> io::Result<(Put, io::Result<()>)>
where
    F: FnOnce(&mut Put) -> io::Result<()> + Send + 'static,
{
    if !inline.paused() {
        let r = inline.run(|| f(&mut put));
        return Ok((put, r));
    }
    tokio::task::spawn_blocking(move || {
        let r = f(&mut put);
        (put, r)
    })
    .await
    .map_err(io::Error::other)
}

/// Where a payload is being put: bytes go to `file` at `pos`: first the `carry`ied ones, then
/// those waiting in the pipe.
struct Put {
    file: Arc<File>,
    pipe: Pipe,
    /// Where the first byte not yet written goes.
    pos: u64,
    /// Bytes received but not yet written, held in memory (those read with the request header,
    /// or moved out of the pipe to make room). With those in the pipe, they run from `pos` up
    /// to, never across, the next multiple of [`BLOCK`].
    carry: Vec<u8>,
    /// Bytes in the pipe, after the carried ones.
    in_pipe: usize,
}

impl Put {
    /// Where writing stops for now, with `more` bytes received after those held: at the end of
    /// the last whole block, or at the end with the `last` bytes of the payload.
    fn cut(&self, more: usize, last: bool) -> u64 {
        let end = self.pos + (self.carry.len() + self.in_pipe + more) as u64;
        if last { end } else { end / BLOCK * BLOCK }
    }

    /// Puts the carried bytes in the file, where they go.
    fn write_carry(&mut self) -> io::Result<()> {
        self.file.write_all_at(&self.carry, self.pos)?;
        self.pos += self.carry.len() as u64;
        self.carry.clear();
        Ok(())
    }

    /// Takes bytes already in memory (those the connection had read with a request header),
    /// before any in the pipe.
    fn absorb_slice(&mut self, bytes: &[u8], last: bool) -> io::Result<()> {
        debug_assert_eq!(self.in_pipe, 0);
        let cut = self.cut(bytes.len(), last);
        if cut <= self.pos + self.carry.len() as u64 {
            self.carry.extend_from_slice(bytes);
            return Ok(());
        }
        self.write_carry()?;
        let (now, rest) = bytes.split_at((cut - self.pos) as usize);
        self.file.write_all_at(now, self.pos)?;
        self.pos = cut;
        self.carry.extend_from_slice(rest);
        Ok(())
    }

    /// Takes the `got` bytes just moved into the pipe, writing every whole block held.
    fn absorb_pipe(&mut self, got: usize, last: bool) -> io::Result<()> {
        let cut = self.cut(got, last);
        self.in_pipe += got;
        if cut <= self.pos + self.carry.len() as u64 {
            return Ok(());
        }
        self.write_carry()?;
        let n = (cut - self.pos) as usize;
        splice_to_file(&self.pipe, &self.file, self.pos, n)?;
        self.in_pipe -= n;
        self.pos = cut;
        Ok(())
    }
}

/// Tests: splicing into a file fails with `EINVAL`, as on a file system that cannot.
#[cfg(test)]
static REFUSE_SPLICE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Tests: how many times bytes waiting in a pipe were moved out to make room.
#[cfg(test)]
static ROOM_MADE: AtomicUsize = AtomicUsize::new(0);
/// Tests: how many times spliced bytes were copied out instead.
#[cfg(test)]
static COPIED_OUT: AtomicUsize = AtomicUsize::new(0);

/// `splice` from the pipe into the file.
fn splice_out(pipe: &Pipe, file: &File, pos: &mut u64, n: usize) -> rustix::io::Result<usize> {
    #[cfg(test)]
    if REFUSE_SPLICE.load(Ordering::Relaxed) {
        return Err(rustix::io::Errno::INVAL);
    }
    rustix::pipe::splice(&pipe.read, None, file, Some(pos), n, SpliceFlags::MOVE)
}

/// Moves `n` bytes from `pipe` into `file` at `pos`.
fn splice_to_file(pipe: &Pipe, file: &File, mut pos: u64, mut n: usize) -> io::Result<()> {
    while n > 0 {
        match splice_out(pipe, file, &mut pos, n) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(k) => n -= k,
            // A file system that cannot take spliced pages: copy them out and write them.
            Err(rustix::io::Errno::INVAL) => {
                #[cfg(test)]
                COPIED_OUT.fetch_add(1, Ordering::Relaxed);
                let mut bytes = Vec::with_capacity(n);
                read_pipe(pipe, &mut bytes, n)?;
                return file.write_all_at(&bytes, pos);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Appends the next `n` bytes of `pipe`, which holds at least that many, to `out`.
fn read_pipe(pipe: &Pipe, out: &mut Vec<u8>, n: usize) -> io::Result<()> {
    let start = out.len();
    out.resize(start + n, 0);
    let mut at = start;
    while at < out.len() {
        match rustix::io::read(&pipe.read, &mut out[at..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => at += k,
            Err(e) => {
                out.truncate(start);
                return Err(e.into());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::inline::InlineWrites;
    use crate::nbd::lowat::tests::rcvlowat;
    use bytes::BufMut;
    use std::os::fd::AsRawFd;
    use std::path::PathBuf;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    /// A connected pair: the server's read half, and the client.
    async fn pair() -> (TcpReader, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let (rd, wr) = server.into_split();
        std::mem::forget(wr);
        (TcpReader::new(rd), client)
    }

    /// A connected pair whose server side has a receive buffer of 16 MiB, set by hand
    /// (`SO_RCVBUFFORCE`, as root), with room for marks of up to 2 MiB. A new socket's buffer
    /// starts at 128 KiB here, room for no mark, and grows only with traffic.
    async fn roomy_pair() -> (TcpReader, TcpStream) {
        let (rd, client) = pair().await;
        rustix::net::sockopt::set_socket_recv_buffer_size_force(rd.as_ref(), 8 << 20)
            .expect("SO_RCVBUFFORCE: these tests run as root");
        (rd, client)
    }

    /// The client sends `pieces` of `bytes` with pauses, so that they arrive one by one, then
    /// `after`.
    fn send(mut client: TcpStream, bytes: Vec<u8>, pieces: &[usize], after: &'static [u8]) {
        let pieces = pieces.to_vec();
        tokio::spawn(async move {
            let mut at = 0;
            for p in pieces {
                client.write_all(&bytes[at..at + p]).await.unwrap();
                at += p;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            client.write_all(&bytes[at..]).await.unwrap();
            client.write_all(after).await.unwrap();
            // Keep the socket open until the reader is done.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
    }

    /// A `len`-byte image of 0xee bytes in a new directory: the directory, the image's path,
    /// and the image opened for writing.
    fn image(tag: &str, len: usize) -> (PathBuf, PathBuf, Arc<File>) {
        let dir = std::env::temp_dir().join(format!("nbd-rs-splice-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img");
        std::fs::write(&path, vec![0xeeu8; len]).unwrap();
        let file = Arc::new(std::fs::OpenOptions::new().write(true).open(&path).unwrap());
        (dir, path, file)
    }

    /// `fut`'s output, or a failed test if it takes more than 5 s: a wait that never ends.
    async fn within<F: Future>(fut: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(5), fut)
            .await
            .expect("still waiting after 5 s")
    }

    /// Reads the first `n` bytes of the payload, as if they had come with the request header.
    async fn prefix(rd: &mut TcpReader, n: usize) -> BytesMut {
        let mut buf = BytesMut::new();
        while buf.len() < n {
            let want = n - buf.len();
            rd.read_buf(&mut (&mut buf).limit(want)).await.unwrap();
        }
        buf
    }

    /// Reads the `NEXT` the client sent after the payload: the stream is in step.
    async fn next_four(rd: &mut TcpReader, buf: &mut BytesMut) -> Vec<u8> {
        while buf.len() < 4 {
            assert!(rd.read_buf(buf).await.unwrap() > 0, "stream ended");
        }
        buf.split_to(4).to_vec()
    }

    /// Pages filled from a socket (one `recvmsg` each time) and through the default path (as
    /// over TLS) hold the bytes in order, each page to its size, whatever the pieces.
    #[tokio::test]
    async fn pages_fill_in_order_from_pieces_and_stop_at_end_of_stream() {
        for generic in [false, true] {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let (server, _) = l.accept().await.unwrap();
            let bytes = pattern(5 * 4096 + 100);
            send(client, bytes[10..].to_vec(), &[1, 4095, 7000, 100], b"");
            // Pages with room to spare, and pages with none yet.
            let mut pages: Vec<Vec<u8>> = (0..5)
                .map(|i| {
                    if i % 2 == 0 {
                        Vec::with_capacity(4096)
                    } else {
                        Vec::new()
                    }
                })
                .collect();
            // The first page already holds what came with the header.
            pages[0].extend_from_slice(&bytes[..10]);
            let mut at = 0;
            let mut got = 10;
            if generic {
                // `tokio::io::ReadHalf` takes the default path.
                let (mut rd, wr) = tokio::io::split(server);
                std::mem::forget(wr);
                while got < 5 * 4096 {
                    let n = poll_fn(|cx| rd.poll_fill(cx, &mut pages[at..], 4096)).await;
                    got += n.unwrap();
                    while at < 5 && pages[at].len() == 4096 {
                        at += 1;
                    }
                }
            } else {
                let (rd, wr) = server.into_split();
                let mut rd = TcpReader::new(rd);
                std::mem::forget(wr);
                while got < 5 * 4096 {
                    let n = poll_fn(|cx| rd.poll_fill(cx, &mut pages[at..], 4096)).await;
                    got += n.unwrap();
                    while at < 5 && pages[at].len() == 4096 {
                        at += 1;
                    }
                }
                // No page with room: nothing is read.
                let n = poll_fn(|cx| rd.poll_fill(cx, &mut pages, 4096)).await;
                assert_eq!(n.unwrap(), 0);
                // The rest of the stream is still there.
                let mut rest = vec![0; 100];
                rd.read_exact(&mut rest).await.unwrap();
                assert_eq!(rest, &bytes[5 * 4096..]);
            }
            assert_eq!(got, 5 * 4096, "generic {generic}");
            assert_eq!(pages.concat(), &bytes[..5 * 4096], "generic {generic}");
            assert!(pages.iter().all(|p| p.len() == 4096));
        }
    }

    /// Waiting on an empty socket for the rest of a payload, a TCP reader asks the kernel
    /// (`SO_RCVLOWAT`) to wake it only once all of it is there, and the next plain read puts
    /// the mark back first. (The kernel may still wake it early, while the receive window is
    /// smaller than the mark, as on a new connection: the reader then waits again, at the
    /// mark of what is left.)
    #[tokio::test]
    async fn a_payload_wait_sets_the_mark_to_what_is_due() {
        let marks = crate::nbd::lowat::marks_supported();
        let (mut rd, mut client) = roomy_pair().await;
        let fd = rd.as_ref().as_raw_fd();
        let bytes = pattern(256 << 10);
        client.write_all(&bytes[..10_000]).await.unwrap();
        // Read as they come (the mark at one byte): the socket is then empty.
        let pre = within(prefix(&mut rd, 10_000)).await;
        let mut pages: Vec<Vec<u8>> = (0..64).map(|_| Vec::with_capacity(4096)).collect();
        for (page, bytes) in pages.iter_mut().zip(pre.chunks(4096)) {
            page.extend_from_slice(bytes);
        }
        let mut got = pre.len();
        {
            let mut fill = std::pin::pin!(poll_fn(|cx| rd.poll_fill(cx, &mut pages, 4096)));
            let short = Duration::from_millis(100);
            assert!(tokio::time::timeout(short, fill.as_mut()).await.is_err());
            let due = bytes.len() - got;
            assert_eq!(rcvlowat(fd), if marks { due } else { 1 });
            client.write_all(&bytes[got..]).await.unwrap();
            got += within(fill.as_mut()).await.unwrap();
        }
        while got < bytes.len() {
            got += within(poll_fn(|cx| rd.poll_fill(cx, &mut pages, 4096)))
                .await
                .unwrap();
        }
        assert_eq!(pages.concat(), bytes);
        client.write_all(b"NEXT").await.unwrap();
        assert_eq!(
            within(next_four(&mut rd, &mut BytesMut::new())).await,
            b"NEXT"
        );
        assert_eq!(rcvlowat(fd), 1);
    }

    /// The mark is what is due, at most 1 MiB; less than 64 KiB due is read as it comes.
    #[tokio::test]
    async fn marks_are_what_is_due_within_bounds() {
        let marks = crate::nbd::lowat::marks_supported();
        let (rd, _client) = roomy_pair().await;
        let fd = rd.as_ref().as_raw_fd();
        for (due, mark) in [
            (1 << 20, 1 << 20),
            (3 << 20, 1 << 20),
            (100_000, 100_000),
            (64 << 10, 64 << 10),
            ((64 << 10) - 1, 1),
            (0, 1),
        ] {
            rd.set_due(due).unwrap();
            assert_eq!(rcvlowat(fd), if marks { mark } else { 1 }, "due {due}");
        }
    }

    /// A mark is never more than an eighth of the receive buffer, so setting it never makes
    /// the kernel grow the buffer, which would clamp the receive window at the mark (over a
    /// real network the window then stayed there: `bench/wan.sh`). A new connection's buffer
    /// has room for no mark here; once the buffer has grown, the reader sees the room.
    #[tokio::test]
    async fn a_mark_never_grows_the_receive_buffer() {
        use rustix::net::sockopt::{set_socket_recv_buffer_size_force, socket_recv_buffer_size};
        let marks = crate::nbd::lowat::marks_supported();
        let (rd, _client) = pair().await;
        let fd = rd.as_ref().as_raw_fd();
        let buffer = socket_recv_buffer_size(rd.as_ref()).unwrap();
        for due in [3 << 20, 1 << 20, 256 << 10, 64 << 10] {
            rd.set_due(due).unwrap();
            let mark = due.min(1 << 20).min(buffer / 8);
            let mark = if marks && mark >= 64 << 10 { mark } else { 1 };
            assert_eq!(rcvlowat(fd), mark, "due {due}, buffer {buffer}");
            assert_eq!(socket_recv_buffer_size(rd.as_ref()).unwrap(), buffer);
        }
        // The buffer grows (by hand here, as autotuning would): 8 MiB, room for 1 MiB.
        set_socket_recv_buffer_size_force(rd.as_ref(), 4 << 20).unwrap();
        let buffer = socket_recv_buffer_size(rd.as_ref()).unwrap();
        assert_eq!(buffer, 8 << 20);
        rd.set_due(3 << 20).unwrap();
        assert_eq!(rcvlowat(fd), if marks { 1 << 20 } else { 1 });
        assert_eq!(socket_recv_buffer_size(rd.as_ref()).unwrap(), buffer);
    }

    /// A client gone while the reader waits at its mark ends the wait with what it sent.
    #[tokio::test]
    async fn the_end_of_the_stream_wakes_a_reader_short_of_its_mark() {
        let marks = crate::nbd::lowat::marks_supported();
        let (mut rd, mut client) = roomy_pair().await;
        let fd = rd.as_ref().as_raw_fd();
        let mut page = vec![Vec::with_capacity(1 << 20)];
        let mut fill = std::pin::pin!(poll_fn(|cx| rd.poll_fill(cx, &mut page, 1 << 20)));
        let short = Duration::from_millis(100);
        assert!(tokio::time::timeout(short, fill.as_mut()).await.is_err());
        assert_eq!(rcvlowat(fd), if marks { 1 << 20 } else { 1 });
        client.write_all(&pattern(100_000)).await.unwrap();
        drop(client);
        let mut got = 0;
        loop {
            let n = within(fill.as_mut()).await.unwrap();
            if n == 0 {
                break;
            }
            // A `poll_fn` may be polled again: it fills on from where it stopped.
            got += n;
        }
        assert_eq!(got, 100_000);
    }

    /// The end of the stream partway through the pages is `Ok(0)`, with what came counted.
    #[tokio::test]
    async fn filling_pages_sees_the_end_of_the_stream() {
        let (mut rd, mut client) = pair().await;
        client.write_all(&pattern(3000)).await.unwrap();
        drop(client);
        let mut pages: Vec<Vec<u8>> = (0..2).map(|_| Vec::with_capacity(4096)).collect();
        let mut got = 0;
        loop {
            match poll_fn(|cx| rd.poll_fill(cx, &mut pages, 4096))
                .await
                .unwrap()
            {
                0 => break,
                n => got += n,
            }
        }
        assert_eq!(got, 3000);
        assert_eq!(pages[0], pattern(3000));
        assert!(pages[1].is_empty());
    }

    /// On the async worker, and on the blocking pool as while the kernel makes writes wait.
    #[tokio::test]
    async fn a_payload_arriving_in_pieces_lands_whole_at_an_unaligned_offset() {
        for paused in [false, true] {
            let (dir, path, file) = image(if paused { "pieces-paused" } else { "pieces" }, 2 << 20);
            let inline = InlineWrites::default();
            if paused {
                inline.pause();
            }
            let n = (1 << 20) + 1234;
            let data = pattern(n);
            let (mut rd, client) = pair().await;
            send(
                client,
                data.clone(),
                &[1000, 3000, 5000, 100_000, 1, 300_000],
                b"NEXT",
            );
            // What came with the request header: the first 1000 bytes.
            let mut buf = prefix(&mut rd, 1000).await;
            let target = WriteTarget {
                file: &file,
                offset: 1001,
                inline: &inline,
            };
            let spliced = splice_payload(&mut rd, &mut buf, &target, Pipe::take().unwrap(), n)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                spliced,
                (n - 1000) as u64,
                "all but the buffered bytes spliced"
            );
            assert_eq!(next_four(&mut rd, &mut buf).await, b"NEXT");
            let disk = std::fs::read(&path).unwrap();
            assert!(disk[..1001].iter().all(|&b| b == 0xee), "before the write");
            assert!(disk[1001..1001 + n] == data[..], "the write");
            assert!(
                disk[1001 + n..].iter().all(|&b| b == 0xee),
                "after the write"
            );
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[tokio::test]
    async fn a_file_that_refuses_the_write_fails_it_and_the_rest_of_the_payload_is_dropped() {
        let (dir, path, _) = image("refused", 1 << 20);
        // Opened for reading only: every write to it fails with EBADF.
        let file = Arc::new(std::fs::File::open(&path).unwrap());
        let inline = InlineWrites::default();
        let n = 600 * 1024;
        let (mut rd, client) = pair().await;
        send(client, pattern(n), &[5000, 20_000], b"NEXT");
        let target = WriteTarget {
            file: &file,
            offset: 0,
            inline: &inline,
        };
        let mut buf = BytesMut::new();
        let e = splice_payload(&mut rd, &mut buf, &target, Pipe::take().unwrap(), n)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
        assert_eq!(next_four(&mut rd, &mut buf).await, b"NEXT");
        assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0xee));
        // A good write after the failed one lands.
        let file = Arc::new(std::fs::OpenOptions::new().write(true).open(&path).unwrap());
        let (mut rd, client) = pair().await;
        let data = pattern(n);
        send(client, data.clone(), &[7000], b"NEXT");
        let target = WriteTarget {
            file: &file,
            offset: 4096,
            inline: &inline,
        };
        splice_payload(&mut rd, &mut buf, &target, Pipe::take().unwrap(), n)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(next_four(&mut rd, &mut buf).await, b"NEXT");
        assert!(std::fs::read(&path).unwrap()[4096..4096 + n] == data[..]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_client_gone_partway_leaves_whole_blocks_written_and_the_rest_untouched() {
        let (dir, path, file) = image("gone", 1 << 20);
        let inline = InlineWrites::default();
        let data = pattern(10_000);
        let (mut rd, mut client) = pair().await;
        tokio::spawn(async move {
            for piece in [&data[..3000], &data[3000..]] {
                client.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let target = WriteTarget {
            file: &file,
            offset: 1000,
            inline: &inline,
        };
        let mut buf = BytesMut::new();
        let e = splice_payload(
            &mut rd,
            &mut buf,
            &target,
            Pipe::take().unwrap(),
            256 * 1024,
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        let disk = std::fs::read(&path).unwrap();
        let data = pattern(10_000);
        // Bytes 1000..11000 came; the blocks up to 8192 were complete and were written.
        assert!(disk[1000..8192] == data[..7192], "complete blocks written");
        assert!(disk[..1000].iter().all(|&b| b == 0xee));
        assert!(
            disk[8192..].iter().all(|&b| b == 0xee),
            "the incomplete block is not"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_file_system_that_cannot_take_spliced_pages_gets_them_copied() {
        let (dir, path, file) = image("einval", 2 << 20);
        let inline = InlineWrites::default();
        let n = 1 << 20;
        let data = pattern(n);
        let (mut rd, client) = pair().await;
        send(client, data.clone(), &[4096, 70_000], b"NEXT");
        let target = WriteTarget {
            file: &file,
            offset: 512,
            inline: &inline,
        };
        let mut buf = BytesMut::new();
        let before = COPIED_OUT.load(Ordering::Relaxed);
        REFUSE_SPLICE.store(true, Ordering::Relaxed);
        let r = splice_payload(&mut rd, &mut buf, &target, Pipe::take().unwrap(), n).await;
        REFUSE_SPLICE.store(false, Ordering::Relaxed);
        assert_eq!(r.unwrap().unwrap(), n as u64);
        assert!(
            COPIED_OUT.load(Ordering::Relaxed) > before,
            "the copying path ran"
        );
        assert_eq!(next_four(&mut rd, &mut buf).await, b"NEXT");
        assert!(std::fs::read(&path).unwrap()[512..512 + n] == data[..]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_pool_makes_at_most_its_pipes_and_reuses_those_given_back() {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new(3, PIPE_BYTES)));
        let mut taken: Vec<Pipe> = (0..3).map(|_| pool.take().unwrap()).collect();
        assert!(taken.iter().all(|p| p.capacity >= 4096));
        let e = pool.take().unwrap_err();
        assert_eq!(e.to_string(), "every pipe is in use");
        let back = taken.pop().unwrap();
        let fd = back.read.as_raw_fd();
        back.give_back();
        let again = pool.take().unwrap();
        assert_eq!(again.read.as_raw_fd(), fd, "the idle pipe is reused");
        again.give_back();
        drop(taken);
        assert_eq!(pool.live.load(Ordering::Relaxed), 1, "the idle one");
        let _more: Vec<Pipe> = (0..3).map(|_| pool.take().unwrap()).collect();
    }

    /// TCP's `splice` stops at urgent data for good: the connection ends with a message
    /// instead of waiting for ever for bytes it cannot take.
    #[tokio::test]
    async fn urgent_data_inside_a_payload_ends_the_connection() {
        let (dir, _, file) = image("urgent", 1 << 20);
        let inline = InlineWrites::default();
        let (mut rd, mut client) = pair().await;
        client.write_all(&pattern(1000)).await.unwrap();
        rustix::net::send(&client, b"!", rustix::net::SendFlags::OOB).unwrap();
        client.write_all(&pattern(1000)).await.unwrap();
        let target = WriteTarget {
            file: &file,
            offset: 0,
            inline: &inline,
        };
        let mut buf = BytesMut::new();
        let pipe = Pipe::take().unwrap();
        let e = tokio::time::timeout(
            Duration::from_secs(10),
            splice_payload(&mut rd, &mut buf, &target, pipe, 100_000),
        )
        .await
        .expect("the connection hangs")
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(
            e.to_string(),
            "the client sent urgent (out-of-band) data inside a write payload"
        );
        drop(client);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Bytes that arrive while a splice runs find it already ended ("would block"): they are
    /// not mistaken for urgent data, and the payload lands whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_payload_trickling_in_small_sends_lands_whole() {
        let n = 8 << 20;
        let (dir, path, file) = image("trickle", n);
        let inline = InlineWrites::default();
        let data = pattern(n);
        let (mut rd, mut client) = pair().await;
        client.set_nodelay(true).unwrap();
        let sent = data.clone();
        tokio::spawn(async move {
            for piece in sent.chunks(1000) {
                client.write_all(piece).await.unwrap();
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let target = WriteTarget {
            file: &file,
            offset: 0,
            inline: &inline,
        };
        let mut buf = BytesMut::new();
        let pipe = Pipe::take().unwrap();
        let spliced = splice_payload(&mut rd, &mut buf, &target, pipe, n)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(spliced, n as u64);
        assert!(std::fs::read(&path).unwrap() == data);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Splicing, too, waits for the rest of a payload at a mark of what is due, and the
    /// payload lands whole.
    #[tokio::test]
    async fn a_splice_wait_sets_the_mark_to_what_is_due() {
        let marks = crate::nbd::lowat::marks_supported();
        let n = 256 << 10;
        let (dir, path, file) = image("mark", n);
        let inline = InlineWrites::default();
        let data = pattern(n);
        let (mut rd, mut client) = roomy_pair().await;
        let fd = rd.as_ref().as_raw_fd();
        client.write_all(&data[..10_000]).await.unwrap();
        // As if they had come with the request's header: the socket is then empty.
        let mut buf = within(prefix(&mut rd, 10_000)).await;
        let target = WriteTarget {
            file: &file,
            offset: 0,
            inline: &inline,
        };
        let pipe = Pipe::take().unwrap();
        // What the splice waits for: the rest, or as much as the pipe holds, up to its mark.
        let due = (n - 10_000).min(pipe.capacity).min(SPLICE_MARK);
        let mark = if marks && due >= 64 << 10 { due } else { 1 };
        let mut put = std::pin::pin!(splice_payload(&mut rd, &mut buf, &target, pipe, n));
        let short = Duration::from_millis(100);
        assert!(tokio::time::timeout(short, put.as_mut()).await.is_err());
        assert_eq!(rcvlowat(fd), mark);
        client.write_all(&data[10_000..]).await.unwrap();
        let spliced = within(put).await.unwrap().unwrap();
        assert_eq!(spliced, (n - 10_000) as u64);
        assert!(std::fs::read(&path).unwrap() == data);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A one-page pipe is full with the few bytes of an incomplete block: they are moved out
    /// to make room, and the payload still lands whole.
    #[tokio::test]
    async fn bytes_waiting_in_a_full_pipe_are_moved_out_to_make_room() {
        let n = 256 * 1024;
        let (dir, path, file) = image("room", n + 8192);
        let inline = InlineWrites::default();
        let data = pattern(n);
        let (mut rd, client) = pair().await;
        send(
            client,
            data.clone(),
            &[100, 400, 5000, 3000, 100, 20_000],
            b"NEXT",
        );
        // The first 100 bytes came with the request header: they are carried in memory, and
        // the 400 after them wait in the pipe, short of their block's end.
        let mut buf = prefix(&mut rd, 100).await;
        let pool: &'static Pool = Box::leak(Box::new(Pool::new(1, 4096)));
        let pipe = pool.take().unwrap();
        assert_eq!(pipe.capacity, rustix::param::page_size(), "a one-page pipe");
        let target = WriteTarget {
            file: &file,
            offset: 3000,
            inline: &inline,
        };
        let before = ROOM_MADE.load(Ordering::Relaxed);
        let spliced = tokio::time::timeout(
            Duration::from_secs(10),
            splice_payload(&mut rd, &mut buf, &target, pipe, n),
        )
        .await
        .expect("the write hangs on a full pipe")
        .unwrap()
        .unwrap();
        assert_eq!(spliced, (n - 100) as u64);
        assert!(ROOM_MADE.load(Ordering::Relaxed) > before, "room was made");
        assert_eq!(next_four(&mut rd, &mut buf).await, b"NEXT");
        assert!(std::fs::read(&path).unwrap()[3000..3000 + n] == data[..]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
