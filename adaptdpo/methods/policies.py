"""β-DPO, SamS and their combination as step policies (:mod:`adaptdpo.methods.step_policy`); built by
:mod:`adaptdpo.methods.registry`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from adaptdpo.methods.beta_dpo import BetaDPO, kept_count
from adaptdpo.methods.sams.scheduler import SamsScheduler
from adaptdpo.methods.sams.selection import num_selected
from adaptdpo.methods.step_policy import PairView, StepPlan, StepPolicyBase


class BetaDPOPolicy(StepPolicyBase):
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
        metrics: dict[str, Tensor | float] = {
            "beta/batch": last.beta, "beta/m0": last.m0, "beta/sigma": last.sigma,
            "filter/kept_fraction": last.kept_fraction, "beta/kept_margin_minus_m0": last.kept_margin_mean - last.m0}
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


class SamsPolicy(StepPolicyBase):
    """SamS as a step policy.

    Every rank runs the scheduler on the gathered global micro-batch; rank 0's selection is broadcast so
    that ranks agree even where GPU kernels are not bitwise deterministic. The batch reward uses the
    batch's mean DPO (sigmoid) loss at β0, whatever the training loss type. ``mode`` tells the trainer how
    to compute the step: ``mask`` (the paper's: one forward with gradient, unselected pairs weighted 0) or
    ``subset`` (a no-grad forward on all pairs, then forward and backward on the selected ones only).
    """

    needs_contexts = True

    def __init__(self, config: Any, pretraining: bool = False,
                 load_backbone: Callable[[str], torch.nn.Module] | None = None):
        self.config = config
        self.load_backbone = load_backbone  # the models layer's loader of a local encoder (sams_encoder_path)
        self.pretraining = pretraining
        self.ratio = 1.0 if pretraining else config.sams_ratio  # pre-training scores but trains on everything
        self.mode = "mask" if pretraining else config.sams_mode
        self.scheduler: SamsScheduler | None = None  # built at the first batch, once L and D are known
        self.broadcast = None  # set by the trainer: a function that makes rank 0's tensor everyone's
        self._pending_state: dict[str, Any] | None = None  # a checkpoint's state, until the networks exist

    def _freeze_encoder(self) -> bool:
        choice = self.config.sams_freeze_encoder
        if self.pretraining or choice == "train":
            return False
        if choice == "freeze":
            return True
        return bool(self.config.sams_scheduler_init)  # auto: frozen after pre-training, as in the paper

    def _build(self, num_layers: int, dim: int, device: torch.device) -> SamsScheduler:
        c = self.config
        backbone = None
        if c.sams_encoder_path:
            if self.load_backbone is None:
                raise ValueError("sams_encoder_path is set but no encoder loader was given to SamsPolicy")
            backbone = self.load_backbone(c.sams_encoder_path)
        scheduler = SamsScheduler(
            num_layers, dim, preset=c.sams_preset, ratio=self.ratio, selection=c.sams_selection,
            temperature=c.sams_temperature, exploration_weight=c.sams_lambda,
            use_exploration=c.sams_use_exploration, gamma=c.sams_gamma, delta=c.sams_delta,
            batch_reward_scale=c.sams_batch_reward_scale, batch_reward_offset=c.sams_batch_reward_offset,
            train_on=c.sams_train_on, pool_capacity=c.sams_pool_capacity, pool_batches=c.sams_pool_batches,
            fit_steps=c.sams_fit_steps, lr=c.sams_lr, weight_decay=c.sams_weight_decay,
            warmup_rounds=0 if self.pretraining else c.sams_warmup_rounds, seed=c.seed,
            encoder_backbone=backbone, freeze_encoder=self._freeze_encoder())
        if c.sams_scheduler_init and not self.pretraining:
            scheduler.load_networks(torch.load(c.sams_scheduler_init, map_location="cpu", weights_only=True),
                                    source=c.sams_scheduler_init)
        return scheduler.to(device)

    def _ensure_scheduler(self, contexts: Tensor) -> SamsScheduler:
        if self.scheduler is None:
            self.scheduler = self._build(contexts.shape[1], contexts.shape[2], contexts.device)
            if self._pending_state is not None:
                self.scheduler.load_state_dict(self._pending_state)
                self._pending_state = None
        return self.scheduler

    def select(self, view: PairView) -> tuple[Tensor, dict[str, Any]]:
        """One scheduling round: the selected mask [n] and the round's metrics."""
        scheduler = self._ensure_scheduler(view.extras["contexts"])
        margins = view.base_beta * (view.chosen_logratios - view.rejected_logratios)
        mean_loss = float(-F.logsigmoid(margins).mean())
        selected = scheduler.step(view.extras["contexts"], margins, view.chosen_logps, mean_loss)
        if self.broadcast is not None:
            selected = self.broadcast(selected)
        selected = selected.to(margins.device)
        metrics: dict[str, Any] = dict(scheduler.last_metrics)
        metrics["sams/selected_margin"] = margins[selected].mean()
        if not bool(selected.all()):
            metrics["sams/unselected_margin"] = margins[~selected].mean()
        return selected, metrics

    def plan(self, view: PairView) -> StepPlan:
        selected, metrics = self.select(view)
        train_mask = None if self.ratio >= 1.0 else selected
        return StepPlan(beta=torch.tensor(view.base_beta, dtype=view.chosen_logratios.dtype,
                                          device=view.chosen_logratios.device),
                        train_mask=train_mask, metrics=metrics)

    def pretrain_round(self, contexts: Tensor, chosen_logps: Tensor, mean_nll: float) -> dict[str, Any]:
        """Scheduler pre-training (App. F.3): rewards from the SFT loss — r_B from the chosen responses'
        token-level NLL before and after the update, r_S with the chosen log-prob in place of the margin
        (the official code's reading: −SFT loss = chosen log-prob). Every pair is trained on."""
        scheduler = self._ensure_scheduler(contexts)
        scheduler.step(contexts, chosen_logps, chosen_logps, mean_nll)
        return dict(scheduler.last_metrics)

    def num_trained(self, n_pairs: int) -> int:
        return num_selected(n_pairs, self.ratio)

    def state_dict(self) -> dict[str, Any]:
        return {"sams": None if self.scheduler is None else self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["sams"] is None:
            return
        if self.scheduler is None:  # restored on the first batch, when the networks exist
            self._pending_state = state["sams"]
        else:
            self.scheduler.load_state_dict(state["sams"])


class BetaSamsPolicy(StepPolicyBase):
    """β-DPO + SamS: SamS picks k pairs; β-DPO calibrates β from the margins of those k (its M0 and σ follow
    the selected pairs) and its filter keeps ⌊ρ·k⌋ of them. ``beta_dpo_keep_ratio: 1`` keeps all k."""

    needs_contexts = True

    def __init__(self, sams: SamsPolicy, beta: BetaDPOPolicy):
        self.sams, self.beta = sams, beta

    @property
    def mode(self) -> str:  # type: ignore[override]  # read only: SamS's mode (StepPolicyBase's is a class default)
        return self.sams.mode

    @property
    def broadcast(self) -> Any:
        return self.sams.broadcast

    @broadcast.setter
    def broadcast(self, fn: Any) -> None:
        self.sams.broadcast = fn

    def plan(self, view: PairView) -> StepPlan:
        selected, metrics = self.sams.select(view)
        index = selected.nonzero().squeeze(1)
        sub = PairView(view.chosen_logratios[index], view.rejected_logratios[index], view.chosen_logps[index],
                       view.rejected_logps[index], view.base_beta)
        inner = self.beta.plan(sub)
        keep = torch.zeros_like(selected)
        keep[index[inner.train_mask] if inner.train_mask is not None else index] = True
        beta = inner.beta
        if beta.dim() == 1:  # instance level: one β per selected pair; unselected pairs are not trained on
            full = torch.full(selected.shape, view.base_beta, dtype=beta.dtype, device=beta.device)
            full[index] = beta
            beta = full
        return StepPlan(beta=beta, train_mask=keep, metrics={**metrics, **inner.metrics})

    def num_trained(self, n_pairs: int) -> int:
        return self.beta.num_trained(self.sams.num_trained(n_pairs))

    def state_dict(self) -> dict[str, Any]:
        return {**self.sams.state_dict(), **self.beta.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sams.load_state_dict(state)
        self.beta.load_state_dict(state)
