"""The papers' experiments on a real model (issue 14): SmolLM2-135M-Instruct on the controlled-sentiment task (exact
judge: VADER) and on the shipped Anthropic HH split. Tables → docs/real_model_tables.md, figures → docs/.

    .venv/bin/python benchmarks/real_model.py --profile full --seeds 3 --budget_s 540     # on one GPU; run again
    .venv/bin/python benchmarks/real_model.py --profile cpu --seeds 1 --experiments noise  # what 2 CPU cores afford
    .venv/bin/python benchmarks/real_model.py --quick                                      # every stage, ~2 min CPU

Each run trains SmolLM2 from its packaged weights on a training set drawn with the run's seed (data_seed) from one
cached pool of on-policy pairs, then is judged on held-out prompts and pairs
(`adaptdpo.tasks.experiment.evaluate_on_task`):
held-out implicit-reward accuracy against gold labels, mean gold reward of its samples, win rate against the
reference's samples drawn with the same random numbers, KL(π‖π_ref) on its samples. Experiments:

  noise     DPO, β-DPO, SamS (policy hidden states), SamS (MiniLM encoder), random 50%, β-DPO+SamS, and the
            robust rivals rDPO and cDPO (ε = 0.2), Hölder-DPO, ε-DPO; mixed gaps, 0% and 20% flips (SamS Fig. 3,
            β-DPO+SamS); the recovery table is drawn from it
  gap       static β ∈ {0.05, 0.1, 0.3, 1.0} on low-gap and on high-gap data          (β-DPO Fig. 1b/2)
  mix       β-DPO (batch, instance) against static β on mixtures 0.2/0.5/0.8           (β-DPO Table 2)
  frontier  DPO over β, β-DPO over β0 (mixed gaps, clean): the reward–KL frontier      (DPO Fig. 2)
  filters   β-DPO's filtering strategies at 20% flips                                (β-DPO §5.2)
  hh        DPO, β-DPO, SamS on HH, chat-templated, clean and 20% flipped training labels: held-out
            implicit-reward accuracy (SamS's HH metric)

Resumable pieces: every finished run is one line of <workdir>/<profile>/results.jsonl; with --budget_s the script
stops before a run that would end past the budget and says how many are left (run the same command again). A run
killed midway is redone; the task's sampling resumes by chunk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import random
import shutil
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import HH, ResultCache, mean_std

from adaptdpo.tasks.experiment import train_and_evaluate
from adaptdpo.tasks.sentiment.task import SentimentSpec, build_sentiment_task

SAMS = {"method": "sams", "sams_ratio": 0.5}
#: the evidence profile's finished runs, one line each, committed: the tables are rebuilt from them alone
COMMITTED_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "real_model-cpu-topk.jsonl")
METHODS: dict[str, dict[str, Any]] = {
    "DPO": {"method": "dpo"},
    "β-DPO": {"method": "beta_dpo"},
    "SamS (policy states)": SAMS,
    "SamS (MiniLM encoder)": {**SAMS, "sams_encoder_path": "all-minilm-l6-v2"},
    "random 50%": {**SAMS, "sams_selection": "random"},
    "β-DPO+SamS": {**SAMS, "method": "beta_dpo+sams"},
    # the known-flip-rate rival: rDPO's unbiased loss at the true rate (Chowdhury et al. 2024)
    "rDPO (ε = 0.2)": {"method": "dpo", "loss_type": "robust", "label_smoothing": 0.2},
    # the other robust-DPO rivals (issue 27), after the rows above so that their result keys stay: cDPO at the
    # planted rate, and the two that assume no rate
    "cDPO (ε = 0.2)": {"method": "dpo", "loss_type": "sigmoid", "label_smoothing": 0.2},
    "Hölder-DPO (γ = 2, the paper's)": {"method": "dpo", "loss_type": "holder", "holder_gamma": 2.0},
    "ε-DPO (ε = 0.01)": {"method": "epsilon_dpo", "epsilon_dpo_epsilon": 0.01},
    # β-DPO at the official code's recipe (a = α·β0 = 0.6 at β0 = 0.1: docs/starting-points.md), beside the default
    "β-DPO (α = 6)": {"method": "beta_dpo", "beta_dpo_alpha": 6.0},
    # the audit, then DPO on its cleaned file (the estimated flip count dropped): the probe on SmolLM2's frozen
    # features (issue 26's default), and the DPO-fold audit it replaced (5 fold trainings a seed: last)
    "audit (probe) → drop, DPO": {"method": "dpo", "audit": "probe"},
    "audit (DPO folds) → drop, DPO": {"method": "dpo", "audit": "dpo_folds"},
    # Selective DPO (Gao et al. 2025): the easiest half by the probe audit's held-out loss, easy to hard (the paper
    # scores with DPO folds; the probe's held-out loss is the same quantity for its model); the audit is the one
    # the drop row wrote (same file, signal and seed)
    "Selective DPO (easiest 50%, probe audit)": {"method": "dpo", "select_from_audit": "probe"},
}
BETAS = (0.05, 0.1, 0.3, 1.0)


def with_warmup(preset: dict[str, Any], rounds: int) -> dict[str, Any]:
    """``preset`` with SamS's random warm-up at ``rounds`` (a SamS preset only; part of the cached run's key)."""
    return {**preset, "sams_warmup_rounds": rounds} if "sams" in preset["method"] else dict(preset)


def with_beta(preset: dict[str, Any], beta: float) -> dict[str, Any]:
    """``preset`` at β (left unset at the default 0.1, so equal configurations share one cached run)."""
    return {**preset, "beta": beta} if beta != 0.1 else dict(preset)

#: per profile: the sentiment task's size, training overrides, the HH split and its training settings, and SamS's
#: random warm-up rounds: about a sixth of the run's steps (10 of 64 in the full profile, 3 of 16 on the CPU), so
#: that the learned selection acts for the same share of every run. With 10 warm-up rounds of 16 steps, four
#: selection runs trained on the same random pairs for 10 steps and ended at the same held-out accuracy.
PROFILES: dict[str, dict[str, Any]] = {
    "full": {"task": {}, "train": {}, "sams_warmup_rounds": 10,
             "hh": {"train_rows": 1800, "eval_rows": 400},
             "hh_train": {"max_length": 512, "max_prompt_length": 384, "per_device_train_batch_size": 16,
                          "per_device_eval_batch_size": 32, "num_train_epochs": 1, "learning_rate": 2e-6}},
    "cpu": {"task": {"train_prompts": 640, "eval_pair_prompts": 96, "eval_prompts": 64, "train_pairs": 256},
            # 16 steps instead of 64: a larger step so that the policy moves (about 10 minutes a run on 2 cores)
            "train": {"num_train_epochs": 1, "learning_rate": 2e-5}, "sams_warmup_rounds": 3,
            "hh": {"train_rows": 256, "eval_rows": 96},
            # 32 steps instead of 112: a larger step, as for the sentiment runs
            "hh_train": {"max_length": 256, "max_prompt_length": 192, "per_device_train_batch_size": 8,
                         "per_device_eval_batch_size": 16, "num_train_epochs": 1, "learning_rate": 1e-5}},
    # the CPU evidence profile: the top 4 of SmolLM2's 30 blocks over the frozen-prefix cache, bf16 autocast,
    # 1,024 training pairs from the full pool (1,600 prompts; 256 held-out pairs, 128 held-out prompts), 64 steps
    # of 16 pairs. About 5 minutes a run on 2 cores (the first run of a
    # seed's data fills the cache)
    "cpu-topk": {"task": {"train_pairs": 1024},
                 "train": {"num_train_epochs": 1, "learning_rate": 3e-5, "trainable_layers": 4, "bf16": True,
                           "shared_prefix_cache": True},
                 "sams_warmup_rounds": 10,
                 "hh": {"train_rows": 1800, "eval_rows": 400},
                 "hh_train": {"max_length": 320, "max_prompt_length": 256, "per_device_train_batch_size": 16,
                              "per_device_eval_batch_size": 32, "num_train_epochs": 1, "learning_rate": 3e-5,
                              "trainable_layers": 4, "bf16": True, "shared_prefix_cache": True}},
    # the audit row: 2 folds of its 4 pairs
    "quick": {"task": {"train_prompts": 12, "eval_pair_prompts": 4, "eval_prompts": 4, "max_new_tokens": 8,
                       "sampling_batch": 8, "train_pairs": 4}, "audit_folds": 2,
              "train": {"per_device_train_batch_size": 2, "max_steps": 2, "max_length": 64, "logging_steps": 1,
                        "trainable_layers": 2, "shared_prefix_cache": True},
              "sams_warmup_rounds": 1,
              "hh": {"train_rows": 4, "eval_rows": 4},
              "hh_train": {"max_length": 96, "max_prompt_length": 64, "per_device_train_batch_size": 2,
                           "per_device_eval_batch_size": 4, "max_steps": 2, "learning_rate": 2e-6}},
}
HH_METHODS = ("DPO", "β-DPO", "SamS (policy states)")
#: the quick mode (in the test suite): the audit rows go through the probe audit, its cleaned file, its scores and
#: its columns; SamS on SmolLM2's hidden states has its own test (tests/test_real_models.py), β-DPO its unit tests
QUICK_PLAN = {"noise": ("DPO", "audit (probe) → drop, DPO", "Selective DPO (easiest 50%, probe audit)"),
              "frontier": (0.1, 1.0),
              "frontier_methods": ("DPO",), "hh": ("DPO",)}


def experiments(quick: bool = False, sams_warmup_rounds: int = 10
                ) -> dict[str, list[tuple[str, dict[str, Any], dict[str, Any]]]]:
    """experiment → [(row label, sentiment-task overrides, training overrides)] (``hh``: task = {"flip_rate"})."""
    noise_methods = QUICK_PLAN["noise"] if quick else tuple(METHODS)
    methods = {name: with_warmup(preset, sams_warmup_rounds) for name, preset in METHODS.items()}
    mixed = {"high_gap_fraction": 0.5}
    plan = {
        # DPO clean and noisy, then every method on noisy labels, then on clean ones: a run stopped for its budget
        # leaves what the recovery table needs first
        "noise": [(f"{int(f * 100)}% flips: {name}", {**mixed, "flip_rate": f}, methods[name])
                  for f, name in [(0.0, "DPO"), (0.2, "DPO"), *[(f, n) for f in (0.2, 0.0) for n in noise_methods
                                                               if n != "DPO"]]],
        "gap": [(f"{gap} gap, β={b}", {"high_gap_fraction": 1.0 if gap == "high" else 0.0, "flip_rate": 0.0},
                 with_beta(methods["DPO"], b)) for gap in ("low", "high") for b in BETAS],
        "mix": [*[(f"mix {m}: DPO β={b}", {"high_gap_fraction": m, "flip_rate": 0.0}, with_beta(methods["DPO"], b))
                  for m in (0.2, 0.5, 0.8) for b in (0.1, 0.3)],
                *[(f"mix {m}: β-DPO batch", {"high_gap_fraction": m, "flip_rate": 0.0}, {"method": "beta_dpo"})
                  for m in (0.2, 0.5, 0.8)],
                ("mix 0.5: β-DPO instance", {**mixed, "flip_rate": 0.0},
                 {"method": "beta_dpo", "beta_dpo_level": "instance"})],
        "frontier": [(f"{name} β={b}", {**mixed, "flip_rate": 0.0}, with_beta(methods[name], b))
                     for name in (QUICK_PLAN["frontier_methods"] if quick else ("DPO", "β-DPO"))
                     for b in (QUICK_PLAN["frontier"] if quick else BETAS)],
        "filters": [*[(f"filter {flt}", {**mixed, "flip_rate": 0.2}, {"method": "beta_dpo", "beta_dpo_filter": flt})
                      for flt in ("gaussian", "grad_head", "grad_tail", "grad_tail_head")],
                    ("no filter (dynamic β only)", {**mixed, "flip_rate": 0.2},
                     {"method": "beta_dpo", "beta_dpo_keep_ratio": 1.0})],
        # the same order as noise: DPO clean and noisy first
        "hh": [(f"{'clean' if f == 0 else '20% flipped'}: {name}", {"flip_rate": f},
                {k: v for k, v in methods[name].items() if k != "sams_encoder_path"})
               for f, name in [(0.0, "DPO"), (0.2, "DPO"),
                               *[(f, n) for f in (0.2, 0.0) for n in (QUICK_PLAN["hh"] if quick else HH_METHODS)
                                 if n != "DPO"]]],
    }
    if quick:
        return {name: plan[name] for name in ("noise", "frontier", "hh")}
    return plan


def environment() -> dict[str, str]:
    import torch
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": device, "torch": torch.__version__, "transformers": transformers.__version__}


def with_cache_dir(settings: dict[str, Any], workdir: str) -> dict[str, Any]:
    """``shared_prefix_cache``: every run of the profile shares one frozen-prefix cache and one cache of the
    reference's per-pair log-probs (entries keyed by the weights and each row's tokens, so runs on other data or
    models never read each other's)."""
    settings = dict(settings)
    if settings.pop("shared_prefix_cache", False):
        settings["prefix_cache_dir"] = os.path.join(workdir, "prefix_cache")
        settings["cache_reference_logps"] = True  # the frozen start model: each pair's two numbers, once
        settings["ref_cache_dir"] = os.path.join(workdir, "ref_logps")
    return settings


