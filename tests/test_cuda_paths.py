"""The CUDA paths against the dense reference path, on the same inputs (issue 29 (a)).

`bash benchmarks/gpu_suite.sh first` runs `pytest -m cuda` on this file first thing on a lent GPU. Every test takes a
``device``: ``cuda`` (marked ``cuda``, skipped without a CUDA device) and ``cpu``, the same body on the CPU, where the
comparison still means something (the suite and the dry run run those). The reference is the plainest path there
is: the stacked [chosen; rejected] layout, eager attention with the 2D padding mask, the model's own LM head, float64,
on the CPU (its log-softmax in float32, as every path's), from the same weights and the same tokens: no custom mask,
no kernel under test.

Covered: the shared-prompt layout with a FlexAttention block mask (forward and, on CUDA, backward), padding-free rows
(sdpa and FlexAttention), the chunked LM head (alone and in the forward), a bf16-autocast step over float32 master
weights, SamS's scheduler for several rounds with its replay pool (device against CPU), SamS and β-DPO trainer steps
against the reference loss of the pairs and β they chose, and the β-DPO controller (device against float64 CPU).
On the CPU FlexAttention runs forward only (torch 2.13 has no FlexAttention backward there) and eagerly (transformers
compiles it, and the CPU code generation fails on the padding-free mask); on CUDA it runs as in training: compiled,
forward and backward.
"""

from __future__ import annotations

import copy

import pytest
import torch

from adaptdpo.data.collate import PreferenceCollator, batch_to, pairs_in_batch
from adaptdpo.data.tokenize import tokenize_rows
from adaptdpo.methods.beta_dpo import BetaDPO
from adaptdpo.methods.losses import preference_loss
from adaptdpo.methods.sams.contexts import layer_contexts
from adaptdpo.methods.sams.networks import size_from
from adaptdpo.methods.sams.scheduler import SamsScheduler
from adaptdpo.models.lm_head import scores_from_hidden, scores_from_logits
from adaptdpo.models.sequence_logps import sequence_logps
from adaptdpo.models.tiny import build_tiny_model, tiny_model_config

CUDA = torch.cuda.is_available()
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda,
                                                  pytest.mark.skipif(not CUDA, reason="needs a CUDA device")])]
HIDDEN, HEADS = 64, 1  # head dim 64: a size every FlexAttention kernel takes


@pytest.fixture(scope="module")
def examples(hh_rows, tokenizer):
    """Six HH pairs (prompts of different lengths: padding in every layout) and the tokenizer."""
    rows, _ = tokenize_rows(hh_rows[:6], tokenizer, max_length=96, max_prompt_length=48)
    return rows, tokenizer


@pytest.fixture
def eager_flex_on_cpu(request, monkeypatch):
    """On the CPU, FlexAttention without transformers' torch.compile (see the module docstring)."""
    if request.node.callspec.params.get("device") == "cpu":
        import transformers.integrations.flex_attention as hf_flex
        from torch.nn.attention.flex_attention import flex_attention

        monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention",
                            lambda query, key, value, training=False, **kw: flex_attention(query, key, value, **kw))


def _model(tokenizer, attn: str, seed: int = 5):
    cfg = tiny_model_config("tiny-llama", len(tokenizer), HIDDEN, 2, HEADS, 256, tokenizer.pad_token_id,
                            tokenizer.eos_token_id)
    return build_tiny_model(cfg, seed=seed, attn_implementation=attn)


def _weights(n_rows: int) -> torch.Tensor:
    """Fixed upstream gradients for the summed log-probs (distinct per row, both signs)."""
    return torch.linspace(-1.0, 1.0, n_rows, dtype=torch.float64)


def _dense_reference(model, examples_, pad: int, upstream: torch.Tensor | None = None, **kwargs):
    """(SequenceLogps, {name: grad}) of the dense reference path (see the module docstring)."""
    ref = copy.deepcopy(model).to("cpu", torch.float64)
    ref.set_attn_implementation("eager")
    ref.zero_grad(set_to_none=True)  # a deep copy keeps .grad
    out = sequence_logps(ref, PreferenceCollator(pad)(examples_), **kwargs)
    grads = None
    if upstream is not None:
        (out.logps * upstream).sum().backward()
        grads = {name: p.grad for name, p in ref.named_parameters()}
    return out, grads


def _assert_grads_close(got: dict, want: dict, rel: float) -> None:
    """Per parameter, ‖got − want‖ ≤ rel·‖want‖ (a wrong mask or a wrong backward is off by O(1), rounding by
    ~1e-6)."""
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name].detach().to("cpu", torch.float64)
        error, norm = float((g - w).norm()), float(w.norm())
        assert error <= rel * norm + 1e-12, f"{name}: relative gradient error {error / max(norm, 1e-30):.2e}"


