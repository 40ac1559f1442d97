"""``quarot`` — Hadamard rotations, then RTN weights and per-token activations (``quantizers.md`` §2.6).

QuaRot re-parameterises a pre-LN transformer exactly (in float) so that its Linear inputs have no outlier
channels, then quantizes with plain round-to-nearest. Steps 1–4 live in :mod:`qbench.quant.rotation`
(shared with ``rot-lsq``): zero-mean residual stream, LayerNorm affine folded into the readers and the norm
turned into an RMSNorm (the SliceGPT observation: a LayerNorm on a zero-mean stream is an RMSNorm), a
seeded random Hadamard rotation of the stream folded into every reader and writer, and fixed online
Hadamards before ``out_proj`` and ``c_proj``. Step 5, here: weights per-output-channel symmetric RTN whose
clip range is searched per channel (``mse`` observer: pnorm 2.4, grid 100, maxshrink 0.8, QuaRot's
``--w_clip``); activations per-token dynamic symmetric with clip ratio 1.0 (the official default). GPTQ
weights are not implemented (optional in the spec). Data-free: no calibration pass.

In visual scope only the image tower is transformed and quantized; the text tower keeps its float modules
and is bit-identical to FP32. The heads (``visual.proj``, ``text_projection``) and the final norms are never
touched: the stream is un-rotated before ``ln_post``/``ln_final``.

Choices the paper leaves open for CLIP (recorded in provenance): the patch-embed conv's input is quantized
per token in the spec's sense (rows of the last dim, here image rows of one channel), and the online
Hadamard is the plain normalised Hadamard where one exists, else a seeded random orthogonal matrix.

Cite: S. Ashkboos, A. Mohtashami, M. L. Croci, B. Li, P. Cameron, M. Jaggi, D. Alistarh, T. Hoefler,
J. Hensman, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", NeurIPS 2024, arXiv:2404.00456
(github.com/spcl/QuaRot). LayerNorm → RMSNorm: S. Ashkboos, M. L. Croci, M. Gennari do Nascimento,
T. Hoefler, J. Hensman, "SliceGPT: Compress Large Language Models by Deleting Rows and Columns",
ICLR 2024, arXiv:2401.15024.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench.lazy import forward_names
from qbench.quant.base import Quantizer, QuantizerConfig
from qbench.quant.layout import QuantLayout
from qbench.quant.ptq import Additions, PTQQuantizer, PTQRun
from qbench.quant.spec import FLOAT_ACTIVATION_BITS, BitSpec

if TYPE_CHECKING:
    import torch
    from torch import nn
    from qbench.quant.modules import TensorQuantizer

__getattr__ = forward_names(__name__, {name: 'qbench_plugins.quantizers.quarot_modules' for name in ('ClippedTokenQuantizer',)})
"""ClippedTokenQuantizer: in :mod:`qbench_plugins.quantizers.quarot_modules` (torch), imported on first use."""


@dataclass(frozen=True)
class QuaRotConfig(QuantizerConfig):
    """Weight clip search (``mse`` observer), activation clip ratio, online Hadamards, rotation seed offset.

    The rotation is seeded from the run seed plus ``rotation_seed_offset``.
    """

    w_clip_pnorm: float = 2.4
    w_clip_grid: int = 100
    w_clip_maxshrink: float = 0.8
    act_clip_ratio: float = 1.0
    online_hadamard: bool = True
    rotation_seed_offset: int = 0


class QuaRotQuantizer(PTQQuantizer):
    """LN folding + seeded Hadamard rotations (exact), then RTN weights with MSE clip and per-token activations.

    The :class:`~qbench.quant.ptq.PTQQuantizer` template, data-free: the rotations are :meth:`prepare`, the
    quantizers :meth:`weight_quantizer` / :meth:`act_quantizer`, and the template's data-free calibration
    step only freezes (weights observe themselves, activations are dynamic).
    """

    name = "quarot"
    citation = (
        "S. Ashkboos et al., 'QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs', NeurIPS 2024, "
        "arXiv:2404.00456; LayerNorm->RMSNorm from S. Ashkboos et al., 'SliceGPT', ICLR 2024, arXiv:2401.15024"
    )
    summary = "exact Hadamard rotations of the residual stream, then RTN weights (MSE clip) and per-token activations"
    needs_data = False
    needs_grad = False
    Config = QuaRotConfig

    def check(self, bits: BitSpec) -> None:
        """Clip-search and clip-ratio settings in range."""
        _validate(self.config)  # type: ignore[arg-type]

    def prepare(self, run: PTQRun) -> Additions:
        """Steps 1-4 (:func:`~qbench.quant.rotation.rotate_model`), seeded from the run seed plus the offset."""
        from qbench.quant.rotation import rotate_model
        from qbench.quant.structure import UnsupportedBlock

        config: QuaRotConfig = self.config  # type: ignore[assignment]
        rotation_seed = run.seed + config.rotation_seed_offset
        try:
            report = rotate_model(run.model, run.towers, rotation_seed, online_hadamard=config.online_hadamard)
        except UnsupportedBlock as error:
            raise QbenchError(
                f"quarot covers open_clip pre-LN transformer towers only (online-only mode not implemented): {error}"
            ) from None
        return Additions(
            float_extras=dict(report.float_extras),
            provenance={
                "rotation_seed": rotation_seed,
                "rotation": report.to_dict(),
                "fixed_float_buffer_values": report.fixed_buffer_values,
            },
        )

    def verification_layout(self, bits: BitSpec) -> QuantLayout:
        """RTN weights per output channel, every Linear/Conv input per token (dynamic, QuaRot's activation
        scheme: Ashkboos et al., NeurIPS 2024, arXiv:2404.00456 §4)."""
        return QuantLayout(weight="per_channel", linear_input="per_token", conv_input="per_token")

    def weight_quantizer(self, bits: BitSpec, name: str, module: nn.Module) -> TensorQuantizer:
        """Per-output-channel symmetric RTN with the ``mse`` clip search (QuaRot's ``--w_clip``)."""
        from qbench.quant.modules import make_weight_quantizer

        config: QuaRotConfig = self.config  # type: ignore[assignment]
        return make_weight_quantizer(
            bits.weight_bits,
            "per_channel",
            symmetric=True,
            observer="mse",
            observer_kwargs={
                "grid": config.w_clip_grid,
                "maxshrink": config.w_clip_maxshrink,
                "pnorm": config.w_clip_pnorm,
            },
        )

    def act_quantizer(self, bits: BitSpec, name: str, module: nn.Module) -> TensorQuantizer | None:
        """Per-token dynamic symmetric with the clip ratio; None at A16."""
        from qbench_plugins.quantizers.quarot_modules import ClippedTokenQuantizer

        if bits.act_bits >= FLOAT_ACTIVATION_BITS:
            return None
        return ClippedTokenQuantizer(bits.act_bits, self.config.act_clip_ratio)  # type: ignore[attr-defined]


def _validate(config: QuaRotConfig) -> None:
    """One-line errors for settings the observer or the activation quantizer would reject later."""
    if config.w_clip_grid < 1:
        raise QbenchError(f"quarot.w_clip_grid must be >= 1, got {config.w_clip_grid}")
    if not 0.0 < config.w_clip_maxshrink < 1.0:
        raise QbenchError(f"quarot.w_clip_maxshrink must be in (0, 1), got {config.w_clip_maxshrink}")
    if config.w_clip_pnorm <= 0:
        raise QbenchError(f"quarot.w_clip_pnorm must be > 0, got {config.w_clip_pnorm}")
    if not 0.0 < config.act_clip_ratio <= 1.0:
        raise QbenchError(f"quarot.act_clip_ratio must be in (0, 1], got {config.act_clip_ratio}")


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [QuaRotQuantizer]
