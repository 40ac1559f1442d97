"""Task type ``spurious``: accuracy on a common-background and a counter-background split of the same classes.

CounterAnimal (Wang et al., NeurIPS 2024). Records: pooled and class-balanced accuracy on each group (``group``
common/counter), then on ``"<common>+<counter>"`` the relative spurious gap ``rsg`` of each model, ``delta_rsg``
= RSG(q) − RSG(fp) and the added vulnerability ``v_add`` = δ_C − δ_N (single values; ``scoring.md`` §2.6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from qbench.tasks import STAGE_LOGITS, TaskOutput, TaskRun, TaskType, paired_record, value_record
from qbench_plugins.tasks.fields import Fail, required

STATES = ("fp32", "quantized")


@dataclass(frozen=True)
class SpuriousTaskSpec:
    """A common-background and a counter-background split of the same classes."""

    common_dataset: str
    counter_dataset: str
    type: str = "spurious"

    @property
    def datasets(self) -> tuple[str, ...]:
        """Common then counter split."""
        return (self.common_dataset, self.counter_dataset)


class Spurious(TaskType):
    """Group accuracies, RSG, ΔRSG and V_add."""

    name = "spurious"
    spec = SpuriousTaskSpec
    summary = "accuracy on common vs counter backgrounds: RSG, ΔRSG and added vulnerability V_add"
    fields = ("common_dataset", "counter_dataset")
    stage = STAGE_LOGITS
    evidence_backed = True

    def parse(self, raw: Mapping[str, Any], fail: Fail) -> SpuriousTaskSpec:
        """``common_dataset`` and ``counter_dataset``, two different splits."""
        required(raw, ("common_dataset", "counter_dataset"), self.name, fail)
        if raw["common_dataset"] == raw["counter_dataset"]:
            raise fail("common_dataset and counter_dataset must be two different splits")
        return SpuriousTaskSpec(str(raw["common_dataset"]), str(raw["counter_dataset"]))

    def outcome_datasets(self, spec: SpuriousTaskSpec) -> tuple[str, ...]:
        """Both groups get reliability bins and trajectories."""
        return spec.datasets

    def score(self, spec: SpuriousTaskSpec, run: TaskRun) -> TaskOutput:
        """Group accuracies, then RSG per model, ΔRSG and V_add."""
        from qbench.analysis.robustness import spurious_gap
        from qbench.engine.task_scoring import balanced_from_correct, metric_record

        bank, suite = run.bank, run.suite
        records = []
        accuracy: dict[str, dict[str, float]] = {}
        for dataset, group in ((spec.common_dataset, "common"), (spec.counter_dataset, "counter")):
            labels = bank.labels[dataset]
            accuracy[group] = {state: bank.metric("accuracy", dataset, state) for state in STATES}
            records.append(metric_record(suite, self.name, dataset, "accuracy", bank, group=group))
            records.append(paired_record(suite, self.name, dataset, "accuracy_balanced",
                                         balanced_from_correct(bank.correct(dataset, "fp32"), labels),
                                         balanced_from_correct(bank.correct(dataset, "quantized"), labels), group=group))
        gap = spurious_gap(accuracy["common"]["fp32"], accuracy["counter"]["fp32"],
                           accuracy["common"]["quantized"], accuracy["counter"]["quantized"])
        pair = f"{spec.common_dataset}+{spec.counter_dataset}"
        if gap.rsg_fp is not None and gap.rsg_q is not None:
            records.append(paired_record(suite, self.name, pair, "rsg", gap.rsg_fp, gap.rsg_q))
        records.append(value_record(suite, self.name, pair, "delta_rsg", gap.delta_rsg))
        records.append(value_record(suite, self.name, pair, "v_add", gap.v_add,
                                    delta_common=gap.delta_common, delta_counter=gap.delta_counter))
        return TaskOutput(records)
