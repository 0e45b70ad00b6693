import gzip
import json
import os

import pytest
import torch
from conftest import HH_FILE

from adaptdpo.data.collate import PreferenceCollator
from adaptdpo.data.readers import DataValidationError
from adaptdpo.data.rows import extract_prompt, load_preference_rows
from adaptdpo.data.tokenize import tokenize_pair, tokenize_rows

# ----------------------------------------------------------------------------- the real HH file


def test_real_hh_file_strict_names_file_row_and_field():
    with pytest.raises(DataValidationError) as info:
        load_preference_rows(HH_FILE)
    err = info.value
    assert (err.row, err.line, err.field) == (86, 87, "chosen")
    assert "harmless-base-test.jsonl.gz: row 86 (line 87), field 'chosen': empty completion" in str(err)


def test_real_hh_file_skip_reports_how_many_and_which():
    rows, report = load_preference_rows(HH_FILE, skip_invalid=True)
    assert report.rows_read == 2312 and report.rows_kept == 2308 == len(rows)
    assert [e.row for e in report.skipped] == [86, 516, 925, 1103]
    assert all(e.field == "chosen" and e.problem == "empty completion" for e in report.skipped)
    assert report.implicit_prompt_rows == 2308
    raw = [json.loads(line) for line in gzip.open(HH_FILE, "rt", encoding="utf-8")]
    for row in rows[:200]:
        original = raw[row["pair_id"]]
        assert row["prompt"].endswith("\n\nAssistant:")
        assert row["prompt"] + row["chosen"] == original["chosen"]
        assert row["prompt"] + row["rejected"] == original["rejected"]


def test_extract_prompt_variants():
    # HH style: the responses share a first word, the prompt still ends at the marker
    p, c, r = extract_prompt("\n\nHuman: hi\n\nAssistant: I am fine", "\n\nHuman: hi\n\nAssistant: I am bad")
    assert (p, c, r) == ("\n\nHuman: hi\n\nAssistant:", " I am fine", " I am bad")
    # no marker: longest common prefix, moved back before the space (TRL's rule)
    assert extract_prompt("Q: 2+2? A: 4", "Q: 2+2? A: 5", marker=None) == ("Q: 2+2? A:", " 4", " 5")
    msgs = lambda a: [{"role": "user", "content": "hi"}, {"role": "assistant", "content": a}]  # noqa: E731
    assert extract_prompt(msgs("x"), msgs("y")) == (msgs("x")[:1], msgs("x")[1:], msgs("y")[1:])


# ----------------------------------------------------------------------------- formats

ROWS = [{"prompt": "Q1", "chosen": " good", "rejected": " bad"},
        {"prompt": "Q2", "chosen": " yes", "rejected": " no"}]


def write_all_formats(tmp_path):
    import datasets

    paths = {}
    paths["jsonl"] = tmp_path / "d.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    paths["jsonl.gz"] = tmp_path / "d.jsonl.gz"
    with gzip.open(paths["jsonl.gz"], "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in ROWS))
    paths["json"] = tmp_path / "d.json"
    paths["json"].write_text(json.dumps(ROWS))
    ds = datasets.Dataset.from_list(ROWS)
    paths["parquet"] = tmp_path / "d.parquet"
    ds.to_parquet(str(paths["parquet"]))
    paths["csv"] = tmp_path / "d.csv"
    ds.to_csv(str(paths["csv"]), index=False)
    paths["disk"] = tmp_path / "saved"
    datasets.DatasetDict({"train": ds}).save_to_disk(str(paths["disk"]))
    return paths


def test_every_local_format_gives_the_same_rows(tmp_path):
    for kind, path in write_all_formats(tmp_path).items():
        rows, report = load_preference_rows(str(path))
        assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows] == ROWS, kind
        assert report.rows_kept == 2


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_preference_rows(str(tmp_path / "nope.jsonl"))


