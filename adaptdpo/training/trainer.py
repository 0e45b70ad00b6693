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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor
from transformers import Trainer

from adaptdpo.data.collate import PreferenceCollator, batch_to, pairs_in_batch, stacked_rows
from adaptdpo.methods.epsilon_dpo import PERTURBED_KEY
from adaptdpo.methods.losses import BATCH_COUPLED_LOSSES, combined_preference_loss, holder_contamination
from adaptdpo.methods.registry import build_step_policy, method_spec
from adaptdpo.methods.sams.contexts import layer_contexts
from adaptdpo.methods.step_policy import PairView, StepPlan, StepPolicy
from adaptdpo.models.attention_masks import supports_shared_prompt
from adaptdpo.models.lm_head import chunkable_head
from adaptdpo.models.loading import disable_dropout
from adaptdpo.models.pair_logps_cache import PairLogpsCache
from adaptdpo.models.partial import freeze_below_top, lora_on_top
from adaptdpo.models.prefix_cache import PrefixCache
from adaptdpo.models.sequence_logps import SequenceLogps, branch_pooling_masks, perturbed_logratios, sequence_logps
from adaptdpo.models.sources import load_encoder_backbone
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
from adaptdpo.training.config import AdaptiveDPOConfig
from adaptdpo.training.config_io import config_defaults
from adaptdpo.training.hub import model_files_only
from adaptdpo.training.inputs import (
    apply_peft,
    frozen_copy,
    prepare_dataset,
    resolve_args,
    resolve_model,
    resolve_tokenizer,
)
from adaptdpo.training.model_card import write_model_card
from adaptdpo.training.reference import is_sharded, prepare_reference
from adaptdpo.training.reference_sync import REFERENCE_STATE_FILE, ReferenceSyncCallback, save_reference
from adaptdpo.training.run_dir import PAIR_TRACE_FILE, objective_changes, read_summary
from adaptdpo.training.safeguards import STALLED_STEPS, TrainingStalledError, router_aux_loss_coefficient

logger = logging.getLogger(__name__)


