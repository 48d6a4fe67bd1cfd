#!/usr/bin/env bash
# Tests the nbd-rs packages: builds them (packaging/build-packages.sh), then
#
#  .deb  installs it with dpkg into a throwaway root (dpkg --root=DIR with a fresh admin
#        directory; the maintainer scripts run outside a chroot with DPKG_ROOT=DIR, which they
#        and deb-systemd-helper honour), or with --host on this machine with `dpkg -i` (it is
#        purged at the end; refused if nbd-rs is already installed). Then:
#        - the files are where they belong, the man pages render without warnings;
#        - the installed binary: --version, `check --config /etc/nbd-rs.toml` (exit 0), the
#          unit's own ExecStartPre; a real serve of the installed config on a loopback port,
#          looked at with nbdinfo, then stopped with SIGTERM (exit 0);
#        - /etc/nbd-rs.toml is a conffile, and an edited one survives a reinstall;
#        - the service is enabled and the socket is not; /var/lib/nbd-rs exists (0700);
#        - remove: binary and units gone, service disabled, conffile and /var/lib/nbd-rs kept;
#        - purge: conffile and /var/lib/nbd-rs gone, dpkg knows nothing of nbd-rs;
#        - in the throwaway root: the host was not touched.
#  .rpm  file list (rpm -qlp), config marks (rpm -qcp, and noreplace), modes and scriptlets;
#        then, where rpm can, installs it with rpm --root into a throwaway root holding just a
#        shell (its scriptlets run chrooted there, as without systemd), runs the binary, and
#        erases it again: /var/lib/nbd-rs is kept (rpm has no purge).
#
# Usage: packaging/test-packages.sh [--host] [--no-build]
# Prints one OK or FAIL line per check; exits 1 if any check failed. Without systemd running
# as PID 1, starting, restarting and stopping the unit cannot be tested: the scripts take the
# no-systemd path (they check /run/systemd/system, as debhelper's do).
set -uo pipefail
cd "$(dirname "$0")/.."

host=0
build=1
for a in "$@"; do
  case "$a" in
    --host) host=1 ;;
    --no-build) build=0 ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "test-packages: unknown argument $a" >&2; exit 2 ;;
  esac
done

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
fails=0
ok() { echo "OK   $*"; }
fail() { echo "FAIL $*"; fails=$((fails + 1)); }
# check DESCRIPTION COMMAND...: OK if the command succeeds.
check() {
  local what=$1
  shift
  if "$@"; then ok "$what"; else fail "$what"; fi
}
started=$(date +%s)

# Tools: rpm, nbdinfo.
missing=()
command -v rpm >/dev/null || missing+=(rpm)
command -v nbdinfo >/dev/null || missing+=(libnbd-bin)
command -v man >/dev/null || missing+=(man-db)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test-packages: installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ "$build" = 1 ]; then
  packaging/build-packages.sh || { echo "FAIL build-packages.sh"; exit 1; }
fi
deb=$(ls -t target/debian/nbd-rs_*.deb 2>/dev/null | head -n 1)
rpm_file=$(ls -t target/generate-rpm/nbd-rs-*.rpm 2>/dev/null | head -n 1)
[ -n "$deb" ] || { echo "FAIL no target/debian/nbd-rs_*.deb"; exit 1; }
[ -n "$rpm_file" ] || { echo "FAIL no target/generate-rpm/nbd-rs-*.rpm"; exit 1; }
version=$(dpkg-deb -f "$deb" Version)
echo "== test-packages: $deb ($version), $rpm_file"

work=$(mktemp -d /tmp/nbd-rs-pkgtest.XXXXXX)
server_pid=
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null
  if [ "$host" = 1 ] && dpkg-query -W nbd-rs >/dev/null 2>&1 && [ -f "$work/installed-by-test" ]; then
    echo "test-packages: purging nbd-rs after a failure"
    as_root dpkg --purge nbd-rs >/dev/null 2>&1
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------
# .deb
# ---------------------------------------------------------------------------------------------
if [ "$host" = 1 ]; then
  R=""
  dpkg_() { as_root dpkg "$@"; }
  dpkg_query() { dpkg-query "$@"; }
  if dpkg-query -W -f='${Status}' nbd-rs 2>/dev/null | grep -qv 'not-installed'; then
    echo "FAIL nbd-rs is already installed on this machine: refusing to test over it"
    exit 1
  fi
  echo "== deb: installing on this machine (dpkg -i), purged at the end"