def test_conversational_rows_use_the_chat_template(tokenizer):
    row = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
           "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]}
    from adaptdpo.data.rows import normalise_row

    norm = normalise_row(row, "mem", 0)
    assert norm["prompt"] == row["chosen"][:1]
    pair = tokenize_pair(norm, tokenizer)
    assert tokenizer.decode(pair.prompt_ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(pair.chosen_ids) == "hello there<|im_end|>\n"
    assert tokenizer.decode(pair.rejected_ids) == "go away<|im_end|>\n"


# ----------------------------------------------------------------------------- malformed rows

BAD = [
    ({"prompt": "q", "chosen": "a"}, "rejected", "missing"),
    ({"prompt": "q", "chosen": 5, "rejected": "b"}, "chosen", "expected a string, got int"),
    ({"prompt": "q", "chosen": "a", "rejected": ["b"]}, "rejected", "expected a string, got list"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "prompt", "expected a string, got int"),
    ({"prompt": "q", "chosen": "   ", "rejected": "b"}, "chosen", "empty completion"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "rejected", "identical to chosen"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
     "chosen[1].content", "missing or not a string"),
]


@pytest.mark.parametrize("bad,field,problem", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_malformed_row_names_file_row_and_field(tmp_path, bad, field, problem):
    path = tmp_path / "bad.jsonl"
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataValidationError) as info:
        load_preference_rows(str(path))
    assert (info.value.row, info.value.line, info.value.field) == (2, 3, field)
    assert str(path) in str(info.value) and problem in str(info.value)
    rows, report = load_preference_rows(str(path), skip_invalid=True)
    assert len(rows) == 2 and [(e.row, e.field) for e in report.skipped] == [(2, field)]


def test_invalid_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n\n{"prompt": "q", "chosen": \n')
    with pytest.raises(DataValidationError, match=r"row 1 \(line 3\).*invalid JSON"):
        load_preference_rows(str(path))


def test_bad_csv_and_parquet_rows_are_named(tmp_path):
    import datasets

    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "x", "rejected": "x"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataValidationError, match=r"d.parquet: row 1, field 'rejected': identical"):
        load_preference_rows(str(tmp_path / "d.parquet"))


# ----------------------------------------------------------------------------- tokenising and collating


def test_tokenisation_matches_trl(hh_rows, tokenizer, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from adaptdpo.models.tiny import build_tiny_model, tiny_model_config

    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in hh_rows[:12]]
    cfg = tiny_model_config("tiny-llama", len(tokenizer), 16, 1, 2, 64, tokenizer.pad_token_id,
                            tokenizer.eos_token_id)
    model = build_tiny_model(cfg, 0)
    trainer = DPOTrainer(model=model, ref_model=build_tiny_model(cfg, 1), processing_class=tokenizer,
                         train_dataset=Dataset.from_list(rows),
                         args=DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True,
                                        max_length=None, gradient_checkpointing=False))
    ours, _ = tokenize_rows(rows, tokenizer, max_length=None, max_prompt_length=None)
    for theirs, mine in zip(trainer.train_dataset, ours, strict=True):
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert theirs[key] == mine[key]


def test_truncation_keeps_prompt_end_and_completion_start(tokenizer):
    row = {"prompt": "one two three four five six seven eight nine ten", "chosen": " alpha beta gamma delta epsilon",
           "rejected": " zeta eta theta"}
    full = tokenize_pair(row, tokenizer)
    cut = tokenize_pair(row, tokenizer, max_length=8, max_prompt_length=3)
    assert cut.truncated and not full.truncated
    assert cut.prompt_ids == full.prompt_ids[-3:]
    assert cut.chosen_ids == full.chosen_ids[:5] and cut.rejected_ids == full.rejected_ids[:5]
    assert len(cut.prompt_ids) + max(len(cut.chosen_ids), len(cut.rejected_ids)) <= 8


def test_pair_identical_after_truncation_is_an_error(tokenizer):
    rows = [{"prompt": "q", "chosen": " same start then A", "rejected": " same start then B", "pair_id": 7}]
    with pytest.raises(DataValidationError, match="row 7, field 'rejected': identical to chosen after"):
        tokenize_rows(rows, tokenizer, max_length=2, max_prompt_length=1, source="f.jsonl")


def test_collator_layout_matches_trl():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    examples = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6], "pair_id": 0},
                {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11], "pair_id": 1}]
    ours = PreferenceCollator(pad_token_id=0)(examples)
    theirs = DataCollatorForPreference(pad_token_id=0)([{k: e[k] for k in e if k != "pair_id"} for e in examples])
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["pair_id"].tolist() == [0, 1]
    padded = PreferenceCollator(pad_token_id=0, pad_to_multiple_of=8)(examples)
    assert padded["input_ids"].shape == (4, 8)


