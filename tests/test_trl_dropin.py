"""TRL's documented quickstart with only the import changed: same first step as TRL 1.16 on the same model, data
and seed (standard and conversational data, with peft_config), and a trl.DPOConfig mapped field by field."""

from __future__ import annotations

import math

import pytest

trl = pytest.importorskip("trl")

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
STANDARD = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" It is {2 * i}.",
             "rejected": f" I do not know, maybe {i + 7}."} for i in range(8)]
CONVERSATIONAL = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                   "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
                   "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]} for r in STANDARD]
COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
            "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "num_tokens")


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    """A small 'pretrained' model folder with its tokenizer (and a chat template), as a user would have."""
    from adaptdpo.models.tiny import build_tiny_model, tiny_model_config

    folder = tmp_path_factory.mktemp("dropin") / "model"
    cfg = tiny_model_config("tiny-llama", len(tokenizer), 32, 2, 4, 256, tokenizer.pad_token_id,
                            tokenizer.eos_token_id)
    build_tiny_model(cfg, seed=1).save_pretrained(folder)
    original, tokenizer.chat_template = tokenizer.chat_template, CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    tokenizer.chat_template = original  # the session's tokenizer, as the other test files expect it
    return str(folder)


def quickstart(module_trainer, module_config, model_dir: str, rows: list[dict], out: str,
               args_extra: dict | None = None, **extra) -> dict:
    """TRL's quickstart (model by name, raw Dataset, no ref_model, no tokenizer) for one step over all rows."""
    from datasets import Dataset

    args = module_config(output_dir=out, per_device_train_batch_size=len(rows), max_steps=1, learning_rate=1e-3,
                         logging_steps=1, report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
                         seed=0, save_strategy="no", **(args_extra or {}))
    trainer = module_trainer(model=model_dir, args=args, train_dataset=Dataset.from_list(rows), **extra)
    trainer.train()
    return next(r for r in trainer.state.log_history if "loss" in r)


@pytest.mark.parametrize("rows", [STANDARD, CONVERSATIONAL], ids=["standard", "conversational"])
@pytest.mark.parametrize("with_peft", [False, True], ids=["full", "peft"])
def test_quickstart_with_only_the_import_changed_matches_trl(model_dir, rows, with_peft, tmp_path):
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer as TRLTrainer

    from adaptdpo import DPOConfig, DPOTrainer

    def extra() -> dict:
        if not with_peft:
            return {}
        from peft import LoraConfig

        return {"peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          task_type="CAUSAL_LM")}

    theirs = quickstart(TRLTrainer, TRLConfig, model_dir, rows, str(tmp_path / "trl"), **extra())
    ours = quickstart(DPOTrainer, DPOConfig, model_dir, rows, str(tmp_path / "ours"), **extra())
    assert ours["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as the reference
    for key in COMPARED:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-4), key
    assert ours["logps/chosen"] < -1  # real log-probs, not zeros


def test_a_trl_config_object_is_mapped_field_by_field(model_dir, tmp_path):
    from trl import DPOConfig as TRLConfig

    from adaptdpo import DPOConfig, from_trl_config

    trl_args = TRLConfig(output_dir=str(tmp_path / "o"), beta=0.25, loss_type=["ipo"], max_length=300,
                         learning_rate=3e-4, per_device_train_batch_size=3, gradient_accumulation_steps=2,
                         label_smoothing=0.1, report_to="none", use_cpu=True, bf16=False, seed=7,
                         model_init_kwargs={"dtype": "float32"})
    ours = from_trl_config(trl_args)
    assert isinstance(ours, DPOConfig)
    assert (ours.beta, ours.loss_type, ours.max_length, ours.learning_rate, ours.label_smoothing) == (
        0.25, ["ipo"], 300, 3e-4, 0.1)
    assert (ours.per_device_train_batch_size, ours.gradient_accumulation_steps, ours.seed) == (3, 2, 7)
    assert ours.output_dir == str(tmp_path / "o") and ours.dtype == "float32"
    remote = from_trl_config(TRLConfig(output_dir=str(tmp_path / "r"), report_to="none", use_cpu=True,
                                       trust_remote_code=True,
                                       model_init_kwargs={"revision": "v2", "dtype": "bfloat16", "device_map": None}))
    assert (remote.trust_remote_code, remote.model_revision, remote.dtype) == (True, "v2", "bfloat16")
    assert remote.from_pretrained_kwargs() == {"device_map": None, "revision": "v2", "trust_remote_code": True}
    rpo = from_trl_config(TRLConfig(output_dir=str(tmp_path / "r"), report_to="none", use_cpu=True,
                                    loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], activation_offloading=True,
                                    router_aux_loss_coef=0.5))
    assert (rpo.loss_type, rpo.loss_weights) == (["sigmoid", "sft"], [1.0, 0.5])
    assert (rpo.activation_offloading, rpo.router_aux_loss_coef) == (True, 0.5)
    # every field of TRL 1.16's DPOConfig has a meaning here; a field a later TRL adds is refused by name when set
    import dataclasses

    @dataclasses.dataclass
    class LaterTRLConfig(TRLConfig):
        new_objective_knob: float = 0.0

    LaterTRLConfig.__module__ = "trl.trainer.dpo_config"
    assert from_trl_config(LaterTRLConfig(output_dir=str(tmp_path / "r"), report_to="none", use_cpu=True)).beta == 0.1
    with pytest.raises(ValueError, match=r"cannot honour.*new_objective_knob=0.5"):
        from_trl_config(LaterTRLConfig(output_dir=str(tmp_path / "r"), report_to="none", use_cpu=True,
                                       new_objective_knob=0.5))


