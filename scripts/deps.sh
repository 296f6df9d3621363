#!/usr/bin/env bash
# Checks the system packages the llama.cpp build needs (cmake, clang, libclang) and installs the
# missing ones with apt-get when run as root; otherwise names the command to run.
#
#   scripts/deps.sh           the CPU build's packages
#   scripts/deps.sh vulkan    and the Vulkan build's: the loader, the shader compiler, SPIR-V
#                             headers, and Mesa's drivers (lavapipe, for the tests)
#   scripts/deps.sh browser   and a headless browser (chromium), which the test suite renders
#                             the server's status page in
set -euo pipefail

packages=(cmake clang libclang-dev)
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v clang >/dev/null 2>&1 || missing+=(clang)
# bindgen loads libclang at build time.
if ! ls /usr/lib/llvm-*/lib/libclang*.so* /usr/lib/*/libclang*.so* >/dev/null 2>&1; then
    missing+=(libclang-dev)
fi
if [ "${1:-}" = vulkan ]; then
    packages+=(libvulkan-dev glslc spirv-headers mesa-vulkan-drivers)
    [ -e /usr/include/vulkan/vulkan.h ] || missing+=(libvulkan-dev)
    command -v glslc >/dev/null 2>&1 || missing+=(glslc)
    [ -d /usr/include/spirv ] || missing+=(spirv-headers)
    ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || missing+=(mesa-vulkan-drivers)
fi
browser=()
if [ "${1:-}" = browser ]; then
    command -v chromium >/dev/null 2>&1 || { browser=(chromium); missing+=(chromium); }
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo is not installed; install the Rust toolchain (rustup) first." >&2
    exit 1
fi
[ ${#missing[@]} -eq 0 ] && exit 0

echo "missing build packages: ${missing[*]}"
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${packages[@]}" >/dev/null
    # The browser alone, without its recommends (a desktop's worth): the tests need it headless.
    if [ ${#browser[@]} -gt 0 ]; then
        apt-get install -y -qq --no-install-recommends "${browser[@]}" >/dev/null
    fi
    echo "installed: ${packages[*]} ${browser[*]}"
else
    echo "error: install them first, as root: apt-get install -y ${packages[*]} ${browser[*]}" >&2
    exit 1
fi
