"""Tests for qbench.analysis.statistics (scoring.md §2.7) against hand computations, textbook examples and brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from qbench.analysis import statistics as S
from qbench.errors import QbenchError

# Cushny & Peebles (1905) as analysed by Student (1908), R's `sleep` data: extra hours of sleep
# under two drugs for the same ten patients.
SLEEP_GROUP1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_GROUP2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]

# Hollander & Wolfe (1973), p. 29 (R's `wilcox.test` example): depression scale before/after.
HW_X = [1.83, 0.50, 1.62, 2.48, 1.68, 1.88, 1.55, 3.06, 1.30]
HW_Y = [0.878, 0.647, 0.598, 2.05, 1.06, 1.29, 1.06, 3.14, 1.29]


# --------------------------------------------------------------------------------------------------
# Multi-seed summaries
# --------------------------------------------------------------------------------------------------


def test_seed_summary_by_hand():
    summary = S.seed_summary([0.70, 0.72, 0.74])
    assert summary.n == 3
    assert summary.mean == pytest.approx(0.72, abs=1e-15)
    assert summary.std == pytest.approx(0.02, abs=1e-15)  # sqrt((0.02² + 0 + 0.02²) / 2)
    assert summary.se == pytest.approx(0.02 / math.sqrt(3), abs=1e-15)
    # t(2) has the closed-form cdf F(t) = 1/2 + t / (2 sqrt(t² + 2)), so t_{0.975,2} = 0.95 sqrt(2 / (1 - 0.95²)) ≈ 4.303
    half = 0.95 * math.sqrt(2 / (1 - 0.95**2)) * 0.02 / math.sqrt(3)
    assert (summary.ci_low, summary.ci_high) == pytest.approx((0.72 - half, 0.72 + half), abs=1e-12)
    assert summary.confidence == 0.95


def test_t_quantiles_match_tables():
    assert S.t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-3)
    assert S.t_quantile(0.975, 2) == pytest.approx(4.303, abs=1e-3)
    assert S.t_quantile(0.975, 4) == pytest.approx(2.776, abs=1e-3)
    assert S.t_quantile(0.975, 9) == pytest.approx(2.262, abs=1e-3)


def test_seed_summary_textbook_interval():
    # R: t.test(extra ~ group, data = sleep, paired = TRUE) -> 95 % CI of group2 - group1 [0.7001142, 2.4598858]
    d = np.subtract(SLEEP_GROUP2, SLEEP_GROUP1)
    summary = S.seed_summary(d)
    assert summary.mean == pytest.approx(1.58, abs=1e-12)
    assert (summary.ci_low, summary.ci_high) == pytest.approx((0.7001142, 2.4598858), abs=1e-7)


def test_seed_summary_other_confidence_and_wider_interval():
    values = [1.0, 2.0, 4.0, 3.5]
    ninety = S.seed_summary(values, confidence=0.90)
    default = S.seed_summary(values)
    assert ninety.ci_high - ninety.ci_low < default.ci_high - default.ci_low
    half = scipy_stats.t.ppf(0.95, 3) * np.std(values, ddof=1) / 2.0
    assert ninety.ci_high == pytest.approx(np.mean(values) + half, abs=1e-12)


@pytest.mark.parametrize("values", [[0.7], [], [0.7, float("nan")], [[0.1, 0.2], [0.3, 0.4]]])
def test_seed_summary_rejects_too_few_or_bad_values(values):
    with pytest.raises(QbenchError) as caught:
        S.seed_summary(values)
    assert "\n" not in str(caught.value)


def test_bad_confidence_is_rejected():
    with pytest.raises(QbenchError):
        S.seed_summary([1.0, 2.0], confidence=1.0)


# --------------------------------------------------------------------------------------------------
# t-test of per-seed differences
# --------------------------------------------------------------------------------------------------


def test_t_test_textbook_sleep_data():
    # Student (1908); R gives t = 4.0621, df = 9, p-value = 0.002833 for group2 - group1
    comparison = S.compare_seeds(SLEEP_GROUP2, SLEEP_GROUP1)
    assert comparison.t_test.t == pytest.approx(4.0621277, abs=1e-6)
    assert comparison.t_test.df == 9
    assert comparison.t_test.p_value == pytest.approx(0.002833, abs=5e-7)
    assert comparison.differences == pytest.approx(tuple(np.subtract(SLEEP_GROUP2, SLEEP_GROUP1)))


def test_t_test_by_hand():
    d = [0.01, 0.03, -0.01]  # mean 0.01, std 0.02, t = 0.01 / (0.02/√3) = √3/2
    result = S.one_sample_t_test(d)
    assert result.t == pytest.approx(math.sqrt(3) / 2, abs=1e-12)
    assert result.df == 2
    # two-sided p from the t(2) cdf, which has the closed form F(t) = 1/2 + t / (2 sqrt(t² + 2))
    t = math.sqrt(3) / 2
    assert result.p_value == pytest.approx(2 * (1 - (0.5 + t / (2 * math.sqrt(t * t + 2)))), abs=1e-12)


def test_compare_seeds_uses_quantized_minus_fp32_and_a_scalar_fp32():
    comparison = S.compare_seeds([0.70, 0.71, 0.69], 0.75)
    assert comparison.differences == pytest.approx((-0.05, -0.04, -0.06), abs=1e-15)
    assert comparison.summary.mean == pytest.approx(-0.05, abs=1e-15)
    assert comparison.t_test.t < 0 and comparison.t_test.p_value < 0.05
    assert comparison.wilcoxon is None  # S = 3 < 6


def test_degenerate_t_tests():
    assert S.one_sample_t_test([0.0, 0.0, 0.0]) == S.TTest(0.0, 2, 1.0)
    positive = S.one_sample_t_test([0.02, 0.02])
    assert positive.t == math.inf and positive.p_value == 0.0
    negative = S.one_sample_t_test([-0.02, -0.02, -0.02])
    assert negative.t == -math.inf and negative.p_value == 0.0


def test_compare_seeds_rejects_mismatched_lengths():
    with pytest.raises(QbenchError) as caught:
        S.compare_seeds([0.1, 0.2, 0.3], [0.1, 0.2])
    assert "\n" not in str(caught.value)
    with pytest.raises(QbenchError):
        S.compare_seeds([0.1], 0.2)


# --------------------------------------------------------------------------------------------------
# Exact Wilcoxon signed-rank test
# --------------------------------------------------------------------------------------------------


def brute_force_wilcoxon(d: list[float]) -> float:
    """Two-sided exact p by enumerating all 2^n sign patterns of the midranks of the nonzero |d|."""
    nonzero = [x for x in d if x != 0]
    if not nonzero:
        return 1.0
    ranks = scipy_stats.rankdata(np.abs(nonzero))
    observed = sum(r for r, x in zip(ranks, nonzero) if x > 0)
    totals = [sum(r for r, sign in zip(ranks, signs) if sign) for signs in itertools.product([0, 1], repeat=len(ranks))]
    lower = sum(t <= observed + 1e-9 for t in totals)
    upper = sum(t >= observed - 1e-9 for t in totals)
    return min(1.0, 2 * min(lower, upper) / len(totals))


def test_wilcoxon_textbook_hollander_wolfe():
    # R: wilcox.test(x, y, paired = TRUE, alternative = "greater") -> V = 40, p-value = 0.01953 (= 10/512)
    result = S.wilcoxon_exact(np.subtract(HW_X, HW_Y))
    assert result.w_plus == 40.0
    assert result.n_nonzero == 9
    assert result.p_value == pytest.approx(2 * 10 / 512, abs=1e-15)


def test_wilcoxon_matches_scipy_without_ties():
    rng = np.random.default_rng(0)
    for n in range(1, 13):
        d = rng.normal(0.3, 1.0, size=n)
        expected = scipy_stats.wilcoxon(d, method="exact").pvalue
        assert S.wilcoxon_exact(d).p_value == pytest.approx(expected, abs=1e-12)


def test_wilcoxon_with_ties_and_zeros_is_the_exact_conditional_test():
    # hand: midranks of |1,1,-1,2,3,4| are 2,2,2,4,5,6; W- = 2; P(W- <= 2) = 4/64 -> p = 8/64
    assert S.wilcoxon_exact([1, 1, -1, 2, 3, 4]).p_value == pytest.approx(0.125, abs=1e-15)
    # Student's sleep differences: one zero (dropped), ties, all others positive -> p = 2 / 2^9
    result = S.wilcoxon_exact(np.subtract(SLEEP_GROUP2, SLEEP_GROUP1))
    assert result.n_nonzero == 9 and result.w_plus == 45.0
    assert result.p_value == pytest.approx(2 / 512, abs=1e-15)
    rng = np.random.default_rng(1)
    for _ in range(40):
        d = rng.integers(-3, 4, size=int(rng.integers(1, 11))).astype(float) / 100  # accuracy-like, heavy ties
        assert S.wilcoxon_exact(d).p_value == pytest.approx(brute_force_wilcoxon(list(d)), abs=1e-12)
    assert S.wilcoxon_exact([0.0, 0.0]).p_value == 1.0


def test_wilcoxon_is_added_from_six_seeds_and_cannot_reach_005_below():
    assert S.compare_seeds([0.1, 0.2, 0.3, 0.4, 0.5], 0.0).wilcoxon is None
    assert S.wilcoxon_exact([0.1, 0.2, 0.3, 0.4, 0.5]).p_value == pytest.approx(0.0625, abs=1e-15)
    six = S.compare_seeds([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 0.0)
    assert six.wilcoxon is not None and six.wilcoxon.p_value == pytest.approx(2 / 64, abs=1e-15)


# --------------------------------------------------------------------------------------------------
# Benjamini-Hochberg
# --------------------------------------------------------------------------------------------------


def test_benjamini_hochberg_hand_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> m p / rank = 0.02, 0.02, 0.04, 0.04 (already monotone)
    adjusted = S.benjamini_hochberg([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.02, 0.04, 0.04, 0.02], atol=1e-15)
    # monotonicity step: m p / rank = 0.06, 0.05 -> the first is lowered to 0.05
    np.testing.assert_allclose(S.benjamini_hochberg([0.03, 0.05]), [0.05, 0.05], atol=1e-15)
    np.testing.assert_allclose(S.benjamini_hochberg([0.9, 0.8]), [0.9, 0.9], atol=1e-15)


def test_benjamini_hochberg_matches_scipy():
    rng = np.random.default_rng(3)
    p = rng.uniform(0, 0.2, size=50) ** 2
    np.testing.assert_allclose(S.benjamini_hochberg(p), scipy_stats.false_discovery_control(p), atol=1e-12)
    with pytest.raises(QbenchError):
        S.benjamini_hochberg([0.5, 1.5])


# --------------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------------


def test_bootstrap_indices_are_reproducible_pcg64():
    a = S.bootstrap_indices(50, 20, seed=0)
    np.testing.assert_array_equal(a, S.bootstrap_indices(50, 20, seed=0))
    np.testing.assert_array_equal(a, np.random.Generator(np.random.PCG64(0)).integers(0, 50, size=(20, 50)))
    assert not np.array_equal(a, S.bootstrap_indices(50, 20, seed=1))
    assert a.shape == (20, 50) and a.min() >= 0 and a.max() < 50
    assert S.bootstrap_indices(5).shape == (1000, 5)


def test_stratified_bootstrap_keeps_strata():
    matrix = S.stratified_bootstrap_indices([30, 10], 200, seed=4)
    assert matrix.shape == (200, 40)
    assert matrix[:, :30].min() >= 0 and matrix[:, :30].max() < 30
    assert matrix[:, 30:].min() >= 30 and matrix[:, 30:].max() < 40
    np.testing.assert_array_equal(matrix, S.stratified_bootstrap_indices([30, 10], 200, seed=4))


def test_bootstrap_p_value_formula_by_hand():
    assert S.bootstrap_p_value([-1.0, 1.0, 2.0, 3.0]) == pytest.approx(2 * 2 / 5, abs=1e-15)
    assert S.bootstrap_p_value(np.ones(999)) == pytest.approx(2 / 1000, abs=1e-15)
    assert S.bootstrap_p_value(np.zeros(10)) == 1.0


def test_bootstrap_summary_of_an_accuracy():
    rng = np.random.default_rng(7)
    correct = rng.random(400) < 0.7
    indices = S.bootstrap_indices(correct.size, 1000, seed=0)
    summary = S.bootstrap_summary(lambda i: correct[i].mean(), correct.size, indices)
    p = correct.mean()
    assert summary.value == p
    assert summary.se == pytest.approx(math.sqrt(p * (1 - p) / correct.size), rel=0.1)
    replicates = correct[indices].mean(axis=1)
    assert (summary.ci_low, summary.ci_high) == pytest.approx(tuple(np.quantile(replicates, [0.025, 0.975])), abs=1e-15)
    assert summary.resamples == 1000


def test_paired_bootstrap_uses_the_same_rows_for_both_models():
    rng = np.random.default_rng(8)
    fp = rng.random(300) < 0.8
    same = S.paired_bootstrap(lambda i: fp[i].mean(), lambda i: fp[i].mean(), fp.size, S.bootstrap_indices(fp.size, 200))
    assert same.difference == 0.0 and same.se == 0.0 and same.p_value == 1.0  # unpaired draws would spread
    q = fp & (rng.random(300) < 0.85)  # quantized loses about 12 % of the correct images, never gains
    lost = S.paired_bootstrap(lambda i: fp[i].mean(), lambda i: q[i].mean(), fp.size, S.bootstrap_indices(fp.size, 500))
    assert lost.difference == pytest.approx(q.mean() - fp.mean(), abs=1e-15)
    assert lost.ci_high < 0 and lost.p_value == pytest.approx(2 / 501, abs=1e-15)


# -- redundancy probe vs PTQ degradation (scoring.md §4) ---------------------------------------------------------
def test_redundancy_correlation_matches_scipy():
    rng = np.random.default_rng(3)
    x = rng.random(7)
    y = 0.6 * x + 0.4 * rng.random(7)
    result = S.redundancy_correlation(x, y)
    assert result.spearman == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)
    assert result.pearson == pytest.approx(scipy_stats.pearsonr(x, y).statistic, abs=1e-12)
    assert result.exact and result.permutations == math.factorial(7) and result.n_models == 7
    assert result.spearman_ci_low <= result.spearman <= result.spearman_ci_high


def test_exact_permutation_p_by_hand():
    # four models in the same order on both axes: only the identity and the reversal reach |rho| = 1
    result = S.redundancy_correlation([0.1, 0.2, 0.3, 0.4], [0.01, 0.05, 0.2, 0.3])
    assert result.spearman == pytest.approx(1.0) and result.spearman_p == pytest.approx(2 / 24)
    # brute force for an arbitrary pair
    x, y = np.array([0.3, 0.1, 0.4, 0.2, 0.5]), np.array([0.2, 0.3, 0.1, 0.5, 0.4])
    observed = abs(scipy_stats.spearmanr(x, y).statistic)
    expected = np.mean([abs(scipy_stats.spearmanr(x, y[list(order)]).statistic) >= observed - 1e-12
                        for order in itertools.permutations(range(5))])
    assert S.redundancy_correlation(x, y).spearman_p == pytest.approx(expected)


def test_monte_carlo_permutation_for_many_models_is_seeded():
    rng = np.random.default_rng(5)
    x = rng.random(12)
    y = x + 0.1 * rng.random(12)
    first = S.redundancy_correlation(x, y, permutations=2000, seed=1)
    assert not first.exact and first.permutations == 2000
    assert first == S.redundancy_correlation(x, y, permutations=2000, seed=1)
    assert 0 < first.spearman_p < 0.01  # strongly related: almost no shuffle is as extreme (+1 rule keeps p > 0)


def test_redundancy_correlation_needs_three_paired_models():
    with pytest.raises(QbenchError, match="at least 3"):
        S.redundancy_correlation([0.1, 0.2], [0.1, 0.2])
    with pytest.raises(QbenchError, match="one value per model"):
        S.redundancy_correlation([0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 0.4])


def test_t_test_treats_rounding_noise_as_no_spread():
    tiny = S.one_sample_t_test([0.05, 0.05 + 1e-17, 0.05 - 1e-17])
    assert tiny.p_value == 0.0 and math.isinf(tiny.t)
    zero = S.one_sample_t_test([0.0, 1e-18, -1e-18])
    assert zero.p_value == 1.0 and zero.t == 0.0
    real = S.one_sample_t_test([0.05, 0.051, 0.049])
    assert real.p_value == pytest.approx(scipy_stats.ttest_1samp([0.05, 0.051, 0.049], 0).pvalue)
