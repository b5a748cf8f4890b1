#!/usr/bin/env bash
# Installs what ringside's build, demo and tests need on a fresh Debian
# machine (root, Rust toolchain present). Idempotent: only what is missing.
#   scripts/setup.sh            build + demo needs (apt build deps, model, Python client, collector)
#   scripts/setup.sh --tests    also the test-only tools (nightly miri, cargo-fuzz; debootstrap,
#                               systemd-nspawn and cargo-deb for systemd/real-systemd-test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
[[ "${1:-}" == "--tests" ]] && want_tests=1

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

# apt_install_missing PKG...: installs those of the Debian packages that are
# not installed yet (one apt-get update, only when something is missing).
apt_install_missing() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    say "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# C/C++ toolchain for llama.cpp (built by llama-cpp-sys-2), promtool for
# /metrics checks and the Prometheus interoperability test, tmux for the
# terminal UI tests, shellcheck for CI's check of the shell scripts, iproute2
# for the fleet test's network namespaces.
apt_install_missing cmake clang libclang-dev prometheus tmux shellcheck iproute2

# Python tools the demo and tests drive the engine with: the official OpenAI
# client and a real OpenTelemetry collector (rotel-agent).
if [[ ! -x .venv/bin/python ]]; then
    say "creating .venv"
    python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import openai, rotel, kubernetes_validate' 2>/dev/null; then
    say "pip install -r scripts/requirements.txt"
    .venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements.txt
fi

# The rotel wheel ships its collector binary inside the package: put it on
# the venv's PATH under its own name.
if [[ ! -x .venv/bin/rotel-agent ]]; then
    rotel_bin="$(.venv/bin/python -c 'import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), "rotel-agent"))')"
    ln -sf "$rotel_bin" .venv/bin/rotel-agent
fi

# The default model (Gemma 3 270M Q4_K_M) into the cache, checksum-verified.
scripts/install-model.sh >/dev/null

if ((want_tests)); then
    # A real tracing backend for the interoperability tests (Arize Phoenix:
    # OTLP gRPC and HTTP in, spans out of a REST API).
    if ! .venv/bin/python -c 'import phoenix' 2>/dev/null; then
        say "pip install -r scripts/requirements-tests.txt"
        .venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements-tests.txt
    fi
    # The real-systemd test: a bookworm root (debootstrap) booted by
    # systemd-nspawn, the .deb built by cargo-deb.
    apt_install_missing debootstrap systemd-container jq curl
    if ! command -v cargo-deb >/dev/null; then
        say "cargo install cargo-deb"
        cargo install --quiet --locked cargo-deb || say "cargo-deb unavailable (systemd/real-systemd-test.sh will fail)"
    fi
    # miri and cargo-fuzz need nightly. They are checks, not build steps: if
    # nightly cannot be installed here, test.sh reports them as skipped.
    if ! rustup +nightly component list --installed 2>/dev/null | grep -q '^miri'; then
        say "installing nightly with miri"
        rustup toolchain install nightly --profile minimal >/dev/null 2>&1 || true
        rustup +nightly component add miri rust-src >/dev/null 2>&1 || say "nightly miri unavailable"
    fi
    if ! command -v cargo-fuzz >/dev/null; then
        say "cargo install cargo-fuzz"
        cargo install --quiet --locked cargo-fuzz 2>/dev/null || say "cargo-fuzz unavailable"
    fi
fi
say "ok"
