"""The gold-reward task generator and the evaluation metrics, on hand-built cases."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

from adaptdpo.data.rows import load_preference_rows
from adaptdpo.evaluation.metrics import gold_generation_metrics, preference_accuracy, selection_of_flipped_pairs
from adaptdpo.tasks.toy.language import Language
from adaptdpo.tasks.toy.task import ToySpec, build_task

TINY = dict(corpus_size=400, reference_steps=15, pool_prompts=240, train_pairs=60, eval_pairs=24, eval_prompts=8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("gold-cache"))


def test_gold_reward_by_hand():
    lang = Language.create(seed=0, num_words=4, feature_dim=2, prompt_words=2)
    lang.vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0], [-1.0, 0.0]], dtype=torch.float64)
    lang.quality = torch.tensor([0.5, 0.0, -1.0, 2.0], dtype=torch.float64)
    lang.scale = 2.0
    a, b, c, d = lang.words
    # u = normalise(mean([1,0],[0,1])) = (1/√2, 1/√2); per word q + ⟨u, v⟩
    per_word = {a: 0.5 + 1 / math.sqrt(2), c: -1.0 + 7 / math.sqrt(2), d: 2.0 - 1 / math.sqrt(2)}
    expected = (per_word[a] + per_word[c] + per_word[d] + 0.0) / 4 / 2.0  # an unknown word counts 0
    assert lang.gold_reward(lang.prompt_text([a, b]), f" {a} {c} {d} zzzz") == pytest.approx(expected, abs=1e-12)
    assert lang.gold_reward(lang.prompt_text([a, b]), " ") == 0.0


def test_task_is_deterministic_and_in_the_standard_format(cache, tmp_path):
    spec = ToySpec(seed=3, **TINY)
    one = build_task(spec, cache)
    two = build_task(spec, str(tmp_path / "other-cache"))
    assert open(one.train_file).read() == open(two.train_file).read()
    assert open(one.eval_file).read() == open(two.eval_file).read()
    rows, report = load_preference_rows(one.train_file)
    assert len(rows) == 60 and not report.skipped
    assert len(one.eval_prompts()) == 8 and not set(one.eval_prompts()) & {r["prompt"] for r in rows}


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_gap_mixture(cache, fraction):
    task = build_task(ToySpec(seed=3, high_gap_fraction=fraction, flip_rate=0.0, **TINY), cache)
    rows = task.train_rows()
    gaps = [abs(r["gold_chosen"] - r["gold_rejected"]) for r in rows]
    high = [g >= task.stats["high_gap_cut"] for g in gaps]
    low = [g <= task.stats["low_gap_cut"] for g in gaps]
    assert sum(high) == round(fraction * 60) and sum(low) == 60 - round(fraction * 60)
    assert [r["gap_group"] == "high" for r in rows] == high


def test_flips_are_recorded_and_exact(cache):
    """With a Bradley–Terry temperature near 0 the labels follow the gold reward, except the flipped pairs."""
    task = build_task(ToySpec(seed=3, flip_rate=0.25, bt_temperature=1e-9, **TINY), cache)
    rows = task.train_rows()
    flipped = [r["flipped"] for r in rows]
    assert task.stats["flipped"] == sum(flipped) and 5 <= sum(flipped) <= 25  # 15 expected of 60
    assert all((r["gold_chosen"] < r["gold_rejected"]) == r["flipped"] for r in rows)
    assert task.flipped_pair_ids() == {i for i, f in enumerate(flipped) if f}
    assert all(r["gold_chosen"] > r["gold_rejected"] and not r["flipped"] for r in task.eval_rows())


def test_policy_equal_to_reference_has_kl_zero_and_win_rate_half(cache):
    from transformers import AutoModelForCausalLM

    from adaptdpo.models.loading import load_tokenizer

    task = build_task(ToySpec(seed=3, **TINY), cache)
    reference = AutoModelForCausalLM.from_pretrained(task.reference_dir)
    tokenizer = load_tokenizer(task.reference_dir)
    metrics = gold_generation_metrics(copy.deepcopy(reference), reference, tokenizer, task.eval_prompts(),
                                      task.language.gold_reward, seed=5)
    assert metrics["kl"] == 0.0 and metrics["win_rate"] == 0.5
    assert metrics["reward"] == metrics["reference_reward"]
    assert preference_accuracy(copy.deepcopy(reference), reference, tokenizer, task.eval_rows())["accuracy"] == 0.5


def test_the_reference_samples_kept_under_a_key_are_the_ones_drawn_again(cache, monkeypatch):
    """With reference_key, a second judgement of another policy reuses the reference's samples of the first: the same
    metrics as drawing them again, one reference sampling fewer; another seed or key samples afresh."""
    from transformers import AutoModelForCausalLM

    from adaptdpo.evaluation import metrics as metrics_module
    from adaptdpo.models.loading import load_tokenizer

    task = build_task(ToySpec(seed=3, **TINY), cache)
    reference = AutoModelForCausalLM.from_pretrained(task.reference_dir)
    tokenizer = load_tokenizer(task.reference_dir)
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    args = (policy, reference, tokenizer, task.eval_prompts(), task.language.gold_reward)
    fresh = gold_generation_metrics(*args, seed=5)
    calls = []
    original = metrics_module.sample_completions
    monkeypatch.setattr(metrics_module, "sample_completions",
                        lambda model, *a: calls.append(model) or original(model, *a))
    monkeypatch.setattr(metrics_module, "_REFERENCE_SAMPLES", {})
    first = gold_generation_metrics(*args, seed=5, reference_key="ref")
    second = gold_generation_metrics(*args, seed=5, reference_key="ref")
    untimed = [{k: v for k, v in m.items() if k not in metrics_module.TIMING_KEYS} for m in (first, second, fresh)]
    assert untimed[0] == untimed[1] == untimed[2] and set(metrics_module.TIMING_KEYS) <= set(fresh)
    assert [m is reference for m in calls] == [False, True, False]  # the second call sampled the policy only
    gold_generation_metrics(*args, seed=6, reference_key="ref")
    assert [m is reference for m in calls[3:]] == [False, True]


class TableModel(torch.nn.Module):
    """A context-free 'language model': the same logits at every position."""

    def __init__(self, logits):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(logits, dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.table.expand(*input_ids.shape, -1).clone(), hidden_states=None)


def test_accuracy_of_a_hand_set_policy(cache):
    """Policy: token A's logit +1, everything else as the uniform reference. Per token, log π − log π_ref is
    1 − c for A and −c otherwise (c = log((V − 1 + e)/V)); h follows by counting, EOS included."""
    from adaptdpo.models.loading import load_tokenizer

    task = build_task(ToySpec(seed=3, **TINY), cache)
    tokenizer = load_tokenizer(task.reference_dir)
    vocab = len(tokenizer)
    word_a = task.language.words[0]
    a_id = tokenizer.convert_tokens_to_ids(word_a)
    table = [0.0] * vocab
    table[a_id] = 1.0
    policy, reference = TableModel(table), TableModel([0.0] * vocab)
    c = math.log((vocab - 1 + math.e) / vocab)
    rows = [{"prompt": "Q: x y z\nA:", "chosen": f" {word_a} {w}", "rejected": f" {w} {w} {w}"}
            for w in task.language.words[1:4]]
    rows += [{"prompt": "Q: x y z\nA:", "chosen": f" {w}", "rejected": f" {word_a} {word_a}"}
             for w in task.language.words[4:6]]
    # chosen "A w" + EOS: 1 − 3c; rejected "w w w" + EOS: −4c → h = 1 + c
    # chosen "w" + EOS: −2c; rejected "A A" + EOS: 2 − 3c → h = c − 2
    h = [1 + c] * 3 + [c - 2] * 2
    result = preference_accuracy(policy, reference, tokenizer, rows, beta=0.5)
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["margin"] == pytest.approx(0.5 * sum(h) / 5, abs=1e-5)


def test_selection_of_flipped_pairs(tmp_path):
    records = [{"step": 1, "pair_id": [0, 1, 2, 3], "trained": [1, 0, 1, 1], "margin": [0] * 4, "beta": 0.1},
               {"step": 2, "pair_id": [1, 3, 0, 2], "trained": [0, 1, 1, 0], "margin": [0] * 4, "beta": 0.1}]
    with open(tmp_path / "pairs.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    got = selection_of_flipped_pairs(str(tmp_path), flipped={1, 2})
    # flipped pairs trained on 1 of their 4 appearances, clean ones on 4 of 4: 1 of the 5 pairs trained is flipped
    assert got == {"flipped_trained_fraction": 1 / 4, "clean_trained_fraction": 4 / 4,
                   "flipped_share_of_trained": 1 / 5}
    assert math.isnan(selection_of_flipped_pairs(str(tmp_path), flipped=set())["flipped_trained_fraction"])


def test_eval_command_on_a_task_and_on_plain_data(cache, tmp_path, capsys):
    """`adaptdpo eval`: the reference scored against itself gives KL 0, win rate ½, accuracy ½."""
    import os

    from adaptdpo.cli import main

    task = build_task(ToySpec(seed=3, **TINY), cache)
    task_dir = os.path.dirname(task.train_file)
    assert main(["eval", task.reference_dir, "--task", task_dir, "--out", str(tmp_path / "m.json")]) == 0
    metrics = json.load(open(tmp_path / "m.json"))
    assert metrics["kl"] == 0.0 and metrics["gold/win_rate"] == 0.5 and metrics["gold/accuracy"] == 0.5
    assert main(["eval", task.reference_dir, "--data", task.eval_file, "--reference", task.reference_dir]) == 0
    printed = json.loads(capsys.readouterr().out.split("\n}\n")[-2] + "\n}")
    assert printed["eval/accuracy"] == 0.5 and printed["eval/pairs"] == len(task.eval_rows())
