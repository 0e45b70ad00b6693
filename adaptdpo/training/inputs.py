"""What TRL's ``DPOTrainer(...)`` accepts, resolved into what :class:`~adaptdpo.training.trainer.AdaptiveDPOTrainer`
trains on.

- ``args``: None (TRL: ``DPOConfig(f"{model name}-DPO")``), our config, or a ``trl.DPOConfig`` (mapped);
- ``model``: a model, or a name/path loaded like ``model_name_or_path`` (packaged models and .gguf files too);
- ``processing_class``: default the model's tokenizer; a missing pad token becomes EOS (as TRL);
- ``ref_model``: None → a frozen copy of the initial policy, or, with ``peft_config`` or a PEFT model, the base
  with adapters disabled; with ``precompute_ref_log_probs`` the policy itself scores the data once;
- datasets: ``datasets.Dataset`` / ``IterableDataset`` (validated and tokenised lazily as it streams) / lists of
  dicts, raw (TRL's formats: standard or
  conversational, explicit or implicit prompt; every row validated, errors name the dataset, row and field) or
  already tokenised (``prompt_ids``/``chosen_ids``/``rejected_ids``); ``eval_dataset`` may be a dict of them.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from adaptdpo.compat.trl_config import is_trl_config, trl_config_values
from adaptdpo.data.readers import REFERENCE_COLUMNS, DataValidationError, reference_columns_notice
from adaptdpo.data.rows import PAIR_VALUE_COLUMNS, check_pair_columns, normalise_row, pair_value, text_row_as_messages
from adaptdpo.data.tokenize import (
    TokenizedPair,
    pair_example,
    pair_problem,
    tokenize_dataset,
    tokenize_pair,
    truncate_pair,
    warn_dropped,
)
from adaptdpo.models.loading import load_pretrained, load_tokenizer
from adaptdpo.training.config import AdaptiveDPOConfig

logger = logging.getLogger("adaptdpo")

TOKENISED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def from_trl_config(args: Any) -> AdaptiveDPOConfig:
    """Our config for a ``trl.DPOConfig`` (TRL 1.16), field by field (:mod:`adaptdpo.compat.trl_config`)."""
    return AdaptiveDPOConfig(**trl_config_values(args, {f.name for f in dataclasses.fields(AdaptiveDPOConfig)
                                                       if f.init}))


def resolve_args(args: Any, model: Any) -> Any:

    if args is None:
        name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
        return AdaptiveDPOConfig(output_dir=f"{os.path.basename(str(name).rstrip('/')) or 'model'}-DPO")
    if is_trl_config(args):
        return from_trl_config(args)
    if not isinstance(args, AdaptiveDPOConfig):
        raise TypeError(f"args must be an adaptdpo DPOConfig (AdaptiveDPOConfig) or a trl.DPOConfig, got "
                        f"{type(args).__name__}")
    return args


def resolve_model(model: Any, args: Any, quantization_config: Any = None) -> torch.nn.Module:
    """``model`` itself, or the model a name/path names, loaded with ``model_init_kwargs`` (and
    ``quantization_config``, TRL's trainer argument, for a quantised base)."""
    if not isinstance(model, str):
        if quantization_config is not None:
            raise ValueError("quantization_config quantises a model as it is loaded, but the model is already "
                             "loaded: pass its name or path, or drop quantization_config (as TRL)")
        return model

    kwargs = args.from_pretrained_kwargs(quantization_config)
    return load_pretrained(model, args.dtype, args.attn_implementation, **kwargs)


def resolve_tokenizer(processing_class: Any, model: Any, args: Any = None) -> Any:
    if processing_class is None:

        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        if not name:
            raise ValueError("processing_class is None and the model does not say where it was loaded from: pass the "
                             "tokenizer as processing_class")
        processing_class = load_tokenizer(name, getattr(args, "model_revision", None),
                                          bool(getattr(args, "trust_remote_code", False)))
    if getattr(processing_class, "pad_token", None) is None and getattr(processing_class, "eos_token", None):
        processing_class.pad_token = processing_class.eos_token
    return processing_class


def apply_peft(model: Any, peft_config: Any) -> Any:
    if peft_config is None:
        return model
    try:
        from peft import PeftConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("peft_config needs peft: pip install 'adaptdpo[peft]'") from e
    if not isinstance(peft_config, PeftConfig):
        raise TypeError("peft_config must be a peft.PeftConfig (e.g. peft.LoraConfig), got "
                        f"{type(peft_config).__name__}")
    if hasattr(model, "peft_config"):
        raise ValueError("the model is already a PEFT model and a peft_config was given: pass one or the other")
    return get_peft_model(model, peft_config)


def frozen_copy(model: Any) -> Any:
    """The reference TRL builds when none is given: the initial policy, frozen."""
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference.eval()


def _rows_of(dataset: Any, name: str) -> list[dict[str, Any]]:
    import datasets

    if isinstance(dataset, (datasets.Dataset, list, tuple)):
        return [dict(row) for row in dataset]
    raise TypeError(f"{name} must be a datasets.Dataset, an IterableDataset or a list of dicts, got "
                    f"{type(dataset).__name__}")


def pair_columns_of(args: Any) -> tuple[str | None, str | None]:
    """The configured (weight_column, beta_column)."""
    return getattr(args, "weight_column", None), getattr(args, "beta_column", None)


def normalised_row(raw: dict[str, Any], index: int, args: Any, name: str,
                   hh_as_messages: bool = False, pair_columns: bool = False) -> dict[str, Any]:
    """One raw row validated and normalised (errors name ``name``, the row and the field); with
    ``chat_format: messages``, plain text becomes messages (with ``hh_as_messages``, Anthropic HH text does).
    ``pair_columns`` (training data): read the configured weight_column / beta_column too."""

    weight_column, beta_column = pair_columns_of(args) if pair_columns else (None, None)
    row = normalise_row(dict(raw), name, index, None, args.implicit_prompt_marker, weight_column, beta_column)
    if (args.chat_format == "messages" or hh_as_messages) and not isinstance(row["chosen"], list):
        row = text_row_as_messages(row, only_hh=args.chat_format != "messages") or row
    return row


def streamed_dataset(dataset: Any, tokenizer: Any, args: Any, name: str, hh_as_messages: bool = False,
                     pair_columns: bool = False) -> Any:
    """An ``IterableDataset`` validated and tokenised lazily, row by row, as it streams (nothing is read ahead);
    a bad row stops training with an error naming the dataset, the row (its index in the stream) and the field.
    ``pair_columns`` (training data): the configured weight_column / beta_column too, checked on the first row."""

    mode = args.truncation_mode

    def tokenise(raw: dict[str, Any], index: int) -> dict[str, Any]:
        if index == 0 and pair_columns:
            check_pair_columns(raw, name, *pair_columns_of(args))
        row = normalised_row(raw, index, args, name, hh_as_messages, pair_columns)
        pair = tokenize_pair(row, tokenizer, args.max_length, args.max_prompt_length, mode)
        found = None if pair.dropped else pair_problem(pair, args.max_length, mode)
        if found is not None:
            raise DataValidationError(name, index, *found)
        return {**pair_example(pair, index, args.max_length, mode, row), "dropped": pair.dropped}

    def kept(row: dict[str, Any]) -> bool:
        if row["dropped"]:  # keep_start: the prompt alone fills max_length (TRL drops the pair too)
            logger.warning("%s: row %d dropped: its prompt alone fills max_length=%s (truncation_mode keep_start, as "
                           "TRL)", name, row["pair_id"], args.max_length)
        return not row["dropped"]

    import datasets

    ids = datasets.List(datasets.Value("int64"))
    columns = {"prompt_ids": ids, "chosen_ids": ids, "rejected_ids": ids, "pair_id": datasets.Value("int64"),
               "length": datasets.Value("int64")}
    for kind, column in zip(PAIR_VALUE_COLUMNS, pair_columns_of(args) if pair_columns else (None, None),
                            strict=True):
        if column is not None:
            columns[kind] = datasets.Value("float64")
    features = datasets.Features(columns)
    mapped = dataset.map(tokenise, with_indices=True).filter(kept)
    return mapped.select_columns(list(features)).cast(features)  # known columns: the trainer sees it is tokenised


def is_tokenised(dataset: Any) -> bool:
    columns: Any = getattr(dataset, "column_names", None)  # None for a stream whose features are unknown
    if columns is None and isinstance(dataset, (list, tuple)) and dataset:
        columns = list(dataset[0])
    return bool(columns) and all(c in columns for c in TOKENISED_COLUMNS)


def checked_reference_columns(dataset: Any, name: str) -> None:
    """Already tokenised data may carry precomputed reference log-probs (TRL's ``ref_chosen_logps`` /
    ``ref_rejected_logps``, as its precompute_ref_log_probs leaves them): the trainer uses them, so both must be there
    and hold finite log-probs (numbers <= 0); errors name the dataset, the row and the column."""
    import math

    present = [c for c in REFERENCE_COLUMNS if c in dataset.column_names]
    if not present:
        return
    if len(present) == 1:
        missing = next(c for c in REFERENCE_COLUMNS if c not in present)
        raise DataValidationError(name, None, missing, f"missing, while {present[0]} is given (precomputed reference "
                                  "log-probs need both columns)")
    for column in REFERENCE_COLUMNS:
        for index, value in enumerate(dataset[column]):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DataValidationError(name, index, column, f"expected a number (a summed log-prob), got "
                                          f"{type(value).__name__} {value!r:.40}")
            if not math.isfinite(value) or value > 1e-3:
                raise DataValidationError(name, index, column, f"{value} is not a log-prob (a finite number <= 0)")
    logger.info("%s: its %s columns are the reference log-probs (checked: finite, <= 0); no reference model scores "
                "these pairs", name, " / ".join(REFERENCE_COLUMNS))


def truncated_tokenised(dataset: Any, args: Any, name: str) -> Any:
    """Already tokenised data cut to ``max_length`` as ``truncation_mode`` says, as raw data is (keep_end: by the
    collator); a pair left without signal is an error naming the dataset and row."""
    if args.max_length is None or args.truncation_mode == "keep_end":
        return dataset
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")

    def cut(row: dict[str, Any], index: int) -> dict[str, Any]:
        prompt, chosen, rejected = (list(row[c]) for c in columns)
        pair = truncate_pair(TokenizedPair(prompt, chosen, rejected), args.max_length, args.max_prompt_length,
                             args.truncation_mode)
        found = None if pair.dropped else pair_problem(pair, args.max_length, args.truncation_mode)
        if found is not None:
            raise DataValidationError(name, index, *found)
        out = {"prompt_ids": pair.prompt_ids, "chosen_ids": pair.chosen_ids, "rejected_ids": pair.rejected_ids,
               "_dropped": pair.dropped}
        if "length" in row:
            out["length"] = len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))
        return out

    longest = max(len(p) + max(len(c), len(r)) for p, c, r in zip(*(dataset[c] for c in columns), strict=True))
    if longest <= args.max_length:
        return dataset
    mapped = dataset.map(cut, with_indices=True)
    dropped = sum(mapped["_dropped"])
    if dropped:
        warn_dropped(name, dropped, args.max_length)
        mapped = mapped.filter(lambda row: not row["_dropped"])
    return mapped.remove_columns("_dropped")


