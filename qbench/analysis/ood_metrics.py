"""OOD detection metrics on scorer outputs (``scoring.md`` §2.5).

Inputs are two score vectors: ``u`` on the in-distribution (ID) split and ``v`` on the OOD split,
**higher = more in-distribution** (scorers already flip "higher = OOD" quantities; metrics never flip
signs themselves). Every function returns a plain Python float.

Conventions:

* **AUROC** is the Mann–Whitney statistic ``P(u > v) + ½ P(u = v)`` from average ranks
  (``scipy.stats.rankdata``); it is the same whichever class is called positive and equals
  ``sklearn.metrics.roc_auc_score``.
* **FPR@95TPR** (``fpr95``) treats **ID as positive**: the fraction of OOD images accepted at the
  threshold that keeps 95 % of ID images. This is the original definition of ODIN (Liang et al.,
  "Enhancing the Reliability of Out-of-distribution Image Detection in Neural Networks", ICLR 2018),
  also used by the energy, MCM, NegLabel and EOE evaluation code.
* **fpr95_openood** treats **OOD as positive**, as OpenOOD v1.5 does (Zhang et al., "OpenOOD v1.5:
  Enhanced Benchmark for Out-of-Distribution Detection", 2023): the fraction of ID images flagged when
  95 % of OOD images are caught. The two FPRs differ; qbench stores both under distinct names.
* **AUPR-In / AUPR-Out** follow OpenOOD: trapezoidal ``sklearn.metrics.auc(recall, precision)`` over
  ``precision_recall_curve``, with ID (score ``u``) or OOD (score ``-v``) as the positive class.
  Step-wise average precision (what MCM, NegLabel and EOE report as "AUPR") is ``ap_in`` / ``ap_out``.

Empty inputs and NaN/inf scores raise :class:`~qbench.errors.QbenchError` with a one-line message;
callers pass ``label`` (scorer and split names) so the message says where the bad scores came from.

Implementation: every metric is a function of one sort of the pooled scores (:class:`Ranking`: the distinct
values, ascending, with how many ID and OOD scores hold each), computed in NumPy. The ranks, true/false-positive
counts and curves are the ones ``scipy.stats.rankdata`` and ``sklearn.metrics`` (``roc_curve``,
``precision_recall_curve``, ``auc``, ``average_precision_score``) build, evaluated with the same floating-point
operations, so every value is bit-identical to theirs (``tests/test_ood_metrics.py`` checks it on tied and untied
scores); importing scikit-learn alone costs more than scoring every OOD pair of a run (issue 16), and
:func:`ood_metrics` sorts each pair once instead of once per metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qbench.errors import QbenchError

OOD_METRICS: tuple[str, ...] = ("auroc", "fpr95", "aupr_in", "aupr_out", "fpr95_openood", "ap_in", "ap_out")

TPR_PERCENT = 95  # the recall level of FPR@95, in percent (integer arithmetic keeps k exact)


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def _as_scores(scores: np.ndarray, split: str, label: str | None) -> np.ndarray:
    """``scores`` as a finite, non-empty float64 vector; a one-line :class:`QbenchError` otherwise."""
    where = f" ({label})" if label else ""
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 1:
        raise QbenchError(f"{split} scores must be a vector, got shape {array.shape}{where}")
    if array.size == 0:
        raise QbenchError(f"{split} scores are empty{where}: an OOD metric needs at least one ID and one OOD image")
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise QbenchError(f"{split} scores contain {bad} NaN/inf value(s) of {array.size}{where}")
    return array


def _checked(id_scores: np.ndarray, ood_scores: np.ndarray, label: str | None) -> tuple[np.ndarray, np.ndarray]:
    return _as_scores(id_scores, "ID", label), _as_scores(ood_scores, "OOD", label)


@dataclass(frozen=True)
class Ranking:
    """The pooled ID and OOD scores sorted once: distinct values (ascending) with their ID and OOD counts.

    Every metric below is a function of these three arrays: tied scores form one group (one threshold of a curve,
    one average rank), exactly as ``scipy.stats.rankdata`` and ``sklearn.metrics`` group them.
    """

    values: np.ndarray
    id_counts: np.ndarray
    ood_counts: np.ndarray

    @classmethod
    def of(cls, u: np.ndarray, v: np.ndarray) -> "Ranking":
        """Group the checked score vectors ``u`` (ID) and ``v`` (OOD) by distinct value."""
        scores = np.concatenate([u, v])
        order = np.argsort(scores, kind="stable")
        ordered = scores[order]
        is_id = (order < u.size).astype(np.int64)
        starts = np.concatenate([[0], np.flatnonzero(np.diff(ordered)) + 1])  # where the sorted value changes
        id_counts = np.add.reduceat(is_id, starts)
        sizes = np.diff(np.append(starts, ordered.size))
        return cls(ordered[starts], id_counts, sizes - id_counts)

    @property
    def n_in(self) -> int:
        """Number of ID scores."""
        return int(self.id_counts.sum())

    @property
    def n_out(self) -> int:
        """Number of OOD scores."""
        return int(self.ood_counts.sum())


def _curve_counts(ranking: Ranking, id_positive: bool) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives (float64) at each threshold, thresholds in descending order of the positive
    class's score: ID positive thresholds the scores downwards, OOD positive (score ``−s``) upwards. These are
    the ``tps``/``fps`` of sklearn's curves: cumulative 0/1 counts, exact integers in float64."""
    if id_positive:
        positives, negatives = ranking.id_counts[::-1], ranking.ood_counts[::-1]
    else:
        positives, negatives = ranking.ood_counts, ranking.id_counts
    return np.cumsum(positives).astype(np.float64), np.cumsum(negatives).astype(np.float64)


