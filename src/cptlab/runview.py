"""A run directory as report.html and compare.html read it: the records, the summary rebuilt from them,
the resolved config, the stage plan and the accuracy matrix.

metrics.jsonl is the source of truth: the summary is built from it afresh (analysis/summary.py), so a
report always reads the current definitions, whatever summary.json an older version left on disk.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from .analysis.metrics import matrix_from_records
from .analysis.summary import build_summary
from .errors import UserError
from .plots import finite
from .store import read_jsonl
from .metric_names import RUN_START


@dataclass
class Run:
    root: Path
    records: list[dict]
    summary: dict  # build_summary of the records
    config: dict
    plan: list[dict]  # run_start's stages: {domain, steps, method}
    R: np.ndarray  # [S+1, D] greedy accuracy after each finished stage (row 0: base), NaN = missing
    domains: list[str]
    stage_domains: list[int]  # column of the domain trained at stage s (index s-1), -1 if unknown

    @property
    def name(self) -> str:
        return str(self.summary.get("name") or self.config.get("run", {}).get("name") or self.root.name)

    @property
    def methods(self) -> list[str]:
        return [str(s.get("method", "?")).upper() for s in self.plan]

    def events(self, kind: str) -> list[dict]:
        return [r for r in self.records if r.get("event") == kind]

    def stage(self, s: int) -> dict:
        """The plan of stage s (1-based): {domain, steps, method}, {} if unknown."""
        st = self.plan[s - 1] if 0 < s <= len(self.plan) else {}
        return {"method": str(st.get("method", "?")).upper(), "domain": st.get("domain", "?"),
                "steps": st.get("steps", "")}

    def stage_label(self, s: int) -> str:
        return "0 · base" if s == 0 else f"{s} · {self.stage(s)['method']} {self.stage(s)['domain']}"


def load_run(run_dir: Path | str) -> Run:
    root = Path(run_dir)
    if not (root / "metrics.jsonl").is_file():
        raise UserError(f"{root}: no metrics.jsonl here; expected a cptlab run directory")
    records = [r for r in read_jsonl(root / "metrics.jsonl") if isinstance(r, dict)]
    try:
        config = yaml.safe_load((root / "config.yaml").read_text()) if (root / "config.yaml").is_file() else None
    except yaml.YAMLError as e:
        raise UserError(f"{root / 'config.yaml'}: not valid YAML ({str(e).splitlines()[0]})") from None
    start = next((r for r in records if r.get("event") == RUN_START), {})
    return Run(root, records, build_summary(records), config if isinstance(config, dict) else {},
               list(start.get("stages") or []), *matrix_from_records(records))


def _per(value, n: int, names: list[str]) -> list[float]:
    """A summary entry as n floats: a list (cut or NaN-padded to n) or a dict keyed by `names`."""
    if isinstance(value, dict):
        return [finite(value.get(k)) for k in names]
    if isinstance(value, list):
        return [finite(v) for v in value[:n]] + [math.nan] * (n - len(value))
    return [math.nan] * n


def numbers(run: Run) -> dict:
    """Forgetting/transfer numbers of the summary as floats; NaN where absent."""
    S, D = len(run.stage_domains), len(run.domains)
    sizes = {"average_accuracy": S + 1, "average_accuracy_trained": S + 1, "forgetting": D, "in_domain_gain": S,
             "ood_change": S}
    out = {k: _per(run.summary.get(k), n, run.domains) for k, n in sizes.items()}
    return {**out, **{k: finite(run.summary.get(k)) for k in ("mean_forgetting", "mean_forgetting_incl_base", "bwt",
                                                               "fwt")}}


def latest_samples(run: Run) -> dict[int, tuple[int, Path]]:
    """stage -> (step, path) of the stage's last samples file."""
    found: dict[int, tuple[int, Path]] = {}
    for p in (run.root / "samples").glob("stage*-step*.json"):
        m = re.fullmatch(r"stage(\d+)-step(\d+)\.json", p.name)
        if m and (int(m[1]) not in found or int(m[2]) > found[int(m[1])][0]):
            found[int(m[1])] = (int(m[2]), p)
    return dict(sorted(found.items()))
