#!/usr/bin/env bash
# The oldest C and C++ runtimes a folder of binaries runs on: the highest GLIBC_ and GLIBCXX_
# symbol versions that any ELF file under it needs (objdump -T).
#
#   scripts/glibc-floor.sh DIR      prints e.g. "GLIBC_2.34 GLIBCXX_3.4.30"
set -euo pipefail
. "$(dirname "$0")/dist-lib.sh"
dir=${1:?usage: glibc-floor.sh DIR}
floor() { sort -u | sort -V | tail -n 1; }
syms=$(find "$dir" -type f -print0 | while IFS= read -r -d '' f; do
    is_elf "$f" || continue
    objdump -T "$f" | grep -o 'GLIBC\(XX\)\?_[0-9][0-9.]*' || true
done)
glibc=$(grep '^GLIBC_' <<<"$syms" | floor)
glibcxx=$(grep '^GLIBCXX_' <<<"$syms" | floor || true)
echo "$glibc ${glibcxx:-no-libstdc++}"
