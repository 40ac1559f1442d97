"""``minmax`` — simple MinMax post-training quantization (``quantizers.md`` §2.1).

The baseline layout of qbench (§1.6): every in-scope Linear/Conv2d gets a per-output-channel symmetric
weight quantizer whose range is the weight's own min/max, and a per-tensor asymmetric *static* input
quantizer whose range is the running min/max over the first ``n_calibration`` proxy images (and, in joint
scope, their captions through the text tower). One no-grad calibration pass, then (s, z) are frozen.

Affine quantization as in B. Jacob, S. Kligys, B. Chen, M. Zhu, M. Tang, A. Howard, H. Adam,
D. Kalenichenko, "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", CVPR 2018, arXiv:1712.05877. Jacob et al. quantize weights per layer, asymmetric uint8:
``weight_granularity="per_tensor"`` reproduces that (per-tensor *asymmetric* weights); the default
``per_channel`` (symmetric) follows current PyTorch and TensorRT weight quantization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench.model import VLM
from qbench.quant.base import CalibrationData, QuantizedModel, Quantizer, QuantizerConfig
from qbench.quant.calibrate import calibrate_and_freeze
from qbench.quant.modules import (
    first_module_settings,
    layout_counts,
    make_activation_quantizer,
    make_weight_quantizer,
    quantize_modules,
    rewrite_tower_attention,
)
from qbench.quant.spec import BitSpec, Scope

WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")


@dataclass(frozen=True)
class MinMaxConfig(QuantizerConfig):
    """``n_calibration`` proxy pairs in batches of ``batch_size``; weight ranges per channel or per tensor."""

    n_calibration: int = 1000
    weight_granularity: str = "per_channel"
    batch_size: int = 100


class MinMaxQuantizer(Quantizer):
    """W per-channel symmetric minmax, A per-tensor asymmetric static minmax (Jacob et al., CVPR 2018)."""

    name = "minmax"
    family = "ptq"
    citation = (
        "B. Jacob et al., 'Quantization and Training of Neural Networks for Efficient "
        "Integer-Arithmetic-Only Inference', CVPR 2018, arXiv:1712.05877"
    )
    summary = "min/max ranges: weights per-channel symmetric, activations per-tensor asymmetric static"
    needs_data = True
    needs_grad = False
    Config = MinMaxConfig

    def quantize(
        self,
        model: VLM,
        bits: BitSpec,
        scope: Scope,
        calibration: CalibrationData | None,
        seed: int,
    ) -> QuantizedModel:
        config: MinMaxConfig = self.config  # type: ignore[assignment]
        if config.weight_granularity not in WEIGHT_GRANULARITIES:
            raise QbenchError(
                f"minmax.weight_granularity must be one of {', '.join(WEIGHT_GRANULARITIES)}, "
                f"got {config.weight_granularity!r}"
            )
        if config.batch_size < 1:
            raise QbenchError(f"minmax.batch_size must be >= 1, got {config.batch_size}")
        if calibration is None or len(calibration) == 0:
            raise QbenchError("quantizer 'minmax' needs calibration data: pass a proxy (--proxy) with image-caption pairs")
        towers = scope.towers
        weight_symmetric = config.weight_granularity == "per_channel"

        rewritten = rewrite_tower_attention(model, towers)
        wrapped = quantize_modules(
            model,
            towers,
            lambda name, module: make_weight_quantizer(
                bits.weight_bits, config.weight_granularity, symmetric=weight_symmetric
            ),
            lambda name, module: make_activation_quantizer(bits.act_bits),
        )
        fitted = calibrate_and_freeze(
            model, calibration, towers, n=config.n_calibration, batch_size=config.batch_size, method=self.name
        )
        model.clear_caches()
        return QuantizedModel(model, provenance=self._provenance(config, bits, scope, seed, rewritten, wrapped, fitted, model))

    def _provenance(
        self,
        config: MinMaxConfig,
        bits: BitSpec,
        scope: Scope,
        seed: int,
        rewritten: int,
        wrapped: dict[str, Any],
        fitted: dict[str, Any],
        model: VLM,
    ) -> dict[str, Any]:
        return {
            "method": self.name,
            "config": self.params(),
            "bits": str(bits),
            "scope": scope.value,
            "seed": seed,
            "calibration": fitted,
            **first_module_settings(wrapped),
            **layout_counts(model, wrapped, rewritten),
            "extra_parameters": 0,
        }


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [MinMaxQuantizer]
