"""The ``nn.Module`` side of ``qat-lora`` (:mod:`qbench_plugins.quantizers.qat_lora`): the group weight quantizer,
the adapter layers and their merge.

Kept apart from the registration module so that registering the plugin (``qbench list``) does not import torch;
the quantizer imports this module when it wraps the model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qbench.quant.fake_quant import Granularity, fake_quantize_grouped
from qbench.quant.modules import QuantConv2d, QuantLinear, QuantModule, TensorQuantizer
from qbench.vlm import VLM
from qbench_plugins.quantizers.qat_lora import ADAPTER_ATTRIBUTES, derive_seed

__all__ = ["ADAPTER_TYPES", "GroupWeightQuantizer", "QALoRAConv2d", "QALoRALinear", "QALoRAModule", "adapter_modules",
           "merge_adapters"]


# -- group weight quantizer with a real-valued dequantization zero point ---------------------------
class GroupWeightQuantizer(TensorQuantizer):
    """Group-g asymmetric static minmax weight quantizer (``[0, 2^b−1]``, one (s, z) per g consecutive input
    features of a row) whose dequantization zero point can become real-valued.

    ``zero_point`` (integer-valued) always codes: ``q = clamp(round(W/s) + z, 0, 2^b−1)``. Until a QA-LoRA
    merge, ``dequant_zero_point`` is None and the quantizer is the plain :class:`TensorQuantizer`
    (``s·(q − z)``); after :meth:`shift_zero_points` it dequantizes with the buffer instead,
    ``s·(q − z_real)`` — same codes, still at most 2^b values per group.
    """

    def __init__(self, bits: int, group_size: int) -> None:
        super().__init__(bits, symmetric=False, granularity=Granularity("group", int(group_size)))
        self.register_buffer("dequant_zero_point", None)

    @property
    def merged(self) -> bool:
        return self.dequant_zero_point is not None

    def shift_zero_points(self, shift: torch.Tensor) -> None:
        """``z_real ← z_real − shift`` per group (``z_real`` starts at the integer zero point)."""
        if self.scale is None:
            raise RuntimeError("cannot shift the zero points of an uncalibrated group quantizer")
        base = self.dequant_zero_point if self.merged else self.zero_point
        shift = shift.reshape(-1).to(device=base.device)
        self.dequant_zero_point = (base.double() - shift.double()).to(torch.float32)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self.qparams_for(x)
        return fake_quantize_grouped(x, scale, zero_point, self.fmt, self.granularity, self.dequant_zero_point)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["zero_point"] = "real-valued (QA-LoRA merge)" if self.merged else "integer"
        return info


# -- adapter layers --------------------------------------------------------------------------------
class QALoRAModule(QuantModule):
    """Mixin for a quantized layer with a QA-LoRA branch on its group-pooled quantized input.

    Parameters ``lora_A`` ``(r, D_in/g)`` and ``lora_B`` ``(D_out, r)``; plain attributes
    :data:`ADAPTER_ATTRIBUTES`. Subclasses implement :meth:`pooled_input` (``(..., D_in/g)`` for a Linear,
    ``(N, D_in/g, L)`` for a conv) and :meth:`adapter`.
    """

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    group_size: int
    rank: int
    alpha: float
    scaling: float
    dropout: float
    dropout_seed: int
    dropout_calls: int
    _plain_type: type[QuantModule]

    @classmethod
    def from_quantized(
        cls, module: QuantModule, *, group_size: int, rank: int, alpha: float, dropout: float, seed: int, name: str
    ) -> "QALoRAModule":
        """The adapter twin of a group-quantized module (same Parameters, buffers and quantizers)."""
        if type(module) is not cls._plain_type:
            raise TypeError(f"{cls.__name__} adapts a {cls._plain_type.__name__}, got {type(module).__name__}")
        weight = module.weight
        if weight[0].numel() % group_size:
            raise ValueError(f"{name}: row length {weight[0].numel()} is not a multiple of group size {group_size}")
        new = cls.__new__(cls)
        new.__dict__.update(_shallow_state(module))
        generator = torch.Generator().manual_seed(derive_seed(seed, name, "lora_A"))
        a = nn.init.xavier_uniform_(torch.empty(rank, weight[0].numel() // group_size), generator=generator)
        new.lora_A = nn.Parameter(a.to(device=weight.device, dtype=weight.dtype))
        new.lora_B = nn.Parameter(torch.zeros(weight.shape[0], rank, device=weight.device, dtype=weight.dtype))
        new.group_size, new.rank, new.alpha = int(group_size), int(rank), float(alpha)
        new.scaling = float(alpha) / int(rank)
        new.dropout = float(dropout)
        new.dropout_seed = derive_seed(seed, name, "lora_dropout")
        new.dropout_calls = 0
        return new

    # -- branch ----------------------------------------------------------------------------------
    def pooled_input(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adapter(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def dropout_active(self) -> bool:
        """Dropout applies while training: this module or its weight quantizer in training mode."""
        return self.dropout > 0 and (self.training or self.weight_quantizer.training)

    def drop(self, pooled: torch.Tensor) -> torch.Tensor:
        """Inverted dropout on the pooled input with a mask from a (seed, call)-seeded generator."""
        if not self.dropout_active:
            return pooled
        generator = torch.Generator(device=pooled.device).manual_seed(derive_seed(self.dropout_seed, self.dropout_calls))
        self.dropout_calls += 1
        keep = torch.empty_like(pooled).bernoulli_(1.0 - self.dropout, generator=generator)
        return pooled * keep / (1.0 - self.dropout)

    def resume_state(self) -> dict[str, Any]:
        """The dropout call counter (it seeds the next mask; a plain attribute, not in the state dict), so a
        resumed Light-QAT run draws the same masks (:class:`qbench.quant.training_state.ResumableState`)."""
        return {"dropout_calls": self.dropout_calls}

    def load_resume_state(self, state: dict[str, Any]) -> None:
        self.dropout_calls = int(state["dropout_calls"])

    def lora_delta(self) -> torch.Tensor:
        """``(α/r)·B·A`` per (row, group), ``(D_out, D_in/g)``, in float64."""
        return self.scaling * (self.lora_B.detach().double() @ self.lora_A.detach().double())

    # -- merge -----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> tuple[QuantModule, torch.Tensor]:
        """Fold the branch into the weight quantizer's zero points and return the plain quantized twin
        (no adapter) and the zero-point shift ``(α/r)(BA)/(g·s)`` per (row, group), in integer steps."""
        quantizer = self.weight_quantizer
        if not isinstance(quantizer, GroupWeightQuantizer) or quantizer.scale is None:
            raise RuntimeError("QA-LoRA merge needs a calibrated group weight quantizer")
        rows = self.weight.shape[0]
        scale = quantizer.scale.double().reshape(rows, -1)
        shift = self.lora_delta().to(scale.device) / (self.group_size * scale)
        quantizer.shift_zero_points(shift)
        return self.deployed(), shift

    def deployed(self) -> QuantModule:
        """The plain quantized twin sharing Parameters, buffers and quantizers; the branch dropped."""
        plain = self._plain_type.__new__(self._plain_type)
        state = _shallow_state(self)
        for key in ADAPTER_ATTRIBUTES:
            state.pop(key, None)
        plain.__dict__.update(state)
        for key in ("lora_A", "lora_B"):
            plain._parameters.pop(key, None)
        return plain

    def to_float(self) -> nn.Module:
        """The plain float module (as before quantization): quantizers and the adapter branch dropped."""
        return self.deployed().to_float()


class QALoRALinear(QALoRAModule, QuantLinear):
    """``F.linear(x̂, Q(W), b) + (α/r)·B(A(drop(pool_g(x̂))))`` with ``x̂ = Q_a(x)``."""

    _plain_type = QuantLinear

    def pooled_input(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over each group of g consecutive input features: ``(..., D_in) → (..., D_in/g)``."""
        return x.reshape(*x.shape[:-1], -1, self.group_size).mean(dim=-1)

    def adapter(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        pooled = self.drop(self.pooled_input(x))
        return (pooled @ self.lora_A.t()) @ self.lora_B.t() * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self.quantized_operands(x)
        out = F.linear(x, weight, self.bias)
        return out + self.adapter(x, out)


class QALoRAConv2d(QALoRAModule, QuantConv2d):
    """The conv on ``Q_a(x)``, ``Q(W)`` plus the branch on the group-pooled ``F.unfold`` columns of ``Q_a(x)``."""

    _plain_type = QuantConv2d

    def pooled_input(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, D_in/g, L)``: the unfolded receptive fields (column order ``(in, kh, kw)`` = the weight's
        flattened order, padding as the conv applies it), averaged over each group of g."""
        padding: Any = self.padding
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=padding, stride=self.stride)
        n, features, length = cols.shape
        return cols.reshape(n, features // self.group_size, self.group_size, length).mean(dim=2)

    def adapter(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        pooled = self.drop(self.pooled_input(x.unsqueeze(0) if unbatched else x))
        delta = self.lora_B @ (self.lora_A @ pooled)  # (N, D_out, L), L in the conv output's row-major order
        return (delta * self.scaling).reshape(like.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self.quantized_operands(x)
        out = self._conv_forward(x, weight, self.bias)
        return out + self.adapter(x, out)


ADAPTER_TYPES: dict[type[QuantModule], type[QALoRAModule]] = {QuantLinear: QALoRALinear, QuantConv2d: QALoRAConv2d}


def _shallow_state(module: nn.Module) -> dict[str, Any]:
    """A module's attributes with its containers copied and values shared (as ``QuantModule.from_float``)."""
    return {key: (value.copy() if isinstance(value, (dict, set, list)) else value)
            for key, value in module.__dict__.items()}


def adapter_modules(wrapped: dict[str, QuantModule]) -> dict[str, QALoRAModule]:
    return {name: module for name, module in wrapped.items() if isinstance(module, QALoRAModule)}


def merge_adapters(model: VLM, wrapped: dict[str, QuantModule]) -> dict[str, Any]:
    """Merge every adapter layer of ``wrapped`` into its zero points and put the plain twin in its place (in
    ``model`` and in ``wrapped``); returns merge statistics for provenance."""
    shifts = []
    for name, module in adapter_modules(wrapped).items():
        plain, shift = module.merge()
        model.model.set_submodule(name, plain)
        wrapped[name] = plain
        shifts.append(shift.abs().reshape(-1).float().cpu())
    every = torch.cat(shifts) if shifts else torch.zeros(0)
    return {
        "adapters_merged": len(shifts),
        "zero_point_shift_steps": {
            "max_abs": float(every.max()) if every.numel() else 0.0,
            "mean_abs": float(every.mean()) if every.numel() else 0.0,
        },
    }
