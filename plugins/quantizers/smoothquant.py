"""``smoothquant`` — SmoothQuant (``quantizers.md`` §2.2).

Activation outliers sit in a few input channels of the Linears that read a LayerNorm; a per-tensor
activation quantizer must stretch its range over them and loses the rest. SmoothQuant migrates that
difficulty into the weights with a per-input-channel scale that is exact in float,
``Y = (X diag(s)⁻¹)(diag(s) Wᵀ)``, folded into the preceding LayerNorm (``γ ← γ/s``, ``β ← β/s``) and
the readers' columns (``W ← W diag(s)``), with

    ``s_j = clamp(a_j^α / w_j^{1−α}, min=1e-5)``, ``a_j = max|X_j|`` over the calibration tokens,
    ``w_j = max|W_{:,j}|`` over all readers of that input (q, k, v together), floored at 1e-5.

Then the smoothed model is quantized like ``minmax``: weights per-channel symmetric, activations
per-tensor asymmetric static (the paper's O3 setting), or dynamic per-token with
``act_granularity="per_token"`` (O1-style; applied to Linear inputs, the patch-embedding Conv2d reads
pixels, whose last dimension is not a token, and keeps its per-tensor static quantizer).

Pairs (``qbench.quant.structure.norm_reader_pairs``): ``ln_1 → {q, k, v}`` and ``ln_2 → c_fc`` of every
block in scope; ``out_proj`` and ``c_proj`` inputs have no foldable predecessor and get plain quantizers.
Text-tower statistics use only the valid token positions (``quantizers.md`` §1.1).

G. Xiao, J. Lin, M. Seznec, H. Wu, J. Demouth, S. Han, "SmoothQuant: Accurate and Efficient
Post-Training Quantization for Large Language Models", ICML 2023, arXiv:2211.10438;
github.com/mit-han-lab/smoothquant (``smooth_ln_fcs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench.quant.base import CalibrationData, Quantizer, QuantizerConfig
from qbench.quant.layout import QuantLayout
from qbench.quant.ptq import Additions, PTQQuantizer, PTQRun
from qbench.quant.spec import BitSpec

if TYPE_CHECKING:  # torch is imported in the functions that use it: registering (qbench list) stays cheap
    import torch
    from torch import nn

    from qbench.quant.modules import TensorQuantizer
    from qbench.quant.structure import NormReaders
    from qbench.vlm import VLM

ACT_GRANULARITIES = ("per_tensor", "per_token")
SCALE_CLAMP = 1e-5
"""Floor of ``w_j`` and of ``s_j`` (the official ``smooth_ln_fcs``)."""


@dataclass(frozen=True)
class SmoothQuantConfig(QuantizerConfig):
    """Migration strength ``alpha``, ``n_calibration`` proxy pairs in batches of ``batch_size``, and the
    activation granularity (``per_tensor`` static, or ``per_token`` dynamic)."""

    alpha: float = 0.5
    n_calibration: int = 512
    act_granularity: str = "per_tensor"
    batch_size: int = 100


# -- statistics and scales -------------------------------------------------------------------------
def reader_input_absmax(
    vlm: VLM,
    pairs: Sequence[NormReaders],
    images: torch.Tensor,
    tokens: torch.Tensor | None,
    *,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """``a_j = max|X_j|`` per input channel of each pair's readers over all (valid) tokens, keyed by norm name.

    Streams ``images`` (and ``tokens``) through the model without gradients; text positions after the
    end-of-text token are ignored. Pairs whose readers never ran are absent from the result.
    """
    import torch
    from torch import nn

    from qbench.quant.calibrate import calibrate
    from qbench.quant.observers import select_valid_tokens

    maxima: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(norm_name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = select_valid_tokens(inputs[0].detach())
            if x.numel() == 0:
                return
            current = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            previous = maxima.get(norm_name)
            maxima[norm_name] = current if previous is None else torch.maximum(previous, current)

        return hook

    try:
        for pair in pairs:  # the readers of a pair share one input: hooking the first one sees it all
            handles.append(pair.readers[0][1].register_forward_pre_hook(hook_for(pair.norm_name)))
        calibrate(vlm, images, tokens, batch_size=batch_size)
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = clamp(a^α / max(w, 1e-5)^{1−α}, min=1e-5)`` in float64."""
    a = act_absmax.detach().double()
    w = weight_absmax.detach().double().to(a.device).clamp(min=SCALE_CLAMP)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=SCALE_CLAMP)


