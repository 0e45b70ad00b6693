"""training.prepared_data"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

from adaptdpo.data.readers import LoadReport
from adaptdpo.data.rows import load_preference_rows, text_row_as_messages
from adaptdpo.data.sources import load_mixture_rows, split_off_test_rows, streamed_mixture, streamed_source
from adaptdpo.models.tiny import TINY_PRESETS
from adaptdpo.training.config import AdaptiveDPOConfig
from adaptdpo.training.inputs import normalised_row

logger = logging.getLogger("adaptdpo")


@dataclass
class PreparedData:
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]] | None
    reports: list[LoadReport]


def _pair_key(row: dict[str, Any]) -> str:
    import json

    return json.dumps([row["prompt"], row["chosen"], row["rejected"]], sort_keys=True, ensure_ascii=False)


def held_out_without_copies(train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]], how: str,
                            drop: bool = True) -> list[dict[str, Any]]:
    """The held-out rows less those that are copies of a training row (same prompt, chosen and rejected): scored in
    evaluation they would measure pairs the model trained on. Dropped (``drop``, a split of the training data) or,
    for an eval file the user chose, kept; either way warned with counts."""
    seen = {_pair_key(r) for r in train_rows}
    copies = [r for r in eval_rows if _pair_key(r) in seen]
    if not copies:
        return eval_rows
    if not drop:
        logger.warning("%s: %d of its %d rows are copies of training rows (same prompt, chosen and rejected; first "
                       "eval row %s): their metrics measure pairs the model trains on", how, len(copies),
                       len(eval_rows), copies[0].get("pair_id"))
        return eval_rows
    kept = [r for r in eval_rows if _pair_key(r) not in seen]
    logger.warning("%s: %d of the %d held-out rows are copies of training rows (same prompt, chosen and rejected; "
                   "first: row %s); they are left out of the eval split, whose metrics they would inflate (%d rows "
                   "remain)", how, len(copies), len(eval_rows), copies[0].get("pair_id"), len(kept))
    if not kept:
        raise ValueError(f"{how}: every held-out row is a copy of a training row, so no eval row is left; deduplicate "
                         "the data or give an eval_file")
    return kept


#: ``eval_fraction: auto``: this share of the training rows is held out, within [floor, cap] rows, when the
#: training set has at least AUTO_EVAL_MIN_ROWS rows (so that every run reports a held-out number; fewer rows make
#: a held-out figure mostly noise, and the run says so)
AUTO_EVAL_FRACTION, AUTO_EVAL_FLOOR, AUTO_EVAL_CAP, AUTO_EVAL_MIN_ROWS = 0.05, 16, 500, 200


def auto_eval_rows(train_rows: int) -> int:
    """How many of ``train_rows`` rows ``eval_fraction: auto`` holds out: 5% within [16, 500], none below 200."""
    if train_rows < AUTO_EVAL_MIN_ROWS:
        return 0
    return min(AUTO_EVAL_CAP, max(AUTO_EVAL_FLOOR, round(AUTO_EVAL_FRACTION * train_rows)))


def _auto_split_applies(config: AdaptiveDPOConfig) -> bool:
    return (config.eval_fraction is None and config.eval_file is None and config.test_split_size is None
            and not config.dataset_streaming)


def prepare_rows(config: AdaptiveDPOConfig) -> PreparedData:
    auto = _auto_split_applies(config)
    explicit_fraction = (config.eval_fraction or 0) > 0
    held_out_later = config.eval_file is None and (explicit_fraction or config.test_split_size is not None)
    limit = None if held_out_later else config.max_train_samples
    if auto and config.max_train_samples is not None:
        # the held-out rows come on top of max_train_samples training rows
        limit = config.max_train_samples + auto_eval_rows(config.max_train_samples)
    if config.datasets:
        assert not isinstance(config.datasets, str)  # parsed in __post_init__
        train_rows, reports = load_mixture_rows(config.datasets, skip_invalid=config.skip_invalid_rows,
                                                implicit_prompt_marker=config.implicit_prompt_marker, limit=limit,
                                                weight_column=config.weight_column, beta_column=config.beta_column)
    else:
        assert config.train_file is not None  # check_training_data: train_file, dataset_name (sets it) or datasets
        train_rows, train_report = load_preference_rows(
            config.train_file, config.train_split, skip_invalid=config.skip_invalid_rows,
            config_name=config.dataset_config, implicit_prompt_marker=config.implicit_prompt_marker, limit=limit,
            weight_column=config.weight_column, beta_column=config.beta_column)
        reports = [train_report]
    eval_rows = None
    seed = config.data_seed if config.data_seed is not None else config.seed
    if config.test_split_size is not None and config.eval_file is None:

        train_rows, eval_rows = split_off_test_rows(train_rows, config.test_split_size, seed)
        train_rows = train_rows[: config.max_train_samples]
        eval_rows = held_out_without_copies(train_rows, eval_rows, f"test_split_size={config.test_split_size}")
        eval_rows = eval_rows[: config.max_eval_samples]
    elif config.eval_file:
        eval_rows, eval_report = load_preference_rows(
            config.eval_file, config.eval_split, skip_invalid=config.skip_invalid_rows,
            config_name=config.dataset_config if config.eval_file == config.train_file else None,
            implicit_prompt_marker=config.implicit_prompt_marker, limit=config.max_eval_samples)
        reports.append(eval_report)
        eval_rows = held_out_without_copies(train_rows, eval_rows, f"eval_file={config.eval_file}", drop=False)
    elif explicit_fraction or (auto and auto_eval_rows(_wanted(config, len(train_rows))) > 0):
        order = list(range(len(train_rows)))
        random.Random(seed).shuffle(order)
        if explicit_fraction:
            assert config.eval_fraction is not None
            n_eval, how = max(1, round(config.eval_fraction * len(train_rows))), f"eval_fraction={config.eval_fraction}"
        else:
            n_eval = auto_eval_rows(_wanted(config, len(train_rows)))
            how = "eval_fraction=auto"
            logger.info("eval_fraction=auto: %d of the %d training rows held out for evaluation (5%%, at least %d, at "
                        "most %d; eval_fraction: 0 trains on all of them)", n_eval, len(train_rows), AUTO_EVAL_FLOOR,
                        AUTO_EVAL_CAP)
        held = set(order[:n_eval])
        eval_rows = [r for i, r in enumerate(train_rows) if i in held]
        train_rows = [r for i, r in enumerate(train_rows) if i not in held]
        if config.max_train_samples is not None:
            train_rows = train_rows[: config.max_train_samples]
        eval_rows = held_out_without_copies(train_rows, eval_rows, how)
        if config.max_eval_samples is not None:
            eval_rows = eval_rows[: config.max_eval_samples]
    elif auto:
        logger.warning("no held-out split: %d training rows are fewer than the %d that eval_fraction=auto needs to "
                       "hold out 5%%, so this run reports no held-out number; give an eval_file, or set "
                       "eval_fraction", len(train_rows), AUTO_EVAL_MIN_ROWS)
    return PreparedData(train_rows, eval_rows, reports)


def _wanted(config: AdaptiveDPOConfig, loaded: int) -> int:
    """The training rows a run asks for: max_train_samples when set (and fewer were not loaded)."""
    if config.max_train_samples is None:
        return loaded
    return min(loaded, config.max_train_samples)


def chat_conversion(config: AdaptiveDPOConfig, tokenizer: Any) -> str | None:
    """Which text rows ``chat_format`` renders as chat messages: "all", "hh" (Anthropic HH text only) or None."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if config.chat_format == "raw" or (config.chat_format == "auto" and (
            config.model_name_or_path in TINY_PRESETS or not has_template)):
        return None
    if not has_template:
        raise ValueError("chat_format=messages needs a tokenizer with a chat template; this one has none "
                         "(use chat_format: raw)")
    return "hh" if config.chat_format == "auto" else "all"


