"""One registry for every plugin kind: validated registration, plugin identity, did-you-mean errors.

Each hook implementation is called separately so that every registered object remembers the plugin (and
so the distribution and version) it came from. What a hook returns is checked before it is registered:
the result must be a list or tuple, and each item the type of its kind (a :class:`~qbench.model.ModelSpec`,
a :class:`~qbench.quant.base.Quantizer` subclass with a known family, a citation and a summary, ...). A
third-party plugin's bad result or bad item is skipped with one warning line naming its distribution and
what to fix; in a built-in plugin it is a bug and raises. Two objects of the same kind and name keep the
first (built-ins first, then third-party packages in sorted distribution order) with one warning naming both
sources. An unknown name says which registered names are close and which exist.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, Mapping, Sequence, TypeVar

import pluggy

from qbench.errors import QbenchError, warn
from qbench.plugins import PluginOrigin, get_plugin_manager, plugin_origin
from qbench.tasks import using_task_types

__all__ = ["Registry", "build_registry"]

T = TypeVar("T")

# kind -> hook name; the order is the order of `qbench list`.
KIND_HOOKS: dict[str, str] = {
    "task_types": "qbench_register_task_types",  # first: suites are parsed with the registered task types
    "models": "qbench_register_models",
    "quantizers": "qbench_register_quantizers",
    "scorers": "qbench_register_scorers",
    "suites": "qbench_register_suites",
    "datasets": "qbench_register_datasets",
    "proxies": "qbench_register_proxies",
}
SINGULAR = {
    "task_types": "task type",
    "models": "model",
    "quantizers": "quantizer",
    "scorers": "scorer",
    "suites": "suite",
    "datasets": "dataset",
    "proxies": "proxy source",
}


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered object with its name, the plugin that registered it and that plugin's distribution.

    ``source`` is the plugin's registration name (``builtin:<module>``, an entry-point name, ...);
    ``distribution`` and ``version`` identify the package (``qbench`` and its version for built-ins).
    """

    name: str
    value: T
    source: str
    distribution: str
    version: str
    builtin: bool = False

    @property
    def identity(self) -> str:
        """``dist==version``: the pin a run's configuration records for a third-party item."""
        return f"{self.distribution}=={self.version}"

    @property
    def label(self) -> str:
        """``qbench-acme 0.2 (acme)``: the source as ``qbench list`` shows it."""
        return f"{self.distribution} {self.version} ({self.source})"


class Registry:
    """All registered task types, models, quantizers, scorers, suites, datasets and proxy sources."""

    def __init__(self, entries: dict[str, dict[str, Entry]]) -> None:
        self._entries = entries

    def entries(self, kind: str) -> list[Entry]:
        """Every entry of ``kind``, sorted by name."""
        return sorted(self._entries[_check_kind(kind)].values(), key=lambda entry: entry.name)

    def names(self, kind: str) -> list[str]:
        """The registered names of ``kind``, sorted."""
        return [entry.name for entry in self.entries(kind)]

    def entry(self, kind: str, name: str) -> Entry:
        """The entry of ``kind`` called ``name``; an unknown name is a one-line error with close matches."""
        table = self._entries[_check_kind(kind)]
        if name in table:
            return table[name]
        raise QbenchError(unknown_name_message(SINGULAR[kind], name, list(table), f"qbench list {kind}"))

    def find(self, kind: str, name: str) -> Entry | None:
        """The entry of ``kind`` called ``name``, or None (no error) when nothing is registered under it."""
        return self._entries[_check_kind(kind)].get(name)

    def get(self, kind: str, name: str) -> Any:
        """The registered object of ``kind`` called ``name``."""
        return self.entry(kind, name).value

    def identity(self, kind: str, name: str) -> str:
        """``dist==version`` of the package that registered ``name`` (``qbench==0.1.0`` for built-ins)."""
        return self.entry(kind, name).identity

    def __iter__(self) -> Iterator[str]:
        return iter(KIND_HOOKS)


def plugin_identities(registry: Registry, used: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """``{"<kind>:<name>": "dist==version"}`` for every item a run uses that is not built-in.

    Built-ins are pinned by the config's ``qbench_version`` already, so a run using only built-ins gets an
    empty mapping (and its config hash stays what it was); a third-party item's version enters the hash, so
    version 0.2 of a plugin is never served version 0.1's stored results. Names not registered under
    ``kind`` (a task type string no plugin registers) are skipped.
    """
    identities: dict[str, str] = {}
    for kind, names in used.items():
        for name in dict.fromkeys(names):
            entry = registry.find(kind, name)
            if entry is not None and not entry.builtin:
                identities[f"{kind}:{name}"] = entry.identity
    return dict(sorted(identities.items()))


def unknown_name_message(what: str, name: str, available: list[str], listing_command: str) -> str:
    """``unknown model 'x'; did you mean 'y'? (available: a, b; see qbench list models)``."""
    close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(candidate) for candidate in close)}?" if close else ""
    listed = ", ".join(sorted(available)) or "none registered"
    return f"unknown {what} {name!r}{hint} (available: {listed}; see '{listing_command}')"


