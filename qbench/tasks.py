"""The Benchmark task-type contract: what a suite's ``tasks:`` entries can be.

A task type is a class registered through :func:`qbench.hookspecs.qbench_register_task_types`. It names
its YAML ``type:``, parses an entry's fields into a frozen spec, declares what the run must encode for
it, and turns the run's cached features and logits into result records. The six built-in task types
(zero-shot, OOD, robustness, spurious, spectral, dropout; ``qbench_plugins.tasks``) register through the
same hook as a third-party package's.

What a task type declares
-------------------------
* ``name`` (the YAML ``type:``), ``summary`` (one line for ``qbench list task_types``) and ``fields``
  (the YAML keys it accepts besides ``type``; any other key is a one-line error listing these);
* :meth:`TaskType.parse`: the entry's fields -> a frozen spec with ``.type`` (the task type's name) and
  ``.datasets`` (every split it reads: the run loads and encodes each once, shared by all tasks);
* :meth:`TaskType.taps`: per dataset, the feature taps (:mod:`qbench.analysis.spectral`) to record during the
  run's one encoding pass;
* :meth:`TaskType.detections`: the OOD-detection sub-tasks it implies (:class:`DetectionTask`; a
  robustness task's shift detection). The run scores every detection of every task once, with every
  scorer, from the cached features; their records follow the classification records
  (:mod:`qbench.engine.ood_eval` documents their schema);
* :meth:`TaskType.outcome_datasets`: the datasets whose per-sample outcomes it reads: they get
  reliability bins and bin trajectories;
* ``stage``: when :meth:`TaskType.score` runs and what :class:`TaskRun` then holds:

  - :data:`STAGE_LOGITS`: from the zero-shot logits/outcomes of the cached features (``run.bank``),
    once per logit-scale setting: untuned, and again with the tuned quantized scale when the run tunes
    it (records marked ``logit_tuned``). With ``evidence_backed = True`` the records are functions of
    the per-sample outcomes alone (:class:`qbench.engine.task_scoring.OutcomeBank`), so ``qbench rescore`` and
    the leaderboard recompute them from the evidence file with the same :meth:`TaskType.score`;
  - :data:`STAGE_FEATURES`: once, from the cached features and taps (``run.taps``, ``run.states`` for
    model heads);
  - :data:`STAGE_MODEL`: once, after everything cached, with the FP32 model and the datasets (a
    model-level probe; ``run.fp32``, ``run.datasets``, ``run.cache``, ``run.progress``).

Record schema
-------------
:meth:`TaskType.score` returns a :class:`TaskOutput`: ``records`` (each a dict with ``suite``,
``suite_version``, ``task``, ``dataset``, ``metric``, ``fp32``, ``quantized``, ``delta``, ``diff`` and
optionally ``param``, ``value`` (single-value records: ``fp32``/``quantized`` null) and
task-specific keys; :func:`paired_record` and :func:`value_record` build them) and ``sections``
(document section name -> entries, e.g. ``spectral``). The run adds ``logit_tuned``. Reports render
records of a task type they do not know as a generic table.
"""

from __future__ import annotations

import contextlib
import contextvars
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Mapping

if TYPE_CHECKING:
    import numpy as np

    from qbench.errors import QbenchError
    from qbench.engine.ood_eval import IdClassifier, OODOutcome
    from qbench.suites import SuiteSpec
    from qbench.engine.task_scoring import OutcomeBank

__all__ = [
    "DetectionTask", "OODTarget", "STAGE_FEATURES", "STAGE_LOGITS", "STAGE_MODEL", "TaskOutput", "TaskRun",
    "TaskType", "active_task_types", "builtin_task_types", "current_task_types", "identity", "paired_record",
    "using_task_types", "value_record"
]

_ACTIVE: contextvars.ContextVar[Mapping[str, type["TaskType"]] | None] = contextvars.ContextVar(
    "qbench_task_types", default=None)

