"""``qat-lora`` — QA-LoRA: quantization-aware low-rank adaptation merged into the zero points (``quantizers.md`` §3.4).

Every in-scope Linear/Conv2d keeps its weight **frozen** and quantized **group-wise asymmetric**: one
minmax (s, z) per group of g = 32 consecutive input features of an output row (``group-32``; for a conv the
row is the flattened ``(in, kh, kw)`` block, so the patch embedding's 3·P·P inputs form the groups). Beside
it runs a LoRA branch whose input is the *group-averaged quantized input*:

    ``y = x̂·Q(W)ᵀ + b + (α/r)·B(A(drop(pool_g(x̂))))``

* ``pool_g`` averages each group of g input features (``D_in/g`` values per token); for a conv it is taken
  over ``F.unfold(x̂)`` (zero padding included, as the conv sees it), whose column order ``(in, kh, kw)`` is
  the conv weight's flattened order, so the pooled groups are exactly the weight groups;
* ``A ∈ R^{r×D_in/g}`` Xavier-uniform (as the QA-LoRA code; drawn from a generator seeded by the run seed
  and the module name, on CPU, then moved to the module's device), ``B ∈ R^{D_out×r} = 0``; r = 8, α = 16;
* LoRA dropout 0.05 on the pooled input (the QA-LoRA code: ``lora_B(lora_A(lora_dropout(qa_pool(x))))``),
  active only while training: when the module is in training mode *or* its quantizers are (Light QAT runs
  the student in eval mode with its quantizers switched to training mode, §1.8). Masks come from a
  per-call generator seeded by (run seed, module name, call count), so the same seed gives the same model;
* the adapter branch is computed with plain matmuls and ``F.unfold`` (no ``F.linear``/``F.conv2d``), so the
  kernel recorder of the verifier would only ever see the main quantized kernel even before the merge.

Procedure: activation quantizers (baseline per-tensor asymmetric static minmax, §1.6) are calibrated by one
pass, then Light QAT in the **hybrid** regime (§1.8, choose) trains **only A and B** at ``lr_quant`` = 1e-4
(module weights and biases stay frozen; ``lr_weights`` is unused). Finally each branch is merged into its
layer's zero points,

    ``z_{o,k} ← z_{o,k} − (α/r)·(BA)_{o,k} / (g·s_{o,k})``

(computed in float64, stored in float32), which is exact because ``s_{o,k}·(z − z')·Σ_{i∈G_k} x̂_i =
(α/r)(BA)_{o,k}·pool_k(x̂)``. The merged zero points are real-valued, so the weight quantizer
(:class:`GroupWeightQuantizer`) keeps the *integer* zero point for coding and a separate real-valued
*dequantization* zero point: ``Ŵ = s·(clamp(round(W/s) + z_int, 0, 2^b−1) − z_real)`` — the integer codes do
not move and each (row, group) still holds at most 2^b values. The branch is then dropped: the deployed
layer is a plain :class:`~qbench.quant.modules.QuantLinear` / ``QuantConv2d`` with a group quantizer.

Layers whose row length D_in is not a multiple of g fall back to per-channel symmetric minmax weights without
adapter (counted and named in provenance); grouped/depthwise convs get no adapter (their weights stay
group-quantized when the row length divides g, else they fall back as well).

Y. Xu, L. Xie, X. Gu, X. Chen, H. Chang, H. Zhang, Z. Chen, X. Zhang, Q. Tian, "QA-LoRA: Quantization-Aware
Low-Rank Adaptation of Large Language Models", ICLR 2024, arXiv:2309.14717; github.com/yuhuixu1993/qa-lora.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench.model import VLM
from qbench.quant.base import CalibrationData, QuantizedModel, Quantizer
from qbench.quant.fake_quant import Granularity, fake_quantize_grouped
from qbench.quant.layout import QuantLayout
from qbench.quant.modules import (
    QuantConv2d,
    QuantLinear,
    QuantModule,
    TensorQuantizer,
    make_activation_quantizer,
    make_weight_quantizer,
)
from qbench.quant.qat import Additions, LightQATConfig, LightQATQuantizer
from qbench.quant.spec import BitSpec, Scope

CITATION = (
    "Y. Xu, L. Xie, X. Gu, X. Chen, H. Chang, H. Zhang, Z. Chen, X. Zhang, Q. Tian, 'QA-LoRA: Quantization-Aware "
    "Low-Rank Adaptation of Large Language Models', ICLR 2024, arXiv:2309.14717; github.com/yuhuixu1993/qa-lora"
)

ADAPTER = "adapter"
GROUP_ONLY = "group"
FALLBACK = "per_channel"
ADAPTER_ATTRIBUTES = ("group_size", "rank", "alpha", "scaling", "dropout", "dropout_seed", "dropout_calls")
"""Plain attributes an adapter layer adds to its quantized twin (dropped with the branch at the merge)."""


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from the parts (run seed, module name, ...), independent of Python's hash salt."""
    digest = hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def layer_plan(module: nn.Module, group_size: int) -> str:
    """How a Linear/Conv2d is quantized: ``adapter`` (group-g weights + QA-LoRA branch), ``group`` (group-g
    weights, no adapter: grouped/depthwise convs) or ``per_channel`` (row length not a multiple of g)."""
    row = module.weight[0].numel()
    if row % group_size:
        return FALLBACK
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return GROUP_ONLY
    return ADAPTER


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


