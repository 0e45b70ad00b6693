"""Build (or load from its cache) the gold-reward task: language, tokenizer, reference model, pairs.

    task = build_task(ToySpec(seed=0, high_gap_fraction=0.5, flip_rate=0.2), cache_root="runs/gold-cache")
    task.train_file, task.eval_file      # JSONL in the standard prompt/chosen/rejected format (+ gold fields)
    task.reference_dir                  # the reference model (save_pretrained folder), also the tokenizer

Steps, each cached under a folder named by a hash of the settings it depends on:

1. the language (words, hidden features, base Markov chain) from the seed;
2. a word-level tokenizer trained on a corpus of base-distribution text;
3. the reference: a tiny GPT-2 trained by maximum likelihood on that corpus;
4. a pool of on-policy pairs: two responses sampled from the reference for each prompt (re-drawn when
   they are identical or empty), with their gold rewards; r* is rescaled to unit standard deviation over
   the reference's responses;
5. the training set: high-gap pairs (gold gap in the pool's top third) and low-gap pairs (bottom third)
   mixed at ``high_gap_fraction``; Bradley–Terry labels P(y1 ≻ y2) = σ((r1 − r2)/bt_temperature); then a
   ``flip_rate`` of the pairs get chosen and rejected swapped (recorded: ``flipped``);
6. held-out pairs (other prompts, every gap, labelled by the gold reward, never flipped) and held-out
   prompts for win rates.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass
from typing import Any

import torch

from adaptdpo.models.loading import load_tokenizer
from adaptdpo.models.sampling import sample_completions
from adaptdpo.models.tiny import SPECIAL_TOKENS, build_tiny_model, tiny_model_config
from adaptdpo.tasks.base import (
    TASK_RUN_SETTINGS,
    TaskFileError,
    TaskFolder,
    digest,
    read_json,
    read_jsonl,
    write_jsonl_atomic,
)
from adaptdpo.tasks.pairs import controlled_pairs, gold_labelled_pairs
from adaptdpo.tasks.toy.language import Language

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToySpec:
    seed: int = 0
    num_words: int = 48
    feature_dim: int = 4
    prompt_words: int = 3
    corpus_size: int = 8000
    reference_steps: int = 300
    reference_hidden: int = 64
    reference_layers: int = 2
    pool_prompts: int = 2400  # prompts of the on-policy pair pool (one pair each)
    train_pairs: int = 768
    eval_pairs: int = 256
    eval_prompts: int = 128
    high_gap_fraction: float = 0.5
    flip_rate: float = 0.2
    bt_temperature: float = 0.1
    data_seed: int | None = None  # which pairs and labels are drawn (default: seed)

    def reference_key(self) -> dict[str, Any]:
        keys = ("seed", "num_words", "feature_dim", "prompt_words", "corpus_size", "reference_steps",
                "reference_hidden", "reference_layers")
        return {k: getattr(self, k) for k in keys}

    def pool_key(self) -> dict[str, Any]:
        return {**self.reference_key(), "pool_prompts": self.pool_prompts, "eval_pairs": self.eval_pairs,
                "eval_prompts": self.eval_prompts}


@dataclass
class ToyTask(TaskFolder):
    """The toy task's folder: its files (see :class:`~adaptdpo.tasks.base.TaskFolder`) and its language, whose
    hidden reward is the gold reward."""

    spec: ToySpec
    language: Language
    reference_dir: str
    train_file: str
    eval_file: str
    prompts_file: str
    stats: dict[str, Any]

    @property
    def max_new_tokens(self) -> int:
        return 24

    def gold_reward(self, prompt: Any, completion: str) -> float:
        return self.language.gold_reward(prompt, completion)

    def train_defaults(self) -> dict[str, Any]:

        return dict(GOLD_TRAIN_DEFAULTS)


# ------------------------------------------------------------------------------------ the reference


def _corpus(language: Language, size: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(size):
        prompt = language.sample_prompt(rng)
        out.append((language.prompt_text(prompt), language.response_text(language.sample_base_response(prompt, rng))))
    return out


def train_word_tokenizer(texts: list[str]) -> Any:
    """A word-level tokenizer trained on the corpus: one token per word of the language (and "Q:", "A:")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    special = ["<|endoftext|>", "<|pad|>", "<|unk|>"]
    tok.train_from_iterator(texts, trainer=trainers.WordLevelTrainer(special_tokens=special, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|unk|>", **SPECIAL_TOKENS)


def _train_reference(spec: ToySpec, language: Language, folder: str) -> None:
    """Tokenizer + tiny GPT-2 trained by maximum likelihood on base-distribution text; saved to ``folder``."""
    corpus = _corpus(language, spec.corpus_size, spec.seed)
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = train_word_tokenizer([p + r for p, r in corpus])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    seqs = [tokenizer(p + r)["input_ids"] + [eos] for p, r in corpus]
    cfg = tiny_model_config("tiny-gpt2", len(tokenizer), spec.reference_hidden, spec.reference_layers, 4, 64, pad, eos)
    model = build_tiny_model(cfg, seed=spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / spec.reference_steps)))
    rng = random.Random(spec.seed)
    model.train()
    for step in range(spec.reference_steps):
        batch = rng.sample(seqs, 64)
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(batch):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == spec.reference_steps - 1:
            logger.info("reference MLE step %d/%d: loss %.3f", step + 1, spec.reference_steps, loss.item())
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "final_loss.json"), "w", encoding="utf-8") as fh:
        json.dump({"mle_loss": loss.item()}, fh)
    os.replace(tmp, folder)


