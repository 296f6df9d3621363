#!/usr/bin/env bash
# Packs the Vulkan build (made by `make vulkan-build` against glibc 2.28, in
# target/vulkan/x86_64-unknown-linux-gnu/release) for machines with no network, into dist/
# (`make dist`):
#
#   infer-batch-VERSION-linux-x86_64.tar.gz   bin/infer-batch, lib/infer-batch/ (llama.cpp's
#       shared libraries, every CPU variant module, the Vulkan module), the example batch, our
#       licence, llama.cpp's, THIRD-PARTY-LICENSES.txt (every crate linked), sbom.cdx.json
#       (CycloneDX: every crate of Cargo.lock and the llama.cpp sources), SHA256SUMS. Every ELF
#       file's run path is relative to $ORIGIN: it runs wherever it is unpacked, by any user.
#   infer-batch-VERSION-src.tar.gz            the sources at HEAD and `cargo vendor` output, with
#       a .cargo/config.toml that builds from them: `cargo build --offline --locked --release`.
#   infer_batch-VERSION-py3-none-manylinux_2_N_x86_64.whl   the same binary and libraries as a
#       wheel (scripts/dist_wheel.py): `pip install --no-index --find-links DIR infer-batch`.
#   SHA256SUMS                                of the three.
#
# Reproducible: packing the same build twice gives the same bytes (file times from
# SOURCE_DATE_EPOCH, by default the commit's time; owners, order and gzip headers fixed).
# Never bundled: the Vulkan loader (libvulkan.so.1) and the NVIDIA driver, which belong to the
# host. Needs patchelf (installed with apt-get as root, as scripts/deps.sh does), python3, git.
set -euo pipefail
cd "$(dirname "$0")/.."
here=$(pwd)
. scripts/dist-lib.sh

build=${DIST_BUILD:-target/vulkan/x86_64-unknown-linux-gnu/release}
out=${DIST_OUT:-dist}
stage=target/dist/stage

need=()
command -v patchelf >/dev/null 2>&1 || need+=(patchelf)
command -v objdump >/dev/null 2>&1 || need+=(binutils)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "error: install first, as root: apt-get install -y ${need[*]}" >&2
        exit 1
    fi
fi

[ -x "$build/infer-batch" ] || { echo "error: no $build/infer-batch: run make vulkan-build" >&2; exit 1; }
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
commit=$(git rev-parse --short=12 HEAD)
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct HEAD)}
export INFER_BATCH_GIT_COMMIT=$commit
# The binary must be this commit's: `make dist` rebuilds first, so this catches a stale DIST_BUILD.
"$build/infer-batch" --version | grep -q "commit $commit" || {
    echo "error: $build/infer-batch is not built from $commit ($("$build/infer-batch" --version)); rebuild" >&2
    exit 1
}
git diff --quiet HEAD || echo "warning: the work tree has uncommitted changes; the archives name $commit" >&2

# Where llama-cpp-sys-2 put the shared libraries and the modules: the build's own run path names
# its lib/ (build.rs), and the modules are in the backends/ beside it.
libdir=$(build_libdir "$build/infer-batch")
backends=$(dirname "$libdir")/backends
[ -e "$libdir/libllama.so" ] && ls "$backends"/libggml-cpu-*.so >/dev/null 2>&1 || {
    echo "error: no llama.cpp libraries in $libdir or modules in $backends" >&2
    exit 1
}

name=infer-batch-$version-linux-x86_64
root=$stage/$name
rm -rf "$stage"
mkdir -p "$root/bin" "$root/lib/infer-batch" "$root/licenses/llama.cpp" "$root/examples" "$out"

# Libraries every glibc system has, left to the host; libvulkan.so.1 is the host's Vulkan
# loader, needed only by the Vulkan module, which is left out where it is missing.
host_libs=" libc.so.6 libm.so.6 libdl.so.2 libpthread.so.0 librt.so.1 ld-linux-x86-64.so.2 \
libstdc++.so.6 libgcc_s.so.1 libvulkan.so.1 "

