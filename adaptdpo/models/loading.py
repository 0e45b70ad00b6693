"""Models and tokenizers: load a pretrained causal LM, or build a tiny one from a config.

Nothing here downloads anything unless the user names a hub model. The tiny presets pair a randomly
initialised decoder (Llama- or GPT-2-shaped) with a byte-level BPE tokenizer trained on the run's own
training text, cached by a hash of that text and the vocabulary size.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from adaptdpo.models.sources import PACKAGED_MODELS, is_gguf, packaged_file, resolve_model
from adaptdpo.models.tiny import TINY_PRESETS


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for name in ("config.json", "tokenizer_config.json", "tokenizer.json"):
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str) and os.path.exists(found):
            return True
    return False


def check_model_source(name_or_path: str, key: str = "model_name_or_path", needs: str = "config.json") -> None:
    """Fail at once, naming ``key``, when ``name_or_path`` is neither a usable local folder nor a hub id that
    can be loaded now (cached, or the hub reachable). ``needs``: the file a usable folder holds."""

    if name_or_path in TINY_PRESETS:
        return
    if name_or_path in PACKAGED_MODELS:
        packaged_file(name_or_path)  # installed? (names the install command otherwise)
        return
    if is_gguf(name_or_path):
        if not os.path.isfile(name_or_path):
            raise FileNotFoundError(f"{key}={name_or_path}: no such GGUF file")
        return
    if os.path.isdir(name_or_path):
        if needs and not os.path.exists(os.path.join(name_or_path, needs)):
            raise FileNotFoundError(f"{key}={name_or_path}: the folder exists but holds no {needs} (not a saved "
                                    "model; `save_pretrained` writes one)")
        return
    if os.path.exists(name_or_path):
        raise ValueError(f"{key}={name_or_path}: a file, not a model folder")
    parent = os.path.dirname(name_or_path)
    looks_local = (name_or_path.startswith((".", "/", "~")) or (os.sep == "\\" and "\\" in name_or_path)
                   or name_or_path.count("/") > 1 or bool(parent and os.path.isdir(parent)))
    if looks_local:
        raise FileNotFoundError(f"{key}={name_or_path}: no such folder")
    if _in_hub_cache(name_or_path):
        return
    if hub_offline():
        raise FileNotFoundError(f"{key}={name_or_path}: no such local folder, and the hub is offline "
                                "(HF_HUB_OFFLINE=1) with no cached copy of that id")
    if not _hub_reachable():
        raise ConnectionError(f"{key}={name_or_path}: no such local folder, and the Hugging Face hub cannot be "
                              "reached to download it (no network?)")


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer


    check_model_source(name_or_path, "tokenizer", needs="")
    extra: dict[str, Any] = {"revision": revision} if revision else {}
    if trust_remote_code:
        extra["trust_remote_code"] = True
    tok = AutoTokenizer.from_pretrained(resolve_model(name_or_path), **extra)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_pretrained(name_or_path: str, dtype: str = "float32", attn_implementation: str | None = None,
                    **from_pretrained_kwargs: Any) -> Any:
    """A pretrained causal LM from a folder, hub id, packaged model name or GGUF file (docs/models.md).

    ``dtype`` float32 by default: fp32 master weights, with bf16 autocast for the compute (``bf16``), as TRL
    does; ``auto`` takes the checkpoint's dtype (often bfloat16: see :func:`check_half_precision_updates`).
    ``from_pretrained_kwargs``: anything else from_pretrained takes (revision, trust_remote_code, device_map, ...)."""
    from transformers import AutoModelForCausalLM


    check_model_source(name_or_path)
    kwargs: dict[str, Any] = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(resolve_model(name_or_path), **kwargs, **from_pretrained_kwargs)


#: the relative spacing of representable numbers near 1 (one unit in the last place): 2^-7 for bfloat16
HALF_PRECISION_ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def lost_update_fraction(model: torch.nn.Module, learning_rate: float) -> tuple[float, int]:
    """Of the trainable half-precision weight elements, the fraction that an update of size ``learning_rate``
    (Adam's per-step update is about lr per element) cannot change: |w|·ulp/2 > lr, so w + Δ rounds back to w.
    Returns (fraction, number of half-precision trainable elements)."""
    lost, total = 0, 0
    for param in model.parameters():
        if not param.requires_grad or param.dtype not in HALF_PRECISION_ULP:
            continue
        half_spacing = param.detach().abs().float() * (HALF_PRECISION_ULP[param.dtype] / 2)
        lost += int((half_spacing > learning_rate).sum())
        total += param.numel()
    return (lost / total if total else 0.0), total


def check_half_precision_updates(model: torch.nn.Module, learning_rate: float, allow: bool) -> None:
    """Refuse to train half-precision weights whose updates at ``learning_rate`` would mostly round to zero
    (pure-bf16 AdamW at DPO learning rates: 0.9% of elements changed in 3 steps against 84% with fp32 weights)."""
    fraction, total = lost_update_fraction(model, learning_rate)
    if total == 0 or fraction <= 0.5:
        return
    message = (f"{fraction:.0%} of the {total:,} trainable half-precision weight elements are too large for an update "
               f"of learning_rate={learning_rate:g} to change them (it rounds to zero): the model would barely learn. "
               "Load float32 weights (dtype: float32, the default; compute still runs in bf16 with bf16: auto/true), "
               "train a LoRA adapter (use_peft: true), or set allow_half_precision_updates: true to train anyway")
    if not allow:
        raise ValueError(message)
    import logging

    logging.getLogger("adaptdpo").warning("%s (allowed by allow_half_precision_updates)",
                                          message.split(": the model")[0])


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (as TRL does by default): DPO log-probs must be deterministic."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
