"""Runs that must stop rather than end as results: a gradient that stays exactly 0 (stalled), the
run's wall time and running totals across resumes.

A mixin of :class:`adaptdpo.training.trainer.AdaptiveDPOTrainer` (it reads the trainer's attributes set in
its ``__init__``)."""

from __future__ import annotations

import time
from typing import Any

import torch

from adaptdpo.training.safeguards import STALLED_STEPS, TrainingStalledError
from adaptdpo.training.trainer_mixin import TrainerMixin


class RunGuardsMixin(TrainerMixin):
    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None and self.args.sams_pretrain != "frozen":  # frozen pre-training: no gradient at all
            norm = torch.as_tensor(grad_norm).detach().float()
            streak = self._zero_grad_streak
            if streak is None:
                streak = torch.zeros((), device=norm.device)
            self._zero_grad_streak = torch.where(norm == 0, streak.to(norm.device) + 1, torch.zeros_like(streak))
        return grad_norm

    def _check_not_stalled(self, logs: dict[str, float]) -> None:
        """Stop a run whose model no longer learns (an exploding learning rate leaves weights so large that
        every gradient underflows to exactly 0 while the loss stays put), instead of saving it as a result."""
        if self._zero_grad_streak is None:
            return
        streak = int(self._zero_grad_streak.item())
        loss = logs.get("loss", logs.get("train_loss"))
        if streak >= STALLED_STEPS and loss is not None and loss > 1e-4:
            raise TrainingStalledError(
                f"training stalled at step {self.state.global_step}: the gradient norm has been exactly 0 for the "
                f"last {streak} optimizer steps while the loss stays at {loss:.4g}. The weights have most likely "
                f"blown up (learning_rate={self.args.learning_rate:g}); lower learning_rate (or set max_grad_norm) "
                f"and train again. No final model was saved; checkpoints so far are in {self.args.output_dir}")

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self.args.check_trains_something()
        self._invocation_start = time.time()
        return super().train(*args, **kwargs)

    def run_wall_time(self) -> float:
        """Training wall time of the whole run: earlier invocations (up to the checkpoint resumed) + this one."""
        return self.run_totals["train_time_s"] + time.time() - self._invocation_start

    def _run_totals_now(self) -> dict[str, float]:
        """Sum of every step's loss so far (the Trainer's own running sums, mean over ranks) and the time."""
        pending = self._tr_loss.detach().float().reshape(1)
        if self.accelerator.num_processes > 1:
            pending = self.accelerator.gather(pending)
        steps_loss = self._total_loss_scalar + float(pending.mean())
        tokens = 0.0 if self._tokens_this_run is None else float(self._tokens_this_run)
        return {"loss_sum": self.run_totals["loss_sum"] + steps_loss, "train_time_s": self.run_wall_time(),
                "num_tokens": self.run_totals.get("num_tokens", 0.0) + tokens}
