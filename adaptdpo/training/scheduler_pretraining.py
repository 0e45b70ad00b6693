"""SamS scheduler pre-training (App. F.3 of the SamS paper): the loss of ``sams_pretrain: sft | frozen``.

A mixin of :class:`adaptdpo.training.trainer.AdaptiveDPOTrainer` (it reads the trainer's attributes set in
its ``__init__``)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from adaptdpo.methods.sams.contexts import layer_contexts
from adaptdpo.training.trainer_mixin import TrainerMixin

if TYPE_CHECKING:
    from adaptdpo.methods.policies import SamsPolicy


class SchedulerPretrainingMixin(TrainerMixin):
    def _scheduler_pretraining_loss(self, model: torch.nn.Module, inputs: dict[str, Tensor], training: bool,
                                    num_items_in_batch: Any) -> Tensor:
        """SamS scheduler pre-training (App. F.3): SFT on the chosen responses (``sams_pretrain: sft``) or a
        frozen policy (``frozen``); the scheduler learns from every round's contexts and SFT loss.

        The SFT loss of a pair is its chosen response's mean token NLL; the step's loss is their mean."""
        n = inputs["input_ids"].shape[0] // 2
        chosen = {k: inputs[k][:n] for k in ("input_ids", "attention_mask", "completion_mask")}
        frozen = self.args.sams_pretrain == "frozen"
        with torch.no_grad() if frozen else contextlib.nullcontext():
            out = self._logps(model, chosen, output_hidden_states=training, head_chunk=self.head_chunk)
        nll = -out.logps / out.lengths.clamp(min=1).to(out.logps.dtype)
        m = self._metrics["train" if training else "eval"]
        m["sft/nll"].append(nll.detach().mean())
        m["logps/chosen"].append(out.logps.detach().mean())
        if training:

            mask = chosen["attention_mask"]  # both "branches" are the chosen row: n hidden rows, 2n masks
            contexts = layer_contexts(out.outputs.hidden_states, torch.cat([mask, mask]),
                                      self.args.sams_context_combine)
            out.outputs.hidden_states = None
            everything = self._gather(torch.stack([out.logps.detach().float(), nll.detach().float()], 1))[0]
            policy = cast("SamsPolicy", self.step_policy)  # sams_pretrain trains SamS's scheduler
            metrics = policy.pretrain_round(self._gather(contexts)[0], everything[:, 0],
                                           float(everything[:, 1].mean()))
            for key, value in metrics.items():
                m[key].append(value)
        if frozen and training:  # the policy stays fixed: a loss with no graph into it, so no gradient
            return nll.detach().mean().clone().requires_grad_(True)
        ones = torch.ones_like(nll)
        return self._reduce(nll, ones, training, num_items_in_batch)
