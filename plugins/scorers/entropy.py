"""Negative-entropy OOD scorer.

The Shannon entropy ``H(p) = −Σ_k p_k log p_k`` (Shannon, "A Mathematical Theory of Communication",
1948) of the predictive distribution ``p = softmax(z)`` is a standard uncertainty baseline for OOD
detection: confident, in-distribution inputs tend to have low entropy. qbench returns ``S = −H(p) =
Σ_k p_k log p_k`` (natural log) so that higher means more in-distribution (``scoring.md`` §1.3).
Range ``[−log K, 0]``.
"""

from __future__ import annotations

import numpy as np

from qbench.hookspecs import hookimpl
from qbench.analysis.metrics import log_softmax, softmax
from qbench.scoring import ScoreInputs, Scorer


def negative_entropy(logits: np.ndarray) -> np.ndarray:
    """``Σ_k p_k log p_k`` per row with ``p = softmax(logits)``, in float64.

    ``log p`` comes from the stable log-softmax, which is always finite, so a probability that
    underflows to 0 contributes ``0 · finite = 0``: the ``0·log 0 = 0`` convention without a special case.
    """
    z = np.asarray(logits, dtype=np.float64)
    return np.sum(softmax(z, axis=1) * log_softmax(z, axis=1), axis=1)


class NegativeEntropy(Scorer):
    """``Σ_k p_k log p_k`` of the softmax over ID classes (= −entropy; higher = more in-distribution)."""

    name = "entropy"
    citation = "Shannon, 1948 (entropy of the softmax, negated)"
    summary = "negative entropy of the softmax over ID classes"

    def score(self, inputs: ScoreInputs, prepared: object = None) -> np.ndarray:
        return negative_entropy(inputs.logits)


@hookimpl
def qbench_register_scorers() -> list[type[Scorer]]:
    return [NegativeEntropy]
