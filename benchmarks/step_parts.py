"""Where a DPO step and a SamS subset step spend their time, part by part, alternated in one run.

    .venv/bin/python benchmarks/step_parts.py [--hidden 256 --layers 4 --pairs 8 --max_length 256 --rounds 6]

Same model, same packed HH batch. Parts: each ``sequence_logps`` call (policy with gradient, policy
without — the subset mode's scoring pass —, the reference), the SamS scheduler's round (lagged fit,
scoring, selection), and the rest of the step (loss, backward, optimizer step), as medians over rounds.
SamS in steady state (full replay pool, common.warm_up). This is the arithmetic behind the subset bar in
docs/performance.md: subset replaces half of the backward by a second, no-grad forward of the k pairs.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_shape_arguments, build, device_line, emit_table, make_trainer, one_step, warm_up

import adaptdpo.methods.sams.scheduler as scheduler_module
import adaptdpo.training.trainer as trainer_module

PARTS: dict[str, float] = collections.defaultdict(float)


def _timed_sequence_logps(original):
    def timed(model, batch, **kwargs):
        start = time.perf_counter()
        out = original(model, batch, **kwargs)
        reference = not any(p.requires_grad for p in model.parameters())
        kind = "reference forward" if reference else (
            "policy forward with grad" if torch.is_grad_enabled() else "policy scoring forward (no grad)")
        PARTS[f"{kind}, {batch['input_ids'].shape[0]} rows"] += time.perf_counter() - start
        return out
    return timed


def _timed_scheduler_step(original):
    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        out = original(self, *args, **kwargs)
        PARTS["scheduler (fit, score, select)"] += time.perf_counter() - start
        return out
    return timed


def main() -> None:
    parser = argparse.ArgumentParser()
    add_shape_arguments(parser, pairs=8, hidden=256, layers=4, max_length=256)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default=None)
    ns = parser.parse_args()
    trainer_module.sequence_logps = _timed_sequence_logps(trainer_module.sequence_logps)
    scheduler_module.SamsScheduler.step = _timed_scheduler_step(scheduler_module.SamsScheduler.step)
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    configs = {"dpo": {"method": "dpo"},
               "sams subset": {"method": "sams", "sams_mode": "subset", "sams_ratio": 0.5, "sams_warmup_rounds": 1}}
    with tempfile.TemporaryDirectory() as workdir:
        policy, tok, batch = build(ns.pairs, ns.hidden, ns.layers, ns.max_length, workdir, ns.vocab,
                                   shared_prompt=True)
        trainers = {name: make_trainer(policy, tok, os.path.join(workdir, name.replace(" ", "_")), overrides, cuda)
                    for name, overrides in configs.items()}
        for trainer in trainers.values():
            warm_up(trainer, batch)
        parts = {name: collections.defaultdict(list) for name in trainers}
        for r in range(ns.rounds):
            for name in trainers if r % 2 == 0 else reversed(trainers):
                PARTS.clear()
                total = one_step(trainers[name], batch)
                for part, seconds in PARTS.items():
                    parts[name][part].append(seconds)
                parts[name]["rest: loss, backward, optimizer step"].append(total - sum(PARTS.values()))
                parts[name]["whole step"].append(total)
    dpo_step = statistics.median(parts["dpo"]["whole step"])
    lines = [f"Llama-shaped, hidden {ns.hidden}, {ns.layers} layers; {ns.pairs} HH pairs, packed "
             f"(max_length {ns.max_length}); {device_line(ns)}; SamS at ratio 0.5, `small` scheduler, full "
             f"replay pool. Medians over {ns.rounds} alternated rounds.", "",
             "| configuration | part | median (ms) | share of the DPO step |", "|---|---|---|---|"]
    for name, by_part in parts.items():
        for part, values in by_part.items():
            value = statistics.median(values)
            lines.append(f"| {name} | {part} | {value * 1e3:.1f} | {value / dpo_step:.3f} |")
    emit_table("\n".join(lines) + "\n", ns.out)


if __name__ == "__main__":
    main()
