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
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench.model import VLM
from qbench.quant.base import CalibrationData, QuantizedModel, Quantizer
from qbench.quant.layout import QuantLayout
from qbench.quant.lsq import LSQQuantizer
from qbench.quant.modules import (
    Mode,
    QuantizableMultiheadAttention,
    QuantModule,
    TensorQuantizer,
    first_module_settings,
    in_scope_modules,
    is_under,
    quantize_modules,
    rewrite_tower_attention,
    tensor_quantizers,
)
from qbench.quant.observers import select_valid_tokens, text_token_mask
from qbench.quant.qat import Additions, LightQATConfig, LightQATQuantizer
from qbench.quant.spec import BitSpec, Scope
from qbench_plugins.quantizers.lsq_qat import LSQActivationQuantizer

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


# -- IRM -------------------------------------------------------------------------------------------
def token_rows(x: torch.Tensor) -> torch.Tensor:
    """The per-head tokens of ``x`` ``(N, heads, L, head_dim)`` as ``(n, heads, head_dim)`` rows, only the
    valid text positions when a :func:`~qbench.quant.observers.valid_tokens` mask is active and fits."""
    per_token = x.transpose(1, 2)  # (N, L, heads, head_dim): batch-first, so the mask selects (N, L)
    selected = select_valid_tokens(per_token)
    if selected.dim() == 3:
        return selected
    return per_token.reshape(-1, x.shape[1], x.shape[3])


