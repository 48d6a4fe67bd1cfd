# nbd-rs %preun. $1: 0 when the package is erased, 1 or more on an upgrade.
# Erase: stop and disable the units. An upgrade keeps the service running (see %postun).
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop nbd-rs.socket nbd-rs.service >/dev/null 2>&1 || :
    fi
    if command -v systemctl >/dev/null 2>&1; then
        systemctl --no-reload disable nbd-rs.service nbd-rs.socket >/dev/null 2>&1 || :
    fi
fi
exit 0
