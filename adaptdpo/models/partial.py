"""Training only the top K transformer blocks (``trainable_layers: K``).

The embeddings, the blocks below the top K and an LM head tied to the embeddings stay frozen
(``requires_grad=False``); the top K blocks and the final norm train. An untied LM head trains (it belongs to the
top of the model). The frozen blocks' output is then a function of the input tokens alone, which is what the
frozen-prefix cache (:mod:`adaptdpo.models.prefix_cache`) stores.

Choices left open by "train the top K": the final norm trains (it is above every frozen block and tied to
nothing); an untied head trains, a tied one cannot without moving the embeddings and stays frozen.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from adaptdpo.models.token_ops import unwrap

#: attribute paths of the block list in the model families transformers ships (Llama, Qwen, Mistral, Gemma,
#: Phi-3, OLMo: ``model.layers``; GPT-2: ``transformer.h``; GPT-NeoX: ``gpt_neox.layers``)
BLOCK_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


def _get(module: torch.nn.Module, path: str) -> torch.nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name, None)  # type: ignore[assignment]  # None ends the walk just below
        if module is None:
            return None
    return module


def decoder_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's list of transformer blocks and its attribute path; a clear error where there is none."""
    base = unwrap(model)
    base = getattr(base, "get_base_model", lambda: base)()  # a PEFT model: the model it wraps
    for path in BLOCK_PATHS:
        blocks = _get(base, path)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            return path, blocks
    raise ValueError(f"trainable_layers: no list of transformer blocks found in {type(base).__name__} (looked for "
                     f"{', '.join(BLOCK_PATHS)}); train all layers (trainable_layers unset) or use LoRA")


@dataclass(frozen=True)
class PartialTraining:
    """What ``trainable_layers`` froze, for the log and the model card."""

    num_blocks: int
    trainable_blocks: int
    block_path: str
    trainable_parameters: int
    frozen_parameters: int
    head_tied: bool

    @property
    def frozen_blocks(self) -> int:
        return self.num_blocks - self.trainable_blocks

    def describe(self) -> str:
        head = "the LM head is tied to the embeddings and stays frozen" if self.head_tied else "the LM head trains"
        return (f"trainable_layers={self.trainable_blocks}: the top {self.trainable_blocks} of {self.num_blocks} "
                f"blocks ({self.block_path}) and the final norm train; the embeddings and the "
                f"{self.frozen_blocks} blocks below stay frozen; {head} ({self.trainable_parameters:,} trained, "
                f"{self.frozen_parameters:,} frozen parameters)")


def freeze_below_top(model: torch.nn.Module, trainable_layers: int) -> PartialTraining:
    """Freeze everything but the top ``trainable_layers`` blocks, the final norm and an untied head."""
    path, blocks = decoder_blocks(model)
    n = len(blocks)
    if not 1 <= trainable_layers <= n:
        raise ValueError(f"trainable_layers={trainable_layers}: the model has {n} blocks; choose 1 to {n} "
                         "(unset trains all)")
    base: Any = unwrap(model)  # a transformers model: its embedding accessors are not nn.Module's
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    tied = bool(embeddings is not None and head is not None and head.weight is embeddings.weight)
    trained = {id(p) for block in list(blocks)[n - trainable_layers:] for p in block.parameters()}
    frozen_ids = {id(p) for block in list(blocks)[: n - trainable_layers] for p in block.parameters()}
    if embeddings is not None:
        frozen_ids |= {id(p) for p in embeddings.parameters()}
    for p in base.parameters():
        # the rest (the final norm, an untied head, position embeddings of GPT-2 style models) trains unless it
        # is an embedding or a lower block; a tied head shares the embedding's parameter and stays frozen
        if id(p) in frozen_ids and id(p) not in trained:
            p.requires_grad_(False)
    if embeddings is not None and "transformer.h" == path:
        wpe = getattr(getattr(base, "transformer", None), "wpe", None)
        if wpe is not None:
            wpe.requires_grad_(False)
    trainable = sum(p.numel() for p in base.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in base.parameters() if not p.requires_grad)
    return PartialTraining(n, trainable_layers, path, trainable, frozen, tied)


def lora_on_top(lora_config: Any, model: torch.nn.Module, trainable_layers: int) -> Any:
    """A copy of a ``peft.LoraConfig`` that adapts only the top ``trainable_layers`` blocks (peft's
    ``layers_to_transform`` and ``layers_pattern``); everything else of it unchanged."""
    path, blocks = decoder_blocks(model)
    n = len(blocks)
    if not 1 <= trainable_layers <= n:
        raise ValueError(f"trainable_layers={trainable_layers}: the model has {n} blocks; choose 1 to {n}")
    config = copy.copy(lora_config)
    config.layers_to_transform = list(range(n - trainable_layers, n))
    config.layers_pattern = path.rsplit(".", 1)[-1]
    return config
