"""A run directory as plain tables, for your own analysis: what `cptlab.load_run(dir)` returns.

Every table is a list of dicts, one per row, with the same keys in every row (`pandas.DataFrame(table)`
reads one as it is; nothing here needs pandas). Accuracies, forgetting and changes are fractions (x100
for points); a value that does not exist (a domain not evaluated, a metric undefined for one stage) is
None. The numbers are the report's: they come from the run's records (metrics.jsonl, the source of
truth) through runview.load_run, which the report reads too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .runview import latest_samples, load_run as read_run


def _plain(value):
    """NaN and infinities -> None; numpy scalars -> Python numbers."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class RunResults:
    """One run as tables. Stage 0 is the base model; stage s >= 1 is the model after stage s."""

    path: Path
    name: str
    domains: list[str]
    """The evaluated domains, in the order of the accuracy matrix's columns."""
    stages: list[dict]
    """The plan: {stage, domain, method, steps} for stages 1..S."""
    accuracy_matrix: list[dict]
    """R: one row per finished stage, {stage, trained, <domain>: greedy accuracy, ...}; trained is the
    stage's domain ('base' for stage 0)."""
    accuracy: list[dict]
    """R in long form: {stage, trained, domain, accuracy}, one row per (stage, domain)."""
    forgetting: list[dict]
    """{domain, forgetting, forgetting_incl_base} per domain: the best accuracy after a stage before
    the last minus the last (Chaudhry et al. 2018), and the same with the base row counted; None where
    undefined (fewer than two stages)."""
    drift: list[dict]
    """One row per stage end (stage 0: the base against itself): {stage, global_step, param/...,
    response/..., artifacts/..., general/...}, the drift record as written."""
    samples: list[dict]
    """The kept responses of each stage's last evaluation: {stage, step, domain, prompt, completion,
    answer, correct, reward, feedback, ...} as the samples files hold them."""
    summary: dict
    """summary.json's numbers, rebuilt from the records: average_accuracy, mean_forgetting, bwt, fwt,
    in_domain_gain, headline, ..."""
    records: list[dict]
    """Every line of metrics.jsonl."""


def load_results(run_dir: Path | str) -> RunResults:
    """The run directory `run_dir` (finished or not) as tables; a directory without metrics.jsonl is a
    UserError naming it."""
    run = read_run(run_dir)
    R = run.R
    trained = ["base"] + [run.domains[j] if 0 <= j < len(run.domains) else None for j in run.stage_domains]
    matrix = [{"stage": s, "trained": trained[s], **{d: _plain(R[s, j]) for j, d in enumerate(run.domains)}}
              for s in range(R.shape[0])]
    long = [{"stage": row["stage"], "trained": row["trained"], "domain": d, "accuracy": row[d]}
            for row in matrix for d in run.domains]
    f, f_base = run.summary.get("forgetting") or {}, run.summary.get("forgetting_incl_base") or {}
    forgetting = [{"domain": d, "forgetting": _plain(f.get(d)), "forgetting_incl_base": _plain(f_base.get(d))}
                  for d in run.domains]
    drift_by_stage = {r.get("stage"): r for r in run.events("drift")}  # a stage's last record
    drift = [{k: _plain(v) for k, v in r.items() if k != "event"}
             for _, r in sorted(drift_by_stage.items(), key=lambda kv: kv[0])]
    samples = []
    for stage, (step, path) in latest_samples(run).items():
        for domain, rows in json.loads(path.read_text()).items():
            samples.extend({"stage": stage, "step": step, "domain": domain, **row} for row in rows)
    plan = [{"stage": s, **{k: st.get(k) for k in ("domain", "method", "steps")}}
            for s, st in enumerate(run.plan, start=1)]
    return RunResults(run.root, run.name, list(run.domains), plan, matrix, long, forgetting, drift, samples,
                      run.summary, run.records)
