"""An exact cache of the frozen blocks' output (``trainable_layers: K`` with ``prefix_cache: true``).

With the bottom L−K blocks frozen, the hidden state entering block L−K is a function of a row's tokens, its
positions and the tokens it attends to, none of which training changes. It is computed once per row, stored on
disk, and fed to block L−K on later steps, epochs and runs; the frozen blocks are skipped. The numbers are those
of the uncached run up to float rounding (the tests compare loss, gradients and the weights after 3 steps at 1e-5).

How a step uses it (:meth:`PrefixCache.feeding`, around each forward of the model):

1. each row of the collated batch is cut into its entries: in the stacked layout a row (prompt + one
   completion; right-padded, so positions start at 0 whatever the batch); in the shared-prompt layout a row
   (prompt, chosen, rejected with their restarted positions); in the padding-free layout each pair's segment;
2. an entry's key is the sha256 of: the frozen part's fingerprint (its weights, the model config, the block count
   L−K), the layout, the entry's token ids, and the compute dtype (fp32 or bf16 autocast change the numbers);
3. on a miss the batch goes through the model once in *record* mode: a pre-hook on block L−K captures its input
   and stops the forward there, so only the frozen part runs; each entry is written (safetensors, atomically: a
   temporary file, then a rename, so two processes writing the same entry leave one whole file);
4. in *replay* mode the frozen blocks are skipped (their forward is the identity) and the last of them returns
   the cached states, laid out as the batch is, as the input of block L−K (which, under activation
   checkpointing, saves that input for its recomputation in backward).

Entries are read memory-mapped (``safetensors.safe_open``), one batch at a time: the cache is never held in RAM.
An entry whose stored key or checksum does not match, or that does not open (cut short, corrupted), is
recomputed with a warning, never used.

Choices: the hidden states returned by ``output_hidden_states`` below block L−K are not real in replay mode, so
SamS's contexts (and anything else reading hidden states) use the K trained blocks' outputs whenever
``trainable_layers`` is set, cached or not; only Llama-style blocks (``model.layers``: Llama, Qwen2/3, Mistral,
SmolLM2) are supported, where the block input is the residual stream and the block's forward returns it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import zlib
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from adaptdpo.models.partial import decoder_blocks
from adaptdpo.models.token_ops import unwrap

logger = logging.getLogger("adaptdpo")

FORMAT_VERSION = 1


class _Captured(Exception):
    """Raised by the record hook once block L−K's input is captured: the rest of the forward is not needed."""

    def __init__(self, states: Tensor):
        self.states = states


