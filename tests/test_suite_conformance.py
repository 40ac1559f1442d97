"""Every built-in suite through the conformance kit (:func:`qbench.testing.check_suite`): a positive integer
version, and every dataset, scorer and task type it names registered. Broken suites fail with one readable line."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from qbench.errors import QbenchError
from qbench.plugins import get_plugin_manager
from qbench.registry import build_registry
from qbench.suites import parse_suite
from qbench.testing import ConformanceError, check_suite

REGISTRY = build_registry(get_plugin_manager(load_entrypoints=False))
SUITES = REGISTRY.names("suites")


@pytest.mark.parametrize("name", SUITES)
def test_builtin_suite_conforms(name):
    check_suite(REGISTRY.get("suites", name), REGISTRY)


def test_every_builtin_suite_is_checked():
    assert {"toy-id", "toy-ood"} <= set(SUITES)


def toy_suite(**task) -> object:
    """A one-task suite parsed as a plugin would parse its YAML."""
    return parse_suite({"name": "acme-suite", "version": 1, "description": "test", "tasks": [task]})


def test_a_parsed_suite_over_registered_items_passes():
    suite = toy_suite(type="ood", id_dataset="toy-id-test", ood_datasets=[{"dataset": "toy-ood-far", "kind": "far"}],
                      scorers=["msp"])
    check_suite(suite, REGISTRY)


@pytest.mark.parametrize("task, message", [
    ({"type": "zeroshot", "dataset": "toy-id-tset", "metrics": ["accuracy"]}, "names dataset\\(s\\) 'toy-id-tset'"),
    ({"type": "ood", "id_dataset": "toy-id-test", "ood_datasets": [{"dataset": "toy-ood-far", "kind": "far"}],
      "scorers": ["msp", "acme-score"]}, "names scorer\\(s\\) 'acme-score' that no installed plugin registers"),
], ids=["unknown-dataset", "unknown-scorer"])
def test_unregistered_names_fail(task, message):
    with pytest.raises(ConformanceError, match=message) as raised:
        check_suite(toy_suite(**task), REGISTRY)
    assert str(raised.value).startswith("suite 'acme-suite': ") and "\n" not in str(raised.value)


@pytest.mark.parametrize("version", [0, -1, True, "1", 1.0])
def test_a_version_that_is_not_a_positive_integer_fails(version):
    suite = dataclasses.replace(REGISTRY.get("suites", "toy-id"), version=version)
    with pytest.raises(ConformanceError, match="version must be a positive integer"):
        check_suite(suite, REGISTRY)


def test_a_suite_without_tasks_fails():
    with pytest.raises(ConformanceError, match="at least one task"):
        check_suite(dataclasses.replace(REGISTRY.get("suites", "toy-id"), tasks=()), REGISTRY)


def test_an_unregistered_task_type_fails():
    try:
        registered = REGISTRY.names("task_types")
    except QbenchError:
        registered = []
    if not registered:
        pytest.skip("this registry has no task types")
    task = SimpleNamespace(type="top5", dataset="toy-id-test", datasets=("toy-id-test",))
    suite = dataclasses.replace(REGISTRY.get("suites", "toy-id"), tasks=(task,))
    with pytest.raises(ConformanceError, match="top5"):
        check_suite(suite, REGISTRY)
