"""Tokenising a preference dataset with ``datasets``: ``Dataset.map`` (``dataset_num_proc`` workers), cached on disk
by content, done once by the main process while the other ranks wait and then load it.

The rules are :func:`adaptdpo.data.tokenize_pair`'s (TRL 1.16's tokenisation, our truncation). A pair that cannot
be trained on (no completion tokens, or chosen and rejected identical after truncation) is an error naming the
source, row and field, or with a ``report`` (``skip_invalid_rows``) a skipped row listed in it, exactly as
:func:`adaptdpo.data.tokenize_rows` does; workers return the problem instead of raising it, so the first problem in
row order is the one reported.

The cache key hashes the rows, the tokenizer (vocabulary, merges, special tokens, chat template), the length
settings and :data:`TOKENIZATION_VERSION`; the cache lives under ``$ADAPTDPO_CACHE/tokenized`` (default
``~/.cache/adaptdpo/tokenized``), so a second run, a resumed run or another rank reads it instead of tokenising.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Any

from .data import DataValidationError, LoadReport, pair_example, pair_problem, tokenize_pair

logger = logging.getLogger("adaptdpo")

#: bump when the tokenisation rules change, so that old caches are not reused
TOKENIZATION_VERSION = 1
COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "pair_id", "length")


def cache_root() -> str:
    base = os.environ.get("ADAPTDPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "adaptdpo")
    return os.path.join(base, "tokenized")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr(getattr(tokenizer, "chat_template", None)).encode())
    h.update(repr(sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())).encode())
    h.update(type(tokenizer).__name__.encode())
    return h.hexdigest()


def rows_fingerprint(rows: list[dict[str, Any]], tokenizer: Any, max_length: int | None,
                     max_prompt_length: int | None) -> str:
    h = hashlib.sha256(f"v{TOKENIZATION_VERSION} {max_length} {max_prompt_length}".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
    return h.hexdigest()[:24]


def _tokenize_batch(batch: dict[str, list], tokenizer: Any, max_length: int | None,
                    max_prompt_length: int | None) -> dict[str, list]:
    out: dict[str, list] = {name: [] for name in (*COLUMNS, "truncated", "problem_field", "problem")}
    for i in range(len(batch["pair_id"])):
        pair = tokenize_pair(json.loads(batch["row"][i]), tokenizer, max_length, max_prompt_length)
        field, problem = pair_problem(pair, max_length) or (None, None)
        for key, value in pair_example(pair, batch["pair_id"][i]).items():
            out[key].append(value)
        out["truncated"].append(bool(pair.truncated))
        out["problem_field"].append(field)
        out["problem"].append(problem)
    return out


def tokenize_dataset(rows: list[dict[str, Any]], tokenizer: Any, max_length: int | None,
                     max_prompt_length: int | None, source: str = "<data>", report: LoadReport | None = None,
                     num_proc: int | None = None, main_process_first: Any = None) -> tuple[Any, int]:
    """A tokenised ``datasets.Dataset`` of ``rows`` (normalised rows with ``pair_id``) and how many were truncated."""
    import contextlib

    import datasets

    key = rows_fingerprint(rows, tokenizer, max_length, max_prompt_length)
    folder = os.path.join(cache_root(), key)
    context = main_process_first(desc=f"tokenise {source}") if main_process_first else contextlib.nullcontext()
    with context:
        if os.path.isdir(folder):
            tokenised = datasets.load_from_disk(folder)
            logger.info("%s: %d tokenised pairs loaded from the cache %s", source, len(tokenised), folder)
        else:
            # each row as JSON text: text and message rows, tool calls, tools and content parts all fit one schema
            wanted = ("prompt", "chosen", "rejected", "tools", "chat_template_kwargs")
            raw = datasets.Dataset.from_dict({
                "row": [json.dumps({k: row[k] for k in wanted if k in row}, ensure_ascii=False) for row in rows],
                "pair_id": [int(row["pair_id"]) for row in rows]})
            workers = num_proc if num_proc and num_proc > 1 and len(rows) >= 2 * num_proc else None
            tokenised = raw.map(_tokenize_batch, batched=True, batch_size=256, num_proc=workers,
                                remove_columns=raw.column_names, desc=f"tokenising {source}",
                                fn_kwargs={"tokenizer": tokenizer, "max_length": max_length,
                                           "max_prompt_length": max_prompt_length})
            tmp = f"{folder}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tokenised.save_to_disk(tmp)
            os.replace(tmp, folder)
            tokenised = datasets.load_from_disk(folder)
    problems = [(i, f, p) for i, (f, p) in enumerate(zip(tokenised["problem_field"], tokenised["problem"],
                                                        strict=True)) if p is not None]
    keep = list(range(len(tokenised)))
    if problems:
        pair_ids = tokenised["pair_id"]
        if report is None:
            i, field, problem = problems[0]
            raise DataValidationError(source, int(pair_ids[i]), field, problem)
        for i, field, problem in problems:
            report.skipped.append(DataValidationError(source, int(pair_ids[i]), field, problem))
            report.rows_kept -= 1
        bad = {i for i, _, _ in problems}
        keep = [i for i in keep if i not in bad]
        tokenised = tokenised.select(keep)
    truncated = int(sum(tokenised["truncated"]))
    return tokenised.remove_columns(["truncated", "problem_field", "problem"]), truncated
