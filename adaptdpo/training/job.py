"""The `adaptdpo train` job: config → data → models → trainer → run directory."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
from typing import TYPE_CHECKING, Any, cast

import torch

from adaptdpo.data.pair_scores import read_pair_scores
from adaptdpo.data.readers import LoadReport
from adaptdpo.data.tokenize import tokenize_dataset
from adaptdpo.methods.pair_selection import make_policy, select_pairs
from adaptdpo.models.loading import check_half_precision_updates, load_pretrained, load_tokenizer
from adaptdpo.models.partial import lora_on_top
from adaptdpo.models.tiny import TINY_PRESETS, build_tiny_model, text_fingerprint, tiny_model_config, train_tokenizer
from adaptdpo.training.checkpointing import (
    atomic_torch_save,
    atomic_write_json,
    checkpoint_folders,
    last_complete_checkpoint,
    model_mismatch,
    remove_incomplete_checkpoints,
    usable_checkpoint,
    verify_checkpoint,
)
from adaptdpo.training.config import AdaptiveDPOConfig
from adaptdpo.training.config_io import config_defaults
from adaptdpo.training.inputs import streamed_dataset
from adaptdpo.training.model_card import write_model_card
from adaptdpo.training.plots import plot_run
from adaptdpo.training.prepared_data import (
    PreparedData,
    apply_chat_format,
    chat_conversion,
    prepare_rows,
    stream_label,
    stream_sample_rows,
    streamed_sources,
)
from adaptdpo.training.run_dir import (
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_FILE_PATTERNS,
    PAIR_SELECTION_FILE,
    PAIR_TRACE_FILE,
    RUN_RECORD,
    SCHEDULER_FILE,
    SKIPPED_ROWS_FILE,
    RunDirectoryCallback,
    completed_run,
    config_changes,
    last_values,
    read_config,
    read_metrics,
    record_config_changes,
    truncate_metrics,
    write_config,
)
from adaptdpo.training.run_lock import RunLock
from adaptdpo.training.trainer import AdaptiveDPOTrainer

if TYPE_CHECKING:
    from adaptdpo.methods.policies import SamsPolicy

logger = logging.getLogger("adaptdpo")



def apply_pair_selection(config: AdaptiveDPOConfig, data: PreparedData) -> dict[str, Any] | None:
    """Keep and order the training rows as pair_selection / pair_order say (Selective DPO and friends), from the
    audit's per-pair scores; returns what was kept and dropped (None when nothing is selected or reordered)."""
    order = config.resolved_pair_order
    if config.pair_selection == "all" and order == "shuffled":
        return None

    # __post_init__: a selection needs pair_scores_file, and train_file (not a mixture)
    assert config.pair_scores_file is not None and config.train_file is not None
    scores = read_pair_scores(config.pair_scores_file, config.pair_scores_field, config.train_file)
    by_id = {int(r["pair_id"]): r for r in data.train_rows}
    missing = [i for i in by_id if i not in scores]
    if missing:
        raise ValueError(f"pair_scores_file={config.pair_scores_file}: no {config.pair_scores_field!r} for "
                         f"{len(missing)} training row(s) of {config.train_file} (first rows: {sorted(missing)[:5]}); "
                         "audit this training file")
    selection = select_pairs(list(by_id), scores, make_policy(config.pair_selection, config.pair_keep_ratio), order)
    data.train_rows = [by_id[i] for i in selection.kept]
    logger.info("pair selection %s (%s, pair_keep_ratio %s), order %s: %s", config.pair_selection,
                config.pair_scores_field, config.pair_keep_ratio, order, selection.summary())
    return {"policy": config.pair_selection, "field": config.pair_scores_field, "keep_ratio": config.pair_keep_ratio,
            "order": order, "kept": selection.kept, "dropped": sorted(selection.dropped)}


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
        # built again from the same seed (the same weights), not deep-copied: under ZeRO-3 transformers partitions
        # a model as it is built (deepspeed.zero.Init), and a copy of a partitioned model is not a model
        reference = None if config.use_peft else build_tiny_model(model_config, config.seed,
                                                                  config.attn_implementation)
        if config.ref_model_name_or_path:
            reference = load_pretrained(config.ref_model_name_or_path, config.dtype, config.attn_implementation)
        return policy, reference, tokenizer
    assert config.model_name_or_path is not None  # required (check_model_settings)
    tokenizer = load_tokenizer(config.tokenizer_name_or_path or config.model_name_or_path, config.model_revision,
                               config.trust_remote_code)
    extra = config.from_pretrained_kwargs()
    policy = load_pretrained(config.model_name_or_path, config.dtype, config.attn_implementation, **extra)
    reference = None
    if not config.use_peft or config.ref_model_name_or_path:
        reference = load_pretrained(config.ref_model_name_or_path or config.model_name_or_path, config.dtype,
                                    config.attn_implementation, **extra)
    return policy, reference, tokenizer


