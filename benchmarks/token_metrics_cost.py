"""What TRL's token metrics (entropy, logits/*, mean_token_accuracy) cost: our DPO step with token_metrics on vs
off, alternated in one run, median ratio.

    .venv/bin/python benchmarks/token_metrics_cost.py [--hidden 256 --layers 4 --pairs 8 --max_length 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_shape_arguments, build, device_line, make_trainer, one_step, warm_up


def main() -> None:
    parser = argparse.ArgumentParser()
    add_shape_arguments(parser, pairs=8, hidden=256, layers=4, max_length=256)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    ns = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as workdir:
        policy, tok, batch = build(ns.pairs, ns.hidden, ns.layers, ns.max_length, workdir, ns.vocab,
                                   shared_prompt=True)
        trainers = {flag: make_trainer(policy, tok, os.path.join(workdir, str(flag)),
                                       {"token_metrics": flag, "trace_pairs": False}, cuda) for flag in (False, True)}
        for trainer in trainers.values():
            warm_up(trainer, batch)
        ratios, times = [], {False: [], True: []}
        for r in range(ns.rounds):
            now = {flag: statistics.median(one_step(t, batch) for _ in range(ns.steps)) for flag, t in trainers.items()}
            for flag in now:
                times[flag].append(now[flag])
            ratios.append(now[True] / now[False])
            print(f"round {r + 1}/{ns.rounds}: off {now[False] * 1e3:.0f} ms, on {now[True] * 1e3:.0f} ms",
                  file=sys.stderr)
    off, on = statistics.median(times[False]) * 1e3, statistics.median(times[True]) * 1e3
    print(f"{device_line(ns)}\n\n| token_metrics | median step (ms) |\n|---|---|\n| off | {off:.1f} |\n"
          f"| on | {on:.1f} |\n\nstep-time ratio on/off (median over rounds): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
