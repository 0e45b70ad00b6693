"""A policy trained on its top K blocks and its reference on one batch: the frozen bottom runs once.

With ``trainable_layers: K`` the policy's embeddings and bottom L−K blocks are the reference's own weights, so on
the same batch both compute the same hidden state entering block L−K. :func:`both_sequence_logps` runs the
reference in full, records that block's input on the way, and runs the policy from there (its bottom blocks
skipped, as in the prefix cache's replay): L + K blocks of work instead of 2L, and the same numbers bit for bit
(the same weights on the same batch layout, so the same kernels on the same inputs; the tests compare the two
paths exactly). Evaluation uses it for the held-out pairs and for KL(π‖π_ref) on the policy's samples.

:func:`shared_frozen_blocks` decides whether the bottom is shared: the same model class and block configuration,
and every tensor of the embeddings and the bottom blocks equal; otherwise None, so a fully trained policy, a LoRA
model or another reference falls back to two full passes.
Llama-style block lists only (``model.layers``, where a block returns its residual stream), as the prefix cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from adaptdpo.models.partial import decoder_blocks
from adaptdpo.models.sequence_logps import SequenceLogps, sequence_logps
from adaptdpo.models.token_ops import unwrap

#: config entries that describe a checkpoint, not what its blocks compute (a trained policy's saved config differs in
#: them: the trainer turns ``use_cache`` off, the dtype and version are written again)
NOT_COMPUTATIONAL = frozenset({"_name_or_path", "transformers_version", "use_cache", "dtype", "torch_dtype",
                               "architectures", "_commit_hash", "output_hidden_states", "output_attentions",
                               "return_dict"})


def _computation(config: Any) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k not in NOT_COMPUTATIONAL}


def shared_frozen_blocks(policy: torch.nn.Module, reference: torch.nn.Module,
                         trainable_layers: int | None) -> int | None:
    """L − K when the policy was trained on its top ``trainable_layers`` blocks and its embeddings and bottom
    L − K blocks are the reference's: the same model class and block configuration, every tensor equal in dtype
    and value (``torch.equal``); otherwise None (no sharing)."""
    if not trainable_layers:
        return None
    try:
        path, blocks = decoder_blocks(policy)
        ref_path, ref_blocks = decoder_blocks(reference)
    except ValueError:
        return None
    frozen = len(blocks) - trainable_layers
    if path != "model.layers" or ref_path != path or len(ref_blocks) != len(blocks) or not 1 <= frozen < len(blocks):
        return None
    base: Any = unwrap(policy)
    ref_base: Any = unwrap(reference)
    if type(base) is not type(ref_base) or _computation(base.config) != _computation(ref_base.config):
        return None
    pairs = [(base.get_input_embeddings(), ref_base.get_input_embeddings()),
             *zip(list(blocks)[:frozen], list(ref_blocks)[:frozen], strict=True)]
    for ours, theirs in pairs:
        a, b = ours.state_dict(), theirs.state_dict()
        if a.keys() != b.keys() or not all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a):
            return None
    return frozen


@contextlib.contextmanager
def _recording_block_input(model: torch.nn.Module, index: int, into: list[Tensor]) -> Iterator[None]:
    _, blocks = decoder_blocks(model)

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        into.append(args[0] if args else kwargs["hidden_states"])

    handle = blocks[index].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _starting_at_block(model: torch.nn.Module, index: int, states: Tensor) -> Iterator[None]:
    """Blocks 0..index−1 skipped; the last of them returns ``states`` (the input of block ``index``)."""
    _, blocks = decoder_blocks(model)
    frozen = list(blocks)[:index]

    def skip(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states

    def emit(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if hidden_states.shape != states.shape:
            raise RuntimeError(f"shared prefix: states of shape {tuple(states.shape)} for a block input of shape "
                               f"{tuple(hidden_states.shape)}")
        return states

    for block in frozen:
        block.forward = skip  # an instance attribute shadows the class's forward
    frozen[-1].forward = emit
    try:
        yield
    finally:
        for block in frozen:
            block.__dict__.pop("forward", None)


@torch.no_grad()
def reference_pass(reference: torch.nn.Module, batch: dict[str, Tensor], frozen_blocks: int
                   ) -> tuple[SequenceLogps, Tensor]:
    """The reference's :func:`sequence_logps` of ``batch`` and the input of its block ``frozen_blocks`` on the way
    (what :func:`policy_pass_from` starts from; a caller may keep both to judge several policies)."""
    recorded: list[Tensor] = []
    with _recording_block_input(reference, frozen_blocks, recorded):
        theirs = sequence_logps(reference, batch)
    if len(recorded) != 1:
        raise RuntimeError(f"shared prefix: block {frozen_blocks} ran {len(recorded)} times in one forward")
    return theirs, recorded[0]


@torch.no_grad()
def policy_pass_from(policy: torch.nn.Module, batch: dict[str, Tensor], frozen_blocks: int, states: Tensor
                     ) -> SequenceLogps:
    """The policy's :func:`sequence_logps` of ``batch`` from ``states``, the input of block ``frozen_blocks``
    recorded by :func:`reference_pass` on the same batch (its bottom blocks skipped)."""
    with _starting_at_block(policy, frozen_blocks, states):
        return sequence_logps(policy, batch)


@torch.no_grad()
def both_sequence_logps(policy: torch.nn.Module, reference: torch.nn.Module, batch: dict[str, Tensor],
                        frozen_blocks: int | None) -> tuple[SequenceLogps, SequenceLogps]:
    """(policy's, reference's) :func:`sequence_logps` of ``batch``; with ``frozen_blocks`` (from
    :func:`shared_frozen_blocks`) the policy starts from the reference's input of block ``frozen_blocks``."""
    if frozen_blocks is None:
        return sequence_logps(policy, batch), sequence_logps(reference, batch)
    theirs, states = reference_pass(reference, batch, frozen_blocks)
    return policy_pass_from(policy, batch, frozen_blocks, states), theirs
