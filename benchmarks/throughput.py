"""Throughput of a preference step: TRL 1.16's DPOTrainer against every adaptdpo configuration, side by side.

    .venv/bin/python benchmarks/throughput.py [--hidden 256 --layers 4 --pairs 8 --max_length 256] [--memory]
        [--configs NAME ...]

Same model (a Llama-shaped random model), same HH pairs, same precision, gradient checkpointing off in
all, the same optimizer; configurations alternate within each round and the table reports medians and
ratios to TRL. TRL and "adaptdpo dpo (stacked)" get TRL's collated layout; the other configurations our
default, the shared-prompt packed layout (each prompt encoded once). SamS at ratio 0.5 (`small`
scheduler), timed in steady state: its replay pool holds the 32 rounds the scheduler fits on
(common.warm_up). Achieved FLOP/s use the 8·N·T model of a DPO step (6N policy forward+backward, 2N
reference forward, N = matmul parameters, T = tokens of the stacked batch — the same T for every
configuration, so a configuration that does less work shows a higher "effective" rate), compared with
this machine's measured dense matmul throughput. Memory (``--memory``): the step's peak above idle, measured in a fresh
process per configuration (see common.step_memory); ``--memory_in_process``: in this process, after the timed rounds
(on CUDA exact: max_memory_allocated during the step minus the allocated memory before it, whatever else is resident;
on the CPU only indicative). ``--json``: the figures as JSON too (benchmarks/gpu_first.py reads them).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    add_shape_arguments,
    build,
    device_line,
    emit_table,
    make_trainer,
    matmul_params,
    one_step,
    prepare,
    shape_argv,
    step_memory,
    warm_up,
)

SAMS = {"sams_ratio": 0.5, "sams_warmup_rounds": 1}
OURS = {  # name → (config overrides, batch layout: stacked / packed / padding_free)
    "adaptdpo dpo (stacked)": ({"method": "dpo", "shared_prompt": "off"}, "stacked"),
    "adaptdpo dpo": ({"method": "dpo"}, "packed"),
    "adaptdpo beta_dpo": ({"method": "beta_dpo"}, "packed"),
    "adaptdpo sams mask": ({"method": "sams", "sams_mode": "mask", **SAMS}, "packed"),
    "adaptdpo sams subset": ({"method": "sams", "sams_mode": "subset", **SAMS}, "packed"),
    "adaptdpo beta_dpo+sams subset": ({"method": "beta_dpo+sams", "sams_mode": "subset", **SAMS}, "packed"),
    # the model's own LM head over the whole completion window (the default computes it 512 positions at a time,
    # adaptdpo/models/lm_head.py)
    "adaptdpo dpo plain head": ({"method": "dpo", "lm_head_chunk_size": None}, "packed"),
}
# FlexAttention (block-sparse branch masks) per row and padding-free: CUDA only (no FlexAttention backward on CPU)
FLEX = {
    "adaptdpo dpo flex": ({"method": "dpo"}, "packed"),
    "adaptdpo dpo flex padding-free": ({"method": "dpo", "padding_free": True}, "padding_free"),
}
if torch.cuda.is_available():
    OURS.update(FLEX)


def policy_for(name: str, policy):
    """The policy a configuration trains: the flex configurations get a copy with flex_attention."""
    if name not in FLEX:
        return policy
    flex = copy.deepcopy(policy)
    flex.set_attn_implementation("flex_attention")
    return flex


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


def memory_of(ns, name: str) -> dict[str, int]:
    """In this (fresh) process: build one configuration, warm it up, measure one step's peak above idle."""
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as workdir:
        layout = "stacked" if name == "TRL DPOTrainer" else OURS[name][1]
        policy, tok, batch = build(ns.pairs, ns.hidden, ns.layers, ns.max_length, workdir, ns.vocab,
                                   shared_prompt=layout == "packed", padding_free=layout == "padding_free")
        trainer = (make_trl_trainer(policy, tok, os.path.join(workdir, "t"), cuda) if name == "TRL DPOTrainer"
                   else make_trainer(policy_for(name, policy), tok, os.path.join(workdir, "t"), OURS[name][0], cuda))
        warm_up(trainer, batch)
        return step_memory(trainer, batch)


