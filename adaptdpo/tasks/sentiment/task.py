"""Build (or load from its cache) the controlled-sentiment task on a real model (the DPO paper's exact-judge
experiment, §6.1, with VADER in place of a sentiment classifier).

    task = build_sentiment_task(SentimentSpec(flip_rate=0.2), cache_root="runs/sentiment-cache")
    task.train_file, task.eval_file    # JSONL, TRL's conversational format (+ gold_chosen, gold_rejected, flipped)
    task.reference_dir                 # the model sampled from: the reference of every run

Steps, each cached under a folder named by a hash of what it depends on:

1. prompts: the 2,000 template × topic prompts (:func:`~adaptdpo.tasks.sentiment.prompts.sentiment_prompts`), training
   and held-out sides disjoint by topic; ``train_prompts`` training prompts, ``eval_pair_prompts`` +
   ``eval_prompts`` held-out ones (no prompt in both), each side shuffled with ``prompt_seed``;
2. the pool (key: the model's sha256 and the sampling settings): for every training prompt, two completions
   sampled on-policy from the model, chat-templated, at ``temperature`` with at most ``max_new_tokens`` new
   tokens, re-drawn (up to 4 times) when the two are identical or empty; each scored by the gold reward
   r*(x, y) = VADER compound(y) ∈ [−1, 1]. Sampled in chunks of ``sampling_batch`` prompts with seeds fixed per
   chunk, each chunk saved as it finishes: a build killed at any moment resumes where it stopped, with the same
   samples as an uninterrupted one. The held-out pairs likewise, on their own prompts;
3. the training set: :func:`~adaptdpo.tasks.pairs.controlled_pairs` — high-gap (top third) and low-gap
   (bottom third) pairs mixed at ``high_gap_fraction``, Bradley–Terry labels at ``bt_temperature``, a
   ``flip_rate`` share flipped (recorded); held-out pairs labelled by r*, never flipped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Any

import torch

from adaptdpo.models.loading import load_tokenizer
from adaptdpo.models.sampling import generate, prompt_token_ids
from adaptdpo.models.sources import model_fingerprint, resolve_model
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
from adaptdpo.tasks.sentiment.judge import VaderJudge
from adaptdpo.tasks.sentiment.prompts import sentiment_prompts
from adaptdpo.training.checkpointing import atomic_write_text

logger = logging.getLogger(__name__)

#: training settings of the task's experiments (full fine-tuning of SmolLM2-135M-Instruct; precision as TRL:
#: fp32 weights, bf16 autocast on a GPU; the device is the trainer's default: CUDA when there is one)
SENTIMENT_TRAIN_DEFAULTS: dict[str, Any] = {
    **TASK_RUN_SETTINGS,
    "max_length": 128,  # chat-templated prompt (~45 tokens with SmolLM2's default system turn) + 48 + end of turn
    "max_prompt_length": 72,
    "per_device_train_batch_size": 16,
    "num_train_epochs": 2,
    "learning_rate": 5e-6,
    "activation_checkpointing": False,  # 135 M parameters at 128 tokens: memory to spare, recomputing costs time
}


@dataclass(frozen=True)
class SentimentSpec:
    model: str = "smollm2-135m-instruct"
    prompt_seed: int = 0
    held_out_share: float = 0.2
    train_prompts: int = 1600  # the pool: one pair per training prompt
    eval_pair_prompts: int = 256  # held-out pairs (implicit-reward accuracy)
    eval_prompts: int = 128  # held-out prompts (win rate, gold reward, KL)
    max_new_tokens: int = 48
    temperature: float = 1.0
    sampling_batch: int = 64  # prompts per sampling chunk (fixed: it decides which random numbers a row gets)
    sampling_dtype: str = "float32"  # bfloat16: the pool sampled under bf16 autocast (faster on a bf16 CPU)
    sample_seed: int = 0
    train_pairs: int = 512
    high_gap_fraction: float = 0.5
    flip_rate: float = 0.2
    bt_temperature: float = 0.05  # r* ∈ [−1, 1]; the two samples' gap has a std of about 0.7
    data_seed: int | None = None  # which pairs and labels are drawn (default: sample_seed)

    @classmethod
    def quick(cls, **overrides: Any) -> SentimentSpec:
        """A handful of prompts and pairs, short completions: every stage in seconds on a CPU (the tests)."""
        settings = {"train_prompts": 12, "eval_pair_prompts": 4, "eval_prompts": 4, "max_new_tokens": 8,
                    "sampling_batch": 8, "train_pairs": 4, **overrides}
        return cls(**settings)

    def pool_key(self, model_sha256: str) -> dict[str, Any]:
        keys = ("prompt_seed", "held_out_share", "train_prompts", "eval_pair_prompts", "eval_prompts",
                "max_new_tokens", "temperature", "sampling_batch", "sample_seed")
        key = {"model_sha256": model_sha256, **{k: getattr(self, k) for k in keys}}
        if self.sampling_dtype != "float32":  # float32 pools keep the key they were built with
            key["sampling_dtype"] = self.sampling_dtype
        return key


@dataclass
class SentimentTask(TaskFolder):
    """The sentiment task's folder (files as every task's, conversational rows) and its judge."""

    spec: SentimentSpec
    reference_dir: str
    train_file: str
    eval_file: str
    prompts_file: str
    stats: dict[str, Any]
    kind = "sentiment"

    def __post_init__(self) -> None:
        self._judge: VaderJudge | None = None

    @property
    def max_new_tokens(self) -> int:
        return self.spec.max_new_tokens

    def gold_reward(self, prompt: Any, completion: str) -> float:
        """r*(x, y) = VADER compound(y): the completion's sentiment, whatever the prompt."""
        if self._judge is None:
            self._judge = VaderJudge()
        return self._judge.score(completion)

    def train_defaults(self) -> dict[str, Any]:
        return dict(SENTIMENT_TRAIN_DEFAULTS)


