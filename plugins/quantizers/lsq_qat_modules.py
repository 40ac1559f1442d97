"""The ``nn.Module`` side of ``lsq`` (:mod:`qbench_plugins.quantizers.lsq_qat`): its LSQ input quantizer.

Kept apart from the registration module so that registering the plugin (``qbench list``) does not import torch;
the quantizer imports this module when it builds its quantizers.
"""

from __future__ import annotations

import math

import torch

from qbench.quant.determinism import ordered_mean
from qbench.quant.fake_quant import SCALE_FLOOR, QuantFormat
from qbench.quant.lsq import LSQQuantizer
from qbench.quant.modules import Mode

__all__ = ["LSQActivationQuantizer"]


class LSQActivationQuantizer(LSQQuantizer):
    """LSQ input quantizer that picks its grid from the calibration pass: signed ``[−2^{b−1}, 2^{b−1}−1]``
    if any observed value is negative, else unsigned ``[0, 2^b−1]``; step ``2·mean|x|/√Qp`` from the first
    batch, gradient scale over the features per example."""

    def __init__(self, bits: int) -> None:
        super().__init__(bits, signed=True, init="lsq", features_per_example=True)
        self._first_mean_abs: torch.Tensor | None = None
        self._min_seen: float = math.inf

    def observe(self, x: torch.Tensor) -> None:
        groups = self.group_view(x.detach()).float()
        if groups.numel() == 0:
            return
        self._min_seen = min(self._min_seen, float(groups.min()))
        if self._first_mean_abs is None:  # fixed-order float64 mean: the same step for any thread count
            self._first_mean_abs = ordered_mean(groups.abs(), dim=1).float()

    def freeze(self) -> bool:
        """Choose signed/unsigned from everything observed, initialise the step, switch to ``quantize``."""
        self.mode = Mode.QUANTIZE
        if self._first_mean_abs is not None:
            self.fmt = QuantFormat(self.bits, symmetric=self._min_seen < 0, narrow=False)
            step = (2.0 * self._first_mean_abs / math.sqrt(self.fmt.qmax)).clamp(min=SCALE_FLOOR)
            self.set_step(step)
            self._first_mean_abs = None
        return self.step is not None
