"""Sampling from a causal LM, and the log-probability of given completions, with exact control.

:func:`generate`: a KV-cache sampling loop with temperature (0 = greedy), top-p, several EOS ids, and the
sampled tokens' log-probabilities. At its defaults (temperature 1, no top-p) it is plain ancestral sampling,
so the samples follow exactly the distribution whose log-probabilities :func:`completion_logps` computes
(the KL estimate needs that), with an explicit generator: two models sampled with the same seed share their
random numbers, so a model compared with itself produces the same samples (win rate exactly 0.5, KL exactly 0).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from adaptdpo.models.sequence_logps import sequence_logps

logger = logging.getLogger("adaptdpo")

#: seconds between two progress lines of a long generation (logged at INFO)
PROGRESS_EVERY_S = 15.0


def _left_pad(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


@dataclass
class Sample:
    """One generated completion: its token ids (ending with an EOS id unless cut at max_new_tokens) and, per
    token, its log-probability under the model at temperature 1 (what KL(π‖π_ref) estimates need)."""

    tokens: list[int]
    logps: list[float]

    @property
    def logp(self) -> float:
        return float(sum(self.logps))


def _nucleus(probs: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p``; renormalise."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # mass before this token already reached top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


@torch.no_grad()
def generate(model: Any, prompt_ids: list[list[int]], eos_token_ids: int | list[int], pad_token_id: int,
             max_new_tokens: int, seed: int, temperature: float = 1.0, top_p: float = 1.0,
             batch_size: int = 256, autocast: torch.dtype | None = None) -> list[Sample]:
    """Batched generation with a KV cache from any causal LM (policy or reference), deterministic under ``seed``.

    ``temperature`` 0 is greedy decoding; otherwise tokens are drawn from softmax(logits / temperature),
    restricted to the ``top_p`` nucleus. Prompts are left-padded; a row stops at its first EOS id. At
    temperature 1 and top_p 1 the draws are exactly ancestral sampling with the seed's random numbers, so two
    models sampled with one seed share them (a model against itself: identical samples). ``autocast``: run the
    forwards under autocast to this dtype (bf16: about 1.9x faster on a CPU with native bf16; other samples than
    float32's, so it belongs to whatever key caches them)."""
    eos = torch.tensor([eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = eos.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out: list[Sample] = []
    started = last_report = time.time()
    for start in range(0, len(prompt_ids), batch_size):
        ids, mask = (t.to(device) for t in _left_pad(prompt_ids[start:start + batch_size], pad_token_id))
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        new: list[Tensor] = []
        logps: list[Tensor] = []
        past, step_ids = None, ids
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
            with torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext():
                step = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                             use_cache=True)
            past = step.past_key_values
            logits = step.logits[:, -1].float()
            if temperature == 0:
                token = logits.argmax(dim=-1)
            else:
                probs = torch.softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
                if top_p < 1.0:
                    probs = _nucleus(probs, top_p)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            logps.append(torch.log_softmax(logits, dim=-1).gather(1, token[:, None]).squeeze(1))
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            new.append(token)
            step_ids = token[:, None]
            mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
            done |= torch.isin(token, eos)
            if time.time() - last_report > PROGRESS_EVERY_S:  # long sampling says where it is
                last_report = time.time()
                logger.info("sampling: prompts %d-%d of %d, token %d of at most %d (%.0f s)", start + 1,
                            start + ids.shape[0], len(prompt_ids), len(new), max_new_tokens, last_report - started)
            if bool(done.all()):
                break
        tokens = torch.stack(new, dim=1).tolist()
        values = torch.stack(logps, dim=1).double().tolist()
        stop = set(eos.tolist())
        for row, row_logps in zip(tokens, values, strict=True):
            end = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
            out.append(Sample(row[:end], row_logps[:end]))
    model.train(was_training)
    return out


def sample_completions(model: Any, prompt_ids: list[list[int]], eos_token_id: int, pad_token_id: int,
                       max_new_tokens: int, seed: int, batch_size: int = 256) -> list[list[int]]:
    """One sampled completion per prompt (token ids, ending with EOS unless cut at ``max_new_tokens``)."""
    return [s.tokens for s in generate(model, prompt_ids, eos_token_id, pad_token_id, max_new_tokens, seed,
                                       batch_size=batch_size)]


def chat_prompt_ids(tokenizer: Any, user_messages: list[str], system: str | None = None) -> list[list[int]]:
    """Token ids of single-turn chat prompts rendered by the tokenizer's template, ending with the generation
    prompt (the assistant turn opened)."""
    out = []
    for text in user_messages:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
        out.append(list(rendered["input_ids"]))
    return out


def prompt_token_ids(tokenizer: Any, prompts: list[Any]) -> list[list[int]]:
    """Token ids of prompts as the trainer tokenises them: text as it is (with the tokenizer's special tokens), a
    list of chat messages through the chat template with the assistant turn opened."""
    out = []
    for prompt in prompts:
        if isinstance(prompt, list):
            rendered = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                     return_dict=True)
            out.append(list(rendered["input_ids"]))
        else:
            out.append(list(tokenizer(prompt)["input_ids"]))
    return out


def completion_batches(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int,
                       batch_size: int = 256) -> Iterator[dict[str, Tensor]]:
    """Right-padded batches of prompt + completion with the completion's tokens marked (``completion_mask``)."""
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
        yield batch


@torch.no_grad()
def completion_logps(model: Any, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int,
                     batch_size: int = 256) -> Tensor:
    """log π(completion | prompt), summed over the completion's tokens, one value per row (float64)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    values = [sequence_logps(model, {k: v.to(device) for k, v in batch.items()}).logps.double().cpu()
              for batch in completion_batches(prompt_ids, completion_ids, pad_token_id, batch_size)]
    model.train(was_training)
    return torch.cat(values)
