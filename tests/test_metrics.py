"""Tests for qbench.analysis.metrics against independent references (sklearn, scipy, hand loops, hand cases)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
from sklearn.metrics import accuracy_score, log_loss

from qbench.analysis import metrics as M


def two_class_logits(confidence: float, predicted: int) -> np.ndarray:
    """Logits over 2 classes whose softmax puts ``confidence`` (> 0.5) on class ``predicted``."""
    row = np.zeros(2)
    row[predicted] = math.log(confidence / (1.0 - confidence))
    return row


def reference_ece(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> tuple[float, float]:
    """ECE and MCE by an explicit loop over bins ((m-1)/M, m/M], 0 in the first bin (Guo et al. 2017)."""
    n = len(conf)
    ece, mce = 0.0, 0.0
    for m in range(1, n_bins + 1):
        lo, hi = (m - 1) / n_bins, m / n_bins
        members = [i for i in range(n) if (lo < conf[i] <= hi) or (m == 1 and conf[i] == 0.0)]
        if not members:
            continue
        acc = sum(correct[i] for i in members) / len(members)
        avg_conf = sum(conf[i] for i in members) / len(members)
        ece += len(members) / n * abs(acc - avg_conf)
        mce = max(mce, abs(acc - avg_conf))
    return ece, mce


def random_problem(seed: int, n: int = 400, k: int = 7, scale: float = 3.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * scale
    # Make the labels correlate with the logits so accuracy is neither 0 nor 1.
    labels = np.where(rng.random(n) < 0.6, np.argmax(logits, axis=1), rng.integers(0, k, n))
    return logits, labels


# ------------------------------------------------------------------ softmax helpers


def test_softmax_and_log_softmax_match_scipy():
    logits, _ = random_problem(0, scale=20.0)
    np.testing.assert_allclose(M.softmax(logits), scipy.special.softmax(logits, axis=1), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(M.log_softmax(logits), scipy.special.log_softmax(logits, axis=1), rtol=1e-12)


def test_softmax_is_stable_for_huge_logits():
    z = np.array([[1000.0, 0.0, -1000.0]])
    assert np.all(np.isfinite(M.softmax(z)))
    np.testing.assert_allclose(M.log_softmax(z), [[0.0, -1000.0, -2000.0]])
    assert M.negative_log_likelihood(z, np.array([1])) == pytest.approx(1000.0)


# ------------------------------------------------------------------ accuracy


def test_accuracy_matches_sklearn():
    for seed in range(3):
        logits, labels = random_problem(seed)
        expected = accuracy_score(labels, np.argmax(logits, axis=1))
        assert 0.0 < expected < 1.0
        assert M.accuracy(logits, labels) == pytest.approx(expected, abs=1e-15)


def test_accuracy_ties_go_to_lowest_index():
    logits = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    assert M.accuracy(logits, np.array([0, 1])) == 1.0
    assert M.accuracy(logits, np.array([1, 2])) == 0.0


def test_accuracy_is_a_fraction():
    logits = np.eye(4) * 5
    assert M.accuracy(logits, np.array([0, 1, 2, 0])) == 0.75


# ------------------------------------------------------------------ NLL


def test_nll_matches_sklearn_log_loss():
    for seed in range(3):
        logits, labels = random_problem(seed)
        probs = scipy.special.softmax(logits, axis=1)
        expected = log_loss(labels, probs, labels=np.arange(logits.shape[1]))
        assert M.negative_log_likelihood(logits, labels) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("k", [2, 10, 1000])
def test_nll_of_uniform_logits_is_log_k(k):
    logits = np.full((5, k), 3.7)
    assert M.negative_log_likelihood(logits, np.arange(5) % k) == pytest.approx(math.log(k), rel=1e-14)


# ------------------------------------------------------------------ ECE / MCE / reliability


def test_ece_hand_computed_four_samples():
    # Two classes; confidences 0.9 (correct), 0.9 (wrong), 0.7 (correct), 0.7 (correct).
    # 15 bins: 0.9 -> bin (13/15, 14/15] = (0.867, 0.933]; 0.7 -> (10/15, 11/15] = (0.667, 0.733].
    # Bin 0.9: acc 1/2, conf 0.9 -> gap 0.4, weight 2/4 -> 0.20
    # Bin 0.7: acc 2/2, conf 0.7 -> gap 0.3, weight 2/4 -> 0.15
    # ECE = 0.35, MCE = 0.4.
    logits = np.stack([two_class_logits(0.9, 1), two_class_logits(0.9, 1),
                       two_class_logits(0.7, 0), two_class_logits(0.7, 1)])
    labels = np.array([1, 0, 0, 1])
    assert M.expected_calibration_error(logits, labels) == pytest.approx(0.35, abs=1e-12)
    assert M.maximum_calibration_error(logits, labels) == pytest.approx(0.4, abs=1e-12)
    # NLL = -(log .9 + log .1 + log .7 + log .7) / 4
    expected_nll = -(math.log(0.9) + math.log(0.1) + 2 * math.log(0.7)) / 4
    assert M.negative_log_likelihood(logits, labels) == pytest.approx(expected_nll, rel=1e-12)

    bins = M.reliability_bins(logits, labels)
    assert len(bins) == 15
    assert [b.count for b in bins] == [0] * 10 + [2, 0, 0, 2, 0]
    assert bins[13].accuracy == 0.5 and bins[13].mean_conf == pytest.approx(0.9)
    assert bins[13].gap == pytest.approx(-0.4)
    assert bins[10].accuracy == 1.0 and bins[10].gap == pytest.approx(0.3)
    assert math.isnan(bins[0].mean_conf) and math.isnan(bins[0].accuracy) and math.isnan(bins[0].gap)
    assert bins[10].lo == pytest.approx(10 / 15) and bins[10].hi == pytest.approx(11 / 15)


def test_ece_hand_computed_shared_bin_and_single_bin():
    # 0.95 (correct) and 0.99 (wrong) share bin (14/15, 1]: acc 0.5, conf 0.97 -> ECE = 0.47.
    conf = np.array([0.95, 0.99])
    correct = np.array([1.0, 0.0])
    assert M.ece_from_confidences(conf, correct) == pytest.approx(0.47, abs=1e-12)
    # One bin only: ECE = |mean(correct) - mean(conf)| = |0.5 - 0.97|.
    assert M.ece_from_confidences(conf, correct, n_bins=1) == pytest.approx(0.47, abs=1e-12)
    # With 100 bins they separate: 1/2 * 0.05 + 1/2 * 0.99 = 0.52.
    assert M.ece_from_confidences(conf, correct, n_bins=100) == pytest.approx(0.52, abs=1e-12)


@pytest.mark.parametrize("n_bins", [1, 10, 15, 25])
def test_ece_and_mce_match_reference_loop(n_bins):
    for seed in range(4):
        logits, labels = random_problem(seed, scale=1.0 + seed)
        probs = scipy.special.softmax(logits, axis=1)
        conf = probs.max(axis=1)
        correct = (probs.argmax(axis=1) == labels).astype(float)
        ece, mce = reference_ece(conf, correct, n_bins)
        assert ece > 0
        assert M.expected_calibration_error(logits, labels, n_bins) == pytest.approx(ece, abs=1e-12)
        assert M.maximum_calibration_error(logits, labels, n_bins) == pytest.approx(mce, abs=1e-12)
        bins = M.reliability_bins(logits, labels, n_bins)
        weighted = sum(b.count / len(labels) * abs(b.gap) for b in bins if b.count)
        assert weighted == pytest.approx(ece, abs=1e-12)
        assert sum(b.count for b in bins) == len(labels)


def test_perfectly_calibrated_set_has_zero_ece():
    # Bin 0.5: 20 samples, 10 correct; bin 0.75: 8 samples, 6 correct; bin 0.9: 10 samples, 9 correct.
    rows, labels = [], []
    for confidence, n, n_correct in [(0.5, 20, 10), (0.75, 8, 6), (0.9, 10, 9)]:
        for i in range(n):
            rows.append(two_class_logits(confidence, 0) if confidence > 0.5 else np.zeros(2))
            labels.append(0 if i < n_correct else 1)
    logits, labels = np.array(rows), np.array(labels)
    assert M.expected_calibration_error(logits, labels) == pytest.approx(0.0, abs=1e-12)
    # The same confidences with one more error are no longer calibrated (the test can fail).
    labels[20] = 1
    assert M.expected_calibration_error(logits, labels) == pytest.approx(1 / 38, abs=1e-12)


def test_all_correct_with_confidence_one_has_zero_ece():
    logits = np.eye(6) * 1000.0
    labels = np.arange(6)
    assert M.confidences(logits).min() == 1.0
    assert M.expected_calibration_error(logits, labels) == 0.0
    assert M.maximum_calibration_error(logits, labels) == 0.0
    # All wrong with confidence one is the worst case: ECE = 1.
    assert M.expected_calibration_error(logits, (labels + 1) % 6) == 1.0


def test_ece_lies_in_unit_interval():
    for seed in range(10):
        logits, labels = random_problem(seed, n=50, k=3, scale=10.0 ** (seed % 4 - 1))
        ece = M.expected_calibration_error(logits, labels)
        assert 0.0 <= ece <= 1.0
        assert 0.0 <= M.maximum_calibration_error(logits, labels) <= 1.0
        assert ece <= M.maximum_calibration_error(logits, labels) + 1e-15


def test_shifting_logits_changes_nothing():
    logits, labels = random_problem(5)
    shift = np.random.default_rng(1).normal(size=(len(labels), 1)) * 50
    shifted = logits + shift
    assert M.accuracy(shifted, labels) == M.accuracy(logits, labels)
    assert M.negative_log_likelihood(shifted, labels) == pytest.approx(
        M.negative_log_likelihood(logits, labels), rel=1e-12)
    assert M.expected_calibration_error(shifted, labels) == pytest.approx(
        M.expected_calibration_error(logits, labels), abs=1e-12)
    assert [b.count for b in M.reliability_bins(shifted, labels)] == [
        b.count for b in M.reliability_bins(logits, labels)]


def test_confidence_on_a_bin_edge_lands_in_the_lower_bin():
    # Five equal logits give confidence exactly 1/5 = 3/15, the upper edge of bin 3 (index 2).
    logits = np.zeros((1, 5))
    assert M.confidences(logits)[0] == 3 / 15
    counts = [b.count for b in M.reliability_bins(logits, np.array([0]), n_bins=15)]
    assert counts[2] == 1 and counts[3] == 0
    # Edges and extremes through the index helper, including one where r*M rounds up (7/25*25 > 7).
    assert 7 / 25 * 25 > 7
    assert M.bin_index(np.array([7 / 25]), 25).tolist() == [6]
    assert M.bin_index(np.array([0.0, 1 / 15, 2 / 15, 1.0]), 15).tolist() == [0, 0, 1, 14]
    # Just above an edge goes to the upper bin.
    assert M.bin_index(np.array([np.nextafter(3 / 15, 1)]), 15).tolist() == [3]


def test_bin_index_equals_ceil_formula_off_the_edges():
    r = np.random.default_rng(0).random(10_000)
    expected = np.clip(np.ceil(r * 15) - 1, 0, 14).astype(int)
    np.testing.assert_array_equal(M.bin_index(r, 15), expected)


# ------------------------------------------------------------------ bin trajectory


def test_identical_models_give_a_still_trajectory():
    logits, labels = random_problem(2)
    traj = M.bin_trajectory(logits, logits.copy(), labels)
    assert traj.bins and traj.flip_rate == 0.0
    for row in traj.bins:
        assert row.arrow_length == 0.0
        assert row.flip_rate == 0.0
        assert row.conf_q == row.conf_fp and row.acc_q == row.acc_fp
        expected_row = np.zeros(15)
        expected_row[row.index] = 1.0
        np.testing.assert_array_equal(row.transition, expected_row)
    matrix = traj.transition_matrix()
    occupied = [row.index for row in traj.bins]
    np.testing.assert_array_equal(matrix[occupied][:, occupied], np.eye(len(occupied)))
    empty = [b for b in range(15) if b not in occupied]
    assert np.all(np.isnan(matrix[empty]))


def test_trajectory_of_a_perturbed_model_is_consistent():
    logits, labels = random_problem(3, n=600)
    noisy = logits * 0.6 + np.random.default_rng(9).normal(size=logits.shape)
    traj = M.bin_trajectory(logits, noisy, labels)
    n = len(labels)
    assert sum(row.n for row in traj.bins) == n
    for row in traj.bins:
        assert sum(row.transition) == pytest.approx(1.0, abs=1e-12)
    # Bin-weighted means recover the global accuracies (independent check of acc_fp / acc_q).
    assert sum(r.n * r.acc_fp for r in traj.bins) / n == pytest.approx(M.accuracy(logits, labels))
    assert sum(r.n * r.acc_q for r in traj.bins) / n == pytest.approx(M.accuracy(noisy, labels))
    assert traj.flip_rate == pytest.approx(np.mean(logits.argmax(1) != noisy.argmax(1)))
    assert traj.flip_rate > 0
    # FP32 bins agree with the reliability diagram; column mass agrees with the quantized one.
    fp_counts = [b.count for b in M.reliability_bins(logits, labels)]
    q_counts = [b.count for b in M.reliability_bins(noisy, labels)]
    assert [fp_counts[r.index] for r in traj.bins] == [r.n for r in traj.bins]
    column_mass = np.nansum(traj.transition_matrix() * np.array(fp_counts)[:, None], axis=0)
    np.testing.assert_allclose(column_mass, q_counts, atol=1e-9)
    assert any(row.arrow_length > 0 for row in traj.bins)


def test_trajectory_hand_case():
    # Two images, both FP32 confidence 0.9 (bin index 13), both correct. The quantized model keeps
    # image 0 (0.9, correct) and flips image 1 to the other class with confidence 0.6 (bin index 8).
    fp = np.stack([two_class_logits(0.9, 0), two_class_logits(0.9, 1)])
    q = np.stack([two_class_logits(0.9, 0), two_class_logits(0.6, 0)])
    labels = np.array([0, 1])
    traj = M.bin_trajectory(fp, q, labels)
    assert len(traj.bins) == 1
    row = traj.bins[0]
    assert (row.index, row.n, row.flip_rate) == (13, 2, 0.5)
    assert row.conf_fp == pytest.approx(0.9) and row.acc_fp == 1.0
    assert row.conf_q == pytest.approx(0.75) and row.acc_q == 0.5
    assert row.transition[13] == 0.5 and row.transition[8] == 0.5
    assert row.arrow_length == pytest.approx(math.hypot(0.15, 0.5))


def test_trajectory_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        M.bin_trajectory(np.zeros((3, 2)), np.zeros((4, 2)), np.zeros(3, dtype=int))


# ------------------------------------------------------------------ relative change and input checks


def test_relative_change():
    assert M.relative_change(0.8, 0.6) == pytest.approx(0.25)
    assert M.relative_change(0.5, 0.6) == pytest.approx(-0.2)
    assert M.relative_change(0.7, 0.7) == 0.0
    assert M.relative_change(0.0, 0.3) is None


@pytest.mark.parametrize(
    "logits, labels",
    [
        (np.zeros((3, 2)), np.array([0, 1, 2])),  # label out of range
        (np.zeros((3, 2)), np.array([0, 1])),  # wrong length
        (np.array([[0.0, np.nan]]), np.array([0])),  # NaN logit
        (np.zeros(3), np.array([0])),  # not 2-D
        (np.zeros((2, 2)), np.array([0.5, 1.0])),  # non-integer labels
    ],
)
def test_bad_inputs_raise(logits, labels):
    for fn in (M.accuracy, M.negative_log_likelihood, M.expected_calibration_error):
        with pytest.raises(ValueError):
            fn(logits, labels)


def test_results_are_python_floats_and_deterministic():
    logits, labels = random_problem(7)
    first = M.expected_calibration_error(logits, labels)
    assert type(first) is float and type(M.accuracy(logits, labels)) is float
    assert M.expected_calibration_error(logits.astype(np.float32), labels) == M.expected_calibration_error(
        logits.astype(np.float32), labels)
    assert first == M.expected_calibration_error(logits, labels)