STAGE_LOGITS = "logits"
"""Scored from the zero-shot logits/outcomes of the cached features, once per logit-scale setting."""
STAGE_FEATURES = "features"
"""Scored once from the cached features and feature taps."""
STAGE_MODEL = "model"
"""Scored once after everything cached, with the FP32 model (model-level probes)."""
STAGES = (STAGE_LOGITS, STAGE_FEATURES, STAGE_MODEL)


@dataclass(frozen=True)
class OODTarget:
    """One OOD split of a detection task and its kind (``near``/``far`` semantic OOD, ``shift`` covariate shift)."""

    dataset: str
    kind: str = "far"


@dataclass(frozen=True)
class DetectionTask:
    """An OOD-detection sub-task: one ID split against several OOD splits, each scorer on each pair.

    ``record_task`` is the ``task`` of its records (``ood``; ``robustness`` for a robustness task's shift
    detection). ``default_scorers`` says ``scorers`` is the task type's default (the YAML listed none): a
    ``--scorer`` selection then replaces it for the run, while scorers a suite lists always run.
    """

    id_dataset: str
    targets: tuple[OODTarget, ...]
    scorers: tuple[str, ...]
    metrics: tuple[str, ...]
    record_task: str = "ood"
    default_scorers: bool = False

    @property
    def datasets(self) -> tuple[str, ...]:
        """The ID split then every OOD split."""
        return (self.id_dataset, *(target.dataset for target in self.targets))

    def running(self, selection: tuple[str, ...] = ()) -> tuple[str, ...]:
        """The scorers that run on this detection: a ``--scorer`` ``selection`` replaces default scorers only."""
        return tuple(selection) if self.default_scorers and selection else self.scorers


