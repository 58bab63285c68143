"""Continual-learning metrics over the accuracy matrix: forgetting, BWT, FWT, gains, OOD change.

Conventions (all functions are pure functions of numpy arrays):
  R             float array [S+1, D]: R[0, d] is the base model's accuracy on domain d, R[s, d] the
                accuracy after stage s (1..S). Missing evaluations are NaN and are skipped by means.
  stage_domains list of S column indices: stage_domains[s-1] is the domain trained at stage s.
Differences are in accuracy units (fractions in [0, 1]); multiply by 100 for percentage points.

Edge cases: with S = 1 there is no earlier stage to look back on or forward from, so BWT, FWT and
mean forgetting are NaN (not 0: "no evidence" is not "no forgetting"). Means over an empty set, or
over NaN entries only, are NaN and never warn.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from ..metric_names import EVAL, GREEDY_ACC, RUN_START


def accuracy_matrix(records: list[dict], metric: str = GREEDY_ACC) -> dict:
    """R[stage][domain] from the stage-end ('final') eval records; stage 0 is the base model."""
    finals = [r for r in records if r.get("event") == EVAL and r.get("final")]
    stages = sorted({r["stage"] for r in finals})
    domains = list(dict.fromkeys(r["domain"] for r in finals))
    names = {r["stage"]: r["stage_name"] for r in finals}
    table = {(r["stage"], r["domain"]): r.get(metric) for r in finals}
    return {"stages": stages, "stage_names": [names[s] for s in stages], "domains": domains,
            metric: [[table.get((s, d)) for d in domains] for s in stages]}


def matrix_from_records(records: list[dict], metric: str = GREEDY_ACC) -> tuple[np.ndarray, list[str], list[int]]:
    """(R [S+1, D], domains, stage_domains) from a run's records.

    Rows run over stages 0..S, S = the last stage with a final eval (rows of stages without one
    are NaN). Columns are the evaluated domains in record order; a trained domain that was never
    evaluated gets an all-NaN column, so every stage has a column index. Stage domains come from
    run_start's plan, else from the final evals' stage_name.
    """
    view = accuracy_matrix(records, metric)
    start = next((r for r in records if r.get("event") == RUN_START), {})
    planned = [st.get("domain") for st in start.get("stages", [])]
    named = {s: n for s, n in zip(view["stages"], view["stage_names"])}
    S = max(view["stages"], default=-1)
    trained = [planned[s - 1] if s - 1 < len(planned) else named.get(s) for s in range(1, S + 1)]
    domains = list(view["domains"])
    for name in trained:
        if name is not None and name not in domains:
            domains.append(name)
    R = np.full((S + 1, len(domains)), np.nan)
    for s, row in zip(view["stages"], view[metric]):
        for j, value in enumerate(row):
            R[s, j] = np.nan if value is None else float(value)
    stage_domains = [domains.index(name) if name is not None else -1 for name in trained]
    return R, domains, stage_domains


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def _check(R: np.ndarray, stage_domains: Sequence[int], fn: str) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != len(stage_domains) + 1:
        raise ValueError(f"{fn}: R must be [S+1, D] with S = len(stage_domains) = {len(stage_domains)}, "
                         f"got shape {R.shape}")
    return R


def _column(R: np.ndarray, row: int, col: int) -> float:
    """R[row, col], NaN for a missing column (index -1 from matrix_from_records' unknown stages)."""
    return float(R[row, col]) if 0 <= col < R.shape[1] else float("nan")


def average_accuracy(R: np.ndarray, columns: Sequence[int] | None = None) -> np.ndarray:
    """Mean accuracy of each row over `columns` (all domains if None): [S+1, D] -> [S+1].

    Over all D evaluated domains: A_all(k) = (1/D) sum_j R[k, j] (trained, untrained and OOD alike)."""
    R = np.asarray(R, dtype=float)
    sub = R if columns is None else R[:, list(columns)]
    return np.array([_nanmean(row) for row in sub])


def average_accuracy_trained(R: np.ndarray, stage_domains: Sequence[int]) -> np.ndarray:
    """Average accuracy over the domains trained so far (Chaudhry et al. 2018's A_k): [S+1, D] -> [S+1].

    A_k = mean over the distinct domains d_1..d_k trained at stages 1..k of R[k, d]; row 0 (nothing
    trained yet) is NaN."""
    R = _check(R, stage_domains, "average_accuracy_trained")
    out = [float("nan")]
    for k in range(1, R.shape[0]):
        seen = sorted({d for d in stage_domains[:k] if 0 <= d < R.shape[1]})
        out.append(_nanmean(R[k, seen]) if seen else float("nan"))
    return np.array(out)


def forgetting(R: np.ndarray, include_base: bool = False) -> np.ndarray:
    """Forgetting of each domain after the last stage S: [S+1, D] -> [D].

    Chaudhry et al. 2018 (the default): f_j = max_{l in 1..S-1} R[l, j] - R[S, j], the best accuracy
    of any earlier row *after training* minus the final one; NaN when S < 2 (no such row).
    include_base=True takes the maximum over rows 0..S-1, the base model (row 0) included: a domain
    that training never brought back to its base accuracy then counts as forgotten (NaN when S < 1).
    Signed: negative when the final accuracy is the best so far.
    """
    R = np.asarray(R, dtype=float)
    first = 0 if include_base else 1
    earlier = R[first:-1]
    if earlier.shape[0] == 0:
        return np.full(R.shape[1], np.nan)
    best = np.array([np.nanmax(c) if not np.isnan(c).all() else np.nan for c in earlier.T])
    return best - R[-1]


def mean_forgetting(R: np.ndarray, stage_domains: Sequence[int], include_base: bool = False) -> float:
    """Mean of `forgetting` over the domains trained at stages 1..S-1 (each counted once). NaN if S < 2."""
    R = _check(R, stage_domains, "mean_forgetting")
    trained = sorted({d for d in stage_domains[: len(stage_domains) - 1] if d >= 0})
    if not trained:
        return float("nan")
    return _nanmean(forgetting(R, include_base)[trained])


def backward_transfer(R: np.ndarray, stage_domains: Sequence[int]) -> float:
    """BWT (Lopez-Paz & Ranzato 2017) = mean_{s=1..S-1} R[S, d_s] - R[s, d_s]. NaN if S < 2.

    Negative BWT is forgetting of what each stage had just learned.
    """
    R = _check(R, stage_domains, "backward_transfer")
    S = len(stage_domains)
    diffs = [_column(R, S, d) - _column(R, s, d) for s, d in enumerate(stage_domains[:-1], start=1)]
    return _nanmean(np.array(diffs))


def forward_transfer(R: np.ndarray, stage_domains: Sequence[int]) -> float:
    """FWT = mean_{s=2..S} R[s-1, d_s] - b_{d_s}, with the baseline b_d = R[0, d], the base model's
    accuracy on d (Lopez-Paz & Ranzato use a randomly initialised model; here the base model is the
    natural reference). NaN if S < 2.

    Positive FWT: earlier stages already helped a domain before it was trained.
    """
    R = _check(R, stage_domains, "forward_transfer")
    diffs = [_column(R, s - 1, d) - _column(R, 0, d) for s, d in enumerate(stage_domains, start=1) if s >= 2]
    return _nanmean(np.array(diffs))


def in_domain_gain(R: np.ndarray, stage_domains: Sequence[int]) -> np.ndarray:
    """Gain of each stage on its own domain, R[s, d_s] - R[s-1, d_s]: -> [S]."""
    R = _check(R, stage_domains, "in_domain_gain")
    return np.array([_column(R, s, d) - _column(R, s - 1, d) for s, d in enumerate(stage_domains, start=1)])


def ood_columns(domains: Sequence[str]) -> list[int | None]:
    """For each domain, the column of its OOD variant (a domain whose `ood_of` is it), else None.

    Names unknown to the registry fall back to the '<name>_ood' convention.
    """
    from ..tasks import get_domain

    def parent(name: str) -> str | None:
        try:
            return get_domain(name).ood_of
        except Exception:
            return name[: -len("_ood")] if name.endswith("_ood") else None

    parents = [parent(name) for name in domains]
    return [next((k for k, p in enumerate(parents) if p == name), None) for name in domains]


def ood_change(R: np.ndarray, stage_domains: Sequence[int], ood_cols: Sequence[int | None]) -> np.ndarray:
    """Change of the trained domain's OOD variant at each stage, R[s, o_s] - R[s-1, o_s]: -> [S].

    ood_cols[d] is the column of domain d's OOD variant (see `ood_columns`), None if it has none;
    such stages are NaN.
    """
    R = _check(R, stage_domains, "ood_change")
    out = []
    for s, d in enumerate(stage_domains, start=1):
        o = ood_cols[d] if 0 <= d < len(ood_cols) else None
        out.append(np.nan if o is None else _column(R, s, o) - _column(R, s - 1, o))
    return np.array(out, dtype=float)


def worst_drop(R: np.ndarray, stage: int, exclude: Sequence[int] = ()) -> tuple[int | None, float]:
    """(column, change) of the largest fall R[s, d] - R[s-1, d] at `stage` over the other columns.

    Returns (None, nan) when no column has both values.
    """
    R = np.asarray(R, dtype=float)
    change = R[stage] - R[stage - 1]
    best, value = None, float("nan")
    for j, c in enumerate(change):
        if j in exclude or np.isnan(c):
            continue
        if best is None or c < value:
            best, value = j, float(c)
    return best, value
