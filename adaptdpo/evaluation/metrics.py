"""Evaluation: gold-task metrics (exact judge) and implicit-reward metrics for any preference data.

- :func:`preference_accuracy`: on held-out pairs labelled by the gold reward, how often the policy's
  implicit reward β·(log π − log π_ref) ranks the gold-better response first (SamS's "test accuracy");
  a tie (h = 0, e.g. policy = reference) counts ½.
- :func:`gold_generation_metrics`: on held-out prompts, one sample from the policy and one from the
  reference per prompt, drawn with the same random numbers; the gold win rate of the policy's sample
  (tie ½; β-DPO's win rate with an exact judge instead of GPT-4), the mean gold reward of each, and
  KL(π‖π_ref) estimated on the policy's samples as the mean of log π(y|x) − log π_ref(y|x).
- :func:`selection_of_flipped_pairs`: from a run's pairs.jsonl, how often flipped and clean pairs were
  trained on when they came up (β-DPO's filter, SamS's scheduler), and the share of flipped pairs among all
  pairs trained on (which also counts data-level selection: Selective DPO's dropped pairs never come up).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from adaptdpo.data.collate import PreferenceCollator, batch_to
from adaptdpo.data.tokenize import tokenize_rows
from adaptdpo.models.sampling import completion_batches, prompt_token_ids, sample_completions
from adaptdpo.models.sequence_logps import sequence_logps
from adaptdpo.models.shared_prefix import both_sequence_logps, policy_pass_from, reference_pass


@torch.no_grad()
def pair_completion_logps(model: Any, examples: Sequence[dict[str, Any]], pad_token_id: int, batch_size: int = 64,
                          progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (chosen, rejected), float64 on the CPU, of tokenised pairs
    (``prompt_ids``/``chosen_ids``/``rejected_ids``), in eval mode; ``progress(n)`` after each batch."""
    collate = PreferenceCollator(pad_token_id)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen_out, rejected_out = [], []
    for start in range(0, len(examples), batch_size):
        batch = batch_to(collate(list(examples[start:start + batch_size])), device)
        chosen, rejected = sequence_logps(model, batch).split()
        chosen_out.append(chosen.double().cpu())
        rejected_out.append(rejected.double().cpu())
        if progress is not None:
            progress(min(len(examples), start + batch_size))
    model.train(was_training)
    empty = torch.zeros(0, dtype=torch.float64)
    return (torch.cat(chosen_out) if chosen_out else empty), (torch.cat(rejected_out) if rejected_out else empty)


@contextlib.contextmanager
def _eval_mode(*models: Any) -> Iterator[None]:
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


