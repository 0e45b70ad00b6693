"""Top-K training (``trainable_layers``) and the frozen-prefix cache: exact against the uncached run, keyed, and
never trusted when damaged."""

import copy
import glob
import logging
import os
import threading

import pytest
import torch
from helpers import base_argv, final_params, train_in_process, train_logs, write_small_dataset


def _run(hh_rows, tokenizer, tmp_path, name, **overrides):
    tok = str(tmp_path / "tok")
    if not os.path.isdir(tok):
        tokenizer.save_pretrained(tok)
    data = write_small_dataset(str(tmp_path / "pairs.jsonl"), hh_rows, n=16)
    out = str(tmp_path / name)
    settings = {"tiny_num_layers": 4, "max_steps": 3, "trainable_layers": 2, "save_strategy": "no", **overrides}
    settings = {k: v for k, v in settings.items() if v is not None}  # None: the field's default
    train_in_process(base_argv(data, tok, out, **settings))
    return out


@pytest.mark.parametrize("layout", [{"shared_prompt": "off"}, {"shared_prompt": "on"},
                                    {"shared_prompt": "on", "padding_free": "true"}])
def test_cached_top_k_training_equals_the_uncached_run(hh_rows, tokenizer, tmp_path, layout):
    """3 steps of the top 2 of 4 blocks: the losses and the trained weights of the cached run equal the uncached
    run's (fp32, 1e-5); the frozen blocks and the embeddings are unchanged in both; the cache was written."""
    plain = _run(hh_rows, tokenizer, tmp_path, "plain", prefix_cache=False, **layout)
    cached = _run(hh_rows, tokenizer, tmp_path, "cached", prefix_cache=True, **layout)
    a, b = train_logs(plain), train_logs(cached)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-5
        assert abs(x["grad_norm"] - y["grad_norm"]) < 1e-5
    pa, pb = final_params(plain), final_params(cached)
    start = final_params(_run(hh_rows, tokenizer, tmp_path, "start", prefix_cache=False, learning_rate=0.0, **layout))
    moved = 0
    for name in pa:
        assert torch.allclose(pa[name], pb[name], atol=1e-5), name
        frozen = name.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1."))  # an untied head trains
        if frozen:
            assert torch.equal(pa[name], start[name]), f"{name} is frozen but moved"
        elif not torch.equal(pa[name], start[name]):
            moved += 1
    assert moved > 0
    assert glob.glob(os.path.join(cached, "prefix_cache", "*", "*.safetensors"))


def test_a_second_run_reads_the_cache_and_a_changed_key_misses(hh_rows, tokenizer, tmp_path):
    """A shared prefix_cache_dir: the second identical run computes nothing; another max_length (other token
    ids), another layout or another model (other frozen weights) writes new entries."""
    shared = str(tmp_path / "shared-cache")
    _run(hh_rows, tokenizer, tmp_path, "a", prefix_cache_dir=shared)
    first = set(glob.glob(os.path.join(shared, "*", "*.safetensors")))
    _run(hh_rows, tokenizer, tmp_path, "b", prefix_cache_dir=shared)
    assert set(glob.glob(os.path.join(shared, "*", "*.safetensors"))) == first
    for i, change in enumerate([{"max_length": 48}, {"shared_prompt": "off"}, {"seed": 11}]):
        before = set(glob.glob(os.path.join(shared, "*", "*.safetensors")))
        _run(hh_rows, tokenizer, tmp_path, f"c{i}", prefix_cache_dir=shared, **change)
        assert set(glob.glob(os.path.join(shared, "*", "*.safetensors"))) > before, change


