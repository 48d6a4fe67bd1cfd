#!/usr/bin/env bash
# Drive an NBD server with libnbd's tools (nbdinfo, nbdcopy; nbdsh to set up data).
#
# Usage: tests/clients/libnbd-tools.sh URI SCRATCH
#   URI      nbd://HOST[:PORT][/EXPORT] or nbd+unix:///EXPORT?socket=PATH
#            The export must be read-write, >= 256 MiB; its contents are destroyed.
#   SCRATCH  directory for temporary files (created if missing)
#
# Prints "OK <check>" per check; on the first failure prints
# "FAIL <check>: <what was seen>" and exits 1. Exit 0 when all checks pass.
#
# Environment: NBD_FAST_ZERO=optional lets fast-zero be unadvertised
# (default "required", see lib.sh).
#
# The map checks expect areas zeroed with "trim allowed" to be reported as
# "hole,zero" and written areas as "data", exactly (1 MiB aligned layout).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"
init_args "$@"
need_tools nbdinfo nbdcopy nbdsh python3 cmp dd truncate
[[ -x /usr/bin/python3 ]] || fail "tools" "/usr/bin/python3 (for nbdsh) missing"

S=$SCRATCH

# run CHECK LOG CMD...: run a command, stdout+stderr to LOG, RC set.
run() {
    local log=$2
    shift 2
    RC=0
    "$@" >"$log" 2>&1 || RC=$?
}

# ---------------------------------------------------------------- nbdinfo --size
run "nbdinfo --size" "$S/size.log" nbdinfo --size "$URI"
[[ $RC == 0 ]] || fail "nbdinfo --size" "exit $RC$(show_log "$S/size.log")"
SIZE=$(cat "$S/size.log")
[[ $SIZE =~ ^[0-9]+$ ]] || fail "nbdinfo --size" "not a number: '$SIZE'"
((SIZE >= 256 * MiB)) || fail "nbdinfo --size" "export is $SIZE bytes, need >= 256 MiB"
ok "nbdinfo --size: $SIZE"

# ---------------------------------------------------------------- nbdinfo URI
run "nbdinfo" "$S/info.log" nbdinfo "$URI"
[[ $RC == 0 ]] || fail "nbdinfo" "exit $RC$(show_log "$S/info.log")"
want_lines=(
    "protocol: newstyle-fixed without TLS, using structured packets"
    "export-size: $SIZE"
    "is_read_only: false"
)
for l in "${want_lines[@]}"; do
    grep -qE "^[[:space:]]*$l( |\$)" "$S/info.log" || fail "nbdinfo" "no line '$l'$(show_log "$S/info.log")"
done
grep -qE '^[[:space:]]+base:allocation$' "$S/info.log" ||
    fail "nbdinfo" "base:allocation not among contexts$(show_log "$S/info.log")"
ok "nbdinfo: newstyle-fixed, structured packets, size $SIZE, base:allocation, read-write"

# ---------------------------------------------------------------- nbdinfo --json
run "nbdinfo --json" "$S/info.json" nbdinfo --json "$URI"
[[ $RC == 0 ]] || fail "nbdinfo --json" "exit $RC$(show_log "$S/info.json")"
res=$(python3 - "$S/info.json" "$SIZE" "$URI_EXPORT" "$FAST_ZERO" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
size, name, fast_zero = int(sys.argv[2]), sys.argv[3], sys.argv[4]
errs = []
def want(what, got, exp):
    if got != exp:
        errs.append("%s is %r, want %r" % (what, got, exp))
want("protocol", d.get("protocol"), "newstyle-fixed")
want("structured", d.get("structured"), True)
want("TLS", d.get("TLS"), False)
ex = d.get("exports", [])
want("number of exports", len(ex), 1)
if ex:
    e = ex[0]
    want("export-name", e.get("export-name"), name)
    want("export-size", e.get("export-size"), size)
    want("is_read_only", e.get("is_read_only"), False)
    if "base:allocation" not in e.get("contexts", []):
        errs.append("contexts %r lack base:allocation" % e.get("contexts"))
    for k in ("can_cache", "can_df", "can_fast_zero", "can_flush", "can_fua",
              "can_multi_conn", "can_trim", "can_zero"):
        if k == "can_fast_zero" and fast_zero == "optional" and e.get(k) is False:
            continue
        want(k, e.get(k), True)
print("; ".join(errs) if errs else "ok")
PY
) || fail "nbdinfo --json" "cannot parse JSON$(show_log "$S/info.json")"
[[ $res == ok ]] || fail "nbdinfo --json" "$res"
ok "nbdinfo --json: protocol, structured, export name/size, contexts, can_* true (can_fast_zero: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["exports"][0]["can_fast_zero"])' "$S/info.json"))"

