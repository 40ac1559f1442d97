"""Verification cannot be talked into passing (issue 14, item 6; ``quantizers.md`` §1.9).

Each cheat is a small subclass or wrapper of a real built-in quantizer. The verifier must fail it because it
checks against the *run's* bit spec and counts distinct values on the tensors the kernels actually consume,
grouped by the core's rules — never by what the cheating quantizer declares about itself.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from qbench.engine.evaluate import verification_on_proxy
from qbench.quant.layout import MAX_INSTANCE_GROUPS, MIN_WEIGHT_GROUP, Grouping, QuantLayout
from qbench.quant.modules import QuantLinear, QuantModule, TensorQuantizer, quant_modules
from qbench.quant.spec import BitSpec, Scope
from qbench.quant.verify import verify_quantized
from qbench_plugins.quantizers.apq_vit import APQViTQuantizer
from qbench_plugins.quantizers.minmax import MinMaxQuantizer

pytestmark = pytest.mark.usefixtures("single_thread")

W4A8 = BitSpec.parse("w4a8")
W8A8 = BitSpec.parse("w8a8")


# -- cheats ----------------------------------------------------------------------------------------
class EightBitWeights(MinMaxQuantizer):
    """Registered under the run's label (w4a8) but re-quantizes every weight at 8 bits."""

    name = "cheat-8bit-weights"

    def quantize(self, model, bits, scope, calibration, seed):
        return super().quantize(model, BitSpec(8, bits.act_bits), scope, calibration, seed)


class ClaimsFourBits(TensorQuantizer):
    """An 8-bit quantizer that *declares* 4 bits (so the declared-bits check alone would be satisfied)."""

    @property
    def bits(self) -> int:
        return 4


class FloatPairs(TensorQuantizer):
    """Declares 2-element groups (``group-2``: at most 2 values per group, trivially ≤ 2^b) and hands the kernel
    its float input unchanged."""

    def __init__(self, bits: int) -> None:
        super().__init__(bits, symmetric=False, granularity="group-2", dynamic=True)
        self.freeze()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FloatActivations(MinMaxQuantizer):
    """minmax, then every input quantizer swapped for :class:`FloatPairs`."""

    name = "cheat-float-acts"

    def quantize(self, model, bits, scope, calibration, seed):
        result = super().quantize(model, bits, scope, calibration, seed)
        for _, module in quant_modules(result.model.model):
            module.act_quantizer = FloatPairs(bits.act_bits)
        return result


class DeclaresPairs(FloatActivations):
    """The same cheat, also claiming 2-element input groups in its verification layout."""

    name = "cheat-float-acts-layout"

    def verification_layout(self, bits):
        return QuantLayout(linear_input="group-2", conv_input="group-2")


class PassThroughWeights(TensorQuantizer):
    """Declares the run's bits and stays in ``quantize`` mode, but returns the float weight."""

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return x


class MatmulLinear(QuantLinear):
    """Quantizes both operands, then computes with ``torch.matmul`` and a float correction term."""

    def forward(self, x):
        xq, wq = self.quantized_operands(x)
        return torch.matmul(xq, wq.t()) + torch.matmul(x - xq, self.weight.t()) + self.bias


def minmax(float_model, calibration, bits: BitSpec, scope: Scope = Scope.VISUAL):
    return MinMaxQuantizer().quantize(copy.deepcopy(float_model), bits, scope, calibration, seed=0)


def verify(model, calibration, bits, quantizer=None, towers=("visual",), **kwargs):
    return verify_quantized(model, calibration.images[:4], calibration.tokens[:4], towers, bits=bits,
                            quantizer=quantizer, **kwargs)


def first_linear(model) -> tuple[str, QuantModule]:
    return next((name, module) for name, module in quant_modules(model.model) if isinstance(module, QuantLinear))


def swap(model, name: str, cls: type) -> QuantModule:
    """Replace module ``name`` by an instance of ``cls`` sharing its state."""
    module = model.model.get_submodule(name)
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    model.model.set_submodule(name, new)
    return new


