"""The vectorised calibration searches choose exactly what the loops they replace chose (issue 16, item 3).

The MSE observer's shrink-grid search now evaluates many candidate ranges per tensor op; Outlier
Suppression's clipped ranges sort each batch once for every α. Both are compared, bit for bit, with a copy
of the original loop kept in this file, on random inputs with ties, zeros, constant rows and infinities.
"""

from __future__ import annotations

import math

import pytest
import torch

from qbench.quant.fake_quant import QuantFormat, fake_quantize, fused_fake_quant, group_minmax
from qbench.quant.modules import TensorQuantizer
from qbench.quant.observers import MSEObserver, mse_range, mse_range_reference, mse_shrink_factors
from qbench_plugins.quantizers.outlier_suppression import TokenExtremes, candidate_alphas

pytestmark = pytest.mark.usefixtures("single_thread")


def old_mse_loop(groups, fmt, grid, maxshrink, pnorm):
    """A verbatim copy of ``MSEObserver._batch_range`` before vectorisation (the specification), run with the
    fast paths off (``fake_quantize`` as it was: the straight-through node and its mask)."""
    with fused_fake_quant(False):
        return _old_mse_loop(groups, fmt, grid, maxshrink, pnorm)


def _old_mse_loop(groups, fmt, grid, maxshrink, pnorm):
    """The loop itself (unchanged text)."""
    lo, hi = group_minmax(groups)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    best_err = torch.full_like(lo, math.inf)
    best_lo, best_hi = lo.clone(), hi.clone()
    for i in range(max(1, int(maxshrink * grid))):
        p = 1.0 - i / grid
        scale, zero_point = fmt.qparams(lo * p, hi * p)
        approx = fake_quantize(groups, scale[:, None], zero_point[:, None], fmt)
        err = (approx - groups).abs().pow(pnorm).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo * p, best_lo)
        best_hi = torch.where(better, hi * p, best_hi)
    return best_lo, best_hi


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same float32 bits (signed zeros and NaN payloads included)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def cases(seed: int, count: int):
    """Random ``(n_groups, n)`` batches: per-tensor (one row) and per-channel, odd widths, integer-valued
    (many exactly tied errors), zero and constant rows, one huge outlier."""
    generator = torch.Generator().manual_seed(seed)
    for index in range(count):
        rows = 1 if index % 3 == 0 else int(torch.randint(2, 48, (1,), generator=generator))
        width = int(torch.randint(1, 400, (1,), generator=generator))
        x = torch.randn(rows, width, generator=generator) * float(torch.rand(1, generator=generator) * 8 + 0.01)
        if index % 4 == 1:
            x = x.round()
        if index % 5 == 2 and rows > 1:
            x[0] = 0.0
            x[1] = 1.5
        if index % 7 == 3:
            x[0, 0] = 1e6
        yield x


FORMATS = [QuantFormat(4, True), QuantFormat(8, True), QuantFormat(8, False), QuantFormat(3, False),
           QuantFormat(4, True, narrow=False)]


@pytest.mark.parametrize("pnorm", [2.0, 2.4, 1.0])
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_mse_search_equals_the_loop(fmt, pnorm):
    for x in cases(seed=int(pnorm * 10) + fmt.bits, count=12):
        expected = old_mse_loop(x, fmt, 100, 0.8, pnorm)
        for chunk in (1, 777, 1 << 18):  # one candidate per chunk, ragged chunks, everything at once
            got = mse_range(x, fmt, 100, 0.8, pnorm, chunk_elements=chunk)
            assert same_bits(got[0], expected[0]) and same_bits(got[1], expected[1]), (tuple(x.shape), chunk)


@pytest.mark.parametrize("grid,maxshrink", [(100, 0.8), (20, 0.5), (1, 0.5), (7, 0.99)])
def test_mse_search_other_grids(grid, maxshrink):
    fmt = QuantFormat(4, False)
    for x in cases(seed=grid, count=6):
        expected = old_mse_loop(x, fmt, grid, maxshrink, 2.4)
        got = mse_range(x, fmt, grid, maxshrink, 2.4, chunk_elements=500)
        assert same_bits(got[0], expected[0]) and same_bits(got[1], expected[1])
    assert len(mse_shrink_factors(grid, maxshrink)) == max(1, int(maxshrink * grid))


