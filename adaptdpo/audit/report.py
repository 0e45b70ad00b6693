"""The audit's markdown report and plots (score histograms; ROC and precision curves with ground truth)."""

from __future__ import annotations

import os
from typing import Any

import torch

from adaptdpo.audit.ranking import precision_curve, roc_curve
from adaptdpo.audit.signals import FlipRateEstimate
from adaptdpo.training.plots import _pyplot, _save


def _excerpt(value: Any, width: int = 60) -> str:
    if isinstance(value, list):  # messages: the last turn
        value = value[-1].get("content") if value and isinstance(value[-1], dict) else str(value)
    text = " ".join(str(value or "").split())
    text = text if len(text) <= width else text[: width - 1] + "…"
    return text.replace("|", "\\|")


def plot_scores(out_dir: str, scored: dict[int, dict[str, Any]], truth: dict[int, bool] | None,
                estimate: FlipRateEstimate) -> list[str]:
    plt = _pyplot()
    ids = sorted(scored)
    margins = [scored[i]["margin"] for i in ids]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    if truth is not None:
        for flag, colour, label in ((False, "tab:blue", "not known bad"), (True, "tab:red", "known bad")):
            if not any(truth.get(i, False) == flag for i in ids):
                continue  # an empty group (e.g. clean data): nothing to draw
            axes[0].hist([m for i, m in zip(ids, margins, strict=True) if truth.get(i, False) == flag], bins=40,
                         alpha=0.6, color=colour, label=label, density=True)
            axes[1].hist([scored[i]["score"] for i in ids if truth.get(i, False) == flag], bins=20, alpha=0.6,
                         color=colour, label=label, density=True)
    else:
        axes[0].hist(margins, bins=40, alpha=0.7, density=True, label="held-out margins")
        axes[1].hist([scored[i]["score"] for i in ids], bins=20, alpha=0.7, density=True)
    lo, hi = min(margins), max(margins)
    grid = torch.linspace(lo, hi, 200, dtype=torch.float64)
    curve = axes[0].twinx()
    curve.plot(grid, estimate.flip_probability(grid), color="tab:red", lw=1.2, ls="--",
               label=f"fit: P(flip | margin), ε = {estimate.flip_rate:.3f}")
    curve.set_ylim(0, 1)
    curve.set_ylabel("P(flip | margin)")
    curve.legend(fontsize=7, loc="center right")
    axes[0].set_xlabel("held-out margin (log-odds that the label is right)")
    axes[0].set_title("cross-fitted margins")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("score = P(flipped | margin)")
    axes[1].set_title("suspicion scores")
    if truth is not None:
        axes[1].legend(fontsize=7)
    paths = [_save(fig, out_dir, "audit_scores.png")]
    if truth is not None and 0 < sum(truth.get(i, False) for i in ids) < len(ids):
        labels = [truth.get(i, False) for i in ids]
        scores = [scored[i]["score"] for i in ids]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        fpr, tpr = roc_curve(scores, labels)
        axes[0].plot(fpr, tpr)
        axes[0].plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        axes[0].set_xlabel("false-positive rate")
        axes[0].set_ylabel("true-positive rate")
        axes[0].set_title("ROC (known-bad pairs)")
        flagged, precision = precision_curve(scores, labels)
        axes[1].plot(flagged, precision)
        axes[1].axhline(sum(labels) / len(labels), color="grey", lw=0.8, ls=":", label="base rate")
        axes[1].axvline(sum(labels) / len(labels), color="tab:red", lw=0.8, ls="--", label="true flip rate")
        axes[1].set_xlabel("share of pairs flagged (highest scores first)")
        axes[1].set_ylabel("precision")
        axes[1].set_title("precision of the flagged pairs")
        axes[1].legend(fontsize=7)
        for ax in axes:
            ax.grid(alpha=0.3)
        paths.append(_save(fig, out_dir, "audit_roc_precision.png"))
    return paths


