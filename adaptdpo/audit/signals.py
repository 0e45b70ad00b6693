"""Per-pair signals of label noise from cross-fitted implicit rewards (torch only).

For pair i, a DPO model that never saw it gives the implicit-reward margin m_i = β·h_i with
h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)) (DPO paper, Eq. 5), for the labels as given.

- ``validation_loss`` = −log σ(m_i), the DPO loss on the held-out pair: Selective DPO's difficulty
  (Gao et al. 2025, §3).
- ``flip_probability``: a label flip negates the margin a model that learned the true preferences assigns,
  so the held-out margins are modelled as a two-component mixture with mirrored means,
  p(m) = (1 − ε)·N(m; μ, s²) + ε·N(m; −μ, s²), fitted by EM; ε is the estimated flip rate, and
  P(flip | m) = ε·N(m; −μ, s²) / p(m) (decreasing in m when μ > 0). The Gaussian shape is an approximation:
  the ranking it gives is the ranking by −m, and ε is an estimate to be read with that in mind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def validation_loss(margins: Tensor) -> Tensor:
    """−log σ(m), computed stably (softplus(−m))."""
    return torch.nn.functional.softplus(-margins)


@dataclass(frozen=True)
class FlipMixture:
    flip_rate: float  # ε
    mean: float  # μ ≥ 0: the mean margin of correctly labelled pairs
    std: float  # s
    iterations: int

    def flip_probability(self, margins: Tensor) -> Tensor:
        # log[ε·N(m; −μ, s²)] − log[(1 − ε)·N(m; μ, s²)] = log(ε / (1 − ε)) − 2μm / s²
        eps = min(max(self.flip_rate, 1e-300), 1 - 1e-16)
        return torch.sigmoid(math.log(eps / (1 - eps)) - 2 * self.mean * margins.double() / self.std ** 2)


def fit_flip_mixture(margins: Tensor, iterations: int = 500, tolerance: float = 1e-10) -> FlipMixture:
    """EM for (1 − ε)·N(μ, s²) + ε·N(−μ, s²) on the held-out margins (ε starts at 0.1, μ at the mean |m|).

    E-step: w_i = P(flip | m_i). M-step: ε = mean(w), μ = mean((1 − 2w)·m), s² = mean((1 − w)(m − μ)² + w(m + μ)²).
    A fit that ends with μ < 0 is mirrored (μ → −μ, ε → 1 − ε): the component with the positive mean is, by
    definition, the correctly labelled one."""
    m = margins.double().flatten()
    if m.numel() < 2:
        raise ValueError("fitting the flip mixture needs at least 2 margins")
    eps, mu = 0.1, float(m.abs().mean())
    s2 = max(float(m.var()), 1e-12)
    done = 0
    for done in range(1, iterations + 1):
        w = FlipMixture(eps, mu, s2 ** 0.5, done).flip_probability(m)
        new_eps = float(w.mean().clamp(1e-6, 1 - 1e-6))
        new_mu = float(((1 - 2 * w) * m).mean())
        new_s2 = max(float(((1 - w) * (m - new_mu) ** 2 + w * (m + new_mu) ** 2).mean()), 1e-12)
        change = abs(new_eps - eps) + abs(new_mu - mu) + abs(new_s2 - s2)
        eps, mu, s2 = new_eps, new_mu, new_s2
        if change < tolerance:
            break
    if mu < 0:
        mu, eps = -mu, 1 - eps
    return FlipMixture(eps, mu, s2 ** 0.5, done)
