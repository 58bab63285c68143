"""One stage: rollout -> reward -> method loss -> optimizer step, maybe evaluate, maybe checkpoint.

The loop is in `train_stage`; everything it calls is a small piece of its own (methods.py for the
method, teacher.py for the self-teacher, evaluate.py, checkpoint.py).
"""

from __future__ import annotations

import math
import random
import time
import zlib
from dataclasses import dataclass
from typing import Callable

import torch

from . import distributed as dist
from .config import MethodConfig, PromptConfig, StageConfig
from .errors import NumericalFault
from .methods import METHODS, MethodContext, examples_per_step
from .optim import lr_factor, set_lr
from .tasks import Example, make_split
from .ui import progress


def derive_seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


class TrainSampler:
    """Deterministic prompts for (stage, step): resuming at step k draws what step k drew before."""

    def __init__(self, domain: str, seed: int, stage_index: int, prompt: PromptConfig, pool_size: int = 2048):
        self.pool: list[Example] = make_split(domain, "train", pool_size, seed=seed, style=prompt.style,
                                              answer_format=prompt.answer_format)
        self.seed, self.stage_index = seed, stage_index

    def batch(self, step: int, n: int) -> list[Example]:
        rng = random.Random(derive_seed(self.seed, self.stage_index, step, "prompts"))
        return rng.sample(self.pool, min(n, len(self.pool)))


@dataclass
class StageRun:
    """What the loop needs; the driver (continual.py) builds it."""

    index: int
    stage: StageConfig
    method_cfg: MethodConfig
    model: object
    optimizer: torch.optim.Optimizer
    ctx: MethodContext
    sampler: TrainSampler
    seed: int
    log: Callable[..., dict]
    """log(event, **fields): appends to metrics.jsonl."""
    on_step_end: Callable[[int, int], None]
    """on_step_end(step_done, global_step): the driver's evaluation / checkpoint schedule."""


def _backward(method, model, batch, micro_batch_size: int) -> tuple[float, dict]:
    """Backward of the batch's loss, in micro-batches of `micro_batch_size` rows (0: all at once) whose
    losses are weighted by their share of the loss's units (sequences or tokens, `loss_units`), so the
    accumulated gradient is the whole batch's. Under torchrun the local batch's share of the global
    units scales it too (`global_token_scale`): after the gradient all-reduce it is the gradient of
    the loss over all ranks' data. Returns the local batch's loss value and stats (micro-batches
    weighted by their share). Raises
    NumericalFault on a nan/inf loss (on any rank) before anything is stepped."""
    n = len(batch)
    size = n if micro_batch_size <= 0 else min(micro_batch_size, n)
    local = method.loss_units(batch) if (size < n or dist.world_size() > 1) else 1.0
    scale = dist.global_token_scale(local)
    loss_value, stats = 0.0, {}
    for start in range(0, n, size):
        part = batch if size == n else batch.select(slice(start, start + size))
        loss, part_stats = method.loss(model, part)
        if dist.any_rank(not bool(torch.isfinite(loss))):
            raise NumericalFault(f"loss is {float(loss)}" if not torch.isfinite(loss) else "loss is nan/inf on another rank")
        share = 1.0 if size == n else (method.loss_units(part) / local if local > 0 else size / n)
        (loss * (share * scale)).backward()
        loss_value += float(loss.detach()) * share  # the local batch's loss and stats (ranks are averaged
        for k, v in part_stats.items():            # for logging by the caller)
            stats[k] = stats.get(k, 0.0) + v * share
    return loss_value, stats


def _step(model, optimizer, backward: Callable[[], tuple[float, dict]], grad_clip: float) -> tuple[float, dict]:
    """Zero grads, backward (the closure), clip, step. Returns (loss, stats) with the gradient norm in
    the stats; raises NumericalFault before stepping on a nan/inf loss or gradient."""
    optimizer.zero_grad(set_to_none=True)
    loss, stats = backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    dist.all_reduce_grads(trainable)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, grad_clip))
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise NumericalFault(f"gradient norm is {grad_norm}")
    optimizer.step()
    return loss, {**stats, "grad_norm": grad_norm}


def train_stage(run: StageRun, start_step: int, global_step: int) -> int:
    """Train steps start_step..stage.steps-1; returns the global step after the stage."""
    m, stage = run.method_cfg, run.stage
    method = METHODS[m.name](m, run.ctx)
    n_examples = examples_per_step(m, run.ctx.rollout.group_size)
    skipped = 0
    run.model.train()
    with progress(f"stage {run.index} {m.name} on {stage.domain}", stage.steps) as advance:
        advance(start_step)
        for step in range(start_step, stage.steps):
            t0 = time.perf_counter()
            # every rank draws the same prompts and keeps its own slice (all G samples of a prompt stay together)
            examples = dist.shard(run.sampler.batch(step, n_examples), dist.rank(), dist.world_size())
            rollout_seed = derive_seed(run.seed, run.index, step, "rollout", *([dist.rank()] if dist.rank() else []))
            batch = method.make_batch(run.model, examples, seed=rollout_seed)
            t_rollout = time.perf_counter() - t0
            stats: dict = {}
            for update in range(m.updates_per_batch):
                opt_step = step * m.updates_per_batch + update
                set_lr(run.optimizer, m.lr * lr_factor(opt_step, stage.steps * m.updates_per_batch, m.warmup_steps,
                                                       m.schedule))
                try:
                    loss, stats = _step(run.model, run.optimizer,
                                        lambda: _backward(method, run.model, batch, m.micro_batch_size), m.grad_clip)
                except NumericalFault as fault:
                    # steps are named as the train records count them: step k is the k-th of the stage
                    if m.nan_policy == "skip":
                        skipped += 1
                        run.log("fault", stage=run.index, step=step + 1, update=update, global_step=global_step,
                                action="skipped", reason=str(fault))
                        continue
                    raise NumericalFault(f"stage {run.index} ({stage.domain}, {m.name}) step {step + 1} of "
                                         f"{stage.steps}: {fault}") from None
                method.after_step()
                stats["loss"] = loss
            global_step += 1
            dt = time.perf_counter() - t0
            tokens = float(batch.rollout.completion_mask.sum()) * dist.world_size()
            stats = dist.all_reduce_mean({**batch.stats, **stats})  # ranks' means (a collective: all call it)
            run.log("train", stage=run.index, domain=stage.domain, method=m.name, step=step + 1,
                    global_step=global_step, lr=run.optimizer.param_groups[0]["lr"], **stats,
                    skipped_batches=skipped, step_seconds=dt, rollout_seconds=t_rollout, tokens_per_second=tokens / dt)
            advance(info=f"reward {stats.get('reward', float('nan')):.2f} loss {stats.get('loss', float('nan')):.3f}")
            run.on_step_end(step + 1, global_step)
    run.model.eval()
    return global_step
