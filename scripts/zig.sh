#!/usr/bin/env bash
# Prepares the portable build (`make vulkan-build`, which `make dist` packs): zig's C and C++
# compilers and cargo-zigbuild, from their Python wheels, in a virtual environment outside the
# checkout (zig names its own library folder relative to the current folder when it lies below
# it, and the build scripts, which run elsewhere, then miss its headers). Writes .zig/env
# (git-ignored), the environment that points cargo and llama-cpp-sys-2's CMake at them.
#
#   scripts/zig.sh      install (idempotent), print .zig/env
#
# zig links against the glibc version it is told (GLIBC below), with its own headers, and links
# LLVM's libc++ into each file: what it builds runs on that glibc and needs no libstdc++.
# Its headers leave out the system's: the SPIR-V headers that ggml's Vulkan module includes are
# offered alone, through a folder that links to them (the system's glibc headers must not mix
# with zig's).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
root=$here/.zig
venv=${XDG_CACHE_HOME:-$HOME/.cache}/infer-batch/zig-venv
ZIG=0.17.1
ZIGBUILD=0.24.1
# The oldest glibc the builds run on: RHEL 8's.
GLIBC=2.28

if ! "$venv/bin/python" -c "
import importlib.metadata as m, sys
sys.exit(m.version('ziglang') != '$ZIG' or m.version('cargo-zigbuild') != '$ZIGBUILD')" 2>/dev/null; then
    command -v python3 >/dev/null 2>&1 ||
        { echo "error: python3 is missing; install it (apt-get install -y python3 python3-venv)" >&2; exit 1; }
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "ziglang==$ZIG" "cargo-zigbuild==$ZIGBUILD"
    echo "installed: ziglang $ZIG, cargo-zigbuild $ZIGBUILD in $venv"
fi
[ -d /usr/include/spirv ] || { echo "error: no /usr/include/spirv: run scripts/deps.sh vulkan" >&2; exit 1; }
mkdir -p "$root/include"
ln -sfn /usr/include/spirv "$root/include/spirv"

cat >"$root/env" <<ENV
# zig $ZIG and cargo-zigbuild $ZIGBUILD (scripts/zig.sh); source before a portable build:
#   cargo zigbuild --target \$ZIG_TARGET ...
export PATH="$venv/bin:\$PATH"
export ZIG_TARGET=x86_64-unknown-linux-gnu.$GLIBC
# zig searches no system folder: the SPIR-V headers (llama-cpp-sys-2 hands CMAKE_* variables
# to CMake). The Vulkan loader to link against is in .vulkan/ (scripts/vulkan-sdk.sh).
export CMAKE_CXX_STANDARD_INCLUDE_DIRECTORIES=$root/include
# llama-cpp-sys-2 names the Vulkan loader to the binary's link too, which drops it (as needed:
# the module alone uses it); the host's loader asks for a newer glibc, which is not checked.
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C link-arg=-Wl,--allow-shlib-undefined"
ENV
cat "$root/env"