def test_ties_go_to_the_first_candidate_and_reference_is_the_loop():
    """A constant row has the same error for several shrinks: the least shrunk wins, as in the loop."""
    fmt = QuantFormat(8, True)
    x = torch.tensor([[2.0] * 16, [0.0] * 16, [-1.0, 1.0] * 8])
    got = mse_range(x, fmt, 100, 0.8, 2.0, chunk_elements=40)
    expected = old_mse_loop(x, fmt, 100, 0.8, 2.0)
    assert same_bits(got[0], expected[0]) and same_bits(got[1], expected[1])
    assert float(got[1][0]) == 2.0  # p = 1 reproduces 2.0 exactly: no shrink beats it
    reference = mse_range_reference(x, fmt, 100, 0.8, 2.0)
    assert same_bits(reference[0], expected[0]) and same_bits(reference[1], expected[1])


def test_non_finite_errors_keep_the_unshrunk_range():
    fmt = QuantFormat(8, False)
    x = torch.tensor([[float("inf"), 1.0, -2.0], [1.0, 2.0, 3.0], [float("nan"), 0.0, 1.0]])
    got = mse_range(x, fmt, 100, 0.8, 2.0, chunk_elements=3)
    expected = old_mse_loop(x, fmt, 100, 0.8, 2.0)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_observer_ranges_identical_over_several_batches(granularity):
    """Through a quantizer (the way QuaRot and a user's ``observer: mse`` use it), averaged over batches."""
    generator = torch.Generator().manual_seed(9)
    batches = [torch.randn(12, 40, generator=generator) * (i + 1) for i in range(3)]
    results = []
    for fast in (True, False):
        quantizer = TensorQuantizer(
            4, symmetric=True, granularity=granularity, observer="mse",
            observer_kwargs={"pnorm": 2.4, "grid": 100, "maxshrink": 0.8},
        )
        with fused_fake_quant(fast):
            for batch in batches:
                quantizer.observe(batch)
            quantizer.freeze()
        results.append((quantizer.scale, quantizer.zero_point))
    assert same_bits(results[0][0], results[1][0]) and same_bits(results[0][1], results[1][1])
    observer = MSEObserver(QuantFormat(4, True), pnorm=2.4)
    for batch in batches:
        observer.observe(batch.reshape(1, -1) if granularity == "per_tensor" else batch)
    assert same_bits(observer.qparams()[0], results[0][0])


def test_fused_switch_selects_the_reference_loop(monkeypatch):
    """``fused_fake_quant(False)`` runs the original loop (what the quantize benchmark times as "before")."""
    from qbench.quant import observers

    calls = []
    monkeypatch.setattr(observers, "mse_range_reference", lambda *a: calls.append("loop") or mse_range_reference(*a))
    monkeypatch.setattr(observers, "mse_range", lambda *a: calls.append("vector") or mse_range(*a))
    observer = MSEObserver(QuantFormat(4, True))
    observer.observe(torch.randn(3, 10))
    with fused_fake_quant(False):
        observer.observe(torch.randn(3, 10))
    assert calls == ["vector", "loop"]


# -- Outlier Suppression: every α's clipped range from one sort per batch ---------------------------------
def old_clipped_range(record: TokenExtremes, alpha: float):
    """A verbatim copy of ``TokenExtremes.clipped_range`` before vectorisation."""
    lows, highs = [], []
    for t_min, t_max in zip(record.minima, record.maxima):
        upper = torch.quantile(t_max.abs(), alpha)
        lower = -torch.quantile(t_min.abs(), alpha)
        highs.append(torch.minimum(t_max.max(), upper))
        lows.append(torch.maximum(t_min.min(), lower))
    return torch.stack(lows).mean().reshape(1), torch.stack(highs).mean().reshape(1)


@pytest.mark.parametrize("act_bits,step", [(8, 0.01), (4, 0.01), (6, 0.05)])
def test_clipped_ranges_equal_the_per_alpha_loop(act_bits, step):
    generator = torch.Generator().manual_seed(act_bits)
    record = TokenExtremes()
    for batch in range(5):
        x = torch.randn(4, 17 + batch, 24, generator=generator) * (1 + batch)
        if batch == 2:
            x = x.round()  # tied extremes
        record.add(x, tokens=True)
    alphas = candidate_alphas(act_bits, step)
    assert len(alphas) > 3
    ranges = record.clipped_ranges(alphas)
    for alpha in alphas:
        expected = old_clipped_range(record, alpha)
        assert same_bits(ranges[alpha][0], expected[0]) and same_bits(ranges[alpha][1], expected[1])
        assert record.clipped_range(alpha) is ranges[alpha]
    record.add(torch.randn(2, 3, 24, generator=generator) * 50, tokens=True)  # a new batch drops the memo
    expected = old_clipped_range(record, alphas[-1])
    got = record.clipped_range(alphas[-1])
    assert same_bits(got[0], expected[0]) and same_bits(got[1], expected[1])