def test_trainer_accepts_a_trl_config_and_named_eval_sets(model_dir, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig

    from adaptdpo import DPOTrainer

    args = TRLConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, max_steps=1, report_to="none",
                     use_cpu=True, bf16=False, gradient_checkpointing=False, save_strategy="no")
    trainer = DPOTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(STANDARD),
                         eval_dataset={"a": Dataset.from_list(STANDARD[:4]), "b": STANDARD[4:]})
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_a_loss"] == pytest.approx(metrics["eval_b_loss"], abs=0.05)
    assert "eval_b_rewards/accuracies" in metrics


def test_raw_rows_are_validated_with_dataset_row_and_field(model_dir, tmp_path):
    from datasets import Dataset

    from adaptdpo import DPOConfig, DPOTrainer
    from adaptdpo.data.readers import DataValidationError

    rows = [dict(r) for r in STANDARD]
    rows[5] = {"prompt": "p", "chosen": "", "rejected": "r"}
    args = DPOConfig(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True)
    with pytest.raises(DataValidationError, match=r"train_dataset.*row 5.*chosen"):
        DPOTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(rows))


PEFT_FLAGS = ["--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj",
              "--use_rslora", "--use_dora", "--lora_dropout", "0.0"]


@pytest.mark.slow  # two command-line trainings (trl's and ours) per case
@pytest.mark.parametrize("rows,extra", [(STANDARD, []), (CONVERSATIONAL, PEFT_FLAGS)],
                         ids=["standard", "conversational-dora-rslora"])
