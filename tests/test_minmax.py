"""The minmax PTQ quantizer (quantizers.md §2.1) and the fp32 baseline on a tiny offline open_clip CLIP."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from qbench.errors import QbenchError
from qbench.quant.base import CalibrationData
from qbench.quant.calibrate import calibrate, freeze_quantizers
from qbench.quant.fake_quant import count_unique_per_group
from qbench.quant.modules import (
    Mode,
    QuantConv2d,
    QuantizableMultiheadAttention,
    QuantModule,
    TensorQuantizer,
    in_scope_modules,
    make_activation_quantizer,
    make_weight_quantizer,
    quant_modules,
    quantize_modules,
    rewrite_attention,
)
from qbench.quant.spec import BitSpec, Scope
from qbench.quant.verify import verify_quantized
from tiny_models import tiny_vlm
from qbench_plugins.quantizers import fp32 as fp32_plugin
from qbench_plugins.quantizers import minmax as minmax_plugin
from qbench_plugins.quantizers.fp32 import FP32Baseline
from qbench_plugins.quantizers.minmax import MinMaxQuantizer


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def float_vlm():
    return tiny_vlm()


@pytest.fixture(scope="module")
def data(float_vlm):
    torch.manual_seed(1)
    captions = tuple(f"a photo of a {word}" for word in ("cat", "dog", "bird", "car", "tree", "boat", "cup", "hat"))
    return CalibrationData("test", torch.randn(8, 3, 32, 32), float_vlm.tokenize(captions), captions, "fp")


def quantize(float_vlm, data, bits="w8a8", scope=Scope.VISUAL, **params):
    quantizer = MinMaxQuantizer.from_params(params)
    return quantizer.quantize(copy.deepcopy(float_vlm), BitSpec.parse(bits), scope, data, seed=0)


def expected_count(vlm, towers) -> int:
    """Conv/Linear modules of the towers after the rewrite: 4 attention projections replace each MHA."""
    count = 0
    for name, module in vlm.model.named_modules():
        if vlm.tower_of(name) not in towers:
            continue
        count += isinstance(module, (nn.Conv2d, nn.Linear)) and ".attn.out_proj" not in name
        count += 4 * isinstance(module, nn.MultiheadAttention)
    return count


def test_plugin_contract():
    assert (MinMaxQuantizer.name, MinMaxQuantizer.family, MinMaxQuantizer.needs_data) == ("minmax", "ptq", True)
    assert "Jacob" in MinMaxQuantizer.citation and "CVPR 2018" in MinMaxQuantizer.citation
    assert "Jacob" in (MinMaxQuantizer.__doc__ or "") + (minmax_plugin.__doc__ or "")
    assert "\n" not in MinMaxQuantizer.summary
    assert MinMaxQuantizer.defaults() == {"n_calibration": 1000, "weight_granularity": "per_channel", "batch_size": 100}
    assert minmax_plugin.qbench_register_quantizers() == [MinMaxQuantizer]
    assert fp32_plugin.qbench_register_quantizers() == [FP32Baseline]
    assert (FP32Baseline.name, FP32Baseline.family, FP32Baseline.needs_data) == ("fp32", "baseline", False)
    with pytest.raises(Exception):
        MinMaxQuantizer.Config().n_calibration = 5  # frozen


@pytest.mark.parametrize("bits", ["w8a8", "w4a8"])
@pytest.mark.parametrize("scope", [Scope.VISUAL, Scope.JOINT])
def test_quantized_model_verifies_with_expected_module_count(float_vlm, data, bits, scope):
    result = quantize(float_vlm, data, bits, scope)
    vlm = result.model
    expected = expected_count(float_vlm, scope.towers)
    assert expected == (13 if scope is Scope.VISUAL else 25)
    report = verify_quantized(vlm, data.images[:4], data.tokens[:4], scope.towers)
    assert report.passed, report.problems
    assert report.n_modules == expected
    provenance = result.provenance
    # 2 attention blocks per tower; only the towers in scope are rewritten, so the text tower of a
    # visual-scope model keeps its float nn.MultiheadAttention (bit-identical text features)
    assert provenance["quantized_modules"] == expected
    assert provenance["attention_modules_rewritten"] == (2 if scope is Scope.VISUAL else 4)
    assert provenance["bits"] == bits and provenance["scope"] == scope.value
    assert provenance["calibration"]["n_images"] == 8
    assert provenance["calibration"]["n_texts"] == (8 if scope is Scope.JOINT else 0)
    assert provenance["weights"]["granularity"] == "per_channel" and provenance["weights"]["format"].endswith("-sym")
    assert provenance["activations"]["granularity"] == "per_tensor" and provenance["activations"]["format"].endswith("-asym")


def test_out_proj_runs_quantized(float_vlm, data):
    vlm = quantize(float_vlm, data).model
    attn = vlm.model.visual.transformer.resblocks[0].attn
    assert isinstance(attn, QuantizableMultiheadAttention) and isinstance(attn.out_proj, QuantModule)
    seen = {}
    attn.out_proj.register_forward_hook(lambda module, inputs, output: seen.setdefault("float input", inputs[0]))
    attn.out_proj.act_quantizer.register_forward_hook(lambda module, inputs, output: seen.setdefault("quantized", output))
    with torch.no_grad():
        vlm.encode_image(data.images[:2])
    assert set(seen) == {"float input", "quantized"}
    assert int(count_unique_per_group(seen["float input"].reshape(1, -1))) > 256
    assert int(count_unique_per_group(seen["quantized"].reshape(1, -1))) <= 256


def test_heads_and_out_of_scope_tower_stay_float(float_vlm, data):
    vlm = quantize(float_vlm, data, "w4a8", Scope.VISUAL).model
    assert torch.equal(vlm.model.visual.proj, float_vlm.model.visual.proj)
    assert torch.equal(vlm.model.text_projection, float_vlm.model.text_projection)
    assert not any(isinstance(module, TensorQuantizer) for module in vlm.model.transformer.modules())
    with torch.no_grad():  # text tower untouched in visual scope (only its attention was rewritten)
        assert (vlm.encode_text(data.tokens) - float_vlm.encode_text(data.tokens)).abs().max() <= 1e-5
    # weights are the float Parameters, wrapped, not re-created
    quantized_fc = vlm.model.visual.transformer.resblocks[1].mlp.c_fc
    assert isinstance(quantized_fc.weight, nn.Parameter)
    assert torch.equal(quantized_fc.weight, float_vlm.model.visual.transformer.resblocks[1].mlp.c_fc.weight)


def test_four_bit_weights_cost_more_than_eight(float_vlm, data):
    def error(bits, scope):
        vlm = quantize(float_vlm, data, bits, scope).model
        with torch.no_grad():
            image = (vlm.encode_image(data.images) - float_vlm.encode_image(data.images)).norm(dim=1).mean()
            text = (vlm.encode_text(data.tokens) - float_vlm.encode_text(data.tokens)).norm(dim=1).mean()
        return float(image), float(text)

    w8, w4 = error("w8a8", Scope.JOINT), error("w4a8", Scope.JOINT)
    assert 0 < w8[0] < w4[0] and 0 < w8[1] < w4[1]


def test_activation_zero_is_exact_and_error_within_half_step(float_vlm, data):
    vlm = quantize(float_vlm, data).model
    conv = vlm.model.visual.conv1
    assert isinstance(conv, QuantConv2d)
    quantizer = conv.act_quantizer
    assert float(quantizer(torch.zeros(1, 3, 2, 2)).abs().max()) == 0.0
    inside = data.images.clamp(float(data.images.min()), float(data.images.max()))
    assert float((quantizer(inside) - inside).abs().max()) <= float(quantizer.scale) / 2 * (1 + 1e-5)


def test_per_tensor_weights_reproduce_jacob_et_al(float_vlm, data):
    result = quantize(float_vlm, data, weight_granularity="per_tensor")
    assert result.provenance["weights"]["granularity"] == "per_tensor"
    assert result.provenance["weights"]["format"] == "int8-asym"
    report = verify_quantized(result.model, data.images[:2], None, ("visual",))
    assert report.passed and {c.weight_granularity for c in report.modules} == {"per_tensor"}
    with pytest.raises(QbenchError, match="weight_granularity"):
        quantize(float_vlm, data, weight_granularity="per_row")


def test_calibration_budget_is_respected(float_vlm, data):
    gain = torch.tensor([1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0, 5.0]).view(-1, 1, 1, 1)
    data = dataclasses.replace(data, images=data.images * gain)  # images past the budget would widen ranges
    result = quantize(float_vlm, data, n_calibration=3, batch_size=2)
    assert result.provenance["calibration"]["n_images"] == 3
    assert result.provenance["config"] == {"n_calibration": 3, "weight_granularity": "per_channel", "batch_size": 2}
    first = data.images[:3]  # conv1 consumes the pixels: its range is exactly theirs
    quantizer = result.model.model.visual.conv1.act_quantizer
    assert torch.equal(quantizer.scale, quantizer.fmt.qparams(first.min(), first.max())[0].reshape(1))


def test_missing_calibration_data_is_a_one_line_error(float_vlm):
    with pytest.raises(QbenchError, match="needs calibration data") as error:
        MinMaxQuantizer().quantize(copy.deepcopy(float_vlm), BitSpec.parse("w8a8"), Scope.VISUAL, None, seed=0)
    assert "\n" not in str(error.value)


def test_same_seed_same_result(float_vlm, data):
    outputs = []
    for _ in range(2):
        vlm = quantize(float_vlm, data, "w4a8", Scope.JOINT).model
        with torch.no_grad():
            outputs.append((vlm.encode_image(data.images), vlm.encode_text(data.tokens)))
    assert all(torch.equal(a, b) for a, b in zip(*outputs))


def test_fp32_baseline_is_a_no_op(float_vlm, data):
    vlm = copy.deepcopy(float_vlm)
    result = FP32Baseline().quantize(vlm, BitSpec.parse("w4a8"), Scope.JOINT, None, seed=0)
    assert result.model is vlm and result.provenance["method"] == "fp32"
    assert not any(isinstance(module, TensorQuantizer) for module in vlm.modules())
    with torch.no_grad():
        assert torch.equal(vlm.encode_image(data.images), float_vlm.encode_image(data.images))
    report = verify_quantized(vlm, data.images[:2], data.tokens[:2], ("visual",), expect_quantized=False)
    assert report.passed and report.n_modules == 0


def test_building_blocks_compose_into_a_custom_method(float_vlm, data):
    """What a new PTQ plugin writes: rewrite, wrap with factories, calibrate, freeze."""
    vlm = copy.deepcopy(float_vlm)
    rewrite_attention(vlm.model)
    wrapped = quantize_modules(
        vlm,
        ("visual",),
        lambda name, module: make_weight_quantizer(6, "group-32"),  # the core's smallest group (qbench.quant.layout)
        lambda name, module: make_activation_quantizer(8, "per_token"),
    )
    with pytest.raises(ValueError, match="already quantized"):
        quantize_modules(vlm, ("visual",), lambda n, m: make_weight_quantizer(6), lambda n, m: None)
    assert len(wrapped) == len(in_scope_modules(vlm, ("visual",))) == 13
    assert all(q.mode is Mode.CALIBRATE for _, m in quant_modules(vlm.model) for _, q in m.quantizers())
    counts = calibrate(vlm, data.images, batch_size=3)
    assert counts == {"images": 8, "texts": 0}
    assert freeze_quantizers(vlm.model) == []
    report = verify_quantized(vlm, data.images[:2], None, ("visual",))
    assert report.passed, report.problems
    assert {(c.weight_granularity, c.act_granularity) for c in report.modules} == {("group-32", "per_token")}
    assert all(c.weight_max_unique <= 64 for c in report.modules)


def test_wrapping_refuses_unrewritten_attention(float_vlm):
    vlm = copy.deepcopy(float_vlm)
    with pytest.raises(ValueError, match="rewrite_attention"):
        quantize_modules(vlm, ("visual",), lambda n, m: make_weight_quantizer(8), lambda n, m: None)


def test_text_calibration_ignores_padding(float_vlm, data):
    """Changing only the padding embeddings must not change any text activation range (§1.1)."""
    def text_scales(vlm_float):
        result = quantize(vlm_float, data, "w8a8", Scope.JOINT)
        return [m.act_quantizer.scale for name, m in quant_modules(result.model.model) if name.startswith("transformer.")]

    altered = copy.deepcopy(float_vlm)
    with torch.no_grad():
        altered.model.token_embedding.weight[0] += 50.0  # token 0 = padding after end-of-text
        altered.model.positional_embedding[-1] += 50.0  # last position: padding for every caption here
    for a, b in zip(text_scales(float_vlm), text_scales(altered)):
        assert torch.equal(a, b)


def test_weight_only_needs_no_calibration_pass(float_vlm, data):
    result = quantize(float_vlm, data, "w4a16", Scope.JOINT)
    assert result.provenance["activations"] == "float"
    assert result.provenance["calibration"]["n_images"] == 0 == result.provenance["calibration"]["n_texts"]
    report = verify_quantized(result.model, data.images[:2], data.tokens[:2], Scope.JOINT.towers)
    assert report.passed and report.n_modules == 25


def test_visual_scope_leaves_the_text_tower_bit_identical(float_vlm, data):
    before = float_vlm.encode_text(data.tokens[:4])
    result = quantize(float_vlm, data, "w4a8", Scope.VISUAL)
    assert torch.equal(result.model.encode_text(data.tokens[:4]), before)
    assert not any(type(module).__name__ == "QuantizableMultiheadAttention"
                   for name, module in result.model.model.named_modules() if result.model.tower_of(name + ".") == "text")