# -- (a) weights at 8 bits in a w4a8 run -----------------------------------------------------------
def test_eight_bit_weights_in_a_w4a8_run_fail(float_model, calibration):
    cheat = EightBitWeights()
    result = cheat.quantize(copy.deepcopy(float_model), W4A8, Scope.VISUAL, calibration, seed=0)
    report = verify(result.model, calibration, W4A8, cheat)
    assert not report.passed
    for check in report.modules:
        assert check.weight_bits == 8 and check.expected_weight_bits == 4
        assert f"{check.name}: weight quantizer declares 8 bits, the run's bit spec w4a8 needs 4" in report.problems
        assert any(p.startswith(f"{check.name}: weight has") and "more than 2^4 = 16" in p for p in report.problems)
    assert report.expected["bits"] == "w4a8"


def test_eight_bit_weights_that_claim_four_bits_still_fail(float_model, calibration):
    cheat = EightBitWeights()
    result = cheat.quantize(copy.deepcopy(float_model), W4A8, Scope.VISUAL, calibration, seed=0)
    for _, module in quant_modules(result.model.model):
        module.weight_quantizer.__class__ = ClaimsFourBits
    report = verify(result.model, calibration, W4A8, cheat)
    assert not report.passed
    assert not any("declares" in problem for problem in report.problems)  # the lie matches the spec ...
    for check in report.modules:  # ... but what the kernels consumed does not
        assert check.weight_bits == 4 and check.weight_max_unique > 16
        assert any(p.startswith(f"{check.name}: weight values in a group span") for p in report.problems)


def test_eight_bit_weights_fail_through_the_run_path(float_model, calibration):
    """``qbench quantize`` / ``eval`` verify with the run's bits and quantizer (``evaluate.verification_on_proxy``)."""
    cheat = EightBitWeights()
    result = cheat.quantize(copy.deepcopy(float_model), W4A8, Scope.VISUAL, calibration, seed=0)
    resolved = SimpleNamespace(bits=W4A8, quantizer=cheat, scope=Scope.VISUAL)
    document = verification_on_proxy(resolved, result.model, result, calibration)
    assert document["passed"] is False and document["expected"]["bits"] == "w4a8"
    assert json.loads(json.dumps(document)) == document


# -- (b) float activations behind 2-element groups -------------------------------------------------
def test_float_activations_behind_two_element_groups_fail(float_model, calibration):
    cheat = FloatActivations()
    result = cheat.quantize(copy.deepcopy(float_model), W4A8, Scope.VISUAL, calibration, seed=0)
    name, module = first_linear(result.model)
    pairs = module.act_quantizer.group_view(calibration.images[:2].reshape(2, -1))
    assert pairs.shape[1] == 2  # by its own grouping every group holds at most 2 values
    report = verify(result.model, calibration, W4A8, cheat)
    assert not report.passed
    for check in report.modules:
        assert check.act_grouping in ("per_tensor",) and check.act_max_unique > 2**8
        assert any(p.startswith(f"{check.name}: input has") and "more than 2^8 = 256" in p for p in report.problems)


def test_float_activations_fail_in_declared_mode_too(float_model, calibration):
    cheat = FloatActivations()
    result = cheat.quantize(copy.deepcopy(float_model), W4A8, Scope.VISUAL, calibration, seed=0)
    report = verify_quantized(result.model, calibration.images[:4], None, ("visual",))
    assert not report.passed and report.expected is None
    assert all(check.act_grouping == "per_tensor" for check in report.modules)  # group-2 refused for inputs
    name, _ = first_linear(result.model)
    assert f"{name}: input quantizer's own granularity is refused (grouping 'group-2' is not allowed for linear " \
           "inputs (the core allows per_tensor, per_token, per_position, instance)); counted per tensor" in report.problems


