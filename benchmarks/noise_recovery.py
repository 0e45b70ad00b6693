"""Noise recovery on the gold-reward task: how much of what 20% flipped labels cost DPO each recipe wins back.

    .venv/bin/python benchmarks/noise_recovery.py [--seeds 5] [--out docs/noise_recovery_tables.md]
        [--plot docs/noise_recovery.png]

Per seed s, two training sets with the same pairs and Bradley–Terry labels (task seed 0, data_seed s, half
low-gap, half high-gap): clean, and with 20% of the labels flipped (recorded in the `flipped` column). On the
noisy set, `adaptdpo audit` (5 folds) scores every pair; then each recipe trains from the same reference and is
judged on held-out pairs and prompts by the exact gold reward (accuracy, win rate, gold reward, KL; see
docs/results.md). Recipes: DPO clean / noisy; audit then DPO on the cleaned data (drop the estimated flip
share; swap confident suspects, p ≥ 0.8; swap every likely flip, p ≥ 0.5); Selective DPO (easiest 50% by
cross-fitted validation loss, easy to hard) alone, with SamS (75% per batch, the SamS paper's Table 3
setting) and with β-DPO; the hardest 50% instead (arXiv 2508.04149's choice); β-DPO; SamS; the robust loss
(rDPO) and conservative DPO (cDPO) with the true and with the audit's estimated flip rate; Hölder-DPO; ε-DPO;
the audit's 1 − P(flip) as a per-pair loss weight (weight_column). Same seeds and data for every recipe.

"won back" = (recipe − DPO noisy) / (DPO clean − DPO noisy), on the means over seeds; "Δ accuracy" = the recipe's
accuracy minus DPO noisy's, paired by seed, mean ± standard error.
Results are cached in benchmarks/results/noise_recovery.jsonl (one line per run, committed): an interrupted run
resumes, from a later checkout too; --budget_s stops it before a run that would end past the budget.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ResultCache, mean_std

from adaptdpo.audit.run import AuditOptions, run_audit
from adaptdpo.tasks.experiment import METHODS, gold_train_arguments, train_and_evaluate
from adaptdpo.tasks.toy.task import ToySpec, build_task

FLIP_RATE = 0.2
COMMITTED_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "noise_recovery.jsonl")
AUDIT_TRAINING = {"learning_rate": 3e-3}  # the fold models (see docs/audit.md: a little better than 1e-3 here)
KEYS = [("gold/accuracy", "accuracy"), ("gold/win_rate", "win rate"), ("gold/reward", "gold reward"), ("kl", "KL"),
        ("flipped_share_of_trained", "flipped share of trained pairs")]


def recipes(audit_dir: str, estimated_rate: float) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, which data: clean | noisy, training overrides)."""
    scores = os.path.join(audit_dir, "audit.jsonl")
    selective = {"pair_selection": "easiest", "pair_scores_file": scores, "pair_keep_ratio": 0.5}
    return [
        ("DPO, clean data", "clean", METHODS["dpo"]),
        ("DPO, 20% flips", "noisy", METHODS["dpo"]),
        ("audit → drop top suspects (estimated share), DPO", "noisy",
         {**METHODS["dpo"], "train_file": os.path.join(audit_dir, "cleaned-drop.jsonl")}),
        ("audit → swap confident suspects (p ≥ 0.8), DPO", "noisy",
         {**METHODS["dpo"], "train_file": os.path.join(audit_dir, "cleaned-swap.jsonl")}),
        ("audit → swap likely flips (p ≥ 0.5), DPO", "noisy",
         {**METHODS["dpo"], "train_file": os.path.join(audit_dir, "cleaned-swap05.jsonl")}),
        ("Selective DPO (easiest 50%, easy → hard)", "noisy", {**METHODS["dpo"], **selective}),
        ("Selective DPO + SamS (75%)", "noisy", {**METHODS["sams"], **selective, "sams_ratio": 0.75}),
        ("Selective DPO + β-DPO", "noisy", {**METHODS["beta_dpo"], **selective}),
        ("hardest 50% (arXiv 2508.04149), shuffled", "noisy", {**METHODS["dpo"], **selective,
                                                               "pair_selection": "hardest", "pair_order": "shuffled"}),
        ("β-DPO", "noisy", METHODS["beta_dpo"]),
        ("SamS", "noisy", METHODS["sams"]),
        ("robust DPO (rDPO), ε = 0.2 (true rate)", "noisy", {"method": "dpo", "loss_type": "robust",
                                                             "label_smoothing": FLIP_RATE}),
        ("robust DPO (rDPO), ε = audit's estimate", "noisy", {"method": "dpo", "loss_type": "robust",
                                                              "label_smoothing": round(estimated_rate, 4)}),
        ("conservative DPO (cDPO), ε = 0.2 (true rate)", "noisy", {"method": "dpo", "loss_type": "sigmoid",
                                                                   "label_smoothing": FLIP_RATE}),
        ("conservative DPO (cDPO), ε = audit's estimate", "noisy", {"method": "dpo", "loss_type": "sigmoid",
                                                                    "label_smoothing": round(estimated_rate, 4)}),
        ("Hölder-DPO (γ = 2, the paper's)", "noisy", {"method": "dpo", "loss_type": "holder", "holder_gamma": 2.0}),
        ("ε-DPO (ε = 0.01)", "noisy", {"method": "epsilon_dpo", "epsilon_dpo_epsilon": 0.01}),
        ("audit → weight 1 − P(flip), DPO", "noisy",
         {**METHODS["dpo"], "train_file": os.path.join(audit_dir, "cleaned-weight.jsonl"),
          "weight_column": "audit_weight"}),
    ]


