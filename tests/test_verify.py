"""The at-most-2^b-values verifier (quantizers.md §1.9): passes real quantization, fails every way of cheating."""

import copy
import dataclasses
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qbench.quant.base import CalibrationData
from qbench.quant.modules import (
    QuantLinear,
    QuantModule,
    TensorQuantizer,
    in_scope_modules,
    quant_modules,
    rewrite_attention,
)
from qbench.quant.spec import BitSpec, Scope
from qbench.quant.verify import verify_quantized
from tiny_models import tiny_vlm
from qbench_plugins.quantizers.fp32 import FP32Baseline
from qbench_plugins.quantizers.minmax import MinMaxQuantizer


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(1)
    images = torch.randn(12, 3, 32, 32)
    captions = tuple(f"a photo of thing number {i}" for i in range(12))
    tokens = open_clip.tokenizer.tokenize(list(captions), context_length=16)
    return CalibrationData("test", images, tokens, captions, "fingerprint")


@pytest.fixture(scope="module")
def joint_w8(data):
    """A tiny CLIP quantized w8a8 in joint scope."""
    return MinMaxQuantizer().quantize(tiny_vlm(), BitSpec.parse("w8a8"), Scope.JOINT, data, seed=0).model


@pytest.fixture(scope="module")
def joint_w4(data):
    """w4a8 for the failure cases (tests mutate deep copies): the tiny model's weight rows hold 64-256
    values, so only below 8 bits can a float weight row exceed 2^b."""
    return MinMaxQuantizer().quantize(tiny_vlm(), BitSpec.parse("w4a8"), Scope.JOINT, data, seed=0).model


def verify(vlm, data, towers=("visual", "text"), **kwargs):
    return verify_quantized(vlm, data.images[:4], data.tokens[:4], towers, **kwargs)


@pytest.mark.parametrize("fixture, bits", [("joint_w8", 8), ("joint_w4", 4)])
def test_minmax_model_passes_with_every_module_checked(fixture, bits, data, request):
    report = verify(request.getfixturevalue(fixture), data)
    assert report.passed, report.problems
    assert report.n_modules == len(report.modules) == 1 + 6 * 2 + 6 * 2  # conv + (q, k, v, out, fc, proj) x blocks
    for check in report.modules:
        assert check.fired and check.calls >= 1
        assert check.weight_bits == bits and 2 <= check.weight_max_unique <= 2**bits
        assert check.act_bits == 8 and 2 <= check.act_max_unique <= 2**8
        assert (check.weight_granularity, check.act_granularity) == ("per_channel", "per_tensor")
    assert {check.tower for check in report.modules} == {"visual", "text"}
    assert any(check.name.endswith("attn.out_proj") for check in report.modules)
    document = report.to_dict()
    assert json.loads(json.dumps(document)) == document
    assert document["passed"] is True and document["n_modules"] == report.n_modules


def test_visual_scope_does_not_need_tokens(data):
    vlm = MinMaxQuantizer().quantize(tiny_vlm(), BitSpec.parse("w4a8"), Scope.VISUAL, data, seed=0).model
    report = verify_quantized(vlm, data.images[:2], None, ("visual",))
    assert report.passed and report.n_modules == 13


def first_linear(vlm) -> tuple[str, QuantModule]:
    return next((name, module) for name, module in quant_modules(vlm.model) if isinstance(module, QuantLinear))


def test_bypassed_weight_quantizer_fails(joint_w4, data):
    vlm = copy.deepcopy(joint_w4)
    name, module = first_linear(vlm)
    module.weight_quantizer.set_mode("off")
    report = verify(vlm, data)
    assert not report.passed
    assert any(name in problem and "distinct values" in problem for problem in report.problems)
    assert any("'off' mode" in problem for problem in report.problems)


class LyingQuantizer(TensorQuantizer):
    @property
    def bits(self) -> int:
        return 4


def test_more_values_than_the_claimed_bits_fails(joint_w4, data):
    vlm = copy.deepcopy(joint_w4)
    name, module = first_linear(vlm)
    module.act_quantizer.__class__ = LyingQuantizer  # reports 4 bits, still quantizes to 8
    report = verify(vlm, data)
    assert [problem for problem in report.problems if "more than 2^4 = 16" in problem] != []
    assert not report.passed


def test_unwrapped_module_fails(joint_w4, data):
    vlm = copy.deepcopy(joint_w4)
    name, module = first_linear(vlm)
    parent, _, attr = name.rpartition(".")
    setattr(vlm.model.get_submodule(parent), attr, module.to_float())
    report = verify(vlm, data)
    assert f"{name}: in scope but carries no quantizer" in report.problems
    assert report.n_modules == 24 and not report.passed


def test_collapsed_quantizer_fails(joint_w4, data):
    vlm = copy.deepcopy(joint_w4)
    name, module = first_linear(vlm)
    module.weight_quantizer.scale = torch.full_like(module.weight_quantizer.scale, 1e6)  # everything rounds to 0
    report = verify(vlm, data)
    assert any(name in problem and "single value" in problem for problem in report.problems)


