"""Preference data: load, normalise, validate, tokenise, collate.

Accepted row formats (TRL's, so a TRL user's data loads unchanged):

* standard, explicit prompt: ``prompt``, ``chosen``, ``rejected`` strings;
* standard, implicit prompt: ``chosen`` and ``rejected`` strings that share the prompt as a prefix
  (Anthropic HH's raw format); the prompt is cut at the last ``implicit_prompt_marker``
  (``"\\n\\nAssistant:"``) inside the shared prefix, else at the longest common prefix;
* conversational, explicit or implicit prompt: lists of ``{"role", "content"}`` messages, rendered
  with the tokenizer's chat template.

Every row is checked before anything is trained on it. A bad row raises :class:`DataValidationError`
naming the file, the row and the field; with ``skip_invalid=True`` bad rows are skipped instead and
listed in the returned :class:`LoadReport` (nothing is dropped silently).
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

Message = dict[str, str]
Field = str | list[Message]

LOCAL_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet", ".csv")


class DataValidationError(ValueError):
    """A malformed row: carries the source, the row index (0-based) and the offending field."""

    def __init__(self, source: str, row: int | None, field_name: str | None, problem: str, line: int | None = None):
        self.source, self.row, self.field, self.problem, self.line = source, row, field_name, problem, line
        if row is None:
            where = f"line {line}" if line is not None else "file"
        else:
            where = f"row {row}" + (f" (line {line})" if line is not None else "")
        what = f", field {field_name!r}" if field_name else ""
        super().__init__(f"{source}: {where}{what}: {problem}")


@dataclass
class LoadReport:
    """What happened to the rows of one source."""

    source: str
    rows_read: int = 0
    rows_kept: int = 0
    skipped: list[DataValidationError] = field(default_factory=list)
    implicit_prompt_rows: int = 0
    conversational: bool = False

    def summary(self) -> str:
        text = f"{self.source}: {self.rows_kept} of {self.rows_read} rows kept"
        if self.skipped:
            text += f", {len(self.skipped)} skipped; first: " + "; ".join(str(e) for e in self.skipped[:5])
        return text


# --------------------------------------------------------------------------------------------- reading


GZIP_MAGIC = b"\x1f\x8b"


def _open_binary(path: str) -> io.BufferedIOBase:
    if path.lower().endswith(".gz"):
        with open(path, "rb") as raw:
            head = raw.read(2)
        if head != GZIP_MAGIC:
            raise DataValidationError(path, None, None, "not a gzip file (the name ends in .gz but the bytes are "
                                      f"{head!r}...); rename it or compress it")
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _lines(path: str) -> Iterator[tuple[int, str | DataValidationError]]:
    """(line number, decoded text) per line, or a DataValidationError for a line that is not UTF-8."""
    with _open_binary(path) as fh:
        try:
            for line_no, raw in enumerate(fh, start=1):
                try:
                    yield line_no, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield line_no, DataValidationError(path, None, None, f"not UTF-8 text (byte {raw[e.start]:#04x} at "
                                                       f"column {e.start + 1})", line=line_no)
        except (gzip.BadGzipFile, EOFError, OSError) as e:
            raise DataValidationError(path, None, None, f"unreadable gzip data ({e})") from None


#: a reader yields (row object or the DataValidationError that stands in for an unreadable row, line number)
RowOrError = tuple[dict[str, Any] | DataValidationError, int | None]


def _read_jsonl(path: str) -> Iterator[RowOrError]:
    row = 0
    for line_no, line in _lines(path):
        if isinstance(line, DataValidationError):
            yield DataValidationError(path, row, None, line.problem, line=line_no), line_no
            row += 1
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield DataValidationError(path, row, None, f"invalid JSON: {e.msg}", line=line_no), line_no
        else:
            if isinstance(obj, dict):
                yield obj, line_no
            else:
                yield DataValidationError(path, row, None, f"expected a JSON object, got {type(obj).__name__}",
                                          line=line_no), line_no
        row += 1


def _read_json(path: str, split: str = "train") -> Iterator[RowOrError]:
    chunks = []
    for _, line in _lines(path):
        if isinstance(line, DataValidationError):
            raise line
        chunks.append(line)
    text = "".join(chunks)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        # a .json file holding JSON lines is common enough to accept
        yield from _read_jsonl(path)
        return
    if isinstance(data, dict):
        if all(isinstance(v, list) for v in data.values()) and {"chosen", "rejected"} <= set(data):
            # column-oriented {"chosen": [...], "rejected": [...], ...}
            n = len(data["chosen"])
            data = [{k: v[i] if i < len(v) else None for k, v in data.items()} for i in range(n)]
        elif data and all(isinstance(v, list) for v in data.values()):
            # named splits {"train": [...], "test": [...]}
            if split not in data:
                raise ValueError(f"{path}: no split {split!r}; the file has the split(s) {', '.join(map(repr, data))} "
                                 "(choose one with train_split / eval_split)")
            data = data[split]
        else:
            raise DataValidationError(path, 0, None, "a JSON object that is neither a mapping of splits to lists of "
                                      "rows nor columns with chosen/rejected; expected a list of rows or JSON lines")
    if not isinstance(data, list):
        raise DataValidationError(path, 0, None, f"expected a list of rows (or JSON lines), got {type(data).__name__}")
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            yield DataValidationError(path, i, None, f"expected an object, got {type(obj).__name__}"), None
        else:
            yield obj, None


def _read_csv(path: str) -> Iterator[RowOrError]:
    texts = []
    for _, line in _lines(path):
        if isinstance(line, DataValidationError):
            raise line
        texts.append(line)
    for obj in csv.DictReader(io.StringIO("".join(texts))):
        yield dict(obj), None


def _read_table(rows: Iterable[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], int | None]]:
    for obj in rows:
        yield dict(obj), None


def is_saved_dataset(folder: str) -> bool:
    """Whether ``folder`` holds a ``datasets`` save_to_disk (a Dataset or a DatasetDict)."""
    return any(os.path.exists(os.path.join(folder, f)) for f in ("dataset_dict.json", "state.json"))


def load_saved_split(folder: str, split: str) -> Any:
    """The ``split`` of a save_to_disk folder (a saved Dataset is its only split)."""
    import datasets

    loaded = datasets.load_from_disk(folder)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{folder}: no split {split!r}; it has {', '.join(loaded)}")
        loaded = loaded[split]
    return loaded


def read_rows(source: str, split: str = "train", config_name: str | None = None) -> Iterator[RowOrError]:
    """Yield (row, line number or None) from a local file, a `datasets` folder, or a hub dataset name."""
    lower = source.lower()
    if os.path.isfile(source):
        if lower.endswith((".jsonl", ".jsonl.gz")):
            return _read_jsonl(source)
        if lower.endswith((".json", ".json.gz")):
            return _read_json(source, split)
        if lower.endswith(".csv"):
            return _read_csv(source)
        if lower.endswith(".parquet"):
            import pyarrow.parquet as pq

            return _read_table(pq.read_table(source).to_pylist())
        raise ValueError(f"{source}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}")
    if os.path.isdir(source):
        import datasets

        if not is_saved_dataset(source):  # a folder of data files (train.jsonl, test.parquet, ...): folder loader
            return _read_table(datasets.load_dataset(source, config_name, split=split))
        return _read_table(load_saved_split(source, split))
    if lower.endswith(LOCAL_SUFFIXES) or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise FileNotFoundError(f"{source}: no such file or directory")
    import datasets

    logger.info("%s is not a local path: loading it from the Hugging Face hub", source)
    return _read_table(datasets.load_dataset(source, config_name, split=split))


# --------------------------------------------------------------------------------------------- normalising


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value) and len(value) > 0


#: chat roles the common templates know (OpenAI's and transformers' conventions)
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def _check_messages(value: Any, name: str, src: str, row: int, line: int | None) -> None:
    for i, message in enumerate(value):
        role = message.get("role")
        if not isinstance(role, str):
            raise DataValidationError(src, row, f"{name}[{i}].role", "missing or not a string", line)
        if role not in CHAT_ROLES:
            raise DataValidationError(src, row, f"{name}[{i}].role", f"unknown role {role!r}; use one of "
                                      f"{', '.join(CHAT_ROLES)}", line)
        content = message.get("content")
        if content is None and message.get("tool_calls"):
            continue  # an assistant turn that only calls tools (TRL's and OpenAI's convention)
        if isinstance(content, list):  # content as a list of parts: text parts only (no images here)
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise DataValidationError(src, row, f"{name}[{i}].content[{j}]", "expected a text part "
                                              "{'type': 'text', 'text': ...} (image parts need a vision model, which "
                                              "adaptdpo does not train)", line)
            continue
        if not isinstance(content, str):
            raise DataValidationError(src, row, f"{name}[{i}].content", "missing or not a string (null only with "
                                      "tool_calls; a list only of text parts)", line)


def _check_turn_order(prompt: list[Message], completion: list[Message], name: str, src: str, row: int,
                      line: int | None) -> None:
    """A completion is the assistant's answer to the prompt: it starts with an assistant turn, and the prompt
    does not end with one (the roles are swapped otherwise)."""
    if completion and completion[0]["role"] != "assistant":
        raise DataValidationError(src, row, f"{name}[0].role", f"a completion must start with an assistant turn, "
                                  f"got {completion[0]['role']!r} (are prompt and completion roles swapped?)", line)
    if prompt and prompt[-1]["role"] == "assistant":
        raise DataValidationError(src, row, f"prompt[{len(prompt) - 1}].role", "the prompt ends with an assistant "
                                  "turn; it should end with the turn the completion answers (user or tool)", line)


def extract_prompt(chosen: Field, rejected: Field, marker: str | None = "\n\nAssistant:") -> tuple[Field, Field, Field]:
    """Split an implicit-prompt pair into (prompt, chosen completion, rejected completion).

    Strings: the prompt ends after the last ``marker`` inside the longest common prefix (HH's
    convention: the prompt ends with ``"\\n\\nAssistant:"``); without a marker there, at the longest common
    prefix, moved back before a trailing space as TRL does. Message lists: the shared leading turns.
    """
    if isinstance(chosen, list):
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        return chosen[:k], chosen[k:], rejected[k:]
    k = 0
    limit = min(len(chosen), len(rejected))
    while k < limit and chosen[k] == rejected[k]:
        k += 1
    cut = chosen.rfind(marker, 0, k) if marker else -1
    if cut >= 0 and cut + len(marker) <= k:
        k = cut + len(marker)
    elif 0 < k < limit and chosen[k - 1] == " ":
        k -= 1
    return chosen[:k], chosen[k:], rejected[k:]


def normalise_row(raw: dict[str, Any], src: str, row: int, line: int | None = None,
                  marker: str | None = "\n\nAssistant:") -> dict[str, Field]:
    """Check one raw row and return ``{"prompt", "chosen", "rejected"}``; raise naming the bad field."""
    for name in ("chosen", "rejected"):
        if name not in raw or raw[name] is None:
            raise DataValidationError(src, row, name, "missing", line)
    conversational = _is_messages(raw["chosen"])
    for name in ("chosen", "rejected") + (("prompt",) if raw.get("prompt") is not None else ()):
        value = raw[name]
        if conversational:
            if not _is_messages(value):
                raise DataValidationError(src, row, name, "expected a non-empty list of messages like the chosen "
                                          f"field, got {type(value).__name__}", line)
            _check_messages(value, name, src, row, line)
        elif not isinstance(value, str):
            raise DataValidationError(src, row, name, f"expected a string, got {type(value).__name__}", line)
    if "prompt" in raw and raw["prompt"] is None:
        raise DataValidationError(src, row, "prompt", "is null (drop the column for implicit-prompt data)", line)
    if raw["chosen"] == raw["rejected"]:
        raise DataValidationError(src, row, "rejected", "identical to chosen", line)
    if raw.get("prompt") is None:
        prompt, chosen, rejected = extract_prompt(raw["chosen"], raw["rejected"], marker)
        if not prompt:
            raise DataValidationError(src, row, "chosen", "no prompt given and chosen/rejected share no prefix", line)
    else:
        prompt, chosen, rejected = raw["prompt"], raw["chosen"], raw["rejected"]
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        empty = len(value) == 0 if conversational else not value.strip()
        if empty:
            raise DataValidationError(src, row, name, "empty completion", line)
        if conversational:
            _check_turn_order(prompt, value, name, src, row, line)
    out: dict[str, Any] = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if conversational:  # TRL's row-level template inputs: the tools the assistant may call, extra template kwargs
        tools = raw.get("tools")
        if isinstance(tools, str):
            try:
                tools = json.loads(tools)
            except json.JSONDecodeError as e:
                raise DataValidationError(src, row, "tools", f"not valid JSON ({e.msg})", line) from None
        if tools is not None:
            if not isinstance(tools, list):
                raise DataValidationError(src, row, "tools", "expected a list of tool schemas (or their JSON)", line)
            out["tools"] = tools
        kwargs = raw.get("chat_template_kwargs")
        if kwargs is not None:
            if not isinstance(kwargs, dict):
                raise DataValidationError(src, row, "chat_template_kwargs", "expected a mapping", line)
            out["chat_template_kwargs"] = kwargs
    return out


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_prompt_to_messages(prompt: str) -> list[Message] | None:
    """Anthropic HH's raw prompt ("\\n\\nHuman: … \\n\\nAssistant: … \\n\\nHuman: … \\n\\nAssistant:") as chat
    messages, ending with the user turn the completion answers; None when the text is not in that format."""
    parts = _HH_TURN.split(prompt)
    # parts: [text before the first marker, role, text, role, text, ...]; the last "Assistant:" opens the answer
    if len(parts) < 5 or parts[0].strip() or parts[-2] != "Assistant" or parts[-1].strip() or parts[1] != "Human":
        return None
    turns = zip(parts[1:-2:2], parts[2:-2:2], strict=True)
    messages = [{"role": _HH_ROLES[role], "content": text.strip()} for role, text in turns]
    if any(a["role"] == b["role"] for a, b in itertools.pairwise(messages)):
        return None
    return messages


def text_row_as_messages(row: dict[str, Field], only_hh: bool) -> dict[str, Field] | None:
    """A text row as a conversational one: an HH-format prompt becomes its turns, any other prompt one user turn
    (unless ``only_hh``); each completion one assistant turn. None when it stays as it is."""
    prompt = row["prompt"]
    if not isinstance(prompt, str) or not isinstance(row["chosen"], str):
        return None
    messages = hh_prompt_to_messages(prompt)
    if messages is None:
        if only_hh:
            return None
        messages = [{"role": "user", "content": prompt.strip()}]
    return {**row, "prompt": messages, "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
            "rejected": [{"role": "assistant", "content": row["rejected"].strip()}]}


def load_preference_rows(source: str, split: str = "train", *, skip_invalid: bool = False,
                         implicit_prompt_marker: str | None = "\n\nAssistant:", limit: int | None = None,
                         config_name: str | None = None,
                         raw_rows: Iterable[RowOrError] | None = None) -> tuple[list[dict[str, Field]], LoadReport]:
    """Read and validate every row of ``source`` (or of ``raw_rows``, rows already read, with ``source`` naming
    them in errors); return normalised rows and a report."""
    report = LoadReport(source=source)
    rows: list[dict[str, Field]] = []
    kind: bool | None = None
    raw_rows = read_rows(source, split, config_name) if raw_rows is None else raw_rows
    for index, (raw, line) in enumerate(raw_rows):
        if limit is not None and report.rows_kept >= limit:
            break
        report.rows_read += 1
        try:
            if isinstance(raw, DataValidationError):  # a line that could not be read as a row
                raise raw
            row = normalise_row(raw, source, index, line, implicit_prompt_marker)
            is_conv = isinstance(row["chosen"], list)
            if kind is None:
                kind = is_conv
            elif kind != is_conv:
                raise DataValidationError(source, index, "chosen", "mixes conversational and plain-text rows", line)
        except DataValidationError as error:
            if not skip_invalid:
                raise
            report.skipped.append(error)
            continue
        if raw.get("prompt") is None:
            report.implicit_prompt_rows += 1
        row["pair_id"] = index
        rows.append(row)
        report.rows_kept += 1
    report.conversational = bool(kind)
    if not rows:
        raise ValueError(f"{source}: no valid rows ({report.rows_read} read, {len(report.skipped)} invalid)")
    return rows, report


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


# --------------------------------------------------------------------------------------------- collating


def _pad(seqs: list[list[int]], value: int, multiple: int | None) -> Tensor:
    width = max(len(s) for s in seqs)
    if multiple:
        width = -(-width // multiple) * multiple
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def pairs_in_batch(batch: dict[str, Any]) -> int:
    """Number of pairs of a collated batch (stacked: 2n rows; packed: n rows)."""
    if "pair_starts" in batch:  # padding-free: every pair in one row
        return int(batch["pair_starts"].shape[0])
    rows = batch["input_ids"].shape[0]
    return rows if "segment_ids" in batch else rows // 2


def batch_to(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """Move a collated batch's tensors to ``device`` (its ``logits_to_keep`` is a plain int and stays)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class PreferenceCollator:
    """Stack n pairs into one right-padded batch of 2n rows: all chosen rows first, then all rejected.

    This is TRL 1.16's layout (``input_ids``, ``attention_mask``, ``completion_mask``), so a batch built
    here can be fed to TRL's ``DPOTrainer`` and back. Precomputed ``ref_chosen_logps`` /
    ``ref_rejected_logps`` and ``pair_id`` pass through.

    ``shared_prompt=True``: the packed layout instead, n rows [prompt, chosen, rejected] with
    ``segment_ids`` (1 prompt, 2 chosen, 3 rejected, 0 padding) and ``position_ids`` that restart at the
    prompt length for the rejected branch: the prompt is encoded once (see
    :func:`adaptdpo.logprobs.packed_sequence_logps`).

    ``padding_free=True`` (with ``shared_prompt``): every pair's [prompt, chosen, rejected] one after the other in
    ONE row, no padding between them, with ``document_ids`` (the pair's index in the batch; −1 for the padding
    ``pad_to_multiple_of`` adds at the end) and ``pair_starts`` (each pair's first position); positions restart
    for every pair (see :func:`adaptdpo.logprobs.padding_free_sequence_logps`).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    shared_prompt: bool = False
    padding_free: bool = False

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        if self.padding_free:
            batch = self._padding_free(examples)
        elif self.shared_prompt:
            batch = self._packed(examples)
        else:
            batch = self._stacked(examples)
        # the LM head only needs the positions from the shortest prompt on (see logprobs.completion_window);
        # both padded layouts start every row with its prompt (one row holding every pair needs all positions)
        width = batch["input_ids"].shape[1]
        first = 1 if self.padding_free else max(1, min(len(e["prompt_ids"]) for e in examples))
        batch["logits_to_keep"] = width - first + 1
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
        if "pair_id" in examples[0]:
            batch["pair_id"] = torch.tensor([e["pair_id"] for e in examples], dtype=torch.long)
        return batch

    def _stacked(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        seqs = [e["prompt_ids"] + e["chosen_ids"] for e in examples]
        seqs += [e["prompt_ids"] + e["rejected_ids"] for e in examples]
        completion = [[0] * len(e["prompt_ids"]) + [1] * len(e["chosen_ids"]) for e in examples]
        completion += [[0] * len(e["prompt_ids"]) + [1] * len(e["rejected_ids"]) for e in examples]
        batch: dict[str, Any] = {
            "input_ids": _pad(seqs, self.pad_token_id, self.pad_to_multiple_of),
            "attention_mask": _pad([[1] * len(s) for s in seqs], 0, self.pad_to_multiple_of),
            "completion_mask": _pad(completion, 0, self.pad_to_multiple_of),
        }
        return batch

    def _padding_free(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids: list[int] = []
        segments: list[int] = []
        positions: list[int] = []
        documents: list[int] = []
        starts = []
        for index, e in enumerate(examples):
            p, c, r = len(e["prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"])
            starts.append(len(ids))
            ids += e["prompt_ids"] + e["chosen_ids"] + e["rejected_ids"]
            segments += [1] * p + [2] * c + [3] * r
            positions += list(range(p + c)) + list(range(p, p + r))
            documents += [index] * (p + c + r)
        return {
            "input_ids": _pad([ids], self.pad_token_id, self.pad_to_multiple_of),
            "attention_mask": _pad([[1] * len(ids)], 0, self.pad_to_multiple_of),
            "segment_ids": _pad([segments], 0, self.pad_to_multiple_of),
            "position_ids": _pad([positions], 0, self.pad_to_multiple_of),
            "document_ids": _pad([documents], -1, self.pad_to_multiple_of),
            "pair_starts": torch.tensor(starts, dtype=torch.long),
        }

    def _packed(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        seqs, segments, positions = [], [], []
        for e in examples:
            p, c, r = len(e["prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"])
            seqs.append(e["prompt_ids"] + e["chosen_ids"] + e["rejected_ids"])
            segments.append([1] * p + [2] * c + [3] * r)
            positions.append(list(range(p + c)) + list(range(p, p + r)))
        batch: dict[str, Any] = {
            "input_ids": _pad(seqs, self.pad_token_id, self.pad_to_multiple_of),
            "attention_mask": _pad([[1] * len(s) for s in seqs], 0, self.pad_to_multiple_of),
            "segment_ids": _pad(segments, 0, self.pad_to_multiple_of),
            "position_ids": _pad(positions, 0, self.pad_to_multiple_of),
        }
        return batch