def _assert_logps_close(got, want, atol: float = 2e-4) -> None:
    torch.testing.assert_close(got.logps.detach().to("cpu", torch.float64), want.logps.detach().double(), atol=atol,
                               rtol=1e-5)
    assert torch.equal(got.lengths.cpu(), want.lengths.cpu())


# ----------------------------------------------------------------------------------- the chunked head


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_head_matches_the_dense_reference(device, examples):
    """The chunked LM head alone (a 5,000-token vocabulary, 300 positions, chunks of 64 with a short last one) and in
    the shared-prompt forward: log-probs, statistics and gradients against the plain log-softmax in float64."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 64, generator=gen, dtype=torch.float64)
    weight = torch.randn(5000, 64, generator=gen, dtype=torch.float64) / 8
    labels = torch.randint(0, 5000, (300,), generator=gen)
    upstream = torch.randn(300, generator=gen, dtype=torch.float64)
    h64, w64 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    plain = scores_from_logits(h64 @ w64.t(), labels, stats=True, wpo=True)
    plain_grads = torch.autograd.grad((plain.logp * upstream).sum(), (h64, w64))
    h, w = (t.to(device, torch.float32).requires_grad_(True) for t in (hidden, weight))
    chunked = scores_from_hidden(h, w, labels.to(device), chunk=64, stats=True, wpo=True)
    grads = torch.autograd.grad((chunked.logp * upstream.to(device, torch.float32)).sum(), (h, w))
    torch.testing.assert_close(chunked.logp.detach().cpu().double(), plain.logp.detach().double(), atol=1e-4, rtol=1e-5)
    for name in ("entropy", "mean_logit", "log_sum_sq"):
        torch.testing.assert_close(getattr(chunked, name).cpu().double(), getattr(plain, name).double(), atol=1e-4,
                                   rtol=1e-5, msg=name)
    assert torch.equal(chunked.top1.cpu(), plain.top1)
    _assert_grads_close({"hidden": grads[0], "weight": grads[1]}, {"hidden": plain_grads[0], "weight": plain_grads[1]},
                        rel=1e-4)
    # in the model's forward (sdpa, shared-prompt rows, a 16-position chunk)
    rows, tok = examples
    model = _model(tok, "sdpa").to(device)
    batch = batch_to(PreferenceCollator(tok.pad_token_id, shared_prompt=True)(rows), device)
    got = sequence_logps(model, batch, head_chunk=16, token_stats=True)
    upstream = _weights(2 * len(rows))
    want, want_grads = _dense_reference(model, rows, tok.pad_token_id, upstream, token_stats=True)
    _assert_logps_close(got, want)
    (got.logps * upstream.to(device, torch.float32)).sum().backward()
    _assert_grads_close({n: p.grad for n, p in model.named_parameters()}, want_grads, rel=1e-3)


# ----------------------------------------------------------------------------------- a trainer step


def _trainer(tok, device: str, out, policy, reference, **overrides):
    from adaptdpo.training.config import AdaptiveDPOConfig
    from adaptdpo.training.trainer import AdaptiveDPOTrainer

    # float32 unless a test asks for bf16 (bf16: auto turns it on on CUDA; these compare with float64 at 1e-4)
    overrides.setdefault("bf16", False)
    args = AdaptiveDPOConfig(output_dir=str(out), use_cpu=device == "cpu", report_to="none", trace_pairs=False,
                             beta=0.1, **overrides)
    trainer = AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                                 processing_class=tok)
    # what Trainer.train() does before the first step: the policy wrapped (mixed precision: autocast), an optimizer
    trainer.model = trainer.model_wrapped = trainer.accelerator.prepare_model(trainer.model)
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    assert trainer.args.device.type == device
    return trainer


def _reference_loss(policy, reference, rows, pad: int, beta, keep: torch.Tensor | None):
    """The DPO (sigmoid) loss of the kept pairs, each with its β, over the dense reference path: (loss, grads)."""
    pol = copy.deepcopy(policy).to("cpu", torch.float64)
    ref = copy.deepcopy(reference).to("cpu", torch.float64)
    for m in (pol, ref):
        m.set_attn_implementation("eager")
        m.zero_grad(set_to_none=True)
    stacked = PreferenceCollator(pad)(rows)
    chosen, rejected = sequence_logps(pol, stacked).split()
    with torch.no_grad():
        ref_chosen, ref_rejected = sequence_logps(ref, stacked).split()
    keep = torch.ones(len(rows), dtype=torch.bool) if keep is None else keep.cpu()
    beta = beta.detach().cpu().double() if torch.is_tensor(beta) else beta
    losses = preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    loss = losses[keep].sum() / int(keep.sum())
    loss.backward()
    return float(loss), {n: p.grad for n, p in pol.named_parameters()}


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_step_keeps_float32_master_weights(device, examples, tmp_path):
    """A bf16 run as TRL's: float32 weights, both forwards under bf16 autocast (the chunked head too). The loss and
    the gradient agree with the float64 reference to bf16's precision, and an optimizer step of 1e-6 (which bf16
    weights of this size round away: their spacing near 0.02 is 1.2e-4) moves every weight that has a gradient."""
    rows, tok = examples
    policy, reference = _model(tok, "sdpa", seed=5), _model(tok, "sdpa", seed=6)
    trainer = _trainer(tok, device, tmp_path, policy, reference, bf16=True, learning_rate=1e-6, lm_head_chunk_size=16)
    seen = {}

    def hook(key):
        def record(module, args, output):
            seen.setdefault(key, output.dtype)  # returns None: the output is left as it is
        return record

    hooks = [module.model.layers[0].self_attn.q_proj.register_forward_hook(hook(key))
             for key, module in (("policy", trainer.accelerator.unwrap_model(trainer.model)),
                                 ("reference", trainer.ref_model))]
    batch = batch_to(trainer.data_collator(rows), device)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    loss = trainer.training_step(trainer.model, batch, torch.tensor(len(rows), device=device))
    for hook in hooks:
        hook.remove()
    assert seen == {"policy": torch.bfloat16, "reference": torch.bfloat16}
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in trainer.model.parameters())
    want_loss, want_grads = _reference_loss(policy, reference, rows, tok.pad_token_id, 0.1, None)
    assert abs(float(loss) - want_loss) < 2e-2, (float(loss), want_loss)
    flat = torch.cat([grads[n].cpu().double().flatten() for n in want_grads])
    flat_want = torch.cat([g.flatten() for g in want_grads.values()])
    cosine = float(flat @ flat_want / (flat.norm() * flat_want.norm()))
    assert cosine > 0.99, cosine
    trainer.optimizer.step()
    for name, param in trainer.model.named_parameters():
        assert param.dtype == torch.float32
        moved = (param.detach() - before[name]).abs()
        has_grad = grads[name].abs() > 1e-6  # Adam's first step: |update| = lr·|g|/(|g| + ε) ≈ lr
        if bool(has_grad.any()):
            share = float(((moved[has_grad] > 0.5e-6) & (moved[has_grad] < 1.5e-6)).float().mean())
            assert share > 0.95, f"{name}: only {share:.0%} of its weights with a gradient moved by ≈ the lr"


class _Recording:
    """Wraps a step policy: keeps every plan (β, trained pairs) the trainer trains with."""

    def __init__(self, policy):
        self.policy, self.plans = policy, []
        self.plan_of = policy.plan
        policy.plan = self.plan

    def plan(self, view):
        plan = self.plan_of(view)
        self.plans.append(plan)
        return plan


@pytest.mark.parametrize("method", ["sams subset", "sams mask", "beta_dpo"])
@pytest.mark.parametrize("device", DEVICES)
def test_method_steps_match_the_reference_loss_of_their_choice(device, method, examples, hh_rows, tmp_path):
    """Three optimizer steps of SamS (subset: a no-grad scoring forward, then forward and backward on the k chosen;
    mask: one forward, the others weighted 0; from the third round on the scheduler fits on its replay pool too)
    and of β-DPO (β from the margins, the Gumbel filter keeping 3 of 4): each step's loss and gradient equal the
    reference loss of the pairs and β the method chose, on the same weights; SamS's contexts equal the reference's
    pooled hidden states; the pool lives on the CPU, the scheduler on the device."""
    _, tok = examples
    name, _, mode = method.partition(" ")
    overrides = {"method": "beta_dpo", "beta_dpo_keep_ratio": 0.75}
    if name == "sams":
        overrides = {"method": "sams", "sams_mode": mode, "sams_ratio": 0.5, "sams_warmup_rounds": 1,
                     "sams_pool_batches": 4, "sams_fit_steps": 1}
    policy, reference = _model(tok, "sdpa", seed=5), _model(tok, "sdpa", seed=6)
    trainer = _trainer(tok, device, tmp_path, policy, reference, learning_rate=1e-3, **overrides)
    recording = _Recording(trainer.step_policy)
    batches = [tokenize_rows(hh_rows[i:i + 8], tok, max_length=80, max_prompt_length=40)[0] for i in (0, 8)]
    for step in range(3):
        rows = batches[step % 2]
        current = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model)).cpu()
        batch = batch_to(trainer.data_collator(rows), device)
        trained = trainer.step_policy.num_trained(len(rows))
        loss = trainer.training_step(trainer.model, batch, torch.tensor(trained, device=device))
        plan = recording.plans[-1]
        keep = plan.train_mask
        assert keep is not None and int(keep.sum()) == trained < len(rows)
        want_loss, want_grads = _reference_loss(current, reference, rows, tok.pad_token_id, plan.beta, keep)
        assert abs(float(loss) - want_loss) < 1e-4, (step, float(loss), want_loss)
        _assert_grads_close({n: p.grad for n, p in trainer.model.named_parameters()}, want_grads, rel=1e-3)
        if name == "sams":
            ref = copy.deepcopy(current).double()
            ref.set_attn_implementation("eager")
            stacked = PreferenceCollator(tok.pad_token_id)(rows)
            with torch.no_grad():
                out = sequence_logps(ref, stacked, output_hidden_states=True)
            want_contexts = layer_contexts(out.outputs.hidden_states, stacked["attention_mask"])
            got_contexts = trainer.step_policy.scheduler.previous.contexts
            assert got_contexts.device.type == device
            torch.testing.assert_close(got_contexts.cpu(), want_contexts, atol=1e-4, rtol=1e-4)
        trainer.optimizer.step()
        trainer.model.zero_grad(set_to_none=True)
    if name == "sams":
        scheduler = trainer.step_policy.scheduler
        assert len(scheduler.pool) == 2 and all(e.contexts.device.type == "cpu" for e in scheduler.pool)
        assert all(p.device.type == device for m in scheduler.modules() for p in m.parameters())
    else:
        assert trainer.step_policy.controller.steps == 3


# ----------------------------------------------------------------------------------- the methods' own state


@pytest.mark.parametrize("device", DEVICES)
def test_sams_scheduler_rounds_with_its_pool_match_the_cpu(device):
    """Six scheduling rounds (two random warm-up rounds, then Top-K), the lagged fit on the previous round plus up to
    three pooled rounds: the same selections, fit losses, pooled rewards and network weights on the device as on the
    CPU from the same seed and inputs (dropout off: its masks come from each device's own generator; networks of the
    small preset's form at a quarter of its widths)."""
    size = size_from("small", dropout=0.0, width=64, encoder_dim=32, encoder_heads=2, connector_hidden=32)

    def make():
        return SamsScheduler(num_layers=3, context_dim=16, ratio=0.5, warmup_rounds=2, pool_batches=3, fit_steps=2,
                             seed=7, size=size)

    on_cpu, on_device = make(), make().to(device)
    gen = torch.Generator().manual_seed(3)
    for round_ in range(6):
        contexts = torch.randn(12, 3, 16, generator=gen)
        margins, chosen = torch.randn(12, generator=gen), torch.randn(12, generator=gen) - 40
        loss = 0.7 - 0.01 * round_
        want = on_cpu.step(contexts, margins, chosen, loss)
        got = on_device.step(contexts.to(device), margins.to(device), chosen.to(device), loss)
        assert got.device.type == device
        assert torch.equal(got.cpu(), want), round_
        for key, value in on_cpu.last_metrics.items():
            assert on_device.last_metrics[key] == pytest.approx(value, rel=1e-3, abs=1e-6, nan_ok=True), key
    assert len(on_device.pool) == len(on_cpu.pool) == 5
    for a, b in zip(on_device.pool, on_cpu.pool, strict=True):
        assert a.contexts.device.type == "cpu"
        torch.testing.assert_close(a.rewards, b.rewards, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a.predictions, b.predictions, atol=1e-4, rtol=1e-4)
    for module_a, module_b in zip(on_device.modules(), on_cpu.modules(), strict=True):
        for (name, a), b in zip(module_a.named_parameters(recurse=False), module_b.parameters(recurse=False),
                                strict=True):
            assert a.device.type == device
            a, b = a.detach().cpu(), b.detach()
            if name == "in_proj_bias":
                # the key bias shifts every score of a query by the same q·b_k, which softmax ignores: its true
                # gradient is 0, so Adam turns each device's rounding noise (~1e-9) into steps of up to lr, in
                # different directions on the two devices (seen on an H200: the only parameter off). Its query and
                # value thirds are compared, the key third is left out.
                third = a.numel() // 3
                keep = torch.ones_like(a, dtype=torch.bool)
                keep[third:2 * third] = False
                a, b = a[keep], b[keep]
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"{type(module_a).__name__}.{name}")


