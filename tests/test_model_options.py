"""TRL's model-side options: a mixture-of-experts model's router loss (equal to TRL's), activation offloading
(the same trajectory), LoRA variants (DoRA, rsLoRA, modules_to_save) and QLoRA (4-bit base), ``--accelerate_config``."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from helpers import base_argv, final_params, run_cli, train_in_process, train_logs, write_small_dataset

from adaptdpo.training.config import AdaptiveDPOConfig
from adaptdpo.training.config_io import ConfigError, parse_config
from adaptdpo.training.trainer import AdaptiveDPOTrainer


@pytest.fixture(scope="module")
def small(hh_rows, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    tokenizer.save_pretrained(str(root / "tok"))
    return write_small_dataset(str(root / "pairs.jsonl"), hh_rows, 24), str(root / "tok")


@pytest.fixture(scope="module")
def moe_setup(hh_rows, tokenizer):
    from transformers import MixtralConfig, MixtralForCausalLM

    from adaptdpo.data.collate import PreferenceCollator
    from adaptdpo.data.tokenize import tokenize_rows

    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                           router_aux_loss_coef=0.02, pad_token_id=tokenizer.pad_token_id,
                           attn_implementation="eager")
    torch.manual_seed(5)
    policy = MixtralForCausalLM(config)
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs from the policy, so the rewards are not zero
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    examples, _ = tokenize_rows(hh_rows[:6], tokenizer, max_length=64, max_prompt_length=32)
    batch = PreferenceCollator(tokenizer.pad_token_id)(examples)
    batch.pop("pair_id")
    return policy, reference, batch, tokenizer


@pytest.mark.parametrize("coef", [None, 0.5], ids=["model-config", "set"])
def test_mixture_of_experts_router_loss_matches_trl(moe_setup, coef, tmp_path):
    """TRL adds coef × the router's load-balancing loss: the same loss, aux_loss metric and gradients (router weights
    included) on the same batch, with the model config's coefficient (0.02) or router_aux_loss_coef."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy, reference, batch, tokenizer = moe_setup
    text = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    theirs = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), train_dataset=text,
                        processing_class=tokenizer,
                        args=DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", bf16=False, use_cpu=True,
                                       gradient_checkpointing=False, max_length=None, beta=0.2,
                                       router_aux_loss_coef=coef))
    theirs.model.train()
    expected = theirs._compute_loss(theirs.model, dict(batch), False)
    expected.backward()
    ours = AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                              processing_class=tokenizer,
                              args=AdaptiveDPOConfig(output_dir=str(tmp_path / "o"), use_cpu=True, beta=0.2,
                                                     trace_pairs=False, router_aux_loss_coef=coef))
    assert ours.router_aux_loss_coef == (0.02 if coef is None else coef)
    assert not ours.data_collator.shared_prompt  # the router's statistics read the stacked padding mask
    ours.model.train()
    loss = ours.compute_loss(ours.model, dict(batch), num_items_in_batch=torch.tensor(6))
    loss.backward()
    aux = float(ours._metrics["train"]["aux_loss"][-1])
    assert aux == pytest.approx(float(theirs._metrics["train"]["aux_loss"][-1]), rel=1e-5)
    assert aux > 1.0  # top-2 of 4 experts: the balanced value is 2, a real load statistic
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6, rel=1e-5)
    for (name, a), (_, b) in zip(ours.model.named_parameters(), theirs.model.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=name)
    router = next(p for n, p in ours.model.named_parameters() if "gate" in n and "experts" not in n)
    assert router.grad.abs().sum() > 0
    # accumulation: the router term is per micro-batch, divided by the micro-batches of the step (as TRL's mean loss)
    ours.current_gradient_accumulation_steps = 2
    halved = ours.compute_loss(ours.model, dict(batch), num_items_in_batch=torch.tensor(6))
    assert loss.item() - halved.item() == pytest.approx(ours.router_aux_loss_coef * aux / 2, rel=1e-4)


