#!/bin/bash
# compare.sh: nbd-rs against nbdkit on loopback, same sitting, alternating order.
#
# Pairs (select with --only; default memory and file):
#   memory  nbd-rs -e disk raw memory:1GiB        vs  nbdkit memory 1G
#   file    nbd-rs -e disk raw file:IMG           vs  nbdkit file IMG2  (both 1 GiB, fallocated, same fs)
#   s3      nbd-rs -e vol sharded s3:URL?size=128MiB  vs  nbdkit --filter=blocksize S3 object-size=4M
#           against one moto_server; nbdcopy --flush of 128 MiB in, then a cold read to null:
#   cache   nbd-rs cache -> sharded -> s3 (moto), with flush = "store" (pair s3cache) and
#           flush = "local" (pair s3local), vs nbd-rs raw -> file (the "nbdkit" column here):
#           4 KiB random writes at depth 32 with a FLUSH every 256 (fio --fsync=256); each
#           server is started for its run and stopped after it (the stop uploads, unmeasured);
#           the cache is 2 GiB with max_dirty = CACHE_MAX_DIRTY (default 2GiB: the 512 MiB span
#           stays under the upload pressure mark, max_dirty / 2)
# For memory and file: the four fio jobs of shared/bench/nbd-fio.sh (throughput, median of the
# rounds), then server CPU per operation from /proc/PID/stat around fixed-count fio jobs.
# Before every timed job, `sync` writes back what the jobs before left dirty (lib.sh settle).
# For file also the cache pair's flush-heavy job (randw4k+fl256) against nbdkit file.
# Ratios are nbd-rs / nbdkit: above 1 is better for throughput, below 1 is better for CPU/op.
#
# Usage: bench/compare.sh [--rounds N] [--rt SECS] [--only memory|file|s3|cache] [--bin PATH]
#                         [--no-fio] [--no-cpu] [--cpu-scale F]
#   --rounds N     rounds per measurement (default 3); order of the servers alternates
#   --rt SECS      seconds per throughput job (default 8), plus 1 s ramp
#   --only PAIR    memory, file, s3 or cache (repeatable; default memory and file)
#   --bin PATH     the nbd-rs binary (default target/release/nbd-rs, built if missing)
#   --no-fio / --no-cpu   skip the throughput or the CPU part
#   --cpu-scale F  multiply the op counts of the CPU jobs (default 1: 200k x 4 KiB, 4k x 1 MiB)
# Env: SIZE (span exercised by fio, default 512M), TMPDIR (where images go, default /var/tmp).
set -u -o pipefail
. "$(dirname "$0")/lib.sh"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=3 RT=8 BIN="" ONLY=() DO_FIO=1 DO_CPU=1 SCALE=1
SIZE=${SIZE:-512M}
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --rt) RT=$2; shift 2 ;;
    --only) ONLY+=("$2"); shift 2 ;;
    --bin) BIN=$2; shift 2 ;;
    --no-fio) DO_FIO=0; shift ;;
    --no-cpu) DO_CPU=0; shift ;;
    --cpu-scale) SCALE=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "compare.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#ONLY[@]} -eq 0 ] && ONLY=(memory file)
for p in "${ONLY[@]}"; do
  case $p in memory|file|s3|cache) ;; *) echo "compare.sh: --only memory|file|s3|cache, not $p" >&2; exit 2 ;; esac
done
for tool in nbdkit nbdinfo fio nbdcopy python3; do
  command -v $tool >/dev/null || { echo "compare.sh: $tool is missing" >&2; exit 1; }
done
if [ -z "$BIN" ]; then
  BIN=$ROOT/target/release/nbd-rs
  if [ ! -x "$BIN" ]; then
    echo "building $BIN ..." >&2
    (cd "$ROOT" && cargo build --release >&2) || exit 1
  fi
fi
[ -x "$BIN" ] || { echo "compare.sh: no binary at $BIN" >&2; exit 1; }

