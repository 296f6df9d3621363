#!/usr/bin/env python3
"""Writes the release's third-party licence file and its SBOM, both from Cargo.lock and
`cargo metadata`, byte for byte the same on every run from the same sources.

    scripts/dist_meta.py licenses OUT_FILE        every crate the binary links: name, version,
                                                  licence, and the licence texts it ships
    scripts/dist_meta.py sbom OUT_FILE            CycloneDX 1.5 JSON: every crate of Cargo.lock
                                                  and the llama.cpp sources
    scripts/dist_meta.py prune-vendor DIR         in `cargo vendor` output, empties the crates
                                                  no Linux x86-64 build uses (Windows, wasm)

Environment: FEATURES (default "vulkan", the build shipped), SOURCE_DATE_EPOCH (the SBOM's
timestamp), INFER_BATCH_GIT_COMMIT (the commit named in the SBOM).
"""

import datetime
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tomllib
import uuid

ROOT = pathlib.Path(__file__).resolve().parent.parent
TARGET = "x86_64-unknown-linux-gnu"
LICENSE_FILE = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE|UNLICENSE|COPYRIGHT)", re.IGNORECASE)


def metadata(*args):
    """`cargo metadata` as a dict, with the lock file as it is."""
    out = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked", *args],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)


def linked_packages():
    """The packages the shipped binary is built from: the root and every crate reachable
    through normal (not build or dev) dependencies, for the shipped features on Linux x86-64.
    Procedural macros are in: their output is part of the binary."""
    meta = metadata("--features", os.environ.get("FEATURES", "vulkan"), "--filter-platform", TARGET)
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = meta["resolve"]["root"]
    seen, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        for dep in nodes[pid]["deps"]:
            if any(k["kind"] is None for k in dep["dep_kinds"]):
                todo.append(dep["pkg"])
    packages = {p["id"]: p for p in meta["packages"]}
    return sorted((packages[i] for i in seen if i != root), key=lambda p: (p["name"], p["version"]))


def licence_texts(package):
    """The licence files a crate ships in its own folder: (file name, text) pairs."""
    folder = pathlib.Path(package["manifest_path"]).parent
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and LICENSE_FILE.match(p.name))
    if package.get("license_file"):
        extra = (folder / package["license_file"]).resolve()
        if extra.is_file() and extra.parent == folder and extra.name not in names:
            names.append(extra.name)
    return [(n, (folder / n).read_text(encoding="utf-8", errors="replace")) for n in names]


def write_licenses(out):
    """One entry per linked crate; each distinct licence text printed once, after the list,
    with the crates that ship it."""
    packages = linked_packages()
    texts = {}  # sha256 of text -> (text, [crate names])
    lines = [
        "Third-party software in infer-batch",
        "",
        "The infer-batch binary links the Rust crates below (every crate reachable through",
        "normal dependencies, procedural macros included, for Linux x86-64 with the features",
        f"\"{os.environ.get('FEATURES', 'vulkan')}\"). llama.cpp's own licence is in",
        "licenses/llama.cpp/. Each licence text the crates ship follows the list, once, with",
        "the crates that ship it.",
        "",
        f"{'crate':<32} {'version':<16} licence",
        f"{'-' * 32} {'-' * 16} {'-' * 28}",
    ]
    missing = []
    for p in packages:
        lic = p.get("license") or "(see its licence file)"
        lines.append(f"{p['name']:<32} {p['version']:<16} {lic}")
        shipped = licence_texts(p)
        if not shipped:
            missing.append(f"{p['name']} {p['version']}")
        for name, text in shipped:
            key = hashlib.sha256(text.encode()).hexdigest()
            texts.setdefault(key, (text, []))[1].append(f"{p['name']} {p['version']} ({name})")
    lines += ["", f"{len(packages)} crates."]
    if missing:
        lines += [
            "",
            "These crates ship no licence file; their licence is the SPDX expression above:",
            *(f"  {m}" for m in missing),
        ]
    for key in sorted(texts, key=lambda k: texts[k][1][0]):
        text, owners = texts[key]
        lines += ["", "=" * 78, "Shipped by:", *(f"  {o}" for o in owners), "-" * 78, text.rstrip()]
    pathlib.Path(out).write_text("\n".join(lines) + "\n", encoding="utf-8")


def llama_cpp_sources(lock, everything):
    """The llama.cpp sources that llama-cpp-sys-2 vendors: its lock entry and ggml's version."""
    sys_pkg = next(p for p in lock["package"] if p["name"] == "llama-cpp-sys-2")
    folder = pathlib.Path(everything[("llama-cpp-sys-2", sys_pkg["version"])]["manifest_path"]).parent
    cmake = (folder / "llama.cpp/ggml/CMakeLists.txt").read_text(errors="replace")
    parts = [re.search(rf"set\(GGML_VERSION_{k} (\d+)\)", cmake) for k in ("MAJOR", "MINOR", "PATCH")]
    ggml = ".".join(m.group(1) for m in parts) if all(parts) else "unknown"
    return sys_pkg, ggml


