"""Nothing lost, every error clear (issue 16; the cases of research/reliability-probe.md).

Each test names the probe case it covers. Errors must name the file, row, field, config key or path, and
nothing may be written or lost when a run is refused.
"""

import gzip
import json
import logging
import math
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, base_argv, final_params, run_cli, train_in_process, train_logs, write_small_dataset
from transformers import TrainerCallback

from adaptdpo.data.readers import DataValidationError
from adaptdpo.data.rows import load_preference_rows
from adaptdpo.data.tokenize import tokenize_rows
from adaptdpo.training.checkpointing import atomic_write_text, usable_checkpoint, verify_checkpoint
from adaptdpo.training.config_io import parse_config
from adaptdpo.training.job import ConfigChangedError
from adaptdpo.training.run_dir import read_metrics
from adaptdpo.training.run_lock import RunDirectoryInUse, RunLock
from adaptdpo.training.safeguards import TrainingStalledError


@pytest.fixture(scope="module")
def small(hh_rows, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    tokenizer.save_pretrained(str(root / "tok"))
    return write_small_dataset(str(root / "pairs.jsonl"), hh_rows, n=24), str(root / "tok")


class CrashAt(TrainerCallback):
    """Stop the process's training by an exception right after optimizer step K (a crash mid-run)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("crash")


def crashed_run(argv, step):
    from adaptdpo.training.job import run_training

    with pytest.raises(KeyboardInterrupt):
        run_training(parse_config(argv), extra_callbacks=[CrashAt(step)])


def snapshot(folder):
    """{relative path: (size, mtime_ns)} of every file: 'nothing written' means this does not change."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            out[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns)
    return out


# ------------------------------------------------------------------------------------------------ data loss


def test_summary_covers_the_whole_run_across_a_resume(small, tmp_path):
    """F1: train_loss of a resumed run = the uninterrupted run's (mean over all 8 steps, not the last 5), also
    when the checkpoint falls between two logging steps (steps 3 of a log every 2: one step's loss pending)."""
    data, tok = small
    common = dict(max_steps=8, save_strategy="steps", save_steps=3, logging_steps=2)
    straight = str(tmp_path / "straight")
    expected = train_in_process(base_argv(data, tok, straight, **common))
    crashed = str(tmp_path / "crashed")
    argv = base_argv(data, tok, crashed, **common)
    crashed_run(argv, 5)
    resumed = train_in_process(argv)
    assert resumed["resumed_from"].endswith("checkpoint-3")
    want, got = expected["final_metrics"], resumed["final_metrics"]
    assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-6)
    # the resumed part alone would average steps 4-8 only: a different number
    logged = {r["step"]: r["loss"] for r in read_metrics(straight) if "loss" in r}
    assert abs((logged[6] * 2 + logged[8] * 2) / 4 - want["train_loss"]) > 1e-4
    for key in ("rewards/margins", "logps/chosen", "grad_norm"):
        assert got[key] == pytest.approx(want[key], rel=1e-5)
    assert resumed["status"] == "complete" and resumed["global_step"] == 8
    assert resumed["wall_time_s"] > 0


def test_rerunning_a_finished_run_changes_nothing_unless_overwritten(small, tmp_path, caplog):
    """F3/F4: the same command on a finished run reports it complete and writes nothing."""
    data, tok = small
    out = str(tmp_path / "run")
    argv = base_argv(data, tok, out, max_steps=3, save_strategy="steps", save_steps=3)
    first = train_in_process(argv)
    before = snapshot(out)
    with caplog.at_level(logging.INFO, logger="adaptdpo"):
        again = train_in_process(argv)
    assert again["already_complete"] is True
    assert again["final_metrics"] == first["final_metrics"]
    assert "holds a complete run (step 3): nothing to do" in caplog.text
    assert {k: v for k, v in snapshot(out).items() if not k.endswith(".lock")} == \
        {k: v for k, v in before.items() if not k.endswith(".lock")}
    # asked to, it starts again from scratch: same config, same numbers, a fresh record
    fresh = train_in_process([*argv, "--overwrite_output_dir", "true"])
    assert fresh.get("already_complete") is None and fresh["resumed_from"] is None
    assert fresh["final_metrics"]["train_loss"] == pytest.approx(first["final_metrics"]["train_loss"], rel=1e-6)
    assert len([r for r in read_metrics(out) if "loss" in r]) == 3


