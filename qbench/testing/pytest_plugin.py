"""The ``qbench`` pytest plugin (entry point ``pytest11``): ``pytest --qbench-conformance``.

Without its options the plugin adds two command-line flags and does nothing else; it imports nothing beyond
pytest and the standard library, so every pytest run in an environment with qbench installed stays as it was.

``--qbench-conformance`` adds the kit's test module (:mod:`qbench.testing.conformance_tests`) to the collection
(by adding the kit's folder to pytest's arguments), whatever the current folder holds (an empty folder works):
one test per installed plugin item that is not built into qbench, found through the ``qbench`` entry-point group
exactly as the CLI finds it, with ids such as ``quantizer:acme-ptq``. ``--qbench-conformance-builtins`` checks
qbench's built-in items too. With nothing to check, the run shows one skipped test saying so; the author's own
tests are collected as usual beside them.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import pytest

CONFORMANCE_OPTION = "--qbench-conformance"
BUILTINS_OPTION = "--qbench-conformance-builtins"
TEST_MODULE = Path(__file__).resolve().with_name("conformance_tests.py")
"""The test module the flags add to the collection."""

_SELECTION = pytest.StashKey[tuple[Any, list, str]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the two flags (off by default)."""
    group = parser.getgroup("qbench", "qbench plugin conformance (qbench.testing)")
    group.addoption(CONFORMANCE_OPTION, action="store_true", default=False, dest="qbench_conformance",
                    help="run qbench's conformance checks on every installed third-party qbench plugin item")
    group.addoption(BUILTINS_OPTION, action="store_true", default=False, dest="qbench_conformance_builtins",
                    help=f"with or without {CONFORMANCE_OPTION}: check qbench's built-in plugin items too")


def enabled(config: pytest.Config) -> bool:
    """Whether this run checks conformance (either flag given)."""
    return bool(config.getoption("qbench_conformance", False) or config.getoption("qbench_conformance_builtins", False))


def pytest_configure(config: pytest.Config) -> None:
    """With a flag: add the kit's folder to the collection arguments (nothing happens without one); only its
    test module is collected there (:func:`pytest_ignore_collect`), with ids ``conformance_tests.py::...``."""
    if not enabled(config):
        return
    config.addinivalue_line("markers", "qbench_conformance: a qbench plugin conformance check (qbench.testing)")
    given = {Path(arg.split("::")[0]).resolve() for arg in config.args if arg}
    if not given & {TEST_MODULE, TEST_MODULE.parent}:
        config.args.append(str(TEST_MODULE.parent))


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """In the kit's folder, collect the test module only (never the kit's other modules, whatever the
    project's ``python_files`` pattern); elsewhere leave the decision to pytest."""
    if enabled(config) and collection_path.resolve().parent == TEST_MODULE.parent:
        return collection_path.resolve() != TEST_MODULE
    return None


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    """Collect the kit's module when a directory walk meets it and pytest itself would not: its name does
    not match the default ``test_*.py``; pytest collects it as an explicit argument or under a project's
    ``python_files`` pattern that matches it."""
    if not enabled(parent.config) or file_path.resolve() != TEST_MODULE or parent.session.isinitpath(file_path):
        return None
    if any(fnmatch.fnmatch(file_path.name, pattern) for pattern in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def selection(config: pytest.Config) -> tuple[Any, list, str]:
    """``(registry, [(kind, entry), ...], problem)`` for this run, built once: the registry with entry points
    (discovery, as the CLI does), the items to check, and a one-line problem when the registry cannot be
    built (a broken plugin), else ``""``."""
    if _SELECTION not in config.stash:
        from qbench.errors import QbenchError
        from qbench.registry import build_registry
        from qbench.testing.conformance import conformance_entries

        try:
            registry = build_registry()
        except QbenchError as error:
            config.stash[_SELECTION] = (None, [], f"the qbench plugin registry cannot be built: {error}")
        else:
            include = bool(config.getoption("qbench_conformance_builtins", False))
            config.stash[_SELECTION] = (registry, conformance_entries(registry, include_builtins=include), "")
    return config.stash[_SELECTION]


def pytest_report_header(config: pytest.Config) -> str | None:
    """One header line naming what is checked (only with a flag)."""
    if not enabled(config):
        return None
    _, items, problem = selection(config)
    scope = "third-party and built-in" if config.getoption("qbench_conformance_builtins", False) else "third-party"
    return f"qbench conformance: {problem or f'{len(items)} {scope} plugin item(s) to check'}"
