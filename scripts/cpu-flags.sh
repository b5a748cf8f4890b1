# shellcheck shell=bash
# Sourced by the other scripts. Picks the fastest CPU level that is safe on
# this machine for llama.cpp and the Rust code: x86-64-v4 plus the AVX-512
# extensions the CPU reports, when it has AVX-512; otherwise the portable
# x86-64-v3 of .cargo/config.toml. Never AMX (advertised by the CPU, refused
# by these VMs: SIGILL). A RUSTFLAGS set by the caller wins.
if [[ -z "${RUSTFLAGS:-}" ]] && [[ "$(uname -m)" == x86_64 ]]; then
    _cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
    _has() { [[ "$_cpu_flags" == *" $1 "* ]]; }
    if _has avx512f && _has avx512bw && _has avx512cd && _has avx512dq && _has avx512vl; then
        _features=""
        _has avx512_vnni && _features+=",+avx512vnni"
        _has avx512_bf16 && _features+=",+avx512bf16"
        _has avx512vbmi && _features+=",+avx512vbmi"
        _has avx_vnni && _features+=",+avxvnni"
        RUSTFLAGS="-C target-cpu=x86-64-v4"
        [[ -n "$_features" ]] && RUSTFLAGS+=" -C target-feature=${_features#,}"
        export RUSTFLAGS
    fi
    unset -f _has
    unset _cpu_flags _features
fi
