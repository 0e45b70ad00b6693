"""ε-DPO (Lee et al. 2025): the per-pair decisions and β by hand, the perturbed policies against a direct
computation from full logits (every layout, plain and chunked head), the baseline-β update."""

import pytest
import torch

from adaptdpo.data.collate import PreferenceCollator
from adaptdpo.methods.epsilon_dpo import EpsilonDPO, EpsilonDPOPolicy, instance_betas, kl_steps
from adaptdpo.methods.step_policy import PairView
from adaptdpo.models.sequence_logps import perturbed_logratios, sequence_logps

# (L₋, L, L₊): the chosen − rejected log-ratio of the policy estimated for β/(1−ε), of the policy, for β/(1+ε)
PAIRS = torch.tensor([[0.9, 1.0, 1.1],    # L₊ > L > L₋: less KL penalty, more confident → s = +1 (relax)
                      [1.2, 1.0, 0.8],    # L₋ > L > L₊ → s = −1 (tighten)
                      [1.1, 1.0, 1.05],   # both above L: not monotone → 0
                      [1.0, 1.0, 1.0]],   # ties → 0
                     dtype=torch.float64)


def test_decisions_and_instance_betas_by_hand():
    steps = kl_steps(PAIRS)
    assert steps.tolist() == [1, -1, 0, 0]
    # β = 0.1, ε = 0.01: β/(1 + ε s) = 0.1/1.01, 0.1/0.99, 0.1, 0.1
    assert instance_betas(0.1, steps, 0.01).tolist() == pytest.approx(
        [0.09900990099009901, 0.10101010101010101, 0.1, 0.1], abs=1e-15)


def view(logratios, step):
    n = logratios.shape[0]
    zero = torch.zeros(n)
    return PairView(zero, zero, zero, zero, 0.1, extras={"epsilon_logratios": logratios, "global_step": step})


def test_baseline_beta_moves_once_per_optimizer_step_by_the_mean_decision():
    """Step 0 has two micro-batches: PAIRS (mean s = 0) and two relaxed pairs (mean s = 1). Every micro-batch of step 0
    trains with β_0 = 0.1; step 1 with β_1 = 0.1/(1 + 0.01·(0 + 1)/2) = 0.1/1.005 = 0.0995025."""
    policy = EpsilonDPOPolicy(EpsilonDPO(beta=0.1, epsilon=0.01))
    first = policy.plan(view(PAIRS, 0))
    assert first.beta.tolist() == pytest.approx([0.1 / 1.01, 0.1 / 0.99, 0.1, 0.1], rel=1e-6)
    assert first.train_mask is None
    assert float(first.metrics["eps_dpo/relaxed"]) == 0.25 and float(first.metrics["eps_dpo/tightened"]) == 0.25
    second = policy.plan(view(PAIRS[:1].repeat(2, 1), 0))
    assert float(second.metrics["eps_dpo/beta"]) == pytest.approx(0.1)  # the same step: β_0
    third = policy.plan(view(PAIRS[2:], 1))
    assert float(third.metrics["eps_dpo/beta"]) == pytest.approx(0.1 / 1.005, rel=1e-6)
    assert third.beta.tolist() == pytest.approx([0.1 / 1.005] * 2, rel=1e-6)  # undecided pairs: β_1 itself
    # the state round-trips: a resumed controller continues exactly
    state = policy.state_dict()
    resumed = EpsilonDPOPolicy(EpsilonDPO(beta=0.1, epsilon=0.01))
    resumed.load_state_dict(state)
    a, b = policy.plan(view(PAIRS[:2], 2)), resumed.plan(view(PAIRS[:2], 2))
    assert torch.equal(a.beta, b.beta)
    # step 1's mean decision was 0 (two undecided pairs): β_2 = β_1
    assert float(a.metrics["eps_dpo/beta"]) == pytest.approx(0.1 / 1.005, rel=1e-6)
    with pytest.raises(ValueError, match="perturbed log-ratios"):
        policy.plan(PairView(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.1))


def direct_perturbed(policy, reference, batch, epsilon):
    """The same quantity from the full logits of both models on the stacked batch, token by token."""
    with torch.no_grad():
        z_policy = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        z_reference = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].float()
    columns = []
    for w in (1 - epsilon, 1.0, 1 + epsilon):
        mixed = (w * z_policy + (1 - w) * z_reference)[:, :-1].log_softmax(-1)
        columns.append((mixed.gather(-1, labels[..., None]).squeeze(-1) * mask).sum(-1))
    sums = torch.stack(columns, dim=1)
    chosen, rejected = sums.chunk(2)
    return chosen - rejected


@pytest.mark.parametrize("layout,head_chunk", [("stacked", None), ("stacked", 7), ("packed", None), ("packed", 7),
                                               ("padding_free", 7)])
def test_perturbed_policies_equal_the_full_logits_computation(models_and_examples, layout, head_chunk):
    policy, reference, examples, _ = models_and_examples
    epsilon = 0.05
    expected = direct_perturbed(policy, reference, PreferenceCollator(0)(examples), epsilon)
    batch = PreferenceCollator(0, shared_prompt=layout != "stacked", padding_free=layout == "padding_free")(examples)
    with torch.no_grad():
        p = sequence_logps(policy, dict(batch), head_chunk=head_chunk, keep_window=True)
        r = sequence_logps(reference, dict(batch), head_chunk=head_chunk, keep_window=True)
    got = perturbed_logratios(p, r, epsilon)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-5)
    c, rej = p.split()
    torch.testing.assert_close(got[:, 1], c - rej, atol=2e-4, rtol=1e-5)  # the middle column is the policy itself
    assert not torch.equal(kl_steps(got), torch.zeros(len(examples), dtype=torch.long))  # some pairs decided


@pytest.mark.parametrize("layout", ["stacked", "packed", "padding_free"])
def test_perturbed_sums_carry_the_ld_dpo_weights(models_and_examples, layout):
    policy, reference, examples, _ = models_and_examples
    batch = PreferenceCollator(0, shared_prompt=layout != "stacked", padding_free=layout == "padding_free")(examples)
    with torch.no_grad():
        p = sequence_logps(policy, dict(batch), ld_alpha=0.3, keep_window=True)
        r = sequence_logps(reference, dict(batch), ld_alpha=0.3, keep_window=True)
    c, rej = p.split()
    torch.testing.assert_close(perturbed_logratios(p, r, 0.01)[:, 1], c - rej, atol=2e-4, rtol=1e-5)
