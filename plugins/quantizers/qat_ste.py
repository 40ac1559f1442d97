"""``qat-ste`` and ``qat-ste-hybrid`` — simulated-quantization training with the STE (``quantizers.md`` §3.1).

Jacob et al.'s quantization-aware training on the baseline layout (§1.6), fine-tuned with Light QAT (§1.8):

* **Weights**: per-output-channel symmetric, re-quantized at every step from the *current* weight's
  min/max (the quantizer is dynamic while training; after training the ranges of the final weights are
  fixed as static (s, z)).
* **Activations**: per-tensor asymmetric, initialised by one calibration pass and then tracked during
  training by the ``ema_minmax`` rule ``m ← (1−c)·m + c·batch_min`` (same for max), c = 0.01, on every
  training batch (:class:`EMAActivationQuantizer`); frozen for evaluation.
* **Gradients**: the clipped straight-through estimator — ``∂x̂/∂x = 1`` inside the integer range, 0 where
  clipped; scales and zero points are constants (not learned, no gradient). Only module weights and biases
  train (lr 1e-6).
* **Regimes**: ``qat-ste`` contrastive-only, ``qat-ste-hybrid`` contrastive + 0.5·feature distillation.

B. Jacob, S. Kligys, B. Chen, M. Zhu, M. Tang, A. Howard, H. Adam, D. Kalenichenko, "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018, arXiv:1712.05877.
STE: Y. Bengio, N. Léonard, A. Courville, "Estimating or Propagating Gradients Through Stochastic Neurons
for Conditional Computation", arXiv:1308.3432, 2013.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qbench.hookspecs import hookimpl
from qbench.lazy import forward_names
from qbench.quant.base import Quantizer
from qbench.quant.qat import LightQATConfig, LightQATQuantizer
from qbench.quant.spec import BitSpec

if TYPE_CHECKING:  # the torch side is imported where the quantizers are built: registering (qbench list) stays cheap
    from torch import nn

    from qbench.quant.modules import QuantModule, TensorQuantizer
    from qbench.vlm import VLM

EMA_MOMENTUM = 0.01
CITATION = (
    "B. Jacob et al., 'Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only "
    "Inference', CVPR 2018, arXiv:1712.05877; STE: Y. Bengio, N. Leonard, A. Courville, arXiv:1308.3432, 2013"
)

__getattr__ = forward_names(__name__, {"EMAActivationQuantizer": "qbench_plugins.quantizers.qat_ste_modules"})
"""``EMAActivationQuantizer`` lives in :mod:`qbench_plugins.quantizers.qat_ste_modules` (an ``nn.Module``)."""


@dataclass(frozen=True)
class QATSTEConfig(LightQATConfig):
    """Light QAT, contrastive-only (§3.1)."""

    distill: str = "contrastive"


@dataclass(frozen=True)
class QATSTEHybridConfig(LightQATConfig):
    """Light QAT, hybrid: contrastive + λ·feature distillation, λ = 0.5 (§3.1)."""

    distill: str = "hybrid"


def fix_weight_ranges(modules: dict[str, QuantModule]) -> int:
    """Turn the dynamic per-channel weight quantizers static at the trained weights' own min/max."""
    from qbench.quant.fake_quant import minmax_qparams

    count = 0
    for module in modules.values():
        quantizer = module.weight_quantizer
        if quantizer.dynamic:
            scale, zero_point = minmax_qparams(module.weight.detach(), quantizer.fmt, quantizer.granularity)
            quantizer.dynamic = False
            quantizer.scale, quantizer.zero_point = scale, zero_point
            count += 1
    return count


class QATSTEQuantizer(LightQATQuantizer):
    """Fake-quant training with the clipped STE: dynamic per-channel weights, EMA activation ranges."""

    name = "qat-ste"
    citation = CITATION
    summary = "STE fake-quant training (minmax weights each step, EMA activation ranges), contrastive loss"
    Config = QATSTEConfig

    def weight_quantizer(self, bits: BitSpec, name: str, module: nn.Module) -> TensorQuantizer:
        from qbench.quant.modules import make_weight_quantizer

        return make_weight_quantizer(bits.weight_bits, "per_channel", dynamic=True)

    def act_quantizer(self, bits: BitSpec, name: str, module: nn.Module) -> TensorQuantizer | None:
        from qbench_plugins.quantizers.qat_ste_modules import EMAActivationQuantizer

        return EMAActivationQuantizer(bits.act_bits) if bits.quantizes_activations else None

    def finalize(self, model: VLM, modules: dict[str, QuantModule]) -> dict[str, Any]:
        return {"weights_fixed_after_training": fix_weight_ranges(modules), "ema_momentum": EMA_MOMENTUM}


class QATSTEHybridQuantizer(QATSTEQuantizer):
    """``qat-ste`` with the hybrid regime (contrastive + feature distillation)."""

    name = "qat-ste-hybrid"
    summary = "STE fake-quant training (minmax weights each step, EMA activation ranges), hybrid loss"
    Config = QATSTEHybridConfig


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [QATSTEQuantizer, QATSTEHybridQuantizer]
