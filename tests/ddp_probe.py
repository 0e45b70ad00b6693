"""Train like `adaptdpo train` and, on every rank, save the gradients each optimizer step applies and the
parameters after it (DDP must leave every rank with the same ones; a loss path that skips the wrapped model's
forward would skip the all-reduce silently, TRL #7245).

usage: accelerate launch ... tests/ddp_probe.py OUT_DIR [--key value ...]
"""

import os
import sys

import torch
from transformers import TrainerCallback

from adaptdpo.training.config_io import parse_config
from adaptdpo.training.job import run_training


class DumpGradientsAndParameters(TrainerCallback):
    def __init__(self, folder: str):
        self.folder = folder
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        rank = int(os.environ.get("RANK", "0"))
        torch.save({"grads": self.grads, "params": params},
                   os.path.join(self.folder, f"rank{rank}-step{state.global_step}.pt"))


if __name__ == "__main__":
    os.makedirs(sys.argv[1], exist_ok=True)
    run_training(parse_config(sys.argv[2:]), extra_callbacks=[DumpGradientsAndParameters(sys.argv[1])])
