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
from typing import Any

import torch

# the atomic writes live in adaptdpo.files (one place for the package); re-exported for the checkpoint code's callers
from adaptdpo.files import atomic_torch_save, atomic_write_json, atomic_write_text

__all__ = ["atomic_torch_save", "atomic_write_json", "atomic_write_text"]

CHECKPOINT_STATE_FILE = "adaptdpo_state.pt"
COMPLETE_MARKER = "adaptdpo_complete"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


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


# --------------------------------------------------------------------------------------------- a full disk

#: a write that failed for want of space (errno 28, as Python and safetensors say it), and one cut short as torch's zip
#: writer reports it when given a path (it says only where the stream stopped)
_NO_SPACE = ("no space left on device", "os error 28")
_CUT_SHORT = ("unexpected pos", "file write failed")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, most often); the message says where and how much it needs."""


def free_bytes(path: str) -> int:
    """Free bytes on the file system holding ``path`` (its nearest existing folder)."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free


def folder_bytes(folder: str) -> int:
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(dirpath, name))
    return total


def state_bytes(*objects: Any) -> int:
    """Bytes of the tensors a checkpoint of these holds (a module's state dict, an optimizer's state)."""
    total = 0
    for obj in objects:
        if obj is None:
            continue
        if isinstance(obj, torch.nn.Module):
            tensors = list(obj.state_dict().values())
        else:  # an optimizer
            tensors = [v for state in obj.state.values() for v in state.values()]
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def describe_write_failure(error: BaseException, folder: str, needed: int, last_complete: str | None) -> str | None:
    """A message for a checkpoint write that failed because the disk is full (None when it is not that): where, how
    much the checkpoint needs (``needed`` bytes) against how much is free, and what the run can resume from."""
    text = str(error).lower()
    no_space = getattr(error, "errno", None) == 28 or any(mark in text for mark in _NO_SPACE)
    if not no_space and not any(mark in text for mark in _CUT_SHORT):
        return None
    free = free_bytes(folder)
    where = os.path.dirname(os.path.abspath(folder))
    if no_space or free < needed:
        cause = f"the disk holding {where} is full ({_mb(free)} free; the checkpoint needs about {_mb(needed)})"
    else:
        cause = (f"a write was cut short although the disk holding {where} has {_mb(free)} free (the checkpoint needs "
                 f"about {_mb(needed)}): a disk quota or a file-size limit (ulimit -f) is the usual cause")
    resume = (f"the run resumes from {last_complete} (the last complete checkpoint) with the same command"
              if last_complete else "no complete checkpoint was written yet, so the run would start again")
    return (f"writing checkpoint {folder} failed: {cause}. The partial folder is ignored on resume; {resume}. Free "
            f"space there, lower save_total_limit, or set --output_dir on a larger disk (the error was: "
            f"{str(error).strip()[:200]})")


# ------------------------------------------------------------------------------------ another model's checkpoint

#: model config fields that do not shape the weights (left out when naming what differs)
_CONFIG_NOISE = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "use_cache",
                 "_attn_implementation", "attn_implementation", "_attn_implementation_autoset", "output_attentions",
                 "output_hidden_states", "return_dict", "pad_token_id", "bos_token_id", "eos_token_id",
                 "id2label", "label2id", "tokenizer_class", "torch_compile", "problem_type"}


def _safetensors_shapes(path: str) -> dict[str, list[int]]:
    import struct

    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def saved_shapes(folder: str) -> tuple[dict[str, list[int]], bool] | None:
    """{tensor name: shape} of the weights a checkpoint holds (read from the safetensors headers, nothing loaded) and
    whether they are a PEFT adapter's; None when it holds no safetensors weights."""
    import glob

    if os.path.isfile(os.path.join(folder, "adapter_model.safetensors")):
        return _safetensors_shapes(os.path.join(folder, "adapter_model.safetensors")), True
    files = glob.glob(os.path.join(glob.escape(folder), "model*.safetensors"))
    if not files:
        return None
    shapes: dict[str, list[int]] = {}
    for path in sorted(files):
        shapes.update(_safetensors_shapes(path))
    return shapes, False


def _config_differences(folder: str, model: Any) -> list[str]:
    path = os.path.join(folder, "config.json")
    base = getattr(model, "get_base_model", lambda: model)()
    config = getattr(base, "config", None)
    if not os.path.isfile(path) or config is None:
        return []
    with open(path, encoding="utf-8") as fh:
        saved = json.load(fh)
    if saved.get("model_type") == getattr(config, "model_type", None):  # both with the class's defaults filled in
        with contextlib.suppress(Exception):
            saved = type(config).from_dict(saved).to_dict()
    wanted = config.to_dict()
    keys = sorted((set(saved) | set(wanted)) - _CONFIG_NOISE)
    return [f"{k}: {saved.get(k)!r} in the checkpoint, {wanted.get(k)!r} asked for" for k in keys
            if saved.get(k) != wanted.get(k) and not isinstance(saved.get(k, wanted.get(k)), dict)]


def model_mismatch(folder: str, model: Any) -> str | None:
    """Why the weights of checkpoint ``folder`` cannot be loaded into ``model`` (other shapes, other tensors), naming
    the model config fields that differ; None when they fit (or the checkpoint holds no safetensors weights)."""
    found = saved_shapes(folder)
    if found is None:
        return None
    saved, is_adapter = found
    if is_adapter:
        try:
            from peft import get_peft_model_state_dict
        except ImportError:  # pragma: no cover - depends on the environment
            return None
        if not hasattr(model, "peft_config"):
            return "the checkpoint holds a LoRA adapter, the model asked for is not a PEFT model (use_peft)"
        state = get_peft_model_state_dict(model)
        tied_ok: set[str] = set()
    else:
        state = model.state_dict()
        by_storage: dict[int, list[str]] = {}
        for name, tensor in state.items():
            by_storage.setdefault(tensor.data_ptr(), []).append(name)
        # a tied weight (lm_head = embed_tokens) is saved once
        tied_ok = {n for names in by_storage.values() if any(x in saved for x in names) for n in names}
    ours = {k: list(v.shape) for k, v in state.items()}
    reshaped = [k for k in ours if k in saved and saved[k] != ours[k]]
    missing = [k for k in ours if k not in saved and k not in tied_ok]
    unexpected = [k for k in saved if k not in ours]
    if not (reshaped or missing or unexpected):
        return None
    parts = []
    fields = _config_differences(folder, model)
    if fields:
        parts.append("the model config differs: " + "; ".join(fields[:8]) + (" ..." if len(fields) > 8 else ""))
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} tensor(s) have another shape (first: {k} {saved[k]} in the checkpoint, "
                     f"{ours[k]} asked for)")
    if missing or unexpected:
        parts.append(f"{len(missing)} tensor(s) of the model are not in the checkpoint, {len(unexpected)} of the "
                     f"checkpoint not in the model (first: {(missing or unexpected)[0]})")
    return "; ".join(parts)
