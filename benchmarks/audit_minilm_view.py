"""A second view for the audit (issue 26): do sentence embeddings of the completions find the flipped pairs of the
sentiment task better than, or together with, the shipped probe on SmolLM2's own states?

For each seed's sentiment task of ``benchmarks/audit_benchmark.py --task sentiment`` (1,024 pairs, 20% flips, half
high-gap; its audit folder must exist under ``--workdir``, made by that benchmark), the pairs are ranked by:

- **MiniLM probe**: a Bradley–Terry logistic regression (scikit-learn ``LogisticRegressionCV``, 10 strengths,
  3-fold inner CV) on the difference of the completions' all-MiniLM-L6-v2 embeddings (the packaged encoder,
  mean-pooled over tokens, L2-normalised), fitted to the labels as given, cross-fitted on the audit's own folds;
- **MiniLM with gold labels**: the same fit on the gold direction of every pair (what the view gives with perfect
  supervision);
- **SmolLM2 probe**: ``adaptdpo audit --signal probe`` as shipped (its ``margin`` column);
- **both, averaged**: the mean of the two held-out margins, each standardised (label-free: no gold label and no
  fitted weight).

    .venv/bin/python benchmarks/audit_minilm_view.py --workdir runs/bench-audit --seeds 3 \
        --out docs/audit_minilm_view.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import sklearn
import torch
import transformers
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import average_precision_score, roc_auc_score
from transformers import AutoModel, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from real_model import seed_pools

from adaptdpo.files import read_jsonl
from adaptdpo.models.sources import resolve_model
from adaptdpo.tasks.sentiment.task import SentimentSpec, build_sentiment_task


def completion_text(value: object) -> str:
    return value[-1]["content"] if isinstance(value, list) else str(value)


def minilm_embeddings(texts: list[str], batch_size: int = 64) -> np.ndarray:
    path = resolve_model("all-minilm-l6-v2")
    tokenizer, encoder = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=128,
                              return_tensors="pt")
            states = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out).numpy()


def cross_fitted_margins(differences: np.ndarray, chosen_better: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Held-out Bradley–Terry margins: each fold scored by a fit on the others (pairs mirrored, no intercept)."""
    margins = np.zeros(len(differences))
    for fold in np.unique(folds):
        train, test = folds != fold, folds == fold
        x = np.concatenate([differences[train], -differences[train]])
        y = np.concatenate([chosen_better[train], 1 - chosen_better[train]])
        model = LogisticRegressionCV(Cs=10, cv=3, max_iter=2000, fit_intercept=False).fit(x, y)
        margins[test] = model.decision_function(differences[test])
    return margins


def standardised(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std()


def run_seed(seed: int, workdir: str) -> list[dict]:
    cache = os.path.join(workdir, "cache")
    seed_pools(cache)
    task = build_sentiment_task(SentimentSpec(train_pairs=1024, high_gap_fraction=0.5, flip_rate=0.2,
                                              data_seed=seed), cache)
    rows = read_jsonl(task.train_file)
    audit_path = os.path.join(workdir, f"sentiment-flips0.2-mix0.5-seed{seed}", "audit-probe", "audit.jsonl")
    if not os.path.exists(audit_path):
        raise SystemExit(f"{audit_path}: missing; run benchmarks/audit_benchmark.py --task sentiment --seeds "
                         f"{seed + 1} --workdir {workdir} first")
    audit = read_jsonl(audit_path)
    flipped = np.array([bool(r["flipped"]) for r in rows])
    folds = np.array([a["fold"] for a in audit])
    started = time.time()
    chosen = minilm_embeddings([completion_text(r["chosen"]) for r in rows])
    rejected = minilm_embeddings([completion_text(r["rejected"]) for r in rows])
    embed_s = time.time() - started
    differences = chosen - rejected
    started = time.time()
    noisy = cross_fitted_margins(differences, np.ones(len(rows)), folds)
    probe_s = time.time() - started
    gold = cross_fitted_margins(differences, np.array([float(r["gold_chosen"] >= r["gold_rejected"]) for r in rows]),
                                folds)
    shipped = np.array([a["margin"] for a in audit])
    views = {"MiniLM probe": noisy, "MiniLM with gold labels (ceiling of the view)": gold,
             "SmolLM2 probe (shipped)": shipped,
             "both, averaged (standardised margins)": standardised(noisy) + standardised(shipped)}
    return [{"seed": seed, "signal": name, "auroc": roc_auc_score(flipped, -m),
             "aupr": average_precision_score(flipped, -m), "pairs": len(rows), "true_rate": float(flipped.mean()),
             "seconds": round(embed_s + probe_s, 1) if name == "MiniLM probe" else None}
            for name, m in views.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/bench-audit")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=None)
    ns = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    results = [r for seed in range(ns.seeds) for r in run_seed(seed, ns.workdir)]
    lines = [f"Command: `python benchmarks/audit_minilm_view.py --workdir {ns.workdir} --seeds {ns.seeds}` (the "
             "workdir of `benchmarks/audit_benchmark.py --task sentiment`, whose audit folders it reads); "
             f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, transformers "
             f"{transformers.__version__}, scikit-learn {sklearn.__version__}.", "",
             "| seed | signal | AUROC | AUPR | pairs | true flip rate | seconds (embeddings + probe) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['seed']} | {r['signal']} | {r['auroc']:.3f} | {r['aupr']:.3f} | {r['pairs']} | "
                     f"{r['true_rate']:.3f} | {'' if r['seconds'] is None else r['seconds']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if ns.out:
        with open(ns.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    print(json.dumps(results), file=sys.stderr)


if __name__ == "__main__":
    main()
