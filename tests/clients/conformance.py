#!/usr/bin/python3
"""libnbd (python3-libnbd 1.14) conformance script for nbd-rs.

Usage:
    /usr/bin/python3 tests/clients/conformance.py URI [--read-only]
                     [--kind memory|file|nbdkit] [--size BYTES] [--timeout S]

Run it with Debian's /usr/bin/python3: the pyenv python3 on PATH has no `nbd`
module (the PyPI package called `nbd` is unrelated).

The script drives the server at URI through everything libnbd 1.14 can send and
checks the exact answers against tests/clients/EXPECTED.md. It prints one line
per check, `OK name` or `FAIL name: detail` (plus `SKIP name: reason` for checks
that cannot run against this export), and exits 0 only if every check passed.

--kind says what serves URI:
  memory  nbd-rs memory export (sparse, 32 KiB pages; holes are reported)
  file    nbd-rs file export (raw image; hole reporting depends on the fs)
  nbdkit  `nbdkit memory SIZE` (or `nbdkit -r memory SIZE`), the reference server
          used to validate this script. The few places where nbdkit differs from
          EXPECTED.md are marked "nbdkit differs" below; with --kind memory or
          --kind file the script asserts EXPECTED.md exactly.
--read-only: the export is read-only: no data is written; write/trim/zero must
  fail with EPERM.
--size: optional; if given, the export size must equal it.

Layout of the first 64 MiB (the export must be at least 64 MiB). The script
writes only inside [0, 60 MiB) and, if the export is >= 2 GiB, inside
[1 GiB - 4 KiB, 2 GiB + 4 KiB). [60 MiB, 64 MiB) is never written, so on a
memory export it stays a hole (also across re-runs against the same server).
"""

import argparse
import errno
import os
import random
import sys
import threading
import time
import urllib.parse

try:
    import nbd
except ImportError:
    sys.stderr.write("cannot import nbd: run with /usr/bin/python3 (python3-libnbd)\n")
    sys.exit(2)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

MAX_PAYLOAD = 32 * MiB          # EXPECTED.md: NBD_INFO_BLOCK_SIZE maximum
PAGE = 32 * KiB                 # nbd-rs (and nbdkit) memory page size
UNKNOWN_EXPORT = "no-such-export"

# Offsets used by the checks (see the module docstring).
OFF_SMALL = 0                   # [0, 1M): small round trips
OFF_1M = 1 * MiB                # 1 MiB round trip
OFF_OPS = 2 * MiB               # FUA / trim / zero / cache / DF: 10 x 128 KiB slots
OFF_SCRATCH = 3 * MiB + 512 * KiB   # scratch for the error checks' FUA writes
OFF_MARK = 3 * MiB + 768 * KiB  # marker read by the "connection alive" probes
OFF_BS = 4 * MiB                # block status region
OFF_SR = 5 * MiB                # structured read region
OFF_DEFAULT = 6 * MiB           # default-export marker
OFF_MC = 7 * MiB                # multi-conn region
OFF_32M = 8 * MiB               # 32 MiB round trip, oversized write [8M, 40M+1)
OFF_BIGZ = 12 * MiB             # 48 MiB trim/write_zeroes [12M, 60M)
OFF_SIMPLE = 41 * MiB           # simple-reply and EXPORT_NAME writes
OFF_AIO = 44 * MiB              # 64 x 64 KiB aio [44M, 48M)
OFF_HOLE = 60 * MiB             # never written [60M, 64M)
MIN_SIZE = 64 * MiB

EXPECTED_BLOCK_SIZES = (1, 4096, 33554432)

FLAG_PAYLOAD_LEN = 0x20         # extended-headers-only flag, unknown in compact mode
FLAG_UNKNOWN = 0x100            # not defined by the protocol


class CheckFailed(Exception):
    pass


def errname(n):
    if n is None:
        return "None"
    return "%s (%d)" % (errno.errorcode.get(n, "?"), n)


def fail(msg):
    raise CheckFailed(msg)


def expect(cond, msg):
    if not cond:
        fail(msg)


def expect_eq(got, want, what):
    if got != want:
        fail("%s: got %r, expected %r" % (what, got, want))


def expect_data(got, want, what="data"):
    got = bytes(got)
    if got == want:
        return
    if len(got) != len(want):
        fail("%s: got %d bytes, expected %d" % (what, len(got), len(want)))
    for i in range(len(want)):
        if got[i] != want[i]:
            fail("%s: first difference at +%d: got 0x%02x, expected 0x%02x"
                 % (what, i, got[i], want[i]))


def expect_zero(got, what="data"):
    expect_data(got, bytes(len(got)), what + " (expected zeros)")


# libnbd words an error that the *server* sent like this; anything else (for
# example "request too large" or "invalid value for flag") was refused by
# libnbd itself and never reached the server, so it must not count as a pass.
SERVER_CMD_ERROR = "command failed:"           # transmission-phase error reply
SERVER_OPT_ERROR = "server replied with error"  # option-phase NBD_REP_ERR_*


def expect_err(fn, want, what="request", origin=SERVER_CMD_ERROR):
    """fn must raise nbd.Error with errnum == want (an errno value), and the
    error must have come from the server (its message contains `origin`)."""
    try:
        r = fn()
    except nbd.Error as e:
        if e.errnum != want:
            fail("%s: got %s %r, expected %s"
                 % (what, errname(e.errnum), e.string, errname(want)))
        if origin and origin not in (e.string or ""):
            fail("%s: %s came from libnbd, not from the server: %r"
                 % (what, errname(e.errnum), e.string))
        return e
    fail("%s succeeded (returned %s), expected %s"
         % (what, "%d bytes" % len(r) if isinstance(r, (bytes, bytearray)) else repr(r),
            errname(want)))


def expect_nbd_error(fn, what="request"):
    """fn must raise nbd.Error (any errno)."""
    try:
        fn()
    except nbd.Error as e:
        return e
    fail("%s succeeded, expected an nbd.Error" % what)


# --------------------------------------------------------------------------
# Output and the per-check runner

class Runner:
    def __init__(self, timeout):
        self.timeout = timeout
        self.passed = 0
        self.failed = 0
        self.skipped = 0

    def _timeout(self, name):
        print("FAIL %s: timed out after %ss (server hung?)" % (name, self.timeout), flush=True)
        print("# stopping: a hung check leaves the connection unusable", flush=True)
        os._exit(1)

    def check(self, name, fn):
        timer = threading.Timer(self.timeout, self._timeout, (name,))
        timer.daemon = True
        timer.start()
        try:
            fn()
        except CheckFailed as e:
            self.failed += 1
            print("FAIL %s: %s" % (name, e), flush=True)
            return False
        except nbd.Error as e:
            self.failed += 1
            print("FAIL %s: unexpected nbd.Error %s: %s" % (name, errname(e.errnum), e.string),
                  flush=True)
            return False
        except Exception as e:          # a bug in the check, or a libnbd surprise
            self.failed += 1
            print("FAIL %s: %s: %s" % (name, type(e).__name__, e), flush=True)
            return False
        finally:
            timer.cancel()
        self.passed += 1
        print("OK %s" % name, flush=True)
        return True

    def skip(self, name, reason):
        self.skipped += 1
        print("SKIP %s: %s" % (name, reason), flush=True)


# --------------------------------------------------------------------------
# libnbd helpers

def uri_with_export(uri, name):
    """The same URI with a different export name (the path of an nbd URI)."""
    p = urllib.parse.urlsplit(uri)
    return urllib.parse.urlunsplit((p.scheme, p.netloc, "/" + urllib.parse.quote(name),
                                    p.query, p.fragment))


def connect(uri, meta=True, sr=True, hflags=None, opt=False, block_size=True, strict=None):
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if not sr:
        h.set_request_structured_replies(False)
    if hflags is not None:
        h.set_handshake_flags(hflags)
    if opt:
        h.set_opt_mode(True)
    if not block_size:
        h.set_request_block_size(False)
    h.connect_uri(uri)
    if strict is not None:
        h.set_strict_mode(strict)
    return h


def close(h):
    """Best-effort disconnect of a helper connection."""
    try:
        h.shutdown()
    except nbd.Error:
        pass


def disconnect(h):
    """NBD_CMD_DISC (libnbd's shutdown waits for the server to close the socket)."""
    h.shutdown()
    expect_eq(h.aio_is_closed(), True, "connection closed by the server after DISC")


