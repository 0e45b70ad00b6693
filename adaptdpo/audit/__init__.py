"""The noisy-preference audit: cross-fitted per-pair scores, ground-truth checks, a report, cleaned data."""

from adaptdpo.audit.folds import assign_folds, fold_members
from adaptdpo.audit.ranking import auroc, average_precision, precision_at
from adaptdpo.audit.run import AuditError, AuditOptions, run_audit
from adaptdpo.audit.signals import FlipMixture, fit_flip_mixture, validation_loss

__all__ = ["AuditError", "AuditOptions", "FlipMixture", "assign_folds", "auroc", "average_precision",
           "fit_flip_mixture", "fold_members", "precision_at", "run_audit", "validation_loss"]