#: the reference's pass over held-out pairs in this process, by (reference_key, tokenised pairs, batch size, frozen
#: blocks, device): per batch its (chosen, rejected) log-probs and, with a shared bottom, the input of block L − K.
#: A benchmark that judges many policies of one reference on the same pairs runs the reference once (the same
#: numbers: the same model and inputs in the same process). At most :data:`REFERENCE_PASSES_KEPT` entries (with a
#: shared bottom an entry holds the hidden states of every pair: about 0.5 GB for 512 SmolLM2 pairs of 150 tokens)
_REFERENCE_PAIR_PASSES: dict[tuple, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = {}
REFERENCE_PASSES_KEPT = 2


def _reference_pair_pass(reference: Any, batches: list[dict[str, torch.Tensor]], frozen_blocks: int | None,
                         key: tuple | None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Per batch: the reference's chosen and rejected log-probs (float64, CPU) and the input of block
    ``frozen_blocks`` (None without a shared bottom); read from, or added to, the process's memo under ``key``."""
    if key is not None and key in _REFERENCE_PAIR_PASSES:
        return _REFERENCE_PAIR_PASSES[key]
    passes = []
    for batch in batches:
        if frozen_blocks is None:
            theirs, states = sequence_logps(reference, batch), None
        else:
            theirs, states = reference_pass(reference, batch, frozen_blocks)
        chosen, rejected = theirs.split()
        passes.append((chosen.double().cpu(), rejected.double().cpu(), states))
    if key is not None:
        while len(_REFERENCE_PAIR_PASSES) >= REFERENCE_PASSES_KEPT:
            del _REFERENCE_PAIR_PASSES[next(iter(_REFERENCE_PAIR_PASSES))]
        _REFERENCE_PAIR_PASSES[key] = passes
    return passes


@torch.no_grad()
def pair_logratios(policy: Any, reference: Any, tokenizer: Any, rows: Sequence[dict[str, Any]],
                   max_length: int | None = 256, batch_size: int = 64, frozen_blocks: int | None = None,
                   reference_key: str | None = None) -> torch.Tensor:
    """h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)) per row (float64). ``frozen_blocks``
    (:func:`~adaptdpo.models.shared_prefix.shared_frozen_blocks`): the policy's bottom blocks are the
    reference's, computed once per batch (the same numbers). ``reference_key`` (e.g. the reference's folder, which
    must not change while the process runs): keep the reference's pass over these pairs for the next call with
    the same key, pairs and batching; later calls run only the policy (its top K blocks with a shared bottom)."""
    examples, _ = tokenize_rows(list(rows), tokenizer, max_length, None, truncation_mode="keep_prompt_end")
    collate = PreferenceCollator(tokenizer.pad_token_id)
    device = next(policy.parameters()).device
    batches = [batch_to(collate(list(examples[start:start + batch_size])), device)
               for start in range(0, len(examples), batch_size)]
    key = None if reference_key is None else (
        reference_key, tuple((tuple(e["prompt_ids"]), tuple(e["chosen_ids"]), tuple(e["rejected_ids"]))
                             for e in examples), batch_size, frozen_blocks, str(device))
    out = []
    with _eval_mode(policy, reference):
        passes = _reference_pair_pass(reference, batches, frozen_blocks, key)
        for batch, (rc, rr, states) in zip(batches, passes, strict=True):
            if frozen_blocks is None or states is None:
                ours = sequence_logps(policy, batch)
            else:
                ours = policy_pass_from(policy, batch, frozen_blocks, states)
            pc, pr = ours.split()
            out.append((pc.double().cpu() - rc) - (pr.double().cpu() - rr))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def preference_accuracy(policy: Any, reference: Any, tokenizer: Any, rows: Sequence[dict[str, Any]],
                        beta: float = 0.1, frozen_blocks: int | None = None, reference_key: str | None = None
                        ) -> dict[str, float]:
    """Accuracy and mean margin of the implicit reward on rows whose ``chosen`` is the better response
    (``frozen_blocks``, ``reference_key``: see :func:`pair_logratios`)."""
    h = pair_logratios(policy, reference, tokenizer, rows, frozen_blocks=frozen_blocks, reference_key=reference_key)
    accuracy = ((h > 0).double() + 0.5 * (h == 0).double()).mean()
    return {"accuracy": float(accuracy), "margin": float(beta * h.mean())}


#: the wall-clock entries of :func:`gold_generation_metrics` (they differ between two equal calls)
TIMING_KEYS = ("sampling_s", "sampling_tokens_per_s", "kl_s", "reference_sampling_s")


#: the reference's samples of this process, by (reference_key, prompts, seed, length, special ids): a benchmark that
#: judges many runs from one reference on the same prompts and seed samples the reference once (the same numbers:
#: the same model, inputs and random stream, in the same process)
_REFERENCE_SAMPLES: dict[tuple, list] = {}


def gold_generation_metrics(policy: Any, reference: Any, tokenizer: Any, prompts: Sequence[Any],
                            gold: Callable[[Any, str], float], seed: int = 0, max_new_tokens: int = 24,
                            samples_per_prompt: int = 2, reference_key: str | None = None,
                            frozen_blocks: int | None = None) -> dict[str, float]:
    """Gold win rate against the reference, mean gold rewards, KL(π‖π_ref) on held-out prompts (text, or chat
    messages rendered by the tokenizer's template). ``reference_key`` (e.g. the reference's folder, which must not
    change while the process runs): keep the reference's samples for the next call with the same key and inputs.
    ``frozen_blocks``: see :func:`pair_logratios`. Also returned: the policy's sampling speed (sampled tokens/s)
    and the seconds of each part (the reference's sampling: 0 where its samples were kept)."""
    prompt_ids = prompt_token_ids(tokenizer, list(prompts)) * samples_per_prompt
    texts = list(prompts) * samples_per_prompt
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    started = time.time()
    ours = sample_completions(policy, prompt_ids, eos, pad, max_new_tokens, seed)
    sampling_s = time.time() - started
    key = None if reference_key is None else (reference_key, tuple(map(tuple, prompt_ids)), seed, max_new_tokens,
                                              eos, pad, str(next(reference.parameters()).device))
    theirs = _REFERENCE_SAMPLES.get(key) if key is not None else None
    started = time.time()
    if theirs is None:
        theirs = sample_completions(reference, prompt_ids, eos, pad, max_new_tokens, seed)
        if key is not None:
            _REFERENCE_SAMPLES[key] = theirs
    reference_sampling_s = time.time() - started
    decode = lambda c: tokenizer.decode([t for t in c if t != eos])  # noqa: E731
    r_ours = torch.tensor([gold(p, decode(c)) for p, c in zip(texts, ours, strict=True)], dtype=torch.float64)
    r_theirs = torch.tensor([gold(p, decode(c)) for p, c in zip(texts, theirs, strict=True)], dtype=torch.float64)
    wins = (r_ours > r_theirs).double() + 0.5 * (r_ours == r_theirs).double()
    started = time.time()
    device = next(policy.parameters()).device
    kl_parts = []
    with _eval_mode(policy, reference):
        for batch in completion_batches(prompt_ids, ours, pad):
            mine, base = both_sequence_logps(policy, reference, batch_to(batch, device), frozen_blocks)
            kl_parts.append((mine.logps.double() - base.logps.double()).cpu())
    kl = torch.cat(kl_parts)
    tokens = sum(len(c) for c in ours)
    return {"win_rate": float(wins.mean()), "reward": float(r_ours.mean()), "reference_reward": float(r_theirs.mean()),
            "kl": float(kl.mean()), "mean_length": tokens / len(ours), "sampling_s": sampling_s,
            "sampling_tokens_per_s": tokens / max(sampling_s, 1e-9), "kl_s": time.time() - started,
            "reference_sampling_s": reference_sampling_s}


def selection_of_flipped_pairs(run_dir: str, flipped: set[int]) -> dict[str, float]:
    """Fraction of the appearances of flipped pairs (and of clean pairs) that were trained on."""
    counts = {True: [0, 0], False: [0, 0]}  # flipped? → [trained, seen]
    path = os.path.join(run_dir, "pairs.jsonl")
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            if "pair_id" not in record:
                raise ValueError(f"{path}: records carry no pair_id (was the run traced with trace_pairs?)")
            for pair_id, trained in zip(record["pair_id"], record["trained"], strict=True):
                c = counts[pair_id in flipped]
                c[0] += int(trained)
                c[1] += 1
    nan = float("nan")  # no such pair seen (e.g. no flips): no fraction
    trained = counts[True][0] + counts[False][0]
    return {"flipped_trained_fraction": counts[True][0] / counts[True][1] if counts[True][1] else nan,
            "clean_trained_fraction": counts[False][0] / counts[False][1] if counts[False][1] else nan,
            "flipped_share_of_trained": counts[True][0] / trained if trained else nan}
