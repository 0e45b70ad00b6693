"""The pieces of ``bash benchmarks/gpu_suite.sh first``: every GPU check that matters in one call (issue 29).

    bash benchmarks/gpu_suite.sh first             # on the lent GPU machine (device tool: carry [".whl"])
    bash benchmarks/gpu_suite.sh first --dry-run   # anywhere: every piece at tiny sizes on the CPU (a test)

The shell part installs the carried wheels, records the device, and hands what is left of the budget (480 s of
wall time in all) to this driver as a deadline. The pieces run in order of value. Each one gets what is left, up to
its own cap, and is not started when less than its minimum is left. On the GPU each runs in a process of its own
(a CUDA error cannot poison the next one), killed with its children at its deadline. In the dry run each runs in
this process (one Python start on a slow CPU), cut by an alarm. Each piece writes its table under ``--out`` as it
finishes. ``summary.md`` is rewritten before and after every piece: the device and versions, each piece's status and
time, the figures against the targets of docs/performance.md, and what was not reached, with the command that takes
it in a later call. ``log.txt`` holds each piece's output (its tail). That makes at most 7 files, flat: the device
tool returns 8.

| piece | writes | what |
|---|---|---|
| a | a_cuda_tests.md | ``pytest -m cuda``: the CUDA paths against the dense reference (tests/test_cuda_paths.py) |
| b1 | b_trl.md | TRL 1.16 against ours at SmolLM2-135M's shape: pairs/s and step memory in one process |
| b2 | b_trl.md | the same at the 0.47 B shape |
| c | c_mfu.md | MFU of our step at the 0.47 B shape against the bf16 matmul peak measured in the same call |
| d | d_sams.md | SamS subset at ratio 0.5 against DPO at the 0.47 B shape: step time and memory |
| e | e_fsdp2.md | FSDP2 on one process with the sharded reference, against the one-process run |
| f | b_trl.md | FlexAttention rows (shared-prompt and padding-free) at the 0.47 B shape, if time is left |

HH-shaped batches throughout: 16 pairs of the shipped HH split, up to 512 tokens. Random-initialised models, so no
model files travel. This module imports only the standard library at the top: the pieces import the benchmarks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESERVE_S = 10  # kept back at the end: a cut piece's kill (at most 6 s) and the summary
LOG_TAIL = 60_000  # characters of a piece's output kept in log.txt
SMOLLM2 = ["--hidden", "576", "--layers", "30", "--vocab", "49152", "--pairs", "16", "--max_length", "512"]
HALF_B = ["--hidden", "1024", "--layers", "24", "--vocab", "32000", "--pairs", "16", "--max_length", "512"]
TINY = ["--hidden", "64", "--layers", "2", "--vocab", "0", "--pairs", "4", "--max_length", "64"]
VERSIONS = ("torch", "transformers", "trl", "accelerate", "datasets", "pyarrow", "tokenizers", "safetensors")
# the targets of docs/performance.md (issue 29, item 4)
TARGETS = {"pairs_ratio": 1.3, "memory_ratio": 0.8, "mfu": 0.40, "sams_time_ratio": 0.8}


@dataclass
class Context:
    dry: bool
    out: str
    workdir: str

    def table(self, name: str) -> str:
        return os.path.join(self.out, name)

    def scratch(self, name: str) -> str:
        return os.path.join(self.workdir, name)


@dataclass
class Piece:
    key: str
    table: str
    title: str
    cap_s: int  # the most it may take on the GPU
    min_s: int  # not started with less than this left
    run: Callable[[Context], dict]


# ------------------------------------------------------------------------------------------------- the pieces


def _append(path: str, text: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)


def junit_counts(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(counts of passed / failed / errors / skipped, [(test, first line of its failure)]) of a JUnit XML file."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        for tag, key in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            found = case.find(tag)
            if found is not None:
                counts[key] += 1
                if key != "skipped":
                    message = (found.get("message") or found.text or "").strip().splitlines()
                    failures.append((name, message[0][:200] if message else ""))
                break
        else:
            counts["passed"] += 1
    return counts, failures


class RowPerTest:
    """A pytest plugin: one row per test in the table as soon as the test ends (a cut piece keeps its rows)."""

    def __init__(self, path: str):
        self.path = path

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or report.outcome != "passed":  # a setup skip or error has no call phase
            message = ""
            if report.outcome != "passed":
                text = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
                message = (text.strip().splitlines() or [""])[-1][:200].replace("|", "/")
            _append(self.path, f"| {report.nodeid.split('::', 1)[-1]} | {report.outcome} | {report.duration:.1f} | "
                    f"{message} |\n")


def piece_cuda_tests(ctx: Context) -> dict:
    import importlib.util

    import pytest

    device = ["-m", "cuda", "tests/test_cuda_paths.py", "tests/test_reliability.py"]
    selections = [("the CUDA tests", device)]
    if ctx.dry:  # they are collected and skip here; two cheap CPU twins run too (the test suite runs all of them)
        selections.append(("CPU twins", ["tests/test_cuda_paths.py", "-k", "controller or padding_free"]))
    # a test that hangs fails alone where the image has pytest-timeout
    per_test = ["--timeout", "120"] if importlib.util.find_spec("pytest_timeout") and not ctx.dry else []
    table = ctx.table("a_cuda_tests.md")
    with open(table, "w", encoding="utf-8") as fh:
        fh.write("## CUDA paths against the dense reference (tests/test_cuda_paths.py)\n\n"
                 "| test | outcome | seconds | message |\n|---|---|---|---|\n")
    totals = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    lines, failures, rcs = [""], [], []
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for i, (label, selection) in enumerate(selections):
            junit = ctx.scratch(f"a_cuda_tests_{i}.xml")
            rc = int(pytest.main(["-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rfEs", "--junitxml", junit,
                                  *per_test, *selection], plugins=[RowPerTest(table)]))
            counts, found = junit_counts(junit)
            if sum(counts.values()) == 0:
                raise RuntimeError(f"pytest {shlex.join(selection)} collected no test (exit code {rc})")
            rcs.append(rc)
            failures += found
            totals = {k: totals[k] + counts[k] for k in totals}
            lines.append(f"- {label}: `pytest {shlex.join(selection)}`: {counts['passed']} passed, {counts['failed']} "
                         f"failed, {counts['errors']} errors, {counts['skipped']} skipped (exit code {rc}).")
    finally:
        os.chdir(cwd)
    _append(table, "\n".join(lines) + "\n")
    return {"rc": max(rcs), **totals, "failures": failures}


def _throughput(ctx: Context, title: str, shape: list[str], configs: list[str], key: str) -> dict:
    import throughput

    md, js = ctx.scratch(f"{key}.md"), ctx.scratch(f"{key}.json")
    if ctx.dry:
        argv = [*TINY, "--rounds", "1", "--steps", "1", "--warmup_steps", "1", "--peak_size", "256"]
    else:
        argv = [*shape, "--rounds", "5", "--steps", "3", "--warmup_steps", "2"]
    argv += ["--memory_in_process", "--configs", *configs]  # TRL and "adaptdpo dpo" always
    result = throughput.main([*argv, "--out", md, "--json", js])
    with open(md, encoding="utf-8") as fh:
        _append(ctx.table("b_trl.md"), f"## {title}\n\n`benchmarks/throughput.py {shlex.join(argv)}`\n\n"
                f"{fh.read()}\n")
    figures = result["configs"]
    trl = figures["TRL DPOTrainer"]
    return {"device": result["device"], "matmul_tflops": result["matmul_tflops"],
            "ours": {name: {"pairs_ratio": 1 / f["time_ratio_to_trl"], "memory_ratio": f.get("memory_ratio_to_trl"),
                            "pairs_per_s": f["pairs_per_s"], "memory_mib": f.get("memory_bytes", 0) / 2**20}
                     for name, f in figures.items() if f is not trl},
            "trl": {"pairs_per_s": trl["pairs_per_s"], "memory_mib": trl.get("memory_bytes", 0) / 2**20}}


def piece_trl_smollm2(ctx: Context) -> dict:
    # the plain head too: at a 49k vocabulary the chunked head is where the memory goes
    return _throughput(ctx, "TRL 1.16 against ours, SmolLM2-135M's shape (hidden 576, 30 layers, vocabulary 49,152)",
                       SMOLLM2, ["adaptdpo dpo plain head"], "b1")


def piece_trl_half_b(ctx: Context) -> dict:
    return _throughput(ctx, "TRL 1.16 against ours, 0.47 B shape (hidden 1024, 24 layers, vocabulary 32,000)",
                       HALF_B, ["adaptdpo dpo"], "b2")


def piece_flex(ctx: Context) -> dict:
    import throughput

    names = ["adaptdpo dpo flex", "adaptdpo dpo flex padding-free"]
    if ctx.dry:  # no FlexAttention backward on the CPU: the configurations must exist, nothing is timed
        missing = [n for n in names if n not in throughput.FLEX]
        assert not missing, f"throughput.FLEX lacks {missing}"
        _append(ctx.table("b_trl.md"), "## FlexAttention rows\n\nDry run: not timed (no FlexAttention backward on "
                "the CPU); the configurations exist.\n\n")
        return {"skipped": "no FlexAttention backward on the CPU"}
    return _throughput(ctx, "FlexAttention rows, 0.47 B shape (block-sparse branch masks; padding-free rows)",
                       HALF_B, names, "f")


def piece_mfu(ctx: Context) -> dict:
    import mfu

    md, js = ctx.scratch("c.md"), ctx.scratch("c.json")
    argv = ([*TINY, "--steps", "1", "--warmup_steps", "1", "--peak_size", "256", "--peak_repeats", "2"] if ctx.dry
            else [*HALF_B, "--steps", "10", "--warmup_steps", "3"])
    result = mfu.main([*argv, "--out", md, "--json", js])
    with open(md, encoding="utf-8") as fh:
        text = fh.read()
    with open(ctx.table("c_mfu.md"), "w", encoding="utf-8") as fh:
        fh.write(f"## MFU of our step\n\n`benchmarks/mfu.py {shlex.join(argv)}`\n\n{text}\n"
                 f"FLOPs counted per step: 8·N·T (decoder linear layers: policy forward and backward, reference "
                 f"forward) + 8·H·V·W (LM head at the W completion-window positions); attention's products not "
                 f"counted (benchmarks/mfu.py).\n")
    return {"mfu": result["mfu"], "mfu_with_attention": result["mfu_with_attention"],
            "peak_tflops": result["peak_flops"] / 1e12, "step_s": result["step_s"]}


def piece_sams(ctx: Context) -> dict:
    import sams_cost

    md, js = ctx.scratch("d.md"), ctx.scratch("d.json")
    argv = ([*TINY, "--rounds", "1", "--steps", "1", "--warmup_steps", "1"] if ctx.dry
            else [*HALF_B, "--rounds", "4", "--steps", "2", "--warmup_steps", "2"])
    argv += ["--configs", "dpo", "sams subset", "--references", "live", "--layout", "packed", "--memory_in_process"]
    result = sams_cost.main([*argv, "--out", md, "--json", js])
    with open(md, encoding="utf-8") as fh:
        text = fh.read()
    with open(ctx.table("d_sams.md"), "w", encoding="utf-8") as fh:
        fh.write(f"## SamS subset at ratio 0.5 against DPO\n\n`benchmarks/sams_cost.py {shlex.join(argv)}`\n\n{text}")
    subset = result["configs"]["live model | sams subset"]
    return {"time_ratio": subset["time_ratio_to_dpo"], "memory_ratio": subset["memory_ratio_to_dpo"]}


def piece_fsdp2(ctx: Context) -> dict:
    import sharded_runs

    md, js = ctx.scratch("e.md"), ctx.scratch("e.json")
    argv = (["--hidden", "64", "--layers", "2", "--steps", "2", "--vocab", "1024", "--max_length", "64", "--cpu"]
            if ctx.dry else ["--hidden", "512", "--layers", "8", "--steps", "6"])
    argv += ["--placements", "one process", "FSDP2", "--workdir", ctx.scratch("sharded")]
    sharded_runs.main([*argv, "--out", md, "--json", js])
    with open(md, encoding="utf-8") as fh:
        text = fh.read()
    with open(ctx.table("e_fsdp2.md"), "w", encoding="utf-8") as fh:
        fh.write(f"## FSDP2 on one process, the reference sharded\n\n`benchmarks/sharded_runs.py "
                 f"{shlex.join(argv)}`\n\n{text}")
    with open(js, encoding="utf-8") as fh:
        results = json.load(fh)
    one, fsdp = results.get("one process") or {}, results.get("FSDP2") or {}
    if "losses" not in one:
        raise RuntimeError(f"the one-process run did not train: {str(one.get('error', one))[-400:]}")
    if "error" in fsdp:
        raise RuntimeError(f"FSDP2 failed: {fsdp['error'][-400:]}")
    if "losses" in fsdp:
        diff = max(abs(a - b) for a, b in zip(fsdp["losses"], one["losses"], strict=False))
        return {"max_loss_diff": diff, "s_per_step": fsdp["s_per_step"], "peak_cuda_gib": fsdp["peak_cuda_gib"]}
    return {"skipped": fsdp.get("skipped", "FSDP2 not run")}


PIECES = [
    Piece("a", "a_cuda_tests.md", "CUDA correctness tests (pytest -m cuda)", 180, 45, piece_cuda_tests),
    Piece("b1", "b_trl.md", "TRL 1.16 vs ours, SmolLM2-135M shape", 90, 45, piece_trl_smollm2),
    Piece("b2", "b_trl.md", "TRL 1.16 vs ours, 0.47 B shape", 110, 60, piece_trl_half_b),
    Piece("c", "c_mfu.md", "MFU at the 0.47 B shape", 70, 40, piece_mfu),
    Piece("d", "d_sams.md", "SamS subset at 0.5 vs DPO, 0.47 B shape", 100, 50, piece_sams),
    Piece("e", "e_fsdp2.md", "FSDP2 on one process, sharded reference", 120, 60, piece_fsdp2),
    Piece("f", "b_trl.md", "FlexAttention rows, 0.47 B shape", 150, 80, piece_flex),
]
BY_KEY = {p.key: p for p in PIECES}


# ------------------------------------------------------------------------------------------------- running them


class PieceTimeout(Exception):
    pass


CURRENT: subprocess.Popen | None = None  # the piece's process while one runs (its own session)


def _on_terminate(signum, frame):
    """The shell's backstop ``timeout`` (or the device tool) stops the driver: stop the piece's process group too
    (it is a session of its own, which would outlive the call), then exit through the summary's last state."""
    if CURRENT is not None:
        _kill_group(CURRENT)
    raise SystemExit(128 + signum)


