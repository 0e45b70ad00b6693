"""The main job itself: `adaptdpo demo --quick` trains the four methods on the gold task and reports."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_demo_compares_the_four_methods(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "adaptdpo.cli", "demo", "--quick", "--output_dir", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "adaptdpo demo" in result.stdout
    for name in ("dpo", "beta_dpo", "sams", "beta_dpo+sams"):
        assert f"| {name} |" in result.stdout
    results = json.load(open(out / "results.json", encoding="utf-8"))["results"]
    for name, r in results.items():
        assert r["gold/win_rate"] > 0.5, name  # every method moves the policy toward the gold reward
        assert r["kl"] > 0, name
    assert results["dpo"]["flipped_trained_fraction"] == 1.0
    assert results["sams"]["clean_trained_fraction"] < 0.7  # SamS trains on about half of each batch
    report = (out / "report.md").read_text()
    for plot in ("gold_metrics.png", "reward_vs_kl.png", "beta_and_selection.png"):
        assert (out / "plots" / plot).exists() and plot in report
    assert (out / "beta_dpo" / "plots" / "beta_dpo.png").exists()
