"""The robust-DPO rivals inside the trainer: cDPO, rDPO, Hölder-DPO (loss types) and ε-DPO (a step policy)."""

import pytest
import torch
from helpers import make_trainer

from adaptdpo.data.collate import PreferenceCollator


def test_holder_logs_its_contamination_estimate(models_and_examples, tmp_path):
    from adaptdpo.methods.losses import holder_contamination

    _, _, examples, _ = models_and_examples
    trainer = make_trainer(models_and_examples, tmp_path, loss_type="holder", holder_gamma=0.5)
    batch = PreferenceCollator(0)(examples)
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(8))
    assert torch.isfinite(loss)
    logged = trainer._metrics["train"]["holder/contamination"]
    assert len(logged) == 1
    with torch.no_grad():  # recomputed from the models: ε̂ of β0·h over the batch
        from adaptdpo.models.sequence_logps import sequence_logps

        c, r = sequence_logps(trainer.model, dict(batch)).split()
        rc, rr = sequence_logps(trainer.ref_model, dict(batch)).split()
    h = (c - rc) - (r - rr)
    assert float(logged[0]) == pytest.approx(float(holder_contamination(0.2 * h, 0.5)), abs=1e-6)


@pytest.mark.parametrize("shared_prompt", ["off", "on"])
def test_epsilon_dpo_trains_each_pair_with_its_beta(models_and_examples, tmp_path, shared_prompt):
    """One step of method epsilon_dpo = DPO with β_i = β/(1 + ε·s_i), s_i decided from the perturbed policies
    (recomputed here from both models' full logits); the next optimizer step's β_t moves by 1/(1 + ε·mean s)."""
    from test_epsilon_dpo import direct_perturbed

    from adaptdpo.methods.epsilon_dpo import kl_steps
    from adaptdpo.methods.losses import preference_loss

    policy, reference, examples, _ = models_and_examples
    trainer = make_trainer(models_and_examples, tmp_path / "e", method="epsilon_dpo", epsilon_dpo_epsilon=0.05,
                           shared_prompt=shared_prompt)
    batch = PreferenceCollator(0, shared_prompt=shared_prompt == "on")(examples)
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(8))
    stacked = PreferenceCollator(0)(examples)
    steps = kl_steps(direct_perturbed(policy, reference, stacked, 0.05))
    assert steps.abs().sum() > 0  # the check below is not just DPO
    with torch.no_grad():
        c, r = sequence_logps_of(policy, stacked)
        rc, rr = sequence_logps_of(reference, stacked)
    expected = preference_loss(c, r, rc, rr, 0.2 / (1 + 0.05 * steps.double())).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    metrics = trainer._metrics["train"]
    assert float(metrics["eps_dpo/beta"][0]) == pytest.approx(0.2)
    trainer.state.global_step = 1  # the next optimizer step: β_1 = 0.2/(1 + ε·mean s)
    trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(8))
    assert float(metrics["eps_dpo/beta"][1]) == pytest.approx(0.2 / (1 + 0.05 * steps.double().mean().item()),
                                                              rel=1e-6)


def sequence_logps_of(model, batch):
    from adaptdpo.models.sequence_logps import sequence_logps

    return sequence_logps(model, dict(batch)).split()


def test_epsilon_dpo_refuses_what_it_cannot_use(tmp_path):
    from adaptdpo.training.config import AdaptiveDPOConfig

    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        AdaptiveDPOConfig(output_dir=str(tmp_path), use_cpu=True, method="epsilon_dpo", precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="aot"):
        AdaptiveDPOConfig(output_dir=str(tmp_path), use_cpu=True, method="epsilon_dpo", loss_type="aot")
    with pytest.raises(ValueError, match="epsilon_dpo_epsilon"):
        AdaptiveDPOConfig(output_dir=str(tmp_path), use_cpu=True, method="epsilon_dpo", epsilon_dpo_epsilon=1.5)


def test_every_method_and_robust_loss_has_its_citation_in_the_model_card(tmp_path):
    from adaptdpo.methods.registry import METHODS
    from adaptdpo.training.config import AdaptiveDPOConfig
    from adaptdpo.training.model_card import CITATIONS, model_card

    assert all(key in CITATIONS for spec in METHODS.values() for key in spec.citations)
    card = model_card(AdaptiveDPOConfig(output_dir=str(tmp_path), use_cpu=True, method="epsilon_dpo",
                                        loss_type=["sigmoid", "holder"], label_smoothing=0.1))
    for key in ("lee2025kl", "mitchell2023note", "fujisawa2025scalable", "| `epsilon_dpo_epsilon` | 0.01 |"):
        assert key in card, key
    card = model_card(AdaptiveDPOConfig(output_dir=str(tmp_path), use_cpu=True, loss_type="robust",
                                        label_smoothing=0.2))
    assert "chowdhury2024provably" in card and "mitchell2023note" not in card


def test_a_resume_sees_the_rivals_settings_as_the_objective():
    """sigmoid_label_smoothing, holder_gamma, ε-DPO's ε and the per-pair columns change what a run optimises; a run
    recorded before cDPO (sigmoid with label_smoothing, which then did nothing) resumes as ignore, not as cDPO."""
    from adaptdpo.training.run_dir import objective_changes

    defaults = {"sigmoid_label_smoothing": "cdpo", "holder_gamma": 2.0, "epsilon_dpo_epsilon": 0.01,
                "weight_column": None, "beta_column": None}
    before = {"loss_type": ["sigmoid"], "label_smoothing": 0.1}
    changes = objective_changes(before, {**before, **defaults}, defaults)
    assert changes == {"sigmoid_label_smoothing": ("ignore", "cdpo")}
    assert objective_changes(before, {**before, **defaults, "sigmoid_label_smoothing": "ignore"}, defaults) == {}
    plain = {"loss_type": ["sigmoid"], "label_smoothing": 0.0}  # the field changes nothing there: no refusal
    assert objective_changes(plain, {**plain, **defaults}, defaults) == {}
    now = {**plain, **defaults}
    for key, value in (("holder_gamma", 0.3), ("epsilon_dpo_epsilon", 0.05), ("weight_column", "w"),
                       ("beta_column", "b")):
        assert objective_changes(now, {**now, key: value}, defaults) == {key: (defaults[key], value)}


def test_epsilon_dpo_over_the_frozen_prefix_cache_and_with_the_reference_cache(hh_rows, tokenizer, tmp_path):
    """ε-DPO reads both forwards' scored windows: training the top 2 of 4 blocks over the frozen-prefix cache, with
    cache_reference_logps on (which ε-DPO's training steps bypass: a cached log-prob has no logits), gives the
    uncached run's losses, gradient norms and baseline β (3 steps, fp32)."""
    from helpers import train_logs
    from test_prefix_cache import _run

    settings = {"method": "epsilon_dpo", "epsilon_dpo_epsilon": 0.05}
    plain = train_logs(_run(hh_rows, tokenizer, tmp_path, "plain", prefix_cache=False, **settings))
    cached = train_logs(_run(hh_rows, tokenizer, tmp_path, "cached", prefix_cache=True, cache_reference_logps=True,
                             ref_cache_dir=str(tmp_path / "ref-cache"), **settings))
    assert len(plain) == len(cached) == 3
    for x, y in zip(plain, cached, strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-5
        assert x["eps_dpo/beta"] == pytest.approx(y["eps_dpo/beta"], rel=1e-9)
    assert plain[-1]["eps_dpo/beta"] != pytest.approx(0.1, rel=1e-6)  # β_t moved: the decisions were not all 0
