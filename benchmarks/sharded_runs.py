"""The same short DPO run placed three ways on one GPU: one process, FSDP2 and DeepSpeed ZeRO-3 (issue 13). The
policy and the reference are sharded under the last two (adaptdpo/training/reference.py); on one GPU a shard is the
whole model, so this checks that the paths run and train the same, not what sharding saves (that needs 2+ GPUs).

    python3 benchmarks/sharded_runs.py --out runs/gpu/sharded.md      # on a CUDA machine (gpu_suite.sh sharded)

Each placement trains the tiny-llama preset at the given shape from the same seed on the shipped HH split for
--steps optimizer steps, bf16 autocast over fp32 weights. Reported: the loss at every logged step against the
one-process run's, seconds per step after the first, peak CUDA memory. Finished placements are kept in
<workdir>/results.jsonl and skipped when the command is run again; ZeRO-3 is skipped when deepspeed is not
installed (`make -f benchmarks/gpu/Makefile gpu-wheels-deepspeed` builds a wheel for the GPU machine).

``--cpu`` (the dry run of gpu_suite.sh first): the one-process run on the CPU in this process, float32; the sharded
placements are not run (accelerate puts FSDP and DeepSpeed on GPUs only): their launch commands are built and
checked, and their rows say so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ResultCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLACEMENTS = {"one process": [], "FSDP2": ["--accelerate_config", "fsdp2", "--num_processes", "1"],
              "ZeRO-3": ["--accelerate_config", "zero3", "--num_processes", "1"]}


def train_args(name: str, ns: argparse.Namespace, out: str) -> list[str]:
    """``adaptdpo train``'s arguments for one placement."""
    return [os.path.join(ROOT, "configs", "tiny-cpu.yaml"), *PLACEMENTS[name],
            "--use_cpu", str(ns.cpu).lower(), "--bf16", "false" if ns.cpu else "auto",
            "--tiny_hidden_size", str(ns.hidden), "--tiny_num_layers", str(ns.layers),
            "--tiny_num_heads", str(max(1, ns.hidden // 64)), "--tokenizer_vocab_size", str(ns.vocab),
            "--max_length", str(ns.max_length), "--max_prompt_length", str(ns.max_length // 2),
            "--per_device_train_batch_size", "8", "--learning_rate", "1e-5", "--max_steps", str(ns.steps),
            "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", "--plots", "false",
            "--output_dir", out]


def train(name: str, ns: argparse.Namespace) -> dict:
    out = os.path.join(ns.workdir, name.replace(" ", "-"))
    shutil.rmtree(out, ignore_errors=True)
    args = train_args(name, ns, out)
    if ns.cpu:
        from adaptdpo.cli import accelerate_launch_command

        if PLACEMENTS[name]:  # FSDP2 / ZeRO-3: GPUs only; the launch command must still be a valid one
            launch = accelerate_launch_command(args)
            assert launch is not None and "--config_file" in launch, launch
            return {"skipped": "CPU dry run: accelerate puts FSDP and DeepSpeed on GPUs only (launch command "
                               "checked, not run)"}
        from adaptdpo.training.config_io import parse_config
        from adaptdpo.training.job import run_training

        run_training(parse_config(args[1:], yaml_path=args[0]))
    else:
        done = subprocess.run([sys.executable, "-m", "adaptdpo", "train", *args], cwd=ROOT, capture_output=True,
                              text=True)
        if done.returncode != 0:
            return {"error": done.stderr[-1500:]}
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as fh:
        logs = [r for r in map(json.loads, fh) if "loss" in r]
    times = [r["time"] for r in logs]
    return {"losses": [r["loss"] for r in logs],
            "s_per_step": (times[-1] - times[0]) / max(1, len(times) - 1),
            "peak_cuda_gib": summary.get("peak_cuda_allocated_bytes", 0) / 2**30, "versions": summary["versions"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=8192, help="the tokenizer's vocabulary (trained on the data)")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=list(PLACEMENTS))
    parser.add_argument("--cpu", action="store_true", help="the dry run: see the module docstring")
    parser.add_argument("--workdir", default="runs/sharded")
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    ns = parser.parse_args(argv)
    ns.placements = ["one process", *(p for p in ns.placements if p != "one process")]
    cache = ResultCache(ns.workdir)
    shape = f"hidden {ns.hidden}, {ns.layers} layers, {ns.steps} steps" + (", CPU" if ns.cpu else "")
    for name in ns.placements:
        key = f"{name} | {shape}"
        if key in cache.done:
            continue
        if name == "ZeRO-3" and importlib.util.find_spec("deepspeed") is None:
            print("ZeRO-3 skipped: deepspeed is not installed", file=sys.stderr)
            continue
        print(f"training: {name} ({shape})", file=sys.stderr)
        cache.add(key, train(name, ns))
    base = cache.done.get(f"one process | {shape}", {})
    where = "float32 on the CPU (dry run)" if ns.cpu else "bf16 autocast over fp32 weights, one GPU"
    lines = [f"Shape: tiny-llama, {shape}, 8 HH pairs a step (max_length {ns.max_length}), {where}.", "",
             "| placement | max abs loss diff vs one process | s/step | peak CUDA GiB |", "|---|---|---|---|"]
    for name in ns.placements:
        result = cache.done.get(f"{name} | {shape}")
        if result is None:
            lines.append(f"| {name} | not run | | |")
        elif "skipped" in result:
            lines.append(f"| {name} | skipped: {result['skipped']} | | |")
        elif "error" in result:
            lines.append(f"| {name} | failed: {result['error'].strip().splitlines()[-1][:150]} | | |")
        else:
            diff = max((abs(a - b) for a, b in zip(result["losses"], base.get("losses", []), strict=False)),
                       default=float("nan"))
            lines.append(f"| {name} | {diff:.2e} | {result['s_per_step']:.3f} | {result['peak_cuda_gib']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if ns.out:
        with open(ns.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    if ns.json:
        with open(ns.json, "w", encoding="utf-8") as fh:
            json.dump({name: cache.done.get(f"{name} | {shape}") for name in ns.placements}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
