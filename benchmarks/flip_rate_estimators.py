"""The audit's flip-rate readings beside the planted rate (issue 26): the noisy-label logistic estimate (the
audit's), the anchor reading (disagreeing labels among the most confident tenth) and Hölder-DPO's 1 − ξ̂ of the
calibrated margins.

Synthetic sets: pairs whose true reward is linear in d features (every pair's gap at least 0.3·|w|·|x|), a share of
the labels flipped, cross-fitted probe margins (5 folds); and a set whose features carry nothing. With
``--audit DIR`` (repeatable) also the held-out margins of finished audits whose data carried a ``flipped`` column
(their audit.jsonl: ``margin`` and ``known_bad`` per row).

    .venv/bin/python benchmarks/flip_rate_estimators.py [--audit runs/.../audit-probe] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adaptdpo.audit.probe import calibrated, cross_fitted_margins
from adaptdpo.audit.signals import anchor_flip_rate, estimate_flip_rate
from adaptdpo.methods.losses import holder_contamination


def planted(n: int, dim: int, rate: float, seed: int, carries_reward: bool = True
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=dim)
    rows: list[np.ndarray] = []
    while len(rows) < n:
        x = rng.normal(size=dim)
        gap = float(w @ x)
        if abs(gap) >= 0.3 * np.linalg.norm(w) * np.linalg.norm(x):
            rows.append(x if gap > 0 else -x)
    diffs = np.array(rows) if carries_reward else rng.normal(size=(n, dim))
    flipped = rng.random(n) < rate
    diffs[flipped] *= -1
    return diffs, np.arange(n) % 5, flipped


def readings(margins: np.ndarray) -> dict[str, float]:
    m = torch.tensor(margins, dtype=torch.float64)
    estimate = estimate_flip_rate(m, bootstrap=100, seed=0)
    anchor, interval = anchor_flip_rate(m, bootstrap=100, seed=0)
    holder = float(holder_contamination(torch.tensor(calibrated(margins)[0])))
    return {"logistic": estimate.flip_rate, "logistic_low": estimate.interval[0],
            "logistic_high": estimate.interval[1], "anchor": anchor, "anchor_low": interval[0],
            "anchor_high": interval[1], "holder": holder}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audit", action="append", default=[], help="a finished audit's folder (repeatable)")
    parser.add_argument("--out")
    ns = parser.parse_args()
    rows = []
    for rate in (0.0, 0.1, 0.2, 0.3):
        for dim, n in ((6, 600), (50, 400)):
            diffs, folds, flipped = planted(n, dim, rate, seed=3)
            rows.append((f"linear reward, {dim} features, {n} pairs", flipped.mean(),
                         readings(cross_fitted_margins(diffs, folds).margins)))
        diffs, folds, flipped = planted(400, 6, rate, seed=3, carries_reward=False)
        rows.append(("features that carry nothing, 400 pairs", flipped.mean(),
                     readings(cross_fitted_margins(diffs, folds).margins)))
    for folder in ns.audit:
        with open(os.path.join(folder, "audit.jsonl"), encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
        scored = [r for r in records if r.get("margin") is not None and "known_bad" in r]
        margins = np.array([r["margin"] for r in scored])
        rows.append((f"audit {folder}", float(np.mean([bool(r["known_bad"]) for r in scored])), readings(margins)))
    import platform

    import sklearn

    env = (f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
           f"scikit-learn {sklearn.__version__}; bootstrap: 100 resamples")
    lines = ["Measured by `python benchmarks/flip_rate_estimators.py " + " ".join(sys.argv[1:]) + f"` ({env}).", "",
             "| set | planted rate | logistic estimate (95% interval) | anchor reading (95% interval) | "
             "Hölder 1 − ξ̂ |", "|---|---|---|---|---|"]
    for name, truth, r in rows:
        lines.append(f"| {name} | {truth:.3f} | {r['logistic']:.3f} ({r['logistic_low']:.3f}–{r['logistic_high']:.3f})"
                     f" | {r['anchor']:.3f} ({r['anchor_low']:.3f}–{r['anchor_high']:.3f}) | {r['holder']:.3f} |")
    text = "\n".join(lines)
    print(text)
    if ns.out:
        with open(ns.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