@pytest.mark.parametrize("level", ["batch", "instance"])
@pytest.mark.parametrize("device", DEVICES)
def test_beta_dpo_controller_on_the_device_matches_float64_on_the_cpu(device, level):
    """Six β-DPO steps: β, the kept pairs (Gumbel-top-k from the CPU generator: the same draws on every device), M0
    and σ as the float64 controller on the CPU computes them; its state stays on the margins' device."""
    on_cpu = BetaDPO(beta=0.1, alpha=0.6, keep_ratio=0.75, level=level, seed=3)
    on_device = BetaDPO(beta=0.1, alpha=0.6, keep_ratio=0.75, level=level, seed=3)
    gen = torch.Generator().manual_seed(11)
    for step in range(6):
        chosen = torch.randn(16, generator=gen, dtype=torch.float64) * 3 + step
        rejected = torch.randn(16, generator=gen, dtype=torch.float64) * 3
        want_beta, want_keep = on_cpu.step(chosen, rejected)
        beta, keep = on_device.step(chosen.float().to(device), rejected.float().to(device))
        assert beta.device.type == keep.device.type == on_device._m0.device.type == device
        assert torch.equal(keep.cpu(), want_keep), step
        torch.testing.assert_close(beta.cpu(), want_beta, atol=1e-6, rtol=1e-5)
        assert on_device.m0 == pytest.approx(on_cpu.m0, rel=1e-6, abs=1e-6)
        assert on_device.sigma == pytest.approx(on_cpu.sigma, rel=1e-6, abs=1e-6)


