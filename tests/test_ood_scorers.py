"""OOD scorers (``scoring.md`` §1.1-1.4, §1.7) on hand-built features where the answer is known."""

import math

import numpy as np
import pytest

from qbench.errors import QbenchError
from qbench.plugins import get_plugin_manager
from qbench.registry import build_registry
from qbench.scoring import ScoreContext, ScoreInputs, Scorer, ScorerResources, TextFeatures
from qbench_plugins.scorers.energy import Energy, EnergyConfig
from qbench_plugins.scorers.entropy import NegativeEntropy
from qbench_plugins.scorers.generic_negative import GenericNegative, GenericNegativeConfig
from qbench_plugins.scorers.mcm import MaximumConceptMatching, MCMConfig
from qbench_plugins.scorers.msp import MaximumSoftmaxProbability

CLASSNAMES = ("cat", "dog", "ship")


def unit_rows(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def make_inputs(feats: np.ndarray, id_text: np.ndarray, scale: float = 100.0, sets: dict | None = None) -> ScoreInputs:
    """Inputs as the pipeline builds them: CLIP logits ``s·f·Tᵀ`` from the same features."""
    text = TextFeatures(id_text, scale, sets or {})
    return ScoreInputs(logits=scale * feats @ id_text.T, image_feats=feats, text=text)


def logit_inputs(logits: np.ndarray) -> ScoreInputs:
    """Inputs for the output-based scorers, which read only ``logits``."""
    n, k = logits.shape
    return ScoreInputs(logits=np.asarray(logits, dtype=np.float64), image_feats=np.zeros((n, 4)),
                       text=TextFeatures(np.zeros((k, 4)), 1.0))


def context(**resources) -> ScoreContext:
    return ScoreContext(suite="toy", id_dataset="toy-id", id_classnames=CLASSNAMES, id_templates=("a photo of a {}.",),
                        resources=ScorerResources(**resources))


def random_case(seed: int, n: int = 20, k: int = 7, g: int = 3, d: int = 12) -> tuple[np.ndarray, ...]:
    """Random unit image features ``n x d``, ID text ``k x d`` and generic text ``g x d``."""
    rng = np.random.default_rng(seed)
    return tuple(unit_rows(rng.normal(size=(rows, d))) for rows in (n, k, g))


# --------------------------------------------------------------------------------------------------
# MSP (§1.1)
# --------------------------------------------------------------------------------------------------


def test_msp_properties():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=5.0, size=(10, 6))
    scorer = MaximumSoftmaxProbability()
    shifted = scorer.score(logit_inputs(logits + 37.5))
    np.testing.assert_allclose(shifted, scorer.score(logit_inputs(logits)), rtol=1e-12)
    peaked = np.zeros((1, 6))
    peaked[0, 2] = 50.0
    assert scorer.score(logit_inputs(peaked))[0] > 0.999
    assert scorer.score(logit_inputs(np.full((1, 8), 3.25)))[0] == 1 / 8


# --------------------------------------------------------------------------------------------------
# Energy (§1.2)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.01, 0.5, 1.0, 4.0])
def test_energy_lies_between_max_logit_and_max_plus_t_log_k(temperature):
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=30.0, size=(50, 9))
    scores = Energy(EnergyConfig(temperature=temperature)).score(logit_inputs(logits))
    top = logits.max(axis=1)
    slack = 1e-12 * np.abs(top).max()
    assert np.all(scores >= top - slack)
    assert np.all(scores <= top + temperature * math.log(9) + slack)


def test_energy_hand_values_and_equal_logits_reach_the_upper_bound():
    scorer = Energy(EnergyConfig(temperature=2.0))
    logits = np.array([[np.log(3.0) * 2.0, 0.0], [5.0, 5.0]])  # exp(z/T) = (3, 1); equal logits: 5 + 2 log 2
    np.testing.assert_allclose(scorer.score(logit_inputs(logits)), [2.0 * math.log(4.0), 5.0 + 2.0 * math.log(2.0)],
                               rtol=1e-14)


def test_energy_is_shift_equivariant():
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=10.0, size=(30, 5))
    scorer = Energy()
    shifted = scorer.score(logit_inputs(logits + 123.0))
    np.testing.assert_allclose(shifted, scorer.score(logit_inputs(logits)) + 123.0, rtol=1e-13)


