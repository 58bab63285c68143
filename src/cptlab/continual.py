"""The continual driver: base model, then stage after stage, evaluating every domain after each.

Stage 0 is the base model itself. After every stage (and every `eval.every` steps) all configured
domains are evaluated, so the run's records hold the full accuracy matrix R[stage][domain].
A run resumes from its newest complete checkpoint (`resume=DIR`). What is written after the run
(summary.json, report.html) is the caller's: api.run_continual.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch

from . import distributed as dist
from .analysis import per_prompt
from .checkpoint import keeps_stage_models, load_checkpoint, load_state, load_weights, save_checkpoint
from .config import (
    Config, eval_domains, from_dict, general_probe_enabled, resolve_eval, stage_method, to_dict, validate,
)
from .errors import ConfigError, UserError
from .evaluate import evaluate_all
from .lora import apply_lora
from .variants import base_reference, effective_state_dict
from .methods import MethodContext, build_method
from .models import (
    build_tiny_model, build_tokenizer, count_parameters, load_model, load_pretrained, resolve_device, save_model,
    weights_sha256,
)
from .optim import make_optimizer
from .rollout import SamplingSpec, prepare_generation
from .store import FollowerStore, RunStore
from .tasks import domain_info, eval_set_identity, install_domains
from .trainer import StageRun, TrainSampler, derive_seed, train_stage
from .ui import console, eval_table, progress
from .warmup import cache_path, run_warmup, store_in_cache, warmup_seed


def base_model(cfg: Config, device: torch.device, store: RunStore | None = None):
    """(model, tokenizer, info): `model.path` (an HF directory or a GGUF file), the warm-up cache, or
    built and warmed up now."""
    if cfg.model.path:
        model, tokenizer, info = load_pretrained(cfg.model.path, cfg.model, device)
        if cfg.warmup.pretrained and cfg.warmup.enabled and cfg.warmup.steps > 0:
            model, info = format_warmup(cfg, model, tokenizer, info, device)
        return model, tokenizer, info
    if store is not None and (store.root / "base" / "config.json").exists():
        model, tokenizer = load_model(str(store.root / "base"), cfg.model, device)
        return model, tokenizer, {"source": "run_dir"}
    cached = cache_path(cfg)
    if cached is not None and (cached / "config.json").exists():
        console.print(f"base model: cached warm-up at {cached}")
        model, tokenizer = load_model(str(cached), cfg.model, device)
        return model, tokenizer, {"source": "cache", "path": str(cached)}
    tokenizer = build_tokenizer()
    model = build_tiny_model(cfg.model, tokenizer, seed=warmup_seed(cfg)).to(device)
    console.print(f"base model: tiny {cfg.model.arch}, {count_parameters(model) / 1e6:.2f}M parameters; "
                  f"warm-up SFT for {cfg.warmup.steps} steps")
    info = {"source": "built", "parameters": count_parameters(model)}
    if cfg.warmup.enabled and cfg.warmup.steps > 0:
        t0 = time.perf_counter()
        losses = run_warmup(model, tokenizer, cfg, device, warmup_seed(cfg))
        info.update(warmup_seconds=time.perf_counter() - t0, warmup_final_loss=sum(losses[-20:]) / len(losses[-20:]))
    if cached is not None:
        store_in_cache(model, tokenizer, cached, info)
    return model, tokenizer, info


def format_warmup(cfg: Config, model, tokenizer, info: dict, device: torch.device):
    """`warmup.pretrained`: SFT the loaded model on warmup.domains (none of them a stage domain) in the
    run's prompt and answer format, or load that result from the cache, keyed by the loaded weights'
    sha256 and the warm-up section. Returns the model and its provenance (`info` with a `warmup` entry)."""
    source = weights_sha256(model.state_dict())
    cached = cache_path(cfg, source)
    warm = {"domains": list(cfg.warmup.domains), "steps": cfg.warmup.steps, "lr": cfg.warmup.lr,
            "loaded_weights_sha256": source}
    if cached is not None and (cached / "config.json").exists():
        console.print(f"base model: cached format warm-up at {cached}")
        model, _ = load_model(str(cached), cfg.model, device)
        return model, {**info, "warmup": {**warm, "cache": str(cached)}}
    console.print(f"base model: format warm-up SFT of the loaded model for {cfg.warmup.steps} steps on "
                  f"{', '.join(cfg.warmup.domains)}")
    t0 = time.perf_counter()
    losses = run_warmup(model, tokenizer, cfg, device, warmup_seed(cfg))
    warm.update(seconds=time.perf_counter() - t0, final_loss=sum(losses[-20:]) / len(losses[-20:]))
    if cached is not None:
        store_in_cache(model, tokenizer, cached, {**info, "warmup": warm})
        warm["cache"] = str(cached)
    return model, {**info, "warmup": warm}


def snapshot(model) -> dict[str, torch.Tensor]:
    """A float32 CPU copy of the weights (never a view of the live parameters: .float().cpu() of a
    float32 CPU tensor is the tensor itself, which would make drift vs the previous stage zero)."""
    return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in effective_state_dict(model).items()}


class Driver:
    """Holds the run's pieces; `run()` is the stage loop.

    Under torchrun every rank trains on its slice of each step's prompts (trainer.py) and evaluates its
    share of the domains (and of the drift probes); rank 0 gathers the results, logs and checkpoints.
    With `distributed.strategy: fsdp` the model is sharded (sharding.py): checkpoints and weight
    snapshots are gathered by every rank, and the drift probes run on every rank (their forwards are
    collectives)."""

    def __init__(self, cfg: Config, store: RunStore, info: dist.DistInfo | None = None):
        self.cfg, self.store = cfg, store
        install_domains(cfg.domains)  # this run's domains, whichever config the process loaded last
        self.info = info or dist.DistInfo(0, 1, 0, resolve_device(cfg.run.device), None)
        self.device = self.info.device
        self.domains = eval_domains(cfg)

    def main_only(self, fn, *args, **kwargs):
        """Run fn on rank 0, then hold every rank at a barrier; returns fn's result on rank 0, else None."""
        result = fn(*args, **kwargs) if self.info.is_main else None
        dist.barrier()
        return result

    @property
    def sharded(self) -> bool:
        return self.info.world_size > 1 and self.cfg.distributed.strategy == "fsdp"

    # -- evaluation and checkpoints -----------------------------------------------------------
    def evaluate(self, stage: int, stage_name: str, step: int, global_step: int, final: bool) -> dict:
        """Every rank evaluates its share of the domains (each domain's samples are seeded by the domain
        alone, so the results are those of one process); rank 0 gathers, logs and returns them (other
        ranks return {}). Call on every rank."""
        cfg = self.cfg
        t0 = time.perf_counter()
        spec = SamplingSpec.for_eval(resolve_eval(cfg), cfg.rollout)
        prepare_generation(self.model, spec)  # a sharded model's weights, gathered by every rank here
        mine = self.domains[self.info.rank::self.info.world_size]
        with progress(f"eval after {stage_name} step {step}", len(mine)) as advance:
            results = evaluate_all(self.model, self.tokenizer, mine, resolve_eval(cfg), cfg.prompt, spec,
                                   seed=derive_seed(cfg.run.seed, stage, step, "eval"),
                                   on_domain=lambda name: advance(info=name))
        gathered = {name: r for part in dist.gather_objects(results) for name, r in part.items()}
        if not self.info.is_main:
            return {}
        results = {name: gathered[name] for name in self.domains}
        seconds = time.perf_counter() - t0
        for name, r in results.items():
            self.store.log("eval", stage=stage, stage_name=stage_name, step=step, global_step=global_step,
                           final=final, domain=name, eval_seconds=seconds, **r.metrics())
            if r.verifier_errors:
                self.store.log("verifier_error", stage=stage, step=step, domain=name, count=r.verifier_errors,
                               first=r.verifier_error)
        self.store.write_samples(f"stage{stage}-step{step}", {n: r.samples for n, r in results.items()})
        identities = {n: eval_set_identity(n, cfg.eval.num_prompts, cfg.prompt.style,
                                                cfg.prompt.answer_format) for n in results}
        self.store.write_once(per_prompt.file_name(stage, step), per_prompt.encode(
            stage, stage_name, step, global_step, final, results, identities, cfg.eval.num_samples))
        if final:
            console.print(eval_table(f"after stage {stage} ({stage_name})", {n: r.metrics() for n, r in results.items()}))
        return results

    def evaluate_and_drift(self, stage: int, stage_name: str, step: int, global_step: int) -> None:
        """The stage-end evaluation of every domain, then the drift record (on every rank)."""
        results = self.evaluate(stage, stage_name, step, global_step, final=True)
        if self.cfg.eval.drift:
            self.log_drift(stage, global_step, results)

    def log_drift(self, stage: int, global_step: int, results: dict) -> None:
        """Parameter drift vs base and previous stage, response drift on a probe set, artifact rates.

        Call on every rank: rank 0 computes the parameter drift, the probes are split over the ranks
        (each rank's share sampled from a generator seeded with its rank too, so the sampled metrics are
        another draw of the same estimator when the number of ranks changes; the greedy ones are
        equal). A sharded model's snapshot is gathered by every rank, and every rank runs all probes
        (their forwards are collectives)."""
        from .analysis.artifacts import artifact_stats
        from .analysis.drift import parameter_drift, principal_drift
        from .analysis.response import drift_metrics, merge_samples, response_samples
        from .prompts import student_prompt
        from .tasks import make_split

        cfg, p = self.cfg, self.cfg.prompt
        t0 = time.perf_counter()
        current = snapshot(self.model) if self.info.is_main or self.sharded else None
        spec = SamplingSpec.for_eval(resolve_eval(cfg), cfg.rollout)
        prepare_generation(self.model, spec)
        prepare_generation(self.base, spec)
        probes = [student_prompt(p, ex.question, self.tokenizer) for d in self.domains
                  for ex in make_split(d, "eval", cfg.eval.probe_per_domain, style=p.style,
                                       answer_format=p.answer_format)]
        rank, world = (0, 1) if self.sharded else (self.info.rank, self.info.world_size)
        share = probes[len(probes) * rank // world:len(probes) * (rank + 1) // world]
        seed = derive_seed(cfg.run.seed, stage, "probe", *([rank] if rank else []))
        part = (response_samples(self.model, self.base, self.tokenizer, share, spec, seed=seed,
                                 answer_format=p.answer_format) if share else {})
        parts = [part] if self.sharded else dist.gather_objects(part)
        # a sharded model's forwards are collectives: every rank runs the general probe then, else rank 0
        general = (self.general_probe() if general_probe_enabled(cfg) and (self.info.is_main or self.sharded)
                   else None)
        if not self.info.is_main:
            return
        resp = drift_metrics(merge_samples(parts))
        drift = parameter_drift(self.base_state, current, self.prev_state, device=self.device,
                                base_subspaces=self.base_subspaces)
        drift.update(principal_drift(self.base_state, current, device=self.device, cache=self.base_geometry))
        fields = {f"param/{k}": v for k, v in drift.items()}
        fields.update({f"response/{k}": v for k, v in resp.items()})
        texts = [t for r in results.values() for t in r.texts]
        formats = [r.answer_format for r in results.values() for _ in r.texts]  # a data set may have its own
        fields.update({f"artifacts/{k}": v for k, v in artifact_stats(texts, answer_format=formats).items()})
        if general is not None:
            fields.update({f"general/{k}": v for k, v in general.items()})
        self.store.log("drift", stage=stage, global_step=global_step, seconds=time.perf_counter() - t0, **fields)
        self.prev_state = current

    def general_probe(self) -> dict:
        """The general-ability probe; the base's answers are generated once per process and kept."""
        from .analysis.general import general_probe, load_probe, render_prompt

        prompts, text = load_probe()
        rendered = [render_prompt(p, self.tokenizer, self.cfg.prompt.use_chat_template) for p in prompts]
        spec = SamplingSpec.for_eval(resolve_eval(self.cfg), self.cfg.rollout)
        out, self.general_base_answers = general_probe(self.model, self.base, self.tokenizer, rendered, text, spec,
                                                       base_answers=self.general_base_answers)
        return out

    def checkpoint(self, stage: int, step: int, global_step: int, done: bool, optimizer=None, method=None) -> None:
        """Rank 0 writes the checkpoint (a sharded model's state is gathered by every rank first); every
        rank returns once it is on disk. Call on every rank."""
        if not self.cfg.run.checkpoint:
            return
        state = dict(stage=stage, step=step, global_step=global_step, stage_done=done, order=global_step * 2 + done)

        def save():
            save_checkpoint(self.store, f"stage{stage}-step{step}", state, self.model, optimizer, method,
                            keep=self.cfg.run.keep_checkpoints, keep_stage_ends=self.keep_stage_models)

        if self.sharded:
            save()
            dist.barrier()
        else:
            self.main_only(save)

    # -- the run ----------------------------------------------------------------------------------
    def setup(self) -> dict:
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
        self.base_state = snapshot(self.base)
        self.prev_state = None
        self.base_subspaces: dict[str, torch.Tensor] = {}  # the base weights' top singular vectors, for drift
        self.base_geometry: dict[str, tuple] = {}  # the base weights' spectra and principal masks, for drift
        self.general_base_answers = None  # the base model's greedy answers to the general probe
        ckpts = self.store.checkpoint_dirs()
        if not ckpts:
            self.store.truncate_metrics(0)
            self.shard()
            return dict(stage=0, step=0, global_step=0, stage_done=False, path=None, base_info=info)
        state = load_state(ckpts[-1])
        # the previous stage's end weights, for drift vs previous stage: the checkpoint itself at a
        # stage end, else the stage-end checkpoint that the store keeps for this (see commit_checkpoint)
        end = ckpts[-1] if state.get("stage_done") else self.store.latest_stage_end()
        if end is not None and end != ckpts[-1] and self.cfg.eval.drift \
                and load_state(end).get("stage") == state.get("stage", 0) - 1:
            load_weights(end, self.model)
            self.prev_state = snapshot(self.model)
        load_weights(ckpts[-1], self.model)  # a damaged checkpoint is refused before metrics are touched
        self.store.truncate_metrics(state["metrics_lines"])
        if end == ckpts[-1]:
            self.prev_state = snapshot(self.model)
        console.print(f"resuming from {ckpts[-1].name}")
        self.shard()
        return {**state, "path": ckpts[-1], "base_info": info}

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

    def complete(self) -> bool:
        """Whether the run directory already holds the whole run: a run_end record after the newest
        checkpoint, which is the last stage's end (or no checkpoint at all, with run.checkpoint off)."""
        records = self.store.read_metrics()
        ckpts = self.store.checkpoint_dirs()
        if not ckpts:
            return any(r.get("event") == "run_end" for r in records)
        state = load_state(ckpts[-1])
        after = records[state.get("metrics_lines", len(records)):]
        return (state.get("stage") == len(self.cfg.stages) and bool(state.get("stage_done"))
                and any(r.get("event") == "run_end" for r in after))

    def run(self) -> None:
        cfg, store = self.cfg, self.store
        if self.complete():  # resuming a finished run: nothing to train, and its records stay as they are
            console.print(f"{store.root}: the run is already complete; nothing to resume")
            return
        t_start = time.perf_counter()
        state = self.setup()
        if state["path"] is None:
            digest = weights_sha256(self.base_state) if self.info.is_main else None  # groups runs by base
            base = {**state["base_info"], "weights_sha256": digest}
            store.log("run_start", name=cfg.run.name, base=base, domains=self.domains,
                      domain_info={d: domain_info(d) for d in dict.fromkeys([*self.domains,
                                                                              *(s.domain for s in cfg.stages)])},
                      stages=[dict(domain=s.domain, steps=s.steps, method=stage_method(cfg, s, i).name)
                              for i, s in enumerate(cfg.stages)])
            self.evaluate_and_drift(0, "base", 0, 0)
            self.checkpoint(0, 0, 0, done=True)
            state.update(stage=0, stage_done=True)
        global_step = state["global_step"]
        for index, stage in enumerate(cfg.stages, start=1):
            if index < state["stage"] or (index == state["stage"] and state["stage_done"]):
                continue
            global_step = self.run_stage(index, stage, state, global_step)
        store.log("run_end", seconds=time.perf_counter() - t_start, global_step=global_step)

    def run_stage(self, index: int, stage, state: dict, global_step: int) -> int:
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
                self.evaluate(index, stage.domain, step_done, gstep, final=False)
            if cfg.run.checkpoint_every and step_done % cfg.run.checkpoint_every == 0:
                self.checkpoint(index, step_done, gstep, False, optimizer, method)

        run = StageRun(index, stage, mcfg, self.model, optimizer, method, sampler, cfg.run.seed, self.store.log,
                       on_step_end, bucket_mb=cfg.distributed.bucket_mb)
        global_step = train_stage(run, start_step, global_step)  # a NumericalFault is logged there
        self.evaluate_and_drift(index, stage.domain, stage.steps, global_step)
        self.store.log("stage_end", stage=index, domain=stage.domain, method=mcfg.name, steps=stage.steps,
                       global_step=global_step, seconds=time.perf_counter() - t0)
        self.checkpoint(index, stage.steps, global_step, True)
        return global_step


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


def _open_distributed(cfg: Config | None, out_dir, resume, overwrite) -> tuple[Config, RunStore, dist.DistInfo]:
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


def drive(cfg: Config | None = None, *, out_dir: str | None = None, resume: str | None = None,
          overwrite: bool = False, finish: Callable[[Config, RunStore], None] | None = None) -> Path:
    """Run (or resume) a continual study; returns the run directory. `finish(cfg, store)` is called on
    rank 0 once the stages end, and also after a failure that left records (api.run_continual passes
    the writing of summary.json and report.html). Under `torchrun --nproc_per_node N` the ranks split
    each step's prompts (see Driver)."""
    cfg, store, info = _open_distributed(cfg, out_dir, resume, overwrite)
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


__all__ = ["drive", "base_model", "Driver", "UserError"]
