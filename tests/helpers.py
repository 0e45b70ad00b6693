"""Small runs for the trajectory tests: a tiny model, a pretrained-once tokenizer, 48 HH pairs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_small_dataset(path: str, rows: list[dict], n: int = 48) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows[:n]:
            fh.write(json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
    return path


def base_argv(data_file: str, tokenizer_dir: str, output_dir: str, **overrides: object) -> list[str]:
    settings: dict[str, object] = {
        "train_file": data_file, "tokenizer_name_or_path": tokenizer_dir, "output_dir": output_dir,
        "model_name_or_path": "tiny-llama", "tiny_hidden_size": 32, "tiny_num_layers": 2, "tiny_num_heads": 2,
        "max_length": 64, "max_prompt_length": 32, "per_device_train_batch_size": 4, "learning_rate": 5e-3,
        "lr_scheduler_type": "constant", "logging_steps": 1, "save_strategy": "no", "seed": 3, "use_cpu": True,
        "disable_tqdm": True, "beta": 0.2, "dataloader_num_workers": 0,
    }
    settings.update(overrides)
    argv = []
    for key, value in settings.items():
        argv += [f"--{key}", str(value)]
    return argv


def train_in_process(argv: list[str]) -> dict:
    from adaptdpo.training.config_io import parse_config
    from adaptdpo.training.job import run_training

    return run_training(parse_config(argv))


def train_logs(output_dir: str) -> list[dict]:
    from adaptdpo.training.run_dir import read_metrics

    return [r for r in read_metrics(output_dir) if "loss" in r]


def final_params(output_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(output_dir, "model.safetensors"))  # the final model, at the root as TRL


def run_command(command: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                **(env or {})}
    return subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_cli(args: list[str], launcher: list[str] | None = None, **kw: object) -> subprocess.CompletedProcess:
    """`adaptdpo train ARGS` in a fresh process, optionally under a launcher (accelerate launch ...)."""
    return run_command([*(launcher or [sys.executable]), "-m", "adaptdpo.cli", "train", *args], **kw)


def make_trainer(setup, out, **overrides):
    """An AdaptiveDPOTrainer on copies of the fixture's policy and reference, in train mode (β 0.2 unless given)."""
    import copy

    from adaptdpo.training.config import AdaptiveDPOConfig
    from adaptdpo.training.trainer import AdaptiveDPOTrainer

    policy, reference, _, tokenizer = setup
    args = AdaptiveDPOConfig(output_dir=str(out), use_cpu=True, **{"beta": 0.2, **overrides})
    trainer = AdaptiveDPOTrainer(model=copy.deepcopy(policy), args=args, ref_model=copy.deepcopy(reference),
                                 processing_class=tokenizer)
    trainer.model.train()
    return trainer


def loss_and_grads(trainer, batch, n_items):
    """One compute_loss + backward: (loss, {parameter name: gradient})."""
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(n_items))
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in trainer.model.named_parameters()}


def packaged_model_installed(name: str) -> bool:
    """Whether a packaged model (adaptdpo.models.sources.PACKAGED_MODELS) is installed here."""
    from adaptdpo.models.sources import packaged_file

    try:
        packaged_file(name)
        return True
    except FileNotFoundError:
        return False
