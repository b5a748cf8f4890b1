#!/usr/bin/env bash
# CI checks of the systemd deployment, on this machine (as root):
#  1. install.sh puts binaries, units, sysusers and config in place;
#  2. `systemd-analyze verify` is clean on every unit;
#  3. `systemd-analyze security --offline=yes` exposure within target
#     (agent <= 2.0, engine <= 3.0);
#  4. the engine and the agent run as their two system users sharing the
#     group, as the units run them: the agent attaches, toggles tracing and
#     exports; a third user outside the group cannot open the segment;
#  5. install.sh --uninstall removes what it installed.
# Needs release binaries (in $CARGO_TARGET_DIR/release, default target/release) and the default model.
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

# 4. Two users, one group, as the units would run them.
model_src="$(scripts/install-model.sh | tail -n1)"
install -d -o ringside-engine -g ringside -m 0750 /var/lib/ringside/models
install -o ringside-engine -g ringside -m 0640 "$model_src" /var/lib/ringside/models/
instance="systemd-check-$$"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
engine_log="$(mktemp)"
# MemoryDenyWriteExecute=yes as the unit sets it, through the kernel's own
# per-process switch (prctl PR_SET_MDWE, Linux 6.3+, inherited across exec):
# llama.cpp must serve without ever mapping memory writable and executable.
mdwe='import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    print("[systemd-check] note: PR_SET_MDWE unavailable, engine runs without it", file=sys.stderr)
os.execv(sys.argv[1], sys.argv[1:])'
setpriv --reuid=ringside-engine --regid=ringside --init-groups --inh-caps=-all \
    env -i PATH=/usr/bin:/bin RINGSIDE_CACHE_DIR=/var/lib/ringside OMP_WAIT_POLICY=passive \
    python3 -c "$mdwe" /usr/local/bin/ringside-engine serve --port "$port" --instance "$instance" \
    --served-model-name gemma-3-270m >"$engine_log" 2>&1 &
engine_pid=$!
cleanup_engine() { kill "$engine_pid" 2>/dev/null || true; wait "$engine_pid" 2>/dev/null || true; }
trap 'cleanup_engine; systemd/install.sh --uninstall >/dev/null' EXIT
for _ in $(seq 1 600); do
    curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    kill -0 "$engine_pid" 2>/dev/null || { cat "$engine_log" >&2; fail "engine died"; }
    sleep 0.2
done
segment="/dev/shm/ringside.$instance"
stat -c '%U:%G %a' "$segment" | grep -qx 'ringside-engine:ringside 660' \
    || fail "segment is $(stat -c '%U:%G %a' "$segment"), expected ringside-engine:ringside 660"
say "engine runs as ringside-engine; segment $segment is ringside-engine:ringside 0660"


engine_uid="$(id -u ringside-engine)"
as_agent() {
    setpriv --reuid=ringside-agent --regid=ringside-agent --init-groups --inh-caps=-all \
        env -i PATH=/usr/bin:/bin HOME=/nonexistent "$@"
}
agent=(/usr/local/bin/ringside-agent)
select=(--engine "$instance" --trusted-uid "$engine_uid")
request() {
    curl -fsS "http://127.0.0.1:$port/v1/completions" -H 'content-type: application/json' \
        -H "traceparent: 00-$1-00f067aa0ba902b7-01" \
        -d '{"model":"gemma-3-270m","prompt":"Hello","max_tokens":3}' >/dev/null
}

# The agent user switches tracing off in the engine's segment...
as_agent "${agent[@]}" tracing off "${select[@]}" >/dev/null || fail "agent user could not switch tracing off"
request 11111111111111111111111111111111
# ...and on again, then exports: only the request made while on shows up.
as_agent "${agent[@]}" tracing on "${select[@]}" >/dev/null || fail "agent user could not switch tracing on"
out_dir="$(mktemp -d)"
chown ringside-agent "$out_dir"
# Not through as_agent: a backgrounded shell function is a subshell, and $!
# would be its pid rather than the agent's.
setpriv --reuid=ringside-agent --regid=ringside-agent --init-groups --inh-caps=-all \
    env -i PATH=/usr/bin:/bin HOME=/nonexistent \
    "${agent[@]}" run "${select[@]}" --backfill --exporter file --output "$out_dir/spans.jsonl" \
    --batch-delay-ms 100 --state-file "$out_dir/state.json" --admin-listen off >"$out_dir/agent.log" 2>&1 &
agent_pid=$!
trap 'kill "$agent_pid" 2>/dev/null || true; cleanup_engine; systemd/install.sh --uninstall >/dev/null' EXIT
request 22222222222222222222222222222222
for _ in $(seq 1 100); do
    grep -q 22222222222222222222222222222222 "$out_dir/spans.jsonl" 2>/dev/null && break
    kill -0 "$agent_pid" 2>/dev/null || { cat "$out_dir/agent.log" >&2; fail "agent died"; }
    sleep 0.1
done
grep -q 22222222222222222222222222222222 "$out_dir/spans.jsonl" 2>/dev/null \
    || { cat "$out_dir/agent.log" >&2; fail "the agent user exported nothing"; }
! grep -q 11111111111111111111111111111111 "$out_dir/spans.jsonl" \
    || fail "a request made while tracing was off was exported"
say "agent runs as ringside-agent: toggled tracing and exported the engine's spans"
say "the engine served under PR_SET_MDWE (no writable+executable memory), as MemoryDenyWriteExecute=yes runs it"

# A user outside the group cannot open the segment at all.
if outsider="$(setpriv --reuid=nobody --regid=nogroup --clear-groups --inh-caps=-all \
        env -i PATH=/usr/bin:/bin "${agent[@]}" tracing status "${select[@]}" 2>&1)"; then
    fail "user nobody opened the segment: $outsider"
fi
grep -qi "permission denied" <<<"$outsider" || fail "expected a permission error, got: $outsider"
say "user nobody is refused: $(grep -i -m1 'permission denied' <<<"$outsider")"
kill "$agent_pid"
wait "$agent_pid" || fail "the agent did not exit cleanly on SIGTERM: $(cat "$out_dir/agent.log")"
say "ok"