WORK=$(mktemp -d -p "${TMPDIR:-/var/tmp}" nbd-compare.XXXXXX)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
CLK_TCK=$(getconf CLK_TCK)

# start NAME CMD...: starts a server in the background, logs to $WORK/NAME.log; sets SPID.
start() {
  local name=$1; shift
  "$@" >"$WORK/$name.log" 2>&1 &
  SPID=$!
  PIDS+=("$SPID")
}
# wait_up URI PID: until the export answers (30 s at most).
wait_up() {
  local i
  for i in $(seq 300); do
    nbdinfo --size "$1" >/dev/null 2>&1 && return 0
    kill -0 "$2" 2>/dev/null || break
    sleep 0.1
  done
  echo "compare.sh: server for $1 did not come up; its log:" >&2
  cat "$WORK"/*.log >&2
  exit 1
}
stop() { kill "$1" 2>/dev/null; wait "$1" 2>/dev/null; }

# fio_tp URI rw bs qd -> "MiB/s IOPS"
fio_tp() {
  fio --name=j --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" --size="$SIZE" \
      --time_based --runtime="$RT" --ramp_time=1 --output-format=terse --terse-version=3 2>/dev/null |
    awk -F';' '$8+$49>0 { printf "%.1f %d\n", ($7+$48)/1024, $8+$49 }'
}
# fio_count URI rw bs qd nops PID -> "usec_of_server_cpu_per_op ops_per_sec"
fio_count() {
  local t0 t1 s0 s1 bytes
  bytes=$(awk -v n="$5" -v bs="$3" 'BEGIN{ m = (bs ~ /M$/) ? 1048576 : 1024; sub(/[kKM]$/,"",bs); printf "%.0f", n*bs*m }')
  t0=$(cpu_ticks "$6"); s0=$(date +%s.%N)
  fio --name=j --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" --size="$SIZE" \
      --io_size="$bytes" --output-format=terse --terse-version=3 >/dev/null 2>&1
  t1=$(cpu_ticks "$6"); s1=$(date +%s.%N)
  awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$5" -v w="$(echo "$s1 - $s0" | bc -l)" \
    'BEGIN{ printf "%.2f %.0f\n", d/hz*1e6/n, n/w }'
}

RESULTS=$WORK/results   # lines: pair job metric who value
: >"$RESULTS"
JOBS=("seqwrite write 1M 8" "seqread read 1M 8" "randread4k randread 4k 32" "randwrite4k randwrite 4k 32")
cpu_ops() { case $1 in *4k*) echo $((200000 * SCALE)) ;; *) echo $((4000 * SCALE)) ;; esac; }

# bench_pair PAIR URI_RS PID_RS URI_REF PID_REF
bench_pair() {
  local pair=$1 uri_rs=$2 pid_rs=$3 uri_ref=$4 pid_ref=$5 r j who order
  if [ "$DO_FIO" = 1 ]; then
    for r in $(seq "$ROUNDS"); do
      for j in "${JOBS[@]}"; do
        set -- $j
        if [ $((r % 2)) = 1 ]; then order="rs ref"; else order="ref rs"; fi
        for who in $order; do
          local uri=$uri_rs; [ $who = ref ] && uri=$uri_ref
          settle
          read -r mib iops < <(fio_tp "$uri" "$2" "$3" "$4")
          echo "$pair $1 MiB/s $who ${mib:-nan}" >>"$RESULTS"
          echo "$pair $1 IOPS $who ${iops:-nan}" >>"$RESULTS"
          echo "  [$pair round $r] $1 $who: ${mib:-?} MiB/s ${iops:-?} IOPS" >&2
        done
      done
    done
  fi
  if [ "$DO_CPU" = 1 ]; then
    for r in $(seq "$ROUNDS"); do
      for j in "${JOBS[@]}"; do
        set -- $j
        local n; n=$(cpu_ops "$1")
        if [ $((r % 2)) = 1 ]; then order="rs ref"; else order="ref rs"; fi
        for who in $order; do
          local uri=$uri_rs pid=$pid_rs; [ $who = ref ] && { uri=$uri_ref; pid=$pid_ref; }
          settle
          read -r us ops < <(fio_count "$uri" "$2" "$3" "$4" "$n" "$pid")
          echo "$pair $1 cpu-us/op $who $us" >>"$RESULTS"
          echo "$pair $1 ops/s(cnt) $who $ops" >>"$RESULTS"
          echo "  [$pair round $r] $1 $who: $us us CPU/op over $n ops, $ops ops/s" >&2
        done
      done
    done
  fi
}

# 4 KiB random writes at depth 32 with a FLUSH every 256 (fio --fsync=256), alternating.
fio_flush() {
  fio --name=j --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --iodepth=32 --fsync=256 \
    --size="$SIZE" --time_based --runtime="$RT" --ramp_time=1 \
    --output-format=terse --terse-version=3 2>/dev/null | awk -F';' '$8+$49>0 { print $8+$49 }'
}

flush_pair() {
  local pair=$1 uri_rs=$2 uri_ref=$3 r who order uri iops
  [ "$DO_FIO" = 1 ] || return 0
  for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then order="rs ref"; else order="ref rs"; fi
    for who in $order; do
      uri=$uri_rs; [ $who = ref ] && uri=$uri_ref
      settle
      iops=$(fio_flush "$uri")
      echo "$pair randw4k+fl256 IOPS $who ${iops:-nan}" >>"$RESULTS"
      echo "  [$pair round $r] randw4k+fl256 $who: ${iops:-?} IOPS" >&2
    done
  done
}

run_memory() {
  local p1 p2 a b
  p1=$(free_port); start rs-memory "$BIN" -l "127.0.0.1:$p1" -e disk raw memory:1GiB; a=$SPID
  p2=$(free_port); start kit-memory nbdkit -f -i 127.0.0.1 -p "$p2" --exit-with-parent memory 1G; b=$SPID
  wait_up "nbd://127.0.0.1:$p1/disk" $a; wait_up "nbd://127.0.0.1:$p2/" $b
  bench_pair memory "nbd://127.0.0.1:$p1/disk" $a "nbd://127.0.0.1:$p2/" $b
  stop $a; stop $b
}

run_file() {
  local p1 p2 a b
  fallocate -l 1G "$WORK/rs.img" && fallocate -l 1G "$WORK/kit.img" || {
    truncate -s 1G "$WORK/rs.img" "$WORK/kit.img"; }
  p1=$(free_port); start rs-file "$BIN" -l "127.0.0.1:$p1" -e disk raw "file:$WORK/rs.img"; a=$SPID
  p2=$(free_port); start kit-file nbdkit -f -i 127.0.0.1 -p "$p2" --exit-with-parent file "$WORK/kit.img"; b=$SPID
  wait_up "nbd://127.0.0.1:$p1/disk" $a; wait_up "nbd://127.0.0.1:$p2/" $b
  bench_pair file "nbd://127.0.0.1:$p1/disk" $a "nbd://127.0.0.1:$p2/" $b
  flush_pair file "nbd://127.0.0.1:$p1/disk" "nbd://127.0.0.1:$p2/"
  stop $a; stop $b
  rm -f "$WORK/rs.img" "$WORK/kit.img"
}

run_s3() {
  command -v moto_server >/dev/null || { echo "compare.sh: s3 needs moto_server (pip install 'moto[server]')" >&2; return 1; }
  [ -e /usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-S3-plugin ] || ls /usr/lib/*/nbdkit/plugins/nbdkit-S3-plugin >/dev/null 2>&1 ||
    { echo "compare.sh: s3 needs nbdkit-plugin-python and python3-boto3" >&2; return 1; }
  local pm p1 p2 a b m r who order t0 t1 c0 c1
  # nbdkit 1.32's S3 plugin reports object-size as its minimum block size, which nbdkit refuses
  # above 64 KiB: run a copy whose minimum is 4 KiB (the blocksize filter still cuts at 4 MiB).
  local plugin; plugin=$(ls /usr/lib/*/nbdkit/plugins/nbdkit-S3-plugin | head -1)
  sed 's/return (cfg.obj_size, cfg.obj_size, cfg.obj_size)/return (4096, cfg.obj_size, 0xffffffff)/' \
    "$plugin" >"$WORK/S3.py"
  pm=$(free_port); start moto moto_server -H 127.0.0.1 -p "$pm"; m=$SPID
  for i in $(seq 100); do curl -sf "http://127.0.0.1:$pm/" >/dev/null && break; sleep 0.2; done
  head -c 128M /dev/urandom >"$WORK/src.img"
  for r in $(seq "$ROUNDS"); do
    curl -sf -X PUT "http://127.0.0.1:$pm/bench$r" >/dev/null || { echo "compare.sh: cannot create a bucket in moto" >&2; return 1; }
    if [ $((r % 2)) = 1 ]; then order="rs ref"; else order="ref rs"; fi
    for who in $order; do
      local port; port=$(free_port)
      if [ $who = rs ]; then
        start "rs-s3-$r" "$BIN" -l "127.0.0.1:$port" -e vol sharded "s3:http://KEY:SECRET@127.0.0.1:$pm/bench$r/rs?size=128MiB"
        uri="nbd://127.0.0.1:$port/vol"
      else
        start "kit-s3-$r" env AWS_ACCESS_KEY_ID=KEY AWS_SECRET_ACCESS_KEY=SECRET AWS_DEFAULT_REGION=us-east-1 \
          nbdkit -f -i 127.0.0.1 -p "$port" --exit-with-parent --filter=blocksize python "$WORK/S3.py" \
          endpoint-url="http://127.0.0.1:$pm" bucket="bench$r" key=kit size=128M object-size=4M maxdata=4M
        uri="nbd://127.0.0.1:$port/"
      fi
      a=$SPID; wait_up "$uri" $a
      c0=$(cpu_ticks $a); t0=$(date +%s.%N)
      nbdcopy --flush --request-size=4194304 "$WORK/src.img" "$uri" || echo "compare.sh: nbdcopy into $who failed" >&2
      t1=$(date +%s.%N); c1=$(cpu_ticks $a)
      echo "s3 write-128M sec $who $(echo "scale=3; ($t1 - $t0)/1" | bc -l)" >>"$RESULTS"
      echo "s3 write-128M cpu-ms $who $(( (c1 - c0) * 1000 / CLK_TCK ))" >>"$RESULTS"
      c0=$(cpu_ticks $a); t0=$(date +%s.%N)
      nbdcopy --request-size=4194304 "$uri" null: || echo "compare.sh: nbdcopy from $who failed" >&2
      t1=$(date +%s.%N); c1=$(cpu_ticks $a)
      echo "s3 read-128M sec $who $(echo "scale=3; ($t1 - $t0)/1" | bc -l)" >>"$RESULTS"
      echo "s3 read-128M cpu-ms $who $(( (c1 - c0) * 1000 / CLK_TCK ))" >>"$RESULTS"
      echo "  [s3 round $r] $who done" >&2
      stop $a
    done
  done
  stop $m
}

run_cache() {
  command -v moto_server >/dev/null || { echo "compare.sh: cache needs moto_server (pip install 'moto[server]')" >&2; return 1; }
  local pm r v order port a iops
  pm=$(free_port); start moto-cache moto_server -H 127.0.0.1 -p "$pm"
  for r in $(seq 100); do curl -sf "http://127.0.0.1:$pm/" >/dev/null && break; sleep 0.2; done
  curl -sf -X PUT "http://127.0.0.1:$pm/benchcache" >/dev/null || { echo "compare.sh: cannot create a bucket in moto" >&2; return 1; }
  fallocate -l 1G "$WORK/cache-file.img" 2>/dev/null || truncate -s 1G "$WORK/cache-file.img"
  # variant -> config body (one export named vol)
  cache_config() {
    case $1 in
      file) printf '[exports.vol]\npipeline = "raw -> file"\nsize = "1GiB"\n[exports.vol.file]\npath = "%s/cache-file.img"\n' "$WORK" ;;
      *) printf '[exports.vol]\npipeline = "cache -> sharded -> s3"\nsize = "1GiB"\n[exports.vol.s3]\nendpoint = "http://127.0.0.1:%s"\nbucket = "benchcache"\nprefix = "%s"\naccess_key_id = "KEY"\nsecret_access_key = "SECRET"\n[exports.vol.cache]\npath = "%s/cache-%s"\nsize = "2GiB"\nmax_dirty = "%s"\nflush = "%s"\n' "$pm" "$1" "$WORK" "$1" "${CACHE_MAX_DIRTY:-2GiB}" "${1#s3}" ;;
    esac
  }
  for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then order="file s3store s3local"; else order="s3local s3store file"; fi
    for v in $order; do
      port=$(free_port)
      { printf '[server]\nlisten = ["127.0.0.1:%s"]\n' "$port"; cache_config "$v"; } >"$WORK/cache-$v.toml"
      start "cache-$v-$r" "$BIN" --config "$WORK/cache-$v.toml"; a=$SPID
      wait_up "nbd://127.0.0.1:$port/vol" $a
      settle
      iops=$(fio_flush "nbd://127.0.0.1:$port/vol")
      case $v in
        file) echo "s3cache randw4k+fl256 IOPS ref ${iops:-nan}" >>"$RESULTS"
              echo "s3local randw4k+fl256 IOPS ref ${iops:-nan}" >>"$RESULTS" ;;
        s3store) echo "s3cache randw4k+fl256 IOPS rs ${iops:-nan}" >>"$RESULTS" ;;
        s3local) echo "s3local randw4k+fl256 IOPS rs ${iops:-nan}" >>"$RESULTS" ;;
      esac
      echo "  [cache round $r] $v: ${iops:-?} IOPS" >&2
      stop $a
    done
  done
}

echo "nbd-rs: $BIN ($("$BIN" --version 2>/dev/null)), reference: $(nbdkit --version); rounds=$ROUNDS rt=${RT}s size=$SIZE" >&2
for p in "${ONLY[@]}"; do "run_$p"; done

echo
echo "nbd-rs vs nbdkit  $(date -u '+%Y-%m-%d %H:%M UTC')  host $(hostname) ($(nproc) cpus)  rounds=$ROUNDS rt=${RT}s span=$SIZE"
echo "median of rounds; ratio = nbd-rs/nbdkit (throughput: >1 better; cpu-us/op, sec, cpu-ms: <1 better)"
printf '%-7s %-12s %-11s %12s %12s %8s\n' pair job metric nbd-rs nbdkit ratio
awk '{print $1, $2, $3}' "$RESULTS" | awk '!seen[$0]++' | while read -r pair job metric; do
  rs=$(awk -v p=$pair -v j=$job -v m=$metric '$1==p && $2==j && $3==m && $4=="rs" {print $5}' "$RESULTS" | median)
  ref=$(awk -v p=$pair -v j=$job -v m=$metric '$1==p && $2==j && $3==m && $4=="ref" {print $5}' "$RESULTS" | median)
  ratio=$(awk -v a="$rs" -v b="$ref" 'BEGIN{ if (b+0 == 0) print "-"; else printf "%.2f", a/b }')
  printf '%-7s %-12s %-11s %12s %12s %8s\n' "$pair" "$job" "$metric" "$rs" "$ref" "$ratio"
done
