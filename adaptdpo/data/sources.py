"""Where the training rows come from besides one file: TRL's dataset mixtures (``datasets:``) and streamed data
(``dataset_streaming``).

A mixture entry has ``datasets.load_dataset``'s arguments (``path``, ``name``, ``data_dir``, ``data_files``,
``split``) plus ``columns`` (the columns kept) and ``fraction`` (shares of the mixture), as TRL's
``DatasetMixtureConfig``: with fractions, the first ``round(w_i · N)`` rows of entry i are kept, N the largest
mixture size that oversamples none (TRL's rule). A local file given as ``path`` is read by adaptdpo's own
readers, so errors name the file, line and field, as for ``train_file``. Every row is validated; errors name
``datasets[i] <path>``, the row within that entry and the field.

Streaming (``datasets.load_dataset(..., streaming=True)``) returns raw ``IterableDataset`` objects; the trainer
validates and tokenises each row as it arrives (:func:`adaptdpo.training.inputs.streamed_dataset`).
"""

from __future__ import annotations

import logging
import math
import os
import random
from typing import Any

from adaptdpo.data.readers import (
    LOCAL_SUFFIXES,
    DataValidationError,
    LoadReport,
    is_saved_dataset,
    load_saved_split,
    read_rows,
)
from adaptdpo.data.rows import load_preference_rows

logger = logging.getLogger("adaptdpo")

#: datasets' builder for each local file suffix (for streaming a local file)
BUILDERS = {".jsonl.gz": "json", ".json.gz": "json", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
            ".csv": "csv"}


def entry_label(index: int, entry: dict[str, Any]) -> str:
    """How a mixture entry is named in messages: ``datasets[1] json (a.jsonl, b.jsonl)``."""
    files = entry.get("data_files")
    if isinstance(files, (list, tuple)):
        files = ", ".join(map(str, files))
    elif isinstance(files, dict):
        files = ", ".join(f"{k}: {v}" for k, v in files.items())
    return f"datasets[{index}] {entry['path']}" + (f" ({files})" if files else "")


def _is_local_file(entry: dict[str, Any]) -> bool:
    return os.path.isfile(entry["path"]) and not entry.get("data_files") and not entry.get("data_dir")


def _load_entry(entry: dict[str, Any], streaming: bool) -> Any:
    """One entry through ``datasets.load_dataset`` (a local file through its builder when streaming)."""
    import datasets

    path, kwargs = entry["path"], {"split": entry.get("split", "train"), "streaming": streaming}
    if streaming and _is_local_file(entry):
        suffix = next((s for s in BUILDERS if path.lower().endswith(s)), None)
        if suffix is None:
            raise ValueError(f"{path}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}")
        return datasets.load_dataset(BUILDERS[suffix], data_files=path, **kwargs)
    for key in ("name", "data_dir", "data_files"):
        if entry.get(key) is not None:
            kwargs[key] = entry[key]
    return datasets.load_dataset(path, **kwargs)


def _raw_rows(entry: dict[str, Any], label: str) -> list[tuple[Any, int | None]]:
    """Every row of an entry as (row, line or None), only ``columns`` kept."""
    if _is_local_file(entry):
        rows = list(read_rows(entry["path"], entry.get("split", "train")))
    else:
        rows = [(dict(row), None) for row in _load_entry(entry, streaming=False)]
    columns = entry.get("columns")
    if columns:
        for row, _ in rows:
            if isinstance(row, DataValidationError):
                continue
            missing = [c for c in columns if c not in row]
            if missing:
                raise ValueError(f"{label}: columns {missing} are not in the data (it has {sorted(row)})")
        rows = [(r if isinstance(r, DataValidationError) else {c: r[c] for c in columns}, line) for r, line in rows]
    return rows


def fraction_counts(sizes: list[int], fractions: list[float]) -> list[int]:
    """TRL's mixture sizes: shares w_i = f_i / Σf, N = min_i size_i / w_i (no entry oversampled), entry i keeps
    its first round(w_i · N) rows."""
    total_fraction = sum(fractions)
    weights = [f / total_fraction for f in fractions]
    n = min(size / w for size, w in zip(sizes, weights, strict=True) if w > 0)
    return [round(w * n) for w in weights]


