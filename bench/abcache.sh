#!/bin/bash
# abcache.sh ROUNDS RT FLUSH BIN_A BIN_B: a write-back cache's writes under two nbd-rs builds.
# Each serves cache -> sharded -> file (cache 2 GiB, max_dirty 2 GiB, flush = FLUSH: local or
# store); fio writes 4 KiB at random, 32 deep, with an fsync every 256 writes, for RT seconds
# a round, alternating A and B. Prints the median IOPS and server CPU us per write and the
# ratios B/A. Before each round it waits until both servers are idle: the other one's uploads
# to the file store would otherwise compete for the disk. For example:
#   bench/abcache.sh 4 4 store /var/tmp/nbd-rs.before target/release/nbd-rs
set -u
. "$(dirname "$0")/lib.sh"
[ $# = 5 ] || { echo "usage: abcache.sh ROUNDS RT local|store BIN_A BIN_B" >&2; exit 2; }
R=$1 RT=$2 FL=$3 BA=$4 BB=$5
W=$(mktemp -d -p /var/tmp abcache.XXXXXX); P=()
trap 'for p in "${P[@]}"; do kill $p 2>/dev/null; wait $p 2>/dev/null; done; rm -rf $W' EXIT
launch() { local po=$(free_port); mkdir -p $W/$1/store
  cache_toml $po $W/$1 $FL >$W/$1.toml
  $2 --config $W/$1.toml >$W/log.$1 2>&1 & P+=($!); SP=$!; U=nbd://127.0.0.1:$po/disk
  for i in $(seq 100); do nbdinfo --size $U >/dev/null 2>&1 && return; sleep 0.1; done; cat $W/log.$1; exit 1; }
launch a $BA; PA=$SP UA=$U; launch b $BB; PB=$SP UB=$U
idle() { local a b; for i in $(seq 120); do a=$(( $(cpu_ticks $PA) + $(cpu_ticks $PB) )); sleep 0.5
  b=$(( $(cpu_ticks $PA) + $(cpu_ticks $PB) )); [ $((b-a)) -le 1 ] && return; done; }
# One round against URI $1 served by PID $2: "IOPS us/op".
one() { idle; local t0=$(cpu_ticks $2) io
  io=$(fio --name=j --ioengine=nbd --uri=$1 --rw=randwrite --bs=4k --iodepth=32 --fsync=256 --size=512M \
    --time_based --runtime=$RT --output-format=terse --terse-version=3 2>/dev/null | awk -F';' 'NF>40 {print $49+0, $47/4}')
  set -- $io $(( $(cpu_ticks $2) - t0 ))
  awk -v iops=$1 -v ios=$2 -v d=$3 'BEGIN{ if (ios > 0) printf "%d %.1f\n", iops, d/100*1e6/ios; else print "nan nan" }'; }
: >$W/ra; : >$W/rb
for r in $(seq $R); do
  if [ $((r%2)) = 1 ]; then one $UA $PA >>$W/ra; one $UB $PB >>$W/rb; else one $UB $PB >>$W/rb; one $UA $PA >>$W/ra; fi
done
ia=$(cut -d' ' -f1 $W/ra | median) ib=$(cut -d' ' -f1 $W/rb | median)
ca=$(cut -d' ' -f2 $W/ra | median) cb=$(cut -d' ' -f2 $W/rb | median)
printf 'flush=%-5s IOPS A %s B %s B/A %.2f   CPU us/op A %s B %s B/A %.2f   (A: %s| B: %s)\n' $FL \
  $ia $ib $(awk -v a=$ia -v b=$ib 'BEGIN{print b/a}') $ca $cb $(awk -v a=$ca -v b=$cb 'BEGIN{print b/a}') \
  "$(tr '\n' ' ' <$W/ra)" "$(tr '\n' ' ' <$W/rb)"
