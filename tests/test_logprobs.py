"""Log-probs computed on the completion window only equal the full-logits computation."""

import pytest
import torch

from adaptdpo.data.collate import PreferenceCollator
from adaptdpo.models.sequence_logps import completion_window, sequence_logps
from adaptdpo.models.token_ops import accepts_logits_to_keep


class FullLogitsOnly(torch.nn.Module):
    """The same model behind a forward without ``logits_to_keep``: the fallback path."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, use_cache=False, output_hidden_states=False):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache,
                          output_hidden_states=output_hidden_states)


def test_completion_window_matches_full_logits(models_and_examples):
    policy, _, examples, _ = models_and_examples
    batch = PreferenceCollator(0)(examples)
    shortest_prompt = min(len(e["prompt_ids"]) for e in examples)
    assert batch["logits_to_keep"] == batch["input_ids"].shape[1] - shortest_prompt + 1
    assert batch["logits_to_keep"] < batch["input_ids"].shape[1]  # the window really is smaller here
    without = {k: v for k, v in batch.items() if k != "logits_to_keep"}
    assert completion_window(without) == batch["logits_to_keep"]
    packed = PreferenceCollator(0, shared_prompt=True)(examples)
    assert packed["input_ids"].shape[1] - packed["logits_to_keep"] == shortest_prompt - 1
    assert completion_window({k: v for k, v in packed.items() if k != "logits_to_keep"}) == packed["logits_to_keep"]
    assert accepts_logits_to_keep(policy) and not accepts_logits_to_keep(FullLogitsOnly(policy))
    windowed = sequence_logps(policy, batch)
    full = sequence_logps(FullLogitsOnly(policy), batch)
    torch.testing.assert_close(windowed.logps, full.logps, atol=1e-5, rtol=1e-6)
    assert torch.equal(windowed.lengths, full.lengths)


@pytest.mark.parametrize("shared_prompt", ["off", "on"])
def test_length_grouped_batches_pad_less(hh_rows, tokenizer, policy_and_reference, tmp_path, shared_prompt):
    """train_sampling_strategy: group_by_length uses the examples' length column: less padding per epoch."""
    import copy

    from datasets import Dataset

    from adaptdpo.data.collate import pairs_in_batch
    from adaptdpo.data.tokenize import tokenize_rows
    from adaptdpo.training.config import AdaptiveDPOConfig
    from adaptdpo.training.trainer import AdaptiveDPOTrainer

    examples, _ = tokenize_rows(hh_rows[:64], tokenizer, max_length=256, max_prompt_length=128)
    assert all(e["length"] == len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"]))
               for e in examples)
    padding = {}
    for strategy in ("random", "group_by_length"):
        args = AdaptiveDPOConfig(output_dir=str(tmp_path / strategy), use_cpu=True, per_device_train_batch_size=8,
                                 train_sampling_strategy=strategy, report_to="none", shared_prompt=shared_prompt)
        policy, reference = policy_and_reference
        trainer = AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                                     train_dataset=Dataset.from_list(examples), processing_class=tokenizer)
        batches = list(trainer.get_train_dataloader())
        assert sum(pairs_in_batch(b) for b in batches) == len(examples)
        padding[strategy] = sum(int((b["attention_mask"] == 0).sum()) for b in batches)
    assert padding["group_by_length"] < 0.8 * padding["random"], padding


def _tiny(preset, attn, tokenizer):
    from adaptdpo.models.tiny import build_tiny_model, tiny_model_config

    cfg = tiny_model_config(preset, len(tokenizer), 32, 2, 4, 256, tokenizer.pad_token_id, tokenizer.eos_token_id)
    return build_tiny_model(cfg, seed=5, attn_implementation=attn)


@pytest.mark.parametrize("preset,attn", [("tiny-llama", "sdpa"), ("tiny-llama", "eager"), ("tiny-gpt2", "sdpa"),
                                         ("tiny-gpt2", "eager")])