def test_trl_dpo_command_and_adaptdpo_train_with_the_same_flags(model_dir, rows, extra, tmp_path):
    """`trl dpo ...` and `adaptdpo train ...` with TRL's flags (--dataset_name a folder of jsonl files; TRL's PEFT
    flags on conversational data): the same two steps, the second after one update (read from each run's
    checkpoint-2/trainer_state.json)."""
    import json
    import os
    import sys

    from helpers import run_command

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    flags = ["--model_name_or_path", model_dir, "--dataset_name", str(data), "--per_device_train_batch_size", "4",
             "--max_steps", "2", "--logging_steps", "1", "--report_to", "none", "--use_cpu", "--bf16", "false",
             "--gradient_checkpointing", "false", "--learning_rate", "1e-2", "--save_strategy", "steps",
             "--save_steps", "2", "--seed", "0", *extra]
    bin_dir = os.path.dirname(sys.executable)
    logs = {}
    for name, command in (("trl", [os.path.join(bin_dir, "trl"), "dpo"]),
                          ("ours", [os.path.join(bin_dir, "adaptdpo"), "train"])):
        out = tmp_path / name
        done = run_command([*command, *flags, "--output_dir", str(out)], timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        with open(out / "checkpoint-2" / "trainer_state.json", encoding="utf-8") as fh:
            logs[name] = [r for r in json.load(fh)["log_history"] if "loss" in r]
    assert logs["ours"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logs["ours"][1]["rewards/margins"] != 0  # the second step is after a real update
    for step in (0, 1):
        for key in COMPARED:
            assert logs["ours"][step][key] == pytest.approx(logs["trl"][step][key], abs=1e-4, rel=1e-4), (step, key)
    if extra:
        with open(tmp_path / "ours" / "adapter_config.json", encoding="utf-8") as fh:
            adapter = json.load(fh)
        assert (adapter["use_dora"], adapter["use_rslora"], adapter["r"]) == (True, True, 4)


def test_trl_cli_names_in_the_config(tmp_path):
    from adaptdpo.training.config_io import ConfigError, parse_config

    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model_name_or_path: tiny-llama\nbeta: 0.3\n", encoding="utf-8")
    by_flag = parse_config(["--config", str(yaml_file), "--output_dir", str(tmp_path / "o")])
    positional = parse_config(["--output_dir", str(tmp_path / "o")], str(yaml_file))
    assert by_flag.beta == positional.beta == 0.3 and by_flag.model_name_or_path == "tiny-llama"
    assert parse_config([f"--config={yaml_file}"]).beta == 0.3
    with pytest.raises(ConfigError, match="two config files"):
        parse_config(["--config", str(yaml_file)], str(yaml_file))
    config = parse_config(["--dataset_name", "some/hub-set", "--dataset_config", "en", "--dataset_train_split", "tr",
                           "--dataset_test_split", "te"])
    assert (config.train_file, config.train_split, config.eval_file, config.eval_split, config.dataset_config) == (
        "some/hub-set", "tr", "some/hub-set", "te", "en")
    with pytest.raises(ValueError, match="two training sets"):
        parse_config(["--dataset_name", "a/b", "--train_file", "c.jsonl"])


def test_train_needs_a_model(tmp_path):
    from adaptdpo.training.config_io import parse_config
    from adaptdpo.training.job import run_training

    with pytest.raises(ValueError, match="model_name_or_path is required"):
        run_training(parse_config(["--output_dir", str(tmp_path / "o")]))


def test_push_to_hub_uploads_the_model_not_the_run_directory(model_dir, tmp_path, monkeypatch):
    """The hub repository gets the model, tokenizer and our model card; the run's own files stay local."""
    import transformers.trainer as trainer_module
    from datasets import Dataset
    from huggingface_hub.utils import filter_repo_objects

    from adaptdpo import DPOConfig, DPOTrainer

    calls = []

    class FakeApi:
        def upload_folder(self, **kwargs):
            calls.append(kwargs)

    monkeypatch.setattr(trainer_module, "hf_api", lambda *a, **k: FakeApi())
    out = tmp_path / "run"
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=4, max_steps=1, report_to="none",
                     use_cpu=True, save_strategy="no", method="beta_dpo")
    trainer = DPOTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(STANDARD))
    trainer.train()
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "plots/margins.png", "ref_logps/train-x.pt"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("run file")
    trainer.hub_model_id = "someone/model"
    trainer.push_to_hub()
    assert len(calls) == 1 and calls[0]["folder_path"] == str(out)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    uploaded = set(filter_repo_objects(files, ignore_patterns=calls[0]["ignore_patterns"]))
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= uploaded
    assert not uploaded & {"config.yaml", "metrics.jsonl", "summary.json", "pairs.jsonl", "plots/margins.png",
                           "ref_logps/train-x.pt"}
    card = (out / "README.md").read_text()
    assert "- beta-dpo" in card and "| `beta_dpo_alpha` | 0.6 |" in card and "wu2024beta" in card


