"""Uncertainty, confidence intervals and significance of quantized-vs-FP32 results (``scoring.md`` §2.7).

Two sources of randomness: the quantizer **seed** (calibration draw, QAT data order) and the finite
test set (**images**); FP32 models are deterministic. This module has small typed functions for both:

* multi-seed summaries: mean, sample std (ddof = 1), standard error ``std/√S`` and the Student-t 95 %
  interval ``mean ± t_{0.975,S−1}·std/√S`` (:func:`seed_summary`);
* across-seed significance of ``d_s = M_q,s − M_fp``: a two-sided one-sample t-test, plus the exact
  Wilcoxon signed-rank test when S >= 6 (with S <= 5 its smallest two-sided p is 2/2^S >= 0.0625, so it
  cannot reach 0.05) (:func:`compare_seeds`);
* image-level bootstrap for single runs and the paired per-seed FP32-vs-quantized comparison, with
  index matrices from ``Generator(PCG64(seed))`` shared by all models so comparisons are paired
  (:func:`bootstrap_indices`, :func:`bootstrap_summary`, :func:`paired_bootstrap`), and the same paired
  bootstrap for per-image 0/1 correctness computed in bounded-memory chunks (:func:`paired_accuracy_bootstrap`);
* Benjamini–Hochberg adjustment for many comparisons (:func:`benjamini_hochberg`).

The t distribution comes from SciPy (a dependency of scikit-learn, so always installed), imported inside the
functions that use it: a run's accuracy bootstrap is plain NumPy, and importing ``scipy.stats`` costs more than
scoring a whole zero-shot run (issue 16). SciPy's
``wilcoxon(method="exact")`` ignores tied absolute differences (it uses the no-ties null distribution
even when it ranks with midranks), and per-seed accuracy differences are multiples of 1/N that tie
often, so the exact signed-rank test is implemented here from its definition with the conditional null
distribution of the midranks. All results are plain floats in frozen dataclasses (JSON-friendly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from qbench.errors import QbenchError

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
WILCOXON_MIN_SEEDS = 6
FDR_Q = 0.05


def _values(values: Sequence[float] | np.ndarray, what: str, minimum: int = 1) -> np.ndarray:
    """``values`` as a finite float64 vector with at least ``minimum`` entries, else a one-line QbenchError."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise QbenchError(f"{what} must be a flat list of numbers, got shape {array.shape}")
    if array.size < minimum:
        raise QbenchError(f"{what} needs at least {minimum} values, got {array.size}")
    if not np.all(np.isfinite(array)):
        raise QbenchError(f"{what} contain NaN or inf")
    return array


def _check_confidence(confidence: float) -> float:
    if not 0.0 < float(confidence) < 1.0:
        raise QbenchError(f"confidence level must lie strictly between 0 and 1, got {confidence!r}")
    return float(confidence)


# --------------------------------------------------------------------------------------------------
# Multiple seeds
# --------------------------------------------------------------------------------------------------


def t_quantile(probability: float, df: int) -> float:
    """The ``probability`` quantile of Student's t with ``df`` degrees of freedom (e.g. t_{0.975,2} ≈ 4.3027)."""
    if df < 1:
        raise QbenchError(f"Student t needs at least 1 degree of freedom, got {df}")
    from scipy import stats as scipy_stats  # on use: the t quantile is needed only for multi-seed summaries

    return float(scipy_stats.t.ppf(probability, df))


@dataclass(frozen=True)
class SeedSummary:
    """``mean ± std`` over S seeds with the Student-t interval ``mean ± t_{(1+c)/2,S−1}·se``."""

    n: int
    mean: float
    std: float
    se: float
    ci_low: float
    ci_high: float
    confidence: float


