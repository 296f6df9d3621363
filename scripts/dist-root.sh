#!/usr/bin/env bash
# A minimal Debian 12 root (mmdebstrap --variant=minbase: no compiler, Rust, Python or Vulkan
# loader), made once as root from the host's own apt sources and kept in
# target/dist/root-bookworm, for scripts/dist-test.sh and scripts/dist-oci.sh. Prints its path.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=target/dist/root-bookworm
if [ ! -d "$cache" ]; then
    [ "$(id -u)" -eq 0 ] || { echo "error: making the root needs root" >&2; exit 1; }
    command -v mmdebstrap >/dev/null 2>&1 || {
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq mmdebstrap >/dev/null
    }
    echo "making a minimal Debian 12 root in $cache (once) ..." >&2
    rm -rf "$cache.tmp"
    mkdir -p "$(dirname "$cache")"
    sources=$(ls /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1 || true)
    mmdebstrap --variant=minbase --quiet bookworm "$cache.tmp" "${sources:-/etc/apt/sources.list}" >&2
    mv "$cache.tmp" "$cache"
fi
echo "$cache"
