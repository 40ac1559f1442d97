"""``q-vit`` — fully quantized attention with LSQ, information rectification and distribution-guided
distillation (``quantizers.md`` §3.5), trained with Light QAT (§1.8) in the hybrid regime.

Layout (what is quantized, §1.1):

* **Weights**: every in-scope Linear/Conv2d, LSQ with one learned step per output channel on the signed
  full grid ``[−2^{b−1}, 2^{b−1}−1]``, init ``s = 2·mean|w|/√Qp``, gradient scale ``1/√(N_c·Qp)`` (§1.5).
* **Layer inputs**: LSQ+ per tensor (learned step and offset on ``[0, 2^A−1]``), initialised from the
  calibration min/max so that at step 0 it is exactly the static affine minmax quantizer; gradient scale
  over the features per example. (The official code learns per-channel activation steps; qbench keeps
  them per tensor so that A bits mean the same across methods.)
* **Attention**: the rewritten attention's slots ``q``, ``k``, ``v`` (per head, ``(N, heads, L, head_dim)``)
  and ``probs`` (the softmax, ``(N, heads, L, S)``; the module then materialises softmax instead of SDPA)
  hold LSQ quantizers at A bits, signed or unsigned from the calibration pass
  (:class:`~qbench_plugins.quantizers.lsq_qat.LSQActivationQuantizer`).
* **Patch embedding** (the image tower's Conv2d reading the 3-channel pixels): weight and input at
  ``patch_embed_bits`` = 8 (paper convention), same quantizer types.

Two additions of Q-ViT:

* **IRM** (information rectification, :class:`InformationRectification`): before the q and k quantizers,
  ``q̃ = γ ⊙ (q − μ)/√(σ² + ε) + β`` with μ, σ² per (head, channel) over batch × tokens — batch statistics
  in training (running averages updated with momentum 0.1, as ``nn.BatchNorm``), the running averages in
  evaluation; ε = 1e-5. μ, σ² are first the exact mean / (biased) variance over every calibration token and
  γ = √(σ²+ε), β = μ, so IRM starts as the identity (the paper trains 300 epochs from a freshly
  standardised q/k — the official code uses ``LayerNorm(head_dim)`` — which 100 steps cannot recover).
  γ, β learn at ``lr_quant`` with the LSQ steps. IRM is float by design and listed in ``float_extras``.
  Text-tower statistics skip positions after end-of-text (§1.1).
* **DGD** (distribution-guided distillation, :class:`DistributionGuidedDistillation`): per block l and head
  h, ``G_q = q_h q_hᵀ`` (tokens × tokens) per example, rows L2-normalised, same for k;
  ``L_DGD = mean_{l,h} (‖G̃_q^S − G̃_q^T‖_F + ‖G̃_k^S − G̃_k^T‖_F)`` with the Frobenius norm per example
  and the mean also over the batch; the teacher is the frozen FP model. The student's q and k are taken
  *as the attention consumes them* (after IRM and the slot quantizer), so the term measures — and through
  the straight-through estimator corrects — the distortion quantization causes in the similarity patterns;
  the teacher's are the FP per-head projections. Text-tower positions after end-of-text are excluded from
  G (rows and columns). Loss: ``L_hybrid + λ_DGD·L_DGD``, λ_DGD = 1.

Y. Li, S. Xu, B. Zhang, X. Cao, P. Gao, G. Guo, "Q-ViT: Accurate and Fully Quantized Low-bit Vision
Transformer", NeurIPS 2022, arXiv:2210.06707; github.com/YanjingLi0202/Q-ViT. LSQ: S. K. Esser,
J. L. McKinstry, D. Bablani, R. Appuswamy, D. S. Modha, "Learned Step Size Quantization", ICLR 2020,
arXiv:1902.08153. LSQ+: Y. Bhalgat, J. Lee, M. Nagel, T. Blankevoort, N. Kwak, "LSQ+: Improving low-bit
quantization through learnable offsets and better initialization", CVPRW 2020, arXiv:2004.09576.
"""

