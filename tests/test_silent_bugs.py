"""The field's 2026 silent bugs (issue 28), each as a test that would have caught it here. Each docstring names the
public report that found it elsewhere; the behaviour is checked in every layout it can differ in."""

import copy
import os
import sys

import pytest
import torch
from helpers import ROOT, base_argv, run_command, train_in_process, write_small_dataset

from adaptdpo.data.collate import PreferenceCollator
from adaptdpo.models.sequence_logps import sequence_logps
from adaptdpo.training.config import AdaptiveDPOConfig
from adaptdpo.training.trainer import AdaptiveDPOTrainer


def trainer_for(models_and_examples, out, **settings):
    policy, reference, _, tokenizer = models_and_examples
    args = AdaptiveDPOConfig(output_dir=str(out), use_cpu=True, report_to="none", trace_pairs=False,
                             **{"beta": 0.2, **settings})
    trainer = AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                                 processing_class=tokenizer)
    trainer.model.train()
    return trainer


def test_packed_micro_batches_of_unequal_pair_counts_weight_every_pair_equally(models_and_examples, tmp_path):
    """Padding-free micro-batches holding 1 and 3 pairs under gradient accumulation 2 give the loss and gradients of
    one unpacked batch of the 4 pairs: each pair weighs 1/4, not 1/2 and 1/6 (the loss is divided by the pairs of the
    whole optimizer step). Report: modelscope/ms-swift#10144 (packed DPO micro-batches averaged, then divided by the
    accumulation steps)."""
    _, _, examples, _ = models_and_examples
    four = examples[:4]
    packed = trainer_for(models_and_examples, tmp_path / "packed", padding_free=True, gradient_accumulation_steps=2)
    assert packed.data_collator.padding_free
    micro = [packed.data_collator(four[:1]), packed.data_collator(four[1:])]
    n_items = packed._get_num_items_in_batch(micro, torch.device("cpu"))
    assert int(n_items) == 4
    total = sum(float(packed.training_step(packed.model, dict(b), n_items)) for b in micro)
    whole = trainer_for(models_and_examples, tmp_path / "whole", shared_prompt="off")
    assert not whole.data_collator.shared_prompt
    expected = float(whole.training_step(whole.model, whole.data_collator(four), torch.tensor(4)))
    assert total == pytest.approx(expected, abs=1e-5)  # the layouts' float reassociation: ~4e-6
    for (name, a), (_, b) in zip(packed.model.named_parameters(), whole.model.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    # what the bug computes (each micro-batch's mean, halved) differs: the test would have caught it
    means = [packed.compute_loss(packed.model, dict(b), num_items_in_batch=None).item() / 2 for b in micro]
    assert abs(sum(means) - expected) > 1e-3


LAYOUTS = {"stacked": {}, "shared_prompt": {"shared_prompt": True},
           "padding_free": {"shared_prompt": True, "padding_free": True}}


@pytest.mark.parametrize("head_chunk", [None, 2], ids=["plain-head", "chunked-head"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_pair_differing_only_at_its_first_completion_token_has_a_margin_and_a_gradient(models_and_examples,
                                                                                          layout, head_chunk):
    """Completions of one token each ([a] against [b]) after the same prompt: the log-probs are exactly log p(a|prompt)
    and log p(b|prompt), so the margin and its gradient are non-zero; a scorer that left out each completion's first
    token (its label sits at the last prompt position) gives 0 and no gradient. In every layout, plain and chunked
    head. Report: jingyaogong/minimind#621 (DPO loss mask excluded the first assistant token)."""
    policy, _, examples, tokenizer = models_and_examples
    model = copy.deepcopy(policy)
    prompt = examples[0]["prompt_ids"]
    pairs = [{"prompt_ids": prompt, "chosen_ids": [a], "rejected_ids": [b]} for a, b in ((5, 9), (17, 3))]
    pairs.append(examples[1])  # a longer pair beside them, so that padding and packing do something
    batch = PreferenceCollator(tokenizer.pad_token_id, **LAYOUTS[layout])(pairs)
    out = sequence_logps(model, batch, head_chunk=head_chunk)
    chosen, rejected = out.split()
    with torch.no_grad():
        last = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].float(), dim=-1)
    for i, (a, b) in enumerate(((5, 9), (17, 3))):
        assert chosen[i].item() == pytest.approx(last[a].item(), abs=1e-4)
        assert rejected[i].item() == pytest.approx(last[b].item(), abs=1e-4)
    assert torch.equal(out.lengths[:2], torch.tensor([1, 1])) and torch.equal(out.lengths[3:5], torch.tensor([1, 1]))
    margin = (chosen[:2] - rejected[:2]).sum()
    assert abs(margin.item()) > 1e-3
    margin.backward()
    assert sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None) > 0