def test_a_damaged_entry_is_recomputed_with_a_warning(hh_rows, tokenizer, tmp_path, caplog):
    """Cut one entry short and flip a byte of another: both are reported, recomputed, and the run's numbers are
    those of the undamaged run."""
    shared = str(tmp_path / "cache")
    good = _run(hh_rows, tokenizer, tmp_path, "good", prefix_cache_dir=shared)
    files = sorted(glob.glob(os.path.join(shared, "*", "*.safetensors")))
    with open(files[0], "r+b") as fh:
        fh.truncate(os.path.getsize(files[0]) // 2)
    with open(files[1], "r+b") as fh:
        fh.seek(-3, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-3, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with caplog.at_level(logging.WARNING, logger="adaptdpo"):
        again = _run(hh_rows, tokenizer, tmp_path, "again", prefix_cache_dir=shared)
    warned = [r.getMessage() for r in caplog.records if "prefix cache" in r.getMessage()]
    assert len(warned) == 2 and all("recomputing" in m for m in warned)
    for x, y in zip(train_logs(good), train_logs(again)):
        assert abs(x["loss"] - y["loss"]) < 1e-6


def test_two_writers_of_one_entry_leave_one_whole_file(tmp_path):
    """Concurrent writes of the same key go through a temporary file and a rename: the entry reads back whole."""
    from adaptdpo.models.prefix_cache import PrefixCache

    cache = PrefixCache.__new__(PrefixCache)
    cache.cache_dir = str(tmp_path)
    key = "ab" + "0" * 62
    states = [torch.full((64, 32), float(i)) for i in range(8)]
    threads = [threading.Thread(target=cache._write, args=(key, s)) for s in states]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    read = cache._read(key)
    assert read is not None and any(torch.equal(read, s) for s in states)
    assert not glob.glob(os.path.join(str(tmp_path), "*", "*.tmp-*"))


def test_trainable_layers_freezes_below_the_top_and_says_so(policy_and_reference):
    from adaptdpo.models.partial import freeze_below_top

    model = copy.deepcopy(policy_and_reference[0])
    summary = freeze_below_top(model, 1)
    assert summary.frozen_blocks == 1 and summary.head_tied == model.config.tie_word_embeddings
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.1.", "model.norm")) or n == "lm_head.weight"
                             for n in trainable)
    assert not any(n.startswith(("model.layers.0.", "model.embed_tokens")) for n in trainable)
    with pytest.raises(ValueError, match="trainable_layers=3: the model has 2 blocks"):
        freeze_below_top(copy.deepcopy(policy_and_reference[0]), 3)


def test_cached_reference_logps_equal_the_live_reference_and_are_read_by_a_later_run(hh_rows, tokenizer, tmp_path,
                                                                                     policy_and_reference, caplog):
    """cache_reference_logps: the run's losses equal the live reference's; a second run with the same cache folder
    computes no reference log-prob (every pair a hit), a run at another max_length adds new pairs."""
    from adaptdpo.models.pair_logps_cache import PairLogpsCache

    shared = str(tmp_path / "ref-cache")
    live = _run(hh_rows, tokenizer, tmp_path, "live", trainable_layers=None, max_steps=2)
    cached = _run(hh_rows, tokenizer, tmp_path, "cached", trainable_layers=None, max_steps=2,
                  cache_reference_logps=True, ref_cache_dir=shared)
    for x, y in zip(train_logs(live), train_logs(cached)):
        assert abs(x["loss"] - y["loss"]) < 1e-6
    files = glob.glob(os.path.join(shared, "pairs-*.jsonl"))
    lines = sum(1 for f in files for _ in open(f))
    assert lines == 8  # 2 steps x 4 pairs
    _run(hh_rows, tokenizer, tmp_path, "again", trainable_layers=None, max_steps=2, cache_reference_logps=True,
         ref_cache_dir=shared)
    assert sum(1 for f in glob.glob(os.path.join(shared, "pairs-*.jsonl")) for _ in open(f)) == 8
    _run(hh_rows, tokenizer, tmp_path, "shorter", trainable_layers=None, max_steps=2, cache_reference_logps=True,
         ref_cache_dir=shared, max_length=40)
    assert sum(1 for f in glob.glob(os.path.join(shared, "pairs-*.jsonl")) for _ in open(f)) > 8
    kept = sum(1 for f in glob.glob(os.path.join(shared, "pairs-*.jsonl")) for _ in open(f))
    with open(files[0], "a", encoding="utf-8") as fh:
        fh.write('{"key": "cut sh')  # a write cut short by a kill
    with caplog.at_level(logging.WARNING, logger="adaptdpo"):
        reread = PairLogpsCache(policy_and_reference[0], shared, "x")
    assert len(reread.values) == kept
    assert any("cut short" in r.getMessage() for r in caplog.records)


def test_lora_on_the_top_blocks_adapts_only_those(policy_and_reference):
    """trainable_layers with LoRA: peft's layers_to_transform holds the top K blocks; adapters only there."""

    from peft import LoraConfig, get_peft_model

    from adaptdpo.models.partial import lora_on_top

    base = copy.deepcopy(policy_and_reference[0])
    config = lora_on_top(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), base, 1)
    assert config.layers_to_transform == [1] and config.layers_pattern == "layers"
    adapted = {n.split(".lora_")[0] for n, _ in get_peft_model(base, config).named_parameters() if "lora_" in n}
    assert adapted and all(".layers.1." in n for n in adapted)


def test_the_model_card_says_which_blocks_were_trained(tmp_path):
    from adaptdpo.training.config import AdaptiveDPOConfig
    from adaptdpo.training.model_card import model_card

    card = model_card(AdaptiveDPOConfig(output_dir=str(tmp_path), use_cpu=True, trainable_layers=4,
                                        model_name_or_path="smollm2-135m-instruct"))
    assert "| `trainable_layers` | 4 (only the top 4 blocks" in card


