"""The batch layout a model and a config allow: the collator's shared-prompt rows, padding-free rows or the stacked
layout, and the chunked LM head (:mod:`adaptdpo.models.lm_head`).

Plain functions of the config and the model, decided once when the trainer is built (and logged), so a layout
that cannot be used is an error before any work, naming the setting."""

from __future__ import annotations

import logging
from typing import Any

import torch

from adaptdpo.data.collate import PreferenceCollator
from adaptdpo.methods.registry import method_spec
from adaptdpo.models.attention_masks import supports_shared_prompt
from adaptdpo.models.lm_head import chunkable_head
from adaptdpo.models.token_ops import unwrap
from adaptdpo.training.config import AdaptiveDPOConfig

logger = logging.getLogger(__name__)


def head_chunk_size(args: AdaptiveDPOConfig, model: torch.nn.Module) -> int | None:
    """The chunked LM head's chunk size, or None for the plain head (0, or a head that cannot be chunked)."""
    head_chunk = args.lm_head_chunk_size or None  # 0: the plain head
    if head_chunk and chunkable_head(model) is None:
        logger.info("lm_head_chunk_size=%d: %s's LM head is not a plain bias-free Linear holding its whole "
                    "weight (or its logits are transformed after it), so the plain head is used",
                    head_chunk, type(unwrap(model)).__name__)
        head_chunk = None
    return head_chunk


def default_collator(args: AdaptiveDPOConfig, model: torch.nn.Module, ref_model: torch.nn.Module | None,
                     processing_class: Any, router_aux_loss_coef: float = 0.0) -> PreferenceCollator:
    """Our collator in the layout the model allows: shared-prompt rows, padding-free, keep_end cut."""
    if processing_class is None:
        raise ValueError("pass processing_class (the tokenizer) or a data_collator")
    shared = use_shared_prompt(args, model, ref_model, router_aux_loss_coef)
    keep_end = args.max_length if args.truncation_mode == "keep_end" else None
    return PreferenceCollator(processing_class.pad_token_id, args.pad_to_multiple_of, shared_prompt=shared,
                              padding_free=use_padding_free(args, model, shared),
                              keep_end_max_length=keep_end)


def use_shared_prompt(args: AdaptiveDPOConfig, model: torch.nn.Module, ref_model: torch.nn.Module | None,
                      router_aux_loss_coef: float = 0.0) -> bool:
    """shared_prompt: off as set, or where a pair's rows need not share their prompt (keep_end truncation), a
    router loss reads the stacked padding mask, or SamS pre-training reads chosen rows only; on where the policy's
    (and the reference's) attention takes a custom mask; ``on`` where it cannot be used is an error."""
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


def use_padding_free(args: AdaptiveDPOConfig, model: torch.nn.Module, shared_prompt: bool) -> bool:
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