def test_shared_prompt_forward_is_exact(models_and_examples, preset, attn):
    """Packed [prompt, chosen, rejected] rows = the stacked layout: log-probs, lengths, loss gradients."""
    from adaptdpo.methods.losses import preference_loss
    from adaptdpo.models.attention_masks import supports_shared_prompt

    _, _, examples, tokenizer = models_and_examples
    model = _tiny(preset, attn, tokenizer)
    assert supports_shared_prompt(model)
    stacked_batch = PreferenceCollator(tokenizer.pad_token_id)(examples)
    packed_batch = PreferenceCollator(tokenizer.pad_token_id, shared_prompt=True)(examples)
    assert packed_batch["input_ids"].shape[0] == len(examples)
    assert packed_batch["attention_mask"].sum() < stacked_batch["attention_mask"].sum()  # the prompt once
    results = []
    for batch in (stacked_batch, packed_batch):
        model.zero_grad()
        out = sequence_logps(model, batch)
        chosen, rejected = out.split()
        loss = preference_loss(chosen, rejected, chosen.detach() - 1.0, rejected.detach() + 0.5, 0.3).mean()
        loss.backward()
        results.append((out.logps.detach(), out.lengths, {k: p.grad.clone() for k, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=2e-5, rtol=1e-5)
    assert torch.equal(results[1][1], results[0][1])
    for key, grad in results[0][2].items():
        torch.testing.assert_close(results[1][2][key], grad, atol=2e-6, rtol=2e-4, msg=key)


def test_the_flex_attention_mask_rule_is_the_dense_branch_mask(models_and_examples):
    """FlexAttention's mask_mod, evaluated at every (row, query, key), is the dense branch mask exactly."""
    from adaptdpo.models.attention_masks import branch_attention_mask, branch_mask_mod

    _, _, examples, tokenizer = models_and_examples
    segments = PreferenceCollator(tokenizer.pad_token_id, shared_prompt=True, pad_to_multiple_of=16)(
        examples)["segment_ids"]
    assert bool((segments == 0).any())  # padded rows are part of the check
    n, length = segments.shape
    b = torch.arange(n)[:, None, None, None]
    q = torch.arange(length)[None, None, :, None]
    k = torch.arange(length)[None, None, None, :]
    dense = branch_mask_mod(segments)(b, torch.zeros(1, dtype=torch.long), q, k)
    assert torch.equal(dense, branch_attention_mask(segments, torch.float32, boolean=True))


def test_flex_attention_shared_prompt_forward_equals_the_stacked_layout(models_and_examples, monkeypatch, tmp_path):
    """A flex_attention model with the block-sparse branch mask (per-row and padding-free): the same log-probs as the
    stacked layout. Forward only: torch 2.13 has no FlexAttention backward on CPU. Run with the eager FlexAttention
    (transformers compiles it, and torch 2.13's CPU code generation fails on the padding-free mask; on the GPU the
    kernels come from Triton)."""
    import transformers.integrations.flex_attention as hf_flex
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention",
                        lambda query, key, value, training=False, **kwargs: flex_attention(query, key, value, **kwargs))
    _, _, examples, tokenizer = models_and_examples
    flex = _tiny("tiny-llama", "flex_attention", tokenizer)
    reference = _tiny("tiny-llama", "sdpa", tokenizer)  # the same seed: the same weights
    stacked = PreferenceCollator(tokenizer.pad_token_id)(examples)
    packed = PreferenceCollator(tokenizer.pad_token_id, shared_prompt=True)(examples)
    with torch.no_grad():
        expected = sequence_logps(reference, stacked, token_stats=True)
        got = sequence_logps(flex, packed, token_stats=True)
    torch.testing.assert_close(got.logps, expected.logps, atol=5e-5, rtol=1e-5)
    for a, b in zip(got.stats.values(), expected.stats.values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-5)
    # padding-free: every pair in one row, the pairs kept apart by the block mask
    free = PreferenceCollator(tokenizer.pad_token_id, shared_prompt=True, padding_free=True)(examples)
    with torch.no_grad():
        got = sequence_logps(flex, free, token_stats=True)
    torch.testing.assert_close(got.logps, expected.logps, atol=2e-4, rtol=1e-5)
    # and a flex model gets padding-free batches by default
    from adaptdpo.training.config import AdaptiveDPOConfig
    from adaptdpo.training.trainer import AdaptiveDPOTrainer

    trainer = AdaptiveDPOTrainer(model=flex, ref_model=_tiny("tiny-llama", "flex_attention", tokenizer),
                                 processing_class=tokenizer,
                                 args=AdaptiveDPOConfig(output_dir=str(tmp_path), use_cpu=True))
    assert trainer.data_collator.padding_free and trainer.data_collator.shared_prompt


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_rows_are_exact_against_the_stacked_layout(models_and_examples, attn):
    """Every pair in one row (no pad between pairs): per-pair log-probs, lengths, token statistics, WPO means,
    LD-DPO weights and every gradient equal the stacked layout's."""
    _, _, examples, tokenizer = models_and_examples
    model = _tiny("tiny-llama", attn, tokenizer)
    stacked = PreferenceCollator(tokenizer.pad_token_id)(examples)
    free = PreferenceCollator(tokenizer.pad_token_id, shared_prompt=True, padding_free=True, pad_to_multiple_of=64)(
        examples)
    assert free["input_ids"].shape[0] == 1 and int(free["attention_mask"].sum()) < int(stacked["attention_mask"].sum())
    assert int((free["document_ids"] == -1).sum()) == free["input_ids"].shape[1] - int(free["attention_mask"].sum())
    results = []
    for batch in (stacked, free):
        model.zero_grad()
        out = sequence_logps(model, batch, token_stats=True, wpo=True, ld_alpha=0.5, head_chunk=16)
        (out.logps * torch.linspace(-1, 1, out.logps.shape[0])).sum().backward()
        results.append((out, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(b.logps, a.logps, atol=2e-4, rtol=1e-5)
    assert torch.equal(b.lengths, a.lengths)
    torch.testing.assert_close(b.wpo_mean, a.wpo_mean, atol=1e-5, rtol=1e-5)
    for x, y in zip(b.stats.values(), a.stats.values(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-3, rtol=1e-5)
    for key, grad in grads_a.items():
        torch.testing.assert_close(grads_b[key], grad, atol=1e-5, rtol=1e-4, msg=key)


def test_padding_free_mask_rule_keeps_pairs_apart(models_and_examples):
    from adaptdpo.models.attention_masks import branch_attention_mask, branch_mask_mod

    _, _, examples, tokenizer = models_and_examples
    batch = PreferenceCollator(tokenizer.pad_token_id, shared_prompt=True, padding_free=True)(examples[:3])
    segments, documents = batch["segment_ids"], batch["document_ids"]
    dense = branch_attention_mask(segments, torch.float32, boolean=True, documents=documents)[0, 0]
    length = segments.shape[1]
    rule = branch_mask_mod(segments, documents)(torch.zeros(1, 1, 1, 1, dtype=torch.long), None,
                                                torch.arange(length)[None, None, :, None],
                                                torch.arange(length)[None, None, None, :])[0, 0]
    assert torch.equal(rule, dense)
    second = int(batch["pair_starts"][1])
    assert not bool(dense[second:, :second].any())  # the second pair sees nothing of the first
    assert bool(dense[second + 1, second])  # ... and sees its own prompt


def test_padding_free_in_training_and_its_refusals(models_and_examples, tmp_path):
    import copy

    from adaptdpo.training.config import AdaptiveDPOConfig
    from adaptdpo.training.trainer import AdaptiveDPOTrainer

    policy, reference, examples, tokenizer = models_and_examples
    losses = {}
    for setting in (False, True):
        trainer = AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                                     processing_class=tokenizer,
                                     args=AdaptiveDPOConfig(output_dir=str(tmp_path / str(setting)), use_cpu=True,
                                                            trace_pairs=False, padding_free=setting))
        assert trainer.data_collator.padding_free is setting
        trainer.model.train()
        batch = trainer.data_collator(examples)
        losses[setting] = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(len(examples)))
    assert losses[True].item() == pytest.approx(losses[False].item(), abs=1e-6)
    auto = AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                              processing_class=tokenizer, args=AdaptiveDPOConfig(output_dir=str(tmp_path / "a"),
                                                                                 use_cpu=True))
    assert not auto.data_collator.padding_free  # auto: only for flex_attention models
    with pytest.raises(ValueError, match="padding_free=true cannot be used: method sams"):
        AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                           processing_class=tokenizer,
                           args=AdaptiveDPOConfig(output_dir=str(tmp_path / "s"), use_cpu=True, method="sams",
                                                  padding_free=True))
