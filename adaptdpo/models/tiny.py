"""models.tiny"""

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
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(save_dir)  # saved with its pad token
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

    devices: list[int] = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        return AutoModelForCausalLM.from_config(config, **kwargs)
