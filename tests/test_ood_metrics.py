"""OOD detection metrics (``scoring.md`` §2.5) against sklearn, a hand-worked example and properties."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from qbench.errors import QbenchError
from qbench.analysis.ood_metrics import (
    OOD_METRICS,
    ap_in,
    ap_out,
    aupr_in,
    aupr_out,
    auroc,
    fpr95_openood,
    fpr_at_95_tpr,
    ood_metrics,
)

# Hand-worked example, 5 ID + 5 OOD scores (higher = ID), with ties across and within the classes.
HAND_ID = np.array([0.9, 0.8, 0.8, 0.7, 0.5])
HAND_OOD = np.array([0.8, 0.6, 0.5, 0.4, 0.1])


def tied_scores(rng: np.random.Generator, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores on a coarse grid (heavy ties), ID shifted up so the classes overlap but differ."""
    return rng.integers(0, 8, n_in) / 4.0 + 0.5, rng.integers(0, 8, n_out) / 4.0


def sklearn_fpr95_id_positive(u: np.ndarray, v: np.ndarray) -> float:
    labels = np.r_[np.ones(u.size), np.zeros(v.size)]
    fpr, tpr, _ = roc_curve(labels, np.r_[u, v], drop_intermediate=False)
    return float(fpr[np.argmax(tpr >= 0.95)])


@pytest.mark.parametrize("n_in,n_out", [(1, 1), (7, 3), (20, 20), (101, 57), (400, 1000)])
def test_auroc_and_fpr95_equal_sklearn_on_heavily_tied_data(n_in, n_out):
    rng = np.random.default_rng(n_in * 1000 + n_out)
    for _ in range(5):
        u, v = tied_scores(rng, n_in, n_out)
        labels = np.r_[np.ones(n_in), np.zeros(n_out)]
        assert abs(auroc(u, v) - roc_auc_score(labels, np.r_[u, v])) <= 1e-12
        assert fpr_at_95_tpr(u, v) == sklearn_fpr95_id_positive(u, v)


def test_fpr95_openood_is_the_ood_positive_rate_on_tied_data():
    # OOD positive, score -s: catch the 95 % lowest OOD scores, then count ID images at or below that
    # threshold, i.e. the closed form mirrored from the ID-positive definition.
    rng = np.random.default_rng(3)
    for n_in, n_out in [(10, 10), (33, 77), (500, 200)]:
        u, v = tied_scores(rng, n_in, n_out)
        k = (95 * n_out + 99) // 100
        threshold = np.sort(v)[k - 1]
        assert fpr95_openood(u, v) == pytest.approx(np.mean(u <= threshold), abs=1e-15)
        # mirror symmetry: OOD-positive on (u, v) is ID-positive on (-v, -u)
        assert fpr95_openood(u, v) == fpr_at_95_tpr(-v, -u)


def test_hand_worked_example():
    # FPR@95, ID positive: k = (95*5 + 99)//100 = 574//100 = 5, so λ = 5th largest ID score = 0.5;
    #   OOD scores >= 0.5 are {0.8, 0.6, 0.5} -> 3/5 = 0.6 (the OOD 0.5 tied at λ is accepted).
    # fpr95_openood, OOD positive on -s: catching 95 % of 5 OOD images means all 5, i.e. flagging every
    #   score <= 0.8 (the largest OOD score); ID scores <= 0.8 are {0.8, 0.8, 0.7, 0.5} -> 4/5 = 0.8.
    # AUROC, pairs (u, v) counted 1 if u > v and 1/2 if tied, out of 25:
    #   0.9 -> 5; 0.8 -> 4 + 1/2; 0.8 -> 4 + 1/2; 0.7 -> 4; 0.5 -> 2 + 1/2; total 20.5 -> 0.82.
    # AP-In, thresholds in decreasing order (tp, fp) -> (precision, recall):
    #   0.9 (1,0) -> (1, .2); 0.8 (3,1) -> (.75, .6); 0.7 (4,1) -> (.8, .8); 0.6 (4,2) -> (2/3, .8);
    #   0.5 (5,3) -> (5/8, 1). AP = .2·1 + .4·.75 + .2·.8 + 0·(2/3) + .2·(5/8) = 0.785.
    # AUPR-In, trapezoids over the same points plus (recall 0, precision 1):
    #   .2·1 + .4·(1+.75)/2 + .2·(.75+.8)/2 + 0 + .2·(2/3+5/8)/2 = .2 + .35 + .155 + 31/240.
    assert fpr_at_95_tpr(HAND_ID, HAND_OOD) == pytest.approx(0.6, abs=1e-15)
    assert fpr95_openood(HAND_ID, HAND_OOD) == pytest.approx(0.8, abs=1e-15)
    assert auroc(HAND_ID, HAND_OOD) == pytest.approx(0.82, abs=1e-15)
    assert ap_in(HAND_ID, HAND_OOD) == pytest.approx(0.785, abs=1e-12)
    assert aupr_in(HAND_ID, HAND_OOD) == pytest.approx(0.2 + 0.35 + 0.155 + 31 / 240, abs=1e-12)


