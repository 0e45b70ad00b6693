import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ADAPTDPO_CPU_BF16", "0")  # the suite's numbers are float32 unless a test asks for bf16

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH_FILE = os.path.join(ROOT, "data", "hh-rlhf", "harmless-base-test.jsonl.gz")
sys.path.insert(0, os.path.join(ROOT, "tests"))


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