# ------------------------------------------------------------------------------------ pairs


def _responses(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, seed: int) -> list[str]:
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    completions = sample_completions(model, ids, tokenizer.eos_token_id, tokenizer.pad_token_id, max_new_tokens, seed)
    return [tokenizer.decode([t for t in c if t != tokenizer.eos_token_id]) for c in completions]


def _sample_pairs(model: Any, tokenizer: Any, language: Language, prompts: list[str], seed: int) -> list[dict]:
    """Two reference samples per prompt; a prompt whose two samples are identical or empty is re-drawn."""
    pairs: list[dict] = []
    todo, attempt = list(prompts), 0
    max_new = 2 * language.max_words + 4
    while todo and attempt < 20:
        a = _responses(model, tokenizer, todo, max_new, seed * 1000 + 2 * attempt)
        b = _responses(model, tokenizer, todo, max_new, seed * 1000 + 2 * attempt + 1)
        retry = []
        for prompt, ya, yb in zip(todo, a, b, strict=True):
            if ya.strip() and yb.strip() and ya.strip() != yb.strip():
                pairs.append({"prompt": prompt, "y1": ya, "y2": yb})
            else:
                retry.append(prompt)
        todo, attempt = retry, attempt + 1
    return pairs


def _pool(spec: ToySpec, language: Language, folder: str, reference_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(reference_dir)
    tokenizer = load_tokenizer(reference_dir)
    rng = random.Random(spec.seed + 7)
    n_prompts = spec.pool_prompts + spec.eval_pairs + spec.eval_prompts
    prompts: list[str] = []
    seen: set[str] = set()
    while len(prompts) < n_prompts:
        p = language.prompt_text(language.sample_prompt(rng))
        if p not in seen:  # held-out prompts never appear in training
            seen.add(p)
            prompts.append(p)
    # the scale: unit standard deviation of r* over the reference's own responses
    scale_sample = _responses(model, tokenizer, prompts[:500], 2 * language.max_words + 4, spec.seed + 11)
    raw = torch.tensor([language.gold_reward(p, y) for p, y in zip(prompts[:500], scale_sample, strict=True)])
    language.scale = float(raw.std())
    pool = _sample_pairs(model, tokenizer, language, prompts[: spec.pool_prompts], spec.seed + 1)
    held = _sample_pairs(model, tokenizer, language, prompts[spec.pool_prompts: spec.pool_prompts + spec.eval_pairs],
                         spec.seed + 2)
    for row in pool + held:
        row["gold1"], row["gold2"] = language.gold_reward(row["prompt"], row["y1"]), language.gold_reward(row["prompt"],
                                                                                                         row["y2"])
    tmp = f"{folder}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    write_jsonl_atomic(os.path.join(tmp, "pool.jsonl"), pool)
    write_jsonl_atomic(os.path.join(tmp, "held_out_pairs.jsonl"), held)
    write_jsonl_atomic(os.path.join(tmp, "prompts.jsonl"),
                        [{"prompt": p} for p in prompts[spec.pool_prompts + spec.eval_pairs:]])
    with open(os.path.join(tmp, "language.json"), "w", encoding="utf-8") as fh:
        json.dump(language.to_dict(), fh)
    os.replace(tmp, folder)


def _training_rows(spec: ToySpec, pool: list[dict]) -> tuple[list[dict], dict[str, Any]]:
    return controlled_pairs(pool, spec.train_pairs, spec.high_gap_fraction, spec.flip_rate, spec.bt_temperature,
                            spec.data_seed if spec.data_seed is not None else spec.seed)


def load_task(task_dir: str, reference_dir: str | None = None) -> ToyTask:
    """A task folder written by :func:`build_task` (train/eval/prompts files, language, task.json).

    Every file is checked here, before any work: present, parseable (errors name the file and line), and
    the held-out pairs as many as task.json records."""
    if not os.path.isdir(task_dir):
        raise TaskFileError(f"{task_dir}: no such task folder")
    stats = read_json(os.path.join(task_dir, "task.json"))
    language = Language.from_dict(read_json(os.path.join(task_dir, "language.json")))
    reference_dir = reference_dir or stats["reference_dir"]
    if not os.path.isfile(os.path.join(reference_dir, "config.json")):
        raise TaskFileError(f"{os.path.join(task_dir, 'task.json')}: its reference model {reference_dir} is missing "
                            "(rebuild the task, or pass --reference)")
    task = ToyTask(ToySpec(**stats["spec"]), language, reference_dir, os.path.join(task_dir, "train.jsonl"),
                    os.path.join(task_dir, "eval.jsonl"), os.path.join(task_dir, "prompts.jsonl"), stats)
    task.check_files()
    return task


def build_task(spec: ToySpec = ToySpec(), cache_root: str = "runs/gold-cache") -> ToyTask:
    """The task for ``spec``, built on first use and cached under ``cache_root`` (safe to interrupt)."""
    os.makedirs(cache_root, exist_ok=True)
    reference_dir = os.path.join(cache_root, "reference-" + digest(spec.reference_key()))
    language = Language.create(spec.seed, spec.num_words, spec.feature_dim, spec.prompt_words)
    if not os.path.isdir(reference_dir):
        logger.info("gold task: training the reference model (cached in %s)", reference_dir)
        _train_reference(spec, language, reference_dir)
    pool_dir = os.path.join(cache_root, "pool-" + digest(spec.pool_key()))
    if not os.path.isdir(pool_dir):
        logger.info("gold task: sampling on-policy pairs from the reference (cached in %s)", pool_dir)
        _pool(spec, language, pool_dir, reference_dir)
    with open(os.path.join(pool_dir, "language.json"), encoding="utf-8") as fh:
        language = Language.from_dict(json.load(fh))
    task_dir = os.path.join(cache_root, "task-" + digest(dataclasses.asdict(spec)))
    if not os.path.isdir(task_dir):
        rows, stats = _training_rows(spec, read_jsonl(os.path.join(pool_dir, "pool.jsonl")))
        held = gold_labelled_pairs(read_jsonl(os.path.join(pool_dir, "held_out_pairs.jsonl")))
        stats.update({"train_pairs": len(rows), "eval_pairs": len(held), "spec": dataclasses.asdict(spec)})
        tmp = f"{task_dir}.tmp-{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        write_jsonl_atomic(os.path.join(tmp, "train.jsonl"), rows)
        write_jsonl_atomic(os.path.join(tmp, "eval.jsonl"), held)
        shutil.copy(os.path.join(pool_dir, "prompts.jsonl"), os.path.join(tmp, "prompts.jsonl"))
        shutil.copy(os.path.join(pool_dir, "language.json"), os.path.join(tmp, "language.json"))
        stats["reference_dir"] = os.path.abspath(reference_dir)
        with open(os.path.join(tmp, "task.json"), "w", encoding="utf-8") as fh:
            json.dump(stats, fh, indent=2)
        os.replace(tmp, task_dir)
    if not os.path.exists(os.path.join(task_dir, "language.json")):  # a cache from before tasks carried it
        shutil.copy(os.path.join(pool_dir, "language.json"), os.path.join(task_dir, "language.json"))
    return load_task(task_dir, reference_dir)

#: training settings on the gold task (the tiny GPT-2 reference, 16 pairs per step)
GOLD_TRAIN_DEFAULTS: dict[str, Any] = {
    **TASK_RUN_SETTINGS,
    "max_length": 64,
    "truncation_mode": "keep_prompt_end",  # the rule docs/results.md was made with (before TRL's keep_start default)
    "per_device_train_batch_size": 16,
    "num_train_epochs": 3,
    "learning_rate": 1e-3,
    "activation_checkpointing": False,  # a 0.1 M-parameter model has no memory to save; recomputing costs time
    "use_cpu": True,
    "bf16": False,  # a 0.1 M-parameter model gains nothing from bf16; the tables were measured in float32
}
