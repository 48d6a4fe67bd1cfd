//! The read half of a TCP connection, woken for a write payload only once the rest of it is
//! there.
//!
//! A 1 MiB payload reaches the socket in pieces of 64 KiB or so. Woken for each piece, the
//! reader took a 1 MiB write in about seven `recvmsg`s and two `epoll_wait`s into memory, and
//! in 18 system calls into an image file, by `splice`, where nbdkit's blocking reads take
//! about six (`bench/profile.sh`, fio, 1 MiB writes at depth 8). So, when a payload's bytes
//! are due and the socket is empty, the reader sets `SO_RCVLOWAT` to what is still due (at
//! most [`MAX_MARK`], 256 KiB for a splice, and only from [`MIN_MARK`] up): the kernel reports
//! the socket readable once that much has arrived, or the stream has ended. Every other read
//! sets it back to one byte first.
//!
//! The mark never asks for a byte the client does not owe: it is set only while the socket
//! holds nothing, to at most the bytes due for the payload being read, and set again at every
//! wait. And the kernel wakes the reader short of the mark when the receive window has closed
//! or memory is short, in `epoll` as well since Linux 5.10 ("tcp: Prevent low rmem stalls
//! with SO_RCVLOWAT", "tcp: fix SO_RCVLOWAT hangs with fat skbs"). Older kernels might wait
//! there for good, so on them the mark stays at one byte. Unix sockets ignore the mark in
//! `poll`, and TLS records are not payload bytes, so neither has one.
//!
//! While bytes wait below the mark the kernel acknowledges them at once rather than delaying
//! the ACK, so a client that leaves Nagle's algorithm on is not kept waiting to send a
//! write's last piece (`bench/rawwrites.py` sends writes that way).
//!
//! A mark never asks for more than an eighth of the receive buffer the kernel has given the
//! socket so far ([`BUFFER_SHARE`]). A mark needing more room than the buffer has makes the
//! kernel grow the buffer to fit it and clamp the receive window at the mark, and over a real
//! network the window did not grow again: across a link of 20 ms round trips
//! (`bench/wan.sh`), 1 MiB writes ran at 30 MiB/s instead of 145, held to a window of 1 MiB.
//! Loopback hides that, its buffer growing to megabytes within the first writes. Within an
//! eighth, bytes held below the mark are at most a quarter of the window offered.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;

/// The most a mark asks for: larger payloads take a wake per MiB.
pub const MAX_MARK: usize = 1 << 20;

/// Less than this due is read as it comes: two `setsockopt`s would cost more than the wakes
/// they save.
pub const MIN_MARK: usize = 64 << 10;

/// A mark is at most this share of the socket's receive buffer (`SO_RCVBUF`, which counts
/// the kernel's overhead too: the window is about half of it), so that setting it never grows
/// the buffer, which would clamp the window at the mark.
pub const BUFFER_SHARE: usize = 8;

/// Whether this kernel wakes a reader short of its mark when the window closes (5.10 on).
static MARKS: LazyLock<bool> = LazyLock::new(|| {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").is_ok_and(|r| kernel_at_least(&r, 5, 10))
});

/// Whether a kernel release string (`6.1.0-13-amd64`) is `major.minor` or later.
fn kernel_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut parts = release.trim().split(['.', '-']);
    let mut num = || parts.next().and_then(|p| p.parse::<u32>().ok());
    match (num(), num()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}

/// Whether payload waits raise the mark on this machine.
pub fn marks_supported() -> bool {
    *MARKS
}

/// The read half of a TCP connection, with its `SO_RCVLOWAT`.
#[derive(Debug)]
pub struct TcpReader {
    half: OwnedReadHalf,
    /// The mark as last set: 1 (the kernel's default) or the bytes a payload still had due.
    mark: AtomicUsize,
    /// The largest mark the receive buffer had room for when last asked. Autotuning grows
    /// the buffer, so it is asked again whenever more is due than this.
    room: AtomicUsize,
}

impl TcpReader {
    /// The read half, its mark at the kernel's default.
    pub fn new(half: OwnedReadHalf) -> TcpReader {
        TcpReader {
            half,
            mark: AtomicUsize::new(1),
            room: AtomicUsize::new(0),
        }
    }

    /// Before waiting for a payload on an empty socket: `due` more bytes of it are owed.
    /// An error ends the connection: a mark that could not be lowered might wait for bytes
    /// that never come.
    pub(super) fn set_due(&self, due: usize) -> io::Result<()> {
        if !*MARKS || due < MIN_MARK {
            return self.set_mark(1);
        }
        let want = due.min(MAX_MARK);
        let mut room = self.room.load(Ordering::Relaxed);
        if want > room {
            let buffer = rustix::net::sockopt::socket_recv_buffer_size(self.half.as_ref())?;
            room = buffer / BUFFER_SHARE;
            self.room.store(room, Ordering::Relaxed);
        }
        let mark = want.min(room);
        self.set_mark(if mark >= MIN_MARK { mark } else { 1 })
    }

    fn set_mark(&self, n: usize) -> io::Result<()> {
        if self.mark.load(Ordering::Relaxed) != n {
            set_rcvlowat(self.half.as_ref().as_fd(), n)?;
            self.mark.store(n, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl AsRef<TcpStream> for TcpReader {
    fn as_ref(&self) -> &TcpStream {
        self.half.as_ref()
    }
}

impl AsyncRead for TcpReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Headers, and payloads read into plain buffers, are read as they come.
        this.set_mark(1)?;
        Pin::new(&mut this.half).poll_read(cx, buf)
    }
}

/// `setsockopt(SO_RCVLOWAT)`, which neither rustix nor socket2 wraps.
#[allow(unsafe_code)]
fn set_rcvlowat(sock: BorrowedFd<'_>, n: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(n).unwrap_or(libc::c_int::MAX);
    // SAFETY: the option value points at one c_int, and its length says so.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The `SO_RCVLOWAT` of socket `sock` as the kernel has it.
    #[allow(unsafe_code)]
    pub fn rcvlowat(sock: std::os::fd::RawFd) -> usize {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes, one c_int, through the pointer.
        let r = unsafe {
            libc::getsockopt(
                sock,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "getsockopt: {}", io::Error::last_os_error());
        value as usize
    }

    #[test]
    fn kernel_releases_compare_by_major_and_minor() {
        assert!(kernel_at_least("6.18.44-fc-v1300", 5, 10));
        assert!(kernel_at_least("5.10.0-26-amd64\n", 5, 10));
        assert!(kernel_at_least("6.1.0-13-amd64", 5, 10));
        assert!(!kernel_at_least("5.4.0-150-generic", 5, 10));
        assert!(!kernel_at_least("4.18.0-513.el8.x86_64", 5, 10));
        assert!(!kernel_at_least("garbage", 5, 10));
        assert!(!kernel_at_least("", 5, 10));
    }
}