def _check_kind(kind: str) -> str:
    """``kind`` itself, or a one-line error naming the plugin kinds."""
    if kind not in KIND_HOOKS:
        raise QbenchError(unknown_name_message("plugin kind", kind, list(KIND_HOOKS), "qbench list --help"))
    return kind


class PluginContractError(RuntimeError):
    """A built-in plugin registered something that breaks the plugin contract: a qbench bug, not a user error."""


def build_registry(manager: pluggy.PluginManager | None = None) -> Registry:
    """Call every hook implementation, validate what it returns and index the valid objects by kind and name.

    Implementations run built-ins first, then the other plugins in load order, so that on a name registered
    twice the built-in (or the first package in sorted distribution order) is kept.
    """
    manager = manager if manager is not None else get_plugin_manager()
    entries: dict[str, dict[str, Entry]] = {}
    for kind, hook_name in KIND_HOOKS.items():
        table: dict[str, Entry] = {}
        with using_task_types({name: entry.value for name, entry in entries.get("task_types", {}).items()}):
            implementations = [(plugin_origin(manager, implementation.plugin), implementation)
                               for implementation in getattr(manager.hook, hook_name).get_hookimpls()]
            implementations.sort(key=lambda pair: (not pair[0].builtin, pair[0].order))
            for origin, implementation in implementations:
                for name, value in _registered(implementation, kind, origin):
                    _add(table, kind, Entry(name, value, origin.name, origin.distribution, origin.version,
                                            origin.builtin), origin)
        entries[kind] = table
    return Registry(entries)


def _problem(origin: PluginOrigin, message: str) -> None:
    """Report a plugin that breaks the contract: a warning for a third-party plugin, an error for a built-in."""
    if origin.builtin:
        raise PluginContractError(f"{origin.describe}: {message}")
    warn(f"{origin.describe}: {message}")


def _registered(implementation: Any, kind: str, origin: PluginOrigin) -> list[tuple[str, Any]]:
    """The valid ``(name, object)`` pairs one hook implementation registers.

    A plugin whose hook fails (a malformed suite file it loads, a broken third-party package) or returns
    something other than a list or tuple is reported in one warning line and contributes nothing of that
    kind, instead of disabling every command; each invalid item is skipped with its own warning. A failing
    built-in hook that is not a user error, or a built-in that breaks the contract, is a bug and raises.
    """
    try:
        result = implementation.function()
    except QbenchError as error:
        problem = str(error)
    except Exception as error:
        if origin.builtin:
            raise
        problem = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    else:
        if isinstance(result, (list, tuple)):
            return [(name, value) for name, value in (_validated(value, kind, origin) for value in result)
                    if name is not None]
        _problem(origin, f"{implementation.function.__name__} returned {_short(result)}, not a list; return a list "
                         f"of {_EXPECTED[kind]} — its {kind.replace('_', ' ')} are skipped")
        return []
    warn(f"{origin.describe} could not register its {kind.replace('_', ' ')} ({problem}); they are skipped "
         "until it is fixed")
    return []


def _short(value: Any) -> str:
    """A short description of a wrong hook result: the class it is, or its type and a clipped repr."""
    if isinstance(value, type):
        return f"the class {value.__module__}.{value.__qualname__}"
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"a {type(value).__name__} ({text})"


def _validated(value: Any, kind: str, origin: PluginOrigin) -> tuple[str | None, Any]:
    """``(name, value)`` when ``value`` is a valid object of ``kind``; ``(None, value)`` after reporting why not."""
    what = SINGULAR[kind]
    name = getattr(value, "name", None)
    label = f"{what} {name!r}" if isinstance(name, str) and name else f"{what} {_short(value)}"
    problem = _CHECKS[kind](value)
    if problem is None and (not isinstance(name, str) or not name.strip()):
        problem = "has no name; set a non-empty name string"
    if problem is None:
        return name, value
    _problem(origin, f"{label} {problem} — skipped")
    return None, value


