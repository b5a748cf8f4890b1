#!/usr/bin/env bash
# Runs every ringside test: unit, property, cross-process and end-to-end tests
# (real engine, real model, real OpenAI client, real collector), the loom
# model of the ring, miri over the ring, and a short fuzzing run.
# Installs what is missing first (scripts/setup.sh --tests).
#
# Each step prints its duration, and the run ends with a table of them.
#
# Environment:
#   FUZZ_SECONDS   seconds per fuzz target (default 20; 0 builds only)
#   LOOM_MAX_PREEMPTIONS  loom's preemption bound (default 3)
#   CI             when "true" (.ci/run sets it), a check that cannot run
#                  (miri, fuzz, a missing end-to-end prerequisite) fails the
#                  run, naming it; otherwise it is reported as SKIPPED
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

strict=0
[[ "${CI:-}" == true ]] && strict=1
skipped=()
timings=()
current_step=""
step_start=$SECONDS

# Ends the current step, printing its duration.
end_step() {
    [[ -n "$current_step" ]] || return 0
    local took=$((SECONDS - step_start))
    printf '\033[1m== %s: %ds ==\033[0m\n' "$current_step" "$took" >&2
    timings+=("$(printf '%6ds  %s' "$took" "$current_step")")
    current_step=""
}
# step NAME: ends the previous step and starts this one.
step() {
    end_step
    current_step="$*"
    step_start=$SECONDS
    printf '\n\033[1m== %s ==\033[0m\n' "$*" >&2
}
on_exit() {
    local rc=$?
    if ((rc)) && [[ -n "$current_step" ]]; then
        printf '\nFAILED in step "%s" after %ds (exit %d)\n' \
            "$current_step" $((SECONDS - step_start)) "$rc" >&2
    fi
}
trap on_exit EXIT
# skip WHAT: a check that cannot run here. SKIPPED at the end; under CI=true
# the run fails there, naming it.
skip() { skipped+=("$1"); }

step "setup"
scripts/setup.sh --tests
# shellcheck source=scripts/cpu-flags.sh
source scripts/cpu-flags.sh

# What the end-to-end tests need and setup.sh should have installed. Under
# CI=true a missing one fails the run at once, naming it; otherwise it is
# reported (the tests that need it then fail as they always have).
step "end-to-end prerequisites"
model="${RINGSIDE_CACHE_DIR:-$HOME/.cache/ringside}/models/gemma-3-270m-q4_k_m.gguf"
missing=()
[[ -f "$model" ]] || missing+=("the default model ($model; scripts/install-model.sh)")
.venv/bin/python -c 'import openai, rotel, kubernetes_validate' 2>/dev/null \
    || missing+=(".venv Python tools (openai, rotel, kubernetes-validate; scripts/setup.sh)")
[[ -x .venv/bin/rotel-agent ]] || missing+=("rotel-agent in .venv/bin (scripts/setup.sh)")
[[ -x .venv/bin/phoenix ]] || missing+=("Arize Phoenix in .venv (scripts/setup.sh --tests)")
for tool in tmux promtool prometheus; do
    command -v "$tool" >/dev/null || missing+=("$tool (scripts/setup.sh)")
done
if ((${#missing[@]})); then
    printf 'MISSING: %s\n' "${missing[@]}" >&2
    if ((strict)); then
        printf '\nFAILED: CI=true and end-to-end prerequisites are missing (above)\n' >&2
        exit 1
    fi
fi

# One profile for everything: llama.cpp is compiled once, and the engine runs
# at a usable speed in the end-to-end tests.
step "build (the end-to-end tests start the workspace's binaries)"
cargo build --workspace --release --locked --bins

step "cargo test --workspace (unit, property, cross-process, end-to-end)"
RINGSIDE_E2E=1 cargo test --workspace --release --locked

# The benchmark harnesses at their smallest (scripts/bench.sh runs them for
# real): that they run, not what they measure; no figure can fail this.
step "benchmark harness smoke (hot path; agent at 10 k records/s into rotel and the timing sink)"
HOT_PATH_ROUNDS=1 HOT_PATH_CALLS=500 cargo bench -p ringside-perf --locked --bench hot_path >/dev/null
"${CARGO_TARGET_DIR:-target}/release/agent_load" --rates 10000 --freshness-rates 10000 \
    --seconds 2 --repeats 1 >/dev/null

step "deployment: systemd units (verify, offline security scores) and Kubernetes manifests"
systemd/check.sh
.venv/bin/python deploy/kubernetes/check.py

# The .deb installed and its units run by a real systemd in a throwaway
# bookworm container (the root filesystem cached in ~/.cache/ringside).
if ((strict)) || { ((EUID == 0)) && command -v systemd-nspawn >/dev/null; }; then
    step "deployment: the .deb under a real systemd (systemd/real-systemd-test.sh)"
    systemd/real-systemd-test.sh
else
    skip "real-systemd test (needs root and systemd-nspawn: scripts/setup.sh --tests)"
fi

step "loom model of the commit protocol"
RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-3}" \
    cargo test -p ringside-shm-protocol --release --lib --target-dir target/loom -- loom

if rustup +nightly component list --installed 2>/dev/null | grep -q '^miri'; then
    step "miri over the ring (heap-backed)"
    MIRIFLAGS="-Zmiri-disable-isolation" \
        cargo +nightly miri test -p ringside-shm-protocol --lib --target-dir target/miri -- ring_tests record:: inflight step::
else
    skip "miri (no nightly toolchain with miri)"
fi

if command -v cargo-fuzz >/dev/null && rustup toolchain list | grep -q nightly; then
    step "fuzzing the reader (${FUZZ_SECONDS:-20}s per target)"
    (
        cd shm-protocol
        cargo +nightly fuzz build --release
        for target in segment record step; do
            if [[ "${FUZZ_SECONDS:-20}" != 0 ]]; then
                cargo +nightly fuzz run --release "$target" -- \
                    -max_total_time="${FUZZ_SECONDS:-20}" -max_len=1200000 -rss_limit_mb=4096
            fi
        done
    )
else
    skip "fuzz (no cargo-fuzz or nightly)"
fi
end_step

printf '\nsteps:\n' >&2
printf '%s\n' "${timings[@]}" >&2
if ((${#skipped[@]})); then
    printf '\nSKIPPED: %s\n' "${skipped[@]}" >&2
    if ((strict)); then
        printf '\nFAILED: CI=true and %d check(s) did not run (SKIPPED above)\n' "${#skipped[@]}" >&2
        exit 1
    fi
fi
printf '\nall tests passed\n' >&2