def test_a_second_run_into_a_directory_in_use_fails_at_once(small, tmp_path):
    """F12/F13: the holder is named and nothing of the directory is touched."""
    data, tok = small
    out = str(tmp_path / "busy")
    with RunLock(out):
        before = snapshot(out)
        with pytest.raises(RunDirectoryInUse, match=rf"{out} is in use by pid {os.getpid()} on .*, started "):
            train_in_process(base_argv(data, tok, out, max_steps=2))
        assert snapshot(out) == before  # no config.yaml, no metrics
    assert not os.path.exists(os.path.join(out, "config.yaml"))


def test_a_stale_lock_from_a_killed_run_is_taken_over(tmp_path, caplog):
    out = str(tmp_path / "stale")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; "
                               "from adaptdpo.training.run_lock import RunLock; "
                               f"lock = RunLock({out!r}); lock.acquire(); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirectoryInUse, match=f"pid {holder.pid}"):
        RunLock(out).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with caplog.at_level(logging.WARNING), RunLock(out):
        assert f"taking over the lock of a run that is no longer running (pid {holder.pid}" in caplog.text


def test_resuming_with_a_changed_config_is_refused_then_recorded_when_accepted(small, tmp_path):
    """C32: the changed keys are named; nothing is written; accepted, the change is recorded and the new
    learning rate takes effect from the resumed step."""
    data, tok = small
    out = str(tmp_path / "run")
    common = dict(max_steps=6, save_strategy="steps", save_steps=3)
    argv = base_argv(data, tok, out, **common)
    crashed_run(argv, 4)
    before = snapshot(out)
    changed = base_argv(data, tok, out, **{**common, "learning_rate": 1e-3, "loss_type": "ipo"})
    with pytest.raises(ConfigChangedError, match=r"changed: learning_rate: 0\.005 -> 0\.001, loss_type: \['sigmoid'\] "
                                                 r"-> \['ipo'\]\. .*--accept_config_change true"):
        train_in_process(changed)
    after = snapshot(out)
    assert {k: v for k, v in after.items() if not k.endswith(".lock")} == \
        {k: v for k, v in before.items() if not k.endswith(".lock")}
    summary = train_in_process([*changed, "--accept_config_change", "true"])
    assert summary["resumed_from"].endswith("checkpoint-3")
    with open(os.path.join(out, "config_changes.jsonl"), encoding="utf-8") as fh:
        record = json.loads(fh.readline())
    assert record["from_step"] == 3
    assert record["changes"] == {"learning_rate": {"old": 0.005, "new": 0.001},
                                 "loss_type": {"old": ["sigmoid"], "new": ["ipo"]}}
    rates = {r["step"]: r["learning_rate"] for r in read_metrics(out) if "learning_rate" in r}
    assert rates[3] == pytest.approx(5e-3) and rates[4] == pytest.approx(1e-3) and rates[6] == pytest.approx(1e-3)


def test_configs_recorded_by_older_versions_resume_unchanged():
    """A run recorded before a field existed resumes when the field is at its default; a single loss name equals
    a one-element loss_type list; a real change is still named."""
    from adaptdpo.training.config_io import config_defaults
    from adaptdpo.training.run_dir import config_changes

    defaults = config_defaults()
    old = {"beta": 0.1, "loss_type": "sigmoid"}
    assert config_changes(old, {"beta": 0.1, "loss_type": ["sigmoid"], "pair_selection": "all"}, defaults) == {}
    assert config_changes(old, {"beta": 0.1, "loss_type": ["sigmoid"], "pair_selection": "easiest"}, defaults) == {
        "pair_selection": (None, "easiest")}
    assert config_changes(old, {"beta": 0.2, "loss_type": ["sigmoid", "sft"]}, defaults) == {
        "beta": (0.1, 0.2), "loss_type": (["sigmoid"], ["sigmoid", "sft"])}


# ------------------------------------------------------------------------------------------------ faults


@pytest.fixture(scope="module")
def interrupted_run(small, tmp_path_factory):
    """A run crashed after step 5 with complete checkpoints 2 and 4 (a template the corruption tests copy)."""
    data, tok = small
    out = str(tmp_path_factory.mktemp("interrupted") / "run")
    argv = base_argv(data, tok, out, max_steps=6, save_strategy="steps", save_steps=2)
    crashed_run(argv, 5)
    return out, argv


