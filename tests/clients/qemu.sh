#!/usr/bin/env bash
# Drive an NBD server with qemu's own NBD client (qemu-img, qemu-io, qemu-nbd -L).
#
# Usage: tests/clients/qemu.sh URI SCRATCH
#   URI      nbd://HOST[:PORT][/EXPORT] or nbd+unix:///EXPORT?socket=PATH
#            The export must be read-write, >= 256 MiB; its contents are destroyed.
#   SCRATCH  directory for temporary files (created if missing)
#
# Environment: NBD_FAST_ZERO=optional accepts ENOTSUP for "write -z -n"
# (FAST_ZERO), as the NBD spec allows; default "required" (see lib.sh).
# qemu answers ENOTSUP itself when the export does not advertise fast zero.
#
# Prints "OK <check>" per check; on the first failure prints
# "FAIL <check>: <what was seen>" and exits 1. Exit 0 when all checks pass.
#
# Layout used in the export (all offsets well inside 256 MiB):
#   [0, 64M)        qemu-img convert / compare target (tail [64M, end) is zeroed)
#   [128M, 136M)    qemu-img map probes
#   [144M, 146M)    qemu-io, default cache (writethrough: FUA on every write)
#   [160M, 162M)    qemu-io, -t none (writeback: plain writes)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"
init_args "$@"
need_tools qemu-img qemu-io qemu-nbd nbdinfo python3 od dd truncate

S=$SCRATCH
# qemu trace events that only fire when the server breaks the protocol.
TRIP=(--trace 'nbd_*compliance' --trace nbd_receive_wrong_header
      --trace nbd_read_reply_entry_fail --trace nbd_co_request_fail)
TRIP_RE='nbd_[a-z_]*compliance|nbd_receive_wrong_header|nbd_read_reply_entry_fail|nbd_co_request_fail'

# Fail CHECK if LOG contains any tripwire trace line.
check_trip() {
    local check=$1 log=$2 hits
    hits=$(grep -E "$TRIP_RE" "$log" | head -n 5 || true)
    [[ -z $hits ]] || fail "$check" "qemu compliance trace fired: $hits"
}

# qimg CHECK LOGNAME ARGS...: run qemu-img with tripwires; sets RC, output in $S/LOGNAME.log
qimg() {
    local check=$1 name=$2
    shift 2
    RC=0
    qemu-img "${TRIP[@]}" "$@" >"$S/$name.log" 2>&1 || RC=$?
    check_trip "$check" "$S/$name.log"
}

# qio CHECK EXPECT_RC CACHEOPT -c CMD...: run qemu-io against URI with tripwires.
# EXPECT_RC 0: rc must be 0 and no "Pattern verification failed"/"failed"/"error" text.
# EXPECT_RC 1: rc must be 1 and "Pattern verification failed" must appear.
QIO_N=0
qio() {
    local check=$1 want=$2 cache=$3 log rc=0
    shift 3
    QIO_N=$((QIO_N + 1))
    log="$S/qio-$QIO_N.log"
    local copt=()
    [[ $cache == default ]] || copt=(-t "$cache")
    qemu-io -f raw "${copt[@]}" "${TRIP[@]}" "$URI" "$@" >"$log" 2>&1 || rc=$?
    check_trip "$check" "$log"
    if [[ $want == 0 ]]; then
        [[ $rc == 0 ]] || fail "$check" "qemu-io exited $rc (qemu-io $* )$(show_log "$log")"
        if grep -qiE 'failed|error|cannot|could not' "$log"; then
            fail "$check" "qemu-io reported: $(grep -iE 'failed|error|cannot|could not' "$log" | head -n 3)"
        fi
    else
        [[ $rc == 1 ]] || fail "$check" "expected qemu-io to exit 1, got $rc (qemu-io $* )$(show_log "$log")"
        grep -q 'Pattern verification failed' "$log" ||
            fail "$check" "no 'Pattern verification failed' in output$(show_log "$log")"
    fi
    QIO_LOG=$log
}

# ---------------------------------------------------------------- tracing works
# Positive control: the tripwire checks below are only meaningful if qemu's
# trace backend actually prints events.
qemu-img --trace nbd_send_request info -f raw "$URI" >"$S/trace-control.log" 2>&1 ||
    fail "qemu trace backend" "qemu-img info failed$(show_log "$S/trace-control.log")"
grep -q 'nbd_send_request' "$S/trace-control.log" ||
    fail "qemu trace backend" "--trace nbd_send_request printed nothing, tripwires would be blind"
ok "qemu trace backend prints events"

