"""Task type ``zeroshot``: zero-shot classification metrics on one dataset, FP32 and quantized.

Records (per metric): ``fp32``, ``quantized``, ``delta`` = (fp − q)/fp, ``diff`` = q − fp; accuracy records
also carry ``bootstrap``, the paired image bootstrap of ``scoring.md`` §2.7.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from qbench.suites import ZEROSHOT_METRICS
from qbench.tasks import STAGE_LOGITS, TaskOutput, TaskRun, TaskType
from qbench_plugins.tasks.fields import Fail, check_known, names


@dataclass(frozen=True)
class ZeroShotSpec:
    """Zero-shot classification on one dataset, with a list of metrics."""

    type: str
    dataset: str
    metrics: tuple[str, ...]

    @property
    def datasets(self) -> tuple[str, ...]:
        """The one dataset."""
        return (self.dataset,)


class ZeroShot(TaskType):
    """Accuracy, ECE and NLL of each state on one dataset (``type`` may be omitted: it is the default)."""

    name = "zeroshot"
    spec = ZeroShotSpec
    summary = "zero-shot accuracy, ECE and NLL on one dataset, FP32 vs quantized"
    fields = ("dataset", "metrics")
    stage = STAGE_LOGITS
    evidence_backed = True

    def parse(self, raw: Mapping[str, Any], fail: Fail) -> ZeroShotSpec:
        """``dataset`` and ``metrics`` (default: accuracy, ece, nll)."""
        if "dataset" not in raw:
            raise fail(f"each task needs a type and a dataset, got {dict(raw)!r}")
        metrics = names(raw.get("metrics", ZEROSHOT_METRICS), "metrics", fail)
        check_known(metrics, ZEROSHOT_METRICS, "metric", fail)
        return ZeroShotSpec(type=self.name, dataset=str(raw["dataset"]), metrics=metrics)

    def outcome_datasets(self, spec: ZeroShotSpec) -> tuple[str, ...]:
        """Its dataset gets reliability bins and a bin trajectory."""
        return spec.datasets

    def score(self, spec: ZeroShotSpec, run: TaskRun) -> TaskOutput:
        """One paired record per metric."""
        from qbench.engine.task_scoring import metric_record

        return TaskOutput([metric_record(run.suite, self.name, spec.dataset, metric, run.bank) for metric in spec.metrics])