CORRUPTIONS = {
    "model.safetensors": lambda p: os.truncate(p, os.path.getsize(p) // 2),
    "trainer_state.json": lambda p: os.truncate(p, 40),
    "optimizer.pt": lambda p: os.truncate(p, 1000),
    "adaptdpo_state.pt": lambda p: open(p, "wb").write(os.urandom(100)),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_damaged_newest_checkpoint_is_reported_by_file_and_the_previous_one_used(interrupted_run, tmp_path, name,
                                                                                   caplog):
    """F7-F11."""
    import shutil

    template, _ = interrupted_run
    out = str(tmp_path / "run")
    shutil.copytree(template, out)
    damaged = os.path.join(out, "checkpoint-4", name)
    CORRUPTIONS[name](damaged)
    assert verify_checkpoint(os.path.join(out, "checkpoint-2")) == []
    problems = verify_checkpoint(os.path.join(out, "checkpoint-4"))
    assert len(problems) == 1 and problems[0].startswith(f"{damaged}: ")
    with caplog.at_level(logging.WARNING):
        assert usable_checkpoint(out, log=logging.getLogger("t").warning) == os.path.join(out, "checkpoint-2")
    assert f"{damaged}: " in caplog.text and "moved to" in caplog.text
    assert os.path.isdir(os.path.join(out, "checkpoint-4.corrupt"))  # set aside, not deleted


def test_training_resumes_past_a_damaged_checkpoint(interrupted_run, tmp_path, small):
    import shutil

    template, template_argv = interrupted_run
    out = str(tmp_path / "run")
    shutil.copytree(template, out)
    os.truncate(os.path.join(out, "checkpoint-4", "model.safetensors"), 1000)
    summary = train_in_process([a if a != template else out for a in template_argv])
    assert summary["resumed_from"] == os.path.join(out, "checkpoint-2") and summary["global_step"] == 6
    reference = str(tmp_path / "straight")
    train_in_process([a if a != template else reference for a in template_argv])
    for key, value in final_params(reference).items():
        torch.testing.assert_close(final_params(out)[key], value, atol=1e-6, rtol=1e-5)


def test_a_model_that_stops_learning_stops_the_run(small, tmp_path):
    """F19: lr 1e6 leaves the weights so large that every gradient is exactly 0 while the loss stays at ≈ ln 2."""
    data, tok = small
    out = str(tmp_path / "dead")
    with pytest.raises(TrainingStalledError, match=r"gradient norm has been exactly 0 for the last \d+ optimizer "
                                                   r"steps while the loss stays at .*learning_rate=1e\+06"):
        train_in_process(base_argv(data, tok, out, max_steps=12, learning_rate=1e6, max_grad_norm=0))
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    assert not os.path.exists(os.path.join(out, "summary.json"))


# ------------------------------------------------------------------------------------------------ clear errors


def _write_lines(path, lines, mode="w"):
    with open(path, mode) as fh:
        for line in lines:
            fh.write(line)


GOOD = json.dumps({"prompt": "Q?", "chosen": " yes", "rejected": " no"}) + "\n"


def test_non_utf8_line_names_file_and_line_and_can_be_skipped(tmp_path):
    """D9/D10."""
    path = str(tmp_path / "bad.jsonl")
    with open(path, "wb") as fh:
        fh.write(GOOD.encode() * 2 + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n' + GOOD.encode())
    with pytest.raises(DataValidationError, match=rf"{path}: row 2 \(line 3\): not UTF-8 text \(byte 0xe9"):
        load_preference_rows(path)
    rows, report = load_preference_rows(path, skip_invalid=True)
    assert [r["pair_id"] for r in rows] == [0, 1, 3]
    assert [(e.row, e.line) for e in report.skipped] == [(2, 3)]


def test_a_gz_file_that_is_not_gzip_is_named(tmp_path):
    """D28."""
    path = str(tmp_path / "plain.jsonl.gz")
    _write_lines(path, [GOOD])
    with pytest.raises(DataValidationError, match=rf"{path}: file: not a gzip file"):
        load_preference_rows(path)
    real = str(tmp_path / "real.jsonl.gz")
    with gzip.open(real, "wt", encoding="utf-8") as fh:
        fh.write(GOOD)
    assert len(load_preference_rows(real)[0]) == 1


def test_skip_invalid_rows_skips_invalid_json_lines(tmp_path):
    """D3."""
    path = str(tmp_path / "badjson.jsonl")
    _write_lines(path, [GOOD, '{"prompt": "x", "chosen": \n', GOOD])
    with pytest.raises(DataValidationError, match=rf"{path}: row 1 \(line 2\): invalid JSON"):
        load_preference_rows(path)
    rows, report = load_preference_rows(path, skip_invalid=True)
    assert [r["pair_id"] for r in rows] == [0, 2] and report.skipped[0].line == 2


def test_skip_invalid_rows_skips_pairs_identical_after_truncation(hh_rows, tokenizer):
    """D24-D26: the pair is listed with its row and field; without skipping, it is an error naming them."""
    long_shared = " ".join(["word"] * 200)
    rows = [dict(hh_rows[0], pair_id=0),
            {"prompt": "Q", "chosen": long_shared + " yes", "rejected": long_shared + " no", "pair_id": 7},
            dict(hh_rows[1], pair_id=8)]
    with pytest.raises(DataValidationError, match=r"f\.jsonl: row 7, field 'rejected': identical to chosen after "):
        tokenize_rows(rows, tokenizer, 32, 16, "f.jsonl")
    from adaptdpo.data.readers import LoadReport

    report = LoadReport("f.jsonl", rows_read=3, rows_kept=3)
    examples, _ = tokenize_rows(rows, tokenizer, 32, 16, "f.jsonl", report)
    assert [e["pair_id"] for e in examples] == [0, 8]
    assert [(e.row, e.field) for e in report.skipped] == [(7, "rejected")] and report.rows_kept == 2


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "wizard", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]},
     r"row 0 \(line 1\), field 'chosen\[0\]\.role': unknown role 'wizard'"),
    ({"prompt": [{"role": "assistant", "content": "hi"}], "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "user", "content": "b"}]},
     r"row 0 \(line 1\), field 'chosen\[0\]\.role': a completion must start with an assistant turn, got 'user'"),
    ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
      "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     r"field 'prompt\[1\]\.role': the prompt ends with an assistant turn"),
])
def test_chat_roles_are_checked(tmp_path, row, message):
    """D13/D14."""
    path = str(tmp_path / "conv.jsonl")
    _write_lines(path, [json.dumps(row) + "\n"])
    with pytest.raises(DataValidationError, match=message):
        load_preference_rows(path)


