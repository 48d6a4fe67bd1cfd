#!/usr/bin/python3
"""rawwrites.py PORT EXPORT COUNT DEPTH NODELAY(0|1): 1 MiB NBD writes from a plain socket.

A minimal NBD client (fixed newstyle, NBD_OPT_EXPORT_NAME) that sends COUNT 1 MiB writes, at
most DEPTH unanswered, each as two sends (the request header, then the payload), with or
without TCP_NODELAY, and prints the seconds they took. libnbd, qemu and fio all set
TCP_NODELAY; this shows what a client that leaves Nagle's algorithm on gets, for example:
    for n in 0 1; do bench/rawwrites.py 10809 disk 1000 1 $n; done
"""
import socket
import struct
import sys
import time

port, export, count, depth, nodelay = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
s = socket.create_connection(("127.0.0.1", int(port)))
if nodelay:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def recv_exactly(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            sys.exit("rawwrites.py: the server closed the connection")
        b += c
    return b


magic, opt, _ = struct.unpack(">QQH", recv_exactly(18))
if magic != 0x4E42444D41474943 or opt != 0x49484156454F5054:
    sys.exit("rawwrites.py: not a newstyle NBD server")
s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, len(export)) + export)
size, _ = struct.unpack(">QH", recv_exactly(10))
payload = bytes(range(256)) * 4096
spots = max(1, size >> 20)
t = time.monotonic()
sent = done = 0
while done < count:
    while sent < count and sent - done < depth:
        s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, sent, (sent % spots) << 20, 1 << 20))
        s.sendall(payload)
        sent += 1
    magic, error, _ = struct.unpack(">IIQ", recv_exactly(16))
    if magic != 0x67446698 or error != 0:
        sys.exit(f"rawwrites.py: write failed: magic {magic:#x}, error {error}")
    done += 1
print(f"{time.monotonic() - t:.3f} s for {count} writes of 1 MiB (depth {depth}, TCP_NODELAY {int(nodelay)})")
