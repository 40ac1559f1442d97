"""LSQ / LSQ+ fake quantization (quantizers.md §1.5): analytic gradients, gradient scale, module behaviour."""

import math

import pytest
import torch

from qbench.quant.fake_quant import QuantFormat, count_unique_per_group
from qbench.quant.lsq import (
    LSQQuantizer,
    grad_scale,
    lsq_fake_quantize,
    lsq_grad_factor,
    lsq_init_step,
    round_pass,
)
from qbench.quant.modules import Mode, QuantLinear

pytestmark = pytest.mark.usefixtures("single_thread")


def analytic_step_grad(v: torch.Tensor, s: float, qmin: int, qmax: int) -> torch.Tensor:
    """∂v̂/∂s per element: −v/s + round(v/s) inside, q_min below, q_max above (LSQ, Esser et al. 2020)."""
    ratio = v / s
    inside = -ratio + torch.round(ratio)
    below, above = torch.full_like(v, float(qmin)), torch.full_like(v, float(qmax))
    return torch.where(ratio <= qmin, below, torch.where(ratio >= qmax, above, inside))


def test_round_pass_and_grad_scale_are_forward_exact_with_the_right_gradients():
    x = torch.linspace(-3.3, 3.3, 1001, requires_grad=True)
    y = round_pass(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    s = torch.tensor([0.37], requires_grad=True)
    scaled = grad_scale(s, 0.125)
    assert torch.equal(scaled, s.detach())
    (3.0 * scaled).sum().backward()
    assert torch.allclose(s.grad, torch.tensor([3.0 * 0.125]))


@pytest.mark.parametrize("signed", [True, False])
def test_step_gradient_matches_the_analytic_formula_inside_below_and_above(signed):
    fmt = QuantFormat(4, symmetric=signed, narrow=False)
    qmin, qmax = fmt.qmin, fmt.qmax
    s = 0.25
    # values below, inside (not on .5 ties) and above the range
    inside = [0.13, 0.61, -0.37 if signed else 0.37, 1.08]
    v = torch.tensor([qmin * s - 1.0, qmin * s - 0.1, *inside, qmax * s + 0.05, qmax * s + 2.0])
    step = torch.tensor([s], requires_grad=True)
    x = v.clone().reshape(1, -1).requires_grad_(True)
    out = lsq_fake_quantize(x, step, qmin, qmax, g=1.0)
    out.sum().backward()
    expected = analytic_step_grad(v, s, qmin, qmax).sum()
    assert torch.allclose(step.grad, expected.reshape(1), atol=1e-6)
    # per element: ∂v̂/∂s, and ∂v̂/∂v = 1 inside, 0 outside
    for i in range(v.numel()):
        step_i = torch.tensor([s], requires_grad=True)
        xi = v[i : i + 1].clone().reshape(1, 1).requires_grad_(True)
        lsq_fake_quantize(xi, step_i, qmin, qmax, g=1.0).sum().backward()
        assert math.isclose(float(step_i.grad), float(analytic_step_grad(v[i : i + 1], s, qmin, qmax)), abs_tol=1e-6)
        inside = qmin < float(v[i]) / s < qmax
        assert float(xi.grad) == (1.0 if inside else 0.0)
    # below gives q_min, above gives q_max: the two outer cases really are covered
    grads = analytic_step_grad(v, s, qmin, qmax)
    assert grads[0] == qmin and grads[-1] == qmax


def test_step_and_offset_gradients_are_scaled_by_g():
    v = torch.randn(1, 200, generator=torch.Generator().manual_seed(0)) * 3
    grads = []
    for g in (1.0, 0.01):
        step = torch.tensor([0.05], requires_grad=True)
        offset = torch.tensor([-1.0], requires_grad=True)
        lsq_fake_quantize(v, step, 0, 15, g, offset).pow(2).sum().backward()
        grads.append((step.grad.clone(), offset.grad.clone()))
    (s1, b1), (s2, b2) = grads
    assert float(s1.abs()) > 0 and float(b1.abs()) > 0
    assert torch.allclose(s2, s1 * 0.01, rtol=1e-5) and torch.allclose(b2, b1 * 0.01, rtol=1e-5)
    assert math.isclose(lsq_grad_factor(1000, 127), 1 / math.sqrt(127000))


def test_offset_gradient_is_one_outside_and_zero_inside():
    step = torch.tensor([0.5], requires_grad=True)
    offset = torch.tensor([-1.0], requires_grad=True)
    v = torch.tensor([[-3.0, -0.2, 0.3, 2.0, 9.0]])  # grid [-1, 6.5]: below, 3 inside, above
    lsq_fake_quantize(v, step, 0, 15, 1.0, offset).sum().backward()
    assert float(offset.grad) == 2.0


def test_per_channel_steps_get_gradient_only_from_their_own_channel():
    quantizer = LSQQuantizer(4, signed=True, granularity="per_channel")
    weight = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    quantizer.observe(weight)
    assert quantizer.freeze() and quantizer.mode is Mode.QUANTIZE
    assert torch.allclose(quantizer.step.detach(), 2 * weight.abs().mean(dim=1) / math.sqrt(7))
    mask = torch.zeros_like(weight)
    mask[1] = 1.0
    (quantizer(weight) * mask).pow(2).sum().backward()
    assert quantizer.step.grad[1] != 0 and quantizer.step.grad[0] == 0 and quantizer.step.grad[2] == 0


def test_lsq_plus_range_init_reproduces_the_static_affine_quantizer():
    fmt = QuantFormat(8, symmetric=False)
    x = torch.randn(4, 10, 16, generator=torch.Generator().manual_seed(2)) * 2 + 0.5
    lo, hi = x.min().reshape(1), x.max().reshape(1)
    quantizer = LSQQuantizer(8, signed=False, offset=True)
    quantizer.set_range(lo, hi)
    quantizer.set_mode(Mode.QUANTIZE)
    scale, zero_point = fmt.qparams(lo, hi)
    static = (torch.clamp(torch.round(x / scale) + zero_point, 0, 255) - zero_point) * scale
    assert torch.allclose(quantizer(x), static, atol=1e-6)
    assert int(count_unique_per_group(quantizer(x).reshape(1, -1)).max()) <= 256


def test_activation_gradient_scale_uses_features_per_example():
    quantizer = LSQQuantizer(8, signed=False, offset=True, features_per_example=True)
    x = torch.randn(5, 7, 12)
    assert math.isclose(quantizer.grad_factor(x), 1 / math.sqrt(7 * 12 * 255))
    weights = LSQQuantizer(8, signed=True)
    assert math.isclose(weights.grad_factor(x), 1 / math.sqrt(5 * 7 * 12 * 127))


def test_learning_the_step_lowers_the_reconstruction_error_and_stays_on_the_grid():
    """From a too-large step, Adam on LSQ's gradient shrinks the reconstruction error of a Gaussian."""
    x = torch.randn(1, 4096, generator=torch.Generator().manual_seed(3))
    quantizer = LSQQuantizer(4, signed=True)
    quantizer.set_step(torch.tensor([1.0]))  # far too coarse for N(0, 1) at 4 bits
    quantizer.set_mode(Mode.QUANTIZE)
    optimizer = torch.optim.Adam(quantizer.parameters(), lr=0.02)
    with torch.no_grad():
        before = float((quantizer(x) - x).pow(2).mean())
    for _ in range(100):
        optimizer.zero_grad()
        (quantizer(x) - x).pow(2).mean().backward()
        optimizer.step()
    with torch.no_grad():
        after = float((quantizer(x) - x).pow(2).mean())
    assert after < 0.5 * before
    assert 0.2 < float(quantizer.step.detach()) < 0.6  # near the MSE-optimal 4-bit step of N(0, 1) (about 0.34)
    assert int(count_unique_per_group(quantizer(x).detach())) <= 16


def test_lsq_quantizer_plugs_into_a_quant_linear():
    linear = torch.nn.Linear(16, 4)
    act = LSQQuantizer(8, signed=False, offset=True, init="minmax")
    module = QuantLinear.from_float(linear, LSQQuantizer(8, signed=True), act)
    x = torch.randn(6, 16)
    module(x)  # calibrate: observes the input, float through
    assert module.freeze() == []
    out = module(x)
    assert out.shape == (6, 4)
    out.sum().backward()
    assert module.act_quantizer.step.grad is not None and module.weight_quantizer.step.grad is not None
    assert module.act_quantizer.is_frozen and module.act_quantizer.describe()["format"] == "lsq+"


def test_refuses_signed_offset_and_unknown_init():
    with pytest.raises(ValueError, match="unsigned"):
        LSQQuantizer(8, signed=True, offset=True)
    with pytest.raises(ValueError, match="init"):
        LSQQuantizer(8, signed=False, init="random")
    with pytest.raises(RuntimeError, match="initialised"):
        LSQQuantizer(8, signed=True).quantize(torch.randn(3))
    assert torch.allclose(lsq_init_step(torch.ones(2, 4), 7), torch.full((2,), 2 / math.sqrt(7)))
