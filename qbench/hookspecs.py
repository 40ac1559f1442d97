"""Hook specifications: the four plugin kinds of qbench (Model, Quantizer, Scorer, Benchmark).

Built-in plugins (the ``qbench_plugins`` package) and third-party packages implement the same hooks.
A third-party package exposes a module in the ``qbench`` entry-point group::

    [project.entry-points.qbench]
    my_quantizers = "my_package.plugin"

and that module defines any of the functions below decorated with :data:`hookimpl`. Every hook returns
a list (or tuple) of typed objects (frozen dataclasses or classes), never loose dicts. The registry
(:mod:`qbench.registry`) checks each result when it is registered: the shape, each item's type (a
``ModelSpec``, a ``Quantizer`` subclass with a family from ``FAMILIES``, a citation and a summary, ...) and
its name. A bad result or item of an installed package is skipped with one warning naming the package; a
name registered twice keeps the first (built-ins first) with one warning naming both sources. A function
marked :data:`hookimpl` whose name is not one of the hooks below is reported with the closest hook name.
Every registered object records its package's distribution name and version (see :mod:`qbench.plugins`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from qbench.data import DatasetSpec, ProxySpec
    from qbench.model import ModelSpec
    from qbench.quant.base import Quantizer
    from qbench.scoring import Scorer
    from qbench.suites import SuiteSpec
    from qbench.tasks import TaskType

__all__ = [
    "ENTRY_POINT_GROUP", "PROJECT_NAME", "hookimpl", "qbench_register_commands", "qbench_register_datasets",
    "qbench_register_models", "qbench_register_proxies", "qbench_register_quantizers", "qbench_register_scorers",
    "qbench_register_suites", "qbench_register_task_types"
]

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
def qbench_register_task_types() -> list[type["TaskType"]]:
    """Return :class:`qbench.tasks.TaskType` subclasses: the kinds of ``tasks:`` entry a suite may hold.

    Task types are collected before suites, so a package can register a task type and a suite using it.
    """


@hookspec
def qbench_register_suites() -> list["SuiteSpec"]:
    """Return benchmark suites (usually parsed from versioned YAML with :func:`qbench.suites.load_suite`)."""


@hookspec
def qbench_register_datasets() -> list["DatasetSpec"]:
    """Return evaluation datasets that suites refer to by name."""


@hookspec
def qbench_register_proxies() -> list["ProxySpec"]:
    """Return proxy image-caption sources used for calibration and quantization-aware training."""


# -- Commands --------------------------------------------------------------------------------------
@hookspec
def qbench_register_commands() -> list["click.Command"]:
    """Return :class:`click.Command` objects added to the ``qbench`` command line (``qbench NAME``).

    A command whose name is a built-in command's, or one another plugin already added, is skipped with one
    warning. Keep the implementing module light to import (heavy imports inside the command): ``qbench
    --help`` imports it to list the command. Called by the command line, not by the registry.
    """
