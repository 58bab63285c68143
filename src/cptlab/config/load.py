"""Where a config comes from: a preset (src/cptlab/presets/) or a YAML file, `extends`, dotted
`key.sub=value` overrides; `load_config` is the entry point for fresh input, `load_run_config` for a
run's own config.yaml."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, UserError, closest, did_you_mean
from .build import deep_merge, from_dict
from .schema import Config
from .validate import refuse_unused_settings, validate


def preset_names() -> list[str]:
    root = resources.files("cptlab") / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def read_yaml(text: str, source: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of config sections at the top level")
    return data


def preset_description(name: str) -> str:
    """The one line a preset's `description:` gives (what `cptlab presets` prints); "" without one."""
    text = (resources.files("cptlab") / "presets" / f"{name}.yaml").read_text()
    return " ".join(str(read_yaml(text, f"preset {name}").get("description") or "").split())


def load_source(preset_or_file: str | None) -> dict:
    """Raw mapping of a preset name or a YAML file path (None -> preset 'tiny'); `extends: OTHER` at
    its top level starts from preset (or file) OTHER and merges this one over it. A top-level
    `description:` (one line saying what the preset or file is for) is read by `cptlab presets` and
    is not part of the config."""
    name = preset_or_file or "tiny"
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"config file '{name}' not found: expected a readable YAML file")
        data = read_yaml(path.read_text(), name)
    elif name not in preset_names():
        raise UserError(f"unknown preset {name!r}: {did_you_mean(closest(name, preset_names()))}expected one of "
                        + ", ".join(preset_names()) + " (`cptlab presets` describes each) or a .yaml file")
    else:
        data = read_yaml((resources.files("cptlab") / "presets" / f"{name}.yaml").read_text(), f"preset {name}")
    description = data.pop("description", None)
    if description is not None and not isinstance(description, str):
        raise ConfigError("description", description, "one line of text saying what this config is for")
    base = data.pop("extends", None)
    if base:
        if isinstance(base, str) and base.endswith((".yaml", ".yml")) and not Path(base).is_absolute() \
                and (name.endswith((".yaml", ".yml")) or "/" in name):
            base = str(Path(name).parent / base)  # a file extends a file beside it
        data = deep_merge(load_source(base), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a','b','c'], yaml-parsed value)."""
    if "=" not in text:
        raise UserError(f"override '{text}': expected key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{text}': expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for i, k in enumerate(keys[:-1]):
            if k == "stages" or isinstance(node, list):
                raise UserError(f"override '{text}': set stages in a YAML file, not with dotted keys")
            child = node.get(k)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(".".join(keys[: i + 1]), child, "a mapping to set sub-keys in")
            node[k] = dict(child)
            node = node[k]
        node[keys[-1]] = value
    return data


def load_config(preset_or_file: str | None = None, overrides: list[str] | None = None) -> Config:
    """Preset or YAML file + dotted overrides -> validated Config. Settings of a method section that no
    stage reads are refused here (fresh input), not when a run's own config.yaml is read back."""
    data = apply_overrides(load_source(preset_or_file), overrides or [])
    cfg = from_dict(Config, data)
    absolute_sources(cfg)
    validate(cfg)
    refuse_unused_settings(cfg)
    return cfg


def load_run_config(path: str | Path) -> Config:
    """A run's own config.yaml, validated as it was written (resume, export, distance): no refusal of
    settings that fresh input would get (`refuse_unused_settings`), so an older run still loads."""
    cfg = from_dict(Config, load_source(str(path)))
    validate(cfg)
    return cfg


def absolute_sources(cfg: Config) -> None:
    """A data-set domain's relative `source` / `eval_source` is read from the current directory: it is
    made absolute now, so that the run's config.yaml (and a resume from another directory) reads the
    same file. cptlab:NAME (a file shipped with cptlab) stays as it is."""
    for spec in cfg.domains.values():
        for key in ("source", "eval_source"):
            path = getattr(spec, key)
            if path and not path.startswith("cptlab:") and not Path(path).expanduser().is_absolute():
                setattr(spec, key, str(Path(path).expanduser().absolute()))
