"""Uniform affine fake quantization: the one implementation every qbench quantizer builds on.

Quantization is *simulated* (``quantizers.md`` §1.3): a tensor is quantized to integers, clamped to the
integer range and immediately dequantized back to float, ``x̂ = s·(clamp(round(x/s) + z, q_min, q_max) − z)``,
so a float kernel then computes exactly what an integer kernel with those (s, z) would. This is the
affine scheme of Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018 (arXiv:1712.05877).

Three small concepts, each implemented once here:

* :class:`QuantFormat` — the integer grid (bits, symmetric or asymmetric, narrow or full signed range) and
  the map from a range ``(lo, hi)`` to ``(s, z)``.
* :class:`Granularity` — which elements share one (s, z): a *group view* reshapes any tensor to
  ``(n_groups, n)`` so quantization, observers and the verifier all work per row of that view.
* :func:`fake_quantize` — quantize–dequantize with the clipped straight-through estimator of Bengio et al.,
  "Estimating or Propagating Gradients Through Stochastic Neurons", arXiv:1308.3432, 2013
  (``quantizers.md`` §1.5): gradient 1 where the value falls inside the integer range, 0 where it is
  clipped; s and z receive no gradient. Methods that learn s (LSQ) implement their own estimator.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

import torch

SCALE_FLOOR = 1e-8
"""Smallest step size; keeps an all-zero group from dividing by zero (``quantizers.md`` §1.3)."""

GRANULARITY_KINDS = ("per_tensor", "per_channel", "per_token", "group")
_GROUP_PATTERN = re.compile(r"^group[-_]?(\d+)$")


# -- integer grid ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantFormat:
    """An integer grid and how a real range maps onto it.

    * symmetric, ``narrow=True`` (default): ``q ∈ [−(2^{b−1}−1), 2^{b−1}−1]``, z = 0, ``s = max|x| / q_max``;
    * symmetric, ``narrow=False``: LSQ-style full signed range ``[−2^{b−1}, 2^{b−1}−1]`` (only where a
      method says so), same step rule;
    * asymmetric: unsigned ``q ∈ [0, 2^b−1]``; the range is first widened to contain 0 so that 0 is exactly
      representable, ``s = (max−min)/(2^b−1)``, ``z = clamp(round(−min/s), 0, 2^b−1)``.
    """

    bits: int
    symmetric: bool
    narrow: bool = True

    def __post_init__(self) -> None:
        if not 2 <= int(self.bits) <= 16:
            raise ValueError(f"bits must be in 2..16, got {self.bits}")

    @property
    def qmin(self) -> int:
        if not self.symmetric:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1 if not self.symmetric else 2 ** (self.bits - 1) - 1

    @property
    def n_levels(self) -> int:
        """Number of integer levels ``q_max − q_min + 1`` (at most 2^b)."""
        return self.qmax - self.qmin + 1

    def qparams(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point (float32, same shape as ``lo``) for the ranges ``[lo, hi]``, element-wise."""
        lo, hi = lo.detach().float(), hi.detach().float()
        if self.symmetric:
            amax = torch.maximum(lo.abs(), hi.abs())
            scale = (amax / self.qmax).clamp(min=SCALE_FLOOR)
            return scale, torch.zeros_like(scale)
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = ((hi - lo) / (self.qmax - self.qmin)).clamp(min=SCALE_FLOOR)
        zero_point = torch.clamp(torch.round(-lo / scale) + self.qmin, self.qmin, self.qmax)
        return scale, zero_point

    def __str__(self) -> str:
        kind = "asym" if not self.symmetric else ("sym" if self.narrow else "sym-full")
        return f"int{self.bits}-{kind}"


