#!/usr/bin/env bash
# Builds the peers the end-to-end bench compares against, into benches/peers/ (git-ignored):
# llama.cpp's llama-server, and llama-bench and llama-batched-bench, the ceilings for raw prefill
# and batched decode rates.
#
# They are built from the very llama.cpp sources our crate compiles (llama-cpp-sys-2's vendored
# tree: ggml, libllama and common), so kernels are not the difference. That tree ships without
# the tools' sources, so those come from the llama.cpp tree vendored in the llama-cpp-python
# sdist, with one line patched where the tools call a helper our `common` lacks. Build flags
# are the ones our llama.cpp gets (Release, GGML_NATIVE=OFF, OpenMP on).
# Idempotent: what is already built is kept. Needs the network once, for the sdist; nothing here
# runs at bench time.
#
# Usage: benches/peers.sh
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
peers=$here/peers
version=0.3.36
package=llama-cpp-python==$version
jobs=$(nproc)

mkdir -p "$peers"
sdist=$peers/llama_cpp_python-$version.tar.gz
tools_src=$peers/llama_cpp_python-$version/vendor/llama.cpp
if [ ! -f "$sdist" ]; then
    echo "fetching the $package sdist (for the tools' sources) ..."
    python3 -m pip download --quiet --no-deps --no-binary :all: --disable-pip-version-check \
        -d "$peers" "$package"
fi
if [ ! -d "$tools_src" ]; then
    tmp=$(mktemp -d "$peers/extract.XXXX")
    tar -xzf "$sdist" -C "$tmp"
    mv "$tmp/llama_cpp_python-$version" "$peers/"
    rmdir "$tmp"
fi

# Our crate's llama.cpp, as cargo unpacked it.
(cd "$root" && cargo fetch --quiet)
sys_version=$(awk '/^name = "llama-cpp-sys-2"$/ { getline; gsub(/"/, "", $3); print $3 }' "$root/Cargo.lock")
dirs=("${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"llama-cpp-sys-2-$sys_version"/llama.cpp)
ours=${dirs[0]}
[ -d "$ours" ] || { echo "llama-cpp-sys-2 $sys_version's sources not found under the cargo registry" >&2; exit 1; }

tree=$peers/llama.cpp-$sys_version
build=$peers/build-$sys_version
if [ ! -x "$build/bin/llama-server" ] || [ ! -x "$build/bin/llama-bench" ] ||
    [ ! -x "$build/bin/llama-batched-bench" ]; then
    echo "building llama-server, llama-bench and llama-batched-bench on llama-cpp-sys-2 $sys_version's llama.cpp (several minutes) ..."
    rm -rf "$tree"
    cp -r "$ours" "$tree"
    cp -r "$tools_src/tools/." "$tree/tools/"
    mkdir -p "$tree/scripts"
    cp "$tools_src/scripts/ui-assets.cmake" "$tree/scripts/"
    sed -i 's/fs_open_ifstream(params.mcp_servers_config, std::ios::in)/std::ifstream(params.mcp_servers_config, std::ios::in)/' \
        "$tree/tools/server/server-mcp.cpp"
    cmake -S "$tree" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_OPENMP=ON \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF >"$peers/cmake.log"
    cmake --build "$build" --target llama-server llama-bench llama-batched-bench -j "$jobs" >"$peers/build.log"
    echo "llama.cpp as vendored in llama-cpp-sys-2 $sys_version (ours), with the tools' sources of the llama-cpp-python $version sdist" \
        >"$build/PEERS.txt"
fi
ln -sfn "$(basename "$build")" "$peers/current"
echo "peers: $peers/current/bin ($(cat "$build/PEERS.txt"))"
