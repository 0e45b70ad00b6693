"""Checkpoints: saved as transformers does plus our state and a completion marker; resumed only
with the objective unchanged; a full disk named.

A mixin of :class:`adaptdpo.training.trainer.AdaptiveDPOTrainer` (it reads the trainer's attributes set in
its ``__init__``)."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from adaptdpo.models.token_ops import unwrap
from adaptdpo.training.checkpointing import (
    CHECKPOINT_STATE_FILE,
    CheckpointWriteError,
    atomic_torch_save,
    describe_write_failure,
    folder_bytes,
    last_complete_checkpoint,
    mark_checkpoint_complete,
    state_bytes,
)
from adaptdpo.training.config_io import config_defaults
from adaptdpo.training.reference_sync import REFERENCE_STATE_FILE, save_reference
from adaptdpo.training.run_dir import objective_changes
from adaptdpo.training.trainer_mixin import TrainerMixin

logger = logging.getLogger(__name__)


class CheckpointMixin(TrainerMixin):
    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Save as transformers does, add our state, then mark the folder complete; only then rotate.

        A run killed mid-save leaves a folder without the completion marker, which resume ignores.
        """
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        if self.is_world_process_zero():
            self.flush_trace()
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        try:
            super()._save_checkpoint(model, trial)
            totals = self._run_totals_now()  # every rank: may gather
            if self.args.should_save:
                atomic_torch_save({"step_policy": self.step_policy.state_dict(), "run_totals": totals,
                                   "method": self.args.method}, os.path.join(folder, CHECKPOINT_STATE_FILE))
                if self.args.sync_ref_model:  # TR-DPO: the reference has moved; resume must start from where it is
                    assert self.ref_model is not None  # sync_ref_model needs one (_attach_reference_sync)
                    save_reference(self.ref_model, os.path.join(folder, REFERENCE_STATE_FILE))
        except (OSError, RuntimeError) as error:  # a full disk: torch's zip writer says only "unexpected pos ..."
            self._raise_if_disk_full(error, folder, run_dir)
            raise
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            mark_checkpoint_complete(folder)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)

    def _check_objective_unchanged(self, checkpoint: str) -> None:
        """A resumed run keeps its objective: a checkpoint trained with another loss, β, method, selection or
        truncation is refused, naming the fields (``accept_config_change`` continues with the new values). The
        command line checks the whole config before this (adaptdpo.training.job)."""
        from transformers.trainer import TRAINING_ARGS_NAME

        path = os.path.join(checkpoint, TRAINING_ARGS_NAME)
        if self.args.accept_config_change or not os.path.isfile(path):
            return
        try:
            saved = torch.load(path, weights_only=False)
            recorded = vars(saved)  # the fields it had (one added since falls back to the class default otherwise)
            old = {k: v for k, v in saved.to_serialisable().items() if k in recorded}
        except Exception as e:  # written by another version or another trainer: nothing to compare
            logger.info("%s: not compared with this run's settings (%s)", path, e)
            return
        changes = objective_changes(old, self.args.to_serialisable(), config_defaults())
        if changes:
            listed = ", ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in changes.items())
            raise ValueError(f"resume checkpoint {checkpoint} was trained with another objective: {listed}. Resume "
                             "with the settings it was trained with, or set accept_config_change true to continue "
                             "with the new ones")

    def _raise_if_disk_full(self, error: BaseException, folder: str, run_dir: str) -> None:
        """Name a full disk (where, how much the checkpoint needs) instead of torch's zip-writer assertion."""
        last = last_complete_checkpoint(run_dir)
        needed = folder_bytes(last) if last else state_bytes(self.model, self.optimizer,
                                                             self.ref_model if self.args.sync_ref_model else None)
        message = describe_write_failure(error, folder, needed, last)
        if message is not None:
            raise CheckpointWriteError(message) from error

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """As transformers does; then, when a changed learning_rate was accepted on resume, the restored schedule
        continues from the new base rate (without this the checkpoint's rate would silently win)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        scheduler: Any = self.lr_scheduler  # read duck-typed: a LambdaLR-like schedule has base_lrs and lr_lambdas
        base = getattr(scheduler, "base_lrs", None)
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if not (checkpoint and base and lambdas and self.args.accept_config_change):
            return
        new = self.args.learning_rate
        if all(abs(b - new) <= 1e-12 * max(abs(new), 1e-30) for b in base):
            return
        assert self.optimizer is not None  # a schedule was restored, so is its optimizer
        scheduler.base_lrs = [new] * len(base)
        for group, factor in zip(self.optimizer.param_groups, lambdas):
            group["initial_lr"] = new
            group["lr"] = new * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # what get_last_lr() reports
        logger.warning("learning rate schedule continues from the accepted new base rate %g (was %g)", new, base[0])

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        self._check_objective_unchanged(resume_from_checkpoint)
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, CHECKPOINT_STATE_FILE)
        if os.path.exists(path):
            state = torch.load(path, weights_only=False)
            if state.get("method", self.args.method) != self.args.method:  # an accepted change of method
                logger.warning("%s was trained with method %s; method %s starts its own state (β-DPO's moving "
                               "averages, SamS's scheduler) afresh", resume_from_checkpoint, state["method"],
                               self.args.method)
            else:
                self.step_policy.load_state_dict(state["step_policy"])
            self.run_totals = dict(state.get("run_totals", self.run_totals))
        reference_state = os.path.join(resume_from_checkpoint, REFERENCE_STATE_FILE)
        if self.args.sync_ref_model and os.path.exists(reference_state):
            from safetensors.torch import load_model

            assert self.ref_model is not None  # sync_ref_model needs one (_attach_reference_sync)
            load_model(unwrap(self.ref_model), reference_state)
