#!/bin/bash
# wan.sh ROUNDS JOB RT DELAY_MS RATE_MBIT CMD_A -- CMD_B: fio throughput of two server command
# lines across an emulated network link, alternating: median MiB/s of ROUNDS runs of RT seconds
# and the ratio B/A. The servers run in one private network namespace and fio in another,
# joined by bench/delaylink.py with DELAY_MS each way (round trips of twice that) at RATE_MBIT
# (0: as fast as the forwarder goes). Loopback's round trips of microseconds hide what a real
# network's do to TCP's windows; this shows it without touching the machine's own network (this
# kernel has no netem). JOB is as in abtput.sh. In the commands, {ADDR} is the server's address,
# {PORT} its port, {IMG} a fresh 1 GiB image and {DIR} a fresh directory (also the server's
# STATE_DIRECTORY); both must serve an export "disk". Needs root (namespaces, TUN). For example:
#   bench/wan.sh 5 seqwrite 6 10 0 /var/tmp/old -l {ADDR}:{PORT} -e disk raw memory:1GiB \
#     -- target/release/nbd-rs -l {ADDR}:{PORT} -e disk raw memory:1GiB
#   bench/wan.sh 5 seqread 6 2 0 target/release/nbd-rs -l {ADDR}:{PORT} -e disk raw file:{IMG} \
#     -- nbdkit -f -i {ADDR} -p {PORT} -e disk file {IMG}
set -u
. "$(dirname "$0")/lib.sh"
R=$1 J=$2 RT=$3 D=$4 RATE=$5; shift 5
A=(); while [ "$1" != -- ]; do A+=("$1"); shift; done; shift; C=("$@")
NC=nbdwan-c$$ NS=nbdwan-s$$
W=$(mktemp -d -p /var/tmp wan.XXXXXX); P=()
trap 'for p in "${P[@]}"; do kill $p 2>/dev/null; wait $p 2>/dev/null; done
      ip netns del $NC 2>/dev/null; ip netns del $NS 2>/dev/null; rm -rf $W' EXIT
ip netns add $NC && ip netns add $NS || exit 1
python3 "$(dirname "$0")/delaylink.py" $NC $NS $D $RATE >$W/link 2>&1 & P+=($!)
for i in $(seq 50); do grep -q up $W/link && break; sleep 0.1; done
grep -q up $W/link || { cat $W/link; exit 1; }
launch() { local name=$1 port=$2 img=$W/$1.img dir=$W/$1.dir; shift 2; fallocate -l 1G $img
  mkdir -p $dir; local args=()
  for a in "$@"; do a=${a//\{ADDR\}/10.9.0.2}; a=${a//\{PORT\}/$port}; a=${a//\{IMG\}/$img}; args+=("${a//\{DIR\}/$dir}"); done
  ip netns exec $NS env STATE_DIRECTORY=$dir "${args[@]}" >$W/log.$name 2>&1 & P+=($!)
  U=nbd://10.9.0.2:$port/disk
  for i in $(seq 100); do ip netns exec $NC nbdinfo --size $U >/dev/null 2>&1 && return; sleep 0.1; done
  cat $W/log.$name; exit 1; }
launch a 10809 "${A[@]}"; UA=$U; launch b 10810 "${C[@]}"; UB=$U
case $J in seqwrite) rw=write bs=1M qd=8;; seqread) rw=read bs=1M qd=8;; randread4k) rw=randread bs=4k qd=32;; randwrite4k) rw=randwrite bs=4k qd=32;; esac
fio_in() { ip netns exec $NC fio --name=j --ioengine=nbd --uri=$1 "${@:2}"; }
one() { fio_in $1 --rw=$rw --bs=$bs --iodepth=$qd --size=512M --time_based --runtime=$RT --ramp_time=1 --output-format=terse --terse-version=3 2>/dev/null | awk -F';' '$8+$49>0 {printf "%.0f\n", ($7+$48)/1024}'; }
for u in $UA $UB; do fio_in $u --rw=write --bs=1M --iodepth=8 --size=512M >/dev/null 2>&1; done
: >$W/a; : >$W/b
for r in $(seq $R); do
  if [ $((r%2)) = 1 ]; then settle; one $UA >>$W/a; settle; one $UB >>$W/b; else settle; one $UB >>$W/b; settle; one $UA >>$W/a; fi
done
a=$(median <$W/a) b=$(median <$W/b)
printf '%-12s rtt %sms rate %s  A %8s MiB/s  B %8s MiB/s  B/A %.2f   (A: %s | B: %s)\n' $J $(awk -v d=$D 'BEGIN{print 2*d}') $RATE $a $b $(awk -v a=$a -v b=$b 'BEGIN{print b/a}') "$(tr '\n' ' ' <$W/a)" "$(tr '\n' ' ' <$W/b)"
