"""The package's file writes and JSON-lines reads, in one place: every write is atomic (a temporary file in the same
folder, fsynced, then renamed over the target), so a kill at any moment leaves the old file or the new one, never
half of one; every JSON-lines read names the file and line of a bad record. The lowest layer: it imports nothing of
adaptdpo."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any

import torch


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


def write_jsonl_atomic(path: str, rows: list[dict[str, Any]]) -> None:
    """``rows`` as JSON lines, atomically."""
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: str, *, missing_ok: bool = False, error: type[Exception] = ValueError,
               missing_hint: str = "") -> list[dict[str, Any]]:
    """Every record of a JSON-lines file (blank lines skipped). A missing file is ``[]`` with ``missing_ok``, else
    ``error`` naming it (and ``missing_hint``); a line that is not JSON is ``error`` naming the file and line."""
    if not os.path.isfile(path):
        if missing_ok:
            return []
        raise error(f"{path}: missing{missing_hint}")
    rows = []
    with open(path, encoding="utf-8", errors="strict") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise error(f"{path}: line {line_no}: invalid JSON ({e.msg})") from None
    return rows