def write_report(out_dir: str, summary: dict[str, Any], scored: dict[int, dict[str, Any]],
                 truth: dict[int, bool] | None, rows: dict[int, dict[str, Any]], estimate: FlipRateEstimate,
                 top: int = 20) -> str:
    plots = plot_scores(out_dir, scored, truth, estimate)
    by = {"probe": f"a Bradley–Terry reward probe on the frozen features of {summary['model']}",
          "dpo_folds": f"a DPO model, β = {summary['beta']}, trained from {summary['model']}",
          "probe+dpo_folds": f"a reward probe on {summary['model']}'s features and a DPO fold model, combined"}
    low, high = summary["flip_rate_interval"]
    warnings = summary.get("warnings") or []
    lines = [f"# Preference-data audit: {summary['data']}", ""]
    if warnings:
        lines += ["## Warnings", "", *[f"- **{w}**" for w in warnings], ""]
    if summary.get("identification_note"):
        lines += [f"Note: {summary['identification_note']}.", ""]
    lines += [f"{summary['scored_pairs']} of {summary['rows']} rows scored by {summary['folds']}-fold cross-fitting "
              f"(signal `{summary['signal']}`: each pair scored by {by.get(summary['signal'], summary['signal'])}, "
              "fitted on the other folds; it never saw the pair). Score = estimated probability that the pair's "
              "label is flipped (higher = more suspect). Rows: 0-based indices in the input file.", "",
              "| quantity | value |", "|---|---|",
              f"| estimated flip rate (noisy-label logistic fit of the margins) | {summary['estimated_flip_rate']:.3f} "
              f"(95% interval {low:.3f}–{high:.3f}; {summary['estimated_flip_count']} pairs) |",
              *([f"| disagreeing labels among the most confident tenth (anchor reading) | "
                 f"{summary['anchor_flip_rate']:.3f} (95% interval {summary['anchor_flip_rate_interval'][0]:.3f}–"
                 f"{summary['anchor_flip_rate_interval'][1]:.3f}) |"] if "anchor_flip_rate" in summary else []),
              *([f"| estimated flip rate (Hölder-DPO's 1 − ξ̂ of the margins, γ = {summary['holder_gamma']}) | "
                 f"{summary['holder_flip_rate']:.3f} |"] if "holder_flip_rate" in summary else []),
              f"| held-out pairs whose margin agrees with their label | {summary['heldout_accuracy_of_labels']:.3f} "
              f"(p = {summary['chance_p_value']:.2g} against a coin) |",
              f"| mean held-out loss (Selective DPO's difficulty) | {summary['mean_validation_loss']:.4f} |",
             f"| rows not scored (invalid, see audit.jsonl) | {summary['unscored_rows']} |"]
    gt = summary.get("ground_truth")
    if gt:
        lines += [f"| known-bad pairs (ground truth) | {gt['known_bad_pairs']} ({gt['true_flip_rate']:.1%}) |"]
        for key, label in (("auroc", "AUROC of the score for known-bad pairs"),
                           ("average_precision", "average precision"),
                           ("precision_at_flip_rate", "precision of the top k = number of known-bad pairs"),
                           ("precision_at_estimated_rate", "precision of the top estimated-flip-rate share"),
                           ("cleaned_share_known_bad", "share of known-bad among the dropped/swapped pairs")):
            if key in gt:
                lines.append(f"| {label} | {gt[key]:.3f} |")
    counts = summary["cleaned_counts"]
    held_back = summary.get("cleaning", {}).get("held_back")
    lines += ["", f"Cleaned data (`cleaned.jsonl`, --clean {summary['clean']}): {counts['kept']} rows kept, "
              f"{counts['swapped']} swapped, {counts['dropped']} dropped, {counts['unscored']} unscored rows left out."
              + (f" Held back by {held_back}." if held_back else ""),
              "", *[f"![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in plots], "",
              f"## The {top} most suspect pairs", "",
              "| rank | row | score | margin | prompt | chosen | rejected |" + (" known bad |" if truth else ""),
              "|---|---|---|---|---|---|---|" + ("---|" if truth else "")]
    for i in sorted(scored, key=lambda i: scored[i]["suspect_rank"])[:top]:
        s, row = scored[i], rows[i]
        cells = [str(s["suspect_rank"]), str(i), f"{s['score']:.3f}", f"{s['margin']:+.3f}",
                 *(_excerpt(row.get(k)) for k in ("prompt", "chosen", "rejected"))]
        if truth:
            cells.append("yes" if truth.get(i) else "no")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Every row's signals: `audit.jsonl` (`row`, `score`, `flip_probability`, `weight`, `margin`, "
              "`validation_loss`, `reference_logratio`, the signal's own columns, `fold`, `suspect_rank`, `action`). "
              "Train Selective DPO on this audit: `adaptdpo train ... --pair_selection easiest --pair_scores_file "
              f"{os.path.join(out_dir, 'audit.jsonl')}`.", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    return path
