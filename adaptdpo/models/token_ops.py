"""models.token_ops"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def selective_log_softmax(logits: Tensor, labels: Tensor, rows_per_chunk: int = 8) -> Tensor:
    """log softmax(logits)[label] per position, in float32, a few rows at a time.

    Avoids materialising a full-vocabulary float32 log-softmax for the whole batch: only one chunk of
    rows is upcast at a time, and only the picked entry and the log-sum-exp are kept.
    """
    out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], rows_per_chunk):
        chunk = logits[start : start + rows_per_chunk].float()
        picked = chunk.gather(-1, labels[start : start + rows_per_chunk].unsqueeze(-1)).squeeze(-1)
        out[start : start + rows_per_chunk] = picked - torch.logsumexp(chunk, dim=-1)
    return out


@torch.no_grad()
def token_statistics(logits: Tensor, labels: Tensor, rows_per_chunk: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """Per position, detached and in float32, a few rows at a time: the entropy of the predictive distribution,
    the mean logit over the vocabulary, and whether the label is the top-1 prediction (TRL's ``entropy``,
    ``logits/*`` and ``mean_token_accuracy``). ``logits`` [rows, T, V] (or [rows, V]), ``labels`` [rows, T]."""
    entropy = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    mean_logit = torch.empty_like(entropy)
    top1 = torch.empty(labels.shape, dtype=torch.bool, device=logits.device)
    for start in range(0, logits.shape[0], rows_per_chunk):
        chunk = logits[start : start + rows_per_chunk].detach().float()
        log_p = torch.log_softmax(chunk, dim=-1)
        entropy[start : start + rows_per_chunk] = -(log_p.exp() * log_p).sum(dim=-1)
        mean_logit[start : start + rows_per_chunk] = chunk.mean(dim=-1)
        top1[start : start + rows_per_chunk] = chunk.argmax(dim=-1) == labels[start : start + rows_per_chunk]
    return entropy, mean_logit, top1


@torch.no_grad()
def log_sum_squared_probs(logits: Tensor, rows_per_chunk: int = 8) -> Tensor:
    """log Σ_v p_v² per position (WPO's alignment term, Zhou et al. 2024, Eq. 2), detached, in float32."""
    out = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], rows_per_chunk):
        log_p = torch.log_softmax(logits[start : start + rows_per_chunk].detach().float(), dim=-1)
        out[start : start + rows_per_chunk] = torch.logsumexp(2 * log_p, dim=-1)
    return out


def ld_weights(positions: Tensor, shared: Tensor, alpha: float | None) -> Tensor:
    """LD-DPO (Liu et al. 2024): weight 1 for a completion token within the pair's shared length (the shorter
    completion's), α beyond it (α = 1: DPO; α = 0: the tail is ignored). ``positions``: the token's index in its
    completion; ``shared``: that length, broadcastable."""
    if alpha is None:
        return torch.ones_like(positions, dtype=torch.float32)
    return torch.where(positions < shared, 1.0, float(alpha))


@dataclass
class TokenStats:
    """Sums over completion tokens for TRL's token metrics (divide by the counts after gathering)."""

    entropy_sum: Tensor
    tokens: Tensor
    chosen_logit_sum: Tensor
    chosen_tokens: Tensor
    rejected_logit_sum: Tensor
    rejected_tokens: Tensor
    chosen_top1: Tensor

    @staticmethod
    def of(scores: Any, chosen: Tensor, rejected: Tensor) -> TokenStats:
        """Statistics of the scored positions where ``chosen`` / ``rejected`` (bool masks) are set, from their
        per-position ``entropy``, ``mean_logit`` and ``top1`` (an :class:`adaptdpo.models.lm_head.TokenScores`)."""
        chosen, rejected = chosen.bool(), rejected.bool()
        both = chosen | rejected
        return TokenStats((scores.entropy * both).sum(), both.sum(), (scores.mean_logit * chosen).sum(),
                          chosen.sum(), (scores.mean_logit * rejected).sum(), rejected.sum(),
                          (scores.top1 & chosen).sum())

    def __add__(self, other: TokenStats) -> TokenStats:
        return TokenStats(*(a + b for a, b in zip(self.values(), other.values(), strict=True)))

    def values(self) -> list[Tensor]:
        return [self.entropy_sum, self.tokens, self.chosen_logit_sum, self.chosen_tokens, self.rejected_logit_sum,
                self.rejected_tokens, self.chosen_top1]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP/FSDP/DeepSpeed (``.module``) and PEFT (``get_base_model``) wrappers."""
    inner: Any = model  # a wrapper's .module and PEFT's get_base_model are dynamic attributes
    while hasattr(inner, "module"):
        inner = inner.module
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner

_FORWARD_PARAMETERS: dict[type, frozenset[str]] = {}


def forward_parameters(model: torch.nn.Module) -> frozenset[str]:
    """The argument names of the unwrapped model's forward (inspected once per model class)."""
    cls = type(unwrap(model))
    if cls not in _FORWARD_PARAMETERS:
        _FORWARD_PARAMETERS[cls] = frozenset(inspect.signature(cls.forward).parameters)
    return _FORWARD_PARAMETERS[cls]


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model's forward can compute the LM head on the last K positions only (transformers models
    with ``logits_to_keep``: Llama, GPT-2, Qwen, Mistral, ...)."""
    return "logits_to_keep" in forward_parameters(model)
