"""SamS inside the trainer (mask mode): ratio 1 is DPO; otherwise DPO on the selected pairs alone."""

import json

import pytest
import torch
from helpers import loss_and_grads, make_trainer

from adaptdpo.data.collate import PreferenceCollator
from adaptdpo.training.trainer import StepPairs


def test_ratio_one_is_exactly_dpo(models_and_examples, tmp_path):
    batch = PreferenceCollator(0)(models_and_examples[2])
    dpo = loss_and_grads(make_trainer(models_and_examples, tmp_path / "a"), batch, 8)
    sams = loss_and_grads(make_trainer(models_and_examples, tmp_path / "b", method="sams", sams_ratio=1.0), batch, 8)
    assert dpo[0] == sams[0]
    for key in dpo[1]:
        assert torch.equal(dpo[1][key], sams[1][key]), key


def test_update_is_dpo_on_the_selected_pairs(models_and_examples, tmp_path):
    _, _, examples, _ = models_and_examples
    trainer = make_trainer(models_and_examples, tmp_path / "s", method="sams", sams_warmup_rounds=1, sams_ratio=0.5)
    for shift in (3, 5):  # two earlier rounds: the scheduler has been fitted once before scoring
        rolled = examples[shift:] + examples[:shift]
        trainer.compute_loss(trainer.model, dict(PreferenceCollator(0)(rolled)), num_items_in_batch=torch.tensor(4))
    loss, grads = loss_and_grads(trainer, PreferenceCollator(0)(examples), 4)
    trainer.flush_trace()
    last = [json.loads(line) for line in open(tmp_path / "s" / "pairs.jsonl", encoding="utf-8")][-1]
    selected = [i for i, t in enumerate(last["trained"]) if t]
    assert len(selected) == 4
    reference = make_trainer(models_and_examples, tmp_path / "d")
    ref_loss, ref_grads = loss_and_grads(reference, PreferenceCollator(0)([examples[i] for i in selected]), 4)
    assert loss == pytest.approx(ref_loss, abs=1e-6)
    for key in grads:
        torch.testing.assert_close(grads[key], ref_grads[key], atol=1e-6, rtol=1e-4, msg=key)
    metrics = trainer._metrics["train"]
    assert {"sams/selected_fraction", "sams/batch_reward", "sams/exploit_loss", "sams/selected_margin",
            "sams/unselected_margin"} <= set(metrics)


def _rounds(trainer, examples, shifts=(3, 5)):
    """Earlier scheduling rounds on rolled copies of the batch, so the scheduler has been fitted once."""
    for shift in shifts:
        rolled = examples[shift:] + examples[:shift]
        trainer.compute_loss(trainer.model, dict(PreferenceCollator(0)(rolled)), num_items_in_batch=torch.tensor(4))
        trainer.model.zero_grad()


def _last_trace(run_dir):
    return [json.loads(line) for line in open(run_dir / "pairs.jsonl", encoding="utf-8")][-1]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "kto_pair"])
def test_subset_mode_gives_the_mask_mode_update(models_and_examples, tmp_path, loss_type):
    """subset: no-grad forward on all 8 pairs, then forward+backward on the 4 selected ones = mask mode."""
    _, _, examples, _ = models_and_examples
    results = {}
    for mode in ("mask", "subset"):
        trainer = make_trainer(models_and_examples, tmp_path / mode, method="sams", sams_warmup_rounds=1,
                               sams_mode=mode, loss_type=loss_type)
        _rounds(trainer, examples)
        results[mode] = loss_and_grads(trainer, PreferenceCollator(0)(examples), 4)
        trainer.flush_trace()
        results[mode + "_trace"] = _last_trace(tmp_path / mode)
    assert results["mask_trace"]["trained"] == results["subset_trace"]["trained"]
    assert sum(results["mask_trace"]["trained"]) == 4
    assert results["subset"][0] == pytest.approx(results["mask"][0], abs=1e-6)
    for key, grad in results["mask"][1].items():
        torch.testing.assert_close(results["subset"][1][key], grad, atol=1e-6, rtol=1e-4, msg=key)


def test_subset_mode_rank_without_selected_pairs_still_joins_backward(models_and_examples, tmp_path):
    """A rank whose pairs were all left out runs one pair with weight 0: a zero loss with a graph, zero gradient."""
    trainer = make_trainer(models_and_examples, tmp_path / "z", method="sams", sams_mode="subset")
    batch = dict(PreferenceCollator(0)(models_and_examples[2][:2]))
    pairs = StepPairs(*[torch.zeros(2, requires_grad=False) for _ in range(6)])
    pairs, _, weights, aux = trainer._subset_forward(trainer.model, batch, pairs, torch.tensor(0.2),
                                                   torch.zeros(2, dtype=torch.bool))
    assert pairs.chosen.shape == (1,) and pairs.chosen.requires_grad and weights.tolist() == [False] and aux is None
    assert pairs.ref_chosen.shape == (1,) and pairs.pair_weight is None


