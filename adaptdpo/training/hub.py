"""training.hub"""

from __future__ import annotations

import contextlib
from typing import Any

#: the run directory's own files: never uploaded by push_to_hub (the hub repository gets the model, tokenizer and card)
RUN_FILE_PATTERNS = ["config.yaml", "config_changes.jsonl", "metrics.jsonl", "pairs.jsonl", "summary.json",
                     "skipped_rows.jsonl", "pair_selection.json", "sams_scheduler.pt", ".adaptdpo.lock", "plots/*",
                     "ref_logps/*", "tokenizer-*/*", "final_model/*", "runs/*"]


@contextlib.contextmanager
def model_files_only() -> Any:
    """While active, the Trainer's hub uploads skip the run directory's own files (RUN_FILE_PATTERNS)."""
    import transformers.trainer as trainer_module

    original = trainer_module.hf_api

    class ModelOnlyApi:
        def __init__(self, api: Any):
            self._api = api

        def __getattr__(self, name: str) -> Any:
            return getattr(self._api, name)

        def upload_folder(self, **kwargs: Any) -> Any:
            kwargs["ignore_patterns"] = [*(kwargs.get("ignore_patterns") or []), *RUN_FILE_PATTERNS]
            return self._api.upload_folder(**kwargs)

    trainer_module.hf_api = lambda *a, **k: ModelOnlyApi(original(*a, **k))
    try:
        yield
    finally:
        trainer_module.hf_api = original
