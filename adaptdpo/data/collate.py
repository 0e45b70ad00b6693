"""data.collate"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------- collating


def _pad(seqs: list[list[int]], value: int, multiple: int | None) -> Tensor:
    width = max(len(s) for s in seqs)
    if multiple:
        width = -(-width // multiple) * multiple
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def pairs_in_batch(batch: dict[str, Any]) -> int:
    """Number of pairs of a collated batch (stacked: 2n rows; packed: n rows)."""
    if "pair_starts" in batch:  # padding-free: every pair in one row
        return int(batch["pair_starts"].shape[0])
    rows = batch["input_ids"].shape[0]
    return rows if "segment_ids" in batch else rows // 2


def stacked_rows(batch: dict[str, Any], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, Tensor]:
    """TRL's stacked rows of a collated batch in any layout: ``input_ids`` and ``attention_mask`` of [prompt + chosen]
    for every pair, then [prompt + rejected] for every pair, right-padded with ``pad_token_id`` (what TRL 1.16's
    collator builds; a stacked batch is returned as it is). A packed or padding-free batch is unpacked from its
    ``segment_ids`` (and ``document_ids``)."""
    if "segment_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    ids, segments = batch["input_ids"], batch["segment_ids"]
    if "document_ids" in batch:  # padding-free: one row, the pairs one after the other
        documents = batch["document_ids"][0]
        pairs = range(int(batch["pair_starts"].shape[0]))
        parts = [(ids[0][documents == j], segments[0][documents == j]) for j in pairs]
    else:
        parts = list(zip(ids, segments, strict=True))
    chosen, rejected = [], []
    for row, seg in parts:
        prompt = row[seg == 1].tolist()
        chosen.append(prompt + row[seg == 2].tolist())
        rejected.append(prompt + row[seg == 3].tolist())
    seqs = chosen + rejected
    device = ids.device
    return {"input_ids": _pad(seqs, pad_token_id, pad_to_multiple_of).to(device),
            "attention_mask": _pad([[1] * len(s) for s in seqs], 0, pad_to_multiple_of).to(device)}


def batch_to(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """Move a collated batch's tensors to ``device`` (its ``logits_to_keep`` is a plain int and stays)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class PreferenceCollator:
    """Stack n pairs into one right-padded batch of 2n rows: all chosen rows first, then all rejected.

    This is TRL 1.16's layout (``input_ids``, ``attention_mask``, ``completion_mask``), so a batch built
    here can be fed to TRL's ``DPOTrainer`` and back. Precomputed ``ref_chosen_logps`` /
    ``ref_rejected_logps``, ``pair_id`` and the per-pair ``weight`` / ``beta`` pass through.

    ``shared_prompt=True``: the packed layout instead, n rows [prompt, chosen, rejected] with
    ``segment_ids`` (1 prompt, 2 chosen, 3 rejected, 0 padding) and ``position_ids`` that restart at the
    prompt length for the rejected branch: the prompt is encoded once (see
    :func:`adaptdpo.models.sequence_logps.packed_sequence_logps`).

    ``padding_free=True`` (with ``shared_prompt``): every pair's [prompt, chosen, rejected] one after the other in
    ONE row, no padding between them, with ``document_ids`` (the pair's index in the batch; −1 for the padding
    ``pad_to_multiple_of`` adds at the end) and ``pair_starts`` (each pair's first position); positions restart
    for every pair (see :func:`adaptdpo.models.sequence_logps.padding_free_sequence_logps`).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    shared_prompt: bool = False
    padding_free: bool = False
    #: TRL's truncation_mode keep_end: every stacked row keeps its last this many tokens (stacked layout only)
    keep_end_max_length: int | None = None

    def __post_init__(self) -> None:
        if self.keep_end_max_length is not None and self.shared_prompt:
            raise ValueError("keep_end truncation cuts each of a pair's two rows on its own: the stacked layout only")

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        if self.padding_free:
            batch = self._padding_free(examples)
        elif self.shared_prompt:
            batch = self._packed(examples)
        else:
            batch = self._stacked(examples)
        # the LM head only needs the positions from the shortest prompt on (see logprobs.completion_window);
        # both padded layouts start every row with its prompt (one row holding every pair needs all positions)
        width = batch["input_ids"].shape[1]
        if self.padding_free:
            first = 1
        elif self.shared_prompt:
            first = max(1, min(len(e["prompt_ids"]) for e in examples))
        else:  # a keep_end row may have lost part (or all) of its prompt
            first = max(1, int(batch["completion_mask"].int().argmax(dim=1).min()))
        batch["logits_to_keep"] = width - first + 1
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
        if "pair_id" in examples[0]:
            batch["pair_id"] = torch.tensor([e["pair_id"] for e in examples], dtype=torch.long)
        for key in ("weight", "beta"):  # per-pair loss weight and β (weight_column, beta_column)
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
        return batch

    def _stacked(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        seqs = [e["prompt_ids"] + e["chosen_ids"] for e in examples]
        seqs += [e["prompt_ids"] + e["rejected_ids"] for e in examples]
        completion = [[0] * len(e["prompt_ids"]) + [1] * len(e["chosen_ids"]) for e in examples]
        completion += [[0] * len(e["prompt_ids"]) + [1] * len(e["rejected_ids"]) for e in examples]
        if self.keep_end_max_length is not None:  # TRL's collator: each row keeps its last max_length tokens
            cut = slice(-self.keep_end_max_length, None)
            seqs, completion = [s[cut] for s in seqs], [m[cut] for m in completion]
        batch: dict[str, Any] = {
            "input_ids": _pad(seqs, self.pad_token_id, self.pad_to_multiple_of),
            "attention_mask": _pad([[1] * len(s) for s in seqs], 0, self.pad_to_multiple_of),
            "completion_mask": _pad(completion, 0, self.pad_to_multiple_of),
        }
        return batch

    def _padding_free(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids: list[int] = []
        segments: list[int] = []
        positions: list[int] = []
        documents: list[int] = []
        starts = []
        for index, e in enumerate(examples):
            p, c, r = len(e["prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"])
            starts.append(len(ids))
            ids += e["prompt_ids"] + e["chosen_ids"] + e["rejected_ids"]
            segments += [1] * p + [2] * c + [3] * r
            positions += list(range(p + c)) + list(range(p, p + r))
            documents += [index] * (p + c + r)
        return {
            "input_ids": _pad([ids], self.pad_token_id, self.pad_to_multiple_of),
            "attention_mask": _pad([[1] * len(ids)], 0, self.pad_to_multiple_of),
            "segment_ids": _pad([segments], 0, self.pad_to_multiple_of),
            "position_ids": _pad([positions], 0, self.pad_to_multiple_of),
            "document_ids": _pad([documents], -1, self.pad_to_multiple_of),
            "pair_starts": torch.tensor(starts, dtype=torch.long),
        }

    def _packed(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        seqs, segments, positions = [], [], []
        for e in examples:
            p, c, r = len(e["prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"])
            seqs.append(e["prompt_ids"] + e["chosen_ids"] + e["rejected_ids"])
            segments.append([1] * p + [2] * c + [3] * r)
            positions.append(list(range(p + c)) + list(range(p, p + r)))
        batch: dict[str, Any] = {
            "input_ids": _pad(seqs, self.pad_token_id, self.pad_to_multiple_of),
            "attention_mask": _pad([[1] * len(s) for s in seqs], 0, self.pad_to_multiple_of),
            "segment_ids": _pad(segments, 0, self.pad_to_multiple_of),
            "position_ids": _pad(positions, 0, self.pad_to_multiple_of),
        }
        return batch
