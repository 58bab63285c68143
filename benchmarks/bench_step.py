"""Training-step throughput: full GRPO and SDPO steps (rollout + reward + loss + backward + AdamW) per
second through cptlab's own stage machinery, with the plain and the fast rollout engine, and peak memory.

    python benchmarks/bench_step.py [--size gpu|tiny] [--methods grpo,sdpo] [--engines plain,fast]
                                    [--steps 10] [--warmup-steps 2] [--profile] [key=value ...] [--out FILE.json]

Extra key=value arguments are config overrides (e.g. method.prompts_per_step=32 rollout.group_size=8).
The model is random-init unless model.path=DIR is given. Not a test: figures only.

Besides steps/s it records every timed step (so that a step slower than the others shows): its phases
(rollout + reward + reprompts; forward + loss + backward; gradient mean + clip + AdamW; the teacher's EMA
step), on CUDA the caching allocator's retries (a retry frees every cached block and waits for the
device: seconds) and reserved memory, and the fast engine's states and graph captures so far (they
should stop growing after the first steps). --profile runs one more step under torch.profiler and
prints where it spends its time: device time per kernel, and device time against wall time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cptlab.config import load_config
from cptlab.engine import engine_counts
from cptlab.variants import base_reference
from cptlab.methods import MethodContext, build_method, examples_per_step
from cptlab.models import build_tiny_model, build_tokenizer, count_parameters, load_model, resolve_device
from cptlab.optim import make_optimizer
from cptlab.rollout import make_generator
from cptlab.step import train_step
from cptlab.trainer import TrainSampler


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def allocator_retries(device) -> int:
    return torch.cuda.memory_stats().get("num_alloc_retries", 0) if device.type == "cuda" else 0


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
    rollout_s, step_s, tokens, steps = [], [], 0.0, []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def one_step(step: int) -> dict:
        sync(device)
        retries = allocator_retries(device)
        t0 = time.perf_counter()
        model.train()
        batch = strategy.make_batch(model, sampler.batch(step, n), make_generator(step, device))
        sync(device)
        t1 = time.perf_counter()
        marks = {}

        def backward_done():
            sync(device)
            marks["backward"] = time.perf_counter()

        train_step(strategy, model, optimizer, batch, micro_batch_size=m.micro_batch_size, grad_clip=m.grad_clip,
                   after_backward=backward_done)
        sync(device)
        t2 = time.perf_counter()
        strategy.after_batch()
        sync(device)
        t3 = time.perf_counter()
        return dict(step=step, seconds=t3 - t0, rollout=t1 - t0, loss_backward=marks["backward"] - t1,
                    optimizer=t2 - marks["backward"], teacher=t3 - t2, tokens=float(batch.rollout.completion_mask.sum()),
                    rows=len(batch), alloc_retries=allocator_retries(device) - retries,
                    reserved_gib=torch.cuda.memory_reserved() / 2**30 if device.type == "cuda" else None,
                    engine=engine_counts(model))

    for step in range(a.warmup_steps + a.steps):
        record = one_step(step)
        steps.append(record)
        print(f"  {method} {engine} step {step}{' (warm-up)' if step < a.warmup_steps else ''}: "
              f"{record['seconds']:.3f} s (rollout {record['rollout']:.3f}, loss+backward {record['loss_backward']:.3f}, "
              f"optimizer {record['optimizer']:.3f}, teacher {record['teacher']:.3f}), allocator retries "
              f"{record['alloc_retries']}, engine {record['engine']}", flush=True)
        if step >= a.warmup_steps:
            rollout_s.append(record["rollout"])
            step_s.append(record["seconds"])
            tokens += record["tokens"]
    profile = profile_step(one_step, a.warmup_steps + a.steps, device, step_s) if a.profile else None
    total = sum(step_s)
    return dict(method=method, engine=engine, steps_per_second=len(step_s) / total, seconds_per_step=total / len(step_s),
                rollout_fraction=sum(rollout_s) / total, completion_tokens_per_second=tokens / total,
                sequences_per_step=steps[-1]["rows"], steps=steps, profile=profile,
                min_step_seconds=min(step_s), max_step_seconds=max(step_s),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                parameters=count_parameters(model), device=torch.cuda.get_device_name() if device.type == "cuda"
                else f"cpu ({torch.get_num_threads()} threads)")


def profile_step(one_step, step: int, device, step_s: list[float]) -> dict:
    """One more step under torch.profiler: its phases, device time per op (top 15) and the share of the
    wall time the device was busy (low: launch- or host-bound)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        record = one_step(step)
    events = prof.key_averages()
    key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    cpu_key = "self_cpu_time_total"
    by = key if device.type == "cuda" else cpu_key
    top = sorted(events, key=lambda e: getattr(e, by), reverse=True)[:15]
    busy = sum(getattr(e, key, 0.0) for e in events) / 1e6 if device.type == "cuda" else None
    out = dict(phases=record, device_busy_seconds=busy, wall_seconds=record["seconds"],
               unprofiled_median_seconds=sorted(step_s)[len(step_s) // 2],
               top_ops=[dict(name=e.key, calls=e.count, seconds=getattr(e, by) / 1e6) for e in top])
    print(f"\nprofile of one step: wall {record['seconds']:.3f} s (unprofiled median {out['unprofiled_median_seconds']:.3f} s)"
          + (f", device busy {busy:.3f} s ({busy / record['seconds']:.0%})" if busy is not None else ""))
    print(f"  phases: rollout {record['rollout']:.3f} s, loss+backward {record['loss_backward']:.3f} s, "
          f"optimizer {record['optimizer']:.3f} s, teacher {record['teacher']:.3f} s")
    print(f"  {'op (by ' + ('device' if device.type == 'cuda' else 'cpu') + ' time)':60s} {'calls':>7s} {'seconds':>8s}")
    for t in out["top_ops"]:
        print(f"  {t['name'][:60]:60s} {t['calls']:7d} {t['seconds']:8.4f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["gpu", "tiny"], default="gpu")
    p.add_argument("--methods", default="grpo,sdpo")
    p.add_argument("--engines", default="plain,fast")
    p.add_argument("--domain", default="gcd")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="profile one more step (torch.profiler) per row")
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
