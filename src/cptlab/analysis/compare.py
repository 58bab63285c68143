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

`mismatches` says where the compared runs are not like for like (base model, trained or evaluated
domains, eval prompts): their differences then mix those with the method's effect.
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
from ..metric_names import DRIFT, RUN_START

DRIFT_ROWS = [("param/rel_l2_base", "weights moved from the base (% of its norm)", "share"),
              ("response/kl_to_base", "answers drift from the base (token KL, nats)", "nats"),
              ("response/answer_changed_frac", "probe answers changed from the base's (%)", "share"),
              ("artifacts/malformed_rate", "malformed answers (%)", "share"),
              ("artifacts/repetition_rate", "repetition within answers (%)", "share")]
"""End-of-run drift and artifact numbers (the last stage's drift record): key, label, kind (fmt)."""


@dataclass
class RunData:
    """What the statistics read of one run."""

    name: str
    root: Path
    records: list[dict]
    config: dict = field(default_factory=dict)
    """The run's config.yaml as read (only `mismatches` reads it: which seed built the base model)."""


@dataclass
class Row:
    key: str
    label: str
    kind: str
    """'acc' or 'share' (a fraction shown in %), 'pts' (a difference of fractions shown in points), 'nats'
    (a KL estimate, never negative in truth) or 'raw' (see fmt)."""
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
    drift = [r for r in run.records if r.get("event") == DRIFT and r.get("stage") == S and S >= 1]
    for key, _, _ in DRIFT_ROWS:
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
    spec += [(k, label, kind, True) for k, label, kind in DRIFT_ROWS]
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


def diff_kind(kind: str) -> str:
    """How a difference of two `kind` numbers is shown: fractions' differences in points."""
    return kind if kind in ("nats", "raw") else "pts"


KL_RESOLUTION = 0.0005
"""A KL estimate below this (nats per token) shows as ≈0: the k1 estimate on a few hundred tokens can
come out slightly negative, which the true KL never is."""


def fmt(value: float, kind: str, signed: bool = False) -> str:
    """A number as the report shows it: % (one decimal) for 'acc' and 'share', signed points for 'pts'
    (and for differences of fractions), three decimals for 'nats' (≈0 for an estimate below
    KL_RESOLUTION; differences signed), four significant digits for 'raw'."""
    if value is None or math.isnan(value):
        return "–"
    if kind == "raw":
        return f"{value:+.4g}" if signed else f"{value:.4g}"
    if kind == "nats":
        if signed:
            return "±0.000" if abs(value) < KL_RESOLUTION else f"{value:+.3f}"
        return "≈0" if value < KL_RESOLUTION else f"{value:.3f}"
    return f"{100 * value:+.1f}" if signed or kind == "pts" else f"{100 * value:.1f}"


def fmt_p(p: float) -> str:
    return "–" if p is None or math.isnan(p) else f"{p:.3f}" if p >= 0.001 else "<0.001"


def cell_text(s: Summary, kind: str) -> str:
    """'mean ± std [low, high]' of one arm."""
    if s.n == 0:
        return "–"
    if s.n == 1:
        return f"{fmt(s.mean, kind)} (1 seed)"
    return f"{fmt(s.mean, kind)} ± {fmt(s.std, diff_kind(kind), True).lstrip('+±')} " \
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
    d, dk = row.vs_baseline[arm], diff_kind(row.kind)
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
           "Accuracies and rates in %, their differences in points; KL in nats per token."]
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


# -- runs that are not like for like ------------------------------------------------------------------


@dataclass
class Mismatch:
    """One way the compared runs differ besides their method settings."""

    topic: str
    """'base model', 'trained domains', 'evaluated domains' or 'eval prompts'."""
    detail: str
    """Which runs have what, e.g. "a, b: arithmetic→sorting; c: sorting"."""


def _grouped(values: dict[str, object], show, arms: dict[str, list[str]]) -> str:
    """'a, b: X; c: Y': the runs (by label) grouped by value, in order of first appearance; all runs of
    a variant (`arms`: its name -> its runs' labels) in one group are named by the variant."""
    groups: dict[object, list[str]] = {}
    for name, value in values.items():
        groups.setdefault(value, []).append(name)
    for names in groups.values():
        for arm, members in arms.items():
            if len(members) > 1 and all(m in names for m in members):
                names[names.index(members[0])] = arm
                names[:] = [n for n in names if n not in members]
    return "; ".join(f"{', '.join(names)}: {show(value)}" for value, names in groups.items())


def _start(run: RunData) -> dict:
    return next((r for r in run.records if r.get("event") == RUN_START), {})


def _eval_identity(run: RunData, domain: str) -> tuple | None:
    """The eval set `domain` was scored on in the run's first per-prompt record (None without one)."""
    records = per_prompt.final_records(run.root) or dict(enumerate(per_prompt.load_all(run.root).values()))
    return next((i for r in records.values() if (i := per_prompt.identity(r, domain)) is not None), None)


