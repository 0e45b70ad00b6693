"""AdaptiveDPOTrainer: a ``transformers.Trainer`` whose loss is a pairwise preference loss.

The step, per training micro-batch:

1. one policy forward over the stacked [chosen; rejected] batch → summed completion log-probs;
2. reference log-probs: a no-grad forward of the frozen reference, the LoRA base (adapters off), or
   values precomputed once and cached on disk;
3. the step policy (:mod:`adaptdpo.methods.step_policy`) sees the detached log-ratios of the *global*
   micro-batch and returns β (scalar or per pair) and which pairs to train on;
4. per-pair losses from :func:`adaptdpo.methods.losses.combined_preference_loss` (one loss type or TRL's weighted
   list); the loss is their sum over trained pairs divided by the number of pairs trained on in the whole
   optimizer step (all micro-batches, all ranks), so gradient accumulation and data parallelism give the
   same update as one big batch.

Metrics use TRL's names; the ``rewards/*`` metrics use the base β of the config.

This module keeps construction, ``compute_loss``, the step plan, the reduction and SamS's subset forward. The batch
layout (shared-prompt, padding-free or stacked rows; the chunked head) is decided by plain functions of
:mod:`~adaptdpo.training.batch_layout`. The rest of the trainer is mixins in their own modules, each one concern:
the reference, its placement and log-probs (:mod:`~adaptdpo.training.reference_logps`), the frozen-prefix cache
(:mod:`~adaptdpo.training.prefix_caching`), SamS scheduler pre-training
(:mod:`~adaptdpo.training.scheduler_pretraining`), metrics and the pair trace (:mod:`~adaptdpo.training.step_metrics`),
stalled runs and run totals (:mod:`~adaptdpo.training.run_guards`), checkpoints and resume
(:mod:`~adaptdpo.training.checkpoint_hooks`), the Hub (:mod:`~adaptdpo.training.hub`).

Private ``Trainer`` hooks overridden, and why (each is re-checked when transformers is upgraded; the pin is in
pyproject.toml):

- ``_get_num_items_in_batch`` (here): the loss's denominator is the pairs (or pair weights) trained on in the whole
  optimizer step, over micro-batches and ranks, not transformers' token count;
- ``_get_grad_norm`` (run_guards): counts optimizer steps with a gradient of exactly 0, to stop a stalled run;
- ``_save_checkpoint``, ``_load_from_checkpoint``, ``_load_optimizer_and_scheduler`` (checkpoint_hooks): our state
  (step policy, run totals, a moved TR-DPO reference) beside transformers', a completion marker before rotation,
  the objective checked on resume, an accepted new learning rate carried into the restored schedule;
- ``_push_from_checkpoint`` (hub): uploads only the model files, not the run directory's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor
from transformers import Trainer

if TYPE_CHECKING:
    from transformers.trainer_pt_utils import AcceleratorConfig

from adaptdpo.data.collate import pairs_in_batch, stacked_rows
from adaptdpo.methods.epsilon_dpo import PERTURBED_KEY
from adaptdpo.methods.losses import BATCH_COUPLED_LOSSES, combined_preference_loss
from adaptdpo.methods.registry import build_step_policy
from adaptdpo.methods.sams.contexts import layer_contexts
from adaptdpo.methods.step_policy import PairView, StepPlan, StepPolicy
from adaptdpo.models.loading import disable_dropout
from adaptdpo.models.pair_logps_cache import PairLogpsCache
from adaptdpo.models.partial import freeze_below_top, lora_on_top
from adaptdpo.models.prefix_cache import PrefixCache
from adaptdpo.models.sequence_logps import SequenceLogps, branch_pooling_masks, perturbed_logratios
from adaptdpo.models.sources import load_encoder_backbone
from adaptdpo.training.batch_layout import default_collator, head_chunk_size
from adaptdpo.training.checkpoint_hooks import CheckpointMixin
from adaptdpo.training.config import AdaptiveDPOConfig
from adaptdpo.training.hub import HubMixin
from adaptdpo.training.inputs import (
    apply_peft,
    frozen_copy,
    prepare_dataset,
    resolve_args,
    resolve_model,
    resolve_tokenizer,
)
from adaptdpo.training.prefix_caching import PrefixCacheMixin
from adaptdpo.training.reference_logps import ReferenceLogpsMixin
from adaptdpo.training.run_dir import PAIR_TRACE_FILE
from adaptdpo.training.run_guards import RunGuardsMixin
from adaptdpo.training.safeguards import router_aux_loss_coefficient
from adaptdpo.training.scheduler_pretraining import SchedulerPretrainingMixin
from adaptdpo.training.step_metrics import StepMetricsMixin

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StepPairs:
    """This rank's per-pair tensors of a step, by name: the policy's and the reference's summed completion log-probs,
    the completion lengths, and the optional per-pair factors (WPO's weight; the data's loss weight)."""

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    wpo_weight: Tensor | None = None
    pair_weight: Tensor | None = None

    def select(self, index: Tensor) -> StepPairs:
        """The pairs at ``index`` (every tensor indexed alike)."""
        values: dict[str, Any] = {f.name: None if (v := getattr(self, f.name)) is None else v[index]
                                  for f in dataclasses.fields(self)}
        return StepPairs(**values)


def _is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class AdaptiveDPOTrainer(ReferenceLogpsMixin, PrefixCacheMixin, SchedulerPretrainingMixin, StepMetricsMixin,
                         RunGuardsMixin, CheckpointMixin, HubMixin, Trainer):
    """Preference optimisation with a pluggable per-step policy (DPO, β-DPO, SamS)."""

    # compute_loss already divides by the number of pairs of the whole optimizer step
    loss_is_scaled_for_ga = True

    def __init__(self, model: torch.nn.Module | str, ref_model: torch.nn.Module | None = None,
                 args: AdaptiveDPOConfig | Any = None, data_collator: Any = None, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None, compute_metrics: Any = None,
                 callbacks: list | None = None, optimizers: tuple[Any, Any] = (None, None),
                 quantization_config: Any = None, peft_config: Any = None, step_policy: StepPolicy | None = None):
        """TRL 1.16 ``DPOTrainer``'s signature (same order and names), plus ``step_policy``.

        ``model`` may be a name or path; ``args`` may be None or a ``trl.DPOConfig``; without ``ref_model`` the
        reference is a frozen copy of the initial policy (the adapter-disabled base with ``peft_config`` or a PEFT
        model); datasets may be raw ``datasets`` objects in TRL's formats (see :mod:`adaptdpo.training.inputs`).
        """

        args = resolve_args(args, model)
        model = resolve_model(model, args, quantization_config)
        if processing_class is not None or data_collator is None:
            processing_class = resolve_tokenizer(processing_class, model, args)
        if peft_config is not None:
            from transformers import set_seed

            set_seed(args.seed)  # the adapter's random initialisation, as TRL
        model, ref_model = self._prepare_policy(model, ref_model, args, peft_config)
        train_dataset, eval_dataset = self._prepare_datasets(train_dataset, eval_dataset, processing_class, args)
        self.router_aux_loss_coef = router_aux_loss_coefficient(model, args)
        self.head_chunk = head_chunk_size(args, model)
        if data_collator is None:
            data_collator = default_collator(args, model, ref_model, processing_class, self.router_aux_loss_coef)
        if args.ignore_bias_buffers:  # TRL's DDP workaround: boolean buffers (attention masks) stay out of the sync
            ignored = [name for name, buffer in model.named_buffers() if buffer.dtype == torch.bool]
            model._ddp_params_and_buffers_to_ignore = ignored  # type: ignore[assignment]  # a plain attribute DDP reads
        if args.disable_dropout:
            disable_dropout(model)
            if ref_model is not None:
                disable_dropout(ref_model)
        if ref_model is model:
            raise ValueError("ref_model must be a separate copy of the policy, not the same object")
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         compute_metrics=compute_metrics, optimizers=optimizers)
        if self.head_chunk and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            logger.info("lm_head_chunk_size: the plain LM head under FSDP / DeepSpeed (the head's weight is sharded)")
            self.head_chunk = None
        self._prefix_caches: dict[int, PrefixCache] = {}
        self.step_policy: StepPolicy = self._checked_step_policy(step_policy or build_step_policy(
            args, load_encoder_backbone))
        self._trace_path = os.path.join(args.output_dir, PAIR_TRACE_FILE) if args.trace_pairs else None
        self._trace_buffer: list[tuple] = []
        self._metrics: dict[str, defaultdict[str, list[Tensor | float]]] = {"train": defaultdict(list),
                                                                            "eval": defaultdict(list)}
        self.ref_model: torch.nn.Module | None = None
        # whole-run totals of the invocations before this one (restored from the checkpoint resumed from)
        self.run_totals = {"loss_sum": 0.0, "train_time_s": 0.0}
        self._invocation_start = time.time()
        self._zero_grad_streak: Tensor | None = None  # on the device: no host sync per step
        self._tokens_this_run: Tensor | None = None  # training tokens of this invocation (num_tokens), on the device
        self.peft_reference = ref_model is None and _is_peft_model(model)
        self._place_reference(ref_model, model, args, train_dataset, eval_dataset)
        if self.partial_training is not None and args.prefix_cache:
            self._attach_prefix_caches(model)
        self._ref_logps_cache: PairLogpsCache | None = self._reference_logps_cache(args)
        if args.sync_ref_model:
            self._attach_reference_sync()

    def _prepare_policy(self, model: torch.nn.Module, ref_model: torch.nn.Module | None, args: AdaptiveDPOConfig,
                        peft_config: Any) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        """The reference copied when none is given (before LoRA wraps the policy), LoRA applied (on the top K blocks
        with ``trainable_layers``), the blocks below the top K frozen; sets ``partial_training``."""
        needs_copy = (ref_model is None and peft_config is None and not _is_peft_model(model)
                      and not args.precompute_ref_log_probs and args.sams_pretrain == "none")
        if needs_copy:
            ref_model = frozen_copy(model)
        if peft_config is not None and args.trainable_layers is not None:  # LoRA on the top K blocks only
            peft_config = lora_on_top(peft_config, model, args.trainable_layers)
        model = apply_peft(model, peft_config)
        self.partial_training = None
        if args.trainable_layers is not None and not _is_peft_model(model):
            self.partial_training = freeze_below_top(model, args.trainable_layers)
            logger.info(self.partial_training.describe())
        if _is_peft_model(model) and args.gradient_checkpointing:
            peft_model: Any = model  # a PEFT model: its methods are not nn.Module's
            peft_model.enable_input_require_grads()  # as TRL: checkpointed layers need an input that requires grad
        return model, ref_model

    @staticmethod
    def _prepare_datasets(train_dataset: Any, eval_dataset: Any, processing_class: Any,
                          args: AdaptiveDPOConfig) -> tuple[Any, Any]:
        """TRL's dataset inputs validated and tokenised (a stream: dispatched per process, as TRL)."""
        import datasets

        if isinstance(train_dataset, datasets.IterableDataset):
            if args.precompute_ref_log_probs:
                raise ValueError("precompute_ref_log_probs needs the whole training set up front; a streamed "
                                 "IterableDataset has none: use a Dataset, or a live reference")
            # as TRL: batches of a stream cannot be dispatched from one process (they are not concatenable)
            cast("AcceleratorConfig", args.accelerator_config).dispatch_batches = False  # one after __post_init__
        train_dataset = prepare_dataset(train_dataset, processing_class, args, "train_dataset", pair_columns=True)
        eval_dataset = prepare_dataset(eval_dataset, processing_class, args, "eval_dataset")
        return train_dataset, eval_dataset

    def _checked_step_policy(self, policy: StepPolicy) -> StepPolicy:
        """The step policy, checked against the protocol; a policy that reads hidden states gets rank 0's
        decisions broadcast."""
        missing = [a for a in ("needs_contexts", "mode", "broadcast", "plan", "num_trained", "state_dict",
                               "load_state_dict") if not hasattr(policy, a)]
        if missing:
            raise TypeError(f"step_policy {type(policy).__name__} lacks {', '.join(missing)} of the "
                            "StepPolicy protocol (subclass adaptdpo.methods.step_policy.StepPolicyBase for the "
                            "defaults)")
        if policy.needs_contexts:  # rank 0's decision is everyone's
            from accelerate.utils import broadcast

            policy.broadcast = broadcast if self.accelerator.num_processes > 1 else None
        return policy

    # ------------------------------------------------------------------------------------ the step

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Tensor | None:
        """Pairs trained on in this optimizer step, summed over micro-batches and ranks: the loss's denominator.

        With per-pair weights (weight_column) it is their sum instead: over every micro-batch and rank of the step,
        Σ_i w_i · k/n, where k of a micro-batch's n pairs are trained on (k = n, so exactly Σ w_i, unless a method
        selects pairs; all weights 1: exactly the pairs trained on, as without weights)."""
        if not any("weight" in batch for batch in batch_samples):
            total = 0
            for batch in batch_samples:
                local = torch.tensor([pairs_in_batch(batch)], device=device)
                n_global = (int(self.accelerator.gather(local).sum()) if self.accelerator.num_processes > 1
                            else int(local))
                total += self.step_policy.num_trained(n_global)
            return torch.tensor(total, device=device)
        weighted = torch.zeros((), dtype=torch.float64, device=device)
        for batch in batch_samples:
            local = torch.stack([torch.tensor(float(pairs_in_batch(batch)), dtype=torch.float64, device=device),
                                 batch["weight"].to(device, torch.float64).sum()])[None]
            n_global, weight = (self.accelerator.gather(local).sum(dim=0) if self.accelerator.num_processes > 1
                                else local[0]).tolist()
            weighted += weight * self.step_policy.num_trained(int(n_global)) / n_global
        return weighted.clamp(min=1e-12).float()  # a step whose pairs all weigh 0 trains on nothing (loss 0)

    def _gather(self, tensor: Tensor) -> tuple[Tensor, int]:
        """All ranks' values in rank order, and where this rank's slice starts."""
        if self.accelerator.num_processes == 1:
            return tensor, 0
        sizes = self.accelerator.gather(torch.tensor([tensor.shape[0]], device=tensor.device)).tolist()
        offset = sum(sizes[: self.accelerator.process_index])
        if len(set(sizes)) == 1:
            return self.accelerator.gather(tensor), offset
        padded = self.accelerator.gather(self.accelerator.pad_across_processes(tensor, dim=0))
        width = max(sizes)
        return torch.cat([padded[i * width : i * width + s] for i, s in enumerate(sizes)]), offset

    def plan_step(self, chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                  training: bool, extras: dict[str, Any] | None = None) -> tuple[StepPlan, slice, Tensor | None]:
        """Ask the step policy for β and the trained pairs, from the global micro-batch.

        Returns the plan, this rank's slice of the global batch, and the gathered [n_global, 4] log-probs
        (policy chosen, rejected; reference chosen, rejected), which the training metrics reuse. Evaluation
        plans nothing (base β, every pair) and gathers nothing here.
        """
        local = torch.stack([chosen_logps.detach().float(), rejected_logps.detach().float(),
                             ref_chosen.detach().float(), ref_rejected.detach().float()], dim=1)
        if not training:
            return StepPlan(beta=torch.tensor(self.args.beta, device=local.device)), slice(0, local.shape[0]), None
        everything, offset = self._gather(local)
        mine = slice(offset, offset + local.shape[0])
        if not torch.isfinite(everything).all():
            raise FloatingPointError(f"non-finite log-probs at step {self.state.global_step + 1}: the policy or the "
                                     "reference produced NaN/inf (check the learning rate and the precision)")
        view = PairView(chosen_logratios=everything[:, 0] - everything[:, 2],
                        rejected_logratios=everything[:, 1] - everything[:, 3],
                        chosen_logps=everything[:, 0], rejected_logps=everything[:, 1],
                        base_beta=self.args.beta, extras=extras or {})
        plan = self.step_policy.plan(view)
        if self._trace_path is not None and self.is_world_process_zero():
            self._write_trace(view, plan, extras)
        return plan, mine, everything



    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Tensor], return_outputs: bool = False,
                     num_items_in_batch: Tensor | int | None = None) -> Tensor | tuple[Tensor, Any]:
        mode = "train" if model.training else "eval"
        training = mode == "train"
        if self.args.sams_pretrain != "none":
            loss = self._scheduler_pretraining_loss(model, inputs, training, num_items_in_batch)
            return (loss, None) if return_outputs else loss
        wants_contexts = training and self.step_policy.needs_contexts
        subset = wants_contexts and self.step_policy.mode == "subset"
        context_source = self.args.sams_context_source if wants_contexts else None
        perturbation = getattr(self.step_policy, "perturbation", None) if training else None  # ε-DPO's ε
        # subset mode: this forward only scores the pairs; the gradient comes from a second, smaller one
        router = {"output_router_logits": True} if self.router_aux_loss_coef else None
        with torch.no_grad() if subset else contextlib.nullcontext():
            policy = self._logps(model, inputs, output_hidden_states=context_source == "policy",
                                    token_stats=self.args.token_metrics, ld_alpha=self.args.ld_alpha,
                                    wpo=self.args.use_weighting, model_kwargs=None if subset else router,
                                    head_chunk=self.head_chunk, keep_window=perturbation is not None)
        aux_loss = getattr(policy.outputs, "aux_loss", None) if router else None
        chosen_logps, rejected_logps = policy.split()
        chosen_lengths, rejected_lengths = policy.lengths.chunk(2, dim=0)
        ref_chosen, ref_rejected, ref_outputs, ref_scored = self.reference_logps(
            inputs, output_hidden_states=context_source == "reference", keep_window=perturbation is not None)
        ref_chosen, ref_rejected = ref_chosen.to(chosen_logps.dtype), ref_rejected.to(chosen_logps.dtype)
        extras: dict[str, Any] = {}
        if perturbation is not None:  # ε-DPO: the perturbed policies' log-ratios from both forwards' logits
            extras.update(self._perturbation_extras(policy, ref_scored, perturbation))
            ref_scored = None
        if training and self._trace_path is not None and "pair_id" in inputs:
            extras["pair_id"] = self._gather(inputs["pair_id"])[0]
        if context_source is not None:
            outputs = policy.outputs if context_source == "policy" else ref_outputs
            extras["contexts"] = self._gather(self._sams_contexts(outputs, inputs, context_source, model))[0]
        plan, mine, gathered = self.plan_step(chosen_logps, rejected_logps, ref_chosen, ref_rejected, training, extras)
        beta = plan.beta.to(chosen_logps.device)
        if beta.dim() == 1:
            beta = beta[mine]
        if training and "beta" in inputs:  # beta_column: the pair's β replaces the configured one; a method's β/β0
            beta = inputs["beta"].to(chosen_logps) * (beta / self.args.beta)  # (β-DPO, ε-DPO) multiplies it
        pairs = StepPairs(chosen_logps, rejected_logps, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths)
        if self.args.use_weighting:  # WPO (Zhou et al. 2024, Eq. 2): w = exp(mean aligned log p)(y_w)·(same)(y_l)
            assert policy.wpo_mean is not None  # scored with wpo=use_weighting
            chosen_wpo, rejected_wpo = policy.wpo_mean.chunk(2, dim=0)
            pairs.wpo_weight = torch.exp(chosen_wpo + rejected_wpo).to(chosen_logps.dtype)
        if training and "weight" in inputs:  # weight_column: a loss weight per pair
            pairs.pair_weight = inputs["weight"].to(chosen_logps)
        keep = None if plan.train_mask is None else plan.train_mask[mine].to(chosen_logps.device)
        if subset:
            pairs, beta, keep, aux_loss = self._subset_forward(model, inputs, pairs, beta, keep, router)
        if keep is not None and any(t in BATCH_COUPLED_LOSSES for t in self.args.loss_type):
            # AOT sorts the pairs of its batch, kto_pair averages them: their batch is the kept pairs
            kept = keep.nonzero().squeeze(1)
            pairs = pairs.select(kept)
            beta = beta[kept] if beta.dim() == 1 else beta
            keep = None
        losses = combined_preference_loss(pairs.chosen, pairs.rejected, pairs.ref_chosen, pairs.ref_rejected, beta,
                                          self.args.loss_type, self.args.loss_weights,
                                          label_smoothing=self.args.label_smoothing,
                                          chosen_lengths=pairs.chosen_lengths,
                                          rejected_lengths=pairs.rejected_lengths, discopop_tau=self.args.discopop_tau,
                                          f_divergence_type=self.args.f_divergence_type,
                                          f_alpha_divergence_coef=self.args.f_alpha_divergence_coef,
                                          sigmoid_label_smoothing=self.args.sigmoid_label_smoothing,
                                          holder_gamma=self.args.holder_gamma)
        if pairs.wpo_weight is not None:
            losses = losses * pairs.wpo_weight
        weights = torch.ones_like(losses) if keep is None else keep.to(losses.dtype)
        if pairs.pair_weight is not None:  # Σ w_i·ℓ_i over the pairs trained on / the step's weight sum
            weights = weights * pairs.pair_weight  # (_get_num_items_in_batch)
        loss = self._reduce(losses * weights, weights, training, num_items_in_batch)
        if aux_loss is not None:  # MoE router load balancing (TRL adds it to its per-micro-batch mean loss)
            loss = loss + self.router_aux_loss_coef * aux_loss / self._micro_batches_per_step(training,
                                                                                              num_items_in_batch)
            self._metrics[mode]["aux_loss"].append(self._gather(aux_loss.detach().float()[None])[0].mean())
        self._record_metrics(mode, chosen_logps, rejected_logps, ref_chosen, ref_rejected, plan, gathered)
        self._record_token_metrics(mode, policy.stats, inputs)
        return (loss, None) if return_outputs else loss

    def _perturbation_extras(self, policy: SequenceLogps, ref_scored: SequenceLogps | None,
                             perturbation: float) -> dict[str, Any]:
        """ε-DPO's inputs to its plan: the perturbed policies' log-ratios of the global micro-batch, from the logits
        of both forwards (no extra forward), and the step; the scored windows are then released."""
        if ref_scored is None:
            raise ValueError("method epsilon_dpo needs a reference forward (its logits), not precomputed "
                             "reference log-probs")
        extras = {PERTURBED_KEY: self._gather(perturbed_logratios(policy, ref_scored, perturbation))[0],
                  "global_step": self.state.global_step}
        policy.window = policy.rescore = None  # what backward needs, autograd keeps
        return extras

    def _sams_contexts(self, outputs: Any, inputs: dict[str, Tensor], source: str, model: torch.nn.Module) -> Tensor:
        """SamS's per-pair contexts from the ``source`` model's hidden states (the trained blocks' only, with
        ``trainable_layers``: the frozen ones may be skipped by the prefix cache); the states are then released."""
        if getattr(outputs, "hidden_states", None) is None:
            raise ValueError(f"method {self.args.method} reads the hidden states of the {source} model, "
                             f"but {type(self.accelerator.unwrap_model(model)).__name__} returned none for "
                             "output_hidden_states=True; use a transformers causal LM that returns them, or "
                             "sams_context_source=" + ("reference" if source == "policy" else "policy"))
        pool = branch_pooling_masks(inputs["segment_ids"]) if "segment_ids" in inputs else inputs["attention_mask"]
        hidden = outputs.hidden_states
        if self.partial_training is not None:
            hidden = hidden[self.partial_training.frozen_blocks:]
        contexts = layer_contexts(hidden, pool, self.args.sams_context_combine)
        outputs.hidden_states = None
        return contexts

    def _micro_batches_per_step(self, training: bool, num_items_in_batch: Any) -> int:
        """The micro-batches of this optimizer step, by which a per-micro-batch loss term is divided (as the Trainer
        divides a loss not scaled for accumulation); 1 outside training."""
        if not training or num_items_in_batch is None:
            return 1
        return int(getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps))

    def _reduce(self, weighted: Tensor, weights: Tensor, training: bool, num_items_in_batch: Any) -> Tensor:
        if training and num_items_in_batch is not None:
            # sum / (pairs trained on in the whole optimizer step); DDP averages gradients over ranks, so
            # multiply back by the number of processes to get the global mean
            return weighted.sum() / num_items_in_batch * self.accelerator.num_processes
        return weighted.sum() / weights.sum().clamp(min=1e-12)  # a mask's sum is 0 or >= 1; pair weights need not

    def _subset_forward(self, model: torch.nn.Module, inputs: dict[str, Tensor], pairs: StepPairs,
                        beta: Tensor, keep: Tensor | None, model_kwargs: dict[str, Any] | None = None,
                        ) -> tuple[StepPairs, Tensor, Tensor | None, Tensor | None]:
        """SamS subset mode: forward and backward on this rank's selected pairs only.

        Returns the per-pair inputs of the loss restricted to those pairs (policy log-probs now with
        gradient), their β, their weights, and the MoE router loss of this forward (None unless asked for with
        ``model_kwargs``). A rank with no selected pair still runs one pair with weight 0, so that every rank takes
        part in the gradient all-reduce.
        """
        n, device = pairs.chosen.shape[0], pairs.chosen.device
        index = torch.arange(n, device=device) if keep is None else keep.nonzero().squeeze(1)
        weights = None
        if index.numel() == 0:
            index = torch.zeros(1, dtype=torch.long, device=device)
            weights = torch.zeros(1, dtype=torch.bool, device=device)
        if "segment_ids" in inputs:  # packed: one row per pair
            sub = {k: inputs[k][index] for k in ("input_ids", "attention_mask", "segment_ids", "position_ids")}
        else:
            rows = torch.cat([index, index + n])
            sub = {k: inputs[k][rows] for k in ("input_ids", "attention_mask", "completion_mask")}
        width = int(sub["attention_mask"].sum(dim=1).max())  # right padding: drop columns no kept row uses
        sub = {k: v[:, :width] for k, v in sub.items()}
        out = self._logps(model, sub, ld_alpha=self.args.ld_alpha, model_kwargs=model_kwargs,
                             head_chunk=self.head_chunk)
        chosen, rejected = out.split()
        selected = dataclasses.replace(pairs.select(index), chosen=chosen, rejected=rejected)  # now with gradient
        aux_loss = getattr(out.outputs, "aux_loss", None) if model_kwargs else None
        return selected, beta[index] if beta.dim() == 1 else beta, weights, aux_loss


    # ------------------------------------------------------------------------------------ metrics




    # ------------------------------------------------------------------------------------ stalled runs






    # ------------------------------------------------------------------------------------ hub




    def training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        """One micro-batch's forward and backward; with ``activation_offloading`` the activations saved for
        backward wait in (pinned) CPU memory (``torch.autograd.graph.save_on_cpu``)."""
        if not self.args.activation_offloading:
            return super().training_step(*args, **kwargs)
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return super().training_step(*args, **kwargs)

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """TRL 1.16's: the loss and, unless ``prediction_loss_only`` (transformers sets it when there is no
        ``compute_metrics``), the model's logits over TRL's stacked rows (every pair's [prompt + chosen], then every
        pair's [prompt + rejected], right-padded) and those rows' ``input_ids`` as labels, from a second forward as
        in TRL. In every layout: a packed or padding-free batch is unpacked to the stacked rows first."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
            assert isinstance(loss, Tensor)  # return_outputs=False: the loss alone
            if prediction_loss_only:
                return loss.detach(), None, None
            tokenizer_pad = getattr(self.processing_class, "pad_token_id", None)
            pad: int = getattr(self.data_collator, "pad_token_id", tokenizer_pad if tokenizer_pad is not None else 0)
            rows = stacked_rows(inputs, pad, getattr(self.data_collator, "pad_to_multiple_of", None))
            logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], use_cache=False).logits
        return loss.detach(), logits, rows["input_ids"]

    # ------------------------------------------------------------------------------------ checkpoints





    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """As TRL 1.16: a dataset given here is prepared as at construction (raw rows validated and tokenised, a dict
        evaluated set by set as ``<prefix>_<name>``) and, with ``precompute_ref_log_probs``, gets its reference
        log-probs, which after training without a reference model (nor a PEFT base) is an error, not the trained
        policy's log-probs."""
        if eval_dataset is None or isinstance(eval_dataset, str):  # transformers passes a named eval set's name
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)  # type: ignore[arg-type]  # as str
        if isinstance(eval_dataset, dict):
            metrics: dict[str, float] = {}
            for name, dataset in eval_dataset.items():
                metrics.update(self.evaluate(dataset, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        columns = getattr(eval_dataset, "column_names", None) or []
        if self.args.precompute_ref_log_probs and "ref_chosen_logps" not in columns:
            if self.ref_model is None and not self.peft_reference and self.state.global_step > 0:
                raise ValueError("evaluate(eval_dataset=...) after training with precompute_ref_log_probs and no "
                                 "reference model: the reference is not kept in memory, so its log-probs for a new "
                                 "dataset cannot be computed (the policy has moved). Pass the dataset as eval_dataset "
                                 "at construction, pass a ref_model, or set precompute_ref_log_probs false (as TRL)")
            eval_dataset = prepare_dataset(eval_dataset, self.processing_class, self.args, "eval_dataset")
            reference = self.ref_model if self.ref_model is not None else self.model
            eval_dataset = self._with_reference_logps(reference, eval_dataset, "eval")
        else:
            eval_dataset = prepare_dataset(eval_dataset, self.processing_class, self.args, "eval_dataset")
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