# ---------------------------------------------------------------- nbdinfo --list
run "nbdinfo --list" "$S/list.log" nbdinfo --list "$SERVER_URI"
[[ $RC == 0 ]] || fail "nbdinfo --list" "exit $RC$(show_log "$S/list.log")"
run "nbdinfo --list --json" "$S/list.json" nbdinfo --list --json "$SERVER_URI"
[[ $RC == 0 ]] || fail "nbdinfo --list --json" "exit $RC$(show_log "$S/list.json")"
res=$(python3 - "$S/list.log" "$S/list.json" "$SIZE" "$URI_EXPORT" <<'PY'
import json, re, sys
text = open(sys.argv[1]).read()
d = json.load(open(sys.argv[2]))
size, name = int(sys.argv[3]), sys.argv[4]
names_txt = re.findall(r'^export="(.*)":$', text, re.M)
ex = [(e.get("export-name"), e.get("export-size")) for e in d.get("exports", [])]
if not ex:
    print("no exports listed"); sys.exit()
if sorted(names_txt) != sorted(n for n, _ in ex):
    print("text lists %r but JSON lists %r" % (names_txt, ex)); sys.exit()
# An empty URI export name is the server's default export, which LIST may
# show under its real name: then accept any export of the right size.
m = [e for e in ex if (e[0] == name or name == "") and e[1] == size]
print("ok %r" % m[0][0] if m else "export %r of size %d not listed; listed %r" % (name, size, ex))
PY
) || fail "nbdinfo --list" "cannot parse output$(show_log "$S/list.log")"
[[ $res == ok* ]] || fail "nbdinfo --list" "$res"
ok "nbdinfo --list $SERVER_URI: shows export ${res#ok } of size $SIZE (text and --json agree)"

# ---------------------------------------------------------------- nbdinfo --can / --is
for c in connect read write flush fua trim zero fast-zero df multi-conn cache structured-reply; do
    run "nbdinfo --can $c" "$S/can.log" nbdinfo --can "$c" "$URI"
    if [[ $c == fast-zero && $FAST_ZERO == optional && $RC == 2 ]]; then
        echo "NOTE nbdinfo --can fast-zero: false (accepted, NBD_FAST_ZERO=optional)"
        continue
    fi
    [[ $RC == 0 ]] || fail "nbdinfo --can $c" "exit $RC (0 = true, 2 = false)$(show_log "$S/can.log")"
done
ok "nbdinfo --can connect read write flush fua trim zero fast-zero df multi-conn cache structured-reply: true"
run "nbdinfo --is read-only" "$S/is.log" nbdinfo --is read-only "$URI"
[[ $RC == 2 ]] || fail "nbdinfo --is read-only" "exit $RC, want 2 (false) on a read-write export$(show_log "$S/is.log")"
run "nbdinfo --is tls" "$S/is.log" nbdinfo --is tls "$URI"
[[ $RC == 2 ]] || fail "nbdinfo --is tls" "exit $RC, want 2 (false) on a plaintext connection$(show_log "$S/is.log")"
ok "nbdinfo --is read-only / --is tls: false (exit 2)"