def test_router_loss_settings_are_checked(moe_setup, policy_and_reference, tokenizer, tmp_path):
    policy, reference, _, _ = moe_setup
    dense, _ = policy_and_reference
    with pytest.raises(ValueError, match="not a mixture-of-experts model"):
        AdaptiveDPOTrainer(model=copy.deepcopy(dense), ref_model=copy.deepcopy(dense), processing_class=tokenizer,
                           args=AdaptiveDPOConfig(output_dir=str(tmp_path / "d"), use_cpu=True,
                                                  router_aux_loss_coef=0.1))
    with pytest.raises(ValueError, match="shared_prompt=on cannot be used"):
        AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), processing_class=tokenizer,
                           args=AdaptiveDPOConfig(output_dir=str(tmp_path / "m"), use_cpu=True, shared_prompt="on"))
    off = AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                             processing_class=tokenizer,
                             args=AdaptiveDPOConfig(output_dir=str(tmp_path / "z"), use_cpu=True,
                                                    router_aux_loss_coef=0.0))
    assert off.router_aux_loss_coef == 0.0 and off.data_collator.shared_prompt  # 0 turns it off, as in TRL


def test_activation_offloading_keeps_the_trajectory(small, tmp_path):
    """Activations saved for backward parked in CPU memory: the same losses and final weights, bit for bit."""
    data, tok = small
    runs = {}
    for flag in (False, True):
        out = str(tmp_path / f"offload-{flag}")
        train_in_process(base_argv(data, tok, out, max_steps=3, activation_offloading=flag))
        runs[flag] = ([r["loss"] for r in train_logs(out)], final_params(out))
    assert runs[True][0] == runs[False][0] and len(runs[True][0]) == 3
    for name, value in runs[False][1].items():
        assert torch.equal(runs[True][1][name], value), name


def test_lora_variants_reach_peft(small, tmp_path):
    """TRL's LoRA flags: DoRA, rsLoRA, modules_to_save, task type; the saved adapter says so and trains."""
    data, tok = small
    out = str(tmp_path / "dora")
    summary = train_in_process(base_argv(data, tok, out, max_steps=2, use_peft=True, lora_r=4, lora_alpha=8,
                                         use_dora=True, use_rslora=True, lora_target_modules="q_proj",
                                         lora_modules_to_save="lm_head", learning_rate=1e-2))
    with open(os.path.join(out, "adapter_config.json"), encoding="utf-8") as fh:
        saved = json.load(fh)
    assert (saved["use_dora"], saved["use_rslora"], saved["modules_to_save"], saved["target_modules"],
            saved["task_type"]) == (True, True, ["lm_head"], ["q_proj"], "CAUSAL_LM")
    assert summary["global_step"] == 2
    config = parse_config(["--use_peft", "true", "--lora_target_modules", "all-linear"]).lora_config()
    assert config.target_modules == "all-linear"  # one name is peft's keyword, as TRL passes it


