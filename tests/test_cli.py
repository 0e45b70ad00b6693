import os
import subprocess
import sys

import pytest
import yaml

from adaptdpo.training.config_io import config_reference_markdown, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_yaml_then_command_line_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"beta": 0.3, "loss_type": "ipo", "max_length": 99, "output_dir": str(tmp_path),
                                    "use_cpu": True}))
    config = parse_config(["--beta", "0.05", "--label_smoothing", "0.1"], str(path))
    assert config.beta == 0.05  # the command line wins
    assert config.loss_type == ["ipo"] and config.max_length == 99 and config.label_smoothing == 0.1


def test_unknown_yaml_key_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("betta: 0.3\n")
    with pytest.raises(ValueError, match=r"unknown config field\(s\): betta \(did you mean beta\?\)"):
        parse_config([], str(path))


def test_invalid_values_are_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"argument --loss_type.*invalid choice: 'nope'"):  # no usage dump, no exit
        parse_config(["--loss_type", "nope", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="beta must be > 0"):
        parse_config(["--beta", "0", "--output_dir", str(tmp_path)])


@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "hh-1b-gpu.yaml", "smollm2-hh-gpu.yaml", "beta-dpo-tiny-cpu.yaml"])
def test_shipped_configs_parse(name):
    # bf16 needs a GPU to validate; everything else of the GPU config is checked here
    path = os.path.join(ROOT, "configs", name)
    config = parse_config(["--bf16", "false", "--use_cpu", "true"], path)
    assert config.method == yaml.safe_load(open(path))["method"]
    assert config.dtype == "float32"  # master weights in float32 (bf16 weights lose DPO-sized updates)


def test_help_lists_our_fields():
    out = subprocess.run([sys.executable, "-m", "adaptdpo.cli", "train", "--help-all"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0
    for flag in ("--beta", "--loss_type", "--train_file", "--skip_invalid_rows", "--precompute_ref_log_probs",
                 "--per_device_train_batch_size"):
        assert flag in out.stdout


def test_config_reference_doc_is_up_to_date():
    with open(os.path.join(ROOT, "docs", "config.md"), encoding="utf-8") as fh:
        doc = fh.read()
    assert config_reference_markdown() in doc, "regenerate: adaptdpo config-reference (see docs/config.md)"
