#!/usr/bin/env bash
# Proves the release archive from `make dist` on a machine with no network (`make dist-test`,
# as root): a minimal Debian 12 root (mmdebstrap --variant=minbase: no compiler, no Rust, no
# Python, no Vulkan loader), entered with no network (unshare --net, then chroot), as an
# unprivileged user. Inside it the archive unpacked in /opt
#   - runs the example batch, with results equal to the build tree's binary's on this host
#     (texts, finish reasons, usage), and says which CPU variant it loaded;
#   - says once that the Vulkan module did not load, and why, and runs on the CPU;
#   - still runs with every CPU variant but the baseline (x64) removed, and with none left
#     stops with a message that names the modules and where it looked;
#   - leaves unresolved, under ldd, only what is loaded at run time (the Vulkan loader);
#   - with libvulkan1 and Mesa's drivers added to the root, runs --gpu-layers all on lavapipe,
#     and the summary names the device.
# In a minimal Debian 11 root (glibc 2.31, older than Debian 12 builds need) the example batch
# runs with the same results; the files need no glibc above 2.28 and no libstdc++, and the
# wheel's tag says no more than manylinux_2_28.
# On the host: every ELF file's run path is $ORIGIN-relative; SHA256SUMS passes and fails on a
# tampered copy; the SBOM parses and names every crate of Cargo.lock; packing twice gives the
# same bytes; the wheel installs into a fresh venv with --no-index and gives the same results.
# DIST_TEST_SOURCE=1 also builds the source bundle with no network and an empty cargo home.
# It prints the archives' sizes and the glibc floor (scripts/glibc-floor.sh).
#
# The roots are made once (scripts/dist-root.sh, from the host's own apt sources and mirror)
# and kept in target/dist/root-*; each run works on a copy. Results and logs: target/dist-test/.
set -euo pipefail
cd "$(dirname "$0")/.."
here=$(pwd)
start=$SECONDS

[ "$(id -u)" -eq 0 ] || { echo "error: dist-test needs root (chroot, unshare)" >&2; exit 1; }
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
name=infer-batch-$version-linux-x86_64
archive=dist/$name.tar.gz
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
reference=${DIST_BUILD:-target/vulkan/x86_64-unknown-linux-gnu/release}/infer-batch
[ -e "$archive" ] || { echo "error: no $archive: run make dist" >&2; exit 1; }
[ -e "$model" ] || ./models/fetch.sh smollm2

work=target/dist-test
rm -rf "$work"
mkdir -p "$work"
log() { echo "dist-test: $*"; }
fail() { echo "dist-test: FAIL: $*" >&2; exit 1; }
. scripts/dist-lib.sh

# --- On the host --------------------------------------------------------------------------
(cd dist && sha256sum --quiet -c SHA256SUMS) || fail "dist/SHA256SUMS"
mkdir -p "$work/x"
tar -C "$work/x" -xzf "$archive"
tree=$work/x/$name
(cd "$tree" && sha256sum --quiet -c SHA256SUMS) || fail "SHA256SUMS inside the archive"
cp -a "$tree" "$work/tampered"
printf '\0' >>"$work/tampered/lib/infer-batch/libllama.so.0"
if (cd "$work/tampered" && sha256sum --quiet -c SHA256SUMS >/dev/null 2>&1); then
    fail "sha256sum -c passes on a tampered copy"
fi
rm -rf "$work/tampered"
log "SHA256SUMS: passes, and fails on a tampered copy"

