#!/usr/bin/env bash
# A minimal Debian 12 root (mmdebstrap --variant=minbase: no compiler, Rust, Python or Vulkan
# loader), made once as root from the host's own apt sources and kept in
# target/dist/root-bookworm, for scripts/dist-test.sh and scripts/dist-oci.sh. Prints its path.
# `dist-root.sh vulkan`: the same root with the Vulkan loader and Mesa's drivers (lavapipe)
# added, in target/dist/root-bookworm-vulkan.
# `dist-root.sh old`: a minimal Debian 11 root (glibc 2.31 and GCC 10's libstdc++, older than
# what Debian 12 builds need), from the same mirror, in target/dist/root-bullseye.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=target/dist/root-bookworm
include=()
suite=bookworm
case "${1:-}" in
vulkan)
    cache=$cache-vulkan
    include=(--include=libvulkan1,mesa-vulkan-drivers)
    ;;
old)
    suite=bullseye
    cache=target/dist/root-$suite
    ;;
esac
if [ ! -d "$cache" ]; then
    [ "$(id -u)" -eq 0 ] || { echo "error: making the root needs root" >&2; exit 1; }
    command -v mmdebstrap >/dev/null 2>&1 || {
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq mmdebstrap >/dev/null
    }
    echo "making a minimal Debian $suite root in $cache (once) ..." >&2
    rm -rf "$cache.tmp"
    mkdir -p "$(dirname "$cache")"
    sources=$(ls /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1 || true)
    if [ "$suite" != bookworm ]; then
        # The host's sources name its own release: the older one comes from the same mirror.
        sources=$(./scripts/debian-mirror.sh)
    fi
    mmdebstrap --variant=minbase --quiet "${include[@]}" "$suite" "$cache.tmp" \
        "${sources:-/etc/apt/sources.list}" >&2
    mv "$cache.tmp" "$cache"
fi
echo "$cache"
