"""K-fold assignment for cross-fitting: every pair in exactly one held-out fold."""

from __future__ import annotations

import random
from collections.abc import Sequence


def assign_folds(ids: Sequence[int], folds: int, seed: int = 0,
                 together: Sequence[Sequence[int]] | None = None) -> dict[int, int]:
    """Row id → fold in 0..folds−1: a seeded shuffle dealt round-robin, so fold sizes differ by at most one.

    Every id gets exactly one fold; a pair is scored only by the model of its own fold, which never trained
    on it (the models of fold k train on every other fold). ``together``: groups of ids that must share a fold
    (mirrored twins: the same pair with chosen and rejected swapped); each group follows its first id's fold."""
    if folds < 2:
        raise ValueError(f"folds must be at least 2 (one to hold out, one to train on), got {folds}")
    if len(set(ids)) != len(ids):
        raise ValueError("row ids must be distinct")
    if len(ids) < folds:
        raise ValueError(f"{len(ids)} pairs cannot be split into {folds} folds")
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    followers = {i: group[0] for group in (together or []) for i in group[1:]}
    leaders = [row for row in order if row not in followers]
    out = {row: position % folds for position, row in enumerate(leaders)}
    for row, leader in followers.items():
        out[row] = out[leader]
    return out


def fold_members(assignment: dict[int, int], fold: int) -> tuple[list[int], list[int]]:
    """(training ids, held-out ids) of ``fold``, each ascending."""
    held = sorted(i for i, f in assignment.items() if f == fold)
    train = sorted(i for i, f in assignment.items() if f != fold)
    return train, held
