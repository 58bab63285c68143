"""One training step, for every caller: the stage loop, the warm-up (the SFT method) and the benchmarks.

    result = train_step(method, model, optimizer, batch, lr=..., micro_batch_size=..., grad_clip=...)

A method declares what each of its loss terms is a mean over (`method.loss_terms(batch)`: a LossTerm,
its mask and units, losses.UNITS) and returns each term summed over those units
(`method.loss_sums(model, part)`). This module owns the one division: a micro-batch's sum over the
units of the whole batch on all ranks, times the ranks (whose gradients are then averaged), which is
verl's agg_loss given global counts:

    loss_p = sum_terms scale * (sum_p / u_p) * (W * u_p / U_global)     (= scale * sum_p / (U_global / W))

so the accumulated gradient is that of the whole global batch whatever the micro-batch size or the
number of ranks. (Written as the micro-batch's own mean times its share of the units, which keeps the
rounding of a single micro-batch the plain mean's.)

A step reads top to bottom in five files: trainer.py (the loop: prompts, `method.make_batch`, this
step, the record), rollout.py with engine.py (sampling and the training forwards), methods.py (the
batch, the loss terms), this file, and losses.py (the tensor math).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from . import distributed as dist
from .errors import NumericalFault
from .losses import UNITS
from .optim import set_lr
from .sharding import weights_changed


@dataclass(frozen=True)
class LossTerm:
    """What one loss term of a batch is a mean over."""

    mask: Tensor
    """[B, T] the positions (and weights) that count, e.g. completion_mask, or SDPO's distilled tokens."""
    units: str
    """losses.UNITS key: 'sequence' (sequences with a counted token), 'token' or 'budget' (rows * L_max)."""
    budget: int | None = None
    """L_max for 'budget' units: the run's completion budget (rollout.max_new_tokens)."""
    scale: float = 1.0
    """The term's weight in the loss (SDPO's blend: 1 - lambda and lambda)."""

    def count(self, rows: slice | None = None) -> float:
        mask = self.mask if rows is None else self.mask[rows]
        return float(UNITS[self.units][1](mask, self.budget))


@dataclass
class StepResult:
    loss: float
    """This rank's share of the batch's loss (the mean over ranks is the global loss)."""
    grad_norm: float
    """The gradient norm before clipping."""
    stats: dict[str, float] = field(default_factory=dict)
    """The method's stats (micro-batches weighted by their rows), loss/<term> for a mix, grad_norm."""


def accumulate_gradients(method, model, batch, *, micro_batch_size: int = 0, sync=None,
                         local: bool = False) -> tuple[float, dict]:
    """Backward of the batch's loss in micro-batches of `micro_batch_size` rows (0: all at once), each
    divided by the global units (module docstring). Raises NumericalFault on a nan/inf loss (on any
    rank) before any backward of it. `sync` (distributed.gradient_sync) is told before each backward
    whether it is the batch's last, so that it can reduce gradients during it. `local`: this process
    alone (the warm-up runs on rank 0 while the others wait), no collective."""
    n = len(batch)
    size = n if micro_batch_size <= 0 else min(micro_batch_size, n)
    slices = [slice(start, start + size) for start in range(0, n, size)]
    parts = [batch] if size == n else [batch.select(s) for s in slices]
    terms = method.loss_terms(batch)
    totals = {k: sum(t.count(s) for s in slices) if len(slices) > 1 else t.count() for k, t in terms.items()}
    world = 1 if local else dist.world_size()
    if not local:
        totals = dist.all_reduce_sum(totals)
    loss_value, stats = 0.0, {}
    for i, part in enumerate(parts):
        sums, part_stats = method.loss_sums(model, part)
        weighted = {}
        for k, v in sums.items():
            units = terms[k].count(slices[i]) if len(parts) > 1 else terms[k].count()
            # a part (or a batch) without units of a term (no distilled token) adds 0 and keeps its graph
            mean = terms[k].scale * (v / units if units > 0 else v * 0.0)
            weighted[k] = mean * (world * units / totals[k] if totals[k] > 0 else 0.0)
        loss = sum(weighted.values())
        bad = not bool(torch.isfinite(loss))
        if bad if local else dist.any_rank(bad):
            # detached: float() of a tensor that requires grad warns (a UserWarning before the error line)
            raise NumericalFault(f"loss is {float(loss.detach())}" if bad else "loss is nan/inf on another rank")
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


def train_step(method, model, optimizer, batch, *, lr: float | None = None, micro_batch_size: int = 0,
               grad_clip: float = 1.0, sync=None, local: bool = False,
               after_backward: Callable[[], None] | None = None) -> StepResult:
    """Set the learning rate (where given), zero the gradients, accumulate the batch's (above), average
    them over the ranks (`sync.finish()`, else one all-reduce), clip their norm at `grad_clip`, step,
    and tell the model its weights changed. Raises NumericalFault before stepping on a nan/inf loss or
    gradient norm (the gradients are dropped). `after_backward` is called once the gradients are in
    (benchmarks time the phases with it)."""
    if lr is not None:
        set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    loss, stats = accumulate_gradients(method, model, batch, micro_batch_size=micro_batch_size, sync=sync,
                                       local=local)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if sync is not None:
        sync.finish()
    elif not local:
        dist.all_reduce_grads(trainable)
    if after_backward is not None:
        after_backward()
    norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise NumericalFault(f"gradient norm is {grad_norm}")
    optimizer.step()
    weights_changed(model)
    return StepResult(loss, grad_norm, {**stats, "grad_norm": grad_norm})


__all__ = ["LossTerm", "StepResult", "accumulate_gradients", "train_step"]
