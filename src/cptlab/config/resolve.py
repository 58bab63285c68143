"""What a config means for a run: each stage's merged method section, the evaluated domains, the eval
section with its nulls filled, the general probe's auto setting."""

from __future__ import annotations

import dataclasses

from .build import deep_merge, from_dict, to_dict
from .schema import Config, EvalConfig, MethodConfig, StageConfig


def stage_method(cfg: Config, stage: StageConfig, index: int) -> MethodConfig:
    """The run's method section with the stage's overrides merged in."""
    merged = deep_merge(to_dict(cfg.method), stage.method)
    return from_dict(MethodConfig, merged, f"stages[{index}].method")


def general_probe_enabled(cfg: Config) -> bool:
    """eval.general_probe resolved: 'auto' means on for a model loaded from model.path."""
    e = cfg.eval
    return e.drift and (e.general_probe is True or (e.general_probe == "auto" and bool(cfg.model.path)))


def eval_domains(cfg: Config) -> list[str]:
    from ..tasks import builtin_domain_names

    if "all" in cfg.eval.domains:
        builtin = builtin_domain_names()
        return builtin + [name for name in cfg.domains if name not in builtin]
    return list(dict.fromkeys(cfg.eval.domains))


def resolve_eval(cfg: Config) -> EvalConfig:
    """The eval section with its nulls filled: budget and temperature from the rollout section,
    saved samples 4 for the built tiny model and 32 for a model loaded from model.path."""
    e = cfg.eval
    return dataclasses.replace(
        e, max_new_tokens=cfg.rollout.max_new_tokens if e.max_new_tokens is None else e.max_new_tokens,
        temperature=cfg.rollout.temperature if e.temperature is None else e.temperature,
        save_samples=(32 if cfg.model.path else 4) if e.save_samples is None else e.save_samples)


MODEL_DEPENDENT = ("model.dtype", "model.compute_dtype", "rollout.engine", "run.keep_stage_models")
"""The 'auto' fields that only the built model resolves (its size, its architecture, its variant):
models.compute_dtype, rollout.use_fast_engine, checkpoint.keeps_stage_models. `resolve` leaves them."""


def resolve(cfg: Config, cuda_available: bool | None = None) -> Config:
    """The config as this run reads it: a new Config (the argument is not changed; resolving twice
    gives the same) in which every null or 'auto' default that the config and the machine decide is
    filled: eval.max_new_tokens / temperature / save_samples (resolve_eval), eval.general_probe,
    warmup.seed (run.seed) and run.device ('cuda' where a GPU is there, else 'cpu'). The fields in
    MODEL_DEPENDENT stay 'auto' until the model is built; a method's nulls (grpo.clip_eps_high: clip_eps)
    are resolved per stage, after the stage's overrides are merged (stage_method, losses).
    `cuda_available` (default: torch's answer) is for tests."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()

    device = cfg.run.device if cfg.run.device != "auto" else ("cuda" if cuda_available else "cpu")
    return dataclasses.replace(
        cfg,
        eval=dataclasses.replace(resolve_eval(cfg), general_probe=general_probe_enabled(cfg)),
        warmup=dataclasses.replace(cfg.warmup, seed=cfg.run.seed if cfg.warmup.seed is None else cfg.warmup.seed),
        run=dataclasses.replace(cfg.run, device=device))
