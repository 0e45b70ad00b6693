"""The frozen-prefix cache in the trainer: with ``trainable_layers`` K, the hidden states entering block L−K of every
pair are computed once and read back (:mod:`adaptdpo.models.prefix_cache`), for the policy and for a separate
reference whose frozen blocks are the same.

A mixin of :class:`adaptdpo.training.trainer.AdaptiveDPOTrainer` (it reads the trainer's attributes set in
its ``__init__``); every forward of the trainer that wants completion log-probs goes through :meth:`_logps`."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import Tensor

from adaptdpo.models.prefix_cache import PrefixCache
from adaptdpo.models.sequence_logps import SequenceLogps, sequence_logps
from adaptdpo.models.token_ops import unwrap
from adaptdpo.training.trainer_mixin import TrainerMixin

logger = logging.getLogger(__name__)


class PrefixCacheMixin(TrainerMixin):
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
