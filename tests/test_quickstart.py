"""A newcomer's first hour: the README's quickstart runs as written (on a small file of the user's kind, a few
steps, the packaged SmolLM2), a run without data is a clear error, every run of 200 rows or more holds out a
part by default, and ``adaptdpo train --help`` shows the fields a user sets, grouped."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
from contextlib import redirect_stderr, redirect_stdout

import pytest
from helpers import packaged_model_installed

from adaptdpo import cli
from adaptdpo.models.sources import PACKAGED_MODELS
from adaptdpo.training.config_io import parse_config
from adaptdpo.training.prepared_data import auto_eval_rows, prepare_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOL = "smollm2-135m-instruct"
#: what the test adds to each quickstart line: a few short steps, no plots (the lines themselves are unchanged)
SMALL = {"train": ["--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "48",
                   "--max_eval_samples", "4", "--plots", "false", "--disable_tqdm", "true", "--save_strategy", "no"],
         "audit": ["--folds", "2", "--max_steps", "1", "--per_device_train_batch_size", "4", "--max_length", "48",
                   "--plots", "false", "--disable_tqdm", "true", "--score_batch_size", "64"]}


def quickstart_lines() -> list[str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    block = re.search(r"<!-- quickstart.*?-->\n```bash\n(.*?)```\n<!-- /quickstart -->", readme, re.S)
    assert block, "README.md has no quickstart block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def write_pairs(path: str, n: int) -> None:
    """``n`` short pairs in the standard format, the preferred answer kinder than the other."""
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": f"Tell me about item {i}.", "chosen": f" Item {i} is useful and kind.",
                                 "rejected": f" Item {i} is bad. Go away."}) + "\n")



@pytest.mark.slow
@pytest.mark.skipif(not packaged_model_installed(SMOL), reason="needs: " + PACKAGED_MODELS[SMOL].install)
def test_the_readme_quickstart_runs_as_written(tmp_path, monkeypatch):
    lines = quickstart_lines()
    assert [shlex.split(line)[1] for line in lines] == ["train", "audit", "train"]
    monkeypatch.chdir(tmp_path)
    write_pairs("my_pairs.jsonl", 220)
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == ".venv/bin/adaptdpo"
        err = io.StringIO()
        with redirect_stdout(io.StringIO()), redirect_stderr(err):
            assert cli.main([*argv[1:], *SMALL[argv[1]]]) == 0, err.getvalue()[-2000:]
        if argv[1] == "train":
            out = argv[argv.index("--output_dir") + 1]
            summary = json.load(open(os.path.join(out, "summary.json")))
            assert summary["global_step"] == 2
            assert os.path.exists(os.path.join(out, "model.safetensors"))
            assert f"model: {out}" in err.getvalue()
    first = json.load(open("runs/mine/summary.json"))
    assert first["data"]["eval_pairs"] == 4  # auto held out 16 of 220 (max_eval_samples 4 of them evaluated)
    assert first["data"]["train_pairs"] == 204
    assert 0.0 <= first["final_eval"]["eval_rewards/accuracies"] <= 1.0
    assert os.path.exists("runs/audit-my_pairs/audit.jsonl")
    cleaned = sum(1 for _ in open("runs/audit-my_pairs/cleaned.jsonl"))
    assert 0 < cleaned <= 220


def test_training_without_data_is_a_clear_error_naming_both_ways(tmp_path, capsys):
    code = cli.main(["train", "--model_name_or_path", "tiny-llama", "--output_dir", str(tmp_path / "run")])
    assert code == 1
    err = capsys.readouterr().err
    assert "no training data given" in err and "--train_file" in err and "--dataset_name" in err
    assert not os.path.exists(tmp_path / "run" / "config.yaml")  # nothing started


@pytest.mark.parametrize("rows, held", [(0, 0), (199, 0), (200, 16), (320, 16), (400, 20), (1000, 50),
                                        (10_000, 500), (50_000, 500)])
def test_auto_held_out_share(rows, held):
    assert auto_eval_rows(rows) == held


@pytest.mark.parametrize("n, extra, want_train, want_eval", [
    (250, [], 234, 16),                                   # 5% of 250 is 12: the floor, 16
    (150, [], 150, 0),                                    # under 200 rows: none held out
    (1000, ["--max_train_samples", "300"], 300, 16),      # the cap counts training rows; 16 more are read for eval
    (250, ["--eval_fraction", "0"], 250, 0),              # TRL's behaviour
    (250, ["--eval_fraction", "0.2"], 200, 50),           # an explicit share
])
def test_a_held_out_split_by_default(tmp_path, n, extra, want_train, want_eval):
    path = str(tmp_path / "pairs.jsonl")
    write_pairs(path, n)
    config = parse_config(["--model_name_or_path", "tiny-llama", "--train_file", path,
                           "--output_dir", str(tmp_path / "o"), *extra])
    data = prepare_rows(config)
    assert len(data.train_rows) == want_train
    assert len(data.eval_rows or []) == want_eval
    train_ids = {r["pair_id"] for r in data.train_rows}
    assert not train_ids & {r["pair_id"] for r in data.eval_rows or []}  # held out means not trained on


def test_train_help_is_grouped_and_help_all_lists_every_field(capsys):
    assert cli.main(["train", "--help"]) == 0
    short = capsys.readouterr().out
    for heading in ("data:", "model:", "method and loss:", "training:", "output:", "launching:"):
        assert f"\n{heading}\n" in short
    for flag in ("--train_file", "--dataset_name", "--method", "--beta", "--loss_type", "--bf16", "--output_dir",
                 "--config FILE", "--accelerate_config", "--trainable_layers"):
        assert flag in short
    assert len(short.splitlines()) < 80
    assert cli.main(["train", "--help-all"]) == 0
    full = capsys.readouterr().out
    assert "--lr_scheduler_type" in full and "--sams_pool_batches" in full and len(full.splitlines()) > 500


def test_the_top_level_help_says_what_the_demo_does(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "DPO, β-DPO, SamS and β-DPO+SamS" in out
    assert all(f"  {command}" in out for command in cli.COMMANDS)
