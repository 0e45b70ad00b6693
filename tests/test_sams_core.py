"""SamS building blocks against the oracles of shared/research/sams.md §5.1 (1, 5, 7, 8, 10, 14)."""

import math

import pytest
import torch

from adaptdpo.methods.sams.contexts import layer_contexts
from adaptdpo.methods.sams.rewards import batch_reward, combined_reward, min_max, sample_reward
from adaptdpo.methods.sams.selection import num_selected, select


def test_contexts_masked_mean_per_layer_chosen_rejected_averaged():
    # 1 pair → stacked batch of 2 rows (chosen, rejected); T = 3 with the rejected row padded at t = 2
    embeddings = torch.zeros(2, 3, 2)
    layer1 = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [[10.0, 0.0], [20.0, 0.0], [999.0, 999.0]]])
    layer2 = 2 * layer1
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    ctx = layer_contexts((embeddings, layer1, layer2), mask)
    # chosen layer 1: mean of rows = [3, 4]; rejected layer 1 (pad excluded): [15, 0] → averaged [9, 2]
    assert ctx.shape == (1, 2, 2)
    assert ctx[0, 0].tolist() == pytest.approx([9.0, 2.0])
    assert ctx[0, 1].tolist() == pytest.approx([18.0, 4.0])
    concat = layer_contexts((embeddings, layer1, layer2), mask, combine="concat")
    assert concat.shape == (1, 2, 4) and concat[0, 0].tolist() == pytest.approx([3.0, 4.0, 15.0, 0.0])


def test_contexts_carry_no_gradient_to_the_policy():
    hidden = torch.randn(4, 5, 3, requires_grad=True)
    ctx = layer_contexts((hidden, hidden * 2), torch.ones(4, 5))
    assert not ctx.requires_grad


def test_batch_reward_sign_range_and_value():
    # loss fell from .7 to .6: r_B = (e^.7 − e^.6)/e^.7 = 1 − e^-.1 > 0 (the official code gets this negative)
    assert batch_reward(0.7, 0.6).item() == pytest.approx(1 - math.exp(-0.1))
    assert batch_reward(0.6, 0.7).item() == pytest.approx(math.exp(-0.1) - 1)
    assert batch_reward(0.5, 0.5).item() == 0.0
    # e^1000 overflows float64; the reward must not (it rounds to ±1 at such gaps)
    assert batch_reward(1000.0, 1.0).item() == 1.0 and batch_reward(1.0, 1000.0).item() == -1.0
    assert -1 < batch_reward(3.0, 1.0).item() < 1
    with pytest.raises(FloatingPointError):
        batch_reward(float("nan"), 0.1)


def test_min_max_guards_constant_batches():
    assert min_max(torch.tensor([3.0, 3.0, 3.0])).tolist() == [0.5, 0.5, 0.5]
    g = min_max(torch.tensor([-1.0, 0.0, 3.0]))
    assert g.tolist() == pytest.approx([0.0, 0.25, 1.0])


def test_sample_reward_range_and_monotonicity():
    gen = torch.Generator().manual_seed(0)
    margins, logps = torch.randn(8, generator=gen), -10 * torch.rand(8, generator=gen)
    base = sample_reward(margins, logps)
    assert ((base >= 0) & (base <= 1)).all()
    for i in range(8):
        up_margin = margins.clone()
        up_margin[i] += 0.5
        assert sample_reward(up_margin, logps)[i] >= base[i] - 1e-12  # larger margin never lowers r_S
        up_logp = logps.clone()
        up_logp[i] += 0.5
        assert sample_reward(margins, up_logp)[i] <= base[i] + 1e-12  # likelier chosen never raises r_S
    r = combined_reward(batch_reward(0.7, 0.6), base)
    assert ((r > 0) & (r < 1)).all() and r.shape == (8,)
    # Eq. 8 by hand for one value: γσ(r_B) + (1−γ)σ(r_S)
    expected = 0.5 / (1 + math.exp(-(1 - math.exp(-0.1)))) + 0.5 / (1 + math.exp(-base[0].item()))
    assert r[0].item() == pytest.approx(expected)


@pytest.mark.parametrize("rule", ["topk", "softmax", "random"])
def test_selection_size(rule):
    for n, ratio in ((8, 0.5), (7, 0.5), (64, 0.25), (1, 0.5), (5, 1.0)):
        k = num_selected(n, ratio)
        mask = select(torch.randn(n), k, rule, generator=torch.Generator().manual_seed(n))
        assert mask.dtype == torch.bool and int(mask.sum()) == k == (n if ratio >= 1 else max(1, int(ratio * n)))


def test_topk_is_deterministic_and_permutation_equivariant():
    scores = torch.tensor([0.3, -1.0, 2.0, 0.3, 0.9, 0.0])
    assert select(scores, 3).tolist() == [True, False, True, False, True, False]  # ties: lower index first
    perm = torch.tensor([4, 2, 0, 5, 1, 3])
    permuted = select(torch.tensor([0.9, 2.0, 0.3, 0.0, -1.0, 0.31]), 3)
    assert permuted.tolist() == select(scores[perm] + torch.tensor([0, 0, 0, 0, 0, 0.01]), 3).tolist()
    gen = torch.Generator().manual_seed(1)
    distinct = torch.randn(10, generator=gen)
    perm = torch.randperm(10, generator=gen)
    assert torch.equal(select(distinct, 4)[perm], select(distinct[perm], 4))


def test_random_and_softmax_sampling_laws():
    draws, counts_random, counts_hot = 6000, torch.zeros(4), torch.zeros(4)
    gen = torch.Generator().manual_seed(0)
    scores = torch.tensor([3.0, 0.0, 0.0, 0.0])
    for _ in range(draws):
        counts_random += select(scores, 2, "random", generator=gen).float()
        counts_hot += select(scores, 1, "softmax", temperature=1.0, generator=gen).float()
    assert (counts_random / draws - 0.5).abs().max() < 0.03  # uniform: every pair kept half the time
    p_first = math.exp(3) / (math.exp(3) + 3)  # softmax probability of the high-score pair for k = 1
    assert counts_hot[0] / draws == pytest.approx(p_first, abs=0.02)
    with pytest.raises(ValueError):
        select(scores, 0)
