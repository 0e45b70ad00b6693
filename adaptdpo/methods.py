"""Step policies for the config's ``method``: DPO (static β) and β-DPO. Torch only."""

from __future__ import annotations

from typing import Any

import torch

from .beta import BetaDPO, kept_count
from .step_policy import PairView, StaticBeta, StepPlan, StepPolicy


class BetaDPOPolicy:
    """β-DPO as a step policy: the controller sees the global micro-batch's margins on every rank.

    Every rank runs the controller on identical inputs with an identically seeded generator, so β and the
    kept pairs agree across ranks without communication (checked by the 2-process test).
    """

    def __init__(self, controller: BetaDPO):
        self.controller = controller

    def plan(self, view: PairView) -> StepPlan:
        beta, keep = self.controller.step(view.chosen_logratios, view.rejected_logratios)
        last = self.controller.last
        assert last is not None
        metrics = {"beta/batch": last.beta, "beta/m0": last.m0, "beta/sigma": last.sigma,
                   "filter/kept_fraction": last.kept_fraction,
                   "beta/kept_margin_minus_m0": last.kept_margin_mean - last.m0}
        if beta.dim() == 1:
            metrics["beta/min"] = torch.where(keep, beta, torch.inf).min()
            metrics["beta/max"] = torch.where(keep, beta, -torch.inf).max()
        train_mask = None if self.controller.keep_ratio >= 1.0 else keep
        return StepPlan(beta=beta, train_mask=train_mask, metrics=metrics)

    def num_trained(self, n_pairs: int) -> int:
        return kept_count(n_pairs, self.controller.keep_ratio)

    def state_dict(self) -> dict[str, Any]:
        return {"beta_dpo": self.controller.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["beta_dpo"])


def build_step_policy(config: Any) -> StepPolicy:
    """The step policy the config's ``method`` names."""
    if config.method == "dpo":
        return StaticBeta(config.beta)
    if config.method == "beta_dpo":
        return BetaDPOPolicy(BetaDPO(beta=config.beta, alpha=config.beta_dpo_alpha,
                                     keep_ratio=config.beta_dpo_keep_ratio, momentum=config.beta_dpo_momentum,
                                     level=config.beta_dpo_level, min_beta=config.beta_dpo_min_beta,
                                     filter=config.beta_dpo_filter, init=config.beta_dpo_init,
                                     seed=config.seed))
    raise ValueError(f"unknown method {config.method!r}")

