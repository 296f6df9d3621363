#!/usr/bin/env python3
"""Lists the GPU architectures a CUDA library or object carries code for, read from its
fat binaries (the .nv_fatbin section), since NVIDIA's wheels ship no cuobjdump.

    scripts/cuda_archs.py FILE      prints e.g. "sm_80 sm_89 sm_90 sm_120" (machine code)
                                    and "ptx:compute_90" for PTX, each once, sorted

A fat binary is a 16-byte header (magic 0xBA55ED50, version, header size, size of what
follows) and entries, each with a header holding its kind (1 PTX, 2 machine code), its own
header size, its payload size and the architecture's number at byte 28.
"""

import struct
import subprocess
import sys
import tempfile

MAGIC = 0xBA55ED50


def fatbin_section(path):
    with tempfile.NamedTemporaryFile() as out:
        subprocess.run(
            ["objcopy", "-O", "binary", "--only-section=.nv_fatbin", path, out.name],
            check=True, capture_output=True,
        )
        return open(out.name, "rb").read()


def archs(data):
    found = set()
    at = 0
    while at + 16 <= len(data):
        magic, _version, header_size, size = struct.unpack_from("<IHHQ", data, at)
        if magic != MAGIC:
            at += 8  # fat binaries sit 8-byte aligned one after another
            continue
        entry, end = at + header_size, at + header_size + size
        while entry + 32 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            found.add({1: f"ptx:compute_{arch}", 2: f"sm_{arch}"}.get(kind, f"kind{kind}:{arch}"))
            if entry_header == 0:
                break
            entry += entry_header + payload
        at = max(end + 7 & ~7, at + 16)  # the next one starts 8-byte aligned
    return found


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    found = archs(fatbin_section(sys.argv[1]))
    if not found:
        sys.exit(f"{sys.argv[1]}: no CUDA fat binary")
    print(" ".join(sorted(found, key=lambda a: (not a.startswith("sm_"), int(a.rsplit("_", 1)[-1].rsplit(":", 1)[-1])))))


if __name__ == "__main__":
    main()