def test_a_json_file_of_splits_reads_the_requested_split_or_names_the_ones_it_has(tmp_path):
    """D30/D31."""
    path = str(tmp_path / "splits.json")
    row = json.loads(GOOD)
    with open(path, "w") as fh:
        json.dump({"train": [row, row], "test": [row]}, fh)
    assert len(load_preference_rows(path, "train")[0]) == 2 and len(load_preference_rows(path, "test")[0]) == 1
    with pytest.raises(ValueError, match=rf"{path}: no split 'validation'; the file has the split\(s\) 'train', "
                                         "'test'"):
        load_preference_rows(path, "validation")
    only_test = str(tmp_path / "onesplit.json")
    with open(only_test, "w") as fh:
        json.dump({"test": [row]}, fh)
    with pytest.raises(ValueError, match="no split 'train'"):
        load_preference_rows(only_test, "train")


@pytest.mark.parametrize(("flags", "message"), [
    (["--sams_ratio", "0"], r"sams_ratio must be in \(0, 1\]"),
    (["--sams_ratio", "2"], r"sams_ratio must be in \(0, 1\]"),
    (["--learning_rate", "-1"], r"learning_rate must be >= 0, got -1"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be a positive integer, got 0"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be a positive integer"),
    (["--beta", "abc"], r"argument --beta: invalid float value: 'abc'"),
    (["--learnin_rate", "1e-4"], r"unknown argument\(s\): --learnin_rate \(did you mean --learning_rate\?\)"),
    (["--max_step", "2"], r"unknown argument\(s\): --max_step \(did you mean --max_steps\?\)"),  # no prefix match
])
def test_bad_settings_are_refused_naming_the_key(tmp_path, flags, message):
    """C3, C4, C11-C14: before any work (parse time)."""
    with pytest.raises(ValueError, match=message):
        parse_config([*flags, "--output_dir", str(tmp_path / "x")])
    assert not os.path.exists(tmp_path / "x")


def test_gradient_accumulation_longer_than_an_epoch_is_warned(small, tmp_path, caplog):
    """C26."""
    data, tok = small
    with caplog.at_level(logging.WARNING, logger="adaptdpo"):
        train_in_process(base_argv(data, tok, str(tmp_path / "ga"), max_steps=1, gradient_accumulation_steps=32,
                                   plots=False))
    assert "gradient_accumulation_steps=32 is larger than the 6 micro-batches of one epoch (24 pairs" in caplog.text


def test_missing_model_folder_and_offline_hub_id_are_named_at_once(small, tmp_path):
    """C22/C23/E1."""
    data, tok = small
    with pytest.raises(FileNotFoundError, match=r"model_name_or_path=\./no_such_model: no such folder"):
        train_in_process(base_argv(data, tok, str(tmp_path / "a"), model_name_or_path="./no_such_model"))
    started = time.time()
    with pytest.raises(FileNotFoundError, match=r"model_name_or_path=nosuchorg/nosuchmodel: no such local folder, "
                                                r"and the hub is offline"):
        train_in_process(base_argv(data, tok, str(tmp_path / "b"), model_name_or_path="nosuchorg/nosuchmodel"))
    assert time.time() - started < 10
    assert not os.path.exists(tmp_path / "b" / "config.yaml")


