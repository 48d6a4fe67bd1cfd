#!/usr/bin/python3
"""libnbd (python3-libnbd 1.14) conformance script for nbd-rs.

Usage:
    /usr/bin/python3 tests/clients/conformance.py URI [--read-only]
                     [--kind memory|file|sharded|nbdkit] [--chunk-size BYTES]
                     [--whole-objects] [--cached [--cache-block-size BYTES]]
                     [--size BYTES] [--timeout S]

Run it with Debian's /usr/bin/python3: the pyenv python3 on PATH has no `nbd`
module (the PyPI package called `nbd` is unrelated).

The script drives the server at URI through everything libnbd 1.14 can send and
checks the exact answers against tests/clients/EXPECTED.md. It prints one line
per check, `OK name` or `FAIL name: detail` (plus `SKIP name: reason` for checks
that cannot run against this export), and exits 0 only if every check passed.

--kind says what serves URI:
  memory  nbd-rs memory export (sparse, 32 KiB pages; holes are reported)
  file    nbd-rs file export (raw image; hole reporting depends on the fs)
  sharded nbd-rs sharded export (`-e NAME sharded memory:SIZE` or `file:DIR/?size=`):
          chunks of --chunk-size bytes (default 4194304, the server's default);
          a chunk never written, trimmed/zeroed whole, or written whole with
          zeroes, is absent: HOLE chunks, block status hole,zero (3); a present
          chunk is data (0) over its whole extent; partial writes (even of
          zeroes) make a chunk present and partial trims/zeroes keep it present
          (a store with partial writes; see --whole-objects); FAST_ZERO is
          refused (ENOTSUP, nothing changed) when it would have to zero part of
          a present chunk. The script needs chunks of at most 4 MiB (see the
          layout below).
  nbdkit  `nbdkit memory SIZE` (or `nbdkit -r memory SIZE`), the reference server
          used to validate this script. The few places where nbdkit differs from
          EXPECTED.md are marked "nbdkit differs" below; with --kind memory, file
          or sharded the script asserts EXPECTED.md exactly.
--whole-objects: with --kind sharded: the store below the sharded layout has
  no partial writes (S3: `-e NAME sharded s3:URL?size=`), so every partial
  change rewrites the whole chunk, and a partial write, trim or zero that
  leaves its chunk all zeroes deletes it (absent: HOLE, block status 3) instead
  of keeping it present; e.g. a 512 B write of zeroes into an absent chunk
  leaves it absent, and zeroing the only data in a present chunk makes it
  absent. Partial changes that leave data in the chunk keep it present, and
  FAST_ZERO is refused exactly as without the flag (it is decided before the
  change, on presence alone). Everything else as --kind sharded.
--cached: a write-back `cache` block layer sits above the export's layout
  (`-e NAME DRIVER cache:STORAGE`); EXPECTED.md, "Cached exports". Only these
  expectations are relaxed, everything else is checked as without the flag:
  - structured reads may send DATA chunks (whose bytes must still be zero)
    where the layout alone sends HOLE chunks;
  - block status may report data (0) where the layout reports hole,zero (3)
    (a block the cache holds dirty, until it is uploaded); never 3 where the
    layout reports data. The extents must still describe exactly the request
    (REQ_ONE: one extent of at most the request), and each one must end at the
    end of the request, at a boundary of the layout's extents or at a multiple
    of the cache block size (--cache-block-size, default 4194304, the cache's
    default `block_size`). Every such answer is then asked again after a FLUSH
    (which uploads the dirty blocks) and must be the layout's exact answer;
  - FAST_ZERO over part of a present chunk (sharded) may succeed: then the
    range reads as zeroes and the bytes around it are unchanged (and block
    status is as after a plain zero of the range); if it fails it must be
    ENOTSUP with nothing changed.
  Not with --kind nbdkit.
--read-only: the export is read-only: no data is written; write/trim/zero must
  fail with EPERM.
--size: optional; if given, the export size must equal it.
--chunk-size: with --kind sharded, the export's chunk size: a power of two from
  4096 to 4194304. It must match the server's (`chunk_size`, default 4 MiB).

Layout of the first 64 MiB (the export must be at least 64 MiB). The script
writes only inside [0, 60 MiB) and, if the export is >= 2 GiB, inside
[1 GiB - 4 KiB, 2 GiB + 4 KiB). [60 MiB, 64 MiB) is never written, so on a
memory or sharded export it stays a hole (also across re-runs against the same
server).

The checks that depend on the allocation granularity (32 KiB pages on memory,
chunks on sharded; called G below) place their data at multiples of G: the
page/chunk-edge round trips use [0, 15 G), the structured-read check
[align(5 MiB, G), +4 G), the block status checks [4 MiB, 4 MiB + 14 G) (on
sharded, the chunk checks use [4 MiB + 2 G, 4 MiB + 8 G) of it), all inside
[0, 60 MiB) for G <= 4 MiB. Each of them first trims or writes what it
later looks at, so they may share space with the other checks.
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
DEFAULT_CHUNK = 4 * MiB         # nbd-rs sharded default chunk size
DEFAULT_CACHE_BLOCK = 4 * MiB   # nbd-rs cache default block_size (src/block/cache.rs)
MAX_SCRIPT_CHUNK = 4 * MiB      # the layout keeps [60 MiB, 64 MiB) whole chunks
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


def expect_cached_extents(got, layout, offset, count, cache_block, req_one, what,
                          over=False):
    """--cached, before a FLUSH (EXPECTED.md, cached exports): `got` is the
    block status a cache layer sent for [offset, offset+count); `layout` is the
    layout's own complete answer over the same range, [(length, flags)], with
    flags None where the script does not know them. A cache may report data (0)
    where the layout reports anything (a block it holds dirty), nothing else:
    an extent with other flags (hole,zero: 3) must have exactly those flags in
    the layout over all of it (3 over data fails). Without REQ_ONE the extents
    describe exactly the request; with it, one extent of at most the request.
    Each extent ends at the end of the request, at an extent boundary of the
    layout or at a multiple of the cache block size. over: the layout may
    describe more than the request (memory), so the extents may too (flags
    unknown past the request)."""
    expect_eq(sum(ln for (ln, _) in layout), count, "%s: (script) layout coverage" % what)
    if req_one:
        expect(len(got) == 1 and got[0][0] <= count,
               "%s: REQ_ONE: got %r, expected one extent of at most %d bytes"
               % (what, got, count))
    elif over:
        expect(sum(ln for (ln, _) in got) >= count,
               "%s: extents %r describe %d bytes < request %d"
               % (what, got, sum(ln for (ln, _) in got), count))
    else:
        expect(sum(ln for (ln, _) in got) == count,
               "%s: extents %r describe %d bytes, the request %d"
               % (what, got, sum(ln for (ln, _) in got), count))
    pieces = []                 # (start, end, flags) of the layout
    pos = offset
    for (ln, fl) in layout:
        pieces.append((pos, pos + ln, fl))
        pos += ln
    bounds = {e for (_, e, _) in pieces}
    pos = offset
    for (ln, fl) in got:
        end = pos + ln
        if fl != 0:
            under = [(a, b, lf) for (a, b, lf) in pieces
                     if a < end and b > pos and lf not in (None, fl)]
            expect(not under, "%s: extents %r: flags %d over [%d, %d), where the layout "
                   "has (offset, length, flags) %r (a cache may only report data (0) instead "
                   "of the layout's flags; layout %r)"
                   % (what, got, fl, pos, end, [(a, b - a, lf) for (a, b, lf) in under],
                      layout))
        expect(end == offset + count or end in bounds or end % cache_block == 0
               or (over and end > offset + count),
               "%s: extents %r: a boundary at %d, neither a layout boundary (layout %r) "
               "nor a multiple of the cache block size %d"
               % (what, got, end, layout, cache_block))
        pos = end


def rnd(n):
    return RNG.randbytes(n)


RNG = random.Random()


# --------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("uri")
    ap.add_argument("--read-only", action="store_true")
    ap.add_argument("--kind", choices=("memory", "file", "sharded", "nbdkit"), default="memory")
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK,
                    help="with --kind sharded: the export's chunk size (default %d)"
                    % DEFAULT_CHUNK)
    ap.add_argument("--whole-objects", action="store_true",
                    help="with --kind sharded: the store has no partial writes (S3): a "
                    "partial write/trim/zero that leaves its chunk all zeroes deletes it")
    ap.add_argument("--cached", action="store_true",
                    help="a cache block layer sits above the layout: structured reads may "
                    "send DATA chunks of zeroes where the layout sends HOLE, block status "
                    "may report data (0) where the layout reports hole,zero (3) until a "
                    "FLUSH, FAST_ZERO over part of a present chunk may succeed")
    ap.add_argument("--cache-block-size", type=int, default=DEFAULT_CACHE_BLOCK,
                    help="with --cached: the cache's block_size (default %d, the server's "
                    "default)" % DEFAULT_CACHE_BLOCK)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds per check before giving up (default 120)")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    cs = args.chunk_size
    if cs & (cs - 1) or not 4096 <= cs <= MAX_SCRIPT_CHUNK:
        ap.error("--chunk-size %d: must be a power of two from 4096 to %d (the script's "
                 "64 MiB layout needs [60 MiB, 64 MiB) to be whole chunks)"
                 % (cs, MAX_SCRIPT_CHUNK))
    if args.whole_objects and args.kind != "sharded":
        ap.error("--whole-objects describes the store below a sharded export: "
                 "it needs --kind sharded")
    if args.cached and args.kind == "nbdkit":
        ap.error("--cached describes an nbd-rs cache layer: not with --kind nbdkit")
    if args.cached and args.kind == "sharded":
        # The cache uploads whole blocks, and a block of zeroes as WRITE_ZEROES, which deletes
        # the chunk: over any store, a cached sharded export has whole-object semantics.
        args.whole_objects = True
    cb = args.cache_block_size
    if cb != DEFAULT_CACHE_BLOCK and not args.cached:
        ap.error("--cache-block-size describes a cache layer: it needs --cached")
    if cb & (cb - 1) or not 4096 <= cb <= 32 * MiB:
        ap.error("--cache-block-size %d: must be a power of two from 4096 to %d"
                 % (cb, 32 * MiB))

    seed = args.seed if args.seed is not None else int(time.time())
    RNG.seed(seed)
    print("# libnbd %s, uri %s, kind %s%s%s%s, %s, seed %d"
          % (nbd.NBD().get_version(), args.uri, args.kind,
             " (chunk size %d)" % cs if args.kind == "sharded" else "",
             ", whole objects" if args.whole_objects else "",
             ", cached" if args.cached else "",
             "read-only" if args.read_only else "read-write", seed), flush=True)

    R = Runner(args.timeout)
    ro = args.read_only
    kind = args.kind
    nbdkit = kind == "nbdkit"
    # the allocation granularity: memory pages, or sharded chunks
    gran = cs if kind == "sharded" else PAGE
    # --cached: the cache block size (the granularity of its block status), else None
    cached = args.cache_block_size if args.cached else None
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
        data_checks(R, h, size, kind, alive, gran, cached)
    else:
        ro_data_checks(R, h, size, kind)

    structured_checks(R, h, size, kind, ro, gran, cached)
    block_status_checks(R, h, size, kind, ro, gran, cached)
    if kind == "sharded" and not ro:
        sharded_checks(R, h, gran, args.whole_objects, cached)

    if not ro:
        big_ops_checks(R, h, size, kind, cached)

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

def human(n):
    """1048576 -> "1 MiB", 4096 -> "4 KiB", 100 -> "100 B"."""
    for (unit, name) in ((MiB, "MiB"), (KiB, "KiB")):
        if n >= unit and n % unit == 0:
            return "%d %s" % (n // unit, name)
    return "%d B" % n


def granule_name(kind, gran):
    """"32 KiB page" / "4 MiB chunk": the allocation unit, for check labels."""
    return "%s %s" % (human(gran), "chunk" if kind == "sharded" else "page")


def sharded_fast_zero_refused(gran, offset, length):
    """Whether FAST_ZERO of [offset, offset+length) on a sharded export must be
    refused, given that every chunk the range touches is present (the callers
    zero inside data they just wrote): it is refused when it would have to zero
    part of a chunk rather than delete whole chunks (the export size is a
    multiple of the chunk size for every chunk the script touches)."""
    return offset % gran != 0 or (offset + length) % gran != 0


def fast_zero_either(h, length, offset, flags, region, before, what):
    """--cached: FAST_ZERO of [offset, offset+length) over part of a present
    chunk (EXPECTED.md, cached exports): it may succeed (the cache holds the
    block), and then the range reads as zeros and the rest of [region,
    region+len(before)) (which held `before`) is unchanged; or it fails with
    ENOTSUP (from the server) and nothing changed. Any other answer fails.
    Returns True if it succeeded."""
    n = len(before)
    a, b = offset - region, offset - region + length
    assert 0 <= a < b <= n
    try:
        h.zero(length, offset, flags)
    except nbd.Error as e:
        if e.errnum != errno.ENOTSUP or SERVER_CMD_ERROR not in (e.string or ""):
            fail("%s: got %s %r, expected success (cached) or ENOTSUP from the server"
                 % (what, errname(e.errnum), e.string))
        expect_data(h.pread(n, region), before, "data after the refused " + what)
        return False
    got = bytes(h.pread(n, region))
    expect_data(got[:a], before[:a], "bytes before the range after the successful " + what)
    expect_zero(got[a:b], "range after the successful " + what)
    expect_data(got[b:], before[b:], "bytes after the range after the successful " + what)
    return True


def data_checks(R, h, size, kind, alive, gran, cached):
    G = gran
    unit = granule_name(kind, G)

    for (n, off, label) in [(512, OFF_SMALL, "512 B @0"),
                            (4096, OFF_SMALL + 4096, "4 KiB @4096"),
                            (65536, OFF_SMALL + 65536, "64 KiB @64K"),
                            (1000, OFF_SMALL + 200001, "1000 B @200001 (unaligned)"),
                            (200, OFF_SMALL + 6 * G - 100, "200 B across a %s edge" % unit),
                            (3 * G + 77, OFF_SMALL + 8 * G + 5,
                             "%d B @%d (4 %ss, unaligned)"
                             % (3 * G + 77, OFF_SMALL + 8 * G + 5, unit.split()[-1])),
                            (MiB, OFF_1M, "1 MiB @1M"),
                            (32 * MiB, OFF_32M, "32 MiB @8M (max payload)")]:
        def c(n=n, off=off):
            d = rnd(n)
            h.pwrite(d, off)
            expect_data(h.pread(n, off), d)
        R.check("pwrite/pread round trip %s" % label, c)

    def c_partial():
        # (the patch straddles the edge between the first two pages/chunks)
        base = rnd(3 * G)
        off = OFF_SMALL + 12 * G
        h.pwrite(base, off)
        patch = rnd(333)
        h.pwrite(patch, off + G - 111)
        want = base[:G - 111] + patch + base[G - 111 + 333:]
        expect_data(h.pread(3 * G, off), want)
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
    R.check("trim 64 KiB (%s aligned), then reads zeros"
            % ("64 KiB" if kind == "sharded" else "page"), c_trim)

    def zero_check(flags, label):
        s = next_slot()
        before = rnd(128 * KiB)
        fast = bool(flags & nbd.CMD_FLAG_FAST_ZERO)
        # EXPECTED.md: FAST_ZERO on memory is OK. A file export may answer ENOTSUP.
        # On sharded it is refused exactly when part of a (present) chunk would
        # have to be zeroed; --cached: then either refused or done (see
        # fast_zero_either).
        fast_may_fail = fast and kind == "file"
        fast_must_fail = (fast and kind == "sharded"
                          and sharded_fast_zero_refused(G, s + 16 * KiB, 65536))
        fast_either = fast_must_fail and cached
        fast_must_fail = fast_must_fail and not cached

        def c():
            h.pwrite(before, s)
            if fast_either:
                fast_zero_either(h, 65536, s + 16 * KiB, flags, s, before,
                                 "FAST_ZERO over part of a written %s" % unit)
                return
            if fast_must_fail:
                expect_err(lambda: h.zero(65536, s + 16 * KiB, flags), errno.ENOTSUP,
                           "FAST_ZERO over part of a written %s" % unit)
                expect_data(h.pread(128 * KiB, s), before, "data after refused FAST_ZERO")
                return
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
        if fast_either:
            R.check("zero %s 64 KiB over part of a written %s -> ENOTSUP, data unchanged, "
                    "or (cached) OK, zeros, neighbours intact" % (label, unit), c)
        elif fast_must_fail:
            R.check("zero %s 64 KiB over part of a written %s -> ENOTSUP, data unchanged"
                    % (label, unit), c)
        else:
            R.check("zero %s 64 KiB (%s), reads zeros, neighbours intact"
                    % (label, "inside written data" if kind == "sharded"
                       else "straddling pages"), c)

    zero_check(0, "plain")
    zero_check(nbd.CMD_FLAG_NO_HOLE, "NO_HOLE")
    zero_check(nbd.CMD_FLAG_FAST_ZERO, "FAST_ZERO")
    zero_check(nbd.CMD_FLAG_FUA, "FUA")
    zero_check(nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA,
               "NO_HOLE|FAST_ZERO|FUA")

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

def align_up(x, unit):
    return (x + unit - 1) // unit * unit


def chunk_list(chunks):
    return sorted((o, n, st) for (o, n, st, _) in chunks)


def expect_hole_types(types, cached, what):
    """`types`: the chunk types a structured read sent over an area the layout
    sends as HOLE chunks. Without --cached they must be HOLE only; with it the
    cache layer may send DATA instead, for all or part of the area (the caller
    checks that the bytes are zero either way)."""
    allowed = {nbd.READ_HOLE, nbd.READ_DATA} if cached else {nbd.READ_HOLE}
    expect(types and types <= allowed, "%s: %r, expected %s" % (
        what, sorted(types), "HOLE and/or DATA (cached)" if cached else "HOLE only"))


def structured_checks(R, h, size, kind, ro, gran, cached):
    G = gran
    sharded = kind == "sharded"
    # [OFF_HOLE, +4 MiB) is never written: zeros on every export without a backing image
    zero_hole = kind in ("memory", "nbdkit", "sharded")

    # Never-written area: HOLE chunks on an nbd-rs memory export, one HOLE chunk
    # (absent chunks) on a sharded one (--cached: HOLE and/or DATA chunks of zeros).
    def c_hole():
        data, chunks = structured_read(h, 65536, OFF_HOLE)
        check_chunks_cover(chunks, 65536, OFF_HOLE)
        if zero_hole:
            expect_zero(data, "never-written area")
        types = {st for (_, _, st, _) in chunks}
        if kind == "memory" or (sharded and cached):
            expect_hole_types(types, cached, "never-written area arrived as %r, types"
                              % chunk_list(chunks))
        elif sharded:
            expect_eq(chunk_list(chunks), [(OFF_HOLE, 65536, nbd.READ_HOLE)],
                      "chunks of a never-written (absent) sharded chunk")
        elif kind == "nbdkit":
            # nbdkit differs: its memory plugin answers an unwritten area with a
            # DATA chunk of zeros, not a HOLE chunk.
            expect(types == {nbd.READ_DATA},
                   "nbdkit: expected DATA chunks, got %r" % chunk_list(chunks))
    R.check("pread_structured of a never-written area: %s" % (
        "zeros, HOLE and/or DATA chunk(s) (cached)" if cached and kind != "file" else {
            "memory": "HOLE chunk(s)", "nbdkit": "DATA chunk (nbdkit)",
            "sharded": "one HOLE chunk (absent chunk)",
            "file": "chunks cover the range"}[kind]), c_hole)

    def c_hole_df():
        data, chunks = structured_read(h, 65536, OFF_HOLE, nbd.CMD_FLAG_DF)
        expect(len(chunks) == 1, "DF: got %d chunks, expected 1" % len(chunks))
        check_chunks_cover(chunks, 65536, OFF_HOLE)
        if zero_hole:
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

    # Page (chunk) 0 of the region written, page 1 trimmed (a hole on memory,
    # an absent chunk on sharded).
    off = align_up(OFF_SR, G)
    unit = granule_name(kind, G).split()[-1]

    def c_mixed():
        h.trim(4 * G, off)
        d = rnd(G)
        h.pwrite(d, off)
        data, chunks = structured_read(h, 2 * G, off)
        check_chunks_cover(chunks, 2 * G, off)
        expect_data(data, d + bytes(G))
        for (o, n, st, sub) in chunks:
            want = (d + bytes(G))[o - off:o - off + n]
            expect_data(sub, want, "chunk at %d (type %d)" % (o, st))
        expect_eq(chunk_types_in(chunks, off, off + G), {nbd.READ_DATA},
                  "chunk types over the written %s" % unit)
        if kind in ("memory", "sharded"):
            expect_hole_types(chunk_types_in(chunks, off + G, off + 2 * G), cached,
                              "chunk types over the trimmed %s" % unit)
        holes = [(o, n) for (o, n, st) in chunk_list(chunks) if st == nbd.READ_HOLE]
        if sharded and not cached:
            expect_eq(holes, [(off + G, G)], "HOLE chunks (one, over the absent chunk)")
        elif sharded:
            # (a cache may split the hole or send part of it as DATA; never over data)
            expect(all(off + G <= o and o + n <= off + 2 * G for (o, n) in holes),
                   "HOLE chunks %r outside the absent chunk [%d, +%d)" % (holes, off + G, G))
    R.check("pread_structured data %s + trimmed %s: %s" % (
        unit, unit,
        ("DATA then HOLE" + (" or DATA of zeros (cached)" if cached else ""))
        if kind in ("memory", "sharded") else "DATA over the data"),
        c_mixed)

    def c_mixed_df():
        d = bytes(h.pread(G, off))
        data, chunks = structured_read(h, 2 * G, off, nbd.CMD_FLAG_DF)
        expect(len(chunks) == 1, "DF: got %d chunks %r, expected 1"
               % (len(chunks), [(o, n, st) for (o, n, st, _) in chunks]))
        check_chunks_cover(chunks, 2 * G, off)
        expect_eq(chunks[0][2], nbd.READ_DATA, "DF chunk type over data + hole")
        expect_data(data, d + bytes(G))
    R.check("pread_structured DF over data + hole: one DATA chunk", c_mixed_df)


def expect_extents(h, count, offset, layout, what, cached, flags=0):
    """Block status of [offset, offset+count) (flags: 0 or REQ_ONE) must be the
    layout's exact answer `layout`, the complete [(length, flags)] over the
    request (with REQ_ONE: its first extent). cached (None, or the cache block
    size): first the answer must pass expect_cached_extents (dirty blocks may
    be reported as data); then, after a FLUSH (which uploads every dirty
    block), it must be the layout's exact answer again."""
    req_one = bool(flags & nbd.CMD_FLAG_REQ_ONE)
    want = layout[:1] if req_one else layout
    got = block_status(h, count, offset, flags)
    if not cached:
        expect_eq(got, want, what)
        return
    expect_cached_extents(got, layout, offset, count, cached, req_one,
                          what + " (cached, before FLUSH)")
    h.flush()
    expect_eq(block_status(h, count, offset, flags), want, what + " (after a FLUSH)")


