"""Statistics over quantizer seeds for stored evaluation documents (``scoring.md`` §2.7; issue 7, item 4).

The quantizer seed (calibration draw, QAT data order) is a source of randomness; one evaluation per
seed is stored, and :func:`seed_statistics` summarises them. Documents are grouped by their
configuration with the seed and config hash left out (everything else equal: model, quantizer, its
parameters, bits, scope, proxy, suites, limit, ...), and within a group that holds at least two
distinct seeds there is one row per record identity (:data:`RECORD_IDENTITY`) with

* ``mean ± std`` (sample std, ddof = 1) of the quantized value, its standard error ``std/√S`` and the
  Student-t 95 % interval ``mean ± t_{0.975,S−1}·std/√S`` (:func:`qbench.analysis.statistics.seed_summary`);
* the per-seed difference ``d_s = M_q,s − M_fp,s`` with its mean, std, SE and t-interval, the two-sided
  one-sample t-test of ``mean(d) = 0`` and, from 6 seeds on, the exact Wilcoxon signed-rank test
  (:func:`qbench.analysis.statistics.compare_seeds`);
* Benjamini–Hochberg adjusted p-values within one metric × one group ("one metric × one table"),
  raw and adjusted both kept (:func:`qbench.analysis.statistics.benjamini_hochberg`).

FP32 models are deterministic, but an evaluation split may itself depend on the seed (a generated
dataset may render its test images from it), so each seed's difference uses that seed's own FP32 value, and a
row whose FP32 values differ across seeds says so in its ``notes``. Single-value records (``value``
set, ``fp32`` null, e.g. V_add, ΔRSG, SQNR in dB) are summarised on ``value`` and tested against 0
(``d_s = value_s``); their ``fp32_*`` and ``quantized_*`` fields are null and ``ci_low``/``ci_high``
are the interval of the value's mean. Undefined values (null or not finite) and records missing from
some seeds are left out of that row, counted in its ``notes``.

:func:`seed_statistics_markdown` renders the rows for reports; :func:`seed_table_cells` gives the
same cells to the CLI's rich table, and :data:`SEED_TABLE_CAPTION` says that "±" is a seed std.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from qbench.analysis.metrics import PERCENT_METRICS
from qbench.analysis.statistics import benjamini_hochberg, compare_seeds, seed_summary

RECORD_IDENTITY = ("suite", "task", "dataset", "metric", "param", "scorer", "ood_dataset", "logit_tuned")
"""The fields that name one result record across seeds (the row key of the seed table)."""

SEED_FREE_CONFIG_KEYS = frozenset({"seed", "config_hash", "created_at", "provenance"})
"""Configuration keys that may differ between the seeds of one group."""


SEED_TABLE_CAPTION = (
    "Statistics over seeds (scoring.md §2.7). \"±\" is the sample standard deviation over seeds (ddof = 1), "
    "not a bootstrap SE. Δ = quantized − FP32 per seed (for single-value records: the value itself, tested "
    "against 0); p: two-sided one-sample t-test of the per-seed Δ; Wilcoxon: exact signed-rank test, only "
    "with ≥ 6 seeds; p (BH): Benjamini–Hochberg adjusted within one metric × one configuration group (q = 0.05)."
)


@dataclass(frozen=True)
class SeedGroup:
    """Documents of one configuration at several seeds: one document per distinct seed, seeds ascending."""

    key: str
    description: str
    seeds: tuple[int, ...]
    documents: tuple[Mapping[str, Any], ...]
    duplicates: int = 0  # documents left out because their seed was already in the group


def group_key(config: Mapping[str, Any]) -> str:
    """The configuration without :data:`SEED_FREE_CONFIG_KEYS`, as canonical JSON (equal key = one group)."""
    kept = {key: value for key, value in config.items() if key not in SEED_FREE_CONFIG_KEYS}
    return json.dumps(kept, sort_keys=True, default=str)


def group_description(config: Mapping[str, Any]) -> str:
    """A short name of a group: ``model/quantizer/bits/scope`` (``+tuning`` when logit tuning was on)."""
    parts = [str(config.get(key, "?")) for key in ("model", "quantizer", "bits", "scope")]
    return "/".join(parts) + ("+tuning" if config.get("logit_tuning") else "")


def seed_groups(documents: Sequence[Mapping[str, Any]]) -> list[SeedGroup]:
    """Group ``documents`` by :func:`group_key`, in order of first appearance; any number of seeds per group.

    Two documents of one group with the same seed are the same configuration: the first is kept and the
    rest counted in ``duplicates``. Groups whose descriptions coincide (same model, quantizer, bits and
    scope but, say, another limit) get a short hash of their key appended so table rows stay distinct.
    """
    members: dict[str, dict[int, Mapping[str, Any]]] = {}
    duplicates: dict[str, int] = {}
    descriptions: dict[str, str] = {}
    for document in documents:
        config = document["config"]
        key = group_key(config)
        by_seed = members.setdefault(key, {})
        descriptions.setdefault(key, group_description(config))
        seed = int(config.get("seed", 0))
        if seed in by_seed:
            duplicates[key] = duplicates.get(key, 0) + 1
        else:
            by_seed[seed] = document
    counts: dict[str, int] = {}
    for description in descriptions.values():
        counts[description] = counts.get(description, 0) + 1
    groups = []
    for key, by_seed in members.items():
        description = descriptions[key]
        if counts[description] > 1:
            description += " #" + hashlib.sha256(key.encode()).hexdigest()[:8]
        seeds = tuple(sorted(by_seed))
        groups.append(SeedGroup(key, description, seeds, tuple(by_seed[seed] for seed in seeds), duplicates.get(key, 0)))
    return groups


def record_identity(record: Mapping[str, Any]) -> tuple:
    """The record's :data:`RECORD_IDENTITY` values (``task`` defaults to zeroshot, ``logit_tuned`` to False)."""
    values = {key: record.get(key) for key in RECORD_IDENTITY}
    values["task"] = record.get("task", "zeroshot")
    values["logit_tuned"] = bool(record.get("logit_tuned"))
    return tuple(values[key] for key in RECORD_IDENTITY)


