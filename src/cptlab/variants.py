"""The one model interface: what every part of cptlab needs from the model being trained, with one
implementation per variant, chosen once, where the variant is made.

    full  (Full)   every weight trains; copies are deep copies
    lora  (LoRA)   peft adapters train; copies share the frozen base weights; checkpoints hold adapters
    fsdp  (FSDP)   FSDP2 shards; copies are sharded copies; state dicts are gathered (collectives)

`apply_lora` (lora.py) and `shard` (sharding.py) register the variant of the model they make
(`set_variant`); every other model is full. Nothing outside this module asks whether a model is LoRA
or sharded: it calls `variant_of(model).<operation>(model, ...)`, or one of the module functions below
that do (base_reference, effective_state_dict, drift_state, checkpoint_state_dict, load_checkpoint_state, ...).
"""

from __future__ import annotations

import copy
import weakref

import torch


class Full:
    """Full fine-tuning of an ordinary module."""

    name = "full"

    def copy(self, model):
        """A copy of the model for a teacher or a reference (shares what never changes)."""
        return copy.deepcopy(model)

    def copy_at_base(self, model, base):
        """A copy of `model`'s variant that computes like the base model `base`."""
        copy_ = self.copy(model)
        with torch.no_grad():
            copy_.load_state_dict(base.state_dict())
        return copy_

    def reference(self, model):
        """A frozen, eval-mode model scoring like the base (the stage's reference for KL and drift)."""
        return self.copy(model).eval().requires_grad_(False)

    def effective_state_dict(self, model) -> dict[str, torch.Tensor]:
        """The weights as the model computes with them, under the base model's names."""
        return model.state_dict()

    def checkpoint_state(self, model) -> dict[str, torch.Tensor]:
        """What a checkpoint stores of the weights."""
        return model.state_dict()

    def drift_state(self, model, base_state: dict[str, torch.Tensor]) -> dict:
        """What the drift record (analysis.drift_record.weight_drift) compares with `base_state`: a
        float32 CPU copy of the weights (never a view of the live parameters)."""
        return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in self.effective_state_dict(model).items()}

    def _load(self, model, state):
        return model.load_state_dict(state, strict=False)

    def load_checkpoint_state(self, model, state: dict[str, torch.Tensor]) -> None:
        """Load what `checkpoint_state` gave; ValueError naming the keys that do not match (a tied head
        is expected to be absent)."""
        missing, unexpected = self._load(model, state)
        missing = [k for k in self._expected_missing(missing) if not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")

    def _expected_missing(self, missing: list[str]) -> list[str]:
        return missing

    def stored_bytes(self, model) -> int:
        """Bytes of the weights a checkpoint stores (run.keep_stage_models auto)."""
        return sum(p.numel() * p.element_size() for p in model.parameters())

    def optimizer_state(self, model, optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state(self, model, optimizer, state: dict, by_name: bool) -> None:
        """`by_name`: the state was written keyed by parameter name (by an FSDP run)."""
        if by_name:
            from .sharding import load_optimizer_state

            load_optimizer_state(model, optimizer, state)
        else:
            optimizer.load_state_dict(state)

    def gradient_sync(self, model, bucket_mb: float):
        """How gradients are averaged over the ranks during and after the backward."""
        from .distributed import GradientSync

        return GradientSync(model.parameters(), bucket_mb)

    def fused_optimizer(self, model) -> bool:
        """Whether AdamW may use its fused CUDA kernel on these parameters."""
        return True

    def anchor(self, name: str, student: torch.Tensor, base_params: dict) -> torch.Tensor:
        """The base's value of the teacher tensor `name` (a StableSDPO anchor at the base)."""
        return base_params[name]

    def save_pretrained(self, model, path, adapter: bool = False) -> bool:
        """Write the model as a Hugging Face directory: merged weights, or (LoRA, `adapter`) the peft
        adapter alone. Returns whether an adapter was written."""
        model.save_pretrained(path, safe_serialization=True)
        return False

    def needs_base_for_anchor(self) -> bool:
        return True

    def enable_gradient_checkpointing(self, model) -> None:
        """Activation checkpointing of every decoder layer in training-mode forwards (Hugging Face's
        per-layer checkpointing). Non-reentrant: gradients reach the weights inside a layer even when
        its input does not require grad (a LoRA model's frozen embeddings), and no-grad forwards run as
        usual."""
        from .errors import ConfigError

        inner = self._hf_model(model)
        if not getattr(inner, "supports_gradient_checkpointing", False):
            raise ConfigError("model.gradient_checkpointing", True,
                              f"false for {type(inner).__name__} (it does not support activation checkpointing)")
        kwargs = {"use_reentrant": False}
        if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def gradient_checkpointing(self, model) -> bool:
        """Whether activation checkpointing is on."""
        inner = self._hf_model(model)
        return bool(getattr(inner, "is_activation_checkpointing", None) if hasattr(inner, "activation_checkpointing_enable")
                    else getattr(inner, "is_gradient_checkpointing", False))

    def _hf_model(self, model):
        return model


class LoRA(Full):
    """peft adapters over frozen base weights (lora.py): the base weights never change during a run,
    so copies and the reference share their storage, and a checkpoint holds the adapters only."""

    name = "lora"

    def copy(self, model):
        from .lora import is_adapter_key

        memo = {id(p): p for name, p in model.named_parameters() if not is_adapter_key(name)}
        return copy.deepcopy(model, memo)

    def copy_at_base(self, model, base):
        from .lora import is_output_adapter_key

        copy_ = self.copy(model)
        with torch.no_grad():  # B = 0: the adapters add nothing, the shared base weights compute W0
            for name, p in copy_.named_parameters():
                if is_output_adapter_key(name):
                    p.zero_()
        return copy_

    def reference(self, model):
        """The plain base model (no peft wrapper, no adapter layers) on the live model's frozen base
        weights: no extra weight memory; its state dict has the base model's own names."""
        return self.copy(model).unload().eval().requires_grad_(False)

    def effective_state_dict(self, model) -> dict[str, torch.Tensor]:
        """W + (alpha / r) * B @ A for adapted layers, merged out of place (lora.merged_state_dict)."""
        from .lora import merged_state_dict

        return merged_state_dict(model)

    def drift_state(self, model, base_state: dict[str, torch.Tensor]) -> dict:
        """The base tensors themselves for the frozen weights and the adapters' updates as LowRank factors
        (lora.drift_state): the adapters' size, not a copy of the model."""
        from .lora import drift_state

        return drift_state(model, base_state)

    def checkpoint_state(self, model) -> dict[str, torch.Tensor]:
        from .lora import is_adapter_key

        return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}

    def _expected_missing(self, missing: list[str]) -> list[str]:
        from .lora import is_adapter_key

        return [k for k in missing if is_adapter_key(k)]  # adapters only: the base weights are there

    def stored_bytes(self, model) -> int:
        from .lora import is_adapter_key

        return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if is_adapter_key(name))

    def anchor(self, name: str, student: torch.Tensor, base_params: dict) -> torch.Tensor:
        """The base through this adapter: B zeroed (B = 0 computes W0 whatever A is), A as it is."""
        from .lora import is_output_adapter_key

        return torch.zeros_like(student) if is_output_adapter_key(name) else student

    def needs_base_for_anchor(self) -> bool:
        return False

    def _hf_model(self, model):
        return model.get_base_model()  # the peft wrapper's model (adapter layers included)

    def save_pretrained(self, model, path, adapter: bool = False) -> bool:
        if adapter:
            model.save_pretrained(path)
            return True
        # merges into the weights in place: only for a model nothing else shares them with (an export's)
        model.merge_and_unload().save_pretrained(path, safe_serialization=True)
        return False