else
  R="$work/root"
  mkdir -p "$R/var/lib/dpkg/info" "$R/var/lib/dpkg/updates" "$R/var/lib/dpkg/triggers"
  : >"$R/var/lib/dpkg/status"
  : >"$R/var/lib/dpkg/available"
  # Dependencies (libc6, libssl3) are the host's: the throwaway root has no packages.
  dpkg_() { dpkg --root="$R" --force-script-chrootless --force-depends "$@"; }
  dpkg_query() { dpkg-query --admindir="$R/var/lib/dpkg" "$@"; }
  echo "== deb: installing into a throwaway root, $R (dpkg --root)"
  # What the host has now, to show the test left it alone.
  host_before=$(ls -ld /var/lib/nbd-rs /etc/nbd-rs.toml /etc/systemd/system/*.wants/nbd-rs.* \
    /var/lib/systemd/deb-systemd-helper-enabled/nbd-rs.* 2>/dev/null)
fi

wants=$R/etc/systemd/system/multi-user.target.wants/nbd-rs.service
socket_wants=$R/etc/systemd/system/sockets.target.wants/nbd-rs.socket

if dpkg_ -i "$deb" >"$work/dpkg-i.log" 2>&1; then
  ok "dpkg -i $(basename "$deb")"
  touch "$work/installed-by-test"
else
  fail "dpkg -i $(basename "$deb")"
  sed 's/^/    /' "$work/dpkg-i.log"
  echo "test-packages: cannot go on without the package installed"
  exit 1
fi
check "dpkg: nbd-rs $version installed" \
  test "$(dpkg_query -W -f='${Status} ${Version}' nbd-rs)" = "install ok installed $version"

for f in /usr/bin/nbd-rs /lib/systemd/system/nbd-rs.service /lib/systemd/system/nbd-rs.socket \
  /etc/nbd-rs.toml /usr/share/doc/nbd-rs/README.md /usr/share/doc/nbd-rs/copyright \
  /usr/share/doc/nbd-rs/examples/nbd-rs.toml /usr/share/doc/nbd-rs/examples/memory.toml \
  /usr/share/man/man1/nbd-rs.1.gz /usr/share/man/man1/nbd-rs-check.1.gz \
  /usr/share/man/man1/nbd-rs-drivers.1.gz /usr/share/man/man5/nbd-rs.toml.5.gz; do
  check "installed $f" test -f "$R$f"
done
check "/usr/bin/nbd-rs is executable" test -x "$R/usr/bin/nbd-rs"
check "/etc/nbd-rs.toml is root:root 0640" \
  test "$(stat -c '%U:%G %a' "$R/etc/nbd-rs.toml")" = "root:root 640"
check "every config example installed" bash -c '
  for f in config/examples/*.toml; do cmp -s "$f" "$1/usr/share/doc/nbd-rs/examples/${f##*/}" || exit 1; done' _ "$R"
check "/etc/nbd-rs.toml is config/nbd-rs.toml" cmp -s config/nbd-rs.toml "$R/etc/nbd-rs.toml"

# Man pages: they render, without groff warnings, and say what they should.
for page in man1/nbd-rs.1.gz man1/nbd-rs-check.1.gz man1/nbd-rs-drivers.1.gz man5/nbd-rs.toml.5.gz; do
  out=$(LC_ALL=C.UTF-8 MANWIDTH=100 man --warnings -l "$R/usr/share/man/$page" 2>"$work/man.err")
  if [ -n "$out" ] && [ ! -s "$work/man.err" ]; then
    ok "man page $page renders without warnings"
  else
    fail "man page $page renders without warnings"
    sed 's/^/    /' "$work/man.err" | head -n 20
  fi
done
man1=$(LC_ALL=C.UTF-8 MANWIDTH=200 man -l "$R/usr/share/man/man1/nbd-rs.1.gz" 2>/dev/null)
check "nbd-rs(1) documents the options of --help" bash -c '
  for o in --config --listen --export --read-only --help --version; do
    grep -q -- "$o" <<<"$1" || { echo "    missing $o"; exit 1; }
  done' _ "$man1"
check "nbd-rs(1) lists the subcommands" bash -c 'grep -q "nbd-rs-check(1)" <<<"$1" && grep -q "nbd-rs-drivers(1)" <<<"$1"' _ "$man1"
man5=$(LC_ALL=C.UTF-8 MANWIDTH=200 man -l "$R/usr/share/man/man5/nbd-rs.toml.5.gz" 2>/dev/null)
check "nbd-rs.toml(5) documents every stage of nbd-rs drivers" bash -c '
  for s in $("$2" drivers | sed -n "s/^  \([a-z0-9_]\+\) .*/\1/p"); do
    grep -qE "^ *$s( |\$)" <<<"$1" || { echo "    missing stage $s"; exit 1; }
  done' _ "$man5" "$R/usr/bin/nbd-rs"

