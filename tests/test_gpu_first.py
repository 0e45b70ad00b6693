"""`bash benchmarks/gpu_suite.sh first` (issue 29): its dry run goes through every piece on the CPU, what it carries
fits the device tool's 64 MiB, and its driver keeps to its budget (a piece past its share is cut, the rest named)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import pytest
from helpers import ROOT


def _load(name: str, path: str):
    """A module of benchmarks/ by its path (benchmarks/ is no package, and stays off sys.path)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu_first = _load("gpu_first", "benchmarks/gpu_first.py")
wheels = _load("gpu_wheels", "benchmarks/gpu/wheels.py")


@pytest.mark.slow  # every piece of the GPU suite, dry, in its own process
def test_the_dry_run_goes_through_every_piece(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "WORKDIR": str(work), "PYTHON": sys.executable, "BUDGET_S": "400"}
    env.pop("PIECES", None)
    start = time.time()
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), "first", "--dry-run"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=500)
    took = time.time() - start
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    summary = (out / "summary.md").read_text()
    for piece in gpu_first.PIECES:
        assert re.search(rf"^\| {piece.key} \| [^|]+ \| done \|", summary, re.M), (piece.key, summary)
    assert "Every piece asked for finished." in summary and "Dry run" in summary
    # what comes back from the device tool: at most 8 files, flat, plain names
    files = sorted(os.listdir(out))
    assert files == sorted({p.table for p in gpu_first.PIECES} | {"summary.md", "log.txt"}), files
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) and (out / f).is_file() for f in files)
    cuda_tests = (out / "a_cuda_tests.md").read_text()
    assert re.search(r"the CUDA tests: .* 0 passed, 0 failed, 0 errors, [1-9]\d* skipped", cuda_tests), cuda_tests
    assert re.search(r"CPU twins: .* [1-9] passed, 0 failed, 0 errors", cuda_tests), cuda_tests
    trl = (out / "b_trl.md").read_text()
    assert trl.count("| TRL DPOTrainer |") == 2 and trl.count("| adaptdpo dpo |") == 2, trl
    assert "| adaptdpo dpo plain head |" in trl and "FlexAttention rows" in trl
    assert "| MFU |" in (out / "c_mfu.md").read_text()
    assert "| live model | sams subset |" in (out / "d_sams.md").read_text()
    fsdp = (out / "e_fsdp2.md").read_text()
    assert "| one process | 0.00e+00 |" in fsdp and "| FSDP2 | skipped: CPU dry run" in fsdp, fsdp
    for row in ("pairs/s ≥ 1.3× TRL's, SmolLM2-135M shape", "step memory ≤ 0.8× TRL's, 0.47 B shape",
                "MFU ≥ 40% of the measured bf16 matmul peak", "SamS subset at 0.5: step time ≤ 0.8× DPO's"):
        assert re.search(rf"\| {re.escape(row)}[^|]* \| [\d.]+[×%] \| (met|NOT met) \|", summary), (row, summary)
    print(f"dry run: {took:.0f} s")


def test_first_carries_at_most_64_mib():
    """The working tree (as git lists it: what the device tool sends) and .whl/ (the files when .whl/ holds exactly
    the pinned set, else the bytes benchmarks/gpu/wheels.json records) fit one call."""
    size = wheels.carry_size()
    assert size["total"] <= wheels.LIMIT == 64 * 2**20, size
    assert size["tree"] > 1e6 and size["wheels"] > 10 * 2**20  # both parts counted
    pinned = {w["name"].lower(): w for w in wheels.manifest()["wheels"]}
    assert "pyarrow" not in pinned  # the image has it
    for w in pinned.values():
        assert w["file"].startswith(f"{w['name']}-{w['version']}-") and w["file"].endswith(".whl"), w
        assert re.fullmatch(r"[0-9a-f]{64}", w["sha256"]) and w["bytes"] > 0
    # the versions pyproject pins are the ones carried
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as fh:
        pins = dict(re.findall(r'"([A-Za-z][\w-]*)==([\w.]+)"', fh.read()))
    for name in ("trl", "datasets", "transformers", "gguf", "vaderSentiment"):
        assert pinned[name.lower()]["version"] == pins[name], name
    assert size["wheels_from"] == ("files in .whl/" if not wheels.problems() else "the manifest")