class FSDP(Full):
    """FSDP2 shards over the ranks (sharding.py): copies are sharded copies, state dicts are gathered
    into full tensors on every rank (collectives: every rank calls these at the same point)."""

    name = "fsdp"

    def copy(self, model):
        from .sharding import sharded_copy

        return sharded_copy(model)

    def copy_at_base(self, model, base):
        from .sharding import sharded_copy

        return sharded_copy(base)

    def effective_state_dict(self, model) -> dict[str, torch.Tensor]:
        from .sharding import full_state_dict

        return full_state_dict(model)

    def checkpoint_state(self, model) -> dict[str, torch.Tensor]:
        return self.effective_state_dict(model)

    def _load(self, model, state):
        from .sharding import load_full_state

        return load_full_state(model, state)

    def optimizer_state(self, model, optimizer) -> dict:
        from .sharding import optimizer_state

        return optimizer_state(model, optimizer)

    def load_optimizer_state(self, model, optimizer, state: dict, by_name: bool) -> None:
        from .sharding import load_optimizer_state

        load_optimizer_state(model, optimizer, state)

    def gradient_sync(self, model, bucket_mb: float):
        from .sharding import ShardedGradients

        return ShardedGradients(model)

    def fused_optimizer(self, model) -> bool:
        return False  # fused AdamW does not take DTensor shards


FULL, LORA, SHARDED = Full(), LoRA(), FSDP()
_VARIANTS: "weakref.WeakKeyDictionary[object, Full]" = weakref.WeakKeyDictionary()


def set_variant(model, variant: Full) -> None:
    """Record the variant of a model where it is made (apply_lora, shard)."""
    _VARIANTS[model] = variant


def variant_of(model) -> Full:
    """The model's variant (full unless apply_lora or shard made it another)."""
    return _VARIANTS.get(model, FULL)


def base_reference(model):
    """A frozen, eval-mode model scoring like the base (a LoRA model's: the unwrapped base module)."""
    variant = variant_of(model)
    ref = variant.reference(model)
    if variant is SHARDED:
        set_variant(ref, SHARDED)
    return ref


def effective_state_dict(model) -> dict[str, torch.Tensor]:
    return variant_of(model).effective_state_dict(model)


def drift_state(model, base_state: dict[str, torch.Tensor]) -> dict:
    """The model's weights as the drift record reads them against `base_state` (the variant's)."""
    return variant_of(model).drift_state(model, base_state)


def checkpoint_state_dict(model) -> dict[str, torch.Tensor]:
    return variant_of(model).checkpoint_state(model)


def load_checkpoint_state(model, state: dict[str, torch.Tensor]) -> None:
    variant_of(model).load_checkpoint_state(model, state)


def enable_gradient_checkpointing(model) -> None:
    """model.gradient_checkpointing: recompute each layer's activations in the backward."""
    variant_of(model).enable_gradient_checkpointing(model)


def gradient_checkpointing(model) -> bool:
    return variant_of(model).gradient_checkpointing(model)


def copy_sharing_base_weights(model):
    """A copy for a teacher (the variant's: a LoRA copy shares the frozen base weights), same variant."""
    variant = variant_of(model)
    copy_ = variant.copy(model)
    set_variant(copy_, variant)
    return copy_


def copy_at_base(model, base):
    variant = variant_of(model)
    copy_ = variant.copy_at_base(model, base)
    set_variant(copy_, variant)
    return copy_