from __future__ import annotations

import math
from collections import Counter
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
    from torch import nn

    from qbench.quant.modules import QuantModule, TensorQuantizer
    from qbench.vlm import VLM
    from qbench_plugins.quantizers.q_vit_modules import DistributionGuidedDistillation

CITATION = (
    "Y. Li, S. Xu, B. Zhang, X. Cao, P. Gao, G. Guo, 'Q-ViT: Accurate and Fully Quantized Low-bit Vision "
    "Transformer', NeurIPS 2022, arXiv:2210.06707 (github.com/YanjingLi0202/Q-ViT); LSQ: S. K. Esser et al., "
    "'Learned Step Size Quantization', ICLR 2020, arXiv:1902.08153; LSQ+: Y. Bhalgat et al., 'LSQ+: Improving "
    "low-bit quantization through learnable offsets and better initialization', CVPRW 2020, arXiv:2004.09576"
)
IRM_REASON = (
    "Q-ViT IRM: float per-(head, channel) rectification gamma*(x-mu)/sqrt(var+eps)+beta before the {slot} "
    "quantizer (identity at init)"
)
IMAGE_CHANNELS = 3

__getattr__ = forward_names(__name__, {
    name: "qbench_plugins.quantizers.q_vit_modules"
    for name in ("DistributionGuidedDistillation", "InformationRectification", "RectifiedSlotQuantizer", "capture_qk",
                 "gram_distance", "normalized_gram", "qk_attention", "token_rows")
})
"""IRM, the rectified slot quantizer and DGD live in :mod:`qbench_plugins.quantizers.q_vit_modules` (torch)."""


# -- plugin ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QViTConfig(LightQATConfig):
    """Light QAT, hybrid regime (λ = 0.5), plus λ_DGD, IRM momentum/ε and the patch-embedding bits (§3.5)."""

    distill: str = "hybrid"
    dgd_weight: float = 1.0
    irm_momentum: float = 0.1
    irm_eps: float = 1e-5
    patch_embed_bits: int = 8


def is_patch_embedding(vlm: VLM, name: str, module: nn.Module) -> bool:
    """The image tower's convolution that reads the pixels (the ViT patch embedding)."""
    from torch import nn

    return (
        isinstance(module, nn.Conv2d)
        and vlm.tower_of(name) == "visual"
        and module.in_channels == IMAGE_CHANNELS
    )


