"""Profile one DPO training step (torch.profiler): where the time of a step goes.

    python benchmarks/profile_step.py [--hidden 1024 --layers 24 --vocab 32000 --pairs 16 --max_length 512]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_shape_arguments, build, make_trainer, one_step


def main() -> None:
    parser = argparse.ArgumentParser()
    add_shape_arguments(parser, pairs=16, hidden=1024, layers=24, max_length=512, vocab=32000)
    parser.add_argument("--method", default="dpo")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--shared_prompt", action="store_true", help="profile the packed (shared-prompt) layout")
    ns = parser.parse_args()
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as workdir:
        policy, tok, batch = build(ns.pairs, ns.hidden, ns.layers, ns.max_length, workdir, ns.vocab,
                                   shared_prompt=ns.shared_prompt)
        print(f"tokens in the batch: {int(batch['attention_mask'].sum())}")
        trainer = make_trainer(policy, tok, workdir, {"method": ns.method}, cuda)
        for _ in range(3):
            print(f"step {one_step(trainer, batch) * 1e3:.1f} ms")
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            print(f"profiled step {one_step(trainer, batch) * 1e3:.1f} ms")
        key = "cuda_time_total" if cuda else "self_cpu_time_total"  # on CPU: where the time is spent, op by op
        print(prof.key_averages().table(sort_by=key, row_limit=ns.rows, max_name_column_width=60))
        if not cuda:
            return
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