def apply_lora(config: AdaptiveDPOConfig, policy: Any) -> Any:
    from peft import get_peft_model

    lora = config.lora_config()
    if config.trainable_layers is not None:  # LoRA on the top K blocks only
        lora = lora_on_top(lora, policy, config.trainable_layers)
    return get_peft_model(policy, lora)


class ConfigChangedError(ValueError):
    """A run directory is resumed with a config that differs from the one it was trained with."""




def clear_run(run_dir: str) -> None:
    """Remove a previous run's checkpoints, record and final model from ``run_dir`` (--overwrite_output_dir)."""
    import glob

    for _, path, _ in checkpoint_folders(run_dir):
        shutil.rmtree(path)
    for pattern in MODEL_FILE_PATTERNS:
        for path in glob.glob(os.path.join(glob.escape(run_dir), pattern)):
            os.remove(path)
    for name in RUN_RECORD:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _requested_checkpoint(config: AdaptiveDPOConfig) -> str | None:
    """An explicit checkpoint: ``resume: PATH``, or TrainingArguments' ``resume_from_checkpoint`` (TRL's flag)."""
    if config.resume not in ("auto", "never"):
        return config.resume
    value = config.resume_from_checkpoint
    if value and str(value).lower() not in ("true", "false"):
        return str(value)
    return None


def resolve_resume(config: AdaptiveDPOConfig) -> str | None:
    """The checkpoint to resume from: an explicit one (verified), or with ``resume: auto`` the newest complete
    checkpoint of output_dir whose files verify (damaged ones are set aside, reported, and skipped)."""
    explicit = _requested_checkpoint(config)
    if explicit:
        if not os.path.isdir(explicit):
            raise FileNotFoundError(f"resume checkpoint {explicit}: no such checkpoint folder")
        problems = verify_checkpoint(explicit)
        if problems:
            raise ValueError(f"resume checkpoint {explicit} is damaged: " + "; ".join(problems))
        return explicit
    if config.resume == "never" or str(config.resume_from_checkpoint).lower() == "false":
        if any(ok for _, _, ok in checkpoint_folders(config.output_dir)):
            raise FileExistsError(f"{config.output_dir} already has checkpoints; use --resume auto, "
                                  "--overwrite_output_dir true, or another --output_dir")
        return None
    if not config.is_main_process:  # the main process has verified and set damaged folders aside already
        return last_complete_checkpoint(config.output_dir)
    return usable_checkpoint(config.output_dir, log=logger.warning)


def check_config_unchanged(config: AdaptiveDPOConfig, resume: str | None) -> None:
    """A resumed run keeps its config: refuse a changed one, naming the changed fields, unless the user
    accepts the change (``accept_config_change``), which is then recorded in config_changes.jsonl."""
    old = read_config(config.output_dir)
    if resume is None or old is None:
        return
    changes = config_changes(old, config.to_serialisable(), config_defaults())
    if not changes:
        return
    listed = ", ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in changes.items())
    step = int(resume.rstrip("/").rsplit("-", 1)[1])
    if not config.accept_config_change:
        raise ConfigChangedError(
            f"{config.output_dir} holds a run trained with another config (resuming from step {step}); changed: "
            f"{listed}. Use the run's own config ({os.path.join(config.output_dir, CONFIG_FILE)}), another "
            "--output_dir, --overwrite_output_dir true to start again, or --accept_config_change true to continue "
            "with the new values from this step on (recorded in config_changes.jsonl)")
    logger.warning("%s: continuing from step %d with a changed config (accepted): %s", config.output_dir, step, listed)
    if config.should_save:
        record_config_changes(config.output_dir, step, changes)


