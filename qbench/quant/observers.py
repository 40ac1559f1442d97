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

from qbench.quant.fake_quant import QuantFormat, fake_quantize, group_minmax


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
        lo, hi = group_minmax(groups)
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        best_err = torch.full_like(lo, math.inf)
        best_lo, best_hi = lo.clone(), hi.clone()
        for i in range(max(1, int(self.maxshrink * self.grid))):
            p = 1.0 - i / self.grid
            scale, zero_point = self.fmt.qparams(lo * p, hi * p)
            approx = fake_quantize(groups, scale[:, None], zero_point[:, None], self.fmt)
            err = (approx - groups).abs().pow(self.pnorm).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo * p, best_lo)
            best_hi = torch.where(better, hi * p, best_hi)
        return best_lo, best_hi

    def config(self) -> dict[str, Any]:
        return {"observer": self.name, "grid": self.grid, "maxshrink": self.maxshrink, "pnorm": self.pnorm}


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
