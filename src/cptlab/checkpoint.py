"""Checkpoints: weights as safetensors, optimizer and RNG states, the method's own state (each entry
of `method.state_dict()` as `<name>.safetensors`, e.g. an EMA or frozen teacher), the loop position.
Written into a temp dir and renamed (see store.py), verified against the sizes and sha256 digests in
state.json before anything is loaded, and loaded with safe loaders only."""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from .errors import UserError
from .variants import checkpoint_state_dict, load_checkpoint_state
from .store import RunStore, file_digest, write_synced


def _contiguous_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # tied embeddings share storage; safetensors refuses shared tensors, so store contiguous clones
    return {k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}


def _save_rng(path: Path) -> None:
    """RNG states as JSON and safetensors (no pickle anywhere in a checkpoint but the optimizer,
    which is read back with torch.load(weights_only=True))."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    write_synced(path / "rng.json", json.dumps({"python": [version, list(state), gauss],
                                                "numpy": [name, keys.tolist(), pos, has_gauss, cached]}).encode())
    write_synced(path / "rng.safetensors", save({"torch": torch.get_rng_state()}))


def _load_rng(path: Path) -> None:
    if not (path / "rng.json").exists():
        return
    try:
        data = json.loads((path / "rng.json").read_text())
        version, state, gauss = data["python"]
        random.setstate((version, tuple(state), gauss))
        name, keys, pos, has_gauss, cached = data["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch"])
    except Exception:
        raise UserError(f"checkpoint '{path}': the RNG state files are unreadable") from None


def save_checkpoint(store: RunStore, tag: str, state: dict, model, optimizer=None, method=None,
                    keep: int = 1, keep_stage_ends: bool = False) -> Path | None:
    """Fill a temp dir and rename it into place. Every file is serialised in memory and written by
    `write_synced`: safetensors' save_file and torch.save to a path return without an error on a full
    disk (ENOSPC on /dev/full), which would leave a truncated checkpoint; here it is an OSError naming
    the file. On any failure the temp dir is removed and the previous checkpoints are untouched.

    A sharded (FSDP) model's weights, optimizer and method state are gathered into full state dicts
    first, on every rank (collectives: every rank calls this); only rank 0 writes (others return None).
    `keep` and `keep_stage_ends`: which older checkpoints stay (RunStore.commit_checkpoint)."""
    from . import distributed as dist
    from .variants import variant_of

    # a LoRA model stores its adapters only (variants.LoRA.checkpoint_state)
    weights = _contiguous_cpu(checkpoint_state_dict(model))
    extra = {key: _contiguous_cpu(t) for key, t in (method.state_dict() if method is not None else {}).items()}
    optim = None
    if optimizer is not None:  # a sharded model's: keyed by parameter name, whatever the number of ranks
        optim = variant_of(model).optimizer_state(model, optimizer)
    if not dist.is_main():
        return None
    tmp, final = store.new_checkpoint_dir(tag)
    try:
        write_synced(tmp / "model.safetensors", save(weights))
        for key, tensors in extra.items():  # e.g. the method's teacher
            write_synced(tmp / f"{key}.safetensors", save(tensors))
        if optim is not None:
            buf = io.BytesIO()
            torch.save(optim, buf)
            write_synced(tmp / "optimizer.pt", buf.getvalue())
        _save_rng(tmp)
        store.commit_checkpoint(tmp, final, state, keep, keep_stage_ends)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        name = Path(e.filename).name if e.filename else ""
        raise OSError(e.errno, e.strerror, str(final / name)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


STAGE_MODELS_AUTO_BYTES = 64 * 2 ** 20
"""run.keep_stage_models auto: keep every stage's model when a checkpoint's weights take at most this."""


def keeps_stage_models(setting, model) -> bool:
    """run.keep_stage_models resolved for `model` (before it is sharded): true/false as set; auto: whether
    the weights a checkpoint stores (a LoRA model's adapters only) fit STAGE_MODELS_AUTO_BYTES."""
    from .variants import variant_of

    if setting != "auto":
        return bool(setting)
    return variant_of(model).stored_bytes(model) <= STAGE_MODELS_AUTO_BYTES


def verify_checkpoint(path: Path, state: dict) -> None:
    """Every file state.json lists is there with its recorded size and sha256 (a crash cannot leave a
    renamed checkpoint half-written, but a disk, a copy or a person can damage one afterwards)."""
    hint = "; move that directory away to resume from an older checkpoint"
    for name, meta in (state.get("files") or {}).items():
        file = path / name
        if not file.is_file():
            raise UserError(f"checkpoint '{path}': {name} is missing{hint}")
        size = file.stat().st_size
        if size != meta.get("bytes"):
            raise UserError(f"checkpoint '{path}': {name} is truncated or corrupted ({size} bytes, "
                            f"{meta.get('bytes')} when written){hint}")
        if file_digest(file) != meta.get("sha256"):
            raise UserError(f"checkpoint '{path}': {name} is corrupted (sha256 differs from when it was written){hint}")


def load_state(path: Path) -> dict:
    """state.json, after checking the checkpoint's files against it (nothing is loaded or changed
    before this passes)."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"checkpoint '{path}': state.json is missing or corrupted") from None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint '{path}': state.json is corrupted (not a mapping)")
    verify_checkpoint(path, state)
    return state


def _read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    file = path / name
    if not file.is_file():
        raise UserError(f"checkpoint '{path}': {name} is missing; move that directory away to resume from an "
                        "older checkpoint")
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise UserError(f"checkpoint '{path}': {name} is unreadable ({str(e).splitlines()[0][:120]})") from None


def _load_into(load, path: Path, name: str, tensors: dict) -> None:
    try:
        load(tensors)
    except ValueError as e:
        raise UserError(f"checkpoint '{path}': {name} does not match the model ({e})") from None


def load_weights(path: Path, model, name: str = "model.safetensors") -> None:
    _load_into(lambda t: load_checkpoint_state(model, t), path, name, _read_tensors(path, name))


def load_checkpoint(path: Path, model, optimizer=None, method=None) -> dict:
    """Model, the method's own state (e.g. its teacher), optimizer and RNG states from `path` (for a
    sharded model: on every rank, each keeping its shard)."""
    from .variants import variant_of

    state = load_state(path)
    load_weights(path, model)
    if method is not None and method.state_dict():
        names = list(method.state_dict())
        tensors = {key: _read_tensors(path, f"{key}.safetensors") for key in names}
        _load_into(method.load_state_dict, path, " and ".join(f"{key}.safetensors" for key in names), tensors)
    if optimizer is not None and (path / "optimizer.pt").exists():
        try:
            saved = torch.load(path / "optimizer.pt", weights_only=True)
            by_name = any(isinstance(k, str) for k in saved.get("state", {}))  # written by an FSDP run
            variant_of(model).load_optimizer_state(model, optimizer, saved, by_name)
        except Exception as e:
            raise UserError(f"checkpoint '{path}': optimizer.pt is unreadable ({str(e).splitlines()[0][:120]})") from None
    _load_rng(path)
    return state