# ---------------------------------------------------------------- qemu-img info
SIZE=$(nbdinfo --size "$URI" 2>"$S/nbdinfo-size.err") ||
    fail "nbdinfo --size" "$(cat "$S/nbdinfo-size.err")"
[[ $SIZE =~ ^[0-9]+$ ]] || fail "nbdinfo --size" "not a number: '$SIZE'"
((SIZE >= 256 * MiB)) || fail "export size" "export is $SIZE bytes, need >= 256 MiB"

qimg "qemu-img info" info info --output=json -f raw "$URI"
[[ $RC == 0 ]] || fail "qemu-img info" "exit $RC$(show_log "$S/info.log")"
vsize=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["virtual-size"], d["format"])' "$S/info.log" 2>&1) ||
    fail "qemu-img info" "cannot parse JSON: $vsize$(show_log "$S/info.log")"
[[ $vsize == "$SIZE raw" ]] || fail "qemu-img info" "virtual-size/format '$vsize', nbdinfo --size says $SIZE"
ok "qemu-img info virtual-size $SIZE matches nbdinfo --size"

# ---------------------------------------------------------------- convert / compare
# Source 1: 64 MiB sparse file, random data in a few places (some unaligned).
make_src() { # FILE SEEDLIST(of "offset:len" in bytes)
    local f=$1 spec off len
    shift
    rm -f "$f"
    truncate -s $((64 * MiB)) "$f"
    for spec in "$@"; do
        off=${spec%%:*} len=${spec##*:}
        head -c "$len" /dev/urandom | dd of="$f" bs=64k seek="$off" oflag=seek_bytes conv=notrunc status=none
    done
}
make_src "$S/src1.img" 0:$((1 * MiB)) $((5 * MiB + 4096)):$((3 * MiB)) $((17 * MiB + 777)):12345 \
    $((40 * MiB)):$((2 * MiB)) $((63 * MiB)):$((1 * MiB))

# Fill the target area with a non-zero pattern so that holes in the source must
# really be written as zeroes, and zero the rest of the export so that
# "qemu-img compare" (which also checks the size-mismatch tail) can pass.
qio "prepare export (fill 64M, zero tail)" 0 default -c "write -P 0x5c 0 64M" \
    -c "write -z -u 64M $((SIZE - 64 * MiB))"

qimg "qemu-img convert -n" convert1 convert -n -f raw -O raw "$S/src1.img" "$URI"
[[ $RC == 0 ]] || fail "qemu-img convert -n" "exit $RC$(show_log "$S/convert1.log")"
ok "qemu-img convert -n -f raw -O raw (64 MiB random+sparse)"

qimg "qemu-img compare identical" compare1 compare -f raw -F raw "$S/src1.img" "$URI"
[[ $RC == 0 ]] && grep -q 'Images are identical' "$S/compare1.log" ||
    fail "qemu-img compare identical" "exit $RC$(show_log "$S/compare1.log")"
ok "qemu-img compare: source and export identical"

# Flip one byte of the source; compare must report a mismatch there, exit 1.
flip=$((40 * MiB + 123457))
old=$(od -An -tu1 -j "$flip" -N1 "$S/src1.img" | tr -d ' ')
new=$((old ^ 0xff))
printf "\\$(printf %03o "$new")" | dd of="$S/src1.img" bs=1 seek="$flip" conv=notrunc status=none
[[ $(od -An -tu1 -j "$flip" -N1 "$S/src1.img" | tr -d ' ') == "$new" ]] ||
    fail "qemu-img compare mismatch" "could not modify the source byte (harness problem)"
qimg "qemu-img compare mismatch" compare2 compare -f raw -F raw "$S/src1.img" "$URI"
[[ $RC == 1 ]] || fail "qemu-img compare mismatch" "expected exit 1, got $RC$(show_log "$S/compare2.log")"
at=$(sed -n 's/^Content mismatch at offset \([0-9]*\)!$/\1/p' "$S/compare2.log" | head -n1)
[[ -n $at ]] || fail "qemu-img compare mismatch" "no 'Content mismatch at offset' line$(show_log "$S/compare2.log")"
((at <= flip && at > flip - 512)) ||
    fail "qemu-img compare mismatch" "mismatch reported at $at, byte changed at $flip"
ok "qemu-img compare: one changed byte reported at offset $at (exit 1)"

# Source 2, different layout, copied with out-of-order parallel writes.
make_src "$S/src2.img" $((2 * MiB)):$((4 * MiB)) $((17 * MiB)):$((1 * MiB + 3)) \
    $((30 * MiB + 512)):$((6 * MiB)) $((50 * MiB)):65536
qimg "qemu-img convert -W -m 8 -n" convert2 convert -W -m 8 -n -f raw -O raw "$S/src2.img" "$URI"
[[ $RC == 0 ]] || fail "qemu-img convert -W -m 8 -n" "exit $RC$(show_log "$S/convert2.log")"
qimg "qemu-img convert -W -m 8 -n" compare3 compare -f raw -F raw "$S/src2.img" "$URI"
[[ $RC == 0 ]] && grep -q 'Images are identical' "$S/compare3.log" ||
    fail "qemu-img convert -W -m 8 -n" "compare after copy: exit $RC$(show_log "$S/compare3.log")"
ok "qemu-img convert -W -m 8 -n, then compare identical"

# ---------------------------------------------------------------- qemu-img map
# [128M,136M): zero (hole allowed), then data at 129M+1M, 132M+2M, then a
# NO_HOLE zero at 133M+512k inside the second data area.
M=$MiB
qio "qemu-img map: prepare" 0 default -c "write -z -u $((128 * M)) $((8 * M))" \
    -c "write -P 0xab $((129 * M)) $((1 * M))" -c "write -P 0xcd $((132 * M)) $((2 * M))" \
    -c "write -z $((133 * M)) $((M / 2))"
qimg "qemu-img map" map map --output=json -f raw --start-offset=$((128 * M)) --max-length=$((8 * M)) "$URI"
[[ $RC == 0 ]] || fail "qemu-img map" "exit $RC$(show_log "$S/map.log")"
# probes: start length expected(data) expected(zero); "-" = don't care
res=$(python3 - "$S/map.log" <<PY
import json, sys
M = 1 << 20
ext = json.load(open(sys.argv[1]))
probes = [
    (128*M, 1*M, False, True,  "zeroed area before data"),
    (129*M, 1*M, True,  False, "data written with 0xab"),
    (130*M, 2*M, False, True,  "zeroed area between data"),
    (132*M, 1*M, True,  False, "data written with 0xcd"),
    (133*M, M//2, None, True,  "write -z (NO_HOLE) inside data"),
    (133*M + M//2, M//2, True, False, "data after the NO_HOLE zero"),
    (134*M, 2*M, False, True,  "zeroed area after data"),
]
errs = []
end = max(e["start"] + e["length"] for e in ext)
if ext[0]["start"] != 128*M or end != 136*M:
    errs.append("map covers [%d,%d), expected [%d,%d)" % (ext[0]["start"], end, 128*M, 136*M))
for start, length, data, zero, what in probes:
    cov = [e for e in ext if e["start"] < start + length and e["start"] + e["length"] > start]
    covered = sum(min(e["start"] + e["length"], start + length) - max(e["start"], start) for e in cov)
    if covered != length:
        errs.append("%s [%d,+%d): only %d bytes mapped" % (what, start, length, covered))
    for e in cov:
        if (data is not None and e["data"] != data) or e["zero"] != zero:
            errs.append("%s [%d,+%d): extent %s has data=%s zero=%s, want data=%s zero=%s"
                        % (what, start, length, (e["start"], e["length"]), e["data"], e["zero"],
                           "any" if data is None else data, zero))
print("; ".join(errs) if errs else "ok")
PY
) || fail "qemu-img map" "cannot parse map output$(show_log "$S/map.log")"
[[ $res == ok ]] || fail "qemu-img map" "$res"
ok "qemu-img map --output=json: data/zero extents at the written places"

# ---------------------------------------------------------------- qemu-io
# qio_suite CACHE BASE TAG: every operation works on a 64 KiB slot that is
# surrounded by a fill pattern; after each operation the slot and both
# neighbouring 4 KiB are read back through a NEW connection.
qio_suite() {
    local cache=$1 base=$2 tag=$3 fill=$4 p1=$5 p2=$6 pa=$7 pb=$8
    local K=1024 s
    local slot_w=$((base + 128 * K)) slot_f=$((base + 256 * K)) slot_z=$((base + 384 * K))
    local slot_zu=$((base + 512 * K)) slot_zn=$((base + 640 * K)) slot_d=$((base + 768 * K))
    local slot_a=$((base + 1024 * K))

    # around SLOT LEN PATTERN: sets AR to read-back commands for a slot and its neighbours
    around() { AR=(-c "read -P $fill $(($1 - 4096)) 4k" -c "read -P $3 $1 $2" -c "read -P $fill $(($1 + $2)) 4k"); }

    qio "qemu-io [$tag] write -P" 0 "$cache" --trace nbd_send_request -c "write -P $fill $base 2M" \
        -c "write -P $p1 $slot_w 64k" -c "read -P $p1 $slot_w 64k"
    # default cache (writethrough) must send FUA writes, -t none plain ones.
    local wflags want_flags=0x1
    [[ $cache == default ]] || want_flags=0x0
    wflags=$(sed -n "s/.*{ .from = $slot_w, .len = 65536, .cookie = [0-9]*, .flags = \(0x[0-9a-f]*\), .type = 1 (write) }.*/\1/p" "$QIO_LOG")
    [[ $wflags == "$want_flags" ]] ||
        fail "qemu-io [$tag] write -P" "WRITE sent with flags '$wflags', want $want_flags (FUA iff default cache)$(show_log "$QIO_LOG")"
    around $slot_w 65536 $p1
    qio "qemu-io [$tag] write -P" 0 "$cache" "${AR[@]}" -c "read -P $fill $base 64k"
    ok "qemu-io [$tag] write -P / read -P (pattern $p1 at $slot_w, fill $fill around it; WRITE flags $wflags)"

    qio "qemu-io [$tag] read -P wrong pattern fails" 1 "$cache" -c "read -P $((p1 ^ 0xff)) $slot_w 64k"
    grep -q "Pattern verification failed at offset $slot_w, 65536 bytes" "$QIO_LOG" ||
        fail "qemu-io [$tag] read -P wrong pattern fails" "unexpected message$(show_log "$QIO_LOG")"
    ok "qemu-io [$tag] read -P with the wrong pattern fails (exit 1)"

    qio "qemu-io [$tag] write -f" 0 "$cache" -c "write -f -P $p2 $slot_f 4k"
    around $slot_f 4096 $p2
    qio "qemu-io [$tag] write -f" 0 "$cache" "${AR[@]}"
    ok "qemu-io [$tag] write -f (FUA) 4k"

    for s in "write -z:$slot_z" "write -z -u:$slot_zu" "write -z -n:$slot_zn" "discard:$slot_d"; do
        local cmd=${s%%:*} off=${s##*:}
        if [[ $cmd == "write -z -n" ]]; then
            # NBD spec: a server that cannot zero fast MUST fail FAST_ZERO with
            # ENOTSUP. Accept that, but then the slot must hold either the old
            # data or zeroes (all of it), and the neighbours must be intact.
            local rc=0 zlog=$S/fastzero-${cache}.log copt=()
            [[ $cache == default ]] || copt=(-t "$cache")
            qemu-io -f raw "${copt[@]}" "${TRIP[@]}" "$URI" \
                -c "read -P $fill $off 64k" -c "$cmd $off 64k" >"$zlog" 2>&1 || rc=$?
            check_trip "qemu-io [$tag] $cmd" "$zlog"
            grep -q 'Pattern verification failed' "$zlog" &&
                fail "qemu-io [$tag] $cmd" "slot did not hold the fill pattern before the zero$(show_log "$zlog")"
            if [[ $rc != 0 && $FAST_ZERO == optional ]] &&
                grep -q '^write failed: Operation not supported$' "$zlog"; then
                local r1=0 r2=0
                around "$off" 65536 "$fill"
                qemu-io -f raw "$URI" "${AR[@]}" >"$zlog.fill" 2>&1 || r1=$?
                around "$off" 65536 0
                qemu-io -f raw "$URI" "${AR[@]}" >"$zlog.zero" 2>&1 || r2=$?
                [[ $r1 == 0 || $r2 == 0 ]] ||
                    fail "qemu-io [$tag] $cmd" "after ENOTSUP the slot is neither old data nor zeroes (or neighbours changed)$(show_log "$zlog.fill")"
                ok "qemu-io [$tag] $cmd 64k got ENOTSUP (fast zero unadvertised or impossible; NBD_FAST_ZERO=optional); data consistent"
                continue
            fi
            [[ $rc == 0 ]] && ! grep -qiE 'failed|error' "$zlog" ||
                fail "qemu-io [$tag] $cmd" "qemu-io exited $rc$(show_log "$zlog")"
            around "$off" 65536 0
            qio "qemu-io [$tag] $cmd" 0 "$cache" "${AR[@]}"
            ok "qemu-io [$tag] $cmd 64k, then reads zeroes (neighbours intact)"
            continue
        fi
        qio "qemu-io [$tag] $cmd" 0 "$cache" -c "read -P $fill $off 64k" -c "$cmd $off 64k" -c "read -P 0 $off 64k"
        around "$off" 65536 0
        qio "qemu-io [$tag] $cmd" 0 "$cache" "${AR[@]}"
        ok "qemu-io [$tag] $cmd 64k, then reads zeroes (neighbours intact)"
    done

    qio "qemu-io [$tag] flush" 0 "$cache" -c "write -P $p2 $((base + 1536 * K)) 64k" -c "flush"
    grep -q "^wrote 65536/65536 bytes at offset $((base + 1536 * K))\$" "$QIO_LOG" ||
        fail "qemu-io [$tag] flush" "write before flush not reported$(show_log "$QIO_LOG")"
    ok "qemu-io [$tag] flush"

    qio "qemu-io [$tag] aio" 0 "$cache" -c "aio_write -P $pa $slot_a 64k" -c "aio_write -P $pb $((slot_a + 64 * K)) 64k" \
        -c "aio_read -P $fill $((slot_a + 256 * K)) 4k" -c "aio_flush" \
        -c "aio_read -P $pa $slot_a 64k" -c "aio_read -P $pb $((slot_a + 64 * K)) 64k" -c "aio_flush"
    local n
    n=$(grep -cE '^(wrote|read) [0-9]+/[0-9]+ bytes at offset' "$QIO_LOG" || true)
    [[ $n == 5 ]] || fail "qemu-io [$tag] aio" "expected 5 completed aio requests, saw $n$(show_log "$QIO_LOG")"
    qio "qemu-io [$tag] aio" 0 "$cache" -c "read -P $pa $slot_a 64k" -c "read -P $pb $((slot_a + 64 * K)) 64k" \
        -c "read -P $fill $((slot_a + 128 * K)) 4k"
    ok "qemu-io [$tag] aio_write x2 / aio_read / aio_flush, data verified"
}

qio_suite default $((144 * M)) "default cache" 0x5a 0x11 0x22 0x33 0x44
qio_suite none $((160 * M)) "-t none" 0xa6 0x66 0x77 0x88 0x99

# Data written by each suite must still be there (separate areas, new connection).
qio "qemu-io data persists across connections" 0 default \
    -c "read -P 0x11 $((144 * M + 128 * 1024)) 64k" -c "read -P 0x66 $((160 * M + 128 * 1024)) 64k"
ok "qemu-io data from both suites persists across connections"

# ---------------------------------------------------------------- qemu-nbd -L
if [[ $URI_SCHEME == nbd+unix ]]; then
    echo "SKIP qemu-nbd -L (nbd+unix URI)"
else
    rc=0
    qemu-nbd -L -b "$URI_HOST" -p "$URI_PORT" "${TRIP[@]}" >"$S/list.log" 2>&1 || rc=$?
    check_trip "qemu-nbd -L" "$S/list.log"
    [[ $rc == 0 ]] || fail "qemu-nbd -L" "exit $rc$(show_log "$S/list.log")"
    res=$(python3 - "$S/list.log" "$URI_EXPORT" "$SIZE" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
want_name, want_size = sys.argv[2], int(sys.argv[3])
m = re.search(r"^exports available: (\d+)$", text, re.M)
if not m:
    print("no 'exports available' line"); sys.exit()
n = int(m.group(1))
blocks = re.split(r"^ export: ", text, flags=re.M)[1:]
if n < 1 or len(blocks) != n:
    print("'exports available: %d' but %d export blocks" % (n, len(blocks))); sys.exit()
found = []
for b in blocks:
    name = re.match(r"'(.*)'", b).group(1)
    sm = re.search(r"^  size:\s+(\d+)$", b, re.M)
    size = int(sm.group(1)) if sm else None
    ctx = "base:allocation" in b
    found.append((name, size, ctx))
# An empty URI export name means "the default export", which LIST may show
# under its real name: then any export of the right size is accepted.
match = [f for f in found if (f[0] == want_name or want_name == "") and f[1] == want_size]
if not match:
    print("export %r of size %d not listed; listed: %r" % (want_name, want_size, found)); sys.exit()
if not match[0][2]:
    print("export %r lists no base:allocation meta context" % match[0][0]); sys.exit()
print("ok %r" % match[0][0])
PY
    ) || fail "qemu-nbd -L" "cannot parse output$(show_log "$S/list.log")"
    [[ $res == ok* ]] || fail "qemu-nbd -L" "$res$(show_log "$S/list.log")"
    ok "qemu-nbd -L lists export ${res#ok } with size $SIZE and base:allocation"
fi

# Large scratch images are only useful for debugging a failure.
rm -f "$S/src1.img" "$S/src2.img"
echo "ALL OK qemu.sh"
