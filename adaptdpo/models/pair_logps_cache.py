"""The reference model's log-probs of each pair, computed once and kept across epochs, methods, seeds and runs
(``cache_reference_logps: true``).

A reference that is the frozen start model gives every pair the same two numbers whatever the run; they are
stored per pair, keyed by the sha256 of: the reference's weights and config, the layout (stacked, shared prompt,
padding-free: each rounds differently), the pair's token ids as collated, the LD-DPO α (it weights the
reference's tokens) and the compute dtype. A hit needs every pair of the micro-batch; otherwise the reference runs
on the batch and its values are added.

Storage: an append-only JSONL file per writing process in the cache folder (two floats a pair), all read at
start; a line cut short by a kill is skipped with a warning, a line whose key repeats keeps the first value
(they are equal). Nothing is trusted without its key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading

import torch
from torch import Tensor

from adaptdpo.models.token_ops import unwrap

logger = logging.getLogger("adaptdpo")

FORMAT_VERSION = 1


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model's weights and config (every tensor of its state dict, in float32)."""
    base = unwrap(model)
    h = hashlib.sha256(f"v{FORMAT_VERSION} {type(base).__name__}".encode())
    config = getattr(base, "config", None)
    if config is not None:
        h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(base.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def pair_token_ids(batch: dict[str, Tensor]) -> tuple[str, list[list[int]]]:
    """The layout of a collated batch and each pair's token ids (stacked: chosen row then rejected row)."""
    ids = batch["input_ids"]
    if "pair_starts" in batch:
        starts = batch["pair_starts"].tolist()
        real = int(batch["attention_mask"][0].sum()) if "attention_mask" in batch else int(ids.shape[1])
        ends = [*starts[1:], real]
        return "padding_free", [ids[0, s:e].tolist() for s, e in zip(starts, ends)]
    if "segment_ids" in batch:
        lengths = (batch["segment_ids"] != 0).sum(dim=1).tolist()
        return "shared_prompt", [ids[i, :n].tolist() for i, n in enumerate(lengths)]
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    n = ids.shape[0] // 2
    return "stacked", [[*ids[i, :lengths[i]].tolist(), -1, *ids[n + i, :lengths[n + i]].tolist()] for i in range(n)]


class PairLogpsCache:
    """Per-pair (chosen, rejected) log-probs of one fixed model, on disk (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, cache_dir: str, extra_key: str):
        self.cache_dir = cache_dir
        self.prefix = f"{model_fingerprint(model)} {extra_key}"
        self.values: dict[str, tuple[float, float]] = {}
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        os.makedirs(cache_dir, exist_ok=True)
        for name in sorted(os.listdir(cache_dir)):
            if name.startswith("pairs-") and name.endswith(".jsonl"):
                self._load(os.path.join(cache_dir, name))
        self._path = os.path.join(cache_dir, f"pairs-{os.getpid()}-{threading.get_ident()}.jsonl")

    def _load(self, path: str) -> None:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                try:
                    record = json.loads(line)
                    key, chosen, rejected = record["key"], float(record["chosen"]), float(record["rejected"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    logger.warning("reference log-prob cache: %s line %d is unreadable (cut short?); skipped, its "
                                   "pair is computed again", path, number)
                    continue
                self.values.setdefault(key, (chosen, rejected))

    def _keys(self, batch: dict[str, Tensor]) -> list[str]:
        layout, pairs = pair_token_ids(batch)
        return [hashlib.sha256(f"{self.prefix} {layout} {json.dumps(p)}".encode()).hexdigest() for p in pairs]

    def get(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor] | None:
        """The batch's (chosen, rejected) reference log-probs when every pair is cached, else None."""
        keys = self._keys(batch)
        found = [self.values.get(k) for k in keys]
        if any(v is None for v in found):
            return None
        self.hits += len(keys)
        device = batch["input_ids"].device
        chosen = torch.tensor([v[0] for v in found if v is not None], dtype=torch.float32, device=device)
        rejected = torch.tensor([v[1] for v in found if v is not None], dtype=torch.float32, device=device)
        return chosen, rejected

    def put(self, batch: dict[str, Tensor], chosen: Tensor, rejected: Tensor) -> None:
        keys = self._keys(batch)
        values = list(zip(chosen.detach().float().cpu().tolist(), rejected.detach().float().cpu().tolist()))
        new = [(k, v) for k, v in zip(keys, values) if k not in self.values]
        self.misses += len(new)
        with self._lock, open(self._path, "a", encoding="utf-8") as fh:
            for key, (c, r) in new:
                self.values[key] = (c, r)
                fh.write(json.dumps({"key": key, "chosen": c, "rejected": r}) + "\n")
            fh.flush()