def user_turn(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def conversational(row: dict[str, Any]) -> dict[str, Any]:
    """A labelled pair with text completions as TRL's conversational format (one user turn, one assistant turn)."""
    return {**row, "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def split_prompts(spec: SentimentSpec) -> tuple[list[str], list[str], list[str]]:
    """(training prompts of the pool, held-out prompts of the pairs, held-out prompts of the win rate)."""
    split = sentiment_prompts(spec.prompt_seed, spec.held_out_share)
    rng = random.Random(spec.prompt_seed)
    train, held = list(split.train), list(split.held_out)
    rng.shuffle(train)
    rng.shuffle(held)
    if spec.train_prompts > len(train) or spec.eval_pair_prompts + spec.eval_prompts > len(held):
        raise ValueError(f"the split has {len(train)} training and {len(held)} held-out prompts; asked for "
                         f"{spec.train_prompts} and {spec.eval_pair_prompts} + {spec.eval_prompts}")
    return (train[: spec.train_prompts], held[: spec.eval_pair_prompts],
            held[spec.eval_pair_prompts: spec.eval_pair_prompts + spec.eval_prompts])


class PairSampler:
    """Two on-policy completions per prompt, scored by the judge, in deterministic chunks."""

    def __init__(self, model: Any, tokenizer: Any, judge: VaderJudge, spec: SentimentSpec):
        self.model, self.tokenizer, self.judge, self.spec = model, tokenizer, judge, spec

    def _draw(self, prompts: list[str], seed: int) -> list[tuple[str, int, bool]]:
        """(text, tokens, ended) per prompt: one completion each."""

        tok = self.tokenizer
        ids = prompt_token_ids(tok, [user_turn(p) for p in prompts])
        samples = generate(self.model, ids, tok.eos_token_id, tok.pad_token_id, self.spec.max_new_tokens, seed,
                           temperature=self.spec.temperature, batch_size=len(ids),
                           autocast=torch.bfloat16 if self.spec.sampling_dtype == "bfloat16" else None)
        out = []
        for s in samples:
            ended = bool(s.tokens) and s.tokens[-1] == tok.eos_token_id
            text = tok.decode([t for t in s.tokens if t != tok.eos_token_id], skip_special_tokens=True)
            out.append((text, len(s.tokens), ended))
        return out

    def chunk(self, prompts: list[str], seed: int) -> tuple[list[dict[str, Any]], list[str]]:
        """Pool rows for ``prompts`` (seeds ``seed`` + attempt·2 + k) and the prompts left without a distinct pair."""
        rows: dict[str, dict[str, Any]] = {}
        todo = list(prompts)
        for attempt in range(4):
            if not todo:
                break
            first = self._draw(todo, seed + 2 * attempt)
            second = self._draw(todo, seed + 2 * attempt + 1)
            retry = []
            for prompt, a, b in zip(todo, first, second, strict=True):
                if a[0].strip() and b[0].strip() and a[0].strip() != b[0].strip():
                    rows[prompt] = {"prompt": user_turn(prompt), "y1": a[0], "y2": b[0],
                                    "gold1": self.judge.score(a[0]), "gold2": self.judge.score(b[0]),
                                    "tokens1": a[1], "tokens2": b[1], "ended1": a[2], "ended2": b[2]}
                else:
                    retry.append(prompt)
            todo = retry
        return [rows[p] for p in prompts if p in rows], todo


def sample_pool(sampler: PairSampler, prompts: list[str], folder: str, name: str,
                seed: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Pool rows of ``prompts``, chunk by chunk, each chunk saved in ``folder/name-NNNNN.json`` as it finishes
    (a chunk already there is kept: the build resumes); a prompt whose samples never differed is logged, and
    counted in the pool's statistics."""
    size = sampler.spec.sampling_batch
    chunks = range(0, len(prompts), size)
    rows: list[dict[str, Any]] = []
    dropped: list[str] = []
    started = time.time()
    fresh = 0
    for index, start in enumerate(chunks):
        path = os.path.join(folder, f"{name}-{index:05d}.json")
        if os.path.isfile(path):  # written atomically: present means complete
            saved = read_json(path)
            rows.extend(saved["rows"])
            dropped.extend(saved["dropped"])
            continue
        chunk_rows, chunk_dropped = sampler.chunk(prompts[start:start + size], seed + 1000 * index)
        atomic_write_text(path, json.dumps({"rows": chunk_rows, "dropped": chunk_dropped}))
        rows.extend(chunk_rows)
        dropped.extend(chunk_dropped)
        fresh += 1
        elapsed = time.time() - started
        left = (len(chunks) - index - 1) * elapsed / fresh
        logger.info("sentiment task: %s: sampled %d/%d prompts (%.0f s, about %.0f s left)", name,
                    min(len(prompts), start + size), len(prompts), elapsed, left)
    if dropped:
        logger.warning("sentiment task: %s: %d prompt(s) gave no two distinct non-empty completions in 4 tries and "
                       "are left out: %s", name, len(dropped), dropped[:3])
    return rows, dropped


def _build_pool(spec: SentimentSpec, pool_dir: str, reference_dir: str, model_sha256: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM


    device = "cuda" if torch.cuda.is_available() else "cpu"
    # transformers types PreTrainedModel.to (a @wraps(Module.to) method) without its self
    model = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32)
    model = model.to(device)  # type: ignore[arg-type]  # see above
    tokenizer = load_tokenizer(reference_dir)
    sampler = PairSampler(model, tokenizer, VaderJudge(), spec)
    train_prompts, pair_prompts, win_prompts = split_prompts(spec)
    partial = f"{pool_dir}.partial"  # chunks survive a kill; the pool folder appears only when complete
    os.makedirs(partial, exist_ok=True)
    base = spec.sample_seed * 10_000_000
    pool, pool_dropped = sample_pool(sampler, train_prompts, partial, "pool", base)
    held, held_dropped = sample_pool(sampler, pair_prompts, partial, "held_out", base + 5_000_000)
    tmp = f"{pool_dir}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    write_jsonl_atomic(os.path.join(tmp, "pool.jsonl"), pool)
    write_jsonl_atomic(os.path.join(tmp, "held_out_pairs.jsonl"), held)
    write_jsonl_atomic(os.path.join(tmp, "prompts.jsonl"), [{"prompt": user_turn(p)} for p in win_prompts])
    golds = [g for r in pool for g in (r["gold1"], r["gold2"])]
    mean = sum(golds) / len(golds)
    info = {"model_sha256": model_sha256, "reference_dir": reference_dir, "device": device,
            "torch": torch.__version__, "pool_pairs": len(pool), "held_out_pairs": len(held),
            "prompts_without_distinct_samples": {"pool": pool_dropped, "held_out": held_dropped},
            "reference_gold_mean": mean,
            "reference_gold_std": (sum((g - mean) ** 2 for g in golds) / len(golds)) ** 0.5,
            "completions_cut_at_max_new_tokens": sum(not r[f"ended{k}"] for r in pool for k in (1, 2)) / len(golds)}
    with open(os.path.join(tmp, "pool.json"), "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=2)
    os.replace(tmp, pool_dir)
    shutil.rmtree(partial, ignore_errors=True)


def load_sentiment_task(task_dir: str, reference_dir: str | None = None) -> SentimentTask:
    """A folder written by :func:`build_sentiment_task`; every file checked first (errors name file and line)."""

    stats_path = os.path.join(task_dir, "task.json")
    stats = read_json(stats_path)
    spec = SentimentSpec(**stats["spec"])
    if reference_dir is None:
        reference_dir = stats.get("reference_dir", "")
        if not os.path.isfile(os.path.join(reference_dir, "config.json")):
            reference_dir = resolve_model(spec.model)  # the cache was cleared: the packaged model again
    if not os.path.isfile(os.path.join(reference_dir, "config.json")):
        raise TaskFileError(f"{stats_path}: its reference model {reference_dir} is missing (pass --reference)")
    task = SentimentTask(spec, reference_dir, os.path.join(task_dir, "train.jsonl"),
                         os.path.join(task_dir, "eval.jsonl"), os.path.join(task_dir, "prompts.jsonl"), stats)
    task.check_files()
    return task


def build_sentiment_task(spec: SentimentSpec = SentimentSpec(),
                         cache_root: str = "runs/sentiment-cache") -> SentimentTask:
    """The task for ``spec``, built on first use and cached under ``cache_root`` (safe to interrupt)."""

    reference_dir = os.path.abspath(resolve_model(spec.model))
    if not os.path.isfile(os.path.join(reference_dir, "config.json")):
        raise TaskFileError(f"model {spec.model!r}: {reference_dir} is not a model folder")
    model_sha256 = model_fingerprint(reference_dir)
    os.makedirs(cache_root, exist_ok=True)
    pool_dir = os.path.join(cache_root, "sentiment-pool-" + digest(spec.pool_key(model_sha256)))
    if not os.path.isdir(pool_dir):
        logger.info("sentiment task: sampling on-policy pairs from %s (cached in %s)", spec.model, pool_dir)
        _build_pool(spec, pool_dir, reference_dir, model_sha256)
    settings = {**dataclasses.asdict(spec), "model_sha256": model_sha256}
    task_dir = os.path.join(cache_root, "sentiment-task-" + digest(settings))
    if not os.path.isdir(task_dir):
        pool = read_jsonl(os.path.join(pool_dir, "pool.jsonl"))
        seed = spec.data_seed if spec.data_seed is not None else spec.sample_seed
        rows, stats = controlled_pairs(pool, spec.train_pairs, spec.high_gap_fraction, spec.flip_rate,
                                       spec.bt_temperature, seed)
        held = gold_labelled_pairs(read_jsonl(os.path.join(pool_dir, "held_out_pairs.jsonl")))
        stats.update({"kind": "sentiment", "train_pairs": len(rows), "eval_pairs": len(held),
                      "spec": dataclasses.asdict(spec), "model": spec.model, "model_sha256": model_sha256,
                      "reference_dir": reference_dir, "pool": read_json(os.path.join(pool_dir, "pool.json"))})
        tmp = f"{task_dir}.tmp-{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        write_jsonl_atomic(os.path.join(tmp, "train.jsonl"), [conversational(r) for r in rows])
        write_jsonl_atomic(os.path.join(tmp, "eval.jsonl"), [conversational(r) for r in held])
        shutil.copy(os.path.join(pool_dir, "prompts.jsonl"), os.path.join(tmp, "prompts.jsonl"))
        with open(os.path.join(tmp, "task.json"), "w", encoding="utf-8") as fh:
            json.dump(stats, fh, indent=2)
        os.replace(tmp, task_dir)
    return load_sentiment_task(task_dir, reference_dir)
