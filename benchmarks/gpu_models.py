"""The packaged model files for the lent GPU machine, which cannot install them and takes at most 64 MiB per call.

    .venv/bin/python benchmarks/gpu_models.py split           # here: .gpu-models/part1 … partN (ignored)
    python3 benchmarks/gpu_models.py join                     # there, once every part was carried in

The files (the SmolLM2 GGUF, 98 MB; the MiniLM zip, 83 MB) are read as one stream of bytes and cut into parts of at
most --part_mib MiB (default 44: four parts, each with the source tree well under a call's 64 MiB). Every part holds
its slice (data.bin) and the manifest: each file's offset, size and sha256 in the stream, and the number of parts.
On the device machine (the tool keeps an ignored path that a later call does not name) one call carries
[".gpu-models/part1"] and runs `true`, the next [".gpu-models/part2"], and so on; `join` checks that every part is
there and complete, rebuilds each file, checks its sha256 against the manifest and writes the files to
.gpu-models/files, the folder to export as ADAPTDPO_MODEL_FILES.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from typing import BinaryIO

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = os.path.join(ROOT, ".gpu-models")
MODELS = ("smollm2-135m-instruct", "all-minilm-l6-v2")
MANIFEST = "manifest.json"
BLOCK = 1 << 22


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def blocks(paths: list[str]) -> Iterator[bytes]:
    """The bytes of ``paths`` one after the other, in blocks."""
    for path in paths:
        with open(path, "rb") as fh:
            while block := fh.read(BLOCK):
                yield block


def copy_exact(source: Iterator[bytes], pending: bytes, out: BinaryIO, count: int) -> bytes:
    """Write the next ``count`` bytes of ``pending`` + ``source`` to ``out``; returns what is left of the block."""
    while count:
        if not pending:
            pending = next(source)
        take = pending[:count]
        out.write(take)
        pending, count = pending[len(take):], count - len(take)
    return pending


def split(part_mib: float) -> None:
    sys.path.insert(0, ROOT)
    from adaptdpo.models.sources import packaged_file

    paths = [packaged_file(name) for name in MODELS]
    files, offset = {}, 0
    for name, path in zip(MODELS, paths):
        size = os.path.getsize(path)
        files[os.path.basename(path)] = {"model": name, "offset": offset, "bytes": size, "sha256": sha256(path)}
        offset += size
    part_bytes = int(part_mib * 2**20)
    parts = -(-offset // part_bytes)
    shutil.rmtree(FOLDER, ignore_errors=True)
    manifest = {"parts": parts, "part_bytes": part_bytes, "total_bytes": offset, "files": files}
    stream, pending = blocks(paths), b""
    for index in range(1, parts + 1):
        folder = os.path.join(FOLDER, f"part{index}")
        os.makedirs(folder)
        want = min(part_bytes, offset - (index - 1) * part_bytes)
        with open(os.path.join(folder, "data.bin"), "wb") as out:
            pending = copy_exact(stream, pending, out, want)
        with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as fh:
            json.dump({**manifest, "part": index}, fh, indent=2)
        print(f"{folder}: {want / 2**20:.1f} MiB")
    print(f"carry .gpu-models/part1 … part{parts}, one a call (each call's command: true), then join")


def join() -> None:
    carried = sorted((p for p in os.listdir(FOLDER) if p.startswith("part")) if os.path.isdir(FOLDER) else [])
    if not carried:
        sys.exit(f"{FOLDER}: no part carried in yet: carry .gpu-models/part1 first")
    with open(os.path.join(FOLDER, carried[0], MANIFEST), encoding="utf-8") as fh:  # every part has the manifest
        manifest = json.load(fh)
    part_paths = []
    for index in range(1, manifest["parts"] + 1):
        path = os.path.join(FOLDER, f"part{index}", "data.bin")
        want = min(manifest["part_bytes"], manifest["total_bytes"] - (index - 1) * manifest["part_bytes"])
        if not os.path.isfile(path):
            sys.exit(f"{path}: missing: carry .gpu-models/part{index} (part {index} of {manifest['parts']})")
        if os.path.getsize(path) != want:
            sys.exit(f"{path}: {os.path.getsize(path)} bytes, expected {want}: carry .gpu-models/part{index} again")
        part_paths.append(path)
    out = os.path.join(FOLDER, "files")
    os.makedirs(out, exist_ok=True)
    stream, pending = blocks(part_paths), b""
    for base, info in sorted(manifest["files"].items(), key=lambda item: item[1]["offset"]):
        target = os.path.join(out, base)
        with open(target + ".tmp", "wb") as fh:
            pending = copy_exact(stream, pending, fh, info["bytes"])
        digest = sha256(target + ".tmp")
        if digest != info["sha256"]:
            sys.exit(f"{base}: sha256 {digest} after joining, expected {info['sha256']}: carry the parts again")
        os.replace(target + ".tmp", target)
        print(f"{target}: sha256 ok ({info['model']})")
    print(f"export ADAPTDPO_MODEL_FILES={out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("split", "join"))
    parser.add_argument("--part_mib", type=float, default=44.0, help="the most MiB in one part (split)")
    ns = parser.parse_args()
    split(ns.part_mib) if ns.action == "split" else join()