def structured_read(h, count, offset, flags=0):
    """pread_structured; returns (data, [(offset, length, status)])."""
    chunks = []

    def cb(subbuf, off, status, err):
        chunks.append((off, len(subbuf), status, bytes(subbuf)))
        return 0

    data = h.pread_structured(count, offset, cb, flags)
    return bytes(data), chunks


def check_chunks_cover(chunks, count, offset):
    """Content chunks must not overlap and must cover [offset, offset+count)."""
    for (o, n, st, _) in chunks:
        expect(st in (nbd.READ_DATA, nbd.READ_HOLE),
               "chunk at %d has status %d (not DATA/HOLE)" % (o, st))
        expect(n > 0, "empty chunk at %d" % o)
        expect(offset <= o and o + n <= offset + count,
               "chunk [%d, +%d) outside request [%d, +%d)" % (o, n, offset, count))
    spans = sorted((o, n) for (o, n, _, _) in chunks)
    pos = offset
    for (o, n) in spans:
        expect(o == pos, "chunks leave a gap or overlap at %d (next chunk starts at %d)"
               % (pos, o))
        pos = o + n
    expect(pos == offset + count, "chunks end at %d, request ends at %d"
           % (pos, offset + count))


def chunk_types_in(chunks, lo, hi):
    """Set of chunk types covering bytes of [lo, hi)."""
    return {st for (o, n, st, _) in chunks if o < hi and o + n > lo}


def block_status(h, count, offset, flags=0):
    """Returns the base:allocation extents as [(length, flags), ...]."""
    calls = []

    def cb(meta, off, entries, err):
        calls.append((meta, off, list(entries)))
        return 0

    h.block_status(count, offset, cb, flags)
    ba = [c for c in calls if c[0] == nbd.CONTEXT_BASE_ALLOCATION]
    expect(len(ba) == 1, "expected exactly one base:allocation reply, got %r" % calls)
    _, off, entries = ba[0]
    expect(off == offset, "extents start at %d, request at %d" % (off, offset))
    expect(entries and len(entries) % 2 == 0, "malformed extent list %r" % entries)
    ext = [(entries[i], entries[i + 1]) for i in range(0, len(entries), 2)]
    for (ln, fl) in ext:
        expect(ln > 0, "zero-length extent in %r" % ext)
        expect(fl & ~3 == 0, "extent flags 0x%x outside HOLE|ZERO in %r" % (fl, ext))
    if flags & nbd.CMD_FLAG_REQ_ONE:
        expect(len(ext) == 1, "REQ_ONE: got %d extents %r" % (len(ext), ext))
        expect(ext[0][0] <= count, "REQ_ONE: extent length %d > request %d"
               % (ext[0][0], count))
    return ext


def rnd(n):
    return RNG.randbytes(n)


RNG = random.Random()


# --------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("uri")
    ap.add_argument("--read-only", action="store_true")
    ap.add_argument("--kind", choices=("memory", "file", "nbdkit"), default="memory")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds per check before giving up (default 120)")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()

    seed = args.seed if args.seed is not None else int(time.time())
    RNG.seed(seed)
    print("# libnbd %s, uri %s, kind %s, %s, seed %d"
          % (nbd.NBD().get_version(), args.uri, args.kind,
             "read-only" if args.read_only else "read-write", seed), flush=True)

    R = Runner(args.timeout)
    ro = args.read_only
    kind = args.kind
    nbdkit = kind == "nbdkit"
    uri = args.uri
    ctx = {}

    # ---------------------------------------------------------------- connect
    def c_connect():
        ctx["h"] = connect(uri)
    if not R.check("connect (GO, structured replies, base:allocation requested)", c_connect):
        print("# cannot continue without a connection")
        return 1
    h = ctx["h"]
    export_name = h.get_export_name()
    size = h.get_size()

    # ---------------------------------------------------------- negotiation
    def c_size():
        expect(size >= MIN_SIZE, "export size %d < %d: this script needs >= 64 MiB"
               % (size, MIN_SIZE))
        if args.size is not None:
            expect_eq(size, args.size, "get_size")
    if not R.check("get_size (>= 64 MiB%s)" % (", == %d" % args.size if args.size else ""),
                   c_size):
        print("# cannot continue with this export size")
        return 1

    R.check("get_protocol == newstyle-fixed",
            lambda: expect_eq(h.get_protocol(), "newstyle-fixed", "protocol"))
    R.check("structured replies negotiated",
            lambda: expect_eq(h.get_structured_replies_negotiated(), True, "sr"))
    R.check("can_meta_context base:allocation",
            lambda: expect_eq(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), True,
                              "can_meta_context"))
    R.check("is_read_only == %s" % ro, lambda: expect_eq(h.is_read_only(), ro, "is_read_only"))
    R.check("is_rotational == False", lambda: expect_eq(h.is_rotational(), False, "rotational"))

    # EXPECTED.md: rw 0xded; read-only: READ_ONLY, no TRIM/WRITE_ZEROES/FAST_ZERO,
    # FLUSH/FUA/CACHE/DF still advertised.
    want_caps = {
        "flush": True, "fua": True, "trim": not ro, "zero": not ro,
        "fast_zero": not ro, "df": True, "multi_conn": True, "cache": True,
    }
    if ro and nbdkit:
        # nbdkit differs: `nbdkit -r` does not advertise SEND_FUA (EXPECTED.md: a
        # read-only nbd-rs export still does).
        want_caps["fua"] = False
    for cap, want in want_caps.items():
        R.check("can_%s == %s" % (cap, want),
                lambda cap=cap, want=want: expect_eq(getattr(h, "can_" + cap)(), want,
                                                     "can_" + cap))

    names = {nbd.SIZE_MINIMUM: "minimum", nbd.SIZE_PREFERRED: "preferred",
             nbd.SIZE_MAXIMUM: "maximum"}
    for which, want in zip((nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM),
                           EXPECTED_BLOCK_SIZES):
        if nbdkit:
            # nbdkit differs: the memory plugin sends no NBD_INFO_BLOCK_SIZE, so
            # libnbd reports 0 ("no constraint").
            want = 0
        R.check("get_block_size %s == %d" % (names[which], want),
                lambda which=which, want=want: expect_eq(h.get_block_size(which), want,
                                                         "block size " + names[which]))

    def c_no_block_size_request():
        g = connect(uri, block_size=False)
        expect_eq(g.get_size(), size, "size")
        expect_eq(len(g.pread(4096, 0)), 4096, "read length")
        close(g)
    R.check("connect without requesting NBD_INFO_BLOCK_SIZE, read works",
            c_no_block_size_request)

    # --------------------------------------------------------------- marker
    # A known 4 KiB at OFF_MARK that every "connection still alive" probe reads.
    marker = {}

    def c_marker():
        if not ro:
            data = rnd(4096)
            h.pwrite(data, OFF_MARK)
        else:
            data = bytes(h.pread(4096, OFF_MARK))
        marker["data"] = data
        expect_data(h.pread(4096, OFF_MARK), data, "marker read-back")
    R.check("marker written and read back" if not ro else "marker read twice, same data",
            c_marker)
    marker.setdefault("data", None)

    def alive(g, what="after the error"):
        try:
            got = bytes(g.pread(4096, OFF_MARK))
        except nbd.Error as e:
            fail("connection unusable %s: %s %s" % (what, errname(e.errnum), e.string))
        if marker["data"] is not None and got != marker["data"]:
            fail("marker area changed %s (a failed request modified data?)" % what)

    # ------------------------------------------------------------------ data
    if not ro:
        data_checks(R, h, size, kind, alive)
    else:
        ro_data_checks(R, h, size, kind)

    structured_checks(R, h, size, kind, ro)
    block_status_checks(R, h, size, kind, ro)

    if not ro:
        big_ops_checks(R, h, size, kind)

    # ---------------------------------------------------------------- errors
    error_checks(R, uri, size, kind, ro, alive)

    # ----------------------------------------------------- other connections
    simple_reply_checks(R, uri, size, kind, ro, alive)
    handshake_flag_checks(R, uri, size, kind, ro, export_name)
    opt_mode_checks(R, uri, size, kind, ro, export_name)
    unknown_export_checks(R, uri, kind)
    if not ro:
        default_export_checks(R, uri, size, kind, export_name)
        multi_conn_checks(R, uri)
    else:
        def c_mc_ro():
            a = connect(uri)
            b = connect(uri)
            expect_eq(a.can_multi_conn(), True, "A can_multi_conn")
            expect_eq(b.can_multi_conn(), True, "B can_multi_conn")
            expect_data(b.pread(65536, 0), bytes(a.pread(65536, 0)), "B vs A")
            close(a)
            close(b)
        R.check("multi-conn: two read-only handles see the same data", c_mc_ro)
    aio_checks(R, uri, ro)

    # ---------------------------------------------------------------- finish
    def c_final():
        alive(h, "at the end")
        if not ro:
            d = rnd(65536)
            h.pwrite(d, OFF_SMALL + 65536)
            expect_data(h.pread(65536, OFF_SMALL + 65536), d, "final round trip")
        disconnect(h)
    R.check("first connection still works at the end, clean shutdown (DISC)", c_final)

    print("# %d passed, %d failed, %d skipped" % (R.passed, R.failed, R.skipped), flush=True)
    return 0 if R.failed == 0 else 1