class QViTQuantizer(LightQATQuantizer):
    """Q-ViT: LSQ weights (per channel) and LSQ+ inputs, LSQ q/k/v/probs with IRM before q and k, DGD loss."""

    name = "q-vit"
    citation = CITATION
    summary = ("fully quantized attention (LSQ W per channel, LSQ+ inputs, q/k/v/probs at A bits) with IRM on "
               "q/k and distribution-guided distillation, Light QAT, hybrid loss")
    Config = QViTConfig

    def __init__(self, config: QViTConfig | None = None) -> None:
        super().__init__(config)
        self.check_config()

    def check_config(self) -> None:
        config: QViTConfig = self.config  # type: ignore[assignment]
        if not (math.isfinite(config.dgd_weight) and config.dgd_weight >= 0):
            raise QbenchError(f"q-vit.dgd_weight must be finite and >= 0, got {config.dgd_weight}")
        if not 0.0 < config.irm_momentum <= 1.0:
            raise QbenchError(f"q-vit.irm_momentum must be in (0, 1], got {config.irm_momentum}")
        if not (math.isfinite(config.irm_eps) and config.irm_eps > 0):
            raise QbenchError(f"q-vit.irm_eps must be > 0, got {config.irm_eps}")
        if not 2 <= config.patch_embed_bits <= 8:
            raise QbenchError(f"q-vit.patch_embed_bits must be 2..8, got {config.patch_embed_bits}")

    # -- quantizers -------------------------------------------------------------------------------
    def weight_quantizer(self, bits: BitSpec, name: str, module: nn.Module) -> TensorQuantizer:
        """Per-output-channel LSQ on the signed full grid."""
        from qbench.quant.lsq import LSQQuantizer

        return LSQQuantizer(bits.weight_bits, signed=True, granularity="per_channel", init="lsq")

    def act_quantizer(self, bits: BitSpec, name: str, module: nn.Module) -> TensorQuantizer | None:
        """Per-tensor LSQ+ (unsigned grid, learned offset) initialised from the calibration min/max."""
        from qbench.quant.lsq import LSQQuantizer

        if not bits.quantizes_activations:
            return None
        return LSQQuantizer(bits.act_bits, signed=False, offset=True, init="minmax", features_per_example=True)

    def verification_layout(self, bits: BitSpec) -> QuantLayout:
        """Weights per channel, inputs per tensor, q/k/v/probs slots per tensor at A bits, and the patch
        embedding (the pixel-reading first layer) at ``patch_embed_bits`` (Li et al., NeurIPS 2022,
        arXiv:2210.06707: first layer kept at 8 bits)."""
        config: QViTConfig = self.config  # type: ignore[assignment]
        slots = {slot: "per_tensor" for slot in ("q", "k", "v", "probs")} if bits.quantizes_activations else {}
        return QuantLayout(weight="per_channel", linear_input="per_tensor", conv_input="per_tensor", slots=slots,
                           first_layer_bits=config.patch_embed_bits)

    def wrap(self, model: VLM, bits: BitSpec, towers: Sequence[str]) -> dict[str, QuantModule]:
        """The standard wrapping, with the patch embedding at ``patch_embed_bits`` (weight and input)."""
        from qbench.quant.modules import in_scope_modules, quantize_modules

        config: QViTConfig = self.config  # type: ignore[assignment]
        patch = {name for name, module in in_scope_modules(model, towers) if is_patch_embedding(model, name, module)}
        patch_act_bits = config.patch_embed_bits if bits.quantizes_activations else bits.act_bits
        patch_bits = BitSpec(config.patch_embed_bits, patch_act_bits)

        def weights(name: str, module: nn.Module) -> TensorQuantizer:
            return self.weight_quantizer(patch_bits if name in patch else bits, name, module)

        def inputs(name: str, module: nn.Module) -> TensorQuantizer | None:
            return self.act_quantizer(patch_bits if name in patch else bits, name, module)

        return quantize_modules(model, towers, weights, inputs)

    def install(self, model: VLM, bits: BitSpec, towers: Sequence[str], wrapped: dict[str, QuantModule]) -> Additions:
        """LSQ quantizers in the q/k/v/probs slots of every in-scope attention, IRM before q and k."""
        from qbench_plugins.quantizers.lsq_qat_modules import LSQActivationQuantizer
        from qbench_plugins.quantizers.q_vit_modules import InformationRectification, RectifiedSlotQuantizer, qk_attention

        config: QViTConfig = self.config  # type: ignore[assignment]
        attention = qk_attention(model, towers)
        per_tower = Counter(model.tower_of(name) for name in attention)
        provenance: dict[str, Any] = {
            "patch_embedding": {
                "modules": sorted(name for name in wrapped if is_patch_embedding(model, name, wrapped[name])),
                "bits": config.patch_embed_bits,
            },
            "attention_with_slots_by_tower": {tower: per_tower.get(tower, 0) for tower in towers},
        }
        missing = [tower for tower in towers if not per_tower.get(tower)]
        if missing:
            provenance["towers_without_slots"] = missing
        if not bits.quantizes_activations:
            provenance["attention_quantizers"] = "none (float activations): no q/k/v/probs quantizers, no IRM"
            return Additions(provenance=provenance)
        extras: dict[str, str] = {}
        irm_parameters = 0
        for name, module in attention.items():
            device = module.q_proj.weight.device
            for slot in ("q", "k"):
                irm = InformationRectification(module.num_heads, module.head_dim, momentum=config.irm_momentum,
                                               eps=config.irm_eps, device=device)
                setattr(module, slot, RectifiedSlotQuantizer(bits.act_bits, irm))
                extras[f"{name}.{slot}.irm"] = IRM_REASON.format(slot=slot)
                irm_parameters += irm.gamma.numel() + irm.beta.numel()
            module.v = LSQActivationQuantizer(bits.act_bits)
            module.probs = LSQActivationQuantizer(bits.act_bits)
        provenance.update(
            attention_quantizers={"slots": ["q", "k", "v", "probs"], "bits": bits.act_bits, "modules": len(attention),
                                  "quantizer": "lsq (signed/unsigned from calibration), per tensor"},
            irm={"modules": len(extras), "parameters": irm_parameters, "momentum": config.irm_momentum,
                 "eps": config.irm_eps, "init": "identity (gamma=sqrt(var+eps), beta=mean of the calibration pass)"},
        )
        return Additions(float_extras=extras, provenance=provenance)

    def quantizer_parameters(self, model: VLM, wrapped: dict[str, QuantModule]) -> list[nn.Parameter]:
        """Every LSQ step/offset (module and slot quantizers) and every IRM γ, β."""
        from qbench.quant.lsq import LSQQuantizer
        from qbench.quant.modules import tensor_quantizers
        from qbench_plugins.quantizers.q_vit_modules import InformationRectification

        seen: dict[int, nn.Parameter] = {}
        for _, quantizer in tensor_quantizers(model.model):
            if isinstance(quantizer, LSQQuantizer):
                for parameter in (quantizer.step, quantizer.offset):
                    if parameter is not None:
                        seen.setdefault(id(parameter), parameter)
        for module in model.model.modules():
            if isinstance(module, InformationRectification):
                seen.setdefault(id(module.gamma), module.gamma)
                seen.setdefault(id(module.beta), module.beta)
        return list(seen.values())

    def auxiliary_loss(self, model: VLM, teacher: VLM, towers: Sequence[str]) -> DistributionGuidedDistillation | None:
        from qbench_plugins.quantizers.q_vit_modules import DistributionGuidedDistillation

        config: QViTConfig = self.config  # type: ignore[assignment]
        if config.dgd_weight == 0:
            return None
        dgd = DistributionGuidedDistillation(model, teacher, towers, config.dgd_weight)
        return dgd if dgd.n_blocks else None

    def finalize(self, model: VLM, wrapped: dict[str, QuantModule]) -> dict[str, Any]:
        from qbench.quant.modules import first_module_settings, tensor_quantizers
        from qbench_plugins.quantizers.lsq_qat_modules import LSQActivationQuantizer
        from qbench_plugins.quantizers.q_vit_modules import InformationRectification

        config: QViTConfig = self.config  # type: ignore[assignment]
        slots = [q for _, q in tensor_quantizers(model.model) if isinstance(q, LSQActivationQuantizer)]
        irms = [m for m in model.model.modules() if isinstance(m, InformationRectification)]
        body = [m for name, m in wrapped.items() if not is_patch_embedding(model, name, m)]
        settings = first_module_settings({"first": body[0]}) if body else {}
        return {
            **settings,  # the layout of the blocks, not of the 8-bit patch embedding (the first module)
            "weight_step_granularity": "per_channel",
            "slot_grids": {"signed": sum(q.symmetric for q in slots), "unsigned": sum(not q.symmetric for q in slots)},
            "irm_training_batches": int(sum(int(m.num_batches_tracked) for m in irms)),
            "dgd": {"weight": config.dgd_weight, "qk": "student slot outputs (after IRM and quantization) vs FP",
                    "norm": "Frobenius per example, mean over blocks, heads and batch"},
        }

    def quantize(self, model: VLM, bits: BitSpec, scope: Scope, calibration: CalibrationData | None,
                 seed: int) -> QuantizedModel:
        self.check_config()
        return super().quantize(model, bits, scope, calibration, seed)


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [QViTQuantizer]
