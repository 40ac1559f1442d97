"""The NumPy OOD metrics (one sort per pair, issue 16) are bit-identical to the scipy/sklearn definitions they replace.

``qbench.analysis.ood_metrics`` used to call ``scipy.stats.rankdata`` and ``sklearn.metrics`` per metric; every value
must stay exactly what those calls give (``==``, not approx), on untied, heavily tied and lopsided scores.
"""

import numpy as np
import pytest
from scipy.stats import rankdata
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

from qbench.analysis import ood_metrics as M


def reference(u: np.ndarray, v: np.ndarray) -> dict[str, float]:
    """The pre-issue-16 implementation of every metric, through scipy and sklearn."""
    scores = np.concatenate([u, v])
    is_id = np.concatenate([np.ones(u.size, dtype=np.int64), np.zeros(v.size, dtype=np.int64)])
    ranks = rankdata(scores, method="average")
    n_in, n_out = u.size, v.size
    k = (95 * n_in + 99) // 100
    fpr, tpr, _ = roc_curve(1 - is_id, -scores, drop_intermediate=False)
    p_in, r_in, _ = precision_recall_curve(is_id, scores)
    p_out, r_out, _ = precision_recall_curve(1 - is_id, -scores)
    return {
        "auroc": (float(np.sum(ranks[:n_in])) - n_in * (n_in + 1) / 2.0) / (n_in * n_out),
        "fpr95": float(np.mean(v >= np.sort(u)[::-1][k - 1])),
        "aupr_in": float(auc(r_in, p_in)),
        "aupr_out": float(auc(r_out, p_out)),
        "fpr95_openood": float(fpr[np.argmax(tpr >= 0.95)]),
        "ap_in": float(average_precision_score(is_id, scores)),
        "ap_out": float(average_precision_score(1 - is_id, -scores)),
    }


def score_sets():
    """Untied normal scores, coarse grids (heavy ties within and across classes), one-element and lopsided splits,
    all-equal scores and signed zeros."""
    rng = np.random.default_rng(16)
    for n_in, n_out in [(1, 1), (1, 9), (9, 1), (37, 53), (1000, 1000), (2000, 300)]:
        yield rng.normal(0.3, 1.0, n_in), rng.normal(0.0, 1.0, n_out)
        yield rng.integers(0, 6, n_in) / 5.0 + 0.2, rng.integers(0, 6, n_out) / 5.0
        yield np.round(rng.normal(0.1, 1.0, n_in), 1), np.round(rng.normal(0.0, 1.0, n_out), 1)
    yield np.full(5, 0.25), np.full(7, 0.25)
    yield np.array([0.0, -0.0, 1.0]), np.array([-0.0, 0.0, -1.0])
    yield rng.normal(size=400) * 1e-300, rng.normal(size=300) * 1e-300


@pytest.mark.parametrize("index", range(21))
def test_every_metric_equals_the_scipy_sklearn_reference_exactly(index):
    u, v = list(score_sets())[index]
    expected = reference(u, v)
    together = M.ood_metrics(u, v)
    assert list(together) == list(M.OOD_METRICS)
    for name in M.OOD_METRICS:
        assert together[name] == expected[name], name  # bit-identical, not approximately equal
        assert M._FUNCTIONS[name](u, v) == expected[name], name
        assert type(together[name]) is float


def test_the_zero_shot_and_ood_metric_modules_do_not_import_scipy_or_sklearn():
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from qbench.analysis.ood_metrics import ood_metrics\n"
            "from qbench.analysis.statistics import paired_accuracy_bootstrap\n"
            "ood_metrics(np.arange(5.0), np.arange(3.0))\n"
            "paired_accuracy_bootstrap(np.array([1, 0, 1]), np.array([1, 1, 0]))\n"
            "print(sorted(name for name in ('scipy', 'sklearn', 'pandas') if name in sys.modules))\n")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"