def test_energy_tends_to_max_logit_as_temperature_vanishes():
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=3.0, size=(20, 6))
    gaps = [np.max(Energy(EnergyConfig(temperature=t)).score(logit_inputs(logits)) - logits.max(axis=1))
            for t in (1.0, 0.1, 1e-3, 1e-6)]
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[0] > 1e-3  # the limit is not trivially reached at T = 1
    assert gaps[-1] <= 1e-6 * math.log(6)


def test_energy_on_cosines_with_t_001_ranks_like_energy_on_clip_logits_with_scale_100():
    # LSE(100·c) = 100 · (0.01·LSE(c/0.01)): the same score up to the factor s, hence the same ranking
    feats, id_text, _ = random_case(4)
    inputs = make_inputs(feats, id_text, scale=100.0)
    on_logits = Energy().score(inputs)
    on_cosine = Energy(EnergyConfig(temperature=0.01, on="cosine")).score(inputs)
    np.testing.assert_allclose(100.0 * on_cosine, on_logits, rtol=1e-12)
    assert not np.allclose(Energy(EnergyConfig(on="cosine")).score(inputs), on_logits)


def test_energy_does_not_overflow_on_large_logits():
    scores = Energy().score(logit_inputs(np.array([[1e4, 1e4 - 1.0, -1e4]])))
    assert np.isfinite(scores).all() and scores[0] == pytest.approx(1e4 + math.log1p(math.exp(-1.0)), rel=1e-14)


@pytest.mark.parametrize("params", [{"temperature": "0"}, {"temperature": "-1"}, {"on": "probs"}])
def test_energy_rejects_bad_configuration(params):
    scorer = Energy.from_params(params)
    with pytest.raises(QbenchError) as caught:
        scorer.plan(context())
    assert "energy." in str(caught.value) and "\n" not in str(caught.value)


# --------------------------------------------------------------------------------------------------
# Entropy (§1.3)
# --------------------------------------------------------------------------------------------------


def test_entropy_of_uniform_is_minus_log_k():
    for k in (2, 10, 1000):
        score = NegativeEntropy().score(logit_inputs(np.full((1, k), -7.0)))[0]
        assert score == pytest.approx(-math.log(k), rel=1e-12)


def test_entropy_of_numerical_one_hot_is_zero_without_nan():
    logits = np.zeros((2, 50))
    logits[0, 3] = 1e3
    logits[1, 49] = 1e3
    scores = NegativeEntropy().score(logit_inputs(logits))
    assert np.all(np.isfinite(scores)) and np.all(np.abs(scores) < 1e-12)


def test_entropy_hand_value_and_range():
    score = NegativeEntropy().score(logit_inputs(np.array([[math.log(3.0), 0.0]])))[0]
    assert score == pytest.approx(0.75 * math.log(0.75) + 0.25 * math.log(0.25), rel=1e-14)
    rng = np.random.default_rng(5)
    scores = NegativeEntropy().score(logit_inputs(rng.normal(scale=20.0, size=(100, 8))))
    assert np.all(scores <= 0.0) and np.all(scores >= -math.log(8) - 1e-12)


# --------------------------------------------------------------------------------------------------
# MCM (§1.4)
# --------------------------------------------------------------------------------------------------


def test_mcm_ignores_the_logit_scale():
    feats, id_text, _ = random_case(6)
    scorer = MaximumConceptMatching()
    np.testing.assert_array_equal(scorer.score(make_inputs(feats, id_text, 1.0)),
                                  scorer.score(make_inputs(feats, id_text, 100.0)))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.01])
def test_mcm_equals_msp_with_logit_scale_one_over_tau(temperature):
    feats, id_text, _ = random_case(7)
    mcm = MaximumConceptMatching(MCMConfig(temperature=temperature)).score(make_inputs(feats, id_text, 100.0))
    msp = MaximumSoftmaxProbability().score(make_inputs(feats, id_text, 1.0 / temperature))
    np.testing.assert_allclose(mcm, msp, rtol=1e-12)


def test_mcm_range_with_1000_classes_catches_a_wrong_logit_scale():
    k, d = 1000, 32
    upper = math.e**2 / (math.e**2 + 999)
    rng = np.random.default_rng(8)
    feats, id_text = unit_rows(rng.normal(size=(40, d))), unit_rows(rng.normal(size=(k, d)))
    scores = MaximumConceptMatching().score(make_inputs(feats, id_text, 100.0))
    assert np.all(scores >= 1 / k) and np.all(scores <= upper)
    # the extreme case c = (1, -1, ..., -1) attains the upper bound; MSP on CLIP logits would exceed it
    extreme_text = np.zeros((k, d))
    extreme_text[0, 0], extreme_text[1:, 0] = 1.0, -1.0
    extreme = make_inputs(np.eye(d)[:1], extreme_text, 100.0)
    assert MaximumConceptMatching().score(extreme)[0] == pytest.approx(upper, rel=1e-12)
    assert MaximumSoftmaxProbability().score(extreme)[0] > upper


