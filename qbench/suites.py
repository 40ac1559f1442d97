"""Declarative benchmark suites: versioned YAML files naming datasets and metrics.

A suite file looks like::

    name: my-suite
    version: 1
    description: Zero-shot accuracy and calibration on my ID test split.
    tasks:
      - type: zeroshot
        dataset: my-id-test
        metrics: [accuracy, ece, nll]
      - type: ood
        id_dataset: my-id-test
        ood_datasets:
          - {dataset: my-ood-near, kind: near}
          - {dataset: my-ood-far, kind: far}
        scorers: [SCORER_A, SCORER_B]  # omitted: the task type's default scorers
        metrics: [auroc, fpr95]        # omitted: auroc, fpr95, aupr_in, aupr_out
      - type: robustness               # accuracy under shift, relative change, shift detection
        clean_dataset: my-id-test
        shifted_datasets: [my-shift-contrast, my-shift-brightness]
        metrics: [accuracy]            # zero-shot metrics on the clean and every shifted set
        detection: true                # clean as ID vs each shifted set as OOD, same default scorers
        detection_metrics: [auroc, fpr95]
      - type: spurious                 # accuracy on common / counter backgrounds, RSG, ΔRSG, V_add
        common_dataset: my-spurious-common
        counter_dataset: my-spurious-counter
      - type: spectral                 # scoring.md §3 on penultimate features and patch tokens
        dataset: my-id-test
        analyses: [fixed, adaptive, fourier]
        max_images: 5000               # SVD images (first per class); fourier_images: 1000
      - type: dropout                  # scoring.md §4 weight-dropout redundancy probe of the FP32 model
        dataset: my-id-test
        rates: [0.05, 0.1, 0.2, 0.3]
        repeats: 3
        towers: [visual, text]

The version is part of every result's configuration hash, so changing what a suite measures means
bumping it.

What each entry of ``tasks:`` means is up to its task type (:mod:`qbench.tasks`): this module parses the
suite itself (name, version, description, the task list) and hands each entry to the task type its
``type:`` names (default ``zeroshot``). The task types are the registered ones while the registry calls the
suite hooks, else the built-in ones (a suite file read directly, e.g. in a test).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from qbench.errors import QbenchError, warn
from qbench.tasks import DetectionTask, OODTarget, TaskType, builtin_task_types, current_task_types

__all__ = ["SuiteSpec", "load_suite", "load_suite_dir", "parse_suite"]

ZEROSHOT_METRICS = ("accuracy", "ece", "nll")
"""The zero-shot classification metrics (:data:`qbench.engine.task_scoring.METRIC_FUNCTIONS`)."""
DEFAULT_TASK_TYPE = "zeroshot"
"""The task type of an entry without ``type:``."""
SUITE_FIELDS = ("name", "version", "description", "tasks")
"""The top-level fields of a suite file; any other is an error listing these."""

_LEGACY_SPECS = {"TaskSpec": "zeroshot", "OODTaskSpec": "ood", "RobustnessTaskSpec": "robustness",
                 "SpuriousTaskSpec": "spurious", "SpectralTaskSpec": "spectral", "DropoutTaskSpec": "dropout"}


def __getattr__(name: str) -> Any:
    """The spec classes of the built-in task types under their former names here (``qbench.suites.TaskSpec``)."""
    if name in _LEGACY_SPECS:
        spec = getattr(builtin_task_types()[_LEGACY_SPECS[name]], "spec", None)
        if spec is not None:
            return spec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class SuiteSpec:
    """A parsed suite: name, version, description, tasks, the file it came from and the task types it was
    parsed with (task ``type`` -> class; for a suite built in code, the built-in task types)."""

    name: str
    version: int
    description: str
    tasks: tuple[Any, ...]
    source: str = ""
    task_types: Mapping[str, type[TaskType]] = field(default_factory=dict, compare=False, repr=False)

    def task_type(self, task: Any) -> TaskType:
        """The task type of one of this suite's tasks (an instance of its registered class)."""
        name = getattr(task, "type", None)
        cls = self.task_types.get(name) or current_task_types().get(name) or builtin_task_types().get(name)
        if cls is None:
            raise QbenchError(f"suite {self.name!r}: no task type {name!r} is registered for one of its tasks; "
                              "install the plugin that provides it (see 'qbench list task_types')")
        return cls()

    def typed_tasks(self) -> list[tuple[TaskType, Any]]:
        """(task type, spec) of every task, in order."""
        return [(self.task_type(task), task) for task in self.tasks]

    @property
    def datasets(self) -> tuple[str, ...]:
        """Every dataset the tasks read, first mention first."""
        return tuple(dict.fromkeys(name for task_type, task in self.typed_tasks() for name in task_type.datasets(task)))

    @property
    def ood_tasks(self) -> tuple[DetectionTask, ...]:
        """Every OOD-detection sub-task the tasks declare (OOD tasks, robustness shift detection), in task order."""
        return tuple(detection for task_type, task in self.typed_tasks() for detection in task_type.detections(task))

    @property
    def scorers(self) -> tuple[str, ...]:
        """The scorers of the suite's detection tasks (listed in the YAML, else the task type's default)."""
        return tuple(dict.fromkeys(name for task in self.ood_tasks for name in task.scorers))


