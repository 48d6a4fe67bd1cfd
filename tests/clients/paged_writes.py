#!/usr/bin/python3
"""Writes of many sizes and alignments through an export, checked against a model.

Usage: /usr/bin/python3 tests/clients/paged_writes.py URI SPAN

Writes large payloads (64 KiB to 2 MiB) at offsets on and off 32 KiB boundaries, and small ones
among them, several in flight at once, overlapping each other's ranges; then reads the whole
SPAN back and compares it with a model of what was written, byte for byte. A memory export reads
the large payloads straight into its pages: this checks the bytes before the first page boundary,
the whole pages and the bytes after the last all land where they belong. Prints
`checked N writes`, or `FAIL ...` and exits 1.
"""

import random
import sys

import nbd


def main():
    uri, span = sys.argv[1], int(sys.argv[2])
    rng = random.Random(7)
    model = bytearray(span)
    h = nbd.NBD()
    # nbds:// URIs name their certificates' directory.
    h.set_uri_allow_local_file(True)
    h.connect_uri(uri)
    sizes = [65536, 65537, 98304, 100000, 262144, 1 << 20, (2 << 20) - 1, 4096, 512, 1]
    cases = []
    for size in sizes:
        for offset in (0, 32768, 12345, 32768 - 1, 65536 + 4096):
            cases.append((offset, size))
    for _ in range(60):
        size = rng.choice(sizes)
        cases.append((rng.randrange(0, span - size), size))
    # Eight in flight at a time; each batch's writes do not overlap one another (the order in
    # which overlapping writes in flight land is not defined), but do overlap earlier ones.
    done = 0
    while cases:
        batch, taken = [], []
        for c in list(cases):
            if len(batch) == 8:
                break
            o, n = c
            if all(o + n <= a or b <= o for a, b in taken):
                batch.append(c)
                taken.append((o, o + n))
                cases.remove(c)
        cookies = []
        for o, n in batch:
            data = rng.randbytes(n)
            model[o:o + n] = data
            cookies.append(h.aio_pwrite(data, o))
        for c in cookies:
            while not h.aio_command_completed(c):
                h.poll(-1)
        done += len(batch)
    back = bytearray()
    for o in range(0, span, 1 << 20):
        back += h.pread(min(1 << 20, span - o), o)
    if back != model:
        first = next(i for i in range(span) if back[i] != model[i])
        print(f"FAIL: byte {first} differs (0x{back[first]:02x}, written 0x{model[first]:02x})")
        sys.exit(1)
    h.shutdown()
    print(f"checked {done} writes")


if __name__ == "__main__":
    main()
