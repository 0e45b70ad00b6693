"""``adaptdpo audit DATA``: cross-fitted noise scores for every pair of a preference file.

1. Read and validate every row (the training reader: same formats, same errors naming file, row, field); a pair
   that appears twice is an error naming the rows; a pair that appears again swapped (a mirrored twin) is kept and
   goes to its twin's fold.
2. Deal the usable pairs into K folds (:mod:`.folds`); fewer pairs than folds is an error before any work.
3. A held-out margin per pair (``--signal``):
   - ``probe`` (default): one forward pass of the reference gives every completion's pooled hidden states at a few
     layers (:mod:`.features`; a layer the model does not have is an error before the pass); a Bradley–Terry
     probe per feature set, cross-fitted over the folds, regularised by inner CV (:mod:`.probe`); the feature sets
     and the reference's own label-free log-ratio combined by held-out likelihood;
   - ``dpo_folds``: for each fold k a DPO model trained from the reference on the other K − 1 folds with the
     ordinary trainer (each fold is a run directory: it resumes, and a finished one is not trained again) scores
     the held-out fold (implicit-reward margin β·h against the reference);
   - ``probe+dpo_folds``: both, averaged after calibration where that raises the held-out likelihood.
4. The flip rate (:func:`.signals.estimate_flip_rate`, with an interval) and per pair: margin, validation loss
   (Selective DPO's difficulty), P(flip) (its ``score``) and ``weight`` = 1 − P(flip); optionally a training run's
   own view of each pair (``--from_run``).
5. Loud warnings instead of silent disasters: held-out agreement with the labels at chance, an estimate above ½;
   then nothing is cleaned without ``--force``, and never more pairs than the estimated flip count.
6. Ground truth when the data carries it (a ``flipped`` column, or ``--truth_file``): AUROC, average
   precision, precision at the flip rate (scikit-learn's metrics).
7. Write ``audit.jsonl`` (one object per input row, ``row`` = its 0-based index in the input, counting every
   row), ``report.md`` with plots, ``cleaned.jsonl`` (top suspects dropped or relabelled, or confident suspects
   swapped, or every pair kept with ``audit_weight`` = 1 − P(flip) for ``--weight_column audit_weight``; every kept
   row carries ``audit_row``) and, last, ``audit_summary.json`` (removed first, so an
   interrupted audit never leaves a summary that describes other files).

Everything lands in one output folder, locked for the run; an interrupted audit resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from adaptdpo.audit.features import (
    POOLINGS,
    TOKEN_BAG,
    FeatureError,
    Features,
    completion_features,
    model_blocks,
    parse_layers,
    parse_poolings,
    resolve_layers,
    token_bag,
)
from adaptdpo.audit.folds import assign_folds, fold_members
from adaptdpo.audit.probe import ProbeError, cross_fitted_margins, select_ensemble
from adaptdpo.audit.ranking import auroc, average_precision, precision_at
from adaptdpo.audit.report import write_report
from adaptdpo.audit.signals import FlipRateEstimate, anchor_flip_rate, estimate_flip_rate, validation_loss
from adaptdpo.data.pair_scores import AUDIT_FILE, SUMMARY_FILE, data_fingerprint
from adaptdpo.data.readers import DataValidationError, read_rows
from adaptdpo.data.rows import load_preference_rows
from adaptdpo.data.tokenize import tokenize_rows
from adaptdpo.evaluation.metrics import pair_completion_logps
from adaptdpo.methods.losses import holder_contamination
from adaptdpo.models.loading import load_pretrained, load_tokenizer
from adaptdpo.models.tiny import TINY_PRESETS
from adaptdpo.training.checkpointing import atomic_torch_save, atomic_write_json, atomic_write_text
from adaptdpo.training.config import AdaptiveDPOConfig
from adaptdpo.training.config_io import parse_config
from adaptdpo.training.job import run_training
from adaptdpo.training.prepared_data import PreparedData, apply_chat_format
from adaptdpo.training.run_dir import LOCK_FILE, PAIR_TRACE_FILE, final_model_path, read_config
from adaptdpo.training.run_lock import RunLock

logger = logging.getLogger("adaptdpo.audit")
CLEANED_FILE = "cleaned.jsonl"
REPORT_FILE = "report.md"
FOLDS_FILE = "folds.json"
REFERENCE_FILE = "reference_logps.pt"
SCORES_FILE = "heldout_scores.json"
FEATURES_FILE = "features.pt"
CLEAN_MODES = ("drop", "relabel", "swap", "weight", "none")
#: the column --clean weight writes: 1 − the pair's suspected-flip probability (train with --weight_column)
WEIGHT_FIELD = "audit_weight"
SIGNALS = ("probe", "dpo_folds", "probe+dpo_folds")
#: the one-sided p-value above which held-out agreement with the labels counts as a coin's
CHANCE_P_VALUE = 0.01
#: the label-free candidate of the probe's ensemble: log π_ref(y_w)/|y_w| − log π_ref(y_l)/|y_l|
REFERENCE_VIEW = "reference.per_token_logratio"
#: config fields that do not change what a fold model learns (free to differ when an audit resumes)
NEUTRAL_FIELDS = {"output_dir", "train_file", "logging_dir", "report_to", "plots", "trace_pairs", "disable_tqdm",
                  "logging_steps", "save_strategy", "save_steps", "save_total_limit", "resume", "push_to_hub",
                  "hub_model_id", "run_name", "overwrite_output_dir", "accept_config_change", "dataloader_num_workers"}


class AuditError(ValueError):
    """An audit that cannot run as asked (the message names the option or file)."""


@dataclass
class AuditOptions:
    data: str
    output_dir: str
    folds: int = 5
    fold_seed: int = 0
    clean: str = "drop"
    drop_fraction: float | None = None  # None: the estimated flip rate
    swap_threshold: float = 0.8
    truth_field: str = "flipped"
    truth_file: str | None = None
    from_run: str | None = None
    score_batch_size: int = 32
    overwrite: bool = False
    signal: str = "probe"
    probe_layers: str = "auto"
    probe_poolings: str = ",".join(POOLINGS)
    probe_token_bag: bool = True
    inner_folds: int = 3
    bootstrap: int = 200
    force: bool = False

    def __post_init__(self) -> None:
        if self.clean not in CLEAN_MODES:
            raise AuditError(f"--clean {self.clean!r}: choose one of {', '.join(CLEAN_MODES)}")
        if self.signal not in SIGNALS:
            raise AuditError(f"--signal {self.signal!r}: choose one of {', '.join(SIGNALS)}")
        try:
            parse_layers(self.probe_layers)
            parse_poolings(self.probe_poolings)
        except FeatureError as e:
            raise AuditError(str(e)) from None
        if self.inner_folds < 2:
            raise AuditError(f"--probe_inner_folds must be at least 2, got {self.inner_folds}")
        if self.bootstrap < 0:
            raise AuditError(f"--bootstrap must be at least 0, got {self.bootstrap}")
        if self.drop_fraction is not None and not 0.0 <= self.drop_fraction < 1.0:
            raise AuditError(f"--drop_fraction must be in [0, 1), got {self.drop_fraction}")
        if not 0.0 < self.swap_threshold <= 1.0:
            raise AuditError(f"--swap_threshold must be in (0, 1], got {self.swap_threshold}")
        if self.folds < 2:
            raise AuditError(f"--folds must be at least 2, got {self.folds}")


def fold_config(options: AuditOptions, train_args: list[str], yaml_path: str | None, train_file: str,
                fold_dir: str) -> AdaptiveDPOConfig:
    """The training config of one fold model: the user's settings, with the fold's data and run directory."""
    return parse_config([*train_args, "--train_file", train_file, "--output_dir", fold_dir, "--eval_fraction", "0",
                         "--plots", "false", "--trace_pairs", "false", "--resume", "auto",
                         "--pair_selection", "all"], yaml_path)


def _set(value: str | None, key: str) -> str:
    """A config path the audit needs (the checks before work ensure it; this names the key if not)."""
    if value is None:
        raise AuditError(f"{key} is not set")
    return value


def _device(config: AdaptiveDPOConfig) -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() and not config.use_cpu else torch.device("cpu")


def _load_reference(config: AdaptiveDPOConfig) -> Any:
    return load_pretrained(_set(config.ref_model_name_or_path or config.model_name_or_path, "model_name_or_path"),
                           config.dtype,
                           config.attn_implementation)


def _load_fold_policy(config: AdaptiveDPOConfig, fold_dir: str) -> Any:
    final = final_model_path(fold_dir)
    if final is None:
        raise AuditError(f"{fold_dir}: the fold's run has no final model")
    if os.path.isfile(os.path.join(final, "adapter_config.json")):
        from peft import PeftModel

        base = load_pretrained(_set(config.model_name_or_path, "model_name_or_path"), config.dtype,
                               config.attn_implementation)
        return PeftModel.from_pretrained(base, final)
    return load_pretrained(final, config.dtype, config.attn_implementation)


def _completion_logps(model: Any, examples: list[dict[str, Any]], pad_id: int, device: torch.device,
                      batch_size: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:

    model.to(device)
    started, last = time.time(), [0.0]

    def progress(done: int) -> None:
        if time.time() - last[0] > 10 or done == len(examples):
            last[0] = time.time()
            logger.info("audit: %s: %d/%d pairs scored (%.0f s)", what, done, len(examples), time.time() - started)

    return pair_completion_logps(model, examples, pad_id, batch_size, progress)


@dataclass
class AuditData:
    """The input, read once: normalised usable rows, tokenised examples, invalid rows, raw rows by index."""

    rows: dict[int, dict[str, Any]]  # row id → normalised row (as the trainer reads it, before chat formatting)
    examples: dict[int, dict[str, Any]]  # row id → tokenised pair
    problems: dict[int, str]  # row id → why it cannot be scored
    total_rows: int
    mirrored_twins: list[list[int]] = dataclasses.field(default_factory=list)  # pairs that appear swapped


def _pair_key(row: dict[str, Any], swapped: bool = False) -> str:
    a, b = ("rejected", "chosen") if swapped else ("chosen", "rejected")
    return json.dumps([row.get("prompt"), row.get(a), row.get(b)], sort_keys=True, ensure_ascii=False, default=str)


def duplicates_and_twins(rows: dict[int, dict[str, Any]], data: str) -> list[list[int]]:
    """Mirrored twins (the same pair with chosen and rejected swapped: kept, in one fold); a pair that appears twice
    as it is is an error naming its rows (a copy in another fold would let a model see the pair it scores)."""
    seen: dict[str, int] = {}
    duplicates: list[tuple[int, int]] = []
    for i in sorted(rows):
        key = _pair_key(rows[i])
        if key in seen:
            duplicates.append((seen[key], i))
        else:
            seen[key] = i
    if duplicates:
        listed = ", ".join(f"{a} and {b}" for a, b in duplicates[:5])
        raise AuditError(f"{data}: {len(duplicates)} pair(s) appear more than once (rows {listed}"
                         f"{', ...' if len(duplicates) > 5 else ''}; 0-based): remove the copies (a copy in another "
                         "fold would let a model see the pair it scores)")
    twins = []
    for i in seen.values():
        j = seen.get(_pair_key(rows[i], swapped=True))
        if j is not None and i < j:
            twins.append([i, j])
    return twins


def read_audit_data(config: AdaptiveDPOConfig, tokenizer: Any) -> AuditData:

    train_file = _set(config.train_file, "train_file")
    rows, report = load_preference_rows(train_file, config.train_split, skip_invalid=config.skip_invalid_rows,
                                        implicit_prompt_marker=config.implicit_prompt_marker)
    problems = {int(e.row): f"{e.field}: {e.problem}" for e in report.skipped if e.row is not None}
    originals = {int(r["pair_id"]): {k: v for k, v in r.items() if k != "pair_id"} for r in rows}
    formatted = PreparedData([dict(r) for r in rows], None, [report])
    apply_chat_format(config, formatted, tokenizer)
    examples, _ = tokenize_rows(formatted.train_rows, tokenizer, config.max_length, config.max_prompt_length,
                                train_file, report if config.skip_invalid_rows else None,
                                truncation_mode=config.truncation_mode)
    for e in report.skipped:
        if e.row is not None:
            problems.setdefault(int(e.row), f"{e.field}: {e.problem}")
    by_id = {int(e["pair_id"]): e for e in examples}
    usable = {i: r for i, r in originals.items() if i in by_id}
    return AuditData(usable, by_id, problems, report.rows_read, duplicates_and_twins(usable, train_file))


def _settings(options: AuditOptions, config: AdaptiveDPOConfig, fingerprint: str) -> dict[str, Any]:
    training = {k: v for k, v in config.to_serialisable().items() if k not in NEUTRAL_FIELDS}
    return {"data": os.path.abspath(options.data), "data_sha256": fingerprint, "folds": options.folds,
            "fold_seed": options.fold_seed, "training": training}


def _fold_models_exist(output_dir: str) -> bool:
    return any(name.startswith("fold-") and os.path.isdir(os.path.join(output_dir, name))
               for name in os.listdir(output_dir))


def _check_resumable(path: str, settings: dict[str, Any], trains_folds: bool = True) -> None:
    """Refuse to mix an audit with one made on other data or folds; the training fields matter only where fold
    models are (or will be) trained and some exist already."""
    with open(path, encoding="utf-8") as fh:
        old = json.load(fh)["settings"]
    changed = [k for k in ("data_sha256", "folds", "fold_seed") if old.get(k) != settings[k]]
    if trains_folds and _fold_models_exist(os.path.dirname(path)):
        changed += [f"training.{k}" for k in sorted(set(old["training"]) | set(settings["training"]))
                    if old["training"].get(k) != settings["training"].get(k)]
    if changed:
        raise AuditError(f"{os.path.dirname(path)} holds an audit made with other settings (changed: "
                         f"{', '.join(changed)}); use another --output_dir or --overwrite true")


def _write_fold_file(path: str, rows: list[dict[str, Any]]) -> None:
    if not os.path.exists(path):
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def reference_logratio_inputs(config: AdaptiveDPOConfig, options: AuditOptions, data: AuditData, pad_id: int,
                              device: torch.device) -> dict[int, tuple[float, float]]:
    """Reference log-probs (chosen, rejected) of every usable pair, computed once and cached."""
    path = os.path.join(options.output_dir, REFERENCE_FILE)
    ids = sorted(data.examples)
    if os.path.exists(path):
        cached = torch.load(path, weights_only=True)
        if cached["ids"] == ids:
            return {i: (float(c), float(r)) for i, c, r in zip(ids, cached["chosen"], cached["rejected"], strict=True)}
    reference = _load_reference(config)
    chosen, rejected = _completion_logps(reference, [data.examples[i] for i in ids], pad_id, device,
                                         options.score_batch_size, "reference")
    del reference
    atomic_torch_save({"ids": ids, "chosen": chosen, "rejected": rejected}, path)
    return {i: (float(c), float(r)) for i, c, r in zip(ids, chosen, rejected, strict=True)}


def run_folds(options: AuditOptions, train_args: list[str], yaml_path: str | None, data: AuditData,
              assignment: dict[int, int], pad_id: int, reference: dict[int, tuple[float, float]],
              device: torch.device) -> dict[int, dict[str, float]]:
    """Train and score every fold (resuming what exists); row id → held-out log-ratios and fold."""

    out: dict[int, dict[str, float]] = {}
    for fold in range(options.folds):
        fold_dir = os.path.join(options.output_dir, f"fold-{fold}")
        scores_path = os.path.join(fold_dir, SCORES_FILE)
        train_ids, held_ids = fold_members(assignment, fold)
        if not os.path.exists(scores_path):
            data_file = os.path.join(options.output_dir, "folds", f"fold-{fold}-train.jsonl")
            os.makedirs(os.path.dirname(data_file), exist_ok=True)
            _write_fold_file(data_file, [data.rows[i] for i in train_ids])
            config = fold_config(options, train_args, yaml_path, data_file, fold_dir)
            logger.info("audit: fold %d/%d: training on %d pairs, scoring %d held-out pairs (%s)", fold + 1,
                        options.folds, len(train_ids), len(held_ids), fold_dir)
            run_training(config)
            policy = _load_fold_policy(config, fold_dir)
            chosen, rejected = _completion_logps(policy, [data.examples[i] for i in held_ids], pad_id, device,
                                                 options.score_batch_size, f"fold {fold + 1}/{options.folds}")
            del policy
            atomic_write_json(scores_path, {"fold": fold, "trained_on": len(train_ids), "rows": held_ids,
                                            "chosen_logps": chosen.tolist(), "rejected_logps": rejected.tolist()})
        with open(scores_path, encoding="utf-8") as fh:
            scored = json.load(fh)
        if scored["rows"] != held_ids:
            raise AuditError(f"{scores_path}: scores for other rows than fold {fold} holds (remove the file)")
        for i, c, r in zip(scored["rows"], scored["chosen_logps"], scored["rejected_logps"], strict=True):
            ref_c, ref_r = reference[i]
            out[i] = {"fold": fold, "chosen_logratio": c - ref_c, "rejected_logratio": r - ref_r}
    return out


def read_truth(options: AuditOptions, total_rows: int) -> dict[int, bool] | None:
    """Known-bad pairs: ``--truth_file`` (a JSON list of row ids, or one id per line), or a boolean
    ``truth_field`` column present in every row. None when neither is there."""
    if options.truth_file:
        if not os.path.isfile(options.truth_file):
            raise AuditError(f"--truth_file {options.truth_file}: no such file")
        with open(options.truth_file, encoding="utf-8") as fh:
            text = fh.read()
        try:
            ids = json.loads(text) if text.lstrip().startswith("[") else [int(t) for t in text.split()]
        except ValueError as e:
            raise AuditError(f"--truth_file {options.truth_file}: expected a JSON list of row ids or one id per "
                             f"line ({e})") from None
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < total_rows]
        if bad:
            raise AuditError(f"--truth_file {options.truth_file}: row ids outside 0..{total_rows - 1}: {bad[:5]}")
        flagged = set(ids)
        return {i: i in flagged for i in range(total_rows)}
    truth: dict[int, bool] = {}
    for index, (raw, _) in enumerate(read_rows(options.data)):
        if isinstance(raw, DataValidationError):
            continue
        value = raw.get(options.truth_field)
        if not isinstance(value, bool):
            return None
        truth[index] = value
    return truth or None


def run_signals(run_dir: str, fingerprint: str) -> dict[int, dict[str, float]]:
    """A training run's view of each pair (its pairs.jsonl): mean margin over the run, mean z-score of the margin
    within its micro-batch (β-DPO's Gaussian view: (m − mean)/std of the batch), share of appearances trained on
    (β-DPO's filter, SamS's selection). The run must have trained on the audited file."""

    config = read_config(run_dir)
    trace = os.path.join(run_dir, PAIR_TRACE_FILE)
    if config is None or not os.path.isfile(trace):
        raise AuditError(f"--from_run {run_dir}: not a run directory with a pair trace (config.yaml, pairs.jsonl)")
    trained_on = config.get("train_file")
    if not trained_on or not os.path.exists(trained_on) or data_fingerprint(trained_on) != fingerprint:
        raise AuditError(f"--from_run {run_dir}: it trained on {trained_on}, not on the audited data (row ids "
                         "would not line up)")
    sums: dict[int, list[float]] = {}
    with open(trace, encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            if "pair_id" not in record:
                raise AuditError(f"--from_run {run_dir}: its pairs.jsonl has no pair ids")
            margins = record["margin"]
            mean = sum(margins) / len(margins)
            std = math.sqrt(sum((m - mean) ** 2 for m in margins) / max(1, len(margins) - 1)) or 1.0
            for pid, m, trained in zip(record["pair_id"], margins, record["trained"], strict=True):
                acc = sums.setdefault(int(pid), [0.0, 0.0, 0.0, 0.0])
                acc[0] += m
                acc[1] += (m - mean) / std
                acc[2] += trained
                acc[3] += 1
    return {pid: {"run_margin_mean": a[0] / a[3], "run_margin_z": a[1] / a[3], "run_trained_fraction": a[2] / a[3]}
            for pid, a in sums.items()}


def _swap_paired_fields(row: dict[str, Any]) -> dict[str, Any]:
    """chosen ↔ rejected, and every field pair that describes them (score_chosen/score_rejected,
    chosen_rating/rejected_rating, ...)."""
    out = dict(row)
    for key in row:
        if key == "chosen":
            twin = "rejected"
        elif key.startswith("chosen_"):
            twin = "rejected_" + key[len("chosen_"):]
        elif key.endswith("_chosen"):
            twin = key[: -len("chosen")] + "rejected"
        else:
            continue
        if twin in row:
            out[key], out[twin] = row[twin], row[key]
    return out


def decide_actions(options: AuditOptions, scored: dict[int, dict[str, Any]], estimate: FlipRateEstimate,
                   warned: bool) -> tuple[dict[int, str], dict[str, Any]]:
    """Row id → keep / drop / swap, as ``--clean`` says, within the safeguards; and what was asked and done.

    - ``drop`` / ``relabel``: the top suspects (by rank), as many as ``--drop_fraction`` of the pairs, default the
      estimated flip count; ``relabel`` swaps chosen and rejected instead of dropping, and only where P(flip) ≥ ½
      (swapping a pair the audit's own model thinks more likely right than wrong makes it more likely wrong);
    - ``swap``: pairs with flip probability ≥ ``--swap_threshold``, most suspect first;
    - never more than the estimated flip count, and nothing at all when a warning was raised (held-out agreement at
      chance, an estimate above ½), unless ``--force``."""
    actions = {i: "keep" for i in scored}
    by_rank = sorted(scored, key=lambda i: scored[i]["suspect_rank"])
    limit = estimate.flip_count
    if options.clean in ("drop", "relabel"):
        count = limit if options.drop_fraction is None else round(options.drop_fraction * len(scored))
        candidates = by_rank[:count]
    elif options.clean == "swap":
        candidates = [i for i in by_rank if scored[i]["flip_probability"] >= options.swap_threshold]
    elif options.clean == "weight":  # every pair kept, weighted 1 − P(flip): no count to cap
        candidates = by_rank
    else:
        candidates = []
    asked = len(candidates)
    held_back = None
    if not options.force and candidates:
        if warned:
            candidates, held_back = [], "a warning (see warnings): nothing cleaned without --force"
        else:
            if len(candidates) > limit and options.clean != "weight":
                candidates, held_back = candidates[:limit], f"the estimated flip count ({limit})"
            if options.clean == "relabel":
                likely = [i for i in candidates if scored[i]["flip_probability"] >= 0.5]
                if len(likely) < len(candidates):
                    candidates, held_back = likely, "P(flip) < 1/2 (a swap would more likely make the pair wrong)"
            if held_back:
                held_back += ": no more without --force"
    action = {"drop": "drop", "weight": "weight"}.get(options.clean, "swap")
    for i in candidates:
        actions[i] = action
    return actions, {"mode": options.clean, "asked": asked, "changed": len(candidates), "held_back": held_back,
                     "limit": limit, "forced": options.force}


def write_cleaned(options: AuditOptions, actions: dict[int, str], path: str,
                  scored: dict[int, dict[str, Any]] | None = None) -> dict[str, int]:
    """The input rows minus dropped ones, swapped ones swapped, weighted ones with ``audit_weight`` = 1 − P(flip),
    each with ``audit_row`` (and ``audit_action`` when changed); rows that could not be scored are left out (listed
    in audit.jsonl)."""
    counts = {"kept": 0, "swapped": 0, "dropped": 0, "weighted": 0, "unscored": 0}
    lines = []
    for index, (raw, _) in enumerate(read_rows(options.data)):
        action = actions.get(index)
        if action is None or isinstance(raw, DataValidationError):
            counts["unscored"] += 1
            continue
        if action == "drop":
            counts["dropped"] += 1
            continue
        row = dict(raw)
        if action == "swap":
            row = _swap_paired_fields(row)
            row["audit_action"] = "swapped"
            counts["swapped"] += 1
        elif action == "weight":
            assert scored is not None, "--clean weight needs the scores"
            row[WEIGHT_FIELD] = round(1.0 - scored[index]["flip_probability"], 6)
            counts["weighted"] += 1
        row["audit_row"] = index
        counts["kept"] += 1
        lines.append(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    atomic_write_text(path, "".join(lines))
    return counts


def truth_metrics(scored: dict[int, dict[str, Any]], truth: dict[int, bool], estimated_rate: float) -> dict[str, Any]:
    ids = sorted(scored)
    scores = [scored[i]["score"] for i in ids]
    labels = [truth.get(i, False) for i in ids]
    n_bad = sum(labels)
    out: dict[str, Any] = {"known_bad_pairs": n_bad, "true_flip_rate": n_bad / len(ids)}
    if 0 < n_bad < len(ids):
        out["auroc"] = auroc(scores, labels)
        out["average_precision"] = average_precision(scores, labels)
        out["precision_at_flip_rate"] = precision_at(scores, labels, n_bad)
        k = round(estimated_rate * len(ids))
        if k > 0:  # an estimate of 0 flags no pair: no precision to give
            out["precision_at_estimated_rate"] = precision_at(scores, labels, min(k, len(ids)))
    return out


@dataclass
class HeldOut:
    """One signal's held-out view: per pair (ids ascending) a margin, its fold, its own columns; and a summary."""

    ids: list[int]
    margins: torch.Tensor  # float64 [n]: log-odds that the label as given is right, from models that never saw it
    folds: dict[int, int]
    columns: dict[int, dict[str, Any]]
    info: dict[str, Any]


FEATURE_KEY_FIELDS = ("model_name_or_path", "ref_model_name_or_path", "tokenizer_name_or_path", "max_length",
                      "max_prompt_length", "truncation_mode", "dtype", "attn_implementation", "bf16")


def reference_features(options: AuditOptions, config: AdaptiveDPOConfig, data: AuditData, pad_id: int,
                       device: torch.device, layers: list[int] | str) -> tuple[Features, float]:
    """The one forward pass (cached in ``features.pt`` for the same pairs, model and settings); (features, s)."""
    path = os.path.join(options.output_dir, FEATURES_FILE)
    ids = sorted(data.examples)
    poolings = parse_poolings(options.probe_poolings)
    serial = config.to_serialisable()
    key = json.dumps({"ids": ids, "layers": layers, "poolings": poolings,
                      **{k: serial.get(k) for k in FEATURE_KEY_FIELDS}}, sort_keys=True, default=str)
    if os.path.exists(path):
        cached = torch.load(path, weights_only=True)
        if cached.get("key") == key:
            return Features(cached["chosen"], cached["rejected"], cached["ref_chosen_logps"],
                            cached["ref_rejected_logps"], cached["chosen_lengths"], cached["rejected_lengths"],
                            cached["layers"], cached["poolings"], {"blocks": cached["blocks"]}), 0.0
    started = time.time()
    reference = _load_reference(config)
    reference.to(device)
    last = [0.0]

    def progress(done: int) -> None:
        if time.time() - last[0] > 10 or done == len(ids):
            last[0] = time.time()
            logger.info("audit: reference features: %d/%d pairs (%.0f s)", done, len(ids), time.time() - started)

    # bf16 (resolved by the config: on where the device computes it natively) runs the pass under autocast, as
    # training does: about 1.9x faster on a CPU with avx512_bf16; the features are float32 either way
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.bf16 else contextlib.nullcontext()
    try:
        with autocast:
            features = completion_features(reference, [data.examples[i] for i in ids], pad_id, layers, poolings,
                                           options.score_batch_size, progress)
    except FeatureError as e:
        raise AuditError(f"--probe_layers {options.probe_layers}: {e}") from None
    del reference
    atomic_torch_save({"key": key, "chosen": features.chosen, "rejected": features.rejected,
                       "ref_chosen_logps": features.ref_chosen_logps, "ref_rejected_logps": features.ref_rejected_logps,
                       "chosen_lengths": features.chosen_lengths, "rejected_lengths": features.rejected_lengths,
                       "layers": features.layers, "poolings": features.poolings,
                       "blocks": features.info["blocks"]}, path)
    return features, time.time() - started


def _groups(ids: list[int], twins: list[list[int]]) -> list[int]:
    """A group number per pair: mirrored twins share one (inner CV keeps them together)."""
    group = {i: j for j, i in enumerate(ids)}
    for twin in twins:
        for i in twin[1:]:
            group[i] = group[twin[0]]
    return [group[i] for i in ids]


def probe_signal(options: AuditOptions, config: AdaptiveDPOConfig, data: AuditData, assignment: dict[int, int],
                 pad_id: int, device: torch.device, layers: list[int] | str) -> HeldOut:
    """Cross-fitted Bradley–Terry probes on the reference's frozen features, one per feature set, combined."""
    import numpy as np

    features, feature_seconds = reference_features(options, config, data, pad_id, device, layers)
    ids = sorted(data.examples)
    folds = np.array([assignment[i] for i in ids])
    groups = np.array(_groups(ids, data.mirrored_twins))
    started = time.time()
    margins: dict[str, np.ndarray] = {}
    chosen_c: dict[str, list[float]] = {}
    for name in features.chosen:
        diffs = (features.chosen[name].double() - features.rejected[name].double()).numpy()
        try:
            fit = cross_fitted_margins(diffs, folds, groups=groups, inner_folds=options.inner_folds,
                                       seed=options.fold_seed)
        except ProbeError as e:
            raise AuditError(f"{options.data}: {e}") from None
        margins[name] = fit.margins
        chosen_c[name] = [round(m.C, 8) for _, m in sorted(fit.models.items())]
    vocabulary: list[int] = []
    if options.probe_token_bag:  # the lexical view: no forward pass, recomputed each time (seconds)
        bag_chosen, bag_rejected, vocabulary = token_bag([data.examples[i] for i in ids])
        if vocabulary:
            try:
                fit = cross_fitted_margins((bag_chosen.double() - bag_rejected.double()).numpy(), folds,
                                           groups=groups, inner_folds=options.inner_folds, seed=options.fold_seed)
            except ProbeError as e:
                raise AuditError(f"{options.data}: {e}") from None
            margins[TOKEN_BAG] = fit.margins
            chosen_c[TOKEN_BAG] = [round(m.C, 8) for _, m in sorted(fit.models.items())]
        else:
            logger.info("audit: no token occurs in two completions: no token-bag view")
    # a second, label-free view from the same pass: the reference's own per-token log-ratio (nothing fitted)
    per_token = (features.ref_chosen_logps / features.chosen_lengths.clamp(min=1)
                 - features.ref_rejected_logps / features.rejected_lengths.clamp(min=1))
    margins[REFERENCE_VIEW] = per_token.numpy()
    ensemble = select_ensemble(margins)
    ref_h = features.ref_chosen_logps - features.ref_rejected_logps
    columns = {i: {"reference_logratio": float(ref_h[j]),
                   **{f"probe_margin_{name}": float(margins[name][j]) for name in ensemble.members
                      if name != REFERENCE_VIEW}}
               for j, i in enumerate(ids)}
    info = {"features": {"layers": features.layers, "poolings": features.poolings, "blocks": features.info["blocks"],
                         "dimension": int(next(iter(features.chosen.values())).shape[1]),
                         "token_bag_vocabulary": len(vocabulary) if options.probe_token_bag else None},
            "candidates": ensemble.candidates, "members": ensemble.members, "temperature": ensemble.temperature,
            "heldout_log_likelihood": ensemble.log_likelihood, "regularisation_C": chosen_c,
            "inner_folds": options.inner_folds,
            "seconds": {"features": round(feature_seconds, 1), "probes": round(time.time() - started, 1)}}
    return HeldOut(ids, torch.tensor(ensemble.margins, dtype=torch.float64), {i: assignment[i] for i in ids},
                   columns, info)


def dpo_fold_signal(options: AuditOptions, train_args: list[str], yaml_path: str | None, config: AdaptiveDPOConfig,
                    data: AuditData, assignment: dict[int, int], pad_id: int, device: torch.device) -> HeldOut:
    """K DPO models from the reference, each scoring the fold it never saw: margin β·h."""
    started = time.time()
    reference = reference_logratio_inputs(config, options, data, pad_id, device)
    heldout = run_folds(options, train_args, yaml_path, data, assignment, pad_id, reference, device)
    ids = sorted(heldout)
    h = torch.tensor([heldout[i]["chosen_logratio"] - heldout[i]["rejected_logratio"] for i in ids],
                     dtype=torch.float64)
    columns = {i: {"reference_logratio": reference[i][0] - reference[i][1],
                   "chosen_logratio": heldout[i]["chosen_logratio"],
                   "rejected_logratio": heldout[i]["rejected_logratio"]} for i in ids}
    return HeldOut(ids, config.beta * h, {i: int(heldout[i]["fold"]) for i in ids}, columns,
                   {"beta": config.beta, "seconds": round(time.time() - started, 1)})


def combined_signal(probe: HeldOut, folds: HeldOut) -> HeldOut:
    """The probe's and the DPO folds' held-out margins averaged after calibration, when that raises the held-out
    likelihood of the labels (:func:`~adaptdpo.audit.probe.select_ensemble`); each pair's two margins come from
    models that never saw it (the folds are the same)."""
    if probe.ids != folds.ids:
        raise AuditError("the probe and the DPO folds scored different pairs")
    ensemble = select_ensemble({"probe": probe.margins.numpy(), "dpo_folds": folds.margins.numpy()})
    columns = {i: {**folds.columns[i], **probe.columns[i], "probe_margin": float(probe.margins[j]),
                   "dpo_fold_margin": float(folds.margins[j])} for j, i in enumerate(probe.ids)}
    info = {"probe": probe.info, "dpo_folds": folds.info, "members": ensemble.members,
            "temperature": ensemble.temperature, "heldout_log_likelihood": ensemble.log_likelihood,
            "candidates": ensemble.candidates}
    return HeldOut(probe.ids, torch.tensor(ensemble.margins, dtype=torch.float64), probe.folds, columns, info)


def agreement(margins: torch.Tensor) -> tuple[float, float]:
    """(share of pairs whose held-out margin agrees with the label, ties ½; one-sided binomial p-value of the
    agreeing pairs among the untied against a coin)."""
    from scipy.stats import binomtest

    m = margins.double()
    accuracy = float(((m > 0).double() + 0.5 * (m == 0).double()).mean()) if m.numel() else 0.5
    untied = int((m != 0).sum())
    p_value = float(binomtest(int((m > 0).sum()), untied, 0.5, alternative="greater").pvalue) if untied else 1.0
    return accuracy, p_value


#: an estimate whose 95% interval is wider than this is reported as poorly identified
WIDE_INTERVAL = 0.2


def identification_note(estimate: FlipRateEstimate, anchor: float) -> str | None:
    """A note (not a warning: cleaning goes on, by the estimate) where the data do not pin the flip rate down."""
    low, high = estimate.interval
    if high - low <= WIDE_INTERVAL:
        return None
    return (f"the flip rate is poorly identified by this signal: the estimate {estimate.flip_rate:.1%} has the 95% "
            f"interval {low:.1%}-{high:.1%}, and the share of disagreeing labels among the most confident tenth of "
            f"the pairs reads {anchor:.1%}; cleaning by the estimate drops {estimate.flip_count} pairs (to drop "
            f"more, pass --drop_fraction with --force, knowing the ranking's precision falls with depth)")


def safety_warnings(signal: str, accuracy: float, p_value: float, estimate: FlipRateEstimate) -> list[str]:
    """The loud warnings (no silent disasters): a signal at chance, an estimate above ½."""
    out = []
    what = {"probe": "the probe on the reference's features", "dpo_folds": "the DPO fold models"}.get(
        signal, "the probe and the DPO fold models")
    if p_value > CHANCE_P_VALUE:
        out.append(f"held-out agreement with the labels is at chance: {accuracy:.1%} of the pairs (p = {p_value:.2g} "
                   f"against a coin): {what} cannot tell the completions apart on this data (too few pairs, features "
                   "that do not carry the preference, or labels that are mostly noise); the scores and the "
                   "estimated flip rate mean nothing")
    low, high = estimate.interval
    if not low - 1e-9 <= estimate.flip_rate <= high + 1e-9:
        out.append(f"the estimated flip rate {estimate.flip_rate:.1%} lies outside its own bootstrap interval "
                   f"({low:.1%}–{high:.1%}): the estimate is unstable on this data (a weak held-out signal); do not "
                   "clean by it")
    if estimate.flip_rate > 0.5:
        out.append(f"estimated flip rate {estimate.flip_rate:.1%} is above one half: the labels look inverted for "
                   "most pairs (chosen and rejected swapped throughout?), or the signal is unreliable; check a few "
                   "pairs by hand")
    return out


def flip_rate_readings(options: AuditOptions, margins: torch.Tensor) -> tuple[
        FlipRateEstimate, tuple[float, tuple[float, float]], tuple[float, float], list[str], str | None]:
    """The estimate, the anchor reading, the held-out agreement, the warnings and the identification note of the
    held-out margins; the warnings and the note are printed as they are found."""
    estimate = estimate_flip_rate(margins, options.bootstrap, options.fold_seed)
    anchor = anchor_flip_rate(margins, bootstrap=options.bootstrap, seed=options.fold_seed)
    accuracy, p_value = agreement(margins)
    warnings = safety_warnings(options.signal, accuracy, p_value, estimate)
    for w in warnings:
        logger.warning("audit: WARNING: %s", w)
        print(f"adaptdpo audit: WARNING: {w}", file=sys.stderr)
    note = None if warnings else identification_note(estimate, anchor[0])
    if note is not None:
        logger.warning("audit: %s", note)
        print(f"adaptdpo audit: note: {note}", file=sys.stderr)
    return estimate, anchor, (accuracy, p_value), warnings, note


def run_audit(options: AuditOptions, train_args: list[str], yaml_path: str | None = None) -> dict[str, Any]:
    """Run (or resume) the audit; returns the summary (also in <output_dir>/audit_summary.json)."""
    os.makedirs(options.output_dir, exist_ok=True)
    with RunLock(options.output_dir):
        return _run_audit(options, train_args, yaml_path)


def _checked_reference(options: AuditOptions, train_args: list[str], yaml_path: str | None
                       ) -> tuple[AdaptiveDPOConfig, list[int] | str]:
    """Phase 1, before any work: the data file exists, the reference is a pretrained model, the probe's layers
    exist in it; the base config and the resolved layers."""
    if not os.path.exists(options.data) and options.data.lower().endswith((".json", ".jsonl", ".gz", ".csv",
                                                                            ".parquet")):
        raise AuditError(f"{options.data}: no such file")
    base = fold_config(options, train_args, yaml_path, options.data, os.path.join(options.output_dir, "fold-0"))
    if not base.model_name_or_path:
        raise AuditError("--model_name_or_path is required: the reference model the fold models start from")
    if base.model_name_or_path in TINY_PRESETS:
        raise AuditError(f"model_name_or_path={base.model_name_or_path}: an audit needs a pretrained reference model "
                         "(a folder, .gguf file or packaged model); a tiny preset has random weights")
    layers: list[int] | str = parse_layers(options.probe_layers)
    if options.signal != "dpo_folds":  # a layer the model does not have: an error before any work
        blocks = _model_blocks(base)
        if blocks is not None:
            try:
                layers = resolve_layers(layers, blocks)
            except FeatureError as e:
                raise AuditError(f"--probe_layers {options.probe_layers}: {e}") from None
    return base, layers


def _held_out_signal(options: AuditOptions, train_args: list[str], yaml_path: str | None, base: AdaptiveDPOConfig,
                     data: Any, assignment: dict[int, int], pad_id: int, layers: list[int] | str) -> Any:
    """Phase: every pair's held-out margin from the signal asked for (probe, DPO folds, or both combined)."""
    device = _device(base)
    if options.signal == "probe":
        return probe_signal(options, base, data, assignment, pad_id, device, layers)
    if options.signal == "dpo_folds":
        return dpo_fold_signal(options, train_args, yaml_path, base, data, assignment, pad_id, device)
    return combined_signal(probe_signal(options, base, data, assignment, pad_id, device, layers),
                           dpo_fold_signal(options, train_args, yaml_path, base, data, assignment, pad_id, device))


def _run_audit(options: AuditOptions, train_args: list[str], yaml_path: str | None) -> dict[str, Any]:
    import shutil

    from transformers import set_seed

    base, layers = _checked_reference(options, train_args, yaml_path)
    if options.overwrite:
        for name in os.listdir(options.output_dir):
            path = os.path.join(options.output_dir, name)
            if name != LOCK_FILE:
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    started = time.time()
    set_seed(base.seed)
    fingerprint = data_fingerprint(options.data)
    settings = _settings(options, base, fingerprint)
    folds_path = os.path.join(options.output_dir, FOLDS_FILE)
    trains = options.signal != "probe"
    if os.path.exists(folds_path):
        _check_resumable(folds_path, settings, trains_folds=trains)
    tokenizer = load_tokenizer(_set(base.tokenizer_name_or_path or base.model_name_or_path, "model_name_or_path"))
    data = read_audit_data(base, tokenizer)
    if len(data.examples) < options.folds:
        raise AuditError(f"{options.data}: {len(data.examples)} usable pairs cannot be split into {options.folds} "
                         "folds")
    assignment = assign_folds(sorted(data.examples), options.folds, options.fold_seed, data.mirrored_twins)
    if not os.path.exists(folds_path) or (trains and not _fold_models_exist(options.output_dir)):
        atomic_write_json(folds_path, {"settings": settings, "assignment": {str(k): v for k, v in
                                                                            sorted(assignment.items())}})
    logger.info("audit: %d of %d rows usable, %d folds, signal %s, output %s", len(data.examples), data.total_rows,
                options.folds, options.signal, options.output_dir)
    run_view = run_signals(options.from_run, fingerprint) if options.from_run else None  # its errors: before work
    summary_path = os.path.join(options.output_dir, SUMMARY_FILE)
    if os.path.exists(summary_path):  # removed before any other output is replaced: never a mixed report
        os.remove(summary_path)
    held = _held_out_signal(options, train_args, yaml_path, base, data, assignment, tokenizer.pad_token_id, layers)

    ids, margins = held.ids, held.margins
    estimate, (anchor, anchor_interval), (accuracy, p_value), warnings, note = flip_rate_readings(options, margins)
    p_flip = estimate.flip_probability(margins)
    losses = validation_loss(margins)
    scored: dict[int, dict[str, Any]] = {}
    for j, i in enumerate(ids):
        scored[i] = {"fold": held.folds[i], "score": float(p_flip[j]), "flip_probability": float(p_flip[j]),
                     "weight": 1.0 - float(p_flip[j]), "margin": float(margins[j]), "validation_loss": float(losses[j]),
                     **held.columns[i]}
    # rank 1 = most suspect; ties (equal scores) broken by the lower margin, then the row id
    for rank, i in enumerate(sorted(ids, key=lambda i: (-scored[i]["score"], scored[i]["margin"], i)), start=1):
        scored[i]["suspect_rank"] = rank
    if run_view is not None:
        for i in ids:
            scored[i].update(run_view.get(i, {}))
    truth = read_truth(options, data.total_rows)
    actions, cleaning = decide_actions(options, scored, estimate, bool(warnings))
    counts = write_cleaned(options, actions, os.path.join(options.output_dir, CLEANED_FILE), scored)

    audit_text = audit_lines(data, scored, actions, truth)
    atomic_write_text(os.path.join(options.output_dir, AUDIT_FILE), audit_text)

    summary: dict[str, Any] = {
        "data": options.data, "data_sha256": fingerprint, "rows": data.total_rows, "scored_pairs": len(ids),
        "unscored_rows": data.total_rows - len(ids), "folds": options.folds, "fold_seed": options.fold_seed,
        "signal": options.signal, "beta": base.beta, "model": base.model_name_or_path, "method": base.method,
        "estimated_flip_rate": estimate.flip_rate, "flip_rate_interval": list(estimate.interval),
        "estimated_flip_count": estimate.flip_count,
        # the confident-tenth reading (signals.anchor_flip_rate) and, where the two disagree, why
        "anchor_flip_rate": anchor, "anchor_flip_rate_interval": list(anchor_interval), "identification_note": note,
        # Hölder-DPO's contamination estimate 1 − ξ̂ of the same held-out margins (a second, model-free estimate)
        "holder_flip_rate": float(holder_contamination(margins, base.holder_gamma)), "holder_gamma": base.holder_gamma,
        "flip_model": {"flip_rate": estimate.flip_rate, "temperature": estimate.temperature,
                       "log_likelihood_per_pair": estimate.log_likelihood, "bootstrap": options.bootstrap},
        "heldout_accuracy_of_labels": accuracy, "chance_p_value": p_value, "warnings": warnings,
        "clean": options.clean, "cleaning": cleaning, "cleaned_counts": counts,
        "mean_validation_loss": float(losses.mean()), "mirrored_twins": len(data.mirrored_twins),
        options.signal: held.info,
        "audit_jsonl_sha256": hashlib.sha256(audit_text.encode("utf-8")).hexdigest(),
        "wall_time_s": round(time.time() - started, 1),
    }
    if truth is not None:
        summary["ground_truth"] = truth_metrics(scored, truth, estimate.flip_rate)
        dropped_or_swapped = [i for i, a in actions.items() if a not in ("keep", "weight")]
        if dropped_or_swapped:
            summary["ground_truth"]["cleaned_share_known_bad"] = (
                sum(truth.get(i, False) for i in dropped_or_swapped) / len(dropped_or_swapped))
    write_report(options.output_dir, summary, scored, truth, data.rows, estimate)
    atomic_write_json(summary_path, summary)  # last: its presence means every other file is this audit's
    logger.info("audit: done in %.0f s: %s", time.time() - started, os.path.join(options.output_dir, REPORT_FILE))
    return summary


def audit_lines(data: Any, scored: dict[int, dict[str, Any]], actions: dict[int, str],
                truth: dict[int, bool] | None) -> str:
    """audit.jsonl's text: one object per input row, scored or with the reason it was not."""
    records = []
    for index in range(data.total_rows):
        record: dict[str, Any] = {"row": index}
        if index in scored:
            record.update(scored[index])
            record["action"] = actions[index]
        else:
            record.update({"score": None, "problem": data.problems.get(index, "not read"), "action": "unscored"})
        if truth is not None and index in truth:
            record["known_bad"] = truth[index]
        records.append(record)
    return "".join(json.dumps(r) + "\n" for r in records)


def _model_blocks(config: AdaptiveDPOConfig) -> int | None:
    """The reference's block count from its config alone (a model folder), None when it cannot be read so."""
    path = config.ref_model_name_or_path or config.model_name_or_path
    if path is None or not os.path.isfile(os.path.join(path, "config.json")):
        return None
    from transformers import AutoConfig

    try:
        return model_blocks(AutoConfig.from_pretrained(path))
    except (OSError, ValueError):
        return None
