#!/usr/bin/env bash
# Engine vs llama.cpp's own llama-server, reproducibly: downloads the PyPI
# sdist of llama-cpp-python (which vendors llama.cpp) with pip into a cache
# outside the repository, builds llama-server there the way llama.cpp builds
# itself (CMake Release, -O3) with the same CPU flags as the engine, then
# runs the same load against both servers (perf/peer_load.py): same model,
# threads and parallel slots. Nothing from llama.cpp enters the repository.
#
#   scripts/bench-llamacpp.sh [--rounds N] [--clients N] [--max-tokens N]
#
# Environment:
#   RINGSIDE_PEER_DIR        cache for the sdist and build (default ~/.cache/ringside/peer)
#   LLAMA_CPP_PYTHON_VERSION sdist version (default 0.3.36)
#   LLAMA_SERVER             an already built llama-server to use instead (skips download and build)
#   RINGSIDE_BENCH_REPORT_DIR  where to write llamacpp.md (scripts/bench.sh sets it)
#   CARGO_TARGET_DIR         where the engine was built (default ./target)
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=6 clients=4 max_tokens=128
while (($#)); do
    case "$1" in
        --rounds) rounds="${2:?--rounds needs a value}"; shift 2 ;;
        --clients) clients="${2:?--clients needs a value}"; shift 2 ;;
        --max-tokens) max_tokens="${2:?--max-tokens needs a value}"; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "bench-llamacpp.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
for n in "$rounds" "$clients" "$max_tokens"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "bench-llamacpp.sh: '$n' is not a positive whole number" >&2; exit 2; }
done

say() { printf '\033[1m[llama.cpp peer]\033[0m %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
peer_dir="${RINGSIDE_PEER_DIR:-$HOME/.cache/ringside/peer}"
model="$HOME/.cache/ringside/models/gemma-3-270m-q4_k_m.gguf"
target="${CARGO_TARGET_DIR:-target}"
engine_bin="$target/release/ringside-engine"
[[ -f "$model" ]] || die "model $model missing: run scripts/setup.sh"
[[ -x "$engine_bin" ]] || die "$engine_bin missing: cargo build --release -p ringside-engine"
threads="$(nproc)"

if [[ -n "${LLAMA_SERVER:-}" ]]; then
    server="$LLAMA_SERVER"
    [[ -x "$server" ]] || die "LLAMA_SERVER=$server is not an executable"
    src="$(cd "$(dirname "$server")/../.." && pwd)"
else
    src="$peer_dir/llama_cpp_python-$version/vendor/llama.cpp"
    server="$src/build/bin/llama-server"
    if [[ ! -x "$server" ]]; then
        mkdir -p "$peer_dir"
        sdist="$peer_dir/llama_cpp_python-$version.tar.gz"
        if [[ ! -f "$sdist" ]]; then
            say "pip download llama-cpp-python==$version (sdist) into $peer_dir"
            pip=(python3 -m pip)
            [[ -x .venv/bin/pip ]] && pip=(.venv/bin/pip)
            "${pip[@]}" download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
                "llama-cpp-python==$version" -d "$peer_dir" || die "pip download failed"
        fi
        tar -xzf "$sdist" -C "$peer_dir"
        [[ -f "$src/CMakeLists.txt" ]] || die "no vendored llama.cpp in $sdist"
        # The engine's CPU level (scripts/cpu-flags.sh): x86-64-v4 plus the
        # AVX-512 extensions this CPU has, never AMX; else x86-64-v3.
        flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
        has() { [[ "$flags" == *" $1 "* ]]; }
        cmake_cpu=(-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
        if has avx512f && has avx512bw && has avx512vl; then
            F="-march=x86-64-v4"
            cmake_cpu+=(-DGGML_AVX512=ON)
            has avx512_vnni && F+=" -mavx512vnni" && cmake_cpu+=(-DGGML_AVX512_VNNI=ON)
            has avx512_bf16 && F+=" -mavx512bf16" && cmake_cpu+=(-DGGML_AVX512_BF16=ON)
            has avx512vbmi && F+=" -mavx512vbmi" && cmake_cpu+=(-DGGML_AVX512_VBMI=ON)
            has avx_vnni && F+=" -mavxvnni" && cmake_cpu+=(-DGGML_AVX_VNNI=ON)
        else
            F="-march=x86-64-v3"
        fi
        say "building llama-server in $src/build (CMake Release, $F); ~10 min on 2 cores"
        cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON \
            -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
            "-DCMAKE_C_FLAGS=$F" "-DCMAKE_CXX_FLAGS=$F" "${cmake_cpu[@]}" >"$peer_dir/cmake.log" 2>&1 \
            || die "cmake configure failed: $peer_dir/cmake.log"
        cmake --build "$src/build" -j"$threads" --target llama-server >"$peer_dir/build.log" 2>&1 \
            || die "build failed: $peer_dir/build.log"
    fi
fi
revision="$(sed -n 's/.*LLAMA_COMMIT *"\(.*\)"/\1/p' "$src/build/src/llama-version.h" 2>/dev/null || true)"
say "llama-server: $server (llama.cpp ${revision:-unknown revision}, from llama-cpp-python $version)"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
eport="$(free_port)"; lport="$(free_port)"
logs="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# Same model, threads, slots and context per slot (4096); OpenMP passive on
# both (the engine sets it for itself; llama.cpp's spinning default collapses
# on a loaded machine, see perf/ENGINE_VS_LLAMACPP.md).
"$engine_bin" serve "$model" --port "$eport" --instance "peer-bench-$$" --served-model-name bench \
    --parallel "$clients" --threads "$threads" --ctx-size 4096 >"$logs/engine.log" 2>&1 &
pids+=($!); epid=$!
OMP_WAIT_POLICY=passive "$server" -m "$model" --port "$lport" -np "$clients" -t "$threads" \
    -c $((4096 * clients)) >"$logs/llama.log" 2>&1 &
pids+=($!); lpid=$!

ready() { python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$1/health', timeout=2)" 2>/dev/null; }
for _ in $(seq 1 300); do
    ready "$eport" && ready "$lport" && break
    kill -0 "$epid" 2>/dev/null || die "engine exited: $(tail -5 "$logs/engine.log")"
    kill -0 "$lpid" 2>/dev/null || die "llama-server exited: $(tail -5 "$logs/llama.log")"
    sleep 0.5
done
if ! { ready "$eport" && ready "$lport"; }; then
    die "servers not ready after 150 s (logs in $logs)"
fi

report_args=()
[[ -n "${RINGSIDE_BENCH_REPORT_DIR:-}" ]] && report_args=(--report "$RINGSIDE_BENCH_REPORT_DIR/llamacpp.md")
python3 perf/peer_load.py --engine-port "$eport" --engine-pid "$epid" --llama-port "$lport" --llama-pid "$lpid" \
    --clients "$clients" --max-tokens "$max_tokens" --rounds "$rounds" "${report_args[@]}" \
    --context "ringside-engine \`--parallel $clients --threads $threads\` against llama-server \`-np $clients -t $threads\` (OMP_WAIT_POLICY=passive), llama.cpp ${revision:-?} from the PyPI sdist llama-cpp-python $version built CMake Release with the engine's CPU flags; model gemma-3-270m Q4_K_M. Machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, Linux $(uname -r)."
rm -rf "$logs"
