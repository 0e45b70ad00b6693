"""The chunked LM head (adaptdpo/models/lm_head.py): log-probs, statistics and gradients equal to the plain head's, in
the
stacked and shared-prompt layouts and through the trainer; finite-difference check of its hand-written backward."""

from __future__ import annotations

import copy

import pytest
import torch

from adaptdpo.data.collate import PreferenceCollator
from adaptdpo.data.tokenize import tokenize_rows
from adaptdpo.models.lm_head import ChunkedHeadLogProbs, chunkable_head, scores_from_hidden, scores_from_logits
from adaptdpo.models.sequence_logps import sequence_logps
from adaptdpo.training.config import AdaptiveDPOConfig
from adaptdpo.training.trainer import AdaptiveDPOTrainer


def test_chunked_head_equals_the_plain_log_softmax_and_its_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    plain = scores_from_logits(hidden @ weight.t(), labels, stats=True, wpo=True)
    upstream = torch.randn(37)
    plain_grads = torch.autograd.grad((plain.logp * upstream).sum(), (hidden, weight))
    chunked = scores_from_hidden(hidden, weight, labels, chunk=8, stats=True, wpo=True)  # 5 chunks, the last short
    chunked_grads = torch.autograd.grad((chunked.logp * upstream).sum(), (hidden, weight))
    torch.testing.assert_close(chunked.logp, plain.logp, atol=1e-6, rtol=1e-6)
    for name in ("entropy", "mean_logit", "log_sum_sq"):
        torch.testing.assert_close(getattr(chunked, name), getattr(plain, name), atol=1e-5, rtol=1e-6, msg=name)
    assert torch.equal(chunked.top1, plain.top1)
    for a, b in zip(chunked_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_chunked_head_backward_against_finite_differences():
    torch.manual_seed(1)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (7,))

    def logp(h, w):  # 3 chunks of 3, 3, 1 rows
        return ChunkedHeadLogProbs.apply(h, w, labels, 3, False, False)[0]

    assert torch.autograd.gradcheck(logp, (hidden, weight), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def batches(hh_rows, tokenizer):
    examples, _ = tokenize_rows(hh_rows[:6], tokenizer, max_length=96, max_prompt_length=48)
    stacked = PreferenceCollator(tokenizer.pad_token_id)(examples)
    packed = PreferenceCollator(tokenizer.pad_token_id, shared_prompt=True)(examples)
    return {"stacked": stacked, "packed": packed}


@pytest.mark.parametrize("layout", ["stacked", "packed"])
def test_sequence_logps_with_a_chunked_head_equal_the_plain_head(policy_and_reference, batches, layout):
    """Summed log-probs, TRL's token statistics, WPO's means, LD-DPO weights and every parameter gradient."""
    policy, _ = policy_and_reference
    assert chunkable_head(policy) is policy.lm_head
    results = {}
    for chunk in (None, 7):
        model = copy.deepcopy(policy)
        out = sequence_logps(model, batches[layout], token_stats=True, wpo=True, ld_alpha=0.5, head_chunk=chunk)
        (out.logps * torch.linspace(-1, 1, out.logps.shape[0])).sum().backward()
        results[chunk] = (out, {n: p.grad for n, p in model.named_parameters()})
    (plain, plain_grads), (chunked, chunked_grads) = results[None], results[7]
    torch.testing.assert_close(chunked.logps, plain.logps, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(chunked.wpo_mean, plain.wpo_mean, atol=1e-5, rtol=1e-6)
    for a, b in zip(chunked.stats.values(), plain.stats.values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_the_trainer_step_is_the_same_with_a_chunked_head(policy_and_reference, batches, tokenizer, tmp_path):
    policy, reference = policy_and_reference
    losses, grads = {}, {}
    assert AdaptiveDPOConfig(output_dir=str(tmp_path)).lm_head_chunk_size == 512  # on by default
    for chunk in (None, 16):
        trainer = AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                                     processing_class=tokenizer,
                                     args=AdaptiveDPOConfig(output_dir=str(tmp_path / str(chunk)), use_cpu=True,
                                                            beta=0.2, trace_pairs=False, lm_head_chunk_size=chunk))
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(batches["packed"]), num_items_in_batch=torch.tensor(6))
        loss.backward()
        losses[chunk] = loss.item()
        grads[chunk] = {n: p.grad for n, p in trainer.model.named_parameters()}
    assert losses[16] == pytest.approx(losses[None], abs=1e-6)
    for name, grad in grads[None].items():
        torch.testing.assert_close(grads[16][name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_heads_the_chunked_path_cannot_reproduce_fall_back(policy_and_reference, tokenizer, tmp_path, caplog):
    import logging

    policy, reference = policy_and_reference
    biased = copy.deepcopy(policy)
    biased.lm_head = torch.nn.Linear(policy.lm_head.in_features, policy.lm_head.out_features, bias=True)
    assert chunkable_head(biased) is None
    capped = copy.deepcopy(policy)
    capped.config.final_logit_softcapping = 30.0
    assert chunkable_head(capped) is None
    with caplog.at_level(logging.INFO, logger="adaptdpo"):
        trainer = AdaptiveDPOTrainer(model=biased, ref_model=copy.deepcopy(reference), processing_class=tokenizer,
                                     args=AdaptiveDPOConfig(output_dir=str(tmp_path), use_cpu=True,
                                                            lm_head_chunk_size=64))
    assert trainer.head_chunk is None and "plain head is used" in caplog.text
    with pytest.raises(ValueError, match="lm_head_chunk_size must be a number of positions"):
        AdaptiveDPOConfig(output_dir=str(tmp_path), lm_head_chunk_size=-1)
    plain = AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                               processing_class=tokenizer,
                               args=AdaptiveDPOConfig(output_dir=str(tmp_path / "p"), use_cpu=True,
                                                      lm_head_chunk_size=0))
    assert plain.head_chunk is None  # 0 (the command line's way to say it): the plain head


def test_under_bf16_autocast_the_chunked_head_matches_the_plain_head():
    """Under autocast the head's matmuls run in bf16 in both paths (the backward too), the softmax in float32."""
    torch.manual_seed(2)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = torch.randn(300, 32, requires_grad=True)
    labels = torch.randint(0, 300, (40,))
    results = []
    for chunked in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunked:
                scores = scores_from_hidden(hidden, weight, labels, chunk=16, stats=False, wpo=False)
            else:
                scores = scores_from_logits(torch.nn.functional.linear(hidden, weight), labels, stats=False,
                                            wpo=False)
        results.append((scores.logp, *torch.autograd.grad(scores.logp.sum(), (hidden, weight))))
    for a, b in zip(results[1], results[0], strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.02)
