"""Plots of a run directory's metrics.jsonl (PNG files under <run_dir>/plots)."""

from __future__ import annotations

import os
from typing import Any

from .run_dir import read_metrics

PANELS = (
    ("loss", ("loss", "eval_loss")),
    ("rewards/accuracies", ("rewards/accuracies", "eval_rewards/accuracies")),
    ("rewards/margins", ("rewards/margins", "eval_rewards/margins")),
    ("rewards", ("rewards/chosen", "rewards/rejected")),
    ("logps", ("logps/chosen", "logps/rejected")),
)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training_curves(run_dir: str) -> str | None:
    """One figure of the standard DPO curves; returns its path (None when nothing was logged)."""
    records = read_metrics(run_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (title, keys) in zip(axes, PANELS, strict=True):
        for key in keys:
            steps, values = _series(records, key)
            if steps:
                ax.plot(steps, values, marker="." if len(steps) < 40 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "training_curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
