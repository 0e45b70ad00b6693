"""The noisy-preference audit: cross-fitted per-pair scores, ground-truth checks, a report, cleaned data."""

from adaptdpo.audit.folds import assign_folds, fold_members
from adaptdpo.audit.probe import ProbeError, cross_fitted_margins, select_ensemble
from adaptdpo.audit.ranking import auroc, average_precision, precision_at
from adaptdpo.audit.run import AuditError, AuditOptions, run_audit
from adaptdpo.audit.signals import FlipMixture, FlipRateEstimate, estimate_flip_rate, fit_flip_mixture, validation_loss

__all__ = ["AuditError", "AuditOptions", "FlipMixture", "FlipRateEstimate", "ProbeError", "assign_folds", "auroc",
           "average_precision", "cross_fitted_margins", "estimate_flip_rate", "fit_flip_mixture", "fold_members",
           "precision_at", "run_audit", "select_ensemble", "validation_loss"]
