"""The run directory: resolved config, metrics.jsonl, summary.json (written by rank 0 only).

Rules that keep a run's record whole (docs/when-things-go-wrong.md):

* ``summary.json`` covers the whole run, across resumes (``status: complete`` once training finished);
* a resumed run must have the config it started with: :func:`config_changes` names what differs, and an
  accepted change is recorded in ``config_changes.jsonl`` with the step from which it applies;
* metrics logged after the checkpoint a run resumes from are dropped (:func:`truncate_metrics`).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from typing import Any

import torch
import yaml
from transformers import TrainerCallback

from adaptdpo import __version__, files
from adaptdpo.files import atomic_write_json, atomic_write_text

# ---- the run directory's own files: the one table of their names (docs/config.md's table lists them)
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
CONFIG_CHANGES_FILE = "config_changes.jsonl"
PAIR_TRACE_FILE = "pairs.jsonl"
SKIPPED_ROWS_FILE = "skipped_rows.jsonl"
PAIR_SELECTION_FILE = "pair_selection.json"
SCHEDULER_FILE = "sams_scheduler.pt"
LOCK_FILE = ".adaptdpo.lock"
PLOTS_DIR = "plots"
REF_LOGPS_DIR = "ref_logps"
FINAL_MODEL_DIR = "final_model"  # where runs before the TRL layout kept the final model
#: what --overwrite_output_dir removes: the run's own record (caches keyed by content stay)
RUN_RECORD = (CONFIG_FILE, CONFIG_CHANGES_FILE, METRICS_FILE, PAIR_TRACE_FILE, SUMMARY_FILE, SKIPPED_ROWS_FILE,
              FINAL_MODEL_DIR, PLOTS_DIR, PAIR_SELECTION_FILE)
#: never uploaded by push_to_hub (the hub repository gets the model, tokenizer and card): the record, the caches, the
#: lock, the tiny presets' tokenizer folders, nested runs
RUN_FILE_PATTERNS = [*(f"{name}/*" if "." not in name else name for name in RUN_RECORD), SCHEDULER_FILE, LOCK_FILE,
                     f"{REF_LOGPS_DIR}/*", "tokenizer-*/*", "runs/*"]

#: fields that may differ between the invocations of one run: where and how it reports, not what it trains
RESUME_NEUTRAL_FIELDS = frozenset({
    "output_dir", "resume", "resume_from_checkpoint", "overwrite_output_dir", "accept_config_change", "logging_dir",
    "disable_tqdm", "plots", "report_to", "run_name", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "log_level", "log_level_replica",
    "push_to_hub", "hub_model_id", "hub_token", "hub_private_repo", "hub_strategy", "hub_always_push",
    "hub_revision", "save_total_limit", "ref_cache_dir", "trace_pairs",
    # memory and speed only: the same numbers either way (tested), so a run stopped for memory can resume with them
    "gradient_checkpointing", "gradient_checkpointing_kwargs", "activation_checkpointing",
    "activation_checkpointing_kwargs", "activation_offloading", "dataset_num_proc", "lm_head_chunk_size",
})
#: the value a field had, in effect, in runs recorded before it existed (when that is not its default now)
VALUES_BEFORE_THE_FIELD = {"truncation_mode": "keep_prompt_end"}


def versions() -> dict[str, str]:
    import accelerate
    import datasets
    import transformers


    return {"adaptdpo": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "datasets": datasets.__version__, "platform": platform.platform()}


def peak_memory_bytes() -> dict[str, int]:
    """Peak resident memory of this process (CPU) and peak allocated CUDA memory when on a GPU."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_bytes": int(rss * (1 if sys.platform == "darwin" else 1024))}
    if torch.cuda.is_available():
        out["peak_cuda_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def write_config(run_dir: str, config: dict[str, Any]) -> None:
    atomic_write_text(os.path.join(run_dir, CONFIG_FILE), yaml.safe_dump(config, sort_keys=True, allow_unicode=True))


def read_config(run_dir: str) -> dict[str, Any] | None:
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


def config_changes(old: dict[str, Any], new: dict[str, Any],
                   defaults: dict[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
    """Fields whose value differs between a run's recorded config and a new one: {field: (old, new)}.

    Both sides go through a YAML round trip first, so 10 and 10.0 or a tuple and a list compare equal. A field
    the recorded config does not have (added to adaptdpo since) counts as unchanged when the new value is its
    default (``defaults``); a single loss name and a one-element ``loss_type`` list are the same.
    """
    old = yaml.safe_load(yaml.safe_dump(old))
    new = yaml.safe_load(yaml.safe_dump(new))
    for side in (old, new):
        if isinstance(side.get("loss_type"), str):
            side["loss_type"] = [side["loss_type"]]
    defaults = yaml.safe_load(yaml.safe_dump(defaults or {}))
    old = {**{k: v for k, v in VALUES_BEFORE_THE_FIELD.items() if k in new and k not in old}, **old}
    if ("sigmoid_label_smoothing" in new and "sigmoid_label_smoothing" not in old and old.get("label_smoothing")
            and "sigmoid" in (old.get("loss_type") or [])):  # recorded before cDPO: its sigmoid ignored label_smoothing
        old["sigmoid_label_smoothing"] = "ignore"
    out = {}
    for key in sorted(set(old) | set(new)):
        if key in RESUME_NEUTRAL_FIELDS:
            continue
        if key not in old and key in defaults and new.get(key) == defaults[key]:
            continue
        if old.get(key) != new.get(key):
            out[key] = (old.get(key), new.get(key))
    return out


#: what a run optimises (the loss, β, method, pair selection, truncation): checked by the trainer itself on resume
OBJECTIVE_FIELDS = frozenset({"beta", "loss_type", "loss_weights", "label_smoothing", "discopop_tau",
                              "f_divergence_type", "f_alpha_divergence_coef", "use_weighting", "ld_alpha", "method",
                              "max_length", "max_prompt_length", "truncation_mode", "sync_ref_model",
                              "ref_model_mixup_alpha", "ref_model_sync_steps", "precompute_ref_log_probs",
                              "sigmoid_label_smoothing", "holder_gamma", "weight_column", "beta_column"})
OBJECTIVE_PREFIXES = ("beta_dpo_", "sams_", "pair_", "epsilon_dpo_")


def objective_changes(old: dict[str, Any], new: dict[str, Any],
                      defaults: dict[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
    """:func:`config_changes` restricted to what the run optimises (:data:`OBJECTIVE_FIELDS`, β-DPO's, SamS's and the
    pair selection's fields)."""
    return {k: v for k, v in config_changes(old, new, defaults).items()
            if k in OBJECTIVE_FIELDS or k.startswith(OBJECTIVE_PREFIXES)}


def record_config_changes(run_dir: str, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append an accepted change to config_changes.jsonl: from ``step`` on, the new values apply."""
    record = {"from_step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "changes": {k: {"old": o, "new": n} for k, (o, n) in changes.items()}}
    with open(os.path.join(run_dir, CONFIG_CHANGES_FILE), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=str) + "\n")


def read_summary(run_dir: str) -> dict[str, Any] | None:
    path = os.path.join(run_dir, SUMMARY_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


#: what save_model writes at the root of output_dir (TRL's layout), removed by --overwrite_output_dir
MODEL_FILE_PATTERNS = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                       "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
                       "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "tokenizer.json",
                       "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "vocab.json",
                       "merges.txt", "tokenizer.model", "added_tokens.json", "training_args.bin", "README.md")


def final_model_path(run_dir: str) -> str | None:
    """Where a run's final model is: the run directory itself (TRL's layout), or ``final_model/`` for runs made
    before; None when there is none."""
    if any(os.path.isfile(os.path.join(run_dir, name)) for name in ("config.json", "adapter_config.json")):
        return run_dir
    legacy = os.path.join(run_dir, FINAL_MODEL_DIR)
    return legacy if os.path.isdir(legacy) else None


def completed_run(run_dir: str) -> dict[str, Any] | None:
    """The summary of a run that finished (status complete and its final model on disk), else None."""
    summary = read_summary(run_dir)
    if summary and summary.get("status") == "complete" and final_model_path(run_dir) is not None:
        return summary
    return None


def last_values(records: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged value of every numeric metric (a resumed run's summary starts from these)."""
    out: dict[str, float] = {}
    for record in records:
        for key, value in record.items():
            if key not in ("step", "epoch", "time") and isinstance(value, (int, float)):
                out[key] = value
    return out


def truncate_metrics(run_dir: str, last_step: int, name: str = METRICS_FILE) -> None:
    """Drop lines logged after ``last_step`` (a killed run resumed from an earlier checkpoint)."""
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                if json.loads(line).get("step", 0) <= last_step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
    atomic_write_text(path, "".join(kept))


def read_jsonl(run_dir: str, name: str) -> list[dict[str, Any]]:
    """The records of the run directory's ``name`` ([] before the run has written any)."""
    return files.read_jsonl(os.path.join(run_dir, name), missing_ok=True)


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    return read_jsonl(run_dir, METRICS_FILE)


class RunDirectoryCallback(TrainerCallback):
    """Appends every log to metrics.jsonl and writes summary.json when training ends."""

    def __init__(self, run_dir: str, extra_summary: dict[str, Any] | None = None):
        self.run_dir = run_dir
        self.extra_summary = extra_summary or {}
        self.start = time.time()
        self.final: dict[str, float] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start = time.time()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": round(time.time() - self.start, 3), **logs}
        with open(os.path.join(self.run_dir, METRICS_FILE), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        for key, value in logs.items():
            if isinstance(value, (int, float)):
                self.final[key] = value

    def write_summary(self, state: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        summary = {
            "status": "complete",
            "final_metrics": self.final,
            "global_step": state.global_step,
            "wall_time_s": round(time.time() - self.start, 3),
            **peak_memory_bytes(),
            "versions": versions(),
            **self.extra_summary,
            **(extra or {}),
        }
        if state.is_world_process_zero:
            atomic_write_json(os.path.join(self.run_dir, SUMMARY_FILE), summary)
        return summary
