"""Command line: ``adaptdpo train CONFIG.yaml [--key value ...]``, ``adaptdpo demo``, ``adaptdpo report``.

Works unchanged under ``accelerate launch -m adaptdpo.cli train ...`` or ``accelerate launch
$(which adaptdpo) train ...``: the trainer takes its distributed setup from the environment.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

USAGE = """adaptdpo <command> [...]

commands:
  train CONFIG.yaml [--key value ...]   train with a YAML config; every field can be overridden (--help lists them)
  demo [--output_dir DIR] [--key value ...]
                                        the main job: DPO on the embedded default (tiny model, shipped HH slice)
  report RUN_DIR                        (re)draw the plots of a run directory
  config-reference                      print the config reference (markdown)
"""


def _setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _split_config_path(args: list[str]) -> tuple[str | None, list[str]]:
    if args and not args[0].startswith("-") and args[0].endswith((".yaml", ".yml")):
        return args[0], args[1:]
    return None, args


def cmd_train(args: list[str]) -> int:
    from .config import make_parser, parse_config
    from .train import run_training

    if any(a in ("-h", "--help") for a in args):
        parser = make_parser()
        parser.prog = "adaptdpo train [CONFIG.yaml]"
        parser.description = ("Train a policy with a pairwise preference loss. Fields come from the YAML file, "
                              "then from --key value flags (which win). Every field is listed below.")
        parser.print_help()
        return 0
    yaml_path, rest = _split_config_path(args)
    config = parse_config(rest, yaml_path)
    summary = run_training(config)
    if config.should_save:
        print(json.dumps({"run_dir": config.output_dir, "final_metrics": summary["final_metrics"],
                          "wall_time_s": summary["wall_time_s"]}, indent=2))
    return 0


def cmd_demo(args: list[str]) -> int:
    from .demo import run_demo

    return run_demo(args)


def cmd_report(args: list[str]) -> int:
    from .report import plot_training_curves

    parser = argparse.ArgumentParser(prog="adaptdpo report")
    parser.add_argument("run_dir")
    ns = parser.parse_args(args)
    print(plot_training_curves(ns.run_dir) or "nothing logged yet")
    return 0


def cmd_config_reference(args: list[str]) -> int:
    from .config import config_reference_markdown

    sys.stdout.write(config_reference_markdown())
    return 0


COMMANDS = {"train": cmd_train, "demo": cmd_demo, "report": cmd_report, "config-reference": cmd_config_reference}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    _setup_logging()
    return COMMANDS[command](rest)


if __name__ == "__main__":
    sys.exit(main())
