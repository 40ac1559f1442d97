"""Logit tuning (``quantizers.md`` §5): only the logit scale is re-fit, on the proxy pairs, backbone frozen."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from cli_runner import run_cli
from qbench.engine.evaluate import EvalRequest, resolve, run
from qbench.reporting.leaderboard import leaderboard_rows, submission_from_eval, validate_submission
from qbench.engine.logit_tuning import fit_logit_scale, proxy_loss, tune_model_scale
from qbench.model import LoadRequest
from qbench.registry import build_registry

MIS_SET_SCALE = 5.0
LIMIT = 200


def circulant_pairs(true_scale: float, weights=(4, 2, 1, 1), dim: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm pairs whose symmetric-InfoNCE optimum is exactly ``true_scale``.

    K image embeddings ``x_m`` and K text embeddings ``y_k`` with circulant cosines ``c[(k - m) mod K]``,
    chosen so that ``exp(true_scale * c) ∝ weights`` (integers). The pair ``(x_m, y_k)`` is repeated
    ``weights[(k - m) mod K]`` times: every text (and image) is then equally frequent among the negatives,
    and the empirical pairing is the softmax at ``true_scale`` in both directions, whose stationarity
    condition holds at exactly that scale. A random rotation hides the basis.
    """
    k = len(weights)
    shape = np.log(np.asarray(weights, dtype=np.float64)) / true_scale
    # cosines c = shape + beta, with sum(c^2) = 1 so that every text row is a unit vector
    a, b, c = k, 2 * shape.sum(), (shape ** 2).sum() - 1.0
    beta = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    cosines = shape + beta
    images, texts = [], []
    for m in range(k):
        for j in range(k):
            image = np.eye(k)[m]
            text = np.array([cosines[(j - row) % k] for row in range(k)])
            for _ in range(weights[(j - m) % k]):
                images.append(image)
                texts.append(text)
    rotation, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    pad = np.zeros((len(images), dim - k))
    return np.hstack([images, pad]) @ rotation.T, np.hstack([texts, pad]) @ rotation.T


@pytest.mark.parametrize("true_scale", [20.0, 55.0])
@pytest.mark.parametrize("init", [1.0, 7.0, 100.0])
def test_known_temperature_is_recovered(true_scale, init):
    image, text = circulant_pairs(true_scale)
    assert np.allclose(np.linalg.norm(image, axis=1), 1) and np.allclose(np.linalg.norm(text, axis=1), 1)
    tuning = fit_logit_scale(image, text, init)
    assert tuning.s_after == pytest.approx(true_scale, rel=1e-3)
    assert tuning.s_before == init and tuning.loss_after <= tuning.loss_before
    assert tuning.iterations >= 1


def random_pairs(n: int = 200, dim: int = 16, noise: float = 0.7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=1)
    text = torch.nn.functional.normalize(image + noise * torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=1)
    return image, text


@pytest.mark.parametrize("bias", [None, -4.0])
def test_fit_matches_a_bounded_scalar_search_and_never_raises_the_loss(bias):
    image, text = random_pairs()
    reference = minimize_scalar(lambda s: float(proxy_loss(image, text, torch.tensor(s, dtype=torch.float64), bias)),
                                bounds=(1.0, 100.0), method="bounded", options={"xatol": 1e-9})
    for init in (2.0, 30.0, 100.0):
        tuning = fit_logit_scale(image, text, init, bias=bias)
        assert tuning.s_after == pytest.approx(reference.x, rel=1e-3)
        assert tuning.loss_after <= tuning.loss_before
        assert tuning.loss_after == pytest.approx(reference.fun, rel=1e-9)
    again = fit_logit_scale(image, text, 30.0, bias=bias)
    assert again == fit_logit_scale(image, text, 30.0, bias=bias)  # deterministic, bit for bit


def test_scale_is_clamped_to_clip_range():
    image, text = random_pairs()
    perfect = fit_logit_scale(image, image, 10.0)  # separable pairs: the unconstrained optimum is s -> inf
    assert perfect.s_after == 100.0 and perfect.loss_after < perfect.loss_before
    unrelated = fit_logit_scale(image, torch.flip(text, dims=[0]), 10.0)  # no signal: the optimum is s -> 0
    assert unrelated.s_after == 1.0 and unrelated.loss_after < unrelated.loss_before
    narrow = fit_logit_scale(image, text, 3.0, s_min=2.0, s_max=4.0)
    assert 2.0 <= narrow.s_after <= 4.0


def toy_clip(scale: float | None = None):
    model = build_registry().get("models", "toy-clip").loader(LoadRequest())
    if scale is not None:
        with torch.no_grad():
            model.model.logit_scale.fill_(math.log(scale))
    return model.eval()