def seed_summary(values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE) -> SeedSummary:
    """Mean, sample std (ddof = 1), standard error ``std/√S`` and t-interval over S >= 2 seeds (``scoring.md`` §2.7).

    One seed has no spread: use the image bootstrap (:func:`bootstrap_summary`) instead.
    """
    array = _values(values, "per-seed values", minimum=2)
    level = _check_confidence(confidence)
    n = int(array.size)
    mean = float(np.mean(array))
    std = float(np.std(array, ddof=1))
    se = std / math.sqrt(n)
    half = t_quantile(0.5 + level / 2.0, n - 1) * se
    return SeedSummary(n, mean, std, se, mean - half, mean + half, level)


# --------------------------------------------------------------------------------------------------
# Across-seed significance of quantized minus FP32
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TTest:
    """Two-sided one-sample t-test of mean zero: statistic, degrees of freedom, p-value."""

    t: float
    df: int
    p_value: float


ROUNDING_SPREAD = 1e-12
"""Differences whose spread is below this (relative to their size) are treated as equal by the t-test."""


def one_sample_t_test(differences: Sequence[float] | np.ndarray) -> TTest:
    """Two-sided one-sample t-test of ``mean(d) = 0`` (Student, 1908), ``t = mean/(std/√S)`` on S − 1 df.

    Degenerate spread (all differences equal, up to float rounding: a spread within 1e-12 of their size, as
    when the same metric difference is computed from differently ordered sums): ``d ≡ 0`` gives t = 0, p = 1
    (no evidence of a change); a non-zero constant gives t = ±inf, p = 0 (the limits of the statistic),
    instead of SciPy's NaN or a t driven by rounding noise.
    """
    d = _values(differences, "per-seed differences", minimum=2)
    n = int(d.size)
    mean = float(np.mean(d))
    if float(np.ptp(d)) <= ROUNDING_SPREAD * max(1.0, float(np.max(np.abs(d)))):
        if abs(mean) <= ROUNDING_SPREAD:
            return TTest(0.0, n - 1, 1.0)
        return TTest(math.copysign(math.inf, mean), n - 1, 0.0)
    from scipy import stats as scipy_stats  # on use (see the module docstring)

    result = scipy_stats.ttest_1samp(d, 0.0)
    return TTest(float(result.statistic), n - 1, float(result.pvalue))


@dataclass(frozen=True)
class SignedRankTest:
    """Exact Wilcoxon signed-rank test: ``w_plus`` (sum of positive midranks), nonzero count, two-sided p."""

    w_plus: float
    n_nonzero: int
    p_value: float


def wilcoxon_exact(differences: Sequence[float] | np.ndarray) -> SignedRankTest:
    """Two-sided exact Wilcoxon signed-rank test of symmetry about 0 (Wilcoxon, Biometrics Bulletin 1945).

    Definition (Hollander & Wolfe, *Nonparametric Statistical Methods*, §3.1): drop zero differences
    (Wilcoxon's convention), rank the absolute values with midranks for ties, ``W+`` = sum of ranks of the
    positive differences. Under H0 every sign pattern of the n nonzero differences is equally likely, so
    the exact null distribution of ``W+`` is that of a sum of a uniformly random subset of the (fixed)
    midranks, counted exactly over the 2^n subsets by dynamic programming on doubled ranks (midranks are
    multiples of 1/2). Two-sided ``p = min(1, 2·min(P(W+ <= w), P(W+ >= w)))``. Without ties this is the
    classical table distribution (equal to SciPy's exact method); with ties it is the exact conditional
    test. No nonzero difference: p = 1.
    """
    d = _values(differences, "per-seed differences")
    nonzero = d[d != 0.0]
    n = int(nonzero.size)
    if n == 0:
        return SignedRankTest(0.0, 0, 1.0)
    from scipy import stats as scipy_stats  # on use (see the module docstring)

    ranks = scipy_stats.rankdata(np.abs(nonzero))  # average ranks for ties
    doubled = np.rint(2.0 * ranks).astype(np.int64)
    observed = int(doubled[nonzero > 0].sum())
    counts = [0] * (int(doubled.sum()) + 1)  # Python ints: exact for any n
    counts[0] = 1
    for rank in doubled.tolist():
        for total in range(len(counts) - 1, rank - 1, -1):
            counts[total] += counts[total - rank]
    subsets = 2**n
    lower = sum(counts[: observed + 1])
    upper = sum(counts[observed:])
    p = min(1.0, 2.0 * min(lower, upper) / subsets)
    return SignedRankTest(observed / 2.0, n, float(p))


