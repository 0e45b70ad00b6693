"""SamS inside the trainer (mask mode): ratio 1 is DPO; otherwise DPO on the selected pairs alone."""

import json

import pytest
import torch
from helpers import loss_and_grads, make_trainer

from adaptdpo.data import PreferenceCollator


def test_ratio_one_is_exactly_dpo(models_and_examples, tmp_path):
    batch = PreferenceCollator(0)(models_and_examples[2])
    dpo = loss_and_grads(make_trainer(models_and_examples, tmp_path / "a"), batch, 8)
    sams = loss_and_grads(make_trainer(models_and_examples, tmp_path / "b", method="sams", sams_ratio=1.0), batch, 8)
    assert dpo[0] == sams[0]
    for key in dpo[1]:
        assert torch.equal(dpo[1][key], sams[1][key]), key


def test_update_is_dpo_on_the_selected_pairs(models_and_examples, tmp_path):
    _, _, examples, _ = models_and_examples
    trainer = make_trainer(models_and_examples, tmp_path / "s", method="sams", sams_warmup_rounds=1, sams_ratio=0.5)
    for shift in (3, 5):  # two earlier rounds: the scheduler has been fitted once before scoring
        rolled = examples[shift:] + examples[:shift]
        trainer.compute_loss(trainer.model, dict(PreferenceCollator(0)(rolled)), num_items_in_batch=torch.tensor(4))
    loss, grads = loss_and_grads(trainer, PreferenceCollator(0)(examples), 4)
    trainer.flush_trace()
    last = [json.loads(line) for line in open(tmp_path / "s" / "pairs.jsonl", encoding="utf-8")][-1]
    selected = [i for i, t in enumerate(last["trained"]) if t]
    assert len(selected) == 4
    reference = make_trainer(models_and_examples, tmp_path / "d")
    ref_loss, ref_grads = loss_and_grads(reference, PreferenceCollator(0)([examples[i] for i in selected]), 4)
    assert loss == pytest.approx(ref_loss, abs=1e-6)
    for key in grads:
        torch.testing.assert_close(grads[key], ref_grads[key], atol=1e-6, rtol=1e-4, msg=key)
    metrics = trainer._metrics["train"]
    assert {"sams/selected_fraction", "sams/batch_reward", "sams/exploit_loss", "sams/selected_margin",
            "sams/unselected_margin"} <= set(metrics)
