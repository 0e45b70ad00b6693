"""data.rows"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterable
from typing import Any

from adaptdpo.data.readers import (
    REFERENCE_COLUMNS,
    DataValidationError,
    Field,
    LoadReport,
    Message,
    Row,
    RowOrError,
    read_rows,
)

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
    if marker and cut >= 0 and cut + len(marker) <= k:  # cut >= 0 only with a marker
        k = cut + len(marker)
    elif 0 < k < limit and chosen[k - 1] == " ":
        k -= 1
    return chosen[:k], chosen[k:], rejected[k:]


#: the per-pair columns a config can name (``weight_column``, ``beta_column``), under these names once read
PAIR_VALUE_COLUMNS = ("weight", "beta")


def pair_value(value: Any, kind: str, src: str, row: int, field_name: str, line: int | None = None) -> float:
    """A per-pair ``weight`` (a finite number ≥ 0) or ``beta`` (a finite number > 0) from a row's ``field_name``; a
    number, or its text (CSV cells are text). Anything else is an error naming the source, row and field."""
    what = "a loss weight (weight_column)" if kind == "weight" else "a per-pair β (beta_column)"
    if value is None:
        raise DataValidationError(src, row, field_name, f"missing: {what} is needed for every row", line)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataValidationError(src, row, field_name, f"expected {what}, a number, got {type(value).__name__}",
                                  line)
    try:
        number = float(value)
    except ValueError:
        raise DataValidationError(src, row, field_name, f"expected {what}, a number, got {value!r}", line) from None
    if not math.isfinite(number):
        raise DataValidationError(src, row, field_name, f"{what} must be finite, got {value!r}", line)
    if kind == "weight" and number < 0:
        raise DataValidationError(src, row, field_name, f"{what} must be >= 0, got {value!r}", line)
    if kind == "beta" and number <= 0:
        raise DataValidationError(src, row, field_name, f"{what} must be > 0, got {value!r}", line)
    return number


def check_pair_columns(columns: Iterable[str], source: str, weight_column: str | None,
                       beta_column: str | None) -> None:
    """A configured ``weight_column`` / ``beta_column`` that the data does not have at all is an error before any
    work (not a row to skip); ``columns``: the data's column names (of its first row)."""
    present = set(columns)
    for option, name in (("weight_column", weight_column), ("beta_column", beta_column)):
        if name is not None and name not in present:
            raise ValueError(f"{source}: {option}={name!r} but the data has no column {name!r} (its columns: "
                             f"{', '.join(sorted(present))})")


def _check_fields(raw: dict[str, Any], src: str, row: int, line: int | None) -> bool:
    """The row's prompt, chosen and rejected present and of one kind (strings, or message lists); whether it is
    conversational."""
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
    return conversational


def _template_inputs(raw: dict[str, Any], src: str, row: int, line: int | None) -> dict[str, Any]:
    """A conversational row's ``tools`` (a list of tool schemas, or its JSON text) and ``chat_template_kwargs``."""
    out: dict[str, Any] = {}
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


def normalise_row(raw: dict[str, Any], src: str, row: int, line: int | None = None,
                  marker: str | None = "\n\nAssistant:", weight_column: str | None = None,
                  beta_column: str | None = None) -> Row:
    """Check one raw row and return ``{"prompt", "chosen", "rejected"}`` (plus ``weight`` / ``beta`` when their columns
    are named); raise naming the bad field."""
    conversational = _check_fields(raw, src, row, line)
    # all three text or all three messages, as _check_fields found (conversational)
    prompt: Any
    chosen: Any
    rejected: Any
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
    for kind, column in (("weight", weight_column), ("beta", beta_column)):
        if column is not None:
            out[kind] = pair_value(raw.get(column), kind, src, row, column, line)
    if conversational:  # TRL's row-level template inputs: the tools the assistant may call, extra template kwargs
        out.update(_template_inputs(raw, src, row, line))
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


def text_row_as_messages(row: Row, only_hh: bool) -> Row | None:
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
                         config_name: str | None = None, raw_rows: Iterable[RowOrError] | None = None,
                         weight_column: str | None = None,
                         beta_column: str | None = None) -> tuple[list[Row], LoadReport]:
    """Read and validate every row of ``source`` (or of ``raw_rows``, rows already read, with ``source`` naming
    them in errors); return normalised rows and a report. ``weight_column`` / ``beta_column``: read each row's
    per-pair loss weight / β from these columns (as ``weight`` / ``beta``); a column the data lacks is an error."""
    report = LoadReport(source=source)
    rows: list[Row] = []
    kind: bool | None = None
    raw_rows = read_rows(source, split, config_name) if raw_rows is None else raw_rows
    columns_checked = weight_column is None and beta_column is None
    for index, (raw, line) in enumerate(raw_rows):
        if limit is not None and report.rows_kept >= limit:
            break
        report.rows_read += 1
        if not columns_checked and not isinstance(raw, DataValidationError):
            check_pair_columns(raw, source, weight_column, beta_column)  # the first readable row has the columns
            columns_checked = True
        try:
            if isinstance(raw, DataValidationError):  # a line that could not be read as a row
                raise raw
            row = normalise_row(raw, source, index, line, implicit_prompt_marker, weight_column, beta_column)
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
        if any(key in raw for key in REFERENCE_COLUMNS):
            report.reference_column_rows += 1
        row["pair_id"] = index
        rows.append(row)
        report.rows_kept += 1
    report.conversational = bool(kind)
    if not rows:
        raise ValueError(f"{source}: no valid rows ({report.rows_read} read, {len(report.skipped)} invalid)")
    return rows, report