elves=0
while IFS= read -r -d '' f; do
    is_elf "$f" || continue
    elves=$((elves + 1))
    have=$(runpath "$f")
    case "$f" in
    */bin/*) want='$ORIGIN/../lib/infer-batch' ;;
    *) want='$ORIGIN' ;;
    esac
    [ "$have" = "$want" ] || fail "$f: run path '$have', not '$want'"
done < <(find "$tree" -type f -print0)
for lib in libvulkan.so.1 libcuda.so.1; do
    [ ! -e "$tree/lib/infer-batch/$lib" ] || fail "$lib is bundled"
done
ls "$tree"/lib/infer-batch/libggml-cpu-x64.so "$tree"/lib/infer-batch/libggml-vulkan.so >/dev/null ||
    fail "a CPU baseline or the Vulkan module is missing"
log "run paths: all $elves ELF files relative to \$ORIGIN; no Vulkan loader or driver bundled"

python3 - "$tree/sbom.cdx.json" Cargo.lock <<'EOF' || fail "SBOM"
import json, sys, tomllib
bom = json.load(open(sys.argv[1]))
assert bom["bomFormat"] == "CycloneDX", "not CycloneDX"
have = {(c["name"], c["version"]) for c in bom["components"]}
lock = tomllib.load(open(sys.argv[2], "rb"))["package"]
want = {(p["name"], p["version"]) for p in lock if "source" in p}
missing = want - have
assert not missing, f"missing from the SBOM: {sorted(missing)}"
assert any(c["name"] == "llama.cpp" for c in bom["components"]), "no llama.cpp component"
print(f"dist-test: SBOM: CycloneDX {bom['specVersion']}, all {len(want)} crates of Cargo.lock and llama.cpp")
EOF

log "packing again, to compare the bytes ..."
DIST_OUT=$work/again ./scripts/dist.sh >"$work/again.log" 2>&1 || fail "second dist.sh (log: $work/again.log)"
for f in $(cut -d' ' -f3 dist/SHA256SUMS); do
    cmp -s "dist/$f" "$work/again/$f" || fail "$f differs when packed again"
done
log "reproducible: packing twice gave identical archives"

# The reference: the build tree's binary on this host, same batch and flags.
run_flags=(--model /opt/model.gguf /opt/"$name"/examples/rubric.jsonl)
"$reference" --model "$model" examples/rubric.jsonl -o "$work/host.results.jsonl" \
    --prefix-cache-dir "$work/host-cache" 2>"$work/host.log" || fail "the build tree's binary (log: $work/host.log)"

# --- In a minimal root with no network --------------------------------------------------
# new_root DEST [dist-root.sh ARG]: a copy of a kept root, with the archive in /tmp and the model
# in /opt.
new_root() {
    cp -a "$(./scripts/dist-root.sh ${2:+"$2"})" "$1"
    cp "$archive" "$1/tmp/"
    cp "$model" "$1/opt/model.gguf"
    chmod 0644 "$1/opt/model.gguf"
}
root=$work/root
new_root "$root"

for tool in cc gcc clang rustc cargo python3 vulkaninfo; do
    ! in_root 0:0 sh -c "command -v $tool" >/dev/null || fail "the root has $tool"
done
[ -z "$(find "$root" -name 'libvulkan.so*' -print -quit)" ] || fail "the root has a Vulkan loader"
nets=$(in_root 0:0 ls /sys/class/net | tr '\n' ' ')
[ "$nets" = "lo " ] || fail "the root has a network: $nets"
log "root: minbase, no compiler, Rust, Python or Vulkan loader; network interfaces: $nets"

in_root 0:0 tar -C /opt -xzf "/tmp/$name.tar.gz"
# ldd: everything resolves but the Vulkan loader, which only the Vulkan module needs.
in_root 0:0 sh -c "cd /opt/$name && for f in bin/* lib/infer-batch/*; do ldd \$f | sed \"s|^|\$f: |\"; done" \
    >"$work/ldd.txt"
unresolved=$(grep 'not found' "$work/ldd.txt" || true)
bad=$(grep -v '^lib/infer-batch/libggml-vulkan.so:[[:space:]]*libvulkan.so.1 => not found' <<<"$unresolved" || true)
[ -z "$bad" ] || fail "ldd finds nothing for: $bad"
log "ldd: everything resolves but what is loaded at run time: $(sed 's/[[:space:]]\+/ /g' <<<"${unresolved:-nothing}")"

version_line=$(in_root 65534:65534 "/opt/$name/bin/infer-batch" --version)
grep -q "commit $(git rev-parse --short=12 HEAD)" <<<"$version_line" || fail "--version: $version_line"
log "--version: $version_line"

# run NAME [PREFIX]: the example batch as nobody, from the archive unpacked at /opt/PREFIX.
run() {
    local label=$1 dir=${2:-$name}
    in_root 65534:65534 "/opt/$dir/bin/infer-batch" --model /opt/model.gguf \
        "/opt/$dir/examples/rubric.jsonl" -o "/tmp/$label.results.jsonl" \
        --prefix-cache-dir "/tmp/$label-cache" 2>"$work/$label.log" ||
        fail "the $label run (log: $work/$label.log)"
    cp "$root/tmp/$label.results.jsonl" "$work/"
    grep -o 'CPU backend: variant [a-z0-9_]*' "$work/$label.log" | head -n 1
}
variant=$(run full)
[ -n "$variant" ] || fail "the run does not say which CPU variant it loaded (log: $work/full.log)"
no_gpu=$(grep -c 'no GPU:' "$work/full.log" || true)
[ "$no_gpu" = 1 ] && grep 'no GPU:' "$work/full.log" | grep -q 'libvulkan.so.1' ||
    fail "without a Vulkan loader the run should say why once ($no_gpu lines; log: $work/full.log)"
log "run: $variant; $(grep -o 'no GPU:.*' "$work/full.log")"
python3 scripts/dist_compare.py "$work/host.results.jsonl" "$work/full.results.jsonl" ||
    fail "the archive's results differ from the build tree's"

in_root 0:0 sh -c "cp -a /opt/$name /opt/x64-only && cd /opt/x64-only/lib/infer-batch &&
    for f in libggml-cpu-*.so; do [ \$f = libggml-cpu-x64.so ] || rm \$f; done"
variant=$(run x64-only x64-only)
[ "$variant" = "CPU backend: variant x64" ] || fail "with only x64 left it loaded '$variant'"
lines=$(grep -c '"custom_id"' "$work/x64-only.results.jsonl")
[ "$lines" = "$(grep -c . examples/rubric.jsonl)" ] || fail "x64 run: $lines results"
log "only the x64 variant left: $variant, $lines results"
in_root 0:0 rm /opt/x64-only/lib/infer-batch/libggml-cpu-x64.so
if in_root 65534:65534 /opt/x64-only/bin/infer-batch --model /opt/model.gguf \
    "/opt/$name/examples/rubric.jsonl" -o /tmp/none.results.jsonl 2>"$work/none.log"; then
    fail "with no CPU variant left the run went on (log: $work/none.log)"
fi
grep -q 'no llama.cpp CPU backend (libggml-cpu-\*.so) in .*/opt/x64-only/bin/../lib/infer-batch' \
    "$work/none.log" || fail "with no CPU variant left: $(cat "$work/none.log")"