# The binary, every module, and what they need from llama.cpp's build, each under the name it
# is asked for (the real file, not a link). OpenMP's runtime (for a DIST_BUILD made with GCC and
# OpenMP) is not on a minimal host: bundled.
cp "$build/infer-batch" "$root/bin/"
cp "$backends"/libggml-*.so "$root/lib/infer-batch/"
todo=("$root/bin/infer-batch" "$root"/lib/infer-batch/*.so)
while [ ${#todo[@]} -gt 0 ]; do
    file=${todo[0]}
    todo=("${todo[@]:1}")
    for lib in $(needed "$file"); do
        [ -e "$root/lib/infer-batch/$lib" ] && continue
        case "$host_libs" in *" $lib "*) continue ;; esac
        if [ -e "$libdir/$lib" ]; then
            cp -L "$libdir/$lib" "$root/lib/infer-batch/$lib"
        elif [ "$lib" = libgomp.so.1 ] && [ -e "/usr/lib/x86_64-linux-gnu/$lib" ]; then
            cp -L "/usr/lib/x86_64-linux-gnu/$lib" "$root/lib/infer-batch/$lib"
            cp /usr/share/doc/libgomp1/copyright "$root/licenses/libgomp.copyright"
        else
            echo "error: $(basename "$file") needs $lib, found neither in $libdir nor on the host list" >&2
            exit 1
        fi
        todo+=("$root/lib/infer-batch/$lib")
    done
done
for lib in libvulkan.so.1 libcuda.so.1; do
    [ ! -e "$root/lib/infer-batch/$lib" ] || { echo "error: $lib must not be bundled" >&2; exit 1; }
done
# Debug line tables off (a third of the binary), symbols kept for backtraces; each file's run
# path names only its own folder (the binary: its libraries'), never the build machine's.
for file in "$root"/bin/* "$root"/lib/infer-batch/*; do
    is_elf "$file" || continue
    chmod 0755 "$file"
    strip --strip-debug "$file"
    case "$file" in
    */bin/*) patchelf --set-rpath '$ORIGIN/../lib/infer-batch' "$file" ;;
    *) patchelf --set-rpath '$ORIGIN' "$file" ;;
    esac
done

# Licences, the third-party list, the SBOM, the example.
cp LICENSE-MIT LICENSE-APACHE "$root/"
llama=$(cargo metadata --format-version 1 --locked | python3 -c '
import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "llama-cpp-sys-2"))')
llama=$(dirname "$llama")/llama.cpp
cp "$llama/LICENSE" "$root/licenses/llama.cpp/LICENSE"
(cd "$llama/vendor" && find . -iname 'LICENSE*' -type f | sort) | while read -r f; do
    mkdir -p "$root/licenses/llama.cpp/vendor/$(dirname "$f")"
    cp "$llama/vendor/$f" "$root/licenses/llama.cpp/vendor/$f"
done
# zig links LLVM's libc++, libc++abi and libunwind into every file: their licence, from zig.
if ! scripts/glibc-floor.sh "$root" | grep -q GLIBCXX_ && [ -e .zig/env ]; then
    zig_lib=$(. ./.zig/env && python3 -m ziglang env | sed -n 's/.*\.lib_dir = "\(.*\)".*/\1/p')
    for part in libcxx libcxxabi libunwind; do
        mkdir -p "$root/licenses/llvm/$part"
        cp "$zig_lib/$part/LICENSE.TXT" "$root/licenses/llvm/$part/"
    done
fi
FEATURES=vulkan python3 scripts/dist_meta.py licenses "$root/THIRD-PARTY-LICENSES.txt"
FEATURES=vulkan python3 scripts/dist_meta.py sbom "$root/sbom.cdx.json"
cp examples/rubric.jsonl "$root/examples/"
cat >"$root/README.txt" <<EOF
infer-batch $version (commit $commit), Linux x86-64: offline LLM batch inference on GGUF models.

  bin/infer-batch --version
  bin/infer-batch --model MODEL.gguf examples/rubric.jsonl -o results.jsonl

Runs from wherever this folder is unpacked. lib/infer-batch/ holds llama.cpp's libraries and
its backends: one CPU module per instruction set (the best one for this processor is loaded)
and the Vulkan module, used where the host has a Vulkan loader (libvulkan.so.1) and a GPU
driver; elsewhere the run says why once and computes on the CPU.

Check the files: sha256sum -c SHA256SUMS
Licences: LICENSE-MIT, LICENSE-APACHE, licenses/, THIRD-PARTY-LICENSES.txt; SBOM: sbom.cdx.json
EOF
(cd "$root" && find . -type f ! -name SHA256SUMS | LC_ALL=C sort | sed 's|^\./||' |
    xargs sha256sum >SHA256SUMS)

pack "$stage" "$name" "$out/$name.tar.gz"
echo "wrote $out/$name.tar.gz ($(du -h "$out/$name.tar.gz" | cut -f1))"

# The same files as a wheel, tagged with the glibc they need (wheel_glibc). It is never
# repaired: a repair would rename the libraries, and ggml finds its modules by name.
rm -f "$out"/infer_batch-*.whl
wheel=$(python3 scripts/dist_wheel.py "$root" "$out" "$version" "$(wheel_glibc "$root")")
echo "wrote $wheel ($(du -h "$wheel" | cut -f1))"

# The offline source bundle: what git tracks at HEAD, the vendored crates, and a cargo
# configuration that takes every crate from them and names the commit for --version.
src=infer-batch-$version-src
mkdir -p "$stage/$src"
git archive --format=tar HEAD | tar -C "$stage/$src" -xf -
(cd "$stage/$src" && cargo vendor --locked --versioned-dirs vendor >"$here/$stage/vendor.toml" 2>"$here/$stage/vendor.log") ||
    { cat "$stage/vendor.log" >&2; exit 1; }
python3 scripts/dist_meta.py prune-vendor "$stage/$src/vendor"
config=$stage/$src/.cargo/config.toml
mkdir -p "$(dirname "$config")"
touch "$config"
if grep -q '^\[env\]' "$config"; then
    sed -i "/^\[env\]/a INFER_BATCH_GIT_COMMIT = \"$commit\"" "$config"
else
    printf '\n[env]\nINFER_BATCH_GIT_COMMIT = "%s"\n' "$commit" >>"$config"
fi
{
    echo
    echo "# The offline bundle: every crate comes from vendor/ (cargo vendor), never a registry."
    grep -v '^#' "$stage/vendor.toml" | sed '/./,$!d'
} >>"$config"
pack "$stage" "$src" "$out/$src.tar.gz"
echo "wrote $out/$src.tar.gz ($(du -h "$out/$src.tar.gz" | cut -f1))"

(cd "$out" && sha256sum "$name.tar.gz" "$(basename "$wheel")" "$src.tar.gz" >SHA256SUMS)
echo "wrote $out/SHA256SUMS"
