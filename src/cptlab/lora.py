"""Low-rank adapters (LoRA through `peft`): wrapping the model, the base reference it implies, and
the effective (merged) weights that the drift analyses read.

With `model.lora.rank = 0` (the default) every function here is the full fine-tuning behaviour:
the model is returned as it is, the base reference is a frozen copy, the state dict is the model's.
"""

from __future__ import annotations

import copy

import torch

from .config import LoraConfig


def apply_lora(model, cfg: LoraConfig):
    """The model to train: `model` itself when rank is 0."""
    if cfg.rank == 0:
        return model
    raise NotImplementedError("model.lora.rank > 0 is not built yet")


def base_reference(model):
    """A frozen, eval-mode model scoring like the base (the stage's reference for KL and drift)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def effective_state_dict(model) -> dict[str, torch.Tensor]:
    """Weights under their base-model names, as the model computes with them (merged adapters)."""
    return model.state_dict()
