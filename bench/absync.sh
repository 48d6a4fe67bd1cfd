#!/bin/bash
# absync.sh ROUNDS RT fsync|fua BIN_A BIN_B: durable small writes to a raw image under two
# nbd-rs builds. Each serves raw -> file (a fresh fallocated 1 GiB image); a client writes
# 4 KiB at random within 512 MiB, 32 deep, for RT seconds a round, alternating A and B:
#   fsync  fio's nbd engine with --fsync=256 (which sends a FLUSH for about every ten writes)
#   fua    libnbd's Python binding, every write with FUA (as qemu-io's default cache mode does)
# Prints the medians of writes a second, server CPU us per write, voluntary context switches
# per write and the server's thread count after the round, with the ratios B/A. For example:
#   bench/absync.sh 6 4 fua /var/tmp/nbd-rs.before target/release/nbd-rs
set -u
. "$(dirname "$0")/lib.sh"
[ $# = 5 ] || { echo "usage: absync.sh ROUNDS RT fsync|fua BIN_A BIN_B" >&2; exit 2; }
R=$1 RT=$2 JOB=$3 BA=$4 BB=$5
case $JOB in fsync|fua) ;; *) echo "absync.sh: the job is fsync or fua, not $JOB" >&2; exit 2 ;; esac
W=$(mktemp -d -p /var/tmp absync.XXXXXX); P=()
trap 'for p in "${P[@]}"; do kill $p 2>/dev/null; wait $p 2>/dev/null; done; rm -rf $W' EXIT
cat >$W/fua.py <<'PY'
import nbd, os, random, sys, time
uri, secs, depth = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
buf = nbd.Buffer.from_bytearray(bytearray(os.urandom(4096)))
state = {"done": 0, "inflight": 0}
def finished(err):
    state["done"] += 1
    state["inflight"] -= 1
    return 0
rnd = random.Random(1)
end = time.monotonic() + secs
while time.monotonic() < end:
    while state["inflight"] < depth:
        h.aio_pwrite(buf, rnd.randrange(0, 512 << 20, 4096), completion=finished,
                     flags=nbd.CMD_FLAG_FUA)
        state["inflight"] += 1
    h.poll(-1)
while state["inflight"]:
    h.poll(-1)
print(state["done"])
PY
launch() { local po=$(free_port); fallocate -l 1G $W/$1.img
  $2 -l 127.0.0.1:$po -e disk raw file:$W/$1.img >$W/log.$1 2>&1 & P+=($!); SP=$!; U=nbd://127.0.0.1:$po/disk
  for i in $(seq 100); do nbdinfo --size $U >/dev/null 2>&1 && return; sleep 0.1; done; cat $W/log.$1; exit 1; }
launch a $BA; PA=$SP UA=$U; launch b $BB; PB=$SP UB=$U
switches() { awk '/^voluntary_ctxt_switches/ {s += $2} END {print s}' /proc/$1/task/*/status 2>/dev/null; }
# One round against URI $1 served by PID $2: "writes/s us/write switches/write threads".
one() { settle; local t0=$(cpu_ticks $2) s0=$(switches $2) n
  if [ $JOB = fua ]; then
    n=$(/usr/bin/python3 $W/fua.py $1 $RT 32)
  else
    n=$(fio --name=j --ioengine=nbd --uri=$1 --rw=randwrite --bs=4k --iodepth=32 --fsync=256 --size=512M \
      --time_based --runtime=$RT --output-format=terse --terse-version=3 2>/dev/null | awk -F';' 'NF>40 {print $47/4}')
  fi
  awk -v n=${n:-0} -v d=$(( $(cpu_ticks $2) - t0 )) -v s=$(( $(switches $2) - s0 )) -v rt=$RT \
    -v th=$(ls /proc/$2/task | wc -l) \
    'BEGIN{ if (n > 0) printf "%d %.1f %.2f %d\n", n/rt, d/100*1e6/n, s/n, th; else print "nan nan nan nan" }'; }
: >$W/ra; : >$W/rb
for r in $(seq $R); do
  if [ $((r%2)) = 1 ]; then one $UA $PA >>$W/ra; one $UB $PB >>$W/rb; else one $UB $PB >>$W/rb; one $UA $PA >>$W/ra; fi
done
col() { local a b; a=$(cut -d' ' -f$2 $W/ra | median) b=$(cut -d' ' -f$2 $W/rb | median)
  printf '%-18s A %-8s B %-8s B/A %.2f\n' "$1" $a $b $(awk -v a=$a -v b=$b 'BEGIN{print (a > 0) ? b/a : "nan"}'); }
echo "job=$JOB (medians of $R rounds of ${RT}s)"
col "writes/s" 1; col "CPU us/write" 2; col "switches/write" 3; col "threads" 4
echo "A: $(tr '\n' ' ' <$W/ra)"; echo "B: $(tr '\n' ' ' <$W/rb)"
