#!/usr/bin/python3
"""Writes or checks a deterministic data pattern through an NBD export (libnbd).

Usage:
    /usr/bin/python3 tests/clients/pattern.py URI write|check SEED [--flush] [--count N]
        [--block BYTES] [--span BYTES] [--fua] [--tolerate-errors]

`write` writes N blocks of BLOCK bytes at pseudo-random block-aligned offsets within SPAN
(derived from SEED), then FLUSHes if --flush. `check` reads the same blocks back and compares.
Both print one line: `wrote N blocks` / `checked N blocks`, or `FAIL ...` and exit 1.
With --tolerate-errors, `write` keeps going after a failed request and prints, for each block,
whether its write was acknowledged: `acked I` lines, so a later check can verify exactly the
acknowledged ones (`check --only-acked FILE`).
"""

import argparse
import random
import sys

import nbd


def blocks(seed, count, block, span):
    rng = random.Random(seed)
    slots = span // block
    chosen = rng.sample(range(slots), min(count, slots))
    for i, slot in enumerate(chosen):
        data = random.Random(seed * 1000003 + i).randbytes(block)
        yield i, slot * block, data


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("uri")
    ap.add_argument("mode", choices=("write", "check"))
    ap.add_argument("seed", type=int)
    ap.add_argument("--flush", action="store_true")
    ap.add_argument("--fua", action="store_true")
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--block", type=int, default=65536)
    ap.add_argument("--span", type=int, default=64 << 20)
    ap.add_argument("--tolerate-errors", action="store_true")
    ap.add_argument("--only-acked")
    a = ap.parse_args()

    h = nbd.NBD()
    h.connect_uri(a.uri)
    only = None
    if a.only_acked:
        with open(a.only_acked) as f:
            only = {int(line.split()[1]) for line in f if line.startswith("acked ")}
    n = 0
    for i, off, data in blocks(a.seed, a.count, a.block, a.span):
        if a.mode == "write":
            flags = nbd.CMD_FLAG_FUA if a.fua else 0
            try:
                h.pwrite(data, off, flags)
                if a.tolerate_errors:
                    print("acked", i, flush=True)
            except nbd.Error as e:
                if not a.tolerate_errors:
                    print("FAIL write block %d at %d: %s" % (i, off, e))
                    sys.exit(1)
                print("failed", i, e.errno, flush=True)
            n += 1
        else:
            if only is not None and i not in only:
                continue
            got = h.pread(a.block, off)
            if got != data:
                print("FAIL block %d at offset %d differs" % (i, off))
                sys.exit(1)
            n += 1
    if a.mode == "write" and a.flush:
        try:
            h.flush()
        except nbd.Error as e:
            print("FAIL flush: %s" % e)
            sys.exit(1)
    h.shutdown()
    print("%s %d blocks" % ("wrote" if a.mode == "write" else "checked", n))


if __name__ == "__main__":
    main()
