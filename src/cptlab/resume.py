"""Opening a run directory and picking a run up where it stopped.

  open_distributed   the process group, then the run's config and directory (created, or opened to
                     resume), everything checkable checked before anything is created
  is_complete        whether the directory already holds the whole run (resuming it changes nothing)
  restore            the newest complete checkpoint's weights and state; metrics.jsonl cut back to the
                     lines that checkpoint saw (a torn last line, records after it)

The optimizer's and the method's state are restored by the stage loop (continual.py), which builds
them; the records of what was redone are written again, identical, by the same seeds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from . import distributed as dist
from .checkpoint import load_state, load_weights
from .config import Config, from_dict, stage_method, to_dict, validate
from .errors import ConfigError, UserError
from .store import FollowerStore, RunStore
from .ui import console
from .warmup import cache_path
from .metric_names import RUN_END


def is_complete(store: RunStore, n_stages: int) -> bool:
    """Whether the run directory already holds the whole run: a run_end record after the newest
    checkpoint, which is the last stage's end (or no checkpoint at all, with run.checkpoint off)."""
    records = store.read_metrics()
    ckpts = store.checkpoint_dirs()
    if not ckpts:
        return any(r.get("event") == RUN_END for r in records)
    state = load_state(ckpts[-1])
    after = records[state.get("metrics_lines", len(records)):]
    return (state.get("stage") == n_stages and bool(state.get("stage_done"))
            and any(r.get("event") == RUN_END for r in after))


def restore(store: RunStore, model, remember_previous: Callable | None = None) -> dict:
    """Load the newest complete checkpoint into `model` and cut metrics.jsonl back to it; returns its
    state (stage, step, global_step, stage_done, path), or a fresh run's state (path None) when there is
    none. `remember_previous(model)` is called with the previous stage end's weights loaded (drift vs
    the previous stage): the checkpoint itself at a stage end, else the stage-end checkpoint the store
    keeps for this (see store.commit_checkpoint). A damaged checkpoint is refused before the metrics are
    touched."""
    ckpts = store.checkpoint_dirs()
    if not ckpts:
        store.truncate_metrics(0)
        return dict(stage=0, step=0, global_step=0, stage_done=False, path=None)
    state = load_state(ckpts[-1])
    end = ckpts[-1] if state.get("stage_done") else store.latest_stage_end()
    if remember_previous is not None and end is not None and end != ckpts[-1] \
            and load_state(end).get("stage") == state.get("stage", 0) - 1:
        load_weights(end, model)
        remember_previous(model)
    load_weights(ckpts[-1], model)
    store.truncate_metrics(state["metrics_lines"])
    if remember_previous is not None and end == ckpts[-1]:
        remember_previous(model)
    console.print(f"resuming from {ckpts[-1].name}")
    return {**state, "path": ckpts[-1]}


def check_paths(cfg: Config, run_dir: Path | None = None) -> None:
    """What can be checked on disk before a run directory is created: the model directory, and the
    warm-up cache directory where a base model will be written into it (else a bad one is found only
    after the whole warm-up ran)."""
    from .gguf_model import find_gguf
    from .models import check_model_dir

    if cfg.model.path:
        if find_gguf(cfg.model.path) is None:  # a GGUF file (or short name) is checked by find_gguf itself
            check_model_dir(cfg.model.path)
        return
    cached = cache_path(cfg)
    if cached is None or (cached / "config.json").exists() or (run_dir and (run_dir / "base" / "config.json").exists()):
        return
    existing = Path(os.path.expanduser(cfg.warmup.cache_dir))
    while not existing.exists() and existing.parent != existing:  # the part of the path that exists
        existing = existing.parent
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise ConfigError("warmup.cache_dir", cfg.warmup.cache_dir,
                          f"a writable directory ('{existing}' is not one; '' turns the cache off)")


def open_run(cfg: Config | None, *, out_dir: str | None = None, resume: str | None = None,
             overwrite: bool = False) -> tuple[Config, RunStore]:
    """The run's config and its directory, created or opened, and claimed by this process until the
    store is closed. Everything that can be checked is checked before anything is created."""
    if resume:
        store = RunStore.open(Path(resume))
        cfg = from_dict(Config, store.read_config())
        validate(cfg)
        check_paths(cfg, store.root)
        store.claim()
        return cfg, store
    assert cfg is not None
    validate(cfg)
    check_paths(cfg)
    root = Path(out_dir) if out_dir else Path(cfg.run.out_dir) / cfg.run.name
    return cfg, RunStore.create(root, to_dict(cfg), overwrite=overwrite)


def check_world_size(cfg: Config, world: int) -> None:
    """Every stage's prompts per step must split evenly over the torchrun ranks."""
    from .methods import examples_per_step

    for i, stage in enumerate(cfg.stages):
        m = stage_method(cfg, stage, i)
        dist.per_rank(examples_per_step(m, cfg.rollout.group_size), world, f"stages[{i}].method.prompts_per_step",
                      m.prompts_per_step)


def open_distributed(cfg: Config | None, out_dir, resume, overwrite) -> tuple[Config, RunStore, dist.DistInfo]:
    """Start the process group (a no-op without torchrun), then let rank 0 create or open the run
    directory; the other ranks open it read-only once it exists. A refusal on rank 0 (existing
    directory, bad checkpoint...) reaches every rank, so none is left waiting."""
    pref = cfg.run.device if cfg is not None else from_dict(Config, RunStore.open(Path(resume)).read_config()).run.device
    info = dist.init_from_env(pref)
    store, root, error = None, None, None
    if info.is_main:
        try:
            if cfg is not None:
                check_world_size(cfg, info.world_size)  # before the run directory is created
            cfg, store = open_run(cfg, out_dir=out_dir, resume=resume, overwrite=overwrite)
            root = str(store.root)
        except UserError as e:
            error = e
    root, message = dist.broadcast_object((root, None if error is None else str(error)))
    if error is not None:
        raise error
    if message is not None:
        raise UserError(message)
    if not info.is_main:
        store = FollowerStore.open(Path(root))
        cfg = from_dict(Config, store.read_config())
        validate(cfg)
    try:
        check_world_size(cfg, info.world_size)
    except UserError:
        store.close()
        raise
    return cfg, store, info



__all__ = ["open_distributed", "open_run", "is_complete", "restore", "check_paths", "check_world_size"]