def tokenised_pair_columns(dataset: Any, args: Any, name: str) -> Any:
    """An already tokenised dataset with the configured weight_column / beta_column checked row by row and named
    ``weight`` / ``beta``."""
    # a column named weight / beta that no option names is not read: dropped, so that it cannot weigh the loss
    unnamed = [kind for kind, column in zip(PAIR_VALUE_COLUMNS, pair_columns_of(args), strict=True)
               if column is None and kind in dataset.column_names]
    if unnamed:
        logger.info("%s: its %s column(s) are not read (weight_column / beta_column unset)", name, ", ".join(unnamed))
        dataset = dataset.remove_columns(unnamed)
    # a tokenised dataset that already carries them under our names (adaptdpo's own, from `adaptdpo train`) is kept
    wanted = [(kind, column) for kind, column in zip(PAIR_VALUE_COLUMNS, pair_columns_of(args), strict=True)
              if column is not None and not (column not in dataset.column_names and kind in dataset.column_names)]
    if not wanted:
        return dataset
    names = dict(wanted)
    check_pair_columns(dataset.column_names, name, names.get("weight"), names.get("beta"))
    for kind, column in wanted:
        values = [pair_value(v, kind, name, i, column) for i, v in enumerate(dataset[column])]
        if column != kind and kind in dataset.column_names:
            dataset = dataset.remove_columns(kind)
        dataset = dataset.remove_columns(column).add_column(kind, values)
    return dataset