def test_sams_with_a_model_without_hidden_states_says_so(small, tmp_path, monkeypatch):
    """C24."""
    from transformers import LlamaForCausalLM

    data, tok = small
    forward = LlamaForCausalLM.forward

    def no_hidden(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.hidden_states = None
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", no_hidden)
    with pytest.raises(ValueError, match=r"method sams reads the hidden states of the policy model, but "
                                         r"LlamaForCausalLM returned none"):
        train_in_process(base_argv(data, tok, str(tmp_path / "s"), max_steps=1, method="sams"))


def _fake_task(tmp_path, eval_rows=3):
    import dataclasses

    from adaptdpo.tasks.toy.language import Language
    from adaptdpo.tasks.toy.task import ToySpec

    task = tmp_path / "task"
    ref = tmp_path / "reference"
    task.mkdir()
    ref.mkdir()
    (ref / "config.json").write_text("{}")
    row = {"prompt": "a b", "chosen": "c", "rejected": "d", "gold_chosen": 1.0, "gold_rejected": 0.0, "flipped": False}
    (task / "task.json").write_text(json.dumps({"spec": dataclasses.asdict(ToySpec()), "reference_dir": str(ref),
                                                "eval_pairs": eval_rows, "train_pairs": 2}))
    (task / "language.json").write_text(json.dumps(Language.create(0).to_dict()))
    (task / "eval.jsonl").write_text((json.dumps(row) + "\n") * eval_rows)
    (task / "train.jsonl").write_text((json.dumps(row) + "\n") * 2)
    (task / "prompts.jsonl").write_text(json.dumps({"prompt": "a b"}) + "\n")
    return task


def test_broken_task_folders_are_named_by_file_and_line(tmp_path):
    """E5-E11."""
    from adaptdpo.tasks.base import TaskFileError
    from adaptdpo.tasks.toy.task import load_task

    task = _fake_task(tmp_path)
    assert load_task(str(task)).stats["eval_pairs"] == 3
    lines = (task / "eval.jsonl").read_text().splitlines()
    (task / "eval.jsonl").write_text("\n".join(lines[:2]) + "\n")  # cut short: 2 of 3 pairs
    with pytest.raises(TaskFileError, match=r"eval\.jsonl: 2 pairs, but task\.json records 3"):
        load_task(str(task))
    (task / "eval.jsonl").write_text(lines[0] + "\n{broken\n" + lines[1] + "\n")
    with pytest.raises(TaskFileError, match=r"eval\.jsonl: line 2: invalid JSON"):
        load_task(str(task))
    (task / "task.json").write_text('{"spec": {')
    with pytest.raises(TaskFileError, match=r"task\.json: invalid JSON at line 1"):
        load_task(str(task))
    with pytest.raises(TaskFileError, match="no such task folder"):
        load_task(str(tmp_path / "nowhere"))


@pytest.mark.slow  # command-line runs in subprocesses
def test_cli_prints_one_line_and_a_hint_and_the_traceback_with_debug(tmp_path):
    """The probe's note: every error was a traceback, argparse errors a 160-line usage."""
    out = run_cli(["--beta", "abc", "--output_dir", str(tmp_path / "x")])
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[-2] == "adaptdpo train: error: argument --beta: invalid float value: 'abc'"
    assert lines[-1] == "  hint: add --debug for the full traceback"
    assert "Traceback" not in out.stderr and "usage:" not in out.stderr
    debug = run_cli(["--beta", "abc", "--output_dir", str(tmp_path / "x"), "--debug"])
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_demo_takes_output_dash_dir_and_overrides_cannot_redirect_its_runs():
    from adaptdpo.tasks.demo import demo_arguments

    ns, overrides = demo_arguments(["--output-dir", "elsewhere", "--loss_type", "ipo"])
    assert ns.output_dir == "elsewhere" and overrides == {"loss_type": "ipo"}
    with pytest.raises(SystemExit):
        demo_arguments(["--logging_dir", "x"])
    with pytest.raises(SystemExit):
        demo_arguments(["--beta"])


# ------------------------------------------------------------------------------------------------ files


def test_run_files_are_readable_like_any_tools_output(tmp_path):
    old = os.umask(0o022)
    try:
        path = str(tmp_path / "summary.json")
        atomic_write_text(path, "{}")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    finally:
        os.umask(old)


def test_relative_paths_in_a_yaml_are_found_from_its_folder(tmp_path, monkeypatch, caplog):
    """D32: the shipped config works from any working directory."""
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="adaptdpo"):
        config = parse_config(["--output_dir", str(tmp_path / "o")], os.path.join(ROOT, "configs", "tiny-cpu.yaml"))
    assert config.train_file == os.path.join(ROOT, "data", "hh-rlhf", "harmless-base-test.jsonl.gz")
    assert "does not exist from the working directory; using" in caplog.text


