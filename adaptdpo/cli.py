"""Command line: ``adaptdpo train CONFIG.yaml [--key value ...]``, ``adaptdpo demo``, ``adaptdpo report``.

Works unchanged under ``accelerate launch -m adaptdpo.cli train ...`` or ``accelerate launch
$(which adaptdpo) train ...``: the trainer takes its distributed setup from the environment.

Each command imports what it runs inside its own function: ``import adaptdpo.cli`` takes about 1.7 s (torch),
the training job about 7.5 s (transformers, trl's pieces, accelerate; measured on 2 busy cores), so ``--help``, a
config error or ``adaptdpo report`` answer without the second. These are the package's only function-local imports
of its own modules (the others under ``TYPE_CHECKING`` are for annotations only).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

USAGE = """adaptdpo <command> [...]

commands:
  train [CONFIG.yaml] --train_file FILE --model_name_or_path M [--key value ...]
                                        train a policy on preference pairs; every field can be set in the YAML
                                        file or as a flag (--help: the common ones, grouped; --help-all: all);
                                        --accelerate_config NAME|FILE [--num_processes N] launches it through
                                        accelerate (multi_gpu, fsdp2, zero1/2/3, single_gpu, cpu-2proc)
  sft CONFIG.yaml [--key value ...]     SamS scheduler pre-training (paper App. F.3): SFT on the chosen responses
                                        (--sams_pretrain frozen: policy fixed) → <output_dir>/sams_scheduler.pt
  demo [--quick] [--output_dir DIR]     the main job: builds the gold-reward task (tiny model, 20% flipped labels),
                                        trains DPO, β-DPO, SamS and β-DPO+SamS on it and compares them (report.md)
  eval MODEL_OR_RUN_DIR (--task TASK_DIR | --data FILE) [--reference REF] [--beta B]
                                        gold-task metrics (accuracy, win rate, reward, KL) or implicit-reward
                                        accuracy and margin on any preference file
  task sentiment|toy [--flip_rate R --high_gap_fraction H --train_pairs N ...] [--quick] [--cache DIR]
                                        build a gold task (sentiment: prompts x topics, completions sampled from
                                        SmolLM2-135M-Instruct, judged by VADER; cached) and print its folder
  audit DATA [CONFIG.yaml] [--signal probe|dpo_folds|probe+dpo_folds] [--clean drop|relabel|swap|weight|none]
                                        find suspect pairs: reward probes on the reference's frozen features (or
                                        DPO fold models), cross-fitted, score every pair; the flip rate with an
                                        interval (audit.jsonl, report.md, cleaned.jsonl); training fields
                                        (--model_name_or_path, --max_length, ...) set the reference
  report RUN_DIR                        (re)draw the plots of a run directory (curves, margins, β)
  config-reference [--update DOC]       print the config reference (markdown), or rewrite it in DOC
  export-model SRC DIR                  write a packaged model (smollm2-135m-instruct, all-minilm-l6-v2) or a
                                        .gguf file as a plain float32 model folder (safetensors + tokenizer)

