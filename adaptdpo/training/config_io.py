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


def _fraction_or_auto(value: str) -> float | None:
    """``eval_fraction``: a number, or auto (None)."""
    return None if str(value).strip().lower() in ("auto", "none") else float(value)


class ConfigError(ValueError):
    """A config value or flag that cannot be used (the message names the key)."""


class ConfigParser(HfArgumentParser):
    """HfArgumentParser whose errors are exceptions naming the flag (no usage dump), without argparse's prefix
    matching (``--learning_r`` is an error, as a YAML typo is), and with suggestions for unknown flags."""

    def __init__(self) -> None:
        super().__init__(AdaptiveDPOConfig, allow_abbrev=False)  # type: ignore[arg-type]  # DataClassType: a NewType
        for action in self._actions:
            if action.help and "%" in action.help and "%(" not in action.help:
                action.help = action.help.replace("%", "%%")  # argparse %-formats help texts ("5% of the rows")
            if action.dest in ("bf16", "padding_free"):
                action.type = _bool_or_auto
            if action.dest == "eval_fraction":
                action.type = _fraction_or_auto

    def error(self, message: str) -> None:  # type: ignore[override]  # raises instead of exiting (NoReturn)
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


#: The groups of ``adaptdpo train --help`` and docs/config.md, in order: (title, the fields a user sets, the
#: prefixes and names of the rest of the group's fields). ``--help`` shows the first list; docs/config.md shows
#: every field of ours in its group, and ``--help-all`` every field, transformers' too.
FIELD_GROUPS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("data", ("train_file", "dataset_name", "eval_file", "eval_fraction", "max_length", "max_prompt_length",
              "truncation_mode", "max_train_samples"),
     ("train_", "dataset", "eval_", "max_eval_samples", "skip_invalid_rows", "implicit_prompt_marker",
      "pad_to_multiple_of", "datasets", "test_split_size", "chat_format", "pair_", "weight_column", "beta_column")),
    ("model", ("model_name_or_path", "ref_model_name_or_path", "trainable_layers", "use_peft", "lora_r", "dtype"),
     ("tokenizer_", "tiny_", "allow_half_precision_updates", "attn_implementation", "model_", "trust_remote_code",
      "disable_dropout", "prefix_cache", "lora_", "use_rslora", "use_dora", "load_in_", "bnb_", "use_bnb_")),
    ("method and loss", ("method", "beta", "loss_type", "label_smoothing", "beta_dpo_alpha", "sams_ratio",
                         "sams_mode"),
     ("loss_", "sigmoid_", "discopop_", "f_", "use_weighting", "ld_alpha", "sync_ref_model", "ref_model_",
      "beta_dpo_", "sams_", "epsilon_", "eps_", "holder_", "router_aux_loss_coef")),
    ("training", ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                  "gradient_accumulation_steps", "bf16", "seed"),
     ("activation_", "shared_prompt", "padding_free", "lm_head_chunk_size", "precompute_ref_log_probs",
      "ref_cache_dir", "cache_reference_logps", "ignore_bias_buffers", "remove_unused_columns")),
    ("output", ("output_dir", "logging_steps", "save_strategy", "report_to", "plots", "resume"),
     ("overwrite_output_dir", "accept_config_change", "token_metrics", "trace_pairs")),
)

#: flags that are not config fields: read by ``adaptdpo train`` before the config is parsed
LAUNCH_FLAGS = (("--config FILE", "a YAML file of fields (TRL's flag; or give it as the first argument)"),
                ("--accelerate_config NAME|FILE", "launch through accelerate: multi_gpu, fsdp2, zero1, zero2, zero3, "
                                                  "single_gpu, cpu-2proc, or an accelerate YAML file"),
                ("--num_processes N", "with --accelerate_config: the number of processes"),
                ("--debug", "the full traceback on an error"))


def field_group(name: str) -> str:
    """The FIELD_GROUPS title ``name`` belongs to ("other" when none)."""
    for title, main, rest in FIELD_GROUPS:
        if name in main or any(name == r or (r.endswith("_") and name.startswith(r)) or
                               (not r.endswith("_") and name.startswith(r) and r in ("dataset", "prefix_cache"))
                               for r in rest):
            return title
    return "other"


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    cut = text.find(". ")
    return text if cut < 0 else text[:cut + 1]


def grouped_help(prog: str = "adaptdpo train [CONFIG.yaml]") -> str:
    """``adaptdpo train --help``: the fields a user sets, grouped, then the launch flags; --help-all for the rest."""
    fields = {f.name: f for f in dataclasses.fields(AdaptiveDPOConfig)}
    lines = [f"usage: {prog} [--key value ...]", "",
             "Train a policy with a pairwise preference loss. Fields come from the YAML file, then from --key value "
             "flags, which win.", "Training data is required: --train_file or --dataset_name.", ""]
    for title, main, _ in FIELD_GROUPS:
        lines.append(f"{title}:")
        for name in main:
            f = fields[name]
            default = field_default(f)
            default = getattr(default, "value", default)
            if default is None and "auto (unset)" in f.metadata.get("help", ""):
                default = "auto"
            lines.append(f"  --{name} (default {default!r}): {_first_sentence(f.metadata.get('help', ''))}")
        lines.append("")
    lines.append("launching:")
    lines += [f"  {flag}: {text}" for flag, text in LAUNCH_FLAGS]
    lines += ["", f"adaptdpo train --help-all lists all {len(fields)} fields (transformers' TrainingArguments too); "
              "docs/config.md has ours, grouped as above."]
    return "\n".join(lines) + "\n"


def config_reference_markdown() -> str:
    """The config reference (docs/config.md), generated from the dataclass metadata: one table per FIELD_GROUPS
    group, each field of ours in its group, then the TrainingArguments defaults we change."""
    fields = {f.name: f for f in dataclasses.fields(AdaptiveDPOConfig)}
    ours = [name for name in AdaptiveDPOConfig.__annotations__ if name in fields]  # class variables left out
    out: list[str] = []
    for title in [g[0] for g in FIELD_GROUPS] + ["other"]:
        names = [n for n in ours if field_group(n) == title]
        if not names:
            continue
        out += [f"### {title}", "", "| field | default | meaning |", "|---|---|---|"]
        for name in names:
            f = fields[name]
            text = f.metadata.get("help", "").replace("|", "\\|").replace("\n", " ")
            out.append(f"| `{f.name}` | `{field_default(f)!r}` | {text} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(config_reference_markdown())