# --------------------------------------------------------------------------
# Data path (read-write)

def data_checks(R, h, size, kind, alive):
    memory_like = kind in ("memory", "nbdkit")

    for (n, off, label) in [(512, OFF_SMALL, "512 B @0"),
                            (4096, OFF_SMALL + 4096, "4 KiB @4096"),
                            (65536, OFF_SMALL + 65536, "64 KiB @64K"),
                            (1000, OFF_SMALL + 200001, "1000 B @200001 (unaligned)"),
                            (200, OFF_SMALL + 6 * PAGE - 100, "200 B across a 32K page edge"),
                            (3 * PAGE + 77, OFF_SMALL + 8 * PAGE + 5,
                             "98381 B @262149 (4 pages, unaligned)"),
                            (MiB, OFF_1M, "1 MiB @1M"),
                            (32 * MiB, OFF_32M, "32 MiB @8M (max payload)")]:
        def c(n=n, off=off):
            d = rnd(n)
            h.pwrite(d, off)
            expect_data(h.pread(n, off), d)
        R.check("pwrite/pread round trip %s" % label, c)

    def c_partial():
        base = rnd(3 * PAGE)
        off = OFF_SMALL + 12 * PAGE
        h.pwrite(base, off)
        patch = rnd(333)
        h.pwrite(patch, off + PAGE - 111)
        want = base[:PAGE - 111] + patch + base[PAGE - 111 + 333:]
        expect_data(h.pread(3 * PAGE, off), want)
    R.check("partial overwrite inside written data keeps the surrounding bytes", c_partial)

    slot = [OFF_OPS]

    def next_slot():
        s = slot[0]
        slot[0] += 128 * KiB
        assert s + 128 * KiB <= OFF_SCRATCH
        return s

    s_fua = next_slot()

    def c_fua():
        d = rnd(65536)
        h.pwrite(d, s_fua, nbd.CMD_FLAG_FUA)
        expect_data(h.pread(65536, s_fua), d)
    R.check("pwrite FUA + read back", c_fua)

    R.check("flush", lambda: h.flush())

    s_trim = next_slot()

    def c_trim():
        h.pwrite(rnd(65536), s_trim)
        h.trim(65536, s_trim)
        expect_zero(h.pread(65536, s_trim))
    R.check("trim 64 KiB (page aligned), then reads zeros", c_trim)

    def zero_check(flags, label, fast_may_fail):
        s = next_slot()
        before = rnd(128 * KiB)

        def c():
            h.pwrite(before, s)
            try:
                h.zero(65536, s + 16 * KiB, flags)
            except nbd.Error as e:
                if fast_may_fail and e.errnum == errno.ENOTSUP:
                    # A file export may refuse FAST_ZERO; the data should be unchanged.
                    expect_data(h.pread(128 * KiB, s), before, "data after refused FAST_ZERO")
                    return
                raise
            got = bytes(h.pread(128 * KiB, s))
            expect_data(got[:16 * KiB], before[:16 * KiB], "bytes before the zeroed range")
            expect_zero(got[16 * KiB:80 * KiB], "zeroed range")
            expect_data(got[80 * KiB:], before[80 * KiB:], "bytes after the zeroed range")
        R.check("zero %s 64 KiB (straddling pages), reads zeros, neighbours intact" % label, c)

    zero_check(0, "plain", False)
    zero_check(nbd.CMD_FLAG_NO_HOLE, "NO_HOLE", False)
    # EXPECTED.md: FAST_ZERO on memory is OK. A file export may answer ENOTSUP.
    zero_check(nbd.CMD_FLAG_FAST_ZERO, "FAST_ZERO", kind == "file")
    zero_check(nbd.CMD_FLAG_FUA, "FUA", False)
    zero_check(nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA,
               "NO_HOLE|FAST_ZERO|FUA", kind == "file")

    s_small = next_slot()

    def c_small_zero():
        d = rnd(4096)
        h.pwrite(d, s_small)
        h.zero(100, s_small + 1001)
        want = d[:1001] + bytes(100) + d[1101:]
        expect_data(h.pread(4096, s_small), want)
    R.check("zero 100 B at an unaligned offset inside data", c_small_zero)

    s_cache = next_slot()

    def c_cache():
        d = rnd(65536)
        h.pwrite(d, s_cache)
        h.cache(65536, s_cache)
        expect_data(h.pread(65536, s_cache), d, "data after cache")
    R.check("cache 64 KiB, data unchanged", c_cache)

    s_df = next_slot()

    def c_df():
        d = rnd(65536)
        h.pwrite(d, s_df)
        # (libnbd 1.14 accepts DF only on pread_structured)
        data, chunks = structured_read(h, 65536, s_df, nbd.CMD_FLAG_DF)
        expect(len(chunks) == 1, "DF: got %d chunks, expected 1" % len(chunks))
        check_chunks_cover(chunks, 65536, s_df)
        expect_eq(chunks[0][2], nbd.READ_DATA, "chunk type")
        expect_data(data, d)
    R.check("pread (structured) with DF returns the data in one DATA chunk", c_df)


def ro_data_checks(R, h, size, kind):
    memory_like = kind in ("memory", "nbdkit")
    full = {}

    def c_big():
        full["d"] = bytes(h.pread(32 * MiB, 0))
        expect_eq(len(full["d"]), 32 * MiB, "length")
        if memory_like:
            expect_zero(full["d"], "read-only memory export")
    R.check("pread 32 MiB @0 (max payload)%s" % (", all zeros" if memory_like else ""), c_big)

    for (n, off, label) in [(512, 0, "512 B @0"), (4096, 4096, "4 KiB @4096"),
                            (65536, 65536, "64 KiB @64K"),
                            (1000, 200001, "1000 B @200001 (unaligned)"),
                            (MiB, MiB, "1 MiB @1M")]:
        def c(n=n, off=off):
            expect("d" in full, "no reference read")
            expect_data(h.pread(n, off), full["d"][off:off + n], "vs the 32 MiB read")
        R.check("pread %s matches the 32 MiB read" % label, c)

    R.check("flush (read-only export)", lambda: h.flush())
    R.check("cache 64 KiB (read-only export)", lambda: h.cache(65536, 0))

    def c_df():
        expect("d" in full, "no reference read")
        data, chunks = structured_read(h, 65536, 0, nbd.CMD_FLAG_DF)
        expect(len(chunks) == 1, "DF: got %d chunks, expected 1" % len(chunks))
        check_chunks_cover(chunks, 65536, 0)
        expect_data(data, full["d"][:65536])
    R.check("pread (structured) with DF: one chunk, same data", c_df)


# --------------------------------------------------------------------------
# Structured reads and block status

