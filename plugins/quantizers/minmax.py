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
from typing import TYPE_CHECKING

from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench.quant.base import Quantizer, QuantizerConfig
from qbench.quant.ptq import PTQQuantizer
from qbench.quant.spec import BitSpec

if TYPE_CHECKING:  # torch is imported where the quantizers are built, so registering (qbench list) stays cheap
    from torch import nn

    from qbench.quant.modules import TensorQuantizer

WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")


@dataclass(frozen=True)
class MinMaxConfig(QuantizerConfig):
    """``n_calibration`` proxy pairs in batches of ``batch_size``; weight ranges per channel or per tensor."""

    n_calibration: int = 1000
    weight_granularity: str = "per_channel"
    batch_size: int = 100


class MinMaxQuantizer(PTQQuantizer):
    """W per-channel symmetric minmax, A per-tensor asymmetric static minmax (Jacob et al., CVPR 2018).

    The :class:`~qbench.quant.ptq.PTQQuantizer` template with its default steps; only the weight
    granularity is this method's own.
    """

    name = "minmax"
    citation = (
        "B. Jacob et al., 'Quantization and Training of Neural Networks for Efficient "
        "Integer-Arithmetic-Only Inference', CVPR 2018, arXiv:1712.05877"
    )
    summary = "min/max ranges: weights per-channel symmetric, activations per-tensor asymmetric static"
    needs_data = True
    needs_grad = False
    Config = MinMaxConfig

    def check(self, bits: BitSpec) -> None:
        """The weight granularity must be one of :data:`WEIGHT_GRANULARITIES`; batch sizes positive."""
        config: MinMaxConfig = self.config  # type: ignore[assignment]
        if config.weight_granularity not in WEIGHT_GRANULARITIES:
            raise QbenchError(
                f"minmax.weight_granularity must be one of {', '.join(WEIGHT_GRANULARITIES)}, "
                f"got {config.weight_granularity!r}"
            )
        if config.batch_size < 1:
            raise QbenchError(f"minmax.batch_size must be >= 1, got {config.batch_size}")
        super().check(bits)

    def weight_quantizer(self, bits: BitSpec, name: str, module: nn.Module) -> TensorQuantizer:
        """Per channel symmetric (default), or per tensor asymmetric as in Jacob et al."""
        from qbench.quant.modules import make_weight_quantizer

        config: MinMaxConfig = self.config  # type: ignore[assignment]
        symmetric = config.weight_granularity == "per_channel"
        return make_weight_quantizer(bits.weight_bits, config.weight_granularity, symmetric=symmetric)


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [MinMaxQuantizer]
