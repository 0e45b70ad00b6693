"""How well a suspicion score finds known-bad pairs: AUROC, ROC and precision curves, precision at k.

scikit-learn's ranking metrics (``roc_auc_score``, ``average_precision_score``, ``roc_curve``) do the work (issue 26:
well-kept libraries for the statistics); this module keeps the audit's names and its conventions (positives =
known-bad pairs, higher score = more suspect, errors as ``ValueError`` when a metric is undefined)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _arrays(scores: Sequence[float], positives: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positives, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores and labels must be two lists of one length, got {s.shape} and {y.shape}")
    return s, y


def _both_classes(y: np.ndarray, what: str) -> None:
    if y.all() or not y.any():
        raise ValueError(f"{what} needs at least one positive and one negative")


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """P(score of a random positive > score of a random negative), ties counting ½ (Mann–Whitney U)."""
    from sklearn.metrics import roc_auc_score

    s, y = _arrays(scores, positives)
    _both_classes(y, "AUROC")
    return float(roc_auc_score(y, s))


def precision_at(scores: Sequence[float], positives: Sequence[bool], k: int) -> float:
    """Share of positives among the ``k`` highest scores (ties: positives last, a pessimistic order)."""
    s, y = _arrays(scores, positives)
    if not 0 < k <= len(s):
        raise ValueError(f"k must be in 1..{len(s)}, got {k}")
    order = np.lexsort((y, -s))  # by descending score, then negatives first
    return float(y[order[:k]].sum() / k)


def roc_curve(scores: Sequence[float], positives: Sequence[bool]) -> tuple[list[float], list[float]]:
    """(false-positive rates, true-positive rates), flagging pairs by descending score (tied scores together)."""
    from sklearn.metrics import roc_curve as sk_roc_curve

    s, y = _arrays(scores, positives)
    _both_classes(y, "a ROC curve")
    fpr, tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    return [float(v) for v in fpr], [float(v) for v in tpr]


def precision_curve(scores: Sequence[float], positives: Sequence[bool]) -> tuple[list[float], list[float]]:
    """(share of pairs flagged, precision among them) as the flagged set grows by descending score (tied scores
    together), from scikit-learn's ROC counts."""
    from sklearn.metrics import roc_curve as sk_roc_curve

    s, y = _arrays(scores, positives)
    _both_classes(y, "a precision curve")
    fpr, tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    tp, fp = tpr * y.sum(), fpr * (~y).sum()
    flagged = tp + fp
    keep = flagged > 0
    return ([float(v) for v in flagged[keep] / len(s)],
            [float(v) for v in tp[keep] / flagged[keep]])


def average_precision(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Area under the precision–recall curve (scikit-learn's step-wise sum Σ (Rₙ − Rₙ₋₁)·Pₙ)."""
    from sklearn.metrics import average_precision_score

    s, y = _arrays(scores, positives)
    if not y.any():
        raise ValueError("average precision needs at least one positive")
    return float(average_precision_score(y, s))
