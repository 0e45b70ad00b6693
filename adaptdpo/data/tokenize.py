"""Tokenising a preference dataset with ``datasets``: ``Dataset.map`` (``dataset_num_proc`` workers), cached on disk
by content, done once by the main process while the other ranks wait and then load it.

The rules are :func:`adaptdpo.data.tokenize.tokenize_pair`'s (TRL 1.16's tokenisation and, by default, its truncation:
``truncation_mode``). A pair that cannot
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

from adaptdpo.data.readers import DataValidationError, LoadReport, Message, Row

#: the per-pair columns (:data:`adaptdpo.data.rows.PAIR_VALUE_COLUMNS`) a tokenised dataset carries when its rows have
#: them (named here to keep this module below rows)
PAIR_VALUE_COLUMNS = ("weight", "beta")

logger = logging.getLogger("adaptdpo")

#: bump when the tokenisation rules change, so that old caches are not reused
TOKENIZATION_VERSION = 1
COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "pair_id", "length")

#: how a pair longer than max_length is cut: TRL 1.16's two modes, and adaptdpo's own rule
TRUNCATION_MODES = ("keep_start", "keep_end", "keep_prompt_end")


def resolve_truncation_mode(mode: str | None, max_prompt_length: int | None = None) -> str:
    """``truncation_mode`` with its default resolved: TRL's keep_start, or keep_prompt_end (adaptdpo's rule, the one
    ``max_prompt_length`` belongs to) when ``max_prompt_length`` is set."""
    if mode is None:
        return "keep_prompt_end" if max_prompt_length is not None else "keep_start"
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode={mode!r}: choose one of {', '.join(TRUNCATION_MODES)}")
    return mode


def keep_end_row(prompt: Sequence[int], completion: Sequence[int], max_length: int) -> tuple[list[int], list[int]]:
    """TRL's keep_end cut of one sequence: the last ``max_length`` tokens of prompt + completion, as (the prompt's
    part, the completion's part)."""
    drop = max(0, len(prompt) + len(completion) - max_length)
    if drop <= len(prompt):
        return list(prompt[drop:]), list(completion)
    return [], list(completion[drop - len(prompt):])


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
                     max_prompt_length: int | None, truncation_mode: str | None = None) -> str:
    mode = resolve_truncation_mode(truncation_mode, max_prompt_length)
    h = hashlib.sha256(f"v{TOKENIZATION_VERSION} {max_length} {max_prompt_length} {mode}".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
    return h.hexdigest()[:24]


def _tokenize_batch(batch: dict[str, list], tokenizer: Any, max_length: int | None,
                    max_prompt_length: int | None, truncation_mode: str | None = None) -> dict[str, list]:
    out: dict[str, list] = {name: [] for name in (*COLUMNS, "truncated", "dropped", "problem_field", "problem")}
    for key in PAIR_VALUE_COLUMNS:  # per-pair weight / β: carried through as they are
        if key in batch:
            out[key] = list(batch[key])
    for i in range(len(batch["pair_id"])):
        pair = tokenize_pair(json.loads(batch["row"][i]), tokenizer, max_length, max_prompt_length, truncation_mode)
        found = None if pair.dropped else pair_problem(pair, max_length, truncation_mode)
        field, problem = found or (None, None)
        for key, value in pair_example(pair, batch["pair_id"][i], max_length, truncation_mode).items():
            out[key].append(value)
        out["truncated"].append(bool(pair.truncated))
        out["dropped"].append(bool(pair.dropped))
        out["problem_field"].append(field)
        out["problem"].append(problem)
    return out


def tokenize_dataset(rows: list[dict[str, Any]], tokenizer: Any, max_length: int | None,
                     max_prompt_length: int | None, source: str = "<data>", report: LoadReport | None = None,
                     num_proc: int | None = None, main_process_first: Any = None,
                     truncation_mode: str | None = None) -> tuple[Any, int]:
    """A tokenised ``datasets.Dataset`` of ``rows`` (normalised rows with ``pair_id``) and how many were truncated.

    With ``truncation_mode`` keep_start, pairs whose prompt alone fills ``max_length`` are dropped (as TRL), with a
    warning that counts them."""
    import contextlib

    import datasets

    key = rows_fingerprint(rows, tokenizer, max_length, max_prompt_length, truncation_mode)
    folder = os.path.join(cache_root(), key)
    context = main_process_first(desc=f"tokenise {source}") if main_process_first else contextlib.nullcontext()
    with context:
        if os.path.isdir(folder):
            tokenised = datasets.load_from_disk(folder)
            logger.info("%s: %d tokenised pairs loaded from the cache %s", source, len(tokenised), folder)
        else:
            # each row as JSON text: text and message rows, tool calls, tools and content parts all fit one schema
            wanted = ("prompt", "chosen", "rejected", "tools", "chat_template_kwargs")
            columns = {"row": [json.dumps({k: row[k] for k in wanted if k in row}, ensure_ascii=False) for row in rows],
                       "pair_id": [int(row["pair_id"]) for row in rows]}
            for key in PAIR_VALUE_COLUMNS:
                if key in rows[0]:
                    columns[key] = [float(row[key]) for row in rows]
            raw = datasets.Dataset.from_dict(columns)
            workers = num_proc if num_proc and num_proc > 1 and len(rows) >= 2 * num_proc else None
            tokenised = raw.map(_tokenize_batch, batched=True, batch_size=256, num_proc=workers,
                                remove_columns=raw.column_names, desc=f"tokenising {source}",
                                fn_kwargs={"tokenizer": tokenizer, "max_length": max_length,
                                           "max_prompt_length": max_prompt_length,
                                           "truncation_mode": truncation_mode})
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
    dropped = {i for i, flag in enumerate(tokenised["dropped"]) if flag}
    if dropped:
        warn_dropped(source, len(dropped), max_length)
        keep = [i for i in keep if i not in dropped]
        if not keep:
            raise ValueError(f"{source}: no pair left: every prompt fills max_length={max_length} (truncation_mode "
                             "keep_start drops such pairs, as TRL); raise max_length or use truncation_mode keep_end "
                             "or keep_prompt_end")
    if len(keep) < len(tokenised):
        tokenised = tokenised.select(keep)
    truncated = int(sum(tokenised["truncated"]))
    return tokenised.remove_columns(["truncated", "dropped", "problem_field", "problem"]), truncated


def warn_dropped(source: str, count: int, max_length: int | None) -> None:
    logger.warning("%s: %d pair(s) dropped: the prompt alone fills max_length=%s, so truncation_mode keep_start (TRL's "
                   "default) leaves no completion token (TRL drops them too, silently); truncation_mode keep_end or "
                   "keep_prompt_end keeps them", source, count, max_length)


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
    dropped: bool = False  # keep_start: the prompt alone fills max_length (TRL drops the pair)


def tokenize_pair(row: Row, tokenizer: Any, max_length: int | None = None,
                  max_prompt_length: int | None = None, truncation_mode: str | None = None) -> TokenizedPair:
    """Tokenise one normalised row the way TRL 1.16 does, then truncate as ``truncation_mode`` says.

    Plain text gets EOS appended to each completion; messages are rendered with the chat template (the
    prompt with the generation prompt). As in TRL, the completion starts where the tokenised prompt and
    prompt+completion diverge. Truncation, when prompt + a completion exceeds ``max_length``:

    - ``keep_start`` (TRL's default): each sequence keeps its first ``max_length`` tokens, so the prompt stays whole
      and the completions keep their start; a pair whose prompt alone fills ``max_length`` is marked ``dropped``;
    - ``keep_end`` (TRL): each sequence keeps its last ``max_length`` tokens. Its two sequences may keep different
      parts of the prompt, which one prompt cannot hold: the ids stay whole here and the collator cuts each stacked
      row (``PreferenceCollator(keep_end_max_length=...)``), as TRL's collator does;
    - ``keep_prompt_end`` (adaptdpo's rule, the default when ``max_prompt_length`` is given): the prompt keeps its
      last ``max_prompt_length`` tokens (default ``max_length // 2``), then the completions their first tokens up to
      ``max_length``; no pair is dropped.
    """
    mode = resolve_truncation_mode(truncation_mode, max_prompt_length)
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
    return truncate_pair(pair, max_length, max_prompt_length, mode)


def truncate_pair(pair: TokenizedPair, max_length: int | None, max_prompt_length: int | None = None,
                  truncation_mode: str | None = None) -> TokenizedPair:
    """Cut a tokenised pair longer than ``max_length`` as ``truncation_mode`` says (see :func:`tokenize_pair`)."""
    mode = resolve_truncation_mode(truncation_mode, max_prompt_length)
    if max_length is None:
        return pair
    longest = max(len(pair.chosen_ids), len(pair.rejected_ids))
    if len(pair.prompt_ids) + longest <= max_length:
        return pair
    pair.truncated = True
    if mode == "keep_end":  # cut per stacked row by the collator
        return pair
    if mode == "keep_start":
        if len(pair.prompt_ids) >= max_length:
            pair.dropped = True
            return pair
        room = max_length - len(pair.prompt_ids)
    else:
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


def pair_problem(pair: TokenizedPair, max_length: int | None,
                 truncation_mode: str | None = None) -> tuple[str, str] | None:
    """(field, problem) when a tokenised pair carries no preference signal (a completion without tokens, or two
    completions with the same ids, possible after truncation), else None. With keep_end, judged on the rows the
    collator will cut (a row that lost its whole prompt does not score its first token, as TRL)."""
    if not pair.chosen_ids or not pair.rejected_ids:
        return ("chosen" if not pair.chosen_ids else "rejected"), "completion has no tokens after tokenisation"
    if truncation_mode == "keep_end" and max_length is not None:
        chosen = keep_end_row(pair.prompt_ids, pair.chosen_ids, max_length)
        rejected = keep_end_row(pair.prompt_ids, pair.rejected_ids, max_length)
        for name, (prompt, completion) in (("chosen", chosen), ("rejected", rejected)):
            if len(completion) - (0 if prompt else 1) < 1:
                return name, f"no completion token is scored after truncation to max_length={max_length}"
        if chosen == rejected:
            return "rejected", f"identical to chosen after truncation to max_length={max_length} (keep_end)"
        return None
    if pair.chosen_ids == pair.rejected_ids:
        return "rejected", f"identical to chosen after tokenisation/truncation to max_length={max_length}"
    return None


def pair_example(pair: TokenizedPair, pair_id: int, max_length: int | None = None,
                 truncation_mode: str | None = None, row: dict[str, Any] | None = None) -> dict[str, Any]:
    """The trainer's columns for one pair; ``length`` is the padded row width it needs (group_by_length); the row's
    per-pair ``weight`` / ``beta`` when it has them."""
    length = len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))
    if truncation_mode == "keep_end" and max_length is not None:
        length = min(length, max_length)
    out = {"prompt_ids": pair.prompt_ids, "chosen_ids": pair.chosen_ids, "rejected_ids": pair.rejected_ids,
           "pair_id": int(pair_id), "length": length}
    for key in PAIR_VALUE_COLUMNS:
        if row is not None and key in row:
            out[key] = float(row[key])
    return out


