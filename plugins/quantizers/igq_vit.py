"""``igq-vit`` — Instance-aware Group Quantization for ViTs (``quantizers.md`` §2.3).

Per input instance, the channels of every quantized layer's input activation are split into G groups of
similar range, each with its own asymmetric quantizer ``[l_g, u_g]``; the rows of every post-softmax
attention map are split the same way with unsigned quantizers ``[0, u_g]``. Weights are per-channel
symmetric minmax (§1.6).

Procedure (:class:`IGQViTQuantizer`):

1. rewrite the in-scope attention so q/k/v/out are Linears and a ``probs`` slot exists;
2. wrap every in-scope Linear/Conv2d with a per-channel symmetric weight quantizer and an
   :class:`~qbench.quant.instance_groups.InstanceGroupQuantizer` on its input (channels = last dim for
   Linears, dim 1 for convs), and put a row-grouping one in every in-scope ``probs`` slot;
3. one no-grad pass over the first ``n_calibration`` proxy images (and captions in joint scope) records,
   per instance and channel, the min/max over that instance's tokens (spatial positions for convs; valid
   text positions only), and per attention row its maximum;
4. freeze: k-means (Lloyd, ``kmeans_iters`` iterations, initialised at quantiles of M) on those points
   gives the G ranges; at run time each instance's channels/rows go to the nearest range.

G = ``groups`` for every layer (8, the spec's choice among the paper's group counts). The paper's
group-size allocation under a BOP budget (``allocate=true``) is *not implemented*: asking for it is a
one-line error. With G = 1 the method is static per-tensor asymmetric quantization with the range
``(mean channel min, mean channel max)`` over the calibration points (see
:mod:`qbench.quant.instance_groups`).

J. Moon, D. Kim, J. Cheon, B. Ham, "Instance-Aware Group Quantization for Vision Transformers",
CVPR 2024, arXiv:2404.00928; project page cvlab.yonsei.ac.kr/projects/IGQ-ViT (no public code).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench.model import VLM
from qbench.quant.base import CalibrationData, QuantizedModel, Quantizer, QuantizerConfig
from qbench.quant.calibrate import calibrate_and_freeze
from qbench.quant.instance_groups import InstanceGroupQuantizer
from qbench.quant.layout import QuantLayout
from qbench.quant.modules import (
    layout_counts,
    QuantizableMultiheadAttention,
    QuantModule,
    is_under,
    make_weight_quantizer,
    quantize_modules,
    rewrite_tower_attention,
)
from qbench.quant.spec import FLOAT_ACTIVATION_BITS, BitSpec, Scope


@dataclass(frozen=True)
class IGQViTConfig(QuantizerConfig):
    """G groups per layer, ``n_calibration`` proxy images (paper: 32), k-means iterations, batch size of
    the calibration pass; ``allocate`` (group-size allocation) is not implemented and must stay false."""

    groups: int = 8
    n_calibration: int = 32
    kmeans_iters: int = 20
    allocate: bool = False
    batch_size: int = 32


class IGQViTQuantizer(Quantizer):
    """Per-instance dynamic channel groups and softmax row groups with k-means ranges (Moon et al., CVPR 2024)."""

    name = "igq-vit"
    family = "ptq"
    citation = (
        "J. Moon, D. Kim, J. Cheon, B. Ham, 'Instance-Aware Group Quantization for Vision Transformers', "
        "CVPR 2024, arXiv:2404.00928"
    )
    summary = "activations in per-instance dynamic channel groups (k-means ranges), softmax rows grouped alike"
    needs_data = True
    needs_grad = False
    Config = IGQViTConfig

    def quantize(
        self,
        model: VLM,
        bits: BitSpec,
        scope: Scope,
        calibration: CalibrationData | None,
        seed: int,
    ) -> QuantizedModel:
        config: IGQViTConfig = self.config  # type: ignore[assignment]
        _check_config(config)
        towers = scope.towers
        rewritten = rewrite_tower_attention(model, towers)
        wrapped = quantize_modules(
            model,
            towers,
            lambda name, module: make_weight_quantizer(bits.weight_bits),
            lambda name, module: _input_quantizer(module, bits.act_bits, config),
        )
        slots = install_probs_quantizers(model, towers, bits.act_bits, config)
        fitted = calibrate_and_freeze(
            model, calibration, towers, n=config.n_calibration, batch_size=config.batch_size, method=self.name
        )
        model.clear_caches()
        provenance = {
            "method": self.name,
            "config": self.params(),
            "bits": str(bits),
            "scope": scope.value,
            "seed": seed,
            "calibration": fitted,
            "allocate": "not implemented (G fixed for every layer)",
            **layout_counts(model, wrapped, rewritten),
            "probs_slots": len(slots),
            "probs_slots_by_tower": dict(Counter(model.tower_of(name) for name in slots)),
            "weights": next(iter(wrapped.values())).weight_quantizer.describe() if wrapped else None,
            "group_ranges": _group_ranges(wrapped, slots),
            "extra_parameters": _extra_parameters(wrapped, slots),
        }
        return QuantizedModel(model, provenance=provenance)

    def verification_layout(self, bits: BitSpec) -> QuantLayout:
        """Weights per channel; every input and the ``probs`` slots in G instance groups (G static ranges
        assigned per instance: Moon et al., CVPR 2024, arXiv:2404.00928)."""
        config: IGQViTConfig = self.config  # type: ignore[assignment]
        groups = f"instance-{config.groups}"
        slots = {"probs": groups} if bits.quantizes_activations else {}
        return QuantLayout(weight="per_channel", linear_input=groups, conv_input=groups, slots=slots)


def _check_config(config: IGQViTConfig) -> None:
    if config.allocate:
        raise QbenchError("igq-vit.allocate=true (group-size allocation) is not implemented; use allocate=false")
    if config.groups < 1 or config.kmeans_iters < 0 or config.batch_size < 1:
        raise QbenchError(
            f"igq-vit needs groups >= 1, kmeans_iters >= 0 and batch_size >= 1 "
            f"(got {config.groups}, {config.kmeans_iters}, {config.batch_size})"
        )


def _input_quantizer(module: nn.Module, act_bits: int, config: IGQViTConfig) -> InstanceGroupQuantizer | None:
    """Channel-grouping input quantizer (channels last for Linears, first for convs); None at 16 bits."""
    if act_bits >= FLOAT_ACTIVATION_BITS:
        return None
    layout = "channels_first" if isinstance(module, nn.Conv2d) else "channels_last"
    return InstanceGroupQuantizer(act_bits, config.groups, layout=layout, kmeans_iters=config.kmeans_iters)


def install_probs_quantizers(
    vlm: VLM, towers: Sequence[str], act_bits: int, config: IGQViTConfig
) -> dict[str, InstanceGroupQuantizer]:
    """A row-grouping quantizer in the ``probs`` slot of every in-scope rewritten attention (heads excluded).

    Returns ``{slot name: quantizer}``; empty at 16 activation bits or when no tower has slots.
    """
    if act_bits >= FLOAT_ACTIVATION_BITS:
        return {}
    slots: dict[str, InstanceGroupQuantizer] = {}
    for name, module in vlm.model.named_modules():
        if not isinstance(module, QuantizableMultiheadAttention) or vlm.tower_of(name) not in towers:
            continue
        if is_under(name, vlm.head_modules):
            continue
        module.probs = InstanceGroupQuantizer(act_bits, config.groups, layout="rows", kmeans_iters=config.kmeans_iters)
        slots[f"{name}.probs"] = module.probs
    return slots


def _group_ranges(wrapped: dict[str, QuantModule], slots: dict[str, InstanceGroupQuantizer]) -> dict[str, Any]:
    """The fitted (l_g, u_g) of every activation quantizer, for audit."""
    ranges: dict[str, Any] = {}
    for name, module in wrapped.items():
        quantizer = module.act_quantizer
        if isinstance(quantizer, InstanceGroupQuantizer) and quantizer.upper is not None:
            info = quantizer.describe()
            ranges[name] = {"lower": info["lower"], "upper": info["upper"]}
    for name, quantizer in slots.items():
        if quantizer.upper is not None:
            ranges[name] = {"upper": quantizer.describe()["upper"]}
    return ranges


def _extra_parameters(wrapped: dict[str, QuantModule], slots: dict[str, InstanceGroupQuantizer]) -> int:
    """2G range values per channel quantizer, G per row quantizer (lower bound fixed at 0)."""
    count = 0
    for module in wrapped.values():
        if isinstance(module.act_quantizer, InstanceGroupQuantizer):
            count += 2 * module.act_quantizer.n_groups
    return count + sum(quantizer.n_groups for quantizer in slots.values())


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [IGQViTQuantizer]
