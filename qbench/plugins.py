"""Building the plugin manager: built-in plugins first, then every ``qbench`` entry point, one by one.

The manager is built in a function, never at import time, so importing qbench stays cheap and tests
can build isolated managers. Built-in plugins are listed once, by the built-in plugins package
(:mod:`qbench.builtins`), and register through the very same hooks as third-party packages.

Loading third-party plugins
---------------------------
Entry points of the ``qbench`` group are loaded one at a time, in sorted order of their distribution's
normalised name (then entry-point name); a distribution found twice on ``sys.path`` is loaded once (the
first found, as :func:`importlib.metadata.entry_points` and pluggy do). A package that fails to import
(``ImportError``, ``SyntaxError``, any exception) or to register (a hook implementation whose arguments do
not match its spec) is skipped with one warning line naming its distribution, version and the error's
first line; every other plugin keeps working.

``QBENCH_DISABLE_PLUGINS=a,b`` (comma-separated; whitespace around names is ignored) turns off every entry
point whose distribution name or entry-point name matches one of the names, compared after PEP 503
normalisation (case-insensitive; runs of ``-``, ``_`` and ``.`` are equal). A disabled entry point is never
imported. A name that matches no installed entry point gives one warning. Built-in plugins cannot be
disabled. Each load problem of an installed package is reported once per process, however many plugin
managers the process builds.

A hook implementation whose name matches no hook spec (``qbench_register_quantizer`` instead of
``qbench_register_quantizers``) would be silently ignored by pluggy: after loading, each one gives one
warning naming its package and the closest hook name; the plugin's other hooks keep working. In a
built-in plugin it is a bug and raises.

Plugin identity
---------------
Every registered plugin has a :class:`PluginOrigin`: its distribution name and version. Built-ins are
``qbench`` at ``qbench.__version__``; entry points carry their distribution's metadata name and version;
a plugin passed through ``get_plugin_manager(extra_plugins=...)`` (tests, embedding code) may declare
``qbench_distribution = ("name", "version")`` as a module or class attribute, else it is
``<unpackaged>`` version ``0``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import re
from dataclasses import dataclass
import pluggy

from qbench import __version__, hookspecs
from qbench.builtins import builtin_plugin_modules
from qbench.errors import QbenchError, warn

__all__ = ["get_plugin_manager"]

BUILTIN_PLUGINS: tuple[str, ...] = builtin_plugin_modules()
"""The built-in plugin modules, in registration order, as the built-in plugins package declares them
(``qbench_plugins.BUILTIN_PLUGINS``): the core names no plugin."""

BUILTIN_SOURCE_PREFIX = "builtin"
BUILTIN_DISTRIBUTION = "qbench"
UNPACKAGED_DISTRIBUTION = "<unpackaged>"
UNPACKAGED_VERSION = "0"
DISABLE_ENV = "QBENCH_DISABLE_PLUGINS"
DISTRIBUTION_ATTRIBUTE = "qbench_distribution"


@dataclass(frozen=True)
class PluginOrigin:
    """Where a registered plugin comes from: its distribution, version and registration name.

    ``name`` is the plugin's name in the manager: ``builtin:<module>`` for built-ins, the entry-point name
    for installed packages, the module or ``module.Class`` name for ``extra_plugins``. ``order`` is the load
    order, which decides who keeps a name registered twice (built-ins always load first).
    """

    distribution: str
    version: str
    name: str
    builtin: bool = False
    entry_point: bool = False
    order: int = 0
    location: str = ""
    """The folder an entry point's distribution is installed in (empty for other plugins)."""

    @property
    def label(self) -> str:
        """``qbench-acme 0.2 (acme)``: what ``qbench list`` shows as the source."""
        return f"{self.distribution} {self.version} ({self.name})"

    @property
    def describe(self) -> str:
        """``plugin qbench-acme 0.2 (entry point acme)``: how a warning names the plugin."""
        where = f"entry point {self.name}" if self.entry_point else self.name
        return f"plugin {self.distribution} {self.version} ({where})"

    @property
    def identity(self) -> str:
        """``qbench-acme==0.2``: the pin recorded in a run's configuration."""
        return f"{self.distribution}=={self.version}"


class QbenchPluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers each plugin's :class:`PluginOrigin` by registration name."""

    def __init__(self, project_name: str) -> None:
        super().__init__(project_name)
        self.origins: dict[str, PluginOrigin] = {}

    def register_with_origin(self, plugin: object, origin: PluginOrigin) -> None:
        """Register ``plugin`` under ``origin.name`` and remember its origin (pluggy errors propagate)."""
        self.register(plugin, name=origin.name)
        self.origins[origin.name] = origin


