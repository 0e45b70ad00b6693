"""The wheels the lent GPU machine lacks, pinned in wheels.json beside this file, and the size of what a call carries.

    .venv/bin/python benchmarks/gpu/wheels.py download   # .whl/: every pinned wheel, checked (make -f ... gpu-wheels)
    .venv/bin/python benchmarks/gpu/wheels.py check      # .whl/ holds exactly the pinned files, bytes and sha256
    .venv/bin/python benchmarks/gpu/wheels.py size       # what `gpu_suite.sh first` carries: the tree and .whl/

The device tool sends the working tree (tracked files and untracked ones git does not ignore) and the carried paths,
64 MiB a call in all. ``size`` adds the tree, as ``git ls-files`` lists it, and the wheels: the files in .whl/ when
it holds exactly the pinned set, else the bytes the manifest records (so the size is known without a download).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MANIFEST = os.path.join(HERE, "wheels.json")
WHEELS = os.path.join(ROOT, ".whl")
LIMIT = 64 * 2**20  # the device tool's limit on what one call carries
#: what `git ls-files` cannot tell apart from the tree when there is no git: never carried
IGNORED = {".git", ".venv", "runs", ".whl", ".whl-deepspeed", ".gpu-models", "__pycache__", ".pytest_cache",
           ".ruff_cache", "build", "dist"}


def manifest() -> dict:
    with open(MANIFEST, encoding="utf-8") as fh:
        return json.load(fh)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def problems(folder: str = WHEELS) -> list[str]:
    """What keeps ``folder`` from holding exactly the pinned wheels (empty: it does)."""
    wheels = manifest()["wheels"]
    present = sorted(f for f in os.listdir(folder) if f.endswith(".whl")) if os.path.isdir(folder) else []
    found = []
    for wheel in wheels:
        path = os.path.join(folder, wheel["file"])
        if not os.path.isfile(path):
            found.append(f"{wheel['file']}: missing")
        elif os.path.getsize(path) != wheel["bytes"]:
            found.append(f"{wheel['file']}: {os.path.getsize(path)} bytes, the manifest says {wheel['bytes']}")
        elif sha256(path) != wheel["sha256"]:
            found.append(f"{wheel['file']}: sha256 differs from the manifest's")
    pinned = {w["file"] for w in wheels}
    found += [f"{f}: not in the manifest (two versions of a package stop the install there)" for f in present
              if f not in pinned]
    return found


def download(folder: str = WHEELS) -> None:
    """pip download every pinned wheel for the GPU machine's Python and platform, then check them."""
    m = manifest()
    platforms = [arg for p in m["platforms"] for arg in ("--platform", p)]
    pins = [f"{w['name']}=={w['version']}" for w in m["wheels"]]
    subprocess.check_call([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                           "--python-version", m["python"], "--implementation", "cp", *platforms, "-d", folder, *pins])
    found = problems(folder)
    if found:
        sys.exit("the downloaded wheels differ from benchmarks/gpu/wheels.json:\n  " + "\n  ".join(found))
    print(f"{folder}: {len(pins)} wheels, {sum(w['bytes'] for w in m['wheels']) / 2**20:.1f} MiB, as pinned")


def tree_files(root: str = ROOT) -> list[str]:
    """The files the device tool sends from ``root``: tracked, and untracked but not ignored."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True).stdout
        return [os.path.join(root, p) for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):  # no git: the tree minus what the project ignores
        files = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if d not in IGNORED and not d.endswith(".egg-info")]
            files += [os.path.join(folder, n) for n in names]
        return files


def carry_size(root: str = ROOT, folder: str = WHEELS) -> dict:
    """Bytes that `gpu_suite.sh first` carries: the tree, the wheels (measured, or from the manifest)."""
    tree = sum(os.lstat(p).st_size for p in tree_files(root) if os.path.lexists(p))
    pinned = sum(w["bytes"] for w in manifest()["wheels"])
    measured = not problems(folder)
    wheels = sum(os.path.getsize(os.path.join(folder, w["file"])) for w in manifest()["wheels"]) if measured \
        else pinned
    return {"tree": tree, "wheels": wheels, "wheels_from": "files in .whl/" if measured else "the manifest",
            "total": tree + wheels, "limit": LIMIT}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("download", "check", "size"))
    ns = parser.parse_args(argv)
    if ns.action == "download":
        download()
    elif ns.action == "check":
        found = problems()
        print("\n".join(found) if found else f"{WHEELS}: exactly the pinned wheels")
        return 1 if found else 0
    else:
        size = carry_size()
        print(f"the tree {size['tree'] / 2**20:.1f} MiB + the wheels {size['wheels'] / 2**20:.1f} MiB "
              f"({size['wheels_from']}) = {size['total'] / 2**20:.1f} MiB of the {LIMIT / 2**20:.0f} MiB a call "
              "carries")
        return 0 if size["total"] <= LIMIT else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