def structured_checks(R, h, size, kind, ro):
    # Never-written area: HOLE chunks on an nbd-rs memory export.
    def c_hole():
        data, chunks = structured_read(h, 65536, OFF_HOLE)
        check_chunks_cover(chunks, 65536, OFF_HOLE)
        if kind in ("memory", "nbdkit"):
            expect_zero(data, "never-written area")
        types = {st for (_, _, st, _) in chunks}
        if kind == "memory":
            expect(types == {nbd.READ_HOLE},
                   "never-written memory area arrived as %r, expected only HOLE chunks"
                   % sorted((o, n, st) for (o, n, st, _) in chunks))
        elif kind == "nbdkit":
            # nbdkit differs: its memory plugin answers an unwritten area with a
            # DATA chunk of zeros, not a HOLE chunk.
            expect(types == {nbd.READ_DATA},
                   "nbdkit: expected DATA chunks, got %r"
                   % sorted((o, n, st) for (o, n, st, _) in chunks))
    R.check("pread_structured of a never-written area: %s" % {
        "memory": "HOLE chunk(s)", "nbdkit": "DATA chunk (nbdkit)",
        "file": "chunks cover the range"}[kind], c_hole)

    def c_hole_df():
        data, chunks = structured_read(h, 65536, OFF_HOLE, nbd.CMD_FLAG_DF)
        expect(len(chunks) == 1, "DF: got %d chunks, expected 1" % len(chunks))
        check_chunks_cover(chunks, 65536, OFF_HOLE)
        if kind in ("memory", "nbdkit"):
            expect_zero(data, "never-written area")
    R.check("pread_structured DF of a never-written area: exactly one chunk", c_hole_df)

    if ro:
        def c_ro_data():
            want = bytes(h.pread(65536, 0))
            data, chunks = structured_read(h, 65536, 0)
            check_chunks_cover(chunks, 65536, 0)
            expect_data(data, want, "vs pread")
            for (o, n, st, sub) in chunks:
                if st == nbd.READ_HOLE:
                    expect_zero(sub, "HOLE chunk at %d" % o)
                else:
                    expect_data(sub, want[o:o + n], "DATA chunk at %d" % o)
        R.check("pread_structured @0: chunks cover the range, agree with pread", c_ro_data)
        return

    # Page 0 of the region written, page 1 trimmed (a hole on memory).
    def c_mixed():
        h.trim(4 * PAGE, OFF_SR)
        d = rnd(PAGE)
        h.pwrite(d, OFF_SR)
        data, chunks = structured_read(h, 2 * PAGE, OFF_SR)
        check_chunks_cover(chunks, 2 * PAGE, OFF_SR)
        expect_data(data, d + bytes(PAGE))
        for (o, n, st, sub) in chunks:
            want = (d + bytes(PAGE))[o - OFF_SR:o - OFF_SR + n]
            expect_data(sub, want, "chunk at %d (type %d)" % (o, st))
        expect_eq(chunk_types_in(chunks, OFF_SR, OFF_SR + PAGE), {nbd.READ_DATA},
                  "chunk types over the written page")
        if kind == "memory":
            expect_eq(chunk_types_in(chunks, OFF_SR + PAGE, OFF_SR + 2 * PAGE),
                      {nbd.READ_HOLE}, "chunk types over the trimmed page")
    R.check("pread_structured data page + %s: %s" % (
        "trimmed page", "DATA then HOLE" if kind == "memory" else "DATA over the data"),
        c_mixed)

    def c_mixed_df():
        d = bytes(h.pread(PAGE, OFF_SR))
        data, chunks = structured_read(h, 2 * PAGE, OFF_SR, nbd.CMD_FLAG_DF)
        expect(len(chunks) == 1, "DF: got %d chunks %r, expected 1"
               % (len(chunks), [(o, n, st) for (o, n, st, _) in chunks]))
        check_chunks_cover(chunks, 2 * PAGE, OFF_SR)
        expect_eq(chunks[0][2], nbd.READ_DATA, "DF chunk type over data + hole")
        expect_data(data, d + bytes(PAGE))
    R.check("pread_structured DF over data + hole: one DATA chunk", c_mixed_df)


def block_status_checks(R, h, size, kind, ro):
    memory_like = kind in ("memory", "nbdkit")

    if memory_like:
        def c_hole():
            ext = block_status(h, MiB, OFF_HOLE)
            expect(all(fl == 3 for (_, fl) in ext),
                   "never-written area: extents %r, expected all hole,zero (3)" % ext)
            total = sum(ln for (ln, _) in ext)
            expect(total >= MiB, "extents cover %d bytes < request %d" % (total, MiB))
            expect(OFF_HOLE + total <= size, "extents run past the end of the export")
        R.check("block_status never-written 1 MiB: hole,zero (3)", c_hole)

        def c_hole_one():
            ext = block_status(h, MiB, OFF_HOLE, nbd.CMD_FLAG_REQ_ONE)
            expect_eq(ext[0][1], 3, "REQ_ONE extent flags")
        R.check("block_status REQ_ONE never-written: one extent, flags 3", c_hole_one)

    def c_end():
        ext = block_status(h, 65536, size - 65536)
        total = sum(ln for (ln, _) in ext)
        expect(total <= 65536, "extents %r run past the end of the export" % ext)
    R.check("block_status of the last 64 KiB stays inside the export", c_end)

    if ro:
        return

    def c_data():
        h.trim(MiB, OFF_BS)
        h.pwrite(rnd(4096), OFF_BS)
        ext = block_status(h, MiB, OFF_BS)
        if memory_like:
            # 32 KiB pages: the page holding the data is one data extent.
            expect_eq(ext[0], (PAGE, 0), "first extent")
            rest = ext[1:]
            expect(rest and all(fl == 3 for (_, fl) in rest),
                   "extents after the data page: %r, expected hole,zero (3)" % rest)
            total = sum(ln for (ln, _) in ext)
            expect(total >= MiB, "extents cover %d bytes < request %d" % (total, MiB))
        else:
            expect_eq(ext[0][1], 0, "flags of the data extent")
            expect(ext[0][0] >= 4096, "data extent %r shorter than the write" % (ext[0],))
    R.check("block_status 1 MiB after a 4 KiB write: %s" % (
        "[32768 data(0), rest hole,zero(3)]" if memory_like else "data extent flags 0"),
        c_data)

    def c_data_one():
        ext = block_status(h, 4096, OFF_BS, nbd.CMD_FLAG_REQ_ONE)
        expect_eq(ext, [(4096, 0)], "REQ_ONE extents")
    R.check("block_status REQ_ONE 4 KiB over data: [(4096, 0)]", c_data_one)

    def c_data_one_big():
        ext = block_status(h, MiB, OFF_BS, nbd.CMD_FLAG_REQ_ONE)
        if memory_like:
            expect_eq(ext, [(PAGE, 0)], "REQ_ONE extents")
        else:
            expect_eq(ext[0][1], 0, "REQ_ONE extent flags")
    R.check("block_status REQ_ONE 1 MiB over data page: %s" % (
        "[(32768, 0)]" if memory_like else "one data extent"), c_data_one_big)

    if memory_like:
        for (label, op) in [("zero", lambda o: h.zero(2 * PAGE, o)),
                            ("trim", lambda o: h.trim(2 * PAGE, o))]:
            def c(op=op, label=label):
                o = OFF_BS + 8 * PAGE
                h.pwrite(rnd(2 * PAGE), o)
                ext = block_status(h, 2 * PAGE, o, nbd.CMD_FLAG_REQ_ONE)
                expect_eq(ext, [(2 * PAGE, 0)], "extents after write")
                op(o)
                ext = block_status(h, 2 * PAGE, o)
                expect(all(fl == 3 for (_, fl) in ext),
                       "extents after %s: %r, expected hole,zero (3)" % (label, ext))
                expect(sum(ln for (ln, _) in ext) >= 2 * PAGE, "extents too short: %r" % ext)
                expect_zero(h.pread(2 * PAGE, o), "after " + label)
            R.check("block_status after %s of 2 written pages: hole,zero (3)" % label, c)

        def c_nohole():
            o = OFF_BS + 12 * PAGE
            h.pwrite(rnd(2 * PAGE), o)
            h.zero(2 * PAGE, o, nbd.CMD_FLAG_NO_HOLE)
            ext = block_status(h, 2 * PAGE, o)
            expect(all(fl & nbd.STATE_ZERO for (_, fl) in ext),
                   "extents after zero NO_HOLE: %r, expected the ZERO bit" % ext)
        R.check("block_status after zero NO_HOLE: ZERO bit set", c_nohole)


