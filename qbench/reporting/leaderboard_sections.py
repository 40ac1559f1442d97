"""The reliability sections of the leaderboard: ID, OOD, robustness and spurious, FP32 → quantized.

Accuracy alone hides what the project measures, so ``leaderboard/README.md`` has one section per task family,
each a table with one row per submission (model, quantizer, bits, scope):

* **ID** (zero-shot tasks): accuracy, ECE and NLL per dataset, ``FP32 → Q (Δ)``;
* **OOD detection** (OOD tasks, near and far apart): AUROC and FPR@95 per scorer, ``FP32 → Q``;
* **Robustness** (robustness tasks): accuracy FP32 → Q on the clean split and the relative drop
  δ = (A_FP32 − A_Q)/A_FP32 on every shifted split and their mean (``scoring.md`` §2.6);
* **Spurious** (CounterAnimal-style tasks): RSG of each model, ΔRSG = RSG(Q) − RSG(FP32) and V_add = δ_C − δ_N.

A run with logit tuning gets a second row, ``Q (logit-tuned)``, comparing the same FP32 reference with the tuned
quantized model. Δ is always quantized − FP32 (percentage points for fractions), as in the rest of qbench. Every
cell that comes from a submission is escaped (:func:`qbench.reporting.markdown_text.markdown_cell`); every number was
recomputed from the submission's per-sample evidence before it got here (:mod:`qbench.engine.evidence`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from qbench.reporting.markdown_text import markdown_cell


@dataclass(frozen=True)
class RunRow:
    """One row of a section: a submission's results, untuned or logit-tuned."""

    model: str
    quantizer: str
    bits: str
    scope: str
    tuned: bool
    config_hash: str
    records: tuple[Mapping[str, Any], ...]

    @property
    def label(self) -> list[str]:
        quantizer = self.quantizer + (" (logit-tuned)" if self.tuned else "")
        return [markdown_cell(self.model), markdown_cell(quantizer), markdown_cell(self.bits), markdown_cell(self.scope)]

    def find(self, **identity: Any) -> Mapping[str, Any] | None:
        for record in self.records:
            if all(record.get(key) == value for key, value in identity.items()):
                return record
        return None


LABEL_HEADER = ["Model", "Quantizer", "Bits", "Scope"]


def run_rows(documents: Iterable[Mapping[str, Any]]) -> list[RunRow]:
    """Rows of every document (a tuned row after its untuned one), sorted by model, bits and quantizer."""
    rows = []
    for document in documents:
        config = document["config"]
        results = [record for record in document.get("results") or [] if isinstance(record, Mapping)]
        for tuned in (False, True):
            records = tuple(record for record in results if bool(record.get("logit_tuned", False)) == tuned)
            if records:
                rows.append(RunRow(str(config["model"]), str(config["quantizer"]), str(config["bits"]), str(config["scope"]),
                                   tuned, str(config["config_hash"]), records))
    return sorted(rows, key=lambda row: (row.model, _bits_order(row.bits), row.quantizer, row.tuned, row.config_hash))


def _bits_order(bits: str) -> tuple[int, int]:
    """Wider first: w8a8 before w4a8 before w4a4."""
    digits = bits.lstrip("w").split("a")
    try:
        return -int(digits[0]), -int(digits[1])
    except (ValueError, IndexError):
        return 0, 0


# -- cells -------------------------------------------------------------------------------------------


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _signed(value: float, decimals: int) -> str:
    text = f"{value:+.{decimals}f}"
    return "±" + text[1:] if float(text) == 0 else text


def pair_cell(record: Mapping[str, Any] | None, scale: float = 100.0, decimals: int = 2) -> str:
    """``FP32 → Q (Δ)`` with Δ = Q − FP32 (in the cell's unit), or ``–`` when the record is absent."""
    if record is None or record.get("fp32") is None or record.get("quantized") is None:
        return "–"
    fp, q = record["fp32"] * scale, record["quantized"] * scale
    return f"{fp:.{decimals}f} → {q:.{decimals}f} ({_signed(q - fp, decimals)})"


def drop_cell(record: Mapping[str, Any] | None) -> str:
    """The relative drop δ = (FP32 − Q)/FP32 in percent (``delta`` of the record), ``–`` when undefined."""
    if record is None or record.get("delta") is None:
        return "–"
    return f"{100 * record['delta']:.2f}"


def value_cell(record: Mapping[str, Any] | None) -> str:
    if record is None or record.get("value") is None:
        return "–"
    return _signed(100 * record["value"], 2)


