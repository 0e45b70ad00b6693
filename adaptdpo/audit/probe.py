"""A cross-fitted Bradley–Terry reward probe on frozen features (issue 26): the audit's default signal.

For a pair with completion features f(y_w), f(y_l) (e.g. the reference's mean-pooled hidden states,
:mod:`.features`), the probe is a linear reward r(y) = w·f(y) under the Bradley–Terry model,
P(y_w ≻ y_l) = σ(w·(f(y_w) − f(y_l))): a logistic regression on the feature differences, without an intercept
(swapping a pair negates its margin). Its held-out margin m = w·d is the log-odds, as a probe that never saw the
pair sees it, that the label as given is right; P(flip) = σ(−m) before calibration (:func:`calibrated`,
:func:`adaptdpo.audit.signals.estimate_flip_rate`).

Choices, and why:

- **Mirrored training rows**: every training pair enters twice, (d, 1) and (−d, 0), so the fit is symmetric and
  both classes are always present; the two copies share a group, so inner cross-validation never splits them.
- **scikit-learn** ``LogisticRegressionCV`` (L2, lbfgs): the regularisation strength C chosen by inner
  cross-validation (``inner_folds``, log-loss) on the training folds only; the features are scaled (not centred:
  centring would break the antisymmetry) by their RMS on the training rows.
- **Cross-fitting**: :func:`cross_fitted_margins` gives the fitting function only the training rows of each
  fold and scores only the held-out ones, so no pair is ever scored by a probe that saw it (the tests check this
  by construction: changing a held-out pair's label changes no other margin of its fold, and negates its own).
- **Several feature sets** (layers × poolings, and label-free views such as the reference's own log-ratio) each
  give held-out margins; :func:`select_ensemble` averages the *calibrated* margins of a subset chosen greedily by
  the held-out log-likelihood of the labels as given (never by ground truth, which an audit does not have).
  Picking among a handful of candidates on the same held-out margins has a small optimism.
- **Calibration**: one temperature a (``LogisticRegression`` without intercept on the mirrored held-out margins:
  Platt scaling whose intercept is 0 by symmetry), so σ(a·m) is the held-out probability that the label as given
  is right. One parameter on n held-out pairs: not cross-fitted again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

#: the regularisation grid of the inner cross-validation (C = 1/λ)
DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 4, 9))


class ProbeError(ValueError):
    """Input a probe cannot be fitted on (the message says what is wrong)."""


@dataclass
class FoldProbe:
    """The probe of one fold: what it trained on, what it scored, its weights and chosen C."""

    fold: int
    train_index: np.ndarray  # positions (0..n−1) of the pairs it was fitted on
    held_index: np.ndarray  # positions it scored (never any of train_index)
    coef: np.ndarray  # weights on the scaled features
    scale: np.ndarray  # feature scale (RMS on the training rows)
    C: float


@dataclass
class ProbeFit:
    margins: np.ndarray  # [n] held-out margins, positions as given
    models: dict[int, FoldProbe] = field(default_factory=dict)


def check_inputs(diffs: np.ndarray, folds: np.ndarray, labels: np.ndarray | None = None,
                 mirror: bool = True) -> None:
    """Clear errors before any fit: shapes, fewer pairs than folds, a fold with nothing to train on, features that
    are not finite, labels all one way (only possible without mirroring: mirrored rows always hold both)."""
    if diffs.ndim != 2:
        raise ProbeError(f"features must be a matrix [pairs, dimension], got shape {diffs.shape}")
    n = diffs.shape[0]
    if folds.shape != (n,):
        raise ProbeError(f"{n} pairs but {folds.shape[0] if folds.ndim else 0} fold numbers")
    fold_ids = np.unique(folds)
    if len(fold_ids) < 2:
        raise ProbeError(f"cross-fitting needs at least 2 folds, got {len(fold_ids)}")
    if n < len(fold_ids) or n < 2:
        raise ProbeError(f"{n} pairs cannot be split into {len(fold_ids)} folds")
    if not np.isfinite(diffs).all():
        raise ProbeError("features hold NaN or infinite values")
    if labels is not None:
        if labels.shape != (n,):
            raise ProbeError(f"{n} pairs but {labels.shape[0]} labels")
        if not mirror and (labels.all() or not labels.any()):
            raise ProbeError("all labels are one way: a probe without mirrored rows cannot be fitted (nothing to "
                             "contrast); use mirror=True (the Bradley–Terry form) or give both orientations")


def fit_probe(diffs: np.ndarray, labels: np.ndarray, groups: np.ndarray, inner_folds: int = 3,
              cs: Sequence[float] = DEFAULT_CS, mirror: bool = True, seed: int = 0
              ) -> tuple[np.ndarray, np.ndarray, float]:
    """(coef, scale, C) of a Bradley–Terry probe on the training rows only; C by inner CV on log-loss.
    ``labels``: True where the first completion is preferred (the audit passes all True: the labels as given)."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import GroupKFold

    x = np.where(labels[:, None], diffs, -diffs)  # oriented so that the label is "first preferred"
    if mirror:
        x_fit = np.vstack([x, -x])
        y_fit = np.concatenate([np.ones(len(x), dtype=int), np.zeros(len(x), dtype=int)])
        g_fit = np.concatenate([groups, groups])
    else:
        x_fit, y_fit, g_fit = diffs, labels.astype(int), groups
    scale = np.sqrt((x_fit ** 2).mean(axis=0))
    scale[scale == 0] = 1.0
    x_fit = x_fit / scale
    splits = min(inner_folds, len(np.unique(g_fit)))
    if splits >= 2:
        cv = list(GroupKFold(n_splits=splits).split(x_fit, y_fit, g_fit))
        model = LogisticRegressionCV(Cs=list(cs), l1_ratios=(0.0,), fit_intercept=False, cv=cv,
                                     scoring="neg_log_loss", max_iter=2000, use_legacy_attributes=False,
                                     random_state=seed)
        model.fit(x_fit, y_fit)
        c = float(np.ravel(model.C_)[0])
    else:  # a single training group: no inner CV possible, the middle of the grid
        c = float(np.median(cs))
        model = LogisticRegression(C=c, fit_intercept=False, max_iter=2000)
        model.fit(x_fit, y_fit)
    return np.ravel(model.coef_).astype(np.float64), scale, c