@dataclass(frozen=True)
class SeedComparison:
    """Quantized vs FP32 across seeds: per-seed differences ``d_s = M_q,s − M_fp``, their summary and tests.

    ``wilcoxon`` is ``None`` below :data:`WILCOXON_MIN_SEEDS` seeds, where it cannot reach p < 0.05.
    """

    differences: tuple[float, ...]
    summary: SeedSummary
    t_test: TTest
    wilcoxon: SignedRankTest | None


def compare_seeds(
    quantized: Sequence[float] | np.ndarray,
    fp32: float | Sequence[float] | np.ndarray,
    confidence: float = CONFIDENCE,
) -> SeedComparison:
    """The across-seed test of ``scoring.md`` §2.7 on ``d_s = M_q,s − M_fp`` (paired by seed).

    ``fp32`` is the deterministic FP32 value, or one value per seed (paired element-wise) when the
    FP32 reference was re-measured per seed (e.g. on a per-seed image subset).
    """
    q = _values(quantized, "quantized per-seed values", minimum=2)
    fp = np.asarray(fp32, dtype=np.float64)
    if fp.ndim == 0:
        fp = np.full_like(q, float(fp))
    fp = _values(fp, "FP32 values")
    if fp.shape != q.shape:
        raise QbenchError(f"FP32 values must be one number or one per seed ({q.size}), got {fp.size}")
    d = q - fp
    wilcoxon = wilcoxon_exact(d) if d.size >= WILCOXON_MIN_SEEDS else None
    return SeedComparison(tuple(float(x) for x in d), seed_summary(d, confidence), one_sample_t_test(d), wilcoxon)


