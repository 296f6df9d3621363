#!/usr/bin/env bash
# Proves the CUDA add-on from scripts/dist-cuda.sh (`make dist-cuda`, as root) as far as a
# machine without an NVIDIA GPU can:
#   - SHA256SUMS.cuda passes, outside and inside, and fails on a tampered copy; the module
#     carries machine code for every architecture promised, its run path is $ORIGIN, and no
#     driver library is bundled; packing again gives the same bytes;
#   - unpacked over the base archive in a minimal Debian 12 root with no network: ldd resolves
#     everything the module needs from the archive itself (the driver is loaded at run time),
#     and the example batch runs as nobody, says once why CUDA gives no device, and its results
#     equal the base archive's alone;
#   - the README's `pip download` gathers, from dist/ and the NVIDIA wheels the add-on packed
#     (no index), everything `pip install --no-index infer-batch-cuda` then installs into a
#     fresh venv with no network; ldd resolves the module from NVIDIA's wheels, and the
#     example batch runs with results equal to the base archive's.
# Nothing here runs the add-on on a GPU (scripts/gpu-check.sh builds its own module on the
# device). Results and logs: target/dist-cuda-test/.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
. scripts/dist-lib.sh

[ "$(id -u)" -eq 0 ] || { echo "error: dist-cuda-test needs root (chroot, unshare)" >&2; exit 1; }
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
name=infer-batch-$version-linux-x86_64
base=dist/$name.tar.gz
addon=dist/$name-cuda.tar.gz
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
archs=${CUDA_ARCHS:-sm_80 sm_89 sm_90 sm_120}
[ -e "$base" ] && [ -e "$addon" ] || { echo "error: run make dist-cuda first" >&2; exit 1; }
[ -e "$model" ] || ./models/fetch.sh smollm2

work=target/dist-cuda-test
rm -rf "$work"
mkdir -p "$work/x"
log() { echo "dist-cuda-test: $*"; }
fail() { echo "dist-cuda-test: FAIL: $*" >&2; exit 1; }

# --- On the host --------------------------------------------------------------------------
(cd dist && sha256sum --quiet -c SHA256SUMS.cuda) || fail "dist/SHA256SUMS.cuda"
tar -C "$work/x" -xzf "$base"
tar -C "$work/x" -xzf "$addon"
tree=$work/x/$name
(cd "$tree" && sha256sum --quiet -c SHA256SUMS && sha256sum --quiet -c SHA256SUMS.cuda) ||
    fail "SHA256SUMS or SHA256SUMS.cuda inside the unpacked archives"
cp -al "$tree" "$work/tampered"
rm "$work/tampered/README.cuda.txt" && echo tampered >"$work/tampered/README.cuda.txt"
if (cd "$work/tampered" && sha256sum --quiet -c SHA256SUMS.cuda >/dev/null 2>&1); then
    fail "sha256sum -c SHA256SUMS.cuda passes on a tampered copy"
fi
rm -rf "$work/tampered"
DIST_OUT=$work/again ./scripts/dist-cuda.sh >"$work/again.log" 2>&1 || fail "packing again (log: $work/again.log)"
for f in $(cut -d' ' -f3 dist/SHA256SUMS.cuda); do
    cmp -s "dist/$f" "$work/again/$f" || fail "$f differs when packed again"
done
rm -rf "$work/again"
module=$tree/lib/infer-batch/libggml-cuda.so
have=$(python3 scripts/cuda_archs.py "$module")
for arch in $archs; do
    case " $have " in *" $arch "*) ;; *) fail "the module has no $arch code ($have)" ;; esac
done
[ "$(runpath "$module")" = '$ORIGIN' ] || fail "the module's run path is '$(runpath "$module")'"
[ -z "$(find "$tree" -name 'libcuda.so*' -print -quit)" ] || fail "the driver library is bundled"
log "archives: checksums pass, and fail on a tampered copy; packed twice, the same bytes; the module holds $have; run path \$ORIGIN; no driver bundled"

# --- In a minimal root with no network: the base archive, then the add-on over it ---------
root=$work/root
cp -a "$(./scripts/dist-root.sh)" "$root"
cp "$base" "$addon" "$root/tmp/"
cp "$model" "$root/opt/model.gguf"
chmod 0644 "$root/opt/model.gguf"
in_root 0:0 sh -c "cd /opt && tar -xzf /tmp/$name.tar.gz && cp -a $name base-only && tar -xzf /tmp/$name-cuda.tar.gz"
in_root 0:0 ldd "/opt/$name/lib/infer-batch/libggml-cuda.so" >"$work/ldd.txt"
! grep -q 'not found' "$work/ldd.txt" || fail "ldd: $(grep 'not found' "$work/ldd.txt")"
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libggml-base.so.0; do
    grep -q "$lib => /opt/$name/lib/infer-batch/$lib" "$work/ldd.txt" || fail "ldd: $lib not from the archive"
