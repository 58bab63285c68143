"""Low-rank adapters (LoRA through `peft`): wrapping the model, the base reference it implies, and
the effective (merged) weights that the drift analyses read.

With `model.lora.rank = 0` (the default) every function here is the full fine-tuning behaviour:
the model is returned as it is, the base reference is a frozen copy, the state dict is the model's.

With rank r > 0 the targeted linear layers compute W x + (alpha / r) * B A x (Hu et al. 2021, arXiv
2106.09685); only A [r, in] and B [out, r] train, every base weight W stays frozen. Two consequences
that the rest of cptlab relies on:
  - the base weights never change during a run, so the base reference *shares* their storage with
    the live model (no second copy of the model in memory), and a checkpoint holds the adapters
    only (the base weights come from the base model, `runs/<name>/base` or `model.path`, on resume);
  - nothing may merge the adapters into W in place (`merge_adapter`, `merge_and_unload`): that would
    change the shared base reference too. `effective_state_dict` merges out of place.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .config import LoraConfig
from .errors import ConfigError, UserError

_ADAPTER_PREFIX = "lora_"
"""peft names every adapter tensor `<layer>.lora_A.<adapter>.weight` (lora_B, lora_embedding_A, ...)."""


def is_peft_model(model) -> bool:
    """Whether `model` is wrapped by peft (checked without importing peft)."""
    return getattr(model, "peft_config", None) is not None and hasattr(model, "get_base_model")


def is_adapter_key(name: str) -> bool:
    """Whether a state-dict key of a peft model names an adapter tensor (not a base weight)."""
    return any(part.startswith(_ADAPTER_PREFIX) for part in name.split("."))


def is_output_adapter_key(name: str) -> bool:
    """Whether an adapter tensor is an output factor B (lora_B, lora_embedding_B): zeroing every B
    leaves a peft model computing exactly like its base, whatever its A."""
    return any(part in ("lora_B", "lora_embedding_B") for part in name.split("."))


def require_peft():
    try:
        import peft
    except ImportError:
        raise UserError("model.lora.rank > 0 needs peft: pip install peft (or pip install -e .[lora])") from None
    return peft


def _check_targets(model, targets: list[str]) -> None:
    """Every target must match a layer, by leaf name ('q_proj') or dotted suffix ('self_attn.q_proj')
    as peft matches them; peft itself skips a name that matches nothing as long as another name
    matches, so a typo would quietly train fewer layers than asked for."""
    from transformers.pytorch_utils import Conv1D

    kinds = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, Conv1D)
    names = [name for name, m in model.named_modules() if name and isinstance(m, kinds)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        available = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ConfigError("model.lora.target_modules", missing,
                          f"names of the model's linear/embedding layers ({', '.join(available)})")


def apply_lora(model, cfg: LoraConfig, seed: int | None = None):
    """The model to train: `model` itself when rank is 0, else `model` wrapped by peft with adapters
    on `cfg.target_modules`, where only the adapter tensors require grad (bias and norms stay frozen).
    The wrapped layers are still modules (`layer.self_attn.q_proj(x)` works, base + adapter).

    A is initialised from `seed` (default: the seed of the last `torch.manual_seed`, which the driver
    sets to run.seed) on a forked RNG: the same adapters whether the base was just warmed up (which
    draws from the global RNG) or loaded from the warm-up cache, and the global stream is untouched.
    """
    if cfg.rank == 0:
        return model
    peft = require_peft()
    _check_targets(model, list(cfg.target_modules))
    config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch.initial_seed() if seed is None else seed)
        wrapped = peft.get_peft_model(model, config)
    for p in wrapped.parameters():
        if not p.requires_grad:  # e.g. the warm-up's last gradients: no optimizer clears them now,
            p.grad = None        # and grad-norm clipping over parameters() would count them
    return wrapped


def copy_sharing_base_weights(model):
    """A deep copy of `model`; for a peft model, one whose base weights are the live model's own
    tensors (only adapters and buffers are copied), safe because LoRA never updates a base weight.
    For teachers and references: a copy costs the adapters' memory, not the model's. A sharded
    (FSDP) model gets a sharded copy (a collective)."""
    from .sharding import is_sharded, sharded_copy

    if is_sharded(model):
        return sharded_copy(model)
    if not is_peft_model(model):
        return copy.deepcopy(model)
    memo = {id(p): p for name, p in model.named_parameters() if not is_adapter_key(name)}
    return copy.deepcopy(model, memo)


def copy_at_base(model, base):
    """A copy of `model` (as copy_sharing_base_weights) that computes like the base model `base`: for
    LoRA its adapters' B zeroed (no update on the shared base weights), otherwise the base's weights.
    For a teacher that starts from the base model and then follows the student."""
    from .sharding import is_sharded, sharded_copy

    if is_sharded(model):
        return sharded_copy(base)
    copy_ = copy_sharing_base_weights(model)
    with torch.no_grad():
        if is_peft_model(copy_):
            for name, p in copy_.named_parameters():
                if is_output_adapter_key(name):
                    p.zero_()
        else:
            copy_.load_state_dict(base.state_dict())
    return copy_


def base_reference(model):
    """A frozen, eval-mode model scoring like the base (the stage's reference for KL and drift).

    Full fine-tuning: a deep copy. LoRA: the plain base model (no peft wrapper, no adapter layers)
    built on the live model's frozen base weights, so it costs no extra weight memory; its state dict
    has the base model's own names.
    """
    if not is_peft_model(model):
        return copy_sharing_base_weights(model).eval().requires_grad_(False)
    base = copy_sharing_base_weights(model).unload()  # adapter layers replaced by their base layer
    return base.eval().requires_grad_(False)


@torch.no_grad()
def _lora_delta(layer) -> torch.Tensor | None:
    """(alpha / r) * B @ A summed over the layer's active adapters; None if it adds nothing now
    (adapters disabled, or already merged into the weight)."""
    if layer.merged or layer.disable_adapters:
        return None
    deltas = [layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A]
    return sum(deltas) if deltas else None


def effective_state_dict(model) -> dict[str, torch.Tensor]:
    """Weights under their base-model names, as the model computes with them (merged adapters).

    For a peft model: the same keys as the unwrapped model's `state_dict()` (`...q_proj.weight`,
    no `base_layer`, no adapter tensors), with W + (alpha / r) * B @ A for adapted layers. The
    merge is out of place (the model is not changed) and in the wider of the two dtypes, so that a
    small update is not rounded away on a bfloat16 base with float32 adapters. A sharded (FSDP) model's
    weights are gathered into full tensors on every rank (a collective).
    """
    if not is_peft_model(model):
        from .sharding import full_tensors

        return full_tensors(model.state_dict())
    from peft.tuners.lora import LoraLayer

    inner = model.get_base_model()
    state = {k.replace(".base_layer.", "."): v for k, v in inner.state_dict().items() if not is_adapter_key(k)}
    for name, module in inner.named_modules():
        delta = _lora_delta(module) if isinstance(module, LoraLayer) else None
        if delta is not None:
            key = f"{name}.weight"
            state[key] = state[key].detach() + delta
    return state


def checkpoint_state_dict(model) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: the adapter tensors of a peft model (its base weights never change
    and come from the base model on resume), the whole state dict otherwise (gathered into full
    tensors for a sharded model: a collective)."""
    from .sharding import full_tensors

    state = model.state_dict()
    if not is_peft_model(model):
        return full_tensors(state)
    return {k: v for k, v in state.items() if is_adapter_key(k)}


def load_checkpoint_state(model, state: dict[str, torch.Tensor]) -> None:
    """Load what `checkpoint_state_dict` gave into `model`; ValueError naming the keys that do not
    match (a tied head and, for LoRA, the base weights are expected to be absent). Full tensors load
    into a sharded (FSDP) model too, each rank keeping its shard."""
    from .sharding import is_sharded, load_full_state

    if is_sharded(model):
        missing, unexpected = load_full_state(model, state)
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if is_peft_model(model):  # adapters only: the frozen base weights are already there
        missing = [k for k in missing if is_adapter_key(k)]
    if missing or unexpected:
        raise ValueError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
