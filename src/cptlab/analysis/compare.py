"""The statistics of a comparison: every headline number per arm, with intervals, and each arm against
a baseline arm with the verdict rule (analysis/stats.py).

An arm is a variant: runs whose config differs only in seed (a study's `<variant>-s<seed>` cells).
Per arm and number: mean over seeds, sample std and the 95% t interval. Per arm against the baseline:
the difference of means, its interval (Welch's t over seeds, widened by the hierarchical bootstrap
over seeds and prompts where every run of both arms has per-prompt records of the same eval set),
Welch's p, the exact permutation p over seeds, and "higher" / "lower" / "inconclusive" by the verdict
rule. Every difference of the table is one test of one family: Holm's step-down (stats.holm) over
the Welch p values gives each its adjusted p and the level of its adjusted interval (the same
interval recomputed at that level), and the verdict word reads the adjusted interval; the 95% word
is kept beside it. Where the interval also covers the bootstrap, the adjusted one can only be wider
than Holm's test alone, never narrower. Numbers come from the records (metrics.jsonl, evals/), never from summary.json, whose keys older
versions defined differently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import per_prompt
from .metrics import (
    average_accuracy, average_accuracy_trained, backward_transfer, forward_transfer, matrix_from_records,
    mean_forgetting,
)
from .stats import Difference, Summary, describe, difference, direction_word, holm

DRIFT_ROWS = [("param/rel_l2_base", "weights: rel. L2 to base"),
              ("response/kl_to_base", "responses: token KL to base"),
              ("response/answer_changed_frac", "probe answers changed"),
              ("artifacts/malformed_rate", "malformed answers"),
              ("artifacts/repetition_rate", "repetition rate")]
"""End-of-run drift and artifact numbers (the last stage's drift record)."""


@dataclass
class RunData:
    """What the statistics read of one run."""

    name: str
    root: Path
    records: list[dict]


@dataclass
class Row:
    key: str
    label: str
    kind: str
    """'acc' (a fraction shown in %), 'pts' (a difference of fractions shown in points) or 'raw'."""
    lower_is_better: bool = False
    per_arm: dict[str, Summary] = field(default_factory=dict)
    values: dict[str, list[float]] = field(default_factory=dict)
    vs_baseline: dict[str, Difference] = field(default_factory=dict)
    adjusted: dict[str, Difference] = field(default_factory=dict)
    """The same difference with its interval at the row's Holm level (see the module docstring)."""
    p_holm: dict[str, float] = field(default_factory=dict)
    """Holm-adjusted p over every difference of the table."""
    holm_level: dict[str, float] = field(default_factory=dict)
    """The level of `adjusted`'s interval (1 - the row's Holm alpha)."""


@dataclass
class StatsTable:
    arms: list[str]
    baseline: str
    seeds: dict[str, int]
    rows: list[Row]
    paired_rows: int
    """How many rows had per-prompt records for every run (their intervals include prompt noise)."""
    family_size: int = 0
    """How many differences the Holm adjustment ran over (every row, every arm against the baseline)."""


@dataclass
class _Numbers:
    """One run's final numbers, and for the accuracy rows the per-prompt arrays behind them."""

    values: dict[str, float]
    cells: dict[str, list[np.ndarray] | None]
    """row key -> one greedy 0/1 array per domain of the row (None where a record is missing)."""
    identity: dict[str, tuple | None]
    """domain -> the eval set its final record was scored on (per_prompt.identity)."""
    domains: list[str]
    trained: list[str]


def _run_numbers(run: RunData) -> _Numbers:
    R, domains, stage_domains = matrix_from_records(run.records)
    if R.shape[0] == 0:
        return _Numbers({}, {}, {}, domains, [])
    S = R.shape[0] - 1
    values = {"avg_all": float(average_accuracy(R)[-1])}
    if S >= 1:
        values.update(avg_trained=float(average_accuracy_trained(R, stage_domains)[-1]),
                      mean_forgetting=mean_forgetting(R, stage_domains),
                      mean_forgetting_incl_base=mean_forgetting(R, stage_domains, include_base=True),
                      bwt=backward_transfer(R, stage_domains), fwt=forward_transfer(R, stage_domains))
    record = per_prompt.final_record(run.root, S)
    bits = {d: per_prompt.greedy(record, d) for d in domains}
    cells: dict[str, list[np.ndarray] | None] = {}
    for j, d in enumerate(domains):
        values[f"acc/{d}"] = float(R[-1, j])
        cells[f"acc/{d}"] = None if bits[d] is None else [bits[d]]
    trained = sorted({domains[k] for k in stage_domains if k >= 0})
    for key, names in (("avg_all", domains), ("avg_trained", trained)):
        cells[key] = None if not names or any(bits[d] is None for d in names) else [bits[d] for d in names]
    drift = [r for r in run.records if r.get("event") == "drift" and r.get("stage") == S and S >= 1]
    for key, _ in DRIFT_ROWS:
        v = drift[-1].get(key) if drift else None
        values[key] = float(v) if isinstance(v, (int, float)) else math.nan
    return _Numbers(values, cells, {d: per_prompt.identity(record, d) for d in domains}, domains, trained)


def _row_domains(key: str, domains: list[str], numbers: list[_Numbers]) -> list[str] | None:
    """The domains whose per-prompt records an accuracy row reads; None for rows without any."""
    if key.startswith("acc/"):
        return [key[4:]]
    if key == "avg_all":
        return domains
    if key == "avg_trained":  # the same trained domains in every run, else no pairing
        sets = {tuple(n.trained) for n in numbers}
        return list(sets.pop()) if len(sets) == 1 else None
    return None


def _cells(numbers: list[_Numbers], key: str) -> list[np.ndarray] | None:
    """[seeds, prompts] per domain of the row for one arm, or None unless every run has the records."""
    per_run = [n.cells.get(key) for n in numbers]
    if not per_run or any(x is None for x in per_run) or len({len(x) for x in per_run}) != 1:
        return None
    return [np.stack([x[d] for x in per_run]) for d in range(len(per_run[0]))]


def build_table(arms: dict[str, list[RunData]], baseline: str | None = None, seed: int = 0) -> StatsTable:
    """The statistics table of `arms` (name -> its runs, one per seed) against `baseline` (an arm's
    name; default the first arm). An unknown baseline is a ConfigError naming the arms."""
    from ..errors import ConfigError

    names = list(arms)
    if not names:
        raise ValueError("build_table: no arms")
    baseline = names[0] if baseline is None else baseline
    if baseline not in arms:
        raise ConfigError("--baseline", baseline, "one of the compared variants: " + ", ".join(names))
    numbers = {a: [_run_numbers(r) for r in runs] for a, runs in arms.items()}
    everyone = [n for a in names for n in numbers[a]]
    domains = list(dict.fromkeys(d for n in everyone for d in n.domains))
    spec = [("avg_all", "average accuracy, all domains", "acc", False),
            ("avg_trained", "average accuracy, trained domains", "acc", False),
            ("mean_forgetting", "mean forgetting (Chaudhry)", "pts", True),
            ("mean_forgetting_incl_base", "mean forgetting, base row included", "pts", True),
            ("bwt", "BWT", "pts", False), ("fwt", "FWT (baseline: base model)", "pts", False)]
    spec += [(f"acc/{d}", f"final accuracy: {d}", "acc", False) for d in domains]
    spec += [(k, label, "raw", True) for k, label in DRIFT_ROWS]
    rows, paired, inputs = [], 0, {}
    for key, label, kind, lower in spec:
        row = Row(key, label, kind, lower)
        for a in names:
            row.values[a] = [n.values.get(key, math.nan) for n in numbers[a]]
            row.per_arm[a] = describe(row.values[a])
        if all(s.n == 0 for s in row.per_arm.values()):
            continue
        row_domains = _row_domains(key, domains, everyone)
        same = row_domains is not None and all(
            len({n.identity.get(d) for n in everyone}) == 1 and everyone[0].identity.get(d) is not None
            for d in row_domains)
        cells = {a: _cells(numbers[a], key) if same else None for a in names}
        has_cells = all(c is not None for c in cells.values())
        paired += has_cells
        for a in names:
            if a != baseline:
                extra = (cells[a], cells[baseline]) if has_cells else (None, None)
                row.vs_baseline[a] = difference(row.values[a], row.values[baseline], *extra, seed=seed)
                inputs[(key, a)] = (row.values[a], row.values[baseline], *extra)
        rows.append(row)
    tests = [(row, a) for row in rows for a in row.vs_baseline]
    for (row, a), h in zip(tests, holm([row.vs_baseline[a].p_welch for row, a in tests])):
        row.p_holm[a], row.holm_level[a] = h.p_adjusted, 1.0 - h.alpha
        row.adjusted[a] = difference(*inputs[(row.key, a)], level=1.0 - h.alpha, seed=seed)
    return StatsTable(names, baseline, {a: len(arms[a]) for a in names}, rows, paired, len(tests))


def fmt(value: float, kind: str, signed: bool = False) -> str:
    """A number as the table shows it: % for 'acc', points for 'pts' (and for differences of 'acc')."""
    if value is None or math.isnan(value):
        return "–"
    if kind == "raw":
        return f"{value:+.4g}" if signed else f"{value:.4g}"
    return f"{100 * value:+.1f}" if signed or kind == "pts" else f"{100 * value:.1f}"


def fmt_p(p: float) -> str:
    return "–" if p is None or math.isnan(p) else f"{p:.3f}" if p >= 0.001 else "<0.001"


def cell_text(s: Summary, kind: str) -> str:
    """'mean ± std [low, high]' of one arm."""
    if s.n == 0:
        return "–"
    if s.n == 1:
        return f"{fmt(s.mean, kind)} (1 seed)"
    return f"{fmt(s.mean, kind)} ± {fmt(s.std, 'raw' if kind == 'raw' else 'pts').lstrip('+')} " \
           f"[{fmt(s.low, kind)}, {fmt(s.high, kind)}]"


def verdict_text(row: Row, arm: str) -> str:
    """The verdict word of the Holm-adjusted interval, and the 95% one in brackets where it differs."""
    d, adj = row.vs_baseline[arm], row.adjusted.get(arm)
    raw = direction_word((d.low, d.high))
    if adj is None:
        return raw
    word = direction_word((adj.low, adj.high))
    return word if word == raw else f"{word} ({raw} at 95%)"


def diff_text(row: Row, arm: str) -> str:
    """'diff [low, high] p=… perm p=… Holm p=… [adjusted interval] (level) -> verdict' of one arm
    against the baseline."""
    d, dk = row.vs_baseline[arm], "raw" if row.kind == "raw" else "pts"
    out = f"{fmt(d.diff, dk, True)} [{fmt(d.low, dk, True)}, {fmt(d.high, dk, True)}] " \
          f"p={fmt_p(d.p_welch)} perm p={fmt_p(d.p_perm)}"
    adj = row.adjusted.get(arm)
    if adj is not None:
        out += (f" Holm p={fmt_p(row.p_holm[arm])} [{fmt(adj.low, dk, True)}, {fmt(adj.high, dk, True)}] "
                f"({100 * row.holm_level[arm]:.2f}%)")
    return f"{out} -> {verdict_text(row, arm)}"


def format_text(table: StatsTable) -> str:
    """The table as plain text (what `cptlab study` prints at the end)."""
    seeds = ", ".join(f"{a}: {n}" for a, n in table.seeds.items())
    out = [f"Per variant: mean ± sample std [95% t interval] over seeds ({seeds}). Against {table.baseline}: "
           "difference [95% interval] Welch p, exact permutation p, Holm-adjusted p over the table's "
           f"{table.family_size} differences [the interval at the row's Holm level] -> verdict (higher / lower "
           "only where the adjusted interval excludes 0; the 95% verdict in brackets where it differs). "
           "Accuracy in %, differences in points."]
    for row in table.rows:
        out.append(f"{row.label}{' (lower is better)' if row.lower_is_better else ''}")
        for a in table.arms:
            line = f"  {a:20s} {cell_text(row.per_arm[a], row.kind)}"
            if a in row.vs_baseline:
                line += f"   vs {table.baseline}: {diff_text(row, a)}"
            out.append(line)
    if table.paired_rows:
        out.append(f"{table.paired_rows} accuracy rows had per-prompt records: their intervals also resample "
                   "prompts.")
    return "\n".join(out)
