"""Our trainer's loss and metrics against TRL 1.16's DPOTrainer, for every loss type.

Same batch, same policy and reference (two different tiny random models), both in train mode.
"""

import copy
import math

import pytest
import torch

from adaptdpo.data.collate import PreferenceCollator
from adaptdpo.data.tokenize import tokenize_rows
from adaptdpo.methods.losses import TRL_LOSS_TYPES
from adaptdpo.training.config import AdaptiveDPOConfig
from adaptdpo.training.trainer import AdaptiveDPOTrainer

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
                "logps/rejected", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "num_tokens"):
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


@pytest.mark.parametrize("loss_types,weights", [(["sigmoid", "sft"], None),  # RPO
                                                (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO
                                                (["ipo", "hinge"], [0.5, 2.0])],
                         ids=["rpo", "mpo", "ipo+hinge"])
def test_loss_lists_with_weights_match_trl(setup, loss_types, weights, tmp_path):
    """TRL's loss_type list with loss_weights (RPO, MPO): the same loss and gradients on the same batch."""
    from trl import DPOConfig, DPOTrainer

    policy, reference, batch, text, tokenizer = setup
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.2, loss_type=loss_types, loss_weights=weights,
                     report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False, max_length=None)
    theirs = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                        train_dataset=text, processing_class=tokenizer)
    theirs.model.train()
    expected = theirs._compute_loss(theirs.model, dict(batch), False)
    expected.backward()
    ours = AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                              args=AdaptiveDPOConfig(output_dir=str(tmp_path / "o"), beta=0.2, loss_type=loss_types,
                                                     loss_weights=weights, use_cpu=True),
                              processing_class=tokenizer)
    ours.model.train()
    loss = ours.compute_loss(ours.model, dict(batch), num_items_in_batch=torch.tensor(6))
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5, rel=1e-5)
    for (name, a), (_, b) in zip(ours.model.named_parameters(), theirs.model.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_loss_list_from_the_command_line_and_yaml(tmp_path):
    from adaptdpo.training.config_io import parse_config

    config = parse_config(["--loss_type", "sigmoid", "sft", "--loss_weights", "1.0", "0.5"])
    assert config.loss_type == ["sigmoid", "sft"] and config.loss_weights == [1.0, 0.5]
    (tmp_path / "c.yaml").write_text("loss_type: [sigmoid, bco_pair, sft]\nloss_weights: [0.8, 0.2, 1.0]\n")
    assert parse_config([], str(tmp_path / "c.yaml")).loss_type == ["sigmoid", "bco_pair", "sft"]
    assert parse_config(["--loss_type", "ipo"]).loss_type == ["ipo"]
    assert AdaptiveDPOConfig(output_dir=str(tmp_path), loss_type="robust").loss_type == ["robust"]
    with pytest.raises(ValueError, match="loss_weights has 1 values for the 2 losses"):
        AdaptiveDPOConfig(output_dir=str(tmp_path), loss_type=["sigmoid", "sft"], loss_weights=[1.0])


def test_loss_list_composes_with_per_pair_beta_and_a_selection_mask(setup, tmp_path):
    """How TRL's objectives compose with β-DPO and SamS: every term gets the pair's β (sft ignores it), and the
    batch-coupled sft term averages over the pairs trained on only."""
    from adaptdpo.methods.losses import combined_preference_loss
    from adaptdpo.methods.step_policy import StepPlan, StepPolicyBase

    policy, reference, batch, _, tokenizer = setup
    beta = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    keep = torch.tensor([True, False, True, True, False, True])

    class FixedPlan(StepPolicyBase):  # stands in for β-DPO's per-pair β and SamS's selection
        def plan(self, view):
            return StepPlan(beta=beta, train_mask=keep)

        def num_trained(self, n_pairs):
            return int(keep.sum())

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    args = AdaptiveDPOConfig(output_dir=str(tmp_path / "o"), loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
                             use_cpu=True, trace_pairs=False)
    trainer = AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                                 processing_class=tokenizer, step_policy=FixedPlan())
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(4))
    with torch.no_grad():
        from adaptdpo.models.sequence_logps import sequence_logps

        pol = sequence_logps(trainer.model, dict(batch))
        ref = sequence_logps(reference, dict(batch))
    (c, r), (rc, rr) = pol.split(), ref.split()
    lc, lr = pol.lengths.chunk(2)
    k = keep.nonzero().squeeze(1)
    expected = combined_preference_loss(c[k], r[k], rc[k], rr[k], beta[k], ["sigmoid", "sft"], [1.0, 0.5],
                                        chosen_lengths=lc[k], rejected_lengths=lr[k]).sum() / 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust"])
