"""cptlab.analysis.stats against known answers: scipy's t distribution, Welch test and permutation
test, hand-enumerated permutation distributions, McNemar on a hand table, and bootstrap coverage on
a known distribution with fixed seeds."""

import math

import numpy as np
import pytest

from cptlab.analysis.stats import (
    bootstrap_ci, describe, difference, direction_word, fisher_exact, hierarchical_bootstrap_ci, hierarchical_diff_ci,
    holm, mcnemar_exact, mcnemar_p, one_sample, paired_bootstrap_ci, permutation_p, sign_flip_p, t_ppf, t_sf2, verdict,
    welch,
)

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("df", [1, 2, 2.7, 4, 9.5, 30, 200])
def test_student_t_matches_scipy(df):
    for t in (0.0, 0.3, 1.0, 2.5, 7.0):
        assert t_sf2(t, df) == pytest.approx(2 * scipy_stats.t.sf(t, df), rel=1e-9, abs=1e-14)
    for q in (0.6, 0.9, 0.975, 0.995):
        assert t_ppf(q, df) == pytest.approx(scipy_stats.t.ppf(q, df), rel=1e-9)
        assert t_ppf(1 - q, df) == pytest.approx(scipy_stats.t.ppf(1 - q, df), rel=1e-9)


def test_describe_is_the_t_interval():
    s = describe([1.0, 2.0, 3.0, None, float("nan")])  # missing values are skipped
    assert (s.n, s.mean, s.std) == (3, 2.0, 1.0)
    half = 4.302652729749464 / math.sqrt(3)  # t_{0.975, 2} * std / sqrt(n)
    assert (s.low, s.high) == pytest.approx((2 - half, 2 + half), rel=1e-9)
    lo, hi = scipy_stats.t.interval(0.95, 2, loc=2.0, scale=1 / math.sqrt(3))
    assert (s.low, s.high) == pytest.approx((lo, hi), rel=1e-9)
    one = describe([0.4])
    assert one.mean == 0.4 and math.isnan(one.std) and math.isnan(one.low)
    assert describe([]).n == 0


@pytest.mark.parametrize("a,b", [([0.51, 0.55, 0.49], [0.56, 0.57, 0.55]),
                                 ([0.1, 0.4, 0.2, 0.3, 0.25], [0.3, 0.45, 0.5]),
                                 ([3.0, 1.0, 4.0, 1.0, 5.0, 9.0], [2.0, 6.0, 5.0, 3.0])])