def test_tr_dpo_reference_updates_match_trl(model_dir, tmp_path):
    """TR-DPO: after 3 steps with a reference update after every step (α 0.5), the reference and the policy equal
    TRL's (to 1e-5: Adam turns the float reassociation of our packed layout into ~1e-6 at lr 1e-3; the reference
    moves by ~1.5e-3, so a wrong update could not pass)."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer as TRLTrainer

    from adaptdpo import DPOConfig, DPOTrainer

    trainers = {}
    for name, trainer_cls, config_cls in (("trl", TRLTrainer, TRLConfig), ("ours", DPOTrainer, DPOConfig)):
        args = config_cls(output_dir=str(tmp_path / name), per_device_train_batch_size=8, max_steps=3,
                          learning_rate=1e-3, report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
                          seed=0, save_strategy="no", sync_ref_model=True, ref_model_sync_steps=1,
                          ref_model_mixup_alpha=0.5)
        trainer = trainer_cls(model=model_dir, args=args, train_dataset=Dataset.from_list(STANDARD))
        trainer.train()
        trainers[name] = trainer
    initial = trainers["ours"].model.__class__.from_pretrained(model_dir)
    moved = False
    for (name, ours), (_, theirs), (_, start) in zip(trainers["ours"].ref_model.named_parameters(),
                                                    trainers["trl"].ref_model.named_parameters(),
                                                    initial.named_parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5, msg=name)
        moved |= bool((ours - start).abs().max() > 1e-4)
    assert moved  # the reference did move away from the initial model
    for (name, ours), (_, theirs) in zip(trainers["ours"].model.named_parameters(),
                                         trainers["trl"].model.named_parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5, msg=name)


TOOLS_TEMPLATE = (
    "{% if tools %}<|tools|>{% for t in tools %}{{ t['function']['name'] }} {% endfor %}\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{% if m['content'] is string %}{{ m['content'] }}"
    "{% elif m['content'] %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endif %}"
    "{% if m['tool_calls'] %}[call {{ m['tool_calls'][0]['function']['name'] }}]{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_tools_content_parts_and_tool_calls_tokenise_as_trl(model_dir, tokenizer, tmp_path):
    """TRL's `tools` column (JSON text), content as a list of text parts, and an assistant turn with only tool calls
    (content None): validated, rendered through the template with the tools, the same ids as TRL's."""
    import copy
    import json

    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer as TRLTrainer

    from adaptdpo import DPOConfig, DPOTrainer

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TOOLS_TEMPLATE
    tools = json.dumps([{"type": "function", "function": {"name": "get_weather", "parameters": {}}}])
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}
    rows = [{"prompt": [{"role": "user", "content": [{"type": "text", "text": f"Weather in city {i}?"}]}],
             "chosen": [call], "rejected": [{"role": "assistant", "content": f"No idea {i}."}], "tools": tools}
            for i in range(4)]
    datasets_seen = {}
    for name, trainer_cls, config_cls in (("trl", TRLTrainer, TRLConfig), ("ours", DPOTrainer, DPOConfig)):
        args = config_cls(output_dir=str(tmp_path / name), report_to="none", use_cpu=True, bf16=False,
                          gradient_checkpointing=False)
        trainer = trainer_cls(model=model_dir, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        datasets_seen[name] = trainer.train_dataset
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert datasets_seen["ours"][key] == datasets_seen["trl"][key], key
    prompt = tok.decode(datasets_seen["ours"][0]["prompt_ids"])
    assert "get_weather" in prompt and "Weather in city 0?" in prompt  # the tools and the text part are rendered
    assert "[call get_weather]" in tok.decode(datasets_seen["ours"][0]["chosen_ids"])


def test_message_content_rules_name_the_field():
    from adaptdpo.data.readers import DataValidationError
    from adaptdpo.data.rows import normalise_row

    ok = {"prompt": [{"role": "user", "content": "q"}], "rejected": [{"role": "assistant", "content": "b"}]}
    with pytest.raises(DataValidationError, match=r"row 2.*chosen\[0\]\.content.*null only with tool_calls"):
        normalise_row({**ok, "chosen": [{"role": "assistant", "content": None}]}, "d.jsonl", 2)
    with pytest.raises(DataValidationError, match=r"chosen\[0\]\.content\[1\].*text part"):
        normalise_row({**ok, "chosen": [{"role": "assistant", "content": [
            {"type": "text", "text": "a"}, {"type": "image", "url": "x.png"}]}]}, "d.jsonl", 2)
    with pytest.raises(DataValidationError, match=r"row 2, field 'tools'.*not valid JSON"):
        normalise_row({**ok, "chosen": [{"role": "assistant", "content": "a"}], "tools": "[{"}, "d.jsonl", 2)
    row = normalise_row({**ok, "chosen": [{"role": "assistant", "content": "a"}], "tools": '[{"name": "f"}]',
                         "chat_template_kwargs": {"enable_thinking": False}}, "d.jsonl", 2)
    assert row["tools"] == [{"name": "f"}] and row["chat_template_kwargs"] == {"enable_thinking": False}


def test_model_init_kwargs_reach_from_pretrained(model_dir, tmp_path):
    from datasets import Dataset

    from adaptdpo import DPOConfig, DPOTrainer
    from adaptdpo.training.config_io import parse_config

    args = DPOConfig(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True,
                     model_init_kwargs={"attn_implementation": "eager"})
    trainer = DPOTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(STANDARD))
    assert trainer.model.config._attn_implementation == "eager"
    config = parse_config(["--model_init_kwargs", '{"revision": "v1", "dtype": "bfloat16", "device_map": "cpu"}'])
    assert (config.model_revision, config.dtype, config.model_init_kwargs) == ("v1", "bfloat16", {"device_map": "cpu"})


