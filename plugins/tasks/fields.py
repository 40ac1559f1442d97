"""Field parsers shared by the built-in task types: each problem is one line through the suite's ``fail``."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from qbench.errors import QbenchError

Fail = Callable[[str], QbenchError]


def names(raw: object, field: str, fail: Fail) -> tuple[str, ...]:
    """A YAML list of names as a tuple of strings (a bare string is an error: ``[a]``, not ``a``)."""
    if isinstance(raw, str) or not isinstance(raw, (list, tuple)):
        raise fail(f"{field} must be a list, got {raw!r}")
    return tuple(str(item) for item in raw)


def check_known(values: tuple[str, ...], known: tuple[str, ...], what: str, fail: Fail) -> None:
    """Every value must be one of ``known``; else one line listing the unknown and the available ones."""
    unknown = [value for value in values if value not in known]
    if unknown:
        raise fail(f"unknown {what}(s) {', '.join(unknown)} (available: {', '.join(known)})")


def required(raw: Mapping[str, Any], keys: tuple[str, ...], task_type: str, fail: Fail) -> None:
    """Each of ``keys`` must be present."""
    missing = [key for key in keys if key not in raw]
    if missing:
        raise fail(f"a {task_type} task needs {', '.join(missing)}")


def positive_int(raw: Mapping[str, Any], key: str, default: int, fail: Fail) -> int:
    """``raw[key]`` (or ``default``) as a positive integer; a bool or a float is an error."""
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(f"{key} must be a positive integer, got {value!r}")
    return value


def flag(raw: Mapping[str, Any], key: str, default: bool, fail: Fail) -> bool:
    """``raw[key]`` (or ``default``) as true or false."""
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise fail(f"{key} must be true or false, got {value!r}")
    return value