# ------------------------------------------------------------------------------------------------ SamS devices


def test_scheduler_fit_data_lives_on_the_rounds_device_whatever_the_pools():
    """The GPU crash: pooled rounds (CPU) concatenated with the current round (CUDA). The meta device stands in
    for the training device: any tensor left on the pool's device makes torch.cat raise."""
    from adaptdpo.methods.sams.scheduler import PoolEntry, fit_batch

    current = PoolEntry(torch.zeros(4, 3, 8, device="meta"), torch.zeros(4, device="meta", dtype=torch.float32),
                        torch.zeros(4, device="meta"))
    pooled = [PoolEntry(torch.randn(2, 3, 8), torch.rand(2, dtype=torch.float64), torch.randn(2)) for _ in range(3)]
    contexts, rewards, predictions = fit_batch(current, pooled)
    assert contexts.device.type == rewards.device.type == predictions.device.type == "meta"
    assert contexts.shape == (10, 3, 8) and rewards.shape == predictions.shape == (10,)
    assert rewards.dtype == torch.float32


def test_scheduler_rounds_with_the_pool_on_another_device_than_the_networks():
    """End to end on CPU with the pool on 'meta': every fit after the first must move pooled rounds to the
    round's device (it raises otherwise); meta tensors cannot be read, so the pool's contents are replaced by
    CPU copies after each push to let the next fit run."""
    from adaptdpo.methods.sams.scheduler import PoolEntry, SamsScheduler

    scheduler = SamsScheduler(num_layers=3, context_dim=8, ratio=0.5, warmup_rounds=0, fit_steps=1, seed=0,
                              pool_device="meta")
    moved = []
    original = PoolEntry.to

    def tracking_to(self, device):
        moved.append((self.contexts.device.type, torch.device(device).type))
        if self.contexts.device.type == "meta":  # stands in for a pooled round on another device
            return PoolEntry(torch.randn(self.contexts.shape), torch.rand(self.rewards.shape),
                             torch.randn(self.predictions.shape))
        return original(self, device)

    PoolEntry.to = tracking_to
    try:
        for _ in range(4):
            scheduler.step(torch.randn(6, 3, 8), torch.randn(6), torch.randn(6), 0.7)
    finally:
        PoolEntry.to = original
    assert len(scheduler.pool) == 3
    assert ("meta", "cpu") in moved  # pooled rounds came back to the round's device before the fit


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sams_scheduler_on_cuda_with_a_cpu_pool():
    from adaptdpo.methods.sams.scheduler import SamsScheduler

    scheduler = SamsScheduler(num_layers=3, context_dim=8, warmup_rounds=0, seed=0).to("cuda")
    for _ in range(5):
        mask = scheduler.step(torch.randn(6, 3, 8, device="cuda"), torch.randn(6, device="cuda"),
                              torch.randn(6, device="cuda"), 0.7)
    assert mask.device.type == "cuda" and len(scheduler.pool) == 4
    assert all(entry.contexts.device.type == "cpu" for entry in scheduler.pool)



def test_tr_dpo_moving_reference_resumes_exactly(small, tmp_path):
    """TR-DPO's reference changes during training: a run killed after step 3 and resumed from checkpoint 2 ends
    with the same weights as the uninterrupted run (the reference is saved with every checkpoint)."""
    data, tok = small
    common = dict(max_steps=5, save_strategy="steps", save_steps=2, sync_ref_model="true", ref_model_sync_steps=1,
                  ref_model_mixup_alpha=0.5)
    whole, crashed = str(tmp_path / "whole"), str(tmp_path / "crashed")
    train_in_process(base_argv(data, tok, whole, **common))
    crashed_run(base_argv(data, tok, crashed, **common), 3)
    assert os.path.exists(os.path.join(crashed, "checkpoint-2", "reference_model.safetensors"))
    summary = train_in_process(base_argv(data, tok, crashed, **common))
    assert summary["resumed_from"].endswith("checkpoint-2")
    a, b = final_params(whole), final_params(crashed)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    losses = [r["loss"] for r in train_logs(whole)], [r["loss"] for r in train_logs(crashed)]
    assert losses[0] == losses[1]


# ------------------------------------------------------------------------------------------------ issue 28: bad input