#: committed sentiment pools (the on-policy samples of SmolLM2, about 1.5 MB of text): a folder is named by the
#: hash of the model's sha256 and the sampling settings, so one is used only where that key matches
COMMITTED_POOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "pools")


def seed_pools(cache: str) -> None:
    """Copy the committed pools absent from ``cache`` into it (a fresh checkout then skips the hour of sampling)."""
    if not os.path.isdir(COMMITTED_POOLS):
        return
    for name in os.listdir(COMMITTED_POOLS):
        target = os.path.join(cache, name)
        if name.startswith("sentiment-pool-") and not os.path.isdir(target):
            os.makedirs(cache, exist_ok=True)
            shutil.copytree(os.path.join(COMMITTED_POOLS, name), f"{target}.tmp-{os.getpid()}")
            os.replace(f"{target}.tmp-{os.getpid()}", target)
            print(f"sentiment pool {name}: copied from {COMMITTED_POOLS}", file=sys.stderr)


def run_sentiment(profile: dict[str, Any], task_overrides: dict, train_overrides: dict, seed: int,
                  workdir: str) -> dict[str, Any]:
    spec = SentimentSpec(**{**profile["task"], **task_overrides, "data_seed": seed})
    seed_pools(os.path.join(workdir, "cache"))
    task = build_sentiment_task(spec, os.path.join(workdir, "cache"))
    overrides = dict(train_overrides)
    signal = overrides.pop("audit", None)
    select = overrides.pop("select_from_audit", None)
    settings = with_cache_dir({**profile["train"], **overrides, "trace_pairs": True}, workdir)
    audit = None
    if signal is not None:  # audit the training file, then train on what it keeps
        audit = audit_training_file(task, settings, signal, seed, workdir, profile.get("audit_folds", 5))
        settings["train_file"] = os.path.join(audit["output_dir"], "cleaned.jsonl")
    elif select is not None:  # audit the training file, then train on its easiest half (Selective DPO)
        audit = audit_training_file(task, settings, select, seed, workdir, profile.get("audit_folds", 5))
        settings.update({"pair_selection": "easiest", "pair_keep_ratio": 0.5,
                         "pair_scores_file": os.path.join(audit["output_dir"], "audit.jsonl")})
    result = train_and_evaluate(task, settings, os.path.join(workdir, "run"), seed=seed, plots=False)
    if audit is not None:
        truth = audit.get("ground_truth", {})
        result.update({"audit/auroc": truth.get("auroc"), "audit/estimated_flip_rate": audit["estimated_flip_rate"],
                       "audit/dropped": audit["cleaned_counts"]["dropped"], "audit/warnings": len(audit["warnings"]),
                       "audit/wall_time_s": audit["wall_time_s"]})
    return result