def _fake(key: str, run, cap: int = 30, minimum: int = 0) -> gpu_first.Piece:
    return gpu_first.Piece(key, f"{key}.md", f"fake {key}", cap, minimum, run)


def test_the_driver_cuts_a_piece_past_its_share_and_names_what_was_not_reached(tmp_path, monkeypatch):
    def quick(ctx):
        (tmp_path / "out" / "quick.md").write_text("table\n")
        return {"ok": True}

    def slow(ctx):
        time.sleep(30)
        return {}

    def broken(ctx):
        raise ValueError("a piece that breaks")

    pieces = [_fake("quick", quick), _fake("slow", slow, cap=1), _fake("broken", broken),
              _fake("late", quick, minimum=10_000)]
    monkeypatch.setattr(gpu_first, "PIECES", pieces)
    monkeypatch.setattr(gpu_first, "BY_KEY", {p.key: p for p in pieces})
    start = time.time()
    rc = gpu_first.main(["--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work"), "--in_process",
                         "--budget_s", "60", "--pieces", "quick,slow,broken,late"])
    assert time.time() - start < 20 and rc == 1  # the slow piece was cut at its 1 s cap; a failure gives rc 1
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert re.search(r"^\| quick \| fake quick \| done \|", summary, re.M)
    assert re.search(r"^\| slow \| fake slow \| cut \|", summary, re.M)
    assert re.search(r"^\| broken \| fake broken \| failed \|", summary, re.M)
    assert re.search(r"^\| late \| fake late \| not reached \(budget: \d+ s left, needs 10000 s\) \|", summary, re.M)
    assert "`PIECES=slow,broken,late bash benchmarks/gpu_suite.sh first`" in summary
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "ValueError: a piece that breaks" in log and "cut after" in log


def test_a_piece_in_its_own_process_is_killed_with_its_children_at_its_deadline(tmp_path):
    ctx = gpu_first.Context(dry=False, out=str(tmp_path), workdir=str(tmp_path))
    piece = _fake("p", None)
    result_path = tmp_path / "p.result.json"
    write = f"import json; json.dump({{'x': 1}}, open({str(result_path)!r}, 'w'))"
    assert gpu_first.run_in_subprocess(piece, ctx, 30, [sys.executable, "-c", write])[:2] == ("done", {"x": 1})
    assert gpu_first.run_in_subprocess(piece, ctx, 30, [sys.executable, "-c", "raise SystemExit(3)"])[0] == "failed"
    pid_file = tmp_path / "grandchild.pid"
    spawn = (f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
             f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    start = time.time()
    status, result, log = gpu_first.run_in_subprocess(piece, ctx, 2, [sys.executable, "-c", spawn])
    assert status == "cut" and result is None and "cut after 2 s" in log and time.time() - start < 15
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # the piece's children went with it (its own session): gone, or a zombie left to reap
        try:
            with open(f"/proc/{grandchild}/stat", encoding="ascii") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the piece's child {grandchild} still runs (state {state})")


def test_junit_counts(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text('<testsuites><testsuite><testcase classname="tests.test_x" name="a"/>'
                    '<testcase classname="tests.test_x" name="b"><failure message="assert 1 == 2">x</failure>'
                    '</testcase><testcase classname="tests.test_x" name="c"><skipped message="needs CUDA"/>'
                    '</testcase><testcase classname="tests.test_x" name="d"><error message="boom"/></testcase>'
                    '</testsuite></testsuites>')
    counts, failures = gpu_first.junit_counts(str(path))
    assert counts == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1}
    assert failures == [("test_x::b", "assert 1 == 2"), ("test_x::d", "boom")]
    json.dumps(counts)