def test_hand_worked_ood_positive_precision_recall():
    # AP-Out, OOD positive on -s: flag every score <= t, thresholds t increasing, (tp, fp) -> (P, R):
    #   0.1 (1,0) -> (1, .2); 0.4 (2,0) -> (1, .4); 0.5 (3,1) -> (.75, .6); 0.6 (4,1) -> (.8, .8);
    #   0.7 (4,2) -> (2/3, .8); 0.8 (5,4) -> (5/9, 1).
    #   AP = .2 + .2 + .2·.75 + .2·.8 + 0·(2/3) + .2·(5/9) = .71 + 1/9.
    # AUPR-Out, trapezoids plus (recall 0, precision 1):
    #   .4·1 + .2·(1+.75)/2 + .2·(.75+.8)/2 + 0 + .2·(2/3+5/9)/2 = .4 + .175 + .155 + 11/90.
    assert ap_out(HAND_ID, HAND_OOD) == pytest.approx(0.71 + 1 / 9, abs=1e-12)
    assert aupr_out(HAND_ID, HAND_OOD) == pytest.approx(0.73 + 11 / 90, abs=1e-12)


def test_fpr95_threshold_uses_ceiling_of_95_percent():
    # n_in = 21: k = (1995 + 99)//100 = 20, so λ is the 20th largest ID score (= 1, not 0 or 2).
    u = np.arange(21, dtype=float)  # 20th largest = 1.0
    v = np.array([0.5, 1.0, 1.5])
    assert fpr_at_95_tpr(u, v) == pytest.approx(2 / 3)
    assert fpr_at_95_tpr(u, v) == sklearn_fpr95_id_positive(u, v)


def test_fpr95_openood_does_not_skip_a_collinear_crossing_point():
    # 20 OOD + 20 ID. 17 OOD alone at the lowest scores, then three scores each holding one OOD and one
    # ID image, then 17 ID alone. On -score the ROC runs (0, .85) -> (.05, .9) -> (.1, .95) -> (.15, 1):
    # collinear, so drop_intermediate=True would drop (.1, .95) and report .15. The first point with
    # TPR >= 0.95 catches 19 OOD images at threshold s <= 1.1, flagging the 2 ID images there: 2/20 = .1.
    pairs = np.array([1.0, 1.1, 1.2])
    v = np.r_[np.linspace(0.0, 0.16, 17), pairs]
    u = np.r_[pairs, np.linspace(2.0, 3.0, 17)]
    assert fpr95_openood(u, v) == pytest.approx(0.1, abs=1e-15)
    # mirrored: the ID-positive FPR on (-v, -u) has the same collinear run
    assert fpr_at_95_tpr(-v, -u) == pytest.approx(0.1, abs=1e-15)


def test_perfect_separation():
    u, v = np.linspace(1.0, 2.0, 30), np.linspace(-1.0, 0.5, 17)
    result = ood_metrics(u, v)
    assert result["auroc"] == 1.0
    assert result["fpr95"] == 0.0
    assert result["fpr95_openood"] == 0.0
    for name in ("aupr_in", "aupr_out", "ap_in", "ap_out"):
        assert result[name] == pytest.approx(1.0, abs=1e-15), name


def test_identical_multisets_give_auroc_one_half():
    rng = np.random.default_rng(7)
    u = rng.normal(size=50).round(1)
    v = rng.permutation(u)
    assert auroc(u, v) == pytest.approx(0.5, abs=1e-15)


def test_all_tied_scores():
    u, v = np.full(13, 0.3), np.full(8, 0.3)
    assert auroc(u, v) == 0.5
    assert fpr_at_95_tpr(u, v) == 1.0
    assert fpr95_openood(u, v) == 1.0


def test_negating_scores_mirrors_auroc():
    rng = np.random.default_rng(11)
    u, v = tied_scores(rng, 64, 40)
    assert auroc(-u, -v) == pytest.approx(1.0 - auroc(u, v), abs=1e-12)
    assert auroc(u, v) != pytest.approx(0.5)  # the property is not vacuous


def test_ood_metrics_returns_every_named_metric_as_float():
    rng = np.random.default_rng(5)
    u, v = tied_scores(rng, 30, 30)
    result = ood_metrics(u, v)
    assert tuple(result) == OOD_METRICS
    assert all(type(value) is float for value in result.values())
    assert result["auroc"] == auroc(u, v) and result["fpr95_openood"] == fpr95_openood(u, v)
    hand = ood_metrics(HAND_ID, HAND_OOD)
    assert (hand["fpr95"], hand["fpr95_openood"]) == (pytest.approx(0.6), pytest.approx(0.8))  # conventions differ


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    "function", [auroc, fpr_at_95_tpr, fpr95_openood, aupr_in, aupr_out, ap_in, ap_out, ood_metrics]
)
def test_non_finite_scores_are_a_one_line_error(function, bad):
    good = np.array([0.1, 0.2, 0.3])
    with pytest.raises(QbenchError) as caught:
        function(good, np.array([0.0, bad]), label="msp on toy-ood")
    message = str(caught.value)
    assert "OOD" in message and "msp on toy-ood" in message and "\n" not in message
    with pytest.raises(QbenchError, match="ID scores"):
        function(np.array([bad]), good)


def test_empty_inputs_are_an_error():
    with pytest.raises(QbenchError, match="empty"):
        ood_metrics(np.array([]), np.array([0.5]))
    with pytest.raises(QbenchError, match="OOD scores are empty"):
        auroc(np.array([0.5]), np.array([]))
