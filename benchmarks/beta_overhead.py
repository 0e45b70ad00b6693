"""Wall-time overhead of a β-DPO step over a DPO step: same model, same batch, alternated in one run.

    .venv/bin/python benchmarks/beta_overhead.py [--rounds 15] [--steps 3] [--out docs/performance.md]

A step is what the Trainer does per optimizer step: forward of policy and reference, loss, backward,
optimizer step. β-DPO (mask mode) runs the same forwards and backward on every pair; its extra work is the
controller (moving averages, Gumbel-top-k sampling on n numbers, β) and the gather of n margins.
Configurations alternate within each round (ABAB...) so drift of the machine hits both alike; the ratio is
taken per round and summarised by its median and the spread over rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_shape_arguments, build, device_line, emit_table, make_trainer, matmul_params, one_step

CONFIGS = {
    "dpo": {"method": "dpo"},
    "beta_dpo (batch, ρ=0.8)": {"method": "beta_dpo"},
    "beta_dpo (instance, ρ=0.8)": {"method": "beta_dpo", "beta_dpo_level": "instance"},
    "beta_dpo (dynamic β only)": {"method": "beta_dpo", "beta_dpo_keep_ratio": 1.0},
}


def plan_cost_us(trainer, n: int, repeats: int = 2000) -> float:
    """Mean wall time of the step policy's per-micro-batch work (gather + controller), in microseconds."""
    g = torch.Generator().manual_seed(0)
    logps = [(-50 - 10 * torch.rand(n, generator=g)).to(trainer.args.device) for _ in range(4)]
    trainer.model.train()
    start = time.perf_counter()
    for _ in range(repeats):
        trainer.plan_step(*logps, training=True)
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--steps", type=int, default=3, help="steps per configuration per round")
    add_shape_arguments(parser, pairs=16, hidden=128, layers=2, max_length=256)
    parser.add_argument("--out", default=None, help="markdown file to write the table to")
    ns = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        cuda = torch.cuda.is_available()
        policy, tok, batch = build(ns.pairs, ns.hidden, ns.layers, ns.max_length, workdir, ns.vocab)
        trainers = {name: make_trainer(policy, tok, os.path.join(workdir, str(i)), o, cuda)
                    for i, (name, o) in enumerate(CONFIGS.items())}
        for trainer in trainers.values():  # warm-up
            one_step(trainer, batch)
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for r in range(ns.rounds):
            order = list(trainers) if r % 2 == 0 else list(reversed(trainers))
            for name in order:
                times[name].append(statistics.median(one_step(trainers[name], batch) for _ in range(ns.steps)))
            print(f"round {r + 1}/{ns.rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()),
                  file=sys.stderr)
        plan_us = {name: plan_cost_us(t, ns.pairs) for name, t in trainers.items()}
    tokens = int(batch["attention_mask"].sum())
    params = sum(p.numel() for p in policy.parameters())
    flops_per_step = 8 * matmul_params(policy) * tokens
    lines = [
        f"Model: tiny-llama, hidden {ns.hidden}, {ns.layers} layers, {params / 1e6:.1f} M parameters; batch "
        f"{ns.pairs} pairs, {tokens} tokens (HH, max_length {ns.max_length}); {device_line(ns)}. "
        f"{ns.rounds} rounds × {ns.steps} steps per configuration, alternated. DPO step: "
        f"{tokens / statistics.median(times['dpo']):,.0f} tokens/s, "
        f"{flops_per_step / statistics.median(times['dpo']) / 1e12:.2f} TFLOP/s achieved (8·N·T, N = "
        f"{matmul_params(policy) / 1e6:.0f} M matmul parameters).",
        "",
        "| configuration | median step (ms) | step-time ratio to DPO (median over rounds) | ratio range "
        "(10th–90th pct) | per-step policy work (µs) | extra work over DPO, % of a DPO step |",
        "|---|---|---|---|---|---|",
    ]
    base = times["dpo"]
    for name, values in times.items():
        ratios = sorted(v / b for v, b in zip(values, base, strict=True))
        lo, hi = ratios[int(0.1 * (len(ratios) - 1))], ratios[round(0.9 * (len(ratios) - 1))]
        extra = (plan_us[name] - plan_us["dpo"]) / (statistics.median(base) * 1e6) * 100
        lines.append(f"| {name} | {statistics.median(values) * 1e3:.1f} | {statistics.median(ratios):.3f} | "
                     f"{lo:.3f}–{hi:.3f} | {plan_us[name]:.0f} | {extra:.3f} |")
    emit_table("\n".join(lines) + "\n", ns.out)


if __name__ == "__main__":
    main()
