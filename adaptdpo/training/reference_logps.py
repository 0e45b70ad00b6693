"""The reference: where it is placed when the trainer is built (a model placed like the policy, the LoRA base, or
precomputed columns), its log-probs (the reference forward or the LoRA base), its per-pair cache on disk, the
precomputed columns of ``precompute_ref_log_probs``, and TR-DPO's moving reference attached.

A mixin of :class:`adaptdpo.training.trainer.AdaptiveDPOTrainer` (it reads the trainer's attributes set in
its ``__init__``)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from typing import Any

import torch
from torch import Tensor

from adaptdpo.data.collate import batch_to
from adaptdpo.models.pair_logps_cache import PairLogpsCache
from adaptdpo.models.sequence_logps import SequenceLogps
from adaptdpo.training.checkpointing import (
    atomic_torch_save,
)
from adaptdpo.training.config import AdaptiveDPOConfig
from adaptdpo.training.reference import is_sharded, prepare_reference
from adaptdpo.training.reference_sync import ReferenceSyncCallback
from adaptdpo.training.trainer_mixin import TrainerMixin

logger = logging.getLogger(__name__)


class ReferenceLogpsMixin(TrainerMixin):
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
        config: Any = reference.config  # a transformers model's config (a dynamic attribute)
        h.update(repr(sorted(config.to_dict().items())).encode())
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

    # ------------------------------------------------------------------- placed when the trainer is built

    def _place_reference(self, ref_model: torch.nn.Module | None, model: torch.nn.Module, args: AdaptiveDPOConfig,
                         train_dataset: Any, eval_dataset: Any) -> None:
        """The reference: precomputed log-prob columns, a model placed like the policy, or the PEFT base."""
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

    def _reference_logps_cache(self, args: AdaptiveDPOConfig) -> PairLogpsCache | None:
        """``cache_reference_logps``: the frozen reference's per-pair log-probs kept on disk (not with TR-DPO)."""
        if not args.cache_reference_logps or args.precompute_ref_log_probs:
            return None
        if args.sync_ref_model:
            raise ValueError("cache_reference_logps with sync_ref_model (TR-DPO): the reference moves, its "
                             "log-probs cannot be kept")
        reference = self.ref_model if self.ref_model is not None else self.model
        dtype = "bf16" if args.bf16 else "fp16" if args.fp16 else str(next(reference.parameters()).dtype)
        with self._reference_context():
            return PairLogpsCache(reference, args.ref_cache_dir or os.path.join(args.output_dir, "ref_logps"),
                                  f"peft_base={self.peft_reference} ld_alpha={args.ld_alpha} dtype={dtype}")

    def _attach_reference_sync(self) -> None:
        """TR-DPO (``sync_ref_model``): the reference moves toward the policy every few steps."""
        if self.ref_model is None:
            raise ValueError("sync_ref_model (TR-DPO) needs a separate reference model: not with a PEFT adapter's "
                             "base or precomputed reference log-probs")
        if is_sharded(self.ref_model):
            raise ValueError("sync_ref_model (TR-DPO) with a sharded reference (FSDP, DeepSpeed ZeRO-3) is not "
                             "supported: its moving reference is saved whole with each checkpoint. Use DDP "
                             "(--accelerate_config multi_gpu) or ZeRO-1/2")
        self.add_callback(ReferenceSyncCallback(self))
