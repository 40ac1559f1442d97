"""Repeated work around the forward passes (issue 16): NegLabel scored in place with the same bits, its plan built
once per label set, and its lexicon encoded only where NegLabel runs."""

from __future__ import annotations

import numpy as np

from qbench.engine.evaluate import EvalRequest, resolve, run
from qbench.plugins import get_plugin_manager
from qbench.registry import build_registry
from qbench.scoring import ScoreContext, ScorerResources
from qbench_plugins.scorers import neglabel as N

LIMIT = 24  # images per split: these tests count prompts, not accuracy


def unit(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length."""
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def allocating_score(image_feats, id_text, groups, tau):
    """NegLabel's score as it was computed before issue 16: fresh arrays for every step."""
    ngroup, size, dim = groups.shape
    flat = groups.reshape(ngroup * size, dim)
    out = np.empty(len(image_feats))
    for start in range(0, len(image_feats), N.CHUNK_ROWS):
        block = image_feats[start:start + N.CHUNK_ROWS]
        neg = (block @ flat.T).reshape(len(block), ngroup, size)
        id_mass = N.logsumexp_rows((block @ id_text.T) / tau)
        neg_mass = N.logsumexp_rows(neg / tau)
        out[start:start + N.CHUNK_ROWS] = np.mean(N.sigmoid(id_mass[:, None] - neg_mass), axis=1)
    return out


def test_in_place_neglabel_score_is_bit_identical_and_leaves_its_inputs_alone(monkeypatch):
    rng = np.random.default_rng(16)
    monkeypatch.setattr(N, "CHUNK_ROWS", 64)  # several chunks, the last one partial
    feats, id_text = unit(rng.normal(size=(150, 32))), unit(rng.normal(size=(10, 32)))
    groups = unit(rng.normal(size=(20, 7, 32)))
    copies = (feats.copy(), id_text.copy(), groups.copy())
    scores = N.neglabel_score(feats, id_text, groups, 0.01)
    assert np.array_equal(scores, allocating_score(feats, id_text, groups, 0.01))
    assert all(np.array_equal(a, b) for a, b in zip((feats, id_text, groups), copies))
    values = rng.normal(size=(5, 4, 9)) * 50
    kept = values.copy()
    expected = N.logsumexp_rows(values)
    assert np.array_equal(values, kept)  # the default never writes into its argument
    assert np.array_equal(N.logsumexp_rows(values, overwrite=True), expected)


def test_the_plan_is_built_once_per_label_set_and_is_the_same_for_every_target(tmp_path):
    (tmp_path / "words.txt").write_text("\n".join(f"w{i}" for i in range(700)))
    resources = ScorerResources(neglabel_lexicon=tmp_path / "words.txt")
    scorer = N.NegLabel()
    near, far = (ScoreContext("s", "d", ("a", "b"), ("{}",), kind, resources) for kind in ("near", "far"))
    assert scorer.plan(near) is scorer.plan(far)
    other = scorer.plan(ScoreContext("s", "d", ("a", "c"), ("{}",), "far", resources))
    assert other.text_sets[N.ID_SET] == ("the nice a", "the nice c")
    assert other.text_sets[N.NOUN_SET] == scorer.plan(near).text_sets[N.NOUN_SET]
    assert N.NegLabel().plan(far).fingerprint() == scorer.plan(far).fingerprint()


def counted_run(**overrides):
    """A small toy-ood evaluation (FP32 baseline, 24 images per split, no feature cache) and its document."""
    request = EvalRequest(suites=("toy-ood",), quantizer="fp32", limit=LIMIT, feature_cache=False, **overrides)
    return run(resolve(request, build_registry(get_plugin_manager(load_entrypoints=False))))


def test_a_run_without_neglabel_encodes_none_of_its_prompts(tmp_path):
    without = counted_run(scorers=("msp", "energy"))
    prompts = 10 * 5  # the ID classifier: ten toy classes x five templates
    assert without["encoder_calls"]["texts"] == {"fp32": prompts}
    assert "neglabel" not in without["scorers"]
    # the control: where NegLabel runs (near and far pair), its lexicon and ID prompts are encoded, once
    words = [f"w{i}" for i in range(700)]  # 15 % of them: enough for the 100 groups
    (tmp_path / "words.txt").write_text("\n".join(words))
    with_neglabel = counted_run(scorers=("neglabel",), resources=ScorerResources(neglabel_lexicon=tmp_path / "words.txt"))
    assert with_neglabel["encoder_calls"]["texts"] == {"fp32": prompts + len(words) + 10}
    assert {record["scorer"] for record in with_neglabel["results"] if record.get("scorer")} == {"neglabel"}


def test_the_tuned_setting_reuses_the_fp32_ood_scores_and_changes_no_number(monkeypatch):
    from qbench.engine import ood_eval
    from qbench_plugins.scorers.msp import MaximumSoftmaxProbability as MSP

    calls = []
    original_score = MSP.score

    def counting_score(self, inputs, prepared=None):
        """MSP's score, counted."""
        calls.append(len(inputs.logits))
        return original_score(self, inputs, prepared)

    monkeypatch.setattr(MSP, "score", counting_score)
    tuned = dict(scorers=("msp", "energy"), logit_tuning=True, proxy_n=32)
    reused = counted_run(**tuned)
    reused_calls = len(calls)
    original = ood_eval.score_ood_tasks
    monkeypatch.setattr(ood_eval, "score_ood_tasks", lambda *args, reuse_fp32=None, **kwargs: original(*args, **kwargs))
    calls.clear()
    recomputed = counted_run(**tuned)
    # 3 splits x 2 states untuned, then the quantized state's 3 splits tuned (the FP32 ones are reused)
    assert (reused_calls, len(calls)) == (9, 12)
    for section in ("results", "ood_histograms", "reliability", "bin_trajectories", "scorers", "evidence"):
        assert reused[section] == recomputed[section], section
    assert any(record["logit_tuned"] and record.get("scorer") == "msp" for record in reused["results"])
