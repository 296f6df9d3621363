# Shell helpers shared by the dist scripts (sourced, not run).

# is_elf FILE: whether FILE starts with the ELF magic.
is_elf() { [ "$(head -c 4 "$1" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; }

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
