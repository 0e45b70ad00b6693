"""Step policies for the config's ``method``: DPO (static β), β-DPO, SamS. Torch only."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .beta import BetaDPO, kept_count
from .sams import SamsScheduler, num_selected
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


class SamsPolicy:
    """SamS as a step policy (the paper's compute: one forward with gradient, unselected pairs masked).

    Every rank runs the scheduler on the gathered global micro-batch; rank 0's selection is broadcast so
    that ranks agree even where GPU kernels are not bitwise deterministic. The batch reward uses the
    batch's mean DPO (sigmoid) loss at β0, whatever the training loss type.
    """

    needs_contexts = True

    def __init__(self, config: Any):
        self.config = config
        self.scheduler: SamsScheduler | None = None  # built at the first batch, once L and D are known
        self.broadcast = None  # set by the trainer: a function that makes rank 0's tensor everyone's
        self._pending_state: dict[str, Any] | None = None  # a checkpoint's state, until the networks exist

    def _build(self, num_layers: int, dim: int, device: torch.device) -> SamsScheduler:
        c = self.config
        return SamsScheduler(num_layers, dim, preset=c.sams_preset, ratio=c.sams_ratio, selection=c.sams_selection,
                             temperature=c.sams_temperature, exploration_weight=c.sams_lambda,
                             use_exploration=c.sams_use_exploration, gamma=c.sams_gamma, delta=c.sams_delta,
                             batch_reward_scale=c.sams_batch_reward_scale,
                             batch_reward_offset=c.sams_batch_reward_offset, train_on=c.sams_train_on,
                             pool_capacity=c.sams_pool_capacity, pool_batches=c.sams_pool_batches,
                             fit_steps=c.sams_fit_steps, lr=c.sams_lr, weight_decay=c.sams_weight_decay,
                             warmup_rounds=c.sams_warmup_rounds, seed=c.seed).to(device)

    def plan(self, view: PairView) -> StepPlan:
        contexts = view.extras["contexts"]
        if self.scheduler is None:
            self.scheduler = self._build(contexts.shape[1], contexts.shape[2], contexts.device)
            if self._pending_state is not None:
                self.scheduler.load_state_dict(self._pending_state)
                self._pending_state = None
        h = view.chosen_logratios - view.rejected_logratios
        margins = view.base_beta * h
        mean_loss = float(-F.logsigmoid(margins).mean())
        selected = self.scheduler.step(contexts, margins, view.chosen_logps, mean_loss)
        if self.broadcast is not None:
            selected = self.broadcast(selected)
        metrics: dict[str, Any] = dict(self.scheduler.last_metrics)
        metrics["sams/selected_margin"] = margins[selected].mean()
        if not bool(selected.all()):
            metrics["sams/unselected_margin"] = margins[~selected].mean()
        train_mask = None if self.config.sams_ratio >= 1.0 else selected.to(margins.device)
        return StepPlan(beta=torch.tensor(view.base_beta, dtype=margins.dtype, device=margins.device),
                        train_mask=train_mask, metrics=metrics)

    def num_trained(self, n_pairs: int) -> int:
        return num_selected(n_pairs, self.config.sams_ratio)

    def state_dict(self) -> dict[str, Any]:
        return {"sams": None if self.scheduler is None else self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["sams"] is None:
            return
        if self.scheduler is None:  # restored on the first batch, when the networks exist
            self._pending_state = state["sams"]
        else:
            self.scheduler.load_state_dict(state["sams"])


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
    if config.method == "sams":
        return SamsPolicy(config)
    raise ValueError(f"unknown method {config.method!r}")

