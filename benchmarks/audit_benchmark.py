"""The audit beside its oracle (issue 26): how well each signal finds the flipped pairs of a gold toy task.

For each toy task (flip rate × high-gap share × seed; the task records which labels it flipped in its ``flipped``
column and the gold reward of each completion), the pairs are ranked by:

- **oracle**: the true gold reward difference of the labels as given (what perfect knowledge of the reward gives);
- **learned ceiling**: the toy reward's own function class, r(x, y) = mean over the words w of y of
  q_w + ⟨v_w, u(x)⟩ with u(x) the normalised mean of v over the prompt's words (q and v free), fitted by
  Bradley–Terry maximum likelihood (L-BFGS, a fixed small L2 penalty) to the same noisy labels, cross-fitted on the
  audit's own folds, ranked by its held-out margin: what a learner that knows the form of the reward could extract
  from these labels alone (a nonconvex fit from one seeded start: a lower bound of that ceiling);
- **probe**: ``adaptdpo audit`` as shipped (``--signal probe``, every default);
- **DPO folds** (``--dpo_folds``): the audit before issue 26 (5 DPO models from the reference, learning rate 3e-3
  as benchmarks/noise_recovery.py).

On the sentiment task (``--task sentiment``: SmolLM2-135M-Instruct's own completions, judged by VADER; 1,024
training pairs, half high-gap, the evidence profile's task, drawn with each seed) the same table, with two ceilings
fitted on the audit's folds:

- **learned ceiling**: VADER's own function class (a lexicon: a valence per word, summed over the completion's
  words, with rules for negation and emphasis that a linear model on word counts approximates), a Bradley–Terry
  logistic regression on the pair's word-count differences, fitted to the same noisy labels, cross-fitted;
- **feature ceiling**: the shipped probe's features with the *gold* labels: each feature set cross-fitted on the
  gold direction of every pair, the best by held-out likelihood of the gold labels: what these features give with
  perfect supervision (so the gap between it and the probe is what the noise costs, and between it and the oracle
  what the features lack).

On HH (``--task hh``: the shipped Anthropic split, the first 1,024 rows, a seeded share of the labels swapped
on purpose) there is no gold reward: the planted flips are the truth, and no ceiling is drawn.

    .venv/bin/python benchmarks/audit_benchmark.py --flip_rates 0.2 --seeds 1 [--dpo_folds] [--out FILE.md]
    .venv/bin/python benchmarks/audit_benchmark.py --task sentiment --flip_rates 0.2 --seeds 3 --out FILE.md
    .venv/bin/python benchmarks/audit_benchmark.py --task hh --flip_rates 0.2 --seeds 1 --out FILE.md

Each setting's audit folder is kept under ``--workdir``: a rerun reads the features back (``features.pt``) and
redoes only the probes. Peak memory (the process's maximum resident set) is printed beside the seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adaptdpo.audit.ranking import auroc, average_precision, precision_at
from adaptdpo.audit.run import AuditOptions, run_audit
from adaptdpo.tasks.experiment import gold_train_arguments
from adaptdpo.tasks.toy.task import ToySpec, build_task

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


def audit_margins(task: Any, workdir: str, signal: str, seed: int, training: dict[str, Any] | None = None
                  ) -> tuple[np.ndarray, dict[str, Any], float]:
    out = os.path.join(workdir, f"audit-{signal}")
    overrides: dict[str, Any] = {"seed": seed, "plots": False, **(training if training is not None else
                                                                  DPO_FOLD_TRAINING if signal == "dpo_folds" else {})}
    started = time.time()
    summary = run_audit(AuditOptions(data=task.train_file, output_dir=out, folds=FOLDS, fold_seed=seed,
                                     signal=signal, clean="none"), gold_train_arguments(task, overrides))
    seconds = time.time() - started
    records = [r for r in rows_of(os.path.join(out, "audit.jsonl")) if r.get("score") is not None]
    return np.array([r["margin"] for r in records]), summary, seconds


def toy_learned_margins(task: Any, rows: list[dict[str, Any]], folds: list[int], penalty: float = 1e-3
                        ) -> np.ndarray:
    """Cross-fitted held-out margins of the toy reward's own function class fitted to the labels as given."""
    import torch

    language = task.language
    index = language.index
    vocab, dim = len(index), int(language.vectors.shape[1])

    def bag(words: list[str], denominator: int) -> list[float]:
        out = [0.0] * vocab
        for w in words:
            if w in index:
                out[index[w]] += 1.0 / max(1, denominator)
        return out

    def response_bag(text: str) -> list[float]:
        words = text.split()
        return bag(words, len(words))

    prompt_bags = torch.tensor([bag(language.prompt_words_of(r["prompt"]), 1) for r in rows], dtype=torch.float64)
    chosen = torch.tensor([response_bag(r["chosen"]) for r in rows], dtype=torch.float64)
    rejected = torch.tensor([response_bag(r["rejected"]) for r in rows], dtype=torch.float64)
    fold_of = torch.tensor(folds)
    margins = torch.zeros(len(rows), dtype=torch.float64)

    def margin(q: torch.Tensor, v: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        u = prompt_bags[sel] @ v
        u = u / u.norm(dim=1, keepdim=True).clamp(min=1e-12)
        diff = chosen[sel] - rejected[sel]
        return diff @ q + ((diff @ v) * u).sum(dim=1)

    for k in sorted(set(folds)):
        train, held = fold_of != k, fold_of == k
        g = torch.Generator().manual_seed(k)
        q = (0.1 * torch.randn(vocab, generator=g, dtype=torch.float64)).requires_grad_()
        v = torch.randn(vocab, dim, generator=g, dtype=torch.float64).requires_grad_()
        optimizer = torch.optim.LBFGS([q, v], max_iter=300, line_search_fn="strong_wolfe")

        def closure(q: torch.Tensor = q, v: torch.Tensor = v, optimizer: Any = optimizer,
                    train: torch.Tensor = train) -> torch.Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.softplus(-margin(q, v, train)).mean() + penalty * (q.square().sum()
                                                                                         + v.square().sum())
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            margins[held] = margin(q, v, held)
    return margins.numpy()


def run_setting(rate: float, mix: float, seed: int, root: str, with_dpo: bool) -> list[dict[str, Any]]:
    spec = ToySpec(seed=seed, flip_rate=rate, high_gap_fraction=mix)
    task = build_task(spec, os.path.join(root, "gold-cache"))
    rows = rows_of(task.train_file)
    flipped = np.array([bool(r["flipped"]) for r in rows])
    workdir = os.path.join(root, f"flips{rate}-mix{mix}-seed{seed}")
    results = []
    oracle = np.array([r["gold_chosen"] - r["gold_rejected"] for r in rows], dtype=np.float64)
    results.append({"signal": "oracle", **metrics(oracle, flipped, int(flipped.sum()))})
    for signal in ("probe", *(("dpo_folds",) if with_dpo else ())):
        margins, summary, seconds = audit_margins(task, workdir, signal, seed)
        if signal == "probe":  # the learned ceiling on the probe audit's own folds
            with open(os.path.join(workdir, "audit-probe", "folds.json"), encoding="utf-8") as fh:
                assignment = {int(k): v for k, v in json.load(fh)["assignment"].items()}
            started = time.time()
            learned = toy_learned_margins(task, rows, [assignment[i] for i in range(len(rows))])
            results.append({"signal": "learned ceiling", **metrics(learned, flipped, int(flipped.sum())),
                            "seconds": round(time.time() - started, 1)})
        results.append({"signal": signal, **metrics(margins, flipped, summary["estimated_flip_count"]),
                        "estimate": summary["estimated_flip_rate"], "interval": summary["flip_rate_interval"],
                        "anchor": summary.get("anchor_flip_rate"),
                        "warnings": len(summary["warnings"]), "seconds": round(seconds, 1)})
    for r in results:
        r.update({"flip_rate": rate, "high_gap": mix, "seed": seed, "pairs": len(rows),
                  "true_rate": float(flipped.mean())})
    return results


def peak_memory_gib() -> float:
    """The process's maximum resident set so far (GiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def audit_row(signal: str, margins: np.ndarray, flipped: np.ndarray, summary: dict[str, Any], seconds: float
              ) -> dict[str, Any]:
    """One shipped audit's row of the table (the real-model settings): its ranking, estimate, anchor reading, warnings,
    seconds and the process's peak memory so far."""
    return {"signal": signal, **metrics(margins, flipped, summary["estimated_flip_count"]),
            "estimate": summary["estimated_flip_rate"], "interval": summary["flip_rate_interval"],
            "anchor": summary.get("anchor_flip_rate"), "warnings": len(summary["warnings"]),
            "seconds": round(seconds, 1), "peak_gib": round(peak_memory_gib(), 2)}


def fold_assignment(audit_dir: str, n: int) -> list[int]:
    with open(os.path.join(audit_dir, "folds.json"), encoding="utf-8") as fh:
        assignment = {int(k): v for k, v in json.load(fh)["assignment"].items()}
    return [assignment[i] for i in range(n)]


def _completion_text(value: Any) -> str:
    return value if isinstance(value, str) else " ".join(m["content"] for m in value if m.get("role") == "assistant")


def word_count_margins(rows: list[dict[str, Any]], folds: list[int]) -> np.ndarray:
    """The lexicon judge's function class: Bradley–Terry on word-count differences (lowercased words), noisy
    labels as given, cross-fitted on ``folds`` (the learned ceiling of the sentiment task)."""
    from adaptdpo.audit.probe import cross_fitted_margins

    def words(text: str) -> list[str]:
        return re.findall(r"[a-z']+", text.lower())

    index: dict[str, int] = {}
    for r in rows:
        for key in ("chosen", "rejected"):
            for w in words(_completion_text(r[key])):
                index.setdefault(w, len(index))
    diffs = np.zeros((len(rows), len(index)))
    for i, r in enumerate(rows):
        for key, sign in (("chosen", 1.0), ("rejected", -1.0)):
            for w in words(_completion_text(r[key])):
                diffs[i, index[w]] += sign
    return cross_fitted_margins(diffs, np.array(folds)).margins


def gold_feature_margins(audit_dir: str, rows: list[dict[str, Any]], folds: list[int]) -> tuple[np.ndarray, str]:
    """The feature ceiling: each of the audit's feature sets cross-fitted on the gold direction of every pair,
    margins for the labels as given; the set with the best held-out gold log-likelihood, and its name."""
    import torch

    from adaptdpo.audit.probe import cross_fitted_margins, log_likelihood

    cached = torch.load(os.path.join(audit_dir, "features.pt"), weights_only=True)
    agree = np.array([r["gold_chosen"] > r["gold_rejected"] for r in rows])
    sign = np.where(agree, 1.0, -1.0)
    best: tuple[float, np.ndarray, str] | None = None
    for name in cached["chosen"]:
        diffs = (cached["chosen"][name].double() - cached["rejected"][name].double()).numpy()
        margins = cross_fitted_margins(diffs, np.array(folds), labels=agree).margins * sign  # as given
        score = log_likelihood(margins * sign)  # against the gold labels
        if best is None or score > best[0]:
            best = (score, margins, name)
    assert best is not None
    return best[1], best[2]


def sentiment_training(workdir: str) -> dict[str, Any]:
    """The evidence profile's training settings (top 4 blocks over the shared prefix cache, bf16): the reference's
    dtype for the features, and the fold models of ``--dpo_folds``."""
    from real_model import PROFILES, with_cache_dir

    return with_cache_dir(dict(PROFILES["cpu-topk"]["train"]), workdir)


def run_sentiment_setting(rate: float, mix: float, seed: int, root: str, with_dpo: bool) -> list[dict[str, Any]]:
    from real_model import seed_pools

    from adaptdpo.tasks.sentiment.task import SentimentSpec, build_sentiment_task

    cache = os.path.join(root, "cache")
    seed_pools(cache)
    task = build_sentiment_task(SentimentSpec(train_pairs=1024, high_gap_fraction=mix, flip_rate=rate,
                                              data_seed=seed), cache)
    rows = rows_of(task.train_file)
    flipped = np.array([bool(r["flipped"]) for r in rows])
    workdir = os.path.join(root, f"sentiment-flips{rate}-mix{mix}-seed{seed}")
    training = sentiment_training(root)
    results = [{"signal": "oracle", **metrics(np.array([r["gold_chosen"] - r["gold_rejected"] for r in rows]),
                                              flipped, int(flipped.sum()))}]
    for signal in ("probe", *(("dpo_folds",) if with_dpo else ())):
        margins, summary, seconds = audit_margins(task, workdir, signal, seed, training)
        if signal == "probe":
            audit_dir = os.path.join(workdir, "audit-probe")
            folds = fold_assignment(audit_dir, len(rows))
            started = time.time()
            learned = word_count_margins(rows, folds)
            results.append({"signal": "learned ceiling (word counts)", **metrics(learned, flipped, int(flipped.sum())),
                            "seconds": round(time.time() - started, 1)})
            started = time.time()
            gold_margins, name = gold_feature_margins(audit_dir, rows, folds)
            results.append({"signal": f"feature ceiling ({name}, gold labels)",
                            **metrics(gold_margins, flipped, int(flipped.sum())),
                            "seconds": round(time.time() - started, 1)})
        results.append(audit_row(signal, margins, flipped, summary, seconds))
    for r in results:
        r.update({"flip_rate": rate, "high_gap": mix, "seed": seed, "pairs": len(rows),
                  "true_rate": float(flipped.mean())})
    return results


class _FileTask:
    """A training file as the audit helpers want a task: its path and the reference."""

    def __init__(self, train_file: str, reference: str, defaults: dict[str, Any]):
        self.train_file, self.reference_dir, self._defaults = train_file, reference, defaults

    def train_defaults(self) -> dict[str, Any]:
        return dict(self._defaults)


def run_hh_setting(rate: float, seed: int, root: str, with_dpo: bool) -> list[dict[str, Any]]:
    from real_model import PROFILES, hh_files

    from adaptdpo.tasks.sentiment.task import SENTIMENT_TRAIN_DEFAULTS

    profile = {"hh": {"train_rows": 1024, "eval_rows": 1}}
    train_path, _, flipped_ids = hh_files(profile, rate, seed, os.path.join(root, "hh-data"))
    rows = rows_of(train_path)
    flipped = np.array([i in flipped_ids for i in range(len(rows))])
    hh_train = {k: v for k, v in PROFILES["cpu-topk"]["hh_train"].items() if k != "shared_prefix_cache"}
    task = _FileTask(train_path, "smollm2-135m-instruct", {**SENTIMENT_TRAIN_DEFAULTS, "chat_format": "auto",
                                                            **hh_train})
    workdir = os.path.join(root, f"hh-flips{rate}-seed{seed}")
    results = []
    for signal in ("probe", *(("dpo_folds",) if with_dpo else ())):
        margins, summary, seconds = audit_margins(task, workdir, signal, seed, {} if signal == "probe" else
                                                  {"learning_rate": 3e-5})
        results.append(audit_row(signal, margins, flipped, summary, seconds))
    for r in results:
        r.update({"flip_rate": rate, "high_gap": float("nan"), "seed": seed, "pairs": len(rows),
                  "true_rate": float(flipped.mean())})
    return results


def table(results: list[dict[str, Any]], command: str) -> str:
    lines = [f"Measured by `{command}`.", "",
             "| flips (true) | high-gap share | seed | pairs | signal | AUROC | AUPR "
             "| precision at k̂ (oracle, ceiling: k) | "
             "estimated flip rate (95% interval) | anchor reading | warnings | s | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        estimate = (f"{r['estimate']:.3f} ({r['interval'][0]:.3f}–{r['interval'][1]:.3f})" if "estimate" in r
                    else "")
        mix = "" if r["high_gap"] != r["high_gap"] else f"{r['high_gap']:.0%}"  # NaN: no gap groups (HH)
        precision = (f"{r['precision_at_estimate']:.3f}" if "precision_at_estimate" in r
                     else "– (k̂ = 0)" if "estimate" in r else "")
        lines.append(f"| {r['flip_rate']:.0%} ({r['true_rate']:.3f}) | {mix} | {r['seed']} | "
                     f"{r['pairs']} | {r['signal']} | {r['auroc']:.3f} | {r['aupr']:.3f} | "
                     f"{precision} | {estimate} | "
                     f"{'' if r.get('anchor') is None else format(r['anchor'], '.3f')} | {r.get('warnings', '')} | "
                     f"{r.get('seconds', '')} | {r.get('peak_gib', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=("toy", "sentiment", "hh"), default="toy")
    parser.add_argument("--flip_rates", default="0.1,0.2,0.3,0.4")
    parser.add_argument("--high_gap", default="0.5")
    parser.add_argument("--seeds", type=int, default=3, help="task seeds 1..N (toy: seed 0 is the tuned default "
                        "task; sentiment and HH: seeds 0..N-1, the evidence runs' data seeds)")
    parser.add_argument("--dpo_folds", action="store_true", help="also the DPO-fold audit (K trainings each)")
    parser.add_argument("--workdir", default="runs/bench-audit")
    parser.add_argument("--out", help="write the table to this markdown file")
    ns = parser.parse_args()
    logging.disable(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    results = []
    for rate in (float(v) for v in ns.flip_rates.split(",")):
        for mix in (float(v) for v in ns.high_gap.split(",")) if ns.task != "hh" else (float("nan"),):
            for seed in range(1, ns.seeds + 1) if ns.task == "toy" else range(ns.seeds):
                if ns.task == "toy":
                    new = run_setting(rate, mix, seed, ns.workdir, ns.dpo_folds)
                elif ns.task == "sentiment":
                    new = run_sentiment_setting(rate, mix, seed, ns.workdir, ns.dpo_folds)
                else:
                    new = run_hh_setting(rate, seed, ns.workdir, ns.dpo_folds)
                results += new
                print(table(new, "(partial)"), flush=True)
    text = table(results, "python benchmarks/audit_benchmark.py " + " ".join(sys.argv[1:]))
    print(text)
    if ns.out:
        with open(ns.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
