# nbd-rs %post. $1: 1 on a first install, 2 or more on an upgrade.
# First install: nbd-rs.service is enabled but not started (nothing to serve until
# /etc/nbd-rs.toml names an export); nbd-rs.socket is optional and left disabled.
# Works without a running systemd: systemctl enable only writes symlinks then.
if [ ! -d /var/lib/nbd-rs ]; then
    mkdir -p /var/lib/nbd-rs
    chmod 0700 /var/lib/nbd-rs
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ] && command -v systemctl >/dev/null 2>&1; then
    systemctl --no-reload enable nbd-rs.service >/dev/null 2>&1 || :
fi
exit 0
