"""Uniform affine fake quantization, granularities, STE, tensor quantizers and observers (quantizers.md §1.3-1.5)."""

import pytest
import torch

from qbench.quant.fake_quant import (
    SCALE_FLOOR,
    Granularity,
    QuantFormat,
    count_unique_per_group,
    fake_quantize,
    fake_quantize_dynamic,
    fake_quantize_grouped,
    minmax_qparams,
)
from qbench.quant.modules import Mode, TensorQuantizer, UncalibratedError
from qbench.quant.observers import (
    OBSERVERS,
    MinMaxObserver,
    make_observer,
    select_valid_tokens,
    text_token_mask,
    valid_tokens,
)

GRANULARITIES = ["per_tensor", "per_channel", "per_token", "group-8", "group-5"]


def heavy_tailed(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator)
    return x * torch.rand(*shape, generator=generator).pow(4) * 10 + 0.3


# -- formats -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(2, 9))
def test_integer_ranges(bits):
    sym, asym = QuantFormat(bits, True), QuantFormat(bits, False)
    assert (sym.qmin, sym.qmax) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)  # narrow signed
    assert (asym.qmin, asym.qmax) == (0, 2**bits - 1)
    full = QuantFormat(bits, True, narrow=False)
    assert (full.qmin, full.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def test_bad_bits_and_granularity_are_rejected():
    with pytest.raises(ValueError):
        QuantFormat(1, True)
    for text in ("per_row", "group", "group-0"):
        with pytest.raises(ValueError):
            Granularity.parse(text)
    assert str(Granularity.parse("group_128")) == "group-128"
    assert Granularity.parse("per-channel").kind == "per_channel"


# -- at most 2^b values per group ----------------------------------------------------------------------
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", range(2, 9))
def test_at_most_two_to_the_b_values_per_group(bits, symmetric, granularity):
    x = heavy_tailed(6, 4, 40)
    fmt, gran = QuantFormat(bits, symmetric), Granularity.parse(granularity)
    out = fake_quantize_dynamic(x, fmt, gran)
    assert out.shape == x.shape
    unique = count_unique_per_group(gran.view(out))
    assert int(unique.max()) <= fmt.n_levels <= 2**bits
    assert int(unique.max()) >= 2
    if gran.view(x).shape[1] > 2**bits:  # the float tensor itself would fail this check
        assert int(count_unique_per_group(gran.view(x)).max()) > 2**bits


def test_symmetric_range_is_narrow_and_hits_both_ends():
    fmt = QuantFormat(4, True)
    x = torch.linspace(-1.0, 1.0, 1001)
    scale, zero = minmax_qparams(x, fmt, Granularity.parse("per_tensor"))
    assert float(zero) == 0.0 and float(scale) == pytest.approx(1.0 / 7)
    q = torch.round(fake_quantize(x, scale, zero, fmt) / scale)
    assert int(q.min()) == -7 and int(q.max()) == 7  # never -8: narrow range
    assert len(q.unique()) == 15


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("low, high", [(-3.0, 5.0), (0.5, 4.0), (-6.0, -1.0), (-1e-3, 7.0)])
def test_asymmetric_zero_is_exactly_representable(bits, low, high):
    fmt = QuantFormat(bits, False)
    x = torch.linspace(low, high, 257)
    scale, zero = fmt.qparams(x.min(), x.max())
    assert float(zero) == round(float(zero)) and fmt.qmin <= float(zero) <= fmt.qmax
    assert float(fake_quantize(torch.zeros(3), scale, zero, fmt).abs().max()) == 0.0
    # the range is widened to contain zero, so the whole input lies inside it
    assert float(scale) * (fmt.qmax - fmt.qmin) >= max(high, 0.0) - min(low, 0.0) - 1e-6


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_error_at_most_half_a_step_inside_the_range(bits, symmetric):
    fmt, gran = QuantFormat(bits, symmetric), Granularity.parse("per_channel")
    x = heavy_tailed(8, 64, seed=bits)
    scale, zero = minmax_qparams(x, fmt, gran)
    out = fake_quantize_grouped(x, scale, zero, fmt, gran)
    bound = scale[:, None] / 2 * (1 + 1e-5) + 1e-7
    assert bool(((out - x).abs() <= bound).all())


def test_values_outside_the_range_clamp_to_its_ends():
    fmt = QuantFormat(8, False)
    scale, zero = fmt.qparams(torch.tensor(-1.0), torch.tensor(1.0))
    out = fake_quantize(torch.tensor([-50.0, 50.0]), scale, zero, fmt)
    assert float(out[0]) == pytest.approx(-1.0, abs=float(scale)) and float(out[1]) == pytest.approx(1.0, abs=float(scale))


def test_rounding_is_half_to_even():
    fmt = QuantFormat(8, True)
    scale, zero = torch.tensor(1.0), torch.tensor(0.0)
    out = fake_quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5]), scale, zero, fmt)
    assert out.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]