def _precision_recall(ranking: Ranking, id_positive: bool) -> tuple[np.ndarray, np.ndarray]:
    """``precision_recall_curve``'s precision and recall: reversed so recall decreases, ending at (1, 0)."""
    tps, fps = _curve_counts(ranking, id_positive)
    precision = tps / (tps + fps)  # every threshold admits at least one score, so tps + fps > 0
    recall = tps / tps[-1]
    return np.concatenate([precision[::-1], [1.0]]), np.concatenate([recall[::-1], [0.0]])


def _trapezoid_area(recall: np.ndarray, precision: np.ndarray) -> float:
    """``sklearn.metrics.auc(recall, precision)`` for a decreasing recall: minus the trapezoidal sum."""
    d = recall[1:] - recall[:-1]
    return float(-1 * np.sum(d * (precision[1:] + precision[:-1]) / 2.0, dtype=np.float64))


def _step_area(recall: np.ndarray, precision: np.ndarray) -> float:
    """``average_precision_score``: the step integral ``−Σ Δrecall · precision`` (never −0.0)."""
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def _auroc(ranking: Ranking) -> float:
    """Mann–Whitney AUROC from the average rank of each group (``rankdata(method="average")``)."""
    ends = np.cumsum(ranking.id_counts + ranking.ood_counts)
    starts = ends - (ranking.id_counts + ranking.ood_counts)
    ranks = 0.5 * (ends + starts + 1)  # half-integers: their sums are exact in float64, whatever the order
    n_in, n_out = ranking.n_in, ranking.n_out
    u_statistic = float(np.sum(ranking.id_counts * ranks)) - n_in * (n_in + 1) / 2.0
    return u_statistic / (n_in * n_out)


def _fpr95_openood(ranking: Ranking) -> float:
    """``roc_curve(OOD = 1, −s, drop_intermediate=False)``'s FPR at the first threshold with TPR ≥ 0.95."""
    tps, fps = _curve_counts(ranking, id_positive=False)
    fpr = np.concatenate([[0.0], fps]) / fps[-1]
    tpr = np.concatenate([[0.0], tps]) / tps[-1]
    return float(fpr[np.argmax(tpr >= TPR_PERCENT / 100)])


def _fpr95(u: np.ndarray, v: np.ndarray) -> float:
    """ODIN's FPR@95 (ID positive) of checked scores: see :func:`fpr_at_95_tpr`."""
    k = (TPR_PERCENT * u.size + 99) // 100
    threshold = np.sort(u)[::-1][k - 1]
    return float(np.mean(v >= threshold))


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray, label: str | None = None) -> float:
    """Area under the ROC curve as the Mann–Whitney statistic ``P(u > v) + ½ P(u = v)``.

    Computed from average ranks of the pooled scores (ties get the mean of their ranks, so a tied
    ID/OOD pair counts one half): ``(R_in − n_in(n_in+1)/2) / (n_in·n_out)`` with ``R_in`` the rank sum
    of the ID scores. Symmetric in the choice of positive class (OpenOOD v1.5, Zhang et al., 2023).
    """
    return _auroc(Ranking.of(*_checked(id_scores, ood_scores, label)))


