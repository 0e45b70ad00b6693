"""Summed completion log-probabilities of a stacked [chosen; rejected] batch."""

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


@dataclass
class SequenceLogps:
    """Per-row results of one forward over a stacked batch of 2n rows."""

    logps: Tensor  # [2n] summed over completion tokens
    lengths: Tensor  # [2n] completion token counts
    outputs: Any  # the model output (hidden states when requested)

    def split(self) -> tuple[Tensor, Tensor]:
        return self.logps.chunk(2, dim=0)


def _base_forward(model: torch.nn.Module) -> Any:
    """The forward of the model inside DDP/FSDP/DeepSpeed and PEFT wrappers (for signature checks only)."""
    inner = model
    while hasattr(inner, "module"):
        inner = inner.module
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner.forward


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model's forward can compute the LM head on the last K positions only (transformers models
    with ``logits_to_keep``: Llama, GPT-2, Qwen, Mistral, ...)."""
    return "logits_to_keep" in inspect.signature(_base_forward(model)).parameters


def completion_window(batch: dict[str, Tensor]) -> int:
    """K such that every completion token lies in the last K − 1 positions: the LM head and log-softmax run
    on those positions only (on HH-shaped data most positions are prompt). The collator precomputes it as
    ``logits_to_keep`` (a Python int: no host-device synchronisation); otherwise one sync here."""
    if "logits_to_keep" in batch:
        return int(batch["logits_to_keep"])
    mask = batch["completion_mask"]
    first = int(mask.int().argmax(dim=1).min()) if bool(mask.any()) else mask.shape[1] - 1
    return mask.shape[1] - max(first, 1) + 1


def sequence_logps(model: torch.nn.Module, batch: dict[str, Tensor],
                   output_hidden_states: bool = False) -> SequenceLogps:
    """Forward ``batch`` and sum log π(token) over the completion tokens of every row.

    Where the model supports it, logits are computed only for the positions that predict completion
    tokens (``logits_to_keep``), not the whole sequence: the same numbers, less LM-head work and memory.
    """
    width = batch["input_ids"].shape[1]
    keep = completion_window(batch) if accepts_logits_to_keep(model) else width
    kwargs = {"logits_to_keep": keep} if keep < width else {}
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                    output_hidden_states=output_hidden_states, **kwargs)
    start = width - keep + 1  # the first label position covered
    labels = batch["input_ids"][:, start:]
    mask = batch["completion_mask"][:, start:].to(torch.float32)
    per_token = selective_log_softmax(outputs.logits[:, -keep:-1], labels)
    logps = (per_token * mask).sum(dim=-1)
    lengths = batch["completion_mask"].sum(dim=-1)
    outputs.logits = None  # free the full logits early; nothing downstream needs them
    return SequenceLogps(logps=logps, lengths=lengths, outputs=outputs)
