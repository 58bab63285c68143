"""The continual driver: the stage loop.

Stage 0 is the base model itself (basemodel.py). After every stage (and every `eval.every` steps) all
configured domains are evaluated (evaluator.py), so the run's records hold the full accuracy matrix
R[stage][domain]; each stage end also writes a drift record (drift_probe.py). A run resumes from its
newest complete checkpoint (`resume=DIR`, resume.py). Each stage trains through trainer.train_stage,
one step at a time (step.py). What is written after the run (summary.json, report.html) is the
caller's: api.run_continual.

Under torchrun every rank trains on its share of each step's prompts (trainer.py) and evaluates its
share of the domains and of the drift probes; rank 0 gathers the results, logs and checkpoints. With
`distributed.strategy: fsdp` the model is sharded (sharding.py): checkpoints and weight snapshots are
gathered by every rank, and the drift probes run on every rank (their forwards are collectives).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from . import distributed as dist
from .basemodel import base_model
from .checkpoint import keeps_stage_models, load_checkpoint, save_checkpoint
from .config import Config, eval_domains, resolve, stage_method
from .drift_probe import DriftProbe, snapshot
from .errors import ConfigError, UserError
from .evaluator import Evaluator
from .lora import apply_lora
from .methods import MethodContext, build_method
from .models import resolve_device, save_model, weights_sha256
from .optim import make_optimizer
from .resume import is_complete, open_distributed, restore
from .store import RunStore
from .tasks import domain_info, domains_installed
from .trainer import StageRun, TrainSampler, train_stage
from .ui import console
from .variants import base_reference
from .metric_names import RUN_END, RUN_START, STAGE_END


class Driver:
    """Holds the run's pieces; `run()` is the stage loop. Call every method on every rank."""

    def __init__(self, cfg: Config, store: RunStore, info: dist.DistInfo | None = None):
        self.cfg, self.store = resolve(cfg), store  # the config as written stays in the store
        self.info = info or dist.DistInfo(0, 1, 0, resolve_device(cfg.run.device), None)
        self.device = self.info.device
        self.domains = eval_domains(cfg)

    @property
    def sharded(self) -> bool:
        return self.info.world_size > 1 and self.cfg.distributed.strategy == "fsdp"

    def setup(self) -> dict:
        """The base model (built or found by rank 0, then loaded by the others), its LoRA adapters, the
        base reference, the evaluator and the drift probe; then the newest checkpoint restored.
        Returns the run's state (resume.restore) with the base model's provenance."""
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)
        if self.info.is_main:  # other ranks load what rank 0 built or found (run_dir/base), once it is there
            self.model, self.tokenizer, info = base_model(cfg, self.device, self.store)
            if info["source"] == "built" or (info["source"] == "cache" and not (self.store.root / "base").exists()):
                save_model(self.model, self.tokenizer, self.store.root / "base")  # drift analyses read it
            elif info["source"] == "gguf":  # the weights stay in the GGUF cache; base/ says which they are
                self.store.write_json("base/source.json", info)
        dist.barrier()
        if not self.info.is_main:
            self.model, self.tokenizer, info = base_model(cfg, self.device, self.store)
        self.model = apply_lora(self.model, cfg.model.lora, seed=cfg.run.seed)
        self.keep_stage_models = keeps_stage_models(cfg.run.keep_stage_models, self.model)
        self.model.eval()
        self.base = base_reference(self.model)
        self.evaluate = Evaluator(cfg, self.store, self.info, self.domains, self.tokenizer)
        self.drift = (DriftProbe(cfg, self.store, self.info, self.domains, self.tokenizer, self.base, self.sharded)
                      if cfg.eval.drift else None)
        fresh = not self.store.checkpoint_dirs()
        # the base weights' digest groups runs by base (run_start)
        self.base_digest = (weights_sha256(self.drift.base_state if self.drift else snapshot(self.base))
                            if fresh and self.info.is_main else None)
        state = restore(self.store, self.model, self.drift.remember if self.drift else None)
        self.shard()
        return {**state, "base_info": info}

    def shard(self) -> None:
        """distributed.strategy fsdp under torchrun: shard the model and the base reference (after
        everything that reads them whole at setup: the base snapshot, a resumed checkpoint)."""
        if not self.sharded:
            return
        from .engine import unsupported_reason
        from .sharding import shard

        reason = unsupported_reason(self.model)
        if reason is not None:
            raise ConfigError("distributed.strategy", "fsdp", f"'ddp' for this model (generation from gathered "
                              f"weights needs the fast engine, which does not support {reason})")
        shard(self.model)
        shard(self.base)

    def checkpoint(self, stage: int, step: int, global_step: int, done: bool, optimizer=None, method=None) -> None:
        """Rank 0 writes the checkpoint (a sharded model's state is gathered by every rank first); every
        rank returns once it is on disk."""
        if not self.cfg.run.checkpoint:
            return
        state = dict(stage=stage, step=step, global_step=global_step, stage_done=done, order=global_step * 2 + done)
        if self.sharded or self.info.is_main:
            save_checkpoint(self.store, f"stage{stage}-step{step}", state, self.model, optimizer, method,
                            keep=self.cfg.run.keep_checkpoints, keep_stage_ends=self.keep_stage_models)
        dist.barrier()

    def stage_end(self, stage: int, stage_name: str, step: int, global_step: int) -> None:
        """The stage-end evaluation of every domain, then the drift record."""
        results = self.evaluate(self.model, stage, stage_name, step, global_step, final=True)
        if self.drift is not None:
            self.drift(self.model, stage, global_step, results)

    def run(self) -> None:
        """The run, with this config's domains installed for its duration (tasks.domains_installed)."""
        with domains_installed(self.cfg.domains):
            self._run()

    def _run(self) -> None:
        cfg, store = self.cfg, self.store
        if is_complete(store, len(cfg.stages)):  # resuming a finished run: its records stay as they are
            console.print(f"{store.root}: the run is already complete; nothing to resume")
            return
        t_start = time.perf_counter()
        state = self.setup()
        if state["path"] is None:
            store.log(RUN_START, name=cfg.run.name, base={**state["base_info"], "weights_sha256": self.base_digest},
                      domains=self.domains,
                      domain_info={d: domain_info(d) for d in dict.fromkeys([*self.domains,
                                                                              *(s.domain for s in cfg.stages)])},
                      stages=[dict(domain=s.domain, steps=s.steps, method=stage_method(cfg, s, i).name)
                              for i, s in enumerate(cfg.stages)])
            self.stage_end(0, "base", 0, 0)
            self.checkpoint(0, 0, 0, done=True)
            state.update(stage=0, stage_done=True)
        global_step = state["global_step"]
        for index, stage in enumerate(cfg.stages, start=1):
            if index < state["stage"] or (index == state["stage"] and state["stage_done"]):
                continue
            global_step = self.run_stage(index, stage, state, global_step)
        store.log(RUN_END, seconds=time.perf_counter() - t_start, global_step=global_step)

    def run_stage(self, index: int, stage, state: dict, global_step: int) -> int:
        """One stage: its method and optimizer (restored when the run stopped inside it), the steps
        (trainer.train_stage, with the mid-stage evaluations and checkpoints), the stage end."""
        cfg = self.cfg
        mcfg = stage_method(cfg, stage, index - 1)
        optimizer = make_optimizer(self.model, mcfg.lr, mcfg.weight_decay)
        method = build_method(mcfg, MethodContext(self.tokenizer, cfg.prompt, cfg.rollout, self.device, base=self.base,
                                                  stage_steps=stage.steps), self.model)
        start_step = 0
        if state["path"] is not None and state["stage"] == index and not state["stage_done"]:
            load_checkpoint(state["path"], self.model, optimizer, method)
            start_step = state["step"]
        sampler = TrainSampler(stage.domain, cfg.run.seed, index, cfg.prompt)
        t0 = time.perf_counter()

        def on_step_end(step_done: int, gstep: int) -> None:
            if step_done >= stage.steps:
                return
            if cfg.eval.every and step_done % cfg.eval.every == 0:
                self.evaluate(self.model, index, stage.domain, step_done, gstep, final=False)
            if cfg.run.checkpoint_every and step_done % cfg.run.checkpoint_every == 0:
                self.checkpoint(index, step_done, gstep, False, optimizer, method)

        run = StageRun(index, stage, mcfg, self.model, optimizer, method, sampler, cfg.run.seed, self.store.log,
                       on_step_end, bucket_mb=cfg.distributed.bucket_mb)
        global_step = train_stage(run, start_step, global_step)  # a NumericalFault is logged there
        self.stage_end(index, stage.domain, stage.steps, global_step)
        self.store.log(STAGE_END, stage=index, domain=stage.domain, method=mcfg.name, steps=stage.steps,
                       global_step=global_step, seconds=time.perf_counter() - t0)
        self.checkpoint(index, stage.steps, global_step, True)
        return global_step


def drive(cfg: Config | None = None, *, out_dir: str | None = None, resume: str | None = None,
          overwrite: bool = False, finish: Callable[[Config, RunStore], None] | None = None) -> Path:
    """Run (or resume) a continual study; returns the run directory. `finish(cfg, store)` is called on
    rank 0 once the stages end, and also after a failure that left records (api.run_continual passes
    the writing of summary.json and report.html). Under `torchrun --nproc_per_node N` the ranks split
    each step's prompts (see Driver)."""
    cfg, store, info = open_distributed(cfg, out_dir, resume, overwrite)
    try:
        try:
            Driver(cfg, store, info).run()
        except BaseException as e:
            if isinstance(e, Exception) and store.made and store.metrics_lines == 0:
                store.abandon()  # refused before its first record: leave no directory to be refused later
                raise
            try:  # what is on disk, without masking the original error
                if info.is_main and finish is not None:
                    finish(cfg, store)
            except Exception:
                pass
            raise
        if info.is_main and finish is not None:
            finish(cfg, store)
    finally:
        store.close()
        dist.destroy()
    return store.root


__all__ = ["drive", "Driver", "UserError"]
