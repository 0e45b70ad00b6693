"""Frozen features of every completion for the reward probe (issue 26): one forward pass of the reference.

For every pair, the reference's hidden states at a few layers, pooled over the completion's tokens, for the
chosen and the rejected completion; the reference's summed completion log-probs come out of the same pass
(the code path that gives the audit, and the trainer, its completion log-probs: :func:`sequence_logps` with
hidden states on).

Choices, and why:

- **Layers** are numbered as ``output_hidden_states`` returns them: ℓ = the output of decoder block ℓ, L = the
  last block (for Llama-style models transformers applies the final norm to that one); a negative number counts
  from the end (−1 = L). Layer 0 is the token embeddings themselves (the input embedding lookup, without the
  learned position embeddings GPT-2 adds, which describe where a token sits, not what the completion says).
  ``auto`` takes 0, round(L/4), round(L/2) and L, deduplicated (0, 8, 15, 30 on SmolLM2-135M's 30 blocks;
  0, 1, 2 on a 2-block model): the first look of issue 26 found a quarter of the way up best on sentiment, and
  which layer carries the reward differs by task, so several are kept and the probe weighs them by held-out
  likelihood. A layer outside 0..L is an error before any forward pass.
- **Poolings**: ``mean`` over the completion's tokens, ``last`` = its last token.
- **A bag of tokens** (:func:`token_bag`, ``tokens.mean``): each completion's token frequencies over the
  reference tokenizer's vocabulary, no forward pass: a lexical view that does not depend on what the reference's
  states know. A linear reward on it is a per-token score averaged over the completion, the form of the toy gold
  reward and close to a word lexicon's; measured on three unseen toy tasks it ranks flips at 0.64-0.70 AUROC where
  the pooled hidden states reach 0.57-0.67 (docs/audit.md). The vocabulary is the tokens found in at least
  ``min_count`` completions of the data (a token seen once cannot carry over to a held-out pair), the
  ``max_tokens`` most frequent of them; it is built from the completions alone, never the labels, so
  cross-fitting stays honest.
- **float32 on the CPU** in the result; the forward runs in the model's own dtype on the audit's device.
- **Eval mode, no gradients**; batches of ``batch_size`` pairs, right-padded (the stacked layout).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from adaptdpo.data.collate import PreferenceCollator, batch_to
from adaptdpo.models.sequence_logps import sequence_logps

POOLINGS = ("mean", "last")


class FeatureError(ValueError):
    """Features that cannot be computed as asked (a layer the model does not have, an unknown pooling)."""


def parse_layers(text: str | Sequence[int]) -> list[int] | str:
    """``auto`` or comma-separated integers (``"0,4,-1"``)."""
    if not isinstance(text, str):
        return [int(v) for v in text]
    if text.strip() == "auto":
        return "auto"
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FeatureError(f"--probe_layers {text!r}: auto or comma-separated layer numbers") from None
    if not values:
        raise FeatureError(f"--probe_layers {text!r}: no layer given")
    return values


def parse_poolings(text: str | Sequence[str]) -> list[str]:
    values = [v.strip() for v in (text.split(",") if isinstance(text, str) else text) if v.strip()]
    bad = [v for v in values if v not in POOLINGS]
    if bad or not values:
        raise FeatureError(f"--probe_poolings {text!r}: choose from {', '.join(POOLINGS)}")
    return list(dict.fromkeys(values))


def resolve_layers(layers: Sequence[int] | str, num_blocks: int) -> list[int]:
    """Layer numbers in 0..num_blocks (hidden-state indices), ascending, deduplicated; errors name the bad one."""
    if isinstance(layers, str):
        if layers != "auto":
            raise FeatureError(f"layers {layers!r}: auto or a list of layer numbers")
        chosen = [0, max(1, round(num_blocks / 4)), max(1, round(num_blocks / 2)), num_blocks]
    else:
        chosen = []
        for layer in layers:
            resolved = num_blocks + 1 + layer if layer < 0 else layer
            if not 0 <= resolved <= num_blocks:
                raise FeatureError(f"layer {layer} does not exist: the model has {num_blocks} blocks (layers 0.."
                                   f"{num_blocks}, or −1..−{num_blocks + 1} from the end)")
            chosen.append(resolved)
    return sorted(set(chosen))


TOKEN_BAG = "tokens.mean"


def token_bag(examples: Sequence[dict[str, Any]], min_count: int = 2, max_tokens: int = 4096
              ) -> tuple[Tensor, Tensor, list[int]]:
    """(chosen [n, V], rejected [n, V], the V token ids): each completion's token frequencies (counts / its length)
    over the tokens found in at least ``min_count`` completions, the ``max_tokens`` most frequent (ties: lower id
    first). An empty completion's row is all zeros."""
    if min_count < 1 or max_tokens < 1:
        raise FeatureError(f"token bag: min_count and max_tokens must be positive, got {min_count}, {max_tokens}")
    completions = [list(e[key]) for e in examples for key in ("chosen_ids", "rejected_ids")]
    frequency: dict[int, int] = {}
    for ids in completions:
        for token in set(ids):
            frequency[token] = frequency.get(token, 0) + 1
    kept = sorted((t for t, f in frequency.items() if f >= min_count), key=lambda t: (-frequency[t], t))[:max_tokens]
    column = {t: j for j, t in enumerate(kept)}
    bag = torch.zeros(len(completions), len(kept))
    for row, ids in enumerate(completions):
        for token in ids:
            j = column.get(token)
            if j is not None:
                bag[row, j] += 1.0 / len(ids)
    return bag[0::2], bag[1::2], kept


