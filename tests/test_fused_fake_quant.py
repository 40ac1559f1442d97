"""The no-gradient fast paths of fake quantization (issue 16, P4) compute exactly what the reference path does.

Fast paths: the fused in-place quantize–dequantize of ``fake_quantize`` (no straight-through node, no clip
mask), the per-tensor shortcut of ``fake_quantize_grouped``, LSQ's no-gradient forward, the cached
fake-quantized weights of ``QuantModule`` and the vectorised MSE observer. ``fused_fake_quant(False)`` switches
all of them off (the code as it was), so every test here compares the two, bit for bit (signed zeros included).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qbench.model import LoadRequest
from qbench.plugins import get_plugin_manager
from qbench.quant import fake_quant as fake_quant_module
from qbench.quant import lsq as lsq_module
from qbench.quant.fake_quant import (
    Granularity,
    QuantFormat,
    fake_quantize,
    fake_quantize_grouped,
    fused_enabled,
    fused_fake_quant,
    minmax_qparams,
)
from qbench.quant.lsq import LSQQuantizer, lsq_fake_quantize, lsq_fake_quantize_no_grad
from qbench.quant.modules import (
    Mode,
    QuantLinear,
    QuantModule,
    TensorQuantizer,
    drop_weight_caches,
    make_activation_quantizer,
    make_weight_quantizer,
    quant_modules,
)
from qbench.quant.spec import BitSpec, Scope
from qbench.registry import build_registry
from qbench.testing.data import proxy_batch

pytestmark = pytest.mark.usefixtures("single_thread")

REGISTRY = build_registry(get_plugin_manager(load_entrypoints=False))
PTQ_METHODS = sorted(name for name in REGISTRY.names("quantizers") if REGISTRY.get("quantizers", name).family == "ptq")
SMALL = {
    "apq-vit": {"n_calibration": 8, "alpha_step": 0.1, "sweeps": 1},
    "outlier-suppression": {"n_calibration": 8, "batch_size": 8, "epochs": 1, "alpha_step": 0.05},
    "q-vlm": {"n_calibration": 8, "batch_size": 8, "ln_steps": 2, "sweeps": 1, "shrink_step": 0.3},
}


def small_params(name: str) -> dict:
    """Tiny calibration settings for ``name``: explicit ones above, else 8 pairs in one batch where it has them."""
    if name in SMALL:
        return SMALL[name]
    defaults = REGISTRY.get("quantizers", name).defaults()
    return {key: 8 for key in ("n_calibration", "batch_size") if key in defaults}


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a float tensor (``torch.equal`` would call −0.0 and +0.0 equal)."""
    t = t.detach().contiguous()
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
                   torch.bfloat16: torch.int16}[t.dtype])


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits_of(a), bits_of(b))


@pytest.fixture(scope="module")
def toy():
    """The built-in toy model (shipped weights), loaded once per module."""
    return REGISTRY.get("models", "toy-clip").loader(LoadRequest()).eval()


@pytest.fixture(scope="module")
def toy_data(toy):
    """Eight calibration pairs at the toy model's 32 px."""
    return proxy_batch(toy, n=8, seed=3)


@pytest.fixture(scope="module")
def probe(toy):
    """Evaluation-like inputs different from the calibration pairs."""
    return proxy_batch(toy, n=16, seed=11)


def quantize(name: str, model, bits: str, data):
    """``name`` at ``bits`` (visual scope, tiny settings) on a private copy of ``model``; the quantized VLM."""
    quantizer = REGISTRY.get("quantizers", name).from_params(small_params(name), REGISTRY)
    return quantizer.quantize(copy.deepcopy(model), BitSpec.parse(bits), Scope.VISUAL, data, seed=0).model.eval()