def apply_chat_format(config: AdaptiveDPOConfig, data: PreparedData, tokenizer: Any) -> int:
    """Render text rows through the chat template (``chat_format``); returns how many rows were converted."""
    conversion = chat_conversion(config, tokenizer)
    if conversion is None:
        return 0
    converted = 0
    for rows in (data.train_rows, data.eval_rows or []):
        for i, row in enumerate(rows):
            as_messages = text_row_as_messages(row, only_hh=conversion == "hh")
            if as_messages is not None:
                rows[i] = as_messages
                converted += 1
    if converted:
        logger.info("chat format: %d text rows rendered as chat messages through the tokenizer's template (HH "
                    "'Human:/Assistant:' turns become user/assistant messages; chat_format: raw keeps the text)",
                    converted)
    return converted


#: rows of a stream read to train a tiny preset's tokenizer
TOKENIZER_SAMPLE_ROWS = 2000


def streamed_sources(config: AdaptiveDPOConfig) -> tuple[Any, Any]:
    """``dataset_streaming``: the raw training and evaluation streams (``IterableDataset``; eval None without
    eval_file / dataset_test_split)."""

    if config.datasets:
        assert not isinstance(config.datasets, str)  # parsed in __post_init__
        train = streamed_mixture(config.datasets)
    else:
        assert config.train_file is not None  # check_training_data: train_file, dataset_name (sets it) or datasets
        train = streamed_source(config.train_file, config.train_split, config.dataset_config)
    if config.max_train_samples is not None:
        train = train.take(config.max_train_samples)
    evaluation = None
    if config.eval_file:
        evaluation = streamed_source(config.eval_file, config.eval_split,
                                     config.dataset_config if config.eval_file == config.train_file else None)
        if config.max_eval_samples is not None:
            evaluation = evaluation.take(config.max_eval_samples)
    return train, evaluation


def stream_sample_rows(config: AdaptiveDPOConfig, stream: Any) -> list[dict[str, Any]]:
    """The first rows of a stream, validated, when a tiny preset trains its tokenizer on them; else none (nothing
    is read ahead)."""
    import itertools


    if config.model_name_or_path not in TINY_PRESETS or config.tokenizer_name_or_path:
        return []
    head = itertools.islice(iter(stream), TOKENIZER_SAMPLE_ROWS)
    return [normalised_row(raw, i, config, stream_label(config)) for i, raw in enumerate(head)]


def stream_label(config: AdaptiveDPOConfig, evaluation: bool = False) -> str:
    if evaluation:
        return f"{config.eval_file} (streamed)"
    return "datasets mixture (streamed)" if config.datasets else f"{config.train_file} (streamed)"
