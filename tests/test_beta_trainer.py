"""β-DPO inside the trainer: reduction to DPO, the kept-subset update, eval leaves the state alone."""

import json
import math
import os

import pytest
import torch
from helpers import base_argv, loss_and_grads, make_trainer, train_in_process, train_logs, write_small_dataset

from adaptdpo.data.collate import PreferenceCollator


def test_alpha_zero_keep_one_is_exactly_dpo(models_and_examples, tmp_path):
    batch = PreferenceCollator(0)(models_and_examples[2])
    dpo = loss_and_grads(make_trainer(models_and_examples, tmp_path / "a"), batch, 8)
    beta = loss_and_grads(make_trainer(models_and_examples, tmp_path / "b", method="beta_dpo", beta_dpo_alpha=0.0,
                                       beta_dpo_keep_ratio=1.0), batch, 8)
    assert dpo[0] == beta[0]
    for key in dpo[1]:
        assert torch.equal(dpo[1][key], beta[1][key]), key


def test_update_is_dpo_on_the_kept_pairs_with_beta_batch(models_and_examples, tmp_path):
    """Dropped pairs contribute exactly nothing: the β-DPO gradient is the DPO gradient of the kept pairs alone."""
    _, _, examples, _ = models_and_examples
    trainer = make_trainer(models_and_examples, tmp_path / "b", method="beta_dpo", beta_dpo_alpha=5.0,
                           beta_dpo_keep_ratio=0.5)
    # one step on unrelated data first, so that M0 and σ are not just this batch's statistics
    warm = PreferenceCollator(0)(examples[4:] + examples[:4])
    trainer.compute_loss(trainer.model, dict(warm), num_items_in_batch=torch.tensor(4))
    trainer._metrics["train"].clear()
    loss, grads = loss_and_grads(trainer, PreferenceCollator(0)(examples), 4)
    trainer.flush_trace()
    trace = [json.loads(line) for line in open(tmp_path / "b" / "pairs.jsonl", encoding="utf-8")]
    kept = [i for i, t in enumerate(trace[-1]["trained"]) if t]
    beta_batch = trace[-1]["beta"]
    assert len(kept) == 4 and beta_batch != pytest.approx(0.2)
    reference = make_trainer(models_and_examples, tmp_path / "d", beta=beta_batch)
    ref_loss, ref_grads = loss_and_grads(reference, PreferenceCollator(0)([examples[i] for i in kept]), 4)
    assert loss == pytest.approx(ref_loss, abs=1e-6)
    for key in grads:
        torch.testing.assert_close(grads[key], ref_grads[key], atol=1e-6, rtol=1e-4, msg=key)


def test_evaluation_does_not_touch_m0_sigma_or_the_generator(models_and_examples, tmp_path):
    from datasets import Dataset

    _, _, examples, _ = models_and_examples
    trainer = make_trainer(models_and_examples, tmp_path, method="beta_dpo", per_device_eval_batch_size=4)
    trainer.compute_loss(trainer.model, dict(PreferenceCollator(0)(examples)), num_items_in_batch=torch.tensor(6))
    before = trainer.step_policy.state_dict()["beta_dpo"]
    metrics = trainer.evaluate(Dataset.from_list(examples))
    after = trainer.step_policy.state_dict()["beta_dpo"]
    assert (before["m0"], before["sigma"], before["steps"]) == (after["m0"], after["sigma"], after["steps"])
    assert torch.equal(before["generator"], after["generator"])
    assert "eval_rewards/accuracies" in metrics and "eval_beta/batch" not in metrics