@dataclass(frozen=True)
class TaskOutput:
    """What :meth:`TaskType.score` returns: result records and document sections (name -> entries)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    sections: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskRun:
    """The read-only view of a run that a task type scores from; which fields are set depends on the stage.

    Always: ``suite`` (the task's suite), ``seed``. :data:`STAGE_LOGITS`: ``bank`` (per-sample outcomes per
    dataset and state; in a live run a :class:`qbench.engine.task_scoring.LogitBank`, whose ``bank(dataset)`` gives
    each state's float64 logits and ``bank.features`` the cached features; in ``qbench rescore`` an
    evidence bank with outcomes only), ``tuned`` (whether the quantized state uses the tuned logit scale),
    ``ood`` (the shared OOD outcome of every detection, live runs only). :data:`STAGE_FEATURES`: ``features``
    and ``labels`` (per dataset: state -> n x d float64 embeddings, and the labels of the images kept),
    ``taps`` (dataset -> state -> tap -> array), ``classifier_for`` (dataset -> its zero-shot classifier),
    ``states`` (state -> model). :data:`STAGE_MODEL`: also ``fp32``, ``datasets`` (name -> the run's image
    set), ``batch_size``/``workers``, ``cache`` (the feature cache, for JSON results keyed by the model),
    ``fingerprints`` (state -> (image tower, text tower) fingerprints), ``progress``.
    """

    suite: "SuiteSpec"
    seed: int = 0
    bank: "OutcomeBank | None" = None
    tuned: bool = False
    ood: "OODOutcome | None" = None
    features: Mapping[str, Mapping[str, "np.ndarray"]] = field(default_factory=dict)
    labels: Mapping[str, "np.ndarray"] = field(default_factory=dict)
    taps: Mapping[str, Mapping[str, Mapping[str, "np.ndarray"]]] = field(default_factory=dict)
    classifier_for: "Callable[[str], IdClassifier] | None" = None
    states: Mapping[str, Any] = field(default_factory=dict)
    fp32: Any = None
    datasets: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 0
    workers: int = 0
    cache: Any = None
    fingerprints: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    progress: Any = None


class TaskType(ABC):
    """Base class of task-type plugins (one per YAML ``type:``); see the module docstring for the contract.

    The registry holds the class; the run instantiates it without arguments.
    """

    kind = "task type"
    name: ClassVar[str]
    summary: ClassVar[str]
    fields: ClassVar[tuple[str, ...]] = ()
    """YAML keys accepted besides ``type`` (empty: the task type checks its keys itself in :meth:`parse`)."""
    spec: ClassVar[type | None] = None
    """The frozen dataclass :meth:`parse` returns (documentation; optional)."""
    stage: ClassVar[str] = STAGE_LOGITS
    evidence_backed: ClassVar[bool] = False
    """Records are functions of per-sample outcomes alone (``qbench rescore`` recomputes them)."""

    @abstractmethod
    def parse(self, raw: Mapping[str, Any], fail: Callable[[str], "QbenchError"]) -> Any:
        """The frozen spec of one YAML task entry (``.type`` == :attr:`name`, ``.datasets``); problems are
        ``raise fail("what is wrong and how to fix it")`` (the suite file and task are prefixed)."""

    def datasets(self, spec: Any) -> tuple[str, ...]:
        """Every split the task reads (loaded and encoded once per run)."""
        return tuple(spec.datasets)

    def taps(self, spec: Any) -> Mapping[str, tuple[str, ...]]:
        """Dataset -> feature taps to record during the encoding pass (none by default)."""
        return {}

    def detections(self, spec: Any) -> tuple[DetectionTask, ...]:
        """OOD-detection sub-tasks the task implies, scored once per run for all tasks (none by default)."""
        return ()

    def outcome_datasets(self, spec: Any) -> tuple[str, ...]:
        """Datasets whose per-sample outcomes the task reads: they get reliability bins and trajectories."""
        return ()

    def score(self, spec: Any, run: TaskRun) -> TaskOutput:
        """Records and sections of one task of ``run.suite`` (nothing by default: e.g. a task whose records
        are all those of its :meth:`detections`)."""
        return TaskOutput()


def identity(suite: "SuiteSpec", task: str, dataset: str) -> dict[str, Any]:
    """The identity fields every record starts with."""
    return {"suite": suite.name, "suite_version": suite.version, "task": task, "dataset": dataset}


def paired_record(suite: "SuiteSpec", task: str, dataset: str, metric: str, fp: float, q: float,
                  **extra: Any) -> dict[str, Any]:
    """A record with FP32 and quantized values, relative change δ = (fp − q)/fp and difference q − fp."""
    from qbench.engine.task_scoring import paired_record as build

    return build(suite, task, dataset, metric, fp, q, **extra)


def value_record(suite: "SuiteSpec", task: str, dataset: str, metric: str, value: float | None,
                 **extra: Any) -> dict[str, Any]:
    """A single-value record: ``value`` set (None when undefined or infinite), FP32/quantized/δ/diff null."""
    from qbench.engine.task_scoring import value_record as build

    return build(suite, task, dataset, metric, value, **extra)


@contextlib.contextmanager
def using_task_types(task_types: Mapping[str, type[TaskType]]) -> Iterator[None]:
    """While the registry calls the suite hooks, suites are parsed with these task types."""
    token = _ACTIVE.set(dict(task_types))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_task_types() -> Mapping[str, type[TaskType]] | None:
    """The task types set by :func:`using_task_types`, or None outside a registry build."""
    return _ACTIVE.get()


_BUILTINS: list[Mapping[str, type[TaskType]]] = []


def builtin_task_types() -> Mapping[str, type[TaskType]]:
    """The task types the built-in plugins register (cached): what a suite parsed outside a registry build uses.

    Only the task-type hooks of the built-in plugins are called, so no suite file is read here.
    """
    if not _BUILTINS:
        import importlib

        from qbench.plugins import BUILTIN_PLUGINS

        found: dict[str, type[TaskType]] = {}
        for module_name in BUILTIN_PLUGINS:
            hook = getattr(importlib.import_module(module_name), "qbench_register_task_types", None)
            for task_type in (hook() if hook is not None else None) or ():
                found[task_type.name] = task_type
        _BUILTINS.append(found)
    return _BUILTINS[0]


def current_task_types() -> Mapping[str, type[TaskType]]:
    """The registered task types during a registry build, else the built-in ones."""
    active = active_task_types()
    return active if active is not None else builtin_task_types()
