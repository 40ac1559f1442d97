"""Declarative benchmark suites: versioned YAML files naming datasets and metrics.

A suite file looks like::

    name: toy-id
    version: 1
    description: Zero-shot accuracy and calibration on the toy world's ID test split.
    tasks:
      - type: zeroshot
        dataset: toy-id-test
        metrics: [accuracy, ece, nll]
      - type: ood
        id_dataset: toy-id-test
        ood_datasets:
          - {dataset: toy-ood-near, kind: near}
          - {dataset: toy-ood-far, kind: far}
        scorers: [msp, mcm]            # omitted: every registered scorer
        metrics: [auroc, fpr95]        # omitted: auroc, fpr95, aupr_in, aupr_out

The version is part of every result's configuration hash, so changing what a suite measures means
bumping it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from qbench.errors import QbenchError

TASK_TYPES = ("zeroshot", "ood")
ZEROSHOT_METRICS = ("accuracy", "ece", "nll")
OOD_KINDS = ("near", "far")
DEFAULT_OOD_METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out")


@dataclass(frozen=True)
class TaskSpec:
    """Zero-shot classification on one dataset, with a list of metrics."""

    type: str
    dataset: str
    metrics: tuple[str, ...]

    @property
    def datasets(self) -> tuple[str, ...]:
        return (self.dataset,)


@dataclass(frozen=True)
class OODTarget:
    """One OOD split of a pair and whether it is near- or far-OOD for the ID set."""

    dataset: str
    kind: str = "far"


@dataclass(frozen=True)
class OODTaskSpec:
    """OOD detection: one ID split against several OOD splits, every scorer on every pair.

    ``scorers`` empty means every registered scorer (or the ``--scorer`` selection); the ID split's
    features are computed once and shared by all pairs.
    """

    id_dataset: str
    targets: tuple[OODTarget, ...]
    scorers: tuple[str, ...] = ()
    metrics: tuple[str, ...] = DEFAULT_OOD_METRICS
    type: str = "ood"

    @property
    def datasets(self) -> tuple[str, ...]:
        return (self.id_dataset, *(target.dataset for target in self.targets))


@dataclass(frozen=True)
class SuiteSpec:
    """A parsed suite: name, version, description, tasks, and the file it came from."""

    name: str
    version: int
    description: str
    tasks: tuple[TaskSpec | OODTaskSpec, ...]
    source: str = ""

    @property
    def datasets(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for task in self.tasks for name in task.datasets))

    @property
    def scorers(self) -> tuple[str, ...]:
        """Scorers named by the suite's OOD tasks (empty: the suite defers to every registered scorer)."""
        return tuple(dict.fromkeys(name for task in self.tasks if task.type == "ood" for name in task.scorers))


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


def _parse_task(raw: object, fail) -> TaskSpec | OODTaskSpec:
    if not isinstance(raw, dict):
        raise fail(f"each task must be a mapping, got {raw!r}")
    task_type = raw.get("type", "zeroshot")
    if task_type not in TASK_TYPES:
        raise fail(f"unknown task type {task_type!r} (available: {', '.join(TASK_TYPES)})")
    if task_type == "ood":
        return _parse_ood_task(raw, fail)
    if "dataset" not in raw:
        raise fail(f"each task needs a type and a dataset, got {raw!r}")
    metrics = _names(raw.get("metrics", ZEROSHOT_METRICS), "metrics", fail)
    _check_known(metrics, ZEROSHOT_METRICS, "metric", fail)
    return TaskSpec(type=task_type, dataset=str(raw["dataset"]), metrics=metrics)


def _parse_ood_task(raw: dict, fail) -> OODTaskSpec:
    from qbench.ood_metrics import OOD_METRICS

    if "id_dataset" not in raw or not raw.get("ood_datasets"):
        raise fail("an ood task needs id_dataset and a non-empty ood_datasets list")
    if not isinstance(raw["ood_datasets"], list):
        raise fail("ood_datasets must be a list of {dataset: NAME, kind: near|far}")
    targets = tuple(_parse_target(item, fail) for item in raw["ood_datasets"])
    metrics = _names(raw.get("metrics", DEFAULT_OOD_METRICS), "metrics", fail)
    _check_known(metrics, OOD_METRICS, "metric", fail)
    return OODTaskSpec(
        id_dataset=str(raw["id_dataset"]),
        targets=targets,
        scorers=_names(raw.get("scorers", ()), "scorers", fail),
        metrics=metrics,
    )


def _parse_target(raw: object, fail) -> OODTarget:
    if isinstance(raw, str):
        return OODTarget(raw)
    if not isinstance(raw, dict) or "dataset" not in raw:
        raise fail(f"each ood_datasets entry needs a dataset (and kind near|far), got {raw!r}")
    kind = str(raw.get("kind", "far"))
    if kind not in OOD_KINDS:
        raise fail(f"ood kind must be near or far, got {kind!r} for {raw['dataset']}")
    return OODTarget(str(raw["dataset"]), kind)


def _names(raw: object, field: str, fail) -> tuple[str, ...]:
    if isinstance(raw, str) or not isinstance(raw, (list, tuple)):
        raise fail(f"{field} must be a list, got {raw!r}")
    return tuple(str(item) for item in raw)


def _check_known(names: tuple[str, ...], known: tuple[str, ...], what: str, fail) -> None:
    unknown = [name for name in names if name not in known]
    if unknown:
        raise fail(f"unknown {what}(s) {', '.join(unknown)} (available: {', '.join(known)})")


def load_suite_dir(folder: Path) -> list[SuiteSpec]:
    """Every ``*.yaml`` suite directly inside ``folder``, sorted by file name."""
    return [load_suite(path) for path in sorted(folder.glob("*.yaml"))]
