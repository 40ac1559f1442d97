"""The ``nn.Module`` side of ``qat-ste`` (:mod:`qbench_plugins.quantizers.qat_ste`): its EMA activation quantizer.

Kept apart from the registration module so that registering the plugin (``qbench list``) does not import torch;
the quantizer imports this module when it builds its quantizers.
"""

from __future__ import annotations

from typing import Any

import torch

from qbench.quant.modules import Mode, TensorQuantizer
from qbench.quant.observers import select_valid_tokens
from qbench_plugins.quantizers.qat_ste import EMA_MOMENTUM

__all__ = ["EMAActivationQuantizer"]


class EMAActivationQuantizer(TensorQuantizer):
    """Per-tensor asymmetric static quantizer whose range keeps following an ``ema_minmax`` observer while
    the module is in training mode (every quantized forward updates the EMA, then quantizes with it); in
    eval mode it is a plain static quantizer. The EMA state survives :meth:`freeze`."""

    def __init__(self, bits: int, momentum: float = EMA_MOMENTUM) -> None:
        super().__init__(bits, symmetric=False, granularity="per_tensor", observer="ema_minmax",
                         observer_kwargs={"momentum": momentum})

    def freeze(self) -> bool:
        """Fix (s, z) from the EMA range without resetting it (training continues from there)."""
        self.mode = Mode.QUANTIZE
        if self.observer is None or not self.observer.has_data:
            return self.scale is not None
        self.scale, self.zero_point = self.observer.qparams()
        return True

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.observe(select_valid_tokens(x))
            self.scale, self.zero_point = self.observer.qparams()
        return super().quantize(x)

    def resume_state(self) -> dict[str, Any]:
        """The EMA observer's running range and counters: plain attributes outside the state dict that every
        training forward updates (the buffers ``scale``/``zero_point`` are derived from them and cannot give
        them back), so a resumed Light-QAT run needs them (:class:`qbench.quant.training_state.ResumableState`)."""
        observer = self.observer
        return {"lo": observer.lo, "hi": observer.hi, "n_batches": observer.n_batches, "n_groups": observer._n_groups}

    def load_resume_state(self, state: dict[str, Any]) -> None:
        """Put a saved EMA range and its counters back, on the device of this quantizer's scale."""
        observer, device = self.observer, self.scale.device if self.scale is not None else None
        observer.lo = state["lo"].to(device) if state["lo"] is not None else None
        observer.hi = state["hi"].to(device) if state["hi"] is not None else None
        observer.n_batches, observer._n_groups = int(state["n_batches"]), state["n_groups"]
