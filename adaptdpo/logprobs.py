"""Summed completion log-probabilities of a stacked [chosen; rejected] batch."""

from __future__ import annotations

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


def sequence_logps(model: torch.nn.Module, batch: dict[str, Tensor],
                   output_hidden_states: bool = False) -> SequenceLogps:
    """Forward ``batch`` and sum log π(token) over the completion tokens of every row."""
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                    output_hidden_states=output_hidden_states)
    labels = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].to(torch.float32)
    per_token = selective_log_softmax(outputs.logits[:, :-1], labels)
    logps = (per_token * mask).sum(dim=-1)
    lengths = batch["completion_mask"].sum(dim=-1)
    outputs.logits = None  # free the full logits early; nothing downstream needs them
    return SequenceLogps(logps=logps, lengths=lengths, outputs=outputs)
