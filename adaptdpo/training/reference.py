"""The frozen reference model, placed like the policy: sharded under FSDP and DeepSpeed ZeRO-3, not replicated.

``accelerator.prepare_model(reference, evaluation_mode=True)`` only moves a model to the device: under FSDP and
ZeRO-3 every rank would hold the whole reference while the policy is sharded (for a 7 B model in fp32, 28 GB a
GPU). This module shards it the way the policy is sharded:

- **FSDP2**: accelerate's ``fsdp2_prepare_model``, as for the policy: each layer the plugin's auto-wrap policy
  picks (the decoder layers) becomes its own ``fully_shard`` unit, then the embeddings, the tail and the root. With
  ``reshard_after_forward`` a forward gathers one layer at a time (TRL's ``prepare_fsdp`` shards only the root, so
  its reference forward gathers the whole model at once), and with ``fsdp_cpu_ram_efficient_loading`` the weights
  that only rank 0 loaded are broadcast to the others (a reference left as loaded would be empty on every other
  rank).
- **FSDP1**: wrapped with the plugin's settings, as TRL's ``prepare_fsdp``.
- **DeepSpeed**: an inference engine with the run's DeepSpeed config (ZeRO-3 shards it; other stages keep one
  replica, stage 0), the optimizer blocks dropped: TRL's ``prepare_deepspeed``.

Everything else (one device, DDP) keeps accelerate's placement: the reference has no gradients to all-reduce.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from accelerate.utils import DistributedType


def prepare_reference(reference: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    """``reference`` frozen, in eval mode, and placed for ``accelerator``'s distributed setup."""
    reference.eval()
    reference.requires_grad_(False)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return deepspeed_reference(reference, accelerator.state.deepspeed_plugin.deepspeed_config)
    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        if plugin.fsdp_version == 2:
            return fsdp2_reference(reference, accelerator)
        return fsdp1_reference(reference, plugin, accelerator.device)
    return accelerator.prepare_model(reference, evaluation_mode=True)


def fsdp2_reference(reference: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    """Shard ``reference`` with accelerate's own FSDP2 preparation of a model (``fsdp2_prepare_model``): a unit
    per auto-wrapped layer, the embeddings and the tail, then the root. With ``fsdp_cpu_ram_efficient_loading`` only
    rank 0 loaded real weights (transformers leaves the other ranks' empty), and this broadcasts them from rank 0,
    as for the policy. Frozen parameters are not upcast (accelerate upcasts trainable ones only)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    return fsdp2_prepare_model(accelerator, reference).eval()


def fsdp1_reference(reference: torch.nn.Module, plugin: Any, device: torch.device) -> torch.nn.Module:
    """Wrap ``reference`` in FSDP1 with the plugin's settings (TRL's ``prepare_fsdp``)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(reference, FullyShardedDataParallel):
        return reference
    plugin.set_auto_wrap_policy(reference)
    wrapped = FullyShardedDataParallel(
        reference, sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
        cpu_offload=plugin.cpu_offload, auto_wrap_policy=plugin.auto_wrap_policy,
        mixed_precision=plugin.mixed_precision_policy, sync_module_states=plugin.sync_module_states,
        backward_prefetch=plugin.backward_prefetch, forward_prefetch=plugin.forward_prefetch,
        use_orig_params=plugin.use_orig_params, param_init_fn=plugin.param_init_fn,
        ignored_modules=plugin.ignored_modules, limit_all_gathers=plugin.limit_all_gathers, device_id=device)
    return wrapped.eval()


def deepspeed_inference_config(config: dict[str, Any], hidden_size: int | None) -> dict[str, Any]:
    """The run's DeepSpeed config for a model that only runs forward (TRL's ``prepare_deepspeed``): no optimizer,
    scheduler or optimizer offload (DeepSpeed would build them with nothing to step); ZeRO-3 stays (the reference is
    sharded) with buckets sized by the hidden size; any other stage becomes 0 (one replica a GPU)."""
    config = copy.deepcopy(config)
    stage = config["zero_optimization"]["stage"]
    if hidden_size is not None and stage == 3:
        config.update({"zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
                       "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
                       "zero_optimization.stage3_prefetch_bucket_size": 0.9 * hidden_size * hidden_size})
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    config["zero_optimization"].pop("offload_optimizer", None)
    if stage != 3:
        config["zero_optimization"]["stage"] = 0
    return config


def deepspeed_reference(reference: torch.nn.Module, config: dict[str, Any]) -> torch.nn.Module:
    """``reference`` as a DeepSpeed inference engine under :func:`deepspeed_inference_config`."""
    import deepspeed

    model_config = getattr(reference, "config", None)
    sizes = getattr(model_config, "hidden_sizes", None)
    hidden = max(sizes) if sizes else getattr(model_config, "hidden_size", None)
    engine, *_ = deepspeed.initialize(model=reference, config=deepspeed_inference_config(config, hidden))
    engine.eval()
    return engine


def is_sharded(reference: torch.nn.Module | None) -> bool:
    """Whether ``reference``'s parameters are split across ranks (FSDP, DeepSpeed ZeRO-3)."""
    if reference is None:
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if isinstance(reference, (FSDPModule, FullyShardedDataParallel)):
        return True
    return any(hasattr(p, "ds_id") for p in reference.parameters())
