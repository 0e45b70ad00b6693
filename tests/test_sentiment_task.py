"""The sentiment task on the real model (issue 14): the pool sampled from SmolLM2-135M-Instruct in resumable chunks,
the task folder in TRL's conversational format, `adaptdpo eval --task` on it, and the real-model experiment driver's
quick mode (every stage: sampling, judging, pairing, training, evaluation, report) as a test.

Needs the packaged SmolLM2 (`make test` installs it) and vaderSentiment (the test extra)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import packaged_model_installed

from adaptdpo.models.sources import PACKAGED_MODELS

SMOL = "smollm2-135m-instruct"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



pytestmark = [pytest.mark.skipif(not packaged_model_installed(SMOL), reason="needs: " + PACKAGED_MODELS[SMOL].install),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def quick_task(tmp_path_factory):
    pytest.importorskip("vaderSentiment")
    from adaptdpo.tasks.sentiment.task import SentimentSpec, build_sentiment_task

    cache = tmp_path_factory.mktemp("sentiment-cache")
    return build_sentiment_task(SentimentSpec.quick(flip_rate=0.5, max_new_tokens=12), str(cache)), cache


@pytest.mark.slow  # samples SmolLM2
def test_the_quick_task_is_conversational_judged_by_vader_and_split_by_prompt(quick_task):
    from adaptdpo.tasks.loading import load_any_task
    from adaptdpo.tasks.sentiment.task import SentimentSpec, split_prompts

    task, _ = quick_task
    train, held = task.train_rows(), task.eval_rows()
    assert task.stats["kind"] == "sentiment" and len(train) == 4 == task.stats["train_pairs"]
    judge = task.gold_reward
    for row in train + held:
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert [m["role"] for m in row["chosen"]] == ["assistant"] == [m["role"] for m in row["rejected"]]
        # the gold fields are VADER's scores of the stored completions
        assert row["gold_chosen"] == judge(row["prompt"], row["chosen"][0]["content"])
        assert row["gold_rejected"] == judge(row["prompt"], row["rejected"][0]["content"])
    for row in held:  # held-out pairs: labelled by gold, never flipped
        assert row["gold_chosen"] > row["gold_rejected"] and not row["flipped"]
    for row in train:  # a flip is exactly a label against gold (the Bradley–Terry draw aside, recorded apart)
        assert row["flipped"] == (row["gold_chosen"] < row["gold_rejected"]) or row["gap_group"] == "low"
    train_prompts, pair_prompts, win_prompts = split_prompts(SentimentSpec.quick())
    assert {r["prompt"][0]["content"] for r in train} <= set(train_prompts)
    assert not set(train_prompts) & (set(pair_prompts) | set(win_prompts))
    assert not set(pair_prompts) & set(win_prompts)
    assert [p[0]["content"] for p in task.eval_prompts()] == win_prompts
    assert task.stats["model_sha256"] == task.stats["pool"]["model_sha256"] and len(task.stats["model_sha256"]) == 64
    loaded = load_any_task(os.path.dirname(task.train_file))
    assert type(loaded).__name__ == "SentimentTask" and loaded.max_new_tokens == 12


@pytest.mark.slow  # samples SmolLM2 twice
def test_the_pool_resumes_by_chunk_with_the_samples_of_an_uninterrupted_build(tmp_path):
    """Three chunks of 2 prompts sampled in one go, then again with the second chunk's file deleted (a kill between
    chunks): the resumed build samples only that chunk, and gets the same completions."""
    pytest.importorskip("vaderSentiment")
    import torch

    from adaptdpo.models.loading import load_pretrained, load_tokenizer
    from adaptdpo.tasks.sentiment.judge import VaderJudge
    from adaptdpo.tasks.sentiment.task import PairSampler, SentimentSpec, sample_pool, split_prompts

    spec = SentimentSpec.quick(max_new_tokens=6, sampling_batch=2)
    prompts = split_prompts(spec)[0][:6]
    sampler = PairSampler(load_pretrained(SMOL), load_tokenizer(SMOL), VaderJudge(), spec)
    first, dropped = sample_pool(sampler, prompts, str(tmp_path), "pool", 7)
    assert dropped == [] and [r["prompt"][0]["content"] for r in first] == prompts
    assert sorted(os.listdir(tmp_path)) == ["pool-00000.json", "pool-00001.json", "pool-00002.json"]
    os.remove(tmp_path / "pool-00001.json")
    calls = []
    original = sampler.chunk
    sampler.chunk = lambda p, s: calls.append(s) or original(p, s)
    again, _ = sample_pool(sampler, prompts, str(tmp_path), "pool", 7)
    assert calls == [7 + 1000]  # only the missing chunk, with its own seed
    assert again == first
    assert all(r["y1"] != r["y2"] and -1 <= r["gold1"] <= 1 and 1 <= r["tokens1"] <= 6 for r in first)
    torch.manual_seed(0)  # the global generator plays no part: the same call gives the same samples
    assert sampler.chunk(prompts[:2], 7)[0] == first[:2]


def test_the_task_command_finds_the_cached_task_and_new_settings_reuse_the_pool(quick_task, capsys):
    """`adaptdpo task sentiment --quick` with the fixture's settings prints its folder (no sampling: the pool folder
    is untouched); another flip rate is a new task folder drawn from the same pool."""
    from adaptdpo.cli import main

    task, cache = quick_task
    pools = sorted(p for p in os.listdir(cache) if p.startswith("sentiment-pool-"))
    stamp = os.stat(cache / pools[0]).st_mtime_ns
    assert main(["task", "sentiment", "--quick", "--cache", str(cache), "--flip_rate", "0.5",
                 "--max_new_tokens", "12"]) == 0
    assert capsys.readouterr().out.strip() == os.path.dirname(task.train_file)
    assert main(["task", "sentiment", "--quick", "--cache", str(cache), "--flip_rate", "0",
                 "--max_new_tokens", "12"]) == 0
    clean = capsys.readouterr().out.strip()
    assert clean != os.path.dirname(task.train_file)
    assert sorted(p for p in os.listdir(cache) if p.startswith("sentiment-pool-")) == pools
    assert os.stat(cache / pools[0]).st_mtime_ns == stamp
    rows = [json.loads(line) for line in open(os.path.join(clean, "train.jsonl"), encoding="utf-8")]
    assert not any(r["flipped"] for r in rows)


@pytest.mark.slow  # samples SmolLM2
def test_eval_task_on_the_reference_itself_gives_win_rate_one_half_and_zero_kl(quick_task, tmp_path):
    """The policy = the reference: the same random numbers give the same samples, so the win rate is exactly 0.5,
    the KL estimate exactly 0, and every implicit reward 0 (accuracy ½ by the tie rule)."""
    task, _ = quick_task
    out = tmp_path / "metrics.json"
    from adaptdpo.cli import main

    assert main(["eval", task.reference_dir, "--task", os.path.dirname(task.train_file), "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["gold/win_rate"] == 0.5 and metrics["kl"] == 0.0
    assert metrics["gold/accuracy"] == 0.5 and metrics["gold/margin"] == 0.0
    assert metrics["gold/reward"] == metrics["gold/reference_reward"]
    assert metrics["gold/eval_pairs"] == task.stats["eval_pairs"]


@pytest.mark.slow  # about 3 minutes: 8 runs of SmolLM2 and a second call
def test_the_real_model_experiments_quick_mode_runs_every_stage_and_resumes(tmp_path):
    """benchmarks/real_model.py --quick: the task is sampled and judged, DPO, DPO on the probe audit's cleaned file
    and Selective DPO on its scores train 2 steps of the top 2 blocks of SmolLM2 on clean and 20%-flipped pairs, the
    β sweep and HH run, each is evaluated (the policy from the reference's frozen bottom), and the report (tables,
    recovery table, frontier and recovery figures) is written; a second call finds every run done."""
    pytest.importorskip("vaderSentiment")
    pytest.importorskip("matplotlib")
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "real_model.py"), "--quick", "--workdir",
               str(tmp_path / "work"), "--out", str(tmp_path / "tables.md"), "--plots", str(tmp_path / "plots")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "all runs done" in done.stderr
    records = [json.loads(line) for line in open(tmp_path / "work" / "quick" / "results.jsonl", encoding="utf-8")]
    # noise: 3 methods × 2 flip rates; frontier: DPO at β 0.1 (the noise run at 0%, shared) and 1.0; HH 2
    assert len(records) == 9
    sentiment = [r["result"] for r in records if "gold/accuracy" in r["result"]]
    hh = [r["result"] for r in records if "hh/accuracy" in r["result"]]
    assert len(sentiment) == 7 and len(hh) == 2
    for r in sentiment:
        assert r["steps"] == 2 and 0 <= r["gold/accuracy"] <= 1 and 0 <= r["gold/win_rate"] <= 1
        assert -1 <= r["gold/reward"] <= 1 and r["kl"] == r["kl"]
        assert r["device"] and r["torch"] and r["transformers"]
    assert any(r["kl"] != 0 for r in sentiment)  # training moved the policy off the reference
    assert all(r["eval/shared_frozen_blocks"] == 28 and r["eval/sampling_tokens_per_s"] > 0 for r in sentiment)
    audited = [r for r in sentiment if "audit/estimated_flip_rate" in r]
    assert len(audited) == 4 and all(0 <= r["audit/estimated_flip_rate"] <= 1 and r["audit/dropped"] >= 0
                                     for r in audited)
    tables = (tmp_path / "tables.md").read_text()
    for title in ("at 0% and 20% flips", "Noise recovery", "Reward–KL frontier", "HH (Anthropic"):
        assert title in tables
    for figure in ("sentiment_frontier.png", "sentiment_recovery.png"):
        assert (tmp_path / "plots" / figure).stat().st_size > 10_000
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0 and "10 runs, 0 to do" in again.stderr
    assert (tmp_path / "tables.md").read_text() == tables