def benjamini_hochberg(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (Benjamini & Hochberg, JRSS-B 1995), in the input order.

    ``p̃_(i) = min_{j >= i} min(1, m·p_(j)/j)`` over the ascending order; reject at FDR q where
    ``p̃ <= q`` (q = 0.05 within one metric × one table, ``scoring.md`` §2.7).
    """
    p = _values(p_values, "p-values")
    if np.any((p < 0) | (p > 1)):
        raise QbenchError("p-values must lie in [0, 1]")
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted_sorted = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    adjusted = np.empty(m, dtype=np.float64)
    adjusted[order] = adjusted_sorted
    return adjusted


# --------------------------------------------------------------------------------------------------
# Image-level bootstrap (one run; paired FP32 vs quantized per seed)
# --------------------------------------------------------------------------------------------------


def bootstrap_indices(n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """A ``resamples x n`` matrix of image indices drawn with replacement from ``Generator(PCG64(seed))``.

    Drawn once per (dataset, B, seed) and shared by every model and scorer, so comparisons are paired.
    """
    if n < 1 or resamples < 1:
        raise QbenchError(f"bootstrap needs at least one image and one resample, got n={n}, B={resamples}")
    generator = np.random.Generator(np.random.PCG64(seed))
    return generator.integers(0, n, size=(resamples, n))


def stratified_bootstrap_indices(
    sizes: Sequence[int], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> np.ndarray:
    """Stratified bootstrap (e.g. ID and OOD resampled separately): each stratum keeps its size.

    Strata are the consecutive blocks ``[0, sizes[0])``, ``[sizes[0], sizes[0]+sizes[1])``, ...; one
    generator draws them in order, so the matrix is reproducible from ``seed``.
    """
    if not sizes or any(size < 1 for size in sizes) or resamples < 1:
        raise QbenchError(f"stratified bootstrap needs positive stratum sizes and resamples, got {list(sizes)}, B={resamples}")
    generator = np.random.Generator(np.random.PCG64(seed))
    blocks, start = [], 0
    for size in sizes:
        blocks.append(start + generator.integers(0, size, size=(resamples, size)))
        start += size
    return np.concatenate(blocks, axis=1)


@dataclass(frozen=True)
class BootstrapSummary:
    """A statistic with its bootstrap standard error and percentile interval."""

    value: float
    se: float
    ci_low: float
    ci_high: float
    resamples: int


def _replicates(statistic: Callable[[np.ndarray], float], indices: np.ndarray) -> np.ndarray:
    matrix = np.asarray(indices)
    if matrix.ndim != 2 or matrix.shape[0] < 2:
        raise QbenchError(f"bootstrap index matrix must be B x n with B >= 2, got shape {matrix.shape}")
    return np.array([float(statistic(row)) for row in matrix], dtype=np.float64)


def _percentile_ci(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - _check_confidence(confidence)) / 2.0
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_summary(
    statistic: Callable[[np.ndarray], float], n: int, indices: np.ndarray, confidence: float = CONFIDENCE
) -> BootstrapSummary:
    """``statistic(all n indices)`` ± the std (ddof = 1) of its bootstrap replicates; percentile CI (2.5/97.5 %).

    ``statistic`` maps an index vector to a number (e.g. ``lambda i: correct[i].mean()``), so any
    metric, including AUROC on a stratified matrix, fits.
    """
    replicates = _replicates(statistic, indices)
    low, high = _percentile_ci(replicates, confidence)
    value = float(statistic(np.arange(n)))
    return BootstrapSummary(value, float(np.std(replicates, ddof=1)), low, high, int(replicates.size))


def bootstrap_p_value(replicates: Sequence[float] | np.ndarray) -> float:
    """Two-sided bootstrap p-value that a difference is 0 (``scoring.md`` §2.7):
    ``p = min(1, 2·min((1 + #{Δ*_b <= 0})/(B+1), (1 + #{Δ*_b >= 0})/(B+1)))``."""
    deltas = _values(replicates, "bootstrap differences")
    b = deltas.size
    below = (1 + int(np.count_nonzero(deltas <= 0))) / (b + 1)
    above = (1 + int(np.count_nonzero(deltas >= 0))) / (b + 1)
    return float(min(1.0, 2.0 * min(below, above)))


@dataclass(frozen=True)
class PairedBootstrap:
    """FP32 vs quantized on the same resampled images: observed ``Δ = M_q − M_fp``, its SE, CI and p."""

    difference: float
    se: float
    ci_low: float
    ci_high: float
    p_value: float
    resamples: int


def paired_bootstrap(
    statistic_fp: Callable[[np.ndarray], float],
    statistic_q: Callable[[np.ndarray], float],
    n: int,
    indices: np.ndarray,
    confidence: float = CONFIDENCE,
) -> PairedBootstrap:
    """Paired image bootstrap of ``Δ = M_q − M_fp`` for one seed: both models see the same index rows."""
    replicates = _replicates(lambda rows: statistic_q(rows) - statistic_fp(rows), indices)
    low, high = _percentile_ci(replicates, confidence)
    everything = np.arange(n)
    difference = float(statistic_q(everything) - statistic_fp(everything))
    return PairedBootstrap(
        difference, float(np.std(replicates, ddof=1)), low, high, bootstrap_p_value(replicates), int(replicates.size)
    )


ACCURACY_BOOTSTRAP_CHUNK_BYTES = 64 * 2**20
"""Default memory budget of one chunk of :func:`paired_accuracy_bootstrap` (index rows plus gathered values)."""


def _correctness(values: np.ndarray, what: str) -> np.ndarray:
    """A flat 0/1 correctness vector as int8 (one byte per image when gathered), else a one-line QbenchError."""
    array = np.asarray(values)
    if array.ndim != 1 or array.size < 1:
        raise QbenchError(f"{what} must be a non-empty flat vector of per-image 0/1 correctness, got shape {array.shape}")
    as_int = array.astype(np.int8)
    if not np.array_equal(as_int, array) or np.any((as_int != 0) & (as_int != 1)):
        raise QbenchError(f"{what} must hold only 0/1 (or False/True) per image")
    return as_int


def paired_accuracy_bootstrap(
    correct_fp: np.ndarray,
    correct_q: np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    chunk_bytes: int = ACCURACY_BOOTSTRAP_CHUNK_BYTES,
    confidence: float = CONFIDENCE,
) -> dict[str, float | int]:
    """Paired image bootstrap of a zero-shot accuracy difference ``Δ = A_q − A_fp`` (``scoring.md`` §2.7).

    ``correct_fp[i]`` / ``correct_q[i]`` say whether each model classified image ``i`` correctly. Both
    accuracies are evaluated on the same resampled index rows (paired), drawn from
    ``Generator(PCG64(seed))`` exactly as :func:`bootstrap_indices` draws its ``resamples x n`` matrix,
    so the result equals :func:`paired_bootstrap` (and the SEs equal :func:`bootstrap_summary`) with
    ``statistic = lambda rows: correct[rows].mean()`` on that matrix. The difference is that the matrix
    is never held whole: rows are drawn and reduced in chunks of at most ``chunk_bytes`` (8 bytes per
    index plus the one-byte gathered correctness), because 50,000 images x 1000 resamples would be a
    400 MB index matrix. Successive draws from one generator continue its stream, so the chunked rows
    are the rows of the whole matrix.

    Returns plain numbers: ``se_fp``, ``se_q`` (bootstrap SE of each accuracy, std with ddof = 1),
    ``diff`` (observed ``A_q − A_fp``), ``diff_se``, ``ci_low`` / ``ci_high`` (percentile CI of Δ),
    ``p_value`` (two-sided, :func:`bootstrap_p_value`) and ``resamples``.
    """
    fp = _correctness(correct_fp, "FP32 correctness")
    q = _correctness(correct_q, "quantized correctness")
    if fp.shape != q.shape:
        raise QbenchError(f"FP32 and quantized correctness must cover the same images, got {fp.size} and {q.size}")
    if resamples < 2:
        raise QbenchError(f"the paired bootstrap needs at least 2 resamples for a standard error, got {resamples}")
    if chunk_bytes < 1:
        raise QbenchError(f"chunk_bytes must be positive, got {chunk_bytes}")
    n = int(fp.size)
    rows_per_chunk = max(1, int(chunk_bytes) // (9 * n))
    generator = np.random.Generator(np.random.PCG64(seed))
    fp_hits = np.empty(resamples, dtype=np.int64)
    q_hits = np.empty(resamples, dtype=np.int64)
    for start in range(0, resamples, rows_per_chunk):
        stop = min(resamples, start + rows_per_chunk)
        rows = generator.integers(0, n, size=(stop - start, n))
        fp_hits[start:stop] = fp[rows].sum(axis=1, dtype=np.int64)
        q_hits[start:stop] = q[rows].sum(axis=1, dtype=np.int64)
        del rows
    fp_acc, q_acc = fp_hits / n, q_hits / n  # sums of 0/1 are exact, so these equal correct[rows].mean()
    replicates = q_acc - fp_acc
    low, high = _percentile_ci(replicates, confidence)
    return {
        "se_fp": float(np.std(fp_acc, ddof=1)),
        "se_q": float(np.std(q_acc, ddof=1)),
        "diff": float(q.mean(dtype=np.float64) - fp.mean(dtype=np.float64)),
        "diff_se": float(np.std(replicates, ddof=1)),
        "ci_low": low,
        "ci_high": high,
        "p_value": bootstrap_p_value(replicates),
        "resamples": int(resamples),
    }


# --------------------------------------------------------------------------------------------------
# Redundancy probe vs PTQ degradation across models (scoring.md §4)
# --------------------------------------------------------------------------------------------------

PERMUTATIONS = 10000
EXACT_PERMUTATION_MAX_MODELS = 8


@dataclass(frozen=True)
class RedundancyCorrelation:
    """Spearman ρ and Pearson r between δ_drop(p*) and δ_PTQ over models, with permutation p-values and a
    bootstrap 95 % CI of ρ over models; ``exact`` when every permutation was enumerated (n ≤ 8)."""

    n_models: int
    spearman: float
    pearson: float
    spearman_p: float
    pearson_p: float
    spearman_ci_low: float
    spearman_ci_high: float
    permutations: int
    exact: bool


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import rankdata

    return _pearson(rankdata(x), rankdata(y))


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy / denominator) if denominator > 0 else float("nan")


def _permutation_p(x: np.ndarray, y: np.ndarray, orders: np.ndarray, exact: bool) -> float:
    """Two-sided permutation p of Pearson's |r| between ``x`` and ``y`` with ``y`` shuffled by each row of ``orders``
    (pass ranks for Spearman). Exact: the share of all orders at least as extreme; Monte Carlo: the +1 rule."""
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if denominator == 0:
        return 1.0
    observed = abs(float(dx @ dy)) / denominator
    shuffled = np.abs(dy[orders] @ dx) / denominator
    extreme = int(np.count_nonzero(shuffled >= observed - 1e-12))
    return extreme / len(orders) if exact else (1 + extreme) / (1 + len(orders))


def redundancy_correlation(
    dropout_delta: Sequence[float] | np.ndarray,
    ptq_delta: Sequence[float] | np.ndarray,
    permutations: int = PERMUTATIONS,
    seed: int = BOOTSTRAP_SEED,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> RedundancyCorrelation:
    """Does fragility to weight dropout predict fragility to PTQ? (``scoring.md`` §4; the source study's Fig. 2.)

    ``dropout_delta[m]`` is δ_drop(p*) of model m, ``ptq_delta[m]`` its relative accuracy change under one PTQ
    configuration. Returns Spearman ρ and Pearson r, permutation p-values (all n! orders when n ≤ 8, else
    ``permutations`` seeded shuffles) and the percentile bootstrap 95 % CI of ρ over models (resamples whose
    ranks are constant are skipped). A positive ρ: "fragile to dropout ⇒ fragile to PTQ".
    """
    import itertools

    from scipy.stats import rankdata

    x = _values(dropout_delta, "dropout δ per model", minimum=3)
    y = _values(ptq_delta, "PTQ δ per model", minimum=3)
    if x.size != y.size:
        raise QbenchError(f"dropout δ and PTQ δ need one value per model each, got {x.size} and {y.size}")
    generator = np.random.Generator(np.random.PCG64(seed))
    exact = x.size <= EXACT_PERMUTATION_MAX_MODELS
    if exact:
        orders = np.array(list(itertools.permutations(range(x.size))))
    else:
        orders = np.array([generator.permutation(x.size) for _ in range(permutations)])
    boot = []
    for rows in generator.integers(0, x.size, size=(resamples, x.size)):
        value = _spearman(x[rows], y[rows])
        if not math.isnan(value):
            boot.append(value)
    low, high = (_percentile_ci(np.asarray(boot), CONFIDENCE) if len(boot) >= 2 else (float("nan"), float("nan")))
    return RedundancyCorrelation(
        n_models=int(x.size), spearman=_spearman(x, y), pearson=_pearson(x, y),
        spearman_p=_permutation_p(rankdata(x), rankdata(y), orders, exact), pearson_p=_permutation_p(x, y, orders, exact),
        spearman_ci_low=low, spearman_ci_high=high, permutations=int(len(orders)), exact=exact,
    )
