"""Shared pieces of the benchmarks: a tiny-llama of any shape, a tokenised HH batch, timed steps."""

from __future__ import annotations

import copy
import os
import platform
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adaptdpo.data.collate import PreferenceCollator, batch_to, pairs_in_batch
from adaptdpo.data.rows import load_preference_rows
from adaptdpo.data.tokenize import tokenize_rows
from adaptdpo.models.tiny import build_tiny_model, text_fingerprint, tiny_model_config, train_tokenizer
from adaptdpo.training.config import AdaptiveDPOConfig
from adaptdpo.training.trainer import AdaptiveDPOTrainer

HH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "hh-rlhf",
                  "harmless-base-test.jsonl.gz")


def build(pairs: int, hidden: int, layers: int, max_length: int, workdir: str, vocab: int = 0,
          shared_prompt: bool = False, padding_free: bool = False, model: bool = True):
    """(policy, tokenizer, collated batch of ``pairs`` HH pairs; packed when ``shared_prompt``, every pair in one row
    when ``padding_free``). ``model=False``: no policy (None), only the batch (a 0.5 B model takes seconds to
    initialise)."""
    rows, _ = load_preference_rows(HH, skip_invalid=True, limit=max(pairs, 256))
    texts = [r[k] for r in rows for k in ("prompt", "chosen", "rejected")]
    tok = train_tokenizer(texts, 2048, os.path.join(workdir, "tok-" + text_fingerprint(texts, 2048)))
    cfg = tiny_model_config("tiny-llama", max(len(tok), vocab), hidden, layers, max(1, hidden // 64), max_length,
                            tok.pad_token_id, tok.eos_token_id)
    policy = build_tiny_model(cfg, seed=0) if model else None
    examples, _ = tokenize_rows(rows[:pairs], tok, max_length=max_length, max_prompt_length=max_length // 2)
    collator = PreferenceCollator(tok.pad_token_id, shared_prompt=shared_prompt or padding_free,
                                  padding_free=padding_free)
    return policy, tok, collator(examples)


def add_shape_arguments(parser: Any, pairs: int, hidden: int, layers: int, max_length: int, vocab: int = 0) -> None:
    """The model and batch shape every benchmark takes: ``--pairs --hidden --layers --max_length --vocab``."""
    parser.add_argument("--pairs", type=int, default=pairs, help="preference pairs per step")
    parser.add_argument("--hidden", type=int, default=hidden, help="hidden size of the Llama-shaped model")
    parser.add_argument("--layers", type=int, default=layers, help="decoder layers")
    parser.add_argument("--max_length", type=int, default=max_length, help="tokens per prompt + completion")
    parser.add_argument("--vocab", type=int, default=vocab, help="vocabulary size of the model (0: the tokenizer's)")


def shape_argv(ns: Any) -> list[str]:
    """``ns``'s shape as command-line arguments (for a benchmark's fresh-process measurements)."""
    return [arg for name in ("pairs", "hidden", "layers", "max_length", "vocab")
            for arg in (f"--{name}", str(getattr(ns, name)))]


def prepare(trainer: Any) -> Any:
    """What Trainer.train() does before the first step: wrap the policy (autocast on GPU), make the optimizer."""
    trainer.model = trainer.model_wrapped = trainer.accelerator.prepare_model(trainer.model)
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def make_trainer(policy, tok, workdir, overrides, cuda: bool):
    args = AdaptiveDPOConfig(output_dir=workdir, use_cpu=not cuda, bf16=cuda, learning_rate=1e-5,
                             report_to="none", **overrides)
    trainer = AdaptiveDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(policy), args=args,
                                 processing_class=tok)
    return prepare(trainer)


def one_step(trainer, batch) -> float:
    """Wall time of one optimizer step (forward, backward, optimizer), synchronised on GPU."""
    n = pairs_in_batch(batch)
    policy = getattr(trainer, "step_policy", None)
    items = torch.tensor(policy.num_trained(n) if policy is not None else n)
    device = trainer.args.device
    batch = batch_to({k: v for k, v in batch.items() if k != "pair_id" or policy is not None}, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    trainer.training_step(trainer.model, batch, items.to(device))
    trainer.optimizer.step()
    trainer.model.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - start


def warm_up(trainer, batch, steps: int = 2) -> None:
    """``steps`` untimed steps; then a SamS scheduler's replay pool is topped up to its steady-state size.

    The scheduler fits on the previous round plus ``sams_pool_batches`` pool rounds; a short benchmark
    would otherwise time the fit on the few rounds seen so far. The pool is filled with copies of the
    rounds it holds: the fit's cost depends on the number of rows, not on their values.
    """
    for _ in range(steps):
        one_step(trainer, batch)
    policy = getattr(trainer, "step_policy", None)
    sams = getattr(policy, "sams", policy)  # β-DPO+SamS wraps a SamsPolicy
    scheduler = getattr(sams, "scheduler", None)
    if scheduler is not None and scheduler.pool:
        held = list(scheduler.pool)
        while len(scheduler.pool) < min(trainer.args.sams_pool_batches, trainer.args.sams_pool_capacity):
            scheduler.pool.append(held[len(scheduler.pool) % len(held)])
        one_step(trainer, batch)


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def step_memory(trainer, batch) -> dict[str, int]:
    """Peak memory of one step above the idle baseline (call in a fresh process, after warm-up steps).

    CPU: the resident-set high-water mark (VmHWM) during the step, reset just before it through
    /proc/self/clear_refs once freed memory went back to the system (malloc_trim); idle = the resident set
    then. CUDA: max_memory_allocated during the step minus the allocated memory before it.
    """
    import ctypes
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        idle = torch.cuda.memory_allocated()
        one_step(trainer, batch)
        return {"idle": idle, "peak": torch.cuda.max_memory_allocated()}
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    idle = _status("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # reset VmHWM to the current resident set
    one_step(trainer, batch)
    return {"idle": idle, "peak": _status("VmHWM")}


def matmul_params(model: torch.nn.Module) -> int:
    """N of the 8·N·T FLOP model: parameters of the linear layers (embeddings are lookups, not matmuls)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def device_line(ns: Any) -> str:
    if torch.cuda.is_available():
        return f"bf16 autocast on {torch.cuda.get_device_name()}, torch {torch.__version__}"
    return (f"fp32 on CPU, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
            f"torch {torch.__version__}")


def mean_std(values: list[float]) -> str:
    """"mean ± sample std" over seeds ("–" where a value is NaN: not applicable)."""
    import statistics

    if any(v != v for v in values):
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def emit_table(table: str, out: str | None) -> None:
    """Print a markdown table and, when asked, write it to ``out``."""
    print(table)
    if out:
        with open(out, "w", encoding="utf-8") as fh:
            fh.write(table)


class ResultCache:
    """A JSONL file of finished runs (``{"key": ..., "result": ...}`` per line): a benchmark that is interrupted
    resumes where it stopped, and tables can be redrawn without training again."""

    def __init__(self, workdir: str, path: str | None = None):
        import json

        os.makedirs(workdir, exist_ok=True)
        self.path = path or os.path.join(workdir, "results.jsonl")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.done: dict[str, dict] = {}
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as fh:
                lines = fh.readlines()
            for number, line in enumerate(lines, start=1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if number == len(lines) and not line.endswith("\n"):  # a write cut short by a kill: redone
                        print(f"{self.path}: line {number} was cut short (the run is done again)", file=sys.stderr)
                        with open(self.path, "w", encoding="utf-8") as fh:
                            fh.writelines(lines[:-1])
                        break
                    raise ValueError(f"{self.path}: line {number}: not a result record") from None
                self.done[record["key"]] = record["result"]

    def add(self, key: str, result: dict) -> None:
        import json

        self.done[key] = result
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"key": key, "result": result}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

