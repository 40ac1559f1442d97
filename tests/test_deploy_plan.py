"""The export plan (``qbench.engine.deploy.plan``): qbench's own integers and scales, checked to reproduce the
fake quantizers exactly, and every layer an engine cannot run named with its reason (issue 17)."""

from __future__ import annotations

import copy

import pytest
import torch

from qbench.engine.deploy.plan import affine_spec, capture_layer_inputs, plan_export
from qbench.quant.modules import QuantConv2d, QuantLinear, TensorQuantizer
from qbench.quant.spec import BitSpec, Scope
from tiny_models import tiny_vlm

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data():
    from qbench.testing.data import proxy_batch

    return proxy_batch(tiny_vlm(), n=12)


def quantized(name: str, data, bits: str = "w8a8"):
    """The tiny CLIP quantized by the built-in quantizer ``name`` in visual scope, in eval mode."""
    from qbench.plugins import get_plugin_manager
    from qbench.registry import build_registry

    quantizer = build_registry(get_plugin_manager(load_entrypoints=False)).get("quantizers", name)()
    return quantizer.quantize(tiny_vlm(), BitSpec.parse(bits), Scope.VISUAL, data, seed=0).model.eval()


@pytest.fixture(scope="module")
def minmax(data):
    return quantized("minmax", data)


@pytest.mark.parametrize("name, bits", [("minmax", "w8a8"), ("minmax", "w4a8"), ("smoothquant", "w8a8"),
                                        ("quarot", "w8a8")])
def test_integer_weights_give_back_the_fake_quantized_weights_exactly(name, bits, data):
    vlm = quantized(name, data, bits)
    plan = plan_export(vlm)
    assert plan.exportable, plan.not_exportable_line()
    modules = dict(vlm.model.named_modules())
    weight_bits = BitSpec.parse(bits).weight_bits
    for layer in plan.layers:
        module = modules[layer.name]
        with torch.no_grad():
            fake = module.weight_quantizer(module.weight).reshape(layer.out_features, -1)
        assert torch.equal(layer.dequantized_weight(), fake), layer.name
        codes = layer.weight_int
        assert int(codes.abs().max()) <= 2 ** (weight_bits - 1) - 1
        assert max(row.unique().numel() for row in codes) <= 2 ** weight_bits
        assert torch.equal(layer.weight.scale, module.weight_quantizer.scale.float().reshape(-1))


def test_static_activation_scales_are_the_quantizers_own(minmax):
    plan = plan_export(minmax)
    modules = dict(minmax.model.named_modules())
    assert {layer.kind for layer in plan.layers} == {"linear", "patch_conv"}
    for layer in plan.layers:
        quantizer = modules[layer.name].act_quantizer
        spec = layer.activation
        assert not spec.dynamic and (spec.qmin, spec.qmax) == (0, 255) and spec.native_int8 and spec.int8_shift == 128
        assert torch.equal(spec.scale, quantizer.scale.float().reshape(-1))
        assert torch.equal(spec.zero_point, quantizer.zero_point.float().reshape(-1))
    assert len(plan.layers) == sum(isinstance(m, (QuantLinear, QuantConv2d)) for m in modules.values())


def test_quarot_keeps_its_float_maps_and_its_row_quantized_patch_conv_in_float(data):
    plan = plan_export(quantized("quarot", data))
    assert plan.exportable
    assert all(layer.activation.dynamic and layer.activation.granularity == "per_token" for layer in plan.layers)
    assert [entry.name for entry in plan.simulated] == ["visual.conv1"]
    assert "simulated fake quantization" in plan.simulated[0].reason
    assert any("online Hadamard" in entry.reason for entry in plan.float_ops)
    assert any("rotation" in entry.reason for entry in plan.float_ops)


@pytest.mark.parametrize("name, words", [("apq-vit", "attention"), ("igq-vit", "per instance")])
def test_methods_no_engine_runs_are_not_exportable_with_their_reason(name, words, data):
    plan = plan_export(quantized(name, data))
    assert not plan.exportable
    line = plan.not_exportable_line()
    assert line.startswith("not exportable: ") and words in line and "\n" not in line


class FloorQuantizer(TensorQuantizer):
    """Rounds down instead of to nearest: same (s, z), a different grid map — it must not pass as affine."""

    def quantize(self, x):
        scale, zero_point = self.qparams_for(x)
        return scale * (torch.clamp(torch.floor(x / scale) + zero_point, self.fmt.qmin, self.fmt.qmax) - zero_point)


def test_a_quantizer_that_departs_from_the_affine_formula_is_refused(minmax):
    vlm = copy.deepcopy(minmax)
    target = vlm.model.visual.transformer.resblocks[0].mlp.c_fc
    honest = target.act_quantizer
    assert not isinstance(affine_spec(honest, "activation", (3, 5, target.in_features)), str)
    floor = FloorQuantizer(8, symmetric=False)
    floor.load_state_dict(honest.state_dict(), strict=False)
    floor.scale, floor.zero_point = honest.scale.clone(), honest.zero_point.clone()
    floor.set_mode("quantize")
    target.act_quantizer = floor
    plan = plan_export(vlm)
    assert not plan.exportable
    assert "resblocks.0.mlp.c_fc" in plan.not_exportable_line() and "affine formula" in plan.not_exportable_line()


def test_layer_inputs_are_what_each_simulated_layer_received(minmax):
    plan = plan_export(minmax)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    captured = capture_layer_inputs(minmax, plan, pixels)
    assert set(captured.inputs) == {layer.name for layer in plan.layers}
    assert torch.equal(captured.inputs["visual.conv1"], pixels)
    assert captured.inputs["visual.transformer.resblocks.0.mlp.c_proj"].shape[-1] == plan.layer(
        "visual.transformer.resblocks.0.mlp.c_proj").in_features


def test_planning_needs_eval_mode_and_leaves_the_model_unchanged(minmax):
    before = {key: value.clone() for key, value in minmax.state_dict().items()}
    plan_export(minmax)
    assert all(torch.equal(before[key], value) for key, value in minmax.state_dict().items())
    trained = copy.deepcopy(minmax).train()
    with pytest.raises(ValueError, match="eval mode"):
        plan_export(trained)
