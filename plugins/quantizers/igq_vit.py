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
from typing import TYPE_CHECKING, Any, Sequence

from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench.quant.base import Quantizer, QuantizerConfig
from qbench.quant.layout import QuantLayout
from qbench.quant.ptq import Additions, PTQQuantizer, PTQRun
from qbench.quant.spec import FLOAT_ACTIVATION_BITS, BitSpec

if TYPE_CHECKING:  # torch is imported in the functions that use it: registering (qbench list) stays cheap
    from torch import nn

    from qbench.quant.instance_groups import InstanceGroupQuantizer
    from qbench.quant.modules import QuantModule
    from qbench.vlm import VLM


@dataclass(frozen=True)
class IGQViTConfig(QuantizerConfig):
    """G groups per layer, ``n_calibration`` proxy images (paper: 32), k-means iterations, batch size of
    the calibration pass; ``allocate`` (group-size allocation) is not implemented and must stay false."""

    groups: int = 8
    n_calibration: int = 32
    kmeans_iters: int = 20
    allocate: bool = False
    batch_size: int = 32


class IGQViTQuantizer(PTQQuantizer):
    """Per-instance dynamic channel groups and softmax row groups with k-means ranges (Moon et al., CVPR 2024).

    The :class:`~qbench.quant.ptq.PTQQuantizer` template; this method's own steps are the grouping input
    quantizer (:meth:`act_quantizer`) and the ``probs`` slot quantizers (:meth:`install`); the template's
    calibration pass feeds their k-means.
    """

    name = "igq-vit"
    citation = (
        "J. Moon, D. Kim, J. Cheon, B. Ham, 'Instance-Aware Group Quantization for Vision Transformers', "
        "CVPR 2024, arXiv:2404.00928"
    )
    summary = "activations in per-instance dynamic channel groups (k-means ranges), softmax rows grouped alike"
    needs_data = True
    needs_grad = False
    Config = IGQViTConfig

    def check(self, bits: BitSpec) -> None:
        """``allocate`` is not implemented; groups, k-means iterations and batch size in range."""
        _check_config(self.config)  # type: ignore[arg-type]
        super().check(bits)

    def act_quantizer(self, bits: BitSpec, name: str, module: nn.Module) -> InstanceGroupQuantizer | None:
        """Channel-grouping input quantizer (channels last for Linears, first for convs); None at 16 bits."""
        return _input_quantizer(module, bits.act_bits, self.config)  # type: ignore[arg-type]

    def install(self, run: PTQRun) -> Additions:
        """A row-grouping quantizer in every in-scope ``probs`` slot."""
        run.state["slots"] = install_probs_quantizers(run.model, run.towers, run.bits.act_bits, self.config)  # type: ignore[arg-type]
        return Additions()

    def refine(self, run: PTQRun) -> Additions:
        """Nothing to search: the fitted group ranges and slot counts go to provenance."""
        slots = run.state["slots"]
        return Additions(provenance={
            "allocate": "not implemented (G fixed for every layer)",
            "probs_slots": len(slots),
            "probs_slots_by_tower": dict(Counter(run.model.tower_of(name) for name in slots)),
            "group_ranges": _group_ranges(run.wrapped, slots),
        })

    def module_settings(self, run: PTQRun) -> dict[str, Any]:
        """The first module's weight quantizer (input quantizers are listed per layer in ``group_ranges``)."""
        return {"weights": next(iter(run.wrapped.values())).weight_quantizer.describe() if run.wrapped else None}

    def extra_parameters(self, run: PTQRun) -> int:
        """2G range values per channel quantizer, G per row quantizer."""
        return _extra_parameters(run.wrapped, run.state["slots"])

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
    from torch import nn

    from qbench.quant.instance_groups import InstanceGroupQuantizer

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
    from qbench.quant.instance_groups import InstanceGroupQuantizer
    from qbench.quant.modules import QuantizableMultiheadAttention, is_under

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
    from qbench.quant.instance_groups import InstanceGroupQuantizer

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
    from qbench.quant.instance_groups import InstanceGroupQuantizer

    count = 0
    for module in wrapped.values():
        if isinstance(module.act_quantizer, InstanceGroupQuantizer):
            count += 2 * module.act_quantizer.n_groups
    return count + sum(quantizer.n_groups for quantizer in slots.values())


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [IGQViTQuantizer]