class ForgetfulLinear(QuantLinear):
    """Quantizes the weight, then hands the kernel the float weight: only kernel inspection catches it."""

    def forward(self, x):
        x, _ = self.quantized_operands(x)
        return F.linear(x, self.weight, self.bias)


def test_kernel_consuming_the_float_weight_fails(joint_w4, data):
    vlm = copy.deepcopy(joint_w4)
    name, module = first_linear(vlm)
    forgetful = ForgetfulLinear.__new__(ForgetfulLinear)
    forgetful.__dict__.update(module.__dict__)
    parent, _, attr = name.rpartition(".")
    setattr(vlm.model.get_submodule(parent), attr, forgetful)
    report = verify(vlm, data)
    assert any(problem.startswith(f"{name}: weight has") for problem in report.problems)


def test_module_that_never_runs_fails(joint_w4, data):
    report = verify_quantized(joint_w4, data.images[:2], None, ("visual", "text"))
    assert "text tower in scope but no tokens were given to exercise it" in report.problems
    assert any("never ran" in problem for problem in report.problems)
    assert not report.passed


def test_quantizers_outside_scope_or_on_heads_fail(joint_w4, data):
    report = verify(joint_w4, data, towers=("visual",))  # text tower carries quantizers but is out of scope
    assert any("out-of-scope module carries a quantizer" in problem for problem in report.problems)
    vlm = copy.deepcopy(joint_w4)
    head = "visual.transformer.resblocks.1.mlp.c_proj"
    vlm.head_modules = frozenset({head})
    report = verify(vlm, data)
    assert f"{head}: head module carries a quantizer (heads stay float)" in report.problems


def test_float_extras_are_listed_and_excluded(joint_w4, data):
    vlm = copy.deepcopy(joint_w4)
    vlm.model.visual.compensation = nn.Linear(64, 64)  # a float branch a method adds (never called here)
    name, module = first_linear(vlm)
    parent, _, attr = name.rpartition(".")
    setattr(vlm.model.get_submodule(parent), attr, module.to_float())
    report = verify(vlm, data, float_extras={"visual.compensation": "QwT compensation", name: "kept float"})
    assert report.passed, report.problems
    assert report.float_extras == {"visual.compensation": "QwT compensation", name: "kept float"}
    assert report.n_modules == 24


def test_float_activations_are_recorded_not_failed(data):
    vlm = MinMaxQuantizer().quantize(tiny_vlm(), BitSpec.parse("w6a16"), Scope.VISUAL, data, seed=0).model
    report = verify_quantized(vlm, data.images[:2], None, ("visual",))
    assert report.passed
    assert all(c.act_bits == 16 and c.act_max_unique is None and c.act_granularity == "float" for c in report.modules)
    assert all(c.weight_bits == 6 and c.weight_max_unique <= 64 for c in report.modules)


def test_attention_slot_quantizers_are_checked(data):
    vlm = MinMaxQuantizer().quantize(tiny_vlm(), BitSpec.parse("w8a8"), Scope.VISUAL, data, seed=0).model
    attn = vlm.model.visual.transformer.resblocks[0].attn
    attn.probs = TensorQuantizer(4, symmetric=False, granularity="per_token", dynamic=True)
    attn.probs.freeze()
    report = verify_quantized(vlm, data.images[:2], None, ("visual",))
    assert report.passed, report.problems
    (slot,) = report.slots
    assert slot.name == "visual.transformer.resblocks.0.attn.probs" and 2 <= slot.act_max_unique <= 16
    attn.probs.set_mode("off")
    assert not verify_quantized(vlm, data.images[:2], None, ("visual",)).passed


def test_fp32_baseline_passes_only_when_nothing_is_expected(data):
    vlm = FP32Baseline().quantize(tiny_vlm(), BitSpec.parse("w8a8"), Scope.JOINT, None, seed=0).model
    rewrite_attention(vlm.model)
    baseline = verify(vlm, data, expect_quantized=False)
    assert baseline.passed and baseline.n_modules == 0 and baseline.problems == ()
    strict = verify(vlm, data)
    assert not strict.passed
    assert len([p for p in strict.problems if "carries no quantizer" in p]) == len(in_scope_modules(vlm, ("visual", "text")))


def test_report_is_frozen(joint_w8, data):
    report = verify(joint_w8, data)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.passed = False


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_operand_is_caught_wherever_it_sits(bad):
    from qbench.quant.verify import _all_finite

    tensor = torch.randn(4, 50, 96)
    assert _all_finite(tensor) and _all_finite(torch.empty(0)) and _all_finite(torch.arange(5))
    tensor[3, 17, 5] = bad
    assert not _all_finite(tensor)
    assert _all_finite(tensor) == bool(torch.isfinite(tensor).all())  # the same answer as the full check
