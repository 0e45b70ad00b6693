"""Every loss against numbers computed by hand (plain `math`, independent of torch), plus gradients."""

import math

import pytest
import torch

from adaptdpo.methods.losses import LOSS_TYPES, preference_loss

# Pair 1: π(y_w)=-1, π(y_l)=-2, ref both -1.5  → chosen log-ratio 0.5, rejected -0.5, h = 1.
# Completion lengths 2 and 4 (for ipo, sigmoid_norm: per-token ratios 0.25 and -0.125, h̄ = 0.375).
# β = 0.5, label_smoothing ε = 0.1, discopop τ = 0.05.  ls(x) = log σ(x), sg(x) = σ(x).
HAND = {
    "sigmoid": 0.4740769841801067,  # -ls(0.5)
    "hinge": 0.5,  # max(0, 1 - 0.5)
    "ipo": 0.390625,  # (0.375 - 1/(2·0.5))² = (-0.625)²
    "exo_pair": 0.27205483350588544,  # sg(.5)(ls(.5) - log .9) + sg(-.5)(ls(-.5) - log .1)
    "nca_pair": 1.2768788397576871,  # -ls(.25) - ½ls(-.25) - ½ls(.25)
    "robust": 0.41157698418010663,  # (-.9 ls(.5) + .1 ls(-.5)) / .8
    "bco_pair": 1.1518788397576871,  # -ls(.25) - ls(.25)
    "sppo_hard": 0.5,  # (.5 - 1)² + (-.5 + 1)²
    "apo_zero": 0.8756469982284039,  # 1 - sg(.25) + sg(-.25)
    "apo_down": 0.9397171696839436,  # sg(.25) + 1 - sg(.5)
    "discopop": 0.6065246465980625,  # -ls(.5)(1 - sg(10)) + e^-.5 sg(10)
    "sigmoid_norm": 0.6037852895555947,  # -ls(.5 · .375)
}


def one_pair(dtype=torch.float64):
    t = lambda *v: torch.tensor(v, dtype=dtype)  # noqa: E731
    return dict(chosen_logps=t(-1.0), rejected_logps=t(-2.0), ref_chosen_logps=t(-1.5), ref_rejected_logps=t(-1.5),
                chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([4]))


@pytest.mark.parametrize("loss_type", sorted(HAND))
def test_hand_computed(loss_type):
    out = preference_loss(**one_pair(), beta=0.5, loss_type=loss_type, label_smoothing=0.1, discopop_tau=0.05)
    assert out.shape == (1,)
    assert out.item() == pytest.approx(HAND[loss_type], abs=1e-12)


def test_kto_pair_by_hand():
    """Two pairs; chosen log-ratios [0.5, 0], rejected [-1, 0.5] → KL_chosen = 0.25, KL_rejected = clamp(-0.25) = 0.

    TRL ≤ 0.11 returned the 2n terms [1 − σ(β(ρ_w − KL_l)); 1 − σ(β(KL_w − ρ_l))]; ours is their mean per pair."""
    sg = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    c, r = torch.tensor([-1.0, -2.0], dtype=torch.float64), torch.tensor([-3.0, -1.0], dtype=torch.float64)
    rc, rr = torch.tensor([-1.5, -2.0], dtype=torch.float64), torch.tensor([-2.0, -1.5], dtype=torch.float64)
    out = preference_loss(c, r, rc, rr, 0.5, "kto_pair")
    chosen_terms = [1 - sg(0.5 * (0.5 - 0.0)), 1 - sg(0.5 * (0.0 - 0.0))]
    rejected_terms = [1 - sg(0.5 * (0.25 + 1.0)), 1 - sg(0.5 * (0.25 - 0.5))]
    assert out.tolist() == pytest.approx([0.5 * (a + b) for a, b in zip(chosen_terms, rejected_terms)], abs=1e-12)
    assert out.mean().item() == pytest.approx(sum(chosen_terms + rejected_terms) / 4, abs=1e-12)


def test_per_pair_beta():
    # pair 2: π(y_w)=-3, π(y_l)=-1, refs -2 → h = -2; with β=0.2: -ls(-0.4) = 0.9130152523999526
    c, r = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
    out = preference_loss(c, r, rc, rr, torch.tensor([0.5, 0.2]))
    assert out.tolist() == pytest.approx([0.4740769841801067, 0.9130152523999526], abs=1e-6)
    # a scalar tensor β equals the float
    assert torch.equal(preference_loss(c, r, rc, rr, torch.tensor(0.5)), preference_loss(c, r, rc, rr, 0.5))


