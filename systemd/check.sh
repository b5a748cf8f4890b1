#!/usr/bin/env bash
# Offline CI checks of the systemd units, on this machine (as root):
#  1. install.sh puts binaries, units, sysusers and config in place, the env
#     files root:ringside 0640;
#  2. `systemd-analyze verify` is clean on every unit;
#  3. `systemd-analyze security --offline=yes` exposure within target
#     (agent <= 2.0, engine <= 3.0);
#  4. install.sh --uninstall removes what it installed.
# The units running under a real systemd (users, group, sandbox, readiness,
# restart, reload, purge) are systemd/real-systemd-test.sh's.
# Needs release binaries (in $CARGO_TARGET_DIR/release, default target/release).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[systemd-check] %s\n' "$*" >&2; }
fail() { say "FAIL: $*"; exit 1; }

systemd/install.sh --bin-dir "${CARGO_TARGET_DIR:-target}/release" >/dev/null
trap 'systemd/install.sh --uninstall >/dev/null' EXIT

for env_file in /etc/ringside/engine.env /etc/ringside/agent.env; do
    stat -c '%U:%G %a' "$env_file" | grep -qx 'root:ringside 640' \
        || fail "$env_file is $(stat -c '%U:%G %a' "$env_file"), expected root:ringside 640 (it may hold the API key)"
done
say "env files: root:ringside 640"

units=(/etc/systemd/system/ringside-engine@.service /etc/systemd/system/ringside-agent.service)
out="$(systemd-analyze verify "${units[@]}" 2>&1)" || fail "systemd-analyze verify: $out"
[[ -z "$out" ]] || fail "systemd-analyze verify printed: $out"
say "systemd-analyze verify: clean"

check_exposure() {
    local unit="$1" limit="$2" score
    score="$(systemd-analyze security --offline=yes "$unit" 2>/dev/null \
        | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')"
    [[ -n "$score" ]] || fail "no exposure score for $unit"
    say "exposure $(basename "$unit"): $score (target <= $limit)"
    awk -v s="$score" -v l="$limit" 'BEGIN { exit !(s <= l) }' || fail "$unit exposure $score > $limit"
}
check_exposure /etc/systemd/system/ringside-agent.service 2.0
check_exposure /etc/systemd/system/ringside-engine@.service 3.0

systemd/install.sh --uninstall >/dev/null
trap - EXIT
for path in /usr/local/bin/ringside-engine /usr/local/bin/ringside-agent "${units[@]}" /usr/lib/sysusers.d/ringside.conf; do
    [[ ! -e "$path" ]] || fail "install.sh --uninstall left $path"
done
say "install.sh --uninstall: removed"
say "ok"
