"""The audit beside its oracle (issue 26): how well each signal finds the flipped pairs of a gold toy task.

For each toy task (flip rate × high-gap share × seed; the task records which labels it flipped in its ``flipped``
column and the gold reward of each completion), the pairs are ranked by:

- **oracle**: the true gold reward difference of the labels as given (what perfect knowledge of the reward gives);
- **probe**: ``adaptdpo audit`` as shipped (``--signal probe``, every default);
- **DPO folds** (``--dpo_folds``): the audit before issue 26 (5 DPO models from the reference, learning rate 3e-3
  as benchmarks/noise_recovery.py).

Printed per setting: AUROC for the flipped pairs, average precision, precision at the estimated flip count, the
estimated flip rate with its interval, and the signal's wall time. Not done yet (issue 26): the **learned ceiling**
(the reward's own function class fitted to the same noisy labels, cross-fitted) and the sentiment task on
SmolLM2.

    .venv/bin/python benchmarks/audit_benchmark.py --flip_rates 0.2 --seeds 1 [--dpo_folds] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adaptdpo.audit.ranking import auroc, average_precision, precision_at
from adaptdpo.audit.run import AuditOptions, run_audit
from adaptdpo.tasks.experiment import gold_train_arguments
from adaptdpo.tasks.toy.task import TaskSpec, build_task

FOLDS = 5
DPO_FOLD_TRAINING = {"learning_rate": 3e-3}


def rows_of(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def metrics(margins: np.ndarray, flipped: np.ndarray, estimated_count: int | None) -> dict[str, float]:
    """Ranking by −margin (higher = more suspect)."""
    out = {"auroc": auroc(-margins, flipped), "aupr": average_precision(-margins, flipped)}
    if estimated_count:
        out["precision_at_estimate"] = precision_at(-margins, flipped, min(len(margins), estimated_count))
    return out


def audit_margins(task: Any, workdir: str, signal: str, seed: int) -> tuple[np.ndarray, dict[str, Any], float]:
    out = os.path.join(workdir, f"audit-{signal}")
    overrides: dict[str, Any] = {"seed": seed, "plots": False, **(DPO_FOLD_TRAINING if signal == "dpo_folds" else {})}
    started = time.time()
    summary = run_audit(AuditOptions(data=task.train_file, output_dir=out, folds=FOLDS, fold_seed=seed,
                                     signal=signal, clean="none"), gold_train_arguments(task, overrides))
    seconds = time.time() - started
    records = [r for r in rows_of(os.path.join(out, "audit.jsonl")) if r.get("score") is not None]
    return np.array([r["margin"] for r in records]), summary, seconds


def run_setting(rate: float, mix: float, seed: int, root: str, with_dpo: bool) -> list[dict[str, Any]]:
    spec = TaskSpec(seed=seed, flip_rate=rate, high_gap_fraction=mix)
    task = build_task(spec, os.path.join(root, "gold-cache"))
    rows = rows_of(task.train_file)
    flipped = np.array([bool(r["flipped"]) for r in rows])
    workdir = os.path.join(root, f"flips{rate}-mix{mix}-seed{seed}")
    results = []
    oracle = np.array([r["gold_chosen"] - r["gold_rejected"] for r in rows], dtype=np.float64)
    results.append({"signal": "oracle", **metrics(oracle, flipped, int(flipped.sum()))})
    for signal in ("probe", *(("dpo_folds",) if with_dpo else ())):
        margins, summary, seconds = audit_margins(task, workdir, signal, seed)
        results.append({"signal": signal, **metrics(margins, flipped, summary["estimated_flip_count"]),
                        "estimate": summary["estimated_flip_rate"], "interval": summary["flip_rate_interval"],
                        "warnings": len(summary["warnings"]), "seconds": round(seconds, 1)})
    for r in results:
        r.update({"flip_rate": rate, "high_gap": mix, "seed": seed, "pairs": len(rows),
                  "true_rate": float(flipped.mean())})
    return results


def table(results: list[dict[str, Any]], command: str) -> str:
    lines = [f"Measured by `{command}`.", "",
             "| flips (true) | high-gap share | seed | pairs | signal | AUROC | AUPR | precision at k̂ | "
             "estimated flip rate (95% interval) | warnings | s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        estimate = (f"{r['estimate']:.3f} ({r['interval'][0]:.3f}–{r['interval'][1]:.3f})" if "estimate" in r
                    else "")
        lines.append(f"| {r['flip_rate']:.0%} ({r['true_rate']:.3f}) | {r['high_gap']:.0%} | {r['seed']} | "
                     f"{r['pairs']} | {r['signal']} | {r['auroc']:.3f} | {r['aupr']:.3f} | "
                     f"{r.get('precision_at_estimate', float('nan')):.3f} | {estimate} | {r.get('warnings', '')} | "
                     f"{r.get('seconds', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flip_rates", default="0.1,0.2,0.3,0.4")
    parser.add_argument("--high_gap", default="0.5")
    parser.add_argument("--seeds", type=int, default=3, help="task seeds 1..N (seed 0 is the tuned default task)")
    parser.add_argument("--dpo_folds", action="store_true", help="also the DPO-fold audit (K trainings each)")
    parser.add_argument("--workdir", default="runs/bench-audit")
    parser.add_argument("--out", help="write the table to this markdown file")
    ns = parser.parse_args()
    logging.disable(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    results = []
    for rate in (float(v) for v in ns.flip_rates.split(",")):
        for mix in (float(v) for v in ns.high_gap.split(",")):
            for seed in range(1, ns.seeds + 1):
                results += run_setting(rate, mix, seed, ns.workdir, ns.dpo_folds)
                print(table(results[-(3 if ns.dpo_folds else 2):], "(partial)"), flush=True)
    text = table(results, "python benchmarks/audit_benchmark.py " + " ".join(sys.argv[1:]))
    print(text)
    if ns.out:
        with open(ns.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