def test_qlora_trains_an_adapter_on_a_4bit_base(small, tokenizer, tmp_path):
    """--load_in_4bit --use_peft: the base is bitsandbytes 4-bit (frozen), the fp32 adapter learns; the first loss is
    ln 2 (the adapter starts at zero, so the policy is the reference)."""
    pytest.importorskip("bitsandbytes")
    from adaptdpo.models.tiny import build_tiny_model, tiny_model_config

    data, tok = small
    folder = str(tmp_path / "base")
    build_tiny_model(tiny_model_config("tiny-llama", len(tokenizer), 64, 2, 4, 256, tokenizer.pad_token_id,
                                       tokenizer.eos_token_id), seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = str(tmp_path / "qlora")
    argv = base_argv(data, tok, out, max_steps=3, use_peft=True, lora_r=4, lora_alpha=8, learning_rate=1e-2,
                     model_name_or_path=folder, load_in_4bit=True, trace_pairs=False)
    config = parse_config(argv)
    quant = config.from_pretrained_kwargs()["quantization_config"]
    assert (quant.load_in_4bit, quant.bnb_4bit_quant_type, quant.bnb_4bit_compute_dtype) == (True, "nf4",
                                                                                             torch.float32)
    train_in_process(argv)
    losses = [r["loss"] for r in train_logs(out)]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5) and len(losses) == 3
    from safetensors.torch import load_file

    adapter = load_file(os.path.join(out, "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.dtype == torch.float32 for v in lora_b) and any(v.abs().sum() > 0 for v in lora_b)
    with pytest.raises(ValueError, match="set use_peft true"):
        train_in_process(base_argv(data, tok, str(tmp_path / "x"), model_name_or_path=folder, load_in_4bit=True))
    with pytest.raises(ValueError, match="choose one"):
        parse_config(["--load_in_4bit", "true", "--load_in_8bit", "true"])


def test_accelerate_config_names_and_launch_command():
    from adaptdpo.cli import accelerate_launch_command

    command = accelerate_launch_command(["c.yaml", "--accelerate_config", "zero3", "--num_processes", "4", "--beta",
                                         "0.2"])
    assert command[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    assert command[4].endswith(os.path.join("accelerate_configs", "zero3.yaml")) and os.path.isfile(command[4])
    assert command[5:] == ["--num_processes", "4", "-m", "adaptdpo.cli", "train", "c.yaml", "--beta", "0.2"]
    assert accelerate_launch_command(["--beta", "0.2"]) is None
    for name in ("single_gpu", "multi_gpu", "ddp", "zero1", "zero2", "fsdp2", "cpu-2proc"):
        assert os.path.isfile(accelerate_launch_command(["--accelerate_config", name])[4]), name
    with pytest.raises(ConfigError, match=r"not a shipped config .cpu-2proc, fsdp2"):
        accelerate_launch_command(["--accelerate_config", "zero9"])
    with pytest.raises(ConfigError, match="use it with --accelerate_config"):
        accelerate_launch_command(["--num_processes", "2"])


@pytest.mark.two_processes
@pytest.mark.slow  # two processes
def test_accelerate_config_runs_two_processes(small, tmp_path):
    """`adaptdpo train ... --accelerate_config cpu-2proc`: two gloo processes, each with half of the batch."""
    data, tok = small
    out = str(tmp_path / "two")
    done = run_cli([*base_argv(data, tok, out, max_steps=2, per_device_train_batch_size=2),
                    "--accelerate_config", "cpu-2proc"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world_size=2" in done.stderr
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as fh:
        assert json.load(fh)["global_step"] == 2


def test_ignore_bias_buffers_leaves_boolean_buffers_out_of_ddp(policy_and_reference, tokenizer, tmp_path):
    """TRL's --ignore_bias_buffers: boolean buffers (e.g. causal-mask 'bias' buffers) are listed for DDP to skip."""
    policy, reference = policy_and_reference
    model = copy.deepcopy(policy)
    model.model.layers[0].self_attn.register_buffer("bias", torch.ones(4, 4, dtype=torch.bool).tril())
    trainer = AdaptiveDPOTrainer(model=model, ref_model=copy.deepcopy(reference), processing_class=tokenizer,
                                 args=AdaptiveDPOConfig(output_dir=str(tmp_path), use_cpu=True,
                                                        ignore_bias_buffers=True))
    assert trainer.model._ddp_params_and_buffers_to_ignore == ["model.layers.0.self_attn.bias"]


def test_checkpointing_is_on_by_default_as_trl_and_may_change_on_resume():
    from adaptdpo.training.run_dir import config_changes

    default = parse_config([])
    assert default.gradient_checkpointing is True and default.activation_checkpointing is True  # TRL's default
    assert parse_config(["--gradient_checkpointing", "false"]).activation_checkpointing is False  # TRL's name
    assert parse_config(["--activation_checkpointing", "false"]).gradient_checkpointing is False
    # memory/speed-only settings: a run stopped for memory resumes with them switched; a real change is still seen
    old = {"gradient_checkpointing": False, "activation_checkpointing": False, "activation_offloading": False,
           "beta": 0.1}
    new = {"gradient_checkpointing": True, "activation_checkpointing": True, "activation_offloading": True,
           "beta": 0.2}
    assert config_changes(old, new) == {"beta": (0.1, 0.2)}


def test_a_model_is_quantised_by_one_setting_only(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    config = parse_config(["--load_in_8bit", "true", "--use_peft", "true"])
    assert config.from_pretrained_kwargs()["quantization_config"].load_in_8bit
    with pytest.raises(ValueError, match="quantised twice: by load_in_4bit/load_in_8bit and by the trainer's"):
        config.from_pretrained_kwargs(BitsAndBytesConfig(load_in_4bit=True))
    plain = parse_config([])
    assert plain.from_pretrained_kwargs(BitsAndBytesConfig(load_in_4bit=True))["quantization_config"].load_in_4bit


@pytest.mark.slow  # compiling takes about 40 s
def test_torch_compile_trains_the_same_steps(small, tmp_path):
    """TrainingArguments' torch_compile compiles the policy; our loss path (custom masks, the chunked head's
    capture of the head's input) runs under it with the same losses as eager."""
    import shutil

    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("torch.compile on CPU needs a C compiler")
    data, tok = small
    losses = {}
    for compiled in (False, True):
        out = str(tmp_path / f"compile-{compiled}")
        train_in_process(base_argv(data, tok, out, max_steps=3, torch_compile=compiled))
        losses[compiled] = [r["loss"] for r in train_logs(out)]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5) and len(losses[True]) == 3
