#!/usr/bin/env python3
"""Writes the seed corpora for the nbd-rs fuzz targets into fuzz/corpus/<target>/.

    python3 fuzz/seeds.py            # from the repository root (or anywhere)

The corpus directories are ignored by git; run this again to recreate them. Constants are
those of src/nbd/proto.rs; layouts as in the NBD protocol (doc/proto.md).
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

IHAVEOPT = 0x49484156454F5054
# options
EXPORT_NAME, ABORT, LIST, STARTTLS, INFO, GO = 1, 2, 3, 5, 6, 7
STRUCTURED_REPLY, LIST_META_CONTEXT, SET_META_CONTEXT, EXTENDED_HEADERS = 8, 9, 10, 11
# info types
I_EXPORT, I_NAME, I_DESCRIPTION, I_BLOCK_SIZE = 0, 1, 2, 3
# requests
REQUEST_MAGIC, EXTENDED_REQUEST_MAGIC = 0x25609513, 0x21E41C71
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = 0, 1, 2, 3, 4, 5, 6, 7
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO, PAYLOAD_LEN = 1, 2, 4, 8, 16, 32


def opt(code, data=b""):
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def string(s):
    b = s.encode()
    return struct.pack(">I", len(b)) + b


def go(name, infos=()):
    return string(name) + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)


def meta(name, queries):
    return string(name) + struct.pack(">I", len(queries)) + b"".join(string(q) for q in queries)


def flags(no_zeroes=True):
    return struct.pack(">I", 3 if no_zeroes else 1)


def req(kind, offset=0, length=0, fl=0, cookie=None, extended=False, payload=b""):
    cookie = kind + 1 if cookie is None else cookie
    if extended:
        h = struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, fl, kind, cookie, offset, length)
    else:
        h = struct.pack(">IHHQQI", REQUEST_MAGIC, fl, kind, cookie, offset, length)
    return h + payload


def requests(extended=False, meta_ok=True):
    """A session's worth of valid requests, one stream per entry, each ended by DISC."""
    x = extended
    data = bytes(range(256)) * 2  # 512 bytes
    singles = {
        "read": req(READ, 0, 4096, extended=x),
        "read-df": req(READ, 0, 65536, DF, extended=x),
        "write": req(WRITE, 4096, 512, FUA, extended=x, payload=data),
        "flush": req(FLUSH, extended=x),
        "trim": req(TRIM, 32768, 65536, extended=x),
        "zeroes": req(WRITE_ZEROES, 0, 8192, NO_HOLE, extended=x),
        "fast-zero": req(WRITE_ZEROES, 0, 32768, FAST_ZERO, extended=x),
        "cache": req(CACHE, 0, 65536, extended=x),
        "status": req(BLOCK_STATUS, 0, 65536, extended=x),
        "status-one": req(BLOCK_STATUS, 0, 65536, REQ_ONE, extended=x),
    }
    if x:
        singles["write-payload-len"] = req(WRITE, 8192, 512, PAYLOAD_LEN, extended=x, payload=data)
    disc = req(DISC, extended=x)
    out = {k: v + disc for k, v in singles.items()}
    # A mixed session: write, read it back, punch, zero, status, flush, disconnect.
    out["mixed"] = b"".join(
        [
            req(WRITE, 0, 512, 0, 10, x, data),
            req(WRITE, 40960, 512, FUA, 11, x, data),
            req(READ, 0, 1024, 0, 12, x),
            req(BLOCK_STATUS, 0, 131072, 0, 13, x),
            req(TRIM, 0, 32768, 0, 14, x),
            req(WRITE_ZEROES, 40960, 512, 0, 15, x),
            req(READ, 32768, 16384, DF, 16, x),
            req(FLUSH, 0, 0, 0, 17, x),
            disc,
        ]
    )
    out["no-disc"] = req(READ, 0, 512, extended=x)
    return out