def paged_status(h, count, offset, data, cached, what, flags=0):
    """Memory (and nbdkit) block status, whose exact extents the script does not
    pin down past the data: returns the extents to check against the layout's
    rules. cached: first checks the answer before a FLUSH as a cache may send it
    (data (0) where the layout reports data, the bytes of `data` (a list of
    (offset, length)); anything else may be hole,zero (3) or data (0);
    boundaries on 32 KiB pages), then FLUSHes and returns the answer after it,
    which must follow the layout's rules."""
    ext = block_status(h, count, offset, flags)
    if not cached:
        return ext
    layout = []
    pos = offset
    for (o, n) in sorted(data):
        if o > pos:
            layout.append((o - pos, None))
        layout.append((n, 0))
        pos = o + n
    if pos < offset + count:
        layout.append((offset + count - pos, None))
    expect_cached_extents(ext, layout, offset, count, PAGE,
                          bool(flags & nbd.CMD_FLAG_REQ_ONE),
                          what + " (cached, before FLUSH)", over=True)
    expect(all(fl in (0, 3) for (_, fl) in ext),
           "%s (cached, before FLUSH): extents %r: flags other than data (0) or "
           "hole,zero (3)" % (what, ext))
    h.flush()
    return block_status(h, count, offset, flags)


def block_status_checks(R, h, size, kind, ro, gran, cached):
    G = gran
    memory_like = kind in ("memory", "nbdkit")
    sharded = kind == "sharded"
    paged = memory_like or sharded      # exact page/chunk expectations
    unit = granule_name(kind, G).split()[-1]

    def exact(count, offset, layout, what, flags=0):
        expect_extents(h, count, offset, layout, what, cached, flags)

    if memory_like:
        def c_hole():
            ext = paged_status(h, MiB, OFF_HOLE, [], cached, "never-written area")
            expect(all(fl == 3 for (_, fl) in ext),
                   "never-written area: extents %r, expected all hole,zero (3)" % ext)
            total = sum(ln for (ln, _) in ext)
            expect(total >= MiB, "extents cover %d bytes < request %d" % (total, MiB))
            expect(OFF_HOLE + total <= size, "extents run past the end of the export")
        R.check("block_status never-written 1 MiB: hole,zero (3)", c_hole)

        def c_hole_one():
            ext = paged_status(h, MiB, OFF_HOLE, [], cached, "never-written area, REQ_ONE",
                               nbd.CMD_FLAG_REQ_ONE)
            expect_eq(ext[0][1], 3, "REQ_ONE extent flags")
        R.check("block_status REQ_ONE never-written: one extent, flags 3", c_hole_one)
    elif sharded:
        # absent chunks: one hole,zero extent, exactly the request
        def c_hole():
            exact(MiB, OFF_HOLE, [(MiB, 3)], "extents")
        R.check("block_status never-written 1 MiB: [(%d, 3)] (absent chunks)" % MiB, c_hole)

        def c_hole_one():
            exact(MiB, OFF_HOLE, [(MiB, 3)], "REQ_ONE extents", nbd.CMD_FLAG_REQ_ONE)
        R.check("block_status REQ_ONE never-written: [(%d, 3)]" % MiB, c_hole_one)

    def c_end():
        ext = block_status(h, 65536, size - 65536)
        total = sum(ln for (ln, _) in ext)
        expect(total <= 65536, "extents %r run past the end of the export" % ext)
        if sharded:
            # (a sharded export describes exactly the request, chunk by chunk)
            expect_eq(total, 65536, "extents %r: bytes described" % ext)
            expect(all(fl in (0, 3) for (_, fl) in ext),
                   "extents %r: flags other than data (0) or hole,zero (3)" % ext)
    R.check("block_status of the last 64 KiB stays inside the export%s"
            % (", describes all of it" if sharded else ""), c_end)

    if ro:
        return

    # sharded: at least two chunks, so that one stays absent
    span = max(MiB, 2 * G) if sharded else MiB

    def c_data():
        h.trim(span, OFF_BS)
        h.pwrite(rnd(4096), OFF_BS)
        if memory_like:
            # 32 KiB pages: the page holding the data is one data extent.
            ext = paged_status(h, span, OFF_BS, [(OFF_BS, PAGE)], cached, "extents")
            expect_eq(ext[0], (PAGE, 0), "first extent")
            rest = ext[1:]
            expect(rest and all(fl == 3 for (_, fl) in rest),
                   "extents after the data page: %r, expected hole,zero (3)" % rest)
            total = sum(ln for (ln, _) in ext)
            expect(total >= MiB, "extents cover %d bytes < request %d" % (total, MiB))
        elif sharded:
            # the chunk holding the data is data over its whole extent; the rest,
            # trimmed whole, is absent
            exact(span, OFF_BS, [(G, 0), (span - G, 3)], "extents")
        else:
            ext = block_status(h, span, OFF_BS)
            expect_eq(ext[0][1], 0, "flags of the data extent")
            expect(ext[0][0] >= 4096, "data extent %r shorter than the write" % (ext[0],))
    R.check("block_status %s after a 4 KiB write: %s" % (human(span), (
        "[32768 data(0), rest hole,zero(3)]" if memory_like
        else "[(%d, 0), (%d, 3)]" % (G, span - G) if sharded
        else "data extent flags 0")), c_data)

    def c_data_one():
        if paged:
            exact(4096, OFF_BS, [(4096, 0)], "REQ_ONE extents", nbd.CMD_FLAG_REQ_ONE)
        else:
            ext = block_status(h, 4096, OFF_BS, nbd.CMD_FLAG_REQ_ONE)
            expect_eq(ext, [(4096, 0)], "REQ_ONE extents")
    R.check("block_status REQ_ONE 4 KiB over data: [(4096, 0)]", c_data_one)

    def c_data_one_big():
        if paged:
            # (the data page / chunk, then [OFF_BS + G, OFF_BS + span) trimmed)
            exact(span, OFF_BS, [(G, 0), (span - G, 3)], "REQ_ONE extents",
                  nbd.CMD_FLAG_REQ_ONE)
        else:
            ext = block_status(h, span, OFF_BS, nbd.CMD_FLAG_REQ_ONE)
            expect_eq(ext[0][1], 0, "REQ_ONE extent flags")
    R.check("block_status REQ_ONE %s over data %s: %s" % (
        human(span), unit, "[(%d, 0)]" % G if paged else "one data extent"), c_data_one_big)

    if paged:
        for (label, op) in [("zero", lambda o: h.zero(2 * G, o)),
                            ("trim", lambda o: h.trim(2 * G, o))]:
            def c(op=op, label=label):
                o = OFF_BS + 8 * G
                h.pwrite(rnd(2 * G), o)
                exact(2 * G, o, [(2 * G, 0)], "extents after write", nbd.CMD_FLAG_REQ_ONE)
                op(o)
                if sharded:
                    exact(2 * G, o, [(2 * G, 3)], "extents after %s (chunks deleted)" % label)
                else:
                    ext = paged_status(h, 2 * G, o, [], cached, "extents after " + label)
                    expect(all(fl == 3 for (_, fl) in ext),
                           "extents after %s: %r, expected hole,zero (3)" % (label, ext))
                    expect(sum(ln for (ln, _) in ext) >= 2 * G, "extents too short: %r" % ext)
                expect_zero(h.pread(2 * G, o), "after " + label)
            R.check("block_status after %s of 2 written %ss: hole,zero (3)" % (label, unit), c)

        def c_nohole():
            o = OFF_BS + 12 * G
            h.pwrite(rnd(2 * G), o)
            h.zero(2 * G, o, nbd.CMD_FLAG_NO_HOLE)
            if sharded:
                # NO_HOLE is ignored: chunks covered whole are deleted
                exact(2 * G, o, [(2 * G, 3)], "extents after zero NO_HOLE of 2 whole chunks")
            else:
                ext = paged_status(h, 2 * G, o, [], cached, "extents after zero NO_HOLE")
                expect(all(fl & nbd.STATE_ZERO for (_, fl) in ext),
                       "extents after zero NO_HOLE: %r, expected the ZERO bit" % ext)
            expect_zero(h.pread(2 * G, o), "after zero NO_HOLE")
        R.check("block_status after zero NO_HOLE: %s" % (
            "[(%d, 3)] (whole chunks deleted)" % (2 * G) if sharded else "ZERO bit set"),
            c_nohole)


