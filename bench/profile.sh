#!/bin/bash
# profile.sh: where nbd-rs spends CPU, per fio job, on raw memory and raw file.
# For each job: perf record (DWARF call graphs) on the server during a timed fio run, then
# syscalls per request (perf stat on syscall tracepoints around a fixed-count run), for nbd-rs
# and, for the syscall counts, nbdkit. Output in OUT (default bench/profile-out/).
# Usage: bench/profile.sh [--bin PATH] [--only memory|file] [--secs N] [--out DIR] [--no-kit]
set -u -o pipefail
. "$(dirname "$0")/lib.sh"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/target/release/nbd-rs ONLY=() SECS=6 OUT=$ROOT/bench/profile-out KIT=1
while [ $# -gt 0 ]; do
  case $1 in
    --bin) BIN=$2; shift 2 ;; --only) ONLY+=("$2"); shift 2 ;; --secs) SECS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;; --no-kit) KIT=0; shift ;;
    *) echo "profile.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[ ${#ONLY[@]} -eq 0 ] && ONLY=(memory file)
mkdir -p "$OUT"
WORK=$(mktemp -d -p "${TMPDIR:-/var/tmp}" nbd-profile.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; rm -rf "$WORK"; }
trap cleanup EXIT; trap 'exit 130' INT TERM HUP
wait_up() { for i in $(seq 300); do nbdinfo --size "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "no server at $1" >&2; exit 1; }
JOBS=("seqwrite write 1M 8 4000" "seqread read 1M 8 4000" "randread4k randread 4k 32 100000" "randwrite4k randwrite 4k 32 100000")
EVENTS=raw_syscalls:sys_enter
for s in read readv recvfrom recvmsg write writev sendto sendmsg pread64 pwrite64 splice setsockopt futex epoll_wait epoll_ctl sched_yield madvise mmap munmap mprotect brk io_uring_enter; do
  EVENTS+=",syscalls:sys_enter_$s"
done
EVENTS+=",context-switches"

# syscalls WHO URI PID rw bs qd n: syscalls per op
syscalls() {
  local who=$1 uri=$2 pid=$3 rw=$4 bs=$5 qd=$6 n=$7
  local f=$OUT/$8-$who.syscalls
  local bytes; bytes=$(awk -v n="$n" -v bs="$bs" 'BEGIN{ m = (bs ~ /M$/) ? 1048576 : 1024; sub(/[kKM]$/,"",bs); printf "%.0f", n*bs*m }')
  perf stat -x, -o "$f.raw" -e "$EVENTS" -p "$pid" 2>/dev/null & local sp=$!
  sleep 0.5
  fio --name=j --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" --size=512M --io_size="$bytes" >/dev/null 2>&1
  kill -INT $sp; wait $sp
  awk -F, -v n="$n" '$1 ~ /^[0-9]+$/ && $1 > 0 { printf "%-36s %10d %8.3f/op\n", $3, $1, $1/n }' "$f.raw" >"$f"
}

for backend in "${ONLY[@]}"; do
  port=$(free_port)
  if [ "$backend" = memory ]; then
    "$BIN" -l 127.0.0.1:$port -e disk raw memory:1GiB >"$WORK/rs.log" 2>&1 & RS=$!
    kargs=(memory 1G)
  else
    fallocate -l 1G "$WORK/rs.img"; fallocate -l 1G "$WORK/kit.img"
    "$BIN" -l 127.0.0.1:$port -e disk raw "file:$WORK/rs.img" >"$WORK/rs.log" 2>&1 & RS=$!
    kargs=(file "$WORK/kit.img")
  fi
  PIDS+=($RS); uri=nbd://127.0.0.1:$port/disk; wait_up "$uri"
  if [ $KIT = 1 ]; then
    kport=$(free_port); nbdkit -f -i 127.0.0.1 -p $kport --exit-with-parent "${kargs[@]}" & KP=$!
    PIDS+=($KP); kuri=nbd://127.0.0.1:$kport/; wait_up "$kuri"
  fi
  for j in "${JOBS[@]}"; do
    set -- $j; name=$backend-$1
    echo "== $name" >&2
    fio --name=j --ioengine=nbd --uri="$uri" --rw="$2" --bs="$3" --iodepth="$4" --size=512M \
        --time_based --runtime=$((SECS + 2)) >/dev/null 2>&1 & F=$!
    sleep 1
    perf record -q -F 999 --call-graph dwarf,16384 -p $RS -o "$OUT/$name.data" -- sleep "$SECS" >/dev/null 2>&1
    wait $F
    perf report -i "$OUT/$name.data" --no-children --sort symbol --stdio -g none --percent-limit 1 2>/dev/null \
      | grep -v '^#' | grep -v '^$' | head -40 >"$OUT/$name.flat"
    perf report -i "$OUT/$name.data" --children --sort symbol --stdio -g none --percent-limit 3 2>/dev/null \
      | grep -v '^#' | grep -v '^$' | head -60 >"$OUT/$name.incl"
    perf report -i "$OUT/$name.data" --no-children --sort symbol --stdio -g caller,2,callee,function,percent --percent-limit 3 2>/dev/null \
      | grep -v '^$' | head -300 >"$OUT/$name.chains"
    syscalls rs "$uri" $RS "$2" "$3" "$4" "$5" "$name"
    [ $KIT = 1 ] && syscalls kit "$kuri" $KP "$2" "$3" "$4" "$5" "$name"
  done
  kill $RS; wait $RS 2>/dev/null
  [ $KIT = 1 ] && { kill $KP; wait $KP 2>/dev/null; }
  rm -f "$WORK"/*.img
done
echo "profiles and syscall counts in $OUT" >&2