@pytest.mark.parametrize("flags", [["--num_train_epochs", "0"], ["--max_steps", "0"]], ids=["epochs-0", "max-steps-0"])
def test_a_run_that_would_train_nothing_is_refused_before_any_work(small, tmp_path, flags):
    """Issue 28: --num_train_epochs 0 reported a complete run with train_loss 0.0 and saved the untrained model;
    --max_steps 0 trained a step while config.yaml recorded 0. Both are refused, nothing is written; the Python
    trainer refuses them at train() as well."""
    data, tok = small
    out = str(tmp_path / "run")
    with pytest.raises(ValueError, match=r"trains nothing|would train nothing"):
        train_in_process(base_argv(data, tok, out) + flags)
    assert not os.path.exists(out)


def test_python_trainer_refuses_a_run_that_trains_nothing(models_and_examples, tmp_path):
    from helpers import make_trainer

    trainer = make_trainer(models_and_examples, tmp_path / "o", num_train_epochs=0)
    with pytest.raises(ValueError, match="num_train_epochs=0 with max_steps=-1 trains nothing"):
        trainer.train()


def test_an_output_dir_that_is_a_file_is_named(tmp_path):
    """Issue 28: an output_dir that is an existing file."""
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    with pytest.raises(ValueError, match=rf"output_dir={path} is a file; it must be a folder"):
        parse_config(["--output_dir", str(path)])
    assert path.read_text() == "mine"


def test_a_full_disk_during_a_checkpoint_says_so_and_the_run_resumes(small, tmp_path, monkeypatch):
    """Issue 28: a full disk during a checkpoint surfaced as torch's zip-writer assertion ("unexpected pos ..."). The
    message now says that the disk is full, where, how much is free and how much the checkpoint needs, and what the
    run resumes from; the same command then resumes from the last complete checkpoint. (The write failure is torch's
    own message, recorded under a file-size limit; the free space is the one thing simulated.)"""
    import transformers.trainer as hf_trainer

    import adaptdpo.training.checkpointing as checkpointing

    data, tok = small
    out = str(tmp_path / "run")
    argv = base_argv(data, tok, out, max_steps=6, save_strategy="steps", save_steps=2, plots=False)
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, str) and os.path.join("checkpoint-4", "optimizer.pt") in f:
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04")  # what the writer had got out before the disk filled up
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(hf_trainer.torch, "save", save)
    monkeypatch.setattr(checkpointing, "free_bytes", lambda path: 4096)
    with pytest.raises(checkpointing.CheckpointWriteError) as caught:
        train_in_process(argv)
    message = str(caught.value)
    assert f"writing checkpoint {out}/checkpoint-4 failed: the disk holding {out} is full (0.0 MB free; the " \
           "checkpoint needs about " in message
    needed = checkpointing.folder_bytes(os.path.join(out, "checkpoint-2"))
    assert f"needs about {needed / 2**20:.1f} MB" in message
    assert f"the run resumes from {out}/checkpoint-2 (the last complete checkpoint)" in message
    assert "unexpected pos 704 vs 598" in message  # the original error is kept in the message
    monkeypatch.undo()
    summary = train_in_process(argv)
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 6


def test_resuming_into_another_model_shape_names_the_fields_before_tokenising(small, tmp_path, monkeypatch):
    """Issue 28: a checkpoint resumed into a model of another shape printed a 4 KB state-dict mismatch after
    tokenising. The checkpoint's weights (safetensors headers) are compared with the requested model first, and the
    model config fields that differ are named."""
    import adaptdpo.training.job as job

    data, tok = small
    out = str(tmp_path / "run")
    crashed_run(base_argv(data, tok, out, max_steps=4, save_strategy="steps", save_steps=2), 3)

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised before the model check")

    monkeypatch.setattr(job, "tokenize_dataset", no_tokenising)
    wider = base_argv(data, tok, out, max_steps=4, save_strategy="steps", save_steps=2, tiny_hidden_size=48,
                      accept_config_change="true")
    with pytest.raises(ValueError, match=r"resume checkpoint .*checkpoint-2 holds another model than the one asked "
                                         r"for: the model config differs: head_dim: 16 in the checkpoint, 24 asked "
                                         r"for; hidden_size: 32 in the checkpoint, 48 asked for; intermediate_size: "
                                         r"128 in the checkpoint, 192 asked for; 21 tensor\(s\) have another shape "
                                         r"\(first: model\.embed_tokens\.weight \[512, 32\]") as caught:
        train_in_process(wider)
    assert len(str(caught.value)) < 1000


