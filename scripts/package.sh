#!/usr/bin/env bash
# Builds the Debian package `ringside` (both binaries, the systemd units,
# sysusers/tmpfiles, /etc/ringside/*.env as conffiles, docs, install-model.sh)
# with cargo-deb, from the metadata in engine/Cargo.toml. Prints the .deb's path
# as its last line of stdout.
#
#   scripts/package.sh            build (if stale) and package
#
# The binaries are built as CI and scripts/test.sh build them (the same
# command and RUSTFLAGS, so nothing is compiled twice): for this machine's CPU
# level, x86-64-v4 with AVX-512 where the CPU has it (scripts/cpu-flags.sh),
# else x86-64-v3. For a package that runs on any x86-64-v3 host (AVX2, FMA):
#
#   RUSTFLAGS='-C target-cpu=x86-64-v3' CARGO_TARGET_DIR=target/v3 scripts/package.sh
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[package] %s\n' "$*" >&2; }

command -v cargo-deb >/dev/null || { say "cargo-deb missing: cargo install --locked cargo-deb (scripts/setup.sh --tests)"; exit 1; }
# shellcheck source=scripts/cpu-flags.sh
source scripts/cpu-flags.sh
level="$(sed -n 's/.*target-cpu=\([^ ]*\).*/\1/p' <<<"${RUSTFLAGS:-}")"
say "building for CPU level ${level:-x86-64-v3} (RUSTFLAGS=${RUSTFLAGS:-<.cargo/config.toml>})"
# The same build as scripts/test.sh: fresh there, a no-op here.
cargo build --workspace --release --locked --bins
# cargo-deb prints the package's path last.
deb="$(cargo deb -p ringside-engine --no-build --locked --separate-debug-symbols --compress-debug-symbols=zlib --fast | tail -n1)"
[[ "$deb" == *.deb && -f "$deb" ]] || { say "cargo deb produced no .deb (it printed: $deb)"; exit 1; }
dpkg-deb --info "$deb" >/dev/null
say "built $deb"
printf '%s\n' "$deb"