def options_seeds():
    n = {}
    n["flags-only"] = flags()
    n["list-abort"] = flags() + opt(LIST) + opt(ABORT)
    n["go-a"] = flags() + opt(GO, go("a"))
    n["go-default-infos"] = flags() + opt(GO, go("", [I_NAME, I_DESCRIPTION, I_BLOCK_SIZE]))
    n["structured-meta-go"] = (
        flags() + opt(STRUCTURED_REPLY) + opt(SET_META_CONTEXT, meta("a", ["base:allocation"]))
        + opt(GO, go("a"))
    )
    n["extended-meta-go-b"] = (
        flags() + opt(EXTENDED_HEADERS) + opt(SET_META_CONTEXT, meta("b", ["base:allocation"]))
        + opt(GO, go("b", [I_BLOCK_SIZE, I_NAME]))
    )
    n["info-all"] = (
        flags() + opt(INFO, go("a", [I_NAME, I_DESCRIPTION])) + opt(INFO, go("b"))
        + opt(INFO, go("c")) + opt(INFO, go("nope")) + opt(ABORT)
    )
    n["list-meta"] = (
        flags() + opt(LIST_META_CONTEXT, meta("a", [])) + opt(LIST_META_CONTEXT, meta("b", ["base:"]))
        + opt(STRUCTURED_REPLY) + opt(SET_META_CONTEXT, meta("a", ["base:allocation", "qemu:dirty"]))
        + opt(SET_META_CONTEXT, meta("c", ["base:allocation"])) + opt(ABORT)
    )
    n["export-name-a"] = flags() + opt(EXPORT_NAME, b"a")
    n["export-name-b-zeroes"] = flags(False) + opt(EXPORT_NAME, b"b")
    n["export-name-hidden"] = flags() + opt(EXPORT_NAME, b"c")
    n["export-name-after-extended"] = flags() + opt(EXTENDED_HEADERS) + opt(EXPORT_NAME, b"a")
    n["structured-after-extended"] = flags() + opt(EXTENDED_HEADERS) + opt(STRUCTURED_REPLY) + opt(GO, go("a"))
    n["starttls-unknown-go-hidden"] = flags() + opt(STARTTLS) + opt(99, b"xyz") + opt(GO, go("c")) + opt(ABORT)
    n["bad-data"] = (
        flags() + opt(LIST, b"x") + opt(STRUCTURED_REPLY, b"x") + opt(EXTENDED_HEADERS, b"x")
        + opt(GO, struct.pack(">I", 100)) + opt(INFO, go("a", [1])[:-1]) + opt(ABORT)
    )
    n["bad-magic"] = flags() + struct.pack(">QII", 0x1234, GO, 0)
    n["bad-flags"] = struct.pack(">I", 0xFF)
    return n


def transmission_seeds():
    n = {}
    # selector: bits 0-1 mode (simple, structured, extended, both), bit 2 export b,
    # bit 3 no base:allocation, bit 4 EXPORT_NAME instead of GO, bit 5 no NO_ZEROES.
    for sel, label in [(0, "simple"), (1, "structured"), (2, "extended"), (3, "both"),
                       (1 | 4, "structured-b"), (2 | 4, "extended-b"), (1 | 8, "structured-nometa"),
                       (16, "simple-exportname"), (1 | 16 | 32, "structured-exportname-zeroes")]:
        extended = sel & 3 >= 2
        for name, stream in requests(extended).items():
            if sel not in (0, 1, 2) and name not in ("mixed", "write", "status"):
                continue
            n[f"{label}-{name}"] = bytes([sel]) + stream
    return n


def wire_seeds():
    n = {}
    for name, stream in requests(False).items():
        n[f"compact-{name}"] = stream
    for name, stream in requests(True).items():
        n[f"extended-{name}"] = stream
    return n


def write(target, seeds):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, "seed-" + name), "wb") as f:
            f.write(data)
    print(f"{target}: {len(seeds)} seeds in {d}")


if __name__ == "__main__":
    write("options", options_seeds())
    write("transmission", transmission_seeds())
    write("wire", wire_seeds())
