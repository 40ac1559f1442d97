"""Maximum softmax probability (MSP) OOD scorer.

Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples in Neural
Networks", ICLR 2017: the score is the largest class probability of the softmax over the ID classes,
``max_k softmax(z)_k``; in-distribution inputs tend to receive more confident predictions.
"""

from __future__ import annotations

import numpy as np

from qbench.hookspecs import hookimpl
from qbench.analysis.metrics import confidences
from qbench.scoring import ScoreInputs, Scorer


class MaximumSoftmaxProbability(Scorer):
    """MSP: ``max_k softmax(logits)_k`` over the ID classes (higher = more in-distribution)."""

    name = "msp"
    citation = "Hendrycks & Gimpel, ICLR 2017"
    summary = "max softmax probability over ID classes"

    def score(self, inputs: ScoreInputs, prepared: object = None) -> np.ndarray:
        return confidences(np.asarray(inputs.logits, dtype=np.float64))


@hookimpl
def qbench_register_scorers() -> list[type[Scorer]]:
    return [MaximumSoftmaxProbability]
