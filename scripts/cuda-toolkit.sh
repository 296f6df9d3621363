#!/usr/bin/env bash
# Installs a CUDA 13 toolkit from the NVIDIA wheels on the Python package registry into
# .cuda/ (git-ignored), and writes .cuda/env: the environment that points llama-cpp-sys-2's
# CMake at it. No GPU and no driver are needed to build.
#
#   scripts/cuda-toolkit.sh         install (idempotent), check the versions, print .cuda/env
#   . .cuda/env                     then: cargo build --release --features cuda
#
# The wheels put everything under one prefix, nvidia/cu13/ (bin/nvcc, nvvm/bin/cicc, include/,
# lib/). CMake also needs a lib64 link and unversioned library names, which this adds. The
# wheels carry no driver library (libcuda.so); the `cuda` feature builds with GGML_CUDA_NO_VMM,
# which does not link it, and loads the CUDA backend at run time, where the driver is.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
root=$here/.cuda
prefix=$root/site/nvidia/cu13
# Pinned: the versions this project's CUDA build was made with.
wheels=(
    nvidia-cuda-nvcc==13.5.37
    nvidia-nvvm==13.5.37
    nvidia-cuda-crt==13.5.37
    nvidia-cuda-runtime==13.5.37
    nvidia-cuda-cccl==13.3.5.0.6
    nvidia-cublas==13.10.0.20
)

if [ ! -x "$prefix/bin/nvcc" ]; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
        echo "error: python3 with pip is needed to install the CUDA wheels" >&2
        exit 1
    fi
    echo "installing the CUDA 13 toolkit wheels into $root (about 570 MB of wheels, 930 MB installed) ..."
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$root/site" \
        "${wheels[@]}"
fi

# What CMake's FindCUDAToolkit looks for besides what the wheels ship.
ln -sfn lib "$prefix/lib64"
for lib in cudart cublas cublasLt; do
    so=$(find "$prefix/lib" -maxdepth 1 -name "lib$lib.so.*" | sort | head -n 1)
    [ -n "$so" ] || { echo "error: lib$lib.so.* is missing from $prefix/lib" >&2; exit 1; }
    ln -sfn "$(basename "$so")" "$prefix/lib/lib$lib.so"
done

version=$("$prefix/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
case $version in
    13.*) ;;
    *) echo "error: nvcc reports CUDA ${version:-nothing}; the build needs CUDA 13" >&2; exit 1 ;;
esac
[ -x "$prefix/nvvm/bin/cicc" ] || { echo "error: cicc is missing: is nvidia-nvvm installed?" >&2; exit 1; }

cat >"$root/env" <<ENV
# The CUDA 13 toolkit from the wheels (scripts/cuda-toolkit.sh); source it before a cuda build.
export CUDAToolkit_ROOT=$prefix
export CUDA_PATH=$prefix
export CUDACXX=$prefix/bin/nvcc
export CMAKE_CUDA_COMPILER=$prefix/bin/nvcc
export PATH=$prefix/bin:\$PATH
export LIBRARY_PATH=$prefix/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}
export LD_LIBRARY_PATH=$prefix/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
# Machine code for A100 (sm_80), RTX 40 and L4/L40 (sm_89), H100/H200 (sm_90) and RTX 50
# (sm_120, which ggml makes sm_120a), no PTX: each architecture adds a share of nvcc's time.
export CMAKE_CUDA_ARCHITECTURES=\${CMAKE_CUDA_ARCHITECTURES:-80-real;89-real;90-real;120-real}
ENV
echo "CUDA $version toolkit in $prefix; its environment:"
cat "$root/env"
