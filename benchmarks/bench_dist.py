"""Training steps/s on several GPUs: the same GRPO (or SDPO) step under torchrun with
`distributed.strategy` ddp or fsdp, and in one process for reference.

    torchrun --nproc_per_node 2 benchmarks/bench_dist.py --strategy ddp|fsdp [--size gpu|tiny]
        [--prompts 256] [--group-size 8] [--max-new-tokens 128] [--steps 5] [--warmup-steps 2]
        [--method grpo|sdpo] [key=value ...] [--out FILE.json]
    python benchmarks/bench_dist.py ...          # one process: the reference

Every rank builds the same random-init model (the gpu_model preset's 76M decoder with --size gpu), draws
the same prompts and keeps its slice (all G samples of a prompt on one rank), and runs cptlab's own step:
rollout with the fast engine (under fsdp from the weights gathered once per step), reward, loss,
backward (ddp: bucketed all-reduce overlapped with it; fsdp: reduce-scatter), clip, AdamW. A step is
timed from a barrier to a barrier. Rank 0 prints and writes the figures (with every rank's peak memory).
Not a test: figures only.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cptlab import distributed as dist
from cptlab.config import load_config
from cptlab.methods import MethodContext, build_method, examples_per_step
from cptlab.models import build_tiny_model, build_tokenizer, count_parameters
from cptlab.optim import make_optimizer
from cptlab.rollout import make_generator
from cptlab.sharding import shard
from cptlab.step import train_step
from cptlab.trainer import TrainSampler, derive_seed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--size", choices=["gpu", "tiny"], default="gpu")
    p.add_argument("--method", choices=["grpo", "sdpo"], default="grpo")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--domain", default="gcd")
    p.add_argument("--out", default=None)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = load_config("gpu_model" if a.size == "gpu" else "tiny", [
        f"method.name={a.method}", f"method.prompts_per_step={a.prompts}", f"rollout.group_size={a.group_size}",
        f"rollout.max_new_tokens={a.max_new_tokens}", "method.track_base_kl=false", "rollout.engine=fast",
        f"distributed.strategy={a.strategy}", *a.overrides])
    info = dist.init_from_env(cfg.run.device)
    device = info.device
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_tiny_model(cfg.model, tok, seed=0).to(device)
    params = count_parameters(model)
    if info.world_size > 1 and a.strategy == "fsdp":
        shard(model)
    m = cfg.method
    method = build_method(m, MethodContext(tok, cfg.prompt, cfg.rollout, device, base=None), model)
    optimizer = make_optimizer(model, m.lr, m.weight_decay)
    sampler = TrainSampler(a.domain, 0, 1, cfg.prompt)
    n = examples_per_step(m, cfg.rollout.group_size)
    sync = dist.gradient_sync(model, cfg.distributed.bucket_mb)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, tokens, rewards = [], 0.0, []
    model.train()
    for step in range(a.warmup_steps + a.steps):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        examples = dist.share(sampler.batch(step, n), info.rank, info.world_size, "method.prompts_per_step")
        batch = method.make_batch(model, examples, make_generator(derive_seed(0, step, info.rank), device))
        train_step(method, model, optimizer, batch, micro_batch_size=m.micro_batch_size, grad_clip=m.grad_clip, sync=sync)
        method.after_batch()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        if step >= a.warmup_steps:
            times.append(time.perf_counter() - t0)
            tokens += float(batch.rollout.completion_mask.sum()) * info.world_size
            if batch.rewards is not None:  # the training signal, to set beside one process's (same prompts)
                rewards.append(float(batch.rewards.float().mean()))
    sync.close()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    peaks = dist.gather_objects(peak)
    reward_by_rank = dist.gather_objects(sum(rewards) / len(rewards) if rewards else None)
    if info.is_main:
        total = sum(times)
        result = dict(strategy=a.strategy if info.world_size > 1 else "one process", world_size=info.world_size,
                      method=a.method, parameters=params, completions_per_step=a.prompts * a.group_size,
                      steps_per_second=len(times) / total, seconds_per_step=total / len(times), step_seconds=times,
                      completion_tokens_per_second=tokens / total, peak_gib_per_rank=peaks,
                      mean_reward=(sum(r for r in reward_by_rank if r is not None) / len(reward_by_rank)
                                   if any(r is not None for r in reward_by_rank) else None),
                      device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
        print(json.dumps(result))
        print(f"{result['strategy']} x{info.world_size}: {result['steps_per_second']:.3f} steps/s "
              f"({result['seconds_per_step']:.3f} s/step, {a.prompts}x{a.group_size} completions of <= {a.max_new_tokens} "
              f"tokens), peak GiB per rank {peaks}")
        if a.out:
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1)
    dist.destroy()


if __name__ == "__main__":
    main()
