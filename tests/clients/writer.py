#!/usr/bin/python3
"""A client that keeps writes in flight and remembers exactly which ones were acknowledged.

    writer.py write URI --slots N --slot-size S --ready FILE --stop FILE --model FILE
              [--depth D] [--reconnect] [--fua-every K] [--flush-every F] [--crash] [--seed S]
    writer.py verify URI --model FILE

`write` keeps D writes of random data in flight, each to its own slot (never two to one slot at
a time, so the order of completion cannot matter), until the file --stop exists. It touches
--ready after its first 64 acknowledged writes. With --reconnect, a connection the server closes
(a reload draining the export) is opened again and every unanswered write is sent again, as qemu
does with reconnect-delay; without it, a closed connection ends the run. Every K-th write is sent
with FUA when --fua-every is given. It saves the model: for each slot, the SHA-256 of what it must
hold, or (for a write never answered) the hashes it may hold. An existing model file is the starting point (a later round over the same
disk). It prints one JSON line of counts.

With --crash the model is the one a crash leaves: an acknowledged write is certain only once it
was written with FUA or a later FLUSH was acknowledged (every --flush-every writes the client
lets its writes drain and sends a FLUSH); until then the slot may hold any of its writes since.
Use it when the server is killed with SIGKILL; without it every acknowledged write is certain,
as after a clean stop.

`verify` reads every slot back and fails, naming the slot, on any difference from the model.
Slots never written must read as zeroes.
"""
import argparse
import hashlib
import json
import os
import random
import sys
import time

import nbd


def connect(uri, patient):
    deadline = time.monotonic() + (60 if patient else 0)
    while True:
        h = nbd.NBD()
        try:
            h.connect_uri(uri)
            return h
        except nbd.Error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def sha(b):
    return hashlib.sha256(b).hexdigest()


def write(a):
    size = a.slot_size
    zero = sha(bytes(size))
    model = {}  # slot -> [hashes it may hold]
    if os.path.exists(a.model):
        # A later round over the same disk starts from what the last one allowed.
        with open(a.model) as f:
            model = {int(k): v for k, v in json.load(f)["model"].items()}
    h = connect(a.uri, a.reconnect)
    inflight = {}  # cookie -> (slot, data)
    retry = []  # (slot, data) never answered
    acked = failed_over = reconnects = sent = 0
    free = list(range(a.slots))
    random.shuffle(free)
    stopping = False
    last = {}  # slot -> hash of its last acknowledged write
    since_flush = 0
    random.seed(a.seed)
    while True:
        if not stopping and a.stop and os.path.exists(a.stop):
            stopping = True
        if stopping and not inflight and not retry:
            break
        barrier = a.flush_every and since_flush >= a.flush_every
        if barrier and not inflight:
            # Everything acknowledged so far is durable once this FLUSH is answered.
            try:
                h.flush()
            except nbd.Error:
                break
            for slot, digest in last.items():
                model[slot] = [digest]
            since_flush = 0
            barrier = False
        # Fill the queue: unanswered writes first, then new ones.
        while not barrier and len(inflight) < a.depth and (retry or (free and not stopping)):
            if retry:
                slot, data = retry.pop()
            else:
                slot = free.pop(random.randrange(len(free)))
                data = random.randbytes(size)
                model.setdefault(slot, [zero])
                # Until acknowledged, the slot may hold its old content or the new one.
                model[slot].append(sha(data))
            flags = 0
            sent += 1
            if a.fua_every and sent % a.fua_every == 0:
                flags = nbd.CMD_FLAG_FUA
            try:
                c = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), slot * size,
                                 flags=flags)
            except nbd.Error:
                retry.append((slot, data))
                break
            inflight[c] = (slot, data, flags)
        dead = h.aio_is_dead() or h.aio_is_closed()
        if not dead:
            try:
                h.poll(1000)
            except nbd.Error:
                dead = True
        for c in list(inflight):
            try:
                done = h.aio_command_completed(c)
            except nbd.Error as e:
                if not (h.aio_is_dead() or h.aio_is_closed()):
                    print(f"write to slot {inflight[c][0]} failed: {e}", file=sys.stderr)
                    sys.exit(1)
                done = None
            if done:
                slot, data, flags = inflight.pop(c)
                digest = sha(data)
                last[slot] = digest
                if not a.crash or flags & nbd.CMD_FLAG_FUA:
                    model[slot] = [digest]
                free.append(slot)
                acked += 1
                since_flush += 1
                if acked == 64:
                    open(a.ready, "w").close()
        if dead or h.aio_is_dead() or h.aio_is_closed():
            unanswered = [(slot, data) for slot, data, _ in inflight.values()]
            inflight.clear()
            if not a.reconnect:
                failed_over = len(unanswered) + len(retry)
                break
            retry.extend(unanswered)
            del h
            h = connect(a.uri, True)
            reconnects += 1
    if not (h.aio_is_dead() or h.aio_is_closed()):
        h.flush()
        h.shutdown()
        for slot, digest in last.items():
            model[slot] = [digest]
    with open(a.model, "w") as f:
        json.dump({"slot_size": size, "slots": a.slots, "model": model}, f)
    print(json.dumps({"acked": acked, "unanswered": failed_over, "reconnects": reconnects}))


def verify(a):
    with open(a.model) as f:
        m = json.load(f)
    size, model = m["slot_size"], m["model"]
    zero = sha(bytes(size))
    h = connect(a.uri, True)
    bad = []
    for slot in range(m["slots"]):
        got = sha(h.pread(size, slot * size))
        allowed = model.get(str(slot), [zero])
        if got not in allowed:
            bad.append(slot)
    h.shutdown()
    if bad:
        print(f"{len(bad)} slot(s) differ from what was acknowledged: {bad[:20]}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"verified": m["slots"]}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["write", "verify"])
    p.add_argument("uri")
    p.add_argument("--slots", type=int, default=512)
    p.add_argument("--slot-size", type=int, default=65536)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--ready")
    p.add_argument("--stop")
    p.add_argument("--model", required=True)
    p.add_argument("--reconnect", action="store_true")
    p.add_argument("--fua-every", type=int, default=0)
    p.add_argument("--flush-every", type=int, default=0)
    p.add_argument("--crash", action="store_true")
    p.add_argument("--seed", type=int, default=None)
    a = p.parse_args()
    write(a) if a.mode == "write" else verify(a)


if __name__ == "__main__":
    main()
