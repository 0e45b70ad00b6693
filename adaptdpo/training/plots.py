"""Plots of a run directory's metrics.jsonl (PNG files under <run_dir>/plots)."""

from __future__ import annotations

import itertools
import os
from typing import Any

from adaptdpo.training.run_dir import PAIR_TRACE_FILE, read_jsonl, read_metrics

PANELS = (
    ("loss", ("loss", "eval_loss", "sft/nll")),
    ("rewards/accuracies", ("rewards/accuracies", "eval_rewards/accuracies")),
    ("rewards/margins", ("rewards/margins", "eval_rewards/margins")),
    ("rewards", ("rewards/chosen", "rewards/rejected")),
    ("logps", ("logps/chosen", "logps/rejected")),
)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, run_dir: str, name: str) -> str:
    """Lay out, write <run_dir>/plots/<name>, close the figure; return the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training_curves(run_dir: str) -> str | None:
    """One figure of the standard DPO curves; returns its path (None when nothing was logged)."""
    records = read_metrics(run_dir)
    if not records:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (title, keys) in zip(axes, PANELS, strict=True):
        for key in keys:
            steps, values = _series(records, key)
            if steps:
                ax.plot(steps, values, marker="." if len(steps) < 40 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if title == "rewards/accuracies":
            ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        if any(not line.get_label().startswith("_") for line in ax.lines):
            ax.legend(fontsize=7)
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    return _save(fig, run_dir, "training_curves.png")


def read_trace(run_dir: str) -> list[dict[str, Any]]:
    return read_jsonl(run_dir, PAIR_TRACE_FILE)


def plot_margin_distributions(run_dir: str, bins: int = 8) -> str | None:
    """Margins M = β0·h over training (the paper's Fig. 3), trained vs dropped pairs, as split violins."""
    trace = read_trace(run_dir)
    if not trace:
        return None
    plt = _pyplot()
    last_step = max(t["step"] for t in trace)
    edges = [1 + round(i * last_step / bins) for i in range(bins + 1)]
    groups: list[tuple[list[float], list[float], str]] = []
    for lo, hi in itertools.pairwise(edges):
        kept: list[float] = []
        dropped: list[float] = []
        for t in trace:
            if lo <= t["step"] < hi or (hi == edges[-1] and t["step"] == last_step):
                for m, used in zip(t["margin"], t["trained"], strict=True):
                    (kept if used else dropped).append(m)
        if kept:
            groups.append((kept, dropped, f"{lo}-{max(lo, min(hi - 1, last_step))}"))
    fig, ax = plt.subplots(figsize=(1.1 * len(groups) + 3, 3.6))
    positions = list(range(len(groups)))
    parts = ax.violinplot([g[0] for g in groups], positions, side="low", showmedians=True, widths=0.9)
    for body in parts["bodies"]:
        body.set_facecolor("tab:blue")
        body.set_alpha(0.6)
    with_dropped = [(p, g[1]) for p, g in zip(positions, groups, strict=True) if len(g[1]) > 1]
    if with_dropped:
        parts = ax.violinplot([d for _, d in with_dropped], [p for p, _ in with_dropped], side="high",
                              showmedians=True, widths=0.9)
        for body in parts["bodies"]:
            body.set_facecolor("tab:red")
            body.set_alpha(0.6)
    ax.set_xticks(positions, [g[2] for g in groups], fontsize=7, rotation=30)
    ax.set_xlabel("training steps")
    ax.set_ylabel("margin M = β0·h")
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="tab:blue", alpha=0.6, label="trained"),
                       Patch(color="tab:red", alpha=0.6, label="dropped")], fontsize=7, loc="upper left")
    ax.set_title("margin distribution over training")
    ax.grid(alpha=0.3)
    return _save(fig, run_dir, "margins.png")


def plot_beta_dpo(run_dir: str) -> str | None:
    """β_batch / β0, M0 with a ±σ band, and the kept fraction over training (β-DPO runs)."""
    records = [r for r in read_metrics(run_dir) if "beta/batch" in r]
    if not records:
        return None
    plt = _pyplot()
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    axes[0].plot(steps, [r["beta/batch"] for r in records], label="β used (batch)")
    if "beta/min" in records[0]:
        axes[0].fill_between(steps, [r["beta/min"] for r in records], [r["beta/max"] for r in records],
                             alpha=0.2, label="per-pair range")
    base = _base_beta(run_dir)
    if base is not None:
        axes[0].axhline(base, color="grey", ls=":", lw=1, label="β0")
    axes[0].set_title("β")
    m0 = [r["beta/m0"] for r in records]
    sigma = [r["beta/sigma"] for r in records]
    axes[1].plot(steps, m0, label="M0")
    axes[1].fill_between(steps, [a - b for a, b in zip(m0, sigma, strict=True)],
                         [a + b for a, b in zip(m0, sigma, strict=True)], alpha=0.2, label="M0 ± σ")
    axes[1].plot(steps, [a + r["beta/kept_margin_minus_m0"] for a, r in zip(m0, records, strict=True)],
                 lw=0.8, label="mean kept M")
    axes[1].set_title("moving averages of the margin")
    axes[2].plot(steps, [r["filter/kept_fraction"] for r in records])
    axes[2].set_ylim(0, 1.05)
    axes[2].set_title("filter/kept_fraction")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(ax.lines) > 1:
            ax.legend(fontsize=7)
    return _save(fig, run_dir, "beta_dpo.png")


