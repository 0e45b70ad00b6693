#!/usr/bin/env bash
# The GPU figures of docs/performance.md on the project's lent machine (one H100/H200, no network, 10 minutes a
# command, 64 MiB carried a call, 15 minutes of device time a loan). docs/gpu-runbook.md is the plan.
#
#   make -f benchmarks/gpu/Makefile gpu-wheels    # here, once: .whl/, the pinned wheels the machine lacks (15 MiB)
#   bash benchmarks/gpu_suite.sh first            # there (device tool: carry [".whl"]): every check that matters,
#                                                 # at most 480 s of wall time (BUDGET_S), tables under $OUT
#   bash benchmarks/gpu_suite.sh first --dry-run  # anywhere: the same pieces at tiny sizes on the CPU (a test)
#
# first: benchmarks/gpu_first.py runs the pieces in order of value (CUDA correctness tests; TRL 1.16 against ours at
# SmolLM2's and a 0.47 B shape; MFU; SamS subset against DPO; FSDP2 with the sharded reference; FlexAttention rows),
# each within what is left of the budget, each table written as it finishes; $OUT/summary.md names what was not
# reached. PIECES=e,f runs only those (a later call); BUDGET_S sets the budget; WORKDIR the scratch folder.
#
# The older parts, one a call (bash benchmarks/gpu_suite.sh PART, .whl carried):
# PART: throughput | smollm2_shape | checkpointing | beta_overhead | step_parts | sams_fit | all. Tables go to $OUT
# (the device tool's folder that comes back) or runs/gpu.
# PART real_model (issue 14, not in all): the packaged models joined first (make -f benchmarks/gpu/Makefile
# gpu-models here; carry .gpu-models/part1 to part4, one a call: benchmarks/gpu_models.py), then
# benchmarks/real_model.py --profile full for BUDGET seconds (default 480); its results and task cache come back in
# $OUT/bench-real-full.tar.gz (one file: the tool returns at most 8 files, 2 folders down): `tar xzf` it here, in the
# repository root, and carry runs/bench-real/full in the next call to go on (a warm machine still has it).
# PART smollm2_hh (issue 11, not in all): the models joined the same way, then
# `adaptdpo train configs/smollm2-hh-gpu.yaml` (SmolLM2 on HH, fp32 weights, bf16 autocast; about 2 minutes); its
# summary (step count, wall time, peak memory, held-out accuracy, versions) and metrics come back in $OUT/smollm2-hh.
# PART sharded (issue 13, not in all): benchmarks/sharded_runs.py, the same short run as one process, FSDP2 and
# ZeRO-3 on one GPU (losses against the one-process run, s/step, peak memory) into $OUT/sharded.md. ZeRO-3 needs
# deepspeed: `make -f benchmarks/gpu/Makefile gpu-wheels-deepspeed` here, and carry .whl-deepspeed (5 MiB).
# SHAPE overrides the model shape of the older parts (default: the 0.47B Llama-shaped model, bf16 autocast, 16 HH
# pairs of up to 512 tokens).
set -euo pipefail
PART=${1:-all}
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python3}
SITE=/tmp/adaptdpo-site
SHAPE=${SHAPE:---hidden 1024 --layers 24 --vocab 32000 --pairs 16 --max_length 512}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false ADAPTDPO_SITE=$SITE

# the carried wheels into $SITE, ahead of the image's packages; a carried transformers that does not import with the
# image's torch is dropped (the image's is used, and the install notes say so)
install_wheels() {
    local t0 ms
    t0=$(date +%s%N)
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "no .whl/ carried: make -f benchmarks/gpu/Makefile gpu-wheels here, then carry [\".whl\"]"
        return 1
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
    local check="import transformers, transformers.trainer, trl, datasets"
    if ! "$PY" -c "$check" 2>"$SITE.err"; then
        echo "the carried transformers failed to import here ($(tail -n 1 "$SITE.err")): the image's is used"
        rm -rf "$SITE"/transformers "$SITE"/transformers-*.dist-info
        "$PY" -c "$check" || { echo "trl/datasets do not import with the image's transformers either"; return 1; }
    fi
    ms=$((($(date +%s%N) - t0) / 1000000))
    echo "wheels: $(cd .whl && ls -- *.whl | tr '\n' ' ')into $SITE, installed and imported in $((ms / 1000)).$((ms % 1000 / 100)) s"
}

