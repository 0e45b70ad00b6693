"""The `adaptdpo train` job: config → data → models → trainer → run directory."""

from __future__ import annotations

import copy
import json
import logging
import os
import random
from dataclasses import dataclass
from typing import Any

import torch

from .checkpointing import checkpoint_folders, last_complete_checkpoint, remove_incomplete_checkpoints
from .config import AdaptiveDPOConfig
from .data import LoadReport, load_preference_rows, tokenize_rows
from .modeling import (
    TINY_PRESETS,
    build_tiny_model,
    load_pretrained,
    load_tokenizer,
    text_fingerprint,
    tiny_model_config,
    train_tokenizer,
)
from .run_dir import METRICS_FILE, PAIR_TRACE_FILE, RunDirectoryCallback, truncate_metrics, write_config
from .trainer import AdaptiveDPOTrainer

logger = logging.getLogger("adaptdpo")

SCHEDULER_FILE = "sams_scheduler.pt"


@dataclass
class PreparedData:
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]] | None
    reports: list[LoadReport]


def prepare_rows(config: AdaptiveDPOConfig) -> PreparedData:
    train_rows, train_report = load_preference_rows(
        config.train_file, config.train_split, skip_invalid=config.skip_invalid_rows,
        implicit_prompt_marker=config.implicit_prompt_marker,
        limit=None if config.eval_file is None and config.eval_fraction > 0 else config.max_train_samples)
    reports = [train_report]
    eval_rows = None
    if config.eval_file:
        eval_rows, eval_report = load_preference_rows(
            config.eval_file, config.eval_split, skip_invalid=config.skip_invalid_rows,
            implicit_prompt_marker=config.implicit_prompt_marker, limit=config.max_eval_samples)
        reports.append(eval_report)
    elif config.eval_fraction > 0:
        order = list(range(len(train_rows)))
        random.Random(config.data_seed if config.data_seed is not None else config.seed).shuffle(order)
        n_eval = max(1, round(config.eval_fraction * len(train_rows)))
        held = set(order[:n_eval])
        eval_rows = [r for i, r in enumerate(train_rows) if i in held]
        train_rows = [r for i, r in enumerate(train_rows) if i not in held]
        if config.max_eval_samples is not None:
            eval_rows = eval_rows[: config.max_eval_samples]
        if config.max_train_samples is not None:
            train_rows = train_rows[: config.max_train_samples]
    return PreparedData(train_rows, eval_rows, reports)


def _texts(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for row in rows:
        for key in ("prompt", "chosen", "rejected"):
            value = row[key]
            out.append(value if isinstance(value, str) else "\n".join(m["content"] for m in value))
    return out


def build_models(config: AdaptiveDPOConfig, train_rows: list[dict[str, Any]]) -> tuple[Any, Any, Any]:
    """(policy, reference or None, tokenizer)."""
    if config.model_name_or_path in TINY_PRESETS:
        if config.tokenizer_name_or_path:
            tokenizer = load_tokenizer(config.tokenizer_name_or_path)
        else:
            texts = _texts(train_rows)
            cache = os.path.join(config.output_dir, "tokenizer-" +
                                 text_fingerprint(texts, config.tokenizer_vocab_size))
            with config.main_process_first(desc="train tokenizer"):
                tokenizer = train_tokenizer(texts, config.tokenizer_vocab_size, cache)
        max_positions = max(config.max_length or 1024, 64)
        model_config = tiny_model_config(config.model_name_or_path, len(tokenizer), config.tiny_hidden_size,
                                         config.tiny_num_layers, config.tiny_num_heads, max_positions,
                                         tokenizer.pad_token_id, tokenizer.eos_token_id)
        policy = build_tiny_model(model_config, config.seed, config.attn_implementation)
        reference = None if config.use_peft else copy.deepcopy(policy)
        if config.ref_model_name_or_path:
            reference = load_pretrained(config.ref_model_name_or_path, config.dtype, config.attn_implementation)
        return policy, reference, tokenizer
    tokenizer = load_tokenizer(config.tokenizer_name_or_path or config.model_name_or_path)
    policy = load_pretrained(config.model_name_or_path, config.dtype, config.attn_implementation)
    reference = None
    if not config.use_peft or config.ref_model_name_or_path:
        reference = load_pretrained(config.ref_model_name_or_path or config.model_name_or_path, config.dtype,
                                    config.attn_implementation)
    return policy, reference, tokenizer


def apply_lora(config: AdaptiveDPOConfig, policy: Any) -> Any:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("use_peft needs peft: pip install 'adaptdpo[peft]'") from e
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.lora_target_modules, task_type="CAUSAL_LM")
    return get_peft_model(policy, lora)