def test_a_layout_claiming_two_element_groups_is_refused(float_model, calibration):
    cheat = DeclaresPairs()
    result = cheat.quantize(copy.deepcopy(float_model), W4A8, Scope.VISUAL, calibration, seed=0)
    report = verify(result.model, calibration, W4A8, cheat)
    assert not report.passed
    assert "layout: linear_input: grouping 'group-2' is not allowed for linear inputs (the core allows per_tensor, " \
           "per_token, per_position, instance)" in report.problems
    assert report.expected["linear_input"] == "per_tensor" and report.expected["conv_input"] == "per_tensor"
    assert any("input has" in problem for problem in report.problems)


# -- the core's rules cannot be loosened -----------------------------------------------------------
class Layout(MinMaxQuantizer):
    """minmax whose verification layout is whatever the test sets."""

    layout: object = None

    def verification_layout(self, bits):
        if isinstance(self.layout, Exception):
            raise self.layout
        return self.layout


@pytest.mark.parametrize("layout, problem", [
    (QuantLayout(weight="group-4"), f"smaller than the core minimum of {MIN_WEIGHT_GROUP} elements per group"),
    (QuantLayout(weight="per_token"), "grouping 'per_token' is not allowed for weights"),
    (QuantLayout(linear_input=f"instance-{MAX_INSTANCE_GROUPS + 1}"), f"needs 1 <= G <= {MAX_INSTANCE_GROUPS}"),
    (QuantLayout(linear_input="per_element"), "unknown grouping 'per_element'"),
    (QuantLayout(slots={"scores": "per_tensor"}), "unknown attention slot 'scores'"),
    (QuantLayout(first_layer_bits=1), "first_layer_bits must be an integer 2..8"),
    ({"weight": "per_channel"}, "returned dict, not a QuantLayout"),
    (RuntimeError("boom"), "verification_layout failed: boom"),
], ids=["group-4", "per-token-weights", "too-many-instance-groups", "unknown", "slot", "first-layer-bits",
        "not-a-layout", "raises"])
def test_layouts_outside_the_core_rules_fail(layout, problem, float_model, calibration):
    result = minmax(float_model, calibration, W8A8)
    quantizer = Layout()
    quantizer.layout = layout
    report = verify(result.model, calibration, W8A8, quantizer)
    assert not report.passed
    assert any(p.startswith("layout:") and problem in p for p in report.problems), report.problems


def test_first_layer_bits_only_exempt_the_pixel_reading_layer(float_model, calibration):
    result = EightBitWeights().quantize(copy.deepcopy(float_model), W4A8, Scope.VISUAL, calibration, seed=0)
    quantizer = Layout()
    quantizer.layout = QuantLayout(first_layer_bits=8)
    report = verify(result.model, calibration, W4A8, quantizer)
    assert report.expected["first_layers"] == ["visual.conv1"]
    flagged = {p.split(":")[0] for p in report.problems}
    assert "visual.conv1" not in flagged
    assert flagged == {check.name for check in report.modules if check.name != "visual.conv1"}


def test_groupings_are_cut_by_the_core():
    t = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    assert Grouping.parse("per_position").view(t, "linear_input").shape == (3, 8)
    assert Grouping.parse("per_token").view(t, "linear_input").shape == (6, 4)
    assert Grouping.parse("instance-2").view(t, "linear_input").shape == (8, 3)  # (instance, channel) units
    assert Grouping.parse("group-32").view(torch.zeros(3, 40), "weight").shape == (6, 32)
    assert Grouping.parse("group-2").problem("weight") is not None
    assert Grouping.parse("instance-8").tensor_levels(4) == 8 * 16