def features(vlm, probe) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text features of ``probe`` without gradients (as an evaluation computes them)."""
    with torch.no_grad():
        return vlm.encode_image(probe.images), vlm.encode_text(probe.tokens)


# -- the built-in PTQ methods on the toy model ---------------------------------------------------------
def test_the_ptq_methods_are_covered():
    assert {"minmax", "smoothquant", "quarot", "apq-vit", "outlier-suppression", "igq-vit", "qwt", "q-vlm"} <= set(PTQ_METHODS)


@pytest.mark.parametrize("bits", ["w8a8", "w4a8"])
@pytest.mark.parametrize("name", PTQ_METHODS)
def test_features_identical_with_and_without_fast_path(name, bits, toy, toy_data, probe):
    """Quantized with the fast paths on and off: the same model state; its image and text features with the
    fast paths on (twice: cold and cached weights) and off are the same bits."""
    assert fused_enabled()
    fast_model = quantize(name, toy, bits, toy_data)
    with fused_fake_quant(False):
        assert not fused_enabled()
        reference_model = quantize(name, toy, bits, toy_data)
    fast_state, reference_state = fast_model.model.state_dict(), reference_model.model.state_dict()
    assert fast_state.keys() == reference_state.keys()
    differing = [key for key in fast_state if not identical(fast_state[key], reference_state[key])]
    assert not differing, f"{name} {bits}: quantized state differs at {differing[:3]}"
    assert any(True for _ in quant_modules(fast_model.model))

    cold = features(fast_model, probe)
    warm = features(fast_model, probe)
    with fused_fake_quant(False):
        reference = features(fast_model, probe)
        reference_other = features(reference_model, probe)
    for got in (cold, warm, reference_other):
        assert identical(got[0], reference[0]) and identical(got[1], reference[1])
    # the quantized tower really differs from float (so the comparison is not vacuous)
    assert not torch.equal(features(toy, probe)[0], cold[0])


# -- gradients: the straight-through path is still the one used -----------------------------------------
@pytest.fixture(scope="module")
def minmax_toy(toy, toy_data):
    """minmax w4a8 on the toy model, shared by the gradient and verification tests (they copy it)."""
    return quantize("minmax", toy, "w4a8", toy_data)


def test_gradients_use_the_straight_through_path(minmax_toy, probe, monkeypatch):
    """With gradients on (QAT), neither the fused op nor the weight cache runs, and gradients are unchanged."""
    model = copy.deepcopy(minmax_toy)

    def grads() -> dict[str, torch.Tensor]:
        model.model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            model.encode_image(probe.images).square().sum().backward()
        return {name: p.grad.clone() for name, p in model.model.visual.named_parameters() if p.grad is not None}

    with fused_fake_quant(False):
        reference = grads()

    fused = fake_quant_module._fused_quant_dequant
    used = []

    def guarded(x, *args):
        """The fused op may only see inputs no gradient flows to (the pixels entering the patch embedding)."""
        assert not x.requires_grad, "the fused no-gradient path ran on a tensor that needs a gradient"
        used.append(tuple(x.shape))
        return fused(x, *args)

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached weight was used while gradients were needed")

    monkeypatch.setattr(fake_quant_module, "_fused_quant_dequant", guarded)
    monkeypatch.setattr(QuantModule, "quantized_weight", forbidden)
    fast = grads()
    assert used == [tuple(probe.images.shape)]
    assert reference.keys() == fast.keys() and len(fast) > 10
    assert all(identical(fast[key], reference[key]) for key in fast)
    weight_grads = [fast[name] for name in fast if name.endswith("c_fc.weight")]
    assert weight_grads and all(bool(g.abs().sum() > 0) for g in weight_grads)


def test_lsq_gradients_and_no_grad_forward():
    """An LSQ module: the no-gradient forward is bit-identical, and with gradients the autograd path runs."""
    torch.manual_seed(0)
    layer = QuantLinear.from_float(
        nn.Linear(24, 12),
        LSQQuantizer(4, signed=True, granularity="per_channel", init="minmax"),
        LSQQuantizer(8, signed=False, offset=True, init="minmax"),
    )
    x = torch.randn(5, 7, 24)
    layer(x)
    layer.freeze()
    with torch.no_grad():
        fast = layer(x)
        with fused_fake_quant(False):
            reference = layer(x)
    assert identical(fast, reference)

    def grads():
        layer.zero_grad(set_to_none=True)
        layer(x).square().sum().backward()
        return [p.grad.clone() for p in layer.parameters()]

    with fused_fake_quant(False):
        expected = grads()
    original = lsq_module.lsq_fake_quantize_no_grad
    try:
        lsq_module.lsq_fake_quantize_no_grad = None  # would fail if called
        got = grads()
    finally:
        lsq_module.lsq_fake_quantize_no_grad = original
    assert len(got) == 5 and all(identical(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("signed,offset,granularity", [
    (True, False, "per_tensor"), (True, False, "per_channel"), (False, True, "per_tensor"),
    (False, False, "group-5"), (False, True, "group-4"),
])
def test_lsq_no_grad_function_matches(signed, offset, granularity):
    generator = torch.Generator().manual_seed(5)
    fmt = QuantFormat(4, signed, narrow=False)
    gran = Granularity.parse(granularity)
    x = torch.randn(6, 13, generator=generator) * 3
    x[0, :4] = torch.tensor([-0.0, 0.0, -1e-9, 1e-9])
    groups = gran.view(x)
    step = torch.rand(groups.shape[0], generator=generator) * 0.5
    beta = (torch.randn(groups.shape[0], generator=generator) if offset else None)
    if beta is not None:
        beta[0] = -0.0
    expected = lsq_fake_quantize(groups, step, fmt.qmin, fmt.qmax, 0.1, beta)
    assert identical(lsq_fake_quantize_no_grad(groups, step, fmt.qmin, fmt.qmax, 0.1, beta), expected)


# -- the fused operation itself -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", [QuantFormat(8, False), QuantFormat(4, True), QuantFormat(3, True, narrow=False)])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_token", "group-7"])
def test_fused_fake_quantize_is_bit_identical(dtype, fmt, granularity):
    """Signed zeros, values on rounding ties, clipped values, non-contiguous inputs, half precision."""
    generator = torch.Generator().manual_seed(2)
    gran = Granularity.parse(granularity)
    x = (torch.randn(6, 5, 20, generator=generator) * 4).to(dtype)
    x[0, 0, :6] = torch.tensor([-0.0, 0.0, 0.5, -0.5, 1e4, -1e4]).to(dtype)
    for tensor in (x, x.transpose(0, 1), x[:, :, ::2]):
        scale, zero_point = minmax_qparams(tensor, fmt, gran)
        scale = scale * 0.5  # half the range: plenty of clipping
        with torch.no_grad():
            fast = fake_quantize_grouped(tensor, scale, zero_point, fmt, gran)
            with fused_fake_quant(False):
                reference = fake_quantize_grouped(tensor, scale, zero_point, fmt, gran)
        assert identical(fast, reference)
        assert fast.is_contiguous() == reference.is_contiguous()


def test_fused_path_never_writes_its_input_and_keeps_grad_semantics():
    x = torch.randn(4, 9)
    before = x.clone()
    scale, zero_point = torch.tensor([0.1]), torch.tensor([3.0])
    with torch.no_grad():
        out = fake_quantize(x, scale, zero_point, QuantFormat(8, False))
    assert torch.equal(x, before) and not out.requires_grad
    leaf = torch.randn(4, 9, requires_grad=True)
    out = fake_quantize(leaf, scale, zero_point, QuantFormat(8, False))
    assert out.requires_grad and out.grad_fn is not None and "FakeQuantSTE" in type(out.grad_fn).__name__


def test_dequant_zero_point_that_needs_broadcasting_falls_back():
    """(s, z) that would enlarge ``x / s`` in place use the autograd path (same values)."""
    x = torch.randn(1, 6)
    scale, zero_point = torch.tensor([0.1]), torch.tensor([2.0])
    dequant = torch.tensor([[1.5], [2.5]])
    with torch.no_grad():
        fast = fake_quantize(x, scale, zero_point, QuantFormat(4, False), dequant)
        with fused_fake_quant(False):
            reference = fake_quantize(x, scale, zero_point, QuantFormat(4, False), dequant)
    assert fast.shape == (2, 6) and identical(fast, reference)


# -- the cached fake-quantized weight -------------------------------------------------------------------
def quant_linear(weight_quantizer: TensorQuantizer | None = None) -> QuantLinear:
    """A frozen quantized Linear (4-bit per-channel weights, 8-bit per-tensor input)."""
    torch.manual_seed(0)
    layer = QuantLinear.from_float(
        nn.Linear(16, 8), weight_quantizer or make_weight_quantizer(4), make_activation_quantizer(8)
    )
    layer(torch.randn(3, 16))
    layer.freeze()
    return layer


def counting(layer: QuantModule) -> list[int]:
    """Count the weight quantizer's ``quantize`` calls (instance attribute: the class stays cacheable)."""
    calls = [0]
    quantizer = layer.weight_quantizer
    original = quantizer.quantize

    def counted(x):
        calls[0] += 1
        return original(x)

    quantizer.quantize = counted
    return calls