def test_scale_is_floored_for_constant_zero_groups():
    fmt = QuantFormat(8, False)
    scale, zero = minmax_qparams(torch.zeros(2, 5), fmt, Granularity.parse("per_channel"))
    assert bool((scale == SCALE_FLOOR).all())
    out = fake_quantize_dynamic(torch.zeros(2, 5), fmt, "per_channel")
    assert bool((out == 0).all()) and not bool(out.isnan().any())


def test_half_precision_input_keeps_dtype_and_levels():
    x = heavy_tailed(4, 32).half()
    out = fake_quantize_dynamic(x, QuantFormat(4, True), "per_channel")
    assert out.dtype == torch.float16
    assert int(count_unique_per_group(out.reshape(4, -1)).max()) <= 15


# -- granularities -----------------------------------------------------------------------------------
def test_group_view_shapes_and_round_trip():
    w = torch.arange(2 * 12, dtype=torch.float32).reshape(2, 12)
    g4 = Granularity.parse("group-4")
    assert g4.view(w).shape == (6, 4) and torch.equal(g4.view(w)[1], w[0, 4:8])
    g5 = Granularity.parse("group-5")  # 12 = 5 + 5 + 2: last group padded by repetition
    view = g5.view(w)
    assert view.shape == (6, 5) and g5.n_groups(w) == 6
    assert view[2].tolist() == [10.0, 11.0, 11.0, 11.0, 11.0]
    assert torch.equal(g5.unview(view, w), w)
    conv = torch.randn(4, 3, 2, 2)
    assert Granularity.parse("per_channel").view(conv).shape == (4, 12)
    assert Granularity.parse("per_token").view(torch.randn(2, 5, 7)).shape == (10, 7)
    assert Granularity.parse("per_tensor").view(conv).shape == (1, 48)


def test_per_token_is_dynamic_with_one_scale_per_row():
    with pytest.raises(ValueError, match="dynamic"):
        TensorQuantizer(8, symmetric=False, granularity="per_token")
    quantizer = TensorQuantizer(8, symmetric=True, granularity="per_token", dynamic=True)
    quantizer.freeze()  # nothing to observe
    x = torch.stack([torch.linspace(-1, 1, 16), torch.linspace(-100, 100, 16)])
    scale, _ = quantizer.qparams_for(x)
    assert scale.shape == (2,) and float(scale[1]) == pytest.approx(100 * float(scale[0]))
    other = quantizer.qparams_for(x * 3)[0]
    assert torch.allclose(other, 3 * scale)  # recomputed from each input
    out = quantizer(x)
    assert torch.allclose(out, x, atol=float(scale[1]) / 2 + 1e-6)


# -- straight-through estimator -------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [True, False])
def test_ste_gradient_is_one_inside_and_zero_outside(symmetric):
    fmt = QuantFormat(4, symmetric)
    scale, zero = fmt.qparams(torch.tensor(-1.0), torch.tensor(1.0))
    x = torch.tensor([-5.0, -0.9, -0.2, 0.0, 0.33, 0.97, 3.0], requires_grad=True)
    fake_quantize(x, scale.requires_grad_(), zero, fmt).sum().backward()
    q = torch.round(x.detach() / scale.detach()) + zero
    expected = ((q >= fmt.qmin) & (q <= fmt.qmax)).float()
    assert torch.equal(x.grad, expected)
    assert x.grad[0] == 0 and x.grad[-1] == 0 and x.grad[2] == 1
    assert scale.grad is None  # s is a constant of the estimator


def test_ste_flows_through_a_tensor_quantizer_to_the_weight():
    weight = torch.nn.Parameter(heavy_tailed(4, 8))
    quantizer = TensorQuantizer(4, symmetric=True, granularity="per_channel")
    quantizer.observe(weight)
    quantizer.freeze()
    quantizer(weight).pow(2).sum().backward()
    assert weight.grad is not None and bool((weight.grad != 0).any())


# -- tensor quantizer lifecycle ---------------------------------------------------------------------------
def test_static_quantizer_calibrates_in_float_then_freezes():
    quantizer = TensorQuantizer(8, symmetric=False)
    assert quantizer.mode is Mode.CALIBRATE
    batches = [torch.randn(3, 5) * scale for scale in (1.0, 4.0, 2.0)]
    for batch in batches:
        assert torch.equal(quantizer(batch), batch)  # float pass-through while observing
    assert quantizer.freeze() and quantizer.is_frozen
    everything = torch.cat(batches)
    expected = QuantFormat(8, False).qparams(everything.min(), everything.max())
    assert torch.allclose(quantizer.scale, expected[0].reshape(1)) and torch.equal(quantizer.zero_point, expected[1].reshape(1))
    out = quantizer(everything)
    assert int(count_unique_per_group(quantizer.group_view(out)).max()) <= 256
    assert "scale" in quantizer.state_dict()