def test_aot_sorts_the_batch():
    c, r = torch.tensor([-1.0, -3.0], dtype=torch.float64), torch.tensor([-2.0, -1.0], dtype=torch.float64)
    rc, rr = torch.tensor([-1.5, -2.0], dtype=torch.float64), torch.tensor([-1.5, -2.0], dtype=torch.float64)
    # policy chosen-rejected [1, -2] sorted [-2, 1]; reference [0, 0] → δ = [-2, 1]
    aot = preference_loss(c, r, rc, rr, 0.5, "aot")
    assert aot.tolist() == pytest.approx([1.3132616875182228, 0.4740769841801067], abs=1e-12)
    # chosen log-ratios [.5, -1] sorted [-1, .5]; rejected [-.5, 1] sorted [-.5, 1] → δ = [-.5, -.5]
    unpaired = preference_loss(c, r, rc, rr, 0.5, "aot_unpaired")
    assert unpaired.tolist() == pytest.approx([0.8259394198788436] * 2, abs=1e-12)
    with pytest.raises(ValueError, match="one β for the whole batch"):
        preference_loss(c, r, rc, rr, torch.tensor([0.5, 0.2]), "aot")


def test_validation_errors():
    p = one_pair()
    with pytest.raises(ValueError, match="unknown loss_type"):
        preference_loss(**p, beta=0.1, loss_type="nope")
    with pytest.raises(ValueError, match="chosen_lengths"):
        preference_loss(p["chosen_logps"], p["rejected_logps"], p["ref_chosen_logps"], p["ref_rejected_logps"], 0.1,
                        "ipo")
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(**p, beta=0.1, loss_type="exo_pair", label_smoothing=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(**p, beta=0.1, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="shape"):
        preference_loss(**p, beta=torch.tensor([0.1, 0.2, 0.3]))


def test_sigmoid_matches_closed_form_gradient():
    # d/dh [-log σ(βh)] = -β σ(-βh): the gradient wrt π(y_w) is that, wrt π(y_l) its negative.
    p = one_pair()
    p["chosen_logps"].requires_grad_(True)
    p["rejected_logps"].requires_grad_(True)
    preference_loss(**p, beta=0.5).sum().backward()
    expected = -0.5 / (1 + math.exp(0.5))
    assert p["chosen_logps"].grad.item() == pytest.approx(expected, abs=1e-12)
    assert p["rejected_logps"].grad.item() == pytest.approx(-expected, abs=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradients_match_finite_differences(loss_type):
    g = torch.Generator().manual_seed(0)
    n = 5
    inputs = [(-torch.rand(n, generator=g, dtype=torch.float64) * 4).requires_grad_(True) for _ in range(4)]
    beta = (0.05 + torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_(True)
    lengths = (torch.randint(1, 9, (n,), generator=g), torch.randint(1, 9, (n,), generator=g))
    if loss_type in ("aot", "aot_unpaired"):
        beta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def f(c, r, rc, rr, b):
        return preference_loss(c, r, rc, rr, b, loss_type, label_smoothing=0.2, chosen_lengths=lengths[0],
                               rejected_lengths=lengths[1], discopop_tau=0.5)

    assert torch.autograd.gradcheck(f, (*inputs, beta), eps=1e-6, atol=1e-6)


def test_sft_term_and_weighted_loss_lists_by_hand():
    from adaptdpo.methods.losses import combined_preference_loss, preference_loss

    chosen, rejected = torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -8.0])
    ref_chosen, ref_rejected = torch.tensor([-5.0, -9.0]), torch.tensor([-5.0, -7.0])
    lengths = torch.tensor([2.0, 3.0])
    sft = preference_loss(chosen, rejected, ref_chosen, ref_rejected, 0.5, "sft", chosen_lengths=lengths,
                          rejected_lengths=lengths)
    # token mean NLL of the batch's chosen tokens: (4 + 9) / (2 + 3) = 2.6, spread so that the pair mean is 2.6
    assert sft.tolist() == pytest.approx([4 * 2 / 5, 9 * 2 / 5])
    assert sft.mean().item() == pytest.approx(2.6)
    # RPO-style list: per pair, w1·sigmoid + w2·sft; h = (1 − (−1), 0 − (−1)) = (2, 1), β = 0.5
    combined = combined_preference_loss(chosen, rejected, ref_chosen, ref_rejected, 0.5, ["sigmoid", "sft"],
                                        [1.0, 0.25], chosen_lengths=lengths, rejected_lengths=lengths)
    sigmoid = [math.log1p(math.exp(-0.5 * 2)), math.log1p(math.exp(-0.5 * 1))]
    assert combined.tolist() == pytest.approx([sigmoid[0] + 0.25 * 1.6, sigmoid[1] + 0.25 * 3.6])
    with pytest.raises(ValueError, match="loss_weights has 1 values for 2"):
        combined_preference_loss(chosen, rejected, ref_chosen, ref_rejected, 0.5, ["sigmoid", "sft"], [1.0],
                                 chosen_lengths=lengths)
    with pytest.raises(ValueError, match="chosen_lengths"):
        preference_loss(chosen, rejected, ref_chosen, ref_rejected, 0.5, "sft")
