"""Step time of the robust-DPO rivals relative to DPO: same model, same batch, alternated in one run.

    .venv/bin/python benchmarks/rivals_cost.py [--rounds 11] [--steps 3] [--vocab 16384] [--out FILE] [--json FILE]

A step is what the Trainer does per optimizer step: forward of policy and reference, loss, backward, optimizer
step. cDPO, rDPO and Hölder-DPO change only the per-pair loss (a few element-wise operations on n numbers);
the weight and β columns add a multiply; ε-DPO holds the policy's scored window until the reference forward has
run and computes three log-softmaxes over the vocabulary at the completion positions (no gradient), so its cost
grows with the vocabulary: hence a vocabulary larger than the tiny tokenizer's by default. Configurations
alternate within each round (ABAB...) so drift of the machine hits all alike; the ratio is taken per round and
summarised by its median and the spread over rounds. ``--clock process`` (the default on CPU) times the process's
CPU time instead of the wall clock: the work a step does, which a machine shared with other jobs leaves intact
(the wall clock there measures the other jobs too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_shape_arguments, build, device_line, emit_table, make_trainer, one_step, shape_argv

from adaptdpo.data.collate import batch_to


def cpu_step(trainer, batch) -> float:
    """CPU time (this process, all threads) of one optimizer step: forward, backward, optimizer."""
    n = batch["input_ids"].shape[0] // 2
    items = torch.tensor(float(batch["weight"].sum()) if "weight" in batch else n)
    batch = batch_to(dict(batch), trainer.args.device)
    start = time.process_time()
    trainer.training_step(trainer.model, batch, items)
    trainer.optimizer.step()
    trainer.model.zero_grad(set_to_none=True)
    return time.process_time() - start


CONFIGS = {
    "DPO": {},
    "cDPO (sigmoid, label_smoothing 0.1)": {"label_smoothing": 0.1},
    "rDPO (robust, label_smoothing 0.1)": {"loss_type": "robust", "label_smoothing": 0.1},
    "Hölder-DPO (holder, γ 0.5)": {"loss_type": "holder"},
    "ε-DPO (ε 0.01)": {"method": "epsilon_dpo"},
    "DPO + weight and β columns": {"columns": True},
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--steps", type=int, default=3, help="steps per configuration per round")
    add_shape_arguments(parser, pairs=16, hidden=128, layers=2, max_length=256, vocab=16384)
    parser.add_argument("--out", default=None, help="markdown file to write the table to")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--clock", choices=("process", "wall"), default=None,
                        help="process CPU time (default on CPU) or wall time (default on GPU)")
    ns = parser.parse_args(argv)
    clock = ns.clock or ("wall" if torch.cuda.is_available() else "process")
    step = one_step if clock == "wall" else cpu_step
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        cuda = torch.cuda.is_available()
        policy, tok, batch = build(ns.pairs, ns.hidden, ns.layers, ns.max_length, workdir, ns.vocab)
        n = batch["input_ids"].shape[0] // 2
        with_columns = {**batch, "weight": torch.ones(n), "beta": torch.full((n,), 0.1)}
        trainers, batches = {}, {}
        for i, (name, overrides) in enumerate(CONFIGS.items()):
            overrides = {k: v for k, v in overrides.items() if k != "columns"}
            trainers[name] = make_trainer(policy, tok, os.path.join(workdir, str(i)), overrides, cuda)
            batches[name] = with_columns if CONFIGS[name].get("columns") else batch
            trainers[name].model.train()
        for name, trainer in trainers.items():  # warm-up
            step(trainer, batches[name])
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for r in range(ns.rounds):
            order = list(trainers) if r % 2 == 0 else list(reversed(trainers))
            for name in order:
                times[name].append(statistics.median(step(trainers[name], batches[name]) for _ in range(ns.steps)))
            print(f"round {r + 1}/{ns.rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()),
                  file=sys.stderr)
    tokens = int(batch["attention_mask"].sum())
    params = sum(p.numel() for p in policy.parameters())
    lines = [
        f"Model: tiny-llama, hidden {ns.hidden}, {ns.layers} layers, vocabulary {policy.config.vocab_size}, "
        f"{params / 1e6:.1f} M parameters; batch {ns.pairs} pairs, {tokens} tokens (HH, max_length {ns.max_length}, "
        f"stacked layout, chunked LM head); {device_line(ns)}. {ns.rounds} rounds × {ns.steps} steps per "
        f"configuration, alternated; {'process CPU time' if clock == 'process' else 'wall time'} per step.",
        "",
        "| configuration | median step (ms) | step-time ratio to DPO (median over rounds) | ratio range "
        "(10th–90th pct) |",
        "|---|---|---|---|",
    ]
    base = times["DPO"]
    figures: dict[str, dict[str, float]] = {}
    for name, values in times.items():
        ratios = sorted(v / b for v, b in zip(values, base, strict=True))
        lo, hi = ratios[int(0.1 * (len(ratios) - 1))], ratios[round(0.9 * (len(ratios) - 1))]
        figures[name] = {"step_s": statistics.median(values), "time_ratio_to_dpo": statistics.median(ratios),
                         "ratio_p10": lo, "ratio_p90": hi}
        lines.append(f"| {name} | {statistics.median(values) * 1e3:.1f} | {statistics.median(ratios):.3f} | "
                     f"{lo:.3f}–{hi:.3f} |")
    emit_table("\n".join(lines) + "\n", ns.out)
    result = {"device": device_line(ns), "shape": shape_argv(ns), "clock": clock, "configs": figures}
    if ns.json:
        with open(ns.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
