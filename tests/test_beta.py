"""β-DPO controller: the recurrence by hand, the research brief's worked examples, the sampling law."""

import itertools
import math

import pytest
import torch

from adaptdpo.methods.beta_dpo import BetaDPO, gradient_filter, kept_count
from adaptdpo.methods.losses import preference_loss


def step(ctrl, h, seed=0):
    h = torch.tensor(h, dtype=torch.float64)
    return ctrl.step(h, torch.zeros_like(h), generator=torch.Generator().manual_seed(seed))


def test_recurrence_by_hand_first_batch_identical_and_constant_batches():
    ctrl = BetaDPO(beta=0.1, alpha=1.0, keep_ratio=1.0, momentum=0.9)
    # batch 1, h = [1, 2, 3, 6] → M = [.1, .2, .3, .6]: M0 = mean = .3, σ = std(ddof=1) = sqrt(.14/3)
    beta, keep = step(ctrl, [1, 2, 3, 6])
    assert ctrl.m0 == pytest.approx(0.3) and ctrl.sigma == pytest.approx(math.sqrt(0.14 / 3))
    assert keep.all() and beta.item() == pytest.approx(0.1)  # kept mean = M0 → β = β0
    # batch 2, identical margins M = 0: M0 = .9·.3 = .27, σ = .9·.2160247 (+ .1·0); β = .1·(1 + (0 − .27))
    beta, _ = step(ctrl, [0, 0, 0, 0])
    assert ctrl.m0 == pytest.approx(0.27) and ctrl.sigma == pytest.approx(0.9 * 0.21602469, rel=1e-6)
    assert beta.item() == pytest.approx(0.073, rel=1e-6)
    # batch 3, M = [.2, .2]: M0 = .9·.27 + .02 = .263, σ = .81·.2160247; β = .1·(1 + (.2 − .263)) = .0937
    beta, _ = step(ctrl, [2, 2])
    assert ctrl.m0 == pytest.approx(0.263) and ctrl.sigma == pytest.approx(0.81 * 0.21602469, rel=1e-6)
    assert beta.item() == pytest.approx(0.0937, rel=1e-6)
    assert ctrl.steps == 3


def test_zero_init_matches_the_official_code_units():
    # brief §5.1 oracle 8: after t identical batches from zero state, M0 = (1 − .9^t)·μ
    ctrl = BetaDPO(beta=1.0, alpha=0.0, keep_ratio=1.0, init="zero")
    for t in range(1, 4):
        step(ctrl, [1.0, 3.0])  # μ = 2, s = sqrt(2)
        assert ctrl.m0 == pytest.approx((1 - 0.9**t) * 2)
        assert ctrl.sigma == pytest.approx((1 - 0.9**t) * math.sqrt(2))


WORKED_H = [0.2, 0.5, 1.4, 4.0]  # brief §5.2: pairs 0..3, pair 3 an easy outlier


def worked_controller():
    # the brief's prior state M0 = .5, σ = 1 in code units (h) is .05 and .1 in paper units (M = .1·h);
    # the code's a = .6 is α = a/β0 = 6 here
    ctrl = BetaDPO(beta=0.1, alpha=6.0, keep_ratio=0.8, momentum=0.9)
    ctrl.load_state_dict({"m0": 0.05, "sigma": 0.1, "steps": 1, "generator": ctrl.generator.get_state()})
    return ctrl


