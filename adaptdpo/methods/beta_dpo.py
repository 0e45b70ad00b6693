"""β-DPO (Wu et al., NeurIPS 2024, arXiv 2407.08639): dynamic β and β-guided data filtering.

Torch only; any training loop can use it. Everything is in the paper's units: the margin of pair i is
M_i = β0·h_i with h_i = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)), detached.

One call of :meth:`BetaDPO.step` on a batch of n pairs does Algorithm 1 of the paper:

1. moving averages with **all** n pairs, before anything else (§4.2.2 and §4.3):
   M0 ← m·M0 + (1−m)·mean(M),  σ ← m·σ + (1−m)·std(M);
2. filtering (§4.3), when ``keep_ratio`` < 1: draw k = max(1, ⌊keep_ratio·n⌋) pairs without replacement
   with probability ∝ w_i = exp(−½((M_i − M0)/σ)²) (random weighted sampling, not top-k);
3. β from the kept pairs: ``level="batch"`` (the method, Eq. 7): β = β0·(1 + α·(mean_kept(M) − M0));
   ``level="instance"`` (the ablation, Eq. 6): β_i = β0·(1 + α·(M_i − M0)); clamped below at ``min_beta``.

Choices the paper leaves open, and what we do (see docs/beta_dpo.md):

* **First batch.** M0 and σ start as the first batch's mean and std (``init="first_batch"``), i.e. the
  moving average without the zero bias. The official code zero-initialises them (``init="zero"``,
  available as an option), which makes σ ≈ 0.1·std early on and the filter very sharp for the first
  tens of steps.
* **Which std.** The unbiased sample std (ddof = 1), as the official code; a batch of one pair leaves σ
  unchanged (its std is undefined).
* **σ floor.** σ is floored at ``sigma_floor`` (relative to the margins' scale) so identical margins
  never divide by zero; the weights are then uniform.
* **Sampling.** Gumbel-top-k on log-weights −½z²: exactly successive sampling without replacement ∝ w,
  and immune to exp(−½z²) underflowing to 0 in float32 (|z| ≳ 14), which breaks ``torch.multinomial``.

Units of the official code (junkangwu/beta-DPO): it uses h, not M = β0·h, as the margin, so its ``a``
equals our α times β0 (a = 0.6 at β0 = 0.1 is α = 6 here); its ``mode_weight`` is the fraction
*dropped*, 1 − keep_ratio. The Gaussian filter does not depend on the units; only α does.

Gradient-based filters of the paper's §5.2 (``filter="grad_head" | "grad_tail" | "grad_tail_head"``)
drop the pairs with the largest / smallest DPO gradient weight β·σ(−β·h), which is decreasing in h: the
head is the lowest margins, the tail the highest. They are deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

FILTERS = ("gaussian", "grad_head", "grad_tail", "grad_tail_head")
LEVELS = ("batch", "instance")
INITS = ("first_batch", "zero")


def kept_count(n: int, keep_ratio: float) -> int:
    """k = max(1, ⌊keep_ratio·n⌋); all n when keep_ratio = 1."""
    if keep_ratio >= 1.0:
        return n
    return max(1, math.floor(keep_ratio * n + 1e-9))


def gaussian_log_weights(margins: Tensor, m0: float | Tensor, sigma: float | Tensor) -> Tensor:
    """log w_i = −½((M_i − M0)/σ)²  (the paper's p(M_i) up to its normalising constant)."""
    return -0.5 * ((margins - m0) / sigma) ** 2


def sample_without_replacement(log_weights: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k distinct indices, drawn successively with probability ∝ exp(log_weights) (Gumbel-top-k).

    The uniforms come from ``generator`` (a CPU generator: the same stream on every device and rank).
    """
    u = torch.rand(log_weights.shape, generator=generator, dtype=torch.float64).clamp(min=1e-300)
    if log_weights.device.type == "cuda":
        u = u.pin_memory().to(log_weights.device, non_blocking=True)  # no wait for the GPU queue
    gumbel = -torch.log(-torch.log(u))
    return torch.topk(log_weights.double() + gumbel, k).indices


def gradient_filter(margins: Tensor, k: int, which: str) -> Tensor:
    """Indices kept by the §5.2 baselines: drop the n−k pairs with the largest gradient weight (head),
    the smallest (tail), or half of each (tail & head). Gradient weight σ(−βh) falls with the margin."""
    n = margins.shape[0]
    order = torch.argsort(margins, stable=True)  # ascending margin = descending gradient weight
    drop = n - k
    if which == "grad_head":
        return order[drop:]
    if which == "grad_tail":
        return order[: n - drop]
    if which == "grad_tail_head":
        head = drop // 2
        tail = drop - head
        return order[head : n - tail]
    raise ValueError(f"unknown gradient filter {which!r}")


@dataclass
class BetaDPOStep:
    """Diagnostics of the last step, as 0-dim tensors on the margins' device (no host synchronisation)."""

    beta: Tensor  # β_batch, or the mean β over kept pairs at instance level
    m0: Tensor
    sigma: Tensor
    kept_fraction: float
    kept_margin_mean: Tensor


class BetaDPO:
    """The β-DPO controller: margins in, (β, keep mask) out; M0 and σ as state.

    Args:
        beta: β0, the base β.
        alpha: α in the paper's units (M = β0·h). α = 0 disables dynamic β.
        keep_ratio: ρ, the fraction of each batch kept. 1 disables filtering.
        momentum: m of the moving averages.
        level: ``"batch"`` (one β per batch, the method) or ``"instance"`` (one β per pair, the ablation).
        min_beta: lower clamp of β (the official code's 1e-3).
        filter: ``"gaussian"`` (the method) or a §5.2 gradient-based baseline.
        init: ``"first_batch"`` (ours, default) or ``"zero"`` (the official code).
        sigma_floor: σ is at least this times max(1, |M0|).
        seed: seed of the controller's own generator (identical on every rank, saved in state_dict).
    """

    def __init__(self, beta: float = 0.1, alpha: float = 0.6, keep_ratio: float = 0.8, momentum: float = 0.9,
                 level: str = "batch", min_beta: float = 1e-3, filter: str = "gaussian", init: str = "first_batch",
                 sigma_floor: float = 1e-6, seed: int = 0):
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        if filter not in FILTERS:
            raise ValueError(f"filter must be one of {FILTERS}, got {filter!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.beta0, self.alpha, self.keep_ratio, self.momentum = float(beta), float(alpha), keep_ratio, momentum
        self.level, self.min_beta, self.filter, self.init = level, float(min_beta), filter, init
        self.sigma_floor = sigma_floor
        self._m0 = torch.zeros((), dtype=torch.float64)
        self._sigma = torch.zeros((), dtype=torch.float64)
        self.steps = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.last: BetaDPOStep | None = None

    # ------------------------------------------------------------------------------------------ state
    # M0 and σ live as 0-dim float64 tensors on the margins' device, so that a step on a GPU never waits
    # for the GPU; reading ``m0`` / ``sigma`` as floats synchronises.

    @property
    def m0(self) -> float:
        return float(self._m0)

    @m0.setter
    def m0(self, value: float) -> None:
        self._m0 = torch.tensor(float(value), dtype=torch.float64, device=self._m0.device)

    @property
    def sigma(self) -> float:
        return float(self._sigma)

    @sigma.setter
    def sigma(self, value: float) -> None:
        self._sigma = torch.tensor(float(value), dtype=torch.float64, device=self._sigma.device)

    def update_statistics(self, margins: Tensor) -> None:
        """M0 and σ from all pairs of the batch (before filtering)."""
        margins = margins.double()
        self._m0, self._sigma = self._m0.to(margins.device), self._sigma.to(margins.device)
        mean = margins.mean()
        std = margins.std(unbiased=True) if margins.numel() > 1 else None
        if self.steps == 0 and self.init == "first_batch":
            self._m0 = mean
            self._sigma = std if std is not None else torch.zeros_like(mean)
        else:
            m = self.momentum
            self._m0 = m * self._m0 + (1 - m) * mean
            if std is not None:
                self._sigma = m * self._sigma + (1 - m) * std
        self.steps += 1

    def effective_sigma(self) -> Tensor:
        return torch.maximum(self._sigma, self.sigma_floor * self._m0.abs().clamp(min=1.0))

    # ------------------------------------------------------------------------------------------ one step

    def keep_mask(self, margins: Tensor, generator: torch.Generator | None = None) -> Tensor:
        n = margins.shape[0]
        k = kept_count(n, self.keep_ratio)
        keep = torch.zeros(n, dtype=torch.bool, device=margins.device)
        if k == n:
            keep[:] = True
            return keep
        if self.filter == "gaussian":
            log_w = gaussian_log_weights(margins.double(), self._m0.to(margins.device),
                                         self.effective_sigma().to(margins.device))
            idx = sample_without_replacement(log_w, k, generator or self.generator)
        else:
            idx = gradient_filter(margins, k, self.filter)
        keep[idx] = True
        return keep

    def step(self, chosen_logratios: Tensor, rejected_logratios: Tensor,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(β, keep) for one batch: β is a 0-dim tensor (batch level) or [n] (instance level); keep is bool [n]."""
        h = (chosen_logratios - rejected_logratios).detach().double()
        if not bool(torch.isfinite(h).all()):
            raise FloatingPointError("β-DPO got non-finite log-ratios (NaN/inf log-probs): refusing to update "
                                     "M0 and σ with them")
        margins = self.beta0 * h
        self.update_statistics(margins)
        keep = self.keep_mask(margins, generator)
        k = kept_count(margins.shape[0], self.keep_ratio)
        kept_mean = (margins * keep).sum() / k
        if self.level == "batch":
            beta = (self.beta0 * (1 + self.alpha * (kept_mean - self._m0))).clamp(min=self.min_beta)
            reported = beta
        else:
            beta = (self.beta0 * (1 + self.alpha * (margins - self._m0))).clamp(min=self.min_beta)
            reported = (beta * keep).sum() / k
        self.last = BetaDPOStep(beta=reported.float(), m0=self._m0.float(), sigma=self._sigma.float(),
                                kept_fraction=k / margins.shape[0], kept_margin_mean=kept_mean.float())
        return beta.float(), keep

    def state_dict(self) -> dict[str, Any]:
        return {"m0": self.m0, "sigma": self.sigma, "steps": self.steps, "generator": self.generator.get_state(),
                "config": {"beta": self.beta0, "alpha": self.alpha, "keep_ratio": self.keep_ratio,
                           "momentum": self.momentum, "level": self.level, "filter": self.filter,
                           "init": self.init}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m0, self.sigma, self.steps = float(state["m0"]), float(state["sigma"]), int(state["steps"])
        self.generator.set_state(state["generator"])
