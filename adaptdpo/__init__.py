"""adaptdpo: preference optimisation for imperfect data (DPO family, β-DPO, SamS) on the Hugging Face stack."""

__version__ = "0.1.0"

from .losses import LOSS_TYPES, preference_loss

__all__ = ["LOSS_TYPES", "__version__", "preference_loss"]
