"""Which k of the n pairs are trained on: Top-K (paper), softmax sampling (official code), random."""

from __future__ import annotations

import math

import torch
from torch import Tensor

SELECTIONS = ("topk", "softmax", "random")


def num_selected(n: int, ratio: float) -> int:
    """k = max(1, ⌊ratio·n⌋); n when ratio ≥ 1."""
    if not 0.0 < ratio:
        raise ValueError(f"selection ratio must be > 0, got {ratio}")
    return n if ratio >= 1.0 else max(1, math.floor(ratio * n + 1e-9))


def select(scores: Tensor, k: int, rule: str = "topk", temperature: float = 1.0,
           generator: torch.Generator | None = None) -> Tensor:
    """Boolean mask [n] with exactly k True.

    ``topk``: the k highest scores (ties broken by index, so equal scores give a deterministic choice);
    ``softmax``: k draws without replacement with probability ∝ exp(score / temperature) (Gumbel-top-k);
    ``random``: k uniformly at random (the paper's "DPO (50%)" baseline).
    """
    n = scores.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if rule == "topk":
        keys = scores.double()
    elif rule in ("softmax", "random"):
        u = torch.rand(n, generator=generator, dtype=torch.float64).clamp(min=1e-300).to(scores.device)
        gumbel = -torch.log(-torch.log(u))
        keys = gumbel if rule == "random" else scores.double() / temperature + gumbel
    else:
        raise ValueError(f"unknown selection rule {rule!r}; choose one of {SELECTIONS}")
    # stable tie-break by index: sort descending by key, ascending by position
    order = torch.argsort(-keys, stable=True)
    mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    mask[order[:k]] = True
    return mask