def write_sbom(out):
    """CycloneDX 1.5: the application, every crate of Cargo.lock (the ones the binary links
    scoped "required", the rest, build tools and other platforms' crates, "excluded"), and the
    llama.cpp sources, with the dependency graph of Cargo.lock."""
    lock = tomllib.loads((ROOT / "Cargo.lock").read_text())
    everything = {(p["name"], p["version"]): p for p in metadata("--all-features")["packages"]}
    linked = {(p["name"], p["version"]) for p in linked_packages()}
    root_pkg = next(p for p in lock["package"] if "source" not in p)
    commit = os.environ.get("INFER_BATCH_GIT_COMMIT", "unknown")
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    by_name = {}
    for p in lock["package"]:
        by_name.setdefault(p["name"], []).append(p["version"])

    def ref(name, version):
        return f"pkg:cargo/{name}@{version}"

    def dep_ref(spec):
        # Cargo.lock names a dependency "name" or, where two versions are locked, "name version".
        name, _, version = spec.partition(" ")
        return ref(name, version or by_name[name][0])

    components = []
    for p in sorted(lock["package"], key=lambda p: (p["name"], p["version"])):
        if p is root_pkg:
            continue
        c = {
            "type": "library",
            "bom-ref": ref(p["name"], p["version"]),
            "name": p["name"],
            "version": p["version"],
            "purl": ref(p["name"], p["version"]),
            "scope": "required" if (p["name"], p["version"]) in linked else "excluded",
        }
        lic = everything.get((p["name"], p["version"]), {}).get("license")
        if lic:
            c["licenses"] = [{"expression": lic}]
        if p.get("checksum"):
            c["hashes"] = [{"alg": "SHA-256", "content": p["checksum"]}]
        components.append(c)
    sys_pkg, ggml = llama_cpp_sources(lock, everything)
    llama_ref = "llama.cpp"
    components.append({
        "type": "library",
        "bom-ref": llama_ref,
        "name": "llama.cpp",
        "version": f"ggml {ggml}",
        "description": f"the llama.cpp and ggml sources vendored in llama-cpp-sys-2 {sys_pkg['version']}, "
        "built into libllama, libggml and the backend modules",
        "scope": "required",
        "licenses": [{"license": {"id": "MIT"}}],
        "hashes": [{"alg": "SHA-256", "content": sys_pkg["checksum"]}],
        "externalReferences": [{"type": "vcs", "url": "https://github.com/ggml-org/llama.cpp"}],
    })
    app_ref = ref(root_pkg["name"], root_pkg["version"])
    dependencies = [
        {"ref": app_ref if p is root_pkg else ref(p["name"], p["version"]),
         "dependsOn": sorted({dep_ref(d) for d in p.get("dependencies", [])})}
        for p in sorted(lock["package"], key=lambda p: (p["name"], p["version"]))
    ]
    for d in dependencies:
        if d["ref"] == ref("llama-cpp-sys-2", sys_pkg["version"]):
            d["dependsOn"].append(llama_ref)
    dependencies.append({"ref": llama_ref, "dependsOn": []})
    seed = f"infer-batch {root_pkg['version']} {commit} {hashlib.sha256((ROOT / 'Cargo.lock').read_bytes()).hexdigest()}"
    bom = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, seed)}",
        "version": 1,
        "metadata": {
            "timestamp": datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "component": {
                "type": "application",
                "bom-ref": app_ref,
                "name": root_pkg["name"],
                "version": root_pkg["version"],
                "purl": app_ref,
                "licenses": [{"expression": "MIT OR Apache-2.0"}],
                "properties": [{"name": "git-commit", "value": commit}],
            },
        },
        "components": components,
        "dependencies": dependencies,
    }
    pathlib.Path(out).write_text(json.dumps(bom, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def prune_vendor(folder):
    """Empties, in a `cargo vendor` folder, every crate that no build, test or bench for Linux
    x86-64 with any features compiles: the Windows and wasm crates, most of the bytes. Each keeps
    its Cargo.toml, which cargo reads to check the lock file, an empty src/lib.rs, and a checksum
    file that lists no files, as cargo-vendor-filterer leaves them."""
    meta = metadata("--all-features", "--filter-platform", TARGET)
    used = {(p["name"], p["version"]) for p in meta["packages"]}
    emptied = 0
    for crate in sorted(pathlib.Path(folder).iterdir()):
        manifest = tomllib.loads((crate / "Cargo.toml").read_text())["package"]
        if (manifest["name"], manifest["version"]) in used:
            continue
        checksum = json.loads((crate / ".cargo-checksum.json").read_text())
        for path in sorted(crate.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.name in ("Cargo.toml", ".cargo-checksum.json") and path.parent == crate:
                continue
            path.unlink() if path.is_file() or path.is_symlink() else path.rmdir()
        (crate / "src").mkdir()
        (crate / "src/lib.rs").write_text("")
        (crate / ".cargo-checksum.json").write_text(json.dumps({"files": {}, "package": checksum.get("package")}))
        emptied += 1
    print(f"emptied {emptied} crates that no Linux x86-64 build compiles", file=sys.stderr)


def main():
    commands = {"licenses": write_licenses, "sbom": write_sbom, "prune-vendor": prune_vendor}
    if len(sys.argv) != 3 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    commands[sys.argv[1]](sys.argv[2])


if __name__ == "__main__":
    main()
