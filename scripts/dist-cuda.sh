#!/usr/bin/env bash
# Packs the CUDA add-on (`make dist-cuda`) from the CUDA build (target/cuda/release, made by
# `make cuda-build`), beside `make dist`'s archives in dist/:
#
#   infer-batch-VERSION-linux-x86_64-cuda.tar.gz   the same top folder as the base archive,
#       holding lib/infer-batch/libggml-cuda.so (machine code for every architecture in
#       CUDA_ARCHS), the CUDA runtime libraries it needs from NVIDIA's wheels (libcudart,
#       libcublas, libcublasLt, and the libnvrtc that cuBLAS loads at run time; unmodified),
#       NVIDIA's licence, README.cuda.txt and SHA256SUMS.cuda. Unpacked over the base archive,
#       its binary loads the module.
#   infer_batch_cuda-VERSION-py3-none-manylinux_2_N_x86_64.whl   the module alone, for beside
#       the base wheel: it requires infer-batch==VERSION and NVIDIA's runtime wheels (at least
#       the versions packed here), whose libraries its run path finds in
#       site-packages/nvidia/cu13/lib.
#   SHA256SUMS.cuda                               of the two.
#
# The module and the base archive must come from the same llama.cpp sources (ggml's module
# interface is only stable within one version): checked here through both binaries' --version.
# NVIDIA's wheels are the toolkit's own versions (.cuda/site), fetched once into
# target/dist/cuda-wheels. Never bundled: the driver (libcuda.so.1). Reproducible as
# scripts/dist.sh is (scripts/dist-cuda-test.sh packs twice and compares).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/dist-lib.sh

build=${DIST_CUDA_BUILD:-target/cuda/release}
base_build=${DIST_BUILD:-target/vulkan/x86_64-unknown-linux-gnu/release}
out=${DIST_OUT:-dist}
stage=target/dist/stage-cuda
# The architectures the add-on promises; the module is checked to hold their code.
archs=${CUDA_ARCHS:-sm_80 sm_89 sm_90 sm_120}
nvidia_site=.cuda/site
wheels=target/dist/cuda-wheels

[ -x "$build/infer-batch" ] || { echo "error: no $build/infer-batch: run make cuda-build" >&2; exit 1; }
[ -x "$base_build/infer-batch" ] || { echo "error: no $base_build/infer-batch: run make dist" >&2; exit 1; }
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
commit=$(git rev-parse --short=12 HEAD)
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct HEAD)}
llama_line() { "$1" --version | sed -n 's/^llama.cpp: //p'; }
[ "$(llama_line "$build/infer-batch")" = "$(llama_line "$base_build/infer-batch")" ] || {
    echo "error: the CUDA build ($(llama_line "$build/infer-batch")) and the base build" \
        "($(llama_line "$base_build/infer-batch")) differ in llama.cpp; rebuild both" >&2
    exit 1
}
"$build/infer-batch" --version | grep -q "commit $commit" ||
    echo "warning: $build/infer-batch is not built from $commit; the module's sources are the same llama.cpp" >&2

libdir=$(build_libdir "$build/infer-batch")
module=$(dirname "${libdir:-.}")/backends/libggml-cuda.so
[ -e "$module" ] || { echo "error: no CUDA module at $module" >&2; exit 1; }
have=" $(python3 scripts/cuda_archs.py "$module") "
for arch in $archs; do
    case "$have" in *" $arch "*) ;; *)
        echo "error: $module has no $arch code (it has:$have). make cuda-build sets the" \
            "architectures; after a change, rebuild llama.cpp: cargo clean -p llama-cpp-sys-2" \
            "--release --target-dir target/cuda" >&2
        exit 1 ;;
    esac
done
# The toolkit CMake found for the module: its cache records "...[v13.5.37()]".
nvcc_version=$(sed -n 's/^FIND_PACKAGE_MESSAGE_DETAILS_CUDAToolkit:.*\[v\([0-9.]*\).*/\1/p' \
    "$(dirname "$libdir")/build/CMakeCache.txt" 2>/dev/null | head -n 1 || true)