def fpr_at_95_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, label: str | None = None) -> float:
    """FPR at 95 % TPR with **ID as positive** (ODIN, Liang et al., ICLR 2018): ``mean(v >= λ)``.

    ``λ`` is the k-th largest ID score with ``k = ⌈0.95·n_in⌉ = (95·n_in + 99) // 100`` — the highest
    threshold that still accepts at least 95 % of ID images; OOD images tied at ``λ`` are accepted.
    Equals ``fpr[argmax(tpr >= 0.95)]`` of ``roc_curve(ID = 1, score, drop_intermediate=False)``.
    """
    return _fpr95(*_checked(id_scores, ood_scores, label))


def fpr95_openood(id_scores: np.ndarray, ood_scores: np.ndarray, label: str | None = None) -> float:
    """FPR at 95 % TPR with **OOD as positive**, OpenOOD v1.5's convention (Zhang et al., 2023).

    ``roc_curve(OOD = 1, −score)`` and the FPR at the first point with TPR ≥ 0.95: the fraction of ID
    images flagged as OOD once 95 % of OOD images are caught. ``drop_intermediate=False`` keeps every
    threshold, so the exact crossing point is never skipped. Not comparable with :func:`fpr_at_95_tpr`
    (ODIN's ID-positive definition, Liang et al., ICLR 2018).
    """
    return _fpr95_openood(Ranking.of(*_checked(id_scores, ood_scores, label)))


def aupr_in(id_scores: np.ndarray, ood_scores: np.ndarray, label: str | None = None) -> float:
    """Area under the precision–recall curve with ID positive, trapezoidal (OpenOOD v1.5 convention)."""
    precision, recall = _precision_recall(Ranking.of(*_checked(id_scores, ood_scores, label)), id_positive=True)
    return _trapezoid_area(recall, precision)


def aupr_out(id_scores: np.ndarray, ood_scores: np.ndarray, label: str | None = None) -> float:
    """Area under the precision–recall curve with OOD positive and score ``−s``, trapezoidal (OpenOOD v1.5)."""
    precision, recall = _precision_recall(Ranking.of(*_checked(id_scores, ood_scores, label)), id_positive=False)
    return _trapezoid_area(recall, precision)


def ap_in(id_scores: np.ndarray, ood_scores: np.ndarray, label: str | None = None) -> float:
    """Step-wise average precision with ID positive (``average_precision_score``; MCM/NegLabel/EOE's "AUPR")."""
    precision, recall = _precision_recall(Ranking.of(*_checked(id_scores, ood_scores, label)), id_positive=True)
    return _step_area(recall, precision)


def ap_out(id_scores: np.ndarray, ood_scores: np.ndarray, label: str | None = None) -> float:
    """Step-wise average precision with OOD positive and score ``−s`` (``average_precision_score``)."""
    precision, recall = _precision_recall(Ranking.of(*_checked(id_scores, ood_scores, label)), id_positive=False)
    return _step_area(recall, precision)


_FUNCTIONS = {
    "auroc": auroc,
    "fpr95": fpr_at_95_tpr,
    "aupr_in": aupr_in,
    "aupr_out": aupr_out,
    "fpr95_openood": fpr95_openood,
    "ap_in": ap_in,
    "ap_out": ap_out,
}


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray, label: str | None = None) -> dict[str, float]:
    """Every metric of :data:`OOD_METRICS`, by name, for one (scorer, ID split, OOD split): one sort of the pooled
    scores and one precision–recall curve per positive class, shared by the metrics that read them."""
    u, v = _checked(id_scores, ood_scores, label)
    ranking = Ranking.of(u, v)
    precision_in, recall_in = _precision_recall(ranking, id_positive=True)
    precision_out, recall_out = _precision_recall(ranking, id_positive=False)
    values = {
        "auroc": _auroc(ranking),
        "fpr95": _fpr95(u, v),
        "aupr_in": _trapezoid_area(recall_in, precision_in),
        "aupr_out": _trapezoid_area(recall_out, precision_out),
        "fpr95_openood": _fpr95_openood(ranking),
        "ap_in": _step_area(recall_in, precision_in),
        "ap_out": _step_area(recall_out, precision_out),
    }
    return {name: values[name] for name in OOD_METRICS}