log "no CPU variant left: $(grep -o 'no llama.cpp CPU backend[^:]*' "$work/none.log")"

# --- An older system: Debian 11 (glibc 2.31, GCC 10's libstdc++), below what Debian 12 builds
# need; the archive is built against glibc 2.28 with libc++ linked in.
oldroot=$work/oldroot
new_root "$oldroot" old
root=$oldroot in_root 0:0 tar -C /opt -xzf "/tmp/$name.tar.gz"
old_glibc=$(root=$oldroot in_root 0:0 getconf GNU_LIBC_VERSION)
variant=$(root=$oldroot run old)
python3 scripts/dist_compare.py "$work/host.results.jsonl" "$work/old.results.jsonl" >/dev/null ||
    fail "the results on Debian 11 differ from the build tree's"
log "Debian $(cat "$oldroot/etc/debian_version") root ($old_glibc): the example batch runs ($variant), results equal"

# --- With a Vulkan loader: the root again, plus libvulkan1 and Mesa's lavapipe ------------
# lavapipe is a CPU-type device, which ggml takes only when GGML_VK_VISIBLE_DEVICES names it;
# a few tokens a second, so one short request, without the decode-group probe (exact mode's
# start-up check, minutes on lavapipe; make test-vulkan covers it).
vkroot=$work/vkroot
new_root "$vkroot" vulkan
printf '%s\n' '{"custom_id":"hi","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"Say hi."}],"max_tokens":4}}' \
    >"$vkroot/tmp/hi.jsonl"
chmod 0644 "$vkroot/tmp/hi.jsonl"
root=$vkroot in_root 0:0 tar -C /opt -xzf "/tmp/$name.tar.gz"
root=$vkroot in_root 65534:65534 /usr/bin/env GGML_VK_VISIBLE_DEVICES=0 "/opt/$name/bin/infer-batch" \
    --model /opt/model.gguf /tmp/hi.jsonl -o /tmp/vk.results.jsonl --gpu-layers all \
    --parallel 1 --no-deterministic --prefix-cache-dir /tmp/vk-cache 2>"$work/vk.log" ||
    fail "the run on lavapipe (log: $work/vk.log)"
