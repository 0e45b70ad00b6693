"""Gold-task folders, whatever the task: the files every task writes and reads, and one loader for all kinds.

A task folder holds ``train.jsonl`` (labelled training pairs, with ``flipped`` and the gold rewards),
``eval.jsonl`` (held-out pairs labelled by the gold reward), ``prompts.jsonl`` (held-out prompts for win rates)
and ``task.json`` (its settings and statistics; ``kind`` says which task: ``toy`` — the synthetic language of
:mod:`adaptdpo.tasks.toy` — or ``sentiment`` — real text judged by VADER, :mod:`adaptdpo.tasks.sentiment`).
``adaptdpo eval RUN --task DIR`` scores any of them the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from adaptdpo import files

TASK_KINDS = ("toy", "sentiment")


class TaskFileError(ValueError):
    """A task folder's file is missing or broken (the message names the file and line)."""


def digest(settings: dict[str, Any]) -> str:
    """A short hash of settings (the name of the cache folder they determine)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """A task file's records; a missing or damaged file is a TaskFileError naming it."""
    return files.read_jsonl(path, error=TaskFileError, missing_hint=" (the task folder is incomplete; rebuild it)")


def read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise TaskFileError(f"{path}: missing (the task folder is incomplete; rebuild it)")
    with open(path, encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as e:
            raise TaskFileError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None


write_jsonl_atomic = files.write_jsonl_atomic


#: the run settings every task's experiments share (the schedule, logging, no checkpoints); each task adds its sizes
TASK_RUN_SETTINGS: dict[str, Any] = {
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_steps": 4,
    "beta": 0.1,
    "logging_steps": 8,
    "save_strategy": "no",
    "report_to": "none",
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
}


class TaskFolder:
    """What every task offers its trainer and its judge (subclasses add the gold reward and the prompt form).

    ``gold_reward(prompt, completion)``: the exact judge; ``max_new_tokens``: the length of sampled completions
    at evaluation; ``train_defaults``: the training settings the task's experiments use."""

    kind = "toy"
    train_file: str
    eval_file: str
    prompts_file: str
    reference_dir: str
    stats: dict[str, Any]

    @property
    def max_new_tokens(self) -> int:
        raise NotImplementedError

    def gold_reward(self, prompt: Any, completion: str) -> float:
        raise NotImplementedError

    def train_defaults(self) -> dict[str, Any]:
        raise NotImplementedError

    def eval_rows(self) -> list[dict[str, Any]]:
        return read_jsonl(self.eval_file)

    def train_rows(self) -> list[dict[str, Any]]:
        return read_jsonl(self.train_file)

    def eval_prompts(self) -> list[Any]:
        """Held-out prompts: text (the toy) or a list of chat messages (the sentiment task)."""
        return [r["prompt"] for r in read_jsonl(self.prompts_file)]

    def flipped_pair_ids(self) -> set[int]:
        return {i for i, r in enumerate(self.train_rows()) if r["flipped"]}

    def check_files(self) -> None:
        """Every file present and parseable, and the pairs as many as task.json records."""
        for path, expected in ((self.eval_file, self.stats.get("eval_pairs")),
                               (self.train_file, self.stats.get("train_pairs"))):
            found = len(read_jsonl(path))
            if expected is not None and found != expected:
                raise TaskFileError(f"{path}: {found} pairs, but task.json records {expected}: the file is cut short "
                                    "or altered; rebuild the task")
        if not self.eval_prompts():
            raise TaskFileError(f"{self.prompts_file}: no prompts")