# NVIDIA's runtime wheels, at the versions of the toolkit the module was built with.
wheel_version() { # wheel_version PACKAGE: its version in the toolkit
    local info
    info=$(ls -d "$nvidia_site/${1//-/_}"-*.dist-info 2>/dev/null | head -n 1)
    [ -n "$info" ] || { echo "error: $1 is not in $nvidia_site: run scripts/cuda-toolkit.sh" >&2; exit 1; }
    sed -n 's/^Version: //p' "$info/METADATA"
}
runtime_version=$(wheel_version nvidia-cuda-runtime)
cublas_version=$(wheel_version nvidia-cublas)
# NVRTC is not part of the toolkit's wheels; this is the release that came with its runtime.
nvrtc_version=${NVRTC_VERSION:-13.5.37}
pins=("nvidia-cuda-runtime==$runtime_version" "nvidia-cublas==$cublas_version" "nvidia-cuda-nvrtc==$nvrtc_version")
pinned_wheel() { ls "$wheels/$(tr - _ <<<"${1%%==*}")-${1##*==}"-*.whl 2>/dev/null | head -n 1; }
for pin in "${pins[@]}"; do
    [ -n "$(pinned_wheel "$pin")" ] && continue
    mkdir -p "$wheels"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --dest "$wheels" "$pin"
done
runtime=$stage-runtime
rm -rf "$runtime"
mkdir -p "$runtime"
for pin in "${pins[@]}"; do
    unzip -q -o -d "$runtime" "$(pinned_wheel "$pin")" 'nvidia/cu13/lib/*.so*' '*.dist-info/licenses/*'
done

name=infer-batch-$version-linux-x86_64
root=$stage/$name
base_archive=dist/$name.tar.gz
[ -e "$base_archive" ] || { echo "error: no $base_archive: run make dist" >&2; exit 1; }
rm -rf "$stage"
mkdir -p "$root/lib/infer-batch" "$root/licenses/cuda" "$out"
cp "$module" "$root/lib/infer-batch/"
strip --strip-debug "$root/lib/infer-batch/libggml-cuda.so"
chmod 0755 "$root/lib/infer-batch/libggml-cuda.so"

# What the module needs beyond the base archive (whose library names it lists): NVIDIA's
# runtime libraries, never the driver; and NVRTC, which cuBLAS loads at run time.
base_libs=" $(tar -tzf "$base_archive" | sed -n "s|^$name/lib/infer-batch/\(..*\)|\1|p" | tr '\n' ' ') \
libc.so.6 libm.so.6 libdl.so.2 libpthread.so.0 librt.so.1 ld-linux-x86-64.so.2 libstdc++.so.6 libgcc_s.so.1 "
todo=("$root/lib/infer-batch/libggml-cuda.so")
extra=$(cd "$runtime/nvidia/cu13/lib" && ls libnvrtc.so.* libnvrtc-builtins.so.*)
for lib in $extra; do
    cp "$runtime/nvidia/cu13/lib/$lib" "$root/lib/infer-batch/$lib"
done
while [ ${#todo[@]} -gt 0 ]; do
    file=${todo[0]}
    todo=("${todo[@]:1}")
    for lib in $(needed "$file"); do
        case "$base_libs" in *" $lib "*) continue ;; esac
        [ -e "$root/lib/infer-batch/$lib" ] && continue
        case "$lib" in libcuda.so*) echo "error: the module links the driver ($lib)" >&2; exit 1 ;; esac
        [ -e "$runtime/nvidia/cu13/lib/$lib" ] ||
            { echo "error: $(basename "$file") needs $lib, in neither the base archive nor NVIDIA's wheels" >&2; exit 1; }
        cp "$runtime/nvidia/cu13/lib/$lib" "$root/lib/infer-batch/$lib"
        todo+=("$root/lib/infer-batch/$lib")
    done