def load_mixture_rows(entries: list[dict[str, Any]], *, skip_invalid: bool = False,
                      implicit_prompt_marker: str | None = "\n\nAssistant:", limit: int | None = None,
                      weight_column: str | None = None,
                      beta_column: str | None = None) -> tuple[list[dict[str, Any]], list[LoadReport]]:
    """The rows of a mixture, validated entry by entry and concatenated in entry order; ``pair_id`` runs over
    the whole mixture. Returns the rows and one report per entry."""
    labels = [entry_label(i, e) for i, e in enumerate(entries)]
    raw = [_raw_rows(entry, label) for entry, label in zip(entries, labels, strict=True)]
    if all(e.get("fraction") is not None for e in entries):
        counts = fraction_counts([len(r) for r in raw], [float(e["fraction"]) for e in entries])
        raw = [rows[:count] for rows, count in zip(raw, counts, strict=True)]
        logger.info("dataset mixture by fraction: %s", ", ".join(f"{label}: {count} rows"
                                                                 for label, count in zip(labels, counts, strict=True)))
    rows: list[dict[str, Any]] = []
    reports: list[LoadReport] = []
    kind: tuple[str, bool] | None = None
    for label, entry_rows in zip(labels, raw, strict=True):
        if not entry_rows:
            raise ValueError(f"{label}: no rows")
        part, report = load_preference_rows(label, skip_invalid=skip_invalid, raw_rows=entry_rows,
                                            implicit_prompt_marker=implicit_prompt_marker,
                                            weight_column=weight_column, beta_column=beta_column)
        conversational = isinstance(part[0]["chosen"], list)
        if kind is not None and kind[1] != conversational:
            raise ValueError(f"{label} is {'conversational' if conversational else 'plain text'} but {kind[0]} is "
                             "not: a mixture's rows must all be one or the other")
        kind = kind or (label, conversational)
        for row in part:
            row["pair_id"] = len(rows)
            rows.append(row)
        reports.append(report)
    if limit is not None:
        rows = rows[:limit]
    logger.info("dataset mixture: %d rows from %d datasets", len(rows), len(entries))
    return rows, reports


def split_off_test_rows(rows: list[dict[str, Any]], size: float, seed: int) -> tuple[list[dict[str, Any]],
                                                                                      list[dict[str, Any]]]:
    """(train, test): ``size`` rows (a share when below 1, rounded up as datasets' train_test_split) drawn with
    ``seed``; both keep the data's order."""
    n_test = int(size) if size >= 1 else math.ceil(size * len(rows))
    if not 0 < n_test < len(rows):
        raise ValueError(f"test_split_size={size} leaves {len(rows) - n_test} of {len(rows)} rows for training")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_test])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def streamed_source(source: str, split: str, config_name: str | None) -> Any:
    """A file, folder or hub dataset as a raw ``IterableDataset`` (``datasets.load_dataset(streaming=True)``)."""
    if os.path.isdir(source) and is_saved_dataset(source):  # stream a save_to_disk folder's arrow files
        return load_saved_split(source, split).to_iterable_dataset()
    if not os.path.exists(source) and (source.lower().endswith(LOCAL_SUFFIXES) or source.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"{source}: no such file or directory")
    return _load_entry({"path": source, "split": split, "name": config_name}, streaming=True)


def streamed_mixture(entries: list[dict[str, Any]]) -> Any:
    """A mixture as one raw ``IterableDataset`` (entries one after the other, as TRL concatenates them)."""
    import datasets

    if any(e.get("fraction") is not None for e in entries):
        raise ValueError("datasets: fraction needs each dataset's size, which a stream does not have "
                         "(as in TRL): drop fraction or dataset_streaming")
    parts = []
    for entry in entries:
        part = _load_entry(entry, streaming=True)
        if entry.get("columns"):
            part = part.select_columns(entry["columns"])
        parts.append(part)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
