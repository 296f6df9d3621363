#!/usr/bin/env bash
# An OCI image archive of the release, with no registry pull (`make dist-oci`, as root): the
# minimal Debian 12 root of scripts/dist-root.sh plus the archive from `make dist` unpacked in
# /opt/infer-batch, assembled with umoci, written to dist/infer-batch-VERSION-oci.tar
# (`podman load -i`, or `skopeo copy oci-archive:...` into any registry or store).
#
# Then it proves the image where podman runs: loaded, and the example batch run inside it with
# --network none, results equal to the archive's own (scripts/dist_compare.py). The image runs
# as nobody, its entry point the binary: podman run -v DATA:/data IMAGE --model /data/M.gguf ...
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "error: dist-oci needs root" >&2; exit 1; }
need=()
command -v umoci >/dev/null 2>&1 || need+=(umoci)
command -v podman >/dev/null 2>&1 || need+=(podman)
# podman's default runtime (crun) refuses this project's VMs' hybrid cgroups; runc runs there.
command -v runc >/dev/null 2>&1 || need+=(runc)
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
name=infer-batch-$version-linux-x86_64
archive=dist/$name.tar.gz
[ -e "$archive" ] || { echo "error: no $archive: run make dist" >&2; exit 1; }
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -e "$model" ] || ./models/fetch.sh smollm2
root=$(./scripts/dist-root.sh)

work=target/dist-oci
rm -rf "$work"
mkdir -p "$work"
layout=$work/layout
tag=infer-batch:$version
umoci init --layout "$layout"
umoci new --image "$layout:$tag"
umoci unpack --image "$layout:$tag" "$work/bundle" >/dev/null
cp -a "$root"/. "$work/bundle/rootfs/"
tar -C "$work/bundle/rootfs/opt" -xzf "$archive"
mv "$work/bundle/rootfs/opt/$name" "$work/bundle/rootfs/opt/infer-batch"
umoci repack --image "$layout:$tag" "$work/bundle"
umoci config --image "$layout:$tag" --author infer-batch \
    --config.entrypoint /opt/infer-batch/bin/infer-batch --config.user 65534:65534 \
    --config.workingdir /tmp --config.env HOME=/tmp \
    --config.label "org.opencontainers.image.version=$version" \
    --config.label "org.opencontainers.image.revision=$(git rev-parse HEAD)" \
    --config.label "org.opencontainers.image.licenses=MIT OR Apache-2.0"
umoci gc --layout "$layout"
image=dist/infer-batch-$version-oci.tar
tar -C "$layout" --sort=name -cf "$image" .
echo "wrote $image ($(du -h "$image" | cut -f1))"

# The proof: load it, run the example with no network, compare with the archive's results.
id=$(podman load -q -i "$image" | sed -n 's/^Loaded image[^:]*: *//p' | head -n 1)
[ -n "$id" ] || { echo "error: podman load named no image" >&2; exit 1; }
mkdir -p "$work/data"
cp "$model" examples/rubric.jsonl "$work/data/"
chmod 0777 "$work/data"
# The limits podman asks for by default exceed what this VM lets a container raise.
podman run --rm --runtime runc --network none --ulimit nofile=1024:1024 --ulimit nproc=1000:1000 \
    -v "$(pwd)/$work/data:/data" "$id" --model "/data/$(basename "$model")" /data/rubric.jsonl \
    -o /data/oci.results.jsonl --prefix-cache-dir /tmp/cache 2>"$work/run.log" ||
    { cat "$work/run.log" >&2; exit 1; }
tar -C "$work" -xzf "$archive"
"$work/$name/bin/infer-batch" --model "$model" examples/rubric.jsonl -o "$work/archive.results.jsonl" \
    --prefix-cache-dir "$work/cache" 2>"$work/archive.log"
python3 scripts/dist_compare.py "$work/archive.results.jsonl" "$work/data/oci.results.jsonl"
echo "dist-oci: $id ran the example with --network none: $(grep -o 'CPU backend: variant [a-z0-9_]*' "$work/run.log")"
