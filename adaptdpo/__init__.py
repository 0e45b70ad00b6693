"""adaptdpo: preference optimisation for imperfect data (DPO family, β-DPO, SamS) on the Hugging Face stack.

``from adaptdpo import DPOTrainer, DPOConfig`` gives TRL's names (aliases of :class:`AdaptiveDPOTrainer` and
:class:`AdaptiveDPOConfig`); they are imported on first use, so ``import adaptdpo`` stays light (torch only).
"""

from typing import Any

__version__ = "0.1.0"

from adaptdpo.methods.losses import LOSS_TYPES, preference_loss

_LAZY = {"DPOTrainer": ("training.trainer", "AdaptiveDPOTrainer"),
         "AdaptiveDPOTrainer": ("training.trainer", "AdaptiveDPOTrainer"),
         "DPOConfig": ("training.config", "AdaptiveDPOConfig"),
         "AdaptiveDPOConfig": ("training.config", "AdaptiveDPOConfig"),
         "from_trl_config": ("training.inputs", "from_trl_config")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attribute)
    raise AttributeError(f"module 'adaptdpo' has no attribute {name!r}")


__all__ = ["LOSS_TYPES", "AdaptiveDPOConfig", "AdaptiveDPOTrainer", "DPOConfig", "DPOTrainer", "__version__",
           "from_trl_config", "preference_loss"]