# -- granularity -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Granularity:
    """Which elements share one (s, z), expressed as a reshape to ``(n_groups, n)``.

    * ``per_tensor``: one group, ``(1, numel)``;
    * ``per_channel``: dim 0 (the output channel of a Linear/Conv weight), ``(shape[0], rest)``;
    * ``per_token``: rows of the last dimension, ``(numel / shape[-1], shape[-1])``; activations only and
      always *dynamic* (computed on the fly per input);
    * ``group`` with ``group_size`` g: consecutive g input features per output row of a weight,
      ``(shape[0] · ⌈rest/g⌉, g)``. A row whose length is not a multiple of g gets a short last group,
      padded in the view by repeating its last element (which adds no new value and does not move the
      group's min or max); :meth:`unview` drops the padding. For a conv weight the row is the flattened
      ``(in, kh, kw)`` block, so a group holds consecutive kernel taps of consecutive input channels.

    Parse from text with :meth:`parse`: ``per_tensor``, ``per_channel``, ``per_token``, ``group-128``.
    """

    kind: str
    group_size: int = 0

    def __post_init__(self) -> None:
        if self.kind not in GRANULARITY_KINDS:
            raise ValueError(f"unknown granularity {self.kind!r}; use one of {', '.join(GRANULARITY_KINDS)}")
        if (self.kind == "group") != (self.group_size > 0):
            raise ValueError("a group granularity needs group_size > 0 (e.g. 'group-128'); others take none")

    @classmethod
    def parse(cls, value: "str | Granularity") -> "Granularity":
        """``"per_tensor"``, ``"per-channel"``, ``"per_token"``, ``"group-128"`` (or an instance, returned as is)."""
        if isinstance(value, Granularity):
            return value
        text = str(value).strip().lower().replace("-", "_")
        match = _GROUP_PATTERN.match(text)
        if match:
            return cls("group", int(match.group(1)))
        if text not in GRANULARITY_KINDS or text == "group":
            raise ValueError(
                f"unknown granularity {value!r}; use per_tensor, per_channel, per_token or group-<g> (e.g. group-128)"
            )
        return cls(text)

    @property
    def dynamic_only(self) -> bool:
        """Per-token (s, z) depend on the token, so they can only be computed on the fly."""
        return self.kind == "per_token"

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` reshaped to ``(n_groups, n)``, one row per (s, z)."""
        if self.kind == "per_tensor":
            return t.reshape(1, -1)
        if self.kind == "per_channel":
            return t.reshape(t.shape[0], -1) if t.dim() > 0 else t.reshape(1, 1)
        if self.kind == "per_token":
            return t.reshape(-1, t.shape[-1]) if t.dim() > 0 else t.reshape(1, 1)
        rows = t.reshape(t.shape[0], -1)
        pad = (-rows.shape[1]) % self.group_size
        if pad:
            rows = torch.cat([rows, rows[:, -1:].expand(-1, pad)], dim=1)
        return rows.reshape(-1, self.group_size)

    def unview(self, groups: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`view`: ``groups`` back to the shape of ``like``."""
        if self.kind != "group":
            return groups.reshape(like.shape)
        rows = groups.reshape(like.shape[0], -1)
        return rows[:, : like[0].numel()].reshape(like.shape)

    def n_groups(self, t: torch.Tensor) -> int:
        if self.kind == "per_tensor":
            return 1
        if self.kind == "group":
            return t.shape[0] * -(-t[0].numel() // self.group_size)
        return self.view(t).shape[0]

    def __str__(self) -> str:
        return f"group-{self.group_size}" if self.kind == "group" else self.kind


# -- quantize-dequantize ---------------------------------------------------------------------------
_FUSED: ContextVar[bool] = ContextVar("qbench_fused_fake_quant", default=True)


@contextmanager
def fused_fake_quant(enabled: bool = True) -> Iterator[None]:
    """Switch the no-gradient fast paths on (default) or off for the duration (tests and benchmarks only).

    The fast paths (issue 16): the fused in-place quantize–dequantize of :func:`fake_quantize` without
    autograd and the per-tensor shortcut of :func:`fake_quantize_grouped`; LSQ's no-gradient forward
    (:func:`qbench.quant.lsq.lsq_fake_quantize_no_grad`); the cached fake-quantized weights of
    :class:`qbench.quant.modules.QuantModule`; the vectorised MSE observer search
    (:func:`qbench.quant.observers.mse_range`). Each computes the very same floating-point operations as the
    code it replaces, so results are bit-identical; ``enabled=False`` runs that original code, so a test can
    prove the identity and a benchmark can time the "before". Per context (thread, task), like autograd modes.
    """
    token = _FUSED.set(bool(enabled))
    try:
        yield
    finally:
        _FUSED.reset(token)


def fused_enabled() -> bool:
    """Whether the no-gradient fast paths are on (see :func:`fused_fake_quant`)."""
    return _FUSED.get()


def _fused_quant_dequant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, dequant: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """The forward of :class:`_FakeQuantSTE` as one buffer updated in place (no clip mask, no autograd node).

    Same operations in the same order — divide, round half-to-even, add z, clamp, subtract the dequant z,
    multiply by s — so every element is bit-identical to the STE forward; only the temporaries are gone.
    The first op allocates the buffer (``x`` is never written); (s, z) must broadcast into it without
    enlarging it, which the caller checks.
    """
    q = torch.div(x, scale)
    q.round_()
    q.add_(zero_point)
    q.clamp_(qmin, qmax)
    q.sub_(dequant)
    q.mul_(scale)
    return q


def _fits_in_place(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, dequant: torch.Tensor) -> bool:
    """True when ``x / scale`` already has the broadcast shape of all four operands (in-place ops then apply)."""
    if zero_point.shape == scale.shape and dequant.shape == scale.shape:
        return True
    shape = torch.broadcast_shapes(x.shape, scale.shape)
    return torch.broadcast_shapes(shape, zero_point.shape, dequant.shape) == shape


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: affine quantize–dequantize. Backward: clipped straight-through (Bengio et al., 2013)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, dequant_zero_point, qmin: int, qmax: int):  # type: ignore[override]
        q = torch.round(x / scale) + zero_point
        inside = (q >= qmin) & (q <= qmax)
        ctx.save_for_backward(inside)
        return (q.clamp(qmin, qmax) - dequant_zero_point) * scale

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad_output * inside.to(grad_output.dtype), None, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    fmt: QuantFormat,
    dequant_zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """``s·(clamp(round(x/s) + z, q_min, q_max) − z)`` with (s, z) broadcast against ``x``.

    Computed in float32 (half inputs are upcast, the result cast back); ``round`` is half-to-even
    (``torch.round``). Gradient w.r.t. ``x`` is 1 inside the representable range and 0 where clipped;
    ``scale`` and ``zero_point`` are treated as constants. ``dequant_zero_point`` (default: z) replaces z in
    the dequantization only — the integer codes stay those of z — for formats whose stored zero point is
    real-valued (QA-LoRA merges its adapters there); each group still takes at most 2^b values.

    When no gradient can flow to ``x`` (``torch.no_grad``/inference mode, or ``x`` not requiring grad) the
    straight-through node and its clip mask are skipped: the same operations run in place on one buffer
    (:func:`_fused_quant_dequant`), bit-identical to the autograd path and several times cheaper.
    """
    scale = scale.detach().to(device=x.device, dtype=torch.float32)
    zero_point = zero_point.detach().to(device=x.device, dtype=torch.float32)
    dequant = zero_point if dequant_zero_point is None else dequant_zero_point.detach().to(device=x.device, dtype=torch.float32)
    x32 = x.float()
    if (
        not (torch.is_grad_enabled() and x32.requires_grad)
        and _FUSED.get()
        and _fits_in_place(x32, scale, zero_point, dequant)
    ):
        out = _fused_quant_dequant(x32, scale, zero_point, dequant, fmt.qmin, fmt.qmax)
    else:
        out = _FakeQuantSTE.apply(x32, scale, zero_point, dequant, fmt.qmin, fmt.qmax)
    return out.to(x.dtype)


def fake_quantize_grouped(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    fmt: QuantFormat,
    granularity: Granularity,
    dequant_zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` with one (s, z) per group of ``granularity`` (``scale``: ``(n_groups,)``).

    Per-tensor on a contiguous ``x`` (the common activation case) broadcasts the single (s, z) against ``x``
    directly instead of going through the ``(1, numel)`` view and back: the same element-wise operations,
    so the same values and the same contiguous result, with less bookkeeping per call.
    """
    if (
        granularity.kind == "per_tensor"
        and scale.numel() == 1
        and x.dim() > 0
        and x.is_contiguous()
        and _FUSED.get()
    ):
        dequant = None if dequant_zero_point is None else dequant_zero_point.reshape(1)
        return fake_quantize(x, scale.reshape(1), zero_point.reshape(1), fmt, dequant)
    groups = granularity.view(x)
    if scale.numel() != groups.shape[0]:
        raise ValueError(
            f"{scale.numel()} scales for {groups.shape[0]} groups ({granularity}) of a tensor of shape {tuple(x.shape)}"
        )
    dequant = None if dequant_zero_point is None else dequant_zero_point.reshape(-1, 1)
    out = fake_quantize(groups, scale.reshape(-1, 1), zero_point.reshape(-1, 1), fmt, dequant)
    return granularity.unview(out, x)


def group_minmax(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min and max of a ``(n_groups, n)`` view, as float32 ``(n_groups,)`` tensors."""
    groups = groups.detach().float()
    return groups.amin(dim=1), groups.amax(dim=1)


def minmax_qparams(
    x: torch.Tensor, fmt: QuantFormat, granularity: Granularity
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, z) per group from the group's own min and max (round-to-nearest / dynamic quantization)."""
    return fmt.qparams(*group_minmax(granularity.view(x)))


def fake_quantize_dynamic(x: torch.Tensor, fmt: QuantFormat, granularity: "Granularity | str") -> torch.Tensor:
    """Fake-quantize with (s, z) computed from ``x`` itself (per-token activations, RTN weights)."""
    granularity = Granularity.parse(granularity)
    scale, zero_point = minmax_qparams(x, fmt, granularity)
    return fake_quantize_grouped(x, scale, zero_point, fmt, granularity)


def count_unique_per_group(groups: torch.Tensor) -> torch.Tensor:
    """Number of distinct values in each row of ``(n_groups, n)`` (sort each row, count changes)."""
    if groups.shape[1] == 0:
        return torch.zeros(groups.shape[0], dtype=torch.long, device=groups.device)
    ordered = groups.detach().sort(dim=1).values
    return 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1)
