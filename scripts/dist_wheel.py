#!/usr/bin/env python3
"""Packs the staged release tree (scripts/dist.sh) as a Python wheel that puts `infer-batch` on
the PATH: `pip install --no-index --find-links DIR infer-batch` on a machine with no network.

    scripts/dist_wheel.py TREE OUT_DIR VERSION GLIBC_FLOOR      e.g. ... 2.34
    scripts/dist_wheel.py --cuda-addon TREE OUT_DIR VERSION GLIBC_FLOOR REQUIREMENT...

The second form packs the CUDA add-on (scripts/dist-cuda.sh), `infer-batch-cuda`: TREE's
lib/infer-batch/ alone, into the same package folder as the base wheel's, requiring
infer-batch==VERSION and the REQUIREMENTs (NVIDIA's runtime wheels).

The package keeps the archive's layout, infer_batch/bin/infer-batch beside
infer_batch/lib/infer-batch/, so the binary's $ORIGIN run path and its module search work
unchanged and the libraries keep their own names (ggml finds its modules by name). pip's
`infer-batch` script execs the binary. The platform tag states the glibc the files need
(manylinux_2_MINOR). Byte for byte the same on every run: entries sorted, times from
SOURCE_DATE_EPOCH.
"""

import base64
import hashlib
import os
import pathlib
import sys
import time
import zipfile

LAUNCHER = '''"""Runs the infer-batch binary this package carries, with the same arguments."""

import os
import sys
from pathlib import Path


def main():
    binary = Path(__file__).resolve().parent / "bin" / "infer-batch"
    os.execv(binary, [str(binary), *sys.argv[1:]])


if __name__ == "__main__":
    main()
'''


def main():
    args = sys.argv[1:]
    addon = args[:1] == ["--cuda-addon"]
    if addon:
        args = args[1:]
    if len(args) < 4 or (len(args) > 4 and not addon):
        sys.exit(__doc__)
    tree, out, version, floor = pathlib.Path(args[0]), pathlib.Path(args[1]), args[2], args[3]
    major, minor = floor.split(".")[:2]
    tag = f"py3-none-manylinux_{major}_{minor}_x86_64"
    project = "infer_batch_cuda" if addon else "infer_batch"
    dist_info = f"{project}-{version}.dist-info"
    epoch = max(int(os.environ.get("SOURCE_DATE_EPOCH", "315532800")), 315532800)
    stamp = time.gmtime(epoch)[:6]

    files = {}  # name in the wheel -> (bytes, mode)
    for path in sorted(tree.rglob("*")):
        rel = path.relative_to(tree).as_posix()
        if path.is_file() and (rel.startswith(("bin/", "lib/")) or rel == "examples/rubric.jsonl"):
            files[f"infer_batch/{rel}"] = (path.read_bytes(), path.stat().st_mode & 0o777)
    bundled = sorted(p.relative_to(tree).as_posix() for p in (tree / "licenses").rglob("*") if p.is_file())
    if addon:
        # The base wheel owns the package's Python files; this one only adds llama.cpp's module.
        summary = "The CUDA backend for infer-batch (NVIDIA GPUs, CUDA 13)"
        licence, licences = "MIT", bundled
        requires = [f"infer-batch=={version}", *args[4:]]
    else:
        files["infer_batch/__init__.py"] = (b'"""The infer-batch binary and its libraries."""\n', 0o644)
        files["infer_batch/__main__.py"] = (LAUNCHER.encode(), 0o644)
        files[f"{dist_info}/sboms/sbom.cdx.json"] = ((tree / "sbom.cdx.json").read_bytes(), 0o644)
        summary = "Offline LLM batch inference on GGUF models (the infer-batch binary, Vulkan and CPU)"
        licence = "MIT OR Apache-2.0"
        licences = ["LICENSE-MIT", "LICENSE-APACHE", "THIRD-PARTY-LICENSES.txt", *bundled]
        requires = []
    for rel in licences:
        files[f"{dist_info}/licenses/{rel}"] = ((tree / rel).read_bytes(), 0o644)
    metadata = [
        "Metadata-Version: 2.4",
        f"Name: {project.replace('_', '-')}",
        f"Version: {version}",
        f"Summary: {summary}",
        f"License-Expression: {licence}",
        *(f"License-File: {rel}" for rel in licences),
        *(f"Requires-Dist: {r}" for r in requires),
        "",
    ]
    files[f"{dist_info}/METADATA"] = ("\n".join(metadata).encode(), 0o644)
    files[f"{dist_info}/WHEEL"] = (
        f"Wheel-Version: 1.0\nGenerator: infer-batch dist\nRoot-Is-Purelib: false\nTag: {tag}\n".encode(),
        0o644,
    )
    if not addon:
        files[f"{dist_info}/entry_points.txt"] = (
            b"[console_scripts]\ninfer-batch = infer_batch.__main__:main\n",
            0o644,
        )

    def digest(data):
        return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    record = [f"{name},{digest(data)},{len(data)}" for name, (data, _) in sorted(files.items())]
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = (("\n".join(record) + "\n").encode(), 0o644)

    out.mkdir(parents=True, exist_ok=True)
    wheel = out / f"{project}-{version}-{tag}.whl"
    # dist-info last, as the wheel format recommends; otherwise sorted.
    order = sorted(files, key=lambda n: (n.startswith(dist_info), n.endswith("/RECORD"), n))
    with zipfile.ZipFile(wheel, "w") as z:
        for name in order:
            data, mode = files[name]
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (0o100000 | mode) << 16
            info.create_system = 3
            z.writestr(info, data, compresslevel=9)
    print(wheel)


if __name__ == "__main__":
    main()