def is_single_value(record: Mapping[str, Any]) -> bool:
    """A single-value record: ``value`` present and no FP32 number (issue 7 record contract)."""
    return "value" in record and record.get("fp32") is None


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is missing, not a number, or not finite."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _seed_list(seeds: Sequence[int]) -> str:
    return ", ".join(str(seed) for seed in seeds)


def seed_statistics(documents: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (configuration group with >= 2 seeds) × record identity; see the module docstring.

    Row keys: the :data:`RECORD_IDENTITY` fields, ``group`` (:func:`group_description`), ``kind``
    (``paired`` or ``value``), ``n_seeds`` and ``seeds`` (those used), ``config_hashes`` (of those
    seeds' documents), ``fp32_mean``, ``fp32_std``, ``quantized_mean``, ``quantized_std`` (ddof = 1),
    ``quantized_se``, ``ci_low``/``ci_high`` (t-based 95 % CI of the quantized mean, of the value's mean
    for single-value rows), ``diff_mean``, ``diff_std``, ``diff_se``, ``diff_ci_low``/``diff_ci_high``
    (of ``d_s``), ``t_p_value``, ``wilcoxon_p_value`` (None below 6 seeds), ``p_adjusted`` and
    ``wilcoxon_p_adjusted`` (BH within one metric × one group), ``notes`` (list of strings). A row
    with fewer than two usable seeds keeps its identity with null statistics and a note.
    """
    rows: list[dict[str, Any]] = []
    families: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for group in seed_groups(documents):
        if len(group.seeds) < 2:
            continue
        by_identity: dict[tuple, dict[int, Mapping[str, Any]]] = {}
        for seed, document in zip(group.seeds, group.documents):
            for record in document.get("results", []):
                by_identity.setdefault(record_identity(record), {}).setdefault(seed, record)
        for identity, by_seed in by_identity.items():
            row = _row(group, identity, by_seed)
            rows.append(row)
            families.setdefault((group.key, row["metric"]), []).append(row)
    for family in families.values():
        _adjust(family, "t_p_value", "p_adjusted")
        _adjust(family, "wilcoxon_p_value", "wilcoxon_p_adjusted")
    return rows


def _row(group: SeedGroup, identity: tuple, by_seed: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """The statistics of one record identity over the seeds of ``group`` that have a usable value."""
    notes: list[str] = []
    if group.duplicates:
        notes.append(f"{group.duplicates} repeated document(s) of an already present seed left out")
    missing = [seed for seed in group.seeds if seed not in by_seed]
    if missing:
        notes.append(f"record missing in seed(s) {_seed_list(missing)}; statistics use the {len(by_seed)} seed(s) that have it")
    single = any(is_single_value(record) for record in by_seed.values())
    hash_for = {int(document["config"].get("seed", 0)): document["config"].get("config_hash")
                for document in group.documents}
    seeds: list[int] = []
    quantized: list[float] = []
    fp32: list[float] = []
    undefined: list[int] = []
    for seed in sorted(by_seed):
        record = by_seed[seed]
        q = _number(record.get("value") if single else record.get("quantized"))
        fp = 0.0 if single else _number(record.get("fp32"))
        if q is None or fp is None:
            undefined.append(seed)
            continue
        seeds.append(seed)
        quantized.append(q)
        fp32.append(fp)
    if undefined:
        notes.append(f"value undefined (null or not finite) in seed(s) {_seed_list(undefined)}: skipped")
    row: dict[str, Any] = dict(zip(RECORD_IDENTITY, identity))
    row.update({"group": group.description, "kind": "value" if single else "paired", "n_seeds": len(seeds),
                "seeds": seeds, "config_hashes": [hash_for[seed] for seed in seeds]})
    row.update(dict.fromkeys(("fp32_mean", "fp32_std", "quantized_mean", "quantized_std", "quantized_se", "ci_low",
                              "ci_high", "diff_mean", "diff_std", "diff_se", "diff_ci_low", "diff_ci_high",
                              "t_p_value", "wilcoxon_p_value", "p_adjusted", "wilcoxon_p_adjusted")))
    if len(seeds) < 2:
        notes.append(f"fewer than 2 seeds with a value ({len(seeds)}): no seed statistics")
        row["notes"] = notes
        return row
    comparison = compare_seeds(quantized, fp32)
    difference = comparison.summary
    row.update({"diff_mean": difference.mean, "diff_std": difference.std, "diff_se": difference.se,
                "diff_ci_low": difference.ci_low, "diff_ci_high": difference.ci_high,
                "t_p_value": comparison.t_test.p_value,
                "wilcoxon_p_value": None if comparison.wilcoxon is None else comparison.wilcoxon.p_value})
    if single:
        row.update({"ci_low": difference.ci_low, "ci_high": difference.ci_high})
    else:
        q_summary, fp_summary = seed_summary(quantized), seed_summary(fp32)
        row.update({"fp32_mean": fp_summary.mean, "fp32_std": fp_summary.std, "quantized_mean": q_summary.mean,
                    "quantized_std": q_summary.std, "quantized_se": q_summary.se, "ci_low": q_summary.ci_low,
                    "ci_high": q_summary.ci_high})
        if max(fp32) != min(fp32):
            notes.append(f"fp32 differs across seeds ({min(fp32):.6g} to {max(fp32):.6g}; the evaluation data may "
                         "depend on the seed): each seed's difference uses its own fp32")
    row["notes"] = notes
    return row


def _adjust(family: Sequence[dict[str, Any]], raw_key: str, adjusted_key: str) -> None:
    """Benjamini–Hochberg over the rows of one family that have a raw p-value; the others stay None."""
    tested = [row for row in family if row[raw_key] is not None]
    if not tested:
        return
    adjusted = benjamini_hochberg([row[raw_key] for row in tested])
    for row, value in zip(tested, adjusted):
        row[adjusted_key] = float(value)


# -- formatting -----------------------------------------------------------------------------------


def _percent(metric: Any) -> bool:
    return metric in PERCENT_METRICS


def format_level(value: float | None, metric: str) -> str:
    """A mean: percent for fraction metrics, else four significant digits."""
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if _percent(metric) else f"{value:.4g}"


def format_difference(value: float | None, metric: str) -> str:
    """A signed difference: percentage points for fraction metrics."""
    if value is None:
        return "-"
    return f"{100 * value:+.2f} pp" if _percent(metric) else f"{value:+.4g}"


def format_spread(value: float | None, metric: str) -> str:
    """A std or SE: percentage points for fraction metrics."""
    if value is None:
        return "-"
    return f"{100 * value:.2f} pp" if _percent(metric) else f"{value:.3g}"


def format_p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _record_label(row: Mapping[str, Any]) -> str:
    """``group suite/dataset metric[param] (scorer vs ood) tuned`` for notes."""
    label = f"{row['group']} {row['suite']}/{row['dataset']} {row['metric']}"
    if row.get("param"):
        label += f"[{row['param']}]"
    if row.get("scorer"):
        label += f" ({row['scorer']} vs {row.get('ood_dataset')})"
    return label + (" tuned" if row.get("logit_tuned") else "")


def seed_table_cells(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """The seed table as string cells (column name -> text): the same for markdown and the CLI.

    Optional columns (task, param, scorer / OOD set, tuned, Wilcoxon) appear only when some row has them.
    """
    has = {column: any(test(row) for row in rows) for column, test in (
        ("task", lambda row: row.get("task") != "zeroshot"), ("param", lambda row: bool(row.get("param"))),
        ("scorer", lambda row: bool(row.get("scorer"))), ("tuned", lambda row: bool(row.get("logit_tuned"))),
        ("wilcoxon", lambda row: row.get("wilcoxon_p_value") is not None))}
    cells = []
    for row in rows:
        metric = row["metric"]
        cell = {"group": str(row["group"]), "suite": str(row["suite"])}
        if has["task"]:
            cell["task"] = str(row.get("task") or "")
        cell.update({"dataset": str(row["dataset"]), "metric": str(metric)})
        if has["param"]:
            cell["param"] = str(row.get("param") or "")
        if has["scorer"]:
            cell["scorer vs OOD"] = f"{row['scorer']} vs {row.get('ood_dataset')}" if row.get("scorer") else ""
        if has["tuned"]:
            cell["tuned"] = "yes" if row.get("logit_tuned") else "no"
        single = row.get("kind") == "value"
        cell.update({
            "seeds": str(row["n_seeds"]),
            "fp32 mean ± std": "-" if row.get("fp32_mean") is None else
            f"{format_level(row['fp32_mean'], metric)} ± {format_spread(row['fp32_std'], metric)}",
            "quantized mean ± std": "-" if row.get("quantized_mean") is None else
            f"{format_level(row['quantized_mean'], metric)} ± {format_spread(row['quantized_std'], metric)}",
            "Δ (or value) mean ± std":
            "-" if row.get("diff_mean") is None else
            f"{(format_level if single else format_difference)(row['diff_mean'], metric)} ± "
            f"{format_spread(row['diff_std'], metric)}",
            "p": format_p(row.get("t_p_value")),
        })
        if has["wilcoxon"]:
            cell["p (Wilcoxon)"] = format_p(row.get("wilcoxon_p_value"))
        cell["p (BH)"] = format_p(row.get("p_adjusted"))
        cells.append(cell)
    return cells


def seed_notes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every row note, prefixed with the record it belongs to."""
    return [f"{_record_label(row)}: {note}" for row in rows for note in row.get("notes", [])]


def seed_statistics_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The seed table as GitHub markdown, its caption (what "±" is) first and the row notes after it.

    Empty rows give an empty string, so a report can leave the section out.
    """
    cells = seed_table_cells(rows)
    if not cells:
        return ""
    header = list(cells[0])
    lines = [SEED_TABLE_CAPTION, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell[column].replace("|", "\\|") for column in header) + " |" for cell in cells]
    notes = seed_notes(rows)
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"

