"""What a SamS step costs next to a DPO step: wall time (alternated in one process) and peak memory above
idle (a fresh process per configuration), same model, same batch.

    .venv/bin/python benchmarks/sams_cost.py [--rounds 8] [--out docs/sams_cost.md]

Configurations: DPO; SamS ``mask`` (the paper's compute: one forward with gradient on all n pairs) and
``subset`` (a no-grad forward on all n pairs, then forward and backward on the k selected ones), both at
ratio 0.5 with the ``small`` scheduler, in steady state (the replay pool holds the 32 rounds the scheduler
fits on, common.warm_up); β-DPO+SamS subset. Each once with the live reference model and once
with precomputed reference log-probs (then the reference forward is gone from every configuration).

Memory on CPU: the process's resident-set high-water mark (VmHWM) during one step, after resetting it
(``/proc/self/clear_refs``) once the model, the optimiser state and two warm-up steps are in place and
freed memory has been handed back to the system (``malloc_trim``); "above idle" subtracts the resident set
at that moment. On CUDA: ``max_memory_allocated`` minus the allocated memory before the step; there
``--memory_in_process`` measures it in the timing process, after the timed rounds (exact on CUDA whatever else is
resident; on the CPU only indicative). ``--configs`` picks configurations, ``--layout packed`` times our default
shared-prompt rows instead of TRL's stacked ones, ``--json`` writes the figures for benchmarks/gpu_first.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    add_shape_arguments,
    build,
    device_line,
    emit_table,
    make_trainer,
    one_step,
    shape_argv,
    step_memory,
    warm_up,
)

from adaptdpo.data.collate import batch_to

SAMS = {"sams_ratio": 0.5, "sams_warmup_rounds": 1, "sams_preset": "small"}
CONFIGS = {
    "dpo": {"method": "dpo"},
    "sams mask": {"method": "sams", "sams_mode": "mask", **SAMS},
    "sams subset": {"method": "sams", "sams_mode": "subset", **SAMS},
    "beta_dpo+sams subset": {"method": "beta_dpo+sams", "sams_mode": "subset", "beta_dpo_keep_ratio": 1.0, **SAMS},
}


def _with_reference_columns(trainer, batch):
    """Precomputed reference: the batch carries the reference log-probs, as the cached dataset column would."""
    ref_chosen, ref_rejected, _, _ = trainer.reference_logps(batch)
    return {**batch, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}


def build_setup(ns, workdir, name: str, precomputed: bool, policy=None):
    cuda = torch.cuda.is_available()
    built, tok, batch = build(ns.pairs, ns.hidden, ns.layers, ns.max_length, workdir, ns.vocab,
                              shared_prompt=ns.layout == "packed", model=policy is None)
    policy = built if policy is None else policy
    trainer = make_trainer(policy, tok, os.path.join(workdir, name.replace(" ", "_")), CONFIGS[name], cuda)
    if precomputed:
        batch = _with_reference_columns(trainer, batch_to(batch, trainer.args.device))
        trainer.ref_model = None
    return trainer, batch


def measure_memory(ns, name: str, precomputed: bool) -> dict:
    """In this (fresh) process: peak memory of one step above the idle baseline."""
    with tempfile.TemporaryDirectory() as workdir:
        trainer, batch = build_setup(ns, workdir, name, precomputed)
        warm_up(trainer, batch, ns.warmup_steps)
        return step_memory(trainer, batch)


def memory_in_fresh_process(ns, name: str, precomputed: bool) -> dict:
    argv = [sys.executable, __file__, "--memory-of", name, "--layout", ns.layout, *shape_argv(ns)]
    argv += ["--precomputed"] if precomputed else []
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_steps(ns, precomputed: bool) -> tuple[dict[str, list[float]], dict[str, dict]]:
    """Per-round median step time of every configuration, alternated within rounds; with ``--memory_in_process``
    each one's step memory, measured after the rounds."""
    with tempfile.TemporaryDirectory() as workdir:
        # one random model (on the CPU) copied for every configuration; built per configuration, the same seed would
        # give the same weights, only more slowly
        policy = build(ns.pairs, ns.hidden, ns.layers, ns.max_length, workdir, ns.vocab)[0]
        setups = {name: build_setup(ns, workdir, name, precomputed, policy) for name in ns.configs}
        for trainer, batch in setups.values():  # SamS: its scheduler fits on a full-size pool, as in a long run
            warm_up(trainer, batch, ns.warmup_steps)
        rounds: dict[str, list[float]] = {name: [] for name in ns.configs}
        for r in range(ns.rounds):
            order = list(setups) if r % 2 == 0 else list(reversed(setups))  # no configuration always first
            for name in order:
                trainer, batch = setups[name]
                rounds[name].append(statistics.median(one_step(trainer, batch) for _ in range(ns.steps)))
            print(f"round {r + 1}/{ns.rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in rounds.items()),
                  file=sys.stderr)
        memory = {name: step_memory(*setups[name]) for name in ns.configs} if ns.memory_in_process else {}
        return rounds, memory


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="steps per configuration per round")
    parser.add_argument("--warmup_steps", type=int, default=2, help="untimed steps per configuration first")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME",
                        help=f"which configurations (dpo always): {', '.join(CONFIGS)}")
    parser.add_argument("--layout", default="stacked", choices=("stacked", "packed"),
                        help="TRL's stacked rows (default) or our shared-prompt packed rows")
    parser.add_argument("--memory_in_process", action="store_true", help="step memory in the timing process "
                        "(exact on CUDA) instead of a fresh process per configuration")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    add_shape_arguments(parser, pairs=16, hidden=256, layers=8, max_length=256)
    parser.add_argument("--out", default=None, help="markdown file to write the table to")
    parser.add_argument("--references", default="live,precomputed",
                        help="which reference setups to measure: live, precomputed or both")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--precomputed", action="store_true", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    ns.configs = ["dpo", *(name for name in ns.configs if name != "dpo")]
    torch.manual_seed(0)
    if ns.memory_of:
        print(json.dumps(measure_memory(ns, ns.memory_of, ns.precomputed)))
        return None
    where = ("in the timing process, after the rounds" + ("" if torch.cuda.is_available() else " (indicative)")
             if ns.memory_in_process else "in a fresh process per configuration")
    layout = "our shared-prompt packed rows" if ns.layout == "packed" else "TRL's stacked rows"
    lines = [f"Model: tiny-llama hidden {ns.hidden}, {ns.layers} layers, vocabulary {max(ns.vocab, 2048)}; "
             f"{ns.pairs} HH pairs per step, max_length {ns.max_length}, {layout}; {device_line(ns)}. SamS at ratio "
             f"0.5, `small` scheduler, full replay pool. Time: median over {ns.rounds} alternated rounds of the "
             f"per-round median of {ns.steps} steps; ratio to DPO per round, median [min–max]. Memory: peak above "
             f"idle, {where}.", "",
             "| reference | configuration | step time (ms) | time / DPO | peak above idle (MiB) | memory / DPO |",
             "|---|---|---|---|---|---|"]
    figures: dict[str, dict] = {}
    for precomputed in [kind == "precomputed" for kind in ns.references.split(",")]:
        rounds, memory = time_steps(ns, precomputed)
        if not memory:
            memory = {name: memory_in_fresh_process(ns, name, precomputed) for name in ns.configs}
        base_mem = memory["dpo"]["peak"] - memory["dpo"]["idle"]
        reference = "precomputed" if precomputed else "live model"
        for name in ns.configs:
            ratios = [a / b for a, b in zip(rounds[name], rounds["dpo"], strict=True)]
            above = memory[name]["peak"] - memory[name]["idle"]
            figures[f"{reference} | {name}"] = {"step_s": statistics.median(rounds[name]),
                                                "time_ratio_to_dpo": statistics.median(ratios),
                                                "memory_bytes": above, "memory_ratio_to_dpo": above / base_mem}
            lines.append(f"| {reference} | {name} | "
                         f"{statistics.median(rounds[name]) * 1e3:.0f} | {statistics.median(ratios):.3f} "
                         f"[{min(ratios):.3f}–{max(ratios):.3f}] | {above / 2**20:.0f} | {above / base_mem:.3f} |")
    emit_table("\n".join(lines) + "\n", ns.out)
    result = {"device": device_line(ns), "shape": shape_argv(ns), "layout": ns.layout, "configs": figures}
    if ns.json:
        with open(ns.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