def test_welch_matches_scipy(a, b):
    diff, p, df, lo, hi = welch(a, b)
    ref = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert diff == pytest.approx(np.mean(a) - np.mean(b))
    assert p == pytest.approx(ref.pvalue, rel=1e-9)
    assert df == pytest.approx(ref.df, rel=1e-9)
    ci = ref.confidence_interval(0.95)
    assert (lo, hi) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_welch_degenerate_cases():
    assert math.isnan(welch([0.5], [0.2, 0.3])[1])  # one seed: no variance estimate
    diff, p, _, lo, hi = welch([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    assert (diff, p, lo, hi) == (0.0, 1.0, 0.0, 0.0)


def test_permutation_p_hand_enumerated():
    # 3 vs 3 fully separated: of the C(6,3) = 20 splits only the observed one and its mirror reach
    # |difference| 3, so p = 2/20 = 0.10, the smallest two-sided p three seeds a side can give
    assert permutation_p([1, 2, 3], [4, 5, 6]) == pytest.approx(0.10)
    # a = [1, 3, 5], b = [2, 4, 6]: |diff| = 1; the 20 splits' |sum(a') - 10.5| / 3 ... counted by hand:
    # a' sums range over 6..15; |mean(a') - mean(b')| = |2 sum(a') - 21| / 3 >= 1 iff sum(a') <= 9 or >= 12;
    # sums of 3 of {1..6}: 6:1, 7:1, 8:2, 9:3, 10:3, 11:3, 12:3, 13:2, 14:1, 15:1 -> 14 of 20
    assert permutation_p([1, 3, 5], [2, 4, 6]) == pytest.approx(14 / 20)


def test_permutation_p_matches_scipy_and_monte_carlo():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.0, 1.0, 5), rng.normal(1.0, 1.0, 5)
    ref = scipy_stats.permutation_test((a, b), lambda x, y: np.mean(x) - np.mean(y), permutation_type="independent",
                                       n_resamples=np.inf, alternative="two-sided")
    exact = permutation_p(a, b)
    assert exact == pytest.approx(ref.pvalue, abs=1e-12)
    approx = permutation_p(a, b, max_exact=0, n_resamples=20000, seed=1)
    assert approx == pytest.approx(exact, abs=0.01)
    assert permutation_p(a, b, max_exact=0, seed=1) == approx  # seeded: the same every time


def test_one_sample_change_matches_scipy_and_the_sign_flip_count():
    changes = [0.057, 0.061, 0.059, 0.020]
    d = one_sample(changes)
    ref = scipy_stats.ttest_1samp(changes, 0.0)
    assert d.p_welch == pytest.approx(ref.pvalue, rel=1e-9)
    ci = ref.confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    # all four positive: only the all-plus and all-minus of the 16 sign patterns reach |mean| -> 2/16
    assert d.p_perm == pytest.approx(2 / 16)
    assert sign_flip_p([0.01, 0.02, 0.03]) == pytest.approx(0.25)  # 3 seeds: never below 2/8
    # [1, -2, 4]: sum 3; the 8 sign patterns give sums +-3, +-5, +-7, +-1, so 6 of 8 reach |3|
    assert sign_flip_p([1.0, -2.0, 4.0]) == pytest.approx(6 / 8)
    assert sign_flip_p([1.0, -2.0, 4.0], max_exact=0, seed=2) == pytest.approx(0.75, abs=0.01)


def test_mcnemar_on_a_hand_table():
    # 10 discordant prompts, 1 right only in a and 9 only in b: p = 2 * (C(10,0) + C(10,1)) / 2^10
    a = np.array([1] * 20 + [1] + [0] * 9 + [0] * 5)
    b = np.array([1] * 20 + [0] + [1] * 9 + [0] * 5)
    m = mcnemar_exact(a, b)
    assert (m.b, m.c) == (1, 9)
    assert m.p == pytest.approx(22 / 1024)
    assert m.p == pytest.approx(scipy_stats.binomtest(1, 10, 0.5).pvalue)
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(5, 5) == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact([1, 0], [1, 0, 1])


def test_bootstrap_coverage_on_a_known_distribution():
    # 200 samples of n = 30 from N(0, 1): the 95% percentile interval covers the true mean 0 in
    # about 93% of them (percentile intervals are a little short at this n)
    rng = np.random.default_rng(0)
    cover = [lo <= 0.0 <= hi for lo, hi in (bootstrap_ci(rng.normal(size=30), n_boot=2000, seed=k)
                                            for k in range(200))]
    assert 0.88 <= np.mean(cover) <= 0.97
    # with 3 seeds a bootstrap cannot reach beyond the sample's range and covers far less often,
    # while the t interval keeps its 95%: why `describe` gives the t interval
    samples = [rng.normal(size=3) for _ in range(400)]
    boot = np.mean([lo <= 0 <= hi for lo, hi in (bootstrap_ci(x, n_boot=500, seed=k) for k, x in enumerate(samples))])
    t = np.mean([describe(x).low <= 0 <= describe(x).high for x in samples])
    assert boot < 0.80 and 0.92 <= t <= 0.98


def test_hierarchical_bootstrap_limits():
    rng = np.random.default_rng(1)
    # seeds identical: only prompt noise, close to the binomial interval 0.5 ± 1.96 * sqrt(0.25 / 400)
    row = (rng.random(400) < 0.5).astype(float)
    lo, hi = hierarchical_bootstrap_ci([np.tile(row, (3, 1))], seed=0)
    half = 1.96 * math.sqrt(row.mean() * (1 - row.mean()) / 400)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    # every prompt alike within a seed: only seed noise; the interval lies within the seeds' range
    M = np.repeat(np.array([[0.2], [0.4], [0.9]]), 50, axis=1)
    lo, hi = hierarchical_bootstrap_ci([M], seed=0)
    assert 0.2 <= lo < 0.5 < hi <= 0.9
    assert hierarchical_bootstrap_ci([M], seed=0) == hierarchical_bootstrap_ci([M], seed=0)


def test_paired_intervals_use_the_pairing():
    rng = np.random.default_rng(2)
    row = (rng.random(256) < 0.6).astype(float)
    base = np.tile(row, (3, 1))
    base[np.arange(3), [5, 6, 7]] = 1 - base[np.arange(3), [5, 6, 7]]  # seeds differ on one prompt each
    better = base.copy()
    wrong = np.flatnonzero(row[20:] == 0)[:12] + 20
    better[:, wrong] = 1.0  # the same runs, right on 12 more prompts (4.7 points)
    lo, hi = hierarchical_diff_ci([better], [base], seed=0)
    gain = (better - base).mean()
    assert 0 < lo <= gain <= hi  # paired over prompts: a consistent gain of a few prompts is resolved
    # the same 4.7-point gain on unrelated prompts (a second, independent eval set) is not resolved
    other = np.tile((rng.random(256) < 0.6 + gain).astype(float), (3, 1))
    assert hierarchical_diff_ci([other], [base], seed=0)[0] < 0
    same = base[:1]
    assert hierarchical_diff_ci([same], [same], seed=0) == (0.0, 0.0)  # one run vs itself: exactly 0
    plo, phi = paired_bootstrap_ci(better[0], base[0], seed=0)
    assert 0 < plo <= (better[0] - base[0]).mean() <= phi
    with pytest.raises(ValueError):
        hierarchical_diff_ci([base], [base[:, :10]])


def test_difference_combines_welch_and_bootstrap():
    a, b = [0.60, 0.62, 0.61], [0.50, 0.53, 0.52]
    d = difference(a, b)
    assert d.diff == pytest.approx(0.0933333333)
    assert (d.low, d.high) == (d.welch_low, d.welch_high) and d.method == "Welch t"
    assert d.p_perm == pytest.approx(0.10)
    cells_a = [np.tile((np.arange(100) < 61).astype(float), (3, 1))]
    cells_b = [np.tile((np.arange(100) < 52).astype(float), (3, 1))]
    with_prompts = difference(a, b, cells_a, cells_b)
    assert with_prompts.low == min(with_prompts.welch_low, with_prompts.boot_low)
    assert with_prompts.high == max(with_prompts.welch_high, with_prompts.boot_high)
    assert with_prompts.low < d.low  # the prompt noise widens the interval
    assert math.isnan(difference([0.5], [0.4]).low)


@pytest.mark.parametrize("interval,direction,expected", [
    ((0.01, 0.05), "+", "agrees"), ((0.01, 0.05), "-", "disagrees"), ((-0.05, -0.01), "-", "agrees"),
    ((-0.05, -0.01), "higher", "disagrees"), ((-0.01, 0.05), "+", "inconclusive"), ((0.0, 0.05), "+", "inconclusive"),
    ((float("nan"), 0.1), "+", "inconclusive"), ((0.02, 0.03), 1, "agrees"), ((0.02, 0.03), -1, "disagrees")])
def test_verdict_rule(interval, direction, expected):
    assert verdict(interval, direction) == expected


def test_verdict_refuses_an_unknown_direction():
    with pytest.raises(ValueError, match="direction"):
        verdict((0.1, 0.2), "up")
    assert direction_word((0.1, 0.2)) == "higher" and direction_word((-0.2, 0.1)) == "inconclusive"


def test_holm_by_hand():
    # p = .01, .04, .03, .005 (m = 4): sorted .005 .01 .03 .04 against alpha/4, /3, /2, /1 = .0125 .0167 .025 .05:
    # ranks 1-2 rejected, rank 3 (.03 >= .025) stops; rank 4 (.04 < .05 alone) is not rejected either.
    rows = holm([0.01, 0.04, 0.03, 0.005])
    assert [r.p_adjusted for r in rows] == pytest.approx([0.03, 0.06, 0.06, 0.02])  # max_j<=i (m-j+1) p_(j)
    assert [r.rejected for r in rows] == [True, False, False, True]
    assert [r.alpha for r in rows] == pytest.approx([0.05 / 3, 0.025, 0.025, 0.0125])  # rank 4 keeps rank 3's
    # a missing p counts in m and is never rejected; adjusted p is capped at 1
    rows = holm([0.001, None, float("nan"), 0.6])
    assert [r.p_adjusted for r in rows] == pytest.approx([0.004, 1.0, 1.0, 1.0])
    assert [r.rejected for r in rows] == [True, False, False, False]


def test_holm_adjusted_t_intervals_give_holms_decisions():
    """The rule applied to each row's t interval at level 1 - alpha_row rejects exactly what Holm rejects."""
    rng = np.random.default_rng(3)
    arms = [(rng.normal(shift, 1.0, 5), rng.normal(0.0, 1.0, 5)) for shift in (0.0, 0.5, 1.5, 2.0, 2.5, 3.0, 4.0)]
    first = [difference(a, b) for a, b in arms]
    rows = holm([d.p_welch for d in first])
    assert 0 < sum(r.rejected for r in rows) < len(rows)
    for (a, b), d, r in zip(arms, first, rows):
        adj = difference(a, b, level=1 - r.alpha)
        assert (verdict((adj.low, adj.high), "+") != "inconclusive") == r.rejected == (r.p_adjusted < 0.05)
        assert adj.low <= d.low and adj.high >= d.high  # never narrower than the 95% interval


@pytest.mark.parametrize("table", [(2, 5, 0, 5), (3, 3, 0, 3), (1, 4, 3, 4), (0, 6, 0, 6), (7, 10, 2, 9)])
def test_fisher_exact_matches_scipy(table):
    ya, na, yb, nb = table
    expected = scipy_stats.fisher_exact([[ya, na - ya], [yb, nb - yb]])[1]
    assert fisher_exact(ya, na, yb, nb) == pytest.approx(expected, rel=1e-9)


def test_fisher_exact_by_hand():
    # 2 of 5 vs 0 of 5: tables with k of the 2 yeses in arm a, P(k) = C(5,k) C(5,2-k) / C(10,2) = 10/45, 25/45,
    # 10/45 for k = 0, 1, 2; those no more probable than k = 2: k = 0 and 2 -> 20/45
    assert fisher_exact(2, 5, 0, 5) == pytest.approx(20 / 45)
    assert fisher_exact(3, 3, 0, 3) == pytest.approx(2 / 20)  # the two extreme splits of C(6, 3) = 20
    with pytest.raises(ValueError, match="counts"):
        fisher_exact(4, 3, 0, 3)