def test_worked_example_statistics_beta_loss_and_gradients():
    ctrl = worked_controller()
    draws = {}
    for seed in range(400):
        ctrl = worked_controller()
        beta, keep = step(ctrl, WORKED_H, seed)
        draws[tuple(keep.nonzero().flatten().tolist())] = beta.item()
    assert ctrl.m0 == pytest.approx(0.06025) and ctrl.sigma == pytest.approx(0.1072699, rel=1e-6)
    assert set(draws) <= {(0, 1, 2), (0, 1, 3), (1, 2, 3), (0, 2, 3)}  # k = ⌊.8·4⌋ = 3, distinct
    assert draws[(0, 1, 2)] == pytest.approx(0.105850, abs=1e-6)  # > β0: kept mean .07 > M0 .06025
    # the optimised loss: mean DPO loss of the kept pairs at β_batch, and its gradient (brief §5.2 step 5)
    h = torch.tensor(WORKED_H, dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(4, dtype=torch.float64)
    keep = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    losses = preference_loss(h, zero, zero, zero, torch.tensor(0.105850, dtype=torch.float64))
    loss = (losses * keep).sum() / keep.sum()
    assert loss.item() == pytest.approx(0.657149, abs=1e-6)
    loss.backward()
    assert h.grad.tolist() == pytest.approx([-0.017455, -0.017175, -0.016337, 0.0], abs=1e-6)
    assert h.grad[3].item() == 0.0  # exactly zero for the dropped pair


def test_negative_outlier_is_dropped_and_beta_falls():
    # brief §5.2 step 9. Its text says "same prior state 0.5 / 1.0", but its numbers (M0 = .48725,
    # σ = 1.129238 in code units) come from the state *after* the worked example's batch: chain the two.
    ctrl = worked_controller()
    step(ctrl, WORKED_H)
    beta, keep = step(ctrl, [-3.0, 0.1, 0.3, 0.4], seed=1)
    assert ctrl.m0 == pytest.approx(0.048725) and ctrl.sigma == pytest.approx(0.1129238, rel=1e-6)
    assert keep.tolist() == [False, True, True, True]  # this draw (probability .984 of them) drops the outlier
    assert beta.item() == pytest.approx(0.086765, abs=1e-6)  # < β0: the kept batch falls short of M0


def exact_inclusion(weights, k):
    """Inclusion probabilities of successive sampling without replacement ∝ weights (by enumeration)."""
    inc = [0.0] * len(weights)
    for seq in itertools.permutations(range(len(weights)), k):
        p, rest = 1.0, sum(weights)
        for i in seq:
            p *= weights[i] / rest
            rest -= weights[i]
        for i in seq:
            inc[i] += p
    return inc


def test_monte_carlo_inclusion_follows_the_gaussian_weights():
    margins = torch.tensor([0.0, 0.1, 0.25, -0.2, 0.6], dtype=torch.float64)
    ctrl = BetaDPO(beta=1.0, alpha=0.0, keep_ratio=0.4)  # k = 2 of 5
    ctrl.m0, ctrl.sigma, ctrl.steps = 0.1, 0.25, 1
    weights = [math.exp(-0.5 * ((m - 0.1) / 0.25) ** 2) for m in margins.tolist()]
    expected = exact_inclusion(weights, 2)  # [.5347, .5661, .4956, .3118, .0918]
    draws, counts = 20000, torch.zeros(5)
    g = torch.Generator().manual_seed(123)
    for _ in range(draws):
        counts += ctrl.keep_mask(margins, g).float()
    for got, want in zip((counts / draws).tolist(), expected, strict=True):
        assert got == pytest.approx(want, abs=4 * math.sqrt(want * (1 - want) / draws))
    assert sum(expected) == pytest.approx(2.0)


def test_worked_example_inclusion_probabilities():
    # brief §5.2: [0.995892, 0.996377, 0.994019, 0.013712]
    weights = [0.932025, 0.995445, 0.758540, 0.006633]
    assert exact_inclusion(weights, 3) == pytest.approx([0.995892, 0.996377, 0.994019, 0.013712], abs=2e-6)


def test_identical_margins_never_nan_and_uniform():
    ctrl = BetaDPO(beta=0.1, alpha=0.6, keep_ratio=0.5)
    beta, keep = step(ctrl, [0.0] * 8)  # policy = reference: σ = 0 → floor
    assert keep.sum() == 4 and beta.item() == pytest.approx(0.1)
    counts = torch.zeros(8)
    for seed in range(2000):
        counts += ctrl.keep_mask(torch.zeros(8), torch.Generator().manual_seed(seed)).float()
    assert (counts / 2000 - 0.5).abs().max() < 0.05


def test_far_outliers_do_not_underflow_the_sampler():
    # |z| of 40 and 80: exp(-z²/2) is 0 in float32; the sampler works on log-weights and still ranks them
    ctrl = BetaDPO(beta=1.0, alpha=0.0, keep_ratio=0.75)
    ctrl.m0, ctrl.sigma, ctrl.steps = 0.0, 0.1, 1
    keep = ctrl.keep_mask(torch.tensor([0.0, 0.01, 4.0, 8.0]), torch.Generator().manual_seed(0))
    assert keep.tolist() == [True, True, True, False]


def test_clamp_kept_count_and_level():
    ctrl = BetaDPO(beta=0.1, alpha=1.0, keep_ratio=1.0)
    ctrl.m0, ctrl.sigma, ctrl.steps = 15.0, 1.0, 1  # mean − M0 ≈ −15 → β = .1·(1 − 15) < 0 → clamp
    beta, _ = step(ctrl, [0.0, 0.0])
    assert beta.item() == pytest.approx(1e-3)
    assert [kept_count(n, 0.8) for n in (1, 4, 32, 64)] == [1, 3, 25, 51]
    inst = BetaDPO(beta=0.1, alpha=2.0, keep_ratio=1.0, level="instance")
    beta, _ = step(inst, [1.0, 3.0])  # M = [.1, .3], M0 = .2 → β_i = .1·(1 + 2·(M_i − .2))
    assert beta.tolist() == pytest.approx([0.08, 0.12])


def test_alpha_zero_keep_one_is_dpo():
    ctrl = BetaDPO(beta=0.25, alpha=0.0, keep_ratio=1.0)
    for h in ([0.3, -1.0, 2.0], [5.0, 5.0, -4.0]):
        beta, keep = step(ctrl, h)
        assert beta.item() == 0.25 and keep.all()


def test_gradient_filters_drop_the_named_end():
    margins = torch.tensor([0.5, -2.0, 3.0, 0.1, 1.0, -0.5, 2.0, 0.0, 4.0, -1.0])
    k = kept_count(10, 0.8)
    # head = largest gradient weight σ(−βh) = lowest margins
    assert sorted(gradient_filter(margins, k, "grad_head").tolist()) == sorted([0, 2, 3, 4, 5, 6, 7, 8])
    assert sorted(gradient_filter(margins, k, "grad_tail").tolist()) == sorted([0, 1, 3, 4, 5, 7, 9, 6])
    assert sorted(gradient_filter(margins, k, "grad_tail_head").tolist()) == sorted([0, 3, 4, 5, 6, 7, 9, 2])


def test_state_dict_round_trip_continues_identically():
    a = BetaDPO(beta=0.1, alpha=0.6, keep_ratio=0.5, seed=7)
    step_h = [[0.1, 0.9, -0.3, 2.0, 0.4, 0.0], [1.0, -1.0, 0.5, 0.2, 0.3, 0.8]]
    a.step(torch.tensor(step_h[0]), torch.zeros(6))
    b = BetaDPO(beta=0.1, alpha=0.6, keep_ratio=0.5, seed=999)
    b.load_state_dict(a.state_dict())
    ba, ka = a.step(torch.tensor(step_h[1]), torch.zeros(6))
    bb, kb = b.step(torch.tensor(step_h[1]), torch.zeros(6))
    assert torch.equal(ka, kb) and ba.item() == bb.item() and a.m0 == b.m0


def test_non_finite_margins_are_refused():
    with pytest.raises(FloatingPointError):
        step(BetaDPO(), [0.0, float("nan")])


def test_single_pair_batches_keep_one_and_leave_sigma():
    ctrl = BetaDPO(beta=0.1, alpha=1.0, keep_ratio=0.8)
    step(ctrl, [1.0, 3.0])  # M0 = .2, σ = std([.1, .3]) = .141421
    beta, keep = step(ctrl, [5.0])  # one pair: k = max(1, ⌊.8⌋) = 1; its std is undefined: σ stays
    assert keep.tolist() == [True]
    assert ctrl.sigma == pytest.approx(math.sqrt(0.02))
    assert ctrl.m0 == pytest.approx(0.9 * 0.2 + 0.1 * 0.5)
    assert beta.item() == pytest.approx(0.1 * (1 + (0.5 - 0.23)))
