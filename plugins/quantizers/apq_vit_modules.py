"""The torch side of ``apq-vit`` (:mod:`qbench_plugins.quantizers.apq_vit`): MPQ, its log2 softmax quantizer.

Kept apart from the registration module so that registering the plugin (``qbench list``) does not import torch;
the quantizer imports this module when it installs the MPQ slots.
"""

from __future__ import annotations

from typing import Any

import torch

from qbench.quant.modules import Mode, TensorQuantizer

__all__ = ["MPQLog2Quantizer", "mpq_quantize"]


# -- MPQ: log2 quantizer for post-softmax attention ------------------------------------------------
def mpq_quantize(p: torch.Tensor, scale: float | torch.Tensor, bits: int) -> torch.Tensor:
    """Round probabilities ``p`` to ``{s·2^−k, k = 0…2^b−2} ∪ {0}`` in the log2 domain.

    ``k = clamp(round(−log2(p/s)), 0, 2^b−2)``; values below ``s·2^−(2^b−1.5)`` (the midpoint, in log2,
    between the last level and 0) become 0. Computed in float32 and cast back; no gradient is defined.
    """
    k_max = 2**bits - 2
    s = torch.as_tensor(scale, dtype=torch.float32, device=p.device).reshape(())
    x = p.detach().float()
    k = torch.round(-torch.log2(x.clamp(min=torch.finfo(torch.float32).tiny) / s)).clamp(0, k_max)
    levels = s * torch.exp2(-k)
    out = torch.where(x < s * 2.0 ** -(k_max + 0.5), torch.zeros_like(levels), levels)
    return out.to(p.dtype)

class MPQLog2Quantizer(TensorQuantizer):
    """Post-softmax attention quantizer with the log2 levels of :func:`mpq_quantize` (APQ-ViT's MPQ).

    A :class:`TensorQuantizer` so the verifier and mode switching treat it like any slot quantizer:
    ``bits`` (at most 2^b distinct outputs), per-tensor ``group_view``, ``mode``. Its only parameter is
    the static level scale s, kept in the ``scale`` buffer (shape ``(1,)``); it needs no statistics, so in
    ``calibrate`` mode it passes float through and :meth:`freeze` just switches it on.
    """

    def __init__(self, bits: int, scale: float = 1.0) -> None:
        super().__init__(bits, symmetric=False, granularity="per_tensor")
        self.observer = None
        self.scale = torch.tensor([float(scale)])
        self.zero_point = torch.zeros(1)

    @property
    def level_scale(self) -> float:
        return float(self.scale)

    def set_level_scale(self, scale: float) -> None:
        self.scale = torch.full_like(self.scale, float(scale))

    def observe(self, x: torch.Tensor) -> None:
        """MPQ needs no statistics (s is searched), so calibration passes float through."""

    def freeze(self) -> bool:
        self.mode = Mode.QUANTIZE
        return True

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return mpq_quantize(x, self.scale, self.bits)

    def describe(self) -> dict[str, Any]:
        return {"bits": self.bits, "format": f"log2-mpq{self.bits}", "granularity": "per_tensor",
                "dynamic": False, "level_scale": self.level_scale}

    def extra_repr(self) -> str:
        return f"log2-mpq{self.bits}, s={self.level_scale:.4g}, mode={self.mode.value}"
