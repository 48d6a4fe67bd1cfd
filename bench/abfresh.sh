#!/bin/bash
# abfresh.sh ROUNDS RT local|store BIN_A BIN_B: a burst of writes onto a fresh write-back cache,
# under two nbd-rs builds. Each round starts a new server on an empty cache -> sharded -> file
# (cache 2 GiB, max_dirty 2 GiB, flush = local or store), runs fio's 4 KiB random writes, 32
# deep, with an fsync every 256 writes over 512 MiB for RT seconds, then waits until the server
# is idle (every block completed and uploaded). Prints medians and ratios B/A of: IOPS, server
# CPU for the whole round (burst and uploads), bytes the server wrote to disk
# (/proc/PID/io write_bytes: cache file, index and the file store below), and the cache file's
# allocated size afterwards. Rounds alternate A and B. For example:
#   bench/abfresh.sh 3 3 local /var/tmp/nbd-rs.before target/release/nbd-rs
set -u
. "$(dirname "$0")/lib.sh"
[ $# = 5 ] || { echo "usage: abfresh.sh ROUNDS RT local|store BIN_A BIN_B" >&2; exit 2; }
R=$1 RT=$2 FL=$3 BA=$4 BB=$5
W=$(mktemp -d -p /var/tmp abfresh.XXXXXX); P=()
trap 'for p in "${P[@]}"; do kill $p 2>/dev/null; wait $p 2>/dev/null; done; rm -rf $W' EXIT
# One round of binary $1: "IOPS cpu-seconds disk-MiB cache-file-MiB".
one() {
  local po=$(free_port) d=$W/run sp u t0 io i a b
  rm -rf $d; mkdir -p $d/store
  cache_toml $po $d $FL >$d/c.toml
  $1 --config $d/c.toml >$d/log 2>&1 & P+=($!); sp=$!; u=nbd://127.0.0.1:$po/disk
  for i in $(seq 100); do nbdinfo --size $u >/dev/null 2>&1 && break; sleep 0.1; done
  t0=$(cpu_ticks $sp)
  io=$(fio --name=j --ioengine=nbd --uri=$u --rw=randwrite --bs=4k --iodepth=32 --fsync=256 --size=512M \
    --time_based --runtime=$RT --output-format=terse --terse-version=3 2>/dev/null | awk -F';' 'NF>40 {print $49+0}')
  for i in $(seq 240); do a=$(cpu_ticks $sp); sleep 0.5; b=$(cpu_ticks $sp); [ $((b-a)) -le 1 ] && break; done
  echo "${io:-nan} $(awk -v d=$(( $(cpu_ticks $sp) - t0 )) 'BEGIN{printf "%.2f", d/100}') \
$(( $(awk '/^write_bytes/{print $2}' /proc/$sp/io) >> 20 )) $(( $(stat -c %b $d/cache/cache.data) * 512 >> 20 ))"
  kill $sp; wait $sp 2>/dev/null
}
: >$W/ra; : >$W/rb
for r in $(seq $R); do
  if [ $((r%2)) = 1 ]; then one $BA >>$W/ra; one $BB >>$W/rb; else one $BB >>$W/rb; one $BA >>$W/ra; fi
done
col() { cut -d' ' -f$1 $2 | median; }
printf 'flush=%-5s  %-14s %10s %10s %6s\n' $FL metric A B B/A
for c in "1 IOPS" "2 cpu-s" "3 disk-MiB" "4 cachefile-MiB"; do
  set -- $c; a=$(col $1 $W/ra) b=$(col $1 $W/rb)
  printf '             %-14s %10s %10s %6.2f\n' $2 $a $b $(awk -v a=$a -v b=$b 'BEGIN{print (a>0)? b/a : 0}')
done
echo "rounds A: $(tr '\n' '|' <$W/ra)"
echo "rounds B: $(tr '\n' '|' <$W/rb)"
