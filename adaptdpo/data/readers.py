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
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

Message = dict[str, str]
Field = str | list[Message]
#: a normalised row: "prompt", "chosen" and "rejected" (Fields: all three text or all three messages), "pair_id"
#: (int), and where given "weight", "beta" (floats), "tools", "chat_template_kwargs"
Row = dict[str, Any]

LOCAL_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet", ".csv")

#: TRL's columns of precomputed reference log-probs (what its precompute_ref_log_probs adds to a tokenised dataset)
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


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
    reference_column_rows: int = 0  # raw rows carrying ref_chosen_logps / ref_rejected_logps (ignored)

    def reference_columns_notice(self) -> str | None:
        """What happens to reference log-prob columns in raw rows (None when there are none)."""
        if not self.reference_column_rows:
            return None
        return reference_columns_notice(self.source, self.reference_column_rows)

    def summary(self) -> str:
        text = f"{self.source}: {self.rows_kept} of {self.rows_read} rows kept"
        if self.skipped:
            text += f", {len(self.skipped)} skipped; first: " + "; ".join(str(e) for e in self.skipped[:5])
        return text


def reference_columns_notice(source: str, rows: int) -> str:
    return (f"{source}: {rows} row(s) carry {' / '.join(REFERENCE_COLUMNS)}; they are ignored, whatever they hold: "
            "the reference model scores every pair, as TRL does without precompute_ref_log_probs "
            "(precompute_ref_log_probs computes and caches them; already tokenised data, prompt_ids, chosen_ids and "
            "rejected_ids, with these two columns is trained on them, after a check)")


# --------------------------------------------------------------------------------------------- reading


GZIP_MAGIC = b"\x1f\x8b"


def _open_binary(path: str) -> io.BufferedIOBase:
    if path.lower().endswith(".gz"):
        with open(path, "rb") as raw:
            head = raw.read(2)
        if head != GZIP_MAGIC:
            raise DataValidationError(path, None, None, "not a gzip file (the name ends in .gz but the bytes are "
                                      f"{head!r}...); rename it or compress it")
        return gzip.open(path, "rb")
    return open(path, "rb")


def _lines(path: str) -> Iterator[tuple[int, str | DataValidationError]]:
    """(line number, decoded text) per line, or a DataValidationError for a line that is not UTF-8."""
    with _open_binary(path) as fh:
        try:
            for line_no, raw in enumerate(fh, start=1):
                if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark: read as utf-8-sig
                    raw = raw[3:]
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
