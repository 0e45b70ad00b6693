"""The layer contracts of pyproject.toml hold, and they are not decoration: an upward import planted in a copy of
the package fails `lint-imports`."""

import os
import shutil
import subprocess
import sys

from helpers import ROOT

LINT_IMPORTS = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def _lint(root: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": root}
    return subprocess.run([LINT_IMPORTS, "--config", os.path.join(root, "pyproject.toml"), "--no-cache"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_layers():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "broken" in result.stdout and "0 broken" in result.stdout


def test_an_upward_import_breaks_the_layer_contract(tmp_path):
    """methods/ (the lowest layer) importing the training config: the layers and the torch-only contracts break."""
    copy = str(tmp_path / "repo")
    shutil.copytree(os.path.join(ROOT, "adaptdpo"), os.path.join(copy, "adaptdpo"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), copy)
    planted = os.path.join(copy, "adaptdpo", "methods", "losses.py")
    with open(planted, "a", encoding="utf-8") as fh:
        fh.write("\nfrom adaptdpo.training.config import AdaptiveDPOConfig  # noqa: E402,F401  (planted)\n")
    result = _lint(copy)
    assert result.returncode != 0
    assert "adaptdpo.methods.losses -> adaptdpo.training.config" in result.stdout
    assert "BROKEN" in result.stdout