def merged(ext):
    """Extents with neighbours of the same flags merged (a sharded export sends
    them merged): [(G, 3), (G, 3)] -> [(2 G, 3)]."""
    out = []
    for (ln, fl) in ext:
        if out and out[-1][1] == fl:
            out[-1] = (out[-1][0] + ln, fl)
        else:
            out.append((ln, fl))
    return out


def sharded_checks(R, h, G, whole_objects, cached):
    """Chunk semantics of a sharded export, in the chunks [X, X + 6 G) with
    X = OFF_BS + 2 G (left alone by the block status checks). Every check first
    trims its chunks whole, which makes them absent.

    whole_objects: the store has no partial writes, so a partial write, trim or
    zero that leaves its chunk all zeroes deletes it (with partial writes the
    chunk stays present). cached (None, or the cache block size): a cache layer
    may send DATA chunks of zeros where the layout sends HOLE, block status may
    report data (0) where the layout reports hole,zero (3) until a FLUSH (after
    it, the layout's exact answer), and FAST_ZERO over part of a present chunk
    may succeed (EXPECTED.md, cached exports)."""
    X = OFF_BS + 2 * G
    H, D = nbd.READ_HOLE, nbd.READ_DATA
    # The extents / chunk types of a chunk that a partial change left all zeroes.
    Z_EXT = 3 if whole_objects else 0
    Z = H if whole_objects else D
    z_word = "absent" if whole_objects else "present"

    def ext_is(count, offset, layout, what, flags=0):
        expect_extents(h, count, offset, layout, what, cached, flags)

    def reset(n):
        h.trim(n * G, X)
        ext_is(n * G, X, [(n * G, 3)],
               "extents after trimming %d whole chunks" % n)

    def chunk_map(want, what):
        """Structured read of len(want) chunks at X: chunk i must arrive as
        chunks of type want[i] only (HOLE chunks zero), agreeing with pread; a
        chunk wanted as HOLE (absent) reads as zeros. With a cache layer, an
        absent chunk may arrive as DATA (of zeros) too."""
        n = len(want)
        ref = bytes(h.pread(n * G, X))
        data, chunks = structured_read(h, n * G, X)
        check_chunks_cover(chunks, n * G, X)
        expect_data(data, ref, "%s: structured read vs pread" % what)
        for (o, ln, st, sub) in chunks:
            if st == H:
                expect_zero(sub, "%s: HOLE chunk at %d" % (what, o))
        for i in range(n):
            if want[i] == H:
                expect_zero(ref[i * G:(i + 1) * G], "%s: absent chunk %d" % (what, i))
        got = [chunk_types_in(chunks, X + i * G, X + (i + 1) * G) for i in range(n)]
        if not cached:
            expect_eq(got, [{t} for t in want], "%s: chunk types per sharded chunk" % what)
            return
        for i in range(n):
            if want[i] == H:
                expect_hole_types(got[i], True, "%s: chunk types of absent chunk %d"
                                  % (what, i))
            else:
                expect_eq(got[i], {want[i]}, "%s: chunk types of present chunk %d"
                          % (what, i))

    def c_zero_write():
        reset(3)
        h.pwrite(bytes(512), X + G + 1000)
        ext_is(3 * G, X, merged([(G, 3), (G, Z_EXT), (G, 3)]),
               "extents")
        expect_zero(h.pread(3 * G, X), "after writing zeroes")
        chunk_map([H, Z, H], "after writing zeroes")
    if whole_objects:
        R.check("sharded (whole objects): a 512 B write of zeroes into an absent chunk "
                "leaves it absent: [(3G, 3)], HOLE", c_zero_write)
    else:
        R.check("sharded: a 512 B write of zeroes makes its chunk present: "
                "[(G, 3), (G, 0), (G, 3)], DATA over it, HOLE around", c_zero_write)

    def c_whole_zero_write():
        # A whole chunk of zeroes written as data is a deleted chunk, on every store.
        reset(3)
        d = rnd(3 * G)
        h.pwrite(d, X)
        h.pwrite(bytes(G), X + G)
        want = d[:G] + bytes(G) + d[2 * G:]
        expect_data(h.pread(3 * G, X), want, "after writing chunk 1 whole with zeroes")
        ext_is(3 * G, X, [(G, 0), (G, 3), (G, 0)],
               "extents after writing chunk 1 whole with zeroes")
        chunk_map([D, H, D], "after writing chunk 1 whole with zeroes")
        # again (FUA), onto the now absent chunk: it stays absent
        h.pwrite(bytes(G), X + G, nbd.CMD_FLAG_FUA)
        ext_is(3 * G, X, [(G, 0), (G, 3), (G, 0)],
               "extents after writing zeroes (FUA) over the absent chunk 1")
        # zeroes over half of chunk 0, chunk 1 whole, half of chunk 2 in one write:
        # chunk 1 stays absent, 0 and 2 keep their other halves (present)
        h.pwrite(bytes(2 * G), X + G // 2)
        want = d[:G // 2] + bytes(2 * G) + d[2 * G + G // 2:]
        expect_data(h.pread(3 * G, X), want, "after writing [G/2, 5G/2) with zeroes")
        ext_is(3 * G, X, [(G, 0), (G, 3), (G, 0)],
               "extents after writing [G/2, 5G/2) with zeroes")
        chunk_map([D, H, D], "after writing [G/2, 5G/2) with zeroes")
    R.check("sharded: a write of a whole chunk of zeroes deletes the chunk (hole), "
            "also with FUA and inside a longer write; neighbours with data stay data",
            c_whole_zero_write)

    def c_zero_write_over_data():
        # The partial writes of zeroes that leave the chunk all zeroes delete it on
        # whole objects; with partial writes the chunk stays present.
        reset(3)
        d = rnd(512)
        h.pwrite(d, X + G + 1000)
        h.pwrite(bytes(256), X + G + 1000)
        expect_data(h.pread(512, X + G + 1000), bytes(256) + d[256:],
                    "after zeroing the first half of the data")
        ext_is(3 * G, X, [(G, 3), (G, 0), (G, 3)],
               "extents after writing zeroes over part of the data (data left)")
        h.pwrite(bytes(256), X + G + 1256)
        expect_zero(h.pread(3 * G, X), "after writing zeroes over all the data")
        ext_is(3 * G, X, merged([(G, 3), (G, Z_EXT), (G, 3)]),
               "extents after writing zeroes over the rest of the only data")
        chunk_map([H, Z, H], "after writing zeroes over the only data")
    R.check("sharded%s: a partial write of zeroes over part of the only data keeps the "
            "chunk present; over the rest of it leaves the chunk %s"
            % (" (whole objects)" if whole_objects else "", z_word),
            c_zero_write_over_data)

    for (label, op) in [("trim", lambda ln, o: h.trim(ln, o)),
                        ("trim FUA", lambda ln, o: h.trim(ln, o, nbd.CMD_FLAG_FUA)),
                        ("zero", lambda ln, o: h.zero(ln, o)),
                        ("zero NO_HOLE", lambda ln, o: h.zero(ln, o, nbd.CMD_FLAG_NO_HOLE)),
                        ("zero FUA", lambda ln, o: h.zero(ln, o, nbd.CMD_FLAG_FUA))]:
        def c_only_data(op=op, label=label):
            # chunks 0 and 1 hold 200 B across their edge, chunk 2 holds 512 B;
            # nothing else. Then each piece of data is trimmed/zeroed (partially
            # covering its chunks).
            reset(3)
            h.pwrite(rnd(200), X + G - 100)
            h.pwrite(rnd(512), X + 2 * G + 1000)
            ext_is(3 * G, X, [(3 * G, 0)], "extents before " + label)
            op(200, X + G - 100)
            op(512, X + 2 * G + 1000)
            expect_zero(h.pread(3 * G, X), "after " + label)
            ext_is(3 * G, X, [(3 * G, Z_EXT)],
                   "extents after %s of the only data in each chunk" % label)
            chunk_map([Z, Z, Z], "after %s of the only data" % label)
        R.check("sharded%s: %s of the only data in present chunks (partial ranges, one "
                "across a chunk edge) leaves them %s"
                % (" (whole objects)" if whole_objects else "", label, z_word), c_only_data)

    def c_fast_only_data():
        # FAST_ZERO is decided on presence: refused even where the chunk would end
        # up all zeroes (and so, on whole objects, be deleted).
        # --cached: it may succeed instead, and then the chunk is as after a
        # zero of its only data (Z_EXT).
        reset(3)
        d = rnd(512)
        h.pwrite(d, X + G + 1000)
        what = "FAST_ZERO of the only data in a present chunk"
        if cached:
            before = bytes(G + 1000) + d + bytes(2 * G - 1512)
            if fast_zero_either(h, 512, X + G + 1000, nbd.CMD_FLAG_FAST_ZERO, X, before,
                                what):
                ext_is(3 * G, X, merged([(G, 3), (G, Z_EXT), (G, 3)]),
                       "extents after the successful (cached) " + what)
                return
        else:
            expect_err(lambda: h.zero(512, X + G + 1000, nbd.CMD_FLAG_FAST_ZERO),
                       errno.ENOTSUP, what)
            expect_data(h.pread(512, X + G + 1000), d, "data after the refused FAST_ZERO")
        ext_is(3 * G, X, [(G, 3), (G, 0), (G, 3)], "extents after the refused FAST_ZERO")
    R.check("sharded: FAST_ZERO of the only data in a present chunk -> ENOTSUP, "
            "nothing changed" + (", or (cached) OK, zeros, the chunk %s" % z_word
                                 if cached else ""), c_fast_only_data)

    def c_clip():
        # chunk 1 present, chunks 0 and 2 absent
        reset(3)
        h.pwrite(rnd(512), X + G + 1000)
        ext_is(G, X + G + G // 2, [(G // 2, 0), (G // 2, 3)],
               "extents from the middle of the present chunk")
        ext_is(G, X + G // 2, [(G // 2, 3), (G // 2, 0)],
               "extents from the middle of the absent chunk")
        ext_is(512, X + G + G // 4, [(512, 0)],
               "512 B inside the present chunk")
        # REQ_ONE: the first extent of the layout's answer [(G/2, 3), (G, 0), (G/2, 3)]
        ext_is(2 * G, X + G // 2, [(G // 2, 3), (G, 0), (G // 2, 3)],
               "REQ_ONE from the middle of the absent chunk", nbd.CMD_FLAG_REQ_ONE)
        # ... of [(G - 1, 0), (G, 3), (1 byte of chunk 3, not known here)]
        ext_is(2 * G, X + G + 1, [(G - 1, 0), (G, 3), (1, None)],
               "REQ_ONE from inside the present chunk", nbd.CMD_FLAG_REQ_ONE)
    R.check("sharded: block status is per chunk, clipped to the request", c_clip)

    def c_edge():
        reset(3)
        d = rnd(200)
        h.pwrite(d, X + G - 100)
        ext_is(3 * G, X, [(2 * G, 0), (G, 3)], "extents")
        expect_data(h.pread(200, X + G - 100), d)
        chunk_map([D, D, H], "after a write across the edge")
    R.check("sharded: a 200 B write across a chunk edge makes both chunks present", c_edge)

    partial_ops = [
        ("trim", lambda ln, o: h.trim(ln, o)),
        ("trim FUA", lambda ln, o: h.trim(ln, o, nbd.CMD_FLAG_FUA)),
        ("zero", lambda ln, o: h.zero(ln, o)),
        ("zero NO_HOLE", lambda ln, o: h.zero(ln, o, nbd.CMD_FLAG_NO_HOLE)),
    ]
    for (label, op) in partial_ops:
        def c_partial(op=op, label=label):
            # [X + G/2, X + 3G/2): half of chunk 0, half of chunk 1; none whole
            reset(2)
            d = rnd(2 * G)
            h.pwrite(d, X)
            op(G, X + G // 2)
            want = d[:G // 2] + bytes(G) + d[G // 2 + G:]
            expect_data(h.pread(2 * G, X), want, "after %s" % label)
            ext_is(2 * G, X, [(2 * G, 0)],
                   "extents after a partial %s (chunks stay present)" % label)
            chunk_map([D, D], "after a partial " + label)
        R.check("sharded: %s of half of 2 written chunks zeroes in place, both stay data"
                % label, c_partial)

    whole_ops = partial_ops + [
        ("zero FUA", lambda ln, o: h.zero(ln, o, nbd.CMD_FLAG_FUA)),
        ("zero FAST_ZERO", lambda ln, o: h.zero(ln, o, nbd.CMD_FLAG_FAST_ZERO)),
        ("zero NO_HOLE|FAST_ZERO|FUA",
         lambda ln, o: h.zero(ln, o, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO
                              | nbd.CMD_FLAG_FUA)),
    ]
    for (label, op) in whole_ops:
        def c_whole(op=op, label=label):
            # [X + G, X + 2G + G/2): chunk 1 whole, half of chunk 2
            # (FAST_ZERO: [X + G, X + 2G), chunk 1 alone)
            fast = "FAST_ZERO" in label
            reset(3)
            d = rnd(3 * G)
            h.pwrite(d, X)
            # (FAST_ZERO must not zero part of the present chunk 2: only chunk 1)
            ln = G if fast else G + G // 2
            op(ln, X + G)
            want = d[:G] + bytes(ln) + d[G + ln:]
            expect_data(h.pread(3 * G, X), want, "after %s" % label)
            ext_is(3 * G, X, [(G, 0), (G, 3), (G, 0)],
                   "extents after %s" % label)
            chunk_map([D, H, D], "after " + label)
        R.check("sharded: %s covering a written chunk whole deletes it (hole), "
                "neighbours stay data" % label, c_whole)

    def c_fast_refused():
        # --cached: each may succeed instead; then the chunks it covers whole are
        # absent, the ones it zeroes in part keep data (present) unless left all
        # zeroes on whole objects, and the data is written again for the next one.
        reset(3)
        d = rnd(3 * G)
        h.pwrite(d, X)
        for (ln, o, what) in [(G + G // 2, X, "chunk 0 whole + half of chunk 1"),
                              (G + G // 2, X + G // 2, "half of chunk 0 + chunk 1 whole"),
                              (100, X + 2 * G + 1000, "100 B inside chunk 2"),
                              (3 * G - 1, X, "all but the last byte")]:
            what = "FAST_ZERO of " + what
            if cached and fast_zero_either(h, ln, o, nbd.CMD_FLAG_FAST_ZERO, X, d, what):
                after = d[:o - X] + bytes(ln) + d[o - X + ln:]
                layout = []
                for i in range(3):
                    lo, hi = X + i * G, X + (i + 1) * G
                    if o <= lo and hi <= o + ln:
                        layout.append((G, 3))       # covered whole: deleted
                    elif (o < hi and o + ln > lo and whole_objects
                          and not any(after[i * G:(i + 1) * G])):
                        layout.append((G, 3))       # left all zeroes on whole objects
                    else:
                        layout.append((G, 0))
                ext_is(3 * G, X, merged(layout), "extents after the successful (cached) "
                       + what)
                reset(3)
                h.pwrite(d, X)
                continue
            if not cached:
                expect_err(lambda: h.zero(ln, o, nbd.CMD_FLAG_FAST_ZERO), errno.ENOTSUP,
                           what)
                expect_data(h.pread(3 * G, X), d, "data after the refused " + what)
            ext_is(3 * G, X, [(3 * G, 0)], "extents after the refused " + what)
    R.check("sharded: FAST_ZERO over part of a present chunk -> ENOTSUP, nothing changed "
            "(not even the whole chunks)" + (", or (cached) OK, zeros, data around intact"
                                             if cached else ""), c_fast_refused)

    def c_fast_absent():
        # chunk 1 present, chunks 0 and 2 absent; FAST_ZERO over half of 0,
        # all of 1, half of 2: only deletes and absent chunks -> OK
        reset(3)
        h.pwrite(rnd(G), X + G)
        h.zero(100, X + 1000, nbd.CMD_FLAG_FAST_ZERO)
        ext_is(3 * G, X, [(G, 3), (G, 0), (G, 3)],
               "extents after FAST_ZERO inside an absent chunk")
        h.zero(2 * G, X + G // 2, nbd.CMD_FLAG_FAST_ZERO)
        ext_is(3 * G, X, [(3 * G, 3)],
               "extents after FAST_ZERO over parts of absent chunks + a whole present one")
        expect_zero(h.pread(3 * G, X), "after FAST_ZERO")
        chunk_map([H, H, H], "after FAST_ZERO")
    R.check("sharded: FAST_ZERO touching only absent chunks and whole present ones -> OK",
            c_fast_absent)

    def c_zero_absent():
        # zeroing part of an absent chunk leaves it absent
        reset(2)
        h.zero(G // 4, X + G // 4)
        h.trim(G // 4, X + G + G // 4)
        h.zero(G // 4, X + G // 2, nbd.CMD_FLAG_NO_HOLE)
        h.zero(G // 4, X + G + G // 2, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)
        ext_is(2 * G, X, [(2 * G, 3)], "extents")
        chunk_map([H, H], "after zeroing parts of absent chunks")
    R.check("sharded: trim/zero (NO_HOLE, FAST_ZERO) of part of an absent chunk leaves it "
            "absent", c_zero_absent)

    def c_middle():
        reset(3)
        d = rnd(3 * G)
        h.pwrite(d, X)
        h.trim(G, X + G)
        ext_is(3 * G, X, [(G, 0), (G, 3), (G, 0)], "extents")
        expect_data(h.pread(3 * G, X), d[:G] + bytes(G) + d[2 * G:])
        h.pwrite(d[G:2 * G], X + G, nbd.CMD_FLAG_FUA)
        ext_is(3 * G, X, [(3 * G, 0)], "extents after rewriting it")
        expect_data(h.pread(3 * G, X), d, "after rewriting the middle chunk")
        chunk_map([D, D, D], "after rewriting")
    R.check("sharded: trim of the middle chunk, then rewrite it (FUA)", c_middle)


def big_ops_checks(R, h, size, kind, cached):
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
                ext = paged_status(h, GiB, GiB, [], cached, "block status at 1 GiB after "
                                   + label, nbd.CMD_FLAG_REQ_ONE)
                expect_eq(ext[0][1], 3, "block status flags at 1 GiB after " + label)
            elif kind == "sharded":
                # every chunk of [1 GiB, 2 GiB) was covered whole: all deleted
                expect_extents(h, GiB, GiB, [(GiB, 3)],
                               "block status of [1 GiB, 2 GiB) after " + label, cached)
                for o in outside:
                    expect_extents(h, 4096, o, [(4096, 0)],
                                   "block status at %d (outside) after %s" % (o, label),
                                   cached)
        return c

    R.check("zero 1 GiB @1G: reads zeros inside, data outside intact",
            run("zero", lambda: h.zero(GiB, GiB)))
    R.check("trim 1 GiB @1G: reads zeros inside, data outside intact",
            run("trim", lambda: h.trim(GiB, GiB)))
    if kind != "file":
        # (sharded: only whole chunks are deleted, so FAST_ZERO succeeds)
        R.check("zero FAST_ZERO 1 GiB @1G (%s: OK)"
                % ("whole chunks" if kind == "sharded" else "memory"),
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
