#!/usr/bin/python3
"""Large reads of a file export, checked byte for byte against a model of the image.

Usage:
    /usr/bin/python3 tests/clients/zero_copy.py URI IMAGE [--no-structured]

nbd-rs answers reads of 64 KiB and more from a file export with sendfile(2), or from a
mapping of the image, when the pages are in the page cache, and reads them otherwise. This script writes a pattern through the
export (leaving a trimmed hole and a never-written tail), then reads it back in shapes that
stress that path: unaligned offsets and lengths, just below and at the threshold, ranges that
cross holes, 8 MiB at once, and 64 reads of mixed sizes in flight together (so that replies
sent from the page cache and replies read share the writer's batches). Then it flushes,
evicts the image from the page cache (POSIX_FADV_DONTNEED on IMAGE) and reads everything
again: the first reads now take the reading path, the repeats the page-cache one.

With --no-structured the connection uses simple replies. Prints `checked N reads`, or
`FAIL what: ...` and exits 1.
"""

import argparse
import os
import random
import sys

import nbd

MIB = 1 << 20
SPAN = 8 * MIB


def fail(what, detail):
    print(f"FAIL {what}: {detail}")
    sys.exit(1)


def first_difference(got, want):
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return i
    return min(len(got), len(want))


def check(what, got, want, offset):
    if bytes(got) != bytes(want):
        i = first_difference(got, want)
        fail(what, f"{len(got)} bytes at {offset}: first difference at +{i} "
                   f"(got {got[i:i + 8].hex() if i < len(got) else 'end'}, "
                   f"want {want[i:i + 8].hex() if i < len(want) else 'end'})")


def shapes():
    # (offset, length): unaligned, at and around the 64 KiB threshold, crossing the trimmed
    # hole at [2 MiB, 2.5 MiB) and the never-written tail from 6 MiB.
    return [
        (0, 65536),
        (1, 65536),
        (4095, 65537),
        (5 * MIB, 65535),
        (3 * 4096 + 7, MIB),
        (MIB - 100, 3 * MIB),
        (2 * MIB - 4096, MIB),
        (2 * MIB + 4096, 128 * 1024),
        (6 * MIB - 1000, 2 * MIB),
        (7 * MIB, MIB),
        (0, SPAN),
    ]


def read_all(h, model, rng, tag):
    n = 0
    for off, length in shapes():
        check(f"{tag} pread", h.pread(length, off), model[off:off + length], off)
        n += 1
    # Many in flight at once, of mixed sizes.
    pending = []
    for _ in range(64):
        length = rng.choice([512, 4096, 65536, 65536 + 512, 256 * 1024, MIB])
        off = rng.randrange(0, SPAN - length)
        buf = nbd.Buffer(length)
        cookie = h.aio_pread(buf, off)
        pending.append((cookie, buf, off, length))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for cookie, buf, off, length in pending:
        if not h.aio_command_completed(cookie):
            fail(f"{tag} aio_pread", f"read of {length} at {off} did not complete")
        check(f"{tag} aio_pread", buf.to_bytearray(), model[off:off + length], off)
        n += 1
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("uri")
    ap.add_argument("image")
    ap.add_argument("--no-structured", action="store_true")
    args = ap.parse_args()

    h = nbd.NBD()
    if args.no_structured:
        h.set_request_structured_replies(False)
    # Lets nbds:// URIs name their certificate directory.
    h.set_uri_allow_local_file(True)
    h.connect_uri(args.uri)
    if args.no_structured and h.get_structured_replies_negotiated():
        fail("negotiation", "structured replies were negotiated although not requested")
    if h.get_size() < SPAN:
        fail("size", f"export of {h.get_size()} bytes, need {SPAN}")

    rng = random.Random(7)
    model = bytearray(SPAN)
    # Clear what an earlier run left, then write 6 MiB of pattern and trim a hole in it.
    h.zero(SPAN, 0)
    data = rng.randbytes(6 * MIB)
    for off in range(0, 6 * MIB, MIB):
        h.pwrite(data[off:off + MIB], off)
    model[0:6 * MIB] = data
    h.trim(MIB // 2, 2 * MIB)
    model[2 * MIB:2 * MIB + MIB // 2] = bytes(MIB // 2)

    n = read_all(h, model, rng, "cached")

    # Out of the page cache: written back by the flush, then dropped.
    h.flush()
    fd = os.open(args.image, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    n += read_all(h, model, rng, "evicted")

    h.shutdown()
    print(f"checked {n} reads")


if __name__ == "__main__":
    main()