# ---------------------------------------------------------------- nbdinfo --map
# Zero the whole export (trim allowed), then write 4.5 MiB of known data.
# Layout (bytes): [1M,2M) [8M,11M) [100M,100M+512K)
DATA_RANGES="[($((1 * MiB)), $((1 * MiB))), ($((8 * MiB)), $((3 * MiB))), ($((100 * MiB)), $((512 * 1024)))]"
DATA_BYTES=$(((1 + 3) * MiB + 512 * 1024))
run "nbdsh: zero export + write data" "$S/nbdsh-map.log" nbdsh_ -u "$URI" -c "
size = h.get_size()
off = 0
while off < size:
    n = min(1 << 30, size - off)
    h.zero(n, off)
    off += n
for i, (o, l) in enumerate($DATA_RANGES):
    h.pwrite(bytes([0x40 + i]) * l, o)
h.flush()
for i, (o, l) in enumerate($DATA_RANGES):
    assert h.pread(l, o) == bytes([0x40 + i]) * l, 'read-back mismatch at %d' % o
    assert h.pread(4096, o + l) == bytes(4096), 'not zero after data at %d' % (o + l)
"
[[ $RC == 0 ]] || fail "nbdinfo --map (setup)" "nbdsh exit $RC$(show_log "$S/nbdsh-map.log")"

run "nbdinfo --map" "$S/map.log" nbdinfo --map "$URI"
[[ $RC == 0 ]] || fail "nbdinfo --map" "exit $RC$(show_log "$S/map.log")"
res=$(python3 - "$S/map.log" "$SIZE" "$DATA_RANGES" <<'PY'
import ast, sys
size = int(sys.argv[2])
want = ast.literal_eval(sys.argv[3])
ext = []
for line in open(sys.argv[1]):
    f = line.split()
    if not f:
        continue
    ext.append((int(f[0]), int(f[1]), int(f[2]), " ".join(f[3:])))
errs = []
pos = 0
for off, ln, typ, desc in ext:
    if off != pos:
        errs.append("gap/overlap at %d (next extent starts %d)" % (pos, off)); break
    pos = off + ln
if pos != size:
    errs.append("map ends at %d, export size %d" % (pos, size))
names = {0: "data", 2: "zero", 3: "hole,zero", 1: "hole"}
for off, ln, typ, desc in ext:
    if names.get(typ) != desc:
        errs.append("line %d %d %d has description %r" % (off, ln, typ, desc))
# merge adjacent data extents and compare with what was written
data = []
for off, ln, typ, desc in ext:
    if typ == 0:
        if data and data[-1][0] + data[-1][1] == off:
            data[-1] = (data[-1][0], data[-1][1] + ln)
        else:
            data.append((off, ln))
    elif typ != 3:
        errs.append("extent [%d,+%d) type %d %s, want 0 data or 3 hole,zero" % (off, ln, typ, desc))
if data != want:
    errs.append("data extents %r, written %r" % (data, want))
print("; ".join(errs[:6]) if errs else "ok")
PY
) || fail "nbdinfo --map" "cannot parse$(show_log "$S/map.log")"
[[ $res == ok ]] || fail "nbdinfo --map" "$res$(show_log "$S/map.log")"
ok "nbdinfo --map: data exactly at the written ranges, hole,zero elsewhere"

run "nbdinfo --map --totals" "$S/totals.log" nbdinfo --map --totals "$URI"
[[ $RC == 0 ]] || fail "nbdinfo --map --totals" "exit $RC$(show_log "$S/totals.log")"
res=$(python3 - "$S/totals.log" "$SIZE" "$DATA_BYTES" <<'PY'
import sys
size, data = int(sys.argv[2]), int(sys.argv[3])
rows = {}
for line in open(sys.argv[1]):
    f = line.split()
    if f:
        rows[(int(f[2]), " ".join(f[3:]))] = (int(f[0]), float(f[1].rstrip("%")))
want = {(0, "data"): data, (3, "hole,zero"): size - data}
errs = []
if set(rows) != set(want):
    errs.append("rows %r, want %r" % (sorted(rows), sorted(want)))
for k, v in want.items():
    if k in rows:
        b, pct = rows[k]
        if b != v:
            errs.append("%s: %d bytes, want %d" % (k[1], b, v))
        if abs(pct - 100.0 * v / size) > 0.11:
            errs.append("%s: %.1f%%, want %.1f%%" % (k[1], pct, 100.0 * v / size))
print("; ".join(errs) if errs else "ok")
PY
) || fail "nbdinfo --map --totals" "cannot parse$(show_log "$S/totals.log")"
[[ $res == ok ]] || fail "nbdinfo --map --totals" "$res$(show_log "$S/totals.log")"
ok "nbdinfo --map --totals: $DATA_BYTES bytes data, the rest hole,zero"

