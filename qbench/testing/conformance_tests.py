"""The tests ``pytest --qbench-conformance`` adds: one per installed plugin item, e.g. ``quantizer:acme-ptq``.

Collected only through :mod:`qbench.testing.pytest_plugin`. Each test runs the kit's check of its kind
(:func:`qbench.testing.conformance.check_entry`); a failure is the check's one-line message, a
:class:`~qbench.testing.conformance.ConformanceSkip` a skip with its reason. With nothing to check, one
skipped test says so.
"""

from __future__ import annotations

from typing import Any

import pytest

from qbench.testing import pytest_plugin

NOTHING_INSTALLED = (
    "no third-party qbench plugin item is installed (entry-point group 'qbench'): nothing to check; install your "
    "package (pip install -e .) or pass --qbench-conformance-builtins to check qbench's own"
)

pytestmark = pytest.mark.qbench_conformance


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``qbench_item`` over the selected ``(kind, entry)`` pairs, with ``kind:name`` ids."""
    if "qbench_item" not in metafunc.fixturenames:
        return
    from qbench.testing.conformance import entry_id

    _, items, problem = pytest_plugin.selection(metafunc.config)
    if problem:
        metafunc.parametrize("qbench_item", [pytest.param(("error", problem), id="registry")])
    elif not items:
        metafunc.parametrize("qbench_item", [pytest.param(("none", NOTHING_INSTALLED), id="no-third-party-plugins")])
    else:
        metafunc.parametrize("qbench_item", items, ids=[entry_id(kind, entry) for kind, entry in items])


def test_conformance(qbench_item: tuple[str, Any], request: pytest.FixtureRequest, tmp_path) -> None:
    """The kit's conformance check of one registered item."""
    from qbench.testing.conformance import ConformanceError, ConformanceSkip, check_entry

    kind, entry = qbench_item
    if kind == "error":
        pytest.fail(entry, pytrace=False)
    if kind == "none":
        pytest.skip(entry)
    registry, _, _ = pytest_plugin.selection(request.config)
    skipped = failed = ""
    try:
        check_entry(kind, entry, registry, folder=tmp_path)
    except ConformanceSkip as reason:
        skipped = str(reason)
    except ConformanceError as problem:
        failed = str(problem)
    if failed:  # the check's own line says it all: no traceback through the kit, no chained exception
        pytest.fail(failed, pytrace=False)
    if skipped:
        pytest.skip(skipped)
