"""Accuracy and calibration metrics on CLIP logits (``scoring.md`` §2.1-2.4 and §2.6).

Every function takes logits ``N x K`` (any real dtype, converted to float64) and integer labels ``N``,
and returns plain Python floats or frozen dataclasses, so results are JSON-friendly and two calls on the
same arrays give bit-identical numbers. Probabilities are always ``softmax(logits)`` evaluated in the
shifted (max-subtracted) form, so large logit scales (CLIP's s = 100) never overflow.

Conventions shared with the scorers (``scoring.md`` §0):

* argmax ties resolve to the lowest class index (``numpy.argmax`` behaviour);
* "confidence" is the maximum softmax probability, the same quantity as the MSP scorer;
* calibration uses M equal-width bins on [0, 1], bin m (1-based) = ``((m-1)/M, m/M]``, the first bin
  also holding 0 (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017).

Malformed inputs (wrong shapes, labels out of range, NaN/inf logits) raise :class:`ValueError`; the
caller knows which model and dataset produced them and turns that into a user-facing error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_BINS = 15

PERCENT_METRICS = frozenset({
    "accuracy", "accuracy_balanced", "subspace_accuracy", "ece", "mce", "ece_ts", "auroc", "fpr95", "fpr95_openood",
    "aupr_in", "aupr_out", "ap_in", "ap_out", "rsg", "delta_rsg", "v_add", "subspace_similarity",
    "dropout_accuracy", "dropout_delta",
})
"""Result metrics that are fractions and are shown in percent (differences in percentage points) by tables,
reports and plots; the JSON always stores fractions."""

SINGLE_VALUE_METRICS = (
    "delta_rsg", "v_add", "sqnr_db", "spectral_distortion", "subspace_similarity", "k_sat", "csed",
    "max_energy_deviation", "rse", "dropout_accuracy", "dropout_delta",
)
"""Result metrics that compare the two models in one number: the record's ``value`` (``fp32`` and ``quantized``
are null), e.g. V_add or the SQNR of a rank band."""


# --------------------------------------------------------------------------------------------------
# Input checks and numerically stable softmax
# --------------------------------------------------------------------------------------------------


def _as_logits(logits: np.ndarray, name: str = "logits") -> np.ndarray:
    """``logits`` as a finite float64 ``N x K`` array with N >= 1 and K >= 1."""
    array = np.asarray(logits, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty N x K array, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contain NaN or inf")
    return array


def _as_labels(labels: np.ndarray, n: int, k: int) -> np.ndarray:
    """``labels`` as an int64 vector of length ``n`` with values in ``[0, k)``."""
    array = np.asarray(labels)
    if array.ndim != 1 or array.shape[0] != n:
        raise ValueError(f"labels must be a vector of length {n}, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        if array.dtype.kind == "b" or not np.all(np.equal(np.mod(array, 1), 0)):
            raise ValueError(f"labels must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if array.min() < 0 or array.max() >= k:
        raise ValueError(f"labels must lie in [0, {k}), got range [{array.min()}, {array.max()}]")
    return array


def _check_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable float64 log-softmax: ``z - max(z) - log(sum(exp(z - max(z))))``."""
    z = np.asarray(logits, dtype=np.float64)
    shifted = z - np.max(z, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable float64 softmax (max-subtracted), so K equal logits give exactly 1/K."""
    z = np.asarray(logits, dtype=np.float64)
    unnormalised = np.exp(z - np.max(z, axis=axis, keepdims=True))
    return unnormalised / np.sum(unnormalised, axis=axis, keepdims=True)


def predictions(logits: np.ndarray) -> np.ndarray:
    """Predicted class per row; ties go to the lowest index (``scoring.md`` §0)."""
    return np.argmax(_as_logits(logits), axis=1)


def confidences(logits: np.ndarray) -> np.ndarray:
    """Maximum softmax probability per row, the confidence of ``scoring.md`` §2.2 (= MSP score)."""
    return np.max(softmax(_as_logits(logits)), axis=1)


# --------------------------------------------------------------------------------------------------
# Accuracy and NLL
# --------------------------------------------------------------------------------------------------


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy as a fraction in [0, 1] (``scoring.md`` §2.1; tables show it in percent)."""
    z = _as_logits(logits)
    y = _as_labels(labels, *z.shape)
    return float(np.mean(np.argmax(z, axis=1) == y))


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean ``-log softmax(z)_y`` in nats, from a float64 stable log-softmax (``scoring.md`` §2.3)."""
    z = _as_logits(logits)
    y = _as_labels(labels, *z.shape)
    return float(-np.mean(log_softmax(z)[np.arange(z.shape[0]), y]))


def relative_change(fp: float, q: float) -> float | None:
    """``(fp - q) / fp``: > 0 when quantization lost; ``None`` when ``fp == 0`` (``scoring.md`` §2.6)."""
    if fp == 0:
        return None
    return float((fp - q) / fp)


# --------------------------------------------------------------------------------------------------
# Calibration (Guo et al., ICML 2017)
# --------------------------------------------------------------------------------------------------


def bin_edges(n_bins: int = DEFAULT_BINS) -> np.ndarray:
    """The ``n_bins + 1`` edges ``m / M`` of the equal-width calibration bins on [0, 1]."""
    m = _check_bins(n_bins)
    return np.arange(m + 1, dtype=np.float64) / m


def bin_index(conf: np.ndarray, n_bins: int = DEFAULT_BINS) -> np.ndarray:
    """0-based bin of each confidence: bin m = ``((m-1)/M, m/M]``, with 0 in the first bin.

    This is ``clip(ceil(r*M) - 1, 0, M-1)`` of ``scoring.md`` §2.2, evaluated against the float edges
    ``m/M`` (``searchsorted``) so that a confidence equal to an edge always lands in the lower bin even
    where ``r*M`` rounds above the integer (e.g. ``7/25 * 25 = 7.000000000000001``).
    """
    r = np.asarray(conf, dtype=np.float64)
    if np.any(~np.isfinite(r)) or np.any(r < 0) or np.any(r > 1):
        raise ValueError("confidences must lie in [0, 1]")
    edges = bin_edges(n_bins)
    return np.clip(np.searchsorted(edges, r, side="left") - 1, 0, len(edges) - 2)


def _correct_and_conf(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample correctness (0/1 float) and confidence (max softmax probability)."""
    z = _as_logits(logits)
    y = _as_labels(labels, *z.shape)
    p = softmax(z)
    return (np.argmax(z, axis=1) == y).astype(np.float64), np.max(p, axis=1)


def _bin_sums(
    conf: np.ndarray, correct: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin sample count, sum of confidences and sum of correctness."""
    m = _check_bins(n_bins)
    idx = bin_index(conf, m)
    counts = np.bincount(idx, minlength=m)
    conf_sum = np.bincount(idx, weights=conf, minlength=m)
    correct_sum = np.bincount(idx, weights=correct, minlength=m)
    return counts, conf_sum, correct_sum


def _bin_gaps(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin counts and |accuracy - mean confidence| (0 for empty bins)."""
    counts, conf_sum, correct_sum = _bin_sums(conf, correct, n_bins)
    safe = np.maximum(counts, 1)
    gaps = np.where(counts > 0, np.abs(correct_sum / safe - conf_sum / safe), 0.0)
    return counts, gaps


def ece_from_confidences(conf: np.ndarray, correct: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    """ECE from per-sample confidences and 0/1 correctness (Guo et al., ICML 2017; ``scoring.md`` §2.2).

    ``ECE = sum_m |B_m|/N * |acc(B_m) - conf(B_m)|``; empty bins contribute 0. Exposed separately so
    callers with probabilities rather than logits (and the tests) can hit exact bin edges.
    """
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if conf.ndim != 1 or conf.shape != correct.shape or conf.size == 0:
        raise ValueError("conf and correct must be non-empty vectors of the same length")
    counts, gaps = _bin_gaps(conf, correct, n_bins)
    return float(np.sum(counts / conf.size * gaps))


def expected_calibration_error(
    logits: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS
) -> float:
    """Expected calibration error with ``n_bins`` equal-width bins (Guo et al., ICML 2017).

    Confidence is the maximum softmax probability; see :func:`bin_index` for the bin convention.
    Returns a fraction in [0, 1] (tables show it in percent).
    """
    correct, conf = _correct_and_conf(logits, labels)
    return ece_from_confidences(conf, correct, n_bins)


def maximum_calibration_error(
    logits: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS
) -> float:
    """Maximum |accuracy - confidence| over the non-empty bins (MCE, Guo et al., ICML 2017)."""
    correct, conf = _correct_and_conf(logits, labels)
    counts, gaps = _bin_gaps(conf, correct, n_bins)
    return float(np.max(gaps[counts > 0]))


@dataclass(frozen=True)
class ReliabilityBin:
    """One bar of a reliability diagram: bin ``(lo, hi]`` and its statistics (NaN when empty)."""

    lo: float
    hi: float
    count: int
    mean_conf: float
    accuracy: float
    gap: float  # accuracy - mean_conf: > 0 under-confident, < 0 over-confident


def reliability_bins(
    logits: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS
) -> list[ReliabilityBin]:
    """Reliability-diagram data (``scoring.md`` §2.2): one :class:`ReliabilityBin` per bin, in order.

    The count-weighted mean of ``|gap|`` over non-empty bins is the ECE.
    """
    correct, conf = _correct_and_conf(logits, labels)
    return reliability_bins_from_confidences(conf, correct, n_bins)


def reliability_bins_from_confidences(
    conf: np.ndarray, correct: np.ndarray, n_bins: int = DEFAULT_BINS
) -> list[ReliabilityBin]:
    """:func:`reliability_bins` from per-sample confidences and 0/1 correctness (the per-sample evidence of a run)."""
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    counts, conf_sum, correct_sum = _bin_sums(conf, correct, n_bins)
    edges = bin_edges(n_bins)
    result = []
    for m, count in enumerate(counts):
        mean_conf = conf_sum[m] / count if count else math.nan
        acc = correct_sum[m] / count if count else math.nan
        result.append(
            ReliabilityBin(
                lo=float(edges[m]),
                hi=float(edges[m + 1]),
                count=int(count),
                mean_conf=float(mean_conf),
                accuracy=float(acc),
                gap=float(acc - mean_conf),
            )
        )
    return result


# --------------------------------------------------------------------------------------------------
# Bin trajectory: calibration drift of the same images under quantization (scoring.md §2.4)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrajectoryBin:
    """Where the images of one FP32-confidence bin go after quantization.

    ``transition[b]`` is the fraction of this bin's images whose quantized confidence falls in bin
    ``b``; the row sums to 1.
    """

    index: int
    lo: float
    hi: float
    n: int
    conf_fp: float
    acc_fp: float
    conf_q: float
    acc_q: float
    flip_rate: float
    transition: tuple[float, ...]

    @property
    def arrow_length(self) -> float:
        """Euclidean length of the arrow (conf_fp, acc_fp) -> (conf_q, acc_q) in the diagram."""
        return math.hypot(self.conf_q - self.conf_fp, self.acc_q - self.acc_fp)


@dataclass(frozen=True)
class BinTrajectory:
    """Per-bin drift for every non-empty FP32-confidence bin, plus the overall flip rate."""

    n_bins: int
    bins: tuple[TrajectoryBin, ...]
    flip_rate: float

    def transition_matrix(self) -> np.ndarray:
        """``n_bins x n_bins`` matrix; rows of empty FP32 bins are NaN, the others sum to 1."""
        matrix = np.full((self.n_bins, self.n_bins), np.nan)
        for row in self.bins:
            matrix[row.index] = row.transition
        return matrix


def bin_trajectory(
    logits_fp: np.ndarray,
    logits_q: np.ndarray,
    labels: np.ndarray,
    n_bins: int = DEFAULT_BINS,
) -> BinTrajectory:
    """Follow the same images from the FP32 to the quantized model, binned by FP32 confidence.

    For each non-empty bin ``S_b`` of FP32 confidence: mean FP32 and quantized confidence and
    accuracy on ``S_b``, the fraction of ``S_b`` whose predicted class changed, and the distribution
    of the quantized confidences over the same bins (a row of the transition matrix).
    """
    z_fp = _as_logits(logits_fp, "logits_fp")
    z_q = _as_logits(logits_q, "logits_q")
    if z_fp.shape != z_q.shape:
        raise ValueError(f"logits_fp {z_fp.shape} and logits_q {z_q.shape} must have the same shape")
    y = _as_labels(labels, *z_fp.shape)
    return bin_trajectory_from_outcomes(np.argmax(z_fp, axis=1), np.max(softmax(z_fp), axis=1),
                                        np.argmax(z_q, axis=1), np.max(softmax(z_q), axis=1), y, n_bins)


def bin_trajectory_from_outcomes(
    pred_fp: np.ndarray,
    conf_fp: np.ndarray,
    pred_q: np.ndarray,
    conf_q: np.ndarray,
    labels: np.ndarray,
    n_bins: int = DEFAULT_BINS,
) -> BinTrajectory:
    """:func:`bin_trajectory` from per-sample predictions and confidences (the per-sample evidence of a run)."""
    m = _check_bins(n_bins)
    y = np.asarray(labels)
    if not (len(pred_fp) == len(conf_fp) == len(pred_q) == len(conf_q) == len(y)):
        raise ValueError("predictions, confidences and labels must have the same length")
    bin_fp, bin_q = bin_index(conf_fp, m), bin_index(conf_q, m)
    edges = bin_edges(m)
    rows = []
    for b in range(m):
        members = bin_fp == b
        n = int(members.sum())
        if n == 0:
            continue
        transition = np.bincount(bin_q[members], minlength=m) / n
        rows.append(
            TrajectoryBin(
                index=b,
                lo=float(edges[b]),
                hi=float(edges[b + 1]),
                n=n,
                conf_fp=float(conf_fp[members].mean()),
                acc_fp=float((pred_fp[members] == y[members]).mean()),
                conf_q=float(conf_q[members].mean()),
                acc_q=float((pred_q[members] == y[members]).mean()),
                flip_rate=float((pred_fp[members] != pred_q[members]).mean()),
                transition=tuple(float(value) for value in transition),
            )
        )
    return BinTrajectory(n_bins=m, bins=tuple(rows), flip_rate=float(np.mean(pred_fp != pred_q)))