def _top_trained_pair(tokenizer):
    """A 4-block tiny Llama reference and a policy whose top 2 blocks and final norm differ from it."""

    from adaptdpo.models.tiny import build_tiny_model, tiny_model_config

    cfg = tiny_model_config("tiny-llama", len(tokenizer), 32, 4, 4, 256, tokenizer.pad_token_id,
                            tokenizer.eos_token_id)
    reference = build_tiny_model(cfg, seed=3)
    policy = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if name.startswith(("model.layers.2.", "model.layers.3.", "model.norm")):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return policy, reference


def test_evaluation_with_a_shared_frozen_bottom_gives_the_same_numbers(hh_rows, tokenizer):
    """The held-out log-ratios and KL(π‖π_ref) on samples, with the policy started from the reference's input of
    block 2: equal to two full passes bit for bit; sharing is refused where the bottom differs."""
    from adaptdpo.evaluation.metrics import gold_generation_metrics, pair_logratios
    from adaptdpo.models.shared_prefix import shared_frozen_blocks

    policy, reference = _top_trained_pair(tokenizer)
    assert shared_frozen_blocks(policy, reference, 2) == 2
    assert shared_frozen_blocks(policy, reference, 1) is None  # K = 1: block 2 would be shared but differs
    assert shared_frozen_blocks(policy, reference, None) is None
    rows = hh_rows[:12]
    full = pair_logratios(policy, reference, tokenizer, rows, batch_size=5)
    shared = pair_logratios(policy, reference, tokenizer, rows, batch_size=5, frozen_blocks=2)
    assert full.abs().max() > 1e-3  # the top blocks changed something
    assert torch.equal(full, shared)
    prompts = [r["prompt"] for r in hh_rows[:6]]
    judge = lambda prompt, text: float(len(text))  # noqa: E731
    a = gold_generation_metrics(policy, reference, tokenizer, prompts, judge, seed=0, max_new_tokens=6)
    b = gold_generation_metrics(policy, reference, tokenizer, prompts, judge, seed=0, max_new_tokens=6,
                                frozen_blocks=2)
    assert a["kl"] != 0.0 and a["kl"] == b["kl"] and a["win_rate"] == b["win_rate"]
    assert a["sampling_tokens_per_s"] > 0
    # the policy's blocks skipped during the shared pass are restored afterwards
    assert all("forward" not in block.__dict__ for block in policy.model.layers)


@pytest.mark.parametrize("frozen_blocks", [None, 2])
def test_the_reference_pass_over_held_out_pairs_is_kept_per_process_and_gives_the_same_numbers(
        hh_rows, tokenizer, monkeypatch, frozen_blocks):
    """With a reference key, a second policy is judged on the same pairs without running the reference again
    (none of its blocks runs), and both log-ratios equal those of fresh passes bit for bit; other pairs miss."""
    from adaptdpo.evaluation import metrics as metrics_module
    from adaptdpo.evaluation.metrics import pair_logratios

    monkeypatch.setattr(metrics_module, "_REFERENCE_PAIR_PASSES", {})
    policy, reference = _top_trained_pair(tokenizer)
    second = copy.deepcopy(policy)
    with torch.no_grad():
        second.model.layers[3].mlp.down_proj.weight.mul_(1.5)
    calls: list[int] = []
    handle = reference.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    rows = hh_rows[:12]
    fresh = [pair_logratios(p, reference, tokenizer, rows, batch_size=5, frozen_blocks=frozen_blocks)
             for p in (policy, second)]
    assert len(calls) == 6  # 3 batches for each of 2 policies
    kept = [pair_logratios(p, reference, tokenizer, rows, batch_size=5, frozen_blocks=frozen_blocks,
                           reference_key="ref") for p in (policy, second)]
    assert len(calls) == 9  # the first keyed call ran the reference; the second did not
    assert torch.equal(fresh[0], kept[0]) and torch.equal(fresh[1], kept[1])
    assert not torch.equal(kept[0], kept[1])
    pair_logratios(policy, reference, tokenizer, hh_rows[:11], batch_size=5, frozen_blocks=frozen_blocks,
                   reference_key="ref")
    assert len(calls) == 12  # other pairs: another entry
    handle.remove()


def test_a_saved_top_k_policy_shares_its_bottom_with_the_reference_despite_checkpoint_metadata(tokenizer, tmp_path):
    """The trainer saves the policy with use_cache off and its own dtype entry: not what the blocks compute, so the
    bottom is still shared; a changed bottom weight is not."""
    from transformers import AutoModelForCausalLM

    from adaptdpo.models.shared_prefix import shared_frozen_blocks

    policy, reference = _top_trained_pair(tokenizer)
    policy.config.use_cache = False
    policy.save_pretrained(str(tmp_path / "policy"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "policy"))
    assert shared_frozen_blocks(loaded, reference, 2) == 2
    with torch.no_grad():
        loaded.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert shared_frozen_blocks(loaded, reference, 2) is None
