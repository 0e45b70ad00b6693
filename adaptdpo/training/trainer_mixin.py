"""The base of :class:`adaptdpo.training.trainer.AdaptiveDPOTrainer`'s mixins, for the type checker.

Each mixin (checkpoint_hooks, hub, prefix_caching, reference_logps, run_guards, scheduler_pretraining, step_metrics)
is only ever mixed into AdaptiveDPOTrainer, before ``transformers.Trainer``, and reads attributes that the trainer's
``__init__`` sets. At run time this base is a plain ``object`` with annotations only (nothing changes in the MRO but
an empty class); to mypy it is ``transformers.Trainer``, so ``super()`` calls and the Trainer's own attributes are
checked, and the annotations below declare what AdaptiveDPOTrainer adds (types as its ``__init__`` sets them)."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformers import Trainer as _Base

    from adaptdpo.methods.step_policy import StepPolicy
    from adaptdpo.models.pair_logps_cache import PairLogpsCache
    from adaptdpo.models.partial import PartialTraining
    from adaptdpo.models.prefix_cache import PrefixCache
    from adaptdpo.models.sequence_logps import SequenceLogps
    from adaptdpo.training.config import AdaptiveDPOConfig
else:
    _Base = object


class TrainerMixin(_Base):
    # the Trainer's attributes, as AdaptiveDPOTrainer uses them (narrower than transformers declares)
    args: AdaptiveDPOConfig
    model: torch.nn.Module

    # set by AdaptiveDPOTrainer.__init__
    ref_model: torch.nn.Module | None
    peft_reference: bool
    step_policy: StepPolicy
    head_chunk: int | None
    run_totals: dict[str, float]
    _metrics: dict[str, defaultdict[str, list[Tensor | float]]]
    _trace_path: str | None
    _trace_buffer: list[tuple]
    _invocation_start: float
    _zero_grad_streak: Tensor | None
    _tokens_this_run: Tensor | None
    _ref_logps_cache: PairLogpsCache | None
    partial_training: PartialTraining | None
    _prefix_caches: dict[int, PrefixCache]

    if TYPE_CHECKING:  # defined by AdaptiveDPOTrainer or by a sibling mixin
        def _logps(self, model: torch.nn.Module, batch: dict[str, Tensor], **kwargs: Any) -> SequenceLogps: ...

        def _gather(self, tensor: Tensor) -> tuple[Tensor, int]: ...

        def _reduce(self, weighted: Tensor, weights: Tensor, training: bool, num_items_in_batch: Any) -> Tensor: ...

        def flush_trace(self) -> None: ...  # StepMetricsMixin

        def _check_not_stalled(self, logs: dict[str, float]) -> None: ...  # RunGuardsMixin

        def _run_totals_now(self) -> dict[str, float]: ...  # RunGuardsMixin
