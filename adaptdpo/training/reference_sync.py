"""training.reference_sync"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import TrainerCallback

from adaptdpo.models.token_ops import unwrap

#: TR-DPO's moving reference, saved with every checkpoint (sync_ref_model)
REFERENCE_STATE_FILE = "reference_model.safetensors"


def save_reference(reference: torch.nn.Module, path: str) -> None:
    from safetensors.torch import save_model

    tmp = f"{path}.tmp-{os.getpid()}"
    save_model(unwrap(reference), tmp)
    os.replace(tmp, path)


class ReferenceSyncCallback(TrainerCallback):
    """TR-DPO (Gorbatovski et al. 2024, Eq. 4, soft update): every ``ref_model_sync_steps`` optimizer steps,
    π_ref ← α·π_θ + (1 − α)·π_ref with α = ``ref_model_mixup_alpha``, as TRL's SyncRefModelCallback. Every rank
    holds the same policy after the step, so every rank's reference stays identical."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    @torch.no_grad()
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % args.ref_model_sync_steps != 0:
            return
        policy = unwrap(self.trainer.accelerator.unwrap_model(self.trainer.model))
        reference = unwrap(self.trainer.ref_model)
        alpha = args.ref_model_mixup_alpha
        for ref_param, param in zip(reference.parameters(), policy.parameters(), strict=True):
            ref_param.mul_(1.0 - alpha).add_(param.to(ref_param.dtype), alpha=alpha)
