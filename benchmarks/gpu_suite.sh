#!/usr/bin/env bash
# The GPU figures of docs/performance.md, one part per call (the device tool allows 10 minutes a command).
#
#   make gpu-wheels                      # on the dev machine: the wheels the GPU machine lacks, into .whl/
#   bash benchmarks/gpu_suite.sh PART    # on the GPU machine (device tool, carry [".whl"]), from the source tree
#
# PART: throughput | smollm2_shape | checkpointing | beta_overhead | step_parts | sams_fit | all. Tables go to $OUT
# (the device tool's folder that comes back) or runs/gpu.
# PART real_model (issue 14, not in all): the packaged models joined first (make gpu-models here; carry
# .gpu-models/part1 to part4, one a call: benchmarks/gpu_models.py), then
# benchmarks/real_model.py --profile full for BUDGET seconds (default 480); its results and task cache come back in
# $OUT/bench-real-full.tar.gz (one file: the tool returns at most 8 files, 2 folders down): `tar xzf` it here, in the
# repository root, and carry runs/bench-real/full in the next call to go on (a warm machine still has it).
# PART smollm2_hh (issue 11, not in all): the models joined the same way, then
# `adaptdpo train configs/smollm2-hh-gpu.yaml` (SmolLM2 on HH, fp32 weights, bf16 autocast; about 2 minutes); its
# summary (step count, wall time, peak memory, held-out accuracy, versions) and metrics come back in $OUT/smollm2-hh.
# PART sharded (issue 13, not in all): benchmarks/sharded_runs.py, the same short run as one process, FSDP2 and
# ZeRO-3 on one GPU (losses against the one-process run, s/step, peak memory) into $OUT/sharded.md. ZeRO-3 needs
# deepspeed: `make gpu-wheels-deepspeed` here, and carry .whl-deepspeed in an earlier call (5 MiB).
# SHAPE overrides the model shape (default: the 0.47B Llama-shaped model, bf16 autocast, 16 HH pairs of up to 512
# tokens).
set -euo pipefail
PART=${1:-all}
OUT=${OUT:-runs/gpu}
SHAPE=${SHAPE:---hidden 1024 --layers 24 --vocab 32000 --pairs 16 --max_length 512}
mkdir -p "$OUT"
if ! python3 -c "import trl, datasets" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/adaptdpo-site .whl/*.whl
fi
export PYTHONPATH=/tmp/adaptdpo-site:$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
} > "$OUT/device.txt"
run() { { [ "$PART" = all ] && [ "$1" != real_model ] && [ "$1" != smollm2_hh ] && [ "$1" != sharded ]; } ||
    [ "$PART" = "$1" ]; }
# the packaged model files, joined from the two carried halves (sha256 checked), where packaged_file finds them
join_models() {
    [ -f .gpu-models/files/manifest.ok ] || { python3 benchmarks/gpu_models.py join && touch .gpu-models/files/manifest.ok; }
    export ADAPTDPO_MODEL_FILES=$PWD/.gpu-models/files
}
# shellcheck disable=SC2086  # SHAPE is a list of arguments
if run throughput; then python3 benchmarks/throughput.py $SHAPE --rounds 10 --memory --out "$OUT/throughput.md"; fi
# SmolLM2-135M's shape and vocabulary (49,152): where the chunked LM head matters most
if run smollm2_shape; then python3 benchmarks/throughput.py --hidden 576 --layers 30 --vocab 49152 --pairs 16 \
    --max_length 512 --rounds 6 --memory --out "$OUT/throughput_smollm2_shape.md"; fi
if run checkpointing; then python3 benchmarks/gradient_checkpointing_cost.py $SHAPE > "$OUT/checkpointing.md"; fi
if run beta_overhead; then python3 benchmarks/beta_overhead.py $SHAPE --rounds 20 --steps 5 --out "$OUT/beta_overhead.md"; fi
if run step_parts; then python3 benchmarks/step_parts.py $SHAPE --rounds 10 --out "$OUT/step_parts.md"; fi
if run sams_fit; then python3 benchmarks/sams_fit.py --layers 24 --dim 1024 --pairs 16 --out "$OUT/sams_fit.md"; fi
if run real_model; then
    join_models
    python3 benchmarks/real_model.py --profile full --seeds "${SEEDS:-3}" --budget_s "${BUDGET:-480}" \
        --experiments "${EXPERIMENTS:-noise,mix,frontier,gap,filters,hh}" --out "$OUT/real_model_tables.md" --plots "$OUT"
    tar czf "$OUT/bench-real-full.tar.gz" runs/bench-real/full/results.jsonl runs/bench-real/full/cache
fi
if run smollm2_hh; then
    join_models
    python3 -m adaptdpo train configs/smollm2-hh-gpu.yaml --output_dir runs/smollm2-hh 2>&1 | tail -n 40
    mkdir -p "$OUT/smollm2-hh" && cp runs/smollm2-hh/summary.json runs/smollm2-hh/metrics.jsonl \
        runs/smollm2-hh/README.md "$OUT/smollm2-hh/"
fi
if run sharded; then
    if [ -d .whl-deepspeed ] && ! python3 -c "import deepspeed" 2>/dev/null; then
        # only the wheels whose module the machine lacks: an installed pydantic or psutil is not shadowed
        python3 - <<'PY'
import glob, importlib.util, os, subprocess, sys
module = {"py_cpuinfo": "cpuinfo"}
missing = [w for w in sorted(glob.glob(".whl-deepspeed/*.whl"))
           if importlib.util.find_spec(module.get(n := os.path.basename(w).split("-")[0].lower(), n)) is None]
subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                       "/tmp/adaptdpo-site", *missing])
PY
    fi
    python3 benchmarks/sharded_runs.py --out "$OUT/sharded.md"
fi
