"""The packaged model files for the lent GPU machine, which cannot install them and takes at most 64 MiB per call.

    .venv/bin/python benchmarks/gpu_models.py split           # here: .gpu-models/part1, .gpu-models/part2 (ignored)
    python3 benchmarks/gpu_models.py join                     # there, once both parts were carried in

Each file (the SmolLM2 GGUF, 98 MB; the MiniLM zip, 83 MB) is cut in two halves, the first halves in
.gpu-models/part1 and the second in .gpu-models/part2 with a manifest of every file's sha256. On the device machine
(the tool keeps an ignored path that a later call does not name): one call carries [".gpu-models/part1"] and runs
`true`, the next carries [".gpu-models/part2"] and joins; `join` checks each joined file's sha256 against the
manifest and writes the files to .gpu-models/files, the folder to export as ADAPTDPO_MODEL_FILES.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = os.path.join(ROOT, ".gpu-models")
MODELS = ("smollm2-135m-instruct", "all-minilm-l6-v2")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def split() -> None:
    sys.path.insert(0, ROOT)
    from adaptdpo.model_sources import packaged_file

    manifest = {}
    for part in ("part1", "part2"):
        os.makedirs(os.path.join(FOLDER, part), exist_ok=True)
    for name in MODELS:
        path = packaged_file(name)
        base = os.path.basename(path)
        with open(path, "rb") as fh:
            data = fh.read()
        half = len(data) // 2
        for part, chunk in (("part1", data[:half]), ("part2", data[half:])):
            with open(os.path.join(FOLDER, part, base), "wb") as fh:
                fh.write(chunk)
        manifest[base] = {"model": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    with open(os.path.join(FOLDER, "part2", "manifest.json"), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2)
    for part in ("part1", "part2"):
        size = sum(os.path.getsize(os.path.join(FOLDER, part, f)) for f in os.listdir(os.path.join(FOLDER, part)))
        print(f"{os.path.join(FOLDER, part)}: {size / 2**20:.1f} MiB")


def join() -> None:
    with open(os.path.join(FOLDER, "part2", "manifest.json"), encoding="utf-8") as fh:
        manifest = json.load(fh)
    out = os.path.join(FOLDER, "files")
    os.makedirs(out, exist_ok=True)
    for base, info in manifest.items():
        target = os.path.join(out, base)
        with open(target + ".tmp", "wb") as fh:
            for part in ("part1", "part2"):
                path = os.path.join(FOLDER, part, base)
                if not os.path.isfile(path):
                    sys.exit(f"{path}: missing: carry .gpu-models/{part} first")
                with open(path, "rb") as src:
                    fh.write(src.read())
        digest = sha256(target + ".tmp")
        if digest != info["sha256"]:
            sys.exit(f"{base}: sha256 {digest} after joining, expected {info['sha256']}: carry both parts again")
        os.replace(target + ".tmp", target)
        print(f"{target}: sha256 ok ({info['model']})")
    print(f"export ADAPTDPO_MODEL_FILES={out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("split", "join"))
    {"split": split, "join": join}[parser.parse_args().action]()