def plot_sams(run_dir: str) -> str | None:
    """SamS runs: scheduler losses, batch reward, and the margins of selected vs unselected pairs."""
    records = [r for r in read_metrics(run_dir) if "sams/selected_fraction" in r]
    if not records:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    panels = ((axes[0], ("sams/exploit_loss", "sams/explore_loss"), "scheduler losses"),
              (axes[1], ("sams/batch_reward",), "batch reward r_B"),
              (axes[2], ("sams/selected_margin", "sams/unselected_margin"), "margin M = β0·h"))
    for ax, keys, title in panels:
        for key in keys:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], label=key.split("/")[1])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(ax.lines) > 1:
            ax.legend(fontsize=7)
    axes[1].axhline(0.0, color="grey", lw=0.8, ls=":")
    return _save(fig, run_dir, "sams.png")


def _base_beta(run_dir: str) -> float | None:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return None
    import yaml

    with open(path, encoding="utf-8") as fh:
        return float(yaml.safe_load(fh).get("beta", 0.1))


def plot_run(run_dir: str) -> list[str]:
    """Every plot that applies to the run; returns their paths."""
    made = [plot_training_curves(run_dir), plot_margin_distributions(run_dir), plot_beta_dpo(run_dir),
            plot_sams(run_dir)]
    return [p for p in made if p]


def plot_comparison(out_dir: str, results: dict[str, dict[str, Any]], reference_reward: float) -> list[str]:
    """The demo's figures: gold metrics per method, reward vs KL, β trajectories, flipped-pair selection."""
    plt = _pyplot()
    names = list(results)
    colors = [f"C{i}" for i in range(len(names))]
    paths = []
    # 1. the gold metrics per method
    panels = [("gold/accuracy", "held-out accuracy (gold labels)", 0.5), ("gold/win_rate", "gold win rate vs reference",
                                                                           0.5),
              ("gold/reward", "mean gold reward of samples", reference_reward), ("kl", "KL(π‖π_ref)", 0.0)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title, baseline) in zip(axes, panels, strict=True):
        ax.bar(names, [results[n][key] for n in names], color=colors)
        ax.axhline(baseline, color="grey", lw=0.8, ls=":")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    paths.append(_save(fig, out_dir, "gold_metrics.png"))
    # 2. reward vs KL
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for n, c in zip(names, colors, strict=True):
        ax.scatter(results[n]["kl"], results[n]["gold/reward"], color=c, label=n)
    ax.scatter(0, reference_reward, color="black", marker="x", label="reference")
    ax.set_xlabel("KL(π‖π_ref)")
    ax.set_ylabel("mean gold reward")
    ax.set_title("gold reward vs KL", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir, "reward_vs_kl.png"))
    # 3. β trajectories and 4. selection of flipped vs clean pairs
    fig, (ax_beta, ax_sel) = plt.subplots(1, 2, figsize=(9, 3.2))
    for n, c in zip(names, colors, strict=True):
        steps, betas = _series(read_metrics(os.path.join(out_dir, n)), "beta/batch")
        if steps:
            ax_beta.plot(steps, betas, color=c, label=n)
    ax_beta.set_title("β per batch (β-DPO)", fontsize=9)
    ax_beta.set_xlabel("step")
    ax_beta.grid(alpha=0.3)
    if ax_beta.lines:
        ax_beta.legend(fontsize=7)
    width = 0.38
    xs = range(len(names))
    ax_sel.bar([x - width / 2 for x in xs], [results[n]["flipped_trained_fraction"] for n in names], width,
               label="flipped pairs", color="C3")
    ax_sel.bar([x + width / 2 for x in xs], [results[n]["clean_trained_fraction"] for n in names], width,
               label="clean pairs", color="C2")
    ax_sel.set_xticks(list(xs), names, rotation=30, fontsize=7)
    ax_sel.set_title("fraction of appearances trained on", fontsize=9)
    ax_sel.legend(fontsize=7)
    paths.append(_save(fig, out_dir, "beta_and_selection.png"))
    return paths
