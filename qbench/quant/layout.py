"""What verification expects of a run's quantized tensors: the core's groupings and a method's layout.

The verifier (:mod:`qbench.quant.verify`) counts distinct values per *group* of every tensor a quantized
kernel consumes. Who decides the groups decides how hard the check is: a quantizer that reports 2-element
groups makes every float tensor look like "at most 2 values". So the groupings live here, in the core:

* :class:`Grouping` is the closed set of ways to cut a tensor into groups (per tensor, per output channel,
  per token, per position, group-g, instance groups, per-tensor log2 levels), each with its view, its
  number of allowed values and the contexts (weight, Linear input, Conv input, attention slot) it may be
  used in. Sizes that a configuration can choose are bounded below (:data:`MIN_WEIGHT_GROUP`) or above
  (:data:`MAX_INSTANCE_GROUPS`); every other group is a whole natural unit (channel row, token row,
  position, tensor) whose size no configuration can change.
* :class:`QuantLayout` is all a method may say: which core grouping its run's configuration implies for
  weights, Linear inputs, Conv inputs and attention slots, and the bits of its first (pixel-reading)
  layers if the method keeps those at other bits (Q-ViT's 8-bit patch embedding). A method returns it
  from :meth:`qbench.quant.base.Quantizer.verification_layout`, a function of its config and the bit spec.
* :func:`verification_plan` turns (bit spec, layout, model) into a :class:`VerificationPlan`: the bits and
  grouping each module's weight, input and slot must show. Bits come from the run's bit spec, never from a
  module's quantizer; a layout choice the core does not allow becomes a *problem* (the run fails) and the
  strictest grouping of that context is used instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from qbench.quant.spec import BitSpec

if TYPE_CHECKING:  # quantizer plugins import this module at registration: keep it torch-free
    import torch
    from torch import nn

    from qbench.vlm import VLM

__all__ = [
    "CONTEXTS", "Grouping", "MAX_INSTANCE_GROUPS", "MIN_WEIGHT_GROUP", "QuantLayout", "STRICTEST", "TensorRule",
    "VerificationPlan", "declared_grouping", "pixel_reading_layers", "verification_plan"
]

MIN_WEIGHT_GROUP = 32
"""Smallest group-g a weight grouping may use.

Why 32: (1) it is the smallest group size of any method in the spec (QA-LoRA, ``quantizers.md`` §3.4:
Xu et al., ICLR 2024, arXiv:2309.14717; GPTQ/AWQ/QuaRot use 128); (2) storage: a group of g b-bit codes
carries a 16-bit scale and a 16-bit zero point, i.e. ``32/g`` extra bits per weight — at g = 32 already one
bit per weight, so a smaller group means the ``wX`` label understates the storage by more than a bit;
(3) evidence: a 32-element group can hold more than 2^b values for b ≤ 4, so the distinct-value count
alone separates float from quantized at the low bit-widths, and the grid check (:mod:`qbench.quant.verify`)
has enough values to measure a step at any b. Groups of 2 would make every float tensor pass.
"""

MAX_INSTANCE_GROUPS = 16
"""Largest G of instance-aware groups: IGQ-ViT's group-size allocation chooses G per layer from
{1, 2, 4, 8, 12, 16} (Moon et al., CVPR 2024, arXiv:2404.00928; ``quantizers.md`` §2.3). A tensor with G
static ranges holds at most G·2^b values, so G bounds how much a run may claim is still "b-bit"."""

WEIGHT, LINEAR_INPUT, CONV_INPUT, SLOT = "weight", "linear_input", "conv_input", "slot"
CONTEXTS = (WEIGHT, LINEAR_INPUT, CONV_INPUT, SLOT)

_ALLOWED: dict[str, tuple[str, ...]] = {
    WEIGHT: ("per_tensor", "per_channel", "group"),
    LINEAR_INPUT: ("per_tensor", "per_token", "per_position", "instance"),
    CONV_INPUT: ("per_tensor", "per_token", "instance"),
    SLOT: ("per_tensor", "per_token", "per_tensor_log2", "instance"),
}
STRICTEST = "per_tensor"
"""Used where a layout's choice is refused: one group for the whole tensor (fewest allowed values)."""