def test_mcm_reference_mode_requests_and_uses_photo_prompts():
    feats, id_text, photo = random_case(9, k=3, g=3)
    scorer = MaximumConceptMatching(MCMConfig(prompt_mode="reference"))
    plan = scorer.plan(context())
    assert dict(plan.text_sets) == {"id_photo": ("a photo of a cat.", "a photo of a dog.", "a photo of a ship.")}
    assert MaximumConceptMatching().plan(context()).text_sets == {}
    inputs = make_inputs(feats, id_text, sets={"id_photo": photo})
    expected = MaximumConceptMatching().score(make_inputs(feats, photo))
    np.testing.assert_array_equal(scorer.score(inputs), expected)
    assert not np.allclose(expected, MaximumConceptMatching().score(inputs))
    with pytest.raises(QbenchError, match="id_photo"):
        scorer.score(make_inputs(feats, id_text))


@pytest.mark.parametrize("params", [{"prompt_mode": "nice"}, {"temperature": "0"}, {"temperature": "nan"}])
def test_mcm_rejects_bad_configuration(params):
    with pytest.raises(QbenchError) as caught:
        MaximumConceptMatching.from_params(params).plan(context())
    assert "mcm." in str(caught.value) and "\n" not in str(caught.value)


# --------------------------------------------------------------------------------------------------
# Generic negative (§1.7)
# --------------------------------------------------------------------------------------------------


def test_generic_negative_without_prompts_is_one():
    feats, id_text, _ = random_case(10)
    scorer = GenericNegative(GenericNegativeConfig(prompts=()))
    assert scorer.plan(context()).text_sets == {"generic": ()}
    for empty in (np.zeros((0, feats.shape[1])), np.zeros(0)):
        scores = scorer.score(make_inputs(feats, id_text, sets={"generic": empty}))
        np.testing.assert_array_equal(scores, np.ones(len(feats)))


def test_generic_negative_sigmoid_form_equals_ratio_form():
    for temperature in (0.01, 0.1, 1.0):
        feats, id_text, generic = random_case(11)
        scorer = GenericNegative(GenericNegativeConfig(temperature=temperature))
        scores = scorer.score(make_inputs(feats, id_text, sets={"generic": generic}))
        id_mass = np.exp(feats @ id_text.T / temperature).sum(axis=1)
        generic_mass = np.exp(feats @ generic.T / temperature).sum(axis=1)
        np.testing.assert_allclose(scores, id_mass / (id_mass + generic_mass), rtol=1e-12, atol=1e-300)
        assert np.all(scores > 0) and np.all(scores <= 1)


def test_generic_negative_adding_a_prompt_never_raises_the_score():
    feats, id_text, generic = random_case(12, g=6)
    scorer = GenericNegative()
    previous = scorer.score(make_inputs(feats, id_text, sets={"generic": generic[:0]}))
    for count in range(1, 7):
        current = scorer.score(make_inputs(feats, id_text, sets={"generic": generic[:count]}))
        assert np.all(current <= previous)
        previous = current
    assert np.any(previous < 0.5)  # the prompts actually bite on this data


def test_generic_negative_ignores_the_logit_scale():
    feats, id_text, generic = random_case(13)
    scorer = GenericNegative()
    sets = {"generic": generic}
    np.testing.assert_array_equal(scorer.score(make_inputs(feats, id_text, 1.0, sets)),
                                  scorer.score(make_inputs(feats, id_text, 100.0, sets)))


def test_generic_negative_plan_defaults_and_prompt_file(tmp_path):
    default = GenericNegative().plan(context())
    assert dict(default.text_sets) == {"generic": ("a photo of something.",)}
    assert default.provenance["generic_prompts_source"] == "default"
    path = tmp_path / "generic.txt"
    path.write_text("# generic prompts\n\na photo of something.\n  a photo of an object.  \n", encoding="utf-8")
    from_file = GenericNegative().plan(context(generic_prompts=path))
    assert from_file.text_sets["generic"] == ("a photo of something.", "a photo of an object.")
    assert from_file.provenance["generic_prompts_source"] == str(path)
    path.write_text("a photo of something.\na photo of a thing.\n", encoding="utf-8")
    changed = GenericNegative().plan(context(generic_prompts=path))
    assert len({default.fingerprint(), from_file.fingerprint(), changed.fingerprint()}) == 3


