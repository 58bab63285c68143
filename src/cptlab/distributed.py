"""Process-group plumbing for `torchrun --nproc_per_node N`: rank, sharding, gradient and stat reductions.

Nothing here knows about methods. A run with no torchrun environment (or WORLD_SIZE=1) creates no
process group and every function below is a no-op that returns its input, so the single-process
path needs no branches.

Group statistics. TRL's GRPOTrainer lets a prompt's G completions land on different processes, so it
gathers every reward (`accelerator.gather`), normalises over the global batch and keeps its own
`process_slice` of the advantages; verl's single controller computes advantages on the driver over
the whole batch (grouped by uid) before dispatching chunks to workers. In cptlab a rank shards
*prompts* and samples all G completions of each of its prompts itself, so group advantages (and SDPO's
sibling demonstrations) are local and exact; only logging stats and token-mean normalisers need
reductions across ranks.

Loss normalisation. The gradient reduction averages over ranks; the trainer weights each rank's
loss terms by W * (its units) / (the units of all ranks, `all_reduce_sum`), so that the mean is the
gradient of the loss over the union of all ranks' data (step.train_step owns this).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ConfigError, UserError
from .models import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    """Global rank (torchrun's RANK); 0 without torchrun."""
    world_size: int
    """Number of processes (WORLD_SIZE); 1 without torchrun."""
    local_rank: int
    """Rank on this host (LOCAL_RANK): picks the GPU, cuda:local_rank."""
    device: torch.device
    """This process's device for the model and batches."""
    backend: str | None
    """"nccl" on CUDA, "gloo" on CPU, None when no process group was created (world 1)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise UserError(f"environment variable {name} is missing: launch with torchrun, which sets "
                            "RANK, WORLD_SIZE and LOCAL_RANK")
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name} = {raw!r}: expected an integer") from None


def init_from_env(device_pref: str = "auto", timeout_minutes: float = 60.0) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    device_pref is run.device: "auto" | "cpu" | "cuda". With CUDA the backend is nccl on
    cuda:LOCAL_RANK, otherwise gloo. World 1 creates no group. timeout_minutes bounds how long ranks
    wait in a collective, so it must cover rank 0 evaluating and checkpointing alone.
    """
    # Our GPU hosts need NVLink multicast off (NVLS in NCCL, multicast in symmetric memory).
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo(0, 1, 0, resolve_device(device_pref), None)
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", rank)
    device = resolve_device(device_pref)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK = {local_rank}: this host has {torch.cuda.device_count()} CUDA devices; "
                            "use --nproc_per_node at most the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device,
                                timeout=timedelta(minutes=timeout_minutes))
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=timeout_minutes))
    return DistInfo(rank, world, local_rank, device, dist.get_backend())


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on the rank that logs, evaluates and checkpoints."""
    return rank() == 0


def _comm_device() -> torch.device:
    """Where small bookkeeping tensors must live for the backend: the current GPU for nccl."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if _active():
        dist.barrier()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def per_rank(n: int, world: int, field: str, value: object) -> int:
    """n // world: the one check that a step's examples split evenly over the ranks (ConfigError
    naming `field` otherwise). Equal slices keep the per-rank batches, and so the gradient mean,
    balanced."""
    if n % world:
        raise ConfigError(field, value, f"a multiple of the {world} torchrun ranks ({n} examples per step do not "
                                        f"split evenly over {world} ranks)")
    return n // world


def share(items: list, rank: int, world: int, field: str | None = None) -> list:
    """This rank's contiguous share of `items`, the one way work is split over the ranks (a step's
    prompts, the evaluated domains, the drift probes). Every rank holds the same `items` (samplers and
    domain lists are deterministic, so nothing is broadcast). With `field` (the config field that sets
    len(items)), the split must be even (ConfigError naming the field otherwise): equal shares keep the
    gradient mean balanced; without it, shares differ by at most one item and some may be empty."""
    if not 0 <= rank < world:
        raise ValueError(f"share: rank {rank} is outside 0..{world - 1}")
    if field is not None:
        per_rank(len(items), world, field, len(items))
    return items[len(items) * rank // world:len(items) * (rank + 1) // world]


def all_reduce_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Average .grad over ranks in place: one all-reduce per (device, dtype) of one flat buffer.

    Use on an unwrapped model instead of DDP (the model stays a plain HF module, so generation and the
    self-teacher call it directly). A missing grad counts as zeros so that every rank sends the same
    buffer; a parameter keeps grad None only if it had none on every rank (so an optimizer skips it
    the same way everywhere). Not for FSDP2 models: fully_shard reduces their gradients itself.
    """
    if not _active():
        return
    world = dist.get_world_size()
    groups: dict[tuple[str, torch.dtype], list[torch.nn.Parameter]] = {}
    for p in params:
        if p.requires_grad:
            groups.setdefault((str(p.device), p.dtype), []).append(p)
    for ps in groups.values():  # same parameter order on every rank, so same collective order
        flat = _flat_with_flags(ps)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        _unpack_mean(ps, flat, world)


def _flat_with_flags(params: list[torch.nn.Parameter]) -> Tensor:
    """The params' gradients (zeros where missing) in one buffer, then one has-grad flag per param."""
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params]
                     + [torch.tensor([float(p.grad is not None) for p in params], dtype=params[0].dtype,
                                     device=params[0].device)])