_SIZED = re.compile(r"^(group|instance)[-_](\d+)$")
_SLOTS = ("q", "k", "v", "probs")


@dataclass(frozen=True)
class Grouping:
    """One of the core's ways to cut a tensor into groups that each hold at most 2^b values.

    * ``per_tensor``: one group ``(1, numel)``;
    * ``per_channel``: weights, one group per output channel (dim 0), ``(shape[0], rest)``;
    * ``per_token``: one group per row of the last dimension (dynamic per-token activations; for a conv
      input that is one image row of one channel, as :class:`~qbench.quant.fake_quant.Granularity` does);
    * ``per_position``: ``(N, T, C)`` inputs, one group per position t over instances and channels;
    * ``group-g``: weights, consecutive g input features of one output row (short last group padded by
      repeating its last element, which adds no value); g ≥ :data:`MIN_WEIGHT_GROUP`;
    * ``instance-G``: IGQ-ViT's G static ranges assigned per instance: every *unit* (an instance's channel
      for Linear/Conv inputs, an attention row for slots) is one group of ≤ 2^b values, and the whole tensor
      holds at most G·2^b values; 1 ≤ G ≤ :data:`MAX_INSTANCE_GROUPS`;
    * ``per_tensor_log2``: one group whose levels are ``{s·2^−k} ∪ {0}`` (APQ-ViT's MPQ softmax quantizer).
    """

    kind: str
    size: int = 0

    @classmethod
    def parse(cls, value: "str | Grouping") -> "Grouping":
        """``per_tensor``, ``per_channel``, ``per_token``, ``per_position``, ``per_tensor_log2``, ``group-<g>``,
        ``instance-<G>``; anything else is a ValueError (sizes are checked by :meth:`problem`)."""
        if isinstance(value, Grouping):
            return value
        text = str(value).strip().lower().replace("-", "_")
        match = _SIZED.match(text)
        if match:
            return cls(match.group(1), int(match.group(2)))
        if text in ("per_tensor", "per_channel", "per_token", "per_position", "per_tensor_log2"):
            return cls(text)
        raise ValueError(
            f"unknown grouping {value!r}: use per_tensor, per_channel, per_token, per_position, per_tensor_log2, "
            f"group-<g> or instance-<G>"
        )

    @property
    def grid(self) -> str:
        """Which level set a group must lie on: ``uniform`` (affine integer grid) or ``log2``."""
        return "log2" if self.kind == "per_tensor_log2" else "uniform"

    def problem(self, context: str) -> str | None:
        """Why this grouping may not be used for a tensor of ``context``, or None when it may."""
        if self.kind not in _ALLOWED[context]:
            allowed = ", ".join(_ALLOWED[context])
            return f"grouping '{self}' is not allowed for {context.replace('_', ' ')}s (the core allows {allowed})"
        if self.kind == "group" and self.size < MIN_WEIGHT_GROUP:
            return f"grouping '{self}' is smaller than the core minimum of {MIN_WEIGHT_GROUP} elements per group"
        if self.kind == "instance" and not 1 <= self.size <= MAX_INSTANCE_GROUPS:
            return f"grouping '{self}' needs 1 <= G <= {MAX_INSTANCE_GROUPS} instance groups"
        return None

    def view(self, t: torch.Tensor, context: str) -> torch.Tensor:
        """``t`` as ``(n_groups, n)``, one row per group (raises ValueError when ``t`` has no such groups)."""
        if t.dim() == 0:
            return t.reshape(1, 1)
        if self.kind in ("per_tensor", "per_tensor_log2"):
            return t.reshape(1, -1)
        if self.kind == "per_channel":
            return t.reshape(t.shape[0], -1)
        if self.kind == "per_token":
            return t.reshape(-1, t.shape[-1])
        if self.kind == "per_position":
            if t.dim() != 3:
                raise ValueError(f"per_position grouping needs an (N, T, C) input, got shape {tuple(t.shape)}")
            return t.transpose(0, 1).reshape(t.shape[1], -1)
        if self.kind == "group":
            rows = t.reshape(t.shape[0], -1)
            pad = (-rows.shape[1]) % self.size
            if pad:
                import torch

                rows = torch.cat([rows, rows[:, -1:].expand(-1, pad)], dim=1)
            return rows.reshape(-1, self.size)
        return _instance_units(t, context)

    def tensor_levels(self, bits: int) -> int | None:
        """Most distinct values the whole tensor may hold (instance groups: G·2^b), or None (no extra bound)."""
        return self.size * 2**bits if self.kind == "instance" else None

    def __str__(self) -> str:
        return f"{self.kind}-{self.size}" if self.kind in ("group", "instance") else self.kind


