# Shared helpers for tests/clients/*.sh. Source it; do not run it.
#
# Provides:
#   ok NAME            print "OK NAME"
#   fail NAME WHAT     print "FAIL NAME: WHAT" (to stdout) and exit 1
#   parse_uri URI      sets URI_SCHEME URI_HOST URI_PORT URI_EXPORT URI_SOCKET
#                      and SERVER_URI (the URI without the export name, for --list)
#   need_tools T...    fail early if a tool is missing
#   show_log FILE      last lines of a log, indented, for FAIL messages
#   FAST_ZERO          from $NBD_FAST_ZERO: "required" (default) or "optional".
#                      required: the export must advertise NBD_FLAG_SEND_FAST_ZERO
#                      and FAST_ZERO requests must succeed (nbd-rs does this).
#                      optional: not advertising it / ENOTSUP is accepted, as the
#                      NBD spec allows (needed for nbdkit's file plugin, which
#                      does not advertise fast zero).
#
# Every script using this takes: URI SCRATCH

ok() {
    echo "OK $1"
}

fail() {
    local name=$1
    shift
    echo "FAIL $name: $*"
    exit 1
}

show_log() {
    # Last 15 lines of a log file, on one line each, prefixed, for FAIL output.
    if [[ -f $1 ]]; then
        printf '\n---- %s (last lines) ----\n' "$1"
        tail -n 15 "$1"
        printf -- '---- end ----'
    fi
}

need_tools() {
    local t
    for t in "$@"; do
        command -v "$t" >/dev/null 2>&1 || fail "tools" "required tool '$t' not found in PATH"
    done
}

# nbdsh must use Debian's python3 (pyenv shims hide python3-libnbd).
nbdsh_() {
    PATH=/usr/bin:$PATH nbdsh "$@"
}

parse_uri() {
    local uri=$1 out
    out=$(python3 - "$uri" <<'PY'
import shlex, sys
from urllib.parse import urlsplit, unquote, parse_qs, urlencode
u = urlsplit(sys.argv[1])
scheme = u.scheme
if scheme not in ("nbd", "nbd+unix"):
    print("URI_ERROR=" + shlex.quote("unsupported URI scheme %r (want nbd:// or nbd+unix://)" % scheme))
    sys.exit(0)
export = unquote(u.path[1:]) if u.path.startswith("/") else unquote(u.path)
q = parse_qs(u.query)
sock = q.get("socket", [""])[0]
host = u.hostname or ""
port = u.port or 10809
if scheme == "nbd":
    netloc = u.netloc
    server = "nbd://%s/" % netloc
else:
    if not sock:
        print("URI_ERROR=" + shlex.quote("nbd+unix URI without ?socket="))
        sys.exit(0)
    server = "nbd+unix:///?" + urlencode({"socket": sock})
for k, v in (("URI_SCHEME", scheme), ("URI_HOST", host), ("URI_PORT", str(port)),
             ("URI_EXPORT", export), ("URI_SOCKET", sock), ("SERVER_URI", server),
             ("URI_ERROR", "")):
    print("%s=%s" % (k, shlex.quote(v)))
PY
) || fail "uri" "could not parse URI '$uri'"
    eval "$out"
    [[ -z $URI_ERROR ]] || fail "uri" "$URI_ERROR"
}

# Usage check shared by all scripts; sets URI and SCRATCH (absolute).
init_args() {
    if [[ $# -ne 2 ]]; then
        echo "usage: $0 URI SCRATCH-DIR" >&2
        exit 2
    fi
    URI=$1
    mkdir -p "$2"
    SCRATCH=$(cd "$2" && pwd)
    parse_uri "$URI"
}

FAST_ZERO=${NBD_FAST_ZERO:-required}
case $FAST_ZERO in
required | optional) ;;
*) fail "NBD_FAST_ZERO" "must be 'required' or 'optional', got '$FAST_ZERO'" ;;
esac

# Integer helpers
MiB=$((1024 * 1024))
