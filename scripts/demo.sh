#!/usr/bin/env bash
# The ringside demo: the engine on the default model, real requests through
# the official OpenAI client (one carrying a W3C traceparent, one streamed,
# one rejected), and what the engine recorded for each of them in its
# shared-memory ring, read back from another process.
#
# Environment: PORT (default 8000).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
source scripts/cpu-flags.sh
echo "[demo] building (first time: llama.cpp compiles for a few minutes)" >&2
cargo build --release --locked -p ringside-engine --bins --examples

port="${PORT:-8000}"
instance="demo-${port}"
model="gemma-3-270m"
log="$(mktemp -t ringside-engine.XXXXXX.log)"

target/release/ringside-engine serve --port "$port" --instance "$instance" \
    --served-model-name "$model" --parallel 2 >"$log" 2>&1 &
engine_pid=$!
trap 'kill "$engine_pid" 2>/dev/null || true; wait "$engine_pid" 2>/dev/null || true' EXIT

echo "[demo] engine pid $engine_pid on 127.0.0.1:$port, segment /dev/shm/ringside.$instance (log: $log)" >&2
for _ in $(seq 1 600); do
    if curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$engine_pid" 2>/dev/null; then cat "$log" >&2; exit 1; fi
    sleep 0.2
done

.venv/bin/python scripts/demo_requests.py "http://127.0.0.1:$port/v1" "$model"

echo
echo "> the records the engine wrote into its ring (read from another process):"
target/release/examples/ring_dump "$instance"
