"""Which pairs to train on, and in what order, from a per-pair difficulty score (data-level selection).

Selective DPO (Gao et al., ICML 2025, arXiv 2502.09650) ranks pairs by the *validation loss* of reference
models trained on other parts of the data (here: the audit's cross-fitted DPO loss −log σ(β·h) of each pair,
:mod:`adaptdpo.audit`), keeps the easiest share (τ = 50% in the paper) and trains on them from easy to hard.
The literature disagrees on which end to keep: "Difficulty-Based Preference Data Selection by DPO Implicit
Reward Gap" (Qi et al., arXiv 2508.04149) keeps the *hardest* pairs (smallest implicit-reward gap). So the
choice is a policy:

- :class:`KeepEasiest` — Selective DPO: the ``keep_ratio`` share with the lowest difficulty;
- :class:`KeepHardest` — the opposite end (arXiv 2508.04149);
- :class:`KeepAll` — no selection (the order can still be a curriculum).

A policy returns the kept row ids; :func:`order_pairs` then puts them in training order (``easy_to_hard``:
ascending difficulty, ties by row id; ``hard_to_easy``; ``shuffled``: left to the trainer's sampler).
Difficulty is any "higher = harder" number per row id; rows are identified by their index in the input
file (``pair_id``), so scores from an audit of the same file line up with the training rows.

This module is plain Python (no torch): a user's own loop can call it on any score table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

ORDERS = ("shuffled", "easy_to_hard", "hard_to_easy")
POLICIES = ("all", "easiest", "hardest")


def kept_number(n: int, keep_ratio: float) -> int:
    """How many of ``n`` pairs a ratio keeps: round(ratio·n), at least 1 when n > 0."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return 0 if n == 0 else max(1, min(n, round(keep_ratio * n)))


def _ranked(ids: Sequence[int], difficulty: Mapping[int, float]) -> list[int]:
    """``ids`` by ascending difficulty; ties broken by row id so the order never depends on input order."""
    return sorted(ids, key=lambda i: (difficulty[i], i))


class SelectionPolicy(Protocol):
    def select(self, ids: Sequence[int], difficulty: Mapping[int, float]) -> list[int]:
        """The kept subset of ``ids`` (any order)."""
        ...


@dataclass(frozen=True)
class KeepAll:
    def select(self, ids: Sequence[int], difficulty: Mapping[int, float]) -> list[int]:
        return list(ids)


@dataclass(frozen=True)
class KeepEasiest:
    """Selective DPO: the ``keep_ratio`` share of pairs with the lowest difficulty (validation loss)."""

    keep_ratio: float = 0.5

    def select(self, ids: Sequence[int], difficulty: Mapping[int, float]) -> list[int]:
        return _ranked(ids, difficulty)[: kept_number(len(ids), self.keep_ratio)]


@dataclass(frozen=True)
class KeepHardest:
    """The ``keep_ratio`` share of pairs with the highest difficulty (arXiv 2508.04149's choice)."""

    keep_ratio: float = 0.5

    def select(self, ids: Sequence[int], difficulty: Mapping[int, float]) -> list[int]:
        ranked = _ranked(ids, difficulty)
        return ranked[len(ranked) - kept_number(len(ids), self.keep_ratio):]


def make_policy(name: str, keep_ratio: float) -> SelectionPolicy:
    if name == "all":
        return KeepAll()
    if name == "easiest":
        return KeepEasiest(keep_ratio)
    if name == "hardest":
        return KeepHardest(keep_ratio)
    raise ValueError(f"pair selection {name!r}: choose one of {POLICIES}")


def order_pairs(ids: Sequence[int], difficulty: Mapping[int, float], order: str) -> list[int]:
    """``ids`` in training order (``shuffled`` keeps the given order: the trainer's sampler shuffles)."""
    if order == "shuffled":
        return list(ids)
    if order == "easy_to_hard":
        return _ranked(ids, difficulty)
    if order == "hard_to_easy":
        return _ranked(ids, difficulty)[::-1]
    raise ValueError(f"pair order {order!r}: choose one of {ORDERS}")


@dataclass
class Selection:
    """The result of selecting from a dataset: kept row ids in training order, and the dropped ones."""

    kept: list[int]
    dropped: list[int]

    def summary(self) -> str:
        n = len(self.kept) + len(self.dropped)
        return f"kept {len(self.kept)} of {n} pairs ({len(self.kept) / max(1, n):.0%}), dropped {len(self.dropped)}"


def select_pairs(ids: Sequence[int], difficulty: Mapping[int, float], policy: SelectionPolicy,
                 order: str = "shuffled") -> Selection:
    """Apply ``policy`` and ``order`` to the rows ``ids``; every id needs a finite difficulty."""
    bad = [i for i in ids if i not in difficulty or not math.isfinite(difficulty[i])]
    if bad:
        raise ValueError(f"{len(bad)} pair(s) have no finite difficulty score (first row ids: {bad[:5]})")
    kept = policy.select(ids, difficulty)
    kept_set = set(kept)
    return Selection(order_pairs(kept, difficulty, order), [i for i in ids if i not in kept_set])
