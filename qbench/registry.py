"""One registry for every plugin kind, with collision and did-you-mean errors.

Each hook implementation is called separately so that every registered object remembers the plugin it
came from; two objects of the same kind and name are an error naming both sources; an unknown name
says which registered names are close and which exist.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Generic, Iterator, TypeVar

import pluggy

from qbench.errors import QbenchError, warn
from qbench.plugins import BUILTIN_SOURCE_PREFIX, get_plugin_manager, plugin_source

T = TypeVar("T")

# kind -> hook name; the order is the order of `qbench list`.
KIND_HOOKS: dict[str, str] = {
    "models": "qbench_register_models",
    "quantizers": "qbench_register_quantizers",
    "scorers": "qbench_register_scorers",
    "suites": "qbench_register_suites",
    "datasets": "qbench_register_datasets",
    "proxies": "qbench_register_proxies",
}
SINGULAR = {
    "models": "model",
    "quantizers": "quantizer",
    "scorers": "scorer",
    "suites": "suite",
    "datasets": "dataset",
    "proxies": "proxy source",
}


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered object with its name and the plugin that registered it."""

    name: str
    value: T
    source: str


class Registry:
    """All registered models, quantizers, scorers, suites, datasets and proxy sources."""

    def __init__(self, entries: dict[str, dict[str, Entry]]) -> None:
        self._entries = entries

    def entries(self, kind: str) -> list[Entry]:
        return sorted(self._entries[_check_kind(kind)].values(), key=lambda entry: entry.name)

    def names(self, kind: str) -> list[str]:
        return [entry.name for entry in self.entries(kind)]

    def entry(self, kind: str, name: str) -> Entry:
        table = self._entries[_check_kind(kind)]
        if name in table:
            return table[name]
        raise QbenchError(unknown_name_message(SINGULAR[kind], name, list(table), f"qbench list {kind}"))

    def get(self, kind: str, name: str) -> Any:
        return self.entry(kind, name).value

    def __iter__(self) -> Iterator[str]:
        return iter(KIND_HOOKS)


def unknown_name_message(what: str, name: str, available: list[str], listing_command: str) -> str:
    """``unknown model 'x'; did you mean 'y'? (available: a, b; see qbench list models)``."""
    close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(candidate) for candidate in close)}?" if close else ""
    listed = ", ".join(sorted(available)) or "none registered"
    return f"unknown {what} {name!r}{hint} (available: {listed}; see '{listing_command}')"


def _check_kind(kind: str) -> str:
    if kind not in KIND_HOOKS:
        raise QbenchError(unknown_name_message("plugin kind", kind, list(KIND_HOOKS), "qbench list --help"))
    return kind


def build_registry(manager: pluggy.PluginManager | None = None) -> Registry:
    """Call every hook implementation and index its objects by kind and name."""
    manager = manager if manager is not None else get_plugin_manager()
    entries: dict[str, dict[str, Entry]] = {}
    for kind, hook_name in KIND_HOOKS.items():
        table: dict[str, Entry] = {}
        for implementation in getattr(manager.hook, hook_name).get_hookimpls():
            source = plugin_source(manager, implementation.plugin)
            for value in _registered(implementation, kind, source):
                _add(table, kind, Entry(_name_of(value, kind, source), value, source))
        entries[kind] = table
    return Registry(entries)


def _registered(implementation: Any, kind: str, source: str) -> list[Any]:
    """What one hook implementation registers; a plugin whose hook fails (a malformed suite file it loads, a
    broken third-party package) is reported in one warning line and contributes nothing of that kind, instead
    of disabling every command. A failing built-in hook that is not a user error is a bug and still raises."""
    try:
        return list(implementation.function() or [])
    except QbenchError as error:
        problem = str(error)
    except Exception as error:
        if source.startswith(BUILTIN_SOURCE_PREFIX):
            raise
        problem = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    warn(f"plugin {source} could not register its {kind} ({problem}); they are skipped until it is fixed")
    return []


def _name_of(value: Any, kind: str, source: str) -> str:
    name = getattr(value, "name", None)
    if not isinstance(name, str) or not name:
        raise QbenchError(f"plugin {source} registered a {SINGULAR[kind]} without a name: {value!r}")
    return name


def _add(table: dict[str, Entry], kind: str, entry: Entry) -> None:
    if entry.name in table:
        first = table[entry.name].source
        raise QbenchError(
            f"{SINGULAR[kind]} name {entry.name!r} is registered twice: by {first} and by {entry.source}; "
            "rename one or uninstall one of the packages"
        )
    table[entry.name] = entry
