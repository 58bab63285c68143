"""One stage: rollout -> reward -> method loss -> optimizer step, step after step.

The loop is `train_stage`, and one step reads top to bottom in four files: this one (the loop, and
`_backward`, the one owner of loss normalisation), methods.py (the batch and the loss terms of GRPO,
SDPO or SFT, and the method's own state such as the self-teacher), losses.py (the tensor math) and
rollout.py (sampling and the training forwards). Evaluation and checkpoints are the driver's
(continual.py), which it schedules through the `on_step_end` callback.
"""

from __future__ import annotations

import contextlib
import math
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
from .optim import lr_factor, set_lr
from .rollout import make_generator
from .sharding import weights_changed
from .tasks import Example, make_split, train_pool_size
from .ui import progress


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


def _backward(method, model, batch, micro_batch_size: int, sync=None) -> tuple[float, dict]:
    """Backward of the batch's loss, in micro-batches of `micro_batch_size` rows (0: all at once).

    The one owner of loss normalisation. Each loss term the method returns is a mean over its own
    units in the piece it saw (`method.loss_units`: sequences, tokens or B * L_max). Weighted by
    W * units(micro-batch) / units(all micro-batches on all W ranks) and summed, its gradient after
    the ranks' mean (all_reduce_grads) is that of the term over the whole global batch, whatever the
    micro-batch size or number of ranks. Returns this rank's share of the loss (the mean over ranks is
    the global loss) and stats (micro-batches weighted by their rows). Raises NumericalFault on a
    nan/inf loss (on any rank) before anything is stepped. `sync` (distributed.gradient_sync) is told
    before each backward whether it is the batch's last, so that it can reduce gradients during it."""
    n = len(batch)
    size = n if micro_batch_size <= 0 else min(micro_batch_size, n)
    parts = [batch] if size == n else [batch.select(slice(start, start + size)) for start in range(0, n, size)]
    units = [method.loss_units(part) for part in parts]
    totals = dist.all_reduce_sum({k: sum(u[k] for u in units) for k in units[0]})
    world = dist.world_size()
    loss_value, stats = 0.0, {}
    for i, (part, part_units) in enumerate(zip(parts, units)):
        terms, part_stats = method.loss(model, part)
        weighted = {k: v * (world * part_units[k] / totals[k] if totals[k] > 0 else 0.0) for k, v in terms.items()}
        loss = sum(weighted.values())
        if dist.any_rank(not bool(torch.isfinite(loss))):
            # detached: float() of a tensor that requires grad warns (a UserWarning before the error line)
            raise NumericalFault(f"loss is {float(loss.detach())}" if not torch.isfinite(loss)
                                 else "loss is nan/inf on another rank")
        if sync is not None:
            sync.before_backward(last=i == len(parts) - 1)
        loss.backward()
        loss_value += float(loss.detach())
        share = len(part) / n
        for k, v in part_stats.items():
            stats[k] = stats.get(k, 0.0) + v * share
        if len(weighted) > 1:  # a loss mix: each term's part of the loss too
            for k, v in weighted.items():
                stats[f"loss/{k}"] = stats.get(f"loss/{k}", 0.0) + float(v.detach())
    return loss_value, stats


def _step(model, optimizer, backward: Callable[[], tuple[float, dict]], grad_clip: float,
          sync=None) -> tuple[float, dict]:
    """Zero grads, backward (the closure), gradient mean over ranks (`sync.finish()`, else one
    all-reduce), clip, step. Returns (loss, stats) with the gradient norm in the stats; raises
    NumericalFault before stepping on a nan/inf loss or gradient."""
    optimizer.zero_grad(set_to_none=True)
    loss, stats = backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if sync is not None:
        sync.finish()
    else:
        dist.all_reduce_grads(trainable)
    norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise NumericalFault(f"gradient norm is {grad_norm}")
    optimizer.step()
    weights_changed(model)
    return loss, {**stats, "grad_norm": grad_norm}


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
            examples = dist.shard(run.sampler.batch(step, n_examples), dist.rank(), dist.world_size())
            rollout_seed = derive_seed(run.seed, run.index, step, "rollout", *([dist.rank()] if dist.rank() else []))
            batch = method.make_batch(run.model, examples, make_generator(rollout_seed, device))
            t_rollout = time.perf_counter() - t0
            stats: dict = {}
            updated = False
            for update in range(m.updates_per_batch):
                opt_step = step * m.updates_per_batch + update
                set_lr(run.optimizer, m.lr * lr_factor(opt_step, stage.steps * m.updates_per_batch, m.warmup_steps,
                                                       m.schedule))
                try:
                    loss, stats = _step(run.model, run.optimizer,
                                        lambda: _backward(method, run.model, batch, m.micro_batch_size, sync),
                                        m.grad_clip, sync)
                except NumericalFault as fault:
                    # steps are named as the train records count them: step k is the k-th of the stage,
                    # and the faulty step's global step is the one its train record would have had
                    where = dict(stage=run.index, step=step + 1, update=update, global_step=global_step + 1)
                    if m.nan_policy == "skip":
                        skipped += 1
                        run.log("fault", **where, action="skipped", reason=str(fault))
                        continue
                    reason = f"stage {run.index} ({stage.domain}, {m.name}) step {step + 1} of {stage.steps}: {fault}"
                    run.log("fault", **where, action="stopped", reason=reason)
                    raise NumericalFault(reason) from None
                updated = True
                stats["loss"] = loss
            if updated:
                method.after_batch()  # once per rollout batch, after its updates (e.g. the EMA teacher)
            global_step += 1
            dt = time.perf_counter() - t0
            tokens = float(batch.rollout.completion_mask.sum()) * dist.world_size()
            stats = {**batch.stats, **rollout_repetition(batch.rollout.texts), **stats}
            stats = dist.all_reduce_mean(stats)  # ranks' means (a collective: all call it)
            run.log("train", stage=run.index, domain=stage.domain, method=m.name, step=step + 1,
                    global_step=global_step, lr=run.optimizer.param_groups[0]["lr"], **stats,
                    skipped_batches=skipped, step_seconds=dt, rollout_seconds=t_rollout, tokens_per_second=tokens / dt)
            advance(info=f"reward {stats.get('reward', float('nan')):.2f} loss {stats.get('loss', float('nan')):.3f}")
            run.on_step_end(step + 1, global_step)
    run.model.eval()
    return global_step
