"""Plain data <-> the schema's dataclasses, with type checks that name the field (ConfigError)."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal

from ..errors import ConfigError, closest
from .schema import MethodConfig, SDPOConfig


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(where, value, _type_name(tp))
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(where, value, _type_name(tp), choices=[a for a in typing.get_args(tp) if isinstance(a, str)])
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(where, value, "null")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(where, value, _type_name(tp))
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(where, value, "a mapping")
        _, item = typing.get_args(tp)
        return {k: _coerce(v, item, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):  # YAML 1.1 reads 5e-5 as text
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(where, value, _type_name(tp))


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(where or "config", data, f"a mapping of {cls.__name__} fields")
    if cls is MethodConfig and "loss_type" in data:  # TRL's spelling: the loss type is GRPOConfig's own field
        grpo = data.get("grpo")
        data = {**{k: v for k, v in data.items() if k != "loss_type"},
                "grpo": {**(grpo if isinstance(grpo, dict) else {}), "loss_type": data["loss_type"]}}
    if cls is SDPOConfig:
        data = upgrade_flat_sdpo(data, where)
        try:
            return _build(cls, data, where)
        except ConfigError as e:
            named = with_older_spelling(e.field)
            if "(" in e.field or named == e.field:
                raise
            raise ConfigError(named, e.value, e.expected, suggestion=e.suggestion) from None
    return _build(cls, data, where)


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            near = closest(str(key), [*names, *(FLAT_SDPO if cls is SDPOConfig else ())])
            raise ConfigError(path, value, "a known key (one of " + ", ".join(names) + ")",
                              suggestion=f"{where}.{near}" if near and where else near)
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


FLAT_SDPO: dict[str, tuple[str, ...]] = {
    "teacher_mode": ("teacher.mode",),
    "ema_rate": ("teacher.ema.rate",),
    "mix_coef": ("teacher.trust_region.mix_coef",),
    "frozen_source": ("teacher.ema.source", "teacher.frozen.source", "teacher.trust_region.source"),
    "stable_gamma": ("teacher.stable.gamma",),
    "stable_anchor": ("teacher.stable.anchor",),
    "stable_restart_every": ("teacher.stable.restart_every",),
    "stable_restart_at": ("teacher.stable.restart_at",),
    "distillation": ("distillation.kind",),
    **{k: (f"distillation.{k}",) for k in ("divergence", "jsd_alpha", "top_k", "top_k_from", "add_tail", "is_clip",
                                            "temperature")},
    **{k: (f"reprompt.{k}",) for k in ("demo_source", "include_feedback", "feedback_max_chars",
                                        "feedback_only_without_solution", "demo_content", "remove_thinking",
                                        "skip_self_success", "success_threshold", "no_demo")},
}
"""The flat method.sdpo keys of configs written before the section was nested -> where each lives now
(frozen_source was shared by the three modes with a copy: it goes to each)."""


_OLDER = {target: flat for flat, targets in FLAT_SDPO.items() for target in targets}


def with_older_spelling(field: str) -> str:
    """`method.sdpo.teacher.ema.rate (method.sdpo.ema_rate)`: an SDPO field that has a flat spelling is
    named in both, so that a config or override written the older way finds its key in a message."""
    head, sep, rest = field.partition(".sdpo.")
    if not sep:
        return field
    path, bracket, index = rest.partition("[")
    older = _OLDER.get(path)
    return f"{field} ({head}.sdpo.{older}{bracket}{index})" if older else field


def upgrade_flat_sdpo(data: dict, where: str) -> dict:
    """An SDPO section in the flat spelling (old run configs, presets, dotted overrides such as
    method.sdpo.teacher_mode=stable) as the nested one; a flat key overrides its nested place (it is
    the later, more specific setting: a stage's override or a command-line one)."""
    if "alpha" in data:
        data = _upgrade_sdpo_alpha(data, where)

    def flat(key, value) -> bool:  # `distillation` is also the nested section's name: flat only as a string
        return key in FLAT_SDPO and not (key == "distillation" and isinstance(value, dict))

    if not any(flat(k, v) for k, v in data.items()):
        return data
    out = {k: v for k, v in data.items() if not flat(k, v)}
    for key, value in data.items():
        if not flat(key, value):
            continue
        for path in FLAT_SDPO[key]:
            *parents, leaf = path.split(".")
            node = out
            for part in parents:
                child = node.get(part)
                node[part] = dict(child) if isinstance(child, dict) else {}
                node = node[part]
            node[leaf] = value
    return out


def _upgrade_sdpo_alpha(data: dict, where: str) -> dict:
    """`alpha`, which overrode `divergence` before the two were merged, as divergence (+ jsd_alpha),
    so that configs written then (runs/*/config.yaml, resumed) still load."""
    data = dict(data)
    alpha = data.pop("alpha")
    if alpha is None:
        return data
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ConfigError(f"{where}.alpha" if where else "alpha", alpha, "a value in [0, 1] or null "
                          "(now written as divergence and jsd_alpha)")
    if alpha == 0:
        data["divergence"] = "forward_kl"
    elif alpha == 1:
        data["divergence"] = "reverse_kl"
    else:
        data.update(divergence="jsd", jsd_alpha=float(alpha))
    return data  # flat divergence / jsd_alpha: upgrade_flat_sdpo moves them into distillation


def to_dict(cfg: Any) -> Any:
    return dataclasses.asdict(cfg)


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
