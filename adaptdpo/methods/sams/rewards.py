"""SamS rewards (Eqs. 6–8): batch-level r_B, sample-level r_S, combined r = γσ(s·r_B + o) + (1−γ)σ(r_S).

Paper defaults: γ = 0.5, δ = 0.5, scale s = 1, offset o = 0. The official code's mapping (s = 50,
o = 0.5) is available through ``scale``/``offset``; its sign flip of the normalised batch reward is a bug
and is not reproduced.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def min_max(values: Tensor, eps: float = 1e-8) -> Tensor:
    """g(·): min–max normalisation to [0, 1] over the batch; a constant batch maps to 0.5 (no NaN)."""
    low, high = values.min(), values.max()
    span = high - low
    if float(span) <= eps:
        return torch.full_like(values, 0.5)
    return (values - low) / span


def batch_reward(previous_loss: float | Tensor, current_loss: float | Tensor) -> Tensor:
    """r_B = (e^{L_prev} − e^{L_cur}) / max(e^{L_prev}, e^{L_cur}) ∈ (−1, 1); positive when the loss fell.

    ``previous_loss``: mean DPO loss of batch t−1 under θ_{t−2}; ``current_loss``: mean loss of batch t
    under θ_{t−1} (the lag: both are available at round t without an extra forward). Computed as
    1 − e^{L_cur − L_prev} (or its mirror) so that large losses do not overflow.
    """
    prev = torch.as_tensor(previous_loss, dtype=torch.float64)
    cur = torch.as_tensor(current_loss, dtype=torch.float64)
    if not (math.isfinite(float(prev)) and math.isfinite(float(cur))):
        raise FloatingPointError(f"batch reward from non-finite losses ({float(prev)}, {float(cur)})")
    # divide numerator and denominator by the larger exponential
    return torch.where(prev >= cur, 1 - torch.exp(cur - prev), torch.exp(prev - cur) - 1)


def sample_reward(margins: Tensor, chosen_logps: Tensor, delta: float = 0.5) -> Tensor:
    """r_S = δ·g(margin) + (1−δ)·(1 − g(log π(y_w))) ∈ [0, 1]: large margins and low chosen likelihood score high."""
    return delta * min_max(margins.double()) + (1 - delta) * (1 - min_max(chosen_logps.double()))


def combined_reward(r_batch: Tensor | float, r_sample: Tensor, gamma: float = 0.5, scale: float = 1.0,
                    offset: float = 0.0) -> Tensor:
    """r = γ·σ(scale·r_B + offset) + (1−γ)·σ(r_S) ∈ (0, 1), one value per pair (Eq. 8)."""
    r_batch = torch.as_tensor(r_batch, dtype=torch.float64)
    return gamma * torch.sigmoid(scale * r_batch + offset) + (1 - gamma) * torch.sigmoid(r_sample.double())