def audit_training_file(task: Any, settings: dict[str, Any], signal: str, seed: int, workdir: str,
                        folds: int = 5) -> dict:
    """``adaptdpo audit`` of the task's training file with ``signal`` (``folds`` folds, --clean drop, the training
    settings for the reference and any fold models); its summary, with the folder it wrote."""
    from adaptdpo.audit.run import AuditOptions, run_audit
    from adaptdpo.tasks.experiment import gold_train_arguments

    key = json.dumps({"data": task.train_file, "signal": signal, "seed": seed}, sort_keys=True)
    out = os.path.join(workdir, "audits", f"{signal}-{seed}-{hashlib.sha256(key.encode()).hexdigest()[:10]}")
    train_args = gold_train_arguments(task, {k: v for k, v in settings.items() if k != "output_dir"} |
                                      {"seed": seed, "plots": False, "trace_pairs": False})
    summary = run_audit(AuditOptions(data=task.train_file, output_dir=out, folds=folds, fold_seed=seed, clean="drop",
                                     signal=signal), train_args)
    return {**summary, "output_dir": out}


def hh_files(profile: dict[str, Any], flip_rate: float, seed: int, folder: str) -> tuple[str, str, set[int]]:
    """(training file with ``flip_rate`` of its labels swapped, recorded in ``flipped``; held-out file; flipped ids)."""
    from adaptdpo.data.rows import load_preference_rows

    rows, _ = load_preference_rows(HH, skip_invalid=True)
    n_train, n_eval = profile["hh"]["train_rows"], profile["hh"]["eval_rows"]
    train, held = rows[:n_train], rows[-n_eval:]
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    flipped = set()
    train_path = os.path.join(folder, f"train-{flip_rate}-{seed}.jsonl")
    with open(train_path, "w", encoding="utf-8") as fh:
        for i, r in enumerate(train):
            flip = rng.random() < flip_rate
            if flip:
                flipped.add(i)
            chosen, rejected = (r["rejected"], r["chosen"]) if flip else (r["chosen"], r["rejected"])
            fh.write(json.dumps({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected, "flipped": flip})
                     + "\n")
    eval_path = os.path.join(folder, "eval.jsonl")
    with open(eval_path, "w", encoding="utf-8") as fh:
        for r in held:
            fh.write(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}) + "\n")
    return train_path, eval_path, flipped