def _table(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def _unique(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


# -- sections ----------------------------------------------------------------------------------------


def id_section(rows: Sequence[RunRow]) -> list[str]:
    """Accuracy, ECE and NLL of every zero-shot dataset."""
    datasets = _unique(record["dataset"] for row in rows for record in row.records if record.get("task") == "zeroshot")
    if not datasets:
        return []
    lines = ["## ID: zero-shot accuracy and calibration", "",
             "Accuracy ↑ and ECE ↓ in percent, NLL ↓ in nats; each cell FP32 → Q (Δ = Q − FP32).", ""]
    for dataset in datasets:
        members = [row for row in rows if row.find(task="zeroshot", dataset=dataset)]
        lines += [f"### {markdown_cell(dataset)}", ""]
        lines += _table(LABEL_HEADER + ["Accuracy %", "ECE %", "NLL"], (
            row.label + [pair_cell(row.find(task="zeroshot", dataset=dataset, metric="accuracy")),
                         pair_cell(row.find(task="zeroshot", dataset=dataset, metric="ece")),
                         pair_cell(row.find(task="zeroshot", dataset=dataset, metric="nll"), 1.0, 3)]
            for row in members))
        lines.append("")
    return lines


def ood_section(rows: Sequence[RunRow]) -> list[str]:
    """AUROC and FPR@95 per scorer, one table per (ID dataset, OOD dataset) pair, near before far."""
    records = [record for row in rows for record in row.records if record.get("task") == "ood"]
    pairs = sorted(_unique((r["id_dataset"], r["ood_dataset"], r.get("ood_kind", "")) for r in records),
                   key=lambda pair: (pair[0], pair[2] != "near", pair[1]))
    if not pairs:
        return []
    lines = ["## OOD detection", "",
             "AUROC ↑ and FPR@95 ↓ in percent per scorer, each cell FP32 → Q (Δ = Q − FP32).", ""]
    for id_dataset, ood_dataset, kind in pairs:
        scorers = _unique(r["scorer"] for r in records if (r["id_dataset"], r["ood_dataset"]) == (id_dataset, ood_dataset))
        members = [row for row in rows if row.find(task="ood", id_dataset=id_dataset, ood_dataset=ood_dataset)]
        for metric, title in (("auroc", "AUROC %"), ("fpr95", "FPR@95 %")):
            lines += [f"### {markdown_cell(id_dataset)} vs {markdown_cell(ood_dataset)} ({markdown_cell(kind)} OOD): {title}", ""]
            lines += _table(LABEL_HEADER + [markdown_cell(scorer) for scorer in scorers], (
                row.label + [pair_cell(row.find(task="ood", id_dataset=id_dataset, ood_dataset=ood_dataset, scorer=scorer,
                                                metric=metric)) for scorer in scorers]
                for row in members))
            lines.append("")
    return lines


def robustness_section(rows: Sequence[RunRow]) -> list[str]:
    """Clean accuracy FP32 → Q and the relative accuracy drop δ on each shifted split and their mean."""
    accuracy = [r for row in rows for r in row.records
                if r.get("task") == "robustness" and r.get("metric") == "accuracy" and "scorer" not in r]
    clean = _unique(r["dataset"] for r in accuracy if r.get("role") == "clean")
    shifted = _unique(r["dataset"] for r in accuracy if r.get("role") in ("shifted", "mean"))
    if not accuracy:
        return []
    lines = ["## Robustness to shifts", "",
             "Clean accuracy FP32 → Q (Δ = Q − FP32) in percent, then the relative accuracy drop of quantization on each",
             "shifted split, δ = (A_FP32 − A_Q)/A_FP32 in percent (> 0: quantization lost more there).", ""]
    members = [row for row in rows if any(r in accuracy for r in row.records)]
    lines += _table(LABEL_HEADER + [f"{markdown_cell(name)} accuracy %" for name in clean]
                    + [f"δ {markdown_cell(name)}" for name in shifted], (
        row.label + [pair_cell(row.find(task="robustness", dataset=name, metric="accuracy", role="clean")) for name in clean]
        + [drop_cell(row.find(task="robustness", dataset=name, metric="accuracy", role=_role(name))) for name in shifted]
        for row in members))
    return lines + [""]


def _role(dataset: str) -> str:
    from qbench.engine.task_scoring import SHIFTED_MEAN

    return "mean" if dataset == SHIFTED_MEAN else "shifted"


def spurious_section(rows: Sequence[RunRow]) -> list[str]:
    """RSG of each model, ΔRSG and V_add of every spurious task."""
    pairs = _unique(r["dataset"] for row in rows for r in row.records if r.get("task") == "spurious" and r.get("metric") == "v_add")
    if not pairs:
        return []
    lines = ["## Spurious correlations", "",
             "RSG = (A_common − A_counter)/A_common per model in percent (FP32 → Q (Δ)); ΔRSG = RSG(Q) − RSG(FP32) and",
             "V_add = δ_counter − δ_common in percentage points (> 0: quantization leans harder on the spurious cue).", ""]
    for pair in pairs:
        members = [row for row in rows if row.find(task="spurious", dataset=pair, metric="v_add")]
        lines += [f"### {markdown_cell(pair)}", ""]
        lines += _table(LABEL_HEADER + ["RSG %", "ΔRSG pp", "V_add pp"], (
            row.label + [pair_cell(row.find(task="spurious", dataset=pair, metric="rsg")),
                         value_cell(row.find(task="spurious", dataset=pair, metric="delta_rsg")),
                         value_cell(row.find(task="spurious", dataset=pair, metric="v_add"))]
            for row in members))
        lines.append("")
    return lines


def render_sections(documents: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every section with at least one row, as Markdown lines."""
    rows = run_rows(documents)
    return id_section(rows) + ood_section(rows) + robustness_section(rows) + spurious_section(rows)
