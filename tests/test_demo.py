"""The main job itself: `adaptdpo demo` trains and its reward accuracy rises above chance."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_trains_and_separates_chosen_from_rejected(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "adaptdpo.cli", "demo", "--output_dir", str(out),
                             "--disable_tqdm", "true"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "adaptdpo demo" in result.stdout
    records = [json.loads(line) for line in open(out / "metrics.jsonl", encoding="utf-8")]
    train = [r for r in records if "rewards/accuracies" in r]
    last_epoch = [r for r in train if r["epoch"] > 2]
    assert sum(r["rewards/accuracies"] for r in last_epoch) / len(last_epoch) > 0.8  # learns its training pairs
    assert sum(r["loss"] for r in last_epoch) / len(last_epoch) < train[0]["loss"] - 0.2
    summary = json.load(open(out / "summary.json", encoding="utf-8"))
    assert summary["final_eval"]["eval_rewards/accuracies"] > 0.5
    assert summary["data"]["skipped_rows"] == 4
    assert (out / "plots" / "training_curves.png").exists()
