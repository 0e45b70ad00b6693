"""Sampling from a causal LM, and the log-probability of given completions, with exact control.

A plain ancestral-sampling loop (temperature 1, no top-k/top-p), so that the samples follow exactly the
distribution whose log-probabilities :func:`completion_logps` computes (the KL estimate needs that), and
with an explicit generator: two models sampled with the same seed share their random numbers, so a model
compared with itself produces the same samples (win rate exactly 0.5, KL exactly 0).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .logprobs import sequence_logps


def _left_pad(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def sample_completions(model: Any, prompt_ids: list[list[int]], eos_token_id: int, pad_token_id: int,
                       max_new_tokens: int, seed: int, batch_size: int = 256) -> list[list[int]]:
    """One sampled completion per prompt (token ids, ending with EOS unless cut at ``max_new_tokens``)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    out: list[list[int]] = []
    for start in range(0, len(prompt_ids), batch_size):
        ids, mask = (t.to(device) for t in _left_pad(prompt_ids[start:start + batch_size], pad_token_id))
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        new: list[Tensor] = []
        past, step_ids = None, ids
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
            step = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                         use_cache=True)
            past = step.past_key_values
            probs = torch.softmax(step.logits[:, -1].float(), dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            new.append(token)
            step_ids = token[:, None]
            mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
            done |= token == eos_token_id
            if bool(done.all()):
                break
        tokens = torch.stack(new, dim=1).tolist()
        for row in tokens:
            completion = []
            for t in row:
                completion.append(t)
                if t == eos_token_id:
                    break
            out.append(completion)
    model.train(was_training)
    return out


@torch.no_grad()
def completion_logps(model: Any, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int,
                     batch_size: int = 256) -> Tensor:
    """log π(completion | prompt), summed over the completion's tokens, one value per row (float64)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    values = []
    for start in range(0, len(prompt_ids), batch_size):
        prompts, completions = prompt_ids[start:start + batch_size], completion_ids[start:start + batch_size]
        seqs = [p + c for p, c in zip(prompts, completions, strict=True)]
        width = max(len(s) for s in seqs)
        batch = {"input_ids": torch.full((len(seqs), width), pad_token_id, dtype=torch.long),
                 "attention_mask": torch.zeros((len(seqs), width), dtype=torch.long),
                 "completion_mask": torch.zeros((len(seqs), width), dtype=torch.long)}
        for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
            batch["input_ids"][i, : len(s)] = torch.tensor(s)
            batch["attention_mask"][i, : len(s)] = 1
            batch["completion_mask"][i, len(p): len(s)] = 1
        values.append(sequence_logps(model, {k: v.to(device) for k, v in batch.items()}).logps.double().cpu())
    model.train(was_training)
    return torch.cat(values)