def test_f_divergences_match_trl(setup, divergence, loss_type, tmp_path):
    from trl import DPOConfig, DPOTrainer

    policy, reference, batch, text, tokenizer = setup
    smoothing = 0.1 if loss_type == "robust" else 0.0
    settings = dict(beta=0.3, loss_type=[loss_type], f_divergence_type=divergence, f_alpha_divergence_coef=0.3,
                    label_smoothing=smoothing)
    theirs = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), train_dataset=text,
                        processing_class=tokenizer,
                        args=DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", bf16=False, use_cpu=True,
                                       gradient_checkpointing=False, max_length=None, **settings))
    theirs.model.train()
    expected = theirs._compute_loss(theirs.model, dict(batch), False)
    ours = AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                              processing_class=tokenizer,
                              args=AdaptiveDPOConfig(output_dir=str(tmp_path / "o"), use_cpu=True, **settings))
    ours.model.train()
    loss = ours.compute_loss(ours.model, dict(batch), num_items_in_batch=torch.tensor(6))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5, rel=1e-5)
    with pytest.raises(ValueError, match="chosen − rejected difference"):
        AdaptiveDPOConfig(output_dir=str(tmp_path / "x"), loss_type="bco_pair", f_divergence_type=divergence)


def test_f_divergence_scores_by_hand():
    from adaptdpo.methods.losses import f_divergence_scores

    rho = torch.tensor([0.5, -1.0])
    assert f_divergence_scores(rho, "reverse_kl").tolist() == pytest.approx([0.5, -1.0])
    assert f_divergence_scores(rho, "forward_kl").tolist() == pytest.approx([1 - math.exp(-0.5), 1 - math.exp(1.0)])
    assert f_divergence_scores(rho, "js_divergence").tolist() == pytest.approx(
        [math.log(2) + math.log(1 / (1 + math.exp(-0.5))), math.log(2) + math.log(1 / (1 + math.exp(1.0)))])
    a = 0.3
    assert f_divergence_scores(rho, "alpha_divergence", a).tolist() == pytest.approx(
        [(math.exp((a - 1) * 0.5) - 1) / (a - 1), (math.exp((a - 1) * -1.0) - 1) / (a - 1)])
    assert f_divergence_scores(rho, "alpha_divergence", 1.0).tolist() == pytest.approx([0.5, -1.0])


@pytest.mark.parametrize("settings", [{"use_weighting": True}, {"ld_alpha": 0.5}, {"ld_alpha": 0.0},
                                      # (TRL 1.16's WPO scales each loss in place: with sft or hinge its backward
                                      # fails; sigmoid and ipo are safe there)
                                      {"use_weighting": True, "ld_alpha": 0.3, "loss_type": ["sigmoid", "ipo"],
                                       "loss_weights": [1.0, 0.5]}],
                         ids=["wpo", "ld-0.5", "ld-0", "wpo+ld+two-losses"])
