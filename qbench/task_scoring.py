"""Classification-based suite tasks, scored from cached features: zero-shot, robustness, spurious.

Every task here reads the features of :mod:`qbench.features` through one :class:`LogitBank`, so the
logits of a dataset are computed once per state and shared by its zero-shot metrics, by the
robustness task that lists it as clean or shifted set, by the spurious task that lists it as a
group, by the reliability bins and by the bin trajectory (``scoring.md`` §2.4).

Record shapes (``results`` of the evaluation document):

* zero-shot: ``accuracy``/``ece``/``nll`` per dataset, FP32 and quantized, relative change ``delta``
  and ``diff = quantized − fp32``; accuracy records carry ``bootstrap``, the paired image bootstrap of
  ``scoring.md`` §2.7 (SE of each accuracy, SE/CI/p of the difference);
* robustness: the same metrics on the clean split and on every shifted split, the relative change
  δ(D) = (A_fp − A_q)/A_fp of ``scoring.md`` §2.6 as ``delta``, and ``shifted-mean`` (the mean over
  the shifted splits, as ``suites.md`` §3.3 reports CIFAR-10-C). Shift detection is an OOD task
  (:mod:`qbench.ood_eval`);
* spurious (CounterAnimal, Wang et al., NeurIPS 2024): pooled and class-balanced accuracy on each
  group, then on ``"<common>+<counter>"`` the relative spurious gap ``rsg`` of each model, ``delta_rsg``
  = RSG(q) − RSG(fp) and the added vulnerability ``v_add`` = δ_C − δ_N (single values).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from qbench import metrics
from qbench.robustness import spurious_gap
from qbench.suites import RobustnessTaskSpec, SpuriousTaskSpec, SuiteSpec, TaskSpec

STATES = ("fp32", "quantized")
SHIFTED_MEAN = "shifted-mean"
"""Dataset name of the robustness record averaging the shifted splits."""

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
    three arrays are the per-sample evidence of a run (:mod:`qbench.evidence`): accuracy, ECE, NLL, balanced
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

    Two sources: :class:`LogitBank` (a live run, from cached features) and :class:`qbench.evidence.EvidenceBank`
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
            from qbench.statistics import paired_accuracy_bootstrap

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


def score_classification_tasks(suites: Sequence[SuiteSpec], bank: OutcomeBank) -> list[dict[str, Any]]:
    """Records of every zero-shot, robustness and spurious task of ``suites``, in suite and task order."""
    records: list[dict[str, Any]] = []
    for suite in suites:
        for task in suite.tasks:
            if isinstance(task, TaskSpec):
                records += _zero_shot(suite, task, bank)
            elif isinstance(task, RobustnessTaskSpec):
                records += _robustness(suite, task, bank)
            elif isinstance(task, SpuriousTaskSpec):
                records += _spurious(suite, task, bank)
    return records


def _zero_shot(suite: SuiteSpec, task: TaskSpec, bank: OutcomeBank) -> list[dict[str, Any]]:
    return [_metric_record(suite, "zeroshot", task.dataset, metric, bank) for metric in task.metrics]


def _metric_record(suite: SuiteSpec, task: str, dataset: str, metric: str, bank: OutcomeBank, **extra: Any) -> dict[str, Any]:
    """A paired record of ``metric`` on ``dataset``; accuracy also gets its paired image bootstrap."""
    record = paired_record(suite, task, dataset, metric, bank.metric(metric, dataset, "fp32"),
                           bank.metric(metric, dataset, "quantized"), **extra)
    if metric == "accuracy":
        record["bootstrap"] = bank.accuracy_bootstrap(dataset)
    return record


def _robustness(suite: SuiteSpec, task: RobustnessTaskSpec, bank: OutcomeBank) -> list[dict[str, Any]]:
    """Metrics per split (clean first) and their mean over the shifted splits."""
    records = []
    for dataset in task.datasets:
        role = "clean" if dataset == task.clean_dataset else "shifted"
        for metric in task.metrics:
            records.append(_metric_record(suite, "robustness", dataset, metric, bank, role=role))
    for metric in task.metrics:
        shifted = [record for record in records if record["role"] == "shifted" and record["metric"] == metric]
        fp = float(np.mean([record["fp32"] for record in shifted]))
        q = float(np.mean([record["quantized"] for record in shifted]))
        records.append(paired_record(suite, "robustness", SHIFTED_MEAN, metric, fp, q, role="mean",
                                     param=f"mean of {len(shifted)} shifted sets"))
    return records


def balanced_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present of each class's top-1 accuracy (CounterAnimal's class-balanced view)."""
    return balanced_from_correct(metrics.predictions(logits) == labels, labels)


def balanced_from_correct(correct: np.ndarray, labels: np.ndarray) -> float:
    """:func:`balanced_accuracy` from per-image correctness."""
    return float(np.mean([correct[labels == label].mean() for label in np.unique(labels)]))


def _spurious(suite: SuiteSpec, task: SpuriousTaskSpec, bank: OutcomeBank) -> list[dict[str, Any]]:
    """Group accuracies, then RSG per model, ΔRSG and V_add (``scoring.md`` §2.6)."""
    records = []
    accuracy: dict[str, dict[str, float]] = {}
    for dataset, group in ((task.common_dataset, "common"), (task.counter_dataset, "counter")):
        labels = bank.labels[dataset]
        accuracy[group] = {state: bank.metric("accuracy", dataset, state) for state in STATES}
        records.append(_metric_record(suite, "spurious", dataset, "accuracy", bank, group=group))
        records.append(paired_record(suite, "spurious", dataset, "accuracy_balanced",
                                     balanced_from_correct(bank.correct(dataset, "fp32"), labels),
                                     balanced_from_correct(bank.correct(dataset, "quantized"), labels), group=group))
    gap = spurious_gap(accuracy["common"]["fp32"], accuracy["counter"]["fp32"],
                       accuracy["common"]["quantized"], accuracy["counter"]["quantized"])
    pair = f"{task.common_dataset}+{task.counter_dataset}"
    if gap.rsg_fp is not None and gap.rsg_q is not None:
        records.append(paired_record(suite, "spurious", pair, "rsg", gap.rsg_fp, gap.rsg_q))
    records.append(value_record(suite, "spurious", pair, "delta_rsg", gap.delta_rsg))
    records.append(value_record(suite, "spurious", pair, "v_add", gap.v_add,
                                delta_common=gap.delta_common, delta_counter=gap.delta_counter))
    return records


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
    """Datasets with a zero-shot, robustness or spurious task: the ones that get reliability and trajectories."""
    names: list[str] = []
    for suite in suites:
        for task in suite.tasks:
            if isinstance(task, (TaskSpec, RobustnessTaskSpec, SpuriousTaskSpec)):
                names += list(task.datasets)
    return list(dict.fromkeys(names))


def _plain(item) -> dict[str, Any]:
    """A dataclass as a JSON-ready dict: NaN becomes null, tuples become lists."""
    return {key: (None if isinstance(value, float) and np.isnan(value) else list(value) if isinstance(value, tuple) else value)
            for key, value in dataclasses.asdict(item).items()}