def _is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class AdaptiveDPOTrainer(Trainer):
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
            model.enable_input_require_grads()  # as TRL: checkpointed layers need an input that requires grad
        import datasets

        if isinstance(train_dataset, datasets.IterableDataset):
            if args.precompute_ref_log_probs:
                raise ValueError("precompute_ref_log_probs needs the whole training set up front; a streamed "
                                 "IterableDataset has none: use a Dataset, or a live reference")
            # as TRL: batches of a stream cannot be dispatched from one process (they are not concatenable)
            args.accelerator_config.dispatch_batches = False
        train_dataset = prepare_dataset(train_dataset, processing_class, args, "train_dataset", pair_columns=True)
        eval_dataset = prepare_dataset(eval_dataset, processing_class, args, "eval_dataset")
        self.router_aux_loss_coef = router_aux_loss_coefficient(model, args)
        self.head_chunk = args.lm_head_chunk_size or None  # 0: the plain head
        if self.head_chunk and chunkable_head(model) is None:
            logger.info("lm_head_chunk_size=%d: %s's LM head is not a plain bias-free Linear holding its whole "
                        "weight (or its logits are transformed after it), so the plain head is used",
                        self.head_chunk, type(unwrap(model)).__name__)
            self.head_chunk = None
        if data_collator is None:
            if processing_class is None:
                raise ValueError("pass processing_class (the tokenizer) or a data_collator")
            shared = self._use_shared_prompt(args, model, ref_model, self.router_aux_loss_coef)
            keep_end = args.max_length if args.truncation_mode == "keep_end" else None
            data_collator = PreferenceCollator(processing_class.pad_token_id, args.pad_to_multiple_of,
                                               shared_prompt=shared,
                                               padding_free=self._use_padding_free(args, model, shared),
                                               keep_end_max_length=keep_end)
        if args.ignore_bias_buffers:  # TRL's DDP workaround: boolean buffers (attention masks) stay out of the sync
            model._ddp_params_and_buffers_to_ignore = [name for name, buffer in model.named_buffers()
                                                       if buffer.dtype == torch.bool]
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
        self.step_policy: StepPolicy = step_policy or build_step_policy(args, load_encoder_backbone)
        missing = [a for a in ("needs_contexts", "mode", "broadcast", "plan", "num_trained", "state_dict",
                               "load_state_dict") if not hasattr(self.step_policy, a)]
        if missing:
            raise TypeError(f"step_policy {type(self.step_policy).__name__} lacks {', '.join(missing)} of the "
                            "StepPolicy protocol (subclass adaptdpo.methods.step_policy.StepPolicyBase for the "
                            "defaults)")
        if self.step_policy.needs_contexts:  # rank 0's decision is everyone's
            from accelerate.utils import broadcast

            self.step_policy.broadcast = broadcast if self.accelerator.num_processes > 1 else None
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
        if args.precompute_ref_log_probs:
            reference = ref_model if ref_model is not None else model
            self.train_dataset = self._with_reference_logps(reference, train_dataset, "train")
            if isinstance(eval_dataset, dict):
                self.eval_dataset = {key: self._with_reference_logps(reference, value, f"eval-{key}")
                                     for key, value in eval_dataset.items()}
            elif eval_dataset is not None:
                self.eval_dataset = self._with_reference_logps(reference, eval_dataset, "eval")
        elif ref_model is not None:  # sharded like the policy under FSDP / ZeRO-3, not replicated
            self.ref_model = prepare_reference(ref_model, self.accelerator)
        elif not self.peft_reference and args.sams_pretrain == "none":
            raise ValueError("AdaptiveDPOTrainer needs a reference: pass ref_model (a frozen copy of the initial "
                             "policy), set precompute_ref_log_probs, or train a PEFT adapter")
        if self.partial_training is not None and args.prefix_cache:
            self._attach_prefix_caches(model)
        self._ref_logps_cache: PairLogpsCache | None = None
        if args.cache_reference_logps and not args.precompute_ref_log_probs:
            if args.sync_ref_model:
                raise ValueError("cache_reference_logps with sync_ref_model (TR-DPO): the reference moves, its "
                                 "log-probs cannot be kept")
            reference = self.ref_model if self.ref_model is not None else self.model
            dtype = "bf16" if args.bf16 else "fp16" if args.fp16 else str(next(reference.parameters()).dtype)
            with self._reference_context():
                self._ref_logps_cache = PairLogpsCache(
                    reference, args.ref_cache_dir or os.path.join(args.output_dir, "ref_logps"),
                    f"peft_base={self.peft_reference} ld_alpha={args.ld_alpha} dtype={dtype}")
        if args.sync_ref_model:
            if self.ref_model is None:
                raise ValueError("sync_ref_model (TR-DPO) needs a separate reference model: not with a PEFT adapter's "
                                 "base or precomputed reference log-probs")
            if is_sharded(self.ref_model):
                raise ValueError("sync_ref_model (TR-DPO) with a sharded reference (FSDP, DeepSpeed ZeRO-3) is not "
                                 "supported: its moving reference is saved whole with each checkpoint. Use DDP "
                                 "(--accelerate_config multi_gpu) or ZeRO-1/2")
            self.add_callback(ReferenceSyncCallback(self))

    def _attach_prefix_caches(self, model: torch.nn.Module) -> None:
        """The frozen-prefix cache (:mod:`adaptdpo.models.prefix_cache`) of the policy and of a separate reference
        whose frozen blocks are the same (entries are shared when the fingerprints agree)."""
        args = self.args
        if args.sync_ref_model:
            raise ValueError("prefix_cache with sync_ref_model (TR-DPO): the reference's lower blocks would move; set "
                             "prefix_cache: false")
        assert self.partial_training is not None
        cache_dir = args.prefix_cache_dir or os.path.join(args.output_dir, "prefix_cache")
        dtype = "bf16" if args.bf16 else "fp16" if args.fp16 else str(next(model.parameters()).dtype)
        frozen = self.partial_training.frozen_blocks
        for target in (model, self.ref_model):
            if target is not None:
                cache = PrefixCache(unwrap(target), frozen, cache_dir, dtype)
                self._prefix_caches[id(unwrap(target))] = cache
        logger.info("frozen-prefix cache of the %d frozen blocks in %s (%s)", frozen, cache_dir, dtype)

    def _logps(self, model: torch.nn.Module, batch: dict[str, Tensor], **kwargs: Any) -> SequenceLogps:
        """:func:`sequence_logps`, from the frozen-prefix cache where ``model`` has one."""
        cache = self._prefix_caches.get(id(unwrap(model)))
        if cache is None:
            return sequence_logps(model, batch, **kwargs)
        with cache.feeding(model, batch, lambda: sequence_logps(model, batch, **kwargs)):
            return sequence_logps(model, batch, **kwargs)

    @staticmethod
    def _use_shared_prompt(args: AdaptiveDPOConfig, model: torch.nn.Module, ref_model: torch.nn.Module | None,
                           router_aux_loss_coef: float = 0.0) -> bool:
        if args.shared_prompt == "off" or args.sams_pretrain != "none":  # pre-training reads chosen rows only
            return False
        if args.truncation_mode == "keep_end" and args.max_length is not None:
            if args.shared_prompt == "on":
                raise ValueError("shared_prompt=on cannot be used with truncation_mode keep_end: each of a pair's two "
                                 "sequences keeps its own last max_length tokens, so they need not share a prompt; "
                                 "use auto or off, or truncation_mode keep_start / keep_prompt_end")
            logger.info("truncation_mode keep_end: the stacked layout (each row of a pair is cut on its own, as TRL)")
            return False
        if router_aux_loss_coef:  # the router's load statistics take a 2D padding mask, not the branch mask
            if args.shared_prompt == "on":
                raise ValueError("shared_prompt=on cannot be used with a mixture-of-experts model's router loss "
                                 "(router_aux_loss_coef): its token counts need the stacked layout; use auto or off, "
                                 "or router_aux_loss_coef 0")
            logger.info("mixture-of-experts model with router_aux_loss_coef %g: the stacked layout (shared_prompt "
                        "off), whose padding mask the router's load-balancing loss reads", router_aux_loss_coef)
            return False
        supported = supports_shared_prompt(model) and (ref_model is None or supports_shared_prompt(ref_model))
        if args.shared_prompt == "on" and not supported:
            raise ValueError("shared_prompt=on needs a transformers model whose attention takes a custom mask "
                             "(attn_implementation eager, sdpa or flex_attention) and position_ids; use auto or off")
        return supported

    @staticmethod
    def _use_padding_free(args: AdaptiveDPOConfig, model: torch.nn.Module, shared_prompt: bool) -> bool:
        """padding_free: True/False as set; unset, on for flex_attention models (block-sparse masks)."""
        if args.padding_free is False:
            return False
        reasons = []
        if not shared_prompt:
            reasons.append("the shared-prompt layout is off (shared_prompt, a model whose attention takes no custom "
                           "mask, a router loss, or truncation_mode keep_end)")
        if method_spec(args.method).reads_hidden_states:
            reasons.append(f"method {args.method} reads per-row hidden states")
        if args.padding_free and reasons:
            raise ValueError(f"padding_free=true cannot be used: {'; '.join(reasons)}")
        attn = getattr(getattr(unwrap(model), "config", None), "_attn_implementation", None)
        use = not reasons and (bool(args.padding_free) or attn == "flex_attention")
        if use:
            logger.info("padding-free batches: every pair of a micro-batch in one row, no pad token computed")
        return use

    # ------------------------------------------------------------------------------------ reference

    def _reference_context(self) -> contextlib.AbstractContextManager:
        if self.peft_reference:
            return self.accelerator.unwrap_model(self.model).disable_adapter()
        return contextlib.nullcontext()

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, Tensor], output_hidden_states: bool = False,
                        keep_window: bool = False) -> tuple[Tensor, Tensor, Any, SequenceLogps | None]:
        """Reference log-probs of a stacked batch (precomputed columns, the reference model, or the LoRA
        base), the reference forward's outputs and its whole result (both None for precomputed values; with
        ``keep_window`` the result holds the scored window, for ε-DPO)."""
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"], None, None
        cache = None if output_hidden_states or keep_window else self._ref_logps_cache  # a hit has no window
        if cache is not None and (hit := cache.get(batch)) is not None:
            return *hit, None, None
        if self.ref_model is None and not self.peft_reference:  # never the trained policy in the reference's place
            raise ValueError("this batch has no precomputed reference log-probs and the trainer keeps no reference "
                             "model (precompute_ref_log_probs): evaluate datasets passed at construction, or through "
                             "evaluate(eval_dataset=...) before training")
        model = self.ref_model if self.ref_model is not None else self.model
        with self._reference_context(), self.compute_loss_context_manager():
            out = self._logps(model, batch, output_hidden_states=output_hidden_states, ld_alpha=self.args.ld_alpha,
                              head_chunk=self.head_chunk, keep_window=keep_window)
        chosen, rejected = out.split()
        if cache is not None:
            cache.put(batch, chosen, rejected)
        return chosen, rejected, out.outputs, out

    def _reference_fingerprint(self, reference: torch.nn.Module, dataset: Any) -> str:
        h = hashlib.sha256()
        for rows in (dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]):
            for ids in rows:
                h.update(bytes(str(ids), "ascii"))
        h.update(repr(sorted(reference.config.to_dict().items())).encode())
        params = list(reference.parameters())
        for param in params[:: max(1, len(params) // 8)]:
            h.update(param.detach().float().cpu().numpy().tobytes())
        h.update(str(self.peft_reference).encode())
        h.update(f"ld_alpha={self.args.ld_alpha}".encode())  # LD-DPO weights the reference's tokens too
        # keep_end rows are cut by the collator, so the ids alone do not say what was scored
        h.update(f"max_length={self.args.max_length} truncation_mode={self.args.truncation_mode}".encode())
        return h.hexdigest()[:20]

    def _with_reference_logps(self, reference: torch.nn.Module, dataset: Any, name: str) -> Any:
        """Add ``ref_chosen_logps``/``ref_rejected_logps`` columns, computed once and cached on disk."""
        cache_dir = self.args.ref_cache_dir or os.path.join(self.args.output_dir, "ref_logps")
        path = os.path.join(cache_dir, f"{name}-{self._reference_fingerprint(reference, dataset)}.pt")
        with self.args.main_process_first(desc=f"reference log-probs ({name})"):
            if not os.path.exists(path):
                chosen, rejected = self._compute_reference_logps(reference, dataset)
                if self.args.should_save:
                    atomic_torch_save({"chosen": chosen, "rejected": rejected}, path)
                logger.info("cached reference log-probs of %d %s pairs in %s", len(chosen), name, path)
            else:
                cached = torch.load(path, weights_only=True)
                chosen, rejected = cached["chosen"], cached["rejected"]
                logger.info("loaded cached reference log-probs from %s", path)
        dataset = dataset.remove_columns([c for c in ("ref_chosen_logps", "ref_rejected_logps")
                                          if c in dataset.column_names])
        dataset = dataset.add_column("ref_chosen_logps", chosen.tolist())
        return dataset.add_column("ref_rejected_logps", rejected.tolist())

    @torch.no_grad()
    def _compute_reference_logps(self, reference: torch.nn.Module, dataset: Any) -> tuple[Tensor, Tensor]:
        from torch.utils.data import DataLoader

        device = self.accelerator.device
        reference = reference.to(device)
        was_training = reference.training
        reference.eval()
        loader = DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size, shuffle=False,
                            collate_fn=self.data_collator)
        chosen, rejected = [], []
        context = self._reference_context() if reference is self.model else contextlib.nullcontext()
        with context:
            for batch in loader:
                batch = batch_to(batch, device)
                c, r = self._logps(reference, batch, ld_alpha=self.args.ld_alpha, head_chunk=self.head_chunk).split()
                chosen.append(c.float().cpu())
                rejected.append(r.float().cpu())
        reference.train(was_training)
        return torch.cat(chosen), torch.cat(rejected)

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
            if ref_scored is None:
                raise ValueError("method epsilon_dpo needs a reference forward (its logits), not precomputed "
                                 "reference log-probs")
            extras[PERTURBED_KEY] = self._gather(perturbed_logratios(policy, ref_scored, perturbation))[0]
            extras["global_step"] = self.state.global_step
            policy.window = policy.rescore = ref_scored = None  # what backward needs, autograd keeps
        if training and self._trace_path is not None and "pair_id" in inputs:
            extras["pair_id"] = self._gather(inputs["pair_id"])[0]
        if context_source is not None:

            outputs = policy.outputs if context_source == "policy" else ref_outputs
            if getattr(outputs, "hidden_states", None) is None:
                raise ValueError(f"method {self.args.method} reads the hidden states of the {context_source} model, "
                                 f"but {type(self.accelerator.unwrap_model(model)).__name__} returned none for "
                                 "output_hidden_states=True; use a transformers causal LM that returns them, or "
                                 "sams_context_source=" + ("reference" if context_source == "policy" else "policy"))
            pool = branch_pooling_masks(inputs["segment_ids"]) if "segment_ids" in inputs else inputs["attention_mask"]
            hidden = outputs.hidden_states
            if self.partial_training is not None:  # the trained blocks' (the frozen ones may be skipped: cache)
                hidden = hidden[self.partial_training.frozen_blocks:]
            contexts = layer_contexts(hidden, pool, self.args.sams_context_combine)
            outputs.hidden_states = None
            extras["contexts"] = self._gather(contexts)[0]
        plan, mine, gathered = self.plan_step(chosen_logps, rejected_logps, ref_chosen, ref_rejected, training, extras)
        beta = plan.beta.to(chosen_logps.device)
        if beta.dim() == 1:
            beta = beta[mine]
        if training and "beta" in inputs:  # beta_column: the pair's β replaces the configured one; a method's β/β0
            beta = inputs["beta"].to(chosen_logps) * (beta / self.args.beta)  # (β-DPO, ε-DPO) multiplies it
        pairs = [chosen_logps, rejected_logps, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths]
        if self.args.use_weighting:  # WPO (Zhou et al. 2024, Eq. 2): w = exp(mean aligned log p)(y_w)·(same)(y_l)
            chosen_wpo, rejected_wpo = policy.wpo_mean.chunk(2, dim=0)
            pairs.append(torch.exp(chosen_wpo + rejected_wpo).to(chosen_logps.dtype))
        pair_weighted = training and "weight" in inputs  # weight_column: a loss weight per pair
        if pair_weighted:
            pairs.append(inputs["weight"].to(chosen_logps))
        keep = None if plan.train_mask is None else plan.train_mask[mine].to(chosen_logps.device)
        if subset:
            pairs, beta, keep, aux_loss = self._subset_forward(model, inputs, pairs, beta, keep, router)
        if keep is not None and any(t in BATCH_COUPLED_LOSSES for t in self.args.loss_type):
            # AOT sorts the pairs of its batch, kto_pair averages them: their batch is the kept pairs
            kept = keep.nonzero().squeeze(1)
            pairs = [t[kept] for t in pairs]
            beta = beta[kept] if beta.dim() == 1 else beta
            keep = None
        losses = combined_preference_loss(*pairs[:4], beta, self.args.loss_type, self.args.loss_weights,
                                          label_smoothing=self.args.label_smoothing, chosen_lengths=pairs[4],
                                          rejected_lengths=pairs[5], discopop_tau=self.args.discopop_tau,
                                          f_divergence_type=self.args.f_divergence_type,
                                          f_alpha_divergence_coef=self.args.f_alpha_divergence_coef,
                                          sigmoid_label_smoothing=self.args.sigmoid_label_smoothing,
                                          holder_gamma=self.args.holder_gamma)
        if self.args.use_weighting:
            losses = losses * pairs[6]
        weights = torch.ones_like(losses) if keep is None else keep.to(losses.dtype)
        if pair_weighted:  # Σ w_i·ℓ_i over the pairs trained on / the step's weight sum (_get_num_items_in_batch)
            weights = weights * pairs[-1]
        loss = self._reduce(losses * weights, weights, training, num_items_in_batch)
        if aux_loss is not None:  # MoE router load balancing (TRL adds it to its per-micro-batch mean loss)
            loss = loss + self.router_aux_loss_coef * aux_loss / self._micro_batches_per_step(training,
                                                                                              num_items_in_batch)
            self._metrics[mode]["aux_loss"].append(self._gather(aux_loss.detach().float()[None])[0].mean())
        self._record_metrics(mode, chosen_logps, rejected_logps, ref_chosen, ref_rejected, plan, gathered)
        self._record_token_metrics(mode, policy.stats, inputs)
        return (loss, None) if return_outputs else loss

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

    def _subset_forward(self, model: torch.nn.Module, inputs: dict[str, Tensor], pairs: list[Tensor],
                        beta: Tensor, keep: Tensor | None, model_kwargs: dict[str, Any] | None = None,
                        ) -> tuple[list[Tensor], Tensor, Tensor | None, Tensor | None]:
        """SamS subset mode: forward and backward on this rank's selected pairs only.

        Returns the per-pair inputs of the loss restricted to those pairs (policy log-probs now with
        gradient), their β, their weights, and the MoE router loss of this forward (None unless asked for with
        ``model_kwargs``). A rank with no selected pair still runs one pair with weight 0, so that every rank takes
        part in the gradient all-reduce.
        """
        n = pairs[0].shape[0]
        index = torch.arange(n, device=pairs[0].device) if keep is None else keep.nonzero().squeeze(1)
        weights = None
        if index.numel() == 0:
            index = torch.zeros(1, dtype=torch.long, device=pairs[0].device)
            weights = torch.zeros(1, dtype=torch.bool, device=pairs[0].device)
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
        rest = [t[index] for t in pairs[2:]]
        aux_loss = getattr(out.outputs, "aux_loss", None) if model_kwargs else None
        return [chosen, rejected, *rest], beta[index] if beta.dim() == 1 else beta, weights, aux_loss

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
            metrics = self.step_policy.pretrain_round(self._gather(contexts)[0], everything[:, 0],
                                                      float(everything[:, 1].mean()))
            for key, value in metrics.items():
                m[key].append(value)
        if frozen and training:  # the policy stays fixed: a loss with no graph into it, so no gradient
            return nll.detach().mean().clone().requires_grad_(True)
        ones = torch.ones_like(nll)
        return self._reduce(nll, ones, training, num_items_in_batch)

    # ------------------------------------------------------------------------------------ metrics

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
                values = [v if isinstance(v, Tensor) else torch.tensor(float(v)) for v in values]
                averaged[key] = torch.stack([v.detach().float().cpu() for v in values]).mean().item()
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

    # ------------------------------------------------------------------------------------ stalled runs

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

    # ------------------------------------------------------------------------------------ hub

    def create_model_card(self, model_name: str | None = None, **kwargs: Any) -> None:
        """Our model card (method, settings, data, final metrics, citations), not transformers' generic one."""
        if not self.is_world_process_zero():
            return

        write_model_card(self.args.output_dir, self.args, read_summary(self.args.output_dir), model_name)

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' push_to_hub, uploading the model, tokenizer and card, not the run's own files."""
        with model_files_only():
            return super().push_to_hub(*args, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        with model_files_only():
            super()._push_from_checkpoint(checkpoint_folder)

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
            if prediction_loss_only:
                return loss.detach(), None, None
            pad = getattr(self.processing_class, "pad_token_id", None)
            pad = getattr(self.data_collator, "pad_token_id", pad if pad is not None else 0)
            rows = stacked_rows(inputs, pad, getattr(self.data_collator, "pad_to_multiple_of", None))
            logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], use_cache=False).logits
        return loss.detach(), logits, rows["input_ids"]

    # ------------------------------------------------------------------------------------ checkpoints

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
        scheduler = self.lr_scheduler
        base = getattr(scheduler, "base_lrs", None)
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if not (checkpoint and base and lambdas and self.args.accept_config_change):
            return
        new = self.args.learning_rate
        if all(abs(b - new) <= 1e-12 * max(abs(new), 1e-30) for b in base):
            return
        scheduler.base_lrs = [new] * len(base)
        for group, factor in zip(self.optimizer.param_groups, lambdas):
            group["initial_lr"] = new
            group["lr"] = new * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # what get_last_lr() reports
        logger.warning("learning rate schedule continues from the accepted new base rate %g (was %g)", new, base[0])

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """As TRL 1.16: a dataset given here is prepared as at construction (raw rows validated and tokenised, a dict
        evaluated set by set as ``<prefix>_<name>``) and, with ``precompute_ref_log_probs``, gets its reference
        log-probs, which after training without a reference model (nor a PEFT base) is an error, not the trained
        policy's log-probs."""
        if eval_dataset is None or isinstance(eval_dataset, str):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
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

            load_model(unwrap(self.ref_model), reference_state)