def run_hh(profile: dict[str, Any], flip_rate: float, train_overrides: dict, seed: int, workdir: str) -> dict:
    from adaptdpo.evaluation.metrics import selection_of_flipped_pairs
    from adaptdpo.tasks.sentiment.task import SENTIMENT_TRAIN_DEFAULTS
    from adaptdpo.training.config_io import parse_config
    from adaptdpo.training.job import run_training

    train_path, eval_path, flipped = hh_files(profile, flip_rate, seed, os.path.join(workdir, "hh-data"))
    out = os.path.join(workdir, "run")
    shutil.rmtree(out, ignore_errors=True)
    settings = {**SENTIMENT_TRAIN_DEFAULTS, "model_name_or_path": "smollm2-135m-instruct", "train_file": train_path,
                "eval_file": eval_path, "chat_format": "auto", **profile["hh_train"], **train_overrides,
                "output_dir": out, "seed": seed, "plots": False, "resume": "never", "trace_pairs": True}
    settings = with_cache_dir(settings, workdir)
    summary = run_training(parse_config([x for k, v in settings.items() for x in (f"--{k}", str(v))]))
    ev = summary["final_eval"]
    result = {"hh/accuracy": ev["eval_rewards/accuracies"], "hh/margin": ev["eval_rewards/margins"],
              "wall_time_s": summary["wall_time_s"], "steps": summary["global_step"]}
    result.update(selection_of_flipped_pairs(out, flipped))
    return result


