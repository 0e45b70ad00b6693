"""training.safeguards"""

from __future__ import annotations

from typing import Any

import torch

from adaptdpo.models.token_ops import unwrap
from adaptdpo.training.config import AdaptiveDPOConfig


def router_aux_loss_coefficient(model: torch.nn.Module, args: AdaptiveDPOConfig) -> float:
    """The weight of a mixture-of-experts model's router load-balancing loss in the training loss, as TRL:
    ``router_aux_loss_coef``, or the model config's own when unset; 0 for a dense model (a value set for one is
    an error: there is nothing to weight)."""
    config: Any = getattr(unwrap(model), "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    is_moe = hasattr(text_config, "output_router_logits")
    coef = args.router_aux_loss_coef
    if coef and not is_moe:
        raise ValueError(f"router_aux_loss_coef={coef}, but {type(unwrap(model)).__name__} is not a "
                         "mixture-of-experts model that returns router logits: there is no auxiliary loss to weight")
    if coef is None:
        coef = getattr(text_config, "router_aux_loss_coef", 0.0) if is_moe else 0.0
    return float(coef or 0.0)


class TrainingStalledError(RuntimeError):
    """The gradient has been exactly zero for several optimizer steps while the loss stays above zero."""


#: consecutive optimizer steps with an exactly-zero gradient norm (and a non-zero loss) that stop a run
STALLED_STEPS = 3
