"""A ``trl.DPOConfig`` (TRL 1.16) as the keyword arguments of an
:class:`~adaptdpo.training.config.AdaptiveDPOConfig`.

Every ``TrainingArguments`` field carries over unchanged (both configs extend it). TRL's own fields map to ours
where we have them (``beta``, ``loss_type`` and ``loss_weights``, ``label_smoothing``, ``max_length``, ...). A TRL field
we do not implement is accepted at its TRL default and refused by name at any other value, so nothing a user set
is silently ignored. TRL's meaning is kept where ours differs by default: TRL 1.16's ``sigmoid`` ignores
``label_smoothing``, so a mapped config sets ``sigmoid_label_smoothing: ignore`` (ours is conservative DPO). Fields
that only change speed or bookkeeping (``dataset_num_proc``,
``precompute_ref_batch_size``, ``padding_free``) are accepted and logged.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from typing import Any

logger = logging.getLogger("adaptdpo")

#: TRL fields that change nothing in the result here (logged, then ignored)
SPEED_ONLY = {"precompute_ref_batch_size": "reference log-probs are precomputed at per_device_eval_batch_size",
              "pad_token": "deprecated in TRL; set tokenizer.pad_token instead"}


def is_trl_config(args: Any) -> bool:
    return type(args).__module__.startswith("trl.") and hasattr(args, "loss_type")


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def trl_config_values(args: Any, ours: set[str]) -> dict[str, Any]:
    """The keyword arguments of our config for a ``trl.DPOConfig`` (``ours``: our config's field names); raises
    ValueError naming each TRL field we cannot honour. The training layer builds the config from them
    (:func:`adaptdpo.training.inputs.from_trl_config`), so this mapping imports nothing of adaptdpo."""
    trl_defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else
                             f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
                    for f in dataclasses.fields(type(args)) if f.init}
    values: dict[str, Any] = {}
    refused: list[str] = []
    for name, default in trl_defaults.items():
        value = _plain(getattr(args, name))
        if name == "loss_type":
            values["loss_type"] = [value] if isinstance(value, str) else list(value)
        elif name == "remove_unused_columns":
            continue  # our collator needs the tokenised columns (TRL keeps them by setting its own signature)
        elif name in ours:
            values[name] = value
        elif name in SPEED_ONLY:
            if value != default:
                logger.info("DPOConfig.%s=%r: %s", name, value, SPEED_ONLY[name])
        elif value != default:
            refused.append(f"{name}={value!r}")
    if refused:
        raise ValueError("trl.DPOConfig fields adaptdpo cannot honour (set them to TRL's defaults or drop them; "
                         "docs/migrating-from-trl.md): " + ", ".join(refused))
    if values.get("bf16") is None:
        values.pop("bf16", None)
    if "sigmoid_label_smoothing" in ours:  # TRL 1.16's sigmoid ignores label_smoothing: keep its numbers
        values["sigmoid_label_smoothing"] = "ignore"
        if values.get("label_smoothing") and "sigmoid" in values.get("loss_type", []):
            logger.info("DPOConfig.label_smoothing=%s with loss_type sigmoid: TRL 1.16 ignores it, and so does this "
                        "mapping (sigmoid_label_smoothing: ignore); for conservative DPO (cDPO) use adaptdpo's "
                        "config, where sigmoid_label_smoothing defaults to cdpo", values["label_smoothing"])
    return values
