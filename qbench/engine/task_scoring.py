"""Scoring from cached features: per-sample outcomes, classification metrics, and the tasks read from them.

Every logit-stage task (:data:`qbench.tasks.STAGE_LOGITS`: the built-in zero-shot, robustness and spurious
task types, or a plugin's) reads the features of :mod:`qbench.engine.features` through one :class:`LogitBank`, so
the logits of a dataset are computed once per state and shared by every task that lists it, by the OOD
scorers, by the reliability bins and by the bin trajectory (``scoring.md`` §2.4).

Records built here (:func:`metric_record`): per metric on a dataset, FP32 and quantized values, relative
change ``delta`` = (fp − q)/fp and ``diff`` = q − fp; accuracy records carry ``bootstrap``, the paired image
bootstrap of ``scoring.md`` §2.7. What each task type adds is documented in its plugin module.

:func:`score_logit_states` is the one function that turns one outcome bank (a live run's, or an evidence
file's in ``qbench rescore``) and the detection pair scores into the records and sections of one logit-scale
setting, and :func:`merge_tuned` joins the untuned and the tuned settings: the live run and the rescoring
assemble a document's evidence-backed sections through the same two functions.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from qbench.analysis import metrics
from qbench.suites import SuiteSpec
from qbench.tasks import STAGE_LOGITS

STATES = ("fp32", "quantized")
SHIFTED_MEAN = "shifted-mean"
"""Dataset name of the record averaging a robustness task's shifted splits (a name the submission checks accept)."""

def zero_shot_logits(features: np.ndarray, classifier, state: str) -> np.ndarray:
    """``s * f @ W^T (+ b)`` in float64 with the state's own (possibly quantized) text head."""
    logits = classifier.logit_scales[state] * features @ classifier.heads[state].T
    if classifier.logit_biases[state] is not None:
        logits = logits + classifier.logit_biases[state]
    return logits


@dataclass(frozen=True)
class ClassOutcome:
    """Per-sample outcome of one state on one dataset: everything its classification metrics are computed from.

    ``prediction`` is the argmax class (ties to the lowest index), ``confidence`` the maximum softmax
    probability and ``true_log_prob`` the log-softmax of the true class, each from the float64 logits. These
    three arrays are the per-sample evidence of a run (:mod:`qbench.engine.evidence`): accuracy, ECE, NLL, balanced
    accuracy, the bootstrap, reliability bins and bin trajectories are all functions of them alone.
    """

    prediction: np.ndarray
    confidence: np.ndarray
    true_log_prob: np.ndarray


def outcome_from_logits(logits: np.ndarray, labels: np.ndarray) -> ClassOutcome:
    """The :class:`ClassOutcome` of ``logits`` against ``labels`` (float64, numerically stable softmax)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    return ClassOutcome(prediction=metrics.predictions(z).astype(np.int64), confidence=metrics.confidences(z),
                        true_log_prob=metrics.log_softmax(z)[np.arange(z.shape[0]), y])


def _accuracy(outcome: ClassOutcome, labels: np.ndarray) -> float:
    return float(np.mean(outcome.prediction == labels))


def _ece(outcome: ClassOutcome, labels: np.ndarray) -> float:
    return metrics.ece_from_confidences(outcome.confidence, (outcome.prediction == labels).astype(np.float64))


def _nll(outcome: ClassOutcome, labels: np.ndarray) -> float:
    return float(-np.mean(outcome.true_log_prob))


METRIC_FUNCTIONS: dict[str, Callable[[ClassOutcome, np.ndarray], float]] = {
    "accuracy": _accuracy,
    "ece": _ece,
    "nll": _nll,
}
"""Classification metrics of a suite task, each a function of the per-sample outcome and the labels only."""


class OutcomeBank:
    """Per-sample outcomes per (dataset, state) and the classification metrics computed from them.

    Two sources: :class:`LogitBank` (a live run, from cached features) and :class:`qbench.engine.evidence.EvidenceBank`
    (a stored evidence file). Every record of a classification task is computed through this interface, so a
    run's numbers and ``qbench rescore``'s are the same function of the same arrays.
    """

    labels: dict[str, np.ndarray]

    def outcome(self, dataset: str, state: str) -> ClassOutcome:
        raise NotImplementedError

    def correct(self, dataset: str, state: str) -> np.ndarray:
        """0/1 (bool) correctness of each image of ``dataset`` under ``state``."""
        return self.outcome(dataset, state).prediction == self.labels[dataset]

    def metric(self, name: str, dataset: str, state: str) -> float:
        return METRIC_FUNCTIONS[name](self.outcome(dataset, state), self.labels[dataset])

    def accuracy_bootstrap(self, dataset: str) -> dict[str, float | int]:
        """Image-level paired bootstrap of the accuracy difference on ``dataset`` (``scoring.md`` §2.7: one run
        reports value ± bootstrap SE; B = 1000 rows from ``PCG64(0)``, the same rows for both models)."""
        cache = self.__dict__.setdefault("_bootstrap", {})
        if dataset not in cache:
            from qbench.analysis.statistics import paired_accuracy_bootstrap

            cache[dataset] = paired_accuracy_bootstrap(self.correct(dataset, "fp32"), self.correct(dataset, "quantized"))
        return cache[dataset]


class LogitBank(OutcomeBank):
    """Zero-shot logits per (label set, dataset, state), each computed once from the cached features.

    Shared by the classification tasks and the OOD scorers: every scorer of an OOD pair reads the same
    logits of the ID and OOD images under the ID label set's classifier. ``outcomes`` holds every per-sample
    outcome the tasks read: the run's evidence.
    """

    def __init__(self, features: dict[str, dict[str, np.ndarray]], labels: dict[str, np.ndarray],
                 classifier_for: Callable) -> None:
        self.features = features
        self.labels = labels
        self.classifier_for = classifier_for
        self._logits: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        self.outcomes: dict[tuple[str, str], ClassOutcome] = {}

    def __call__(self, dataset: str, label_set: str | None = None) -> dict[str, np.ndarray]:
        """Each state's logits of ``dataset``'s images under ``label_set``'s classifier (default: its own)."""
        key = (label_set or dataset, dataset)
        if key not in self._logits:
            classifier = self.classifier_for(key[0])
            self._logits[key] = {state: zero_shot_logits(self.features[dataset][state], classifier, state)
                                 for state in STATES}
        return self._logits[key]

    def outcome(self, dataset: str, state: str) -> ClassOutcome:
        if (dataset, state) not in self.outcomes:
            self.outcomes[(dataset, state)] = outcome_from_logits(self(dataset)[state], self.labels[dataset])
        return self.outcomes[(dataset, state)]


