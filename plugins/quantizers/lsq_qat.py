"""``lsq``, ``lsq-hybrid``, ``lsq-pc`` — Learned Step Size Quantization with Light QAT (``quantizers.md`` §3.2, §3.3).

Every in-scope Linear/Conv2d gets a learned step for its weight and one for its input
(:class:`qbench.quant.lsq.LSQQuantizer`, §1.5), then Light QAT (§1.8) trains module weights/biases
(lr 1e-6) and the steps (lr 1e-4) together:

* **Weights**: signed full range ``Qn = 2^{b−1}``, ``Qp = 2^{b−1}−1``; one step per tensor (``lsq``,
  ``lsq-hybrid``) or per output channel (``lsq-pc``); init ``s = 2·mean|w|/√Qp``; gradient scale
  ``g = 1/√(N_W·Qp)`` (N_W = weights of the tensor) or ``1/√(N_c·Qp)`` (N_c = weights of the channel —
  LSQ does not specify per-channel steps; this is the spec's choice).
* **Activations**: one step per layer input; signed likewise unless every calibration value is ≥ 0, then
  unsigned ``[0, 2^b−1]`` (``Qp = 2^b−1``) (:class:`LSQActivationQuantizer`); init ``s = 2·mean|x|/√Qp``
  from the first calibration batch; ``g = 1/√(N_F·Qp)``, N_F = features per example.
* **Regimes**: ``lsq`` contrastive-only; ``lsq-hybrid`` and ``lsq-pc`` hybrid (λ = 0.5).

S. K. Esser, J. L. McKinstry, D. Bablani, R. Appuswamy, D. S. Modha, "Learned Step Size Quantization",
ICLR 2020, arXiv:1902.08153.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qbench.hookspecs import hookimpl
from qbench.lazy import forward_names
from qbench.quant.base import Quantizer
from qbench.quant.layout import QuantLayout
from qbench.quant.qat import LightQATConfig, LightQATQuantizer
from qbench.quant.spec import BitSpec

if TYPE_CHECKING:  # the torch side is imported where the quantizers are built: registering (qbench list) stays cheap
    from torch import nn

    from qbench.quant.modules import QuantModule, TensorQuantizer
    from qbench.vlm import VLM

CITATION = (
    "S. K. Esser, J. L. McKinstry, D. Bablani, R. Appuswamy, D. S. Modha, 'Learned Step Size Quantization', "
    "ICLR 2020, arXiv:1902.08153"
)

__getattr__ = forward_names(__name__, {"LSQActivationQuantizer": "qbench_plugins.quantizers.lsq_qat_modules"})
"""``LSQActivationQuantizer`` lives in :mod:`qbench_plugins.quantizers.lsq_qat_modules` (an ``nn.Module``)."""


@dataclass(frozen=True)
class LSQConfig(LightQATConfig):
    """Light QAT, contrastive-only (§3.2)."""

    distill: str = "contrastive"


@dataclass(frozen=True)
class LSQHybridConfig(LightQATConfig):
    """Light QAT, hybrid: contrastive + λ·feature distillation, λ = 0.5 (§3.2, §3.3)."""

    distill: str = "hybrid"


class LSQQATQuantizer(LightQATQuantizer):
    """LSQ: learned per-tensor weight and input steps, trained with the weights (Esser et al., ICLR 2020)."""

    name = "lsq"
    citation = CITATION
    summary = "learned step sizes (per-tensor W and A, LSQ gradient scale), Light QAT, contrastive loss"
    Config = LSQConfig
    weight_granularity = "per_tensor"

    def weight_quantizer(self, bits: BitSpec, name: str, module: nn.Module) -> TensorQuantizer:
        from qbench.quant.lsq import LSQQuantizer

        return LSQQuantizer(bits.weight_bits, signed=True, granularity=self.weight_granularity, init="lsq")

    def act_quantizer(self, bits: BitSpec, name: str, module: nn.Module) -> TensorQuantizer | None:
        from qbench_plugins.quantizers.lsq_qat_modules import LSQActivationQuantizer

        return LSQActivationQuantizer(bits.act_bits) if bits.quantizes_activations else None

    def verification_layout(self, bits: BitSpec) -> QuantLayout:
        """One learned step per weight tensor (``lsq``, Esser et al., ICLR 2020, arXiv:1902.08153) or per output
        channel (``lsq-pc``, ``quantizers.md`` §3.3); one step per layer input."""
        return QuantLayout(weight=self.weight_granularity, linear_input="per_tensor", conv_input="per_tensor")

    def quantizer_parameters(self, model: VLM, modules: dict[str, QuantModule]) -> list[nn.Parameter]:
        """Every step (and offset) of the modules' LSQ quantizers."""
        from qbench.quant.lsq import LSQQuantizer

        params = []
        for module in modules.values():
            for _, quantizer in module.quantizers():
                if isinstance(quantizer, LSQQuantizer):
                    params += [p for p in (quantizer.step, quantizer.offset) if p is not None]
        return params

    def finalize(self, model: VLM, modules: dict[str, QuantModule]) -> dict[str, Any]:
        from qbench.quant.lsq import LSQQuantizer

        acts = [m.act_quantizer for m in modules.values() if isinstance(m.act_quantizer, LSQQuantizer)]
        return {
            "activation_grids": {
                "signed": sum(q.symmetric for q in acts),
                "unsigned": sum(not q.symmetric for q in acts),
            },
            "weight_step_granularity": self.weight_granularity,
        }


class LSQHybridQuantizer(LSQQATQuantizer):
    """``lsq`` with the hybrid regime."""

    name = "lsq-hybrid"
    summary = "learned step sizes (per-tensor W and A, LSQ gradient scale), Light QAT, hybrid loss"
    Config = LSQHybridConfig


class LSQPerChannelQuantizer(LSQQATQuantizer):
    """LSQ with one learned step per output channel of each weight, hybrid regime (§3.3)."""

    name = "lsq-pc"
    summary = "learned step sizes (per-output-channel W, per-tensor A, g = 1/sqrt(N_c*Qp)), Light QAT, hybrid loss"
    Config = LSQHybridConfig
    weight_granularity = "per_channel"


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [LSQQATQuantizer, LSQHybridQuantizer, LSQPerChannelQuantizer]