def test_generic_negative_missing_or_empty_prompt_file_is_an_error(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(QbenchError, match="nope.txt"):
        GenericNegative().plan(context(generic_prompts=missing))
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n   \n", encoding="utf-8")
    with pytest.raises(QbenchError) as caught:
        GenericNegative().plan(context(generic_prompts=empty))
    assert "empty.txt" in str(caught.value) and "no prompts" in str(caught.value)


def test_generic_negative_errors_on_bad_configuration_and_missing_set():
    feats, id_text, _ = random_case(14)
    with pytest.raises(QbenchError, match="generic"):
        GenericNegative().score(make_inputs(feats, id_text))
    with pytest.raises(QbenchError, match="temperature"):
        GenericNegative.from_params({"temperature": "-0.01"}).plan(context())
    with pytest.raises(QbenchError, match="prompts"):
        GenericNegative(GenericNegativeConfig(prompts=("a photo of something.", "  "))).plan(context())


# --------------------------------------------------------------------------------------------------
# Every scorer: direction, determinism, registration
# --------------------------------------------------------------------------------------------------

ALL_SCORERS = [
    MaximumSoftmaxProbability(),
    Energy(),
    Energy(EnergyConfig(on="cosine")),
    NegativeEntropy(),
    MaximumConceptMatching(),
    MaximumConceptMatching(MCMConfig(prompt_mode="reference")),
    GenericNegative(),
]


def direction_case(seed: int = 15) -> tuple[ScoreInputs, int]:
    """ID-like images near one class text vector and OOD-like images near the generic prompt.

    Dimensions 0..4 hold the 5 class vectors (one axis each), dimensions 5..15 everything else; the
    generic prompt points along the mean of 5..15. ID images: 0.95 on their class axis plus small noise;
    OOD images: equal small weight on every class axis plus a large positive off-class part.
    """
    rng = np.random.default_rng(seed)
    k, d, n = 5, 16, 12
    id_text = np.eye(d)[:k]
    generic = unit_rows(np.r_[np.zeros(k), np.ones(d - k)][None, :])
    id_like = np.zeros((n, d))
    id_like[np.arange(n), np.arange(n) % k] = 0.95
    id_like[:, k:] = 0.05 * rng.normal(size=(n, d - k))
    ood_like = np.zeros((n, d))
    ood_like[:, :k] = 0.1
    ood_like[:, k:] = np.abs(rng.normal(size=(n, d - k)))
    feats = unit_rows(np.r_[id_like, ood_like])
    return make_inputs(feats, id_text, 100.0, {"generic": generic, "id_photo": id_text}), n


@pytest.mark.parametrize("scorer", ALL_SCORERS, ids=lambda s: f"{s.name}-{'-'.join(map(str, s.params().values()))}")
def test_id_like_images_outrank_ood_like_images(scorer: Scorer):
    inputs, n = direction_case()
    scores = scorer.score(inputs)
    assert scores[:n].min() > scores[n:].max()


@pytest.mark.parametrize("scorer", ALL_SCORERS, ids=lambda s: f"{s.name}-{'-'.join(map(str, s.params().values()))}")
def test_scores_are_deterministic_float64_from_float32_caches(scorer: Scorer):
    inputs, _ = direction_case(16)
    as_float32 = ScoreInputs(
        logits=inputs.logits.astype(np.float32),
        image_feats=inputs.image_feats.astype(np.float32),
        text=TextFeatures(inputs.id_text.astype(np.float32), 100.0,
                          {key: value.astype(np.float32) for key, value in inputs.text.sets.items()}),
    )
    first, second = scorer.score(as_float32), scorer.score(as_float32)
    assert first.dtype == np.float64 and first.shape == (len(inputs.logits),)
    np.testing.assert_array_equal(first, second)


def test_new_scorers_are_registered_builtins_with_paper_defaults():
    registry = build_registry(get_plugin_manager(load_entrypoints=False))
    assert set(registry.names("scorers")) >= {"msp", "energy", "entropy", "mcm", "generic-negative"}
    assert registry.entry("scorers", "mcm").source == "builtin:qbench_plugins.scorers.mcm"
    assert Energy.defaults() == {"temperature": 1.0, "on": "logits"}
    assert MaximumConceptMatching.defaults() == {"temperature": 1.0, "prompt_mode": "ensemble"}
    assert GenericNegative.defaults() == {"temperature": 0.01, "prompts": ("a photo of something.",)}
