"""Declarative benchmark suites: versioned YAML files naming datasets and metrics.

A suite file looks like::

    name: toy-id
    version: 1
    description: Zero-shot accuracy and calibration on the toy world's ID test split.
    tasks:
      - type: zeroshot
        dataset: toy-id-test
        metrics: [accuracy, ece, nll]

The version is part of every result's configuration hash, so changing what a suite measures means
bumping it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from qbench.errors import QbenchError

TASK_TYPES = ("zeroshot",)
ZEROSHOT_METRICS = ("accuracy", "ece", "nll")


@dataclass(frozen=True)
class TaskSpec:
    """One measurement of a suite: a task type on a dataset with a list of metrics."""

    type: str
    dataset: str
    metrics: tuple[str, ...]


@dataclass(frozen=True)
class SuiteSpec:
    """A parsed suite: name, version, description, tasks, and the file it came from."""

    name: str
    version: int
    description: str
    tasks: tuple[TaskSpec, ...]
    source: str = ""

    @property
    def datasets(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(task.dataset for task in self.tasks))


def load_suite(path: Path) -> SuiteSpec:
    """Parse and validate one suite YAML file; problems are one-line errors naming the file and field."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise QbenchError(f"cannot read suite file {path}: {str(error).splitlines()[0]}") from None
    return parse_suite(raw, source=str(path))


def parse_suite(raw: object, source: str = "<memory>") -> SuiteSpec:
    def fail(problem: str) -> QbenchError:
        return QbenchError(f"suite {source}: {problem}")

    if not isinstance(raw, dict):
        raise fail("expected a mapping with name, version, description and tasks")
    missing = [key for key in ("name", "version", "tasks") if key not in raw]
    if missing:
        raise fail(f"missing field(s) {', '.join(missing)}")
    if not isinstance(raw["version"], int) or raw["version"] < 1:
        raise fail(f"version must be a positive integer, got {raw['version']!r}")
    if not isinstance(raw["tasks"], list) or not raw["tasks"]:
        raise fail("tasks must be a non-empty list")
    tasks = tuple(_parse_task(task, fail) for task in raw["tasks"])
    return SuiteSpec(
        name=str(raw["name"]),
        version=raw["version"],
        description=str(raw.get("description", "")),
        tasks=tasks,
        source=source,
    )


def _parse_task(raw: object, fail) -> TaskSpec:
    if not isinstance(raw, dict) or "dataset" not in raw:
        raise fail(f"each task needs a type and a dataset, got {raw!r}")
    task_type = raw.get("type", "zeroshot")
    if task_type not in TASK_TYPES:
        raise fail(f"unknown task type {task_type!r} (available: {', '.join(TASK_TYPES)})")
    metrics = tuple(raw.get("metrics", ZEROSHOT_METRICS))
    unknown = [metric for metric in metrics if metric not in ZEROSHOT_METRICS]
    if unknown:
        raise fail(f"unknown metric(s) {', '.join(unknown)} (available: {', '.join(ZEROSHOT_METRICS)})")
    return TaskSpec(type=task_type, dataset=str(raw["dataset"]), metrics=metrics)


def load_suite_dir(folder: Path) -> list[SuiteSpec]:
    """Every ``*.yaml`` suite directly inside ``folder``, sorted by file name."""
    return [load_suite(path) for path in sorted(folder.glob("*.yaml"))]