@pytest.mark.parametrize("layout", ["stacked", "packed"])
def test_wpo_and_ld_dpo_match_trl(setup, settings, layout, tmp_path, hh_rows):
    """WPO's pair weights and LD-DPO's length-desensitised log-probs: loss, gradients and metrics equal TRL's,
    in TRL's stacked layout and in our shared-prompt one."""
    from trl import DPOConfig, DPOTrainer

    from adaptdpo.data.collate import PreferenceCollator
    from adaptdpo.data.tokenize import tokenize_rows

    policy, reference, batch, text, tokenizer = setup
    theirs = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), train_dataset=text,
                        processing_class=tokenizer,
                        args=DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", bf16=False, use_cpu=True,
                                       gradient_checkpointing=False, max_length=None, beta=0.2, **settings))
    theirs.model.train()
    expected = theirs._compute_loss(theirs.model, dict(batch), False)
    expected.backward()
    trl_metrics = {k: float(v[-1]) for k, v in theirs._metrics["train"].items()}
    ours = AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                              processing_class=tokenizer,
                              args=AdaptiveDPOConfig(output_dir=str(tmp_path / "o"), use_cpu=True, beta=0.2,
                                                     trace_pairs=False, **settings))
    ours.model.train()
    ours_batch = dict(batch)
    if layout == "packed":
        examples, _ = tokenize_rows(hh_rows[:6], tokenizer, max_length=96, max_prompt_length=48)
        ours_batch = PreferenceCollator(tokenizer.pad_token_id, shared_prompt=True)(examples)
        ours_batch.pop("pair_id")
    loss = ours.compute_loss(ours.model, ours_batch, num_items_in_batch=torch.tensor(6))
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5, rel=1e-5)
    ours_metrics = {k: float(v[-1]) for k, v in ours._metrics["train"].items()}
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert ours_metrics[key] == pytest.approx(trl_metrics[key], abs=1e-4, rel=1e-5), key
    for (name, a), (_, b) in zip(ours.model.named_parameters(), theirs.model.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_label_smoothing_with_sigmoid_trl_ignores_it_cdpo_does_not(setup, tmp_path, caplog):
    """TRL 1.16's sigmoid ignores label_smoothing (before TRL 1.0 it made it cDPO): the same loss with 0.1 as with 0
    there. Ours is conservative DPO unless sigmoid_label_smoothing: ignore, which gives TRL's loss (and a warning that
    label_smoothing has no effect) and which a mapped trl.DPOConfig sets, so the drop-in keeps TRL's numbers."""
    import logging

    from trl import DPOConfig as TRLConfig

    from adaptdpo import from_trl_config

    policy, reference, batch, _, tokenizer = setup
    plain, _ = trl_loss_and_metrics(setup, "sigmoid", 0.3, 0.0, tmp_path / "a")
    smoothed, _ = trl_loss_and_metrics(setup, "sigmoid", 0.3, 0.1, tmp_path / "b")
    assert smoothed.item() == plain.item()  # TRL: no effect at all
    n_pairs = batch["input_ids"].shape[0] // 2

    def ours(name, **kw):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="adaptdpo"):
            args = AdaptiveDPOConfig(output_dir=str(tmp_path / name), beta=0.3, label_smoothing=0.1, use_cpu=True,
                                     report_to="none", **kw)
        trainer = AdaptiveDPOTrainer(model=copy.deepcopy(policy), args=args, ref_model=copy.deepcopy(reference),
                                     processing_class=tokenizer)
        trainer.model.train()
        return trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(n_pairs)).item()

    assert ours("ignore", sigmoid_label_smoothing="ignore") == pytest.approx(plain.item(), abs=1e-5, rel=1e-5)
    assert "label_smoothing=0.1 has no effect with loss_type ['sigmoid']" in caplog.text
    assert abs(ours("cdpo") - plain.item()) > 1e-3  # cDPO: a different loss
    assert "has no effect" not in caplog.text
    mapped = from_trl_config(TRLConfig(output_dir=str(tmp_path / "m"), label_smoothing=0.1, report_to="none",
                                       use_cpu=True, bf16=False))
    assert (mapped.label_smoothing, mapped.sigmoid_label_smoothing) == (0.1, "ignore")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adaptdpo"):
        AdaptiveDPOConfig(output_dir=str(tmp_path / "r"), loss_type="robust", label_smoothing=0.1, use_cpu=True)
    assert "has no effect" not in caplog.text
