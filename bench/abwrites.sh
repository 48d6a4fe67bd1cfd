#!/bin/bash
# abwrites.sh ROUNDS BIN_A BIN_B DRIVER CONN: two nbd-rs builds under 1 MiB sequential writes
# (fio's nbd engine, depth 8, 4,000 writes after a 512 MiB prefill) to the ad-hoc export
# `-e disk DRIVER CONN`, alternating, one server per build for all rounds. Per write, medians of
# ROUNDS: system calls, epoll_wait calls, setsockopt calls and context switches of the server
# (perf stat), and its CPU time (/proc/PID/stat). In CONN, {IMG} is a fresh fallocated 1 GiB
# image and {DIR} a fresh directory, one per build (also its STATE_DIRECTORY, where a cache
# goes). For example:
#   bench/abwrites.sh 3 /tmp/old target/release/nbd-rs raw 'file:{IMG}'
#   bench/abwrites.sh 3 /tmp/old target/release/nbd-rs sharded 'cache:file:{DIR}/?size=1GiB'
set -u
. "$(dirname "$0")/lib.sh"
R=$1 BA=$2 BB=$3 DRIVER=$4 CONN=$5
W=$(mktemp -d -p /var/tmp abwrites.XXXXXX); P=()
trap 'for p in "${P[@]}"; do kill $p 2>/dev/null; wait $p 2>/dev/null; done; rm -rf $W' EXIT
EVENTS='raw_syscalls:sys_enter,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_setsockopt,context-switches'
launch() { # name binary: sets SP (pid) and U (uri)
  local po; po=$(free_port); mkdir -p "$W/$1"
  local conn=${CONN//\{DIR\}/$W/$1}
  if [[ $conn == *"{IMG}"* ]]; then fallocate -l 1G "$W/$1.img"; conn=${conn//\{IMG\}/$W/$1.img}; fi
  # Its own state directory: a cache goes under it, not under /var/lib/nbd-rs.
  STATE_DIRECTORY=$W/$1 "$2" -l 127.0.0.1:$po -e disk "$DRIVER" "$conn" >"$W/$1.log" 2>&1 & SP=$!; P+=($SP)
  U=nbd://127.0.0.1:$po/disk
  for i in $(seq 100); do nbdinfo --size $U >/dev/null 2>&1 && break; sleep 0.1; done
  nbdinfo --size $U >/dev/null 2>&1 || { cat "$W/$1.log"; exit 1; }
  fio --name=prefill --ioengine=nbd --uri=$U --rw=write --bs=1M --iodepth=8 --size=512M >/dev/null 2>&1
}
launch a "$BA"; PA=$SP UA=$U; launch b "$BB"; PB=$SP UB=$U
one() { # uri pid out-prefix
  perf stat -x, -o "$W/st" -e "$EVENTS" -p $2 2>/dev/null & local sp=$!
  sleep 0.3; local t0; t0=$(cpu_ticks $2)
  fio --name=j --ioengine=nbd --uri=$1 --rw=write --bs=1M --iodepth=8 --size=512M --io_size=4000M >/dev/null 2>&1
  local t1; t1=$(cpu_ticks $2); kill -INT $sp; wait $sp
  awk -F, '$1 ~ /^[0-9]+$/ { print $3, $1/4000 }' "$W/st" | while read -r e v; do echo "$v" >>"$3.$e"; done
  awk -v d=$((t1 - t0)) 'BEGIN{ print d/100*1e6/4000 }' >>"$3.cpu-us"
}
for r in $(seq "$R"); do
  if [ $((r % 2)) = 1 ]; then one $UA $PA $W/a; one $UB $PB $W/b; else one $UB $PB $W/b; one $UA $PA $W/a; fi
done
echo "per 1 MiB write, medians of $R: $DRIVER $CONN"
for e in raw_syscalls:sys_enter syscalls:sys_enter_epoll_wait syscalls:sys_enter_setsockopt context-switches cpu-us; do
  a=$(median <"$W/a.$e") b=$(median <"$W/b.$e")
  printf '%-16s A %8.2f  B %8.2f  B/A %s\n' "$(echo $e | sed 's/raw_syscalls:sys_enter/syscalls/; s/syscalls:sys_enter_//')" "$a" "$b" \
    "$(awk -v a="$a" -v b="$b" 'BEGIN{ if (a > 0) printf "%.2f", b/a; else print "-" }')"
done
