# nbd-rs %postun. $1: 0 when the package is erased, 1 or more on an upgrade.
# Upgrade: restart the service if it is running. /var/lib/nbd-rs (caches) is kept on erase:
# rpm has no purge; delete it by hand when the data is no longer wanted.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart nbd-rs.service >/dev/null 2>&1 || :
    fi
fi
exit 0