# ---------------------------------------------------------------- nbdcopy
# 128 MiB source: 4 x 16 MiB random data, rest sparse.
SRC=$S/copy-src.img
rm -f "$SRC"
truncate -s $((128 * MiB)) "$SRC"
for o in 0 40 72 112; do
    dd if=/dev/urandom of="$SRC" bs=1M seek="$o" count=16 conv=notrunc status=none
done
# Expected full export contents afterwards: the source, then zeroes.
EXP=$S/copy-expected.img
cp --sparse=always "$SRC" "$EXP"
truncate -s "$SIZE" "$EXP"

# Put non-zero junk where the source has holes so that the copy must zero them
# (the tail beyond 128 MiB is still zero from the map test).
run "nbdcopy (setup)" "$S/nbdsh-junk.log" nbdsh_ -u "$URI" -c "
junk = b'\\x5c' * (8 << 20)
for o in range(0, 128 << 20, 8 << 20):
    h.pwrite(junk, o)
h.zero(4 << 20, 128 << 20)
assert h.pread(4096, 20 << 20) == b'\\x5c' * 4096
"
[[ $RC == 0 ]] || fail "nbdcopy (setup)" "nbdsh exit $RC$(show_log "$S/nbdsh-junk.log")"

run "nbdcopy file -> export" "$S/copy-in.log" nbdcopy -C 4 -T 4 --flush "$SRC" "$URI"
[[ $RC == 0 ]] || fail "nbdcopy -C 4 -T 4 --flush file -> export" "exit $RC$(show_log "$S/copy-in.log")"
ok "nbdcopy -C 4 -T 4 --flush 128 MiB (4x16 MiB data, rest sparse) -> export"

OUT=$S/copy-out.img
rm -f "$OUT"
run "nbdcopy export -> file" "$S/copy-out.log" nbdcopy "$URI" "$OUT"
[[ $RC == 0 ]] || fail "nbdcopy export -> file" "exit $RC$(show_log "$S/copy-out.log")"
osize=$(stat -c %s "$OUT")
[[ $osize == "$SIZE" ]] || fail "nbdcopy export -> file" "file is $osize bytes, export $SIZE"
run "cmp" "$S/cmp1.log" cmp "$EXP" "$OUT"
[[ $RC == 0 ]] || fail "nbdcopy export -> file, cmp" "$(head -c 300 "$S/cmp1.log")"
ok "nbdcopy export -> file: cmp identical to source (+ zero tail)"

rc=0
nbdcopy "$URI" - 2>"$S/copy-stdout.err" | cmp - "$EXP" >"$S/cmp2.log" 2>&1 || rc=$?
[[ $rc == 0 ]] || fail "nbdcopy URI - | cmp" "exit $rc: $(head -c 300 "$S/cmp2.log") $(head -c 300 "$S/copy-stdout.err")"
ok "nbdcopy URI - | cmp: identical"

run "nbdinfo --map --totals after nbdcopy" "$S/totals2.log" nbdinfo --map --totals "$URI"
[[ $RC == 0 ]] || fail "nbdinfo --map --totals after nbdcopy" "exit $RC$(show_log "$S/totals2.log")"
dbytes=$(awk '$3 == 0 && $4 == "data" { print $1 }' "$S/totals2.log")
[[ $dbytes == $((64 * MiB)) ]] ||
    fail "nbdinfo --map --totals after nbdcopy" "data bytes '$dbytes', want $((64 * MiB)) (source holes should become holes)$(show_log "$S/totals2.log")"
ok "nbdinfo --map --totals after nbdcopy: exactly 64 MiB data (holes stayed sparse)"

# Large scratch images are only useful for debugging a failure.
rm -f "$SRC" "$EXP" "$OUT"
echo "ALL OK libnbd-tools.sh"