# ----------------------------------------------------------------------------------- FlexAttention and padding-free
# last in the file: on CUDA their kernels compile on first use, and a slow compile should cost no other check


@pytest.mark.parametrize("device", DEVICES)
def test_flex_attention_shared_prompt_matches_the_dense_reference(device, examples, eager_flex_on_cpu):
    """The packed [prompt, chosen, rejected] rows with the block-sparse branch mask: log-probs, TRL's token
    statistics and (CUDA: FlexAttention's backward) every gradient."""
    rows, tok = examples
    flex = _model(tok, "flex_attention").to(device)
    batch = batch_to(PreferenceCollator(tok.pad_token_id, shared_prompt=True)(rows), device)
    upstream = _weights(2 * len(rows))
    backward = device == "cuda"
    with torch.set_grad_enabled(backward):
        got = sequence_logps(flex, batch, token_stats=True)
    want, want_grads = _dense_reference(flex, rows, tok.pad_token_id, upstream if backward else None,
                                        token_stats=True)
    _assert_logps_close(got, want)
    for a, b in zip(got.stats.values(), want.stats.values(), strict=True):
        torch.testing.assert_close(a.detach().to("cpu", torch.float64), b.double(), atol=1e-3, rtol=1e-5)
    if backward:
        (got.logps * upstream.to(device, torch.float32)).sum().backward()
        _assert_grads_close({n: p.grad for n, p in flex.named_parameters()}, want_grads, rel=1e-3)


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
@pytest.mark.parametrize("device", DEVICES)
def test_padding_free_rows_match_the_dense_reference(device, attn, examples, eager_flex_on_cpu):
    """Every pair in one row (document mask; sdpa: a dense [T, T] mask, flex: a BlockMask), with the chunked head, WPO
    and LD-DPO weights: per-pair log-probs, WPO means and every gradient (flex on the CPU: forward only)."""
    rows, tok = examples
    model = _model(tok, attn).to(device)
    batch = batch_to(PreferenceCollator(tok.pad_token_id, shared_prompt=True, padding_free=True,
                                        pad_to_multiple_of=64)(rows), device)
    assert batch["input_ids"].shape[0] == 1 and pairs_in_batch(batch) == len(rows)
    kwargs = {"wpo": True, "ld_alpha": 0.5}
    backward = attn == "sdpa" or device == "cuda"
    upstream = _weights(2 * len(rows))
    with torch.set_grad_enabled(backward):
        got = sequence_logps(model, batch, head_chunk=16, **kwargs)
    want, want_grads = _dense_reference(model, rows, tok.pad_token_id, upstream if backward else None, **kwargs)
    _assert_logps_close(got, want)
    torch.testing.assert_close(got.wpo_mean.detach().to("cpu", torch.float64), want.wpo_mean.double(), atol=1e-5,
                               rtol=1e-5)
    if backward:
        (got.logps * upstream.to(device, torch.float32)).sum().backward()
        _assert_grads_close({n: p.grad for n, p in model.named_parameters()}, want_grads, rel=1e-3)
