"""Every built-in scorer through the installable conformance kit (:func:`qbench.testing.check_scorer`): one finite
float64 score per image, deterministic, independent of the other images in the batch, higher on ID than on OOD
images of the kit's constructed case, and one-line errors for unknown parameters. The registry is built without
entry points, so a new built-in scorer is checked the moment it registers; deliberately broken scorers show the
checks fail with a readable message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qbench.analysis.ood_metrics import auroc
from qbench.plugins import get_plugin_manager
from qbench.registry import build_registry
from qbench.scoring import ScoreContext, ScoreInputs, Scorer, ScorerPlan, ScorerResources
from qbench.testing import ConformanceError, ConformanceSkip, HashTextEncoder, check_scorer, scorer_case
from qbench.testing.conformance import run_scorer

REGISTRY = build_registry(get_plugin_manager(load_entrypoints=False))
SCORERS = REGISTRY.names("scorers")
FILLER_WORDS = ("tree", "car", "mountain", "guitar", "lamp", "river", "house", "shoe", "cloudy sky", "anchor")


def resource_context(cls: type, folder: Path) -> ScoreContext:
    """A context giving each ``file`` resource the scorer declares a small word list (for a scorer that skips
    itself when its user file is absent); no scorer is named here, the declarations say what to provide."""
    given = {}
    for option in getattr(cls, "resources", ()):
        if option.kind == "file":
            path = folder / f"{option.key}.txt"
            path.write_text("\n".join(FILLER_WORDS) + "\n", encoding="utf-8")
            given[option.key] = path
    return ScoreContext(suite="x", id_dataset="x", id_classnames=(), id_templates=(),
                        resources=ScorerResources(given))


@pytest.mark.parametrize("name", SCORERS)
def test_builtin_scorer_conforms(name, tmp_path):
    cls = REGISTRY.get("scorers", name)
    try:
        value = check_scorer(cls)
    except ConformanceSkip:  # skips itself without a user file: run it with the files it declares
        value = check_scorer(cls, context=resource_context(cls, tmp_path))
    assert 0.5 < value <= 1.0


def test_every_builtin_scorer_is_checked():
    assert {"msp", "energy", "mcm"} <= set(SCORERS)


# -- the constructed case ------------------------------------------------------------------------------------
def test_hash_encoder_maps_class_prompts_onto_their_class_and_others_outside():
    encoder = HashTextEncoder(("cat", "sea lion"), dim=8)
    rows = encoder.encode(["a photo of a cat.", "the nice Sea Lion", "a photo of something.", "a catalogue",
                           "a photo of something."])
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0)
    np.testing.assert_array_equal(rows[0], np.eye(8)[0])
    np.testing.assert_array_equal(rows[1], np.eye(8)[1])
    for row in rows[2:]:  # "catalogue" does not name the class "cat"
        assert np.all(row[:2] == 0) and np.any(row[2:] != 0)
    np.testing.assert_array_equal(rows[2], rows[4])
    assert not np.allclose(rows[2], rows[3])


def test_scorer_case_puts_id_images_on_their_class_and_ood_images_orthogonal():
    case = scorer_case(per_class=3, n_ood=5)
    cosines_id = case.id_feats @ case.id_text.T
    np.testing.assert_allclose(cosines_id[np.arange(len(case.id_labels)), case.id_labels], 0.95)
    assert np.abs(case.ood_feats @ case.id_text.T).max() < 1e-12
    np.testing.assert_allclose(np.linalg.norm(case.ood_feats, axis=1), 1.0)
    assert case.context().id_classnames == case.classnames


# -- deliberately broken scorers fail with a readable message -------------------------------------------------
class MaxCosine(Scorer):
    """A minimal correct scorer: the highest cosine to an ID class."""

    name = "max-cosine"
    citation = "test"
    summary = "max cosine to the ID classes"

    def score(self, inputs: ScoreInputs, prepared: object = None) -> np.ndarray:
        """Each image's highest cosine to an ID class embedding."""
        return inputs.cosines().max(axis=1)


def variant(**methods) -> type:
    """:class:`MaxCosine` with some methods replaced (a deliberately broken scorer of the same name)."""
    return type("Variant", (MaxCosine,), methods)


def test_the_minimal_scorer_passes():
    assert check_scorer(MaxCosine) == 1.0


@pytest.mark.parametrize("score, message", [
    (lambda self, inputs, prepared=None: -inputs.cosines().max(axis=1), r"AUROC\(ID vs OOD\) = 0\.000 <= 0\.5"),
    (lambda self, inputs, prepared=None: np.full(len(inputs.logits), np.nan),
     r"returned 24 non-finite score\(s\) \(NaN or inf\) of 24 on ID images"),
    (lambda self, inputs, prepared=None: np.random.default_rng().random(len(inputs.logits)), "different scores"),
    (lambda self, inputs, prepared=None: inputs.cosines().max(axis=1).astype(np.float32), "returned float32"),
    (lambda self, inputs, prepared=None: inputs.cosines(), r"returned shape \(24, 4\)"),
    (lambda self, inputs, prepared=None: inputs.cosines().max(axis=1) - inputs.cosines().max(axis=1).mean(),
     "depends on the other images"),
], ids=["reversed", "nan", "random", "float32", "matrix", "batch-centred"])
def test_broken_scores_fail(score, message):
    with pytest.raises(ConformanceError, match=message) as raised:
        check_scorer(variant(score=score))
    assert str(raised.value).startswith("scorer 'max-cosine': ") and "\n" not in str(raised.value)


def test_a_config_that_accepts_unknown_parameters_fails():
    @classmethod
    def lenient(cls, params):
        """Ignores every parameter, unknown ones included."""
        return cls()

    with pytest.raises(ConformanceError, match="unknown parameter.*did not fail"):
        check_scorer(variant(from_params=lenient))


def test_a_non_scorer_and_a_bad_plan_fail():
    with pytest.raises(ConformanceError, match="must be a subclass of qbench.scoring.Scorer"):
        check_scorer(object)
    with pytest.raises(ConformanceError, match="plan\\(\\) returned dict"):
        check_scorer(variant(plan=lambda self, context: {}))


def test_an_unseeded_plan_fails():
    counter = iter(range(100))
    plan = lambda self, context: ScorerPlan(text_sets={"extra": (f"prompt {next(counter)}",)})  # noqa: E731
    with pytest.raises(ConformanceError, match="plan\\(\\) requested different prompts"):
        check_scorer(variant(plan=plan))


def test_run_scorer_runs_plan_prepare_and_score_in_order():
    calls = []

    class Recording(MaxCosine):
        def plan(self, context):
            """Asks for one generic prompt."""
            calls.append("plan")
            return ScorerPlan(text_sets={"generic": ("a photo of something.",)})

        def prepare(self, text):
            """Hands the encoded prompt to score."""
            calls.append("prepare")
            return text.get("generic", self.name)

        def score(self, inputs, prepared=None):
            """Checks it received prepare's result."""
            calls.append("score")
            assert prepared.shape == (1, inputs.image_feats.shape[1])
            return super().score(inputs)

    case = scorer_case()
    run = run_scorer(Recording(), case, case.context())
    assert calls == ["plan", "prepare", "score", "score", "score"]
    assert auroc(run.id_scores, run.ood_scores) == 1.0