def _instance_units(t: torch.Tensor, context: str) -> torch.Tensor:
    """The units IGQ-ViT assigns to one of its G ranges: per instance (dim 0) and channel for inputs, rows for slots."""
    if context == LINEAR_INPUT:
        if t.dim() < 2:
            return t.reshape(1, -1)
        return t.reshape(t.shape[0], -1, t.shape[-1]).transpose(1, 2).reshape(t.shape[0] * t.shape[-1], -1)
    if context == CONV_INPUT:
        if t.dim() < 2:
            return t.reshape(1, -1)
        return t.reshape(t.shape[0] * t.shape[1], -1)
    return t.reshape(-1, t.shape[-1])


@dataclass(frozen=True)
class QuantLayout:
    """What a method's configuration says about its quantized tensors, in the core's vocabulary only.

    ``weight``, ``linear_input``, ``conv_input`` and the values of ``slots`` (attention slot name → grouping)
    are :class:`Grouping` names; ``first_layer_bits`` keeps the pixel-reading layers (the ViT patch embedding,
    a CNN stem) at these bits for weight and, when the run quantizes activations, input. Bits otherwise come
    from the run's bit spec: a layout cannot loosen them.
    """

    weight: str = "per_channel"
    linear_input: str = "per_tensor"
    conv_input: str = "per_tensor"
    slots: Mapping[str, str] = field(default_factory=dict)
    first_layer_bits: int | None = None


@dataclass(frozen=True)
class TensorRule:
    """The bits and grouping one tensor must show; ``grid`` False in declared mode (count only)."""

    bits: int
    grouping: Grouping
    context: str
    grid: bool = True
    refused: str | None = None
    """Declared mode: why the quantizer's own granularity was refused (the module then fails)."""

    @property
    def levels(self) -> int:
        """Most distinct values one group may hold."""
        return 2**self.bits


@dataclass(frozen=True)
class VerificationPlan:
    """The expectations of one run: its bit spec, the validated groupings and the pixel-reading layers."""

    bits: BitSpec
    weight: Grouping
    linear_input: Grouping
    conv_input: Grouping
    slots: Mapping[str, Grouping]
    first_layer_bits: int | None
    first_layers: frozenset[str]
    problems: tuple[str, ...] = ()

    def weight_rule(self, name: str) -> TensorRule:
        """Weight bits from the spec (first-layer bits for a pixel-reading layer when the layout keeps them)."""
        return TensorRule(self._weight_bits(name), self.weight, WEIGHT)

    def input_rule(self, name: str, module: nn.Module) -> TensorRule | None:
        """Input bits and grouping of a Linear/Conv2d; None when the run keeps activations float (A16)."""
        from torch import nn

        if not self.bits.quantizes_activations:
            return None
        bits = self.first_layer_bits if name in self.first_layers and self.first_layer_bits else self.bits.act_bits
        if isinstance(module, nn.Conv2d):
            return TensorRule(bits, self.conv_input, CONV_INPUT)
        return TensorRule(bits, self.linear_input, LINEAR_INPUT)

    def slot_rule(self, slot: str, quantized: bool) -> TensorRule | None:
        """A declared slot's rule at A bits; an undeclared slot that holds a quantizer anyway is held to A bits
        per tensor (the strictest grouping). None when the run keeps activations float (A16)."""
        if not self.bits.quantizes_activations:
            return None
        if slot in self.slots:
            return TensorRule(self.bits.act_bits, self.slots[slot], SLOT)
        return TensorRule(self.bits.act_bits, Grouping(STRICTEST), SLOT) if quantized else None

    def _weight_bits(self, name: str) -> int:
        if name in self.first_layers and self.first_layer_bits:
            return self.first_layer_bits
        return self.bits.weight_bits

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored as the verification report's ``expected``."""
        return {
            "bits": str(self.bits),
            "weight": str(self.weight),
            "linear_input": str(self.linear_input),
            "conv_input": str(self.conv_input),
            "slots": {slot: str(grouping) for slot, grouping in sorted(self.slots.items())},
            "first_layer_bits": self.first_layer_bits,
            "first_layers": sorted(self.first_layers),
        }


