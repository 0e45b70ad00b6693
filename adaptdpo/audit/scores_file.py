"""Read an audit's per-pair scores back for training (Selective DPO's difficulty)."""

from __future__ import annotations

import json
import math
import os

from .run import SUMMARY_FILE, data_fingerprint


def read_pair_scores(path: str, field: str, train_file: str) -> dict[int, float]:
    """Row id → ``field`` from an audit.jsonl; the audit must have been made on ``train_file`` (checked by the
    data's sha256 recorded in the audit_summary.json beside it), so row ids mean the same rows."""
    summary_path = os.path.join(os.path.dirname(os.path.abspath(path)), SUMMARY_FILE)
    if os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as fh:
            audited = json.load(fh)
        if os.path.exists(train_file) and audited.get("data_sha256") != data_fingerprint(train_file):
            raise ValueError(f"pair_scores_file={path}: the audit was made on {audited.get('data')}, whose contents "
                             f"differ from train_file={train_file} (row ids would not line up); audit this file")
    scores: dict[int, float] = {}
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"pair_scores_file={path}: line {line_no}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("row"), int):
                raise ValueError(f"pair_scores_file={path}: line {line_no}: no integer `row` field")
            value = record.get(field)
            if value is None:
                continue  # an unscored row (invalid in the audit): training will refuse it if it is used
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"pair_scores_file={path}: line {line_no}: field {field!r} is {value!r}, not a "
                                 "finite number (pair_scores_field names the difficulty field)")
            scores[record["row"]] = float(value)
    if not scores:
        raise ValueError(f"pair_scores_file={path}: no row has a numeric {field!r} field")
    return scores
