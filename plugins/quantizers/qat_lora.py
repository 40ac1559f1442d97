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
from typing import TYPE_CHECKING, Any, Sequence

from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench.lazy import forward_names
from qbench.quant.base import CalibrationData, QuantizedModel, Quantizer
from qbench.quant.layout import QuantLayout
from qbench.quant.qat import Additions, LightQATConfig, LightQATQuantizer
from qbench.quant.spec import BitSpec, Scope

if TYPE_CHECKING:  # the torch side is imported where it is used: registering (qbench list) stays cheap
    import torch
    from torch import nn

    from qbench.quant.modules import QuantModule, TensorQuantizer
    from qbench.vlm import VLM

CITATION = (
    "Y. Xu, L. Xie, X. Gu, X. Chen, H. Chang, H. Zhang, Z. Chen, X. Zhang, Q. Tian, 'QA-LoRA: Quantization-Aware "
    "Low-Rank Adaptation of Large Language Models', ICLR 2024, arXiv:2309.14717; github.com/yuhuixu1993/qa-lora"
)

ADAPTER = "adapter"
GROUP_ONLY = "group"
FALLBACK = "per_channel"
ADAPTER_ATTRIBUTES = ("group_size", "rank", "alpha", "scaling", "dropout", "dropout_seed", "dropout_calls")
"""Plain attributes an adapter layer adds to its quantized twin (dropped with the branch at the merge)."""

__getattr__ = forward_names(__name__, {
    name: "qbench_plugins.quantizers.qat_lora_modules"
    for name in ("ADAPTER_TYPES", "GroupWeightQuantizer", "QALoRAConv2d", "QALoRALinear", "QALoRAModule",
                 "_shallow_state", "adapter_modules", "merge_adapters")
})
"""The group weight quantizer and the adapter layers live in :mod:`qbench_plugins.quantizers.qat_lora_modules`."""


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from the parts (run seed, module name, ...), independent of Python's hash salt."""
    digest = hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def layer_plan(module: nn.Module, group_size: int) -> str:
    """How a Linear/Conv2d is quantized: ``adapter`` (group-g weights + QA-LoRA branch), ``group`` (group-g
    weights, no adapter: grouped/depthwise convs) or ``per_channel`` (row length not a multiple of g)."""
    from torch import nn

    row = module.weight[0].numel()
    if row % group_size:
        return FALLBACK
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return GROUP_ONLY
    return ADAPTER


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
        from qbench.quant.modules import make_weight_quantizer
        from qbench_plugins.quantizers.qat_lora_modules import GroupWeightQuantizer

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
        from qbench.quant.modules import make_activation_quantizer

        return make_activation_quantizer(bits.act_bits)

    def wrap(self, model: VLM, bits: BitSpec, towers: Sequence[str]) -> dict[str, QuantModule]:
        """Quantize every in-scope layer, then give the eligible ones (:func:`layer_plan`) their adapter."""
        from qbench_plugins.quantizers.qat_lora_modules import ADAPTER_TYPES

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
        from qbench_plugins.quantizers.qat_lora_modules import adapter_modules

        return [p for module in adapter_modules(wrapped).values() for p in (module.lora_A, module.lora_B)]

    def artifacts(self, model: VLM, wrapped: dict[str, QuantModule]) -> dict[str, torch.Tensor]:
        """The trained LoRA factors of every adapter layer (``<module>.lora_A`` / ``.lora_B``), kept beside the
        merged model so a checkpoint still holds the adapters themselves."""
        from qbench_plugins.quantizers.qat_lora_modules import adapter_modules

        return {f"{name}.{part}": getattr(module, part) for name, module in adapter_modules(wrapped).items()
                for part in ("lora_A", "lora_B")}

    def finalize(self, model: VLM, wrapped: dict[str, QuantModule]) -> dict[str, Any]:
        """Merge the branches into the zero points, drop them; provenance of the layout and the merge."""
        from qbench_plugins.quantizers.qat_lora_modules import GroupWeightQuantizer, adapter_modules, merge_adapters

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