Errors print one line and a hint; add --debug to any command for the full traceback.
"""


def _setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # bitsandbytes (installed for QLoRA) says at import, on every command, that an optional CPU 4-bit kernel
    # package is missing; it only changes CPU 4-bit speed
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _split_config_path(args: list[str]) -> tuple[str | None, list[str]]:
    if args and not args[0].startswith("-") and args[0].endswith((".yaml", ".yml")):
        return args[0], args[1:]
    return None, args


#: names --accelerate_config takes besides a file path (TRL's names, and ours)
ACCELERATE_ALIASES = {"ddp": "multi_gpu", "fsdp": "fsdp2"}


def accelerate_config_path(value: str) -> str:
    """``--accelerate_config``: a file, or the name of a shipped config (TRL's: single_gpu, multi_gpu, zero1,
    zero2, zero3, fsdp2; ours: cpu-2proc)."""
    if os.path.isfile(value):
        return value
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "accelerate_configs")
    name = ACCELERATE_ALIASES.get(value, value)
    path = os.path.join(folder, f"{name}.yaml")
    if not os.path.isfile(path):
        names = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))
        from adaptdpo.training.config_io import ConfigError

        raise ConfigError(f"--accelerate_config {value}: no such file, and not a shipped config ({', '.join(names)})")
    return path


def accelerate_launch_command(args: list[str], command: str = "train") -> list[str] | None:
    """``adaptdpo train ... --accelerate_config X [--num_processes N]`` as the ``accelerate launch`` command that
    runs the same training in as many processes as the config says (as ``trl dpo --accelerate_config``); None
    without ``--accelerate_config``."""
    from adaptdpo.training.config_io import ConfigError

    launcher: list[str] = []
    rest: list[str] = []
    found = False
    i = 0
    while i < len(args):
        flag, _, inline = args[i].partition("=")
        if flag in ("--accelerate_config", "--num_processes", "--main_process_port"):
            value = inline or (args[i + 1] if i + 1 < len(args) else None)
            if value is None:
                raise ConfigError(f"{flag} needs a value")
            if flag == "--accelerate_config":
                launcher += ["--config_file", accelerate_config_path(value)]
                found = True
            else:
                launcher += [flag, value]
            i += 1 if inline else 2
            continue
        rest.append(args[i])
        i += 1
    if not found:
        if launcher:
            raise ConfigError(f"{launcher[0]} is a launcher flag: use it with --accelerate_config")
        return None
    return [sys.executable, "-m", "accelerate.commands.launch", *launcher, "-m", "adaptdpo.cli", command, *rest]


def cmd_train(args: list[str]) -> int:
    from adaptdpo.training.config_io import grouped_help, make_parser, parse_config
    from adaptdpo.training.job import run_training

    launch = accelerate_launch_command(args)
    if launch is not None:
        import subprocess

        logging.getLogger("adaptdpo").info("launching: %s", " ".join(launch))
        return subprocess.call(launch)

    if "--help-all" in args:
        parser = make_parser()
        parser.prog = "adaptdpo train [CONFIG.yaml]"
        parser.description = ("Train a policy with a pairwise preference loss. Fields come from the YAML file, "
                              "then from --key value flags (which win). Every field is listed below; "
                              "`adaptdpo train --help` shows the ones a user sets, grouped.")
        parser.print_help()
        return 0
    if any(a in ("-h", "--help") for a in args):
        sys.stdout.write(grouped_help())
        return 0
    yaml_path, rest = _split_config_path(args)
    config = parse_config(rest, yaml_path)
    summary = run_training(config)
    if config.should_save:
        print(json.dumps({"run_dir": config.output_dir, "final_metrics": summary["final_metrics"],
                          "wall_time_s": summary["wall_time_s"]}, indent=2))
        print(run_result_lines(config.output_dir, summary), file=sys.stderr)
    return 0


def run_result_lines(run_dir: str, summary: dict) -> str:
    """What a finished run gives, in words: the held-out result, then where the model and the report are."""
    if summary.get("already_complete"):
        return f"{run_dir} already held a complete run (nothing trained): its summary is {run_dir}/summary.json"
    lines = [f"done: {summary.get('global_step')} steps in {float(summary.get('wall_time_s') or 0):.0f} s"]
    ev = summary.get("final_eval") or {}
    if "eval_rewards/accuracies" in ev:
        pairs = (summary.get("data") or {}).get("eval_pairs")
        where = f" ({pairs} pairs)" if pairs else ""
        lines.append(f"held-out{where}: reward accuracy 0.5 (chance) at the start, where "
                     f"the policy is the reference and every margin is 0 → {ev['eval_rewards/accuracies']:.3f}; "
                     f"margin 0 → {ev.get('eval_rewards/margins', float('nan')):.3f}; eval loss "
                     f"{ev.get('eval_loss', float('nan')):.4f} (log 2 = 0.6931 at the start)")
    else:
        lines.append("held-out: none (no eval_file, and eval_fraction held nothing out): this run reports training "
                     "metrics only")
    lines.append(f"model: {run_dir} (model.safetensors or the LoRA adapter, tokenizer, README.md model card)")
    lines.append(f"report: {run_dir}/summary.json, metrics.jsonl, pairs.jsonl; plots in {run_dir}/plots")
    return "\n".join(lines)


def cmd_sft(args: list[str]) -> int:
    """``adaptdpo train`` with ``--sams_pretrain sft`` (or ``frozen``) as the default."""
    if any(a in ("-h", "--help") for a in args):
        print("adaptdpo sft [CONFIG.yaml] [--key value ...]: pre-train the SamS scheduler during SFT on the chosen "
              "responses (--sams_pretrain frozen: the policy stays fixed). Every `adaptdpo train` field applies; "
              "the scheduler is written to <output_dir>/sams_scheduler.pt. Then: adaptdpo train ... --method sams "
              "--sams_scheduler_init <output_dir>/sams_scheduler.pt")
        return 0
    yaml_path, rest = _split_config_path(args)
    if "--sams_pretrain" not in rest:
        rest = [*rest, "--sams_pretrain", "sft"]
    return cmd_train(([yaml_path] if yaml_path else []) + rest)


def cmd_demo(args: list[str]) -> int:
    from adaptdpo.tasks.demo import run_demo

    return run_demo(args)


def cmd_eval(args: list[str]) -> int:
    from transformers import AutoModelForCausalLM

    from adaptdpo.data.rows import load_preference_rows
    from adaptdpo.evaluation.metrics import preference_accuracy
    from adaptdpo.models.loading import load_tokenizer

    parser = argparse.ArgumentParser(prog="adaptdpo eval")
    parser.add_argument("model", help="a run directory (its final model is used) or a model folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="a gold-task folder (train.jsonl, eval.jsonl, prompts.jsonl, task.json): the "
                        "toy task's or the sentiment task's (`adaptdpo task`)")
    source.add_argument("--data", help="preference data (any supported format); labels as given")
    parser.add_argument("--reference", help="the reference model (default: the task's, or required with --data)")
    parser.add_argument("--beta", type=float, default=0.1, help="β of the reported implicit-reward margin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the metrics to this JSON file")
    ns = parser.parse_args(args)
    from adaptdpo.models.loading import check_model_source
    from adaptdpo.training.run_dir import final_model_path

    model_dir = final_model_path(ns.model) or ns.model
    check_model_source(model_dir, "model")
    if ns.reference:
        check_model_source(ns.reference, "--reference")
    if ns.task:
        import torch

        from adaptdpo.tasks.experiment import evaluate_on_task
        from adaptdpo.tasks.loading import load_any_task

        task = load_any_task(ns.task)  # checks every task file first
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # transformers types PreTrainedModel.to (a @wraps(Module.to) method) without its self
        policy = AutoModelForCausalLM.from_pretrained(model_dir).to(device)  # type: ignore[arg-type]  # see above
        ref_dir = ns.reference or task.reference_dir
        reference = AutoModelForCausalLM.from_pretrained(ref_dir).to(device)  # type: ignore[arg-type]  # see above
        tokenizer = load_tokenizer(task.reference_dir)
        if policy.get_input_embeddings().num_embeddings < len(tokenizer):
            raise ValueError(f"{model_dir}: its vocabulary ({policy.get_input_embeddings().num_embeddings} tokens) "
                             f"does not cover the task's tokenizer ({len(tokenizer)} tokens): this model was not "
                             f"trained on the task {ns.task}")
        metrics = evaluate_on_task(policy, reference, tokenizer, task, ns.beta, seed=ns.seed)
        metrics["gold/eval_pairs"] = task.stats["eval_pairs"]
        if os.path.exists(os.path.join(ns.model, "pairs.jsonl")):
            from adaptdpo.evaluation.metrics import selection_of_flipped_pairs

            metrics.update(selection_of_flipped_pairs(ns.model, task.flipped_pair_ids()))
    else:
        if not ns.reference:
            parser.error("--data needs --reference (the model the policy was trained from)")
        policy = AutoModelForCausalLM.from_pretrained(model_dir)
        reference = AutoModelForCausalLM.from_pretrained(ns.reference)
        tokenizer = load_tokenizer(model_dir)
        rows, report = load_preference_rows(ns.data, skip_invalid=True)
        metrics = {f"eval/{k}": v for k, v in preference_accuracy(policy, reference, tokenizer, rows, ns.beta).items()}
        metrics["eval/pairs"] = len(rows)
        metrics["eval/skipped_rows"] = len(report.skipped)
    print(json.dumps(metrics, indent=2))
    if ns.out:
        with open(ns.out, "w", encoding="utf-8") as fh:
            json.dump(metrics, fh, indent=2)
    return 0


def audit_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaptdpo audit DATA [CONFIG.yaml]", allow_abbrev=False,
        description="Cross-fitted noise scores for every pair of DATA, the estimated flip rate, a report and a "
                    "cleaned copy. Options below are the audit's; every other --key value is a training field "
                    "(`adaptdpo train --help`): --model_name_or_path (required: the reference), --max_length, the "
                    "chat format, and for --signal dpo_folds the fold models' --beta, --num_train_epochs, "
                    "--learning_rate. Docs: docs/audit.md.")
    parser.add_argument("--output_dir", help="the audit folder (default: runs/audit-<data file name>)")
    parser.add_argument("--signal", default="probe", choices=("probe", "dpo_folds", "probe+dpo_folds"),
                        help="probe (default): Bradley-Terry probes on the reference's frozen hidden states, one "
                             "forward pass; dpo_folds: K DPO models trained from the reference; probe+dpo_folds: "
                             "both, averaged where that raises the held-out likelihood of the labels")
    parser.add_argument("--probe_layers", default="auto",
                        help="layers whose hidden states the probe reads: auto (embeddings, a quarter, half and all "
                             "the way up) or comma-separated numbers (0 = embeddings, -1 = last block)")
    parser.add_argument("--probe_poolings", default="mean,last",
                        help="how a completion's hidden states are pooled: mean, last or both (default mean,last)")
    parser.add_argument("--probe_token_bag", default="true", choices=("true", "false"),
                        help="also probe each completion's token frequencies (a lexical view, no forward pass; "
                             "default true)")
    parser.add_argument("--probe_inner_folds", type=int, default=3,
                        help="inner cross-validation folds that choose the probe's regularisation (default 3)")
    parser.add_argument("--bootstrap", type=int, default=200,
                        help="bootstrap resamples of the flip-rate interval (default 200; 0: no interval)")
    parser.add_argument("--folds", type=int, default=5, help="K: each pair scored by a model fitted on the other "
                                                            "K-1 folds (default 5)")
    parser.add_argument("--fold_seed", type=int, default=0, help="seed of the fold assignment")
    parser.add_argument("--clean", default="drop", choices=("drop", "relabel", "swap", "weight", "none"),
                        help="cleaned.jsonl: drop the top suspects (default), relabel them (swap chosen/rejected), "
                             "swap chosen/rejected of confident ones, keep every row with audit_weight = 1 − P(flip) "
                             "(train with --weight_column audit_weight), or write all rows unchanged; never more "
                             "pairs than the estimated flip count, nothing after a warning, without --force")
    parser.add_argument("--force", action="store_true",
                        help="clean as asked even past the estimated flip count or after a warning")
    parser.add_argument("--drop_fraction", type=float, default=None,
                        help="share of pairs dropped (or relabelled) by --clean drop|relabel (default: the estimated "
                             "flip rate)")
    parser.add_argument("--swap_threshold", type=float, default=0.8,
                        help="--clean swap: swap pairs whose flip probability is at least this (default 0.8)")
    parser.add_argument("--truth_field", default="flipped",
                        help="a boolean column marking known-bad pairs, used when every row has it (default flipped)")
    parser.add_argument("--truth_file", help="known-bad pairs: a JSON list of row ids, or one row id per line")
    parser.add_argument("--from_run", help="a training run on the same file: add its per-pair signals (mean margin, "
                                           "margin z-score in its batch, share of appearances trained on)")
    parser.add_argument("--score_batch_size", type=int, default=32, help="pairs per scoring forward")
    parser.add_argument("--overwrite", action="store_true", help="start the audit again from scratch")
    return parser


def cmd_audit(args: list[str]) -> int:
    from adaptdpo.audit.run import AuditOptions, run_audit

    parser = audit_parser()
    if not args or args[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if args else 2
    data, rest = args[0], args[1:]
    yaml_path, rest = _split_config_path(rest)
    ns, train_args = parser.parse_known_args(rest)
    stem = os.path.basename(data.rstrip("/")).split(".")[0] or "data"
    options = AuditOptions(data=data, output_dir=ns.output_dir or os.path.join("runs", f"audit-{stem}"),
                           folds=ns.folds, fold_seed=ns.fold_seed, clean=ns.clean, drop_fraction=ns.drop_fraction,
                           swap_threshold=ns.swap_threshold, truth_field=ns.truth_field, truth_file=ns.truth_file,
                           from_run=ns.from_run, score_batch_size=ns.score_batch_size, overwrite=ns.overwrite,
                           signal=ns.signal, probe_layers=ns.probe_layers, probe_poolings=ns.probe_poolings,
                           probe_token_bag=ns.probe_token_bag == "true",
                           inner_folds=ns.probe_inner_folds, bootstrap=ns.bootstrap, force=ns.force)
    summary = run_audit(options, train_args, yaml_path)
    keys = ("rows", "scored_pairs", "signal", "estimated_flip_rate", "flip_rate_interval", "estimated_flip_count",
            "heldout_accuracy_of_labels", "warnings", "cleaned_counts", "cleaning", "ground_truth", "wall_time_s")
    print(json.dumps({"audit_dir": options.output_dir, **{k: summary[k] for k in keys if k in summary}}, indent=2))
    return 0


def cmd_report(args: list[str]) -> int:
    from adaptdpo.training.plots import plot_run

    parser = argparse.ArgumentParser(prog="adaptdpo report")
    parser.add_argument("run_dir")
    ns = parser.parse_args(args)
    print("\n".join(plot_run(ns.run_dir)) or "nothing logged yet")
    return 0


GENERATED_MARKER = "<!-- generated by `adaptdpo config-reference --update docs/config.md` -->"


def cmd_config_reference(args: list[str]) -> int:
    from adaptdpo.training.config_io import config_reference_markdown

    parser = argparse.ArgumentParser(prog="adaptdpo config-reference")
    parser.add_argument("--update", metavar="DOC", help="rewrite the table after the marker line in DOC")
    ns = parser.parse_args(args)
    table = config_reference_markdown()
    if not ns.update:
        sys.stdout.write(table)
        return 0
    with open(ns.update, encoding="utf-8") as fh:
        text = fh.read()
    if GENERATED_MARKER not in text:
        print(f"{ns.update}: no marker line {GENERATED_MARKER!r}", file=sys.stderr)
        return 1
    with open(ns.update, "w", encoding="utf-8") as fh:
        fh.write(text.split(GENERATED_MARKER)[0] + GENERATED_MARKER + "\n\n" + table)
    return 0


def cmd_export_model(args: list[str]) -> int:
    from adaptdpo.models.sources import PACKAGED_MODELS, export_model

    parser = argparse.ArgumentParser(prog="adaptdpo export-model")
    parser.add_argument("source", help=f"a packaged model ({', '.join(PACKAGED_MODELS)}), a .gguf file or a folder")
    parser.add_argument("destination", help="the folder to write (must not exist or be empty)")
    ns = parser.parse_args(args)
    print(export_model(ns.source, ns.destination))
    return 0


def cmd_task(args: list[str]) -> int:
    """Build (or find in its cache) a gold-task folder and print its path."""
    import dataclasses

    from adaptdpo.tasks.sentiment.task import SentimentSpec, build_sentiment_task
    from adaptdpo.tasks.toy.task import ToySpec, build_task

    # the spec class, its builder (spec, cache folder) -> task, the default cache
    kinds: dict[str, tuple[type, Callable[..., Any], str]] = {
        "sentiment": (SentimentSpec, build_sentiment_task, "runs/sentiment-cache"),
        "toy": (ToySpec, build_task, "runs/gold-cache")}
    parser = argparse.ArgumentParser(prog="adaptdpo task")
    parser.add_argument("kind", choices=tuple(kinds), help="sentiment: real text from SmolLM2, judged by VADER; "
                        "toy: the synthetic language")
    parser.add_argument("--cache", help="the cache folder (default: runs/sentiment-cache or runs/gold-cache)")
    parser.add_argument("--quick", action="store_true", help="sentiment: a handful of prompts and short completions")
    spec_type = kinds[args[0]][0] if args and args[0] in kinds else SentimentSpec
    for field in dataclasses.fields(spec_type):
        kind = str if isinstance(field.default, str) else (float if isinstance(field.default, float) else int)
        parser.add_argument(f"--{field.name}", type=kind, help=f"default {field.default}")
    ns = parser.parse_args(args)
    spec_cls, build, cache = kinds[ns.kind]
    overrides = {f.name: getattr(ns, f.name) for f in dataclasses.fields(spec_cls) if getattr(ns, f.name) is not None}
    if ns.quick and ns.kind != "sentiment":
        parser.error("--quick is for the sentiment task")
    spec = SentimentSpec.quick(**overrides) if ns.quick else spec_cls(**overrides)
    task = build(spec, ns.cache or cache)
    print(os.path.dirname(task.train_file))
    return 0


COMMANDS = {"train": cmd_train, "task": cmd_task, "export-model": cmd_export_model, "audit": cmd_audit,
            "sft": cmd_sft, "demo": cmd_demo, "eval": cmd_eval, "report": cmd_report,
            "config-reference": cmd_config_reference}


def _hint(error: BaseException) -> str:
    from adaptdpo.data.readers import DataValidationError

    if isinstance(error, DataValidationError):
        return "fix that row, or set skip_invalid_rows: true to skip invalid rows (listed in skipped_rows.jsonl)"
    if isinstance(error, KeyboardInterrupt):
        return "run the same command again to resume from the last checkpoint"
    return "add --debug for the full traceback"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ADAPTDPO_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    _setup_logging()
    try:
        return COMMANDS[command](rest)
    except (Exception, KeyboardInterrupt) as error:
        if debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"adaptdpo {command}: error: {message}\n  hint: {_hint(error)}", file=sys.stderr)
        return 130 if isinstance(error, KeyboardInterrupt) else 1


if __name__ == "__main__":
    sys.exit(main())