def run_key(profile: str, experiment_kind: str, task_overrides: dict, train_overrides: dict, seed: int) -> str:
    return json.dumps({"profile": profile, "task": experiment_kind, "task_overrides": task_overrides,
                       "train": train_overrides, "seed": seed}, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=tuple(PROFILES), default="full")
    parser.add_argument("--quick", action="store_true", help="profile quick, 1 seed, a few runs of each stage")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--experiments", default="noise,mix,frontier,gap,filters,hh")
    parser.add_argument("--budget_s", type=float, default=None, help="stop before a run that would end past this")
    parser.add_argument("--workdir", default="runs/bench-real")
    parser.add_argument("--results", default=None, help="the JSONL of finished runs (default: <workdir>/<profile>/"
                        "results.jsonl; the cpu-topk profile's is committed: benchmarks/results/)")
    parser.add_argument("--out", default=None, help="markdown file for the tables")
    parser.add_argument("--plots", default=None, help="folder for the figures (frontier, recovery)")
    parser.add_argument("--embed_in", default=None,
                        help="a markdown file (docs/results.md) whose block between '<!-- real_model PROFILE "
                             "recovery: begin -->' and '<!-- ... end -->' is replaced by the recovery table")
    parser.add_argument("--tables_only", action="store_true", help="redraw tables and figures from the results")
    ns = parser.parse_args(argv)
    if ns.quick:
        ns.profile, ns.seeds = "quick", 1
    logging.disable(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    profile = PROFILES[ns.profile]
    workdir = os.path.join(ns.workdir, ns.profile)
    results_path = ns.results or (COMMITTED_RESULTS if ns.profile == "cpu-topk" else None)
    cache = ResultCache(workdir, results_path)
    plan = experiments(quick=ns.quick, sams_warmup_rounds=profile["sams_warmup_rounds"])
    chosen = [e for e in ns.experiments.split(",") if e in plan]
    unknown = [e for e in ns.experiments.split(",") if e not in experiments()]
    if unknown:
        parser.error(f"unknown experiment(s) {unknown}; choose from {', '.join(experiments())}")
    todo = [(exp, label, t, o, seed) for exp in chosen for label, t, o in plan[exp] for seed in range(ns.seeds)]
    pending = [item for item in todo
               if run_key(ns.profile, "hh" if item[0] == "hh" else "sentiment", item[2], item[3], item[4])
               not in cache.done]
    env = environment()
    started, slowest = time.time(), 0.0
    print(f"{len(todo)} runs, {len(pending)} to do ({env['device']}, torch {env['torch']})", file=sys.stderr)
    left = len(pending)
    for count, (exp, label, task_over, train_over, seed) in enumerate([] if ns.tables_only else pending, start=1):
        kind = "hh" if exp == "hh" else "sentiment"
        key = run_key(ns.profile, kind, task_over, train_over, seed)
        if key in cache.done:  # the same configuration in another experiment, done earlier in this loop
            left -= 1
            continue
        if ns.budget_s is not None and time.time() - started + 1.2 * slowest > ns.budget_s:
            print(f"stopped for the budget ({ns.budget_s:.0f} s): {left} run(s) left; run the same command again",
                  file=sys.stderr)
            break
        run_started = time.time()
        if kind == "hh":
            result = run_hh(profile, task_over["flip_rate"], train_over, seed, workdir)
        else:
            result = run_sentiment(profile, task_over, train_over, seed, workdir)
        result.update(env)
        cache.add(key, result)
        left -= 1
        slowest = max(slowest, time.time() - run_started)
        headline = result.get("gold/accuracy", result.get("hh/accuracy"))
        print(f"[{count}/{len(pending)}] {exp}: {label} seed {seed}: accuracy {headline:.3f} "
              f"({time.time() - run_started:.0f} s; {time.time() - started:.0f} s in all)", file=sys.stderr)
    results = {exp: [(label, [cache.done[k] for seed in range(ns.seeds)
                              if (k := run_key(ns.profile, "hh" if exp == "hh" else "sentiment", t, o, seed))
                              in cache.done])
                     for label, t, o in plan[exp]] for exp in chosen}
    text = report(results, ns, env)
    print(text)
    if ns.out:
        with open(ns.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    if ns.embed_in and results.get("noise"):
        embed_block(ns.embed_in, f"real_model {ns.profile} recovery", recovery_table(results["noise"]))
    if ns.plots:
        os.makedirs(ns.plots, exist_ok=True)
        if results.get("frontier"):
            plot_frontier(results["frontier"], results.get("noise", []), os.path.join(ns.plots,
                                                                                      "sentiment_frontier.png"))
        if results.get("noise"):
            plot_recovery(results["noise"], os.path.join(ns.plots, "sentiment_recovery.png"))
    print("all runs done" if left <= 0 else f"{left} run(s) left", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------ report

#: "flipped pairs trained" / "clean pairs trained": the share of each kind that a step trained on (selection and
#: filtering keep fewer of both; a selector that avoids flipped labels keeps fewer flipped than clean ones)
SELECTION_KEYS = [("flipped_trained_fraction", "flipped pairs trained"), ("clean_trained_fraction",
                                                                          "clean pairs trained")]
SENTIMENT_KEYS = [("gold/accuracy", "held-out accuracy"), ("gold/reward", "gold reward"), ("gold/win_rate", "win rate"),
                  ("kl", "KL"), *SELECTION_KEYS]
HH_KEYS = [("hh/accuracy", "held-out accuracy"), ("hh/margin", "margin"), *SELECTION_KEYS]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def table(title: str, rows: list[tuple[str, list[dict]]], keys: list[tuple[str, str]]) -> str:
    lines = [f"### {title}", "", "| configuration | seeds | " + " | ".join(k[1] for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for label, results in rows:
        if not results:
            lines.append(f"| {label} | 0 | " + " | ".join("not run" for _ in keys) + " |")
            continue
        cells = [mean_std([r.get(k, float("nan")) for r in results]) for k, _ in keys]
        lines.append(f"| {label} | {len(results)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def recovery_table(noise: list[tuple[str, list[dict]]]) -> str:
    """For each method at 20% flips, the share of what the flips cost DPO (clean − noisy) it wins back."""
    by_label = dict(noise)
    clean, noisy = by_label.get("0% flips: DPO", []), by_label.get("20% flips: DPO", [])
    keys = [("gold/reward", "gold reward"), ("gold/accuracy", "held-out accuracy"), ("gold/win_rate", "win rate")]
    lines = ["### Noise recovery: share of DPO's loss to 20% flips that each method wins back", "",
             "won back = (method at 20% − DPO at 20%) / (DPO clean − DPO at 20%), on means over seeds; "
             "100% = as good as DPO on clean labels, 0% = no better than DPO on the noisy ones.", "",
             "| method | seeds | " + " | ".join(f"{name} (20% flips) | {name} won back" for _, name in keys) + " |",
             "|---|---|" + "---|---|" * len(keys)]
    if not clean or not noisy:
        return "\n".join(lines[:1]) + "\n\nnot run (needs DPO at 0% and 20% flips)\n"
    beyond, within = [], []
    for label, results in noise:
        if not label.startswith("20% flips") or not results:
            continue
        cells = []
        for key, name in keys:
            won = won_back([r[key] for r in results], [r[key] for r in clean], [r[key] for r in noisy])
            cells += [mean_std([r[key] for r in results]),
                      "–" if label.endswith(": DPO") or won is None else
                      f"{won[0]:+.0%}" if math.isnan(won[1]) else f"{won[0]:+.0%} ± {won[1]:.0%}"]
            if not label.endswith(": DPO"):
                delta, se = difference([r[key] for r in results], [r[key] for r in noisy])
                (beyond if abs(delta) > 2 * se else within).append(
                    f"{label.split(': ', 1)[1]} {name} {delta:+.3f} ({abs(delta) / se:.1f} SE)" if se > 0 else
                    f"{label.split(': ', 1)[1]} {name} {delta:+.3f}")
        lines.append(f"| {label.split(': ', 1)[1]} | {len(results)} | " + " | ".join(cells) + " |")
    gaps = []
    for k, name in keys:
        delta, se = difference([r[k] for r in clean], [r[k] for r in noisy])
        gaps.append(f"{name} {delta:+.3f} ({abs(delta) / se:.1f} SE)" if se > 0 else f"{name} {delta:+.3f}")
    lines += ["", f"What 20% flips cost DPO (clean − noisy): {', '.join(gaps)}.", "",
              "± on \"won back\": one standard error by the delta method over the three means (seeds independent). "
              "Differences to DPO at 20% flips larger than two standard errors of the difference: "
              + ("; ".join(beyond) or "none") + ". Within two: " + ("; ".join(within) or "none") + "."]
    return "\n".join(lines) + "\n"


def embed_block(path: str, name: str, text: str) -> None:
    """Replace what stands between ``<!-- {name}: begin -->`` and ``<!-- {name}: end -->`` in ``path`` with ``text``
    (the table as the results wrote it, so a document never carries a hand-copied figure)."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    with open(path, encoding="utf-8") as fh:
        doc = fh.read()
    if doc.count(begin) != 1 or doc.count(end) != 1 or doc.index(begin) > doc.index(end):
        raise SystemExit(f"{path}: needs exactly one '{begin}' followed by one '{end}'")
    head, rest = doc.split(begin)
    _, tail = rest.split(end)
    body = text.split("\n", 2)[2] if text.startswith("### ") else text  # the document has its own heading
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(f"{head}{begin}\n{body.strip()}\n{end}{tail}")


def _var_of_mean(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return sum((v - mean) ** 2 for v in values) / (n - 1) / n


def difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Difference of the means of two independent samples and its standard error (Welch)."""
    return _mean(a) - _mean(b), (_var_of_mean(a) + _var_of_mean(b)) ** 0.5


def won_back(method: list[float], clean: list[float], noisy: list[float]) -> tuple[float, float] | None:
    """R = (m − n) / (c − n) on the means, with its delta-method standard error.

    ∂R/∂m = 1/g, ∂R/∂c = −(m − n)/g², ∂R/∂n = (m − c)/g², g = c − n; the three samples are independent runs.
    None when clean and noisy DPO have the same mean."""
    m, c, n = _mean(method), _mean(clean), _mean(noisy)
    gap = c - n
    if abs(gap) < 1e-9:
        return None
    var = (_var_of_mean(method) / gap ** 2 + _var_of_mean(clean) * ((m - n) / gap ** 2) ** 2
           + _var_of_mean(noisy) * ((m - c) / gap ** 2) ** 2)
    return (m - n) / gap, var ** 0.5


def report(results: dict[str, list[tuple[str, list[dict]]]], ns: argparse.Namespace, env: dict[str, str]) -> str:
    titles = {"noise": "DPO, β-DPO, SamS, random selection and β-DPO+SamS at 0% and 20% flips (sentiment)",
              "gap": "Static β on low-gap and on high-gap pairs (sentiment, clean)",
              "mix": "β-DPO against static β on mixtures of low- and high-gap pairs (sentiment, clean)",
              "frontier": "Reward–KL frontier points (sentiment, mixed gaps, clean)",
              "filters": "β-DPO's filters at 20% flips (sentiment)",
              "hh": "HH (Anthropic harmless-base, chat-templated): held-out implicit-reward accuracy"}
    devices = sorted({r.get("device", "?") for rows in results.values() for _, rs in rows for r in rs})
    versions = sorted({f"torch {r.get('torch')}, transformers {r.get('transformers')}"
                       for rows in results.values() for _, rs in rows for r in rs})
    parts = [f"Profile `{ns.profile}`, SmolLM2-135M-Instruct (packaged), mean ± std over seeds. Measured on: "
             f"{'; '.join(devices) or env['device']} ({'; '.join(versions) or env['torch']}).",
             f"Command: `python benchmarks/real_model.py --profile {ns.profile} --seeds {ns.seeds} "
             f"--experiments {','.join(results)}`", ""]
    for exp, rows in results.items():
        parts.append(table(titles[exp], rows, HH_KEYS if exp == "hh" else SENTIMENT_KEYS))
        if exp == "noise":
            parts.append(recovery_table(rows))
    return "\n".join(parts)


def plot_frontier(frontier: list[tuple[str, list[dict]]], noise: list[tuple[str, list[dict]]], path: str) -> None:
    """Gold reward against KL(π‖π_ref), one point per run, a line through each method's β sweep (DPO Fig. 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method, colour in (("DPO", "tab:blue"), ("β-DPO", "tab:orange")):
        means = []
        for label, results in frontier:
            if label.startswith(method + " β=") and results:
                xs, ys = [r["kl"] for r in results], [r["gold/reward"] for r in results]
                ax.scatter(xs, ys, color=colour, alpha=0.35, s=14)
                means.append((_mean(xs), _mean(ys), label.split("β=")[1]))
        if means:
            means.sort()
            ax.plot([m[0] for m in means], [m[1] for m in means], "-o", color=colour, label=f"{method} (β sweep)")
            for x, y, b in means:
                ax.annotate(f"β={b}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for label, results in noise:
        if label.startswith("0% flips") and results and not label.endswith((": DPO", ": β-DPO")):
            ax.scatter([_mean([r["kl"] for r in results])], [_mean([r["gold/reward"] for r in results])], marker="s",
                       label=label.split(": ", 1)[1] + " (β=0.1)")
    reference = [r["gold/reference_reward"] for _, rs in frontier for r in rs]
    if reference:
        ax.axhline(_mean(reference), color="grey", ls="--", lw=1, label="reference model")
    ax.set_xlabel("KL(π ‖ π_ref) on the policy's samples (nats)")
    ax.set_ylabel("mean gold reward (VADER compound)")
    ax.set_title("Controlled sentiment on SmolLM2-135M-Instruct: reward–KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_recovery(noise: list[tuple[str, list[dict]]], path: str) -> None:
    """Gold reward and held-out accuracy per method, clean and at 20% flips (mean ± std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({label.split(": ", 1)[1] for label, rs in noise if rs}, key=list(METHODS).index)
    by_label = dict(noise)
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(methods) + 1.8), sharey=True)
    for ax, (key, title) in zip(axes, (("gold/reward", "gold reward of samples"),
                                       ("gold/accuracy", "held-out accuracy")), strict=True):
        for offset, (flips, colour) in enumerate((("0% flips", "tab:green"), ("20% flips", "tab:red"))):
            values = [[r[key] for r in by_label.get(f"{flips}: {m}", [])] for m in methods]
            means = [_mean(v) for v in values]
            stds = [(sum((x - mu) ** 2 for x in v) / max(1, len(v) - 1)) ** 0.5 if v else 0.0
                    for v, mu in zip(values, means, strict=True)]
            ax.barh([i + 0.4 * offset for i in range(len(methods))], means, height=0.38, xerr=stds, color=colour,
                    alpha=0.7, label=flips)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=7)
    axes[0].set_yticks([i + 0.2 for i in range(len(methods))], methods, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("SmolLM2-135M-Instruct, controlled sentiment: clean vs 20% flipped labels")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
