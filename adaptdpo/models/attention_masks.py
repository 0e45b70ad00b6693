"""models.attention_masks"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from adaptdpo.models.token_ops import forward_parameters, unwrap

#: attention implementations that take the shared-prompt layout's branch mask: a dense 4D mask (eager, sdpa) or
#: a FlexAttention BlockMask (flex_attention: block-sparse, no O(T²) mask)
PROMPT, CHOSEN, REJECTED = 1, 2, 3  # segment ids of a packed row (0 = padding)

SHARED_PROMPT_ATTENTION = ("eager", "sdpa", "flex_attention")


def supports_shared_prompt(model: torch.nn.Module) -> bool:
    """Whether the packed [prompt, chosen, rejected] forward can run: a transformers model whose attention
    takes a custom 4D mask (eager or sdpa) and explicit position ids."""
    config = getattr(unwrap(model), "config", None)
    return (config is not None and getattr(config, "_attn_implementation", None) in SHARED_PROMPT_ATTENTION
            and "position_ids" in forward_parameters(model) and not getattr(config, "is_encoder_decoder", False))


def branch_attention_mask(segments: Tensor, dtype: torch.dtype, boolean: bool,
                          documents: Tensor | None = None) -> Tensor:
    """[n, 1, L, L] mask of a packed batch: causal; every token sees the prompt; chosen and rejected tokens
    see their own branch only. Padding positions see themselves (no empty softmax rows). With ``documents``
    (padding-free rows: one pair per document), a token sees its own pair only."""
    length = segments.shape[1]
    q, k = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & (k != 0) & ((k == PROMPT) | (k == q))
    if documents is not None:
        allowed &= documents[:, :, None] == documents[:, None, :]
    allowed |= torch.eye(length, dtype=torch.bool, device=segments.device) & (q == 0)
    allowed = allowed[:, None]
    if boolean:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(~allowed, torch.finfo(dtype).min)


def branch_mask_mod(segments: Tensor, documents: Tensor | None = None) -> Any:
    """The rule of :func:`branch_attention_mask` as a FlexAttention ``mask_mod(b, h, q, k)``."""

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        seg_q, seg_k = segments[b, q], segments[b, k]
        sees = (k <= q) & (seg_k != 0) & ((seg_k == PROMPT) | (seg_k == seg_q))
        if documents is not None:
            sees = sees & (documents[b, q] == documents[b, k])
        return sees | ((q == k) & (seg_q == 0))

    return mask_mod


def branch_block_mask(segments: Tensor, documents: Tensor | None = None) -> Any:
    """The branch mask as a FlexAttention ``BlockMask``: block-sparse, so the kernel skips the blocks no query sees
    (a rejected branch's queries and the chosen branch's keys; other pairs of a padding-free row) and no
    [n, L, L] mask is built."""
    from torch.nn.attention.flex_attention import create_block_mask

    n, length = segments.shape
    return create_block_mask(branch_mask_mod(segments, documents), n, None, length, length,
                             device=segments.device)


def branch_mask(model: torch.nn.Module, segments: Tensor, documents: Tensor | None = None) -> Any:
    """The mask the model's attention takes: a BlockMask (flex_attention), a boolean (sdpa) or additive (eager)
    dense mask."""
    attn = getattr(getattr(unwrap(model), "config", None), "_attn_implementation", "sdpa")
    if attn == "flex_attention":
        return branch_block_mask(segments, documents)
    dtype = next(model.parameters()).dtype
    return branch_attention_mask(segments, dtype, boolean=attn != "eager", documents=documents)
