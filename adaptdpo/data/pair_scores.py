"""Read an audit's per-pair scores back for training (Selective DPO's difficulty)."""

from __future__ import annotations

import hashlib
import json
import math
import os


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
        recorded = audited.get("audit_jsonl_sha256")
        if recorded is not None and os.path.isfile(path):
            with open(path, "rb") as fh:
                actual = hashlib.sha256(fh.read()).hexdigest()
            if actual != recorded:
                raise ValueError(f"pair_scores_file={path}: not the audit.jsonl its {SUMMARY_FILE} describes (an "
                                 "interrupted or mixed audit?): run the audit again")
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

AUDIT_FILE = "audit.jsonl"
SUMMARY_FILE = "audit_summary.json"


def data_fingerprint(source: str) -> str:
    """sha256 of a data file (of every file, by relative path, for a folder; of the name for a hub dataset)."""
    digest = hashlib.sha256()
    paths = [source] if os.path.isfile(source) else sorted(
        os.path.join(d, f) for d, _, files in os.walk(source) for f in files) if os.path.isdir(source) else []
    if not paths:
        digest.update(source.encode())
    for path in paths:
        digest.update(os.path.relpath(path, source).encode() if path != source else b"")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