def tokenize_rows(rows: Sequence[Row], tokenizer: Any, max_length: int | None,
                  max_prompt_length: int | None, source: str = "<data>",
                  report: LoadReport | None = None,
                  truncation_mode: str | None = None) -> tuple[list[dict[str, Any]], int]:
    """Tokenise normalised rows; returns the examples and how many were truncated.

    A pair whose two completions tokenise to the same ids (possible after truncation) carries no preference
    signal: an error, or with a ``report`` (``skip_invalid_rows``) a skipped row listed in it. With keep_start,
    pairs whose prompt fills ``max_length`` are dropped with a warning (as TRL drops them).
    """
    examples, truncated, dropped = [], 0, 0
    for i, row in enumerate(rows):
        pair = tokenize_pair(row, tokenizer, max_length, max_prompt_length, truncation_mode)
        if pair.dropped:
            dropped += 1
            continue
        found = pair_problem(pair, max_length, truncation_mode)
        if found is not None:
            problem = DataValidationError(source, int(row.get("pair_id", i)), *found)
            if report is None:
                raise problem
            report.skipped.append(problem)
            report.rows_kept -= 1
            continue
        truncated += pair.truncated
        examples.append(pair_example(pair, int(row.get("pair_id", i)), max_length, truncation_mode, row))
    if dropped:
        warn_dropped(source, dropped, max_length)
    return examples, truncated
