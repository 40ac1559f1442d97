"""Task type ``ood``: OOD detection, one ID split against near- and far-OOD splits, each scorer on each pair.

The task declares one :class:`qbench.tasks.DetectionTask`; the run scores every detection of every task once
(:mod:`qbench.engine.ood_eval`, ID scores shared by every pair) and its records follow the classification records:
per (scorer, OOD split, metric) ``fp32``, ``quantized``, ``delta``, ``diff`` with ``scorer``, ``id_dataset``,
``ood_dataset`` and ``ood_kind``.

Default scorers: a task that lists no ``scorers:`` runs :data:`DEFAULT_SCORERS`, the study's six plus the
generic-negative baseline, whatever else is installed, so installing a scorer changes no existing result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from qbench.tasks import STAGE_LOGITS, DetectionTask, OODTarget, TaskType
from qbench_plugins.tasks.fields import Fail, check_known, names

OOD_KINDS = ("near", "far")
DEFAULT_OOD_METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out")
DEFAULT_SCORERS = ("energy", "entropy", "eoe", "generic-negative", "mcm", "msp", "neglabel")
"""The scorers of an OOD or shift-detection task that names none (sorted by name: the order of their records)."""


@dataclass(frozen=True)
class OODTaskSpec:
    """OOD detection: one ID split against several OOD splits, every scorer on every pair.

    ``scorers`` is what the YAML lists, else :data:`DEFAULT_SCORERS` with ``default_scorers`` set (then a
    ``--scorer`` selection replaces them for a run).
    """

    id_dataset: str
    targets: tuple[OODTarget, ...]
    scorers: tuple[str, ...] = DEFAULT_SCORERS
    metrics: tuple[str, ...] = DEFAULT_OOD_METRICS
    type: str = "ood"
    default_scorers: bool = True

    @property
    def datasets(self) -> tuple[str, ...]:
        """The ID split then every OOD split."""
        return (self.id_dataset, *(target.dataset for target in self.targets))


def parse_scorers(raw: Mapping[str, Any], fail: Fail) -> tuple[tuple[str, ...], bool]:
    """The task's ``scorers:`` and False, else :data:`DEFAULT_SCORERS` and True; an empty list is an error."""
    if "scorers" not in raw:
        return DEFAULT_SCORERS, True
    scorers = names(raw["scorers"], "scorers", fail)
    if not scorers:
        raise fail("scorers must name at least one scorer (omit it for the default: " + ", ".join(DEFAULT_SCORERS) + ")")
    return scorers, False


def parse_target(raw: object, fail: Fail) -> OODTarget:
    """``NAME`` or ``{dataset: NAME, kind: near|far}`` (kind default far)."""
    if isinstance(raw, str):
        return OODTarget(raw)
    if not isinstance(raw, dict) or "dataset" not in raw:
        raise fail(f"each ood_datasets entry needs a dataset (and kind near|far), got {raw!r}")
    kind = str(raw.get("kind", "far"))
    if kind not in OOD_KINDS:
        raise fail(f"ood kind must be near or far, got {kind!r} for {raw['dataset']}")
    return OODTarget(str(raw["dataset"]), kind)


class OODDetection(TaskType):
    """OOD detection of an ID split against near/far OOD splits."""

    name = "ood"
    spec = OODTaskSpec
    summary = "OOD detection (AUROC, FPR@95, AUPR) of an ID split vs near/far OOD splits, every scorer"
    fields = ("id_dataset", "ood_datasets", "scorers", "metrics")
    stage = STAGE_LOGITS
    evidence_backed = True

    def parse(self, raw: Mapping[str, Any], fail: Fail) -> OODTaskSpec:
        """``id_dataset``, ``ood_datasets`` (names or ``{dataset, kind}``), ``scorers``, ``metrics``."""
        from qbench.analysis.ood_metrics import OOD_METRICS

        if "id_dataset" not in raw or not raw.get("ood_datasets"):
            raise fail("an ood task needs id_dataset and a non-empty ood_datasets list")
        if not isinstance(raw["ood_datasets"], list):
            raise fail("ood_datasets must be a list of {dataset: NAME, kind: near|far}")
        targets = tuple(parse_target(item, fail) for item in raw["ood_datasets"])
        metrics = names(raw.get("metrics", DEFAULT_OOD_METRICS), "metrics", fail)
        check_known(metrics, OOD_METRICS, "metric", fail)
        scorers, default = parse_scorers(raw, fail)
        return OODTaskSpec(id_dataset=str(raw["id_dataset"]), targets=targets, scorers=scorers, metrics=metrics,
                           default_scorers=default)

    def detections(self, spec: OODTaskSpec) -> tuple[DetectionTask, ...]:
        """The task itself: its records are the detection records."""
        return (DetectionTask(spec.id_dataset, spec.targets, spec.scorers, spec.metrics, record_task=self.name,
                              default_scorers=spec.default_scorers),)