def run_in_process(piece: Piece, ctx: Context, timeout_s: float) -> tuple[str, dict | None, str]:
    """(status, result, log text) of ``piece`` run here, cut by SIGALRM after ``timeout_s``."""

    def on_alarm(signum, frame):
        raise PieceTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, timeout_s))
    try:
        return "done", piece.run(ctx), ""
    except PieceTimeout:
        return "cut", None, f"cut after {timeout_s:.0f} s\n{traceback.format_exc()[-LOG_TAIL:]}"
    except Exception:  # a piece's failure is reported, and the next piece still runs
        return "failed", None, traceback.format_exc()[-LOG_TAIL:]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 3)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_in_subprocess(piece: Piece, ctx: Context, timeout_s: float,
                      argv: list[str] | None = None) -> tuple[str, dict | None, str]:
    """(status, result, log text) of ``piece`` in a fresh process (its own session: killed with its children).
    ``argv``: another command in its place (the tests), which writes its result where the piece would."""
    log_path, result_path = ctx.scratch(f"{piece.key}.log"), ctx.scratch(f"{piece.key}.result.json")
    with contextlib.suppress(FileNotFoundError):
        os.remove(result_path)
    argv = argv or [sys.executable, os.path.abspath(__file__), "--piece", piece.key, "--out", ctx.out, "--workdir",
                    ctx.workdir, *(["--dry-run"] if ctx.dry else [])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    global CURRENT
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        CURRENT = proc
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
            status = "done" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, status = None, "cut"
        finally:
            CURRENT = None
    with open(log_path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()[-LOG_TAIL:]
    if status == "cut":
        text += f"\ncut after {timeout_s:.0f} s (the piece's share of the budget)\n"
    result = None
    if status == "done":
        try:
            with open(result_path, encoding="utf-8") as fh:
                result = json.load(fh)
        except (OSError, json.JSONDecodeError):
            status, text = "failed", text + f"\nexit code {rc} but no result in {result_path}\n"
    return status, result, text


def child(key: str, ctx: Context) -> int:
    """``--piece KEY``: run one piece in this (fresh) process; its result goes to <workdir>/<KEY>.result.json."""
    result = BY_KEY[key].run(ctx)
    tmp = ctx.scratch(f"{key}.result.json.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    os.replace(tmp, ctx.scratch(f"{key}.result.json"))
    return 0


# ------------------------------------------------------------------------------------------------- the summary


def versions() -> str:
    """Versions of the packages as they will be imported (the carried ones first), without importing them."""
    import importlib.metadata as metadata

    site = os.environ.get("ADAPTDPO_SITE", "/tmp/adaptdpo-site")
    parts = [f"Python {platform.python_version()}"]
    for name in VERSIONS:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            parts.append(f"{name} missing")
            continue
        carried = str(dist.locate_file("")).startswith(site)
        parts.append(f"{name} {dist.version}{' (carried)' if carried else ''}")
    return ", ".join(parts)


def _read(path: str, default: str = "") -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return default


def verdicts(results: dict[str, dict]) -> list[str]:
    """The targets' rows: target, measured, verdict (or 'not measured')."""
    rows = []

    def row(target: str, value: float | None, bar: float, higher: bool, fmt: str = "{:.2f}×") -> None:
        if value is None:
            rows.append(f"| {target} | not measured | – |")
            return
        met = value >= bar if higher else value <= bar
        rows.append(f"| {target} | {fmt.format(value)} | {'met' if met else 'NOT met'} |")

    for key, shape in (("b1", "SmolLM2-135M shape"), ("b2", "0.47 B shape")):
        ours = (results.get(key) or {}).get("ours", {}).get("adaptdpo dpo", {})
        row(f"pairs/s ≥ {TARGETS['pairs_ratio']}× TRL's, {shape}", ours.get("pairs_ratio"), TARGETS["pairs_ratio"],
            True)
        row(f"step memory ≤ {TARGETS['memory_ratio']}× TRL's, {shape}", ours.get("memory_ratio"),
            TARGETS["memory_ratio"], False)
    row(f"MFU ≥ {TARGETS['mfu']:.0%} of the measured bf16 matmul peak, 0.47 B shape",
        (results.get("c") or {}).get("mfu"), TARGETS["mfu"], True, "{:.1%}")
    row(f"SamS subset at 0.5: step time ≤ {TARGETS['sams_time_ratio']}× DPO's, 0.47 B shape",
        (results.get("d") or {}).get("time_ratio"), TARGETS["sams_time_ratio"], False)
    return rows


def _figure_line(key: str, result: dict | None) -> str:
    if not result:
        return ""
    if key == "a":
        return f"{result['passed']} passed, {result['failed']} failed, {result['errors']} errors, " \
               f"{result['skipped']} skipped"
    if key in ("b1", "b2", "f"):
        if "skipped" in result:
            return result["skipped"]
        return "; ".join(f"{name}: {f['pairs_ratio']:.2f}× TRL's pairs/s, " + (
            f"{f['memory_ratio']:.2f}× its step memory" if f.get("memory_ratio") is not None else "")
            for name, f in result["ours"].items())
    if key == "c":
        return f"MFU {result['mfu']:.1%} (with attention {result['mfu_with_attention']:.1%}) of " \
               f"{result['peak_tflops']:.1f} TFLOP/s"
    if key == "d":
        return f"subset {result['time_ratio']:.2f}× DPO's step time, {result['memory_ratio']:.2f}× its memory"
    if key == "e":
        if "skipped" in result:
            return result["skipped"]
        return f"max |loss − one process's| {result['max_loss_diff']:.2e}, {result['s_per_step']:.2f} s/step, " \
               f"{result['peak_cuda_gib']:.2f} GiB"
    return ""


def write_summary(ctx: Context, states: dict[str, dict], started: float, deadline: float, header: dict) -> None:
    now = time.time()
    lines = [f"# gpu_suite.sh first{' --dry-run' if ctx.dry else ''}: summary", "",
             f"- Device: {header['device']}", f"- Versions: {header['versions']}", f"- Install: {header['install']}",
             f"- Budget: {header['budget_s']:.0f} s of wall time, hard (the shell's `timeout` backs it); the driver "
             f"started {started - header['shell_start']:.0f} s in; {now - header['shell_start']:.0f} s used so far.",
             ""]
    if ctx.dry:
        lines += ["Dry run: every piece at tiny sizes on the CPU, so that the script cannot rot between lent "
                  "machines. Its figures are not the targets' measurements.", ""]
    lines += ["| piece | what | status | seconds | table | figures |", "|---|---|---|---|---|---|"]
    for piece in PIECES:
        state = states.get(piece.key, {"status": "not reached"})
        seconds = f"{state['seconds']:.0f}" if "seconds" in state else ""
        lines.append(f"| {piece.key} | {piece.title} | {state['status']} | {seconds} | {piece.table} | "
                     f"{_figure_line(piece.key, state.get('result')).replace('|', '/')} |")
    results = {k: s.get("result") for k, s in states.items() if s.get("status") == "done"}
    lines += ["", "## Targets (docs/performance.md)", "", "Ours: `adaptdpo dpo`, our default step (shared-prompt rows, "
              "sdpa, the chunked head, live reference); every other row is in the tables.", "",
              "| target | measured | verdict |", "|---|---|---|", *verdicts(results), ""]
    missing = [p.key for p in PIECES if not states.get(p.key, {}).get("status", "").startswith(("done",
                                                                                                 "not asked"))]
    if missing:
        lines += [f"Not reached or not finished: {', '.join(missing)}. In a later call (docs/gpu-runbook.md): "
                  f"`PIECES={','.join(missing)} bash benchmarks/gpu_suite.sh first`.", ""]
    else:
        lines += ["Every piece asked for finished.", ""]
    tmp = ctx.table("summary.md.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    os.replace(tmp, ctx.table("summary.md"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where the tables go ($OUT on the device)")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "gpu-first"), help="scratch files")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, every piece in this process")
    parser.add_argument("--deadline", type=float, default=None, help="epoch seconds by which everything has ended")
    parser.add_argument("--budget_s", type=float, default=480, help="without --deadline: from now")
    parser.add_argument("--shell_start", type=float, default=None, help="when the shell part started")
    parser.add_argument("--pieces", default=",".join(BY_KEY), help="which pieces, comma-separated, in order of value")
    parser.add_argument("--in_process", action="store_true", help="run the pieces in this process (the dry run's "
                        "default)")
    parser.add_argument("--subprocess", action="store_true", help="a process per piece in the dry run too (as on the "
                        "GPU: a check of that path)")
    parser.add_argument("--piece", default=None, help=argparse.SUPPRESS)  # internal: one piece, in a child process
    ns = parser.parse_args(argv)
    ctx = Context(dry=ns.dry_run, out=os.path.abspath(ns.out), workdir=os.path.abspath(ns.workdir))
    os.makedirs(ctx.out, exist_ok=True)
    os.makedirs(ctx.workdir, exist_ok=True)
    if ns.piece:
        return child(ns.piece, ctx)
    started = time.time()
    deadline = ns.deadline or started + ns.budget_s
    wanted = [k.strip() for k in ns.pieces.split(",") if k.strip()]
    unknown = [k for k in wanted if k not in BY_KEY]
    if unknown:
        parser.error(f"unknown pieces {unknown}: choose from {', '.join(BY_KEY)}")
    shell_start = ns.shell_start or started
    install = "; ".join(line.strip() for line in _read(ctx.scratch("install.txt")).splitlines() if line.strip())
    header = {"device": "; ".join(_read(ctx.scratch("device.txt")).splitlines()) or "not recorded",
              "versions": versions(), "install": install or "not recorded",
              "budget_s": deadline - shell_start, "shell_start": shell_start}
    for stale in {p.table for p in PIECES if p.key in wanted} | {"log.txt"}:
        with contextlib.suppress(FileNotFoundError):
            os.remove(ctx.table(stale))
    in_process = ns.in_process or (ctx.dry and not ns.subprocess)
    if not in_process:
        signal.signal(signal.SIGTERM, _on_terminate)
    states: dict[str, dict] = {k: {"status": "not asked for (PIECES)"} for k in BY_KEY if k not in wanted}
    write_summary(ctx, states, started, deadline, header)
    failed = False
    for key in wanted:
        piece = BY_KEY[key]
        left = deadline - time.time() - RESERVE_S
        need = 0 if ctx.dry else piece.min_s
        if left < max(need, 1):
            states[key] = {"status": f"not reached (budget: {max(left, 0):.0f} s left, needs {need} s)"}
            write_summary(ctx, states, started, deadline, header)
            continue
        timeout = min(left, piece.cap_s * (2 if ctx.dry else 1))
        states[key] = {"status": f"running (started {time.time() - shell_start:.0f} s in; cut if this stays)"}
        write_summary(ctx, states, started, deadline, header)
        print(f"[first] piece {key}: {piece.title} (up to {timeout:.0f} s)", file=sys.stderr, flush=True)
        t0 = time.time()
        runner = run_in_process if in_process else run_in_subprocess
        try:
            status, result, log = runner(piece, ctx, timeout)
        except SystemExit:  # stopped from outside (_on_terminate): the summary says where
            states[key] = {"status": "cut: the driver was stopped from outside", "seconds": time.time() - t0}
            write_summary(ctx, states, started, deadline, header)
            raise
        seconds = time.time() - t0
        states[key] = {"status": status, "seconds": seconds, "result": result}
        failed |= status == "failed" or (key == "a" and result is not None and (result["failed"] or result["errors"]))
        _append(ctx.table("log.txt"), f"===== piece {key} ({piece.title}): {status} in {seconds:.0f} s\n{log}\n")
        print(f"[first] piece {key}: {status} in {seconds:.0f} s", file=sys.stderr, flush=True)
        write_summary(ctx, states, started, deadline, header)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
