"""Crash-safe checkpoints: atomic file writes and a completion marker per checkpoint folder.

transformers writes a checkpoint folder file by file; a run killed halfway leaves a partial folder that
a plain ``resume_from_checkpoint=True`` would pick. We write a ``adaptdpo_complete`` marker (atomically)
after every file of the checkpoint is on disk, on every rank, and resume only from folders that have it.
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


def _atomic_write(path: str, write: Any) -> None:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
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