def warn_about_short_epochs(config: AdaptiveDPOConfig, train_pairs: int) -> None:
    micro_batches = math.ceil(train_pairs / max(1, config.per_device_train_batch_size * config.world_size))
    if config.gradient_accumulation_steps > micro_batches:
        logger.warning(
            "gradient_accumulation_steps=%d is larger than the %d micro-batches of one epoch (%d pairs, "
            "per_device_train_batch_size=%d, %d process(es)): each optimizer step will see only %d pairs, not "
            "the %d asked for", config.gradient_accumulation_steps, micro_batches, train_pairs,
            config.per_device_train_batch_size, config.world_size, train_pairs,
            config.gradient_accumulation_steps * config.per_device_train_batch_size * config.world_size)


def run_training(config: AdaptiveDPOConfig, extra_callbacks: list | None = None) -> dict[str, Any]:
    """Train as ``config`` says and return the summary (also written to <output_dir>/summary.json).

    The output directory is locked for the run (:mod:`adaptdpo.training.run_lock`). A finished run is reported and
    left as it is unless ``overwrite_output_dir`` is set; an interrupted one resumes (``resume: auto``)."""
    config.check_trains_something()
    os.makedirs(config.output_dir, exist_ok=True)
    lock = RunLock(config.output_dir) if config.is_main_process else contextlib.nullcontext()
    with lock:
        return _run_training(config, extra_callbacks)


def check_model_settings(config: AdaptiveDPOConfig) -> None:
    """Phase 1: a model named, training data named, quantisation only with LoRA on a loaded model."""
    if not config.model_name_or_path:
        raise ValueError("model_name_or_path is required: a local model folder, a .gguf file, a packaged model "
                         f"(smollm2-135m-instruct) or a hub id; or a tiny preset ({', '.join(TINY_PRESETS)}) for a "
                         "small model with random weights")
    config.check_training_data()
    if config.load_in_4bit or config.load_in_8bit:
        if not config.use_peft:
            raise ValueError("load_in_4bit / load_in_8bit train a LoRA adapter on a quantised base (QLoRA): set "
                             "use_peft true")
        if config.model_name_or_path in TINY_PRESETS:
            raise ValueError(f"load_in_4bit / load_in_8bit quantise a model as it is loaded; the tiny preset "
                             f"{config.model_name_or_path} is built, not loaded: save it and pass its folder")


