"""One stage: rollout -> reward -> method loss -> optimizer step, step after step.

The loop is `train_stage`, and one step reads top to bottom in five files: this one (the loop),
methods.py (the batch and the loss terms of GRPO, SDPO or SFT, and the method's own state such as the
self-teacher), rollout.py with engine.py (sampling and the training forwards), step.py (`train_step`: the one owner
of loss normalisation, clipping and the optimizer step) and losses.py (the tensor math). Evaluation
and checkpoints are the driver's (continual.py), which it schedules through the `on_step_end` callback.
"""

from __future__ import annotations

import contextlib
import random
import time
import zlib
from dataclasses import dataclass
from typing import Callable

import torch

from . import distributed as dist
from .analysis.artifacts import rollout_repetition
from .config import MethodConfig, PromptConfig, StageConfig
from .errors import NumericalFault
from .methods import Method
from .optim import lr_factor
from .rollout import make_generator
from .step import train_step
from .tasks import Example, make_split, train_pool_size
from .ui import progress
from .metric_names import FAULT, TRAIN


def derive_seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


class TrainSampler:
    """Deterministic prompts for (stage, step): resuming at step k draws what step k drew before."""

    def __init__(self, domain: str, seed: int, stage_index: int, prompt: PromptConfig, pool_size: int = 2048):
        # a generator's pool_size questions, or every training row of a data set
        self.pool: list[Example] = make_split(domain, "train", train_pool_size(domain, pool_size), seed=seed,
                                              style=prompt.style, answer_format=prompt.answer_format)
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
    method: Method
    """The stage's method, owning its state (e.g. the teacher, restored from a checkpoint on resume)."""
    sampler: TrainSampler
    seed: int
    log: Callable[..., dict]
    """log(event, **fields): appends to metrics.jsonl."""
    on_step_end: Callable[[int, int], None]
    """on_step_end(step_done, global_step): the driver's evaluation / checkpoint schedule."""
    bucket_mb: float = 25.0
    """Several ranks (ddp): gradient all-reduce bucket size (distributed.bucket_mb)."""


def train_stage(run: StageRun, start_step: int, global_step: int) -> int:
    """Train steps start_step..stage.steps-1; returns the global step after the stage."""
    m, stage, method = run.method_cfg, run.stage, run.method
    n_examples = method.examples_per_step(m, method.ctx.rollout.group_size)
    device = next(run.model.parameters()).device
    skipped = 0
    run.model.train()
    # the gradient sync's hooks live as long as the stage (closing removes them, also on a fault)
    with (progress(f"stage {run.index} {m.name} on {stage.domain}", stage.steps) as advance,
          contextlib.closing(dist.gradient_sync(run.model, run.bucket_mb)) as sync):
        advance(start_step)
        for step in range(start_step, stage.steps):
            t0 = time.perf_counter()
            # every rank draws the same prompts and keeps its own slice (all G samples of a prompt stay together)
            examples = dist.share(run.sampler.batch(step, n_examples), dist.rank(), dist.world_size(),
                                  "method.prompts_per_step")
            rollout_seed = derive_seed(run.seed, run.index, step, "rollout", *([dist.rank()] if dist.rank() else []))
            batch = method.make_batch(run.model, examples, make_generator(rollout_seed, device))
            t_rollout = time.perf_counter() - t0
            stats: dict = {}
            updated = False
            for update in range(m.updates_per_batch):
                opt_step = step * m.updates_per_batch + update
                lr = m.lr * lr_factor(opt_step, stage.steps * m.updates_per_batch, m.warmup_steps, m.schedule)
                try:
                    result = train_step(method, run.model, run.optimizer, batch, lr=lr,
                                        micro_batch_size=m.micro_batch_size, grad_clip=m.grad_clip, sync=sync)
                except NumericalFault as fault:
                    # steps are named as the train records count them: step k is the k-th of the stage,
                    # and the faulty step's global step is the one its train record would have had
                    where = dict(stage=run.index, step=step + 1, update=update, global_step=global_step + 1)
                    if m.nan_policy == "skip":
                        skipped += 1
                        run.log(FAULT, **where, action="skipped", reason=str(fault))
                        continue
                    reason = f"stage {run.index} ({stage.domain}, {m.name}) step {step + 1} of {stage.steps}: {fault}"
                    run.log(FAULT, **where, action="stopped", reason=reason)
                    raise NumericalFault(reason) from None
                updated = True
                stats = {**result.stats, "loss": result.loss}
            if updated:
                method.after_batch()  # once per rollout batch, after its updates (e.g. the EMA teacher)
            global_step += 1
            dt = time.perf_counter() - t0
            tokens = float(batch.rollout.completion_mask.sum()) * dist.world_size()
            stats = {**batch.stats, **rollout_repetition(batch.rollout.texts), **stats}
            stats = dist.all_reduce_mean(stats)  # ranks' means (a collective: all call it)
            run.log(TRAIN, stage=run.index, domain=stage.domain, method=m.name, step=step + 1,
                    global_step=global_step, lr=run.optimizer.param_groups[0]["lr"], **stats,
                    skipped_batches=skipped, step_seconds=dt, rollout_seconds=t_rollout, tokens_per_second=tokens / dt)
            advance(info=f"reward {stats.get('reward', float('nan')):.2f} loss {stats.get('loss', float('nan')):.3f}")
            run.on_step_end(step + 1, global_step)
    run.model.eval()
    return global_step