def get_plugin_manager(*, load_entrypoints: bool = True, extra_plugins: tuple[object, ...] = ()) -> QbenchPluginManager:
    """A fresh plugin manager with the hook specs, the built-ins, ``extra_plugins`` and the entry points.

    Misspelled hook implementations are reported (one warning each) once everything is registered.
    """
    manager = QbenchPluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    for module_name in BUILTIN_PLUGINS:
        origin = PluginOrigin(BUILTIN_DISTRIBUTION, __version__, f"{BUILTIN_SOURCE_PREFIX}:{module_name}",
                              builtin=True, order=len(manager.origins))
        manager.register_with_origin(importlib.import_module(module_name), origin)
    for plugin in extra_plugins:
        distribution, version = _declared_distribution(plugin)
        manager.register_with_origin(plugin, PluginOrigin(distribution, version, _plugin_name(plugin),
                                                          order=len(manager.origins)))
    if load_entrypoints:
        _load_entrypoints(manager)
    _check_pending(manager)
    return manager


def _plugin_name(plugin: object) -> str:
    """A readable registration name: the module name for modules, ``module.Class`` for instances."""
    if isinstance(plugin, type(importlib)):
        return plugin.__name__
    kind = type(plugin)
    return f"{kind.__module__}.{kind.__qualname__}"


def _declared_distribution(plugin: object) -> tuple[str, str]:
    """The ``qbench_distribution = ("name", "version")`` a non-installed plugin may declare, else unpackaged."""
    declared = getattr(plugin, DISTRIBUTION_ATTRIBUTE, None)
    if declared is None:
        return UNPACKAGED_DISTRIBUTION, UNPACKAGED_VERSION
    if (not isinstance(declared, tuple) or len(declared) != 2
            or not all(isinstance(part, str) and part.strip() for part in declared)):
        raise QbenchError(f"plugin {_plugin_name(plugin)}: {DISTRIBUTION_ATTRIBUTE} must be a (name, version) pair "
                          f"of non-empty strings, got {declared!r}")
    return declared[0].strip(), declared[1].strip()


def normalize_name(name: str) -> str:
    """PEP 503 normalisation: ``Qbench_Acme`` and ``qbench-acme`` are the same package."""
    return re.sub(r"[-_.]+", "-", name).lower().strip()


def disabled_names(value: str | None = None) -> list[str]:
    """The normalised names listed in ``QBENCH_DISABLE_PLUGINS`` (or ``value``), in order, without blanks."""
    raw = os.environ.get(DISABLE_ENV, "") if value is None else value
    return list(dict.fromkeys(normalize_name(part) for part in raw.split(",") if part.strip()))


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    """The ``qbench`` entry points, one per (distribution, entry-point name), sorted by distribution then name."""
    unique: dict[tuple[str, str], importlib.metadata.EntryPoint] = {}
    for entry_point in importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
        key = (normalize_name(_distribution_of(entry_point)[0]), entry_point.name)
        unique.setdefault(key, entry_point)  # the first found on sys.path wins, as with pip and pluggy
    return [unique[key] for key in sorted(unique)]


def _distribution_of(entry_point: importlib.metadata.EntryPoint) -> tuple[str, str]:
    """The metadata name and version of the distribution that declares ``entry_point``."""
    distribution = getattr(entry_point, "dist", None)
    if distribution is None:
        return UNPACKAGED_DISTRIBUTION, UNPACKAGED_VERSION
    name = distribution.metadata["Name"] or UNPACKAGED_DISTRIBUTION
    return str(name), str(distribution.version or UNPACKAGED_VERSION)


def _first_line(error: BaseException) -> str:
    """``SyntaxError: invalid syntax (acme.py, line 3)``: the exception's type and first message line.

    pluggy's ``PluginValidationError`` says what is wrong on its last line (the first names the hook), so
    both are kept for it.
    """
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if isinstance(error, pluggy.PluginValidationError) and len(lines) > 1:
        return f"{type(error).__name__}: {lines[0]}: {lines[-1]}"
    return f"{type(error).__name__}: {lines[0]}"


_REPORTED: set[tuple[str, ...]] = set()
"""Load problems of installed packages already reported in this process (see :func:`_warn_once`)."""


def _warn_once(key: tuple[str, ...] | None, message: str) -> None:
    """Warn, unless the problem ``key`` names was reported already in this process.

    A process may build more than one plugin manager (the CLI's command hooks, then the registry): an
    installed package's load problem is one warning per process, not one per manager. ``None`` always warns.
    """
    if key is not None:
        if key in _REPORTED:
            return
        _REPORTED.add(key)
    warn(message)