done
chmod 0755 "$root"/lib/infer-batch/*
# The module finds its neighbours, and in a wheel install NVIDIA's, through its run path.
patchelf --set-rpath '$ORIGIN' "$root/lib/infer-batch/libggml-cuda.so"

cp "$(ls "$runtime"/nvidia_cuda_runtime-*.dist-info/licenses/License.txt)" "$root/licenses/cuda/NVIDIA-License.txt"
cat >"$root/README.cuda.txt" <<EOF
infer-batch $version CUDA add-on (commit $commit), Linux x86-64.

Unpack it over infer-batch-$version-linux-x86_64.tar.gz (the same top folder):

  tar -xzf infer-batch-$version-linux-x86_64.tar.gz
  tar -xzf infer-batch-$version-linux-x86_64-cuda.tar.gz
  cd infer-batch-$version-linux-x86_64 && sha256sum -c SHA256SUMS && sha256sum -c SHA256SUMS.cuda
  bin/infer-batch --model MODEL.gguf examples/rubric.jsonl -o results.jsonl

lib/infer-batch/libggml-cuda.so is llama.cpp's CUDA backend, compiled with CUDA ${nvcc_version:-13}
into machine code for $archs. Beside it are the CUDA runtime libraries it needs,
unmodified, from NVIDIA's Python wheels nvidia-cuda-runtime $runtime_version, nvidia-cublas
$cublas_version and nvidia-cuda-nvrtc $nvrtc_version, under NVIDIA's licence
(licenses/cuda/NVIDIA-License.txt).

The host supplies the NVIDIA driver, release 580 or newer (CUDA 13.0's; the 13.5 libraries
rely on NVIDIA's minor-version compatibility); it is never bundled.
Without it the run says why once and computes on the CPU (or on Vulkan where that loads).
EOF
(cd "$root" && find lib licenses README.cuda.txt -type f | LC_ALL=C sort | xargs sha256sum >SHA256SUMS.cuda)
archive=$out/$name-cuda.tar.gz
# Level 6: cuBLASLt hardly compresses, and level 9 only costs time on it.
pack "$stage" "$name" "$archive" 6
echo "wrote $archive ($(du -h "$archive" | cut -f1))"

# The wheel: the module alone (llama.cpp's code: its licence), its run path also reaching
# NVIDIA's wheels from site-packages/infer_batch/lib/infer-batch/. Tagged with the glibc the
# module needs.
wheel_tree=$stage/wheel
mkdir -p "$wheel_tree/lib/infer-batch" "$wheel_tree/licenses/llama.cpp"
cp "$root/lib/infer-batch/libggml-cuda.so" "$wheel_tree/lib/infer-batch/"
patchelf --set-rpath '$ORIGIN:$ORIGIN/../../../nvidia/cu13/lib' "$wheel_tree/lib/infer-batch/libggml-cuda.so"
[ "$(python3 scripts/cuda_archs.py "$wheel_tree/lib/infer-batch/libggml-cuda.so")" = "${have:1:-1}" ] ||
    { echo "error: the wheel's copy of the module lost code" >&2; exit 1; }
tar -xzf "$base_archive" -C "$wheel_tree/licenses/llama.cpp" --strip-components=3 "$name/licenses/llama.cpp/LICENSE"
floor=$(wheel_glibc "$wheel_tree")
rm -f "$out"/infer_batch_cuda-*.whl
next=$((${runtime_version%%.*} + 1)) # CUDA 13's libraries, not 14's
wheel=$(python3 scripts/dist_wheel.py --cuda-addon "$wheel_tree" "$out" "$version" "$floor" \
    "nvidia-cuda-runtime>=$runtime_version,<$next" "nvidia-cublas>=$cublas_version,<$next" \
    "nvidia-cuda-nvrtc>=$nvrtc_version,<$next")
echo "wrote $wheel ($(du -h "$wheel" | cut -f1))"

(cd "$out" && sha256sum "$(basename "$archive")" "$(basename "$wheel")" >SHA256SUMS.cuda)
echo "wrote $out/SHA256SUMS.cuda"
