"""Task type ``robustness``: zero-shot metrics on a clean split and on shifted copies of it, plus shift detection.

Records per split (clean first, ``role`` clean/shifted): the metrics FP32 and quantized and the relative change
δ(D) = (A_fp − A_q)/A_fp (``scoring.md`` §2.6), then per metric the mean over the shifted splits (dataset
:data:`SHIFTED_MEAN`, ``role`` mean). With ``detection`` the clean split is the ID side and every shifted split
the OOD side (kind ``shift``) of a detection sub-task with ``task`` robustness, scored with the OOD tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from qbench.suites import ZEROSHOT_METRICS
from qbench.engine.task_scoring import SHIFTED_MEAN
from qbench.tasks import STAGE_LOGITS, DetectionTask, OODTarget, TaskOutput, TaskRun, TaskType, paired_record
from qbench_plugins.tasks.fields import Fail, check_known, flag, names, required
from qbench_plugins.tasks.ood import DEFAULT_SCORERS, parse_scorers

SHIFT_KIND = "shift"
"""The ``ood_kind`` of shift-detection records: clean split as ID, a shifted copy of it as OOD."""
DEFAULT_DETECTION_METRICS = ("auroc", "fpr95")


@dataclass(frozen=True)
class RobustnessTaskSpec:
    """Zero-shot metrics on a clean split and on shifted copies of it (natural shifts, corruptions)."""

    clean_dataset: str
    shifted_datasets: tuple[str, ...]
    metrics: tuple[str, ...] = ("accuracy",)
    detection: bool = True
    scorers: tuple[str, ...] = DEFAULT_SCORERS
    detection_metrics: tuple[str, ...] = DEFAULT_DETECTION_METRICS
    type: str = "robustness"
    default_scorers: bool = True

    @property
    def datasets(self) -> tuple[str, ...]:
        """The clean split then every shifted split."""
        return (self.clean_dataset, *self.shifted_datasets)

    def detection_task(self) -> DetectionTask | None:
        """Shift detection (clean = ID, each shifted set = OOD of kind ``shift``), None when turned off."""
        if not self.detection:
            return None
        return DetectionTask(self.clean_dataset, tuple(OODTarget(name, SHIFT_KIND) for name in self.shifted_datasets),
                             self.scorers, self.detection_metrics, record_task="robustness",
                             default_scorers=self.default_scorers)


class Robustness(TaskType):
    """Accuracy under shift, relative change, and shift detection."""

    name = "robustness"
    spec = RobustnessTaskSpec
    summary = "accuracy on a clean split and shifted copies, relative change δ, clean-vs-shifted detection"
    fields = ("clean_dataset", "shifted_datasets", "metrics", "detection", "scorers", "detection_metrics")
    stage = STAGE_LOGITS
    evidence_backed = True

    def parse(self, raw: Mapping[str, Any], fail: Fail) -> RobustnessTaskSpec:
        """``clean_dataset``, ``shifted_datasets``, ``metrics`` (must hold accuracy), ``detection``, ``scorers``,
        ``detection_metrics``."""
        from qbench.analysis.ood_metrics import OOD_METRICS

        required(raw, ("clean_dataset", "shifted_datasets"), self.name, fail)
        shifted = names(raw["shifted_datasets"], "shifted_datasets", fail)
        if not shifted:
            raise fail("shifted_datasets must name at least one shifted split")
        metrics = names(raw.get("metrics", ["accuracy"]), "metrics", fail)
        check_known(metrics, ZEROSHOT_METRICS, "metric", fail)
        if "accuracy" not in metrics:
            raise fail("a robustness task measures accuracy (the relative change δ is defined on it); add accuracy to metrics")
        detection = flag(raw, "detection", True, fail)
        detection_metrics = names(raw.get("detection_metrics", list(DEFAULT_DETECTION_METRICS)), "detection_metrics", fail)
        check_known(detection_metrics, OOD_METRICS, "detection metric", fail)
        scorers, default = parse_scorers(raw, fail)
        return RobustnessTaskSpec(str(raw["clean_dataset"]), shifted, metrics, detection, scorers, detection_metrics,
                                  default_scorers=default)

    def detections(self, spec: RobustnessTaskSpec) -> tuple[DetectionTask, ...]:
        """The shift detection, when on."""
        task = spec.detection_task()
        return () if task is None else (task,)

    def outcome_datasets(self, spec: RobustnessTaskSpec) -> tuple[str, ...]:
        """Clean and shifted splits get reliability bins and trajectories."""
        return spec.datasets

    def score(self, spec: RobustnessTaskSpec, run: TaskRun) -> TaskOutput:
        """Metrics per split (clean first) and their mean over the shifted splits."""
        from qbench.engine.task_scoring import metric_record

        records = []
        for dataset in spec.datasets:
            role = "clean" if dataset == spec.clean_dataset else "shifted"
            for metric in spec.metrics:
                records.append(metric_record(run.suite, self.name, dataset, metric, run.bank, role=role))
        for metric in spec.metrics:
            shifted = [record for record in records if record["role"] == "shifted" and record["metric"] == metric]
            fp = float(np.mean([record["fp32"] for record in shifted]))
            q = float(np.mean([record["quantized"] for record in shifted]))
            records.append(paired_record(run.suite, self.name, SHIFTED_MEAN, metric, fp, q, role="mean",
                                         param=f"mean of {len(shifted)} shifted sets"))
        return TaskOutput(records)