@pytest.mark.two_processes
@pytest.mark.slow
def test_fsdp2_with_mixed_precision_keeps_parameters_and_optimizer_state_in_float32(tmp_path):
    """2 gloo processes, FSDP2 prepared as the trainer's accelerate does (fsdp2_prepare_model) with bf16 mixed
    precision: the sharded parameters, their gradients and the AdamW state are float32 after prepare and after a step,
    for a policy loaded in float32 and one loaded in bfloat16; only the compute runs in bf16. Reports:
    huggingface/accelerate#3985 (cast the model to the bf16 param_dtype before fully_shard, so master weights and
    optimizer state became bf16) and Lightning-AI/pytorch-lightning#21586 (FSDP mixed precision initialised the
    parameters in bf16)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               os.path.join(ROOT, "tests", "fsdp_mixed_precision_probe.py"), str(tmp_path)]
    done = run_command(command, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        for loaded in ("torch.float32", "torch.bfloat16"):
            got = result[loaded]
            for key in ("params", "after_step", "grads", "optimizer_state"):
                assert got[key] == {"torch.float32"}, (rank, loaded, key, got[key])
            assert got["compute"] == {"torch.bfloat16"}


@pytest.fixture(scope="module")
def small(hh_rows, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("silent")
    tokenizer.save_pretrained(str(root / "tok"))
    return write_small_dataset(str(root / "pairs.jsonl"), hh_rows, n=24), str(root / "tok")


@pytest.fixture(scope="module")
def checkpointed(small, tmp_path_factory):
    """A run stopped after step 3 with a complete checkpoint at step 2 (the resume tests copy it)."""
    from test_reliability import crashed_run

    data, tok = small
    out = str(tmp_path_factory.mktemp("checkpointed") / "run")
    argv = base_argv(data, tok, out, max_steps=4, save_strategy="steps", save_steps=2, plots=False)
    crashed_run(argv, 3)
    return out


CHANGES = {"loss": {"loss_type": "ipo"}, "beta": {"beta": 0.5}, "method": {"method": "beta_dpo"},
           "selection": {"method": "sams", "sams_selection": "random", "sams_ratio": 0.25}}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_resumed_run_refuses_a_changed_loss_beta_method_or_selection(small, checkpointed, models_and_examples,
                                                                       change, tmp_path):
    """Resuming a checkpoint with another loss, β, method or selection setting is refused, naming the field, by the
    command line (against the recorded config.yaml) and by the Python trainer (against the checkpoint's
    training_args.bin), before anything is loaded; accept_config_change continues. Report: unslothai/unsloth-zoo#1164
    (a resume with another loss_type, loss_weights or discopop_tau silently continued the Adam moments under another
    loss)."""
    import shutil

    from datasets import Dataset

    from adaptdpo.training.config_io import parse_config
    from adaptdpo.training.job import ConfigChangedError

    data, tok = small
    out = str(tmp_path / "run")
    shutil.copytree(checkpointed, out)
    argv = base_argv(data, tok, out, max_steps=4, save_strategy="steps", save_steps=2, plots=False, **CHANGES[change])
    first = next(iter(CHANGES[change]))
    with pytest.raises(ConfigChangedError, match=rf"changed: .*{first}: "):
        train_in_process(argv)
    policy, reference, examples, tokenizer = models_and_examples
    trainer = AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                                 args=parse_config(argv), processing_class=tokenizer,
                                 train_dataset=Dataset.from_list(examples))
    with pytest.raises(ValueError, match=rf"checkpoint-2 was trained with another objective: .*{first}: "):
        trainer.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    if change == "method":  # accepted, it continues (the new method's own state starts afresh)
        summary = train_in_process([*argv, "--accept_config_change", "true"])
        assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 4


def test_the_reference_cache_never_gives_a_row_another_rows_values(models_and_examples, tmp_path):
    """Precomputed reference log-probs shared by trainers (one ref_cache_dir) over a subset, a shuffle, another seed's
    reference weights and another max_length (with keep_end too, where the collator cuts rows whose stored ids stay
    the same): every row's cached values equal its own reference log-probs computed afresh; each variant makes its
    own cache entry and the same data again reads its entry. Report: allenai/open-instruct#1868 (a shuffled subset's
    cache was scattered by stale row indices; the seed was not in the cache key)."""
    from datasets import Dataset

    from adaptdpo.models.tiny import build_tiny_model

    policy, reference, examples, tokenizer = models_and_examples
    other_seed = build_tiny_model(reference.config, seed=3)
    data = Dataset.from_list(examples)
    cache = str(tmp_path / "ref_cache")
    variants = {"base": (data, reference, {}), "again": (data, reference, {}),
                "subset": (data.select([5, 1, 6]), reference, {}), "shuffled": (data.shuffle(seed=0), reference, {}),
                "seed": (data, other_seed, {}), "keep_end-40": (data, reference, {"truncation_mode": "keep_end",
                                                                                     "max_length": 40}),
                "keep_end-60": (data, reference, {"truncation_mode": "keep_end", "max_length": 60})}
    for name, (dataset, ref, settings) in variants.items():
        args = AdaptiveDPOConfig(output_dir=str(tmp_path / name), use_cpu=True, report_to="none",
                                 precompute_ref_log_probs=True, ref_cache_dir=cache, **settings)
        trainer = AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args,
                                     processing_class=tokenizer, train_dataset=dataset)
        rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
        collate = PreferenceCollator(tokenizer.pad_token_id,
                                     keep_end_max_length=settings.get("max_length") if settings else None)
        with torch.no_grad():
            chosen, rejected = sequence_logps(ref, collate(rows)).split()
        torch.testing.assert_close(torch.tensor([r["ref_chosen_logps"] for r in rows]), chosen, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor([r["ref_rejected_logps"] for r in rows]), rejected, atol=1e-4, rtol=0)
    assert len(os.listdir(cache)) == len(variants) - 1  # "again" read the base entry


def test_reference_log_probs_for_a_new_eval_set_after_training_without_a_reference_are_refused(models_and_examples,
                                                                                              tmp_path):
    """precompute_ref_log_probs, no ref_model, full fine-tuning: after training the reference is gone, so
    evaluate(eval_dataset=new) raises instead of scoring the new set with the trained policy as its reference (which
    gives rewards of 0); before training it computes them (the policy still is the reference), and eval sets given at
    construction keep theirs. Report: huggingface/trl#6443 (TRL raised the same error, gated on global_step > 0)."""
    from datasets import Dataset

    policy, _, examples, tokenizer = models_and_examples
    args = AdaptiveDPOConfig(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none",
                             precompute_ref_log_probs=True, per_device_train_batch_size=4, max_steps=2,
                             learning_rate=1e-2, save_strategy="no",
                             ref_cache_dir=str(tmp_path / "cache"))
    trainer = AdaptiveDPOTrainer(model=copy.deepcopy(policy), args=args, processing_class=tokenizer,
                                 train_dataset=Dataset.from_list(examples[:4]),
                                 eval_dataset=Dataset.from_list(examples[4:6]))
    assert trainer.ref_model is None and not trainer.peft_reference
    before = trainer.evaluate(eval_dataset=Dataset.from_list(examples[6:]))
    assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy = reference before training
    trainer.train()
    assert trainer.evaluate()["eval_rewards/margins"] != pytest.approx(0.0, abs=1e-6)  # the set given at the start
    with pytest.raises(ValueError, match=r"evaluate\(eval_dataset=\.\.\.\) after training with "
                                         r"precompute_ref_log_probs and no reference model"):
        trainer.evaluate(eval_dataset=Dataset.from_list(examples[6:]))
