"""TRL's metrics (kept as device tensors until logged), their logging, and the pair trace
(pairs.jsonl: every trained micro-batch's margins, β and trained mask).

A mixin of :class:`adaptdpo.training.trainer.AdaptiveDPOTrainer` (it reads the trainer's attributes set in
its ``__init__``)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor

from adaptdpo.methods.losses import holder_contamination
from adaptdpo.methods.step_policy import PairView, StepPlan
from adaptdpo.training.trainer_mixin import TrainerMixin


class StepMetricsMixin(TrainerMixin):
    def _write_trace(self, view: PairView, plan: StepPlan, extras: dict[str, Any] | None) -> None:
        """Buffer one record per training micro-batch (tensors: no host synchronisation here); written to
        pairs.jsonl by :meth:`flush_trace` when metrics are logged and before every checkpoint."""
        margins = self.args.beta * (view.chosen_logratios - view.rejected_logratios)
        trained = torch.ones_like(margins, dtype=torch.bool) if plan.train_mask is None else plan.train_mask
        self._trace_buffer.append((self.state.global_step + 1, margins, trained, plan.beta,
                                   (extras or {}).get("pair_id")))

    def flush_trace(self) -> None:
        if not self._trace_buffer or self._trace_path is None:
            return
        os.makedirs(os.path.dirname(self._trace_path), exist_ok=True)
        with open(self._trace_path, "a", encoding="utf-8") as fh:
            for step, margins, trained, beta, pair_id in self._trace_buffer:
                beta_value = beta.tolist()
                record = {"step": step, "margin": [round(m, 6) for m in margins.tolist()],
                          "trained": trained.int().tolist(),
                          "beta": [round(b, 6) for b in beta_value] if isinstance(beta_value, list) else beta_value}
                if pair_id is not None:
                    record["pair_id"] = pair_id.tolist()
                fh.write(json.dumps(record) + "\n")
        self._trace_buffer.clear()

    def _record_metrics(self, mode: str, chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen: Tensor,
                        ref_rejected: Tensor, plan: StepPlan, gathered: Tensor | None = None) -> None:
        """Metrics as 0-dim tensors on the device: no host-device synchronisation until they are logged.

        ``gathered``: the global log-probs the step already gathered (training); evaluation gathers here with
        ``gather_for_metrics``, which drops the samples repeated to even out the last batch.
        """
        if gathered is None:
            local = torch.stack([chosen_logps.detach(), rejected_logps.detach(), ref_chosen.detach(),
                                 ref_rejected.detach()], 1).float()
            gathered = self.accelerator.gather_for_metrics(local) if mode == "eval" else self.accelerator.gather(local)
        allv = torch.stack([gathered[:, 0], gathered[:, 1], gathered[:, 0] - gathered[:, 2],
                            gathered[:, 1] - gathered[:, 3]], 1)
        beta = self.args.beta
        chosen_rewards, rejected_rewards = beta * allv[:, 2], beta * allv[:, 3]
        m = self._metrics[mode]
        m["rewards/chosen"].append(chosen_rewards.mean())
        m["rewards/rejected"].append(rejected_rewards.mean())
        m["rewards/margins"].append((chosen_rewards - rejected_rewards).mean())
        m["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean())
        m["logps/chosen"].append(allv[:, 0].mean())
        m["logps/rejected"].append(allv[:, 1].mean())
        if "holder" in self.args.loss_type:  # Hölder-DPO's contamination-ratio estimate ε̂ = 1 − ξ̂ (docs/metrics.md)
            step_beta = plan.beta.detach().to(allv.device)
            if step_beta.numel() not in (1, allv.shape[0]):  # per-pair β of this rank only: the configured β
                step_beta = torch.tensor(self.args.beta, device=allv.device)
            m["holder/contamination"].append(holder_contamination(step_beta * (allv[:, 2] - allv[:, 3]),
                                                                  self.args.holder_gamma))
        for key, value in plan.metrics.items():
            m[key].append(value)

    def _record_token_metrics(self, mode: str, stats: Any, inputs: dict[str, Tensor]) -> None:
        """TRL's ``entropy``, ``logits/chosen|rejected``, ``mean_token_accuracy`` (token-weighted over all ranks) and
        ``num_tokens`` (training tokens so far, counted as TRL's stacked rows hold them: the prompt twice)."""
        m = self._metrics[mode]
        if stats is not None:
            sums = torch.stack([v.float() for v in stats.values()])
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.gather(sums[None]).sum(dim=0)
            m["entropy"].append(sums[0] / sums[1].clamp(min=1))
            m["logits/chosen"].append(sums[2] / sums[3].clamp(min=1))
            m["logits/rejected"].append(sums[4] / sums[5].clamp(min=1))
            m["mean_token_accuracy"].append(sums[6] / sums[3].clamp(min=1))
        if mode == "train":
            tokens = inputs["attention_mask"].sum()
            if "segment_ids" in inputs:  # the packed row holds the prompt once; TRL's stacked rows hold it twice
                tokens = tokens + (inputs["segment_ids"] == 1).sum()
            tokens = tokens.float().reshape(1)
            if self.accelerator.num_processes > 1:
                tokens = self.accelerator.gather(tokens)
            self._tokens_this_run = tokens.sum() + (0 if self._tokens_this_run is None else self._tokens_this_run)
        # as TRL, evaluation logs it too (eval_num_tokens): the training tokens so far
        this_run = 0.0 if self._tokens_this_run is None else self._tokens_this_run
        m["num_tokens"] = [this_run + self.run_totals.get("num_tokens", 0.0)]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        averaged = {}
        for key, values in self._metrics[mode].items():
            if values:
                tensors = [v if isinstance(v, Tensor) else torch.tensor(float(v)) for v in values]
                averaged[key] = torch.stack([v.detach().float().cpu() for v in tensors]).mean().item()
        if mode == "eval":  # TRL's names (eval_<metric>) and, for a named eval set, also eval_<name>_<metric>
            prefix = next((k[: -len("loss")] for k in logs if k.startswith("eval") and k.endswith("_loss")), "eval_")
            named = {f"eval_{key}": value for key, value in averaged.items()}
            if prefix != "eval_":
                named.update({f"{prefix}{key}": value for key, value in averaged.items()})
            averaged = named
        logs.update(averaged)  # in place: evaluate() returns this same dict
        if "train_loss" in logs:  # the final log: the mean over every step of the run, across resumes
            steps_now = self.state.global_step - getattr(self, "_initial_global_step", 0)
            total = self.run_totals["loss_sum"] + logs["train_loss"] * steps_now
            logs["train_loss"] = total / max(self.state.global_step, 1)
        self._check_not_stalled(logs)
        if self.is_world_process_zero():
            self.flush_trace()
        super().log(logs, start_time)
        self._metrics[mode].clear()