def memory_in_fresh_process(ns, name: str) -> dict[str, int]:
    argv = [sys.executable, __file__, "--only", name, *shape_argv(ns)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup_steps", type=int, default=2, help="untimed steps per configuration first")
    parser.add_argument("--peak_size", type=int, default=0, help="side of the square matmul whose throughput is the "
                        "reference (0: 8192 on CUDA, 1024 on the CPU)")
    add_shape_arguments(parser, pairs=8, hidden=256, layers=4, max_length=256)
    parser.add_argument("--out", default=None)
    parser.add_argument("--memory", action="store_true", help="also measure each step's peak memory above idle, "
                        "in a fresh process per configuration")
    parser.add_argument("--memory_in_process", action="store_true", help="the same, in this process after the timed "
                        "rounds (exact on CUDA, see the module docstring)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--configs", nargs="+", default=None, choices=list(OURS), metavar="NAME",
                        help="only these adaptdpo configurations (with TRL and 'adaptdpo dpo'); default all")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: memory of one configuration
    ns = parser.parse_args(argv)
    if ns.only:
        print(json.dumps(memory_of(ns, ns.only)))
        return None
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    memory = ns.memory or ns.memory_in_process
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        policy, tok, batch = build(ns.pairs, ns.hidden, ns.layers, ns.max_length, workdir, ns.vocab)
        _, _, packed = build(ns.pairs, ns.hidden, ns.layers, ns.max_length, workdir, ns.vocab, shared_prompt=True,
                             model=False)
        _, _, padding_free = build(ns.pairs, ns.hidden, ns.layers, ns.max_length, workdir, ns.vocab,
                                   padding_free=True, model=False)
        layouts = {"stacked": batch, "packed": packed, "padding_free": padding_free}
        trainers = {"TRL DPOTrainer": make_trl_trainer(policy, tok, os.path.join(workdir, "trl"), cuda)}
        batches = {"TRL DPOTrainer": batch}
        for i, (name, (overrides, layout)) in enumerate(OURS.items()):
            if ns.configs and name not in ns.configs and name != "adaptdpo dpo":
                continue
            trainers[name] = make_trainer(policy_for(name, policy), tok, os.path.join(workdir, str(i)), overrides, cuda)
            batches[name] = layouts[layout]
        for name, trainer in trainers.items():  # SamS: its scheduler fits on a full-size pool, as in a long run
            warm_up(trainer, batches[name], ns.warmup_steps)
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for r in range(ns.rounds):
            order = list(trainers) if r % 2 == 0 else list(reversed(trainers))
            for name in order:
                times[name].append(statistics.median(one_step(trainers[name], batches[name])
                                                     for _ in range(ns.steps)))
            print(f"round {r + 1}/{ns.rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()),
                  file=sys.stderr)
        in_process = {name: step_memory(trainer, batches[name]) for name, trainer in trainers.items()
                      } if ns.memory_in_process else {}
        machine = matmul_throughput(device, torch.bfloat16 if cuda else torch.float32,
                                    ns.peak_size or (8192 if cuda else 1024), 20 if cuda else 5)
    tokens = int(batch["attention_mask"].sum())
    n_matmul = matmul_params(policy)
    lines = [
        f"Model: Llama-shaped, hidden {ns.hidden}, {ns.layers} layers, vocabulary {policy.config.vocab_size}, "
        f"{sum(p.numel() for p in policy.parameters()) / 1e6:.1f} M parameters ({n_matmul / 1e6:.1f} M in "
        f"matmuls); batch {ns.pairs} pairs = {tokens} tokens (HH, max_length {ns.max_length}); {device_line(ns)}; "
        f"gradient checkpointing off in all. {ns.rounds} rounds × {ns.steps} steps, alternated. "
        f"Measured dense matmul throughput: {machine / 1e12:.2f} TFLOP/s.",
        "",
        "| configuration | median step (ms) | step-time ratio to TRL (median over rounds) | step-time ratio to "
        "adaptdpo dpo (median over rounds) | pairs/s | tokens/s | achieved TFLOP/s (8·N·T) | share of matmul "
        "throughput |" + (" step memory above idle (MiB) | memory ratio to TRL |" if memory else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if memory else ""),
    ]
    peak = in_process or ({name: memory_in_fresh_process(ns, name) for name in times} if ns.memory else {})
    def ratio_to(values: list[float], base: str) -> float:
        return statistics.median(v / b for v, b in zip(values, times[base], strict=True))

    figures: dict[str, dict] = {}
    for name, values in times.items():
        step = statistics.median(values)
        flops = 8 * n_matmul * tokens / step
        figures[name] = {"step_s": step, "time_ratio_to_trl": ratio_to(values, "TRL DPOTrainer"),
                         "pairs_per_s": ns.pairs / step, "tflops_8nt": flops / 1e12}
        row = (f"| {name} | {step * 1e3:.1f} | {ratio_to(values, 'TRL DPOTrainer'):.3f} | "
               f"{ratio_to(values, 'adaptdpo dpo'):.3f} | {ns.pairs / step:.1f} | {tokens / step:,.0f} | "
               f"{flops / 1e12:.3f} | {flops / machine:.1%} |")
        if memory:
            above = peak[name]["peak"] - peak[name]["idle"]
            trl = peak["TRL DPOTrainer"]["peak"] - peak["TRL DPOTrainer"]["idle"]
            row += f" {above / 2**20:.0f} | {above / trl:.3f} |"
            figures[name].update(memory_bytes=above, memory_ratio_to_trl=above / trl)
        lines.append(row)
    if ns.memory_in_process:
        lines.append("\nStep memory measured in this one process after the timed rounds"
                     + ("." if cuda else " (on the CPU only indicative: see the module docstring)."))
    emit_table("\n".join(lines) + "\n", ns.out)
    result = {"device": device_line(ns), "shape": shape_argv(ns), "tokens": tokens, "matmul_params": n_matmul,
              "matmul_tflops": machine / 1e12, "configs": figures}
    if ns.json:
        with open(ns.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
