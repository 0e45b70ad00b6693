"""Real-text smoke check: DPO, β-DPO and SamS on the shipped Anthropic HH split, clean and with 20% flips.

    .venv/bin/python benchmarks/hh_check.py [--seeds 1] [--out docs/hh_check.md]

A tiny Llama-shaped model trained from scratch (random weights, a BPE tokenizer trained on the data) on
the first 1,800 valid pairs of data/hh-rlhf (MIT), evaluated on the last 400 by the implicit-reward
accuracy (`eval_rewards/accuracies`, the usual DPO test accuracy) and margin. With 20% flips, a random
fifth of the *training* pairs get chosen and rejected swapped; the held-out labels stay as given. A model
this small learns no language: what it can pick up is surface statistics of chosen vs rejected text, so
this is a weak signal — a check that nothing breaks on real text, not evidence for or against a method.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import HH, mean_std

from adaptdpo.data.rows import load_preference_rows
from adaptdpo.training.config_io import parse_config
from adaptdpo.training.job import run_training

METHODS = {"dpo": {"method": "dpo"}, "beta_dpo": {"method": "beta_dpo"},
           "sams": {"method": "sams", "sams_ratio": 0.5, "sams_warmup_rounds": 10}}
SETTINGS = {"model_name_or_path": "tiny-llama", "tiny_hidden_size": 64, "tiny_num_layers": 2, "tiny_num_heads": 2,
            "tokenizer_vocab_size": 2048, "max_length": 128, "max_prompt_length": 64,
            "per_device_train_batch_size": 16, "per_device_eval_batch_size": 64, "num_train_epochs": 1,
            "learning_rate": 1e-3, "lr_scheduler_type": "constant_with_warmup", "warmup_steps": 5, "beta": 0.1,
            "logging_steps": 20, "save_strategy": "no", "use_cpu": True, "disable_tqdm": True, "plots": False,
            "report_to": "none", "resume": "never"}


def write_split(rows: list[dict], path: str, flip_rate: float, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            flip = rng.random() < flip_rate
            chosen, rejected = (r["rejected"], r["chosen"]) if flip else (r["chosen"], r["rejected"])
            fh.write(json.dumps({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--out", default=None)
    ns = parser.parse_args()
    logging.disable(logging.WARNING)
    rows, _ = load_preference_rows(HH, skip_invalid=True)
    train, held = rows[:1800], rows[-400:]
    results: dict[tuple[str, float], list[dict]] = {}
    with tempfile.TemporaryDirectory() as work:
        write_split(held, os.path.join(work, "eval.jsonl"), 0.0, 0)
        for seed in range(ns.seeds):
            for flip in (0.0, 0.2):
                data = os.path.join(work, f"train-{flip}-{seed}.jsonl")
                write_split(train, data, flip, seed)
                for name, preset in METHODS.items():
                    settings = {**SETTINGS, **preset, "train_file": data, "eval_file": os.path.join(work, "eval.jsonl"),
                                "output_dir": os.path.join(work, "run"), "seed": seed}
                    argv = [x for k, v in settings.items() for x in (f"--{k}", str(v))]
                    import shutil

                    shutil.rmtree(os.path.join(work, "run"), ignore_errors=True)
                    summary = run_training(parse_config(argv))
                    ev = summary["final_eval"]
                    results.setdefault((name, flip), []).append(ev)
                    print(f"{name} flips {flip} seed {seed}: accuracy {ev['eval_rewards/accuracies']:.3f} "
                          f"({summary['wall_time_s']:.0f} s)", file=sys.stderr)
    lines = ["| labels | method | seeds | held-out implicit-reward accuracy | held-out margin |",
             "|---|---|---|---|---|"]
    for (name, flip), evs in results.items():
        acc = mean_std([e["eval_rewards/accuracies"] for e in evs])
        margin = mean_std([e["eval_rewards/margins"] for e in evs])
        lines.append(f"| {'clean' if flip == 0 else '20% flipped'} | {name} | {len(evs)} | {acc} | {margin} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if ns.out:
        with open(ns.out, "w", encoding="utf-8") as fh:
            fh.write(table)


if __name__ == "__main__":
    main()
