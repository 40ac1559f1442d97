"""QwT (quantizers.md §2.4) on the tiny open_clip CLIP: the closed-form compensation, its float-extra
bookkeeping, and that it actually lowers the held-out embedding error of its base."""

from __future__ import annotations

import copy

import pytest
import torch

import qbench.registry
from qbench.errors import QbenchError
from qbench.engine.evaluate import EvalRequest, resolve
from qbench.hookspecs import hookimpl
from qbench.plugins import get_plugin_manager
from qbench.quant.blockwise import capture_block_inputs, run_block, token_rows, tower_inputs
from qbench.quant.observers import text_token_mask
from qbench.quant.spec import BitSpec, Scope
from qbench.quant.structure import transformer_blocks
from qbench.quant.verify import verify_quantized
from qbench.registry import build_registry
from qbench_plugins.quantizers.minmax import MinMaxQuantizer
from qbench_plugins.quantizers.qwt import (
    COMPENSATION_ATTR,
    QwTCompensation,
    QwTQuantizer,
    compensation_disabled,
    fit_compensation,
)
from tiny_models import WIDTH, embeddings, proxy_batch, tiny_vlm


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py: tiny models, one thread


@pytest.fixture(scope="module")
def float_model():
    return tiny_vlm()


@pytest.fixture(scope="module")
def calibration(float_model):
    return proxy_batch(float_model, n=48, seed=1)


@pytest.fixture(scope="module")
def held_out(float_model):
    return proxy_batch(float_model, n=64, seed=2)


def quantize_qwt(float_model, calibration, bits="w4a8", scope=Scope.VISUAL, **params):
    return QwTQuantizer.from_params(params).quantize(copy.deepcopy(float_model), BitSpec.parse(bits), scope, calibration, 0)


@pytest.fixture(scope="module")
def joint_w4a8(float_model, calibration):
    return quantize_qwt(float_model, calibration, scope=Scope.JOINT)


def test_compensation_never_raises_block_error_on_calibration_rows(joint_w4a8, calibration):
    """Per block, on its fitting rows: ‖Y_fp − Y_q − (XW+b)‖² ≤ ‖Y_fp − Y_q‖², and R² as reported."""
    model, provenance = joint_w4a8.model, joint_w4a8.provenance
    blocks = transformer_blocks(model, Scope.JOINT.towers)
    improved = 0
    for block in blocks:
        calls = capture_block_inputs(model, block.module, **tower_inputs(block.tower, calibration))
        compensation = getattr(block.module, COMPENSATION_ATTR)
        before = after = total = 0.0
        with compensation_disabled(block.module), torch.no_grad():
            for call in calls:
                gap = run_block(block.module, call, quantized=False) - run_block(block.module, call, quantized=True)
                e = token_rows(gap, call.valid).double()
                r = e - token_rows(compensation(call.x), call.valid).double()
                before += float(e.pow(2).sum())
                after += float(r.pow(2).sum())
                total += float((e - e.mean(dim=0)).pow(2).sum())
        assert after <= before * (1 + 1e-6), block.name
        reported = provenance["blocks"][block.name]
        if reported["applied"]:
            improved += 1
            assert reported["r2"] == pytest.approx(1 - after / total, abs=1e-4)
    assert improved == len(blocks)  # W4 gaps are far from noise: every block's fit explains variance


def test_fit_is_zero_when_quantizers_are_disabled(float_model, calibration):
    base = MinMaxQuantizer().quantize(copy.deepcopy(float_model), BitSpec.parse("w4a8"), Scope.VISUAL, calibration, 0)
    block = transformer_blocks(base.model, ("visual",))[0]
    calls = capture_block_inputs(base.model, block.module, images=calibration.images)
    off = fit_compensation(block.module, calls, ridge=1e-6, quantized=False)
    assert float(off.weight.abs().max()) <= 1e-8 and float(off.bias.abs().max()) <= 1e-8
    assert not off.applied
    on = fit_compensation(block.module, calls, ridge=1e-6, quantized=True)
    assert float(on.weight.abs().max()) > 1e-4  # the same fit does see the quantization gap


def test_compensated_model_has_lower_held_out_embedding_error_than_its_base(float_model, calibration, held_out):
    result = quantize_qwt(float_model, calibration, bits="w4a8")
    reference = embeddings(float_model, held_out)[0]
    with compensation_disabled(result.model):
        base_images = embeddings(result.model, held_out)[0]
    qwt_images = embeddings(result.model, held_out)[0]
    minmax = MinMaxQuantizer().quantize(copy.deepcopy(float_model), BitSpec.parse("w4a8"), Scope.VISUAL, calibration, 0)
    assert torch.equal(base_images, embeddings(minmax.model, held_out)[0])  # the base is untouched
    base_error = float((base_images - reference).pow(2).sum(-1).mean())
    qwt_error = float((qwt_images - reference).pow(2).sum(-1).mean())
    assert qwt_error < base_error
    copied = copy.deepcopy(result.model)  # the compensation hook survives a deep copy
    assert torch.equal(embeddings(copied, held_out)[0], qwt_images)


