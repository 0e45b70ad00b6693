import os
import sys

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest workers on two cores: one thread each (before torch is imported; the processes a
    # test starts inherit it), so that the workers do not fight over the cores and every number is computed with
    # the same thread count in the test, its subprocesses and a rerun
    os.environ["OMP_NUM_THREADS"] = "1"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ADAPTDPO_CPU_BF16", "0")  # the suite's numbers are float32 unless a test asks for bf16

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH_FILE = os.path.join(ROOT, "data", "hh-rlhf", "harmless-base-test.jsonl.gz")
sys.path.insert(0, os.path.join(ROOT, "tests"))


#: the end-to-end tests that take longest (1 to 3 minutes on one core): sent to the workers first, so that the short
#: tests fill the other worker meanwhile instead of one long test ending the run alone
LONGEST_FIRST = ("test_the_real_model_experiments_quick_mode_runs_every_stage_and_resumes",
                 "test_the_readme_quickstart_runs_as_written",
                 "test_full_fine_tuning_from_a_bf16_checkpoint_learns_with_the_default_precision",
                 "test_quick_demo_compares_the_four_methods")


def pytest_collection_modifyitems(config, items):
    """Tests that launch two processes (accelerate's default rendezvous port) run one after another, on one worker
    (``--dist loadgroup``); the longest tests, then the other slow ones, run first (a stable sort: the same order
    on every worker, as xdist requires)."""
    for item in items:
        if item.get_closest_marker("two_processes"):
            item.add_marker(pytest.mark.xdist_group("two_processes"))

    def rank(item):
        if item.originalname in LONGEST_FIRST:
            return LONGEST_FIRST.index(item.originalname)
        return len(LONGEST_FIRST) + (0 if item.get_closest_marker("slow") else 1)

    items.sort(key=rank)


@pytest.fixture(scope="session")
def hh_rows():
    from adaptdpo.data.rows import load_preference_rows

    rows, _ = load_preference_rows(HH_FILE, skip_invalid=True, limit=64)
    return rows


@pytest.fixture(scope="session")
def tokenizer(hh_rows, tmp_path_factory):
    from adaptdpo.models.tiny import train_tokenizer

    texts = [r[k] for r in hh_rows for k in ("prompt", "chosen", "rejected")]
    return train_tokenizer(texts, 512, str(tmp_path_factory.mktemp("tok") / "tokenizer"))


@pytest.fixture(scope="session")
def policy_and_reference(tokenizer):
    """Two different tiny random Llama models (seeds 1 and 2) for the given tokenizer."""
    from adaptdpo.models.tiny import build_tiny_model, tiny_model_config

    cfg = tiny_model_config("tiny-llama", len(tokenizer), 32, 2, 4, 256, tokenizer.pad_token_id,
                            tokenizer.eos_token_id)
    return build_tiny_model(cfg, seed=1), build_tiny_model(cfg, seed=2)


@pytest.fixture(scope="session")
def models_and_examples(hh_rows, tokenizer, policy_and_reference):
    """(policy, reference, 8 tokenised HH pairs, tokenizer) for step-level trainer tests."""
    from adaptdpo.data.tokenize import tokenize_rows

    policy, reference = policy_and_reference
    examples, _ = tokenize_rows(hh_rows[:8], tokenizer, max_length=96, max_prompt_length=48)
    return policy, reference, examples, tokenizer


@pytest.fixture(autouse=True)
def _torch_default_dtype_restored():
    """Every test starts with torch's default dtype (float32): a test or library call that leaves float64 behind
    (seen: a float64 reference model built in the CUDA-path CPU twins) must not change the next test's numbers."""
    import torch

    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
