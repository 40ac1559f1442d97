"""Every built-in model spec through the conformance kit (:func:`qbench.testing.check_model`): identity fields,
a one-line error naming a missing ``--weights`` file, and (for the offline toy models and one zoo architecture,
built with random weights) unit-length image and text embeddings of one dimension. Also the kit's tiny model of
each family and its proxy calibration builder, and broken model specs failing with a readable line."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qbench.errors import QbenchError
from qbench.plugins import get_plugin_manager
from qbench.registry import build_registry
from qbench.testing import (
    TINY_ARCHITECTURES,
    ConformanceError,
    ConformanceSkip,
    calibration_from_proxy,
    check_model,
    check_quantizer,
    check_vlm,
    tiny_family_vlm,
    tiny_vlm,
)

pytestmark = pytest.mark.usefixtures("single_thread")
REGISTRY = build_registry(get_plugin_manager(load_entrypoints=False))
MODELS = REGISTRY.names("models")
BUILT_ZOO_MODEL = "clip-vit-b32-openai"  # one full-size architecture built with random weights (about a second)


def builds(name: str) -> bool:
    """Random-init builds for the toy tier and one zoo model; the other zoo architectures are covered by
    ``tests/test_zoo.py`` at reduced depth, and building them at full size here would take minutes."""
    return REGISTRY.get("models", name).tier == "toy" or name == BUILT_ZOO_MODEL


@pytest.mark.parametrize("name", MODELS)
def test_builtin_model_conforms(name, tmp_path):
    try:
        check_model(REGISTRY.get("models", name), build=builds(name), folder=tmp_path)
    except ConformanceSkip as reason:
        pytest.fail(f"a built-in model should build with random weights offline: {reason}")


def test_every_builtin_model_is_checked():
    assert BUILT_ZOO_MODEL in MODELS and any(REGISTRY.get("models", name).tier == "toy" for name in MODELS)


# -- the kit's tiny models -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(TINY_ARCHITECTURES))
def test_tiny_model_of_each_family_is_a_working_vlm(family):
    if family == "convnext":
        pytest.importorskip("timm", reason="the tiny ConvNeXt tower is a timm model")
    vlm = tiny_family_vlm(family)
    check_vlm(vlm, f"tiny {family}")
    if family == "siglip":
        assert vlm.logit_bias is not None


def test_tiny_family_vlm_is_deterministic_and_names_unknown_families():
    first, second = tiny_family_vlm("clip", seed=3), tiny_family_vlm("clip", seed=3)
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key
    with pytest.raises(QbenchError, match="no tiny architecture for model family 'clipp'"):
        tiny_family_vlm("clipp")


def test_the_test_suite_uses_the_kit_models():
    """``tests/tiny_models.py`` re-exports the kit, so qbench's tests and plugin authors build the same models."""
    import tiny_models

    from qbench.testing import proxy_batch

    assert tiny_models.tiny_vlm is tiny_vlm and tiny_models.proxy_batch is proxy_batch


def test_calibration_from_a_registered_proxy_quantizes(tmp_path):
    """Proxy pairs preprocessed and tokenized for a tiny model drive a full quantizer conformance check."""
    vlm = tiny_family_vlm("clip")
    data = calibration_from_proxy(vlm, REGISTRY.get("proxies", "toy-proxy"), n=8, seed=1)
    assert data.images.shape == (8, 3, 32, 32) and data.tokens.shape == (8, 16) and len(data.captions) == 8
    again = calibration_from_proxy(vlm, REGISTRY.get("proxies", "toy-proxy"), n=8, seed=1)
    assert torch.equal(data.images, again.images) and data.fingerprint == again.fingerprint
    check_quantizer(REGISTRY.get("quantizers", "minmax"), vlm, data, folder=tmp_path)


# -- broken model specs --------------------------------------------------------------------------------------
def toy_spec(**changes):
    """The toy model's spec with some fields replaced."""
    return dataclasses.replace(REGISTRY.get("models", "toy-clip"), **changes)


def test_a_loader_that_ignores_missing_weights_fails(tmp_path):
    spec = toy_spec(loader=lambda request: tiny_family_vlm("clip"))
    with pytest.raises(ConformanceError, match="no-such-weights.safetensors.*did not fail"):
        check_model(spec, folder=tmp_path)


def test_a_loader_with_a_traceback_fails(tmp_path):
    def loader(request):
        """Opens the weights file without checking it exists."""
        if request.weights:
            open(request.weights, "rb")
        return tiny_family_vlm("clip")

    with pytest.raises(ConformanceError, match="raised FileNotFoundError.*instead"):
        check_model(toy_spec(loader=loader), folder=tmp_path)


def test_identity_fields_and_the_built_model_are_checked(tmp_path):
    with pytest.raises(ConformanceError, match="weights_tag must be a non-empty string"):
        check_model(toy_spec(weights_tag=""), folder=tmp_path)
    real = REGISTRY.get("models", "toy-clip").loader

    def loader(request):
        """Returns something that is not a VLM for a random-init build."""
        if request.random_init:
            return "not a model"
        return real(request)

    with pytest.raises(ConformanceError, match="returned str, not a qbench.model.VLM"):
        check_model(toy_spec(loader=loader), folder=tmp_path)


def test_a_model_without_random_init_is_skipped_after_the_other_checks(tmp_path):
    real = REGISTRY.get("models", "toy-clip").loader

    def loader(request):
        """Has no random-init build."""
        if request.random_init:
            raise QbenchError("acme-clip has no random-init build")
        return real(request)

    with pytest.raises(ConformanceSkip, match="no random-init build offline"):
        check_model(toy_spec(loader=loader), folder=tmp_path)
