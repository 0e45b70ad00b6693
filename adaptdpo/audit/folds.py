"""K-fold assignment for cross-fitting: every pair in exactly one held-out fold."""

from __future__ import annotations

import random
from collections.abc import Sequence


def assign_folds(ids: Sequence[int], folds: int, seed: int = 0) -> dict[int, int]:
    """Row id → fold in 0..folds−1: a seeded shuffle dealt round-robin, so fold sizes differ by at most one.

    Every id gets exactly one fold; a pair is scored only by the model of its own fold, which never trained
    on it (the models of fold k train on every other fold)."""
    if folds < 2:
        raise ValueError(f"folds must be at least 2 (one to hold out, one to train on), got {folds}")
    if len(set(ids)) != len(ids):
        raise ValueError("row ids must be distinct")
    if len(ids) < folds:
        raise ValueError(f"{len(ids)} pairs cannot be split into {folds} folds")
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    return {row: position % folds for position, row in enumerate(order)}


def fold_members(assignment: dict[int, int], fold: int) -> tuple[list[int], list[int]]:
    """(training ids, held-out ids) of ``fold``, each ascending."""
    held = sorted(i for i, f in assignment.items() if f == fold)
    train = sorted(i for i, f in assignment.items() if f != fold)
    return train, held
