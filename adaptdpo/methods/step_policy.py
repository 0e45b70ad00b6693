"""The per-step seam between the trainer and a method: β per pair and which pairs are trained on.

Every training micro-batch, the trainer computes the detached log-ratios of all pairs of the *global*
micro-batch (all ranks, gathered in rank order), hands them to ``policy.plan(...)``, and trains with the
β and the mask it returns. Every rank calls ``plan`` with identical inputs, so a deterministic policy
(or one whose RNG state is identical on every rank) makes identical decisions everywhere without any
extra communication.

:class:`StaticBeta` is plain DPO. β-DPO and SamS implement the same protocol with state of their own;
that state is saved with every checkpoint through ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor


@dataclass
class PairView:
    """What a step policy sees of the global micro-batch (all tensors detached, shape [n_global])."""

    chosen_logratios: Tensor
    rejected_logratios: Tensor
    chosen_logps: Tensor
    rejected_logps: Tensor
    base_beta: float
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. hidden-state contexts for SamS

    @property
    def n(self) -> int:
        return int(self.chosen_logratios.shape[0])


@dataclass
class StepPlan:
    """β (scalar tensor, or one per pair) and the pairs to train on (None: all of them)."""

    beta: Tensor
    train_mask: Tensor | None = None
    metrics: dict[str, Tensor | float] = field(default_factory=dict)


class StepPolicy(Protocol):
    """What the trainer asks of a method every training micro-batch.

    ``needs_contexts``: the policy reads per-pair hidden-state contexts (``view.extras["contexts"]``; SamS);
    ``mode``: ``mask`` (one forward with gradient, untrained pairs weighted 0) or ``subset`` (a no-grad forward
    on every pair, then forward and backward on the trained ones); ``broadcast``: set by the trainer under
    several processes to a function that makes rank 0's tensor everyone's (None: one process, or not needed).
    :class:`StepPolicyBase` gives the defaults (no contexts, ``mask``, no broadcast)."""

    needs_contexts: bool
    broadcast: Any

    @property
    def mode(self) -> str: ...  # read only: a plain attribute or a property

    def plan(self, view: PairView) -> StepPlan: ...

    def num_trained(self, n_pairs: int) -> int:
        """How many of ``n_pairs`` pairs will be trained on (known before the forward, for loss normalisation)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StepPolicyBase:
    """The defaults of :class:`StepPolicy`'s attributes: no contexts, one forward with a mask, no broadcast."""

    needs_contexts: bool = False
    mode: str = "mask"
    broadcast: Any = None
    #: optional (the trainer reads it with a default of None): a relative perturbation ε of β for which the trainer
    #: puts the perturbed policies' log-ratios in ``view.extras`` (ε-DPO, :mod:`adaptdpo.methods.epsilon_dpo`)
    perturbation: float | None = None


class StaticBeta(StepPolicyBase):
    """DPO: one fixed β, every pair trained on."""

    def __init__(self, beta: float):
        self.beta = float(beta)

    def plan(self, view: PairView) -> StepPlan:
        return StepPlan(beta=torch.tensor(self.beta, dtype=view.chosen_logratios.dtype))

    def num_trained(self, n_pairs: int) -> int:
        return n_pairs

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])
