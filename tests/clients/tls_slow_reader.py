#!/usr/bin/python3
"""64 READs of 8 MiB over TLS, one at a time, by a raw NBD client slower than the server.

Usage:
    /usr/bin/python3 tests/clients/tls_slow_reader.py HOST PORT CA_CERT EXPORT

A reader slower than the server keeps the server's socket full, so the server's last write of a
reply may find no room: a TLS stream then keeps the last records back until it is flushed. This
client asks for nothing more until the reply is complete, so a server that does not flush never
sends them (such a server failed here in 5 runs of 6). Prints `read N bytes` once every reply
came, or `FAIL what` and exits 1 (waiting at most 10 s for each piece).
"""

import socket
import ssl
import struct
import sys
import time

IHAVEOPT = b"IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
OPT_STARTTLS, OPT_GO = 5, 7
REP_ACK, REP_INFO = 1, 3
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
CMD_READ, CMD_DISC = 0, 2
LENGTH = 8 << 20
READS = 64
PIECE = 65536


def fail(what):
    print(f"FAIL {what}")
    sys.exit(1)


def exactly(s, n):
    out = bytearray()
    while len(out) < n:
        try:
            got = s.recv(min(n - len(out), PIECE))
        except socket.timeout:
            fail(f"nothing came for 10 s, {len(out)} of {n} bytes in")
        if not got:
            fail(f"connection closed, {len(out)} of {n} bytes in")
        out += got
    return bytes(out)


def option(s, opt, data):
    s.sendall(IHAVEOPT + struct.pack(">II", opt, len(data)) + data)


def option_reply(s, opt):
    magic, got_opt, kind, length = struct.unpack(">QIII", exactly(s, 20))
    if magic != OPT_REPLY_MAGIC or got_opt != opt:
        fail(f"option reply {magic:#x} for option {got_opt}")
    return kind, exactly(s, length)


def main():
    host, port, ca, export = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    raw = socket.create_connection((host, port), timeout=10)
    hello = exactly(raw, 18)
    if hello[:16] != b"NBDMAGIC" + IHAVEOPT:
        fail(f"greeting {hello!r}")
    raw.sendall(struct.pack(">I", 1 | 2))  # fixed newstyle, no zeroes
    option(raw, OPT_STARTTLS, b"")
    kind, _ = option_reply(raw, OPT_STARTTLS)
    if kind != REP_ACK:
        fail(f"STARTTLS answered with {kind:#x}")
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False
    s = ctx.wrap_socket(raw)
    name = export.encode()
    option(s, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    while True:
        kind, _ = option_reply(s, OPT_GO)
        if kind == REP_ACK:
            break
        if kind != REP_INFO:
            fail(f"GO answered with {kind:#x}")
    total = 0
    for cookie in range(1, READS + 1):
        s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, cookie, 0, LENGTH))
        magic, error, got_cookie = struct.unpack(">IIQ", exactly(s, 16))
        if magic != SIMPLE_REPLY_MAGIC or error != 0 or got_cookie != cookie:
            fail(f"reply {magic:#x} error {error} cookie {got_cookie}")
        got = 0
        while got < LENGTH:
            got += len(exactly(s, min(PIECE, LENGTH - got)))
        total += got
    s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, READS + 1, 0, 0))
    print(f"read {total} bytes")


main()