def load_suite(path: Path) -> SuiteSpec:
    """Parse and validate one suite YAML file; problems are one-line errors naming the file and field."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise QbenchError(f"cannot read suite file {path}: {first}") from None
    return parse_suite(raw, source=str(path))


def parse_suite(raw: object, source: str = "<memory>") -> SuiteSpec:
    """Validate a suite mapping (name, version, description, tasks) and parse each task with its task type."""
    def fail(problem: str) -> QbenchError:
        return QbenchError(f"suite {source}: {problem}")

    if not isinstance(raw, dict):
        raise fail("expected a mapping with name, version, description and tasks")
    unknown = [str(key) for key in raw if key not in SUITE_FIELDS]
    if unknown:
        raise fail(f"unknown field(s) {', '.join(unknown)} (allowed: {', '.join(SUITE_FIELDS)})")
    missing = [key for key in ("name", "version", "tasks") if key not in raw]
    if missing:
        raise fail(f"missing field(s) {', '.join(missing)}")
    if isinstance(raw["version"], bool) or not isinstance(raw["version"], int) or raw["version"] < 1:
        raise fail(f"version must be a positive integer, got {raw['version']!r}")
    if not isinstance(raw["tasks"], list) or not raw["tasks"]:
        raise fail("tasks must be a non-empty list")
    available = current_task_types()
    tasks, used = [], {}
    for number, entry in enumerate(raw["tasks"], start=1):
        task_type, spec = _parse_task(entry, number, available, fail)
        tasks.append(spec)
        used[task_type.name] = type(task_type)
    return SuiteSpec(
        name=str(raw["name"]),
        version=raw["version"],
        description=str(raw.get("description", "")),
        tasks=tuple(tasks),
        source=source,
        task_types=used,
    )


def _parse_task(raw: object, number: int, available: Mapping[str, type[TaskType]],
                fail: Callable[[str], QbenchError]) -> tuple[TaskType, Any]:
    """One ``tasks:`` entry: its task type (did-you-mean when unknown), its fields checked against the type's
    declared ``fields``, then the type's own parse; every problem names the file, the task and the field."""
    if not isinstance(raw, dict):
        raise fail(f"each task must be a mapping, got {raw!r}")
    name = raw.get("type", DEFAULT_TASK_TYPE)
    if not isinstance(name, str) or name not in available:
        close = difflib.get_close_matches(str(name), list(available), n=1, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(item) for item in close)}?" if close else ""
        raise fail(f"task {number}: unknown task type {name!r}{hint} (available: {', '.join(sorted(available))})")
    cls = available[name]

    def task_fail(problem: str) -> QbenchError:
        return fail(f"task {number} ({name}): {problem}")

    fields = tuple(getattr(cls, "fields", ()) or ())
    allowed = ("type", *fields)
    if fields:
        unknown = [str(key) for key in raw if key not in allowed]
        if unknown:
            raise task_fail(f"unknown field(s) {', '.join(unknown)} in a {name} task (allowed: {', '.join(allowed)})")
    try:
        task_type = cls()
        spec = task_type.parse(raw, task_fail)
    except QbenchError:
        raise
    except Exception as error:  # a third-party task type's bug: one line naming it, not a traceback
        detail = (str(error).splitlines() or [""])[0]
        raise task_fail(f"task type {name!r} ({cls.__module__}) failed to parse it: {type(error).__name__}: {detail}") from None
    if getattr(spec, "type", None) != name or not isinstance(getattr(spec, "datasets", None), tuple):
        raise task_fail(f"task type {name!r} ({cls.__module__}) returned a spec without type {name!r} "
                        "and a tuple of datasets; fix the plugin's parse()")
    return task_type, spec


def load_suite_dir(folder: Path) -> list[SuiteSpec]:
    """Every ``*.yaml`` suite directly inside ``folder``, sorted by file name.

    A file that cannot be read or parsed is reported in one warning line and skipped, so one malformed suite
    does not disable every command; naming that suite then says it is unknown."""
    suites = []
    for path in sorted(Path(folder).glob("*.yaml")):
        try:
            suites.append(load_suite(path))
        except QbenchError as error:
            warn(f"{error}; this suite is skipped until the file is fixed")
    return suites
