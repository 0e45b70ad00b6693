"""TRL's dataset mixtures (``datasets:``, ``test_split_size``) and ``--dataset_streaming`` from the command line."""

from __future__ import annotations

import json

import pytest
from helpers import base_argv, train_in_process, train_logs, write_small_dataset

from adaptdpo.data.readers import DataValidationError
from adaptdpo.data.sources import fraction_counts, load_mixture_rows, streamed_mixture
from adaptdpo.training.config_io import parse_config


def write_rows(path, rows, extra: bool = False):
    with open(path, "w", encoding="utf-8") as fh:
        for i, row in enumerate(rows):
            out = {k: row[k] for k in ("prompt", "chosen", "rejected")}
            if extra:
                out["source"] = f"s{i}"
            fh.write(json.dumps(out) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sources") / "tok")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def two_files(hh_rows, tmp_path):
    return write_rows(tmp_path / "a.jsonl", hh_rows[:30], extra=True), write_rows(tmp_path / "b.jsonl", hh_rows[30:40])


def test_fraction_counts_by_hand():
    # shares 0.5/0.5 of sizes 30 and 10: N = min(30/0.5, 10/0.5) = 20 → 10 rows each
    assert fraction_counts([30, 10], [1.0, 1.0]) == [10, 10]
    # shares 0.75/0.25 of sizes 30 and 40: N = min(40, 160) = 40 → 30 and 10
    assert fraction_counts([30, 40], [3.0, 1.0]) == [30, 10]


def test_a_mixture_is_the_rows_trl_get_dataset_builds(two_files):
    """The same rows, in the same order, as TRL's get_dataset on the same mixture (with fractions and columns)."""
    trl = pytest.importorskip("trl")
    from trl.scripts.utils import DatasetConfig

    a, b = two_files
    entries = [{"path": "json", "data_files": a, "columns": ["prompt", "chosen", "rejected"], "fraction": 0.5},
               {"path": "json", "data_files": [b], "fraction": 0.5}]
    theirs = trl.get_dataset(trl.DatasetMixtureConfig(datasets=[DatasetConfig(**e) for e in entries]))["train"]
    config = parse_config(["--datasets", json.dumps(entries)])
    ours, reports = load_mixture_rows(config.datasets)
    assert len(ours) == len(theirs) == 20 and len(reports) == 2
    for mine, row in zip(ours, theirs, strict=True):
        assert (mine["prompt"], mine["chosen"], mine["rejected"]) == (row["prompt"], row["chosen"], row["rejected"])
    assert [r["pair_id"] for r in ours] == list(range(20))
    # a local file as path is read by adaptdpo's own reader: the same rows
    local, _ = load_mixture_rows([{"path": a, "split": "train"}])
    assert [r["chosen"] for r in local] == [r["chosen"] for r in load_mixture_rows([{"path": "json", "data_files": a,
                                                                                      "split": "train"}])[0]]


def test_mixture_errors_name_the_entry_row_and_field(two_files, tmp_path):
    a, _ = two_files
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n", encoding="utf-8")
    with pytest.raises(DataValidationError, match=r"datasets\[1\].*bad.jsonl.*row 0.*rejected"):
        load_mixture_rows([{"path": a}, {"path": str(bad)}])
    with pytest.raises(ValueError, match=r"datasets\[0\]: unknown key\(s\) data_file"):
        parse_config(["--datasets", json.dumps([{"path": "json", "data_file": a}])])
    with pytest.raises(ValueError, match="for every entry of the mixture or for none"):
        parse_config(["--datasets", json.dumps([{"path": a, "fraction": 1}, {"path": a}])])
    with pytest.raises(ValueError, match=r"datasets\[0\].path is required"):
        parse_config(["--datasets", json.dumps([{"data_files": a}])])
    with pytest.raises(ValueError, match=r"columns \['score'\] are not in the data"):
        load_mixture_rows([{"path": a, "columns": ["prompt", "chosen", "rejected", "score"]}])
    with pytest.raises(ValueError, match=r"datasets .a mixture. and dataset_name"):
        parse_config(["--datasets", json.dumps([{"path": a}]), "--dataset_name", a])


def test_training_on_a_mixture_with_a_test_split(two_files, tokenizer_dir, tmp_path):
    """--datasets (JSON) with --test_split_size: 40 rows → 30 train + 10 eval pairs; a YAML list does the same."""
    a, b = two_files
    mixture = [{"path": a}, {"path": "json", "data_files": b}]
    argv = base_argv(a, tokenizer_dir, str(tmp_path / "run"), max_steps=2, test_split_size=0.25,
                     eval_strategy="steps", eval_steps=2)
    argv = [x for x in argv if x not in ("--train_file", a)]
    summary = train_in_process([*argv, "--datasets", json.dumps(mixture)])
    assert (summary["data"]["train_pairs"], summary["data"]["eval_pairs"]) == (30, 10)
    assert "eval_loss" in summary["final_eval"]
    yaml_file = tmp_path / "mix.yaml"
    yaml_file.write_text(f"datasets:\n  - path: {a}\n  - path: json\n    data_files: [{b}]\ntest_split_size: 10\n",
                         encoding="utf-8")
    config = parse_config(["--output_dir", str(tmp_path / "y")], str(yaml_file))
    assert config.datasets == [{"split": "train", "path": a}, {"split": "train", "path": "json", "data_files": [b]}]
    assert config.to_serialisable()["datasets"] == config.datasets  # recorded in the run's config.yaml


def test_streaming_from_the_command_line_trains_like_the_file_in_order(hh_rows, tokenizer_dir, tmp_path):
    """--dataset_streaming: rows validated and tokenised as they arrive; the same losses as the file read first and
    trained in file order (sequential sampler)."""
    data = write_small_dataset(str(tmp_path / "pairs.jsonl"), hh_rows, 24)
    train_in_process(base_argv(data, tokenizer_dir, str(tmp_path / "seq"), max_steps=4,
                               train_sampling_strategy="sequential"))
    summary = train_in_process(base_argv(data, tokenizer_dir, str(tmp_path / "stream"), max_steps=4,
                                         dataset_streaming=True))
    assert summary["data"]["streamed"] is True and summary["global_step"] == 4
    expected = [r["loss"] for r in train_logs(str(tmp_path / "seq"))]
    assert [r["loss"] for r in train_logs(str(tmp_path / "stream"))] == pytest.approx(expected, abs=1e-6)
    assert len(expected) == 4 and expected[0] == pytest.approx(0.693147, abs=1e-5)


def test_streaming_refuses_what_needs_every_row(tmp_path):
    with pytest.raises(ValueError, match="dataset_streaming needs max_steps"):
        parse_config(["--dataset_streaming", "true"])
    with pytest.raises(ValueError, match="eval_fraction, skip_invalid_rows need"):
        parse_config(["--dataset_streaming", "true", "--max_steps", "3", "--eval_fraction", "0.1",
                      "--skip_invalid_rows", "true"])


def test_a_streamed_mixture_yields_the_mixture_rows_in_order(two_files):
    a, b = two_files
    entries = parse_config(["--datasets", json.dumps([{"path": a, "columns": ["prompt", "chosen", "rejected"]},
                                                      {"path": "json", "data_files": b}])]).datasets
    eager, _ = load_mixture_rows(entries)
    streamed = list(streamed_mixture(entries))
    assert [r["chosen"] for r in streamed] == [r["chosen"] for r in eager] and len(streamed) == 40
    assert set(streamed[0]) == {"prompt", "chosen", "rejected"}
    with pytest.raises(ValueError, match="fraction needs each dataset's size"):
        streamed_mixture([{**e, "fraction": 1.0} for e in entries])
