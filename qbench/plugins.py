"""Building the plugin manager: built-in plugins first, then every ``qbench`` entry point.

The manager is built in a function, never at import time, so importing qbench stays cheap and tests
can build isolated managers. Built-in plugins are listed once, here, and register through the very
same hooks as third-party packages.
"""

from __future__ import annotations

import importlib

import pluggy

from qbench import hookspecs
from qbench.errors import QbenchError

BUILTIN_PLUGINS: tuple[str, ...] = (
    "qbench_plugins.toyworld.plugin",
    "qbench_plugins.models.plugin",
    "qbench_plugins.quantizers.fp32",
    "qbench_plugins.quantizers.minmax",
    "qbench_plugins.quantizers.smoothquant",
    "qbench_plugins.quantizers.outlier_suppression",
    "qbench_plugins.quantizers.igq_vit",
    "qbench_plugins.quantizers.q_vlm",
    "qbench_plugins.quantizers.qwt",
    "qbench_plugins.quantizers.apq_vit",
    "qbench_plugins.quantizers.quarot",
    "qbench_plugins.quantizers.qat_ste",
    "qbench_plugins.quantizers.lsq_qat",
    "qbench_plugins.quantizers.q_vit",
    "qbench_plugins.quantizers.qat_lora",
    "qbench_plugins.quantizers.rot_lsq",
    "qbench_plugins.scorers.msp",
    "qbench_plugins.scorers.energy",
    "qbench_plugins.scorers.entropy",
    "qbench_plugins.scorers.mcm",
    "qbench_plugins.scorers.generic_negative",
    "qbench_plugins.scorers.neglabel",
    "qbench_plugins.scorers.eoe",
    "qbench_plugins.datasets.cifar",
    "qbench_plugins.datasets.cifar10c",
    "qbench_plugins.datasets.imagenet",
    "qbench_plugins.datasets.mos",
    "qbench_plugins.datasets.imagenet_variants",
    "qbench_plugins.datasets.counteranimal",
    "qbench_plugins.datasets.user_folders",
    "qbench_plugins.datasets.webdataset_proxy",
    "qbench_plugins.suites",
)

BUILTIN_SOURCE_PREFIX = "builtin"


def get_plugin_manager(*, load_entrypoints: bool = True, extra_plugins: tuple[object, ...] = ()) -> pluggy.PluginManager:
    """A fresh plugin manager with the hook specs, the built-ins, ``extra_plugins`` and the entry points."""
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    for module_name in BUILTIN_PLUGINS:
        manager.register(importlib.import_module(module_name), name=f"{BUILTIN_SOURCE_PREFIX}:{module_name}")
    for plugin in extra_plugins:
        manager.register(plugin, name=_plugin_name(plugin))
    if load_entrypoints:
        _load_entrypoints(manager)
    return manager


def _plugin_name(plugin: object) -> str:
    """A readable registration name: the module name for modules, ``module.Class`` for instances."""
    if isinstance(plugin, type(importlib)):
        return plugin.__name__
    kind = type(plugin)
    return f"{kind.__module__}.{kind.__qualname__}"


def _load_entrypoints(manager: pluggy.PluginManager) -> None:
    try:
        manager.load_setuptools_entrypoints(hookspecs.ENTRY_POINT_GROUP)
    except Exception as error:  # a broken third-party package must not crash with a traceback
        raise QbenchError(
            f"a plugin in entry-point group '{hookspecs.ENTRY_POINT_GROUP}' failed to load "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            "fix or uninstall that package (pip list to find it)"
        ) from None


def plugin_source(manager: pluggy.PluginManager, plugin: object) -> str:
    """A human-readable source for a registered plugin: ``builtin:<module>`` or ``<dist> (<entry point>)``."""
    for registered, distribution in manager.list_plugin_distinfo():
        if registered is plugin:
            return f"{distribution.metadata['name']} ({manager.get_name(plugin)})"
    return manager.get_name(plugin) or repr(plugin)
