"""Observers: range estimators that turn calibration batches into one (lo, hi) per group.

An observer receives each calibration batch already reshaped by the quantizer's granularity to
``(n_groups, n)`` (:meth:`qbench.quant.fake_quant.Granularity.view`), accumulates statistics, and finally
reports a range per group; the :class:`~qbench.quant.fake_quant.QuantFormat` turns that range into
(s, z). The four rules of ``quantizers.md`` §1.4:

=============  ===================================================================================
``minmax``     running global min / max over all batches
``ema_minmax`` ``m ← (1−c)·m + c·batch_min`` (same for max), first batch initialises, c = 0.01
``percentile`` per batch the lower/upper quantile of x (asymmetric) or the quantile of |x| (symmetric),
               averaged over batches; 99.99 %
``mse``        per batch and group, shrink the batch range by ``p = 1 − i/grid`` (i < maxshrink·grid)
               and keep the p minimising ``Σ|x̂ − x|^pnorm``; ranges averaged over batches (one batch
               for weights, where this is exactly the GPTQ/QuaRot clip search); grid 100, maxshrink 0.8,
               pnorm 2
=============  ===================================================================================

New rules subclass :class:`Observer` (``observe`` + ``range``) and register in :data:`OBSERVERS`.

Text towers: activation statistics ignore positions after the end-of-text token or padding
(``quantizers.md`` §1.1). Calibration code marks the valid positions with :func:`valid_tokens`; activation
quantizers then observe only those rows (:func:`select_valid_tokens`), so the rule holds for every observer.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, ClassVar, Iterator

import torch

from qbench.quant.fake_quant import QuantFormat, fake_quantize, fused_enabled, group_minmax

MSE_CHUNK_ELEMENTS = 1 << 18
"""Most elements (256 Ki float32 = 1 MiB per temporary) the vectorised MSE search handles at once: as many
candidate ranges of one tensor as fit are evaluated together (at least one), so memory stays bounded for any
layer size and the working set stays in cache (measured: 2^16 to 2^20 equally fast, 2^22 slower)."""


class Observer(ABC):
    """Accumulates range statistics per group over calibration batches.

    ``observe(groups)`` takes a ``(n_groups, n)`` view of one batch; ``range()`` returns float32
    ``(lo, hi)`` tensors of shape ``(n_groups,)``; ``qparams()`` maps them through the format.
    Statistics are plain tensors on the device of the observed data; :meth:`reset` drops them.
    """

    name: ClassVar[str]

    def __init__(self, fmt: QuantFormat) -> None:
        self.fmt = fmt
        self.n_batches = 0
        self._n_groups: int | None = None

    @property
    def has_data(self) -> bool:
        return self.n_batches > 0

    def observe(self, groups: torch.Tensor) -> None:
        """Add one batch, reshaped to ``(n_groups, n)``."""
        groups = groups.detach().float()
        if groups.numel() == 0:
            return
        self._check_groups(groups)
        self._update(groups)
        self.n_batches += 1

    @abstractmethod
    def _update(self, groups: torch.Tensor) -> None:
        """Fold one non-empty float32 batch view into the statistics."""

    @abstractmethod
    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The estimated ``(lo, hi)`` per group."""

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` per group from :meth:`range`."""
        if not self.has_data:
            raise RuntimeError(f"{self.name} observer has seen no data")
        return self.fmt.qparams(*self.range())

    def reset(self) -> None:
        self.n_batches = 0
        self._n_groups = None

    def config(self) -> dict[str, Any]:
        """Hyperparameters worth recording in provenance."""
        return {"observer": self.name}

    def _check_groups(self, groups: torch.Tensor) -> None:
        if self._n_groups is not None and groups.shape[0] != self._n_groups:
            raise ValueError(f"{self.name} observer saw {groups.shape[0]} groups after {self._n_groups}")
        self._n_groups = groups.shape[0]


class MinMaxObserver(Observer):
    """Running global min and max per group over all batches."""

    name = "minmax"

    def __init__(self, fmt: QuantFormat) -> None:
        super().__init__(fmt)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def _update(self, groups: torch.Tensor) -> None:
        lo, hi = group_minmax(groups)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lo, self.hi

    def reset(self) -> None:
        super().reset()
        self.lo = self.hi = None


class EMAMinMaxObserver(Observer):
    """Exponential moving average of per-batch min and max: ``m ← (1−c)·m + c·batch_min``."""

    name = "ema_minmax"

    def __init__(self, fmt: QuantFormat, momentum: float = 0.01) -> None:
        super().__init__(fmt)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"ema momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def _update(self, groups: torch.Tensor) -> None:
        lo, hi = group_minmax(groups)
        if self.lo is None:
            self.lo, self.hi = lo, hi
            return
        c = self.momentum
        self.lo = (1 - c) * self.lo + c * lo
        self.hi = (1 - c) * self.hi + c * hi

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lo, self.hi

    def reset(self) -> None:
        super().reset()
        self.lo = self.hi = None

    def config(self) -> dict[str, Any]:
        return {"observer": self.name, "momentum": self.momentum}


class _AveragedRangeObserver(Observer):
    """Base for rules that estimate a range per batch and average the estimates over batches."""

    def __init__(self, fmt: QuantFormat) -> None:
        super().__init__(fmt)
        self.lo_sum: torch.Tensor | None = None
        self.hi_sum: torch.Tensor | None = None

    @abstractmethod
    def _batch_range(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This batch's ``(lo, hi)`` per group."""

    def _update(self, groups: torch.Tensor) -> None:
        lo, hi = self._batch_range(groups)
        self.lo_sum = lo if self.lo_sum is None else self.lo_sum + lo
        self.hi_sum = hi if self.hi_sum is None else self.hi_sum + hi

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lo_sum / self.n_batches, self.hi_sum / self.n_batches

    def reset(self) -> None:
        super().reset()
        self.lo_sum = self.hi_sum = None


def _row_quantile(groups: torch.Tensor, q: float) -> torch.Tensor:
    """Nearest-rank quantile ``q ∈ [0, 1]`` of each row (``kthvalue``: no size limit, unlike ``torch.quantile``)."""
    n = groups.shape[1]
    k = min(n, max(1, int(round(q * (n - 1))) + 1))
    return groups.kthvalue(k, dim=1).values


class PercentileObserver(_AveragedRangeObserver):
    """Per batch: the ``(100−p, p)`` percentiles of x (asymmetric) or the p-th of |x| (symmetric)."""

    name = "percentile"

    def __init__(self, fmt: QuantFormat, percentile: float = 99.99) -> None:
        super().__init__(fmt)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def _batch_range(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.percentile / 100.0
        if self.fmt.symmetric:
            amax = _row_quantile(groups.abs(), q)
            return -amax, amax
        return _row_quantile(groups, 1.0 - q), _row_quantile(groups, q)

    def config(self) -> dict[str, Any]:
        return {"observer": self.name, "percentile": self.percentile}


class MSEObserver(_AveragedRangeObserver):
    """Per batch and group, the shrunken range ``p·(min, max)`` minimising ``Σ|x̂ − x|^pnorm``.

    Candidates ``p = 1 − i/grid`` for ``i < maxshrink·grid`` (GPTQ's ``find_params`` search, also used by
    QuaRot with pnorm 2.4). The asymmetric range is widened to contain 0 before shrinking.
    """

    name = "mse"

    def __init__(self, fmt: QuantFormat, grid: int = 100, maxshrink: float = 0.8, pnorm: float = 2.0) -> None:
        super().__init__(fmt)
        if grid < 1 or not 0.0 < maxshrink < 1.0 or pnorm <= 0:
            raise ValueError(f"bad mse observer settings grid={grid}, maxshrink={maxshrink}, pnorm={pnorm}")
        self.grid, self.maxshrink, self.pnorm = grid, maxshrink, pnorm

    def _batch_range(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not fused_enabled():
            return mse_range_reference(groups, self.fmt, self.grid, self.maxshrink, self.pnorm)
        return mse_range(groups, self.fmt, self.grid, self.maxshrink, self.pnorm)

    def config(self) -> dict[str, Any]:
        return {"observer": self.name, "grid": self.grid, "maxshrink": self.maxshrink, "pnorm": self.pnorm}


def mse_shrink_factors(grid: int, maxshrink: float) -> list[float]:
    """The candidate shrink factors ``p = 1 − i/grid`` for ``i < maxshrink·grid`` (at least one), in search order."""
    return [1.0 - i / grid for i in range(max(1, int(maxshrink * grid)))]


def mse_range(
    groups: torch.Tensor, fmt: QuantFormat, grid: int, maxshrink: float, pnorm: float,
    chunk_elements: int = MSE_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MSE observer's search for one ``(n_groups, n)`` float32 batch, all candidates per tensor op.

    Why: the per-candidate loop (:func:`mse_range_reference`) paid, for each of the ~80 candidates, a clip
    mask it never used, a dozen temporaries and Python overhead; here a chunk of candidates is quantized,
    compared and reduced at once, ``(c, n_groups, n)`` with ``c·n_groups·n`` at most ``chunk_elements``
    (at least one candidate per chunk). Same result as the loop, bit for bit: every candidate range and
    its (s, z) come from the same float32 operations, each ``x̂ − x`` is the same number up to the sign of a
    zero (a symmetric format's z = 0 is neither added nor subtracted; ``|·|`` and the power erase the sign),
    each error is the same row sum (for ``pnorm`` other
    than 2, whose power is computed by different instructions at different positions of a vectorised loop,
    the power is applied per candidate on the same contiguous ``(n_groups, n)`` shape as the loop), and the
    winner is the first candidate with the smallest error (the loop's strict ``<``; a NaN error never wins,
    and where every error is NaN or infinite the unshrunk range is kept, as the loop does). With several
    torch threads the loop's error of a per-tensor group (one row of over 32 Ki elements) was summed in a
    thread-dependent order; here every row is summed in one piece, the loop's one-thread result.
    """
    lo, hi = group_minmax(groups)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    factors = mse_shrink_factors(grid, maxshrink)
    n_groups, width = groups.shape
    per_chunk = max(1, chunk_elements // max(1, n_groups * width))
    exact_power = pnorm == 2.0
    best_err = best_lo = best_hi = None
    for start in range(0, len(factors), per_chunk):
        p = torch.tensor(factors[start : start + per_chunk], dtype=torch.float32, device=groups.device)[:, None]
        cand_lo, cand_hi = lo[None, :] * p, hi[None, :] * p  # (c, n_groups)
        scale, zero_point = fmt.qparams(cand_lo, cand_hi)
        err = torch.div(groups[None], scale[:, :, None])  # the fused quantize–dequantize of fake_quantize
        err.round_()
        if not fmt.symmetric:  # symmetric: z = 0, and ±0 from adding it cannot change |x̂ − x|
            err.add_(zero_point[:, :, None])
        err.clamp_(fmt.qmin, fmt.qmax)
        if not fmt.symmetric:
            err.sub_(zero_point[:, :, None])
        err.mul_(scale[:, :, None]).sub_(groups[None])
        if exact_power:
            err.square_()  # pow(2) is x·x; |x|·|x| is the same number
        else:
            err.abs_()
            for candidate in err:
                candidate.pow_(pnorm)
        sums = err.sum(dim=2)
        del err
        sums = torch.where(torch.isnan(sums), torch.full_like(sums, math.inf), sums)
        chunk_err, index = sums.min(dim=0)
        chunk_lo = cand_lo.gather(0, index[None])[0]
        chunk_hi = cand_hi.gather(0, index[None])[0]
        if best_err is None:
            # A group whose every error is infinite keeps the unshrunk range (p = 1 is candidate 0).
            best_err, best_lo, best_hi = chunk_err, chunk_lo, chunk_hi
            stuck = torch.isinf(chunk_err)
            best_lo, best_hi = torch.where(stuck, lo, best_lo), torch.where(stuck, hi, best_hi)
            continue
        better = chunk_err < best_err
        best_err = torch.where(better, chunk_err, best_err)
        best_lo = torch.where(better, chunk_lo, best_lo)
        best_hi = torch.where(better, chunk_hi, best_hi)
    return best_lo, best_hi


def mse_range_reference(
    groups: torch.Tensor, fmt: QuantFormat, grid: int, maxshrink: float, pnorm: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The original one-candidate-at-a-time MSE search, kept only as the reference that tests compare
    :func:`mse_range` with and that ``benchmarks/perf/quantize.py`` times (``fused_fake_quant(False)``)."""
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


OBSERVERS: dict[str, type[Observer]] = {
    cls.name: cls for cls in (MinMaxObserver, EMAMinMaxObserver, PercentileObserver, MSEObserver)
}


def make_observer(name: str, fmt: QuantFormat, **kwargs: Any) -> Observer:
    """An observer by name (``minmax``, ``ema_minmax``, ``percentile``, ``mse``) with rule settings."""
    try:
        cls = OBSERVERS[name]
    except KeyError:
        raise ValueError(f"unknown observer {name!r}; known: {', '.join(sorted(OBSERVERS))}") from None
    return cls(fmt, **kwargs)


# -- valid text positions --------------------------------------------------------------------------
_VALID_TOKENS: ContextVar[torch.Tensor | None] = ContextVar("qbench_valid_tokens", default=None)


def text_token_mask(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """``(B, L)`` bool: positions up to and including the last non-padding token of each row.

    For CLIP's BPE (padding 0 after the end-of-text token) this keeps start, text and end-of-text even
    when the text contains token 0 ("!"); for BERT-style tokenizers it drops the padding.
    """
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    nonpad = tokens != pad_id
    last = torch.where(nonpad, positions, torch.full_like(positions, -1)).amax(dim=1, keepdim=True)
    return positions[None, :] <= last


@contextmanager
def valid_tokens(mask: torch.Tensor | None) -> Iterator[None]:
    """While active, activation observers see only the positions where ``mask`` (``(B, L)`` bool) is True."""
    token = _VALID_TOKENS.set(mask)
    try:
        yield
    finally:
        _VALID_TOKENS.reset(token)


def select_valid_tokens(x: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` at valid text positions, if a :func:`valid_tokens` mask is active and fits.

    Accepted layouts: batch-first ``(B, L, ...)`` (open_clip, transformers), sequence-first ``(L, B, ...)``,
    and per-head ``(B, H, L, ...)`` (attention slots). Any other shape is returned unchanged.
    """
    mask = _VALID_TOKENS.get()
    if mask is None or x.dim() < 3:
        return x
    mask = mask.to(x.device)
    batch, length = mask.shape
    if x.shape[:2] == (batch, length):
        return x[mask]
    if x.shape[:2] == (length, batch):
        return x.transpose(0, 1)[mask]
    if x.dim() >= 4 and x.shape[0] == batch and x.shape[2] == length:
        return x.transpose(1, 2)[mask]
    return x