# The installed binary, with the installed configuration.
nbd_rs=$R/usr/bin/nbd-rs
conf=$R/etc/nbd-rs.toml
check "nbd-rs --version is ${version%%-*}" bash -c '
  v=$("$1" --version) && echo "    $v" && [ "$v" = "nbd-rs ${2%%-*}" ]' _ "$nbd_rs" "$version"
if "$nbd_rs" check --config "$conf" >"$work/check.out" 2>&1; then
  ok "nbd-rs check --config /etc/nbd-rs.toml (exit 0)"
  sed 's/^/    /' "$work/check.out"
else
  fail "nbd-rs check --config /etc/nbd-rs.toml (exit $?)"
  sed 's/^/    /' "$work/check.out"
fi
# The unit's ExecStartPre, paths mapped into the root.
pre=$(sed -n 's/^ExecStartPre=//p' "$R/lib/systemd/system/nbd-rs.service" | head -n 1)
run_in_root() {
  local cmd=${1//\/usr\/bin\/nbd-rs/$R/usr/bin/nbd-rs}
  cmd=${cmd//\/etc\/nbd-rs.toml/$R/etc/nbd-rs.toml}
  local -a argv
  read -ra argv <<<"$cmd"
  "${argv[@]}" >/dev/null
}
check "the unit's ExecStartPre ($pre) passes" run_in_root "$pre"
check "the unit runs /usr/bin/nbd-rs --config /etc/nbd-rs.toml" \
  grep -qx 'ExecStart=/usr/bin/nbd-rs --config /etc/nbd-rs.toml' "$R/lib/systemd/system/nbd-rs.service"

# A real serve of the installed config, on a free loopback port (the file's 127.0.0.1:10809
# may be taken on a test machine), looked at with nbdinfo.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$nbd_rs" --config "$conf" --listen "127.0.0.1:$port" >"$work/serve.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do
  nbdinfo --size "nbd://127.0.0.1:$port/" >/dev/null 2>&1 && break
  sleep 0.1
done
exports=$(nbdinfo --list --json "nbd://127.0.0.1:$port/" 2>&1)
check "serve: nbdinfo --list shows the installed config's export \"scratch\"" \
  bash -c 'python3 -c "
import json, sys
d = json.loads(sys.argv[1])
(e,) = [e for e in d[\"exports\"] if e[\"export-name\"] == \"scratch\"]
assert e[\"export-size\"] == 64 << 20, e
assert e[\"description\"].startswith(\"scratch space in RAM\"), e
" "$1"' _ "$exports"
check "serve: the empty name is the default export (64 MiB)" \
  test "$(nbdinfo --size "nbd://127.0.0.1:$port/" 2>/dev/null)" = 67108864
check "serve: write and read back with nbdcopy" bash -c '
  head -c 1048576 /dev/urandom >"$2/in" &&
  nbdcopy "$2/in" "nbd://127.0.0.1:$1/scratch" &&
  nbdcopy "nbd://127.0.0.1:$1/scratch" - | head -c 1048576 | cmp -s - "$2/in"' _ "$port" "$work"
kill -TERM "$server_pid"
wait "$server_pid"
status=$?
server_pid=
check "serve: SIGTERM stops it with status 0 (got $status)" test "$status" = 0
[ "$status" = 0 ] || sed 's/^/    /' "$work/serve.log"

# Conffile, enablement, state.
conffiles=$(dpkg_query -W -f='${Conffiles}' nbd-rs)
echo "    Conffiles:$conffiles"
check "/etc/nbd-rs.toml is a conffile (with the shipped md5sum)" \
  grep -q "^ /etc/nbd-rs.toml $(md5sum <config/nbd-rs.toml | cut -d' ' -f1)\$" <<<"$conffiles"
check "nbd-rs.service enabled (multi-user.target.wants)" \
  test "$(readlink "$wants")" = /lib/systemd/system/nbd-rs.service
check "nbd-rs.socket not enabled" test ! -e "$socket_wants" -a ! -L "$socket_wants"
check "/var/lib/nbd-rs exists, mode 0700" test "$(stat -c %a "$R/var/lib/nbd-rs" 2>/dev/null)" = 700
mkdir -p "$R/var/lib/nbd-rs/cache/scratch" && echo state >"$R/var/lib/nbd-rs/cache/scratch/marker"

# An upgrade (here: reinstalling the same version) keeps an edited conffile and the
# service enabled.
echo "# edited by test-packages.sh" >>"$conf"
if dpkg_ -i "$deb" >"$work/dpkg-i2.log" 2>&1; then ok "dpkg -i again (upgrade path)"; else
  fail "dpkg -i again (upgrade path)"
  sed 's/^/    /' "$work/dpkg-i2.log"
fi
check "upgrade: the edited /etc/nbd-rs.toml is kept" grep -q '^# edited by test-packages.sh' "$conf"
check "upgrade: nbd-rs.service still enabled" test -L "$wants"
check "upgrade: /var/lib/nbd-rs kept" test -f "$R/var/lib/nbd-rs/cache/scratch/marker"

# Remove.
if dpkg_ -r nbd-rs >"$work/dpkg-r.log" 2>&1; then ok "dpkg -r nbd-rs"; else
  fail "dpkg -r nbd-rs"
  sed 's/^/    /' "$work/dpkg-r.log"
fi
check "remove: state is config-files" \
  test "$(dpkg_query -W -f='${Status}' nbd-rs)" = "deinstall ok config-files"
check "remove: /usr/bin/nbd-rs gone" test ! -e "$R/usr/bin/nbd-rs"
check "remove: the units gone" test ! -e "$R/lib/systemd/system/nbd-rs.service" -a ! -e "$R/lib/systemd/system/nbd-rs.socket"
check "remove: nbd-rs.service disabled (no link left)" test ! -L "$wants"
check "remove: /etc/nbd-rs.toml kept (edited)" grep -q '^# edited by test-packages.sh' "$conf"
check "remove: /var/lib/nbd-rs kept" test -f "$R/var/lib/nbd-rs/cache/scratch/marker"

# Purge.
if dpkg_ --purge nbd-rs >"$work/dpkg-purge.log" 2>&1; then ok "dpkg --purge nbd-rs"; else
  fail "dpkg --purge nbd-rs"
  sed 's/^/    /' "$work/dpkg-purge.log"
fi
not_known() {
  local st
  st=$(dpkg_query -W -f='${Status}' nbd-rs 2>/dev/null)
  [ -z "$st" ] || [ "$st" = "unknown ok not-installed" ]
}
check "purge: dpkg knows nothing of nbd-rs" not_known
check "purge: /etc/nbd-rs.toml gone" test ! -e "$conf"
check "purge: /var/lib/nbd-rs gone" test ! -e "$R/var/lib/nbd-rs"
check "purge: no systemd links or deb-systemd-helper state left" bash -c '
  ! ls "$1"/etc/systemd/system/*/nbd-rs.* "$1"/etc/systemd/system/nbd-rs.* \
    "$1"/var/lib/systemd/deb-systemd-helper-*/nbd-rs.* 2>/dev/null | grep -q .' _ "$R"
rm -f "$work/installed-by-test"
if [ "$host" = 0 ]; then
  host_after=$(ls -ld /var/lib/nbd-rs /etc/nbd-rs.toml /etc/systemd/system/*.wants/nbd-rs.* \
    /var/lib/systemd/deb-systemd-helper-enabled/nbd-rs.* 2>/dev/null)
  check "the host was not touched" test "$host_before" = "$host_after"
fi

# ---------------------------------------------------------------------------------------------
# .rpm
# ---------------------------------------------------------------------------------------------
echo "== rpm: $rpm_file"
rpm_version=$(rpm -qp --qf '%{NAME} %{VERSION}' "$rpm_file" 2>/dev/null)
check "rpm: nbd-rs ${version%%-*} ($rpm_version)" test "$rpm_version" = "nbd-rs ${version%%-*}"
files=$(rpm -qlp "$rpm_file" 2>/dev/null)
for f in /usr/bin/nbd-rs /usr/lib/systemd/system/nbd-rs.service /usr/lib/systemd/system/nbd-rs.socket \
  /etc/nbd-rs.toml /usr/share/man/man1/nbd-rs.1.gz /usr/share/man/man5/nbd-rs.toml.5.gz \
  /usr/share/doc/nbd-rs/README.md /usr/share/doc/nbd-rs/examples/nbd-rs.toml \
  /usr/share/doc/nbd-rs/examples/memory.toml; do
  check "rpm -qlp lists $f" grep -qx "$f" <<<"$files"
done
check "rpm -qcp: the only config file is /etc/nbd-rs.toml" \
  test "$(rpm -qcp "$rpm_file" 2>/dev/null)" = /etc/nbd-rs.toml
check "rpm: /etc/nbd-rs.toml is config(noreplace)" bash -c '
  rpm -qp --qf "[%{FILEFLAGS:fflags} %{FILENAMES}\n]" "$1" | grep -qx "cn /etc/nbd-rs.toml"' _ "$rpm_file"
check "rpm: modes 0755 /usr/bin/nbd-rs, 0640 /etc/nbd-rs.toml" bash -c '
  m=$(rpm -qp --qf "[%{FILEMODES:perms} %{FILENAMES}\n]" "$1") &&
  grep -qx -- "-rwxr-xr-x /usr/bin/nbd-rs" <<<"$m" && grep -qx -- "-rw-r----- /etc/nbd-rs.toml" <<<"$m"' _ "$rpm_file"
scripts=$(rpm -qp --scripts "$rpm_file" 2>/dev/null)
check "rpm: scriptlets enable on install, disable on erase, try-restart on upgrade" bash -c '
  grep -q "enable nbd-rs.service" <<<"$1" && grep -q "disable nbd-rs.service" <<<"$1" &&
  grep -q "try-restart nbd-rs.service" <<<"$1"' _ "$scripts"

# Install into a throwaway root that holds only a shell, mkdir and chmod: the scriptlets run
# chrooted there, without systemctl (like a container), and must still succeed.
RR=$work/rpmroot
mkdir -p "$RR"
for b in /bin/sh /bin/mkdir /bin/chmod; do
  real=$(readlink -f "$b")
  mkdir -p "$RR$(dirname "$b")" "$RR$(dirname "$real")"
  cp "$real" "$RR$real"
  [ "$real" = "$b" ] || ln -sf "$real" "$RR$b"
  for lib in $(ldd "$real" | grep -o '/[^ ]*'); do
    mkdir -p "$RR$(dirname "$lib")"
    cp -L "$lib" "$RR$lib"
  done
done
# Debian's rpm wants --force-debian to install anything.
force_debian=
rpm --help 2>/dev/null | grep -q -- --force-debian && force_debian=--force-debian
rpm_() { rpm --root="$RR" --dbpath=/var/lib/rpm "$@"; }
if rpm_ --initdb >"$work/rpm.log" 2>&1 && rpm_ -i --nodeps $force_debian "$rpm_file" >>"$work/rpm.log" 2>&1; then
  ok "rpm -i --root (scriptlets run in a chroot without systemd)"
  check "rpm: installed /usr/bin/nbd-rs, units, config, man pages" bash -c '
    for f in /usr/bin/nbd-rs /usr/lib/systemd/system/nbd-rs.service /etc/nbd-rs.toml \
      /usr/share/man/man1/nbd-rs.1.gz /usr/share/man/man5/nbd-rs.toml.5.gz; do
      test -f "$1$f" || { echo "    missing $f"; exit 1; }
    done' _ "$RR"
  check "rpm: %post made /var/lib/nbd-rs (0700)" test "$(stat -c %a "$RR/var/lib/nbd-rs" 2>/dev/null)" = 700
  check "rpm: the installed nbd-rs checks the installed /etc/nbd-rs.toml" \
    bash -c '"$1/usr/bin/nbd-rs" check --config "$1/etc/nbd-rs.toml" >/dev/null' _ "$RR"
  echo "# edited" >>"$RR/etc/nbd-rs.toml"
  touch "$RR/var/lib/nbd-rs/marker"
  if rpm_ -e $force_debian nbd-rs >>"$work/rpm.log" 2>&1; then ok "rpm -e --root"; else fail "rpm -e --root"; fi
  check "rpm -e: /usr/bin/nbd-rs gone" test ! -e "$RR/usr/bin/nbd-rs"
  check "rpm -e: the edited config saved as /etc/nbd-rs.toml.rpmsave" test -f "$RR/etc/nbd-rs.toml.rpmsave"
  check "rpm -e: /var/lib/nbd-rs kept" test -f "$RR/var/lib/nbd-rs/marker"
else
  fail "rpm -i --root (scriptlets run in a chroot without systemd)"
  sed 's/^/    /' "$work/rpm.log"
fi

elapsed=$(($(date +%s) - started))
if [ "$fails" = 0 ]; then
  echo "== test-packages: all checks passed (${elapsed}s)"
else
  echo "== test-packages: $fails check(s) FAILED (${elapsed}s)"
  exit 1
fi
