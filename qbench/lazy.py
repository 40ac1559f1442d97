"""Torch-free helpers for modules that must import cheaply (plugin registration, ``qbench list``).

``@torch.no_grad()`` on a module-level function or method imports torch when the module is imported. A module
that plugin registration imports (the quantizer contracts, the plugin modules themselves) uses :func:`no_grad`
instead: the same behaviour, with torch imported at the first call. :func:`forward_names` builds the PEP 562
``__getattr__`` of a plugin module whose ``nn.Module`` classes moved to a sibling module.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, Mapping, TypeVar

__all__ = ["forward_names", "no_grad"]

F = TypeVar("F", bound=Callable[..., Any])


def no_grad(function: F) -> F:
    """Run ``function`` under ``torch.no_grad()``, importing torch at call time, not at decoration time.

    Equivalent to decorating with ``@torch.no_grad()`` for a plain function or method (a fresh no-grad context
    per call, ``functools.wraps`` metadata). Generator functions are refused: ``torch.no_grad`` treats them
    specially (the context is re-entered around every ``next``), which this wrapper does not reproduce.
    """
    if inspect.isgeneratorfunction(function) or inspect.iscoroutinefunction(function):
        raise TypeError(f"qbench.lazy.no_grad supports plain functions only, not {function.__qualname__}")

    @functools.wraps(function)
    def without_grad(*args: Any, **kwargs: Any) -> Any:
        """Call the wrapped function inside ``torch.no_grad()``."""
        import torch

        with torch.no_grad():
            return function(*args, **kwargs)

    return without_grad  # type: ignore[return-value]


def forward_names(module: str, moved: Mapping[str, str]) -> Callable[[str], Any]:
    """A PEP 562 module ``__getattr__`` serving names that moved to other modules, imported on first use.

    A plugin module keeps its registration torch-free by moving its ``nn.Module`` classes to a sibling module;
    ``__getattr__ = forward_names(__name__, {"Name": "package.sibling"})`` keeps ``from plugin import Name``
    (tests, third-party code) and quantized checkpoints that name ``plugin:Name`` working.
    """
    table = dict(moved)

    def __getattr__(name: str) -> Any:
        """The moved object ``name`` from its new module; AttributeError for any other name."""
        target = table.get(name)
        if target is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        return getattr(importlib.import_module(target), name)

    return __getattr__