def big_ops_checks(R, h, size, kind):
    if size < 2 * GiB:
        R.skip("trim/zero 1 GiB", "export is %d bytes (< 2 GiB)" % size)
        return
    memory_like = kind in ("memory", "nbdkit")
    spots = [GiB, GiB + 512 * MiB + 12345, 2 * GiB - 4096]
    outside = [GiB - 4096] + ([2 * GiB] if 2 * GiB + 4096 <= size else [])

    def run(label, op):
        def c():
            marks = {o: rnd(4096) for o in spots + outside}
            for o, d in marks.items():
                h.pwrite(d, o)
            op()
            for o in spots:
                expect_zero(h.pread(4096, o), "%s: 4 KiB at %d" % (label, o))
            for o in outside:
                expect_data(h.pread(4096, o), marks[o], "%s: 4 KiB at %d (outside)" % (label, o))
            if memory_like:
                ext = block_status(h, GiB, GiB, nbd.CMD_FLAG_REQ_ONE)
                expect_eq(ext[0][1], 3, "block status flags at 1 GiB after " + label)
        return c

    R.check("zero 1 GiB @1G: reads zeros inside, data outside intact",
            run("zero", lambda: h.zero(GiB, GiB)))
    R.check("trim 1 GiB @1G: reads zeros inside, data outside intact",
            run("trim", lambda: h.trim(GiB, GiB)))
    if kind != "file":
        R.check("zero FAST_ZERO 1 GiB @1G (memory: OK)",
                run("zero FAST_ZERO", lambda: h.zero(GiB, GiB, nbd.CMD_FLAG_FAST_ZERO)))


# --------------------------------------------------------------------------
# EXPECTED.md error table, strict mode off

