#!/bin/bash
# abtput.sh ROUNDS JOB RT CMD_A -- CMD_B: fio throughput of two server command lines, alternating,
# median MiB/s of ROUNDS runs of RT seconds each, and the ratio B/A. JOB is seqread, seqwrite
# (1 MiB, depth 8), randread4k or randwrite4k (4 KiB, depth 32). In the commands, {PORT} is a
# free port and {IMG} a fresh fallocated 1 GiB image; both servers must serve an export "disk"
# (nbdkit's -e disk does). The span is prefilled first so that reads read data. For example:
#   bench/abtput.sh 6 seqread 4 target/release/nbd-rs -l 127.0.0.1:{PORT} -e disk raw file:{IMG} \
#     -- nbdkit -f -p {PORT} -i 127.0.0.1 -e disk file {IMG}
# bench/cpuop.sh is its CPU-per-operation counterpart.
set -u
. "$(dirname "$0")/lib.sh"
R=$1 J=$2 RT=$3; shift 3
A=(); while [ "$1" != -- ]; do A+=("$1"); shift; done; shift; C=("$@")
W=$(mktemp -d -p /var/tmp tput.XXXXXX); P=()
trap 'for p in "${P[@]}"; do kill $p 2>/dev/null; wait $p 2>/dev/null; done; rm -rf $W' EXIT
launch() { local po=$(free_port) img=$W/$1.img; fallocate -l 1G $img; shift
  local args=(); for a in "$@"; do a=${a//\{PORT\}/$po}; args+=("${a//\{IMG\}/$img}"); done
  env "${args[@]}" >$W/log.$po 2>&1 & P+=($!); SP=$!; U=nbd://127.0.0.1:$po/disk
  for i in $(seq 100); do nbdinfo --size $U >/dev/null 2>&1 && return; sleep 0.1; done; cat $W/log.$po; exit 1; }
launch a "${A[@]}"; UA=$U; launch b "${C[@]}"; UB=$U
case $J in seqwrite) rw=write bs=1M qd=8;; seqread) rw=read bs=1M qd=8;; randread4k) rw=randread bs=4k qd=32;; randwrite4k) rw=randwrite bs=4k qd=32;; esac
one() { fio --name=j --ioengine=nbd --uri=$1 --rw=$rw --bs=$bs --iodepth=$qd --size=512M --time_based --runtime=$RT --ramp_time=1 --output-format=terse --terse-version=3 2>/dev/null | awk -F';' '$8+$49>0 {printf "%.0f\n", ($7+$48)/1024}'; }
# prefill for reads
for u in $UA $UB; do fio --name=f --ioengine=nbd --uri=$u --rw=write --bs=1M --iodepth=8 --size=512M >/dev/null 2>&1; done
: >$W/a; : >$W/b
for r in $(seq $R); do
  if [ $((r%2)) = 1 ]; then settle; one $UA >>$W/a; settle; one $UB >>$W/b; else settle; one $UB >>$W/b; settle; one $UA >>$W/a; fi
done
a=$(median <$W/a) b=$(median <$W/b)
printf '%-12s A %8s MiB/s  B %8s MiB/s  B/A %.2f   (A: %s | B: %s)\n' $J $a $b $(awk -v a=$a -v b=$b 'BEGIN{print b/a}') "$(tr '\n' ' ' <$W/a)" "$(tr '\n' ' ' <$W/b)"
