"""What one SamS scheduler fit costs, and what the fast dropout and the fused Adam save, side by side.

    .venv/bin/python benchmarks/sams_fit.py [--layers 4 --dim 256 --pairs 8 --rounds 8]

The fit of one round in steady state: the previous round plus 32 pool rounds (33 × ``pairs`` rows of
L × D contexts), ``fit_steps`` = 4 Adam steps of f_S with its encoder, then f_S′; the ``small`` networks.
Variants, alternated within each round: as shipped; with ``torch.nn.Dropout`` in place of FastDropout;
with that and the per-parameter (unfused) Adam, i.e. the implementation before the change.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_line, emit_table

from adaptdpo.methods.sams.networks import FastDropout
from adaptdpo.methods.sams.scheduler import SamsScheduler


def variant(name: str, layers: int, dim: int) -> SamsScheduler:
    scheduler = SamsScheduler(layers, dim, preset="small", seed=0)
    if name != "shipped":
        for net in scheduler.modules():
            for module in list(net.modules()):
                for child_name, child in module.named_children():
                    if isinstance(child, FastDropout):
                        setattr(module, child_name, torch.nn.Dropout(child.p))
    if name == "torch dropout, unfused Adam":
        for optimizer in (scheduler.exploit_optimizer, scheduler.explore_optimizer):
            for group in optimizer.param_groups:
                group["fused"] = None
    return scheduler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--pool_batches", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None)
    ns = parser.parse_args()
    names = ["shipped", "torch dropout", "torch dropout, unfused Adam"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    schedulers = {name: variant(name, ns.layers, ns.dim).to(device) for name in names}
    g = torch.Generator().manual_seed(0)
    rows = (ns.pool_batches + 1) * ns.pairs
    contexts = torch.randn(rows, ns.layers, ns.dim, generator=g).to(device)
    rewards, predictions = torch.rand(rows, generator=g).to(device), torch.rand(rows, generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for scheduler in schedulers.values():
        with autocast:
            scheduler._fit(contexts, rewards, predictions)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(ns.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            steps = []
            for _ in range(ns.steps):
                sync()
                start = time.perf_counter()
                with autocast:  # as inside the trainer's compute_loss
                    schedulers[name]._fit(contexts, rewards, predictions)
                sync()
                steps.append(time.perf_counter() - start)
            times[name].append(statistics.median(steps))
    base = times["shipped"]
    lines = [f"One scheduler fit on {rows} rows ({ns.pool_batches} pool rounds + 1, {ns.pairs} pairs each) of "
             f"{ns.layers} × {ns.dim} contexts, `small` networks, 4 fit steps; {device_line(ns)}. "
             f"{ns.rounds} alternated rounds × median of {ns.steps} fits.", "",
             "| variant | median fit (ms) | time ratio to shipped (median over rounds) |", "|---|---|---|"]
    for name, values in times.items():
        ratio = statistics.median(v / b for v, b in zip(values, base, strict=True))
        lines.append(f"| {name} | {statistics.median(values) * 1e3:.1f} | {ratio:.2f} |")
    emit_table("\n".join(lines) + "\n", ns.out)


if __name__ == "__main__":
    main()