def test_verification_passes_and_lists_compensations_as_float_extras(joint_w4a8, calibration):
    model = joint_w4a8.model
    blocks = transformer_blocks(model, Scope.JOINT.towers)
    report = verify_quantized(model, calibration.images[:4], calibration.tokens[:4], Scope.JOINT.towers,
                              float_extras=joint_w4a8.float_extras)
    assert report.passed, report.problems
    expected = {f"{block.name}.{COMPENSATION_ATTR}" for block in blocks}
    assert set(report.float_extras) == expected
    assert all("float by design" in reason for reason in report.float_extras.values())
    for name in expected:
        assert isinstance(model.model.get_submodule(name), QwTCompensation)
    assert all(not any(name.startswith(extra) for extra in expected) for name in (m.name for m in report.modules))
    assert joint_w4a8.provenance["compensation_parameters"] == len(blocks) * (WIDTH * WIDTH + WIDTH)


def test_text_rows_stop_at_end_of_text(joint_w4a8, calibration):
    valid = int(text_token_mask(calibration.tokens).sum())
    assert valid < calibration.tokens.numel()
    for block in transformer_blocks(joint_w4a8.model, ("text",)):
        assert joint_w4a8.provenance["blocks"][block.name]["rows"] == valid
    tokens_per_image = (32 // 8) ** 2 + 1  # 32-px images, patch 8, plus the class token
    for block in transformer_blocks(joint_w4a8.model, ("visual",)):
        assert joint_w4a8.provenance["blocks"][block.name]["rows"] == calibration.images.shape[0] * tokens_per_image


@pytest.mark.parametrize("base", ["fp32", "qwt", "no-such-method"])
def test_base_must_be_another_registered_ptq(base, float_model, calibration):
    with pytest.raises(QbenchError):
        quantize_qwt(float_model, calibration, base=base)


# -- the base method comes from the registry the run was resolved with ------------------------------------
class RegistryOnlyBase(MinMaxQuantizer):
    """A PTQ method that only a test registry has (the global registry never sees it)."""

    name = "test-qwt-base"


class RegistryOnlyPlugin:
    qbench_distribution = ("qbench-test-qwt-base", "1.0")

    @hookimpl
    def qbench_register_quantizers(self):
        return [RegistryOnlyBase]


@pytest.fixture(scope="module")
def extended_registry():
    return build_registry(get_plugin_manager(load_entrypoints=False, extra_plugins=(RegistryOnlyPlugin(),)))


def test_qwt_quantizes_with_a_base_from_the_registry_it_was_given(extended_registry, float_model, calibration,
                                                                 monkeypatch):
    assert "test-qwt-base" not in build_registry().names("quantizers")

    def no_global_registry(*args, **kwargs):
        raise AssertionError("a bound qwt must not build a registry of its own")

    qwt = extended_registry.get("quantizers", "qwt").from_params({"base": "test-qwt-base"}, registry=extended_registry)
    monkeypatch.setattr(qbench.registry, "build_registry", no_global_registry)
    result = qwt.quantize(copy.deepcopy(float_model), BitSpec.parse("w8a8"), Scope.VISUAL, calibration, 0)
    assert result.provenance["base"]["method"] == "test-qwt-base"
    assert result.provenance["blocks_compensated"] > 0
    assert qwt.verification_layout(BitSpec.parse("w8a8")).weight == "per_channel"


def test_resolve_binds_qwt_to_the_run_registry(extended_registry):
    request = EvalRequest(quantizer="qwt", quantizer_params=(("base", "test-qwt-base"),))
    resolved = resolve(request, extended_registry, require_suites=False)
    assert resolved.quantizer.registry is extended_registry
    with pytest.raises(QbenchError, match="unknown quantizer 'test-qwt-base'"):  # a registry without the plugin
        resolve(request, build_registry(get_plugin_manager(load_entrypoints=False)), require_suites=False)


@pytest.mark.parametrize("base, message", [("minmx", "did you mean 'minmax'"), ("lsq-pc", "another PTQ quantizer"),
                                           ("qwt", "another PTQ quantizer")])
def test_a_bad_base_fails_at_resolution_in_one_line(extended_registry, base, message):
    request = EvalRequest(quantizer="qwt", quantizer_params=(("base", base),))
    with pytest.raises(QbenchError, match=message) as error:
        resolve(request, extended_registry, require_suites=False)
    assert "\n" not in str(error.value)


def test_an_unbound_qwt_names_the_fix_for_a_plugin_base(float_model, calibration):
    with pytest.raises(QbenchError, match=r"registry=") as error:
        quantize_qwt(float_model, calibration, base="test-qwt-base")
    assert "unknown quantizer 'test-qwt-base'" in str(error.value) and "\n" not in str(error.value)
