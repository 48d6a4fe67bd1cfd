#!/bin/bash
# s3wan.sh ROUNDS DELAY_MS [BIN]: the s3 pair of compare.sh with the S3 server across an emulated
# network link, as object storage is in real life, not on loopback. moto_server runs in one
# private network namespace; nbd-rs (`sharded -> s3`) or nbdkit's S3 plugin (blocksize filter,
# 4 MiB objects), and nbdcopy, in another, joined by bench/delaylink.py with DELAY_MS each way.
# Each round, alternating which goes first: `nbdcopy --flush` of 128 MiB into a fresh bucket,
# then a read of it all to null: (nothing caches it). Prints the median seconds of each and the
# ratio ref/rs (above 1: nbd-rs faster). Needs root, moto_server, nbdkit-plugin-python and
# python3-boto3. For example: bench/s3wan.sh 3 10
set -u
. "$(dirname "$0")/lib.sh"
R=$1 D=$2 BIN=${3:-target/release/nbd-rs}
command -v moto_server >/dev/null || { echo "s3wan.sh: needs moto_server (pip install 'moto[server]')" >&2; exit 1; }
plugin=$(ls /usr/lib/*/nbdkit/plugins/nbdkit-S3-plugin 2>/dev/null | head -1)
[ -n "$plugin" ] || { echo "s3wan.sh: needs nbdkit-plugin-python and python3-boto3" >&2; exit 1; }
NC=s3wan-c$$ NS=s3wan-s$$
W=$(mktemp -d -p /var/tmp s3wan.XXXXXX); P=()
trap 'for p in "${P[@]}"; do kill $p 2>/dev/null; wait $p 2>/dev/null; done
      ip netns del $NC 2>/dev/null; ip netns del $NS 2>/dev/null; rm -rf $W' EXIT
ip netns add $NC && ip netns add $NS || exit 1
python3 "$(dirname "$0")/delaylink.py" $NC $NS $D 0 >$W/link 2>&1 & P+=($!)
for i in $(seq 50); do grep -q up $W/link && break; sleep 0.1; done
grep -q up $W/link || { cat $W/link; exit 1; }
# As in compare.sh: nbdkit 1.32's S3 plugin reports object-size as its minimum block size, which
# nbdkit refuses above 64 KiB; this copy's minimum is 4 KiB (the filter still cuts at 4 MiB).
sed 's/return (cfg.obj_size, cfg.obj_size, cfg.obj_size)/return (4096, cfg.obj_size, 0xffffffff)/' \
  "$plugin" >$W/S3.py
S3=http://10.9.0.2:5000
ip netns exec $NS moto_server -H 10.9.0.2 -p 5000 >$W/moto.log 2>&1 & P+=($!)
# (Servers are started with ip netns exec itself, not through this function, so that $! is
# the server: ip netns exec and env exec what they run.)
in_c() { ip netns exec $NC "$@"; }
for i in $(seq 100); do in_c curl -sf $S3/ >/dev/null && break; sleep 0.2; done
head -c 128M /dev/urandom >$W/src.img
secs() { local t0 t1; t0=$(date +%s.%N); "$@" || echo "s3wan.sh: $* failed" >&2; t1=$(date +%s.%N); echo "$t1 - $t0" | bc -l; }
for r in $(seq $R); do
  in_c curl -sf -X PUT $S3/wan$r >/dev/null || { echo "s3wan.sh: cannot create a bucket" >&2; exit 1; }
  if [ $((r % 2)) = 1 ]; then order="rs ref"; else order="ref rs"; fi
  for who in $order; do
    if [ $who = rs ]; then
      ip netns exec $NC "$BIN" -l 127.0.0.1:10809 -e vol sharded "s3:http://KEY:SECRET@10.9.0.2:5000/wan$r/rs?size=128MiB" \
        >$W/$who.$r.log 2>&1 & s=$!
    else
      ip netns exec $NC env AWS_ACCESS_KEY_ID=KEY AWS_SECRET_ACCESS_KEY=SECRET AWS_DEFAULT_REGION=us-east-1 \
        nbdkit -f -i 127.0.0.1 -p 10809 -e vol --filter=blocksize python $W/S3.py endpoint-url=$S3 \
        bucket=wan$r key=kit size=128M object-size=4M maxdata=4M >$W/$who.$r.log 2>&1 & s=$!
    fi
    P+=($s); U=nbd://127.0.0.1:10809/vol
    for i in $(seq 100); do in_c nbdinfo --size $U >/dev/null 2>&1 && break; sleep 0.1; done
    secs in_c nbdcopy --flush --request-size=4194304 $W/src.img $U >>$W/$who.write
    secs in_c nbdcopy --request-size=4194304 $U null: >>$W/$who.read
    kill $s; wait $s 2>/dev/null
    grep -q "Address in use\|address already in use" $W/$who.$r.log && { cat $W/$who.$r.log; exit 1; }
  done
done
for job in write read; do
  rs=$(median <$W/rs.$job) ref=$(median <$W/ref.$job)
  printf 's3 %-5s rtt %sms  nbd-rs %.3f s  nbdkit %.3f s  ref/rs %.2f   (rs: %s| ref: %s)\n' $job \
    $(awk -v d=$D 'BEGIN{print 2*d}') $rs $ref $(awk -v a=$rs -v b=$ref 'BEGIN{print b/a}') \
    "$(printf '%.3f ' $(cat $W/rs.$job))" "$(printf '%.3f ' $(cat $W/ref.$job))"
done
