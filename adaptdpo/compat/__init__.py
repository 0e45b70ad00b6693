"""What TRL users bring, in our terms; imports nothing of adaptdpo (the training layer builds on it).

- :mod:`.trl_config`: a ``trl.DPOConfig``'s fields as the keyword arguments of our config, field by field; a TRL
  setting we cannot honour is refused by name. ``adaptdpo.from_trl_config(trl_args)`` builds the config itself.
"""

from adaptdpo.compat.trl_config import is_trl_config, trl_config_values

__all__ = ["is_trl_config", "trl_config_values"]
