"""Statistics for verdicts over few seeds: intervals, unpaired and paired tests, the verdict rule.

Pure numpy (no scipy at run time; the tests pin these against scipy). Everything random takes a
`seed` and is deterministic. Shapes: `values` are 1-D arrays of one number per seed (a run);
`cells` are lists over domains of [seeds, prompts] arrays of per-prompt scores (0/1 for greedy
correctness, hit fractions for sampled accuracy) of one study arm, the same prompts in every arm.

Which interval is "the" 95% interval:
  - of a mean over seeds: Student's t interval (`describe`). A percentile bootstrap over 3 seeds
    cannot reach beyond the seeds' range and covers the mean far less often than 95%
    (`bootstrap_ci` is here for larger n; see tests/test_stats.py for its coverage);
  - of a difference between two arms (`difference`): Welch's t interval over seeds, and, where both
    arms have per-prompt records, the union of it with the hierarchical bootstrap interval over
    seeds and prompts, so that a verdict accounts for seed-to-seed and prompt-sampling noise.
The verdict rule (`verdict`): "agrees" only where that interval excludes zero in the stated
direction, "disagrees" where it excludes zero in the opposite direction, else "inconclusive".

Many verdicts at once (`holm`): each row's p is adjusted by Holm's step-down over the whole family,
and the rule is applied to the row's interval at the level Holm's procedure gives that row, so that
an adjusted interval excludes zero exactly where Holm rejects. A per-seed yes/no outcome (a run
collapsed or not) is tested with Fisher's exact test (`fisher_exact`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

LEVEL = 0.95
N_BOOT = 4000


@dataclass(frozen=True)
class Summary:
    """A mean over n values with its sample std (ddof 1) and a `level` t interval; NaN where n < 2."""

    n: int
    mean: float
    std: float
    low: float
    high: float


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) with the verdict interval [low, high] and the tests behind it.

    welch_low/high: Welch's t interval over seeds; boot_low/high: the hierarchical bootstrap
    interval over seeds and prompts (NaN without per-prompt records); p_welch: Welch's two-sided p;
    p_perm: the two-sided permutation p over seeds (exact where the splits are few enough)."""

    diff: float
    low: float
    high: float
    n_a: int
    n_b: int
    p_welch: float
    p_perm: float
    welch_low: float
    welch_high: float
    boot_low: float = math.nan
    boot_high: float = math.nan

    @property
    def method(self) -> str:
        return "Welch t ∪ seed×prompt bootstrap" if not math.isnan(self.boot_low) else "Welch t"


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test of two runs on the same prompts: b = right only in a, c = right only in b."""

    b: int
    c: int
    p: float


def _clean(values) -> np.ndarray:
    x = np.asarray([np.nan if v is None else v for v in np.ravel(np.asarray(values, dtype=object))], dtype=float)
    return x[~np.isnan(x)]


# -- Student's t distribution (via the regularised incomplete beta function) -----------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), as in Numerical Recipes 6.4."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0 and x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided tail probability P(|T| >= |t|) of Student's t with df degrees of freedom."""
    if math.isnan(t) or math.isnan(df) or df <= 0:
        return math.nan
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * t_sf2(t, df)
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """Quantile of Student's t (bisection on t_cdf; 1e-12 relative accuracy is plenty here)."""
    if math.isnan(df) or df <= 0 or not 0.0 < q < 1.0:
        return math.nan
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# -- one arm ------------------------------------------------------------------------------------------------
def describe(values, level: float = LEVEL) -> Summary:
    """Mean, sample std (ddof 1) and the t interval mean ± t_{(1+level)/2, n-1} * std / sqrt(n)."""
    x = _clean(values)
    n = int(x.size)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = t_ppf(0.5 + level / 2.0, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def bootstrap_ci(values, level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0,
                 statistic: Callable[[np.ndarray], np.ndarray] = lambda s: s.mean(axis=-1)) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` (applied along the last axis of [n_boot, n])."""
    x = _clean(values)
    if x.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    stats = statistic(x[rng.integers(0, x.size, size=(n_boot, x.size))])
    return _percentiles(stats, level)


def _percentiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _cells(cells) -> list[np.ndarray]:
    out = [np.atleast_2d(np.asarray(c, dtype=float)) for c in cells]
    if not out or len({c.shape[0] for c in out}) != 1:
        raise ValueError("cells: a non-empty list of [seeds, prompts] arrays with the same number of seeds")
    return out


def _boot_means(cells: list[np.ndarray], weights: list[np.ndarray], seed_idx: np.ndarray) -> np.ndarray:
    """[n_boot] mean over domains of the mean over resampled seeds and prompts.

    weights[d]: [n_boot, P_d] prompt multiplicities; seed_idx: [n_boot, S] resampled seed rows."""
    cols = np.arange(seed_idx.shape[0])[:, None]
    per_domain = []
    for c, w in zip(cells, weights):
        row_means = (c @ w.T) / c.shape[1]  # [S, n_boot]: each seed's mean over the resampled prompts
        per_domain.append(row_means[seed_idx, cols].mean(axis=1))
    return np.mean(per_domain, axis=0)


def _prompt_weights(cells: list[np.ndarray], n_boot: int, rng) -> list[np.ndarray]:
    return [rng.multinomial(c.shape[1], np.full(c.shape[1], 1.0 / c.shape[1]), size=n_boot).astype(float)
            for c in cells]


def hierarchical_bootstrap_ci(cells, level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float]:
    """Interval of the mean over domains of per-domain accuracy, resampling seeds (the same rows in
    every domain: one seed is one run) and, within each domain, prompts."""
    cells = _cells(cells)
    rng = np.random.default_rng(seed)
    S = cells[0].shape[0]
    weights = _prompt_weights(cells, n_boot, rng)
    return _percentiles(_boot_means(cells, weights, rng.integers(0, S, size=(n_boot, S))), level)


def hierarchical_diff_ci(cells_a, cells_b, level: float = LEVEL, n_boot: int = N_BOOT,
                         seed: int = 0) -> tuple[float, float]:
    """Interval of mean(a) - mean(b) for two arms on the same prompts: the prompts are resampled once
    for both arms (paired), the seeds of each arm independently (different runs)."""
    cells_a, cells_b = _cells(cells_a), _cells(cells_b)
    if [c.shape[1] for c in cells_a] != [c.shape[1] for c in cells_b]:
        raise ValueError("hierarchical_diff_ci: the two arms must hold the same prompts per domain")
    rng = np.random.default_rng(seed)
    weights = _prompt_weights(cells_a, n_boot, rng)
    Sa, Sb = cells_a[0].shape[0], cells_b[0].shape[0]
    diffs = (_boot_means(cells_a, weights, rng.integers(0, Sa, size=(n_boot, Sa)))
             - _boot_means(cells_b, weights, rng.integers(0, Sb, size=(n_boot, Sb))))
    return _percentiles(diffs, level)


# -- two arms, unpaired over seeds ------------------------------------------------------------------------
def welch(a, b, level: float = LEVEL) -> tuple[float, float, float, float, float]:
    """Welch's unequal-variance t test of mean(a) - mean(b): (diff, two-sided p, df, low, high).

    With n < 2 on either side everything but diff is NaN; with zero variance on both sides the
    interval is the point itself and p is 0 (1 when the means are equal)."""
    x, y = _clean(a), _clean(b)
    if x.size == 0 or y.size == 0:
        return math.nan, math.nan, math.nan, math.nan, math.nan
    diff = float(x.mean() - y.mean())
    if x.size < 2 or y.size < 2:
        return diff, math.nan, math.nan, math.nan, math.nan
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se2 = va + vb
    if se2 == 0:
        return diff, 0.0 if diff else 1.0, math.inf, diff, diff
    df = se2 ** 2 / (va ** 2 / (x.size - 1) + vb ** 2 / (y.size - 1))
    half = t_ppf(0.5 + level / 2.0, df) * math.sqrt(se2)
    return diff, t_sf2(diff / math.sqrt(se2), df), float(df), diff - half, diff + half


def permutation_p(a, b, n_resamples: int = 20000, max_exact: int = 200_000, seed: int = 0) -> float:
    """Two-sided permutation p of the difference of means: the share of relabellings of the pooled
    values whose |difference| is at least the observed one. Exact (all C(n_a+n_b, n_a) splits) when
    there are at most `max_exact`, else `n_resamples` random ones with p = (1 + hits) / (1 + n).
    With 3 vs 3 values the smallest possible p is 2/20 = 0.10."""
    x, y = _clean(a), _clean(b)
    if x.size == 0 or y.size == 0:
        return math.nan
    pooled, na, n = np.concatenate([x, y]), x.size, x.size + y.size
    total = pooled.sum()
    observed = abs(x.mean() - y.mean())
    tol = 1e-12 * max(1.0, float(np.abs(pooled).max()))
    if math.comb(n, na) <= max_exact:
        idx = np.array(list(itertools.combinations(range(n), na)))
        sums = pooled[idx].sum(axis=1)
        stats = np.abs(sums / na - (total - sums) / (n - na))
        return float(np.mean(stats >= observed - tol))
    rng = np.random.default_rng(seed)
    perms = rng.permuted(np.tile(pooled, (n_resamples, 1)), axis=1)
    sums = perms[:, :na].sum(axis=1)
    hits = int(np.sum(np.abs(sums / na - (total - sums) / (n - na)) >= observed - tol))
    return (1 + hits) / (1 + n_resamples)


def difference(a, b, cells_a=None, cells_b=None, level: float = LEVEL, n_boot: int = N_BOOT,
               seed: int = 0) -> Difference:
    """mean(a) - mean(b) over seeds with the interval the verdict rule reads (see the module docstring).

    a, b: one value per seed; cells_a/cells_b (optional, both or neither): the per-prompt records
    behind them, [seeds, prompts] per domain, for the hierarchical bootstrap."""
    diff, p_welch, _, wlo, whi = welch(a, b, level)
    p_perm = permutation_p(a, b, seed=seed)
    lo, hi, blo, bhi = wlo, whi, math.nan, math.nan
    if cells_a is not None and cells_b is not None:
        blo, bhi = hierarchical_diff_ci(cells_a, cells_b, level, n_boot, seed)
        if not math.isnan(wlo):
            lo, hi = min(wlo, blo), max(whi, bhi)
    return Difference(diff, lo, hi, int(_clean(a).size), int(_clean(b).size), p_welch, p_perm, wlo, whi, blo, bhi)


def sign_flip_p(values, n_resamples: int = 20000, max_exact: int = 2 ** 16, seed: int = 0) -> float:
    """Two-sided sign-flip (one-sample permutation) p of mean(values) = 0: the share of the 2^n sign
    patterns whose |mean| is at least the observed one. With 3 values the smallest p is 2/8 = 0.25."""
    x = _clean(values)
    if x.size == 0:
        return math.nan
    observed = abs(x.mean())
    tol = 1e-12 * max(1.0, float(np.abs(x).max()))
    if 2 ** x.size <= max_exact:
        signs = 1 - 2 * ((np.arange(2 ** x.size)[:, None] >> np.arange(x.size)) & 1)
        return float(np.mean(np.abs((signs * x).mean(axis=1)) >= observed - tol))
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(n_resamples, x.size))
    return (1 + int(np.sum(np.abs((signs * x).mean(axis=1)) >= observed - tol))) / (1 + n_resamples)


def one_sample(values, level: float = LEVEL) -> Difference:
    """mean(values) - 0, e.g. each seed's change from a shared base model: the t interval, the one-sample
    t test's p (p_welch) and the exact sign-flip p (p_perm). n_b is 0."""
    s = describe(values, level)
    p = math.nan
    if s.n >= 2:
        p = (0.0 if s.mean else 1.0) if s.std == 0 else t_sf2(s.mean / (s.std / math.sqrt(s.n)), s.n - 1)
    low, high = (s.mean, s.mean) if s.n >= 2 and s.std == 0 else (s.low, s.high)
    return Difference(s.mean, low, high, s.n, 0, p, sign_flip_p(values), low, high)


# -- two runs on the same prompts (paired) ----------------------------------------------------------------
def mcnemar_exact(a, b) -> McNemar:
    """Exact McNemar test on two 0/1 arrays over the same prompts: p = P(Binomial(b+c, 1/2) as extreme)."""
    x, y = np.asarray(a, dtype=int), np.asarray(b, dtype=int)
    if x.shape != y.shape:
        raise ValueError(f"mcnemar_exact: {x.shape} vs {y.shape} prompts")
    nb, nc = int(np.sum((x == 1) & (y == 0))), int(np.sum((x == 0) & (y == 1)))
    return McNemar(nb, nc, mcnemar_p(nb, nc))


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p from the discordant counts: min(1, 2 * P(X <= min(b, c))), X ~ Bin(b+c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2.0 * tail)


def paired_bootstrap_ci(a, b, level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float]:
    """Interval of mean(a - b) for two runs scored on the same prompts, resampling prompts."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired_bootstrap_ci: two 1-D arrays over the same prompts, got {x.shape} and {y.shape}")
    return bootstrap_ci(x - y, level, n_boot, seed)


# -- the verdict rule --------------------------------------------------------------------------------------
def verdict(interval: Sequence[float], direction: str | int) -> str:
    """"agrees" if the interval of the difference excludes zero on the side of `direction` ('+', '>',
    'higher' or 1; '-', '<', 'lower' or -1), "disagrees" if it excludes zero on the other side,
    "inconclusive" otherwise (zero inside, or an interval that could not be computed)."""
    sign = {"+": 1, ">": 1, "higher": 1, "greater": 1, 1: 1, "-": -1, "<": -1, "lower": -1, "less": -1, -1: -1}
    if direction not in sign:
        raise ValueError(f"verdict: direction must be '+' or '-' (or 1 / -1), got {direction!r}")
    lo, hi = (float(v) for v in interval)
    if math.isnan(lo) or math.isnan(hi):
        return "inconclusive"
    if lo > 0:
        return "agrees" if sign[direction] > 0 else "disagrees"
    if hi < 0:
        return "agrees" if sign[direction] < 0 else "disagrees"
    return "inconclusive"


# -- many verdicts at once -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class HolmRow:
    """One test of a family after Holm's step-down: the adjusted p, the alpha of the row's adjusted
    interval (its level is 1 - alpha) and whether Holm rejects the null."""

    p_adjusted: float
    alpha: float
    rejected: bool


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> list[HolmRow]:
    """Holm's (1979) step-down over a family of m tests, in the order given.

    Sort the p values ascending, p_(1) <= ... <= p_(m) (a missing p, None or NaN, counts in m as 1: it
    is never rejected). Rank i has alpha_i = alpha / (m - i + 1). Holm rejects ranks 1 .. s-1, where s
    is the first rank with p_(s) >= alpha_s (s = m + 1 when there is none), and nothing from s on.
    Adjusted p (monotone): p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)); p~ < alpha exactly where
    Holm rejects.

    Adjusted intervals: rank i < s gets alpha_i, every rank i >= s gets alpha_s (the step-down stops
    at s, so the later ranks keep s's level: monotonicity). A t interval at level 1 - a excludes zero
    exactly where its test's p < a, so with the p of the test behind each interval the rule applied
    to the adjusted intervals gives Holm's decisions: ranks before s have p_(i) < alpha_i, ranks from
    s on have p_(i) >= p_(s) >= alpha_s."""
    p = [1.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in pvalues]
    m = len(p)
    order = sorted(range(m), key=lambda k: p[k])
    out: list[HolmRow | None] = [None] * m
    running, stopped_alpha = 0.0, None
    for rank, k in enumerate(order, start=1):
        step_alpha = alpha / (m - rank + 1)
        running = max(running, min(1.0, (m - rank + 1) * p[k]))
        if stopped_alpha is None and p[k] >= step_alpha:
            stopped_alpha = step_alpha
        out[k] = HolmRow(running, step_alpha if stopped_alpha is None else stopped_alpha, stopped_alpha is None)
    return out  # type: ignore[return-value]


def fisher_exact(yes_a: int, n_a: int, yes_b: int, n_b: int) -> float:
    """Two-sided Fisher's exact p of a 2x2 table (yes_a of n_a in arm a, yes_b of n_b in arm b): the
    probability, under the hypergeometric law of the table with its margins fixed, of every table no
    more probable than the observed one (relative tolerance 1e-7, as scipy does)."""
    if not (0 <= yes_a <= n_a and 0 <= yes_b <= n_b):
        raise ValueError(f"fisher_exact: counts must lie in 0..n, got {yes_a}/{n_a} and {yes_b}/{n_b}")
    yes, n = yes_a + yes_b, n_a + n_b
    if n == 0:
        return 1.0
    lo, hi = max(0, yes - n_b), min(yes, n_a)
    probs = {k: math.comb(n_a, k) * math.comb(n_b, yes - k) / math.comb(n, yes) for k in range(lo, hi + 1)}
    observed = probs[yes_a]
    return min(1.0, sum(q for q in probs.values() if q <= observed * (1 + 1e-7)))


def direction_word(interval: Sequence[float]) -> str:
    """'higher', 'lower' or 'inconclusive': the verdict of the claim "a > b" said without a claim."""
    return {"agrees": "higher", "disagrees": "lower"}.get(verdict(interval, "+"), "inconclusive")
