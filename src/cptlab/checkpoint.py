"""Checkpoints: weights as safetensors, optimizer and RNG states, the EMA/frozen teacher, the loop
position. Written into a temp dir and renamed (see store.py), loaded with safe loaders only."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .store import RunStore


def _state_for_file(model) -> dict[str, torch.Tensor]:
    # tied embeddings share storage; safetensors refuses shared tensors, so store contiguous clones
    return {k: v.detach().contiguous().clone().cpu() for k, v in model.state_dict().items()}


def _save_rng(path: Path) -> None:
    """RNG states as JSON and safetensors (no pickle anywhere in a checkpoint but the optimizer,
    which is read back with torch.load(weights_only=True))."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    (path / "rng.json").write_text(json.dumps({"python": [version, list(state), gauss],
                                               "numpy": [name, keys.tolist(), pos, has_gauss, cached]}))
    save_file({"torch": torch.get_rng_state()}, str(path / "rng.safetensors"))


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


def save_checkpoint(store: RunStore, tag: str, state: dict, model, optimizer=None, teacher=None, keep: int = 1) -> Path:
    tmp, final = store.new_checkpoint_dir(tag)
    save_file(_state_for_file(model), str(tmp / "model.safetensors"))
    if teacher is not None and teacher.state_dict() is not None:
        save_file({k: v.detach().contiguous().clone().cpu() for k, v in teacher.state_dict().items()},
                  str(tmp / "teacher.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    _save_rng(tmp)
    store.commit_checkpoint(tmp, final, state, keep)
    return final


def load_state(path: Path) -> dict:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"checkpoint '{path}': state.json is missing or corrupted") from None


def load_weights(path: Path, model, name: str = "model.safetensors") -> None:
    file = path / name
    try:
        tensors = load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise UserError(f"checkpoint '{path}': {name} is unreadable ({str(e).splitlines()[0][:120]})") from None
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise UserError(f"checkpoint '{path}': {name} does not match the model "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_checkpoint(path: Path, model, optimizer=None, teacher=None) -> dict:
    state = load_state(path)
    load_weights(path, model)
    if teacher is not None and teacher.copy is not None and (path / "teacher.safetensors").exists():
        load_weights(path, teacher.copy, "teacher.safetensors")
    if optimizer is not None and (path / "optimizer.pt").exists():
        try:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        except Exception as e:
            raise UserError(f"checkpoint '{path}': optimizer.pt is unreadable ({str(e).splitlines()[0][:120]})") from None
    _load_rng(path)
    return state
