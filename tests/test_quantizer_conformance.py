"""Every built-in quantizer on a tiny model, the moment it is registered, through the installable conformance
kit (:mod:`qbench.testing.conformance`, the checks ``pytest --qbench-conformance`` runs on installed plugins):
typed defaults, a citation, one-line errors for unknown parameters and missing calibration data, verification
against the run's bit spec (at most 2^b values per core group of every tensor a kernel consumes, declared bits
equal to the spec's) at w8a8 and w4a8, finite embeddings, untouched calibration data, the same result from the
same seed, and a checkpoint round trip (safetensors + JSON structure) that rebuilds a bit-identical model.

The registry is built without entry points: these are qbench's own items (installed plugins are checked by
``tests/test_conformance_plugin.py`` and by authors with ``pytest --qbench-conformance``)."""

from __future__ import annotations

import pytest

from qbench.plugins import get_plugin_manager
from qbench.quant.base import QuantizedModel
from qbench.registry import build_registry
from qbench.testing import conformance, proxy_batch
from qbench.testing.conformance import (
    CHECKPOINT_SETTINGS,
    QUANTIZER_SETTINGS,
    ConformanceError,
    check_quantized_model,
    check_quantizer_calibration,
    check_quantizer_checkpoint,
    check_quantizer_declaration,
    check_quantizer_determinism,
    quantize_for_check,
)

pytestmark = pytest.mark.usefixtures("single_thread")
REGISTRY = build_registry(get_plugin_manager(load_entrypoints=False))
QUANTIZERS = REGISTRY.names("quantizers")


def quantizer(name: str) -> type:
    """The registered quantizer class ``name``."""
    return REGISTRY.get("quantizers", name)


_RESULTS: dict[tuple[str, str, str], QuantizedModel] = {}


def quantized_once(name: str, float_model, calibration, bits: str, scope: str) -> QuantizedModel:
    """One quantization per (quantizer, bits, scope) shared by the tests below, which only read it."""
    key = (name, bits, scope)
    if key not in _RESULTS:
        _RESULTS[key] = quantize_for_check(quantizer(name), float_model, calibration, bits, scope)
    return _RESULTS[key]


def test_every_builtin_quantizer_is_checked():
    """The parametrization below is the registry's, so a new built-in is checked as soon as it registers."""
    assert "minmax" in QUANTIZERS and len(QUANTIZERS) >= 10
    assert all(conformance.is_builtin(entry) for entry in REGISTRY.entries("quantizers"))


@pytest.mark.parametrize("name", QUANTIZERS)
def test_declares_family_citation_and_typed_defaults(name):
    check_quantizer_declaration(quantizer(name))


@pytest.mark.parametrize("name", QUANTIZERS)
def test_missing_calibration_data_is_one_line(name, float_model):
    check_quantizer_calibration(quantizer(name), float_model)


SETTING_IDS = [f"{bits}-{scope}" for bits, scope in QUANTIZER_SETTINGS]
CHECKPOINT_IDS = [f"{bits}-{scope}" for bits, scope in CHECKPOINT_SETTINGS]


@pytest.mark.parametrize("bits, scope", QUANTIZER_SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("name", QUANTIZERS)
def test_verifies_and_stays_finite(name, bits, scope, float_model, calibration):
    result = quantized_once(name, float_model, calibration, bits, scope)
    report = check_quantized_model(quantizer(name), result, calibration, bits, scope)
    assert report.passed and (report.modules or quantizer(name).family == "baseline")


@pytest.mark.parametrize("name", QUANTIZERS)
def test_same_seed_same_model(name, float_model, calibration):
    first = quantized_once(name, float_model, calibration, *conformance.DETERMINISM_SETTING)
    check_quantizer_determinism(quantizer(name), float_model, calibration, first)


@pytest.mark.parametrize("bits, scope", CHECKPOINT_SETTINGS, ids=CHECKPOINT_IDS)
@pytest.mark.parametrize("name", QUANTIZERS)
def test_checkpoint_round_trip_rebuilds_the_same_model(name, bits, scope, float_model, calibration, tmp_path):
    result = quantized_once(name, float_model, calibration, bits, scope)
    check_quantizer_checkpoint(quantizer(name), float_model, calibration, result, bits, scope, tmp_path)


# -- the checks catch what they claim to catch ---------------------------------------------------------------
def _broken(base_name: str, **overrides) -> type:
    """A subclass of a built-in quantizer with some attributes or methods replaced (a deliberately broken one)."""
    return type(f"Broken{base_name.title().replace('-', '')}", (quantizer(base_name),), overrides)


def test_a_wrong_family_or_multi_line_summary_fails_the_declaration_check():
    with pytest.raises(ConformanceError, match="family 'PTQ' is not one of"):
        check_quantizer_declaration(_broken("minmax", family="PTQ"))
    with pytest.raises(ConformanceError, match="summary must be one line"):
        check_quantizer_declaration(_broken("minmax", summary="two\nlines"))


def test_a_quantizer_that_crashes_without_data_fails_the_calibration_check(float_model):
    def quantize(self, model, bits, scope, calibration, seed):
        """Reads the calibration images without checking they were given."""
        return calibration.images  # AttributeError on None, as a careless method would

    with pytest.raises(ConformanceError, match="raised AttributeError.*calibration data"):
        check_quantizer_calibration(_broken("minmax", quantize=quantize), float_model)


def test_a_quantizer_that_writes_into_its_calibration_data_is_caught(float_model):
    base = quantizer("minmax")

    def quantize(self, model, bits, scope, data, seed):
        """Changes a pixel of the batch it was given (e.g. an in-place normalisation), then quantizes."""
        data.images[0, 0, 0, 0] += 1.0
        return base.quantize(self, model, bits, scope, data, seed)

    data = proxy_batch(float_model, n=8, seed=5)  # its own batch: the shared fixture must stay intact
    with pytest.raises(ConformanceError, match="modified the calibration images"):
        quantize_for_check(_broken("minmax", quantize=quantize), float_model, data, "w8a8", "visual")


def test_a_float_model_fails_verification(float_model, calibration):
    """A 'ptq' method that quantizes nothing (returns the float model) fails the bit-spec verification."""
    def quantize(self, model, bits, scope, data, seed):
        """Returns the float model unchanged."""
        return QuantizedModel(model)

    broken = _broken("minmax", quantize=quantize)
    result = quantize_for_check(broken, float_model, calibration, "w8a8", "visual")
    with pytest.raises(ConformanceError, match="verification failed"):
        check_quantized_model(broken, result, calibration, "w8a8", "visual")


def test_a_seed_ignoring_quantizer_fails_the_determinism_check(float_model, calibration):
    import torch

    base = quantizer("minmax")

    def quantize(self, model, bits, scope, data, seed):
        """Perturbs the model with the global (unseeded) generator, then quantizes."""
        with torch.no_grad():  # unseeded noise on a float parameter of the image tower
            norm = model.model.visual.ln_post.weight
            norm.add_(torch.randn(norm.shape) * 0.1)
        return base.quantize(self, model, bits, scope, data, seed)

    with pytest.raises(ConformanceError, match="embed the same images differently"):
        check_quantizer_determinism(_broken("minmax", quantize=quantize), float_model, calibration)
