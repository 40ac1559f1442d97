"""What qbench's built-in plugins package declares: its plugin modules and the defaults of ``qbench eval``.

The core names no plugin. The built-in plugins live in their own package (:data:`BUILTIN_PACKAGE`), which
declares, in its ``__init__``:

* ``BUILTIN_PLUGINS`` — the modules registered (in this order) before any third-party entry point;
* ``COMMAND_PLUGINS`` — the subset of them that add ``qbench`` commands (``qbench_register_commands``),
  light to import, so ``qbench --help`` can list their commands without importing every plugin;
* ``EVAL_DEFAULTS`` — an :class:`EvalDefaults`: the model, quantizer, suites and proxy of an
  argument-less ``qbench eval`` (offline: generated data and a small model shipped with qbench).

The defaults come from the built-in package only, never from a hook that installed packages could
implement: installing a package must not change what an existing command computes, nor its configuration
hash. Reading them imports the package's ``__init__`` alone (no plugin module, no torch).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from types import ModuleType

from qbench.errors import QbenchError

BUILTIN_PACKAGE = "qbench_plugins"


@dataclass(frozen=True)
class EvalDefaults:
    """The settings ``qbench eval`` (and ``quantize``, sweeps, :class:`~qbench.engine.evaluate.EvalRequest`) use for
    what the user leaves out: a registered model, quantizer, suites and calibration proxy, all offline."""

    model: str
    quantizer: str
    suites: tuple[str, ...]
    proxy: str

    def __post_init__(self) -> None:
        """Reject anything but non-empty names (a malformed declaration is a broken installation)."""
        names = [self.model, self.quantizer, self.proxy, *self.suites]
        if not isinstance(self.suites, tuple) or not self.suites or not all(isinstance(name, str) and name for name in names):
            raise QbenchError(f"malformed eval defaults {self!r}: model, quantizer, proxy and at least one suite are "
                              "non-empty names; reinstall qbench")


def _package() -> ModuleType:
    """The built-in plugins package; a missing one is a broken installation (one line, not a traceback)."""
    try:
        return importlib.import_module(BUILTIN_PACKAGE)
    except ImportError as error:
        raise QbenchError(f"qbench's built-in plugins ({BUILTIN_PACKAGE}) cannot be imported ({error}); reinstall qbench") from None


def _declared(name: str, kind: type) -> object:
    """The package attribute ``name``, checked to be a ``kind``."""
    value = getattr(_package(), name, None)
    if not isinstance(value, kind):
        raise QbenchError(f"{BUILTIN_PACKAGE}.{name} is missing or not of type {kind.__name__}; reinstall qbench")
    return value


@functools.cache
def eval_defaults() -> EvalDefaults:
    """The :class:`EvalDefaults` declared by the built-in plugins package (read once)."""
    return _declared("EVAL_DEFAULTS", EvalDefaults)  # type: ignore[return-value]


def builtin_plugin_modules() -> tuple[str, ...]:
    """The module names of the built-in plugins, in registration order."""
    return tuple(_declared("BUILTIN_PLUGINS", tuple))  # type: ignore[arg-type]


def command_plugin_modules() -> tuple[str, ...]:
    """The built-in plugin modules that add commands (a subset of :func:`builtin_plugin_modules`)."""
    return tuple(_declared("COMMAND_PLUGINS", tuple))  # type: ignore[arg-type]
