"""qbench's conformance kit for plugin authors: tiny models, offline data and conformance checks.

Shipped with qbench and importable without a source checkout. Two ways to use it:

* run ``pytest --qbench-conformance`` in your package's folder (no test file needed): every installed
  quantizer, scorer, suite, model and dataset that is not built into qbench is checked, one test each
  (``quantizer:acme-ptq``); ``--qbench-conformance-builtins`` checks the built-ins too;
* call the checks from your own tests, e.g. ``check_scorer(MyScorer, context=...)`` with the resources your
  scorer needs, or ``check_quantizer(MyQuantizer, tiny_family_vlm("siglip"))``.

Importing this package is cheap (torch is loaded only when a model is built or a check runs); the names
below are loaded from their submodules on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    # checks (qbench.testing.conformance)
    "ConformanceError",
    "ConformanceSkip",
    "check_quantizer",
    "check_quantizer_declaration",
    "check_scorer",
    "check_scorer_declaration",
    "check_suite",
    "check_model",
    "check_vlm",
    "check_dataset",
    "check_split",
    "conformance_entries",
    "is_builtin",
    # tiny models (qbench.testing.models)
    "tiny_vlm",
    "tiny_family_vlm",
    "TINY_ARCHITECTURES",
    "embeddings",
    # data (qbench.testing.data)
    "proxy_batch",
    "calibration_from_proxy",
    "scorer_case",
    "ScorerCase",
    "HashTextEncoder",
]

_HOMES = {
    "models": ("tiny_vlm", "tiny_family_vlm", "TINY_ARCHITECTURES", "embeddings"),
    "data": ("proxy_batch", "calibration_from_proxy", "scorer_case", "ScorerCase", "HashTextEncoder"),
}


def __getattr__(name: str) -> Any:
    """Load a public name from its submodule on first access (keeps ``import qbench.testing`` light)."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    home = next((module for module, names in _HOMES.items() if name in names), "conformance")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names including the lazily loaded public ones (for ``dir()`` and completion)."""
    return sorted(set(globals()) | set(__all__))
