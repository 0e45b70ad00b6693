"""Summed completion log-probabilities of a stacked [chosen; rejected] batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from adaptdpo.models.attention_masks import CHOSEN, PROMPT, REJECTED, branch_mask
from adaptdpo.models.lm_head import HeadWindow, forward_window, mixed_log_probs
from adaptdpo.models.token_ops import TokenStats, accepts_logits_to_keep, ld_weights


@dataclass
class SequenceLogps:
    """Per-row results of one forward over a stacked batch of 2n rows."""

    logps: Tensor  # [2n] summed over completion tokens
    lengths: Tensor  # [2n] completion token counts
    outputs: Any  # the model output (hidden states when requested)
    stats: TokenStats | None = None  # TRL's token metrics, when asked for
    wpo_mean: Tensor | None = None  # [2n] WPO: mean of log p − log Σp² over each completion's tokens (detached)
    #: with ``keep_window``: the scored window of the forward (logits, or hidden states and the head), and
    #: ``rescore(score)``, which sums any per-position score ``score(select, labels) -> [..., K]`` over each row's
    #: completion tokens exactly as ``logps`` was summed (same positions, same LD-DPO weights): [2n, K]
    window: HeadWindow | None = None
    rescore: Callable[[Callable[[Callable[[Tensor], Tensor], Tensor], Tensor]], Tensor] | None = None

    def split(self) -> tuple[Tensor, Tensor]:
        chosen, rejected = self.logps.chunk(2, dim=0)
        return chosen, rejected




def completion_window(batch: dict[str, Tensor]) -> int:
    """K such that every completion token lies in the last K − 1 positions: the LM head and log-softmax run
    on those positions only (on HH-shaped data most positions are prompt). The collator precomputes it as
    ``logits_to_keep`` (a Python int: no host-device synchronisation); otherwise one sync here."""
    if "logits_to_keep" in batch:
        return int(batch["logits_to_keep"])
    width = batch["input_ids"].shape[1]
    if "segment_ids" in batch:  # packed: completions start after the prompt
        first = int((batch["segment_ids"] == PROMPT).sum(dim=1).min())
    else:
        mask = batch["completion_mask"]
        first = int(mask.int().argmax(dim=1).min()) if bool(mask.any()) else width - 1
    return width - max(first, 1) + 1


def padding_free_sequence_logps(model: torch.nn.Module, batch: dict[str, Tensor], token_stats: bool = False,
                                ld_alpha: float | None = None, wpo: bool = False,
                                head_chunk: int | None = None, keep_window: bool = False) -> SequenceLogps:
    """The padding-free forward: every pair [prompt, chosen, rejected] one after the other in one row, positions
    restarting per pair, a token seeing only its own pair (same-document and branch rule): no pad token is
    computed. Exact against the stacked layout (tested); per-pair sums by ``index_add`` over the document ids.
    Only the positions that predict a completion token are scored (through the chunked head when on)."""

    segments, ids, docs = batch["segment_ids"], batch["input_ids"], batch["document_ids"]
    starts = batch["pair_starts"]
    n, width = starts.shape[0], ids.shape[1]
    outputs, window = forward_window(model, width, head_chunk, input_ids=ids,
                                     attention_mask=branch_mask(model, segments, docs),
                                     position_ids=batch["position_ids"], use_cache=False)
    seg, tok, doc = segments[0], ids[0], docs[0]
    lengths = [torch.zeros(n, dtype=torch.long, device=ids.device).index_add_(
        0, doc[seg == part], torch.ones_like(doc[seg == part])) for part in (PROMPT, CHOSEN, REJECTED)]
    prompt_len, chosen_len, rejected_len = lengths
    nxt, cur = seg[1:], seg[:-1]
    in_chosen = nxt == CHOSEN  # a chosen token always follows its own prompt or chosen token
    in_rejected = (nxt == REJECTED) & (cur == REJECTED)  # the first rejected token: from the last prompt position
    scored = (in_chosen | in_rejected).nonzero().squeeze(1)
    pair = doc[scored + 1]
    is_chosen = in_chosen[scored]
    scores = window.scores(lambda x: x[0, scored], tok[scored + 1], token_stats, wpo)
    last_prompt = starts + prompt_len - 1
    first_rejected = tok[starts + prompt_len + chosen_len]
    first = window.scores(lambda x: x[0, last_prompt], first_rejected, token_stats, wpo)
    # LD-DPO: a token's index in its completion (the first rejected token, index 0, is the `first` score)
    index = scored + 1 - starts[pair] - prompt_len[pair] - torch.where(is_chosen, 0, chosen_len[pair])
    weight = ld_weights(index, torch.minimum(chosen_len, rejected_len)[pair], ld_alpha)
    per_token = scores.logp * weight

    def per_pair(values: Tensor, mask: Tensor) -> Tensor:
        out = torch.zeros((n, *values.shape[1:]), dtype=values.dtype, device=values.device)
        return out.index_add(0, pair[mask], values[mask])

    chosen = per_pair(per_token, is_chosen)
    rejected = per_pair(per_token, ~is_chosen) + first.logp
    wpo_mean = None
    if wpo:
        assert scores.log_sum_sq is not None and first.log_sum_sq is not None  # scored with wpo
        aligned = scores.logp.detach() - scores.log_sum_sq
        first_aligned = first.logp.detach() - first.log_sum_sq
        wpo_mean = torch.cat([per_pair(aligned, is_chosen) / chosen_len.clamp(min=1),
                              (per_pair(aligned, ~is_chosen) + first_aligned) / rejected_len.clamp(min=1)])
    stats = None
    if token_stats:
        stats = TokenStats.of(scores, is_chosen, ~is_chosen)
        ones = torch.ones_like(first_rejected, dtype=torch.bool)
        stats = stats + TokenStats.of(first, ~ones, ones)
    outputs.logits = None
    rescore = None
    if keep_window:
        def rescore(score: Callable) -> Tensor:
            values = score(lambda x: x[0, scored], tok[scored + 1]) * weight[:, None]
            first_values = score(lambda x: x[0, last_prompt], first_rejected)
            return torch.cat([per_pair(values, is_chosen), per_pair(values, ~is_chosen) + first_values])
    return SequenceLogps(logps=torch.cat([chosen, rejected]), lengths=torch.cat([chosen_len, rejected_len]),
                         outputs=outputs, stats=stats, wpo_mean=wpo_mean, window=window if keep_window else None,
                         rescore=rescore)


def packed_sequence_logps(model: torch.nn.Module, batch: dict[str, Tensor], output_hidden_states: bool = False,
                          token_stats: bool = False, ld_alpha: float | None = None,
                          wpo: bool = False, head_chunk: int | None = None, keep_window: bool = False) -> SequenceLogps:
    """The shared-prompt forward: one row [prompt, chosen, rejected] per pair, the prompt encoded once.

    Exact against the stacked layout up to floating-point reassociation (tested): the chosen branch sees
    the prompt and itself with positions P.., the rejected branch the prompt and itself with positions
    restarting at P; the first rejected token is scored from the last prompt position, like the first
    chosen one. Returns log-probs and lengths in the stacked order [chosen; rejected].
    """

    segments, ids = batch["segment_ids"], batch["input_ids"]
    mask = branch_mask(model, segments)
    width = ids.shape[1]
    keep = completion_window(batch) if accepts_logits_to_keep(model) else width
    kwargs = {"logits_to_keep": keep} if keep < width else {}
    outputs, window = forward_window(model, keep, head_chunk, input_ids=ids, attention_mask=mask,
                                     position_ids=batch["position_ids"], use_cache=False,
                                     output_hidden_states=output_hidden_states, **kwargs)
    start = width - keep  # the window holds positions width−keep .. width−1
    scores = window.scores(lambda x: x[:, :-1], ids[:, start + 1:], token_stats, wpo)
    per_token = scores.logp  # predicts position t+1 from t
    nxt, cur = segments[:, start + 1:], segments[:, start:-1]
    in_chosen, in_rejected = nxt == CHOSEN, (nxt == REJECTED) & (cur == REJECTED)
    prompt_len = (segments == PROMPT).sum(dim=1)
    chosen_len = (segments == CHOSEN).sum(dim=1)
    rejected_len = (segments == REJECTED).sum(dim=1)
    shared = torch.minimum(chosen_len, rejected_len)[:, None]
    # a token's index in its completion: chosen from 0; rejected from 1 (its first token is scored below)
    chosen_w = ld_weights(in_chosen.cumsum(dim=1) - 1, shared, ld_alpha)
    rejected_w = ld_weights(in_rejected.cumsum(dim=1), shared, ld_alpha)
    chosen = (per_token * in_chosen * chosen_w).sum(dim=-1)
    rejected = (per_token * in_rejected * rejected_w).sum(dim=-1)
    # the first rejected token is predicted from the last prompt position (not from the last chosen token)
    rows = torch.arange(ids.shape[0], device=ids.device)
    first_rejected = ids[rows, prompt_len + chosen_len]
    last_prompt = window.scores(lambda x: x[rows, prompt_len - 1 - start][:, None], first_rejected[:, None],
                                token_stats, wpo)
    first_logp = last_prompt.logp[:, 0]
    rejected = rejected + first_logp
    wpo_mean = None
    if wpo:
        assert scores.log_sum_sq is not None and last_prompt.log_sum_sq is not None  # scored with wpo
        aligned = per_token.detach() - scores.log_sum_sq
        first = first_logp.detach() - last_prompt.log_sum_sq[:, 0]
        wpo_mean = torch.cat([(aligned * in_chosen).sum(dim=-1) / chosen_len.clamp(min=1),
                              ((aligned * in_rejected).sum(dim=-1) + first) / rejected_len.clamp(min=1)])
    stats = None
    if token_stats:
        stats = TokenStats.of(scores, in_chosen, in_rejected)
        first = torch.ones_like(first_rejected[:, None], dtype=torch.bool)
        stats = stats + TokenStats.of(last_prompt, ~first, first)
    outputs.logits = None
    lengths = torch.cat([chosen_len, rejected_len])
    rescore = None
    if keep_window:
        def rescore(score: Callable) -> Tensor:
            values = score(lambda x: x[:, :-1], ids[:, start + 1:])
            first_values = score(lambda x: x[rows, prompt_len - 1 - start][:, None], first_rejected[:, None])[:, 0]
            chosen_sum = (values * (in_chosen * chosen_w)[..., None]).sum(dim=1)
            rejected_sum = (values * (in_rejected * rejected_w)[..., None]).sum(dim=1) + first_values
            return torch.cat([chosen_sum, rejected_sum])
    return SequenceLogps(logps=torch.cat([chosen, rejected]), lengths=lengths, outputs=outputs, stats=stats,
                         wpo_mean=wpo_mean, window=window if keep_window else None, rescore=rescore)


def branch_pooling_masks(segments: Tensor) -> Tensor:
    """[2n, L] masks of the tokens each branch sees (prompt + chosen; prompt + rejected), for contexts."""
    prompt = segments == PROMPT
    return torch.cat([prompt | (segments == CHOSEN), prompt | (segments == REJECTED)]).long()


def sequence_logps(model: torch.nn.Module, batch: dict[str, Tensor], output_hidden_states: bool = False,
                   token_stats: bool = False, ld_alpha: float | None = None, wpo: bool = False,
                   model_kwargs: dict[str, Any] | None = None, head_chunk: int | None = None,
                   keep_window: bool = False) -> SequenceLogps:
    """Forward ``batch`` and sum log π(token) over the completion tokens of every row.

    A packed batch (``segment_ids`` present, see :class:`adaptdpo.data.collate.PreferenceCollator`) goes through
    :func:`packed_sequence_logps`; the result has the same stacked layout either way.

    Where the model supports it, logits are computed only for the positions that predict completion
    tokens (``logits_to_keep``), not the whole sequence: the same numbers, less LM-head work and memory.

    ``token_stats``: also the sums behind TRL's ``entropy``, ``logits/chosen|rejected`` and
    ``mean_token_accuracy`` over the completion tokens (:class:`TokenStats`, detached). ``ld_alpha``: LD-DPO's
    weighting of the tokens beyond the pair's shared length (:func:`ld_weights`). ``wpo``: also WPO's per-sequence
    mean aligned log-prob (``wpo_mean``). ``model_kwargs``: more arguments of the forward (e.g.
    ``output_router_logits``; the stacked layout only). ``head_chunk``: compute the LM head and log-softmax this
    many positions at a time, forward and backward (:mod:`adaptdpo.models.lm_head`; the plain head where the model's
    head
    does not allow it). ``keep_window``: also return the scored window and a ``rescore`` of other per-position scores
    (ε-DPO's perturbed policies, :func:`perturbed_logratios`).
    """

    if "pair_starts" in batch:
        if model_kwargs or output_hidden_states:
            raise ValueError("padding-free batches take no extra forward arguments and give no per-pair hidden "
                             "states (SamS): use the per-row layouts")
        return padding_free_sequence_logps(model, batch, token_stats, ld_alpha, wpo, head_chunk, keep_window)
    if "segment_ids" in batch:
        if model_kwargs:
            raise ValueError(f"the shared-prompt layout takes no extra forward arguments ({', '.join(model_kwargs)})")
        return packed_sequence_logps(model, batch, output_hidden_states, token_stats, ld_alpha, wpo, head_chunk,
                                     keep_window)
    width = batch["input_ids"].shape[1]
    keep = completion_window(batch) if accepts_logits_to_keep(model) else width
    kwargs = {"logits_to_keep": keep} if keep < width else {}
    kwargs.update(model_kwargs or {})
    outputs, window = forward_window(model, keep, head_chunk, input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"], use_cache=False,
                                     output_hidden_states=output_hidden_states, **kwargs)
    start = width - keep + 1  # the first label position covered
    labels = batch["input_ids"][:, start:]
    mask = batch["completion_mask"][:, start:].to(torch.float32)
    scores = window.scores(lambda x: x[:, :-1], labels, token_stats, wpo)
    per_token = scores.logp
    lengths = batch["completion_mask"][:, 1:].sum(dim=-1)  # scored tokens (a row's first token never is), as TRL
    weights = mask
    if ld_alpha is not None:
        n = mask.shape[0] // 2
        shared = torch.minimum(lengths[:n], lengths[n:]).repeat(2)[:, None]
        weights = mask * ld_weights(mask.cumsum(dim=1) - 1, shared, ld_alpha)
    logps = (per_token * weights).sum(dim=-1)
    wpo_mean = None
    if wpo:
        assert scores.log_sum_sq is not None  # scored with wpo
        aligned = per_token.detach() - scores.log_sum_sq
        wpo_mean = (aligned * mask).sum(dim=-1) / lengths.clamp(min=1)
    stats = None
    if token_stats:
        in_completion = mask.bool()
        is_chosen = (torch.arange(mask.shape[0], device=mask.device) < mask.shape[0] // 2)[:, None]
        stats = TokenStats.of(scores, in_completion & is_chosen, in_completion & ~is_chosen)
    outputs.logits = None  # free the full logits early; nothing downstream needs them (a kept window holds its part)
    rescore = None
    if keep_window:
        def rescore(score: Callable) -> Tensor:
            return (score(lambda x: x[:, :-1], labels) * weights[..., None]).sum(dim=1)
    return SequenceLogps(logps=logps, lengths=lengths, outputs=outputs, stats=stats, wpo_mean=wpo_mean,
                         window=window if keep_window else None, rescore=rescore)


def perturbed_logratios(policy: SequenceLogps, reference: SequenceLogps, epsilon: float) -> Tensor:
    """ε-DPO's perturbed policy log-ratios per pair, [n, 3], detached: log π(y_w) − log π(y_l) under the policy
    estimated for β/(1 − ε), the policy itself, and the policy estimated for β/(1 + ε) (per-token logit mixtures of
    policy and reference, :func:`adaptdpo.models.lm_head.mixed_log_probs`), summed over the same completion tokens
    as the log-probs. Both results must come from forwards of the same batch with ``keep_window``."""
    if policy.rescore is None or policy.window is None or reference.window is None:
        raise ValueError("perturbed_logratios needs the policy's and the reference's scored windows (keep_window)")
    policy_window, reference_window = policy.window, reference.window
    a, b = policy_window.values(), reference_window.values()
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(f"the policy's and the reference's scored windows differ ({tuple(a.shape[:2])} vs "
                         f"{tuple(b.shape[:2])} positions): ε-DPO needs both models to score the same positions")
    sums = policy.rescore(lambda select, labels: mixed_log_probs(policy_window, reference_window, select, labels,
                                                                  epsilon))
    chosen, rejected = sums.chunk(2, dim=0)
    return chosen - rejected