def finite_or_none(value: float | None) -> float | None:
    """``value`` as a float, ``None`` for None/NaN/±inf (JSON has no infinity; an infinite SQNR means "no noise")."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def metric_pair(metric: str, fp: float, q: float, param: str | None = None) -> dict[str, Any]:
    """The measured part of a paired record: FP32 and quantized values, relative change, difference."""
    fp, q = float(fp), float(q)
    return {"metric": metric, **({"param": param} if param is not None else {}),
            "fp32": fp, "quantized": q, "delta": metrics.relative_change(fp, q), "diff": q - fp}


def metric_value(metric: str, value: float | None, param: str | None = None) -> dict[str, Any]:
    """The measured part of a single-value record: ``value`` (None when undefined or infinite), the pair null."""
    return {"metric": metric, **({"param": param} if param is not None else {}),
            "fp32": None, "quantized": None, "delta": None, "diff": None, "value": finite_or_none(value)}


def _identity(suite: SuiteSpec, task: str, dataset: str) -> dict[str, Any]:
    return {"suite": suite.name, "suite_version": suite.version, "task": task, "dataset": dataset}


def paired_record(suite: SuiteSpec, task: str, dataset: str, metric: str, fp: float, q: float, **extra: Any) -> dict[str, Any]:
    """A record with FP32 and quantized values, relative change and difference."""
    return {**_identity(suite, task, dataset), **metric_pair(metric, fp, q, extra.pop("param", None)), **extra}


def value_record(suite: SuiteSpec, task: str, dataset: str, metric: str, value: float | None, **extra: Any) -> dict[str, Any]:
    """A single-value record (a comparison such as ΔRSG or V_add): ``value`` set, FP32/quantized null."""
    return {**_identity(suite, task, dataset), **metric_value(metric, value, extra.pop("param", None)), **extra}


def logit_tasks(suites: Sequence[SuiteSpec], *, evidence_only: bool = False) -> list[tuple[SuiteSpec, Any, Any]]:
    """(suite, task type, spec) of every logit-stage task, in suite and task order; ``evidence_only`` keeps the
    evidence-backed ones (what ``qbench rescore`` can recompute)."""
    return [(suite, task_type, task) for suite in suites for task_type, task in suite.typed_tasks()
            if task_type.stage == STAGE_LOGITS and (task_type.evidence_backed or not evidence_only)]


def score_classification_tasks(suites: Sequence[SuiteSpec], bank: OutcomeBank, *, tuned: bool = False,
                               evidence_only: bool = False, ood: Any = None, seed: int = 0) -> list[dict[str, Any]]:
    """Records of every logit-stage task of ``suites`` (zero-shot, robustness, spurious, a plugin's), in suite and
    task order, each scored by its task type from ``bank``."""
    from qbench.tasks import TaskRun

    records: list[dict[str, Any]] = []
    for suite, task_type, task in logit_tasks(suites, evidence_only=evidence_only):
        records += task_type.score(task, TaskRun(suite=suite, seed=seed, bank=bank, tuned=tuned, ood=ood)).records
    return records


def metric_record(suite: SuiteSpec, task: str, dataset: str, metric: str, bank: OutcomeBank, **extra: Any) -> dict[str, Any]:
    """A paired record of classification ``metric`` on ``dataset``; accuracy also gets its paired image bootstrap."""
    record = paired_record(suite, task, dataset, metric, bank.metric(metric, dataset, "fp32"),
                           bank.metric(metric, dataset, "quantized"), **extra)
    if metric == "accuracy":
        record["bootstrap"] = bank.accuracy_bootstrap(dataset)
    return record


def balanced_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present of each class's top-1 accuracy (CounterAnimal's class-balanced view)."""
    return balanced_from_correct(metrics.predictions(logits) == labels, labels)


def balanced_from_correct(correct: np.ndarray, labels: np.ndarray) -> float:
    """:func:`balanced_accuracy` from per-image correctness."""
    return float(np.mean([correct[labels == label].mean() for label in np.unique(labels)]))


def reliability_sections(bank: OutcomeBank, datasets: Sequence[str]) -> list[dict[str, Any]]:
    """Reliability bins (``scoring.md`` §2.3) of each dataset and state."""
    sections = []
    for name in datasets:
        for state in STATES:
            outcome = bank.outcome(name, state)
            bins = metrics.reliability_bins_from_confidences(outcome.confidence, bank.correct(name, state).astype(np.float64))
            sections.append({"dataset": name, "state": state, "bins": [_plain(item) for item in bins]})
    return sections


def trajectory_sections(bank: OutcomeBank, datasets: Sequence[str], target: str) -> list[dict[str, Any]]:
    """The bin trajectory (``scoring.md`` §2.4) of each dataset: the same images from FP32 to ``target``."""
    sections = []
    for name in datasets:
        fp, q = bank.outcome(name, "fp32"), bank.outcome(name, "quantized")
        trajectory = metrics.bin_trajectory_from_outcomes(fp.prediction, fp.confidence, q.prediction, q.confidence,
                                                          bank.labels[name])
        sections.append({"dataset": name, "target": target, "n_bins": trajectory.n_bins, "flip_rate": trajectory.flip_rate,
                         "bins": [_plain(item) for item in trajectory.bins]})
    return sections


def classification_datasets(suites: Sequence[SuiteSpec]) -> list[str]:
    """Datasets whose per-sample outcomes a logit-stage task reads: the ones that get reliability and trajectories."""
    names: list[str] = []
    for _, task_type, task in logit_tasks(suites):
        names += list(task_type.outcome_datasets(task))
    return list(dict.fromkeys(names))


@dataclass
class ScoredStates:
    """Everything scored from one outcome bank for one logit-scale setting (untuned or tuned)."""

    results: list[dict[str, Any]]
    reliability: list[dict[str, Any]]
    trajectories: list[dict[str, Any]]
    histograms: list[dict[str, Any]]


def score_logit_states(suites: Sequence[SuiteSpec], bank: OutcomeBank, detection: tuple[list, list], *, tuned: bool,
                       target: str, evidence_only: bool = False, ood: Any = None, seed: int = 0) -> ScoredStates:
    """The logit-stage records then the detection records (``detection`` = (records, histograms) of every OOD pair),
    marked ``logit_tuned``; reliability bins and the bin trajectory to ``target`` of every outcome dataset."""
    records = score_classification_tasks(suites, bank, tuned=tuned, evidence_only=evidence_only, ood=ood, seed=seed)
    datasets = classification_datasets(suites)  # outcomes only: in the evidence file for every logit-stage task
    pair_records, histograms = detection
    return ScoredStates(mark_tuned(list(records) + list(pair_records), tuned), reliability_sections(bank, datasets),
                        trajectory_sections(bank, datasets, target),
                        [{**item, "logit_tuned": tuned} for item in histograms])


def merge_tuned(untuned: ScoredStates, tuned: ScoredStates | None) -> ScoredStates:
    """The document's sections: everything untuned, then what the tuned scale changes (the quantized state's
    reliability bins and histograms, every record and trajectory); the FP32 state is never tuned."""
    if tuned is None:
        return untuned
    return ScoredStates(
        results=untuned.results + tuned.results,
        reliability=untuned.reliability + [{**item, "logit_tuned": True} for item in tuned.reliability
                                           if item["state"] == "quantized"],
        trajectories=untuned.trajectories + tuned.trajectories,
        histograms=untuned.histograms + [item for item in tuned.histograms if item["state"] == "quantized"],
    )


def mark_tuned(records: Iterable[dict[str, Any]], tuned: bool) -> list[dict[str, Any]]:
    """Each record with ``logit_tuned`` set, so tuned and untuned rows of one run stay apart."""
    return [{**record, "logit_tuned": tuned} for record in records]


def _plain(item) -> dict[str, Any]:
    """A dataclass as a JSON-ready dict: NaN becomes null, tuples become lists."""
    return {key: (None if isinstance(value, float) and np.isnan(value) else list(value) if isinstance(value, tuple) else value)
            for key, value in dataclasses.asdict(item).items()}
