#!/usr/bin/env bash
# The benchmark suite (issue 7) in one command: builds in release mode, runs
# every benchmark and writes perf/RESULTS.md (generated; the hand-written
# analysis lives in perf/NOTES.md and perf/ENGINE_VS_LLAMACPP.md).
#
#   scripts/bench.sh [--quick|--full] [--output FILE]
#
#   --quick  (default) a few minutes: short runs, one repeat where a repeat
#            is minutes; skips the llama.cpp comparison (its build is ~10 min)
#   --full   real numbers: longer runs, repeats, and engine vs llama.cpp
#
# Parts: hot path (ringside push vs an in-process OpenTelemetry span),
# engine tracing on/off (+ agent, + without the step ring), the in-flight table's update and read,
# the step record push (ABI 1.4) against the request record push, agent throughput/cost/freshness/overload,
# the agent's CPU for steps (1 000 and 10 000 steps/s, joined to requests),
# engine vs llama.cpp (full only). A part whose harness breaks is reported
# as failed in the results and makes the script exit non-zero at the end;
# no figure ever fails it (these machines are noisy; benchmarks measure).
#
# Environment: CARGO_TARGET_DIR is honoured; BENCH_SKIP="hot_path agent ..."
# skips parts by name (hot_path, engine_tracing, inflight, steps, agent, agent_pinned, agent_steps,
# llamacpp).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=quick
output=perf/RESULTS.md
while (($#)); do
    case "$1" in
        --quick) mode=quick; shift ;;
        --full) mode=full; shift ;;
        --output) output="${2:?--output needs a file}"; shift 2 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "bench.sh: unknown argument '$1' (usage: scripts/bench.sh [--quick|--full] [--output FILE])" >&2; exit 2 ;;
    esac
done

say() { printf '\n\033[1m== %s ==\033[0m\n' "$*" >&2; }
skip() { [[ " ${BENCH_SKIP:-} " == *" $1 "* ]]; }

say "setup (installs only what is missing)"
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
source scripts/cpu-flags.sh
target="${CARGO_TARGET_DIR:-$PWD/target}"
export CARGO_TARGET_DIR="$target"

say "build (release)"
cargo build --workspace --release --locked --bins
cargo bench -p ringside-perf --locked --no-run 2>&1 | tail -n 3 >&2

report_dir="$(mktemp -d)"
trap 'rm -rf "$report_dir"' EXIT
export RINGSIDE_BENCH_REPORT_DIR="$report_dir"
load_start="$(cut -d' ' -f1-3 /proc/loadavg)"
started="$(date -u '+%Y-%m-%d %H:%M UTC')"
failed=()

# Runs one part; a broken harness is recorded, never fatal for the others.
part() {
    local name="$1"; shift
    if skip "$name"; then
        printf '## %s\n\nSkipped (BENCH_SKIP).\n' "$name" >"$report_dir/$name.md"
        return
    fi
    say "$name ($mode)"
    if ! "$@"; then
        failed+=("$name")
        # shellcheck disable=SC2016 # the backquotes are markdown, not expansions
        printf '## %s\n\n**Failed**: the harness broke (see the output of `scripts/bench.sh`); no figures.\n' \
            "$name" >>"$report_dir/$name.md"
    fi
}