def test_copies_of_training_rows_stay_out_of_the_eval_split(hh_rows, tmp_path, caplog):
    """Issue 28: with eval_fraction, copies of training rows landed in the eval split and inflated its metrics. They
    are left out of it (counted in a warning); an eval_file with copies is warned about, not changed."""
    from adaptdpo.training.prepared_data import prepare_rows

    path = str(tmp_path / "dups.jsonl")
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in hh_rows[:20]]
    write_small_dataset(path, rows + rows[:10], n=30)  # rows 20-29 copy rows 0-9
    with caplog.at_level(logging.WARNING, logger="adaptdpo"):
        data = prepare_rows(parse_config(["--train_file", path, "--eval_fraction", "0.3", "--seed", "1"]))
    key = lambda r: (r["prompt"], r["chosen"], r["rejected"])  # noqa: E731
    train = {key(r) for r in data.train_rows}
    assert data.eval_rows and not any(key(r) in train for r in data.eval_rows)
    held = 9  # round(0.3 * 30)
    copies = held - len(data.eval_rows)
    assert copies > 0 and (f"eval_fraction=0.3: {copies} of the {held} held-out rows are copies of training rows"
                           in caplog.text)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adaptdpo"):
        data = prepare_rows(parse_config(["--train_file", path, "--eval_file", path]))
    assert len(data.eval_rows) == 30 and f"eval_file={path}: 30 of its 30 rows are copies of training rows" in \
        caplog.text


def test_reference_log_prob_columns_are_either_used_checked_or_said_to_be_ignored(tmp_path, models_and_examples,
                                                                                    caplog):
    """Issue 28: ref_chosen_logps / ref_rejected_logps columns were silently ignored, even holding NaN or text. In raw
    rows they are ignored with a warning (the live reference scores the pairs, as TRL); in already tokenised data
    (TRL's precompute leaves them there) they are the reference values: checked, then used."""
    import copy

    from datasets import Dataset

    from adaptdpo.training.config import AdaptiveDPOConfig
    from adaptdpo.training.trainer import AdaptiveDPOTrainer

    path = str(tmp_path / "with_ref.jsonl")
    _write_lines(path, [json.dumps({**json.loads(GOOD), "ref_chosen_logps": "n/a", "ref_rejected_logps": None}) + "\n",
                        GOOD])
    rows, report = load_preference_rows(path)
    assert report.reference_column_rows == 1 and len(rows) == 2
    assert f"{path}: 1 row(s) carry ref_chosen_logps / ref_rejected_logps; they are ignored" in \
        report.reference_columns_notice()
    policy, reference, examples, tokenizer = models_and_examples
    args = AdaptiveDPOConfig(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none")
    with caplog.at_level(logging.WARNING, logger="adaptdpo"):
        AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                           processing_class=tokenizer,
                           train_dataset=Dataset.from_list([{**json.loads(GOOD), "ref_chosen_logps": float("nan"),
                                                             "ref_rejected_logps": -1.0}] * 2))
    assert "train_dataset: 2 row(s) carry ref_chosen_logps / ref_rejected_logps; they are ignored" in caplog.text

    def tokenised(chosen, rejected):
        return Dataset.from_list([{**e, "ref_chosen_logps": c, "ref_rejected_logps": r}
                                  for e, c, r in zip(examples, chosen, rejected, strict=True)])

    n = len(examples)
    for bad, problem in ((float("nan"), "nan is not a log-prob"), (2.5, "2.5 is not a log-prob")):
        with pytest.raises(DataValidationError, match=rf"train_dataset: row 3, field 'ref_rejected_logps': {problem}"):
            AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                               processing_class=tokenizer,
                               train_dataset=tokenised([-1.0] * n, [-1.0] * 3 + [bad] + [-1.0] * (n - 4)))
    with pytest.raises(DataValidationError, match=r"row 0, field 'ref_chosen_logps': expected a number"):
        AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                           processing_class=tokenizer, train_dataset=tokenised(["-1.0"] * n, [-1.0] * n))
    # sound values are used: the policy's own log-probs as the reference give the first loss ln 2 exactly
    from adaptdpo.data.collate import PreferenceCollator
    from adaptdpo.models.sequence_logps import sequence_logps

    with torch.no_grad():
        own_chosen, own_rejected = sequence_logps(policy, PreferenceCollator(tokenizer.pad_token_id)(examples)).split()
    trainer = AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                                 processing_class=tokenizer,
                                 train_dataset=tokenised(own_chosen.tolist(), own_rejected.tolist()))
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(n))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_a_utf8_byte_order_mark_is_read_not_called_an_invalid_row(tmp_path, suffix):
    """Issue 28: a file saved with a UTF-8 BOM (Windows editors) had its first row called invalid."""
    path = tmp_path / f"bom.{suffix}"
    text = GOOD * 2 if suffix == "jsonl" else 'prompt,chosen,rejected\n"Q?", yes, no\n"R?", yes, no\n'
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    rows, report = load_preference_rows(str(path))
    assert len(rows) == 2 and not report.skipped and rows[0]["prompt"] == "Q?"
