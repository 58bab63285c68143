"""What each stage changed, and how sure we are: accuracy changes with 95% intervals from the
per-prompt records of one run (evals/, analysis/per_prompt.py).

Two evaluations of a domain in one run score the same held-out prompts (checked by the eval set's
identity), so a change is paired: the interval resamples prompts, once for both evaluations
(`stats.hierarchical_diff_ci` with one seed per arm). A mean change over several domains resamples
each domain's prompts independently and averages the domains' changes. Where a domain has no
per-prompt record (or the two records scored different prompts) its change is still reported, with
no interval (NaN bounds).

Accuracies and changes are fractions; `R` is the accuracy matrix of analysis/metrics.py (row 0: the
base model, row s: after stage s; columns: the evaluated domains).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import per_prompt
from .stats import hierarchical_diff_ci


@dataclass(frozen=True)
class Change:
    """Mean greedy-accuracy change over `domains` from one evaluation to another."""

    before: float
    after: float
    low: float  # 95% interval of after - before (NaN: no paired per-prompt records)
    high: float
    domains: tuple[str, ...]
    prompts: int  # prompts per domain, summed over the domains (0 without records)

    @property
    def diff(self) -> float:
        return self.after - self.before

    @property
    def has_interval(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))

    @property
    def beyond_noise(self) -> bool:
        """The interval excludes zero."""
        return self.has_interval and (self.low > 0 or self.high < 0)


def change(R: np.ndarray, columns: list[str], records: dict[int, dict], a: int, b: int,
           domains: list[str], seed: int = 0) -> Change | None:
    """The mean change over `domains` from row a to row b of R (stage a's evaluation to stage b's);
    None if no domain has both values. `records`: stage -> its stage-end evals/ record."""
    cols = [columns.index(d) for d in domains if d in columns]
    cols = [j for j in cols if not (np.isnan(R[a, j]) or np.isnan(R[b, j]))]
    if not cols:
        return None
    names = tuple(columns[j] for j in cols)
    before, after = float(np.mean(R[a, cols])), float(np.mean(R[b, cols]))
    pairs = []
    for name in names:
        ra, rb = records.get(a), records.get(b)
        xa, xb = per_prompt.greedy(ra, name), per_prompt.greedy(rb, name)
        if xa is None or xb is None or per_prompt.identity(ra, name) != per_prompt.identity(rb, name) \
                or len(xa) != len(xb) or len(xa) < 2:
            break
        pairs.append((xa, xb))
    if len(pairs) < len(names):
        return Change(before, after, math.nan, math.nan, names, 0)
    low, high = hierarchical_diff_ci([xb[None] for _, xb in pairs], [xa[None] for xa, _ in pairs], seed=seed)
    # the records are the source of the matrix too; their means agree with R unless R was edited
    before = float(np.mean([xa.mean() for xa, _ in pairs]))
    after = float(np.mean([xb.mean() for _, xb in pairs]))
    return Change(before, after, low, high, names, sum(len(xa) for xa, _ in pairs))


@dataclass(frozen=True)
class StageStory:
    """Stage s against the evaluation before it: its own domain, the domains trained at earlier stages,
    and the others (never trained so far, OOD variants included)."""

    stage: int
    domain: str
    own: Change | None
    earlier: Change | None
    others: Change | None
    worst: tuple[str, Change] | None  # the domain other than its own that dropped most over the stage


def stage_stories(R: np.ndarray, columns: list[str], stage_domains: list[int], records: dict[int, dict],
                  seed: int = 0) -> list[StageStory]:
    """One StageStory per finished stage (rows 1.. of R)."""
    out = []
    for s in range(1, R.shape[0]):
        j = stage_domains[s - 1] if s - 1 < len(stage_domains) else -1
        own = columns[j] if 0 <= j < len(columns) else None
        trained = {columns[k] for k in stage_domains[: s - 1] if 0 <= k < len(columns)} - {own}
        others = [d for d in columns if d != own and d not in trained]
        drops = [(d, change(R, columns, records, s - 1, s, [d], seed)) for d in columns if d != own]
        drops = [(d, c) for d, c in drops if c is not None]
        worst = min(drops, key=lambda dc: dc[1].diff, default=None)
        out.append(StageStory(s, own or "?", change(R, columns, records, s - 1, s, [own], seed) if own else None,
                              change(R, columns, records, s - 1, s, sorted(trained), seed) if trained else None,
                              change(R, columns, records, s - 1, s, others, seed) if others else None, worst))
    return out


def retained(R: np.ndarray, columns: list[str], stage_domains: list[int], records: dict[int, dict],
             seed: int = 0) -> list[tuple[int, str, Change]]:
    """For each domain trained at a stage k before the last finished one: its change from right after
    stage k to the end (the terms of BWT), as (k, domain, Change)."""
    last = R.shape[0] - 1
    out = []
    for k in range(1, last):
        j = stage_domains[k - 1] if k - 1 < len(stage_domains) else -1
        if 0 <= j < len(columns) and columns[j] not in [d for _, d, _ in out]:
            c = change(R, columns, records, k, last, [columns[j]], seed)
            if c is not None:
                out.append((k, columns[j], c))
    return out