def _unpack_mean(params: list[torch.nn.Parameter], flat: Tensor, world: int) -> None:
    """Write the summed buffer of _flat_with_flags back as each param's mean gradient."""
    has_grad = flat[-len(params):] > 0
    flat = flat[:-len(params)].div_(world)
    offset = 0
    for p, any_grad in zip(params, has_grad.tolist()):
        reduced = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        if p.grad is not None:
            p.grad.copy_(reduced)
        elif any_grad:
            p.grad = reduced.clone()


class GradientSync:
    """The gradient mean over ranks of a replicated model, overlapped with the backward.

    Parameters go into buckets of about `bucket_mb` MB in reverse order (the order in which a backward
    produces their gradients). In the backward after `before_backward(last=True)`, gradient hooks
    launch each bucket's all-reduce asynchronously as soon as the bucket and every bucket before it are
    complete (launching in bucket order keeps the collectives in the same order on every rank), so
    communication runs while the backward computes the layers below; `finish()` launches what is left
    (parameters that got no gradient on this rank), waits, and writes the means back. The result equals
    `all_reduce_grads` (same sums, same missing-gradient rule). Only the batch's last micro-batch
    reduces (`before_backward(last=True)`): earlier ones just accumulate. A no-op object in one
    process; bucket_mb = 0 reduces everything after the backward (`all_reduce_grads`).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], bucket_mb: float = 25.0):
        self.params = [p for p in params if p.requires_grad]
        self.overlap = _active() and bucket_mb > 0 and bool(self.params)
        self.buckets: list[list[torch.nn.Parameter]] = []
        self.hooks = []
        if not self.overlap:
            return
        limit, size, where = bucket_mb * 2**20, 0.0, {}
        for p in reversed(self.params):
            key = (p.device, p.dtype)
            if not self.buckets or size >= limit or (self.buckets[-1][0].device, self.buckets[-1][0].dtype) != key:
                self.buckets.append([])
                size = 0.0
            self.buckets[-1].append(p)
            where[p] = len(self.buckets) - 1
            size += p.numel() * p.element_size()
        self._bucket_of = where
        self.hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in self.params]
        self._armed = False

    def before_backward(self, last: bool) -> None:
        """Called before each backward of a batch; `last`: the batch's last one, whose gradients are
        reduced as they appear (earlier ones only accumulate)."""
        if not self.overlap or not last:
            return
        self._armed = True
        self._waiting = [len(b) for b in self.buckets]
        self._launched: list[tuple[Tensor, object]] = []

    def _ready(self, p: torch.nn.Parameter) -> None:
        if not self._armed:
            return
        self._waiting[self._bucket_of[p]] -= 1
        while len(self._launched) < len(self.buckets) and self._waiting[len(self._launched)] == 0:
            self._launch()

    def _launch(self) -> None:
        flat = _flat_with_flags(self.buckets[len(self._launched)])
        self._launched.append((flat, dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)))

    def finish(self) -> None:
        """After the backward: every gradient is the mean over ranks (call on every rank)."""
        if not self.overlap:
            all_reduce_grads(self.params)
            return
        if not self._armed:
            raise RuntimeError("GradientSync.finish: before_backward(last=True) was not called")
        while len(self._launched) < len(self.buckets):
            self._launch()
        world = dist.get_world_size()
        for bucket, (flat, work) in zip(self.buckets, self._launched):
            work.wait()
            _unpack_mean(bucket, flat, world)
        self._armed = False
        self._launched = []

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


def gradient_sync(model, bucket_mb: float = 25.0):
    """How the trainer gets each rank's gradients to their mean over ranks: `sharding.ShardedGradients`
    for an FSDP model (fully_shard reduce-scatters them itself), else a GradientSync."""
    from .variants import variant_of

    return variant_of(model).gradient_sync(model, bucket_mb)


def all_reduce_sum(counts: dict[str, float]) -> dict[str, float]:
    """Sum over ranks of each count (every rank passes the same keys): the loss units of the whole
    global batch, which the trainer divides each rank's units by."""
    if not _active():
        return dict(counts)
    keys = sorted(counts)
    t = torch.tensor([float(counts[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def all_reduce_mean(stats: dict[str, float]) -> dict[str, float]:
    """Mean over ranks of each logging stat (keys may differ: a key averages over the ranks that have it).

    A mean of per-rank means: exact for per-rank totals divided by W and for quantities over equal
    counts, approximate for token means with ragged counts (fine for logging).
    """
    if not _active():
        return dict(stats)
    gathered: list[dict[str, float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {k: float(v) for k, v in stats.items()})
    out: dict[str, float] = {}
    for key in stats.keys() | {k for g in gathered for k in g}:
        values = [g[key] for g in gathered if key in g]
        out[key] = sum(values) / len(values)
    return out


def all_gather_tensor(tensor: Tensor) -> Tensor:
    """Concatenate every rank's `tensor` along dim 0, in rank order (dim 0 may differ per rank).

    For nccl the tensor must be on this rank's GPU. Rewards, lengths, correctness: all ranks get the
    global vector.
    """
    if not _active():
        return tensor
    world = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def gather_objects(obj: object) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank: e.g. each rank's evaluation results."""
    if not _active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank src's `obj` (any picklable value) on every rank, e.g. a decision only rank 0 can make."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any: keeps skip/raise decisions (nan loss) in step, so
    no rank leaves a collective the others are waiting in."""
    if not _active():
        return bool(flag)
    t = torch.tensor([float(flag)], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
