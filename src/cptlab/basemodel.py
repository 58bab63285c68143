"""The run's base model: a loaded model (`model.path`, an HF directory or a GGUF file, with the
optional format warm-up), the run directory's own base, the warm-up cache, or the tiny model built and
warmed up now. Stage 0 of every run is this model."""

from __future__ import annotations

import time

import torch

from .config import Config
from .models import build_tiny_model, build_tokenizer, count_parameters, load_model, load_pretrained, weights_sha256
from .store import RunStore
from .ui import console
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


__all__ = ["base_model", "format_warmup"]