# -- the plugin ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QALoRAConfig(LightQATConfig):
    """Light QAT, hybrid regime (choose, §3.4), training only the LoRA factors at ``lr_quant``; weights
    group-``group_size`` asymmetric, LoRA rank ``rank``, scale ``alpha/rank``, dropout ``dropout`` on the
    pooled input. ``lr_weights`` is unused (weights frozen)."""

    distill: str = "hybrid"
    group_size: int = 32
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05

    def check(self, label: str) -> None:
        if self.group_size < 1 or self.rank < 1:
            raise QbenchError(f"{label}: group_size and rank must be >= 1, got {self.group_size}, {self.rank}")
        if not math.isfinite(self.alpha):
            raise QbenchError(f"{label}.alpha must be finite, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise QbenchError(f"{label}.dropout must be in [0, 1), got {self.dropout}")


class QALoRAQuantizer(LightQATQuantizer):
    """QA-LoRA: frozen group-quantized weights + group-pooled LoRA, merged into the zero points (Xu et al., ICLR 2024)."""

    name = "qat-lora"
    citation = CITATION
    summary = "QA-LoRA: frozen group-32 asym W + group-pooled LoRA (r=8, alpha=16), hybrid loss, merged into zero points"
    Config = QALoRAConfig

    _run_seed: int = 0

    def quantize(
        self, model: VLM, bits: BitSpec, scope: Scope, calibration: CalibrationData | None, seed: int
    ) -> QuantizedModel:
        self.config.check(self.name)  # type: ignore[attr-defined]
        return super().quantize(model, bits, scope, calibration, seed)

    def prepare(self, model: VLM, bits: BitSpec, towers: Sequence[str], seed: int) -> Additions:
        """No float transform; remembers the run seed for the adapters' initialisation and dropout."""
        self._run_seed = int(seed)
        return Additions()

    def weight_quantizer(self, bits: BitSpec, name: str, module: nn.Module) -> TensorQuantizer:
        group_size = self.config.group_size  # type: ignore[attr-defined]
        if layer_plan(module, group_size) == FALLBACK:
            return make_weight_quantizer(bits.weight_bits, "per_channel")
        return GroupWeightQuantizer(bits.weight_bits, group_size)

    def verification_layout(self, bits: BitSpec) -> QuantLayout:
        """Weights in groups of ``group_size`` consecutive input features (QA-LoRA's group-wise quantization,
        Xu et al., ICLR 2024, arXiv:2309.14717; per-channel fallback layers pass a group check a fortiori),
        inputs per tensor."""
        group_size = self.config.group_size  # type: ignore[attr-defined]
        return QuantLayout(weight=f"group-{group_size}", linear_input="per_tensor", conv_input="per_tensor")

    def act_quantizer(self, bits: BitSpec, name: str, module: nn.Module) -> TensorQuantizer | None:
        return make_activation_quantizer(bits.act_bits)

    def wrap(self, model: VLM, bits: BitSpec, towers: Sequence[str]) -> dict[str, QuantModule]:
        """Quantize every in-scope layer, then give the eligible ones (:func:`layer_plan`) their adapter."""
        config: QALoRAConfig = self.config  # type: ignore[assignment]
        wrapped = super().wrap(model, bits, towers)
        for name, module in list(wrapped.items()):
            if layer_plan(module, config.group_size) != ADAPTER:
                continue
            adapted = ADAPTER_TYPES[type(module)].from_quantized(
                module, group_size=config.group_size, rank=config.rank, alpha=config.alpha,
                dropout=config.dropout, seed=self._run_seed, name=name,
            )
            model.model.set_submodule(name, adapted)
            wrapped[name] = adapted
        return wrapped

    def trainable_weights(self, wrapped: dict[str, QuantModule]) -> list[nn.Parameter]:
        """None: QA-LoRA keeps the module weights and biases frozen."""
        return []

    def quantizer_parameters(self, model: VLM, wrapped: dict[str, QuantModule]) -> list[nn.Parameter]:
        """The LoRA factors A and B of every adapter layer (trained at ``lr_quant``)."""
        return [p for module in adapter_modules(wrapped).values() for p in (module.lora_A, module.lora_B)]

    def artifacts(self, model: VLM, wrapped: dict[str, QuantModule]) -> dict[str, torch.Tensor]:
        """The trained LoRA factors of every adapter layer (``<module>.lora_A`` / ``.lora_B``), kept beside the
        merged model so a checkpoint still holds the adapters themselves."""
        return {f"{name}.{part}": getattr(module, part) for name, module in adapter_modules(wrapped).items()
                for part in ("lora_A", "lora_B")}

    def finalize(self, model: VLM, wrapped: dict[str, QuantModule]) -> dict[str, Any]:
        """Merge the branches into the zero points, drop them; provenance of the layout and the merge."""
        config: QALoRAConfig = self.config  # type: ignore[assignment]
        adapters = adapter_modules(wrapped)
        trained = sum(p.numel() for module in adapters.values() for p in (module.lora_A, module.lora_B))
        fallback = [name for name, module in wrapped.items()
                    if not isinstance(module.weight_quantizer, GroupWeightQuantizer)]
        group_only = [name for name, module in wrapped.items()
                      if name not in adapters and isinstance(module.weight_quantizer, GroupWeightQuantizer)]
        merge = merge_adapters(model, wrapped)
        return {
            "weight_layout": {
                "group_asym_with_adapter": len(adapters),
                "group_asym_without_adapter": len(group_only),
                "per_channel_sym_fallback": len(fallback),
            },
            "fallback_modules": fallback,
            "fallback_rule": f"row length (D_in, or in·kh·kw for a conv) not a multiple of {config.group_size}",
            "group_without_adapter_modules": group_only,
            "lora": {
                "rank": config.rank,
                "alpha": config.alpha,
                "scaling": config.alpha / config.rank,
                "dropout": config.dropout,
                "dropout_on": "group-pooled input, training only (seeded per module and call)",
                "init": "A xavier-uniform (seeded from run seed and module name), B zeros",
                "trained_parameters": trained,
            },
            "weights_trained": False,
            **merge,
            "deployed_extra_parameters": 0,
        }


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [QALoRAQuantizer]