done
log "ldd: the module's libraries all resolve inside the archive"

run() { # run LABEL DIR: the example batch as nobody from /opt/DIR
    in_root 65534:65534 "/opt/$2/bin/infer-batch" --model /opt/model.gguf \
        "/opt/$2/examples/rubric.jsonl" -o "/tmp/$1.results.jsonl" \
        --prefix-cache-dir "/tmp/$1-cache" 2>"$work/$1.log" || fail "the $1 run (log: $work/$1.log)"
    cp "$root/tmp/$1.results.jsonl" "$work/"
}
run base base-only
run cuda "$name"
no_gpu=$(grep 'no GPU:' "$work/cuda.log" || true)
[ "$(grep -c . <<<"$no_gpu")" = 1 ] && grep -q 'libggml-cuda.so loaded but found no device' <<<"$no_gpu" ||
    fail "without a driver the run should say once that CUDA found no device (log: $work/cuda.log)"
python3 scripts/dist_compare.py "$work/base.results.jsonl" "$work/cuda.results.jsonl" >/dev/null ||
    fail "with the add-on the results differ from the base archive's"
log "root: the example runs with the add-on, results equal the base's; $(grep -o 'no GPU:.*' <<<"$no_gpu")"

# --- The wheels: a fresh venv, from dist/ and NVIDIA's runtime wheels alone ---------------
# The README's download on the connected side, with the NVIDIA wheels the add-on packed
# standing in for the package index.
wheels=$work/wheels
unshare --net python3 -m pip download --quiet --disable-pip-version-check --no-index --dest "$wheels" \
    --find-links dist --find-links target/dist/cuda-wheels --only-binary :all: \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    "infer-batch-cuda==$version" \
    >"$work/pip-download.log" 2>&1 || fail "the README's pip download (log: $work/pip-download.log)"
python3 -m venv "$work/venv"
unshare --net env -u PIP_FIND_LINKS "$work/venv/bin/pip" install --quiet --no-index \
    --find-links "$wheels" infer-batch-cuda >"$work/pip.log" 2>&1 || fail "pip install --no-index (log: $work/pip.log)"
installed=$(ls "$work"/venv/lib/python3*/site-packages/infer_batch/lib/infer-batch/libggml-cuda.so)
env -u LD_LIBRARY_PATH ldd "$installed" >"$work/wheel-ldd.txt"
! grep -q 'not found' "$work/wheel-ldd.txt" || fail "ldd in the venv: $(grep 'not found' "$work/wheel-ldd.txt")"
grep -q 'libcudart.so.13 => .*/infer-batch/\.\./\.\./\.\./nvidia/cu13/lib/libcudart.so.13 ' "$work/wheel-ldd.txt" ||
    fail "the installed module does not take libcudart from NVIDIA's wheel"
# No device even where this host has a GPU: the same bits as the base archive's CPU run.
env -u LD_LIBRARY_PATH CUDA_VISIBLE_DEVICES= GGML_VK_VISIBLE_DEVICES= "$work/venv/bin/infer-batch" --model "$model" examples/rubric.jsonl \
    -o "$work/wheel.results.jsonl" --prefix-cache-dir "$work/wheel-cache" 2>"$work/wheel.log" ||
    fail "the wheel's run (log: $work/wheel.log)"
grep -q 'libggml-cuda.so loaded but found no device' "$work/wheel.log" ||
    fail "the wheel's run did not load the CUDA module (log: $work/wheel.log)"
python3 scripts/dist_compare.py "$work/base.results.jsonl" "$work/wheel.results.jsonl" >/dev/null ||
    fail "the wheel's results differ from the base archive's"
log "wheel: infer-batch-cuda installs with --no-index beside infer-batch; the module takes NVIDIA's wheels' libraries; results equal"

log "sizes:"
for f in "$addon" dist/infer_batch_cuda-*.whl; do
    printf '  %-56s %s\n' "$(basename "$f")" "$(du -h --apparent-size "$f" | cut -f1)"
done
printf '  %-56s %s\n' "NVIDIA's wheels for pip (runtime, cuBLAS, NVRTC)" "$(du -ch --apparent-size "$wheels"/nvidia_*.whl | tail -n 1 | cut -f1)"
log "glibc floor of the add-on: $(mkdir -p "$work/addon" && tar -C "$work/addon" -xzf "$addon" && ./scripts/glibc-floor.sh "$work/addon")"
log "passed in $(((SECONDS - start) / 60)) min $(((SECONDS - start) % 60)) s"
