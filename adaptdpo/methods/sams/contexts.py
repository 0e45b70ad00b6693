"""Arm contexts from the forward that already runs (SamS §3 and App. F.2).

For every pair, every transformer layer's hidden states are mean-pooled over the real tokens (padding
excluded — the official code averages over padded positions), chosen and rejected separately, then
averaged (or concatenated). The result is an L×D tensor per pair. Detached: no gradient flows from the
scheduler into the policy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def layer_contexts(hidden_states: Sequence[Tensor], attention_mask: Tensor, combine: str = "mean") -> Tensor:
    """Contexts [n, L, D] (``combine="mean"``) or [n, L, 2D] (``"concat"``) of a stacked [chosen; rejected] batch.

    Args:
        hidden_states: the model's ``output_hidden_states`` tuple (embeddings first, then one entry per
            layer), each [2n, T, D] (stacked layout) or [n, T, D] (packed layout: one row per pair); the
            embedding output is left out.
        attention_mask: [2n, T], 1 on the tokens to pool: chosen rows then rejected rows (for a packed
            batch, the tokens each branch sees, :func:`adaptdpo.models.sequence_logps.branch_pooling_masks`).
        combine: how chosen and rejected contexts are merged.
    """
    if combine not in ("mean", "concat"):
        raise ValueError(f"combine must be 'mean' or 'concat', got {combine!r}")
    mask = attention_mask.to(torch.float32).unsqueeze(-1)  # [2n, T, 1]
    count = mask.sum(dim=1).clamp(min=1.0)  # [2n, 1]
    # one layer at a time: never a stacked copy of every layer's full hidden states
    def pool(h: Tensor) -> Tensor:
        h = h.detach().float()
        if h.shape[0] * 2 == mask.shape[0]:  # packed: both branches pool the same rows with their own masks
            n = h.shape[0]
            return torch.cat([(h * mask[:n]).sum(dim=1), (h * mask[n:]).sum(dim=1)]) / count
        return (h * mask).sum(dim=1) / count

    pooled = torch.stack([pool(h) for h in hidden_states[1:]], dim=1)
    chosen, rejected = pooled.chunk(2, dim=0)
    if combine == "mean":
        return (chosen + rejected) / 2
    return torch.cat([chosen, rejected], dim=-1)
