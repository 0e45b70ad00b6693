"""tasks.loading"""

from __future__ import annotations

import os

from adaptdpo.tasks.base import TASK_KINDS, TaskFileError, TaskFolder, read_json
from adaptdpo.tasks.sentiment.task import load_sentiment_task
from adaptdpo.tasks.toy.task import load_task


def load_any_task(task_dir: str, reference_dir: str | None = None) -> TaskFolder:
    """The task in ``task_dir``, of the kind its task.json names (``toy`` when it names none: older folders)."""
    if not os.path.isdir(task_dir):
        raise TaskFileError(f"{task_dir}: no such task folder")
    stats_path = os.path.join(task_dir, "task.json")
    kind = read_json(stats_path).get("kind", "toy")
    if kind == "toy":

        return load_task(task_dir, reference_dir)
    if kind == "sentiment":

        return load_sentiment_task(task_dir, reference_dir)
    raise TaskFileError(f"{stats_path}: kind {kind!r} is not a task this version knows ({', '.join(TASK_KINDS)})")
