"""Train one method on the gold-reward task and score it with the exact judge (used by the demo and the
quality benchmark)."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from typing import Any

from transformers import AutoModelForCausalLM

from adaptdpo.evaluation.metrics import gold_generation_metrics, preference_accuracy, selection_of_flipped_pairs
from adaptdpo.files import read_jsonl
from adaptdpo.models.loading import load_tokenizer
from adaptdpo.models.shared_prefix import shared_frozen_blocks
from adaptdpo.tasks.base import TaskFolder
from adaptdpo.training.config_io import parse_config
from adaptdpo.training.job import run_training
from adaptdpo.training.run_dir import final_model_path

logger = logging.getLogger(__name__)

#: the four methods of the demo: each paper's defaults (β-DPO: α 0.6, ρ 0.8; SamS: ratio 0.5, top-k)
METHODS: dict[str, dict[str, Any]] = {
    "dpo": {"method": "dpo"},
    "beta_dpo": {"method": "beta_dpo"},
    "sams": {"method": "sams", "sams_ratio": 0.5, "sams_warmup_rounds": 10},
    "beta_dpo+sams": {"method": "beta_dpo+sams", "sams_ratio": 0.5, "sams_warmup_rounds": 10},
}


def evaluate_on_task(policy: Any, reference: Any, tokenizer: Any, task: TaskFolder, beta: float,
                     seed: int = 0, reference_key: str | None = None, trainable_layers: int | None = None
                     ) -> dict[str, float]:
    """The exact judge's metrics of ``policy`` on ``task``'s held-out pairs and prompts (any task kind);
    ``reference_key``: see :func:`adaptdpo.evaluation.metrics.gold_generation_metrics` (the reference's samples)
    and :func:`~adaptdpo.evaluation.metrics.pair_logratios` (its pass over the held-out pairs).
    ``trainable_layers``: the policy was trained on its top K blocks; where its bottom is the reference's (checked
    by fingerprint), the bottom runs once for both (:mod:`adaptdpo.models.shared_prefix`: the same numbers, about
    half the work)."""
    started = time.time()
    frozen = shared_frozen_blocks(policy, reference, trainable_layers)
    pref = preference_accuracy(policy, reference, tokenizer, task.eval_rows(), beta, frozen_blocks=frozen,
                               reference_key=reference_key)
    pairs_s = time.time() - started
    gen = gold_generation_metrics(policy, reference, tokenizer, task.eval_prompts(), task.gold_reward, seed=seed,
                                  max_new_tokens=task.max_new_tokens, reference_key=reference_key,
                                  frozen_blocks=frozen)
    return {"gold/accuracy": pref["accuracy"], "gold/margin": pref["margin"], "gold/win_rate": gen["win_rate"],
            "gold/reward": gen["reward"], "gold/reference_reward": gen["reference_reward"], "kl": gen["kl"],
            "mean_length": gen["mean_length"], "eval/pairs_s": pairs_s, "eval/sampling_s": gen["sampling_s"],
            "eval/sampling_tokens_per_s": gen["sampling_tokens_per_s"], "eval/kl_s": gen["kl_s"],
            "eval/reference_sampling_s": gen["reference_sampling_s"],
            "eval/shared_frozen_blocks": frozen or 0}


def _rows(path: str) -> list[dict[str, Any]]:
    return read_jsonl(path)


def gold_train_arguments(task: TaskFolder, overrides: dict[str, Any]) -> list[str]:
    """``--key value`` flags for training on ``task`` (the task's training defaults, its reference and data, then
    ``overrides``)."""
    # eval_fraction 0: every training pair is trained on; the task judges on its own held-out prompts and pairs
    settings = {**task.train_defaults(), "model_name_or_path": task.reference_dir, "train_file": task.train_file,
                "eval_fraction": 0, **overrides}
    argv: list[str] = []
    for key, value in settings.items():
        argv += [f"--{key}", str(value)]
    return argv


def train_and_evaluate(task: TaskFolder, overrides: dict[str, Any], output_dir: str, seed: int = 0,
                       plots: bool = True) -> dict[str, Any]:
    """Train on ``task`` with ``overrides`` (a method preset plus anything else), evaluate, write
    ``<output_dir>/gold_eval.json``, return the evaluation (with wall time and the flipped-pair statistics)."""
    settings = {**task.train_defaults(), "model_name_or_path": task.reference_dir, "train_file": task.train_file,
                "output_dir": output_dir, "seed": seed, "plots": plots, "resume": "never", **overrides}
    config = parse_config(gold_train_arguments(task, settings))
    if os.path.isdir(output_dir):
        shutil.rmtree(output_dir)
    summary = run_training(config)
    tokenizer = load_tokenizer(task.reference_dir)

    evaluation_started = time.time()
    device = config.device  # where it trained: the judge samples there too
    final = final_model_path(output_dir)
    if final is None:
        raise RuntimeError(f"{output_dir}: the run wrote no final model")
    # transformers types PreTrainedModel.to with @wraps(Module.to), whose signature mypy then reads wrongly
    policy = AutoModelForCausalLM.from_pretrained(final).to(device)  # type: ignore[arg-type]  # see above
    reference = AutoModelForCausalLM.from_pretrained(task.reference_dir).to(device)  # type: ignore[arg-type]  # see above
    # the task's reference, loaded from its folder for every run: its samples are drawn once per process and seed
    result = evaluate_on_task(policy, reference, tokenizer, task, config.beta, seed=seed,
                              reference_key=os.path.abspath(task.reference_dir),
                              trainable_layers=config.trainable_layers)
    if config.train_file == task.train_file or config.train_file is None:  # pair ids are rows of the task's file
        result.update(selection_of_flipped_pairs(output_dir, task.flipped_pair_ids()))
    else:  # another file (e.g. an audit's cleaned copy): its own `flipped` column, undone where the pair was swapped
        flipped = {i for i, row in enumerate(_rows(config.train_file))
                   if bool(row.get("flipped")) != (row.get("audit_action") == "swapped")}
        result.update(selection_of_flipped_pairs(output_dir, flipped))
    result["eval_time_s"] = time.time() - evaluation_started
    result["wall_time_s"] = summary["wall_time_s"]
    result["steps"] = summary["global_step"]
    with open(os.path.join(output_dir, "gold_eval.json"), "w", encoding="utf-8") as fh:
        json.dump({"settings": copy.deepcopy(settings), "result": result}, fh, indent=2)
    return result
