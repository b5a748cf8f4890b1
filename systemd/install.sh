#!/usr/bin/env bash
# Installs (or with --uninstall removes) ringside on a systemd host:
# binaries in /usr/local/bin, units in /etc/systemd/system, system users via
# sysusers.d, default configuration in /etc/ringside (never overwritten).
#
#   systemd/install.sh [--bin-dir target/release] [--root /]      install
#   systemd/install.sh --uninstall [--root /]                     remove (keeps /etc/ringside and /var/lib/ringside)
set -euo pipefail

root=/
bin_dir="$(dirname "$0")/../target/release"
action=install
while (($#)); do
    case "$1" in
        --uninstall) action=uninstall ;;
        --root) root="$2"; shift ;;
        --bin-dir) bin_dir="$2"; shift ;;
        *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
root="${root%/}"
# Paths given are relative to where the command was run; the rest to here.
bin_dir="$(realpath -m "$bin_dir")"
cd "$(dirname "$0")"

units=(ringside-engine@.service ringside-agent.service)
systemd_running() { [[ -z "$root" ]] && [[ -d /run/systemd/system ]]; }

if [[ "$action" == uninstall ]]; then
    if systemd_running; then
        systemctl disable --now ringside-agent.service 'ringside-engine@*.service' 2>/dev/null || true
    fi
    for unit in "${units[@]}"; do rm -f "$root/etc/systemd/system/$unit"; done
    rm -f "$root/usr/local/bin/ringside-engine" "$root/usr/local/bin/ringside-agent"
    rm -f "$root/usr/lib/sysusers.d/ringside.conf" "$root/etc/ringside/agent-trust.env"
    systemd_running && systemctl daemon-reload
    echo "removed ringside (kept $root/etc/ringside, $root/var/lib/ringside and the system users)"
    exit 0
fi

for bin in ringside-engine ringside-agent; do
    [[ -x "$bin_dir/$bin" ]] || { echo "install.sh: $bin_dir/$bin missing: cargo build --release" >&2; exit 1; }
done
install -d "$root/usr/local/bin" "$root/etc/systemd/system" "$root/usr/lib/sysusers.d" "$root/etc/ringside"
install -m 0755 "$bin_dir/ringside-engine" "$bin_dir/ringside-agent" "$root/usr/local/bin/"
# The units name the packaged binaries (/usr/bin); this install puts them in /usr/local/bin.
for unit in "${units[@]}"; do
    sed 's|^ExecStart=/usr/bin/|ExecStart=/usr/local/bin/|' "$unit" \
        | install -m 0644 /dev/stdin "$root/etc/systemd/system/$unit"
done
install -m 0644 ringside.sysusers "$root/usr/lib/sysusers.d/ringside.conf"
if [[ -z "$root" ]]; then
    systemd-sysusers /usr/lib/sysusers.d/ringside.conf
else
    systemd-sysusers --root="$root" "$root/usr/lib/sysusers.d/ringside.conf"
fi
# The engine's state (the model cache); StateDirectory= also fixes this at start.
install -d -m 0750 "$root/var/lib/ringside"
if [[ -z "$root" ]]; then chown ringside-engine:ringside /var/lib/ringside; fi
# The env files may hold secrets (the engine's API key, the collector's
# headers): root:ringside 0640. systemd reads EnvironmentFile= as root, so the
# services need no read access; the group lets operators in it read them.
ringside_gid="$(awk -F: '$1 == "ringside" { print $3 }' "$root/etc/group")"
[[ -n "$ringside_gid" ]] || { echo "install.sh: group ringside missing after systemd-sysusers" >&2; exit 1; }
[[ -e "$root/etc/ringside/engine.env" ]] \
    || install -m 0640 -o 0 -g "$ringside_gid" engine.env "$root/etc/ringside/engine.env"
[[ -e "$root/etc/ringside/agent.env" ]] \
    || install -m 0640 -o 0 -g "$ringside_gid" agent.env "$root/etc/ringside/agent.env"
# The engine user's uid, which the agent must trust (the unit reads this file).
engine_uid="$(awk -F: '$1 == "ringside-engine" { print $3 }' "$root/etc/passwd")"
printf '# Written by install.sh.\nRINGSIDE_AGENT_TRUST=--trusted-uid %s\n' "$engine_uid" \
    | install -m 0644 /dev/stdin "$root/etc/ringside/agent-trust.env"
# Kept from an older install (which left engine.env world-readable): the
# owner and group are set again and the mode only ever tightened.
for env_file in "$root/etc/ringside/engine.env" "$root/etc/ringside/agent.env"; do
    chown "0:$ringside_gid" "$env_file"
    [[ "$(stat -c '%a' "$env_file")" == 600 ]] || chmod 0640 "$env_file"
done
if systemd_running; then
    systemctl daemon-reload
fi
echo "installed ringside; next: systemctl enable --now ringside-engine@<instance> ringside-agent"