def reference_output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` on the reference path (no fused op, no cached weight)."""
    with torch.no_grad(), fused_fake_quant(False):
        return layer(x)


def test_weight_cache_is_reused_and_invalidated_by_an_in_place_edit():
    layer = quant_linear()
    calls = counting(layer)
    x = torch.randn(4, 16)
    with torch.no_grad():
        first = layer(x)
        second = layer(x)
    assert calls[0] == 1 and identical(first, second)
    with torch.no_grad():
        layer.weight[0, 0] += 5.0  # an in-place edit after a forward
        edited = layer(x)
    assert calls[0] == 2
    assert identical(edited, reference_output(layer, x)) and not torch.equal(edited, first)
    with torch.no_grad():
        layer.weight[0, 0] -= 5.0
        assert identical(layer(x), first)


def test_weight_cache_follows_new_scales_state_dicts_and_parameter_swaps():
    layer = quant_linear()
    calls = counting(layer)
    x = torch.randn(4, 16)
    with torch.no_grad():
        layer(x)
    quantizer = layer.weight_quantizer
    quantizer.scale = quantizer.scale * 2  # a search assigning new (s, z), as APQ-ViT does
    with torch.no_grad():
        out = layer(x)
    assert calls[0] == 2 and identical(out, reference_output(layer, x))
    with torch.no_grad():
        quantizer.zero_point.add_(0.0)  # in place, same values: version bump, recomputed
        layer(x)
    assert calls[0] == 4
    state = {key: value.clone() for key, value in layer.state_dict().items()}
    assert not any("quantized" in key for key in state)
    with torch.no_grad():
        layer.weight.mul_(0.5)
        layer(x)
        layer.load_state_dict(state)
        assert identical(layer(x), reference_output(layer, x))
    layer.weight = nn.Parameter(layer.weight.detach() * 3)
    with torch.no_grad():
        assert identical(layer(x), reference_output(layer, x))
    layer.weight.data = layer.weight.data * 0.25  # a new storage: noticed by its data pointer
    with torch.no_grad():
        assert identical(layer(x), reference_output(layer, x))
    layer.weight.data.mul_(2.0)  # not tracked by version counters: documented, dropped by hand
    drop_weight_caches(layer)
    with torch.no_grad():
        assert identical(layer(x), reference_output(layer, x))


def test_weight_cache_stays_out_of_copies_state_and_conversions():
    layer = quant_linear()
    x = torch.randn(4, 16)
    with torch.no_grad():
        layer(x)
    assert layer.has_cached_weight()
    attributes = set(vars(layer))
    assert not any(isinstance(value, tuple) and any(isinstance(v, torch.Tensor) for v in value)
                   for value in vars(layer).values())  # nothing a checkpoint writer would pick up
    clone = copy.deepcopy(layer)
    assert not clone.has_cached_weight() and set(vars(clone)) == attributes
    calls = counting(clone)
    with torch.no_grad():
        clone.weight.mul_(-1)
        assert identical(clone(x), reference_output(clone, x))
        assert not torch.equal(clone(x), layer(x))
    assert calls[0] == 2  # its own value (and the reference): never the original's cached weight
    assert not hasattr(layer.to_float(), "has_cached_weight")
    doubled = layer.double()
    assert not doubled.has_cached_weight()
    with torch.no_grad():
        out = doubled(x.double())
    assert out.dtype == torch.float64 and identical(out, reference_output(doubled, x.double()))
    drop_weight_caches(doubled)
    assert not doubled.has_cached_weight()


def test_weight_cache_skipped_with_hooks_gradients_modes_and_inference_tensors():
    layer = quant_linear()
    calls = counting(layer)
    x = torch.randn(4, 16)
    handle = layer.weight_quantizer.register_forward_hook(lambda module, args, out: None)
    with torch.no_grad():
        layer(x)
        layer(x)
    assert calls[0] == 2  # a hook on the quantizer must see every call
    handle.remove()
    layer(x)
    layer(x)
    assert calls[0] == 4  # gradients on: computed every time
    layer.weight_quantizer.set_mode(Mode.OFF)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(layer.act_quantizer(x), layer.weight, layer.bias))
    layer.weight_quantizer.set_mode(Mode.QUANTIZE)
    with torch.inference_mode():
        inside = layer(x)  # cached inside inference mode ...
    with torch.no_grad():
        outside = layer(x)  # ... and reused outside it
    assert calls[0] == 5 and identical(inside, outside)
    assert identical(outside, reference_output(layer, x))  # the reference path: one more call
    with torch.inference_mode():
        layer.weight_quantizer.scale = layer.weight_quantizer.scale.clone()  # an inference tensor: not cacheable
        layer(x)
        layer(x)
    assert calls[0] == 8
    with torch.no_grad():
        assert identical(layer(x), reference_output(layer, x))


def test_subclasses_that_change_quantize_are_not_cached():
    class Odd(TensorQuantizer):
        def quantize(self, x):
            return super().quantize(x) * 1.0

    odd = Odd(4, symmetric=True, granularity="per_channel")
    assert odd.cache_sources() is None
    assert make_weight_quantizer(4).cache_sources() is not None
    lsq = LSQQuantizer(4, signed=True)
    assert lsq.cache_sources() is not None


def test_cached_model_passes_verification_and_keeps_fingerprints(minmax_toy, probe):
    from qbench.engine.features import tower_fingerprint
    from qbench.quant.verify import verify_quantized

    model = copy.deepcopy(minmax_toy)
    before = tower_fingerprint(model, "visual")
    features(model, probe)
    assert tower_fingerprint(model, "visual") == before
    report = verify_quantized(model, probe.images, probe.tokens, towers=("visual",), bits=BitSpec.parse("w4a8"))
    assert report.passed, report.problems[:3]