def test_training_run_beta_moves_with_the_kept_margins(hh_rows, tokenizer, tmp_path):
    """β > β0 exactly when the kept pairs' mean margin exceeds M0, and below when it falls short (Eq. 7)."""
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    data = write_small_dataset(str(tmp_path / "pairs.jsonl"), hh_rows, n=64)
    out = str(tmp_path / "run")
    train_in_process(base_argv(data, str(tmp_path / "tok"), out, method="beta_dpo", beta=0.1, beta_dpo_alpha=2.0,
                               per_device_train_batch_size=8, num_train_epochs=3, learning_rate=1e-2))
    logs = train_logs(out)
    above = below = 0
    for record in logs:
        gap, beta = record["beta/kept_margin_minus_m0"], record["beta/batch"]
        assert beta - 0.1 == pytest.approx(0.1 * 2.0 * gap, abs=1e-6)  # β = β0·(1 + α·(mean kept M − M0))
        above += gap > 1e-9
        below += gap < -1e-9
        assert record["filter/kept_fraction"] == pytest.approx(6 / 8)  # k = ⌊.8·8⌋ = 6
    assert above > 0 and below > 0, (above, below)
    trace = [json.loads(line) for line in open(os.path.join(out, "pairs.jsonl"), encoding="utf-8")]
    assert len(trace) == len(logs) and all(sum(t["trained"]) == 6 for t in trace)


@pytest.mark.parametrize("loss_type", __import__("adaptdpo.methods.losses", fromlist=["LOSS_TYPES"]).LOSS_TYPES)
def test_every_loss_type_trains_on_the_kept_pairs_with_beta_batch(models_and_examples, tmp_path, loss_type):
    """β-IPO, β-SPPO, ...: for every loss, the β-DPO update is that loss on the kept pairs at β_batch."""
    _, _, examples, _ = models_and_examples
    smoothing = 0.1 if loss_type in ("robust", "exo_pair", "aot", "aot_unpaired") else 0.0
    trainer = make_trainer(models_and_examples, tmp_path / "b", method="beta_dpo", beta_dpo_alpha=5.0,
                           beta_dpo_keep_ratio=0.5, loss_type=loss_type, label_smoothing=smoothing)
    trainer.compute_loss(trainer.model, dict(PreferenceCollator(0)(examples[4:] + examples[:4])),
                         num_items_in_batch=torch.tensor(4))
    loss, grads = loss_and_grads(trainer, PreferenceCollator(0)(examples), 4)
    trainer.flush_trace()
    last = [json.loads(line) for line in open(tmp_path / "b" / "pairs.jsonl", encoding="utf-8")][-1]
    kept = [i for i, t in enumerate(last["trained"]) if t]
    reference = make_trainer(models_and_examples, tmp_path / "d", beta=last["beta"], loss_type=loss_type,
                             label_smoothing=smoothing)
    ref_loss, ref_grads = loss_and_grads(reference, PreferenceCollator(0)([examples[i] for i in kept]), 4)
    assert math.isfinite(loss) and loss == pytest.approx(ref_loss, abs=1e-5, rel=1e-5)
    for key in grads:
        torch.testing.assert_close(grads[key], ref_grads[key], atol=1e-6, rtol=1e-4, msg=key)


def test_gradient_accumulation_normalises_by_the_kept_pairs(hh_rows, tokenizer, tmp_path):
    """2 micro-batches of 4 pairs, 3 kept in each: the step's loss is the mean over the 6 kept pairs.

    With lr 0 the policy stays the reference, every pair's loss is ln 2, so the logged loss must be ln 2
    exactly (dividing by all 8 pairs would give 0.52)."""
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    data = write_small_dataset(str(tmp_path / "pairs.jsonl"), hh_rows, n=16)
    out = str(tmp_path / "run")
    train_in_process(base_argv(data, str(tmp_path / "tok"), out, method="beta_dpo", per_device_train_batch_size=4,
                               gradient_accumulation_steps=2, max_steps=2, learning_rate=0.0))
    logs = train_logs(out)
    assert len(logs) == 2
    for record in logs:
        assert record["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert record["filter/kept_fraction"] == pytest.approx(0.75)


@pytest.mark.parametrize("method", ["dpo", "beta_dpo"])
def test_non_finite_log_probs_stop_the_step_with_a_clear_error(models_and_examples, tmp_path, method):
    _, _, examples, _ = models_and_examples
    trainer = make_trainer(models_and_examples, tmp_path, method=method)
    batch = dict(PreferenceCollator(0)(examples))
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite log-probs at step 1"):
        trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(8))
