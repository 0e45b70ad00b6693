"""TRL-facing names and argument mapping: a TRL user's code runs with ``from adaptdpo import DPOTrainer, DPOConfig``.

- :mod:`.trl_config`: a ``trl.DPOConfig`` becomes an :class:`~adaptdpo.config.AdaptiveDPOConfig`, field by field;
  a field set to something adaptdpo cannot honour is refused by name.
- :mod:`.trainer_inputs`: what TRL's ``DPOTrainer`` constructor accepts and we resolve before training: a model
  given by name, no ``ref_model``, ``peft_config``, raw ``datasets.Dataset`` objects (validated and tokenised),
  a missing ``processing_class``.
"""

from .trl_config import from_trl_config, is_trl_config

__all__ = ["from_trl_config", "is_trl_config"]
