"""Suite YAML parsing and validation."""

import pytest

from qbench.errors import QbenchError
from qbench.suites import load_suite, load_suite_dir, parse_suite
from qbench_benchmarks import SUITE_DIR


def test_shipped_suites_parse_and_are_versioned():
    suites = {suite.name: suite for suite in load_suite_dir(SUITE_DIR)}
    assert "toy-id" in suites
    toy = suites["toy-id"]
    assert toy.version >= 1
    assert toy.datasets == ("toy-id-test",)
    assert toy.tasks[0].metrics == ("accuracy", "ece", "nll")


@pytest.mark.parametrize(
    "raw, problem",
    [
        ([], "expected a mapping"),
        ({"name": "x", "tasks": [{"dataset": "d"}]}, "missing field(s) version"),
        ({"name": "x", "version": "one", "tasks": [{"dataset": "d"}]}, "version must be a positive integer"),
        ({"name": "x", "version": 1, "tasks": []}, "tasks must be a non-empty list"),
        ({"name": "x", "version": 1, "tasks": [{"type": "zeroshot"}]}, "each task needs"),
        ({"name": "x", "version": 1, "tasks": [{"dataset": "d", "type": "captioning"}]}, "unknown task type"),
        ({"name": "x", "version": 1, "tasks": [{"dataset": "d", "metrics": ["acc"]}]}, "unknown metric(s) acc"),
    ],
)
def test_malformed_suites_name_the_problem(raw, problem):
    with pytest.raises(QbenchError) as caught:
        parse_suite(raw, source="s.yaml")
    assert problem in str(caught.value)
    assert str(caught.value).startswith("suite s.yaml: ")


def test_unreadable_yaml_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(QbenchError, match="cannot read suite file") as caught:
        load_suite(path)
    assert "\n" not in str(caught.value)