# -- kernel-level evidence -------------------------------------------------------------------------
def test_float_weights_with_fewer_values_than_two_to_the_b_fail_on_the_grid(float_model, calibration):
    """At w8 a 64-element weight row can never exceed 256 values; the grid check still sees floats."""
    result = minmax(float_model, calibration, W8A8)
    name, module = first_linear(result.model)
    module.weight_quantizer.__class__ = PassThroughWeights
    report = verify(result.model, calibration, W8A8, MinMaxQuantizer())
    assert not report.passed
    check = next(check for check in report.modules if check.name == name)
    assert check.weight_max_unique <= 2**8 and check.weight_grid_steps > 255
    assert [p for p in report.problems if p.startswith(f"{name}: weight values in a group span")]


def test_a_kernel_other_than_linear_fails(float_model, calibration):
    result = minmax(float_model, calibration, W8A8)
    name, _ = first_linear(result.model)
    swap(result.model, name, MatmulLinear)
    report = verify(result.model, calibration, W8A8, MinMaxQuantizer())
    assert f"{name}: computes with matmul, not F.linear/F.conv2d, so its operands cannot be attributed to input " \
           "and weight" in report.problems
    assert not report.passed


def test_a_float_side_path_in_a_forward_hook_fails(float_model, calibration):
    result = minmax(float_model, calibration, W4A8)
    name, module = first_linear(result.model)
    module.register_forward_hook(lambda m, inputs, output: output + F.linear(inputs[0], m.weight) * 1e-3)
    report = verify(result.model, calibration, W4A8, MinMaxQuantizer())
    assert any(p.startswith(f"{name}: weight has") for p in report.problems)
    assert any(p.startswith(f"{name}: input has") for p in report.problems)


def test_a_missing_input_quantizer_fails_when_the_spec_quantizes_inputs(float_model, calibration):
    result = minmax(float_model, calibration, W8A8)
    name, module = first_linear(result.model)
    module.act_quantizer = None
    report = verify(result.model, calibration, W8A8, MinMaxQuantizer())
    assert f"{name}: input carries no quantizer, but the run's bit spec w8a8 quantizes it to 8 bits" in report.problems
    assert any(p.startswith(f"{name}: input has") for p in report.problems)


def test_input_quantizers_in_a_float_activation_run_fail(float_model, calibration):
    result = minmax(float_model, calibration, W8A8)
    report = verify(result.model, calibration, BitSpec.parse("w8a16"), MinMaxQuantizer())
    assert not report.passed
    name, _ = first_linear(result.model)
    assert f"{name}: input quantizer declares 8 bits, but the run's bit spec w8a16 keeps activations float" in report.problems


def test_log2_slot_with_float_probabilities_fails(float_model, calibration):
    apq = APQViTQuantizer.from_params({"n_calibration": 4, "sweeps": 1})
    result = apq.quantize(copy.deepcopy(float_model), W8A8, Scope.VISUAL, calibration, seed=0)
    assert verify(result.model, calibration, W8A8, apq).passed
    attn = result.model.model.visual.transformer.resblocks[0].attn
    attn.probs.quantize = lambda x: x  # float probabilities behind an MPQ quantizer
    report = verify(result.model, calibration, W8A8, apq)
    label = "visual.transformer.resblocks.0.attn.probs"
    assert any(p.startswith(f"{label}: output holds values off the 8-bit power-of-two levels") for p in report.problems)
    assert not report.passed


def test_report_fields_are_json_plain(float_model, calibration):
    result = minmax(float_model, calibration, W4A8)
    document = verify(result.model, calibration, W4A8, MinMaxQuantizer()).to_dict()
    assert json.loads(json.dumps(document)) == document
    assert document["expected"] == {"bits": "w4a8", "weight": "per_channel", "linear_input": "per_tensor",
                                    "conv_input": "per_tensor", "slots": {}, "first_layer_bits": None,
                                    "first_layers": ["visual.conv1"]}
    entry = document["modules"][0]
    assert entry["expected_weight_bits"] == 4 and entry["expected_act_bits"] == 8
    assert entry["weight_grouping"] == "per_channel" and entry["act_grouping"] == "per_tensor"
    assert entry["weight_min_group"] == 3 * 8 * 8 and entry["weight_grid_steps"] <= 15