def resolve_resume(config: AdaptiveDPOConfig) -> str | None:
    if config.resume == "never":
        if any(ok for _, _, ok in checkpoint_folders(config.output_dir)):
            raise FileExistsError(f"{config.output_dir} already has checkpoints; use --resume auto, or another "
                                  "--output_dir")
        return None
    if config.resume == "auto":
        return last_complete_checkpoint(config.output_dir)
    if not os.path.isdir(config.resume):
        raise FileNotFoundError(f"--resume {config.resume}: no such checkpoint folder")
    return config.resume


def run_training(config: AdaptiveDPOConfig, extra_callbacks: list | None = None) -> dict[str, Any]:
    """Train as ``config`` says and return the summary (also written to <output_dir>/summary.json)."""
    from datasets import Dataset
    from transformers import set_seed

    set_seed(config.seed)
    os.makedirs(config.output_dir, exist_ok=True)
    data = prepare_rows(config)
    policy, reference, tokenizer = build_models(config, data.train_rows)
    if config.sams_pretrain != "none":
        reference = None  # scheduler pre-training trains on the chosen responses alone: no reference
    if config.use_peft:
        policy = apply_lora(config, policy)
    train_examples, train_truncated = tokenize_rows(data.train_rows, tokenizer, config.max_length,
                                                    config.max_prompt_length, config.train_file)
    train_dataset = Dataset.from_list(train_examples)
    eval_dataset, eval_truncated = None, 0
    if data.eval_rows:
        eval_examples, eval_truncated = tokenize_rows(data.eval_rows, tokenizer, config.max_length,
                                                      config.max_prompt_length, config.eval_file or config.train_file)
        eval_dataset = Dataset.from_list(eval_examples)

    resume = resolve_resume(config)
    data_summary = {
        "train_pairs": len(train_examples), "eval_pairs": len(eval_dataset) if eval_dataset is not None else 0,
        "train_truncated_pairs": train_truncated, "eval_truncated_pairs": eval_truncated,
        "skipped_rows": sum(len(r.skipped) for r in data.reports),
        "implicit_prompt_rows": sum(r.implicit_prompt_rows for r in data.reports),
    }
    if config.should_save:
        remove_incomplete_checkpoints(config.output_dir)
        write_config(config.output_dir, config.to_serialisable())
        for name in (METRICS_FILE, PAIR_TRACE_FILE):
            if resume is None:
                open(os.path.join(config.output_dir, name), "w").close()
            else:
                truncate_metrics(config.output_dir, int(resume.rstrip("/").rsplit("-", 1)[1]), name)
        with open(os.path.join(config.output_dir, "skipped_rows.jsonl"), "w", encoding="utf-8") as fh:
            for report in data.reports:
                for err in report.skipped:
                    fh.write(json.dumps({"source": err.source, "row": err.row, "line": err.line,
                                         "field": err.field, "problem": err.problem}) + "\n")
    for report in data.reports:
        logger.log(logging.WARNING if report.skipped else logging.INFO, "%s", report.summary())
    logger.info("data: %s", data_summary)
    logger.info("processes: world_size=%d (%s), device %s", config.world_size,
                config.distributed_state.distributed_type.value, config.device)

    run_callback = RunDirectoryCallback(config.output_dir, {"data": data_summary,
                                                            "parameters": sum(p.numel() for p in policy.parameters())})
    trainer = AdaptiveDPOTrainer(model=policy, args=config, ref_model=reference, train_dataset=train_dataset,
                                 eval_dataset=eval_dataset, processing_class=tokenizer,
                                 callbacks=[run_callback, *(extra_callbacks or [])])
    del reference  # the trainer holds what it needs (nothing, when reference log-probs were precomputed)
    if resume:
        logger.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    extra: dict[str, Any] = {"resumed_from": resume}
    if eval_dataset is not None:
        extra["final_eval"] = trainer.evaluate()
    if config.should_save:
        trainer.save_model(os.path.join(config.output_dir, "final_model"))
    if config.sams_pretrain != "none" and trainer.is_world_process_zero():
        from .checkpointing import atomic_torch_save

        scheduler_path = os.path.join(config.output_dir, SCHEDULER_FILE)
        atomic_torch_save(trainer.step_policy.scheduler.network_state(), scheduler_path)
        extra["sams_scheduler"] = scheduler_path
        logger.info("pre-trained SamS scheduler written to %s (use it with --sams_scheduler_init %s)",
                    scheduler_path, scheduler_path)
    summary = run_callback.write_summary(trainer.state, extra)
    if trainer.is_world_process_zero() and config.plots:
        from .report import plot_run

        plot_run(config.output_dir)
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return summary