def smooth(
    vlm: VLM,
    towers: Sequence[str],
    calibration: CalibrationData,
    *,
    alpha: float,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """Record ``a_j``, compute ``s`` for every LN → readers pair of ``towers`` and fold it; returns ``{norm: s}``.

    Attention must already be rewritten. Captions go through the text tower only when it is in scope.
    """
    from qbench.quant.structure import norm_reader_pairs
    from qbench.quant.transforms import input_channel_absmax, scale_norm_and_readers

    pairs = norm_reader_pairs(vlm, towers)
    tokens = calibration.tokens if "text" in towers else None
    act_absmax = reader_input_absmax(vlm, pairs, calibration.images, tokens, batch_size=batch_size)
    scales: dict[str, torch.Tensor] = {}
    for pair in pairs:
        if pair.norm_name not in act_absmax or pair.norm.weight is None:
            continue  # readers never ran, or nothing to fold into: leave the pair alone
        s = smoothing_scales(act_absmax[pair.norm_name], input_channel_absmax(pair), alpha)
        scale_norm_and_readers(pair, s)
        scales[pair.norm_name] = s
    return scales


def scale_summary(scales: dict[str, torch.Tensor]) -> dict[str, float] | None:
    """min / median / max of all smoothing factors (None when nothing was smoothed)."""
    import torch

    if not scales:
        return None
    values = torch.cat([s.flatten().cpu() for s in scales.values()])
    return {"min": float(values.min()), "median": float(values.median()), "max": float(values.max())}


# -- plugin ----------------------------------------------------------------------------------------
class SmoothQuantQuantizer(PTQQuantizer):
    """Per-channel smoothing folded into LN → Linear pairs, then minmax quantization (Xiao et al., ICML 2023).

    The :class:`~qbench.quant.ptq.PTQQuantizer` template; this method's own steps are the smoothing
    (:meth:`prepare`, on the float model) and the activation granularity of :meth:`act_quantizer`.
    """

    name = "smoothquant"
    citation = (
        "G. Xiao, J. Lin, M. Seznec, H. Wu, J. Demouth, S. Han, 'SmoothQuant: Accurate and Efficient "
        "Post-Training Quantization for Large Language Models', ICML 2023, arXiv:2211.10438"
    )
    summary = "activation outliers migrated into weights by folded per-channel scales, then minmax quantization"
    needs_data = True
    needs_grad = False
    Config = SmoothQuantConfig

    def check(self, bits: BitSpec) -> None:
        """Granularity one of :data:`ACT_GRANULARITIES`, ``alpha`` in [0, 1], batch sizes positive."""
        config: SmoothQuantConfig = self.config  # type: ignore[assignment]
        if config.act_granularity not in ACT_GRANULARITIES:
            raise QbenchError(
                f"smoothquant.act_granularity must be one of {', '.join(ACT_GRANULARITIES)}, "
                f"got {config.act_granularity!r}"
            )
        if not 0.0 <= config.alpha <= 1.0:
            raise QbenchError(f"smoothquant.alpha must be in [0, 1], got {config.alpha}")
        if config.batch_size < 1 or config.n_calibration < 1:
            raise QbenchError(
                "smoothquant.batch_size and n_calibration must be >= 1, "
                f"got {config.batch_size}, {config.n_calibration}"
            )

    def prepare(self, run: PTQRun) -> Additions:
        """Record ``a_j`` on the float model and fold the smoothing scales into every LN → readers pair."""
        config: SmoothQuantConfig = self.config  # type: ignore[assignment]
        scales = smooth(run.model, run.towers, run.need_data(), alpha=config.alpha, batch_size=config.batch_size)
        return Additions(provenance={
            "alpha": config.alpha,
            "smoothed_pairs": len(scales),
            "smoothed_pairs_by_tower": {
                tower: sum(run.model.tower_of(name + ".") == tower for name in scales) for tower in run.towers
            },
            "smoothing_scales": scale_summary(scales),
        })

    def act_quantizer(self, bits: BitSpec, name: str, module: nn.Module) -> TensorQuantizer | None:
        """Per-token applies to Linear inputs (tokens on the last dim); the patch conv keeps per-tensor."""
        from torch import nn

        from qbench.quant.modules import make_activation_quantizer

        config: SmoothQuantConfig = self.config  # type: ignore[assignment]
        granularity = config.act_granularity if isinstance(module, nn.Linear) else "per_tensor"
        return make_activation_quantizer(bits.act_bits, granularity)

    def module_settings(self, run: PTQRun) -> dict[str, Any]:
        """The settings of the first quantized *Linear* (the patch conv keeps per-tensor inputs)."""
        from torch import nn

        linear = next((m for m in run.wrapped.values() if isinstance(m, nn.Linear)), None)
        return {
            "weights": linear.weight_quantizer.describe() if linear is not None else None,
            "activations": (
                linear.act_quantizer.describe()
                if linear is not None and linear.act_quantizer is not None
                else "float"
            ),
        }

    def verification_layout(self, bits: BitSpec) -> QuantLayout:
        """Weights per channel; Linear inputs at ``act_granularity`` (O3 per tensor, O1 per token), the patch
        conv per tensor (Xiao et al., ICML 2023, arXiv:2211.10438, Table 2 settings)."""
        config: SmoothQuantConfig = self.config  # type: ignore[assignment]
        return QuantLayout(weight="per_channel", linear_input=config.act_granularity, conv_input="per_tensor")


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [SmoothQuantQuantizer]