def error_checks(R, uri, size, kind, ro, alive):
    nbdkit = kind == "nbdkit"
    ctx = {}

    def c_conn():
        ctx["e"] = connect(uri, strict=0)
        expect_eq(ctx["e"].get_strict_mode(), 0, "strict mode")
    if not R.check("errors: second connection with set_strict_mode(0)", c_conn):
        return
    e = ctx["e"]

    def row(name, fn, want):
        def c():
            expect_err(fn, want)
            alive(e)
        R.check("error %s -> %s, connection usable" % (name, errno.errorcode[want]), c)

    def ok_row(name, fn):
        def c():
            fn()
            alive(e)
        R.check("%s -> accepted, connection usable" % name, c)

    EINVAL, ENOSPC, EPERM = errno.EINVAL, errno.ENOSPC, errno.EPERM
    WRAP = 2 ** 64 - 256      # offset + 512 wraps around 2^64
    nul = lambda *a: 0        # block_status callback
    w512 = rnd(512)           # differs from the marker: if applied, alive() notices

    # read/trim/cache/block_status past the end, or straddling it -> EINVAL
    row("read past end", lambda: e.pread(512, size), EINVAL)
    row("read straddling end", lambda: e.pread(512, size - 256), EINVAL)
    row("read offset+len wraps 2^64", lambda: e.pread(512, WRAP), EINVAL)
    row("cache past end", lambda: e.cache(512, size), EINVAL)
    row("cache straddling end", lambda: e.cache(512, size - 256), EINVAL)
    row("block_status past end", lambda: e.block_status(512, size, nul), EINVAL)
    row("block_status straddling end", lambda: e.block_status(512, size - 256, nul), EINVAL)
    row("block_status offset+len wraps 2^64", lambda: e.block_status(512, WRAP, nul), EINVAL)
    if not ro:
        # (on a read-only export these would race EPERM against EINVAL/ENOSPC;
        # EXPECTED.md does not order them, so they are only checked read-write)
        row("trim past end", lambda: e.trim(512, size), EINVAL)
        row("trim straddling end", lambda: e.trim(512, size - 256), EINVAL)
        row("trim offset+len wraps 2^64", lambda: e.trim(512, WRAP), EINVAL)
        # write/write_zeroes past the end, or straddling it -> ENOSPC
        row("write past end", lambda: e.pwrite(w512, size), ENOSPC)
        row("write straddling end", lambda: e.pwrite(w512, size - 256), ENOSPC)
        row("write offset+len wraps 2^64", lambda: e.pwrite(w512, WRAP), ENOSPC)
        row("write_zeroes past end", lambda: e.zero(512, size), ENOSPC)
        row("write_zeroes straddling end", lambda: e.zero(512, size - 256), ENOSPC)
        row("write_zeroes offset+len wraps 2^64", lambda: e.zero(512, WRAP), ENOSPC)

        def c_straddle_untouched():
            # (only reads the end of the export: the script writes nowhere there)
            d = bytes(e.pread(4096, size - 4096))
            expect_err(lambda: e.pwrite(rnd(8192), size - 4096), ENOSPC)
            expect_data(e.pread(4096, size - 4096), d, "last 4 KiB after refused write")
            expect_err(lambda: e.zero(8192, size - 4096), ENOSPC)
            expect_data(e.pread(4096, size - 4096), d, "last 4 KiB after refused zero")
        R.check("refused straddling write/write_zeroes leave the last 4 KiB unchanged",
                c_straddle_untouched)

    # zero-length requests -> EINVAL
    row("zero-length read", lambda: e.pread(0, OFF_MARK), EINVAL)
    row("zero-length cache", lambda: e.cache(0, OFF_MARK), EINVAL)
    row("zero-length block_status", lambda: e.block_status(0, OFF_MARK, nul), EINVAL)
    if not ro:
        # nbdkit differs: zero-length WRITE and WRITE_ZEROES get ENOSPC from nbdkit.
        row("zero-length write", lambda: e.pwrite(b"", OFF_MARK),
            ENOSPC if nbdkit else EINVAL)
        row("zero-length trim", lambda: e.trim(0, OFF_MARK), EINVAL)
        row("zero-length write_zeroes", lambda: e.zero(0, OFF_MARK),
            ENOSPC if nbdkit else EINVAL)

    # unknown flags, and flags not valid for the command -> EINVAL
    F = nbd
    bad = [
        ("read", "unknown flag 0x100", lambda: e.pread(512, OFF_MARK, FLAG_UNKNOWN)),
        ("read", "unknown flag 0x8000", lambda: e.pread(512, OFF_MARK, 0x8000)),
        ("read", "PAYLOAD_LEN (compact mode)", lambda: e.pread(512, OFF_MARK, FLAG_PAYLOAD_LEN)),
        ("read", "NO_HOLE", lambda: e.pread(512, OFF_MARK, F.CMD_FLAG_NO_HOLE)),
        ("read", "REQ_ONE", lambda: e.pread(512, OFF_MARK, F.CMD_FLAG_REQ_ONE)),
        ("read", "FAST_ZERO", lambda: e.pread(512, OFF_MARK, F.CMD_FLAG_FAST_ZERO)),
        ("cache", "unknown flag 0x100", lambda: e.cache(512, OFF_MARK, FLAG_UNKNOWN)),
        ("cache", "DF", lambda: e.cache(512, OFF_MARK, F.CMD_FLAG_DF)),
        ("cache", "NO_HOLE", lambda: e.cache(512, OFF_MARK, F.CMD_FLAG_NO_HOLE)),
        ("cache", "REQ_ONE", lambda: e.cache(512, OFF_MARK, F.CMD_FLAG_REQ_ONE)),
        ("flush", "unknown flag 0x100", lambda: e.flush(FLAG_UNKNOWN)),
        ("flush", "DF", lambda: e.flush(F.CMD_FLAG_DF)),
        ("flush", "NO_HOLE", lambda: e.flush(F.CMD_FLAG_NO_HOLE)),
        ("block_status", "DF", lambda: e.block_status(512, OFF_MARK, nul, F.CMD_FLAG_DF)),
        ("block_status", "NO_HOLE",
         lambda: e.block_status(512, OFF_MARK, nul, F.CMD_FLAG_NO_HOLE)),
        ("block_status", "unknown flag 0x100",
         lambda: e.block_status(512, OFF_MARK, nul, FLAG_UNKNOWN)),
    ]
    if not ro:
        bad += [
            ("write", "REQ_ONE", lambda: e.pwrite(w512, OFF_MARK, F.CMD_FLAG_REQ_ONE)),
            ("write", "DF", lambda: e.pwrite(w512, OFF_MARK, F.CMD_FLAG_DF)),
            ("write", "NO_HOLE", lambda: e.pwrite(w512, OFF_MARK, F.CMD_FLAG_NO_HOLE)),
            ("write", "FAST_ZERO", lambda: e.pwrite(w512, OFF_MARK, F.CMD_FLAG_FAST_ZERO)),
            ("write", "unknown flag 0x100", lambda: e.pwrite(w512, OFF_MARK, FLAG_UNKNOWN)),
            ("trim", "NO_HOLE", lambda: e.trim(512, OFF_MARK, F.CMD_FLAG_NO_HOLE)),
            ("trim", "DF", lambda: e.trim(512, OFF_MARK, F.CMD_FLAG_DF)),
            ("trim", "REQ_ONE", lambda: e.trim(512, OFF_MARK, F.CMD_FLAG_REQ_ONE)),
            ("trim", "FAST_ZERO", lambda: e.trim(512, OFF_MARK, F.CMD_FLAG_FAST_ZERO)),
            ("write_zeroes", "DF", lambda: e.zero(512, OFF_MARK, F.CMD_FLAG_DF)),
            ("write_zeroes", "REQ_ONE", lambda: e.zero(512, OFF_MARK, F.CMD_FLAG_REQ_ONE)),
            ("write_zeroes", "unknown flag 0x100", lambda: e.zero(512, OFF_MARK, FLAG_UNKNOWN)),
        ]
    for (cmd, flag, fn) in bad:
        row("%s with %s" % (cmd, flag), fn, EINVAL)

    # FUA on any command: accepted
    if ro and nbdkit:
        # nbdkit differs: `nbdkit -r` does not advertise SEND_FUA and so rejects
        # the FUA flag with EINVAL; EXPECTED.md says nbd-rs advertises and accepts it.
        row("read with FUA (nbdkit -r: no SEND_FUA)",
            lambda: e.pread(512, OFF_MARK, F.CMD_FLAG_FUA), EINVAL)
    else:
        ok_row("read with FUA", lambda: e.pread(4096, OFF_MARK, F.CMD_FLAG_FUA))
        ok_row("cache with FUA", lambda: e.cache(512, OFF_MARK, F.CMD_FLAG_FUA))
        ok_row("flush with FUA", lambda: e.flush(F.CMD_FLAG_FUA))
        ok_row("block_status with FUA",
               lambda: e.block_status(512, OFF_MARK, nul, F.CMD_FLAG_FUA))
        if not ro:
            s = OFF_SCRATCH
            ok_row("write with FUA", lambda: e.pwrite(rnd(512), s, F.CMD_FLAG_FUA))
            ok_row("trim with FUA", lambda: e.trim(512, s, F.CMD_FLAG_FUA))
            ok_row("write_zeroes with FUA", lambda: e.zero(512, s, F.CMD_FLAG_FUA))

    # read-only export: write, trim, write_zeroes (+FAST_ZERO) -> EPERM
    if ro:
        row("write on read-only export", lambda: e.pwrite(w512, OFF_MARK), EPERM)
        row("write FUA on read-only export",
            lambda: e.pwrite(w512, OFF_MARK, F.CMD_FLAG_FUA), EPERM)
        row("trim on read-only export", lambda: e.trim(512, OFF_MARK), EPERM)
        row("write_zeroes on read-only export", lambda: e.zero(512, OFF_MARK), EPERM)
        row("write_zeroes FAST_ZERO on read-only export",
            lambda: e.zero(512, OFF_MARK, F.CMD_FLAG_FAST_ZERO), EPERM)
        row("write_zeroes NO_HOLE on read-only export",
            lambda: e.zero(512, OFF_MARK, F.CMD_FLAG_NO_HOLE), EPERM)

    # read larger than 32 MiB -> EINVAL
    if nbdkit:
        # nbdkit differs: it serves reads up to 64 MiB.
        ok_row("read 32 MiB + 1 (nbdkit allows up to 64 MiB)",
               lambda: expect_eq(len(e.pread(MAX_PAYLOAD + 1, 0)), MAX_PAYLOAD + 1, "length"))
    else:
        row("read 32 MiB + 1", lambda: e.pread(MAX_PAYLOAD + 1, 0), EINVAL)
        row("read 64 MiB", lambda: e.pread(64 * MiB, 0), EINVAL)

    # write larger than 32 MiB -> EINVAL, payload consumed, connection usable
    if not ro:
        def c_big_write():
            head = bytes(e.pread(65536, OFF_32M))
            tail = bytes(e.pread(65537, OFF_32M + MAX_PAYLOAD + 1 - 65537))
            big = rnd(MAX_PAYLOAD + 1)
            if nbdkit:
                # nbdkit differs: it accepts writes up to 64 MiB.
                e.pwrite(big, OFF_32M)
                expect_data(e.pread(65536, OFF_32M), big[:65536], "head after write")
                expect_data(e.pread(65537, OFF_32M + MAX_PAYLOAD + 1 - 65537), big[-65537:],
                            "tail after write")
            else:
                expect_err(lambda: e.pwrite(big, OFF_32M), EINVAL, "write of 32 MiB + 1")
                expect_data(e.pread(65536, OFF_32M), head, "head after refused write")
                expect_data(e.pread(65537, OFF_32M + MAX_PAYLOAD + 1 - 65537), tail,
                            "tail after refused write")
            alive(e, "after the oversized write")
            d = rnd(4096)
            e.pwrite(d, OFF_SCRATCH + 4096)
            expect_data(e.pread(4096, OFF_SCRATCH + 4096), d,
                        "write+read after the oversized write")
        R.check("write 32 MiB + 1 -> %s, payload consumed, data unchanged, connection usable"
                % ("accepted (nbdkit)" if nbdkit else "EINVAL"), c_big_write)

        # trim / write_zeroes larger than the payload limit inside the export -> OK
        def c_big_trim_zero():
            # (this wipes [12M, 60M), part of the 32 MiB round-trip area and the
            # aio area; the checks using them have run or rewrite them first)
            n = 48 * MiB
            for o in (OFF_BIGZ, OFF_BIGZ + n // 2 + 7, OFF_BIGZ + n - 4096):
                e.pwrite(rnd(4096), o)
            e.zero(n, OFF_BIGZ)
            for o in (OFF_BIGZ, OFF_BIGZ + n // 2 + 7, OFF_BIGZ + n - 4096):
                expect_zero(e.pread(4096, o), "4 KiB at %d after zero" % o)
            for o in (OFF_BIGZ, OFF_BIGZ + n // 2 + 7, OFF_BIGZ + n - 4096):
                e.pwrite(rnd(4096), o)
            e.trim(n, OFF_BIGZ)
            for o in (OFF_BIGZ, OFF_BIGZ + n // 2 + 7, OFF_BIGZ + n - 4096):
                expect_zero(e.pread(4096, o), "4 KiB at %d after trim" % o)
            alive(e)
        R.check("trim and write_zeroes of 48 MiB (> max payload) -> OK", c_big_trim_zero)

    # block_status without base:allocation negotiated -> EINVAL
    def c_nometa():
        g = connect(uri, meta=False, strict=0)
        expect_eq(g.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), False, "can_meta_context")
        expect_err(lambda: g.block_status(512, 0, nul), EINVAL, "block_status")
        expect_eq(len(g.pread(512, 0)), 512, "read afterwards")
        close(g)
    R.check("error block_status without base:allocation negotiated -> EINVAL, "
            "connection usable", c_nometa)

    def c_alive():
        alive(e, "after all the errors")
        if not ro:
            d = rnd(8192)
            e.pwrite(d, OFF_SCRATCH + 8192)
            expect_data(e.pread(8192, OFF_SCRATCH + 8192), d)
        close(e)
    R.check("errors: connection still works afterwards", c_alive)


# --------------------------------------------------------------------------
# Simple replies, handshake flags

def simple_reply_checks(R, uri, size, kind, ro, alive):
    ctx = {}

    def c_conn():
        g = connect(uri, sr=False, strict=0)
        ctx["g"] = g
        expect_eq(g.get_structured_replies_negotiated(), False, "structured replies")
        expect_eq(g.get_size(), size, "size")
        expect_eq(g.can_df(), False, "can_df (DF MUST be clear without structured replies)")
        expect_eq(g.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), False, "can_meta_context")
        expect_eq(g.is_read_only(), ro, "is_read_only")
    if not R.check("simple replies: negotiated off, can_df False, no meta context", c_conn):
        return
    g = ctx["g"]

    def c_rw():
        if not ro:
            d = rnd(65536)
            g.pwrite(d, OFF_SIMPLE)
            expect_data(g.pread(65536, OFF_SIMPLE), d)
        alive(g, "(simple replies)")
        expect_eq(len(g.pread(MiB, 0)), MiB, "1 MiB read length")
    R.check("simple replies: %sreads work" % ("" if ro else "writes and "), c_rw)

    def err(name, fn, want):
        def c():
            expect_err(fn, want)
            alive(g, "(simple replies)")
        R.check("simple replies: %s -> %s, connection usable"
                % (name, errno.errorcode[want]), c)

    err("read past end", lambda: g.pread(512, size), errno.EINVAL)
    err("read straddling end", lambda: g.pread(512, size - 256), errno.EINVAL)
    err("zero-length read", lambda: g.pread(0, 0), errno.EINVAL)
    err("read with DF (not advertised)", lambda: g.pread(512, 0, nbd.CMD_FLAG_DF), errno.EINVAL)
    err("block_status (no context)", lambda: g.block_status(512, 0, lambda *a: 0), errno.EINVAL)
    if kind != "nbdkit":
        # (nbdkit differs: it serves reads up to 64 MiB)
        err("read 32 MiB + 1", lambda: g.pread(MAX_PAYLOAD + 1, 0), errno.EINVAL)
    R.check("simple replies: flush", lambda: g.flush())
    R.check("simple replies: DISC, server closes the connection", lambda: disconnect(g))


def handshake_flag_checks(R, uri, size, kind, ro, export_name):
    for (flags, label) in [(0, "handshake flags 0 (EXPORT_NAME + 124 zero bytes)"),
                           (nbd.HANDSHAKE_FLAG_NO_ZEROES,
                            "handshake flag NO_ZEROES only (EXPORT_NAME, no zero bytes)")]:
        def c(flags=flags):
            g = connect(uri, hflags=flags)
            expect_eq(g.get_protocol(), "newstyle", "protocol")
            expect_eq(g.get_size(), size, "size")
            expect_eq(g.is_read_only(), ro, "is_read_only")
            expect_eq(g.get_structured_replies_negotiated(), False, "structured replies")
            expect_eq(g.can_df(), False, "can_df")
            expect_eq(g.can_flush(), True, "can_flush")
            expect_eq(g.can_trim(), not ro, "can_trim")
            expect_eq(g.can_zero(), not ro, "can_zero")
            expect_eq(g.can_multi_conn(), True, "can_multi_conn")
            expect_eq(g.can_cache(), True, "can_cache")
            if not ro:
                d = rnd(4096)
                g.pwrite(d, OFF_SIMPLE + 128 * KiB + flags * 4096)
                expect_data(g.pread(4096, OFF_SIMPLE + 128 * KiB + flags * 4096), d)
            expect_eq(len(g.pread(65536, 0)), 65536, "read length")
            disconnect(g)
        R.check("%s: newstyle, export %r, reads%s work" % (label, export_name,
                                                           "" if ro else "/writes"), c)


# --------------------------------------------------------------------------
# Option mode

def opt_mode_checks(R, uri, size, kind, ro, export_name):
    nbdkit = kind == "nbdkit"
    ctx = {}

    def c_conn():
        g = connect(uri, opt=True, meta=False)
        ctx["g"] = g
        expect_eq(g.aio_is_negotiating(), True, "negotiating")
    if not R.check("opt mode: connect, still negotiating", c_conn):
        return
    g = ctx["g"]

    def c_list():
        lst = []
        n = g.opt_list(lambda name, desc: lst.append((name, desc)) or 0)
        ctx["list"] = lst
        expect_eq(n, len(lst), "opt_list return vs callbacks")
        expect(len(lst) >= 1, "no exports listed")
        names = [x[0] for x in lst]
        expect_eq(len(set(names)), len(names), "duplicate names in %r" % names)
        for (name, desc) in lst:
            expect(isinstance(name, str) and isinstance(desc, str), "bad entry %r" % ((name, desc),))
        if export_name:
            expect(export_name in names, "export %r not listed in %r" % (export_name, lst))
        elif nbdkit:
            expect_eq(lst, [("", "")], "nbdkit's list")
        else:
            # EXPECTED.md: LIST shows real names only
            expect("" not in names, "the empty default name is listed: %r" % lst)
    R.check("opt_list: names%s" % (" (real names only)" if not nbdkit else ""), c_list)

    def c_list_info():
        expect("list" in ctx, "opt_list failed")
        g.set_full_info(True)
        for (name, desc) in ctx["list"]:
            g.set_export_name(name)
            g.opt_info()
            expect(g.get_size() > 0, "INFO %r: size %d" % (name, g.get_size()))
            try:
                d = g.get_export_description()
            except nbd.Error:
                d = None              # no NBD_INFO_DESCRIPTION sent: allowed
            if d is not None:
                expect_eq(d, desc, "INFO description of %r vs LIST" % name)
        g.set_full_info(False)
    R.check("opt_list descriptions; every listed export answers opt_info", c_list_info)

    def c_info():
        g.set_export_name(export_name)
        g.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        g.opt_info()
        expect_eq(g.get_size(), size, "INFO size")
        expect_eq(g.is_read_only(), ro, "INFO is_read_only")
        ctx["info"] = [g.get_size(), g.is_read_only(), g.can_flush(), g.can_fua(), g.can_trim(),
                       g.can_zero(), g.can_fast_zero(), g.can_df(), g.can_multi_conn(),
                       g.can_cache(), g.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)]
        expect_eq(ctx["info"][-1], True, "INFO can_meta_context base:allocation")
        g.clear_meta_contexts()
    R.check("opt_info %r: size, read-only, base:allocation" % export_name, c_info)

    def lmc(query, want):
        def c():
            g.set_export_name(export_name)
            g.clear_meta_contexts()
            if query is not None:
                g.add_meta_context(query)
            got = []
            n = g.opt_list_meta_context(lambda name: got.append(name) or 0)
            expect_eq(n, len(got), "return value vs callbacks")
            expect_eq(got, want, "contexts")
            g.clear_meta_contexts()
        R.check("opt_list_meta_context %s -> %r"
                % ("(no query)" if query is None else repr(query), want), c)

    lmc(None, ["base:allocation"])
    lmc("base:", ["base:allocation"])
    lmc("base:allocation", ["base:allocation"])
    lmc("base:nosuch", [])
    lmc("x-nosuch:", [])
    lmc("x-nosuch:thing", [])

    if nbdkit:
        # nbdkit differs: the memory plugin serves any export name, so an unknown
        # name cannot be tested against it; checked on the main path instead.
        R.skip("opt_info/opt_go unknown export in opt mode",
               "nbdkit memory accepts every export name")
    else:
        def c_info_unknown():
            g.set_export_name(UNKNOWN_EXPORT)
            expect_err(lambda: g.opt_info(), errno.ENOENT, "opt_info %r" % UNKNOWN_EXPORT,
                       SERVER_OPT_ERROR)
            expect_eq(g.aio_is_negotiating(), True, "still negotiating")
        R.check("opt_info unknown export -> ENOENT, still negotiating", c_info_unknown)

        def c_go_unknown():
            g.set_export_name(UNKNOWN_EXPORT)
            expect_err(lambda: g.opt_go(), errno.ENOENT, "opt_go %r" % UNKNOWN_EXPORT,
                       SERVER_OPT_ERROR)
            expect_eq(g.aio_is_negotiating(), True, "still negotiating")
        R.check("opt_go unknown export -> ENOENT, still negotiating", c_go_unknown)

    def c_go():
        expect(g.aio_is_negotiating(),
               "handle left negotiation already (did GO to %r succeed?)" % UNKNOWN_EXPORT)
        g.set_export_name(export_name)
        g.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        g.opt_go()
        expect_eq(g.aio_is_ready(), True, "ready")
        got = [g.get_size(), g.is_read_only(), g.can_flush(), g.can_fua(), g.can_trim(),
               g.can_zero(), g.can_fast_zero(), g.can_df(), g.can_multi_conn(),
               g.can_cache(), g.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)]
        if "info" in ctx:
            expect_eq(got, ctx["info"], "GO details vs the earlier INFO")
        expect_eq(got[-1], True, "can_meta_context")
        expect_eq(len(g.pread(4096, 0)), 4096, "read length")
        block_status(g, 4096, 0)
        disconnect(g)
    R.check("opt_go %s%r: same details as opt_info, base:allocation, reads work"
            % ("" if nbdkit else "after the failed GO, to ", export_name), c_go)

    def c_abort():
        a = connect(uri, opt=True)
        a.opt_abort()
        expect_eq(a.aio_is_closed(), True, "closed after opt_abort")
        expect_nbd_error(lambda: a.pread(512, 0), "pread after opt_abort")
    R.check("opt_abort -> connection closed, commands refused", c_abort)


