#!/usr/bin/env bash
# Allocations on the real engine's inference thread per scheduler step, with
# the step ring (the default) and without it (--step-ring-capacity 0), under
# the same load: every malloc-family call the `inference` thread makes is
# counted with perf uprobes on libc (Rust's global allocator is the system
# one there; llama.cpp's C++ allocations count too), `llama_decode` calls with
# a uprobe on the engine, steps from the step ring's head in the segment.
# Then one call-graph recording of the engine with steps, so every allocation
# site on the thread can be read (`perf report -i FILE`).
#
#   perf/step-allocs.sh [--requests N] [--max-tokens N] [--out DIR]
#
# Needs root (uprobes), perf, a release build (cargo build --release --bins)
# and the default model. Prints a markdown table; leaves the probes removed.
set -euo pipefail
cd "$(dirname "$0")/.."

requests=4
max_tokens=64
out="$(mktemp -d)"
while (($#)); do
    case "$1" in
        --requests) requests="${2:?}"; shift 2 ;;
        --max-tokens) max_tokens="${2:?}"; shift 2 ;;
        --out) out="${2:?}"; mkdir -p "$out"; shift 2 ;;
        *) echo "step-allocs.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
clients=4
engine="${CARGO_TARGET_DIR:-target}/release/ringside-engine"
[[ -x $engine ]] || { echo "step-allocs.sh: build $engine first" >&2; exit 1; }
libc="$(ldd "$engine" | awk '/libc\.so\.6/ {print $3}')"
# aligned_alloc is an alias of memalign in glibc: probing both would count twice.
allocs=(malloc calloc realloc posix_memalign memalign)

cleanup() {
    perf probe -q -d 'probe_libc:*' 2>/dev/null || true
    perf probe -q -d 'probe_ringside:*' 2>/dev/null || true
    [[ -n ${pid:-} ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    return 0
}
trap cleanup EXIT
for f in "${allocs[@]}"; do
    perf probe -q -x "$libc" --add "$f"
done
# llama.cpp has no debug information in the binary: the probe goes by file
# offset (the symbol's address in the executable LOAD segment that holds it).
decode_vaddr="$(nm "$engine" | awk '$3 == "llama_decode" {print $1}')"
decode_offset=
while read -r kind offset vaddr _ size _ flags; do
    if [[ $kind == LOAD && $flags == *E* ]] &&
        ((16#$decode_vaddr >= vaddr && 16#$decode_vaddr < vaddr + size)); then
        decode_offset="$(printf '0x%x' $((16#$decode_vaddr - vaddr + offset)))"
    fi
done < <(readelf -lW "$engine" | grep LOAD)
[[ -n $decode_offset ]] || { echo "step-allocs.sh: llama_decode not found in $engine" >&2; exit 1; }
perf probe -q -x "$engine" --add "decode=$decode_offset"
events="$(printf 'probe_libc:%s,' "${allocs[@]}")probe_ringside:decode"
decode_event="probe_ringside:decode"

# The step ring's head (steps written), read from the segment file:
# header word 704 = step ring offset, its counters 512 bytes in.
step_head() {
    python3 - "$1" <<'EOF'
import struct, sys
with open(sys.argv[1], "rb") as f:
    data = f.read(712)
    off = struct.unpack_from("<Q", data, 704)[0]
    if off == 0:
        print(0)
    else:
        f.seek(off + 512)
        print(struct.unpack("<Q", f.read(8))[0])
EOF
}

load() {
    local port="$1" n="$2" c i pids=()
    for ((c = 0; c < clients; c++)); do
        (
            for ((i = 0; i < n; i++)); do
                curl -sf "http://127.0.0.1:$port/v1/completions" -H 'content-type: application/json' \
                    -d "{\"model\":\"bench\",\"prompt\":\"The history of the city number $c begins\",\"max_tokens\":$max_tokens,\"temperature\":0,\"stream\":true}" \
                    | grep -c '^data: {' || true
            done
        ) &
        pids+=($!)
    done
    # Only the clients: the engine is a child of this shell too.
    wait "${pids[@]}"
}

# run NAME [engine flags...]: prints one table row.
run() {
    local name="$1"; shift
    local port=$((20000 + RANDOM % 20000))
    local instance="allocs-$$-$name"
    "$engine" serve --port "$port" --instance "$instance" --served-model-name bench \
        --parallel "$clients" "$@" >"$out/$name.engine.log" 2>&1 &
    pid=$!
    for _ in $(seq 300); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
        sleep 0.5
    done
    local tid
    tid="$(grep -lx inference /proc/"$pid"/task/*/comm | head -1 | cut -d/ -f5)"
    [[ -n $tid ]] || { echo "no inference thread in $pid" >&2; exit 1; }
    local seg="/dev/shm/ringside.$instance"
    load "$port" 1 >/dev/null # warm-up
    local h0 h1 tokens
    h0="$(step_head "$seg")"
    perf stat -x, -e "$events" -t "$tid" -o "$out/$name.stat" &
    local perf_pid=$!
    sleep 1
    tokens="$(load "$port" "$requests" | awk '{s += $1} END {print s}')"
    sleep 0.5
    kill -INT "$perf_pid"
    wait "$perf_pid" || true
    h1="$(step_head "$seg")"
    if [[ $name == steps ]]; then
        # Where the thread's allocations come from (call graphs), same load.
        perf record -q -e "$(printf 'probe_libc:%s,' "${allocs[@]}" | sed 's/,$//')" -t "$tid" \
            --call-graph dwarf -o "$out/$name.perf.data" &
        perf_pid=$!
        sleep 1
        load "$port" "$requests" >/dev/null
        kill -INT "$perf_pid"
        wait "$perf_pid" || true
    fi
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    pid=
    local total decodes
    total="$(awk -F, '$3 ~ /probe_libc/ {s += $1} END {print s}' "$out/$name.stat")"
    decodes="$(awk -F, -v e="$decode_event" '$3 == e {print $1}' "$out/$name.stat")"
    local steps=$((h1 - h0))
    awk -v n="$name" -v a="$total" -v d="$decodes" -v s="$steps" -v t="$tokens" 'BEGIN {
        printf "| %s | %d | %d | %d | %d | %.2f | %.2f | %s |\n", n, t, s, d, a, a / t, a / d,
            (s > 0 ? sprintf("%.2f", a / s) : "–")
    }'
}

echo "| engine | streamed chunks (64 tokens + 1 end per request) | steps recorded | llama_decode calls | allocations (inference thread) | per token | per llama_decode | per step |"
echo "|---|---|---|---|---|---|---|---|"
run steps
run nosteps --step-ring-capacity 0
run steps-tracing-off --tracing off
echo
echo "Call graphs of the allocations (engine with steps): perf report -i $out/steps.perf.data --no-children"
