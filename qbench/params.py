"""Typed hyperparameters shared by every configurable plugin (quantizers, scorers).

A plugin class declares a frozen ``Config`` dataclass whose field defaults are its paper's; users
override fields by name from the CLI (``--qparam alpha=0.5``, ``--sparam SCORER.ngroup=10``) or YAML,
and each raw value is coerced to the field's type. The resolved values go into the configuration hash.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from qbench.errors import QbenchError

__all__ = ["PluginConfig", "require_choice", "require_in_range", "require_positive"]


LIST_SEPARATOR = "|"


@dataclass(frozen=True)
class PluginConfig:
    """Base of every plugin's hyperparameter dataclass (subclass it with typed, defaulted fields)."""


class Configurable:
    """Mixin: a ``Config`` dataclass, construction from user overrides, defaults and resolved params."""

    name: ClassVar[str]
    kind: ClassVar[str] = "plugin"  # "quantizer", "scorer": used in error messages
    Config: ClassVar[type[PluginConfig]] = PluginConfig

    def __init__(self, config: PluginConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def from_params(cls, params: Mapping[str, Any]):
        """Build from user overrides, coercing each value to the field's type; unknown names are errors."""
        fields = {item.name for item in dataclasses.fields(cls.Config)}
        defaults = cls.Config()
        values: dict[str, Any] = {}
        for key, raw in params.items():
            if key not in fields:
                known = ", ".join(sorted(fields)) or "none"
                raise QbenchError(f"{cls.kind} {cls.name!r} has no parameter {key!r} (parameters: {known})")
            values[key] = coerce(raw, type(getattr(defaults, key)), f"{cls.name}.{key}")
        return cls(cls.Config(**values))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return dataclasses.asdict(cls.Config())

    def params(self) -> dict[str, Any]:
        """The resolved hyperparameters; part of the configuration hash."""
        return dataclasses.asdict(self.config)


def coerce(raw: Any, target: type, label: str) -> Any:
    """``raw`` (often a string from the command line) as ``target``; a one-line error when it is not one."""
    if isinstance(raw, target) and not (target is int and isinstance(raw, bool)):
        return raw
    if target is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if target is tuple:  # a list setting: a YAML list, or "a|b|c" on the command line
        items = raw if isinstance(raw, (list, tuple)) else str(raw).split(LIST_SEPARATOR)
        return tuple(str(item).strip() for item in items if str(item).strip())
    text = str(raw).strip()
    try:
        if target is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        return target(text)
    except ValueError:
        raise QbenchError(f"bad value {text!r} for {label}: expected {target.__name__}") from None


def require_positive(value: float, label: str) -> float:
    """``value`` when it is a positive finite number; else a one-line error naming the setting."""
    if not (math.isfinite(value) and value > 0):
        raise QbenchError(f"{label} must be a positive finite number, got {value!r}")
    return value


def require_choice(value: str, choices: tuple[str, ...], label: str) -> str:
    """``value`` when it is one of ``choices``; else a one-line error listing them."""
    if value not in choices:
        raise QbenchError(f"{label} must be one of {', '.join(choices)}, got {value!r}")
    return value


def require_in_range(value: float, low: float, high: float, label: str, *, include_low: bool = True,
                     include_high: bool = True) -> float:
    """``value`` when it is a finite number in the interval; else a one-line error naming the setting.

    ``include_low``/``include_high`` say whether the ends belong to it (``(50, 100]`` for a percentile).
    """
    above = value >= low if include_low else value > low
    below = value <= high if include_high else value < high
    if not (isinstance(value, (int, float)) and math.isfinite(value) and above and below):
        interval = f"{'[' if include_low else '('}{low}, {high}{']' if include_high else ')'}"
        raise QbenchError(f"{label} must be in {interval}, got {value!r}")
    return value