class InformationRectification(nn.Module):
    """Q-ViT's IRM on per-head ``(N, heads, L, head_dim)`` queries or keys:
    ``γ ⊙ (x − μ)/√(σ² + ε) + β`` with μ, σ², γ, β per (head, channel).

    Lifecycle: :meth:`observe` accumulates the exact mean and variance over every calibration token
    (Chan's parallel update in float64); :meth:`finish_calibration` makes them the running statistics and
    sets γ = √(σ²+ε), β = μ, so the module is then the identity in eval mode. Afterwards, in training
    mode it normalises with the batch statistics (valid text tokens only) and updates the running averages
    with ``momentum`` (unbiased variance, as ``nn.BatchNorm``); in eval mode it uses the running averages.
    γ and β are Parameters; statistics are buffers (the calibration accumulators exist only while
    calibrating).
    """

    def __init__(self, num_heads: int, head_dim: int, *, momentum: float = 0.1, eps: float = 1e-5,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim = int(num_heads), int(head_dim)
        self.momentum, self.eps = float(momentum), float(eps)
        self.gamma = nn.Parameter(torch.ones(num_heads, head_dim, device=device))
        self.beta = nn.Parameter(torch.zeros(num_heads, head_dim, device=device))
        self.register_buffer("running_mean", None)
        self.register_buffer("running_var", None)
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("calibration_count", None)
        self.register_buffer("calibration_mean", None)
        self.register_buffer("calibration_m2", None)

    @property
    def is_initialised(self) -> bool:
        return self.running_mean is not None

    # -- calibration ------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Fold one calibration batch into the exact mean / variance per (head, channel)."""
        rows = token_rows(x.detach()).double()
        n = rows.shape[0]
        if n == 0:
            return
        mean = rows.mean(dim=0)
        m2 = (rows - mean).pow(2).sum(dim=0)
        if self.calibration_count is None:
            self.calibration_count = torch.tensor(float(n), dtype=torch.float64, device=rows.device)
            self.calibration_mean, self.calibration_m2 = mean, m2
            return
        total = self.calibration_count + n
        delta = mean - self.calibration_mean
        self.calibration_mean = self.calibration_mean + delta * (n / total)
        self.calibration_m2 = self.calibration_m2 + m2 + delta.pow(2) * (self.calibration_count * n / total)
        self.calibration_count = total

    @torch.no_grad()
    def finish_calibration(self) -> bool:
        """Running statistics from the calibration pass, γ = √(σ²+ε), β = μ (IRM = identity); False if
        nothing was observed (then it stays uninitialised and raises when used)."""
        if self.calibration_count is None:
            return self.is_initialised
        mean = self.calibration_mean.float()
        var = (self.calibration_m2 / self.calibration_count).float()
        self.running_mean, self.running_var = mean.clone(), var.clone()
        self.gamma.copy_(torch.sqrt(var + self.eps))
        self.beta.copy_(mean)
        self.num_batches_tracked.zero_()
        self.calibration_count = self.calibration_mean = self.calibration_m2 = None
        return True

    # -- forward ----------------------------------------------------------------------------------
    def statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, σ²) applied to ``x``: the batch's (updating the running averages) in training, else the running ones."""
        if not self.is_initialised:
            raise RuntimeError("IRM used before its calibration statistics were set")
        if not self.training:
            return self.running_mean, self.running_var
        rows = token_rows(x).float()
        n = rows.shape[0]
        mean = rows.mean(dim=0)
        var = rows.var(dim=0, unbiased=False)
        with torch.no_grad():
            unbiased = var.detach() * (n / max(n - 1, 1))
            self.running_mean.mul_(1.0 - self.momentum).add_(mean.detach(), alpha=self.momentum)
            self.running_var.mul_(1.0 - self.momentum).add_(unbiased, alpha=self.momentum)
            self.num_batches_tracked.add_(1)
        return mean, var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_heads or x.shape[3] != self.head_dim:
            raise ValueError(f"IRM expects (N, {self.num_heads}, L, {self.head_dim}), got {tuple(x.shape)}")
        mean, var = self.statistics(x)
        shape = (1, self.num_heads, 1, self.head_dim)
        out = (x.float() - mean.view(shape)) / torch.sqrt(var + self.eps).view(shape)
        return (out * self.gamma.view(shape) + self.beta.view(shape)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, momentum={self.momentum}, eps={self.eps}"


class RectifiedSlotQuantizer(LSQActivationQuantizer):
    """The q or k slot quantizer of Q-ViT: IRM (child ``irm``) then LSQ at A bits.

    In ``calibrate`` mode the IRM gathers its statistics and both pass float through; :meth:`freeze`
    initialises the IRM (identity) and the LSQ step. Because IRM is a child of this quantizer, Light QAT's
    training state (quantizers and their children in training mode) gives it batch statistics while
    training. The verifier checks this slot on its output, which the attention matmul consumes.
    """

    def __init__(self, bits: int, irm: InformationRectification) -> None:
        super().__init__(bits)
        self.irm = irm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is Mode.CALIBRATE:
            self.irm.observe(x)
        elif self.irm.is_initialised or self.mode is Mode.QUANTIZE:
            x = self.irm(x)
        return super().forward(x)

    def freeze(self) -> bool:
        return self.irm.finish_calibration() and super().freeze()


# -- DGD -------------------------------------------------------------------------------------------
def normalized_gram(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``G̃``: per example and head, ``G = x xᵀ`` (tokens × tokens) with rows L2-normalised.

    ``x`` is ``(N, heads, L, d)``; ``mask`` ``(N, L)`` bool zeroes the excluded tokens first, which removes
    their rows and columns from G (a zero row stays zero after normalisation), exactly as if G were
    restricted to the valid tokens.
    """
    x = x.float()
    if mask is not None:
        x = x * mask.to(device=x.device, dtype=x.dtype)[:, None, :, None]
    return F.normalize(x @ x.transpose(-2, -1), dim=-1)


def gram_distance(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``‖G̃^S − G̃^T‖_F`` per example and head, shape ``(N, heads)``."""
    difference = normalized_gram(student, mask) - normalized_gram(teacher.detach(), mask)
    return torch.linalg.vector_norm(difference, dim=(-2, -1))


def qk_attention(vlm: VLM, towers: Sequence[str]) -> dict[str, QuantizableMultiheadAttention]:
    """The rewritten attention modules of ``towers`` (heads excluded), by name inside ``vlm.model``."""
    return {
        name: module
        for name, module in vlm.model.named_modules()
        if isinstance(module, QuantizableMultiheadAttention)
        and vlm.tower_of(name) in towers
        and not is_under(name, vlm.head_modules)
    }


@contextmanager
def capture_qk(attention: dict[str, QuantizableMultiheadAttention],
               store: dict[str, list[torch.Tensor]]) -> Iterator[None]:
    """Record the outputs of every ``q`` and ``k`` slot (what the attention consumes) into ``store``
    (``"{name}.q"`` → one tensor per call) while active; the hooks are removed on exit."""
    handles = []

    def recorder(key: str):
        def hook(module, inputs, output):
            store.setdefault(key, []).append(output)

        return hook

    try:
        for name, module in attention.items():
            for slot in ("q", "k"):
                handles.append(getattr(module, slot).register_forward_hook(recorder(f"{name}.{slot}")))
        yield
    finally:
        for handle in handles:
            handle.remove()


class DistributionGuidedDistillation:
    """Q-ViT's DGD as a Light-QAT auxiliary term: ``weight · mean_{l,h}(‖G̃_q^S − G̃_q^T‖_F + ‖G̃_k^S − G̃_k^T‖_F)``.

    :meth:`capture` hooks the student's ``q``/``k`` slot outputs during its forward; calling the object
    with the batch runs the FP teacher (attention rewritten, exact) on the same images (and, in joint
    scope, captions), captures its per-head q/k, and returns the weighted term. Text positions after
    end-of-text are excluded from G. Nothing is kept on the model: hooks live only inside the two captures.
    """

    name = "dgd"

    def __init__(self, student: VLM, teacher: VLM, towers: Sequence[str], weight: float) -> None:
        self.towers = tuple(towers)
        self.weight = float(weight)
        rewrite_tower_attention(teacher, self.towers)  # no-op where already rewritten
        self.student, self.teacher = student, teacher
        self.student_attention = qk_attention(student, self.towers)
        self.teacher_attention = qk_attention(teacher, self.towers)
        if self.student_attention.keys() != self.teacher_attention.keys():
            raise QbenchError("q-vit: student and teacher attention modules do not match; cannot distil q/k")
        self.text_attention = {name for name in self.student_attention if student.tower_of(name) == "text"}
        self._student: dict[str, list[torch.Tensor]] | None = None

    @property
    def n_blocks(self) -> int:
        return len(self.student_attention)

    @contextmanager
    def capture(self) -> Iterator[None]:
        store: dict[str, list[torch.Tensor]] = {}
        with capture_qk(self.student_attention, store):
            yield
        self._student = store

    @torch.no_grad()
    def teacher_qk(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """The teacher's per-head q/k of one batch (its identity slots' outputs)."""
        store: dict[str, list[torch.Tensor]] = {}
        with capture_qk(self.teacher_attention, store):
            self.teacher.encode_image(images)
            if "text" in self.towers and self.text_attention:
                self.teacher.encode_text(tokens)
        return store

    def unweighted(self, student: dict[str, list[torch.Tensor]], teacher: dict[str, list[torch.Tensor]],
                   tokens: torch.Tensor | None) -> torch.Tensor:
        """``L_DGD`` from captured student and teacher q/k (mean over blocks, heads and the batch)."""
        mask = text_token_mask(tokens) if tokens is not None and self.text_attention else None
        total: torch.Tensor | None = None
        pairs = 0
        for name in self.student_attention:
            text = name in self.text_attention and mask is not None
            for slot in ("q", "k"):
                key = f"{name}.{slot}"
                for s, t in zip(student.get(key, []), teacher.get(key, []), strict=True):
                    valid = mask if text and mask.shape == (s.shape[0], s.shape[2]) else None
                    term = gram_distance(s, t, valid).mean(dim=0).sum()  # batch mean, summed over heads
                    total = term if total is None else total + term
            calls = len(student.get(f"{name}.q", []))
            pairs += calls * self.student_attention[name].num_heads
        if total is None or pairs == 0:
            raise RuntimeError("q-vit DGD: no q/k was captured (call inside capture() around the student's forward)")
        return total / pairs

    def __call__(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self._student is None:
            raise RuntimeError("q-vit DGD called without a captured student forward")
        student, self._student = self._student, None
        teacher = self.teacher_qk(images, tokens)
        return self.weight * self.unweighted(student, teacher, tokens if "text" in self.towers else None)


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
        return LSQQuantizer(bits.weight_bits, signed=True, granularity="per_channel", init="lsq")

    def act_quantizer(self, bits: BitSpec, name: str, module: nn.Module) -> TensorQuantizer | None:
        """Per-tensor LSQ+ (unsigned grid, learned offset) initialised from the calibration min/max."""
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
        config: QViTConfig = self.config  # type: ignore[assignment]
        if config.dgd_weight == 0:
            return None
        dgd = DistributionGuidedDistillation(model, teacher, towers, config.dgd_weight)
        return dgd if dgd.n_blocks else None

    def finalize(self, model: VLM, wrapped: dict[str, QuantModule]) -> dict[str, Any]:
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