def cross_fitted_margins(diffs: np.ndarray, folds: np.ndarray, labels: np.ndarray | None = None,
                         groups: np.ndarray | None = None, inner_folds: int = 3, cs: Sequence[float] = DEFAULT_CS,
                         seed: int = 0) -> ProbeFit:
    """Held-out Bradley–Terry margins: for each fold k, a probe fitted on the pairs of the other folds scores the
    pairs of fold k. ``diffs`` [n, d] = f(chosen) − f(rejected); ``folds`` [n] fold numbers; ``labels`` [n] True
    where the chosen is preferred as given (default: all, the audit's case); ``groups`` [n] pairs that must stay
    together in the inner CV (default: each pair alone). The margin is for the labels as given."""
    diffs = np.asarray(diffs, dtype=np.float64)
    folds = np.asarray(folds)
    n = diffs.shape[0] if diffs.ndim == 2 else 0
    labels = np.ones(n, dtype=bool) if labels is None else np.asarray(labels, dtype=bool)
    check_inputs(diffs, folds, labels)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    margins = np.full(n, np.nan)
    fit = ProbeFit(margins)
    for k in np.unique(folds):
        train = np.flatnonzero(folds != k)
        held = np.flatnonzero(folds == k)
        coef, scale, c = fit_probe(diffs[train], labels[train], groups[train], inner_folds, cs, seed=seed)
        oriented = np.where(labels[held, None], diffs[held], -diffs[held])
        margins[held] = (oriented / scale) @ coef
        fit.models[int(k)] = FoldProbe(int(k), train, held, coef, scale, c)
    return fit


def log_likelihood(margins: np.ndarray) -> float:
    """Σ log σ(m): the log-likelihood of the labels as given under held-out margins m."""
    return float(-np.logaddexp(0.0, -np.asarray(margins, dtype=np.float64)).sum())


def calibrated(margins: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(a·m, a, mean log-likelihood per pair) with the temperature a ≥ 0 that maximises Σ log σ(a·m)."""
    from sklearn.linear_model import LogisticRegression

    m = np.asarray(margins, dtype=np.float64)
    if not np.any(m):
        return m.copy(), 0.0, -float(np.log(2.0))
    x = np.concatenate([m, -m])[:, None]
    y = np.concatenate([np.ones(len(m), dtype=int), np.zeros(len(m), dtype=int)])
    model = LogisticRegression(C=1e6, fit_intercept=False, max_iter=1000).fit(x, y)
    a = max(0.0, float(model.coef_[0, 0]))
    out = a * m
    return out, a, log_likelihood(out) / max(1, len(out))


@dataclass
class Ensemble:
    members: list[str]
    margins: np.ndarray  # calibrated average of the members' calibrated margins
    temperature: float
    log_likelihood: float  # mean per pair, held out
    candidates: dict[str, float]  # each candidate's own calibrated held-out log-likelihood per pair


def select_ensemble(margins: Mapping[str, np.ndarray], max_members: int = 3, min_gain: float = 1e-4) -> Ensemble:
    """Greedy forward selection of an equal-weight average of calibrated held-out margins (each candidate scaled
    by its own temperature first, so views on different scales can be averaged) by the calibrated held-out
    log-likelihood of the labels as given; stops when a member raises it by less than ``min_gain`` per pair."""
    if not margins:
        raise ProbeError("no feature set to choose from")
    names = list(margins)
    scaled = {name: calibrated(margins[name])[0] for name in names}
    own = {name: calibrated(margins[name])[2] for name in names}
    members: list[str] = []
    best = -np.inf
    while len(members) < max_members:
        trials = {name: calibrated(np.mean([scaled[k] for k in [*members, name]], axis=0))[2]
                  for name in names if name not in members}
        if not trials:
            break
        name = max(trials, key=lambda k: (trials[k], -names.index(k)))
        if trials[name] < best + min_gain:
            break
        members.append(name)
        best = trials[name]
    combined, a, ll = calibrated(np.mean([scaled[k] for k in members], axis=0))
    return Ensemble(members, combined, a, ll, own)