def _location(entry_point: importlib.metadata.EntryPoint) -> str:
    """The folder holding the entry point's distribution (so one package in two folders is two packages)."""
    distribution = getattr(entry_point, "dist", None)
    try:
        return str(distribution.locate_file("")) if distribution is not None else ""
    except Exception:  # an exotic Distribution without files on disk
        return ""


def _load_entrypoints(manager: QbenchPluginManager) -> None:
    """Import and register each ``qbench`` entry point; a broken or disabled one is skipped, never fatal."""
    disabled = disabled_names()
    matched: set[str] = set()
    installed: set[str] = set()
    locations: set[str] = set()
    for entry_point in _entry_points():
        distribution, version = _distribution_of(entry_point)
        location = _location(entry_point)
        installed.add(distribution)
        locations.add(location)
        names = {normalize_name(distribution), normalize_name(entry_point.name)} & set(disabled)
        if names:  # never imported
            matched |= names
            continue
        name = entry_point.name if entry_point.name not in manager.origins else f"{entry_point.name}@{distribution}"
        origin = PluginOrigin(distribution, version, name, entry_point=True, order=len(manager.origins),
                              location=location)
        key = (origin.location, distribution, version, entry_point.name, entry_point.value)
        try:
            plugin = entry_point.load()
        except Exception as error:  # ImportError, SyntaxError, anything a broken package raises at import
            _warn_once(("import", *key), f"{origin.describe} failed to import ({_first_line(error)}); it is skipped: "
                                         f"fix or uninstall it, or set {DISABLE_ENV}={distribution}")
            continue
        try:
            manager.register_with_origin(plugin, origin)
        except Exception as error:  # pluggy's PluginValidationError (hook arguments), a module registered twice
            _warn_once(("register", *key), f"{origin.describe} failed to register ({_first_line(error)}); it is "
                                           f"skipped: fix or uninstall it, or set {DISABLE_ENV}={distribution}")
    for name in disabled:
        if name not in matched:
            _warn_once(("disable", name, *sorted(locations)), f"{DISABLE_ENV} names {name!r}, which matches no "
                       f"installed qbench plugin (installed: {', '.join(sorted(installed)) or 'none'}); check the spelling")


def _hook_names() -> list[str]:
    """The hook names declared in :mod:`qbench.hookspecs`."""
    return [name for name in vars(hookspecs) if name.startswith(f"{hookspecs.PROJECT_NAME}_")]


def _check_pending(manager: QbenchPluginManager) -> None:
    """One warning per hook implementation whose name matches no hook spec (pluggy would ignore it silently).

    Like pluggy's ``check_pending``, but reporting every one with its package and the closest hook name
    instead of raising on the first. In a built-in plugin it is a bug, so it raises.
    """
    known = _hook_names()
    for hook_name, caller in sorted(vars(manager.hook).items()):
        if hook_name.startswith("_") or not isinstance(caller, pluggy.HookCaller) or caller.has_spec():
            continue
        for implementation in caller.get_hookimpls():
            if implementation.optionalhook:
                continue
            origin = plugin_origin(manager, implementation.plugin)
            close = difflib.get_close_matches(hook_name, known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"the hooks are {', '.join(known)}"
            message = f"{origin.describe}: hook {hook_name!r} is not a qbench hook and is ignored; {hint}"
            if origin.builtin:
                raise RuntimeError(message)
            key = ("hook", origin.location, origin.distribution, origin.version, origin.name, hook_name)
            _warn_once(key if origin.entry_point else None, message)


def plugin_origin(manager: pluggy.PluginManager, plugin: object) -> PluginOrigin:
    """The :class:`PluginOrigin` of a registered plugin (also for a plain pluggy manager built elsewhere)."""
    name = manager.get_name(plugin) or repr(plugin)
    origins: dict[str, PluginOrigin] = getattr(manager, "origins", {})
    if name in origins:
        return origins[name]
    builtin = name.startswith(f"{BUILTIN_SOURCE_PREFIX}:")
    if builtin:
        return PluginOrigin(BUILTIN_DISTRIBUTION, __version__, name, builtin=True)
    for registered, distribution in manager.list_plugin_distinfo():
        if registered is plugin:
            return PluginOrigin(distribution.metadata["name"], distribution.version, name, entry_point=True,
                                order=len(origins) + 1)
    distribution_name, version = _declared_distribution(plugin)
    return PluginOrigin(distribution_name, version, name, order=len(origins) + 1)


def plugin_source(manager: pluggy.PluginManager, plugin: object) -> str:
    """A human-readable source for a registered plugin: ``qbench 0.1.0 (builtin:<module>)``,
    ``qbench-acme 0.2 (acme)``."""
    return plugin_origin(manager, plugin).label
