#!/bin/bash
# cpuop.sh ROUNDS BACKEND(memory|file) CMD_A -- CMD_B : server CPU us/op for two nbd-rs command lines
# (use {PORT} and {IMG} in the commands), alternating, median of ROUNDS. For A/B tests of changes.
set -u
. "$(dirname "$0")/lib.sh"
R=$1 B=$2; shift 2
A=(); while [ "$1" != -- ]; do A+=("$1"); shift; done; shift; C=("$@")
W=$(mktemp -d -p /var/tmp cpuop.XXXXXX); P=()
trap 'for p in "${P[@]}"; do kill $p 2>/dev/null; wait $p 2>/dev/null; done; rm -rf $W' EXIT
launch() { local po=$(free_port) img=$W/$1.img; [ $B = file ] && fallocate -l 1G $img; shift
  local args=(); for a in "$@"; do a=${a//\{PORT\}/$po}; args+=("${a//\{IMG\}/$img}"); done
  env "${args[@]}" >$W/log.$po 2>&1 & P+=($!); SP=$!; U=nbd://127.0.0.1:$po/disk
  for i in $(seq 100); do nbdinfo --size $U >/dev/null 2>&1 && return; sleep 0.1; done; cat $W/log.$po; exit 1; }
launch a "${A[@]}"; PA=$SP UA=$U; launch b "${C[@]}"; PB=$SP UB=$U
one() { local t0=$(cpu_ticks $2); fio --name=j --ioengine=nbd --uri=$1 --rw=$3 --bs=$4 --iodepth=$5 --size=512M --io_size=$(awk -v n=$6 -v b=$7 'BEGIN{printf "%.0f", n*b}') >/dev/null 2>&1
  awk -v d=$(( $(cpu_ticks $2) - t0 )) -v n=$6 'BEGIN{printf "%.2f\n", d/100*1e6/n}'; }
for j in "seqwrite write 1M 8 4000 1048576" "seqread read 1M 8 4000 1048576" "randread4k randread 4k 32 200000 4096" "randwrite4k randwrite 4k 32 200000 4096"; do
  set -- $j; : >$W/a; : >$W/b
  for r in $(seq $R); do
    if [ $((r%2)) = 1 ]; then one $UA $PA $2 $3 $4 $5 $6 >>$W/a; one $UB $PB $2 $3 $4 $5 $6 >>$W/b
    else one $UB $PB $2 $3 $4 $5 $6 >>$W/b; one $UA $PA $2 $3 $4 $5 $6 >>$W/a; fi
  done
  a=$(median <$W/a) b=$(median <$W/b)
  printf '%-12s A %8s us/op  B %8s us/op  B/A %.2f   (A: %s | B: %s)\n' $1 $a $b $(awk -v a=$a -v b=$b 'BEGIN{print b/a}') "$(tr '\n' ' ' <$W/a)" "$(tr '\n' ' ' <$W/b)"
done