def _run_training(config: AdaptiveDPOConfig, extra_callbacks: list | None) -> dict[str, Any]:
    """The train job in named phases: check, find what to resume, data, models, tokenised datasets, the run
    directory, train, finish."""
    from transformers import set_seed

    check_model_settings(config)
    done = completed_run(config.output_dir)
    if done is not None and not config.overwrite_output_dir:
        old = read_config(config.output_dir)
        differs = config_changes(old, config.to_serialisable(), config_defaults()) if old is not None else {}
        logger.info("%s holds a complete run (step %s): nothing to do. To train again, use another --output_dir or "
                    "--overwrite_output_dir true%s", config.output_dir, done.get("global_step"),
                    f" (this config differs in: {', '.join(differs)})" if differs else "")
        return {**done, "already_complete": True}
    if config.overwrite_output_dir and config.is_main_process:
        logger.warning("--overwrite_output_dir: removing the previous run's checkpoints and record in %s",
                       config.output_dir)
        clear_run(config.output_dir)
    with config.main_process_first(desc="find the checkpoint to resume from"):
        resume = resolve_resume(config)
    check_config_unchanged(config, resume)
    set_seed(config.seed)
    streams = streamed_sources(config) if config.dataset_streaming else None
    if streams is not None:
        data = PreparedData(stream_sample_rows(config, streams[0]), None, [])
        selection = None
    else:
        data = prepare_rows(config)
        selection = apply_pair_selection(config, data)
    policy, reference, tokenizer = build_models(config, data.train_rows)
    if config.sams_pretrain != "none":
        reference = None  # scheduler pre-training trains on the chosen responses alone: no reference
    if config.use_peft:
        policy = apply_lora(config, policy)
    if resume is not None:  # before tokenising: a checkpoint of another model shape is named, not a 4 KB load error
        mismatch = model_mismatch(resume, policy)
        if mismatch:
            raise ValueError(f"resume checkpoint {resume} holds another model than the one asked for: {mismatch}. "
                             "Resume with the model settings it was trained with, or start a new run "
                             "(--overwrite_output_dir true or another --output_dir)")
    check_half_precision_updates(policy, config.learning_rate, config.allow_half_precision_updates)
    train_dataset, eval_dataset, data_summary = tokenised_datasets(config, data, tokenizer, streams)
    if selection is not None:
        data_summary["pair_selection"] = {"kept": len(selection["kept"]), "dropped": len(selection["dropped"]),
                                          "order": selection["order"]}
    start_run_directory(config, resume, selection, data)
    logger.info("data: %s", data_summary)
    logger.info("processes: world_size=%d (%s), device %s", config.world_size,
                config.distributed_state.distributed_type.value, config.device)
    return train_and_finish(config, policy, reference, tokenizer, train_dataset, eval_dataset, data_summary, resume,
                            extra_callbacks)


