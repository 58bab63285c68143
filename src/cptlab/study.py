"""Studies: a grid of runs (variants x seeds) over one run preset, then a side-by-side comparison.

A study file (presets/studies/NAME.yaml) names a run preset, the seeds, and the variants as lists of
dotted overrides. `run_study` runs (or resumes) each cell under <out>/<study>/<variant>-s<seed>/ and
writes <out>/<study>/compare.html. Finished cells are skipped, so a stopped study just runs again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .config import ConfigError, from_dict, load_config, _read_yaml
from .errors import UserError
from .ui import console


@dataclass
class StudyConfig:
    preset: str = "tiny"
    """The run preset (or YAML file) every cell starts from."""
    description: str = ""
    question: str = ""
    """The study's question, shown in the comparison."""
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: list[str] = field(default_factory=list)
    """Applied to every cell, before the variant's own overrides."""
    variants: dict[str, list[str]] = field(default_factory=dict)
    """name -> dotted overrides, e.g. {grpo: [method.name=grpo], sdpo: [method.name=sdpo]}."""


def study_names() -> list[str]:
    root = resources.files("cptlab") / "presets" / "studies"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_study(name: str) -> StudyConfig:
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            raise UserError(f"study file '{name}' not found")
        data = _read_yaml(path.read_text(), name)
    else:
        if name not in study_names():
            raise ConfigError("study", name, "one of " + ", ".join(study_names()) + " or a .yaml file")
        data = _read_yaml((resources.files("cptlab") / "presets" / "studies" / f"{name}.yaml").read_text(),
                          f"study {name}")
    study = from_dict(StudyConfig, data, "study")
    if not study.variants:
        raise ConfigError("study.variants", study.variants, "at least one variant")
    for variant, extra in study.variants.items():  # validate every cell before running any
        if not isinstance(extra, list) or not all(isinstance(x, str) for x in extra):
            raise ConfigError(f"study.variants.{variant}", extra, "a list of key.sub=value overrides")
        load_config(study.preset, [*study.overrides, *extra])
    return study


def run_study(name: str, out_dir: str = "runs/studies", extra_overrides: list[str] | None = None) -> Path:
    from .continual import run_continual
    from .report import write_compare

    study = load_study(name)
    study_name = Path(name).stem
    root = Path(out_dir) / study_name
    cells = []
    for variant, extra in study.variants.items():
        for seed in study.seeds:
            cell = root / f"{variant}-s{seed}"
            overrides = [*study.overrides, *extra, *(extra_overrides or []), f"run.seed={seed}",
                         f"run.name={variant}-s{seed}"]
            cells.append(cell)
            if (cell / "summary.json").exists() and json.loads((cell / "summary.json").read_text()).get("complete"):
                console.print(f"[study {study_name}] {cell.name}: done, skipped")
                continue
            console.print(f"[study {study_name}] running {cell.name}")
            if (cell / "config.yaml").exists():
                run_continual(resume=str(cell))
            else:
                run_continual(load_config(study.preset, overrides), out_dir=str(cell), overwrite=True)
    out = write_compare(cells, root / "compare.html")
    console.print(f"[study {study_name}] comparison written to {out}")
    return out