def unknown_export_checks(R, uri, kind):
    bad = uri_with_export(uri, UNKNOWN_EXPORT)
    if kind == "nbdkit":
        # nbdkit differs: `nbdkit memory` serves the same disk under every name,
        # so GO to "no-such-export" succeeds there.
        def c():
            g = connect(bad)
            expect_eq(g.get_export_name(), UNKNOWN_EXPORT, "export name")
            g.shutdown()
        R.check("GO %r -> accepted (nbdkit memory serves any name)" % UNKNOWN_EXPORT, c)
        return

    def c_go():
        # (libnbd words the NBD_REP_ERR_UNKNOWN reply to GO as "server has no
        # export named ...")
        expect_err(lambda: connect(bad), errno.ENOENT, "connect (GO) to %r" % UNKNOWN_EXPORT,
                   "server has no export named")
    R.check("GO unknown export %r -> nbd.Error ENOENT" % UNKNOWN_EXPORT, c_go)

    def c_info():
        g = connect(uri, opt=True)
        g.set_export_name(UNKNOWN_EXPORT)
        expect_err(lambda: g.opt_info(), errno.ENOENT, "opt_info %r" % UNKNOWN_EXPORT,
                   SERVER_OPT_ERROR)
        g.opt_abort()
    R.check("INFO unknown export %r -> nbd.Error ENOENT" % UNKNOWN_EXPORT, c_info)

    def c_export_name():
        # EXPORT_NAME cannot carry an error: the server must close the connection.
        expect_nbd_error(lambda: connect(bad, hflags=0), "EXPORT_NAME %r" % UNKNOWN_EXPORT)
    R.check("EXPORT_NAME unknown export %r -> connection refused (nbd.Error)"
            % UNKNOWN_EXPORT, c_export_name)