def prepare_dataset(dataset: Any, tokenizer: Any, args: Any, name: str, pair_columns: bool = False) -> Any:
    """A tokenised ``datasets.Dataset`` for the trainer (dicts of named datasets: each one). ``pair_columns``
    (the training data): read the configured weight_column / beta_column."""
    import datasets

    if dataset is None:
        return None
    if isinstance(dataset, (dict, datasets.DatasetDict, datasets.IterableDatasetDict)):
        return {key: prepare_dataset(value, tokenizer, args, f"{name}[{key!r}]", pair_columns)
                for key, value in dataset.items()}
    if isinstance(dataset, datasets.IterableDataset):
        if tokenizer is None:
            raise ValueError(f"{name} is raw data: pass processing_class (the tokenizer)")
        if is_tokenised(dataset):
            if pair_columns and any(pair_columns_of(args)):
                raise ValueError(f"{name}: weight_column / beta_column with an already tokenised stream are not "
                                 "supported: stream the raw rows, or pass a Dataset")
            return dataset
        return streamed_dataset(dataset, tokenizer, args, name, pair_columns=pair_columns)
    if is_tokenised(dataset):
        dataset = dataset if isinstance(dataset, datasets.Dataset) else datasets.Dataset.from_list(list(dataset))
        checked_reference_columns(dataset, name)
        dataset = truncated_tokenised(dataset, args, name)
        return tokenised_pair_columns(dataset, args, name) if pair_columns else dataset
    columns = getattr(dataset, "column_names", None) or (list(dataset[0]) if isinstance(dataset, (list, tuple))
                                                         and dataset else [])
    with_reference = [c for c in REFERENCE_COLUMNS if c in columns]
    if with_reference:  # raw rows: the live reference scores them (as TRL without precompute_ref_log_probs); say so
        logger.warning("%s", reference_columns_notice(name, len(dataset)))

    rows = []
    kind = None
    if pair_columns and any(pair_columns_of(args)):
        columns = getattr(dataset, "column_names", None) or (list(dataset[0]) if len(dataset) else [])
        check_pair_columns(columns, name, *pair_columns_of(args))
    for index, raw in enumerate(_rows_of(dataset, name)):
        row = normalised_row(raw, index, args, name, pair_columns=pair_columns)  # validated first: errors name it
        is_conversational = isinstance(raw["chosen"], list)
        if kind is None:
            kind = is_conversational
        elif kind != is_conversational:
            raise DataValidationError(name, index, "chosen", "mixes conversational and plain-text rows")
        row["pair_id"] = index
        rows.append(row)
    if not rows:
        raise ValueError(f"{name}: no rows")
    tokenised, truncated = tokenize_dataset(rows, tokenizer, args.max_length, args.max_prompt_length, name,
                                            num_proc=args.dataset_num_proc, main_process_first=args.main_process_first,
                                            truncation_mode=args.truncation_mode)
    logger.info("%s: %d pairs tokenised (%d truncated to max_length=%s)", name, len(tokenised), truncated,
                args.max_length)
    return tokenised
