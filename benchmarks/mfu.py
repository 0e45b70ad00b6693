"""MFU of our DPO step: the model FLOPs it needs over its wall time, against the dense bf16 matmul peak measured
in the same process (issue 29 (c)).

    python3 benchmarks/mfu.py --hidden 1024 --layers 24 --vocab 32000 --pairs 16 --max_length 512   # on a GPU

Our default step (shared-prompt packed rows, the chunked LM head over the completion window, bf16 autocast over
float32 weights on CUDA), timed after warm-up steps. The FLOP count it assumes, per optimizer step:

    8·N·T + 8·H·V·W

- N: parameters of the decoder's linear layers (attention and MLP projections; not the embeddings, not the head);
- T: the tokens the forward processes (the packed rows' real tokens: each prompt once), so 6·N·T for the policy's
  forward and backward and 2·N·T for the reference's forward;
- H·V: the LM head, W the positions it is computed at (rows × the completion window, ``logits_to_keep``): 6·H·V·W for
  the policy (its recomputation in the chunked backward is not counted), 2·H·V·W for the reference.

Not counted: the attention's score and value products (at 512 tokens and hidden 1024 a few per cent more: the table
gives the causal estimate 8·layers·H·ΣL², L each row's length), norms, rotary embeddings, the loss, the optimizer.
MFU = that count / step time / the peak. The peak: the mean rate of ``--peak_repeats`` (50) products of two random
``--peak_size``² (8192²) bf16 matrices after three warm-ups (float32 on the CPU), timed with CUDA events, measured
right after the timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_shape_arguments, build, device_line, emit_table, make_trainer, matmul_params, one_step, warm_up


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """FLOP/s of a square matmul: the mean over ``repeats`` products after three untimed ones."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            a @ b
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        seconds = time.perf_counter() - t0
    return 2 * size**3 * repeats / seconds


def step_flops(policy: torch.nn.Module, batch: dict) -> dict[str, float]:
    """The FLOP count of the module docstring, and its parts, for one step on ``batch`` (packed rows)."""
    head = policy.get_output_embeddings()
    n_dec = matmul_params(policy) - head.weight.numel()
    vocab, hidden = head.weight.shape
    tokens = int(batch["attention_mask"].sum())
    window = int(batch.get("logits_to_keep", batch["input_ids"].shape[1]))
    head_positions = batch["input_ids"].shape[0] * window
    lengths = batch["attention_mask"].sum(dim=1).double()
    attention = 8 * policy.config.num_hidden_layers * hidden * float((lengths**2).sum())
    return {"decoder_matmul_params": n_dec, "tokens": tokens, "head_positions": head_positions,
            "decoder": 8.0 * n_dec * tokens, "head": 8.0 * hidden * vocab * head_positions,
            "attention_not_counted": attention}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser, pairs=16, hidden=1024, layers=24, max_length=512, vocab=32000)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--peak_size", type=int, default=0, help="0: 8192 on CUDA, 1024 on the CPU")
    parser.add_argument("--peak_repeats", type=int, default=50)
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None)
    ns = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        policy, tok, batch = build(ns.pairs, ns.hidden, ns.layers, ns.max_length, workdir, ns.vocab,
                                   shared_prompt=True)
        trainer = make_trainer(policy, tok, os.path.join(workdir, "t"), {"method": "dpo"}, cuda)
        warm_up(trainer, batch, ns.warmup_steps)
        step = statistics.median(one_step(trainer, batch) for _ in range(ns.steps))
        # after the steps: the clocks are up, as they were for the steps
        peak = matmul_peak(device, torch.bfloat16 if cuda else torch.float32, ns.peak_size or (8192 if cuda else 1024),
                           ns.peak_repeats)
    flops = step_flops(policy, batch)
    counted = flops["decoder"] + flops["head"]
    mfu = counted / step / peak
    with_attention = (counted + flops["attention_not_counted"]) / step / peak
    table = (
        f"Model: Llama-shaped, hidden {ns.hidden}, {ns.layers} layers, vocabulary {policy.config.vocab_size}; "
        f"{ns.pairs} HH pairs (max_length {ns.max_length}) in shared-prompt rows: {flops['tokens']} tokens, the head "
        f"at {flops['head_positions']} positions; {device_line(ns)}; our default DPO step (chunked head, live "
        f"reference), median of {ns.steps} steps after {ns.warmup_steps} warm-ups. Peak: "
        f"{ns.peak_size or (8192 if cuda else 1024)}² {'bf16' if cuda else 'float32'} matmul, mean of "
        f"{ns.peak_repeats}, measured in this process after the steps.\n\n"
        "| step (ms) | FLOPs counted (8·N·T + 8·H·V·W) | achieved TFLOP/s | measured matmul peak (TFLOP/s) | MFU | "
        "MFU with attention (causal estimate) |\n|---|---|---|---|---|---|\n"
        f"| {step * 1e3:.1f} | {counted / 1e12:.3f} T (N = {flops['decoder_matmul_params'] / 1e6:.1f} M, T = "
        f"{flops['tokens']}, W = {flops['head_positions']}) | {counted / step / 1e12:.2f} | {peak / 1e12:.1f} | "
        f"{mfu:.1%} | {with_attention:.1%} |\n")
    emit_table(table, ns.out)
    result = {"device": device_line(ns), "step_s": step, "peak_flops": peak, "flops": flops, "mfu": mfu,
              "mfu_with_attention": with_attention}
    if ns.json:
        with open(ns.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