def pixel_reading_layers(vlm: VLM, names: Sequence[tuple[str, nn.Module]]) -> frozenset[str]:
    """The image tower's convolutions that read the 3-channel pixels (ViT patch embedding, CNN stem).

    The core decides which modules count as "first layers", so a layout's ``first_layer_bits`` cannot be
    stretched to other modules.
    """
    from torch import nn

    return frozenset(
        name
        for name, module in names
        if isinstance(module, nn.Conv2d) and vlm.tower_of(name) == "visual" and module.in_channels == 3
    )


def verification_plan(bits: BitSpec, layout: Any, vlm: VLM, modules: Sequence[tuple[str, nn.Module]]) -> VerificationPlan:
    """Validate ``layout`` against the core's rules and bind it to ``bits`` and the in-scope ``modules``.

    Every refused choice (unknown or disallowed grouping, a group under the minimum, G out of range, an
    unknown slot, first-layer bits outside 2..8, or an object that is not a :class:`QuantLayout`) is a
    problem and falls back to the strictest grouping, so the run fails rather than being checked loosely.
    """
    problems: list[str] = []
    if not isinstance(layout, QuantLayout):
        problems.append(f"layout: the quantizer's verification_layout returned {type(layout).__name__}, not a QuantLayout")
        layout = QuantLayout()
    weight = _checked(layout.weight, WEIGHT, "weight", problems)
    linear_input = _checked(layout.linear_input, LINEAR_INPUT, "linear_input", problems)
    conv_input = _checked(layout.conv_input, CONV_INPUT, "conv_input", problems)
    slots: dict[str, Grouping] = {}
    for slot, grouping in dict(layout.slots).items():
        if slot not in _SLOTS:
            problems.append(f"layout: unknown attention slot {slot!r} (slots: {', '.join(_SLOTS)})")
            continue
        slots[slot] = _checked(grouping, SLOT, f"slots.{slot}", problems)
    first_bits = layout.first_layer_bits
    if first_bits is not None and (isinstance(first_bits, bool) or not isinstance(first_bits, int) or not 2 <= first_bits <= 8):
        problems.append(f"layout: first_layer_bits must be an integer 2..8, got {first_bits!r}")
        first_bits = None
    return VerificationPlan(
        bits=bits,
        weight=weight,
        linear_input=linear_input,
        conv_input=conv_input,
        slots=slots,
        first_layer_bits=first_bits,
        first_layers=pixel_reading_layers(vlm, modules),
        problems=tuple(problems),
    )


def _checked(value: Any, context: str, label: str, problems: list[str]) -> Grouping:
    """``value`` parsed and allowed for ``context``, else a problem and the strictest grouping."""
    try:
        grouping = Grouping.parse(value)
    except ValueError as error:
        problems.append(f"layout: {label}: {error}")
        return Grouping(STRICTEST)
    refusal = grouping.problem(context)
    if refusal:
        problems.append(f"layout: {label}: {refusal}")
        return Grouping(STRICTEST)
    return grouping


def declared_grouping(granularity: Any, context: str) -> tuple[Grouping, str | None]:
    """A quantizer's self-declared granularity in core terms (declared mode only), and why it was refused.

    Unknown names become per tensor silently (a method-specific descriptor); groupings the core refuses for
    ``context`` (e.g. 2-element groups) become per tensor *with* the refusal, which fails the module, so even
    declared mode cannot be talked into tiny groups. Used only when no bit spec is given (unit tests of a
    model in isolation); runs always verify against their plan.
    """
    text = str(granularity)
    match = re.match(r"^instance-(?:channel|row)-groups-(\d+)$", text)
    try:
        grouping = Grouping("instance", int(match.group(1))) if match else Grouping.parse(text)
    except ValueError:
        return Grouping(STRICTEST), None
    refusal = grouping.problem(context)
    return (Grouping(STRICTEST), refusal) if refusal else (grouping, None)
