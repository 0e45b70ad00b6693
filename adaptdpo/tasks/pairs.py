"""Labelled training pairs with controlled gold-reward gaps, from a pool of scored response pairs (shared by the
toy gold task and the sentiment task).

A pool row holds a prompt, two responses ``y1``, ``y2`` and their gold rewards ``gold1``, ``gold2``. The training set
mixes high-gap pairs (gap in the pool's top third) and low-gap pairs (bottom third) at ``high_gap_fraction``; each
pair's label is drawn from the Bradley–Terry model P(y1 ≻ y2) = σ((r1 − r2) / bt_temperature); then a ``flip_rate``
share of the pairs get chosen and rejected swapped, recorded as ``flipped``.
"""

from __future__ import annotations

import math
import random
from typing import Any


def oriented(row: dict[str, Any], first_wins: bool) -> tuple[str, str, float, float]:
    """(chosen, rejected, gold of chosen, gold of rejected) of a pool row."""
    if first_wins:
        return row["y1"], row["y2"], row["gold1"], row["gold2"]
    return row["y2"], row["y1"], row["gold2"], row["gold1"]


def bradley_terry_first_wins(gap: float, temperature: float) -> float:
    """σ(gap / temperature), computed without overflow."""
    z = gap / temperature
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def controlled_pairs(pool: list[dict[str, Any]], n_pairs: int, high_gap_fraction: float, flip_rate: float,
                     bt_temperature: float, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``n_pairs`` labelled pairs and their statistics (gap cuts, flips, Bradley–Terry disagreements, share of
    labels agreeing with gold). Pairs with equal gold rewards are left out (no preference to learn)."""
    rng = random.Random(seed)
    pool = [r for r in pool if r["gold1"] != r["gold2"]]
    gaps = sorted(abs(r["gold1"] - r["gold2"]) for r in pool)
    low_cut, high_cut = gaps[len(gaps) // 3], gaps[2 * len(gaps) // 3]
    low = [r for r in pool if abs(r["gold1"] - r["gold2"]) <= low_cut]
    high = [r for r in pool if abs(r["gold1"] - r["gold2"]) >= high_cut]
    n_high = round(high_gap_fraction * n_pairs)
    n_low = n_pairs - n_high
    if n_high > len(high) or n_low > len(low):
        raise ValueError(f"the pool has {len(high)} high-gap and {len(low)} low-gap pairs; asked for {n_high} and "
                         f"{n_low}: sample a larger pool")
    picked = [(r, "high") for r in rng.sample(high, n_high)] + [(r, "low") for r in rng.sample(low, n_low)]
    rng.shuffle(picked)
    rows, bt_wrong = [], 0
    for r, group in picked:
        first_wins = rng.random() < bradley_terry_first_wins(r["gold1"] - r["gold2"], bt_temperature)
        flipped = rng.random() < flip_rate
        chosen, rejected, g_c, g_r = oriented(r, first_wins != flipped)
        bt_wrong += int((g_c < g_r) and not flipped)
        rows.append({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected, "gold_chosen": g_c,
                     "gold_rejected": g_r, "gap_group": group, "flipped": flipped,
                     "label_agrees_with_gold": g_c > g_r})
    stats = {"low_gap_cut": low_cut, "high_gap_cut": high_cut, "flipped": sum(r["flipped"] for r in rows),
             "bradley_terry_disagreements": bt_wrong,
             "labels_agreeing_with_gold": sum(r["label_agrees_with_gold"] for r in rows) / len(rows)}
    return rows, stats


def gold_labelled_pairs(pool: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Held-out pairs: every pool row with a gold preference, labelled by the gold reward, never flipped."""
    out = []
    for r in pool:
        if r["gold1"] == r["gold2"]:
            continue  # no gold preference to score against
        chosen, rejected, g_c, g_r = oriented(r, r["gold1"] > r["gold2"])
        out.append({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected, "gold_chosen": g_c,
                    "gold_rejected": g_r, "flipped": False})
    return out