def model_blocks(config: Any) -> int | None:
    """The number of decoder blocks a transformers config describes (None when it does not say)."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    text = getattr(config, "text_config", None)
    return model_blocks(text) if text is not None else None


def feature_name(layer: int, pooling: str) -> str:
    return f"L{layer}.{pooling}"


def pool(states: Tensor, mask: Tensor, how: str) -> Tensor:
    """[rows, T, d] → [rows, d]: mean over the positions where ``mask`` is 1, or the last such position."""
    m = mask.to(states.dtype)
    if how == "mean":
        return (states * m[..., None]).sum(1) / m.sum(1).clamp(min=1)[:, None]
    if how == "last":
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=1).values
        return states[torch.arange(states.shape[0], device=states.device), last]
    raise FeatureError(f"unknown pooling {how!r}: choose from {', '.join(POOLINGS)}")


@dataclass
class Features:
    chosen: dict[str, Tensor]  # feature set name → [n, d]
    rejected: dict[str, Tensor]
    ref_chosen_logps: Tensor  # [n] float64
    ref_rejected_logps: Tensor
    chosen_lengths: Tensor  # [n] completion tokens
    rejected_lengths: Tensor
    layers: list[int]
    poolings: list[str]
    info: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def completion_features(model: Any, examples: Sequence[dict[str, Any]], pad_token_id: int,
                        layers: Sequence[int] | str = "auto", poolings: Sequence[str] = POOLINGS,
                        batch_size: int = 32, progress: Callable[[int], None] | None = None) -> Features:
    """Pooled hidden states of every completion at ``layers`` (checked against the model before the pass), and the
    reference log-probs of the same forward."""
    blocks = model_blocks(model.config)
    if blocks is None:
        raise FeatureError("the model's config does not say how many blocks it has")
    chosen_layers = resolve_layers(layers, blocks)
    poolings = parse_poolings(poolings)
    names = [feature_name(ell, p) for ell in chosen_layers for p in poolings]
    parts: dict[str, tuple[list[Tensor], list[Tensor]]] = {name: ([], []) for name in names}
    logps: list[Tensor] = []
    lengths: list[Tensor] = []
    collate = PreferenceCollator(pad_token_id)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(examples), batch_size):
            batch = batch_to(collate(list(examples[start:start + batch_size])), device)
            result = sequence_logps(model, batch, output_hidden_states=True)
            hidden = result.outputs.hidden_states
            if hidden is None or len(hidden) != blocks + 1:
                raise FeatureError(f"the model returned {0 if hidden is None else len(hidden)} hidden states, "
                                   f"expected {blocks + 1}")
            n = batch["input_ids"].shape[0] // 2
            for ell in chosen_layers:
                if ell == 0:  # the token embeddings (no position embeddings: see the module's docstring)
                    states = model.get_input_embeddings()(batch["input_ids"]).float()
                else:
                    states = hidden[ell].float()
                for p in poolings:
                    pooled = pool(states, batch["completion_mask"], p).cpu()
                    parts[feature_name(ell, p)][0].append(pooled[:n])
                    parts[feature_name(ell, p)][1].append(pooled[n:])
            logps.append(result.logps.double().cpu())
            lengths.append(result.lengths.cpu())
            if progress is not None:
                progress(min(len(examples), start + batch_size))
    finally:
        model.train(was_training)
    all_logps = torch.cat(logps) if logps else torch.zeros(0, dtype=torch.float64)
    all_lengths = torch.cat(lengths) if lengths else torch.zeros(0)
    # batches are stacked [chosen; rejected] per batch: undo per batch
    chosen_lp, rejected_lp, chosen_len, rejected_len = [], [], [], []
    offset = 0
    for start in range(0, len(examples), batch_size):
        n = min(batch_size, len(examples) - start)
        chosen_lp.append(all_logps[offset:offset + n])
        rejected_lp.append(all_logps[offset + n:offset + 2 * n])
        chosen_len.append(all_lengths[offset:offset + n])
        rejected_len.append(all_lengths[offset + n:offset + 2 * n])
        offset += 2 * n
    cat = (lambda xs: torch.cat(xs) if xs else torch.zeros(0))  # noqa: E731
    return Features({k: torch.cat(v[0]) for k, v in parts.items()}, {k: torch.cat(v[1]) for k, v in parts.items()},
                    cat(chosen_lp).double(), cat(rejected_lp).double(), cat(chosen_len).double(),
                    cat(rejected_len).double(), chosen_layers, poolings, {"blocks": blocks})
