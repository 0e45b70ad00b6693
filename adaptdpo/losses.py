"""The public path of the DPO loss family (``from adaptdpo.losses import preference_loss``); the losses live in
:mod:`adaptdpo.methods.losses`."""

from adaptdpo.methods.losses import (
    BATCH_COUPLED_LOSSES,
    LOSS_TYPES,
    LOSSES,
    PairLogps,
    combined_preference_loss,
    preference_loss,
)

__all__ = ["BATCH_COUPLED_LOSSES", "LOSSES", "LOSS_TYPES", "PairLogps", "combined_preference_loss", "preference_loss"]
