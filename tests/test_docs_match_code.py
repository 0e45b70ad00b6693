"""The docs name only what exists: every `adaptdpo <command> --flag` in README.md and docs/*.md is a command of
the CLI and a flag that command reads; every file of the run-directory table in docs/config.md is written by the
package. The check is run on the shipped docs, and it must fail on a planted wrong flag."""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re

import pytest

from adaptdpo import cli
from adaptdpo.training.config_io import LAUNCH_FLAGS, _field_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
#: a command line in code: `adaptdpo CMD ...` up to a comment or the end of the line or span
COMMAND_LINE = re.compile(r"(?:^|[\s(/])(?<!from )(?<!import )adaptdpo (?P<command>[a-z][a-z-]*)(?P<rest>[^#\n]*)")
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9_-]*)")
#: fenced blocks (not Python ones) and inline code spans: where the docs write commands
FENCED = re.compile(r"^```(?P<lang>[a-z]*)\n(?P<body>.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
PLACEHOLDERS = {"key"}  # --key value


def code_of(markdown: str) -> list[str]:
    """The shell code of a markdown text: its fenced blocks other than python, its indented lines, its inline spans."""
    pieces = [m["body"] for m in FENCED.finditer(markdown) if m["lang"] not in ("python", "py", "yaml", "jsonl")]
    prose = FENCED.sub("", markdown)
    pieces += [line for line in prose.splitlines() if line.startswith("    ")]
    pieces += INLINE.findall(prose)
    return pieces


def _help_text(command: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            cli.main([command, "--help"])
        except SystemExit:
            pass
    return out.getvalue()


def known_flags(command: str) -> set[str]:
    """The flags ``adaptdpo command`` reads."""
    fields = _field_names() | {"help", "help-all", "debug"} | {f.split()[0][2:] for f, _ in LAUNCH_FLAGS}
    if command in ("train", "sft"):
        return fields
    flags = set(FLAG.findall(_help_text(command))) | {"help", "debug"}
    if command == "audit":  # every other flag is a training field for the fold models
        flags |= fields
    return flags


def wrong_names(texts: dict[str, str]) -> list[str]:
    """'file: adaptdpo CMD --flag' for every command or flag in ``texts`` (name -> markdown) the CLI lacks."""
    problems, cache = [], {}
    for name, text in texts.items():
        for match in (m for piece in code_of(text) for m in COMMAND_LINE.finditer(piece)):
            command = match["command"]
            if command not in cli.COMMANDS:
                problems.append(f"{name}: adaptdpo {command} (no such command)")
                continue
            flags = cache.setdefault(command, known_flags(command)) | PLACEHOLDERS
            problems += [f"{name}: adaptdpo {command} --{flag}" for flag in FLAG.findall(match["rest"])
                         if flag not in flags]
    return problems


def _doc_texts() -> dict[str, str]:
    out = {}
    for path in DOCS:
        with open(path, encoding="utf-8") as fh:
            out[os.path.relpath(path, ROOT)] = fh.read()
    return out


def test_every_command_and_flag_the_docs_name_exists():
    texts = _doc_texts()
    # the check reads the docs' commands
    assert sum(len(COMMAND_LINE.findall(c)) for t in texts.values() for c in code_of(t)) > 50
    assert wrong_names(texts) == []


@pytest.mark.parametrize("line, wrong", [
    ("```bash\nadaptdpo train configs/tiny.yaml --learning_rat 1e-5   # typo\n```", "adaptdpo train --learning_rat"),
    ("`adaptdpo audit data.jsonl --foldz 3`", "adaptdpo audit --foldz"),
    ("run `adaptdpo evaluate runs/x` to score it", "adaptdpo evaluate (no such command)"),
    ("    adaptdpo demo --quik", "adaptdpo demo --quik"),
])
def test_the_check_fails_on_a_planted_wrong_name(line, wrong):
    texts = _doc_texts()
    texts["README.md"] += "\n" + line + "\n"
    assert wrong_names(texts) == [f"README.md: {wrong}"]


def test_every_file_of_the_run_directory_table_is_written_by_the_package():
    with open(os.path.join(ROOT, "docs", "config.md"), encoding="utf-8") as fh:
        doc = fh.read()
    table = doc.split("## The run directory", 1)[1].split("\n## ", 1)[0]
    names = set()
    for row in table.splitlines():
        if row.startswith("| `"):
            names |= {n.strip("/").split("/")[-1] for n in re.findall(r"`([^`]+)`", row.split("|")[1])}
    source = ""
    for path in glob.glob(os.path.join(ROOT, "adaptdpo", "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as fh:
            source += fh.read()
    assert len(names) >= 15, names
    generic = {"config.json", "model.safetensors", "README.md"}  # written by transformers' save_pretrained
    missing = [n for n in sorted(names - generic)
               if n.replace("N", "").replace("*", "").rstrip("-") not in source]
    assert missing == []