def test_tokenize_dataset_equals_tokenize_rows_cached_and_parallel(hh_rows, tokenizer, tmp_path, monkeypatch):
    """Dataset.map tokenisation (1 and 2 worker processes) gives exactly tokenize_rows' pairs; a second call reads
    the cache; a pair identical after truncation is refused by row and field, or skipped into the report."""
    from adaptdpo.data.readers import DataValidationError, LoadReport
    from adaptdpo.data.tokenize import cache_root, tokenize_dataset, tokenize_rows

    monkeypatch.setenv("ADAPTDPO_CACHE", str(tmp_path / "cache"))
    rows = [{**r, "pair_id": i} for i, r in enumerate(hh_rows[:40])]
    expected, expected_truncated = tokenize_rows(rows, tokenizer, 96, 48)
    for workers in (None, 2):
        got, truncated = tokenize_dataset(rows, tokenizer, 96, 48, "hh", num_proc=workers)
        assert [dict(r) for r in got] == expected and truncated == expected_truncated > 0
    entries = os.listdir(cache_root())
    assert len(entries) == 1  # one key for the same rows and settings, whatever the number of workers
    stamp = os.path.getmtime(os.path.join(cache_root(), entries[0]))
    again, _ = tokenize_dataset(rows, tokenizer, 96, 48, "hh")
    assert [dict(r) for r in again] == expected and os.path.getmtime(os.path.join(cache_root(), entries[0])) == stamp
    tokenize_dataset(rows, tokenizer, 64, 32, "hh")
    assert len(os.listdir(cache_root())) == 2  # other settings, another entry
    bad = [*rows[:3], {**rows[3], "chosen": rows[3]["rejected"]}, *rows[4:6]]
    with pytest.raises(DataValidationError, match=r"hh.*row 3.*rejected.*identical"):
        tokenize_dataset(bad, tokenizer, 96, 48, "hh")
    report = LoadReport(source="hh", rows_kept=6)
    kept, _ = tokenize_dataset(bad, tokenizer, 96, 48, "hh", report=report)
    assert [r["pair_id"] for r in kept] == [0, 1, 2, 4, 5]
    assert [(e.row, e.field) for e in report.skipped] == [(3, "rejected")] and report.rows_kept == 5


def test_already_tokenised_data_is_cut_as_raw_data_is(models_and_examples, tmp_path, caplog):
    """prompt_ids / chosen_ids / rejected_ids given to the trainer are truncated by the same truncation_mode as raw
    rows (max_length is never silently ignored): keep_start cuts the completions and drops a pair whose prompt fills
    max_length (warned); keep_end leaves the ids to the collator, which keeps each row's last max_length tokens."""
    import copy
    import logging

    from datasets import Dataset

    from adaptdpo.training.config import AdaptiveDPOConfig
    from adaptdpo.training.trainer import AdaptiveDPOTrainer

    policy, reference, examples, tokenizer = models_and_examples
    rows = [{"prompt_ids": e["prompt_ids"], "chosen_ids": e["chosen_ids"], "rejected_ids": e["rejected_ids"]}
            for e in examples]
    longest_prompt = max(len(r["prompt_ids"]) for r in rows)
    limit = longest_prompt  # the longest prompt alone fills it: that pair is dropped by keep_start
    datasets_seen = {}
    for mode in ("keep_start", "keep_end"):
        with caplog.at_level(logging.WARNING, logger="adaptdpo"):
            trainer = AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                                         processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                                         args=AdaptiveDPOConfig(output_dir=str(tmp_path / mode), use_cpu=True,
                                                                max_length=limit, truncation_mode=mode))
        datasets_seen[mode] = (trainer.train_dataset, trainer.data_collator)
    kept, _ = datasets_seen["keep_start"]
    expected = [r for r in rows if len(r["prompt_ids"]) < limit]
    assert 0 < len(kept) == len(expected) < len(rows) and "pair(s) dropped" in caplog.text
    for got, row in zip(kept, expected, strict=True):
        room = limit - len(row["prompt_ids"])
        assert got["prompt_ids"] == row["prompt_ids"] and got["chosen_ids"] == row["chosen_ids"][:room]
    untouched, collator = datasets_seen["keep_end"]
    assert len(untouched) == len(rows) and untouched[0]["chosen_ids"] == rows[0]["chosen_ids"]
    assert collator.keep_end_max_length == limit and not collator.shared_prompt
    assert collator([untouched[i] for i in range(3)])["input_ids"].shape[1] <= limit
