"""Every loss against numbers computed by hand (plain `math`, independent of torch), plus gradients."""

import math

import pytest
import torch

from adaptdpo.methods.losses import LOSS_TYPES, preference_loss

# Pair 1: π(y_w)=-1, π(y_l)=-2, ref both -1.5  → chosen log-ratio 0.5, rejected -0.5, h = 1.
# Completion lengths 2 and 4 (for ipo, sigmoid_norm: per-token ratios 0.25 and -0.125, h̄ = 0.375).
# β = 0.5, label_smoothing ε = 0.1, discopop τ = 0.05.  ls(x) = log σ(x), sg(x) = σ(x).
HAND = {
    "sigmoid": 0.5240769841801067,  # cDPO at ε = .1: -.9 ls(.5) - .1 ls(-.5) = .9 · .474077 + .1 · .974077
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
    # Hölder-DPO (Fujisawa et al. 2025, Eq. (12) / Figure 6), γ = 2 (the default, the paper's): p = sg(.5) = .622459,
    # p² = .387456, p³ = .241176; −3 · .387456 + 2 · .241176
    "holder": -0.6800161260541754,  # γ = 2 (the default, the paper's): p = σ(0.5·1), −3p² + 2p³
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


def _ls(x):  # log σ(x)
    return -math.log1p(math.exp(-x))


def _pairs(h, dtype=torch.float64):
    """Pairs whose policy log-ratio difference is h (reference 0): chosen log-prob h, rejected 0."""
    h = torch.tensor(h, dtype=dtype)
    zero = torch.zeros_like(h)
    return h, zero, zero.clone(), zero.clone()


def test_cdpo_by_hand_and_its_gradient_vanishes_at_one_minus_epsilon():
    """cDPO (Mitchell 2023): −(1−ε) log σ(βh) − ε log σ(−βh); the target of σ(βh) is 1 − ε."""
    # β = 1, ε = .1: h = 0 → −.9 ls(0) − .1 ls(0) = ln 2; h = 2 → −.9 ls(2) − .1 ls(−2) = .9 · .126928 + .1 · 2.126928
    c, r, rc, rr = _pairs([0.0, 2.0])
    out = preference_loss(c, r, rc, rr, 1.0, "sigmoid", label_smoothing=0.1)
    assert out.tolist() == pytest.approx([math.log(2), 0.9 * -_ls(2.0) + 0.1 * -_ls(-2.0)], abs=1e-12)
    assert out[1].item() == pytest.approx(0.3269280110429725, abs=1e-12)
    # ε = 0 and the TRL 1.16 switch are plain DPO: −ls(2) = .126928
    for kwargs in ({"label_smoothing": 0.0}, {"label_smoothing": 0.1, "sigmoid_label_smoothing": "ignore"}):
        assert preference_loss(c, r, rc, rr, 1.0, "sigmoid", **kwargs)[1].item() == pytest.approx(-_ls(2.0), abs=1e-12)
    # d/dh = −β(1 − ε − σ(βh)): zero where σ(βh) = .9, i.e. βh = ln 9 (β = .5, h = 2 ln 9); DPO's is −β(1 − .9) there
    h = torch.tensor([2 * math.log(9.0)], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    preference_loss(h, zero, zero, zero, 0.5, "sigmoid", label_smoothing=0.1).sum().backward()
    assert h.grad.item() == pytest.approx(0.0, abs=1e-12)
    h.grad = None
    preference_loss(h, zero, zero, zero, 0.5, "sigmoid").sum().backward()
    assert h.grad.item() == pytest.approx(-0.5 * 0.1, abs=1e-12)
    with pytest.raises(ValueError, match="cDPO"):
        preference_loss(c, r, rc, rr, 1.0, "sigmoid", label_smoothing=0.5)


def test_rdpo_is_the_papers_unbiased_loss_by_hand():
    """rDPO (Chowdhury et al. 2024): ℓ̂(h) = ((1−ε) ℓ(h) − ε ℓ(−h)) / (1 − 2ε), ℓ(h) = −log σ(βh).

    β = 1, ε = .2, h = .5: ℓ(.5) = .474077, ℓ(−.5) = .974077; ℓ̂(.5) = (.8 · .474077 − .2 · .974077) / .6 = .307410;
    ℓ̂(−.5) = (.8 · .974077 − .2 · .474077) / .6 = 1.140744. Unbiased: a pair whose true order gives h = .5 is seen
    as it is with probability .8 and reversed (h = −.5) with .2: .8 · .307410 + .2 · 1.140744 = .474077 = ℓ(.5)."""
    c, r, rc, rr = _pairs([0.5, -0.5])
    out = preference_loss(c, r, rc, rr, 1.0, "robust", label_smoothing=0.2)
    assert out.tolist() == pytest.approx([0.30741031751343336, 1.1407436508467667], abs=1e-12)
    assert (0.8 * out[0] + 0.2 * out[1]).item() == pytest.approx(-_ls(0.5), abs=1e-12)
    # a confidently wrong pair (h = −20, σ ≈ 0) keeps a gradient: d/dh = −((1−ε)(1−σ) + εσ)/(1−2ε) → −.8/.6
    h = torch.tensor([-20.0], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    preference_loss(h, zero, zero, zero, 1.0, "robust", label_smoothing=0.2).sum().backward()
    assert h.grad.item() == pytest.approx(-0.8 / 0.6, abs=1e-6)


def test_holder_by_hand_loss_gradient_and_contamination_estimate():
    """Fujisawa et al. 2025 at their default γ = 2, β = 1, three pairs h = [2, 0, −1]: p = σ(h) = [.880797, .5,
    .268941]. Eq. (12) / Figure 6 per pair: ℓ = −3p² + 2p³ = [−.960760, −.5, −.178084]; dℓ/dh = −γ(1+γ)p^γ(1−p)²
    = −6p²(1−p)² = [−.066142, −.375, −.231938]. Eq. (27): ξ̂ = mean p · mean p² / mean p³ = .729516, ε̂ = .270484."""
    from adaptdpo.methods.losses import BATCH_COUPLED_LOSSES, holder_contamination, holder_scale

    h = torch.tensor([2.0, 0.0, -1.0], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(3, dtype=torch.float64)
    out = preference_loss(h, zero, zero, zero, 1.0, "holder", holder_gamma=2.0)
    assert out.tolist() == pytest.approx([-0.9607595790340355, -0.5, -0.17808367369704667], abs=1e-12)
    out.sum().backward()
    assert h.grad.tolist() == pytest.approx([-0.06614191785530063, -0.375, -0.23193751375771746], abs=1e-12)
    assert holder_scale(h.detach(), 2.0).item() == pytest.approx(0.7295162855964448, abs=1e-12)
    assert holder_contamination(h.detach(), 2.0).item() == pytest.approx(0.27048371440355523, abs=1e-12)
    # the batch mean is Figure 6's expression, and a pair's loss does not depend on the rest of its batch
    p = torch.sigmoid(h.detach())
    assert out.mean().item() == pytest.approx((-3 * p.pow(2).mean() + 2 * p.pow(3).mean()).item(), abs=1e-12)
    alone = preference_loss(h.detach()[1:2], zero[:1], zero[:1], zero[:1], 1.0, "holder", holder_gamma=2.0)
    assert alone.item() == pytest.approx(-0.5, abs=1e-12)
    assert "holder" not in BATCH_COUPLED_LOSSES


def test_holder_recovers_the_flipped_share_and_redescends():
    """Appendix F.3's example: N = 10 pairs, the model certain of the M = 2 flipped ones being wrong (βh = −60, p = 0)
    and of the 8 clean ones (βh = 60, p = 1): ξ̂ = mean p · mean p^γ / mean p^(1+γ) = .8 · .8/.8 = (N − M)/N, so
    ε̂ = .2 at any γ. ℓ = −(1+γ) + γ = −1 on the clean pairs, 0 on the flipped; both gradients vanish."""
    from adaptdpo.methods.losses import holder_contamination

    h = torch.tensor([60.0] * 8 + [-60.0] * 2, dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(10, dtype=torch.float64)
    for gamma in (0.5, 2.0):
        assert holder_contamination(h.detach(), gamma).item() == pytest.approx(0.2, abs=1e-12)
    out = preference_loss(h, zero, zero, zero, 1.0, "holder", holder_gamma=2.0)
    assert out.tolist() == pytest.approx([-1.0] * 8 + [0.0] * 2, abs=1e-12)
    out.sum().backward()
    assert h.grad.abs().max().item() < 1e-20  # DPO would still pull the two flipped pairs with gradient −1 each
    # a model unsure of everything (p = .5): ξ̂ = .5 · .5^γ / .5^(1+γ) = 1 → no contamination
    assert holder_contamination(torch.zeros(4), 2.0).item() == pytest.approx(0.0, abs=1e-7)
    # Lemma 4: 0 < ξ̂ ≤ 1 whatever the margins, so ε̂ ∈ [0, 1) without the clamp doing anything
    from adaptdpo.methods.losses import holder_scale

    g = torch.Generator().manual_seed(0)
    for gamma in (0.5, 1.0, 2.0, 6.0):
        xi = holder_scale(torch.randn(64, generator=g, dtype=torch.float64) * 4, gamma).item()
        assert 0.0 < xi <= 1.0 + 1e-12


def test_holder_rejects_a_non_positive_gamma():
    c, r, rc, rr = _pairs([1.0, -0.5, 3.0, 0.2])
    with pytest.raises(ValueError, match="holder_gamma"):
        preference_loss(c, r, rc, rr, 0.7, "holder", holder_gamma=0.0)