def test_a_streamed_iterable_dataset_trains_like_trl(model_dir, tmp_path):
    """An IterableDataset is validated and tokenised as it streams (nothing read ahead): the first step equals
    TRL's on the same stream; a bad row stops training naming the dataset, the row and the field."""
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer as TRLTrainer

    from adaptdpo import DPOConfig, DPOTrainer
    from adaptdpo.data.readers import DataValidationError

    firsts = {}
    for name, trainer_cls, config_cls in (("trl", TRLTrainer, TRLConfig), ("ours", DPOTrainer, DPOConfig)):
        args = config_cls(output_dir=str(tmp_path / name), per_device_train_batch_size=8, max_steps=2,
                          logging_steps=1, report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
                          save_strategy="no", learning_rate=1e-3)
        stream = Dataset.from_list(STANDARD * 2).to_iterable_dataset()
        trainer = trainer_cls(model=model_dir, args=args, train_dataset=stream)
        trainer.train()
        firsts[name] = next(r for r in trainer.state.log_history if "loss" in r)
    for key in COMPARED:
        assert firsts["ours"][key] == pytest.approx(firsts["trl"][key], abs=1e-4), key
    rows = [dict(r) for r in STANDARD * 2]
    rows[11] = {"prompt": "p", "chosen": "c", "rejected": None}
    args = DPOConfig(output_dir=str(tmp_path / "bad"), per_device_train_batch_size=4, max_steps=4, report_to="none",
                     use_cpu=True, save_strategy="no")
    trainer = DPOTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(rows).to_iterable_dataset())
    with pytest.raises(DataValidationError, match=r"train_dataset.*row 11.*rejected"):
        trainer.train()


# ------------------------------------------------------------------------------------------------ evaluation habits

TIMING = ("runtime", "samples_per_second", "steps_per_second")


def evaluated(trainer_cls, config_cls, model_dir, out, **extra):
    """One training step, then evaluate() on two named eval sets (6 and 2 pairs, eval batches of 4) with a
    compute_metrics that keeps what it was handed: (evaluate()'s dict, the eval log records, the EvalPredictions)."""
    from datasets import Dataset

    seen = []

    def compute_metrics(prediction):
        seen.append((prediction.predictions, prediction.label_ids))
        return {"mean_logit": float(prediction.predictions[prediction.predictions != -100].mean())}

    args = config_cls(output_dir=out, per_device_train_batch_size=8, per_device_eval_batch_size=4, max_steps=1,
                      learning_rate=1e-3, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
                      gradient_checkpointing=False, seed=0, save_strategy="no", **extra)
    trainer = trainer_cls(model=model_dir, args=args, train_dataset=Dataset.from_list(STANDARD),
                          eval_dataset={"a": Dataset.from_list(STANDARD[:6]), "b": Dataset.from_list(STANDARD[6:])},
                          compute_metrics=compute_metrics)
    trainer.train()
    metrics = trainer.evaluate()
    records = [r for r in trainer.state.log_history if any(k.startswith("eval") for k in r)]
    return metrics, records, seen


@pytest.fixture(scope="module")
def trl_evaluation(model_dir, tmp_path_factory):
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer as TRLTrainer

    return evaluated(TRLTrainer, TRLConfig, model_dir, str(tmp_path_factory.mktemp("trl-eval")))


@pytest.mark.parametrize("layout", [{}, {"shared_prompt": "off"}, {"padding_free": True}],
                         ids=["shared-prompt", "stacked", "padding-free"])
