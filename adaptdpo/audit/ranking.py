"""How well a suspicion score finds known-bad pairs: AUROC, ROC and precision curves, precision at k."""

from __future__ import annotations

from collections.abc import Sequence


def _midranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """P(score of a random positive > score of a random negative), ties counting ½ (Mann–Whitney U)."""
    n_pos = sum(bool(p) for p in positives)
    n_neg = len(positives) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative")
    ranks = _midranks(scores)
    rank_sum = sum(r for r, p in zip(ranks, positives, strict=True) if p)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _by_score(scores: Sequence[float], positives: Sequence[bool]) -> list[bool]:
    """Labels ordered by descending score (ties: positives last, a pessimistic order)."""
    return [bool(p) for _, p in sorted(zip(scores, positives, strict=True), key=lambda t: (-t[0], bool(t[1])))]


def precision_at(scores: Sequence[float], positives: Sequence[bool], k: int) -> float:
    """Share of positives among the ``k`` highest scores."""
    if not 0 < k <= len(scores):
        raise ValueError(f"k must be in 1..{len(scores)}, got {k}")
    return sum(_by_score(scores, positives)[:k]) / k


def roc_curve(scores: Sequence[float], positives: Sequence[bool]) -> tuple[list[float], list[float]]:
    """(false-positive rates, true-positive rates), flagging pairs one at a time by descending score."""
    ranked = _by_score(scores, positives)
    n_pos = sum(ranked)
    n_neg = len(ranked) - n_pos
    fpr, tpr, tp, fp = [0.0], [0.0], 0, 0
    for p in ranked:
        tp, fp = tp + p, fp + (not p)
        fpr.append(fp / max(1, n_neg))
        tpr.append(tp / max(1, n_pos))
    return fpr, tpr


def precision_curve(scores: Sequence[float], positives: Sequence[bool]) -> tuple[list[float], list[float]]:
    """(share of pairs flagged, precision among them) as the flagged set grows by descending score."""
    ranked = _by_score(scores, positives)
    flagged, precision, tp = [], [], 0
    for k, p in enumerate(ranked, start=1):
        tp += p
        flagged.append(k / len(ranked))
        precision.append(tp / k)
    return flagged, precision


def average_precision(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Mean of the precision at each positive's rank (area under the precision–recall curve)."""
    ranked = _by_score(scores, positives)
    n_pos = sum(ranked)
    if n_pos == 0:
        raise ValueError("average precision needs at least one positive")
    tp, total = 0, 0.0
    for k, p in enumerate(ranked, start=1):
        if p:
            tp += 1
            total += tp / k
    return total / n_pos
