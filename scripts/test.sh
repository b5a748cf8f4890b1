#!/usr/bin/env bash
# Runs every ringside test: unit, property, cross-process and end-to-end tests
# (real engine, real model, real OpenAI client, real collector), the loom
# model of the ring, miri over the ring, and a short fuzzing run.
# Installs what is missing first (scripts/setup.sh --tests).
#
# Environment:
#   FUZZ_SECONDS   seconds per fuzz target (default 20; 0 builds only)
#   LOOM_MAX_PREEMPTIONS  loom's preemption bound (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

step() { printf '\n\033[1m== %s ==\033[0m\n' "$*" >&2; }
skipped=()

step "setup"
scripts/setup.sh --tests
source scripts/cpu-flags.sh

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

step "deployment: systemd units (verify, security, two users + group) and Kubernetes manifests"
systemd/check.sh
.venv/bin/python deploy/kubernetes/check.py

step "loom model of the commit protocol"
RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-3}" \
    cargo test -p ringside-shm-protocol --release --lib --target-dir target/loom -- loom

if rustup +nightly component list --installed 2>/dev/null | grep -q '^miri'; then
    step "miri over the ring (heap-backed)"
    MIRIFLAGS="-Zmiri-disable-isolation" \
        cargo +nightly miri test -p ringside-shm-protocol --lib --target-dir target/miri -- ring_tests record::
else
    skipped+=("miri (no nightly toolchain with miri)")
fi

if command -v cargo-fuzz >/dev/null && rustup toolchain list | grep -q nightly; then
    step "fuzzing the reader (${FUZZ_SECONDS:-20}s per target)"
    (
        cd shm-protocol
        cargo +nightly fuzz build --release
        for target in segment record; do
            if [[ "${FUZZ_SECONDS:-20}" != 0 ]]; then
                cargo +nightly fuzz run --release "$target" -- \
                    -max_total_time="${FUZZ_SECONDS:-20}" -max_len=1200000 -rss_limit_mb=4096
            fi
        done
    )
else
    skipped+=("fuzz (no cargo-fuzz or nightly)")
fi

if ((${#skipped[@]})); then
    printf '\nSKIPPED: %s\n' "${skipped[@]}" >&2
fi
printf '\nall tests passed\n' >&2