def test_beta_dpo_plus_sams_trains_on_the_selected_then_kept_pairs(models_and_examples, tmp_path):
    """SamS picks 4 of 8; β-DPO keeps 2 of those 4 at β_batch: the update is DPO on those 2 at that β."""
    _, _, examples, _ = models_and_examples
    trainer = make_trainer(models_and_examples, tmp_path / "c", method="beta_dpo+sams", sams_warmup_rounds=1,
                           beta_dpo_alpha=5.0, beta_dpo_keep_ratio=0.5, sams_mode="subset")
    _rounds(trainer, examples)
    loss, grads = loss_and_grads(trainer, PreferenceCollator(0)(examples), 2)
    trainer.flush_trace()
    last = _last_trace(tmp_path / "c")
    kept = [i for i, t in enumerate(last["trained"]) if t]
    assert len(kept) == 2 and last["beta"] != 0.2
    assert {"beta/batch", "sams/selected_fraction", "filter/kept_fraction"} <= set(trainer._metrics["train"])
    reference = make_trainer(models_and_examples, tmp_path / "d", beta=last["beta"])
    ref_loss, ref_grads = loss_and_grads(reference, PreferenceCollator(0)([examples[i] for i in kept]), 2)
    assert loss == pytest.approx(ref_loss, abs=1e-6)
    for key in grads:
        torch.testing.assert_close(grads[key], ref_grads[key], atol=1e-6, rtol=1e-4, msg=key)


def test_beta_dpo_plus_sams_calibrates_beta_on_the_selected_pairs_only():
    """The combined policy's β and keep mask = a β-DPO controller fed the selected pairs' margins alone."""
    from adaptdpo.methods.beta_dpo import BetaDPO
    from adaptdpo.methods.policies import BetaDPOPolicy, BetaSamsPolicy
    from adaptdpo.methods.step_policy import PairView

    class FixedSelection:
        mode, broadcast = "mask", None

        def select(self, view):
            return torch.tensor([True, False, True, True, False, True]), {}

        def num_trained(self, n):
            return 4

    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(6, generator=g), torch.randn(6, generator=g)
    view = PairView(chosen, rejected, chosen - 5, rejected - 5, 0.1)
    combined = BetaSamsPolicy(FixedSelection(), BetaDPOPolicy(BetaDPO(0.1, alpha=2.0, keep_ratio=0.5, seed=4)))
    plan = combined.plan(view)
    alone = BetaDPO(0.1, alpha=2.0, keep_ratio=0.5, seed=4)
    index = torch.tensor([0, 2, 3, 5])
    beta, keep = alone.step(chosen[index], rejected[index])
    assert torch.equal(plan.beta, beta)
    assert plan.train_mask.nonzero().squeeze(1).tolist() == index[keep].tolist()
    assert combined.num_trained(6) == 2


def test_contexts_from_the_reference_forward(models_and_examples, tmp_path):
    """sams_context_source=reference: the scheduler sees the reference model's pooled hidden states."""
    from adaptdpo.methods.sams.contexts import layer_contexts

    policy, reference, examples, _ = models_and_examples
    batch = dict(PreferenceCollator(0)(examples))
    seen = {}
    for source in ("policy", "reference"):
        trainer = make_trainer(models_and_examples, tmp_path / source, method="sams", sams_context_source=source)
        plan = trainer.step_policy.plan
        trainer.step_policy.plan = lambda view, plan=plan, source=source: seen.setdefault(
            source, view.extras["contexts"]) is not None and plan(view)
        trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(4))
    with torch.no_grad():
        for source, model in (("policy", policy), ("reference", reference)):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
            torch.testing.assert_close(seen[source], layer_contexts(out.hidden_states, batch["attention_mask"]))
    assert not torch.allclose(seen["policy"], seen["reference"])