def default_export_checks(R, uri, size, kind, export_name):
    """EXPECTED.md: "" selects the first export given on the command line."""
    if kind == "nbdkit" or export_name != "":
        return
    lst = []

    def c():
        g = connect(uri, opt=True)
        g.opt_list(lambda n, d: lst.append(n) or 0)
        g.opt_abort()
        expect(lst, "no exports listed")
        first = connect(uri_with_export(uri, lst[0]))
        dflt = connect(uri_with_export(uri, ""))
        expect_eq(first.get_size(), dflt.get_size(), "size of %r vs \"\"" % lst[0])
        d = rnd(4096)
        dflt.pwrite(d, OFF_DEFAULT)
        dflt.flush()
        expect_data(first.pread(4096, OFF_DEFAULT), d, "data written via \"\" read via %r"
                    % lst[0])
        close(first)
        close(dflt)
    R.check("export \"\" is the first listed export (same data)", c)


# --------------------------------------------------------------------------
# Multi-conn and aio

def multi_conn_checks(R, uri):
    ctx = {}

    def c_conn():
        ctx["a"] = connect(uri)
        ctx["b"] = connect(uri)
        expect_eq(ctx["a"].can_multi_conn(), True, "A can_multi_conn")
        expect_eq(ctx["b"].can_multi_conn(), True, "B can_multi_conn")
    if not R.check("multi-conn: two handles, both can_multi_conn", c_conn):
        return
    a, b = ctx["a"], ctx["b"]

    def c_flush():
        expect_data(b.pread(65536, OFF_MC), bytes(a.pread(65536, OFF_MC)), "before")
        d = rnd(65536)
        a.pwrite(d, OFF_MC)
        a.flush()
        expect_data(b.pread(65536, OFF_MC), d, "B after A's write + flush")
    R.check("multi-conn: A writes + flush, B sees the data", c_flush)

    def c_fua():
        d = rnd(65536)
        a.pwrite(d, OFF_MC + 65536, nbd.CMD_FLAG_FUA)
        expect_data(b.pread(65536, OFF_MC + 65536), d, "B after A's FUA write")
    R.check("multi-conn: A FUA write, B sees the data", c_fua)

    def c_zero():
        a.zero(65536, OFF_MC, nbd.CMD_FLAG_FUA)
        expect_zero(b.pread(65536, OFF_MC), "B after A's FUA zero")
        d = rnd(4096)
        b.pwrite(d, OFF_MC + 4096)
        b.flush()
        expect_data(a.pread(4096, OFF_MC + 4096), d, "A after B's write + flush")
    R.check("multi-conn: A FUA zero seen by B; B write + flush seen by A", c_zero)
    close(a)
    close(b)


def aio_wait(h, cookies):
    pending = set(cookies)
    errors = []
    while pending:
        for c in list(pending):
            try:
                if h.aio_command_completed(c):
                    pending.discard(c)
            except nbd.Error as e:
                pending.discard(c)
                errors.append((c, e))
        if pending:
            h.poll(-1)
    return errors


def aio_checks(R, uri, ro):
    N, SZ = 64, 64 * KiB
    ctx = {}

    def c_conn():
        ctx["h"] = connect(uri)
    if not R.check("aio: connect", c_conn):
        return
    h = ctx["h"]
    blocks = [rnd(SZ) for _ in range(N)]

    if not ro:
        def c_write():
            bufs = [nbd.Buffer.from_bytearray(bytearray(b)) for b in blocks]
            # all 64 are issued before any reply is read, so the server sees
            # them pipelined and may answer in any order
            cookies = [h.aio_pwrite(bufs[i], OFF_AIO + i * SZ) for i in range(N)]
            errs = aio_wait(h, cookies)
            expect(not errs, "aio_pwrite failures: %s"
                   % ", ".join("%d:%s" % (c, errname(e.errnum)) for c, e in errs[:5]))
            expect_eq(h.aio_in_flight(), 0, "in flight after completion")
        R.check("aio: 64 x 64 KiB writes in flight, all complete", c_write)
        want = blocks
    else:
        want = None

    def c_read():
        exp = want if want is not None else [bytes(h.pread(SZ, OFF_AIO + i * SZ))
                                             for i in range(N)]
        bufs = [nbd.Buffer(SZ) for _ in range(N)]
        cookies = [h.aio_pread(bufs[i], OFF_AIO + i * SZ) for i in range(N)]
        errs = aio_wait(h, cookies)
        expect(not errs, "aio_pread failures: %s"
               % ", ".join("%d:%s" % (c, errname(e.errnum)) for c, e in errs[:5]))
        for i in range(N):
            expect_data(bufs[i].to_bytearray(), exp[i], "block %d" % i)
    R.check("aio: 64 x 64 KiB reads in flight, all verified", c_read)

    def c_mixed():
        # Reads, writes and a flush interleaved: out-of-order replies are fine,
        # but every read must return what its own block holds.
        cookies = []
        bufs = []
        for i in range(N):
            if not ro and i % 2 == 0:
                nb = rnd(SZ)
                blocks[i] = nb
                b = nbd.Buffer.from_bytearray(bytearray(nb))
                bufs.append(b)
                cookies.append(h.aio_pwrite(b, OFF_AIO + i * SZ))
        errs = aio_wait(h, cookies)
        expect(not errs, "writes failed")
        cookies = [h.aio_flush()]
        rb = [nbd.Buffer(SZ) for _ in range(N)]
        cookies += [h.aio_pread(rb[i], OFF_AIO + i * SZ) for i in range(N)]
        errs = aio_wait(h, cookies)
        expect(not errs, "aio flush/read failures: %s"
               % ", ".join("%d:%s" % (c, errname(e.errnum)) for c, e in errs[:5]))
        for i in range(N):
            exp = blocks[i] if not ro else bytes(h.pread(SZ, OFF_AIO + i * SZ))
            expect_data(rb[i].to_bytearray(), exp, "block %d" % i)
    R.check("aio: %sflush + 64 reads in flight, verified" % ("" if ro else "32 rewrites, "),
            c_mixed)
    close(h)


if __name__ == "__main__":
    sys.exit(main())
