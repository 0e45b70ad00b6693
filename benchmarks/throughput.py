"""Throughput of a DPO step: TRL 1.16's DPOTrainer against adaptdpo (DPO, β-DPO), side by side.

    .venv/bin/python benchmarks/throughput.py [--hidden 256 --layers 4 --pairs 8 --max_length 256]

Same model (a Llama-shaped random model), same batch (HH pairs, TRL's collated layout), same precision,
gradient checkpointing off in all, the same optimizer; configurations alternate within each round and the
table reports medians and ratios to TRL. Achieved FLOP/s use the 8·N·T model of a DPO step (6N policy
forward+backward, 2N reference forward, N = matmul parameters, T = tokens of the stacked batch), and are
compared with this machine's measured dense matmul throughput. Memory (CUDA only): the peak of
max_memory_allocated during one step minus what was allocated before it (weights, gradients' absence,
optimizer states of every trainer in the process), i.e. activations and temporaries of the step.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build, device_line, emit_table, make_trainer, matmul_params, one_step, prepare


def make_trl_trainer(policy, tok, workdir, cuda: bool):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=workdir, beta=0.1, bf16=cuda, use_cpu=not cuda, gradient_checkpointing=False,
                     max_length=None, report_to="none", learning_rate=1e-5, disable_dropout=True)
    # only the step is timed, on a batch collated beforehand: a stand-in list for the dataset, and no TRL
    # dataset preparation (building a `datasets.Dataset` fails in its fingerprinting on some Python/pyarrow
    # combinations, e.g. the GPU machine's Python 3.12)
    DPOTrainer._prepare_dataset = lambda self, dataset, *args, **kwargs: dataset
    from datasets import Dataset
    from datasets.table import InMemoryTable

    stand_in = Dataset(InMemoryTable.from_pylist([{"prompt_ids": [0], "chosen_ids": [1], "rejected_ids": [2]}]),
                       fingerprint="benchmark-stand-in")
    trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(policy), args=args,
                         train_dataset=stand_in, processing_class=tok)
    return prepare(trainer)


def matmul_throughput(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Dense matmul FLOP/s of this device at ``size``² × ``size``² (best of a few timed runs)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(3):
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * size**3 / best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=0)
    parser.add_argument("--out", default=None)
    ns = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        policy, tok, batch = build(ns.pairs, ns.hidden, ns.layers, ns.max_length, workdir, ns.vocab)
        trainers = {"TRL DPOTrainer": make_trl_trainer(policy, tok, os.path.join(workdir, "trl"), cuda),
                    "adaptdpo dpo": make_trainer(policy, tok, os.path.join(workdir, "a"), {"method": "dpo"}, cuda),
                    "adaptdpo beta_dpo": make_trainer(policy, tok, os.path.join(workdir, "b"),
                                                      {"method": "beta_dpo"}, cuda)}
        peak: dict[str, float] = {}
        for name, trainer in trainers.items():  # warm-up, and peak memory one configuration at a time
            one_step(trainer, batch)
            if cuda:  # the step's own memory: peak above what is resident before it (all trainers' weights)
                torch.cuda.synchronize()
                resident = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                one_step(trainer, batch)
                peak[name] = (torch.cuda.max_memory_allocated() - resident) / 2**30
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for r in range(ns.rounds):
            order = list(trainers) if r % 2 == 0 else list(reversed(trainers))
            for name in order:
                times[name].append(statistics.median(one_step(trainers[name], batch) for _ in range(ns.steps)))
            print(f"round {r + 1}/{ns.rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()),
                  file=sys.stderr)
        machine = matmul_throughput(device, torch.bfloat16 if cuda else torch.float32, 8192 if cuda else 1024,
                                    20 if cuda else 5)
    tokens = int(batch["attention_mask"].sum())
    n_matmul = matmul_params(policy)
    lines = [
        f"Model: Llama-shaped, hidden {ns.hidden}, {ns.layers} layers, vocabulary {policy.config.vocab_size}, "
        f"{sum(p.numel() for p in policy.parameters()) / 1e6:.1f} M parameters ({n_matmul / 1e6:.1f} M in "
        f"matmuls); batch {ns.pairs} pairs = {tokens} tokens (HH, max_length {ns.max_length}); {device_line(ns)}; "
        f"gradient checkpointing off in all. {ns.rounds} rounds × {ns.steps} steps, alternated. "
        f"Measured dense matmul throughput: {machine / 1e12:.2f} TFLOP/s.",
        "",
        "| configuration | median step (ms) | step-time ratio to TRL (median over rounds) | pairs/s | tokens/s | "
        "achieved TFLOP/s (8·N·T) | share of matmul throughput |"
        + (" step memory above resident (GiB) |" if cuda else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if cuda else ""),
    ]
    base = times["TRL DPOTrainer"]
    for name, values in times.items():
        step = statistics.median(values)
        ratio = statistics.median(v / b for v, b in zip(values, base, strict=True))
        flops = 8 * n_matmul * tokens / step
        row = (f"| {name} | {step * 1e3:.1f} | {ratio:.3f} | {ns.pairs / step:.1f} | {tokens / step:,.0f} | "
               f"{flops / 1e12:.3f} | {flops / machine:.1%} |")
        lines.append(row + (f" {peak[name]:.2f} |" if cuda else ""))
    emit_table("\n".join(lines) + "\n", ns.out)


if __name__ == "__main__":
    main()
