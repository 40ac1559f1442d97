"""Bit specifications and quantization scopes.

A bit spec ``wXaY`` names the weight bit-width X (2..8) and the activation bit-width Y (2..16, where 16
means activations stay float), following the notation of the source study (W8A8, W6A8, W4A8, W4A6).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from qbench.errors import QbenchError

__all__ = ["BitSpec", "FLOAT_ACTIVATION_BITS", "Scope"]

_BIT_SPEC = re.compile(r"^w(\d+)a(\d+)$")
FLOAT_ACTIVATION_BITS = 16


@dataclass(frozen=True)
class BitSpec:
    """Weight and activation bit-widths of one quantization setting."""

    weight_bits: int
    act_bits: int

    @classmethod
    def parse(cls, text: str) -> "BitSpec":
        """Parse ``w8a8``-style text; anything else is a one-line :class:`QbenchError`."""
        match = _BIT_SPEC.match(text.strip().lower())
        if not match:
            raise QbenchError(
                f"bad bit spec {text!r}: use the form wXaY with 2<=X<=8 and 2<=Y<=16, e.g. w8a8, w6a8, w4a8"
            )
        spec = cls(int(match.group(1)), int(match.group(2)))
        if not 2 <= spec.weight_bits <= 8 or not 2 <= spec.act_bits <= 16:
            raise QbenchError(
                f"bad bit spec {text!r}: weight bits must be 2..8 and activation bits 2..16 (16 = float), e.g. w4a8"
            )
        return spec

    @property
    def quantizes_activations(self) -> bool:
        return self.act_bits < FLOAT_ACTIVATION_BITS

    def __str__(self) -> str:
        return f"w{self.weight_bits}a{self.act_bits}"


class Scope(str, Enum):
    """Which towers are quantized: the image tower only, or image and text towers together."""

    VISUAL = "visual"
    JOINT = "joint"

    @classmethod
    def parse(cls, text: str) -> "Scope":
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise QbenchError(f"bad scope {text!r}: use 'visual' or 'joint'") from None

    @property
    def towers(self) -> tuple[str, ...]:
        return ("visual",) if self is Scope.VISUAL else ("visual", "text")
