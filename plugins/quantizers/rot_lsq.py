"""``rot-lsq`` — QuaRot's exact rotations, then LSQ quantization-aware training (``quantizers.md`` §3.6).

The two halves solve different problems: the rotation (QuaRot steps 1–4, :func:`qbench.quant.rotation.rotate_model`)
is an exact float re-parameterisation that spreads activation outliers over all channels, so a uniform grid
fits the layer inputs better before any training; LSQ (the ``lsq`` plugin's quantizers: one learned step per
weight tensor and per layer input, gradient scale ``1/√(N·Qp)``) then adapts the steps and weights to that grid
with Light QAT, here in the hybrid regime (contrastive + 0.5·feature distillation; the spec's choice).

* **Rotation**: zero-mean residual stream, LayerNorm affine folded into the readers (the norms become RMSNorms),
  a seeded random Hadamard rotation of the stream folded into every reader and writer, fixed online Hadamards
  before ``out_proj`` and ``c_proj``; rotation seeded from the run seed (+ ``rotation_seed_offset``).
  The rotation and Hadamard matrices are buffers, never trained; the verifier lists them as float extras.
* **Quantizers and training**: exactly ``lsq``'s (signed full-range weight grid; activations signed or unsigned
  from the calibration pass; steps initialised at ``2·mean|v|/√Qp``), trained on the rotated model.

Cite: S. Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", NeurIPS 2024,
arXiv:2404.00456; S. K. Esser, J. L. McKinstry, D. Bablani, R. Appuswamy, D. S. Modha, "Learned Step Size
Quantization", ICLR 2020, arXiv:1902.08153.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench.quant.base import Quantizer
from qbench.quant.qat import Additions
from qbench.quant.spec import BitSpec
from qbench_plugins.quantizers.lsq_qat import LSQHybridConfig, LSQQATQuantizer

if TYPE_CHECKING:  # the rotation (torch) is imported in prepare: registering (qbench list) stays cheap
    from qbench.vlm import VLM


@dataclass(frozen=True)
class RotLSQConfig(LSQHybridConfig):
    """Light QAT, hybrid regime, on the rotated model; ``online_hadamard`` and the rotation seed offset as in ``quarot``."""

    online_hadamard: bool = True
    rotation_seed_offset: int = 0


class RotLSQQuantizer(LSQQATQuantizer):
    """QuaRot steps 1–4 (exact, fixed), then LSQ quantizers trained with Light QAT (hybrid)."""

    name = "rot-lsq"
    citation = (
        "QuaRot: S. Ashkboos et al., NeurIPS 2024, arXiv:2404.00456; then LSQ: S. K. Esser et al., "
        "'Learned Step Size Quantization', ICLR 2020, arXiv:1902.08153"
    )
    summary = "exact Hadamard rotations of the residual stream (QuaRot), then LSQ steps trained with Light QAT, hybrid loss"
    Config = RotLSQConfig

    def prepare(self, model: VLM, bits: BitSpec, towers: Sequence[str], seed: int) -> Additions:
        from qbench.quant.rotation import rotate_model
        from qbench.quant.structure import UnsupportedBlock

        config: RotLSQConfig = self.config  # type: ignore[assignment]
        rotation_seed = seed + config.rotation_seed_offset
        try:
            report = rotate_model(model, towers, rotation_seed, online_hadamard=config.online_hadamard)
        except UnsupportedBlock as error:
            raise QbenchError(f"rot-lsq covers pre-LN transformer towers only (as quarot): {error}") from None
        return Additions(
            float_extras=dict(report.float_extras),
            provenance={"rotation_seed": rotation_seed, "rotation": report.to_dict(),
                        "fixed_float_buffer_values": report.fixed_buffer_values},
        )


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [RotLSQQuantizer]
