#!/usr/bin/env bash
# Drive an NBD server with fio's nbd engine (libnbd based) and check data integrity.
#
# Usage: tests/clients/fio.sh URI SCRATCH
#   URI      nbd://HOST[:PORT][/EXPORT] or nbd+unix:///EXPORT?socket=PATH
#            The export must be read-write, >= 256 MiB; its contents are destroyed.
#   SCRATCH  directory for temporary files (created if missing)
#
# Prints "OK <check>" per check; on the first failure prints
# "FAIL <check>: <what was seen>" and exits 1. Exit 0 when all checks pass.
#
# Export areas: [0,64M) verify run, [64M,192M) mixed run (2 jobs x 64M),
# [192M,196M) corruption-detection control.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"
init_args "$@"
need_tools fio nbdinfo nbdsh python3

S=$SCRATCH
# fio writes its verify state files into the working directory: keep them in the scratch dir.
mkdir -p "$S" && cd "$S"
fio --enghelp 2>/dev/null | grep -qw nbd || fail "fio nbd engine" "fio --enghelp does not list the nbd engine"

SIZE=$(nbdinfo --size "$URI" 2>"$S/size.err") || fail "nbdinfo --size" "$(cat "$S/size.err")"
[[ $SIZE =~ ^[0-9]+$ ]] && ((SIZE >= 256 * MiB)) || fail "export size" "'$SIZE', need >= 256 MiB"

# runfio NAME ARGS...: run fio with JSON output; sets RC; JSON in $S/NAME.json
runfio() {
    local name=$1
    shift
    RC=0
    fio --name="$name" --ioengine=nbd --uri="$URI" --output-format=json "$@" \
        >"$S/$name.out" 2>"$S/$name.err" || RC=$?
}

# fio_diag NAME: fio's messages (stderr, and stdout lines before the JSON).
fio_diag() {
    { head -c 600 "$S/$1.err"; sed -n '/^{/q;p' "$S/$1.out" | head -n 6; } | tr '\n' ' '
}

# fiojson CHECK NAME PYEXPR-CHECKS: parse $S/NAME.out (strip up to the first
# "{"), evaluate the checks; prints "ok" or the problems.
fiojson() {
    python3 - "$S/$2.out" "$3" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
i = text.find("{")
if i < 0:
    print("no JSON in fio output: %r" % text[:300]); sys.exit()
try:
    d = json.loads(text[i:])
except ValueError as e:
    print("bad JSON from fio: %s" % e); sys.exit()
jobs = d.get("jobs", [])
errs = []
exec(sys.argv[2])
print("; ".join(errs) if errs else "ok")
PY
}

# ---------------------------------------------------------------- verify run
runfio verify --rw=randwrite --bs=4k --size=64m --iodepth=16 \
    --verify=crc32c --do_verify=1 --verify_fatal=1
[[ $RC == 0 ]] || fail "fio randwrite verify (crc32c)" "fio exit $RC: $(fio_diag verify)"
res=$(fiojson "fio randwrite verify" verify '
if len(jobs) != 1: errs.append("%d jobs, want 1" % len(jobs))
for j in jobs:
    if j["error"] != 0: errs.append("job %s error %d" % (j["jobname"], j["error"]))
    if j["write"]["io_bytes"] != 64 << 20: errs.append("wrote %d bytes, want 64 MiB" % j["write"]["io_bytes"])
    if j["read"]["io_bytes"] != 64 << 20: errs.append("verify read %d bytes, want 64 MiB" % j["read"]["io_bytes"])
')
[[ $res == ok ]] || fail "fio randwrite verify (crc32c)" "$res $(fio_diag verify)"
ok "fio randwrite 4k x 64 MiB iodepth 16, verify=crc32c: error 0, 64 MiB written and verified"

# ---------------------------------------------------------------- mixed run
runfio mixed --rw=randrw --bs=64k --size=64m --iodepth=8 --numjobs=2 \
    --offset=64m --offset_increment=64m --fsync=16 --verify=md5 --verify_fatal=1
[[ $RC == 0 ]] || fail "fio randrw numjobs=2 verify (md5)" "fio exit $RC: $(fio_diag mixed)"
res=$(fiojson "fio randrw" mixed '
if len(jobs) != 2: errs.append("%d jobs, want 2" % len(jobs))
for j in jobs:
    n = j["jobname"]
    if j["error"] != 0: errs.append("job %s error %d" % (n, j["error"]))
    w, r = j["write"]["io_bytes"], j["read"]["io_bytes"]
    if w <= 0 or r <= 0: errs.append("job %s read %d / wrote %d bytes" % (n, r, w))
    # every written block is read back once more by the verify phase
    if r < w: errs.append("job %s read %d < wrote %d: no verify phase?" % (n, r, w))
    if j.get("sync", {}).get("total_ios", 0) <= 0: errs.append("job %s issued no fsync" % n)
')
[[ $res == ok ]] || fail "fio randrw numjobs=2 verify (md5)" "$res $(fio_diag mixed)"
ok "fio randrw 64k numjobs=2 offset_increment=64m fsync=16 verify=md5: error 0 in both jobs, fsyncs issued"

# ---------------------------------------------------------------- control
# The verify checks above only mean something if fio really compares data:
# write a verifiable area, corrupt one byte with nbdsh, verify_only must fail.
CTL=(--rw=randwrite --bs=4k --offset=192m --size=4m --iodepth=4 --verify=crc32c --verify_fatal=1)
runfio ctl-write "${CTL[@]}" --do_verify=0
[[ $RC == 0 ]] || fail "fio detects corruption" "setup write: fio exit $RC: $(fio_diag ctl-write)"
runfio ctl-verify "${CTL[@]}" --verify_only=1
[[ $RC == 0 ]] || fail "fio detects corruption" "verify_only before corruption: fio exit $RC: $(fio_diag ctl-verify)"
RC=0
nbdsh_ -u "$URI" -c '
off = (192 << 20) + 8192
b = bytearray(h.pread(4096, off))
b[100] ^= 0xff
h.pwrite(bytes(b), off)
' >"$S/corrupt.log" 2>&1 || RC=$?
[[ $RC == 0 ]] || fail "fio detects corruption" "nbdsh exit $RC$(show_log "$S/corrupt.log")"
runfio ctl-verify2 "${CTL[@]}" --verify_only=1
res=$(fiojson "fio detects corruption" ctl-verify2 '
if not any(j["error"] != 0 for j in jobs): errs.append("no job error")
')
[[ $RC != 0 && $res == ok ]] ||
    fail "fio detects corruption" "fio exit $RC, $res after corrupting one byte: $(fio_diag ctl-verify2)"
grep -q 'verify failed at file' "$S/ctl-verify2.out" "$S/ctl-verify2.err" ||
    fail "fio detects corruption" "no 'verify failed' message: $(fio_diag ctl-verify2)"
ok "fio verify_only detects a one-byte corruption (control)"

echo "ALL OK fio.sh"