def _skip_block(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return hidden_states


def frozen_fingerprint(model: torch.nn.Module, frozen_blocks: int) -> str:
    """sha256 of what the frozen part computes with: its weights (embeddings and blocks below), the config."""
    base: Any = unwrap(model)  # a transformers model: config and get_input_embeddings are not nn.Module's
    _, blocks = decoder_blocks(base)
    h = hashlib.sha256(f"v{FORMAT_VERSION} {type(base).__name__} frozen={frozen_blocks}".encode())
    h.update(json.dumps(base.config.to_dict(), sort_keys=True, default=str).encode())
    modules: list[torch.nn.Module] = [base.get_input_embeddings(), *list(blocks)[:frozen_blocks]]
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _layout(batch: dict[str, Tensor]) -> str:
    if "pair_starts" in batch:
        return "padding_free"
    return "shared_prompt" if "segment_ids" in batch else "stacked"


def _entries(batch: dict[str, Tensor]) -> list[tuple[int, int, int]]:
    """(row, start, end) of every entry of a collated batch, in the batch's order."""
    if "pair_starts" in batch:
        starts = batch["pair_starts"].tolist()
        width = int(batch["input_ids"].shape[1])
        real = int(batch["attention_mask"][0].sum()) if "attention_mask" in batch else width
        ends = [*starts[1:], real]
        return [(0, int(s), int(e)) for s, e in zip(starts, ends)]
    mask = batch["segment_ids"] != 0 if "segment_ids" in batch else batch["attention_mask"].bool()
    lengths = mask.sum(dim=1).tolist()
    return [(row, 0, int(n)) for row, n in enumerate(lengths)]


class PrefixCache:
    """The frozen-prefix cache of one model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, frozen_blocks: int, cache_dir: str, compute_dtype: str):
        path, blocks = decoder_blocks(model)
        if path != "model.layers":
            raise ValueError(f"prefix_cache: supported for Llama-style models (model.layers: Llama, Qwen, Mistral, "
                             f"SmolLM2), not {type(unwrap(model)).__name__} ({path}); set prefix_cache: false to "
                             "train the top blocks without the cache")
        if not 1 <= frozen_blocks < len(blocks):
            raise ValueError(f"prefix_cache: {frozen_blocks} frozen blocks of {len(blocks)}")
        self.blocks = blocks
        self.frozen_blocks = frozen_blocks
        self.cache_dir = cache_dir
        self.compute_dtype = compute_dtype
        self.fingerprint = frozen_fingerprint(model, frozen_blocks)
        self._mode = "off"  # "record" while a miss is computed
        self._states: Tensor | None = None
        self.hits = 0
        self.misses = 0
        self._hook = blocks[frozen_blocks].register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    # ------------------------------------------------------------------------------------------ hooks

    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._mode == "record":
            raise _Captured((args[0] if args else kwargs["hidden_states"]).detach())

    def _emit(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """The last frozen block in replay mode: its output is the cached input of the first trained block."""
        assert self._states is not None
        if self._states.shape != hidden_states.shape:
            raise RuntimeError(f"prefix cache: states of shape {tuple(self._states.shape)} for a block input of "
                               f"shape {tuple(hidden_states.shape)}")
        return self._states

    def _set_replay(self, on: bool) -> None:
        frozen = list(self.blocks)[: self.frozen_blocks]
        for block in frozen:
            if on:
                block.forward = _skip_block
            elif "forward" in block.__dict__:
                del block.forward
        if on:
            frozen[-1].forward = self._emit

    # ------------------------------------------------------------------------------------------ entries

    def _key(self, layout: str, ids: list[int]) -> str:
        h = hashlib.sha256(f"{self.fingerprint} {layout} {self.compute_dtype} ".encode())
        h.update(json.dumps(ids).encode())
        return h.hexdigest()

    def _file(self, key: str) -> str:
        return os.path.join(self.cache_dir, key[:2], f"{key}.safetensors")

    def _read(self, key: str) -> Tensor | None:
        path = self._file(key)
        if not os.path.exists(path):
            return None
        try:
            with safe_open(path, framework="pt") as fh:
                meta = fh.metadata() or {}
                states = fh.get_tensor("states")
            if meta.get("key") != key or int(meta.get("crc32", -1)) != _crc(states):
                raise ValueError("stored key or checksum does not match")
            return states
        except Exception as exc:  # cut short, corrupted, or another entry's file: recompute
            logger.warning("prefix cache: %s is unusable (%s); recomputing it", path, exc)
            with contextlib.suppress(OSError):
                os.remove(path)
            return None

    def _write(self, key: str, states: Tensor) -> None:
        path = self._file(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        states = states.contiguous().cpu()
        save_file({"states": states}, tmp, metadata={"key": key, "crc32": str(_crc(states)),
                                                     "version": str(FORMAT_VERSION)})
        os.replace(tmp, path)

    # ------------------------------------------------------------------------------------------ a forward

    @contextlib.contextmanager
    def feeding(self, model: torch.nn.Module, batch: dict[str, Tensor], forward: Any) -> Iterator[None]:
        """Within this context, ``forward()`` (a call of the model on ``batch``) runs from the cached states.

        ``forward`` is called once more in record mode when some entry is missing."""
        layout = _layout(batch)
        entries = _entries(batch)
        ids = batch["input_ids"]
        keys = [self._key(layout, ids[row, start:end].tolist()) for row, start, end in entries]
        found = [self._read(key) for key in keys]
        missing = [i for i, states in enumerate(found) if states is None]
        if missing:
            self._mode = "record"
            try:
                with torch.no_grad():
                    forward()
                raise RuntimeError("prefix cache: the forward never reached the first trained block")
            except _Captured as captured:
                recorded = captured.states
            finally:
                self._mode = "off"
            for i in missing:
                row, start, end = entries[i]
                states = recorded[row, start:end].contiguous().cpu()
                found[i] = states
                self._write(keys[i], states)
            self.misses += len(missing)
        self.hits += len(entries) - len(missing)
        width = int(ids.shape[1])
        first = next(t for t in found if t is not None)
        states = torch.zeros((int(ids.shape[0]), width, first.shape[-1]), dtype=first.dtype)
        for (row, start, end), entry in zip(entries, found):
            assert entry is not None
            states[row, start:end] = entry
        self._states = states.to(ids.device)
        self._set_replay(True)
        try:
            yield
        finally:
            # the first trained block holds its input (activation checkpointing saves it): nothing here is needed
            # in backward, and the frozen blocks compute again outside this context
            self._set_replay(False)
            self._states = None

    def close(self) -> None:
        self._hook.remove()
        self._set_replay(False)


def _crc(tensor: Tensor) -> int:
    return zlib.crc32(tensor.contiguous().view(torch.uint8).numpy().tobytes()) if tensor.numel() else 0
