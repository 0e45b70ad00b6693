"""Models and tokenizers: load a pretrained causal LM, or build a tiny one from a config.

Nothing here downloads anything unless the user names a hub model. The tiny presets pair a randomly
initialised decoder (Llama- or GPT-2-shaped) with a byte-level BPE tokenizer trained on the run's own
training text, cached by a hash of that text and the vocabulary size.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any

import torch

TINY_PRESETS = ("tiny-llama", "tiny-gpt2")
SPECIAL_TOKENS = {"pad_token": "<|pad|>", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}
#: a ChatML-like template so conversational data works with locally trained tokenizers
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, save_dir: str | None = None) -> Any:
    """Train a byte-level BPE tokenizer (deterministic for the same texts) and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if save_dir and os.path.isfile(os.path.join(save_dir, "tokenizer.json")):
        return load_tokenizer(save_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    wrapped.chat_template = CHAT_TEMPLATE
    if save_dir:
        tmp = f"{save_dir}.tmp-{os.getpid()}"
        wrapped.save_pretrained(tmp)
        try:
            os.replace(tmp, save_dir)
        except OSError:  # another process won the race: theirs is identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return wrapped


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
    from .model_sources import PACKAGED_MODELS, is_gguf, packaged_file

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

    from .model_sources import resolve_model

    check_model_source(name_or_path, "tokenizer", needs="")
    extra: dict[str, Any] = {"revision": revision} if revision else {}
    if trust_remote_code:
        extra["trust_remote_code"] = True
    tok = AutoTokenizer.from_pretrained(resolve_model(name_or_path), **extra)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def text_fingerprint(texts: Iterable[str], *extra: object) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    for e in extra:
        h.update(repr(e).encode())
    return h.hexdigest()[:16]


def tiny_model_config(preset: str, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                      max_positions: int, pad_token_id: int, eos_token_id: int) -> Any:
    """A small decoder config: `tiny-llama` (RoPE, RMSNorm, SwiGLU) or `tiny-gpt2` (learned positions)."""
    from transformers import GPT2Config, LlamaConfig

    if preset == "tiny-llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                           num_hidden_layers=num_layers, num_attention_heads=num_heads,
                           num_key_value_heads=num_heads, max_position_embeddings=max_positions,
                           pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=eos_token_id,
                           tie_word_embeddings=False, attention_dropout=0.0)
    if preset == "tiny-gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                          n_positions=max_positions, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                          bos_token_id=eos_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    raise ValueError(f"unknown tiny preset {preset!r}; choose one of {TINY_PRESETS}")


def build_tiny_model(config: Any, seed: int, attn_implementation: str | None = None) -> Any:
    """Randomly initialise a model from ``config``; the same seed gives the same weights on every rank."""
    from transformers import AutoModelForCausalLM

    devices = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        return AutoModelForCausalLM.from_config(config, **kwargs)


def load_pretrained(name_or_path: str, dtype: str = "float32", attn_implementation: str | None = None,
                    **from_pretrained_kwargs: Any) -> Any:
    """A pretrained causal LM from a folder, hub id, packaged model name or GGUF file (docs/models.md).

    ``dtype`` float32 by default: fp32 master weights, with bf16 autocast for the compute (``bf16``), as TRL
    does; ``auto`` takes the checkpoint's dtype (often bfloat16: see :func:`check_half_precision_updates`).
    ``from_pretrained_kwargs``: anything else from_pretrained takes (revision, trust_remote_code, device_map, ...)."""
    from transformers import AutoModelForCausalLM

    from .model_sources import resolve_model

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