python3 - "$vkroot/tmp/vk.results.summary.json" "$vkroot/tmp/vk.results.jsonl" <<'PY' || fail "the lavapipe run's summary (log: $work/vk.log)"
import json, sys
summary = json.load(open(sys.argv[1]))
gpu = summary["memory"]["vram_use"][0]
assert gpu["name"].startswith("llvmpipe"), f"the summary names {gpu['name']!r}"
assert summary["memory"]["gpu_layers"] > 0, "no layer offloaded"
line = json.loads(open(sys.argv[2]).readline())
assert line["response"]["status_code"] == 200, line
print(f"dist-test: with libvulkan1 and Mesa: --gpu-layers all ran on {gpu['device']} "
      f"({gpu['name']}), {summary['memory']['gpu_layers']} layers")
PY

# --- The wheel: a fresh venv, installed from dist/ alone ---------------------------------
wheel=$(ls dist/infer_batch-*.whl)
python3 -m venv "$work/venv"
env -u PIP_FIND_LINKS "$work/venv/bin/pip" install --quiet --no-index --find-links dist infer-batch ||
    fail "pip install --no-index"
"$work/venv/bin/infer-batch" --version | grep -q "commit $(git rev-parse --short=12 HEAD)" ||
    fail "the wheel's --version"
"$work/venv/bin/infer-batch" --model "$model" examples/rubric.jsonl -o "$work/wheel.results.jsonl" \
    --prefix-cache-dir "$work/wheel-cache" 2>"$work/wheel.log" || fail "the wheel's run (log: $work/wheel.log)"
python3 scripts/dist_compare.py "$work/host.results.jsonl" "$work/wheel.results.jsonl" >/dev/null ||
    fail "the wheel's results differ from the build tree's"
tools=target/dist/tools
[ -x "$tools/bin/auditwheel" ] || { python3 -m venv "$tools" && "$tools/bin/pip" install --quiet auditwheel; }
"$tools/bin/auditwheel" show "$wheel" >"$work/auditwheel.txt" 2>&1 || true
tag=$(basename "$wheel" | sed -n 's/.*-manylinux_2_\([0-9]*\)_x86_64\.whl$/\1/p')
[ -n "$tag" ] && [ "$tag" -le 28 ] || fail "the wheel's tag is above manylinux_2_28: $(basename "$wheel")"
log "wheel: $(basename "$wheel") installs with --no-index, runs the example, results equal"
log "auditwheel show: $(tr '\n' ' ' <"$work/auditwheel.txt" | sed 's/  */ /g' | cut -c1-400)"

# --- The source bundle, built with no network (DIST_TEST_SOURCE=1: a whole llama.cpp build) --
if [ "${DIST_TEST_SOURCE:-0}" = 1 ]; then
    src=$(ls dist/infer-batch-*-src.tar.gz)
    mkdir -p "$work/src"
    tar -C "$work/src" -xzf "$src"
    srcdir=$(ls -d "$work"/src/infer-batch-*)
    # An empty cargo home: no registry cache to fall back on.
    (cd "$srcdir" && CARGO_HOME=$here/$work/cargo-home unshare --net \
        cargo build --offline --locked --release) >"$work/src-build.log" 2>&1 ||
        fail "the source bundle's offline build (log: $work/src-build.log)"
    "$srcdir/target/release/infer-batch" --version | grep -q "commit $(git rev-parse --short=12 HEAD)" ||
        fail "the source bundle's build does not name its commit"
    log "source bundle: cargo build --offline --locked --release with no network: $("$srcdir/target/release/infer-batch" --version)"
fi

# --- Measures ---------------------------------------------------------------------------
log "sizes:"
for f in dist/*; do printf '  %-48s %s\n' "$(basename "$f")" "$(du -h --apparent-size "$f" | cut -f1)"; done
printf '  %-48s %s\n' "$name/ (unpacked)" "$(du -sh --apparent-size "$tree" | cut -f1)"
floor=$(./scripts/glibc-floor.sh "$tree")
# The build targets glibc 2.28 (RHEL 8) and links libc++ in: a newer symbol or libstdc++ is a
# regression.
highest=$(printf '%s\n' "${floor%% *}" GLIBC_2.28 | sort -V | tail -n 1)
[ "$highest" = GLIBC_2.28 ] && [ "${floor#* }" = no-libstdc++ ] ||
    fail "glibc floor $floor: above GLIBC_2.28, or libstdc++ needed"
log "glibc floor: $floor"
log "passed in $(((SECONDS - start) / 60)) min $(((SECONDS - start) % 60)) s"
