#!/usr/bin/env bash
# The ringside demo: the engine on the default model, the agent attached to it
# from another process, real requests through the official OpenAI client (one
# carrying a W3C traceparent, one streamed, one rejected), and the spans the
# agent made of them, printed as a tree per trace (the agent's console
# exporter; `--exporter otlp` sends the same to a collector).
#
# Environment: PORT (default 8000).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
source scripts/cpu-flags.sh
echo "[demo] building (first time: llama.cpp compiles for a few minutes)" >&2
cargo build --release --locked -p ringside-engine -p ringside-agent --bins

bin="${CARGO_TARGET_DIR:-target}/release"
port="${PORT:-8000}"
instance="demo-${port}"
model="gemma-3-270m"
log="$(mktemp -t ringside-engine.XXXXXX.log)"
agent_out="$(mktemp -t ringside-agent.XXXXXX.out)"
agent_log="$(mktemp -t ringside-agent.XXXXXX.log)"

"$bin/ringside-engine" serve --port "$port" --instance "$instance" \
    --served-model-name "$model" --parallel 2 >"$log" 2>&1 &
engine_pid=$!
agent_pid=""
cleanup() {
    if [[ -n "$agent_pid" ]]; then
        kill "$agent_pid" 2>/dev/null || true
    fi
    kill "$engine_pid" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT

echo "[demo] engine pid $engine_pid on 127.0.0.1:$port, segment /dev/shm/ringside.$instance (log: $log)" >&2
for _ in $(seq 1 600); do
    if curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$engine_pid" 2>/dev/null; then cat "$log" >&2; exit 1; fi
    sleep 0.2
done

# The agent attaches to the running engine (no restart) and prints spans.
"$bin/ringside-agent" run --engine "$instance" --exporter console \
    --batch-delay-ms 200 >"$agent_out" 2>"$agent_log" &
agent_pid=$!
echo "[demo] agent pid $agent_pid attached to $instance (log: $agent_log)" >&2
sleep 1.5

.venv/bin/python scripts/demo_requests.py "http://127.0.0.1:$port/v1" "$model"

# SIGTERM: the agent flushes what it holds and reports its accounting.
sleep 1
kill -TERM "$agent_pid"
wait "$agent_pid" || true
agent_pid=""
echo
echo "> the spans the agent exported (a tree per trace):"
cat "$agent_out"
echo
echo "> the agent's accounting:"
grep -E "written|delivered|accounting" "$agent_log" | sed 's/^/  /' || true
