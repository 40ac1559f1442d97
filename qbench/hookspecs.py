"""Hook specifications: the four plugin kinds of qbench (Model, Quantizer, Scorer, Benchmark).

Built-in plugins (the ``qbench_plugins`` package) and third-party packages implement the same hooks.
A third-party package exposes a module in the ``qbench`` entry-point group::

    [project.entry-points.qbench]
    my_quantizers = "my_package.plugin"

and that module defines any of the functions below decorated with :data:`hookimpl`. Every hook returns
a list of typed objects (frozen dataclasses or classes), never loose dicts; the registry merges them and
rejects duplicate names, naming both sources.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from qbench.data import DatasetSpec, ProxySpec
    from qbench.model import ModelSpec
    from qbench.quant.base import Quantizer
    from qbench.scoring import Scorer
    from qbench.suites import SuiteSpec

PROJECT_NAME = "qbench"
ENTRY_POINT_GROUP = "qbench"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# -- Model -----------------------------------------------------------------------------------------
@hookspec
def qbench_register_models() -> list["ModelSpec"]:
    """Return model specs: each names a VLM and carries a loader returning a :class:`qbench.model.VLM`."""


# -- Quantizer -------------------------------------------------------------------------------------
@hookspec
def qbench_register_quantizers() -> list[type["Quantizer"]]:
    """Return :class:`qbench.quant.base.Quantizer` subclasses (one per method)."""


# -- Scorer ----------------------------------------------------------------------------------------
@hookspec
def qbench_register_scorers() -> list[type["Scorer"]]:
    """Return :class:`qbench.scoring.Scorer` subclasses (OOD scores, higher = more in-distribution)."""


# -- Benchmark -------------------------------------------------------------------------------------
@hookspec
def qbench_register_suites() -> list["SuiteSpec"]:
    """Return benchmark suites (usually parsed from versioned YAML with :func:`qbench.suites.load_suite`)."""


@hookspec
def qbench_register_datasets() -> list["DatasetSpec"]:
    """Return evaluation datasets that suites refer to by name."""


@hookspec
def qbench_register_proxies() -> list["ProxySpec"]:
    """Return proxy image-caption sources used for calibration and quantization-aware training."""