def test_tuning_leaves_every_parameter_bit_identical():
    model = toy_clip(MIS_SET_SCALE)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    images = torch.rand(24, 3, *model.model.visual.image_size)
    tokens = model.tokenize([f"a photo of thing {i}" for i in range(24)])
    tuning = tune_model_scale(model, images, tokens, batch_size=10)
    assert tuning.s_before == pytest.approx(MIS_SET_SCALE) and tuning.s_after != pytest.approx(MIS_SET_SCALE)
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[name], after[name]) for name in before)  # logit_scale included: applied at scoring


@pytest.fixture(scope="module")
def mis_set_run(tmp_path_factory):
    """minmax w8a8 on toy-clip whose temperature is deliberately wrong (s = 5), tuned on 200 proxy pairs."""
    registry = build_registry()
    request = EvalRequest(suites=("toy-id",), limit=LIMIT, proxy_n=LIMIT, logit_tuning=True,
                          cache_dir=str(tmp_path_factory.mktemp("features")))
    resolved = resolve(request, registry)
    loaded = {}

    def mis_set_loader(load_request: LoadRequest):
        model = toy_clip(MIS_SET_SCALE)
        loaded["model"], loaded["state"] = model, {k: v.clone() for k, v in model.state_dict().items()}
        return model

    resolved = dataclasses.replace(resolved, model=dataclasses.replace(resolved.model, loader=mis_set_loader))
    return run(resolved), loaded


def by_key(document, tuned: bool) -> dict[str, dict]:
    return {record["metric"]: record for record in document["results"] if record["logit_tuned"] is tuned}


def test_tuning_lowers_held_out_nll_of_a_mis_set_temperature(mis_set_run):
    document, _ = mis_set_run
    tuning = document["logit_tuning"]
    assert tuning["s_before"] == pytest.approx(MIS_SET_SCALE)
    assert 1.0 <= tuning["s_after"] <= 100.0 and tuning["s_after"] > 2 * MIS_SET_SCALE
    assert tuning["loss_after"] <= tuning["loss_before"] and tuning["proxy_n"] == LIMIT
    untuned, tuned = by_key(document, False), by_key(document, True)
    assert set(untuned) == set(tuned) == {"accuracy", "ece", "nll"}
    assert tuned["nll"]["quantized"] < untuned["nll"]["quantized"]  # toy-id-test: held out from the proxy
    assert tuned["accuracy"]["quantized"] == untuned["accuracy"]["quantized"]  # a scale never moves the arg-max
    for metric in tuned:  # the FP32 reference stays untuned
        assert tuned[metric]["fp32"] == untuned[metric]["fp32"]
        assert tuned[metric]["diff"] == pytest.approx(tuned[metric]["quantized"] - tuned[metric]["fp32"])


def test_pipeline_never_mutates_the_loaded_model(mis_set_run):
    _, loaded = mis_set_run
    after = loaded["model"].state_dict()
    assert all(torch.equal(loaded["state"][name], after[name]) for name in loaded["state"])


def test_cli_logit_tuning_adds_tuned_records_and_a_default_run_has_none(capsys, monkeypatch):
    import qbench.reporting.submission_checks

    # a --limit run is never a leaderboard submission; here only its tuned records' shape and ranking matter
    monkeypatch.setattr(qbench.reporting.submission_checks, "check_full_run", lambda check, document: None)
    args = ("eval", "--json", "--limit", "60", "--proxy-n", "60", "--quantizer", "fp32")
    code, out, err = run_cli(capsys, *args, "--logit-tuning")
    assert code == 0, err
    tuned_doc = json.loads(out)
    flags = [record["logit_tuned"] for record in tuned_doc["results"]]
    assert flags.count(True) == flags.count(False) == 3
    assert tuned_doc["logit_tuning"]["s_after"] > 0 and tuned_doc["config"]["logit_tuning"] is True
    assert tuned_doc["config"]["proxy"] == "toy-proxy"  # fp32 needs no data, but tuning loads the proxy
    submission = validate_submission(submission_from_eval(tuned_doc, "tester"), "tuned")  # tuned rows are no repeats
    (row,) = leaderboard_rows([submission])  # the leaderboard ranks the untuned records only
    assert all(not record.logit_tuned for record in row.metrics.values())
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    plain = json.loads(out)
    assert [record["logit_tuned"] for record in plain["results"]] == [False] * 3
    assert "logit_tuning" not in plain and "logit_tuning" not in plain["config"]
    assert plain["config"]["config_hash"] != tuned_doc["config"]["config_hash"]
