"""The Hub: uploads of the model files only (not the run directory's own), and the trainer's Hub hooks."""

from __future__ import annotations

import contextlib
from typing import Any

from adaptdpo.training.model_card import write_model_card
from adaptdpo.training.run_dir import RUN_FILE_PATTERNS, read_summary
from adaptdpo.training.trainer_mixin import TrainerMixin


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

    trainer_module.hf_api = lambda *a, **k: ModelOnlyApi(original(*a, **k))  # type: ignore[assignment]  # a proxy
    try:
        yield
    finally:
        trainer_module.hf_api = original


class HubMixin(TrainerMixin):
    """The trainer's Hub hooks: our model card instead of transformers', uploads of the model files only."""

    def create_model_card(  # type: ignore[override]  # ours: model_name only (push_to_hub passes it by keyword)
            self, model_name: str | None = None, **kwargs: Any) -> None:
        """Our model card (method, settings, data, final metrics, citations), not transformers' generic one."""
        if not self.is_world_process_zero():
            return

        write_model_card(self.args.output_dir, self.args, read_summary(self.args.output_dir), model_name)

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' push_to_hub, uploading the model, tokenizer and card, not the run's own files."""
        with model_files_only():
            return super().push_to_hub(*args, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        with model_files_only():
            super()._push_from_checkpoint(checkpoint_folder)
