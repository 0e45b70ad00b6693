"""The SamS scheduler: lag, pool, exploration start, shapes, state (sams.md §5.1 oracles 1, 6, 9, 11, 14)."""

import copy
import io

import pytest
import torch

from adaptdpo.methods.sams.scheduler import SamsScheduler

L, D, N = 3, 8, 8


def round_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, L, D, generator=g), torch.randn(N, generator=g), -20 * torch.rand(N, generator=g),
            0.7 - 0.01 * seed)


def params(s):
    return torch.cat([p.detach().flatten().clone() for m in s.modules() for p in m.parameters()])


def make(**kw):
    return SamsScheduler(num_layers=L, context_dim=D, **{"warmup_rounds": 0, "seed": 0, **kw})


def test_selection_size_and_metrics():
    s = make(ratio=0.25)
    mask = s.step(*round_inputs(0))
    assert mask.dtype == torch.bool and int(mask.sum()) == 2
    assert s.last_metrics["sams/selected_fraction"] == 0.25


def test_lag_nothing_of_round_t_trains_the_scheduler_before_it_is_scored():
    s = make()
    before = params(s)
    first = round_inputs(1)
    s.step(*first)
    assert torch.equal(params(s), before) and s.pool == []  # round 1: no update
    second = round_inputs(2)
    scores_before_fit = s.score(second[0])[0]
    s.step(*second)
    assert not torch.equal(params(s), before)  # round 2 fitted on round 1 ...
    assert len(s.pool) == 1 and torch.equal(s.pool[0].contexts, first[0])  # ... and only on round 1
    assert torch.equal(s.previous.contexts, second[0])  # round 2 waits for round 3's loss
    # the round-2 selection was made with the networks as fitted on round 1, not on round 2
    assert "sams/batch_reward" in s.last_metrics and s.last_metrics["sams/batch_reward"] > 0  # loss .69 < .70
    assert scores_before_fit.shape == (N,)


def test_exploration_starts_at_zero_and_lambda_zero_is_exploitation_topk():
    s = make()
    contexts = round_inputs(3)[0]
    score, prediction = s.score(contexts)
    assert torch.equal(score, prediction)  # f_S' last layer is zero-initialised
    s.step(*round_inputs(4))
    s.step(*round_inputs(5))  # now f_S' has been fitted
    score, prediction = s.score(contexts)
    assert not torch.equal(score, prediction)
    greedy = make(exploration_weight=0.0)
    greedy.load_state_dict(copy.deepcopy(s.state_dict()))
    mask = greedy.step(contexts, *round_inputs(6)[1:])
    top = torch.zeros(N, dtype=torch.bool)
    top[torch.topk(greedy.previous.predictions, N // 2).indices] = True
    assert torch.equal(mask, top)


def test_pool_is_bounded_and_training_sets_have_no_duplicate_batches():
    s = make(pool_capacity=3, pool_batches=2)
    seen = []
    original_fit = s._fit

    def spy(contexts, rewards, predictions):
        seen.append(rewards.shape[0])
        assert rewards.shape == predictions.shape == (contexts.shape[0],)
        return original_fit(contexts, rewards, predictions)

    s._fit = spy
    for r in range(7):
        s.step(*round_inputs(10 + r))
    assert len(s.pool) == 3
    assert seen == [N, 2 * N, 3 * N, 3 * N, 3 * N, 3 * N]  # the previous round + min(stored, 2) pool rounds


def test_train_on_selected_uses_the_selected_pairs_only():
    s = make(train_on="selected")
    s.step(*round_inputs(20))
    s.step(*round_inputs(21))
    assert s.pool[0].contexts.shape[0] == N // 2


def test_warmup_rounds_select_at_random():
    s = make(warmup_rounds=5)
    contexts, margins, logps, loss = round_inputs(30)
    masks = {tuple(s.step(contexts, margins, logps, loss).tolist()) for _ in range(5)}
    assert len(masks) > 1  # random draws, not a fixed Top-K of an untrained net


def test_state_dict_round_trip_continues_identically():
    a = make(selection="softmax")
    for r in range(3):
        a.step(*round_inputs(40 + r))
    b = make(selection="softmax", seed=123)
    buffer = io.BytesIO()  # through serialisation, as a checkpoint does (state_dict() holds live tensors)
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=False))
    for r in range(3):
        assert torch.equal(a.step(*round_inputs(50 + r)), b.step(*round_inputs(50 + r)))
    assert torch.equal(params(a), params(b))


def test_invalid_options():
    with pytest.raises(ValueError):
        make(selection="best")
    with pytest.raises(ValueError):
        make(train_on="some")


def test_fast_dropout_law_per_lane_scale_gradient_and_determinism():
    from adaptdpo.methods.sams.networks import FastDropout

    drop = FastDropout(0.3)
    x = torch.ones(1 << 20)
    torch.manual_seed(0)
    out = drop(x)
    kept = out != 0
    assert torch.equal(out[kept], torch.full_like(out[kept], drop.scale))  # inverted dropout: x / (1 − p)
    assert drop.dropped == round(0.3 * 2**15) and abs(drop.scale - 2**15 / (2**15 - drop.dropped)) < 1e-15
    bound = 5 * (0.3 * 0.7 / (x.numel() / 4)) ** 0.5  # 5 σ of a lane's kept fraction
    for lane in range(4):  # each 16-bit lane of a 64-bit draw is an independent decision (the top one too)
        assert abs(float(kept[lane::4].float().mean()) - 0.7) < bound, lane
    assert abs(float(out.mean()) - 1.0) < 5 * (0.3 / 0.7 / x.numel()) ** 0.5  # unbiased
    torch.manual_seed(0)
    assert torch.equal(drop(x), out)  # the mask comes from the torch generator: seeded, resumable
    y = torch.randn(3, 5, 7, requires_grad=True)
    torch.manual_seed(1)
    z = drop(y)
    z.backward(torch.ones_like(z))
    assert torch.equal(y.grad, (z != 0).float() * drop.scale)
    drop.eval()
    assert drop(y) is y
    assert FastDropout(0.0).train()(y) is y
    with pytest.raises(ValueError, match="dropout probability"):
        FastDropout(1.0)


def test_every_scheduler_dropout_is_the_fast_one():
    from adaptdpo.methods.sams.networks import FastDropout

    s = make()
    modules = [m for net in s.modules() for m in net.modules()]
    assert not any(type(m) is torch.nn.Dropout for m in modules)
    assert sum(isinstance(m, FastDropout) for m in modules) == 3 + 1 + 1  # encoder layer; f_S and f_S′ reuse one each


def test_exploration_net_learns_from_the_activations_it_is_scored_on():
    """f_S′'s training input is f_S's eval-mode activations (as at scoring), not a dropout-noised copy."""
    s = make(fit_steps=1)
    s.step(*round_inputs(0))
    seen = []
    s.explore.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    s.step(*round_inputs(1))  # fit on round 0 (f_S then f_S′), then score round 1
    with torch.no_grad():
        s.encoder.eval()
        s.exploit.eval()
        _, expected = s.exploit(s.encoder(round_inputs(0)[0]))
    assert len(seen) == 2 and torch.equal(seen[0], expected)  # [0]: the fit, [1]: scoring round 1
