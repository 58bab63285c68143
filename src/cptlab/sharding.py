"""FSDP2 for `distributed.strategy: fsdp`: weights, gradients and AdamW state sharded over the ranks.

`shard(model)` applies `torch.distributed.fsdp.fully_shard` to every decoder layer and then to the
whole model (embeddings, final norm, head): a layer's weights are gathered just before it runs and
freed after (forward and backward), its gradients reduce-scattered, and each rank's AdamW keeps the
state of its own shard. The model object stays the HF module (`model(...)` works), its parameters
become DTensors.

What every other piece needs from a sharded model goes through the functions here:
  - full weights: `full_state_dict` (a collective: every rank calls it at the same point) for the
    fast engine's inference copy, drift snapshots and checkpoints; loading with `load_full_state`;
  - copies (the SDPO teacher, the base reference): `sharded_copy`, since FSDP modules refuse deepcopy;
  - AdamW state in checkpoints: `optimizer_state` / `load_optimizer_state`, full state dicts keyed by
    parameter name, so a checkpoint does not depend on the number of ranks;
  - `weights_version`: bumped by every optimizer step and load, so that the fast engine gathers the
    weights once per change (at points every rank reaches), not on every generate call.
Generation never runs a sharded forward (each one would be a collective, and ranks evaluate different
domains): it samples from the fast engine's gathered copy.
"""

from __future__ import annotations

import torch
from torch import nn

VERSION_ATTR = "cptlab_weights_version"


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def _layers(model) -> list[nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"shard: no decoder layers (model.model.layers) in {type(model).__name__}")
    return list(layers)


def shard(model):
    """`model` (a *ForCausalLM on this rank's device, the same weights on every rank) sharded in place over
    the default process group: one FSDP unit per decoder layer, one for the rest. Returns it."""
    from torch.distributed.fsdp import fully_shard

    for layer in _layers(model):
        fully_shard(layer)
    # the root too reshards after its forward (FSDP2 keeps it gathered by default, expecting a backward):
    # a teacher or a reference only runs forwards, and EMA / state dicts need every parameter sharded
    fully_shard(model, reshard_after_forward=True)
    setattr(model, VERSION_ATTR, 0)
    from .variants import SHARDED, set_variant

    set_variant(model, SHARDED)
    return model


def weights_version(model) -> int | None:
    """A counter that changes whenever a sharded model's weights change (None for an unsharded model,
    whose weights may change in place at any time)."""
    return getattr(model, VERSION_ATTR, None)


def weights_changed(model) -> None:
    """Record that a sharded model's weights changed (an optimizer step, a load); nothing otherwise."""
    if hasattr(model, VERSION_ATTR):
        setattr(model, VERSION_ATTR, getattr(model, VERSION_ATTR) + 1)


def full_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every DTensor gathered into a full tensor (a collective for sharded entries)."""
    DTensor = _dtensor()
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state dict with full tensors on every rank (a collective when sharded)."""
    return full_tensors(model.state_dict())


def load_full_state(model, state: dict[str, torch.Tensor]):
    """Load full tensors (every rank passes the same `state`) into a sharded model; each rank keeps its
    shard. Returns (missing, unexpected) keys as `load_state_dict(strict=False)` does."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    own = model.state_dict()
    known = {k: v for k, v in state.items() if k in own}
    set_model_state_dict(model, known, options=StateDictOptions(full_state_dict=True, strict=False))
    weights_changed(model)
    return [k for k in own if k not in state], [k for k in state if k not in own]


def sharded_copy(model):
    """A new sharded model with `model`'s weights, buffers and cptlab attributes (a collective)."""
    from transformers import AutoModelForCausalLM

    state = full_state_dict(model)
    param = next(model.parameters())
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(model.config, dtype=param.dtype)
    shard(copy)
    copy.to_empty(device=param.device)
    with torch.no_grad():  # buffers (rotary tables) are not sharded, and to_empty left them unset
        for (_, mine), (_, theirs) in zip(copy.named_buffers(), model.named_buffers()):
            mine.copy_(theirs)
    load_full_state(copy, state)
    copy.generation_config = model.generation_config
    for name, value in vars(model).items():
        if name.startswith("cptlab_") and name != VERSION_ATTR:
            setattr(copy, name, value)
    copy.train(model.training)
    return copy


def optimizer_state(model, optimizer) -> dict:
    """The optimizer's full state dict keyed by parameter name (a collective; cpu tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Load what `optimizer_state` gave (every rank passes the same full state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


class ShardedGradients:
    """The trainer's gradient sync for a sharded model (the interface of distributed.GradientSync):
    fully_shard reduce-scatters and averages the gradients during the backward itself; here only the
    micro-batches before a batch's last skip that (they accumulate unsharded gradients locally), so
    gradients cross the network once per batch."""

    def __init__(self, model):
        self.model = model

    def before_backward(self, last: bool) -> None:
        self.model.set_requires_gradient_sync(last)

    def finish(self) -> None:
        """Nothing left to do: the last backward reduced the gradients."""

    def close(self) -> None:
        self.model.set_requires_gradient_sync(True)
