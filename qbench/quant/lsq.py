"""Learned step size quantization (LSQ) and its learnable-offset extension (LSQ+) (``quantizers.md`` §1.5).

LSQ learns the step ``s`` of a uniform quantizer by gradient descent through the quantizer itself:
``v̄ = round(clamp(v/s, −Qn, Qp))``, ``v̂ = v̄·s``, with the rounding passed straight through so that

* ``∂v̂/∂v = 1`` inside the range, 0 outside (clipped straight-through);
* ``∂v̂/∂s = −v/s + round(v/s)`` inside, ``−Qn`` below, ``Qp`` above;

and the step gradient multiplied by ``g = 1/√(N·Qp)`` (N = values sharing that step: the weights of the
tensor or channel, or the features per example of an activation) so steps and weights learn at comparable
rates. S. K. Esser, J. L. McKinstry, D. Bablani, R. Appuswamy, D. S. Modha, "Learned Step Size
Quantization", ICLR 2020, arXiv:1902.08153.

LSQ+ adds a learnable offset β for asymmetric (unsigned) ranges,
``v̂ = round(clamp((v−β)/s, 0, 2^b−1))·s + β``, whose gradient (1 outside the range, 0 inside) gets the
same scale g. Y. Bhalgat, J. Lee, M. Nagel, T. Blankevoort, N. Kwak, "LSQ+: Improving low-bit quantization
through learnable offsets and better initialization", CVPRW 2020, arXiv:2004.09576.

Pieces, each usable alone:

* :func:`round_pass`, :func:`grad_scale` — the two straight-through tricks, written so that the forward
  value is *bit-exact* (``round(x)`` and ``s``), which keeps a fake-quantized tensor on at most 2^b values;
* :func:`lsq_fake_quantize` — the quantize–dequantize with learnable step (and optional offset) for any
  granularity's group view (per-tensor, per-channel, group-g);
* :class:`LSQQuantizer` — a :class:`~qbench.quant.modules.TensorQuantizer` whose (s, β) are
  ``nn.Parameter``\\ s, so it plugs into :class:`~qbench.quant.modules.QuantLinear` and passes the verifier
  (it keeps ``bits``, ``granularity``, ``mode`` and ``group_view``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qbench.quant.determinism import broadcast_columns, ordered_mean
from qbench.quant.fake_quant import SCALE_FLOOR, Granularity, fused_enabled
from qbench.quant.modules import Mode, TensorQuantizer

LSQ_INITS = ("lsq", "minmax")


# -- straight-through tricks -----------------------------------------------------------------------
def round_pass(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity gradient backward.

    Written as ``round(x).detach() + (x − x.detach())`` rather than ``x + (round(x) − x).detach()``: the
    added term is exactly 0 in floating point, so the forward value is exactly ``round(x)``.
    """
    return x.detach().round() + (x - x.detach())


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` forward, gradient multiplied by ``g`` backward (LSQ's ``s·g + (s − s·g).detach()``, forward-exact)."""
    scaled = x * g
    return x.detach() + (scaled - scaled.detach())


def lsq_grad_factor(n: int, qmax: int) -> float:
    """LSQ's gradient scale ``g = 1/√(N·Qp)`` for ``n`` values sharing one step."""
    if n < 1 or qmax < 1:
        raise ValueError(f"gradient scale needs n >= 1 and Qp >= 1, got n={n}, Qp={qmax}")
    return 1.0 / math.sqrt(n * qmax)


def lsq_init_step(groups: torch.Tensor, qmax: int) -> torch.Tensor:
    """LSQ's initial step per row of a ``(n_groups, n)`` view: ``2·mean|v| / √Qp`` (floored at 1e-8); the mean
    is a fixed-order float64 sum (:func:`qbench.quant.determinism.ordered_mean`), the same for any thread count."""
    mean_abs = ordered_mean(groups.detach().float().abs(), dim=1).float()
    return (2.0 * mean_abs / math.sqrt(qmax)).clamp(min=SCALE_FLOOR)


# -- quantize-dequantize ---------------------------------------------------------------------------
def lsq_fake_quantize(
    groups: torch.Tensor,
    step: torch.Tensor,
    qmin: int,
    qmax: int,
    g: float,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """LSQ (``offset=None``) or LSQ+ fake quantization of a ``(n_groups, n)`` view with one step per row.

    ``step`` (and ``offset``) have shape ``(n_groups,)`` (or broadcast against ``(n_groups, 1)``); their
    gradients are scaled by ``g``. Computes ``round(clamp((v − β)/s, q_min, q_max))·s + β`` with β = 0
    without an offset. The step is floored at 1e-8 so a step driven to 0 cannot divide by zero. Their
    gradients are summed over each row in a fixed order (:func:`qbench.quant.determinism.broadcast_columns`), so
    training gives the same steps for any number of torch threads.
    """
    width = groups.shape[1]
    s = broadcast_columns(grad_scale(step.reshape(-1, 1).clamp(min=SCALE_FLOOR), g), width)
    v = groups
    beta = None
    if offset is not None:
        beta = broadcast_columns(grad_scale(offset.reshape(-1, 1), g), width)
        v = v - beta
    q = round_pass(torch.clamp(v / s, qmin, qmax))
    out = q * s
    return out + beta if beta is not None else out


def lsq_fake_quantize_no_grad(
    groups: torch.Tensor,
    step: torch.Tensor,
    qmin: int,
    qmax: int,
    g: float,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """The forward value of :func:`lsq_fake_quantize` without autograd, on one buffer updated in place.

    Why: evaluating a trained LSQ model (or searching its ranges) needs no gradients, and the autograd
    tricks (straight-through round, gradient scale, ordered broadcast) cost several full-size temporaries
    per call. The small per-group step and offset go through the very same :func:`grad_scale` expressions;
    the full-size operations are the same ones in the same order (subtract β, divide by s, clamp, round,
    add the exact zero that :func:`round_pass` adds, multiply by s, add β), so every value is bit-identical
    to :func:`lsq_fake_quantize` (a NaN input stays NaN). Never call it where a gradient is needed.
    """
    with torch.no_grad():
        s = grad_scale(step.reshape(-1, 1).clamp(min=SCALE_FLOOR), g)
        beta = grad_scale(offset.reshape(-1, 1), g) if offset is not None else None
        q = torch.sub(groups, beta) if beta is not None else groups
        q = torch.div(q, s) if beta is None else q.div_(s)
        q.clamp_(qmin, qmax)
        q.round_()
        q.add_(0.0)  # round_pass adds (c − c): +0.0, which turns a rounded −0.0 into +0.0
        q.mul_(s)
        if beta is not None:
            q.add_(beta)
        return q


# -- module ----------------------------------------------------------------------------------------
class LSQQuantizer(TensorQuantizer):
    """A tensor quantizer with a learnable step per group (LSQ) and optionally a learnable offset (LSQ+).

    * ``signed=True``: LSQ's full signed grid ``[−2^{b−1}, 2^{b−1}−1]`` (weights; activations that take
      negative values); ``signed=False``: unsigned ``[0, 2^b−1]``; ``offset=True`` (unsigned only) adds the
      LSQ+ offset β.
    * ``granularity``: ``per_tensor``, ``per_channel`` (weights, dim 0) or ``group-g``; dynamic per-token
      is not learnable and is refused.
    * Gradient scale ``g = 1/√(N·Qp)`` with N the values per group for weights; for activations
      (``features_per_example=True``) N is the number of features per example, ``numel / shape[0]``
      (batch-first layouts) per group, following LSQ.
    * Initialisation at :meth:`freeze` from what was observed in ``calibrate`` mode: ``init="lsq"`` takes
      ``s = 2·mean|v|/√Qp`` from the first batch (β = 0); ``init="minmax"`` takes the min/max range of all
      batches through :meth:`set_range`, which reproduces the static affine quantizer of that range exactly.
      :meth:`set_range` may also be called directly (e.g. after a clipping search).

    The learnable values are the parameters ``step`` and ``offset`` (shape ``(n_groups,)``), created when
    first initialised; :attr:`scale` / :attr:`zero_point` stay None (they are the static-affine buffers of
    the base class).
    """

    def __init__(
        self,
        bits: int,
        *,
        signed: bool,
        offset: bool = False,
        granularity: "str | Granularity" = "per_tensor",
        init: str = "lsq",
        features_per_example: bool = False,
    ) -> None:
        if offset and signed:
            raise ValueError("an LSQ+ offset goes with an unsigned grid: pass signed=False")
        if init not in LSQ_INITS:
            raise ValueError(f"unknown LSQ init {init!r}; use one of {', '.join(LSQ_INITS)}")
        super().__init__(bits, symmetric=signed, granularity=granularity, narrow=False)
        self.init = init
        self.learn_offset = offset
        self.features_per_example = features_per_example
        self.register_parameter("step", None)
        self.register_parameter("offset", None)
        self._first_step: torch.Tensor | None = None

    # -- what the verifier and provenance read ------------------------------------------------
    @property
    def is_frozen(self) -> bool:
        return self.mode is Mode.QUANTIZE and self.step is not None

    @property
    def is_initialised(self) -> bool:
        return self.step is not None

    def describe(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "format": "lsq+" if self.learn_offset else ("lsq-signed" if self.symmetric else "lsq-unsigned"),
            "qmin": self.fmt.qmin,
            "qmax": self.fmt.qmax,
            "granularity": str(self.granularity),
            "dynamic": False,
            "init": self.init,
            "learnable": ["step", "offset"] if self.learn_offset else ["step"],
        }

    # -- initialisation ---------------------------------------------------------------------------
    def observe(self, x: torch.Tensor) -> None:
        """``lsq`` init: remember the mean-abs step of the first batch; ``minmax``: feed the range observer."""
        groups = self.group_view(x.detach())
        if groups.numel() == 0:
            return
        if self.init == "minmax":
            self.observer.observe(groups)
        elif self._first_step is None:
            self._first_step = lsq_init_step(groups, self.fmt.qmax)

    def freeze(self) -> bool:
        """Initialise (s, β) from the observations (if not set already) and switch to ``quantize``."""
        self.mode = Mode.QUANTIZE
        if self.init == "minmax" and self.observer.has_data:
            self.set_range(*self.observer.range())
            self.observer.reset()
        elif self.init == "lsq" and self._first_step is not None:
            self.set_step(self._first_step, torch.zeros_like(self._first_step) if self.learn_offset else None)
            self._first_step = None
        return self.step is not None

    @torch.no_grad()
    def set_step(self, step: torch.Tensor, offset: torch.Tensor | None = None) -> None:
        """Set (s, β) per group (float32). Existing parameters of the same shape are updated in place, so an
        optimizer holding them keeps working; otherwise they are created."""
        step = step.detach().float().flatten().clamp(min=SCALE_FLOOR)
        self._assign("step", step)
        if self.learn_offset:
            value = torch.zeros_like(step) if offset is None else offset.detach().float().flatten().to(step.device)
            self._assign("offset", value)

    def _assign(self, name: str, value: torch.Tensor) -> None:
        current = getattr(self, name)
        if current is not None and current.shape == value.shape:
            current.copy_(value.to(current.device))
        else:
            setattr(self, name, nn.Parameter(value.clone()))

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """(s, β) reproducing the static affine quantizer of ``[lo, hi]`` per group (``quantizers.md`` §1.3).

        Unsigned with offset: ``s, z`` from the asymmetric rule, ``β = −s·z`` (then ``(v−β)/s = v/s + z``
        with z an integer, so the two quantizers agree bit for bit). Signed: ``s = max|·| / Qp``.
        Unsigned without offset: ``s = max(hi, 0) / Qp``.
        """
        lo, hi = torch.as_tensor(lo).float().flatten(), torch.as_tensor(hi).float().flatten()
        if self.learn_offset:
            scale, zero_point = self.fmt.qparams(lo, hi)
            self.set_step(scale, -scale * zero_point)
        elif self.symmetric:
            self.set_step(self.fmt.qparams(lo, hi)[0])
        else:
            self.set_step(hi.clamp(min=0.0) / self.fmt.qmax)

    # -- forward ----------------------------------------------------------------------------------
    def grad_factor(self, x: torch.Tensor) -> float:
        """``g = 1/√(N·Qp)``: N = values per group (weights) or features per example per group (activations)."""
        per_group = self.group_view(x).shape[1]
        if self.features_per_example and x.dim() > 1:
            per_group = max(1, per_group // x.shape[0])
        return lsq_grad_factor(per_group, self.fmt.qmax)

    def qparams_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The current (s, z) in affine form, ``z = −β/s`` (not necessarily an integer once β is trained)."""
        if self.step is None:
            raise RuntimeError(f"LSQ quantizer ({self.extra_repr()}) used before its step was initialised")
        step = self.step.detach().clamp(min=SCALE_FLOOR)
        zero_point = -self.offset.detach() / step if self.offset is not None else torch.zeros_like(step)
        return step, zero_point

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """LSQ/LSQ+ fake quantization with gradients to the input, the step and the offset."""
        if self.step is None:
            raise RuntimeError(f"LSQ quantizer ({self.extra_repr()}) used before its step was initialised")
        groups = self.group_view(x).float()
        if self.step.numel() != groups.shape[0]:
            raise ValueError(f"{self.step.numel()} steps for {groups.shape[0]} groups ({self.granularity})")
        if not torch.is_grad_enabled() and fused_enabled():
            function = lsq_fake_quantize_no_grad
        else:
            function = lsq_fake_quantize
        out = function(groups, self.step, self.fmt.qmin, self.fmt.qmax, self.grad_factor(x), self.offset)
        return self.granularity.unview(out, x).to(x.dtype)

    def cache_sources(self) -> tuple[Any, ...] | None:
        """A frozen LSQ weight depends on the format, the granularity and the ``step``/``offset`` parameters
        (an optimizer step bumps their version, which drops the cached value); None for subclasses that
        change how it quantizes."""
        cls = type(self)
        if (
            cls.forward is not TensorQuantizer.forward
            or cls.quantize is not LSQQuantizer.quantize
            or cls.qparams_for is not LSQQuantizer.qparams_for
        ):
            return None
        return (self.fmt, self.granularity, self.step, self.offset)

    def extra_repr(self) -> str:
        kind = "lsq+" if self.learn_offset else "lsq"
        return f"{kind}, {self.fmt}, {self.granularity}, mode={self.mode.value}"