if [[ $mode == quick ]]; then
    part hot_path env HOT_PATH_ROUNDS=4 HOT_PATH_CALLS=10000 \
        cargo bench -p ringside-perf --locked --bench hot_path
    part agent "$target/release/agent_load" --seconds 3 --repeats 1 \
        --rates 2500,10000,100000,0 --freshness-rates 10000
    part agent_steps "$target/release/agent_load" --step-rates 1000,10000 --seconds 3 --repeats 1
    part engine_tracing env ENGINE_BENCH_CLIENTS=2 ENGINE_BENCH_BLOCKS=4 ENGINE_BENCH_REQUESTS=2 \
        ENGINE_BENCH_MAX_TOKENS=32 cargo bench -p ringside-perf --locked --bench engine_tracing
    part inflight env INFLIGHT_ROUNDS=4 INFLIGHT_CALLS=100000 \
        cargo bench -p ringside-perf --locked --bench inflight
    part steps env STEPS_ROUNDS=4 STEPS_CALLS=100000 \
        cargo bench -p ringside-perf --locked --bench steps
    # shellcheck disable=SC2016 # the backquotes are markdown, not expansions
    printf '## Engine vs llama.cpp\n\nNot run in quick mode (building llama-server takes ~10 min on 2 cores): `scripts/bench.sh --full` or `scripts/bench-llamacpp.sh`. Earlier figures and the investigation: [ENGINE_VS_LLAMACPP.md](ENGINE_VS_LLAMACPP.md).\n' \
        >"$report_dir/llamacpp.md"
else
    part hot_path env HOT_PATH_ROUNDS=10 HOT_PATH_CALLS=50000 \
        cargo bench -p ringside-perf --locked --bench hot_path
    part agent "$target/release/agent_load" --seconds 10 --repeats 3 \
        --rates 2500,10000,100000,0 --freshness-rates 2500,10000,100000
    # The overload pair again with the producer on a CPU of its own: tells
    # the ring's contention from the agent preempting the producer.
    part agent_pinned "$target/release/agent_load" --pin --seconds 10 --repeats 3 \
        --rates 0 --freshness-rates none
    part agent_steps "$target/release/agent_load" --step-rates 1000,10000 --seconds 10 --repeats 3
    part engine_tracing env ENGINE_BENCH_CLIENTS=4 ENGINE_BENCH_BLOCKS=16 ENGINE_BENCH_REQUESTS=2 \
        ENGINE_BENCH_MAX_TOKENS=64 cargo bench -p ringside-perf --locked --bench engine_tracing
    part inflight env INFLIGHT_ROUNDS=12 INFLIGHT_CALLS=500000 \
        cargo bench -p ringside-perf --locked --bench inflight
    part steps env STEPS_ROUNDS=12 STEPS_CALLS=500000 \
        cargo bench -p ringside-perf --locked --bench steps
    part llamacpp scripts/bench-llamacpp.sh --rounds 8 --clients 4 --max-tokens 128
fi

say "writing $output"
rev="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD 2>/dev/null || rev+=" (with uncommitted changes)"
{
    echo "# Benchmark results"
    echo
    echo "Generated by \`scripts/bench.sh --$mode\` — do not edit; the analysis and earlier hand-made"
    echo "measurements are in [NOTES.md](NOTES.md) and [ENGINE_VS_LLAMACPP.md](ENGINE_VS_LLAMACPP.md)."
    echo
    echo "| | |"
    echo "|---|---|"
    echo "| date | $started |"
    echo "| git revision | $rev |"
    echo "| CPU | $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores available |"
    echo "| memory | $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) |"
    echo "| kernel | Linux $(uname -r) |"
    echo "| load average (1, 5, 15 min) | at start $load_start, at end $(cut -d' ' -f1-3 /proc/loadavg) |"
    echo "| build | \`--release\`, RUSTFLAGS \`${RUSTFLAGS:-}\`, $(rustc --version) |"
    echo
    echo "Every figure is the median with min–max over the repeated runs or rounds of this run, and every"
    echo "ratio is against a baseline measured in the same run, interleaved with it. The machine may be"
    echo "shared: read the load average above before reading any figure."
    echo
    for name in hot_path engine_tracing inflight steps agent agent_pinned agent_steps llamacpp; do
        if [[ -f "$report_dir/$name.md" ]]; then
            # Each part prints its own machine line; the header has it.
            cat "$report_dir/$name.md"
            echo
        fi
    done
} >"$output"

if ((${#failed[@]})); then
    echo "bench.sh: harness failures in: ${failed[*]} (figures of the other parts are in $output)" >&2
    exit 1
fi
echo "bench.sh: wrote $output" >&2