def test_uncalibrated_static_quantizer_refuses_to_quantize():
    quantizer = TensorQuantizer(8, symmetric=False)
    assert quantizer.freeze() is False
    with pytest.raises(UncalibratedError):
        quantizer(torch.randn(3))


def test_off_mode_is_identity():
    quantizer = TensorQuantizer(2, symmetric=True, granularity="per_token", dynamic=True)
    quantizer.set_mode("off")
    x = torch.randn(4, 4)
    assert quantizer(x) is x


# -- observers ------------------------------------------------------------------------------------------
def test_observer_registry_has_the_four_rules():
    assert set(OBSERVERS) == {"minmax", "ema_minmax", "percentile", "mse"}
    with pytest.raises(ValueError, match="unknown observer"):
        make_observer("kl", QuantFormat(8, False))


def test_minmax_observer_keeps_running_global_extremes_per_group():
    observer = MinMaxObserver(QuantFormat(8, False))
    observer.observe(torch.tensor([[1.0, 2.0], [-3.0, 0.5]]))
    observer.observe(torch.tensor([[0.0, 5.0], [-1.0, 0.2]]))
    lo, hi = observer.range()
    assert lo.tolist() == [0.0, -3.0] and hi.tolist() == [5.0, 0.5]
    with pytest.raises(ValueError, match="groups"):
        observer.observe(torch.zeros(3, 2))


def test_ema_observer_follows_its_update_rule():
    observer = make_observer("ema_minmax", QuantFormat(8, False), momentum=0.5)
    observer.observe(torch.tensor([[-2.0, 2.0]]))
    observer.observe(torch.tensor([[-4.0, 6.0]]))
    lo, hi = observer.range()
    assert float(lo) == pytest.approx(-3.0) and float(hi) == pytest.approx(4.0)


def test_percentile_observer_ignores_rare_outliers_and_averages_batches():
    x = torch.linspace(-1, 1, 100001)[None]
    spiked = x.clone()
    spiked[0, 0], spiked[0, -1] = -1000.0, 1000.0
    asym = make_observer("percentile", QuantFormat(8, False), percentile=99.9)
    asym.observe(spiked)
    lo, hi = asym.range()
    assert -1.0 <= float(lo) < -0.99 and 0.99 < float(hi) <= 1.0
    sym = make_observer("percentile", QuantFormat(8, True), percentile=99.9)
    sym.observe(spiked)
    sym.observe(2 * x)
    lo, hi = sym.range()
    assert float(hi) == pytest.approx(-float(lo)) and float(hi) == pytest.approx(1.5, abs=0.01)


def test_mse_observer_clips_heavy_tails_and_lowers_error():
    fmt = QuantFormat(4, True)
    x = heavy_tailed(4, 512, seed=3)
    mse = make_observer("mse", fmt)
    mse.observe(x)
    minmax = make_observer("minmax", fmt)
    minmax.observe(x)
    lo, hi = mse.range()
    assert bool((hi <= x.abs().amax(dim=1) + 1e-6).all()) and bool((hi < x.abs().amax(dim=1)).any())

    def error(observer):
        scale, zero = observer.qparams()
        return float((fake_quantize(x, scale[:, None], zero[:, None], fmt) - x).pow(2).sum())

    assert error(mse) < error(minmax)


# -- valid text positions ---------------------------------------------------------------------------------
def test_text_token_mask_stops_at_the_last_non_padding_token():
    tokens = torch.tensor([[49406, 320, 0, 256, 49407, 0, 0], [49406, 49407, 0, 0, 0, 0, 0]])  # 0 is "!" mid-text
    mask = text_token_mask(tokens)
    assert mask.tolist() == [[True] * 5 + [False] * 2, [True, True] + [False] * 5]


def test_observers_skip_masked_text_positions():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    x = torch.ones(2, 3, 4)
    x[~mask] = 1000.0  # padding activations must not widen the range
    quantizer = TensorQuantizer(8, symmetric=False)
    with valid_tokens(mask):
        quantizer(x)
        assert select_valid_tokens(x.transpose(0, 1)).shape == (3, 4)  # sequence-first layout too
        assert select_valid_tokens(torch.zeros(2, 5, 3, 8)).shape == (3, 5, 8)  # per-head layout
    quantizer.freeze()
    assert float(quantizer.scale) == pytest.approx(1.0 / 255)
    assert select_valid_tokens(x) is x  # no mask outside the context
