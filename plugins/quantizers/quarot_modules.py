"""The ``nn.Module`` side of ``quarot`` (:mod:`qbench_plugins.quantizers.quarot`): its per-token activation quantizer.

Kept apart from the registration module so that registering the plugin (``qbench list``) does not import torch;
the quantizer imports this module when it builds its quantizers.
"""

from __future__ import annotations

from typing import Any

import torch

from qbench.quant.fake_quant import group_minmax
from qbench.quant.modules import TensorQuantizer

__all__ = ["ClippedTokenQuantizer"]


class ClippedTokenQuantizer(TensorQuantizer):
    """Per-token dynamic symmetric quantizer whose range is each token's ``max|x|·clip_ratio`` (QuaRot's
    ``--a_clip_ratio``; 1.0 is plain per-token min/max)."""

    def __init__(self, bits: int, clip_ratio: float) -> None:
        super().__init__(bits, symmetric=True, granularity="per_token", dynamic=True)
        self.clip_ratio = float(clip_ratio)

    def qparams_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = group_minmax(self.group_view(x))
        return self.fmt.qparams(lo * self.clip_ratio, hi * self.clip_ratio)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "clip_ratio": self.clip_ratio}
