"""``fp32`` — the full-precision reference: a quantizer that changes nothing.

Every evaluation compares a model before and after quantization; with this baseline both states are the
same float model, which measures the harness's own noise floor (it must be zero). Nothing is quantized,
so verification runs with ``expect_quantized=False`` (the core passes it for family ``baseline``) and
reports ``passed=True`` with ``n_modules=0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qbench.hookspecs import hookimpl
from qbench.quant.base import CalibrationData, QuantizedModel, Quantizer, QuantizerConfig
from qbench.quant.spec import BitSpec, Scope

if TYPE_CHECKING:
    from qbench.vlm import VLM


@dataclass(frozen=True)
class FP32Config(QuantizerConfig):
    """No hyperparameters."""


class FP32Baseline(Quantizer):
    """No-op baseline: returns the float model unchanged (bit spec and scope are recorded, not applied)."""

    name = "fp32"
    family = "baseline"
    citation = "full-precision reference (no quantization)"
    summary = "no quantization: the float model, the reference every method is compared against"
    needs_data = False
    needs_grad = False
    Config = FP32Config

    def quantize(
        self,
        model: VLM,
        bits: BitSpec,
        scope: Scope,
        calibration: CalibrationData | None,
        seed: int,
    ) -> QuantizedModel:
        return QuantizedModel(
            model,
            provenance={"method": self.name, "note": "float model unchanged", "bits_ignored": str(bits), "scope": scope.value},
        )


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [FP32Baseline]
