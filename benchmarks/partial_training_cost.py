"""Step time of SmolLM2-135M-Instruct on the CPU: full fine-tuning against the top K blocks over the frozen-prefix
cache, in float32 and under bf16 autocast, side by side in one run (docs/performance.md).

    .venv/bin/python benchmarks/partial_training_cost.py --pairs 16 --max_length 160 --top 4 --rounds 3 \
        --out docs/partial_training_cost.md

One step = forward and backward of policy and reference (reference without gradient) and the optimizer step,
on one batch of HH pairs (shared-prompt layout, the default for SmolLM2). The cached rows are timed after a
first step that fills the cache (later epochs, seeds and methods read it); the first step's cost is reported too.
Target (the evidence issue): top-4 bf16 with the cache at most 0.15x full fp32.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from common import HH, emit_table, one_step, prepare

from adaptdpo.data.collate import PreferenceCollator
from adaptdpo.data.rows import load_preference_rows
from adaptdpo.data.tokenize import tokenize_rows
from adaptdpo.models.loading import load_pretrained, load_tokenizer
from adaptdpo.training.config import AdaptiveDPOConfig, cpu_has_native_bf16
from adaptdpo.training.trainer import AdaptiveDPOTrainer

MODEL = "smollm2-135m-instruct"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=160)
    parser.add_argument("--top", type=int, default=4, help="trainable_layers of the top-K rows")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per configuration (median)")
    parser.add_argument("--out", default=None)
    ns = parser.parse_args(argv)
    os.environ["ADAPTDPO_CPU_BF16"] = "1"
    tok = load_tokenizer(MODEL)
    rows, _ = load_preference_rows(HH, skip_invalid=True, limit=ns.pairs)
    examples, _ = tokenize_rows(rows[: ns.pairs], tok, max_length=ns.max_length, max_prompt_length=ns.max_length // 2)
    batch = PreferenceCollator(tok.pad_token_id, shared_prompt=True)(examples)
    tokens = int(sum(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples))
    base = load_pretrained(MODEL, "float32")
    configs = [("full fine-tuning, fp32", None, False), ("full fine-tuning, bf16 autocast", None, True),
               (f"top {ns.top}, fp32, cache", ns.top, False), (f"top {ns.top}, bf16 autocast, cache", ns.top, True)]
    results = []
    for label, top, bf16 in configs:
        with tempfile.TemporaryDirectory() as workdir:
            args = AdaptiveDPOConfig(output_dir=workdir, use_cpu=True, bf16=bf16, learning_rate=1e-6,
                                     report_to="none", trainable_layers=top, activation_checkpointing=False)
            trainer = prepare(AdaptiveDPOTrainer(model=copy.deepcopy(base), ref_model=copy.deepcopy(base), args=args,
                                                 processing_class=tok))
            first = one_step(trainer, batch)
            times = [one_step(trainer, batch) for _ in range(ns.rounds)]
            results.append((label, first, statistics.median(times)))
            print(f"{label}: first step {first:.2f} s, median {statistics.median(times):.2f} s", file=sys.stderr)
            del trainer
    full = results[0][2]
    load = os.getloadavg()[1]  # over the last 5 minutes: other jobs on the machine slow every row
    lines = [f"SmolLM2-135M-Instruct, {ns.pairs} HH pairs ({tokens} tokens, max_length {ns.max_length}, shared-prompt "
             f"layout), forward + backward + optimizer step; CPU: {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads, native bf16: {cpu_has_native_bf16()}; torch {torch.__version__}; "
             f"{time.strftime('%Y-%m-%d')}. Median of {ns.rounds} steps after a first one (which fills the cache). "
             f"Load average at the end: {load:.1f} (above the core count: other jobs shared the cores).",
             "", "Command: `python benchmarks/partial_training_cost.py "
             f"--pairs {ns.pairs} --max_length {ns.max_length} --top {ns.top} --rounds {ns.rounds}`", "",
             "| configuration | first step (s) | step (s) | × full fp32 |", "|---|---|---|---|"]
    lines += [f"| {label} | {first:.2f} | {step:.2f} | {step / full:.2f} |" for label, first, step in results]
    emit_table("\n".join(lines) + "\n", ns.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