def test_a_local_bert_checkpoint_as_the_layer_encoder(models_and_examples, tmp_path):
    """sams_encoder_path: a saved BERT-style encoder runs over the layer tokens; frozen on request."""
    from transformers import BertConfig, BertModel

    path = str(tmp_path / "minilm")
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         vocab_size=30, max_position_embeddings=16)).save_pretrained(path)
    _, _, examples, _ = models_and_examples
    trainer = make_trainer(models_and_examples, tmp_path / "s", method="sams", sams_warmup_rounds=1,
                           sams_encoder_path=path, sams_freeze_encoder="freeze")
    _rounds(trainer, examples, shifts=(0,))
    scheduler = trainer.step_policy.scheduler
    assert isinstance(scheduler.encoder.encoder, BertModel) and scheduler.size.encoder_dim == 32
    before = {k: v.clone() for k, v in scheduler.encoder.state_dict().items()}
    _rounds(trainer, examples, shifts=(3, 5))
    after = scheduler.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("connector."))
    with pytest.raises(FileNotFoundError, match="sams_encoder_path"):
        bad = make_trainer(models_and_examples, tmp_path / "b", method="sams", sams_encoder_path=str(tmp_path / "x"))
        _rounds(bad, examples, shifts=(0,))


def test_scheduler_pretraining_then_dpo_warm_start(hh_rows, tokenizer, tmp_path):
    """`adaptdpo sft` (App. F.3): SFT on the chosen responses trains the scheduler and writes it; a DPO run
    with sams_scheduler_init starts from those networks with the encoder frozen; the `frozen` regime leaves
    the policy exactly as it was."""
    from helpers import base_argv, final_params, train_in_process, train_logs, write_small_dataset

    from adaptdpo.cli import main
    from adaptdpo.methods.registry import build_step_policy
    from adaptdpo.training.config_io import parse_config

    tokenizer.save_pretrained(str(tmp_path / "tok"))
    data = write_small_dataset(str(tmp_path / "pairs.jsonl"), hh_rows, n=24)
    sft = tmp_path / "sft"
    assert main(["sft", *base_argv(data, str(tmp_path / "tok"), str(sft), max_steps=4)]) == 0
    logs = train_logs(str(sft))
    assert len(logs) == 4 and all("sams/exploit_loss" in r for r in logs[1:]) and "sft/nll" in logs[0]
    assert logs[-1]["sft/nll"] < logs[0]["sft/nll"]  # the policy learned its chosen responses
    saved = torch.load(sft / "sams_scheduler.pt", weights_only=True)

    config = parse_config(base_argv(data, str(tmp_path / "tok"), str(tmp_path / "dpo"), method="sams",
                                    sams_scheduler_init=str(sft / "sams_scheduler.pt")))
    policy = build_step_policy(config)
    contexts = torch.zeros(4, saved["num_layers"], saved["context_dim"])
    scheduler = policy._ensure_scheduler(contexts)
    assert scheduler.freeze_encoder and all(torch.equal(v, saved["exploit"][k])
                                            for k, v in scheduler.exploit.state_dict().items())
    wrong = torch.zeros(4, saved["num_layers"] + 1, saved["context_dim"])
    with pytest.raises(ValueError, match="does not fit this run"):
        build_step_policy(config)._ensure_scheduler(wrong)

    frozen = tmp_path / "frozen"
    train_in_process(base_argv(data, str(tmp_path / "tok"), str(frozen), max_steps=3, sams_pretrain="frozen"))
    untrained = tmp_path / "untrained"
    train_in_process(base_argv(data, str(tmp_path / "tok"), str(untrained), max_steps=1, learning_rate=0.0))
    a, b = final_params(str(frozen)), final_params(str(untrained))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (frozen / "sams_scheduler.pt").exists()


@pytest.mark.parametrize("mode", ["mask", "subset"])
def test_shared_prompt_batch_gives_the_same_sams_step(models_and_examples, tmp_path, mode):
    """The packed layout (prompt encoded once) gives SamS the same contexts, selection, loss and gradients."""
    _, _, examples, _ = models_and_examples
    results = {}
    for layout in ("stacked", "packed"):
        trainer = make_trainer(models_and_examples, tmp_path / layout, method="sams", sams_warmup_rounds=1,
                               sams_mode=mode)
        collate = PreferenceCollator(0, shared_prompt=layout == "packed")
        for shift in (3, 5):
            rolled = examples[shift:] + examples[:shift]
            trainer.compute_loss(trainer.model, dict(collate(rolled)), num_items_in_batch=torch.tensor(4))
            trainer.model.zero_grad()
        results[layout] = loss_and_grads(trainer, collate(examples), 4)
        trainer.flush_trace()
        results[layout + "_trace"] = _last_trace(tmp_path / layout)
    assert results["packed_trace"]["trained"] == results["stacked_trace"]["trained"]
    assert results["packed"][0] == pytest.approx(results["stacked"][0], abs=1e-5)
    for key, grad in results["stacked"][1].items():
        torch.testing.assert_close(results["packed"][1][key], grad, atol=2e-6, rtol=2e-4, msg=key)
