"""Low-rank adapters (LoRA through `peft`): wrapping the model (`apply_lora`, which makes it the `lora`
variant of variants.py) and the merged weights that the drift analyses read.

With `model.lora.rank = 0` (the default) apply_lora returns the model as it is (the `full` variant).

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

import torch
from torch import nn

from .config import LoraConfig
from .errors import ConfigError, UserError
from .variants import LORA, set_variant

_ADAPTER_PREFIX = "lora_"
"""peft names every adapter tensor `<layer>.lora_A.<adapter>.weight` (lora_B, lora_embedding_A, ...)."""


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
        from .extras import install_hint

        raise UserError(f"model.lora.rank > 0 needs peft, which is not installed: {install_hint('lora')}") from None
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
    set_variant(wrapped, LORA)
    for p in wrapped.parameters():
        if not p.requires_grad:  # e.g. the warm-up's last gradients: no optimizer clears them now,
            p.grad = None        # and grad-norm clipping over parameters() would count them
    return wrapped


@torch.no_grad()
def _lora_delta(layer) -> torch.Tensor | None:
    """(alpha / r) * B @ A summed over the layer's active adapters; None if it adds nothing now
    (adapters disabled, or already merged into the weight)."""
    if layer.merged or layer.disable_adapters:
        return None
    deltas = [layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A]
    return sum(deltas) if deltas else None


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """A peft model's weights under their base-model names, as it computes with them: the same keys as
    the unwrapped model's `state_dict()` (`...q_proj.weight`, no `base_layer`, no adapter tensors), with
    W + (alpha / r) * B @ A for adapted layers. The merge is out of place (the model is not changed) and
    in the wider of the two dtypes, so that a small update is not rounded away on a bfloat16 base with
    float32 adapters."""
    from peft.tuners.lora import LoraLayer

    inner = model.get_base_model()
    state = {k.replace(".base_layer.", "."): v for k, v in inner.state_dict().items() if not is_adapter_key(k)}
    for name, module in inner.named_modules():
        delta = _lora_delta(module) if isinstance(module, LoraLayer) else None
        if delta is not None:
            key = f"{name}.weight"
            state[key] = state[key].detach() + delta
    return state


@torch.no_grad()
def lowrank_updates(model) -> dict:
    """The adapters' updates of a peft model as factors, under the base model's weight names:
    name -> analysis.spectra.LowRank(b, a) with delta W = b @ a = (alpha / r) * B @ A (the active adapters
    of a layer side by side along r). Detached copies, on the adapters' device; nothing m x n is formed.
    Linear layers only (`fan_in_fan_out` ones transposed); any other adapted layer (an embedding, DoRA)
    is left out of this dict: `drift_state` gives it as a dense merged weight instead."""
    from peft.tuners.lora import Linear, LoraLayer

    from .analysis.spectra import LowRank

    out = {}
    for name, module in model.get_base_model().named_modules():
        if not isinstance(module, LoraLayer) or module.merged or module.disable_adapters:
            continue
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        if not isinstance(module, Linear) or not adapters or any(module.use_dora.get(a) for a in adapters):
            continue
        b = torch.cat([module.lora_B[a].weight.detach() * module.scaling[a] for a in adapters], 1)
        a = torch.cat([module.lora_A[a].weight.detach() for a in adapters], 0)
        if module.fan_in_fan_out:  # the layer's weight is stored [in, out]: delta = (B A)^T
            b, a = a.T, b.T
        out[f"{name}.weight"] = LowRank(b.clone(), a.clone())
    return out


def drift_state(model, base_state: dict[str, torch.Tensor]) -> dict:
    """What the drift record compares with `base_state` (the base model's weights) for a peft model: the
    base tensors themselves where the weight is frozen, a LowRank update where an adapter adds one
    (lowrank_updates), the merged weight for an adapted layer of another kind. Costs the adapters' size,
    not a copy of the model."""
    updates = lowrank_updates(model)
    state = dict(base_state)
    state.update(updates)
    merged = None
    for name, module in model.get_base_model().named_modules():
        key = f"{name}.weight"
        if key in updates or not hasattr(module, "lora_A") or _lora_delta(module) is None:
            continue
        merged = merged if merged is not None else merged_state_dict(model)
        state[key] = merged[key].detach().to("cpu", torch.float32, copy=True)
    return state
