"""Our trainer's loss and metrics against TRL 1.16's DPOTrainer, for every loss type.

Same batch, same policy and reference (two different tiny random models), both in train mode.
"""

import copy

import pytest
import torch

from adaptdpo.config import AdaptiveDPOConfig
from adaptdpo.data import PreferenceCollator, tokenize_rows
from adaptdpo.losses import TRL_LOSS_TYPES
from adaptdpo.trainer import AdaptiveDPOTrainer

trl = pytest.importorskip("trl")


@pytest.fixture(scope="module")
def setup(hh_rows, tokenizer, policy_and_reference):
    from datasets import Dataset

    policy, reference = policy_and_reference
    examples, _ = tokenize_rows(hh_rows[:6], tokenizer, max_length=96, max_prompt_length=48)
    batch = PreferenceCollator(tokenizer.pad_token_id)(examples)
    batch.pop("pair_id")
    text = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    return policy, reference, batch, text, tokenizer


def trl_loss_and_metrics(setup, loss_type, beta, label_smoothing, tmp_path):
    from trl import DPOConfig, DPOTrainer

    policy, reference, batch, text, tokenizer = setup
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type],
                     label_smoothing=label_smoothing, report_to="none",
                     bf16=False, use_cpu=True, gradient_checkpointing=False, max_length=None,
                     discopop_tau=0.05)
    trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                         train_dataset=text, processing_class=tokenizer)
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, dict(batch), False)
    metrics = {k: float(v[-1]) for k, v in trainer._metrics["train"].items()}
    return loss, metrics


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_loss_matches_trl(setup, loss_type, tmp_path):
    policy, reference, batch, _, tokenizer = setup
    beta = 0.3
    smoothing = 0.1 if loss_type in ("robust", "exo_pair", "aot", "aot_unpaired") else 0.0
    expected, trl_metrics = trl_loss_and_metrics(setup, loss_type, beta, smoothing, tmp_path)

    args = AdaptiveDPOConfig(output_dir=str(tmp_path / "ours"), beta=beta, loss_type=loss_type,
                             label_smoothing=smoothing, use_cpu=True, report_to="none")
    ours = AdaptiveDPOTrainer(model=copy.deepcopy(policy), args=args, ref_model=copy.deepcopy(reference),
                              processing_class=tokenizer)
    ours.model.train()
    n_pairs = batch["input_ids"].shape[0] // 2
    loss = ours.compute_loss(ours.model, dict(batch), num_items_in_batch=torch.tensor(n_pairs))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5, rel=1e-5)
    ours_metrics = {k: float(v[-1]) for k, v in ours._metrics["train"].items()}
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert ours_metrics[key] == pytest.approx(trl_metrics[key], abs=1e-4, rel=1e-5), key


def test_gradients_match_trl(setup, tmp_path):
    """Not just the loss: the parameter gradients agree too (sigmoid loss)."""
    from trl import DPOConfig, DPOTrainer

    policy, reference, batch, text, tokenizer = setup
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.2, report_to="none", bf16=False, use_cpu=True,
                     gradient_checkpointing=False, max_length=None)
    theirs = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                        train_dataset=text, processing_class=tokenizer)
    theirs.model.train()
    theirs._compute_loss(theirs.model, dict(batch), False).backward()
    ours = AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                              args=AdaptiveDPOConfig(output_dir=str(tmp_path / "o"), beta=0.2, use_cpu=True),
                              processing_class=tokenizer)
    ours.model.train()
    ours.compute_loss(ours.model, dict(batch), num_items_in_batch=torch.tensor(6)).backward()
    for (name, a), (_, b) in zip(ours.model.named_parameters(), theirs.model.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=name)