def test_compute_metrics_and_eval_metric_names_are_trls(model_dir, trl_evaluation, layout, tmp_path):
    """compute_metrics gets what TRL 1.16's evaluation hands it (the logits of the stacked [chosen; rejected] rows and
    their input_ids as labels, whatever our layout), and every eval metric TRL logs, eval_num_tokens included, has
    TRL's name and value; with named eval sets we add eval_<name>_<metric> beside TRL's eval_<metric>. Found by
    trying TRL scripts with only the import changed (issue 28): compute_metrics was never called."""
    import numpy as np

    from adaptdpo import DPOConfig, DPOTrainer

    theirs = trl_evaluation
    ours = evaluated(DPOTrainer, DPOConfig, model_dir, str(tmp_path / "ours"), **layout)
    assert len(ours[2]) == len(theirs[2]) == 2  # called once per eval set
    for (our_logits, our_labels), (trl_logits, trl_labels) in zip(ours[2], theirs[2], strict=True):
        assert our_logits.shape == trl_logits.shape and np.array_equal(our_labels, trl_labels)
        np.testing.assert_allclose(our_logits, trl_logits, atol=1e-4, rtol=1e-4)
    assert len(ours[1]) == len(theirs[1]) == 2
    for our_record, trl_record in zip(ours[1], theirs[1], strict=True):
        for key, value in trl_record.items():
            if not key.endswith(TIMING):
                assert our_record[key] == pytest.approx(value, abs=1e-4, rel=1e-4), key
        name = "a" if "eval_a_loss" in our_record else "b"
        for key in ("rewards/margins", "logps/chosen", "num_tokens"):  # ours too, per set
            assert our_record[f"eval_{name}_{key}"] == our_record[f"eval_{key}"]
    for key, value in theirs[0].items():  # evaluate()'s dict: TRL's keys (eval_<metric> is the last set's, as TRL)
        if not key.endswith(TIMING):
            assert ours[0][key] == pytest.approx(value, abs=1e-4, rel=1e-4), key
    assert ours[0]["eval_num_tokens"] == theirs[0]["eval_num_tokens"] > 0


LONG_PROMPT = {"prompt": "Question 8: what is 8 plus 8, and why, and how would you show it to a child, step by step?",
               "chosen": " It is 16.", "rejected": " Maybe 15."}


@pytest.mark.parametrize("mode", [None, "keep_end"], ids=["default-keep_start", "keep_end"])
def test_truncation_modes_are_trls(model_dir, mode, tmp_path, caplog):
    """max_length 20 on the quickstart (prompts of 17 tokens, completions of 6-14) and one pair whose prompt alone
    is longer: the first step equals TRL's with TRL's default (keep_start: completions cut to 3 tokens, the long pair
    dropped: with a warning here, silently in TRL) and with keep_end (every row keeps its last 20 tokens: the long
    pair is kept, its rows lose different parts of the prompt). Found by trying TRL scripts (issue 28): with
    truncation, logps/chosen and num_tokens differed from TRL's."""
    import logging

    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer as TRLTrainer

    from adaptdpo import DPOConfig, DPOTrainer

    rows = [*STANDARD, LONG_PROMPT]
    settings = {"max_length": 20, **({"truncation_mode": mode} if mode else {})}
    theirs = quickstart(TRLTrainer, TRLConfig, model_dir, rows, str(tmp_path / "trl"), settings)
    with caplog.at_level(logging.WARNING, logger="adaptdpo"):
        ours = quickstart(DPOTrainer, DPOConfig, model_dir, rows, str(tmp_path / "ours"), settings)
    for key in COMPARED:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-4), key
    expected_tokens = 8 * 2 * 20 if mode is None else 9 * 2 * 20  # every row cut to 20 tokens
    assert ours["num_tokens"] == expected_tokens
    assert ("1 pair(s) dropped: the prompt alone fills max_length=20" in caplog.text) == (mode is None)
    assert from_trl_config_mode(mode) == (mode or "keep_start")


def from_trl_config_mode(mode):
    from trl import DPOConfig as TRLConfig

    from adaptdpo import from_trl_config

    extra = {"truncation_mode": mode} if mode else {}
    return from_trl_config(TRLConfig(output_dir="unused", report_to="none", use_cpu=True, **extra)).truncation_mode


def test_our_truncation_rule_is_an_explicit_opt_in(tmp_path):
    """keep_prompt_end (the prompt keeps its end, no pair dropped) is chosen by truncation_mode or by setting
    max_prompt_length, which has no meaning under TRL's modes: set with one of them, it is an error, not ignored."""
    from adaptdpo import DPOConfig
    from adaptdpo.training.config_io import parse_config

    out = str(tmp_path / "o")
    assert DPOConfig(output_dir=out).truncation_mode == "keep_start"
    assert DPOConfig(output_dir=out, max_prompt_length=8).truncation_mode == "keep_prompt_end"
    assert parse_config(["--truncation_mode", "keep_end"]).truncation_mode == "keep_end"
    with pytest.raises(ValueError, match="max_prompt_length=8 applies to truncation_mode keep_prompt_end only"):
        DPOConfig(output_dir=out, max_prompt_length=8, truncation_mode="keep_start")
    with pytest.raises(ValueError, match="invalid choice: 'keep_middle'"):
        parse_config(["--truncation_mode", "keep_middle"])
