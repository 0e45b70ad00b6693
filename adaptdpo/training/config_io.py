"""The config from the command line and YAML (TRL's ``--config``), and the config reference (docs/config.md).

``parse_config(argv)`` reads ``--config FILE`` first (YAML, paths relative to the file), then the flags, which
override it; every error names the flag or key. ``python -m adaptdpo.training.config_io`` prints the reference.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import yaml
from transformers import HfArgumentParser

from adaptdpo.training.config import AdaptiveDPOConfig, _bool_or_auto


def _field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(AdaptiveDPOConfig) if f.init}


#: fields holding paths to things that must exist; in a YAML file they may be relative to the file's folder
PATH_FIELDS = ("train_file", "dataset_name", "eval_file", "model_name_or_path", "ref_model_name_or_path",
               "tokenizer_name_or_path", "sams_encoder_path", "sams_scheduler_init", "resume_from_checkpoint",
               "pair_scores_file")


def _resolve_yaml_paths(data: dict[str, Any], yaml_path: str) -> None:
    """A relative path that does not exist from the working directory but does from the YAML's folder is
    taken from there (logged), so a shipped config works from anywhere."""
    import logging

    base = os.path.dirname(os.path.abspath(yaml_path))
    for key in PATH_FIELDS:
        value = data.get(key)
        if not isinstance(value, str) or os.path.isabs(value) or os.path.exists(value):
            continue
        for folder in (base, os.path.dirname(base)):  # the YAML's folder, then its parent (configs/ in a repo)
            candidate = os.path.join(folder, value)
            if os.path.exists(candidate):
                logging.getLogger("adaptdpo").info("%s: %s=%s does not exist from the working directory; using %s",
                                                   yaml_path, key, value, candidate)
                data[key] = candidate
                break


def load_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such config file")
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    unknown = sorted(set(data) - _field_names())
    if unknown:
        import difflib

        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, _field_names(), 1)) else k
                 for k in unknown]
        raise ValueError(f"{path}: unknown config field(s): {', '.join(hints)}")
    _resolve_yaml_paths(data, path)
    return data


class ConfigError(ValueError):
    """A config value or flag that cannot be used (the message names the key)."""


class ConfigParser(HfArgumentParser):
    """HfArgumentParser whose errors are exceptions naming the flag (no usage dump), without argparse's prefix
    matching (``--learning_r`` is an error, as a YAML typo is), and with suggestions for unknown flags."""

    def __init__(self) -> None:
        super().__init__(AdaptiveDPOConfig, allow_abbrev=False)
        for action in self._actions:
            if action.dest in ("bf16", "padding_free"):
                action.type = _bool_or_auto

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)

    def parse(self, argv: list[str]) -> AdaptiveDPOConfig:
        import difflib

        namespace, unknown = self.parse_known_args(args=argv)
        flags = [a for a in unknown if a.startswith("-")]
        if unknown:
            known = [f"--{name}" for name in _field_names()]
            hints = [f"{f} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(f.split("=")[0], known, 1))
                     else f for f in flags] or [repr(unknown[0])]
            raise ConfigError(f"unknown argument(s): {', '.join(hints)}; `adaptdpo train --help` lists every field")
        values = {k: v for k, v in vars(namespace).items() if k in _field_names()}
        try:
            return AdaptiveDPOConfig(**values)
        except TypeError as e:
            raise ConfigError(str(e)) from None


def _config_flag(argv: list[str], yaml_path: str | None) -> tuple[list[str], str | None]:
    """TRL's ``--config FILE`` (or ``--config=FILE``) as the YAML file; with a positional YAML too, an error."""
    rest, found = [], None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                found = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                found, i = argv[i + 1], i + 1
            else:
                raise ConfigError("--config needs a YAML file")
        else:
            rest.append(arg)
        i += 1
    if found and yaml_path:
        raise ConfigError(f"two config files: {yaml_path} and --config {found}; give one")
    return rest, found or yaml_path


def parse_config(argv: list[str] | None = None, yaml_path: str | None = None) -> AdaptiveDPOConfig:
    """Build the config from an optional YAML file (positional, or TRL's ``--config``) and ``--key value``
    overrides (which win)."""
    argv, yaml_path = _config_flag(list(argv or []), yaml_path)
    parser = ConfigParser()
    if yaml_path:
        parser.set_defaults(**load_yaml(yaml_path))
    return parser.parse(argv)


def make_parser() -> HfArgumentParser:
    return ConfigParser()


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default (its factory called), None when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def config_defaults() -> dict[str, Any]:
    """Every config field's plain default (for comparing with configs recorded by older versions)."""
    out = {f.name: getattr(field_default(f), "value", field_default(f)) for f in dataclasses.fields(AdaptiveDPOConfig)}
    return {k: v for k, v in out.items() if isinstance(v, (str, int, float, bool, list, type(None)))}


def config_reference_markdown() -> str:
    """The config reference table (docs/config.md), generated from the dataclass metadata."""
    lines = ["| field | default | meaning |", "|---|---|---|"]
    fields = {f.name: f for f in dataclasses.fields(AdaptiveDPOConfig)}
    for name in AdaptiveDPOConfig.__annotations__:  # ours first, then the TrainingArguments defaults we change
        if name not in fields:  # class variables
            continue
        f = fields[name]
        default = field_default(f)
        text = f.metadata.get("help", "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{f.name}` | `{default!r}` | {text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(config_reference_markdown())