if [ "$PART" = first ]; then
    DRY=${2:-}
    [ -z "$DRY" ] || [ "$DRY" = --dry-run ] || { echo "usage: $0 first [--dry-run]" >&2; exit 2; }
    start=$(date +%s)
    budget=${BUDGET_S:-$([ -n "$DRY" ] && echo 600 || echo 480)}
    deadline=$((start + budget))
    work=${WORKDIR:-runs/gpu-first}
    mkdir -p "$work"
    if [ -n "$DRY" ]; then
        echo "dry run: no install (this environment has the pinned packages)" >"$work/install.txt"
        # one thread: tiny matmuls on a shared CPU run several times faster without OpenMP's spinning
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    else
        install_wheels >"$work/install.txt" 2>&1 || { cat "$work/install.txt" >&2; cp "$work/install.txt" "$OUT/"; exit 1; }
    fi
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null ||
        echo "no GPU (nvidia-smi found none)"; } >"$work/device.txt"
    # the driver keeps to the deadline itself; this is the backstop
    exec timeout --kill-after=5 $((deadline - $(date +%s))) "$PY" benchmarks/gpu_first.py --out "$OUT" \
        --workdir "$work" --deadline "$deadline" --shell_start "$start" ${DRY:+--dry-run} ${PIECES:+--pieces "$PIECES"}
fi

if ! "$PY" -c "import trl, datasets" 2>/dev/null; then
    install_wheels
fi
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  "$PY" -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
} > "$OUT/device.txt"
run() { { [ "$PART" = all ] && [ "$1" != real_model ] && [ "$1" != smollm2_hh ] && [ "$1" != sharded ]; } ||
    [ "$PART" = "$1" ]; }
# the packaged model files, joined from the two carried halves (sha256 checked), where packaged_file finds them
join_models() {
    [ -f .gpu-models/files/manifest.ok ] || { "$PY" benchmarks/gpu_models.py join && touch .gpu-models/files/manifest.ok; }
    export ADAPTDPO_MODEL_FILES=$PWD/.gpu-models/files
}
# shellcheck disable=SC2086  # SHAPE is a list of arguments
if run throughput; then "$PY" benchmarks/throughput.py $SHAPE --rounds 10 --memory --out "$OUT/throughput.md"; fi
# SmolLM2-135M's shape and vocabulary (49,152): where the chunked LM head matters most
if run smollm2_shape; then "$PY" benchmarks/throughput.py --hidden 576 --layers 30 --vocab 49152 --pairs 16 \
    --max_length 512 --rounds 6 --memory --out "$OUT/throughput_smollm2_shape.md"; fi
if run checkpointing; then "$PY" benchmarks/gradient_checkpointing_cost.py $SHAPE > "$OUT/checkpointing.md"; fi
if run beta_overhead; then "$PY" benchmarks/beta_overhead.py $SHAPE --rounds 20 --steps 5 --out "$OUT/beta_overhead.md"; fi
if run step_parts; then "$PY" benchmarks/step_parts.py $SHAPE --rounds 10 --out "$OUT/step_parts.md"; fi
if run sams_fit; then "$PY" benchmarks/sams_fit.py --layers 24 --dim 1024 --pairs 16 --out "$OUT/sams_fit.md"; fi
if run real_model; then
    join_models
    "$PY" benchmarks/real_model.py --profile full --seeds "${SEEDS:-3}" --budget_s "${BUDGET:-480}" \
        --experiments "${EXPERIMENTS:-noise,mix,frontier,gap,filters,hh}" --out "$OUT/real_model_tables.md" --plots "$OUT"
    tar czf "$OUT/bench-real-full.tar.gz" runs/bench-real/full/results.jsonl runs/bench-real/full/cache
fi
if run smollm2_hh; then
    join_models
    "$PY" -m adaptdpo train configs/smollm2-hh-gpu.yaml --output_dir runs/smollm2-hh 2>&1 | tail -n 40
    mkdir -p "$OUT/smollm2-hh" && cp runs/smollm2-hh/summary.json runs/smollm2-hh/metrics.jsonl \
        runs/smollm2-hh/README.md "$OUT/smollm2-hh/"
fi
if run sharded; then
    if [ -d .whl-deepspeed ] && ! "$PY" -c "import deepspeed" 2>/dev/null; then
        # only the wheels whose module the machine lacks: an installed pydantic or psutil is not shadowed
        "$PY" - <<'PY'
import glob, importlib.util, os, subprocess, sys
module = {"py_cpuinfo": "cpuinfo"}
missing = [w for w in sorted(glob.glob(".whl-deepspeed/*.whl"))
           if importlib.util.find_spec(module.get(n := os.path.basename(w).split("-")[0].lower(), n)) is None]
subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                       "/tmp/adaptdpo-site", *missing])
PY
    fi
    "$PY" benchmarks/sharded_runs.py --out "$OUT/sharded.md"
fi
