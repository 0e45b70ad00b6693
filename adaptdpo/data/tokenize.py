"""Tokenising a preference dataset with ``datasets``: ``Dataset.map`` (``dataset_num_proc`` workers), cached on disk
by content, done once by the main process while the other ranks wait and then load it.

The rules are :func:`adaptdpo.data.tokenize.tokenize_pair`'s (TRL 1.16's tokenisation, our truncation). A pair that
cannot
be trained on (no completion tokens, or chosen and rejected identical after truncation) is an error naming the
source, row and field, or with a ``report`` (``skip_invalid_rows``) a skipped row listed in it, exactly as
:func:`adaptdpo.data.tokenize.tokenize_rows` does; workers return the problem instead of raising it, so the first
problem in
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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from adaptdpo.data.readers import DataValidationError, Field, LoadReport, Message

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


# --------------------------------------------------------------------------------------------- tokenising


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False


def tokenize_pair(row: dict[str, Field], tokenizer: Any, max_length: int | None = None,
                  max_prompt_length: int | None = None) -> TokenizedPair:
    """Tokenise one normalised row the way TRL 1.16 does, then truncate.

    Plain text gets EOS appended to each completion; messages are rendered with the chat template (the
    prompt with the generation prompt). As in TRL, the completion starts where the tokenised prompt and
    prompt+completion diverge. Truncation (classic DPO rule): when prompt + longer completion exceeds
    ``max_length``, the prompt keeps its last ``max_prompt_length`` tokens (default ``max_length // 2``),
    then completions keep their first tokens up to ``max_length``.
    """
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if isinstance(chosen, list):
        extra = dict(row.get("chat_template_kwargs") or {})
        if row.get("tools") is not None:
            extra["tools"] = row["tools"]

        def render(messages: list[Message], generation: bool) -> list[int]:
            out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation,
                                                return_dict=True, **extra)
            return list(out["input_ids"])

        prompt_ids = render(prompt, True) if prompt else []
        full_chosen, full_rejected = render(prompt + chosen, False), render(prompt + rejected, False)
    else:
        eos = tokenizer.eos_token or ""
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        full_chosen = tokenizer(prompt + chosen, add_special_tokens=True)["input_ids"]
        full_rejected = tokenizer(prompt + rejected, add_special_tokens=True)["input_ids"]
    cut = min(common_prefix_length(prompt_ids, full_chosen), common_prefix_length(prompt_ids, full_rejected))
    pair = TokenizedPair(list(prompt_ids[:cut]), list(full_chosen[cut:]), list(full_rejected[cut:]))
    if max_length is not None:
        longest = max(len(pair.chosen_ids), len(pair.rejected_ids))
        if len(pair.prompt_ids) + longest > max_length:
            pair.truncated = True
            keep_prompt = max_prompt_length if max_prompt_length is not None else max_length // 2
            if len(pair.prompt_ids) > keep_prompt:
                pair.prompt_ids = pair.prompt_ids[-keep_prompt:] if keep_prompt > 0 else []
            room = max_length - len(pair.prompt_ids)
            if room < 1:
                raise ValueError(f"max_prompt_length={keep_prompt} leaves no room for a completion in "
                                 f"max_length={max_length}")
            pair.chosen_ids = pair.chosen_ids[:room]
            pair.rejected_ids = pair.rejected_ids[:room]
    return pair


def pair_problem(pair: TokenizedPair, max_length: int | None) -> tuple[str, str] | None:
    """(field, problem) when a tokenised pair carries no preference signal (a completion without tokens, or two
    completions with the same ids, possible after truncation), else None."""
    if not pair.chosen_ids or not pair.rejected_ids:
        return ("chosen" if not pair.chosen_ids else "rejected"), "completion has no tokens after tokenisation"
    if pair.chosen_ids == pair.rejected_ids:
        return "rejected", f"identical to chosen after tokenisation/truncation to max_length={max_length}"
    return None


def pair_example(pair: TokenizedPair, pair_id: int) -> dict[str, Any]:
    """The trainer's columns for one pair; ``length`` is the padded row width it needs (group_by_length)."""
    return {"prompt_ids": pair.prompt_ids, "chosen_ids": pair.chosen_ids, "rejected_ids": pair.rejected_ids,
            "pair_id": int(pair_id),
            "length": len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))}


def tokenize_rows(rows: Sequence[dict[str, Field]], tokenizer: Any, max_length: int | None,
                  max_prompt_length: int | None, source: str = "<data>",
                  report: LoadReport | None = None) -> tuple[list[dict[str, Any]], int]:
    """Tokenise normalised rows; returns the examples and how many were truncated.

    A pair whose two completions tokenise to the same ids (possible after truncation) carries no preference
    signal: an error, or with a ``report`` (``skip_invalid_rows``) a skipped row listed in it.
    """
    examples, truncated = [], 0
    for i, row in enumerate(rows):
        pair = tokenize_pair(row, tokenizer, max_length, max_prompt_length)
        found = pair_problem(pair, max_length)
        if found is not None:
            problem = DataValidationError(source, int(row.get("pair_id", i)), *found)
            if report is None:
                raise problem
            report.skipped.append(problem)
            report.rows_kept -= 1
            continue
        truncated += pair.truncated
        examples.append(pair_example(pair, int(row.get("pair_id", i))))
    return examples, truncated
