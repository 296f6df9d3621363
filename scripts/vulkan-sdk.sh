#!/usr/bin/env bash
# Prepares a Vulkan build: the system packages it needs, and Vulkan-Hpp headers new enough for
# llama.cpp's Vulkan backend in a project-local prefix, .vulkan/ (git-ignored). Writes
# .vulkan/env: the environment that points llama-cpp-sys-2's CMake at them.
#
#   scripts/vulkan-sdk.sh           install (idempotent), check, print .vulkan/env
#   . .vulkan/env                   then: cargo build --release --features vulkan
#
# - Packages (scripts/deps.sh vulkan): libvulkan-dev (the loader to link), glslc (the shader
#   compiler), spirv-headers, and mesa-vulkan-drivers (lavapipe, a Vulkan device that runs on
#   the CPU, for the tests). Installed with apt-get as root; otherwise the command is named.
# - Headers: Debian 12's Vulkan-Hpp (1.3.239) lacks vk::LayerSettingEXT, which ggml-vulkan.cpp
#   uses. The libvulkan-dev of the next Debian release (1.4.309) has it. Its .deb is fetched with
#   apt from the host's own Debian mirror, into a private apt state, and unpacked with dpkg -x
#   under .vulkan/: the system keeps its own packages and headers.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
root=$here/.vulkan
prefix=$root/prefix
# The suite and version whose Vulkan-Hpp headers the build was made with.
suite=trixie
hpp=libvulkan-dev=1.4.309.0-1
"$here/scripts/deps.sh" vulkan

if [ ! -e "$prefix/usr/include/vulkan/vulkan.hpp" ]; then
    uri=$("$here/scripts/debian-mirror.sh")
    apt=$root/apt
    rm -rf "$apt"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/debs"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $suite main" \
        >"$apt/sources.list"
    opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache"
        -o APT::Architectures=amd64 -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false
        -o Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false
        -o Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false
        -o Acquire::IndexTargets::deb::CNF::DefaultEnabled=false)
    echo "fetching the Vulkan-Hpp headers ($hpp, Debian $suite) into $prefix ..."
    apt-get "${opts[@]}" update -qq
    (cd "$apt/debs" && apt-get "${opts[@]}" download -qq "$hpp" 2>/dev/null)
    rm -rf "$prefix"
    dpkg -x "$apt"/debs/libvulkan-dev_*.deb "$prefix"
    # Its libvulkan.so points at a loader the prefix does not have: the system's is linked.
    find "$prefix" -name 'libvulkan.so*' -delete
    rm -rf "$apt"
fi
# The link name where FindVulkan and cargo look first (\$VULKAN_SDK/lib): the system's loader.
# The portable build's compiler (scripts/zig.sh) searches no system folder.
ln -sfn /usr/lib/x86_64-linux-gnu/libvulkan.so.1 "$prefix/usr/lib/libvulkan.so"
grep -q LayerSettingEXT "$prefix/usr/include/vulkan/vulkan_structs.hpp" || {
    echo "error: the headers in $prefix lack vk::LayerSettingEXT" >&2
    exit 1
}

cat >"$root/env" <<ENV
# Vulkan-Hpp headers from $hpp (scripts/vulkan-sdk.sh); source before a vulkan build.
# FindVulkan takes its headers from \$VULKAN_SDK/include, before the system's.
export VULKAN_SDK=$prefix/usr
ENV
echo "Vulkan headers in $prefix; the build environment:"
cat "$root/env"
