"""Every registered quantizer — built-in or installed — on a tiny model, the moment it is registered:
typed defaults, a citation, verification against the run's bit spec (at most 2^b values per core group of
every tensor a kernel consumes, declared bits equal to the spec's) at w8a8 and w4a8, finite embeddings, the
same result from the same seed, and a checkpoint round trip (safetensors + JSON structure) that rebuilds a
bit-identical quantized model."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from qbench.checkpoint import read_checkpoint, restore_quantized, save_checkpoint
from qbench.quant.base import FAMILIES, QuantizedModel
from qbench.quant.spec import BitSpec, Scope
from qbench.quant.verify import verify_quantized
from qbench.registry import build_registry
from tiny_models import embeddings

pytestmark = pytest.mark.usefixtures("single_thread")
QUANTIZERS = sorted(entry.name for entry in build_registry().entries("quantizers"))


def quantized(name: str, float_model, calibration, bits: str, scope: Scope, seed: int = 0) -> QuantizedModel:
    quantizer = build_registry().get("quantizers", name)()
    data = calibration if quantizer.needs_data else None
    return quantizer.quantize(copy.deepcopy(float_model), BitSpec.parse(bits), scope, data, seed)


_RESULTS: dict[tuple[str, str, Scope], QuantizedModel] = {}


def quantized_once(name: str, float_model, calibration, bits: str, scope: Scope) -> QuantizedModel:
    """One quantization per (quantizer, bits, scope) shared by the tests below, which only read it."""
    key = (name, bits, scope)
    if key not in _RESULTS:
        _RESULTS[key] = quantized(name, float_model, calibration, bits, scope)
    return _RESULTS[key]


def verify_against_spec(name: str, model, float_extras, calibration, bits: str, scope: Scope):
    """Verify with the run's bit spec and quantizer, and check every entry against the spec: declared and
    expected bits equal the spec's (the pixel-reading layer: the layout's first-layer bits), counts within 2^b."""
    cls = build_registry().get("quantizers", name)
    spec = BitSpec.parse(bits)
    report = verify_quantized(model, calibration.images[:4], calibration.tokens[:4], scope.towers,
                              float_extras=float_extras, expect_quantized=cls.family != "baseline",
                              bits=spec, quantizer=cls())
    assert report.passed, report.problems
    expected = report.expected
    assert expected["bits"] == bits
    first_bits = expected["first_layer_bits"]
    for check in report.modules:
        first = first_bits is not None and check.name in expected["first_layers"]
        weight_bits = first_bits if first else spec.weight_bits
        act_bits = (first_bits if first else spec.act_bits) if spec.quantizes_activations else spec.act_bits
        assert (check.weight_bits, check.expected_weight_bits) == (weight_bits, weight_bits), check
        assert (check.act_bits, check.expected_act_bits) == (act_bits, act_bits), check
        assert 2 <= check.weight_max_unique <= 2**weight_bits and check.weight_grid_steps <= 2**weight_bits - 1
        if spec.quantizes_activations:
            assert 2 <= check.act_max_unique <= 2**act_bits and check.act_min_group >= 1
    for slot in report.slots:
        assert slot.act_bits == slot.expected_act_bits == spec.act_bits and slot.fired, slot
    return report


@pytest.mark.parametrize("name", QUANTIZERS)
def test_declares_family_citation_and_typed_defaults(name):
    cls = build_registry().get("quantizers", name)
    assert cls.name == name and cls.family in FAMILIES
    assert cls.citation.strip() and cls.summary.strip() and "\n" not in cls.summary
    for field in dataclasses.fields(cls.Config):
        default = getattr(cls.Config(), field.name)
        assert isinstance(default, (int, float, str, bool, tuple)), f"{name}.{field.name} has an untyped default"
    assert cls.from_params({}).params() == cls.defaults()


SETTINGS = [("w8a8", Scope.VISUAL), ("w4a8", Scope.VISUAL), ("w8a8", Scope.JOINT)]


@pytest.mark.parametrize("bits, scope", SETTINGS, ids=[f"{bits}-{scope.value}" for bits, scope in SETTINGS])
@pytest.mark.parametrize("name", QUANTIZERS)
def test_verifies_and_stays_finite(name, bits, scope, float_model, calibration):
    result = quantized_once(name, float_model, calibration, bits, scope)
    model = result.model
    report = verify_against_spec(name, model, result.float_extras, calibration, bits, scope)
    image, text = embeddings(model, calibration)
    assert torch.isfinite(image).all() and torch.isfinite(text).all()
    assert isinstance(result.provenance, dict)


@pytest.mark.parametrize("name", QUANTIZERS)
def test_same_seed_same_model(name, float_model, calibration):
    first = embeddings(quantized_once(name, float_model, calibration, "w4a8", Scope.VISUAL).model, calibration)[0]
    second = embeddings(quantized(name, float_model, calibration, "w4a8", Scope.VISUAL).model, calibration)[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("bits, scope", [("w4a8", Scope.VISUAL), ("w8a8", Scope.JOINT)], ids=["w4a8-visual", "w8a8-joint"])
@pytest.mark.parametrize("name", QUANTIZERS)
def test_checkpoint_round_trip_rebuilds_the_same_model(name, bits, scope, float_model, calibration, tmp_path):
    result = quantized_once(name, float_model, calibration, bits, scope)
    save_checkpoint(tmp_path / "checkpoint", float_model, result, {"config_hash": "test", "quantizer": name})
    restored = restore_quantized(read_checkpoint(tmp_path / "checkpoint"), float_model)
    for original, rebuilt in zip(embeddings(result.model, calibration), embeddings(restored.model, calibration)):
        assert torch.equal(original, rebuilt)
    assert restored.float_extras == result.float_extras
    verify_against_spec(name, restored.model, restored.float_extras, calibration, bits, scope)
