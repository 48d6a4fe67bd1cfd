#!/usr/bin/python3
"""A randomised workload checked against an in-memory model of the disk.

    workload.py URI --seed S [--ops N] [--connections K] [--max-len BYTES]

K connections take turns at random; each operation is one of WRITE (sometimes with FUA), READ,
TRIM, WRITE_ZEROES (with or without NO_HOLE), FLUSH and BLOCK_STATUS, at random offsets and
lengths, some of them unaligned. The model holds what every byte must read as; after a TRIM the
bytes it covered may read as anything (the spec lets a server keep or drop them) until they are
written again. Every READ is compared with the model, and a read on one connection sees what
another wrote (the server advertises multi-conn). Any difference prints the seed, the operation
number and the first differing offset, and exits 1.
"""
import argparse
import random
import sys

import nbd


def main():
    p = argparse.ArgumentParser()
    p.add_argument("uri")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--ops", type=int, default=2000)
    p.add_argument("--connections", type=int, default=3)
    p.add_argument("--max-len", type=int, default=3 << 20)
    a = p.parse_args()
    rnd = random.Random(a.seed)

    handles = []
    for _ in range(a.connections):
        h = nbd.NBD()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_uri(a.uri)
        handles.append(h)
    size = handles[0].get_size()
    model = bytearray(size)  # what each byte reads as
    known = bytearray(b"\x01") * size  # 0 once a TRIM made the byte unspecified
    counts = {}

    def fail(i, what):
        print(f"seed {a.seed}, operation {i}: {what}", file=sys.stderr)
        sys.exit(1)

    def span():
        # Mostly aligned to 4 KiB, sometimes to 512 bytes, sometimes to nothing.
        align = rnd.choice([4096, 4096, 4096, 512, 1])
        length = max(align, rnd.randrange(1, a.max_len) // align * align)
        length = min(length, size)
        offset = rnd.randrange(0, size - length + 1) // align * align
        return offset, length

    for i in range(a.ops):
        h = rnd.choice(handles)
        op = rnd.choices(
            ["write", "read", "trim", "zero", "flush", "status"],
            weights=[40, 30, 8, 10, 4, 8],
        )[0]
        counts[op] = counts.get(op, 0) + 1
        if op == "flush":
            h.flush()
            continue
        offset, length = span()
        if op == "write":
            data = rnd.randbytes(length)
            flags = nbd.CMD_FLAG_FUA if rnd.random() < 0.2 else 0
            h.pwrite(data, offset, flags)
            model[offset:offset + length] = data
            known[offset:offset + length] = b"\x01" * length
        elif op == "zero":
            flags = nbd.CMD_FLAG_NO_HOLE if rnd.random() < 0.5 else 0
            h.zero(length, offset, flags)
            model[offset:offset + length] = bytes(length)
            known[offset:offset + length] = b"\x01" * length
        elif op == "trim":
            h.trim(length, offset)
            known[offset:offset + length] = bytes(length)
        elif op == "read":
            got = h.pread(length, offset)
            want = model[offset:offset + length]
            mask = known[offset:offset + length]
            if got != want:
                # Compare only the bytes the model knows.
                pos = 0
                while pos < length:
                    start = mask.find(b"\x01", pos)
                    if start < 0:
                        break
                    end = mask.find(b"\x00", start)
                    end = length if end < 0 else end
                    if got[start:end] != want[start:end]:
                        first = next(j for j in range(start, end) if got[j] != want[j])
                        fail(i, f"read of {length} bytes at {offset} differs at offset "
                                f"{offset + first}: got {got[first]:#x}, want {want[first]:#x}")
                    pos = end
        elif op == "status":
            # Extents must tile the range from its start; a hole or zero extent must read as
            # zeroes where the model knows the bytes.
            seen = []
            h.block_status(length, offset,
                           lambda ctx, off, entries, err: seen.append((off, list(entries))) or 0)
            if not seen:
                fail(i, "block status gave no extents")
            pos = offset
            entries = seen[0][1]
            for k in range(0, len(entries), 2):
                n, flags = entries[k], entries[k + 1]
                if flags & nbd.STATE_ZERO:
                    lo, hi = pos, min(pos + n, offset + length)
                    seg = model[lo:hi]
                    if seg.count(0) == len(seg):
                        pos += n
                        continue
                    for j in range(lo, hi):
                        if known[j] and model[j] != 0:
                            fail(i, f"block status says {lo}..{hi} reads as zeroes, "
                                    f"but byte {j} was written as {model[j]:#x}")
                pos += n
            if pos <= offset:
                fail(i, "block status extents do not advance")
    for h in handles:
        h.flush()
        h.shutdown()
    print(f"seed {a.seed}: {a.ops} operations on {a.connections} connections, all consistent: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
