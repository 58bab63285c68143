"""Training-step throughput: full GRPO and SDPO steps (rollout + reward + loss + backward + AdamW) per
second through cptlab's own stage machinery, with the plain and the fast rollout engine, and peak memory.

    python benchmarks/bench_step.py [--size gpu|tiny] [--methods grpo,sdpo] [--engines plain,fast]
                                    [--steps 10] [--warmup-steps 2] [key=value ...] [--out FILE.json]

Extra key=value arguments are config overrides (e.g. method.prompts_per_step=32 rollout.group_size=8).
The model is random-init unless model.path=DIR is given. Not a test: figures only.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cptlab.config import load_config
from cptlab.lora import base_reference
from cptlab.methods import MethodContext, build_method, examples_per_step
from cptlab.models import build_tiny_model, build_tokenizer, count_parameters, load_model, resolve_device
from cptlab.optim import make_optimizer
from cptlab.rollout import make_generator
from cptlab.trainer import TrainSampler, _backward, _step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(method: str, engine: str, a, overrides: list[str]) -> dict:
    cfg = load_config("gpu_model" if a.size == "gpu" else "tiny",
                      [f"method.name={method}", f"rollout.engine={engine}", "method.track_base_kl=false", *overrides])
    device = resolve_device(cfg.run.device)
    if cfg.model.path:
        model, tok = load_model(cfg.model.path, cfg.model, device)
    else:
        tok = build_tokenizer()
        model = build_tiny_model(cfg.model, tok, seed=0).to(device)
    m = cfg.method
    # the frozen base reference, as a run holds it; the method uses it where its config asks (a KL
    # term, KL-to-base logging, a teacher sourced from the base)
    ctx = MethodContext(tok, cfg.prompt, cfg.rollout, device, base=base_reference(model))
    strategy = build_method(m, ctx, model)
    optimizer = make_optimizer(model, m.lr, m.weight_decay)
    sampler = TrainSampler(a.domain, 0, 1, cfg.prompt)
    n = examples_per_step(m, cfg.rollout.group_size)
    rollout_s, step_s, tokens = [], [], 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(a.warmup_steps + a.steps):
        sync(device)
        t0 = time.perf_counter()
        model.train()
        batch = strategy.make_batch(model, sampler.batch(step, n), make_generator(step, device))
        sync(device)
        t1 = time.perf_counter()
        _step(model, optimizer, lambda: _backward(strategy, model, batch, m.micro_batch_size), m.grad_clip)
        strategy.after_batch()
        sync(device)
        t2 = time.perf_counter()
        if step >= a.warmup_steps:
            rollout_s.append(t1 - t0)
            step_s.append(t2 - t0)
            tokens += float(batch.rollout.completion_mask.sum())
    total = sum(step_s)
    return dict(method=method, engine=engine, steps_per_second=len(step_s) / total, seconds_per_step=total / len(step_s),
                rollout_fraction=sum(rollout_s) / total, completion_tokens_per_second=tokens / total,
                sequences_per_step=len(batch),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                parameters=count_parameters(model), device=torch.cuda.get_device_name() if device.type == "cuda"
                else f"cpu ({torch.get_num_threads()} threads)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["gpu", "tiny"], default="gpu")
    p.add_argument("--methods", default="grpo,sdpo")
    p.add_argument("--engines", default="plain,fast")
    p.add_argument("--domain", default="gcd")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    rows = [bench(m, e, a, a.overrides) for m in a.methods.split(",") for e in a.engines.split(",")]
    print(f"model: {a.size} ({rows[0]['parameters'] / 1e6:.1f}M parameters) on {rows[0]['device']}; "
          f"{a.steps} timed steps after {a.warmup_steps}; overrides: {' '.join(a.overrides) or '-'}")
    print(f"{'method':6s} {'engine':6s} {'steps/s':>8s} {'s/step':>7s} {'rollout':>8s} {'tokens/s':>10s} {'peak GiB':>8s}")
    for r in rows:
        peak = f"{r['peak_gib']:8.2f}" if r["peak_gib"] is not None else f"{'-':>8s}"
        print(f"{r['method']:6s} {r['engine']:6s} {r['steps_per_second']:8.2f} {r['seconds_per_step']:7.3f} "
              f"{r['rollout_fraction']:8.0%} {r['completion_tokens_per_second']:10,.0f} {peak}")
    for m in a.methods.split(","):
        by = {r["engine"]: r for r in rows if r["method"] == m}
        if "fast" in by and "plain" in by:
            print(f"{m}: fast / plain {by['fast']['steps_per_second'] / by['plain']['steps_per_second']:.2f}x")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
