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
"""

from __future__ import annotations

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


def _labelled(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated scores ``[u; v]`` and their ID indicator (1 for ID, 0 for OOD)."""
    scores = np.concatenate([u, v])
    is_id = np.concatenate([np.ones(u.size, dtype=np.int64), np.zeros(v.size, dtype=np.int64)])
    return scores, is_id


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray, label: str | None = None) -> float:
    """Area under the ROC curve as the Mann–Whitney statistic ``P(u > v) + ½ P(u = v)``.

    Computed from average ranks of the pooled scores (ties get the mean of their ranks, so a tied
    ID/OOD pair counts one half): ``(R_in − n_in(n_in+1)/2) / (n_in·n_out)`` with ``R_in`` the rank sum
    of the ID scores. Symmetric in the choice of positive class (OpenOOD v1.5, Zhang et al., 2023).
    """
    u, v = _checked(id_scores, ood_scores, label)
    from scipy.stats import rankdata  # imported on use: parsing a suite must not load scipy

    ranks = rankdata(np.concatenate([u, v]), method="average")
    n_in, n_out = u.size, v.size
    u_statistic = float(np.sum(ranks[:n_in])) - n_in * (n_in + 1) / 2.0
    return u_statistic / (n_in * n_out)


def fpr_at_95_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, label: str | None = None) -> float:
    """FPR at 95 % TPR with **ID as positive** (ODIN, Liang et al., ICLR 2018): ``mean(v >= λ)``.

    ``λ`` is the k-th largest ID score with ``k = ⌈0.95·n_in⌉ = (95·n_in + 99) // 100`` — the highest
    threshold that still accepts at least 95 % of ID images; OOD images tied at ``λ`` are accepted.
    Equals ``fpr[argmax(tpr >= 0.95)]`` of ``roc_curve(ID = 1, score, drop_intermediate=False)``.
    """
    u, v = _checked(id_scores, ood_scores, label)
    k = (TPR_PERCENT * u.size + 99) // 100
    threshold = np.sort(u)[::-1][k - 1]
    return float(np.mean(v >= threshold))


def fpr95_openood(id_scores: np.ndarray, ood_scores: np.ndarray, label: str | None = None) -> float:
    """FPR at 95 % TPR with **OOD as positive**, OpenOOD v1.5's convention (Zhang et al., 2023).

    ``roc_curve(OOD = 1, −score)`` and the FPR at the first point with TPR ≥ 0.95: the fraction of ID
    images flagged as OOD once 95 % of OOD images are caught. ``drop_intermediate=False`` keeps every
    threshold, so the exact crossing point is never skipped. Not comparable with :func:`fpr_at_95_tpr`
    (ODIN's ID-positive definition, Liang et al., ICLR 2018).
    """
    u, v = _checked(id_scores, ood_scores, label)
    scores, is_id = _labelled(u, v)
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(1 - is_id, -scores, drop_intermediate=False)
    return float(fpr[np.argmax(tpr >= TPR_PERCENT / 100)])


def aupr_in(id_scores: np.ndarray, ood_scores: np.ndarray, label: str | None = None) -> float:
    """Area under the precision–recall curve with ID positive, trapezoidal (OpenOOD v1.5 convention)."""
    u, v = _checked(id_scores, ood_scores, label)
    scores, is_id = _labelled(u, v)
    from sklearn.metrics import auc, precision_recall_curve

    precision, recall, _ = precision_recall_curve(is_id, scores)
    return float(auc(recall, precision))


def aupr_out(id_scores: np.ndarray, ood_scores: np.ndarray, label: str | None = None) -> float:
    """Area under the precision–recall curve with OOD positive and score ``−s``, trapezoidal (OpenOOD v1.5)."""
    u, v = _checked(id_scores, ood_scores, label)
    scores, is_id = _labelled(u, v)
    from sklearn.metrics import auc, precision_recall_curve

    precision, recall, _ = precision_recall_curve(1 - is_id, -scores)
    return float(auc(recall, precision))


def ap_in(id_scores: np.ndarray, ood_scores: np.ndarray, label: str | None = None) -> float:
    """Step-wise average precision with ID positive (``average_precision_score``; MCM/NegLabel/EOE's "AUPR")."""
    u, v = _checked(id_scores, ood_scores, label)
    scores, is_id = _labelled(u, v)
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(is_id, scores))


def ap_out(id_scores: np.ndarray, ood_scores: np.ndarray, label: str | None = None) -> float:
    """Step-wise average precision with OOD positive and score ``−s`` (``average_precision_score``)."""
    u, v = _checked(id_scores, ood_scores, label)
    scores, is_id = _labelled(u, v)
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(1 - is_id, -scores))


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
    """Every metric of :data:`OOD_METRICS`, by name, for one (scorer, ID split, OOD split)."""
    u, v = _checked(id_scores, ood_scores, label)
    return {name: _FUNCTIONS[name](u, v, label) for name in OOD_METRICS}
