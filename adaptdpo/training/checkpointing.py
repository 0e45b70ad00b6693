"""Crash-safe checkpoints: atomic file writes, a completion marker per checkpoint folder, verification.

transformers writes a checkpoint folder file by file; a run killed halfway leaves a partial folder that
a plain ``resume_from_checkpoint=True`` would pick. We write a ``adaptdpo_complete`` marker (atomically)
after every file of the checkpoint is on disk, on every rank, and resume only from folders that have it.

A complete folder can still be damaged later (a disk error, a truncated copy): :func:`verify_checkpoint`
reads every file's structure (safetensors headers and sizes, JSON, the zip archives torch saves, with
their CRCs) and :func:`usable_checkpoint` falls back to the newest checkpoint that passes, setting the
damaged ones aside as ``checkpoint-N.corrupt`` (nothing is deleted).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from typing import Any

import torch

CHECKPOINT_STATE_FILE = "adaptdpo_state.pt"
COMPLETE_MARKER = "adaptdpo_complete"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str, write: Any) -> None:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        # mkstemp creates 0600 files; results are shared like any tool's output (0644 under umask 022)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str) -> None:
    _atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(path: str, text: str) -> None:
    _atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def mark_checkpoint_complete(folder: str) -> None:
    atomic_write_text(os.path.join(folder, COMPLETE_MARKER), "complete\n")


def checkpoint_folders(run_dir: str) -> list[tuple[int, str, bool]]:
    """(step, path, complete) for every checkpoint-N folder of ``run_dir``, by step."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        match = _CHECKPOINT_RE.match(name)
        path = os.path.join(run_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path, os.path.exists(os.path.join(path, COMPLETE_MARKER))))
    return sorted(found)


def last_complete_checkpoint(run_dir: str) -> str | None:
    complete = [path for _, path, ok in checkpoint_folders(run_dir) if ok]
    return complete[-1] if complete else None


def remove_incomplete_checkpoints(run_dir: str) -> list[str]:
    """Delete checkpoint folders that were never marked complete (a run killed while saving)."""
    removed = []
    for _, path, ok in checkpoint_folders(run_dir):
        if not ok:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _check_safetensors(path: str) -> str | None:
    import struct

    size = os.path.getsize(path)
    if size < 8:
        return f"{size} bytes: shorter than a safetensors header"
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if 8 + header_len > size:
            return f"header of {header_len} bytes runs past the end of the file ({size} bytes)"
        try:
            header = json.loads(fh.read(header_len))
        except ValueError as e:
            return f"unreadable header: {e}"
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        return f"truncated: the tensors need {8 + header_len + end} bytes, the file has {size}"
    return None


def _check_torch_zip(path: str) -> str | None:
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"not a complete torch archive ({e})"
    return f"corrupt member {bad}" if bad else None


def _check_json(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:
        return f"invalid JSON ({e})"
    return None


def verify_checkpoint(folder: str) -> list[str]:
    """Problems found in a checkpoint folder, one ``"<file>: <problem>"`` per damaged file ([] if sound).

    Every file transformers and adaptdpo write is read for structure: safetensors (header and data
    extent), JSON, and torch's zip archives (``.pt``/``.pth``/``.bin``, CRC-checked).
    """
    problems = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".safetensors"):
            problem = _check_safetensors(path)
        elif name.endswith(".json"):
            problem = _check_json(path)
        elif name.endswith((".pt", ".pth", ".bin")):
            problem = _check_torch_zip(path)
        else:
            continue
        if problem:
            problems.append(f"{path}: {problem}")
    if not os.path.exists(os.path.join(folder, "trainer_state.json")):
        problems.append(f"{os.path.join(folder, 'trainer_state.json')}: missing")
    return problems


def usable_checkpoint(run_dir: str, log: Any = None) -> str | None:
    """The newest complete checkpoint of ``run_dir`` whose files verify; damaged ones are renamed
    ``checkpoint-N.corrupt`` (kept for inspection) and reported through ``log(message)``."""
    for _, path, ok in reversed(checkpoint_folders(run_dir)):
        if not ok:
            continue
        problems = verify_checkpoint(path)
        if not problems:
            return path
        aside = f"{path}.corrupt"
        suffix = 1
        while os.path.exists(aside):
            suffix += 1
            aside = f"{path}.corrupt{suffix}"
        os.replace(path, aside)
        if log is not None:
            log(f"checkpoint {path} is damaged and was moved to {aside}: " + "; ".join(problems)
                + ". Falling back to the previous complete checkpoint.")
    return None