def _bases_differ(runs: dict[str, RunData], hashes: dict[str, str]) -> bool:
    """Whether two runs that should share a base model have other weights. Runs whose base seed is
    run.seed (warmup.seed: null) and whose run.seeds differ are expected to have different bases:
    the seed's variation, not a mismatch."""
    def seeds(run: RunData) -> tuple:
        return ((run.config.get("warmup") or {}).get("seed", 0), (run.config.get("run") or {}).get("seed"))

    names = list(runs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (wa, ra), (wb, rb) = seeds(runs[a]), seeds(runs[b])
            by_run_seed = runs[a].config and runs[b].config and wa is None and wb is None and ra != rb
            if hashes[a] != hashes[b] and not by_run_seed:
                return True
    return False


def mismatches(runs: dict[str, RunData], arms: dict[str, list[str]] | None = None) -> list[Mismatch]:
    """Where runs (label -> run) are not like for like: a different base model (the weights' sha256 in
    run_start, where the runs' seeds do not explain it; else the parameter count), other trained
    domains (the stage sequence), other evaluated domains, or other eval prompts for a domain they
    share (per-prompt records: prompt count, generator config and prompts' sha256). What a run does not
    record is not guessed at. `arms` (variant -> its runs' labels) names a variant instead of all its
    runs where they agree."""
    arms = arms or {}
    out = []
    bases = {k: _start(r).get("base") or {} for k, r in runs.items()}
    hashes = {k: b.get("weights_sha256") for k, b in bases.items()}
    sizes = {k: b.get("parameters") for k, b in bases.items()}
    if all(hashes.values()) and _bases_differ(runs, hashes):
        out.append(Mismatch("base model", _grouped(hashes, lambda h: f"weights {h[:8]}", arms)))
    elif all(sizes.values()) and len(set(sizes.values())) > 1:
        out.append(Mismatch("base model", _grouped(sizes, lambda n: f"{n / 1e6:.2f}M parameters", arms)))
    trained = {k: tuple(str(s.get("domain", "?")) for s in _start(r).get("stages") or []) for k, r in runs.items()}
    if len(set(trained.values())) > 1:
        out.append(Mismatch("trained domains", _grouped(trained, lambda t: "→".join(t) or "no stages", arms)))
    evaluated = {k: tuple(sorted(_start(r).get("domains") or matrix_from_records(r.records)[1]))
                 for k, r in runs.items()}
    if len(set(evaluated.values())) > 1:
        out.append(Mismatch("evaluated domains", _grouped(evaluated, lambda d: ", ".join(d) or "none", arms)))
    shared = [d for d in next(iter(evaluated.values()), ()) if all(d in e for e in evaluated.values())]
    differing = []
    for d in shared:
        ids = {k: _eval_identity(r, d) for k, r in runs.items()}
        if all(ids.values()) and len(set(ids.values())) > 1:
            counts = {i[0] for i in ids.values()}
            show = (lambda i: f"{i[0]} prompts") if len(counts) > 1 else (lambda i: f"set {str(i[2])[:8]}")
            differing.append(f"{d} ({_grouped(ids, show, arms)})")
    if differing:
        out.append(Mismatch("eval prompts", "; ".join(differing)))
    return out


def mismatch_line(found: list[Mismatch]) -> str:
    """The one-line warning of `mismatches` ("" when the runs are like for like)."""
    if not found:
        return ""
    return ("the runs differ in " + "; ".join(f"{m.topic} ({m.detail})" for m in found)
            + ": their differences are not the methods' alone")


HEADLINE_ROWS = [("avg_all", "acc %"), ("avg_trained", "trained %"), ("mean_forgetting", "forgetting"),
                 ("bwt", "BWT"), ("fwt", "FWT")]
"""The numbers of the terminal table (`headline`): key -> column title."""


def headline(table: StatsTable) -> tuple[list[str], list[list[str]]]:
    """(columns, rows) of the comparison's headline as plain text, one row per variant: its seeds, the
    mean over seeds of the final average accuracy (all domains, trained domains), mean forgetting, BWT
    and FWT, and the average accuracy against the baseline: difference [95% interval] verdict (read from
    the Holm-adjusted interval, as in the page, which also shows that interval)."""
    rows = {r.key: r for r in table.rows}
    keys = [(k, title) for k, title in HEADLINE_ROWS if k in rows]
    columns = ["variant", "seeds", *(title for _, title in keys)]
    against = rows.get("avg_all")
    if against is not None and len(table.arms) > 1:
        columns.append(f"acc vs {table.baseline}")
    out = []
    for arm in table.arms:
        line = [arm, str(table.seeds[arm]), *(fmt(rows[k].per_arm[arm].mean, rows[k].kind) for k, _ in keys)]
        if len(columns) > len(line):
            d = against.vs_baseline.get(arm)
            if d is None:
                line.append("baseline")
            elif math.isnan(d.low):
                line.append(f"{fmt(d.diff, 'pts', True)} (no interval)")
            else:
                adj = against.adjusted.get(arm, d)
                line.append(f"{fmt(d.diff, 'pts', True)} [{fmt(d.low, 'pts', True)}, {fmt(d.high, 'pts', True)}] "
                            f"{direction_word((adj.low, adj.high))}")
        out.append(line)
    return columns, out
