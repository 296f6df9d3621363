#!/usr/bin/env bash
# Builds the peers the end-to-end bench compares against, into benches/peers/ (git-ignored):
#   - llama.cpp's llama-server, from the llama.cpp tree vendored in the llama-cpp-python sdist,
#     and its llama-bench, the ceiling for raw prefill and decode rates;
#   - llama-cpp-python itself, from the same sdist, in a virtual environment.
# Both use the build flags our llama.cpp gets (GGML_NATIVE=OFF, OpenMP on), in Release mode.
# Idempotent: what is already built is kept. Needs the network once, for the sdist and the
# Python build backend; nothing here runs at bench time.
#
# Usage: benches/peers.sh [--no-python]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
peers=$here/peers
version=0.3.36
package=llama-cpp-python==$version
jobs=$(nproc)
with_python=1
[ "${1:-}" = "--no-python" ] && with_python=0

mkdir -p "$peers"
sdist=$peers/llama_cpp_python-$version.tar.gz
src=$peers/llama-cpp-python-$version
if [ ! -f "$sdist" ]; then
    echo "fetching the $package sdist ..."
    python3 -m pip download --quiet --no-deps --no-binary :all: --disable-pip-version-check \
        -d "$peers" "$package"
fi
if [ ! -d "$src" ]; then
    tmp=$(mktemp -d "$peers/extract.XXXX")
    tar -xzf "$sdist" -C "$tmp"
    mv "$tmp/llama_cpp_python-$version" "$src"
    rmdir "$tmp"
fi

flags=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_OPENMP=ON -DLLAMA_CURL=OFF
       -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF)

server=$peers/build/bin/llama-server
if [ ! -x "$server" ] || [ ! -x "$peers/build/bin/llama-bench" ]; then
    echo "building llama-server and llama-bench (several minutes) ..."
    cmake -S "$src/vendor/llama.cpp" -B "$peers/build" "${flags[@]}" \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF >"$peers/cmake.log"
    cmake --build "$peers/build" --target llama-server llama-bench -j "$jobs" >"$peers/build.log"
fi
echo "llama-server: $server"

if [ "$with_python" = 1 ]; then
    venv=$peers/venv
    if ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
        echo "building llama-cpp-python (several minutes) ..."
        python3 -m venv "$venv"
        CMAKE_ARGS="${flags[*]/-DBUILD_SHARED_LIBS=OFF/}" CMAKE_BUILD_PARALLEL_LEVEL=$jobs \
            "$venv/bin/pip" install --quiet --disable-pip-version-check "$sdist" >"$peers/pip.log" 2>&1
    fi
    echo "llama-cpp-python: $("$venv/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)')"
fi
