"""Scorer plugins on hand-built logits where the right answer is known."""

import numpy as np
import pytest

from qbench.scoring import ScoreInputs, TextFeatures
from qbench_plugins.scorers.msp import MaximumSoftmaxProbability


def inputs_for(logits: np.ndarray) -> ScoreInputs:
    n, k = logits.shape
    return ScoreInputs(logits=logits, image_feats=np.zeros((n, 4)), text=TextFeatures(np.zeros((k, 4)), 1.0))


def test_msp_is_the_largest_softmax_probability():
    logits = np.array([[np.log(3.0), 0.0, 0.0], [0.0, 0.0, 0.0]])
    scores = MaximumSoftmaxProbability().score(inputs_for(logits))
    np.testing.assert_allclose(scores, [3 / 5, 1 / 3], rtol=1e-12)


def test_msp_ranks_confident_inputs_as_more_in_distribution():
    confident, unsure = np.array([[10.0, 0.0]]), np.array([[0.1, 0.0]])
    scorer = MaximumSoftmaxProbability()
    assert scorer.score(inputs_for(confident))[0] > scorer.score(inputs_for(unsure))[0]
    assert scorer.score(inputs_for(confident + 100.0))[0] == pytest.approx(scorer.score(inputs_for(confident))[0])
