#!/bin/bash
# scale.sh [ROUNDS] [RT] [CONNS] [EXPORTS] [BIN]: what many exports and idle connections cost one
# nbd-rs server. It serves EXPORTS (default 100) memory exports x0.. plus "disk", then reports:
#   - resident size of the idle server;
#   - resident size with CONNS (default 1000) idle connections spread over the exports, each of
#     which first wrote, read and trimmed 1 MiB (so that its buffers have been used), 2 s after
#     the last one opened, and the cost per connection. Freed memory stays with the allocator,
#     so this is the high-water mark of the opening burst more than what idle connections hold
#     (tests/protocol.rs idle_connections_give_their_read_buffers_back checks that);
#   - fio throughput on "disk" (4 KiB random reads at depth 32, 1 MiB sequential reads at depth 8)
#     without and with those connections open, in alternating rounds: medians and the ratio.
# A benchmark, not a test. Needs nbdinfo, libnbd's Python binding (/usr/bin/python3) and fio.
# CONNS plus fio's connection must stay within the server's max_connections (1024).
set -u
. "$(dirname "$0")/lib.sh"
R=${1:-3} RT=${2:-5} N=${3:-1000} E=${4:-100}
BIN=${5:-$(cd "$(dirname "$0")/.." && pwd)/target/release/nbd-rs}
[ -x "$BIN" ] || { echo "scale.sh: $BIN is missing: run cargo build --release" >&2; exit 1; }
W=$(mktemp -d -p /var/tmp scale.XXXXXX); SP=; HP=
trap '[ -n "$HP" ] && kill $HP 2>/dev/null; [ -n "$SP" ] && kill $SP 2>/dev/null; wait 2>/dev/null; rm -rf $W' EXIT
# The holder needs a descriptor per connection.
ulimit -n "$(ulimit -Hn)"
PORT=$(free_port)
args=(-l 127.0.0.1:$PORT -e disk raw memory:1GiB)
for i in $(seq 0 $((E - 1))); do args+=(-e x$i raw memory:64MiB); done
"$BIN" "${args[@]}" >$W/log 2>&1 & SP=$!
U=nbd://127.0.0.1:$PORT
for i in $(seq 100); do nbdinfo --size $U/disk >/dev/null 2>&1 && break; sleep 0.1; done
nbdinfo --size $U/disk >/dev/null 2>&1 || { cat $W/log; exit 1; }
rss() { awk '/^VmRSS/ {print $2}' /proc/$SP/status; }
sleep 0.5
rss_idle=$(rss)

cat >$W/hold.py <<'EOF'
import sys
import nbd
base, conns, exports = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = b"\x5a" * (1 << 20)
handles = []
for i in range(conns):
    h = nbd.NBD()
    h.connect_uri(f"{base}/x{i % exports}")
    h.pwrite(data, 0)
    assert h.pread(1 << 20, 0) == data
    h.trim(1 << 20, 0)
    handles.append(h)
print("ready", flush=True)
sys.stdin.read()
EOF
hold_start() {
  rm -f $W/in; mkfifo $W/in
  /usr/bin/python3 $W/hold.py $U $N $E <$W/in >$W/hold.out 2>&1 & HP=$!
  exec 3>$W/in
  for i in $(seq 600); do grep -q ready $W/hold.out && return; kill -0 $HP 2>/dev/null || break; sleep 0.1; done
  echo "scale.sh: the idle connections did not open:" >&2; cat $W/hold.out >&2; exit 1
}
hold_stop() { exec 3>&-; wait $HP; HP=; }

one() { fio --name=j --ioengine=nbd --uri=$U/disk --rw=$1 --bs=$2 --iodepth=$3 --size=512M \
  --time_based --runtime=$RT --ramp_time=1 --output-format=terse --terse-version=3 2>/dev/null |
  awk -F';' -v bs=$2 'NF > 100 { if (bs == "4k") printf "%.0f\n", $8; else printf "%.0f\n", $7/1024 }'; }
jobs=("randread 4k 32" "read 1M 8")
fio --name=f --ioengine=nbd --uri=$U/disk --rw=write --bs=1M --iodepth=8 --size=512M >/dev/null 2>&1
rss_filled=$(rss)
run_jobs() { local k=0; for j in "${jobs[@]}"; do one $j >>$W/$1.$k; k=$((k + 1)); done; }
for r in $(seq $R); do
  if [ $((r % 2)) = 1 ]; then
    run_jobs alone; hold_start; sleep 2; rss_held=$(rss); run_jobs held; hold_stop
  else
    hold_start; sleep 2; rss_held=$(rss); run_jobs held; hold_stop; run_jobs alone
  fi
done
sleep 0.5
rss_after=$(rss)
echo "nbd-rs $("$BIN" --version 2>/dev/null | head -1), $E memory exports + disk, $N idle connections, $R rounds of ${RT}s"
printf 'resident, idle server:                    %6d KiB\n' $rss_idle
printf 'resident, disk holding 512 MiB:           %6d KiB\n' $rss_filled
printf 'resident, with %4d idle connections:     %6d KiB  (%.1f KiB per connection)\n' $N $rss_held \
  $(awk -v a=$rss_held -v b=$rss_filled -v n=$N 'BEGIN{print (a-b)/n}')
printf 'resident, after they closed:              %6d KiB\n' $rss_after
k=0
for j in "${jobs[@]}"; do
  set -- $j
  a=$(median <$W/alone.$k) b=$(median <$W/held.$k)
  unit=$([ $2 = 4k ] && echo IOPS || echo MiB/s)
  printf '%-9s %-3s alone %8s %-5s  with idle connections %8s  ratio %.2f   (alone: %s| with: %s)\n' \
    $1 $2 $a $unit $b $(awk -v a=$a -v b=$b 'BEGIN{print b/a}') "$(tr '\n' ' ' <$W/alone.$k)" "$(tr '\n' ' ' <$W/held.$k)"
  k=$((k + 1))
done
