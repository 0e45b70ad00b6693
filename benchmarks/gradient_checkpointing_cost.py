"""Gradient checkpointing (TRL's DPOConfig default: on) against off, for our DPO step: step time alternated in one
run, and the step's peak memory above idle in a fresh process for each.

    .venv/bin/python benchmarks/gradient_checkpointing_cost.py [--hidden 256 --layers 4 --pairs 8 --max_length 256]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_shape_arguments, build, device_line, make_trainer, one_step, shape_argv, step_memory, warm_up


def trainer_for(ns, workdir: str, checkpointing: bool):
    import torch

    policy, tok, batch = build(ns.pairs, ns.hidden, ns.layers, ns.max_length, workdir, ns.vocab, shared_prompt=True)
    trainer = make_trainer(policy, tok, os.path.join(workdir, str(checkpointing)), {"trace_pairs": False},
                           torch.cuda.is_available())
    if checkpointing:  # what Trainer.train() does with gradient_checkpointing=True
        trainer.accelerator.unwrap_model(trainer.model).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    return trainer, batch


def main() -> None:
    parser = argparse.ArgumentParser()
    add_shape_arguments(parser, pairs=8, hidden=256, layers=4, max_length=256)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", choices=("on", "off"), help=argparse.SUPPRESS)  # internal: memory of one
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        if ns.only:
            trainer, batch = trainer_for(ns, workdir, ns.only == "on")
            warm_up(trainer, batch)
            print(json.dumps(step_memory(trainer, batch)))
            return
        runs = {flag: trainer_for(ns, workdir, flag) for flag in (False, True)}
        for trainer, batch in runs.values():
            warm_up(trainer, batch)
        times: dict[bool, list[float]] = {False: [], True: []}
        ratios = []
        for r in range(ns.rounds):
            now = {flag: statistics.median(one_step(t, b) for _ in range(ns.steps)) for flag, (t, b) in runs.items()}
            for flag, value in now.items():
                times[flag].append(value)
            ratios.append(now[True] / now[False])
            print(f"round {r + 1}/{ns.rounds}: off {now[False] * 1e3:.0f} ms, on {now[True] * 1e3:.0f} ms",
                  file=sys.stderr)
    memory = {}
    for flag in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, *shape_argv(ns), "--only", flag], capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
        m = json.loads(out)
        memory[flag] = (m["peak"] - m["idle"]) / 2**20
    off, on = statistics.median(times[False]) * 1e3, statistics.median(times[True]) * 1e3
    print(f"{device_line(ns)}; {ns.pairs} pairs, hidden {ns.hidden}, {ns.layers} layers, max_length {ns.max_length}"
          f"\n\n| gradient checkpointing | median step (ms) | step memory above idle (MiB) |\n|---|---|---|\n"
          f"| off | {off:.1f} | {memory['off']:.0f} |\n| on | {on:.1f} | {memory['on']:.0f} |\n\n"
          f"on/off: step time {statistics.median(ratios):.3f} (median over rounds), memory "
          f"{memory['on'] / memory['off']:.3f}")


if __name__ == "__main__":
    main()