def _instance_of(cls_path: str) -> Callable[[Any], str | None]:
    """A check that the item is an instance of ``module:Class`` (the spec dataclasses)."""
    def check(value: Any) -> str | None:
        expected = _resolve(cls_path)
        if isinstance(value, expected):
            return None
        return f"is not a {expected.__module__}.{expected.__name__}; register {expected.__name__}(...) instances"
    return check


def _resolve(cls_path: str) -> type:
    """Import ``module:Class`` lazily (the registry module stays cheap to import)."""
    import importlib

    module_name, _, class_name = cls_path.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def _text_problem(value: Any, attribute: str) -> str | None:
    """Why a class attribute that must be a non-empty string is not, or None."""
    text = getattr(value, attribute, None)
    if not isinstance(text, str) or not text.strip():
        return f"has no {attribute}; set {attribute} to a non-empty string"
    return None


def _config_problem(value: Any, base_path: str) -> str | None:
    """Why ``value.Config`` is not a subclass of the kind's config base, or None."""
    base = _resolve(base_path)
    config = getattr(value, "Config", None)
    if not isinstance(config, type) or not issubclass(config, base):
        return f"has Config {config!r}; make Config a subclass of {base.__name__}"
    return None


def _subclass_problem(value: Any, base_path: str) -> str | None:
    """Why ``value`` is not a subclass (a class, not an instance) of ``base_path``, or None."""
    base = _resolve(base_path)
    if isinstance(value, type) and issubclass(value, base):
        return None
    if isinstance(value, base):
        return f"is an instance; register the class {type(value).__name__} itself, a subclass of {base.__name__}"
    return f"is not a subclass of {base.__module__}.{base.__name__}; subclass {base.__name__}"


def _check_quantizer(value: Any) -> str | None:
    """The quantizer contract: a Quantizer subclass with a known family, citation, summary, Config and flags."""
    problem = _subclass_problem(value, "qbench.quant.base:Quantizer")
    if problem:
        return problem
    from qbench.quant.base import FAMILIES

    family = getattr(value, "family", None)
    if family not in FAMILIES:
        return f"has family {family!r}; use one of {', '.join(FAMILIES)}"
    for attribute in ("citation", "summary"):
        problem = _text_problem(value, attribute)
        if problem:
            return problem
    for flag in ("needs_data", "needs_grad"):
        if not isinstance(getattr(value, flag, None), bool):
            return f"has {flag} = {getattr(value, flag, None)!r}; set it to True or False"
    return _config_problem(value, "qbench.quant.base:QuantizerConfig")


def _check_scorer(value: Any) -> str | None:
    """The scorer contract: a Scorer subclass with a citation, a summary and a ScorerConfig Config."""
    problem = _subclass_problem(value, "qbench.scoring:Scorer")
    if problem:
        return problem
    for attribute in ("citation", "summary"):
        problem = _text_problem(value, attribute)
        if problem:
            return problem
    return _config_problem(value, "qbench.scoring:ScorerConfig")


def _check_task_type(value: Any) -> str | None:
    """The task-type contract as far as registration goes: a TaskType subclass (its name is checked after)."""
    return _subclass_problem(value, "qbench.tasks:TaskType")


_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "task_types": _check_task_type,
    "models": _instance_of("qbench.model:ModelSpec"),
    "quantizers": _check_quantizer,
    "scorers": _check_scorer,
    "suites": _instance_of("qbench.suites:SuiteSpec"),
    "datasets": _instance_of("qbench.data:DatasetSpec"),
    "proxies": _instance_of("qbench.data:ProxySpec"),
}
_EXPECTED: dict[str, str] = {
    "task_types": "TaskType subclasses",
    "models": "ModelSpec objects",
    "quantizers": "Quantizer subclasses",
    "scorers": "Scorer subclasses",
    "suites": "SuiteSpec objects",
    "datasets": "DatasetSpec objects",
    "proxies": "ProxySpec objects",
}


def _add(table: dict[str, Entry], kind: str, entry: Entry, origin: PluginOrigin) -> None:
    """Register ``entry`` unless its name is taken: then keep the first, warning once with both sources."""
    if entry.name in table:
        first = table[entry.name]
        message = (f"{SINGULAR[kind]} {entry.name!r} is registered twice: by {first.label} and by {entry.label}; "
                   f"the one from {first.distribution} is kept — rename one or uninstall one of the packages")
        if origin.builtin:
            raise PluginContractError(message)
        warn(message)
        return
    table[entry.name] = entry


@functools.cache
def shared_registry() -> Registry:
    """The process's registry with every installed plugin, built once and shared by the CLI's commands and a sweep
    worker's units (``shared_registry.cache_clear()`` rebuilds it)."""
    return build_registry()