def audit_task(task: Any, workdir: str, seed: int) -> dict[str, Any]:
    """The audit of the noisy training set, with both cleaned files (drop, swap) kept side by side."""
    out = os.path.join(workdir, f"audit-seed{seed}")
    train_args = gold_train_arguments(task, {**AUDIT_TRAINING, "seed": seed, "plots": False})
    # later passes reuse the fold models and scores of the first: only the cleaned file changes
    for name, mode, threshold in (("swap", "swap", 0.8), ("swap05", "swap", 0.5), ("weight", "weight", 0.8),
                                  ("drop", "drop", 0.8)):
        # the DPO-fold audit these tables were measured with (issue 26 made the probe the default signal)
        run_audit(AuditOptions(data=task.train_file, output_dir=out, folds=5, fold_seed=seed, clean=mode,
                               swap_threshold=threshold, signal="dpo_folds", force=True), train_args)
        shutil.copy(os.path.join(out, "cleaned.jsonl"), os.path.join(out, f"cleaned-{name}.jsonl"))
    with open(os.path.join(out, "audit_summary.json"), encoding="utf-8") as fh:
        return json.load(fh)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workdir", default="runs/bench-noise")
    parser.add_argument("--out", default=None, help="markdown file for the tables")
    parser.add_argument("--plot", default=None, help="PNG file for the recovery figure")
    parser.add_argument("--results", default=COMMITTED_RESULTS,
                        help="the JSONL of finished runs, one line per run (default: the committed "
                             "benchmarks/results/noise_recovery.jsonl, so a later checkout goes on from it)")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="stop before a run that would end past this many seconds; run the same command again")
    ns = parser.parse_args()
    logging.disable(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    cache = ResultCache(ns.workdir, ns.results)
    slowest = 0.0
    done = cache.done
    started = time.time()
    per_recipe: dict[str, list[dict]] = {}
    audits = []
    for seed in range(ns.seeds):
        noisy = build_task(ToySpec(seed=0, data_seed=seed, high_gap_fraction=0.5, flip_rate=FLIP_RATE),
                           os.path.join(ns.workdir, "cache"))
        clean = build_task(ToySpec(seed=0, data_seed=seed, high_gap_fraction=0.5, flip_rate=0.0),
                           os.path.join(ns.workdir, "cache"))
        audit = audit_task(noisy, ns.workdir, seed)
        audits.append(audit)
        gt = audit["ground_truth"]
        print(f"seed {seed}: audit AUROC {gt['auroc']:.3f}, precision at the flip rate "
              f"{gt['precision_at_flip_rate']:.3f}, estimated flip rate {audit['estimated_flip_rate']:.3f} "
              f"({time.time() - started:.0f} s)", file=sys.stderr)
        for label, which, overrides in recipes(os.path.join(ns.workdir, f"audit-seed{seed}"),
                                               audit["estimated_flip_rate"]):
            key = json.dumps({"recipe": label, "seed": seed}, sort_keys=True)
            if key not in done:
                if ns.budget_s is not None and time.time() - started + 1.2 * slowest > ns.budget_s:
                    print(f"stopped for the budget ({ns.budget_s:.0f} s); run the same command again", file=sys.stderr)
                    return
                run_started = time.time()
                task = clean if which == "clean" else noisy
                result = train_and_evaluate(task, {**overrides, "trace_pairs": True, "disable_tqdm": True},
                                            os.path.join(ns.workdir, "run"), seed=seed, plots=False)
                cache.add(key, result)
                slowest = max(slowest, time.time() - run_started)
                print(f"seed {seed}: {label}: accuracy {result['gold/accuracy']:.3f} win {result['gold/win_rate']:.3f}"
                      f" ({time.time() - started:.0f} s)", file=sys.stderr)
            per_recipe.setdefault(label, []).append(done[key])
    text = format_tables(per_recipe, audits)
    print(text)
    if ns.out:
        with open(ns.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    if ns.plot:
        plot_recovery(per_recipe, ns.plot)


def plot_recovery(per_recipe: dict[str, list[dict]], path: str) -> None:
    """Held-out gold accuracy and gold reward per recipe (mean ± std), against DPO clean and DPO noisy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [k for k in per_recipe if not k.startswith("DPO,")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(labels) + 1.5), sharey=True)
    for ax, (key, title) in zip(axes, (("gold/accuracy", "held-out gold accuracy"),
                                       ("gold/reward", "gold reward of samples")), strict=True):
        values = [[r[key] for r in per_recipe[k]] for k in labels]
        means = [_mean(v) for v in values]
        stds = [(sum((x - m) ** 2 for x in v) / max(1, len(v) - 1)) ** 0.5 for v, m in zip(values, means, strict=True)]
        ax.barh(range(len(labels)), means, xerr=stds, color="tab:blue", alpha=0.7)
        for name, colour in (("DPO, clean data", "tab:green"), ("DPO, 20% flips", "tab:red")):
            ax.axvline(_mean([r[key] for r in per_recipe[name]]), color=colour, ls="--", label=name)
        ax.set_title(title)
        if key == "gold/accuracy":
            ax.set_xlim(0.4, 0.72)  # chance is 0.5: zoom in where the recipes differ
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"noise recovery on the gold task: 20% flipped labels, {len(per_recipe[labels[0]])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def paired_gain(results: list[dict], noisy: list[dict], key: str = "gold/accuracy") -> str:
    """mean ± standard error over seeds of (recipe − DPO noisy), paired by seed (results are in seed order)."""
    diffs = [r[key] - n[key] for r, n in zip(results, noisy, strict=False)]
    if len(diffs) < 2 or results is noisy:
        return "–"
    mean = _mean(diffs)
    se = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5
    return f"{mean:+.3f} ± {se:.3f}"


def format_tables(per_recipe: dict[str, list[dict]], audits: list[dict]) -> str:
    gts = [a["ground_truth"] for a in audits]
    cell = lambda key: mean_std([g[key] for g in gts])  # noqa: E731
    lines = ["### The audit on the noisy training sets (5 folds, cross-fitted DPO margins)", "",
             "| seeds | AUROC (flipped pairs) | average precision | precision at the true flip rate | "
             "estimated flip rate | Hölder-DPO's estimate 1 − ξ̂ (γ = 2) | true flip rate |",
             "|---|---|---|---|---|---|---|",
             f"| {len(audits)} | {cell('auroc')} | {cell('average_precision')} | {cell('precision_at_flip_rate')} "
             f"| {mean_std([a['estimated_flip_rate'] for a in audits])} "
             f"| {mean_std([a.get('holder_flip_rate', float('nan')) for a in audits])} | {cell('true_flip_rate')} |",
             "", "### Noise recovery (20% flips, mean ± std over seeds)", "",
             "| recipe | seeds | " + " | ".join(k[1] for k in KEYS)
             + " | accuracy gap won back | reward gap won back | Δ accuracy vs DPO noisy (± s.e.) |",
             "|---|---|" + "---|" * (len(KEYS) + 3)]
    clean, noisy = per_recipe["DPO, clean data"], per_recipe["DPO, 20% flips"]
    for label, results in per_recipe.items():
        cells = [mean_std([r.get(k, float("nan")) for r in results]) for k, _ in KEYS]
        won = []
        for key in ("gold/accuracy", "gold/reward"):
            gap = _mean([r[key] for r in clean]) - _mean([r[key] for r in noisy])
            won.append("–" if label.startswith("DPO,") or abs(gap) < 1e-12 else
                       f"{(_mean([r[key] for r in results]) - _mean([r[key] for r in noisy])) / gap:+.0%}")
        lines.append(f"| {label} | {len(results)} | " + " | ".join(cells + won + [paired_gain(results, noisy)])
                     + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