def tokenised_datasets(config: AdaptiveDPOConfig, data: PreparedData, tokenizer: Any,
                       streams: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Phase: the training and held-out rows tokenised (or streamed), and the data summary of the run."""
    if streams is not None:
        hh_as_messages = chat_conversion(config, tokenizer) == "hh"
        train_dataset = streamed_dataset(streams[0], tokenizer, config, stream_label(config), hh_as_messages,
                                         pair_columns=True)
        eval_dataset = None if streams[1] is None else streamed_dataset(
            streams[1], tokenizer, config, stream_label(config, evaluation=True), hh_as_messages)
        data_summary: dict[str, Any] = {"streamed": True, "train_pairs": None, "eval_pairs": None,
                                        "max_steps": config.max_steps}
        logger.info("dataset_streaming: rows are validated and tokenised as they arrive; training stops after "
                    "max_steps=%d", config.max_steps)
    else:
        chat_rows = apply_chat_format(config, data, tokenizer)

        def skip_report(i: int) -> LoadReport | None:
            return data.reports[i] if config.skip_invalid_rows else None

        tokenize = functools.partial(tokenize_dataset, tokenizer=tokenizer, max_length=config.max_length,
                                     max_prompt_length=config.max_prompt_length, num_proc=config.dataset_num_proc,
                                     main_process_first=config.main_process_first,
                                     truncation_mode=config.truncation_mode)
        train_source = "datasets mixture" if config.datasets else config.train_file
        assert train_source is not None  # check_training_data: train_file, dataset_name (sets it) or datasets
        skipped_before = sum(len(r.skipped) for r in data.reports)
        train_dataset, train_truncated = tokenize(data.train_rows, source=train_source, report=skip_report(0))
        eval_dataset, eval_truncated = None, 0
        if data.eval_rows:
            eval_dataset, eval_truncated = tokenize(data.eval_rows, source=config.eval_file or train_source,
                                                    report=skip_report(len(data.reports) - 1))
        # pairs truncation_mode keep_start dropped (their prompt fills max_length), as TRL drops them
        dropped = (len(data.train_rows) + len(data.eval_rows or []) - len(train_dataset)
                   - (len(eval_dataset) if eval_dataset is not None else 0)
                   - (sum(len(r.skipped) for r in data.reports) - skipped_before))

        warn_about_short_epochs(config, len(train_dataset))
        data_summary = {
            "train_pairs": len(train_dataset), "eval_pairs": len(eval_dataset) if eval_dataset is not None else 0,
            "train_truncated_pairs": train_truncated, "eval_truncated_pairs": eval_truncated,
            "truncation_mode": config.truncation_mode, "dropped_pairs": dropped,
            "skipped_rows": sum(len(r.skipped) for r in data.reports),
            "implicit_prompt_rows": sum(r.implicit_prompt_rows for r in data.reports),
            "chat_formatted_rows": chat_rows,
        }
    return train_dataset, eval_dataset, data_summary


def start_run_directory(config: AdaptiveDPOConfig, resume: str | None, selection: dict[str, Any] | None,
                        data: PreparedData) -> None:
    """Phase: the run directory readied (config, metrics and trace cut back to a resumed checkpoint, the pair
    selection, skipped rows) and the data reports logged."""
    if config.should_save:
        remove_incomplete_checkpoints(config.output_dir)
        write_config(config.output_dir, config.to_serialisable())
        for name in (METRICS_FILE, PAIR_TRACE_FILE):
            if resume is None:
                open(os.path.join(config.output_dir, name), "w").close()
            else:
                truncate_metrics(config.output_dir, int(resume.rstrip("/").rsplit("-", 1)[1]), name)
        if selection is not None:  # which rows were kept (in training order) and which were dropped, by row id
            atomic_write_json(os.path.join(config.output_dir, PAIR_SELECTION_FILE), selection)
        with open(os.path.join(config.output_dir, SKIPPED_ROWS_FILE), "w", encoding="utf-8") as fh:
            for report in data.reports:
                for err in report.skipped:
                    fh.write(json.dumps({"source": err.source, "row": err.row, "line": err.line,
                                         "field": err.field, "problem": err.problem}) + "\n")
    for report in data.reports:
        logger.log(logging.WARNING if report.skipped else logging.INFO, "%s", report.summary())
        if report.reference_columns_notice():
            logger.warning("%s", report.reference_columns_notice())


def train_and_finish(config: AdaptiveDPOConfig, policy: Any, reference: Any, tokenizer: Any, train_dataset: Any,
                     eval_dataset: Any, data_summary: dict[str, Any], resume: str | None,
                     extra_callbacks: list | None) -> dict[str, Any]:
    """Phase: train (resuming where asked), evaluate the held-out set, save the model and its card, the scheduler
    of SamS pre-training, the summary and the plots."""
    run_callback = RunDirectoryCallback(config.output_dir, {"data": data_summary,
                                                            "parameters": sum(p.numel() for p in policy.parameters())})
    if resume is not None:  # the summary covers the whole run: start from what was logged before the resume
        run_callback.final = last_values(read_metrics(config.output_dir))
    trainer = AdaptiveDPOTrainer(model=policy, args=config, ref_model=reference, train_dataset=train_dataset,
                                 eval_dataset=eval_dataset, processing_class=tokenizer,
                                 callbacks=[run_callback, *(extra_callbacks or [])])
    del reference  # the trainer holds what it needs (nothing, when reference log-probs were precomputed)
    if resume:
        logger.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    extra: dict[str, Any] = {"resumed_from": resume, "wall_time_s": round(trainer.run_wall_time(), 3)}
    if eval_dataset is not None:
        extra["final_eval"] = trainer.evaluate()
    if config.should_save:  # the final model and tokenizer at the root of output_dir, as TRL saves them
        trainer.save_model(config.output_dir)
    if config.sams_pretrain != "none" and trainer.is_world_process_zero():

        scheduler_path = os.path.join(config.output_dir, SCHEDULER_FILE)
        sams = cast("SamsPolicy", trainer.step_policy)  # sams_pretrain trains SamS's scheduler
        assert sams.scheduler is not None  # built at the first batch
        atomic_torch_save(sams.scheduler.network_state(), scheduler_path)
        extra["sams_scheduler"] = scheduler_path
        logger.info("pre-trained SamS scheduler written to %s (use it with --sams_scheduler_init %s)",
                    scheduler_path, scheduler_path)
    summary = run_callback.write_summary(trainer.state, extra)
    if config.should_save:

        write_model_card(config.output_dir, config, summary)
    if trainer.is_world_process_zero() and config.plots:

        plot_run(config.output_dir)
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return summary
