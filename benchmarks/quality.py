"""The papers' experiments on the gold-reward task, mean ± std over seeds → docs/results.md tables.

    .venv/bin/python benchmarks/quality.py [--seeds 5] [--experiments a,b,c,d,e,f] [--out docs/results_tables.md]

Every run trains from the same reference model (task seed 0) on a training set drawn with the run's seed
(data_seed), with the run's seed for training and evaluation. Experiments (see docs/results.md):

  a  static-β sweep on low-gap vs high-gap data                   (β-DPO Fig. 1b/2)
  b  β-DPO (batch, instance) vs static β on mixed data, mixtures   (β-DPO Table 2)
  c  DPO vs DPO+SamS at 0% and 20% flips                         (SamS Fig. 3)
  d  SamS ratio 25/50/75/100%, without f_S′, random 50%           (SamS App. D.4)
  e  β-DPO + SamS against each alone (20% flips, mixed gaps)
  f  filtering strategies                                         (β-DPO §5.2)

Results are appended to a JSONL cache (one line per run), so an interrupted benchmark resumes where it
stopped and tables can be redrawn without training again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ResultCache, mean_std

from adaptdpo.tasks.experiment import METHODS, train_and_evaluate
from adaptdpo.tasks.toy.task import ToySpec, build_task

SAMS = METHODS["sams"]
KEYS = [("gold/accuracy", "accuracy"), ("gold/win_rate", "win rate"), ("gold/reward", "gold reward"), ("kl", "KL")]


def experiments() -> dict[str, list[tuple[str, dict, dict]]]:
    """experiment → [(row label, task overrides, training overrides)]."""
    mixed20 = {"high_gap_fraction": 0.5, "flip_rate": 0.2}
    betas = [0.05, 0.1, 0.3, 1.0]
    return {
        "a": [(f"{gap} gap, β={b}", {"high_gap_fraction": 1.0 if gap == "high" else 0.0, "flip_rate": 0.0},
               {"method": "dpo", "beta": b}) for gap in ("low", "high") for b in betas],
        "b": [*[(f"mix {m}: DPO β={b}", {"high_gap_fraction": m, "flip_rate": 0.0}, {"method": "dpo", "beta": b})
                for m in (0.2, 0.5, 0.8) for b in (0.1, 0.3)],
              *[(f"mix {m}: β-DPO batch", {"high_gap_fraction": m, "flip_rate": 0.0}, {"method": "beta_dpo"})
                for m in (0.2, 0.5, 0.8)],
              ("mix 0.5: β-DPO instance", {"high_gap_fraction": 0.5, "flip_rate": 0.0},
               {"method": "beta_dpo", "beta_dpo_level": "instance"}),
              # the official code's setting: its a = 0.6 at β0 = 0.1 is α = 6 in the paper's units (ours)
              *[(f"mix {m}: β-DPO batch, α=6 (code's a=0.6)", {"high_gap_fraction": m, "flip_rate": 0.0},
                 {"method": "beta_dpo", "beta_dpo_alpha": 6.0}) for m in (0.2, 0.5, 0.8)]],
        "c": [(f"{int(f * 100)}% flips: {name}", {"high_gap_fraction": 0.5, "flip_rate": f}, preset)
              for f in (0.0, 0.2) for name, preset in (("DPO", METHODS["dpo"]), ("DPO+SamS", SAMS))],
        "d": [*[(f"SamS ratio {r}", mixed20, {**SAMS, "sams_ratio": r}) for r in (0.25, 0.5, 0.75, 1.0)],
              ("SamS 0.5 without f_S′", mixed20, {**SAMS, "sams_use_exploration": False}),
              ("random 50% (DPO 50%)", mixed20, {**SAMS, "sams_selection": "random"}),
              # investigation: with the paper's mean of chosen and rejected contexts, a pair and its flipped
              # copy have the same context; concatenating them keeps the order
              ("SamS 0.5, concatenated contexts", mixed20, {**SAMS, "sams_context_combine": "concat"})],
        "e": [(name, mixed20, METHODS[name]) for name in ("dpo", "beta_dpo", "sams", "beta_dpo+sams")],
        "f": [(f"filter {flt}", mixed20, {"method": "beta_dpo", "beta_dpo_filter": flt})
              for flt in ("gaussian", "grad_head", "grad_tail", "grad_tail_head")]
             + [("no filter (dynamic β only)", mixed20, {"method": "beta_dpo", "beta_dpo_keep_ratio": 1.0})],
    }


def run_key(task_overrides: dict, train_overrides: dict, seed: int) -> str:
    return json.dumps({"task": task_overrides, "train": train_overrides, "seed": seed}, sort_keys=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--experiments", default="a,b,c,d,e,f")
    parser.add_argument("--workdir", default="runs/bench-quality")
    parser.add_argument("--out", default=None, help="markdown file for the tables")
    parser.add_argument("--tables_only", action="store_true", help="redraw the tables from the cache")
    ns = parser.parse_args()
    logging.disable(logging.WARNING)
    cache = ResultCache(ns.workdir)
    done = cache.done
    chosen = ns.experiments.split(",")
    plan = experiments()
    total = sum(len(plan[e]) for e in chosen) * ns.seeds
    started, count = time.time(), 0
    tables = []
    for exp in chosen:
        rows = []
        for label, task_over, train_over in plan[exp]:
            per_seed = []
            for seed in range(ns.seeds):
                count += 1
                key = run_key(task_over, train_over, seed)
                if key not in done and not ns.tables_only:
                    task = build_task(ToySpec(seed=0, data_seed=seed, **task_over), os.path.join(ns.workdir, "cache"))
                    result = train_and_evaluate(task, {**train_over, "trace_pairs": True},
                                                os.path.join(ns.workdir, "run"), seed=seed, plots=False)
                    cache.add(key, result)
                    print(f"[{count}/{total}] {exp}: {label} seed {seed}: acc {result['gold/accuracy']:.3f} "
                          f"win {result['gold/win_rate']:.3f} ({time.time() - started:.0f} s)", file=sys.stderr)
                if key in done:
                    per_seed.append(done[key])
            if per_seed:
                if task_over.get("flip_rate", 0.2) == 0:  # no flipped pair to count (older caches stored 0)
                    per_seed = [{**r, "flipped_trained_fraction": float("nan")} for r in per_seed]
                rows.append((label, per_seed))
        tables.append(format_table(exp, rows))
    text = "\n".join(tables)
    print(text)
    if ns.out:
        with open(ns.out, "w", encoding="utf-8") as fh:
            fh.write(text)


def format_table(exp: str, rows: list[tuple[str, list[dict]]]) -> str:
    extra = [("flipped_trained_fraction", "flipped trained"), ("clean_trained_fraction", "clean trained")]
    keys = KEYS + (extra if exp in ("c", "d", "e", "f") else [])
    lines = [f"### Experiment {exp}", "", "| configuration | seeds | " + " | ".join(k[1] for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for label, results in rows:
        cells = [mean_std([r[k] for r in results]) for k, _ in keys]
        lines.append(f"| {label} | {len(results)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
