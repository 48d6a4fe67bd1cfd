#!/usr/bin/env python3
"""delaylink.py NS_A NS_B DELAY_MS [RATE_MBIT [QUEUE_KIB [MTU]]]

An emulated network link for benchmarks, where this kernel has no netem: one TUN device in
each of two existing network namespaces (`ip netns add`), with NS_A at 10.9.0.1 and NS_B at
10.9.0.2, and this process carrying every packet across after DELAY_MS milliseconds (one way),
serialised at RATE_MBIT (0: as fast as it can) behind a queue of QUEUE_KIB (tail drop, as a
router does). Both devices vanish when the process ends. Prints "up" once the link carries
packets. Nothing outside the two namespaces is touched.
"""
import collections
import ctypes
import fcntl
import os
import select
import struct
import subprocess
import sys
import time

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


def tun_in(ns, name, libc, home):
    """Opens a TUN device named `name` inside namespace `ns` (the device lives where it was made)."""
    nsfd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(nsfd, CLONE_NEWNET) != 0:
            sys.exit(f"delaylink: cannot enter namespace {ns}: errno {ctypes.get_errno()}")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    finally:
        libc.setns(home, CLONE_NEWNET)
        os.close(nsfd)
    return fd


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    ns_a, ns_b, delay = sys.argv[1], sys.argv[2], float(sys.argv[3]) / 1000
    rate = float(sys.argv[4]) * 1e6 / 8 if len(sys.argv) > 4 else 0.0  # bytes per second
    queue = int(sys.argv[5]) * 1024 if len(sys.argv) > 5 else 4 << 20
    mtu = int(sys.argv[6]) if len(sys.argv) > 6 else 9000
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    a = tun_in(ns_a, "wan0", libc, home)
    b = tun_in(ns_b, "wan0", libc, home)
    for ns, local, peer in ((ns_a, "10.9.0.1", "10.9.0.2"), (ns_b, "10.9.0.2", "10.9.0.1")):
        for cmd in (
            ["addr", "add", local, "peer", peer, "dev", "wan0"],
            ["link", "set", "wan0", "mtu", str(mtu), "up"],
            ["link", "set", "lo", "up"],
        ):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
    # Per direction: packets waiting (due time, bytes), when the sender's serialisation frees up.
    out = {a: collections.deque(), b: collections.deque()}
    busy = {a: 0.0, b: 0.0}
    other = {a: b, b: a}
    print("up", flush=True)
    while True:
        now = time.monotonic()
        heads = [q[0][0] for q in out.values() if q]
        timeout = max(0.0, min(heads) - now) if heads else None
        ready, _, _ = select.select([a, b], [], [], timeout)
        now = time.monotonic()
        for src in ready:
            dst = other[src]
            while True:
                try:
                    pkt = os.read(src, 65536)
                except BlockingIOError:
                    break
                if rate:
                    start = max(now, busy[dst])
                    if (start - now) * rate > queue:
                        continue  # the queue is full: dropped
                    busy[dst] = start + len(pkt) / rate
                    out[dst].append((busy[dst] + delay, pkt))
                else:
                    out[dst].append((now + delay, pkt))
        for dst, q in out.items():
            while q and q[0][0] <= now:
                try:
                    os.write(dst, q.popleft()[1])
                except OSError:
                    pass  # the stack refused it: a lost packet, which TCP recovers


if __name__ == "__main__":
    main()
