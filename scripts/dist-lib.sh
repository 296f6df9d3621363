# Shell helpers shared by the dist scripts (sourced, not run).

# is_elf FILE: whether FILE starts with the ELF magic.
is_elf() { [ "$(head -c 4 "$1" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; }

# needed ELF: the libraries ELF names as NEEDED, one a line.
needed() { readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }

# runpath ELF: ELF's run path (DT_RUNPATH), empty where it has none.
runpath() { readelf -d "$1" | sed -n 's/.*(RUNPATH).*\[\(.*\)\]/\1/p'; }

# build_libdir BINARY: where llama-cpp-sys-2 put a GPU build's shared libraries, the absolute
# entry of BINARY's run path (build.rs writes it); its modules are in the backends/ beside it.
build_libdir() { runpath "$1" | tr : '\n' | grep '^/' | head -n 1 || true; }

# pack PARENT FOLDER ARCHIVE [GZIP_LEVEL]: PARENT/FOLDER as a .tar.gz that is the same bytes
# on every run: sorted entries, times from SOURCE_DATE_EPOCH, numeric owners, no gzip name or
# time. Level 9 by default.
pack() {
    tar -C "$1" --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
        --mode='u+rwX,go+rX,go-w' --format=gnu -cf - "$2" | gzip "-${4:-9}" -n >"$3"
}

# in_root USER CMD...: CMD in the folder $root as a root file system, with no network, its own
# /proc and /sys, as USER (uid:gid), with an empty environment. Needs root (unshare, chroot).
in_root() {
    local user=$1
    shift
    unshare --net --mount --pid --fork -- sh -c '
        root=$1 user=$2
        shift 2
        mount -t proc proc "$root/proc" && mount -t sysfs sysfs "$root/sys" || exit 1
        exec chroot --userspec="$user" "$root" /usr/bin/env -i HOME=/tmp LC_ALL=C.UTF-8 \
            PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"' sh "$root" "$user" "$@"
}

# wheel_glibc DIR: the glibc version a wheel of DIR's files is tagged with (manylinux_2_N): the
# highest GLIBC_ symbol version they need, raised to 2.35 where they need GCC 12's libstdc++
# (GLIBCXX_3.4.30 comes with glibc 2.35 systems, as auditwheel counts it). Read from the files
# alone: `auditwheel show` also counts what the host's Vulkan loader needs.
wheel_glibc() {
    local floor glibc
    floor=$(scripts/glibc-floor.sh "$1")
    glibc=$(sed -n 's/^GLIBC_\([0-9.]*\) .*/\1/p' <<<"$floor")
    if grep -q 'GLIBCXX_3.4.3[0-9]' <<<"$floor"; then
        glibc=$(printf '%s\n' "$glibc" 2.35 | sort -V | tail -n 1)
    fi
    echo "$glibc"
}
