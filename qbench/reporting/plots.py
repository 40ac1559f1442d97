"""Figures of evaluation documents: one PNG per figure plus the numbers behind it as CSV (issue 7, item 5).

Every ``*_figure`` function draws one figure from the sections of a ``qbench eval --json`` document
(``reliability``, ``bin_trajectories``, ``ood_histograms``, ``spectral``, ``dropout`` and the result
records), writes ``<name>.png`` and ``<name>.csv`` into a folder and returns a :class:`Figure`; it
returns ``None`` when the document lacks the data, so a run draws only what it measured.
:func:`run_figures` draws everything of one run (file names carry the run's config hash) and
:func:`robustness_figure` can put several runs side by side.

What is drawn follows ``../shared/specs/scoring.md``: reliability bins and ECE (§2.2), the bin
trajectory (§2.4: one arrow per FP32-confidence bin from (conf_fp, acc_fp) to (conf_q, acc_q)), OOD
score distributions (§2.5), relative change and RSG (§2.6), the fixed and adaptive spectral bases
(§3.2-3.3), the Fourier RSE map (§3.4) and the weight-dropout probe (§4).

matplotlib is imported inside the drawing functions and used through its Agg canvas (no pyplot state,
no display), so importing this module costs nothing and ``qbench list`` stays fast.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

Document = Mapping[str, Any]
Record = Mapping[str, Any]

FP32_COLOR, QUANT_COLOR, TUNED_COLOR = "#3b6ea8", "#d9822b", "#3a9a5b"
ID_COLOR, OOD_COLOR = "#3b6ea8", "#c44e52"
PALETTE = (QUANT_COLOR, FP32_COLOR, TUNED_COLOR, "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd")
SATURATION_THRESHOLD = 0.95  # scoring.md §3.2: k_sat(θ) with θ = 0.95
DPI = 110
ARROW_POINTS_PER_UNIT = 250  # about how many points one unit of a [0, 1] trajectory axis spans


@dataclass(frozen=True)
class Figure:
    """One written figure: file stem, title, a caption saying what it shows, and its PNG and CSV paths."""

    name: str
    title: str
    caption: str
    png: Path
    csv: Path


# -- small helpers --------------------------------------------------------------------------------
def slug(*parts: object) -> str:
    """A file-name-safe stem from ``parts`` (letters, digits, ``.``, ``_`` and ``-``)."""
    text = "-".join(str(part) for part in parts if part not in (None, ""))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def run_tag(document: Document) -> str:
    """The run's config hash, used in every per-run file name."""
    return str(document.get("config", {}).get("config_hash", "run"))


def run_label(document: Document) -> str:
    """``quantizer bits scope seed`` of a run, the legend entry when runs are compared; a ``--limit N`` run is
    marked ``PARTIAL (N img)`` so its figures are never mistaken for a full run's."""
    config = document.get("config", {})
    partial = f" PARTIAL ({config['limit']} img)" if config.get("limit") is not None else ""
    return (f"{config.get('quantizer', '?')} {config.get('bits', '?')} {config.get('scope', '?')} "
            f"s{config.get('seed', '?')}{partial}")


def pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}%"


def _number(value: Any) -> float:
    """A plotted value: ``None`` (JSON null for NaN or +inf) becomes NaN, so matplotlib leaves a gap."""
    return math.nan if value is None else float(value)


def find_record(document: Document, **match: Any) -> Record | None:
    """The first result record whose keys equal ``match`` (``logit_tuned`` missing counts as False)."""
    for record in document.get("results", []):
        if all((bool(record.get(key)) if key == "logit_tuned" else record.get(key)) == value
               for key, value in match.items()):
            return record
    return None


def _canvas(ncols: int, width: float = 4.6, height: float = 4.0, nrows: int = 1):
    """A constrained-layout matplotlib Figure on the Agg canvas and its axes as a flat list."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    figure = MplFigure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(nrows, ncols, squeeze=False)
    return figure, [axis for row in axes for axis in row]


def _save(figure, frame, out_dir: Path, name: str, title: str, caption: str) -> Figure:
    """Write ``name``.png (the drawn figure, titled) and ``name``.csv (``frame``) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png, csv = out_dir / f"{name}.png", out_dir / f"{name}.csv"
    figure.suptitle(title, fontsize=12)
    figure.savefig(png, dpi=DPI)
    frame.to_csv(csv, index=False)
    return Figure(name=name, title=title, caption=caption, png=png, csv=csv)


def _frame(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]):
    import pandas as pd

    return pd.DataFrame(list(rows), columns=list(columns))


def _join(words: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1] if words else ""


def _state_label(state: str, tuned: bool) -> str:
    return "FP32" if state == "fp32" else "quantized (logit-tuned)" if tuned else "quantized"


def _state_color(state: str, tuned: bool) -> str:
    return FP32_COLOR if state == "fp32" else TUNED_COLOR if tuned else QUANT_COLOR


# -- reliability and bin trajectory (scoring.md §2.2, §2.4) -------------------------------------
RELIABILITY_COLUMNS = ("panel", "series", "bin", "lo", "hi", "n", "mean_conf", "accuracy",
                       "conf_fp", "acc_fp", "conf_q", "acc_q", "flip_rate")


def reliability_figure(document: Document, dataset: str, out_dir: Path, tag: str | None = None) -> Figure | None:
    """Reliability diagram of ``dataset`` (FP32, quantized, logit-tuned bars) beside its bin trajectories.

    The first panel shows accuracy per confidence bin for each state over the diagonal; each further
    panel follows the images of every FP32-confidence bin to the quantized (or tuned) model as one
    arrow, its width and opacity growing with the bin's image count.
    """
    sections = [item for item in document.get("reliability", []) if item["dataset"] == dataset]
    trajectories = [item for item in document.get("bin_trajectories", []) if item["dataset"] == dataset]
    if not sections and not trajectories:
        return None
    sections.sort(key=lambda item: (item["state"] != "fp32", bool(item.get("logit_tuned"))))
    trajectories.sort(key=lambda item: _trajectory_tuned(item))
    figure, axes = _canvas(1 + len(trajectories) if sections else len(trajectories))
    rows: list[dict[str, Any]] = []
    eces = []
    if sections:
        eces = _draw_reliability(axes[0], sections, document, dataset, rows)
    magnified = [_draw_trajectory(axis, trajectory, rows)
                 for axis, trajectory in zip(axes[1:] if sections else axes, trajectories)]
    name = slug("reliability", dataset, tag or run_tag(document))
    parts = [f"Reliability diagram of {dataset}: accuracy per confidence bin (15 equal-width bins) for "
             + _join([_state_label(item["state"], bool(item.get("logit_tuned"))) for item in sections])
             + "; the dashed diagonal is perfect calibration"] if sections else []
    if eces:
        parts.append("ECE " + ", ".join(f"{label} {pct(value, 2)}" for label, value in eces))
    for trajectory, zoomed in zip(trajectories, magnified):
        target = "logit-tuned quantized" if _trajectory_tuned(trajectory) else "quantized"
        parts.append(f"bin trajectory FP32 → {target}: each arrow follows the images of one FP32-confidence bin from "
                     f"their FP32 (mean confidence, accuracy) to the {target} model's, on the same images; wider, darker "
                     f"arrows hold more images; prediction flip rate {pct(trajectory.get('flip_rate'), 2)}, mean arrow "
                     f"length over images {_mean_arrow(trajectory):.4f}"
                     + ("; the inset magnifies the bins holding at least 10% of the images" if zoomed else ""))
    return _save(figure, _frame(rows, RELIABILITY_COLUMNS), out_dir, name,
                 f"Calibration of {dataset} — {run_label(document)}", "; ".join(parts) + ".")


def _trajectory_tuned(trajectory: Mapping[str, Any]) -> bool:
    return bool(trajectory.get("logit_tuned")) or "tuned" in str(trajectory.get("target", ""))


def _mean_arrow(trajectory: Mapping[str, Any]) -> float:
    """Image-weighted mean arrow length: how far a typical image's bin moved (0 for identical models)."""
    pairs = [(b["n"], math.dist(*_ends(b))) for b in trajectory.get("bins", []) if b.get("n")]
    pairs = [(n, length) for n, length in pairs if not math.isnan(length)]
    total = sum(n for n, _ in pairs)
    return sum(n * length for n, length in pairs) / total if total else 0.0


def _draw_reliability(axis, sections, document: Document, dataset: str, rows: list) -> list[tuple[str, float | None]]:
    """Grouped accuracy bars per bin, one colour per state; returns the (label, ECE) pairs found in the results."""
    eces = []
    width_share = 1.0 / len(sections)
    for position, section in enumerate(sections):
        state, tuned = section["state"], bool(section.get("logit_tuned"))
        label = _state_label(state, tuned)
        ece = find_record(document, dataset=dataset, metric="ece", logit_tuned=tuned if state != "fp32" else False)
        value = None if ece is None else ece["fp32" if state == "fp32" else "quantized"]
        if ece is not None:
            eces.append((label, value))
        xs, heights, widths = [], [], []
        for index, item in enumerate(section["bins"]):
            rows.append({"panel": "reliability", "series": label, "bin": index, "lo": item["lo"], "hi": item["hi"],
                         "n": item["count"], "mean_conf": item["mean_conf"], "accuracy": item["accuracy"]})
            if not item["count"]:
                continue
            width = (item["hi"] - item["lo"]) * width_share
            xs.append(item["lo"] + width * position)
            heights.append(_number(item["accuracy"]))
            widths.append(width)
        legend = label if value is None else f"{label} (ECE {pct(value, 2)})"
        axis.bar(xs, heights, width=widths, align="edge", color=_state_color(state, tuned), alpha=0.85,
                 edgecolor="white", linewidth=0.4, label=legend)
    axis.plot([0, 1], [0, 1], linestyle="--", color="0.3", linewidth=1, label="perfect calibration")
    _unit_axes(axis, "confidence (max softmax probability)", "accuracy")
    axis.set_title("reliability diagram", fontsize=10)
    axis.legend(loc="upper left", fontsize=8, framealpha=0.85, edgecolor="none")
    return eces


def _draw_trajectory(axis, trajectory: Mapping[str, Any], rows: list) -> bool:
    """One arrow per FP32-confidence bin from (conf_fp, acc_fp) to (conf_q, acc_q); width and alpha by n.

    When the bins holding most images drift too little to read at full scale (the usual case: most images
    sit at high confidence), an inset magnifies them; returns whether it did.
    """
    tuned = _trajectory_tuned(trajectory)
    color = TUNED_COLOR if tuned else QUANT_COLOR
    bins = [item for item in trajectory.get("bins", []) if item.get("n")]
    largest = max((item["n"] for item in bins), default=1)
    series = "FP32 → quantized (logit-tuned)" if tuned else "FP32 → quantized"
    for item in bins:
        rows.append({"panel": "trajectory", "series": series, "bin": item["index"], "lo": item["lo"], "hi": item["hi"],
                     "n": item["n"], "conf_fp": item["conf_fp"], "acc_fp": item["acc_fp"], "conf_q": item["conf_q"],
                     "acc_q": item["acc_q"], "flip_rate": item.get("flip_rate")})
    axis.plot([0, 1], [0, 1], linestyle="--", color="0.3", linewidth=1)
    _arrows(axis, bins, largest, color, ARROW_POINTS_PER_UNIT)
    axis.scatter([], [], s=30, color=FP32_COLOR, label="FP32 bin (size ∝ images)")
    axis.plot([], [], color=color, linewidth=2, label=f"→ {'tuned' if tuned else 'quantized'} on the same images")
    _unit_axes(axis, "mean confidence", "accuracy")
    axis.set_title(f"{series} · flip rate {pct(trajectory.get('flip_rate'), 2)}", fontsize=10)
    axis.legend(loc="upper left", fontsize=8, framealpha=0.85, edgecolor="none")
    return _magnify_heavy_bins(axis, bins, largest, color)


def _ends(item: Mapping[str, Any]) -> tuple[tuple[float, float], tuple[float, float]]:
    return (_number(item["conf_fp"]), _number(item["acc_fp"])), (_number(item["conf_q"]), _number(item["acc_q"]))


def _arrows(axis, bins: Sequence[Mapping[str, Any]], largest: int, color: str, points_per_unit: float) -> None:
    """FP32 points and their arrows; the arrow head never outgrows a short arrow, so small drifts read as arrows."""
    for item in bins:
        share = item["n"] / largest
        start, end = _ends(item)
        axis.scatter([start[0]], [start[1]], s=10 + 30 * share, color=FP32_COLOR, alpha=0.4 + 0.6 * share,
                     zorder=3, linewidths=0, clip_on=False)
        length = math.hypot(end[0] - start[0], end[1] - start[1])
        if length > 1e-9:
            head = max(3.0, min(8 + 8 * share, points_per_unit * length * 0.6))
            axis.annotate("", xy=end, xytext=start, zorder=4, annotation_clip=False,
                          arrowprops={"arrowstyle": "-|>", "color": color, "alpha": 0.35 + 0.65 * share,
                                      "lw": 0.8 + 2.2 * share, "mutation_scale": head, "shrinkA": 0, "shrinkB": 0})


INSET_PLACES = ([0.56, 0.04, 0.42, 0.42], [0.16, 0.38, 0.42, 0.42], [0.30, 0.04, 0.42, 0.42])


def _free_corner(points: Sequence[tuple[float, float]]) -> list[float]:
    """Where the inset goes: lower right, else below the legend on the left, else lower middle, whichever
    covers none of the magnified points (a [0, 1] trajectory axis, so data and axes coordinates agree)."""
    for x, y, width, height in INSET_PLACES:
        if not any(x - 0.03 <= px <= x + width + 0.03 and y - 0.03 <= py <= y + height + 0.03 for px, py in points):
            return [x, y, width, height]
    return INSET_PLACES[1]


def _magnify_heavy_bins(axis, bins: Sequence[Mapping[str, Any]], largest: int, color: str) -> bool:
    """An inset around the bins with at least a tenth of the images when their arrows are shorter than 0.08."""
    total = sum(item["n"] for item in bins)
    heavy = [item for item in bins if item["n"] >= 0.1 * total]
    if not heavy:
        return False
    points = [point for item in heavy for point in _ends(item) if not any(math.isnan(v) for v in point)]
    if not points or max(math.dist(*_ends(item)) for item in heavy) >= 0.08:
        return False
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    span = max(max(xs) - min(xs), max(ys) - min(ys), 0.01) * 1.4
    centre = ((max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2)
    inset = axis.inset_axes(_free_corner(points))
    inset.set_xlim(centre[0] - span / 2, centre[0] + span / 2)
    inset.set_ylim(centre[1] - span / 2, centre[1] + span / 2)
    inset.plot([0, 1], [0, 1], linestyle="--", color="0.3", linewidth=1)
    _arrows(inset, heavy, largest, color, ARROW_POINTS_PER_UNIT * 0.42 / span)
    for child in inset.get_children():  # points near the inset's edge stay inside it
        if hasattr(child, "set_clip_on"):
            child.set_clip_on(True)
    from matplotlib.ticker import MaxNLocator

    inset.xaxis.set_major_locator(MaxNLocator(3))
    inset.yaxis.set_major_locator(MaxNLocator(3))
    inset.tick_params(labelsize=6)
    inset.set_facecolor("white")
    axis.indicate_inset_zoom(inset, edgecolor="0.4")
    return True


def _unit_axes(axis, xlabel: str, ylabel: str) -> None:
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.02)
    axis.set_aspect("equal")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.25)


# -- OOD score histograms (scoring.md §2.5) ------------------------------------------------------
HISTOGRAM_COLUMNS = ("state", "logit_tuned", "bin", "lo", "hi", "id_count", "ood_count", "id_fraction", "ood_fraction")
HISTOGRAM_KEY = ("suite", "task", "scorer", "id_dataset", "ood_dataset", "ood_kind")


def histogram_groups(document: Document) -> dict[tuple, list[Mapping[str, Any]]]:
    """``ood_histograms`` grouped by (suite, task, scorer, ID, OOD, kind); states in FP32, quantized, tuned order."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for item in document.get("ood_histograms", []):
        groups.setdefault(tuple(item.get(key) for key in HISTOGRAM_KEY), []).append(item)
    for items in groups.values():
        items.sort(key=lambda item: (item["state"] != "fp32", bool(item.get("logit_tuned"))))
    return groups


def ood_histogram_figure(document: Document, key: tuple, out_dir: Path, tag: str | None = None) -> Figure | None:
    """ID vs OOD score distributions of one scorer on one pair, one panel per state (FP32, quantized, tuned).

    Bars are the fraction of each set per score bin (ID and OOD share the bins of a panel), so sets of
    different sizes compare; each panel's title carries its AUROC and FPR@95 from the result records.
    """
    items = histogram_groups(document).get(tuple(key))
    if not items:
        return None
    suite, task, scorer, id_dataset, ood_dataset, ood_kind = key
    figure, axes = _canvas(len(items), width=4.4, height=3.4)
    rows: list[dict[str, Any]] = []
    summary = []
    for axis, item in zip(axes, items):
        state, tuned = item["state"], bool(item.get("logit_tuned"))
        label = _state_label(state, tuned)
        found = {metric: _state_value(document, task, scorer, id_dataset, ood_dataset, metric, state, tuned)
                 for metric in ("auroc", "fpr95")}
        summary.append(f"{label} AUROC {pct(found['auroc'])}, FPR@95 {pct(found['fpr95'])}")
        _draw_histogram(axis, item, rows, label)
        title = label if found["auroc"] is None else f"{label} · AUROC {pct(found['auroc'])}"
        axis.set_title(title, fontsize=10)
        axis.set_xlabel(f"{scorer} score (higher = more in-distribution)")
    axes[0].set_ylabel("fraction of images per bin")
    name = slug("ood", suite, scorer, id_dataset, "vs", ood_dataset, tag or run_tag(document))
    what = "shift detection" if ood_kind == "shift" else f"{ood_kind} OOD"
    caption = (f"{scorer} scores of {id_dataset} (ID, blue) and {ood_dataset} (OOD, red; {what}) for "
               + _join([_state_label(i["state"], bool(i.get("logit_tuned"))) for i in items])
               + "; bars are fractions of each set per bin. " + "; ".join(summary) + ".")
    return _save(figure, _frame(rows, HISTOGRAM_COLUMNS), out_dir, name,
                 f"{scorer}: {id_dataset} vs {ood_dataset} ({suite}) — {run_label(document)}", caption)


def _state_value(document: Document, task: str, scorer: str, id_dataset: str, ood_dataset: str, metric: str,
                 state: str, tuned: bool) -> float | None:
    """The FP32 or quantized value of an OOD metric for one pair (tuned records carry the tuned quantized value)."""
    record = find_record(document, task=task, scorer=scorer, id_dataset=id_dataset, ood_dataset=ood_dataset,
                         metric=metric, logit_tuned=tuned)
    if record is None and state == "fp32":
        record = find_record(document, task=task, scorer=scorer, id_dataset=id_dataset, ood_dataset=ood_dataset,
                             metric=metric)
    return None if record is None else record["fp32" if state == "fp32" else "quantized"]


def _draw_histogram(axis, item: Mapping[str, Any], rows: list, label: str) -> None:
    edges = [float(value) for value in item["edges"]]
    id_counts, ood_counts = list(item["id_counts"]), list(item["ood_counts"])
    id_total, ood_total = max(sum(id_counts), 1), max(sum(ood_counts), 1)
    id_fraction = [count / id_total for count in id_counts]
    ood_fraction = [count / ood_total for count in ood_counts]
    for index, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        rows.append({"state": item["state"], "logit_tuned": bool(item.get("logit_tuned")), "bin": index, "lo": lo, "hi": hi,
                     "id_count": id_counts[index], "ood_count": ood_counts[index],
                     "id_fraction": id_fraction[index], "ood_fraction": ood_fraction[index]})
    axis.stairs(id_fraction, edges, fill=True, color=ID_COLOR, alpha=0.45, label=f"ID {item['id_dataset']} (n={sum(id_counts)})")
    axis.stairs(ood_fraction, edges, fill=True, color=OOD_COLOR, alpha=0.45,
                label=f"OOD {item['ood_dataset']} (n={sum(ood_counts)})")
    axis.stairs(id_fraction, edges, color=ID_COLOR, linewidth=1)
    axis.stairs(ood_fraction, edges, color=OOD_COLOR, linewidth=1)
    axis.set_ylim(0, max(id_fraction + ood_fraction + [0.01]) * 1.25)
    axis.legend(loc="upper left", fontsize=7, frameon=False)
    axis.grid(alpha=0.25)


# -- spectral analysis (scoring.md §3) -----------------------------------------------------------
FIXED_COLUMNS = ("rank", "magnitude_fp", "magnitude_q", "distortion", "sqnr_db", "similarity")
ADAPTIVE_COLUMNS = ("part", "a", "b", "accuracy_fp", "accuracy_q", "rank", "energy_fp", "energy_q", "energy_deviation")
FOURIER_COLUMNS = ("part", "u", "v", "amplitude_fp", "amplitude_q", "rse", "radius", "radial_rse",
                   "radial_amplitude_fp", "radial_amplitude_q")


def spectral_fixed_figure(document: Document, entry: Mapping[str, Any], out_dir: Path, tag: str | None = None) -> Figure | None:
    """Fixed (FP32) eigenbasis: SQNR(k) and spectral distortion D(k) per rank, and Sim_k with k_sat marked."""
    fixed = entry.get("fixed")
    if not fixed:
        return None
    dataset = entry["dataset"]
    sqnr = [_number(value) for value in fixed.get("sqnr_db") or []]
    distortion = [_number(value) for value in fixed.get("distortion") or []]
    similarity = [_number(value) for value in fixed.get("similarity") or []]
    figure, axes = _canvas(3, width=4.4, height=3.6)
    ranks = list(range(1, len(sqnr) + 1))
    axes[0].plot(ranks, sqnr, color=QUANT_COLOR, linewidth=1.3, label="SQNR(k)")
    _band_means(axes[0], document, entry, "sqnr_db")
    _rank_axis(axes[0], "SQNR (dB)", "SQNR per rank (higher = less quantization noise)")
    axes[1].plot(range(1, len(distortion) + 1), distortion, color=QUANT_COLOR, linewidth=1.3, label="D(k)")
    axes[1].axhline(0, color="0.3", linestyle="--", linewidth=1, label="no distortion")
    _band_means(axes[1], document, entry, "spectral_distortion")
    _rank_axis(axes[1], "D(k) = log10(m_q / m_fp)", "spectral distortion (< 0: rank damped)")
    k_sat = fixed.get("k_sat")
    axes[2].plot(range(1, len(similarity) + 1), similarity, color=FP32_COLOR, linewidth=1.3, label="Sim_k")
    axes[2].axhline(SATURATION_THRESHOLD, color="0.4", linestyle=":", linewidth=1, label=f"θ = {SATURATION_THRESHOLD}")
    if k_sat is not None:
        axes[2].axvline(k_sat, color=OOD_COLOR, linestyle="--", linewidth=1.2, label=f"k_sat = {k_sat}")
    finite = [value for value in similarity if not math.isnan(value)]
    low = min(finite + [SATURATION_THRESHOLD])
    axes[2].set_ylim(max(0.0, low - 0.1 * (1 - low) - 0.01), 1.0 + 0.05 * (1 - low) + 0.002)
    _rank_axis(axes[2], "Sim_k", "subspace similarity of top-k bases", xlabel="k")
    infinite = sum(1 for value in fixed.get("sqnr_db") or [] if value is None)
    rows = [{"rank": rank, "magnitude_fp": _at(fixed.get("magnitude_fp"), rank), "magnitude_q": _at(fixed.get("magnitude_q"), rank),
             "distortion": _at(fixed.get("distortion"), rank), "sqnr_db": _at(fixed.get("sqnr_db"), rank),
             "similarity": _at(fixed.get("similarity"), rank)} for rank in range(1, len(ranks) + 1)]
    mean_sqnr = find_record(document, task="spectral", dataset=dataset, metric="sqnr_db", param="ranks=all")
    caption = (f"Fixed FP32 eigenbasis of {dataset} penultimate features ({entry.get('n_images')} images, D = {entry.get('dim')}): "
               "SQNR in dB and spectral distortion per rank (log rank axis; horizontal segments are the octave-band means), "
               f"and the subspace similarity Sim_k of the FP32 and quantized top-k bases with the saturation rank k_sat = {k_sat} "
               f"(θ = {SATURATION_THRESHOLD})")
    if mean_sqnr is not None and mean_sqnr.get("value") is not None:
        caption += f"; mean SQNR {mean_sqnr['value']:.2f} dB"
    if infinite:
        caption += f"; {infinite} ranks have no quantization noise (SQNR +inf, not drawn)"
    return _save(figure, _frame(rows, FIXED_COLUMNS), out_dir, slug("spectral-fixed", entry.get("suite"), dataset, tag or run_tag(document)),
                 f"Spectral analysis, fixed basis: {dataset} — {run_label(document)}", caption + ".")


def _at(values: Sequence[Any] | None, rank: int) -> Any:
    return values[rank - 1] if values is not None and rank - 1 < len(values) else None


def _band_means(axis, document: Document, entry: Mapping[str, Any], metric: str) -> None:
    """Octave-band means (records with ``param`` ``ranks=a-b``) as horizontal segments over their ranks."""
    first = True
    for record in document.get("results", []):
        if record.get("task") != "spectral" or record.get("metric") != metric or record.get("dataset") != entry["dataset"]:
            continue
        interval = _interval(record.get("param"))
        if interval is None or record.get("value") is None:
            continue
        axis.hlines(record["value"], interval[0], interval[1] + 0.999, color="0.15", linewidth=2,
                    label="octave-band mean" if first else None)
        first = False


def _interval(param: Any) -> tuple[int, int] | None:
    match = re.fullmatch(r"ranks=(\d+)-(\d+)", str(param or ""))
    return (int(match.group(1)), int(match.group(2))) if match else None


def _rank_axis(axis, ylabel: str, title: str, xlabel: str = "rank k (FP32 eigenbasis)") -> None:
    """Log rank axis with plain ticks at the powers of two (the octave-band edges)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, StrMethodFormatter

    axis.set_xscale("log")
    top = max(2.0, axis.get_xlim()[1])
    axis.xaxis.set_major_locator(FixedLocator([2 ** j for j in range(int(math.log2(top)) + 1)]))
    axis.xaxis.set_major_formatter(StrMethodFormatter("{x:.0f}"))
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.25, which="both")
    axis.legend(fontsize=7, frameon=False)


def spectral_adaptive_figure(document: Document, entry: Mapping[str, Any], out_dir: Path, tag: str | None = None) -> Figure | None:
    """Adaptive (quantized) eigenbasis: zero-shot accuracy of rank-interval reconstructions and the energy curves."""
    adaptive = entry.get("adaptive")
    if not adaptive:
        return None
    dataset = entry["dataset"]
    intervals = [tuple(item) for item in adaptive.get("intervals") or []]
    figure, axes = _canvas(3, width=4.6, height=3.8)
    positions = list(range(len(intervals)))
    labels = [f"{a}" if a == b else f"{a}–{b}" for a, b in intervals]
    accuracy_fp = [_number(value) for value in adaptive.get("accuracy_fp") or []]
    accuracy_q = [_number(value) for value in adaptive.get("accuracy_q") or []]
    axes[0].bar([p - 0.2 for p in positions], accuracy_fp, width=0.4, color=FP32_COLOR, label="FP32 features in V")
    axes[0].bar([p + 0.2 for p in positions], accuracy_q, width=0.4, color=QUANT_COLOR, label="quantized features in W")
    axes[0].set_xticks(positions, labels, rotation=60, fontsize=7)
    axes[0].set_ylim(0, 1.05)
    axes[0].set_xlabel("rank interval [a, b]")
    axes[0].set_ylabel("zero-shot accuracy")
    axes[0].set_title("subspace accuracy per rank interval", fontsize=10)
    axes[0].legend(fontsize=7, frameon=False, loc="upper left")
    axes[0].grid(alpha=0.25, axis="y")
    energy_fp = [_number(value) for value in adaptive.get("energy_fp") or []]
    energy_q = [_number(value) for value in adaptive.get("energy_q") or []]
    deviation = [_number(value) for value in adaptive.get("energy_deviation") or []]
    axes[1].plot(range(1, len(energy_fp) + 1), energy_fp, color=FP32_COLOR, linewidth=1.4, label="E_fp(k)")
    axes[1].plot(range(1, len(energy_q) + 1), energy_q, color=QUANT_COLOR, linewidth=1.4, linestyle="--", label="E_q(k)")
    axes[1].set_ylim(0, 1.05)
    _rank_axis(axes[1], "cumulative energy fraction", "cumulative spectral energy", xlabel="rank k")
    axes[2].plot(range(1, len(deviation) + 1), deviation, color=OOD_COLOR, linewidth=1.4, label="ΔE(k) = E_q − E_fp")
    axes[2].axhline(0, color="0.3", linestyle="--", linewidth=1)
    _rank_axis(axes[2], "ΔE(k)", "energy deviation (> 0: energy moved to leading ranks)", xlabel="rank k")
    rows = [{"part": "interval", "a": a, "b": b, "accuracy_fp": _at(adaptive.get("accuracy_fp"), i + 1),
             "accuracy_q": _at(adaptive.get("accuracy_q"), i + 1)} for i, (a, b) in enumerate(intervals)]
    rows += [{"part": "rank", "rank": k, "energy_fp": _at(adaptive.get("energy_fp"), k), "energy_q": _at(adaptive.get("energy_q"), k),
              "energy_deviation": _at(adaptive.get("energy_deviation"), k)} for k in range(1, len(deviation) + 1)]
    csed, max_dev = adaptive.get("csed"), adaptive.get("max_abs_deviation")
    caption = (f"Adaptive basis of {dataset}: zero-shot accuracy of FP32 features reconstructed in the FP32 basis V and of "
               "quantized features in their own basis W for each rank interval (octave bands and cumulative top-k), the "
               "cumulative spectral energy of both SVDs and their deviation ΔE(k)"
               + (f"; CSED {csed:.4f}" if csed is not None else "")
               + (f", max |ΔE| {max_dev:.4f}" if max_dev is not None else ""))
    return _save(figure, _frame(rows, ADAPTIVE_COLUMNS), out_dir, slug("spectral-adaptive", entry.get("suite"), dataset, tag or run_tag(document)),
                 f"Spectral analysis, adaptive basis: {dataset} — {run_label(document)}", caption + ".")


def spectral_fourier_figure(document: Document, entry: Mapping[str, Any], out_dir: Path, tag: str | None = None) -> Figure | None:
    """FP32 and quantized Fourier amplitude maps of the patch tokens, the RSE map and the radial profile."""
    fourier = entry.get("fourier")
    if not fourier:
        return None
    import numpy as np
    from matplotlib.colors import LogNorm

    dataset = entry["dataset"]
    amplitude_fp = np.asarray(fourier["amplitude_fp"], dtype=float)
    amplitude_q = np.asarray(fourier["amplitude_q"], dtype=float)
    rse = np.asarray(fourier["rse"], dtype=float)
    height, width = rse.shape
    extent = (-(width // 2) - 0.5, width - width // 2 - 0.5, height - height // 2 - 0.5, -(height // 2) - 0.5)
    figure, axes = _canvas(4, width=3.7, height=3.5)
    positive = np.concatenate([amplitude_fp.ravel(), amplitude_q.ravel()])
    positive = positive[positive > 0]
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size and positive.min() < positive.max() else None
    for axis, amplitude, label in ((axes[0], amplitude_fp, "FP32 amplitude A_fp"), (axes[1], amplitude_q, "quantized amplitude A_q")):
        image = axis.imshow(amplitude, norm=norm, cmap="viridis", extent=extent, interpolation="nearest")
        _log_colorbar(figure.colorbar(image, ax=axis, shrink=0.75))
        _frequency_axes(axis, label)
    image = axes[2].imshow(rse, cmap="magma", extent=extent, interpolation="nearest", vmin=0)
    figure.colorbar(image, ax=axes[2], shrink=0.75, label="RSE")
    _frequency_axes(axes[2], "relative spectral error")
    radial_rse = [_number(value) for value in fourier.get("radial_rse") or []]
    axes[3].plot(range(len(radial_rse)), radial_rse, color=OOD_COLOR, marker="o", markersize=3, linewidth=1.3, label="RSE(r)")
    axes[3].set_xlabel("radius r (frequency index)")
    axes[3].set_ylabel("mean RSE")
    axes[3].set_title("radial profile", fontsize=10)
    axes[3].grid(alpha=0.25)
    twin = axes[3].twinx()
    for key, color, style, label in (("radial_amplitude_fp", FP32_COLOR, "-", "A_fp(r)"), ("radial_amplitude_q", QUANT_COLOR, "--", "A_q(r)")):
        values = [_number(value) for value in fourier.get(key) or []]
        if values:
            twin.plot(range(len(values)), values, color=color, linestyle=style, linewidth=1, label=label)
    twin.set_yscale("log")
    twin.set_ylabel("mean amplitude (log)")
    handles = axes[3].get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    axes[3].legend(handles, [h.get_label() for h in handles], fontsize=7, frameon=False, ncol=3,
                   loc="upper center", bbox_to_anchor=(0.5, -0.2))
    rows = [{"part": "map", "u": j - width // 2, "v": i - height // 2, "amplitude_fp": amplitude_fp[i, j],
             "amplitude_q": amplitude_q[i, j], "rse": rse[i, j]} for i in range(height) for j in range(width)]
    rows += [{"part": "radial", "radius": r, "radial_rse": value, "radial_amplitude_fp": _at(fourier.get("radial_amplitude_fp"), r + 1),
              "radial_amplitude_q": _at(fourier.get("radial_amplitude_q"), r + 1)} for r, value in enumerate(radial_rse)]
    bands = fourier.get("bands") or {}
    band_text = ", ".join(f"{band} {bands[band]:.4f}" for band in ("low", "mid", "high") if bands.get(band) is not None)
    caption = (f"2D Fourier amplitude of {dataset} last-block patch tokens ({height}×{width} grid, {fourier.get('n_images')} images; "
               "zero frequency at the centre, log colour scale shared by FP32 and quantized), the relative spectral error "
               "|A_q − A_fp| / A_fp per frequency and its radial profile" + (f"; band means of RSE: {band_text}" if band_text else ""))
    return _save(figure, _frame(rows, FOURIER_COLUMNS), out_dir, slug("spectral-fourier", entry.get("suite"), dataset, tag or run_tag(document)),
                 f"Fourier spectrum of patch tokens: {dataset} — {run_label(document)}", caption + ".")


def _log_colorbar(colorbar) -> None:
    """Plain-number labels on a log colour bar, no crowded minor labels."""
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    colorbar.ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=6))
    colorbar.ax.yaxis.set_major_formatter(StrMethodFormatter("{x:.3g}"))
    colorbar.ax.yaxis.set_minor_formatter(NullFormatter())


def _frequency_axes(axis, title: str) -> None:
    """Title, labels and integer frequency ticks (the cells sit at integer (u, v), zero frequency centred)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_title(title, fontsize=10)
    axis.set_xlabel("u")
    axis.set_ylabel("v")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))


# -- robustness and spurious (scoring.md §2.6) ---------------------------------------------------
ROBUSTNESS_COLUMNS = ("config_hash", "run", "suite", "dataset", "role", "fp32", "quantized", "delta")
SPURIOUS_COLUMNS = ("dataset", "group", "state", "logit_tuned", "accuracy")
MEAN_DATASET = "shifted-mean"


def robustness_suites(documents: Iterable[Document]) -> list[str]:
    """Suites with ``task == "robustness"`` accuracy records, in order of appearance."""
    return list(dict.fromkeys(record["suite"] for document in documents for record in document.get("results", [])
                              if record.get("task") == "robustness" and record.get("metric") == "accuracy"))


def _clean_datasets(records: Sequence[Record]) -> set[str]:
    """The clean (ID) sets of a robustness task: the ID side of its shift-detection records."""
    return {record["id_dataset"] for record in records if record.get("ood_kind") == "shift" and record.get("id_dataset")}


def robustness_figure(documents: Sequence[Document], suite: str, out_dir: Path, name: str | None = None) -> Figure | None:
    """Relative accuracy change δ = (A_fp − A_q)/A_fp per shifted dataset of ``suite``, one bar series per run.

    The ``shifted-mean`` bar is hatched and set apart; the clean set's δ is a dashed line per run. Only
    untuned records are drawn: logit tuning re-fits one scale, which keeps every argmax and so the accuracy.
    """
    import numpy as np

    series = []  # (label, document, {dataset: record}, clean record)
    datasets: list[str] = []
    for document, label in zip(documents, distinct_labels(documents)):
        records = [r for r in document.get("results", []) if r.get("task") == "robustness" and r.get("suite") == suite]
        clean = _clean_datasets(records)
        accuracy = {r["dataset"]: r for r in records if r.get("metric") == "accuracy" and not r.get("logit_tuned")
                    and r.get("ood_dataset") is None}
        if not accuracy:
            continue
        shifted = {key: record for key, record in accuracy.items() if key not in clean}
        datasets += [key for key in shifted if key != MEAN_DATASET]
        series.append((label, document, shifted, next((accuracy[key] for key in accuracy if key in clean), None)))
    if not series:
        return None
    columns = list(dict.fromkeys(datasets)) + [MEAN_DATASET]
    figure, axes = _canvas(1, width=max(5.5, 1.0 + 0.9 * len(columns) * len(series) ** 0.5), height=4.2)
    axis = axes[0]
    width = 0.8 / len(series)
    rows = []
    for position, (label, document, shifted, clean_record) in enumerate(series):
        color = PALETTE[position % len(PALETTE)]
        xs = np.arange(len(columns)) - 0.4 + width * (position + 0.5)
        deltas = [100 * _number((shifted.get(key) or {}).get("delta")) for key in columns]
        bars = axis.bar(xs[:-1], deltas[:-1], width=width, color=color, label=label)
        mean_bar = axis.bar(xs[-1:], deltas[-1:], width=width, color=color, hatch="//", edgecolor="black", linewidth=0.8)
        if len(series) <= 2:
            axis.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
            axis.bar_label(mean_bar, fmt="%.1f", fontsize=7, padding=2)
        if clean_record is not None and clean_record.get("delta") is not None:
            axis.axhline(100 * clean_record["delta"], color=color, linestyle="--", linewidth=1,
                         label=f"clean {clean_record['dataset']} δ" + (f" ({label})" if len(series) > 1 else ""))
        chosen = [(key, shifted[key], "mean" if key == MEAN_DATASET else "shifted") for key in columns if key in shifted]
        if clean_record is not None:
            chosen.append((clean_record["dataset"], clean_record, "clean"))
        rows += [{"config_hash": run_tag(document), "run": label, "suite": suite, "dataset": key, "role": role,
                  "fp32": record.get("fp32"), "quantized": record.get("quantized"), "delta": record.get("delta")}
                 for key, record, role in chosen]
    axis.axhline(0, color="0.2", linewidth=0.8)
    axis.axvline(len(columns) - 1.5, color="0.6", linewidth=0.8, linestyle=":")
    axis.set_xticks(range(len(columns)), [*columns[:-1], "mean of shifted"], rotation=20, ha="right", fontsize=8)
    axis.set_ylabel("δ = (A_fp − A_q) / A_fp  (%)")
    axis.grid(alpha=0.25, axis="y")
    axis.margins(y=0.15)
    axis.legend(fontsize=7, framealpha=0.85, edgecolor="none", loc="best")
    single = len(documents) == 1
    name = name or slug("robustness-delta", suite, run_tag(documents[0]) if single else None)
    means = ", ".join(f"{label} {pct((shifted.get(MEAN_DATASET) or {}).get('delta'), 2)}" for label, _, shifted, _ in series)
    caption = (f"Relative change of top-1 accuracy δ = (A_fp − A_q)/A_fp in percent on each shifted dataset of {suite} "
               "(> 0: the quantized model lost accuracy); the hatched bar on the right is the mean over the shifted sets and "
               f"dashed lines mark δ on the clean set; mean δ: {means}")
    title = f"Accuracy change under shift: suite {suite}" + (f" — {run_label(documents[0])}" if single else f" — {len(series)} runs")
    return _save(figure, _frame(rows, ROBUSTNESS_COLUMNS), out_dir, name, title, caption + ".")


def distinct_labels(documents: Sequence[Document]) -> list[str]:
    """A legend label per run: quantizer, bits, scope and seed, with the model when models differ and the
    config hash when labels would still repeat."""
    models = {document.get("config", {}).get("model") for document in documents}
    labels = [(f"{document['config'].get('model')} " if len(models) > 1 else "") + run_label(document) for document in documents]
    if len(set(labels)) < len(labels):
        labels = [f"{label} [{run_tag(document)[:8]}]" for label, document in zip(labels, documents)]
    return labels


def spurious_pairs(document: Document) -> list[tuple[str, str, str]]:
    """(suite, common, counter) of each spurious task, read from its ``rsg`` records' ``common+counter`` dataset."""
    pairs = []
    for record in document.get("results", []):
        if record.get("task") == "spurious" and record.get("metric") == "rsg" and "+" in str(record.get("dataset")):
            common, counter = str(record["dataset"]).split("+", 1)
            pairs.append((record["suite"], common, counter))
    return list(dict.fromkeys(pairs))


def spurious_figure(document: Document, suite: str, common: str, counter: str, out_dir: Path,
                    tag: str | None = None) -> Figure | None:
    """Accuracy on the common- and counter-background groups, FP32 vs quantized (and tuned); RSG in the caption."""
    import numpy as np

    states = [("fp32", False), ("quantized", False)]
    if find_record(document, task="spurious", suite=suite, dataset=common, metric="accuracy", logit_tuned=True):
        states.append(("quantized", True))
    figure, axes = _canvas(1, width=5.4, height=4.0)
    axis = axes[0]
    rows = []
    width = 0.8 / len(states)
    for position, (state, tuned) in enumerate(states):
        values = []
        for group, dataset in (("common", common), ("counter", counter)):
            record = find_record(document, task="spurious", suite=suite, dataset=dataset, metric="accuracy", logit_tuned=tuned)
            value = None if record is None else record["fp32" if state == "fp32" else "quantized"]
            values.append(_number(value))
            rows.append({"dataset": dataset, "group": group, "state": state, "logit_tuned": tuned, "accuracy": value})
        xs = np.arange(2) - 0.4 + width * (position + 0.5)
        bars = axis.bar(xs, [100 * v for v in values], width=width, color=_state_color(state, tuned),
                        label=_state_label(state, tuned))
        axis.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    axis.set_xticks([0, 1], [f"common\n{common}", f"counter\n{counter}"], fontsize=8)
    axis.set_ylabel("top-1 accuracy (%)")
    axis.set_ylim(0, 112)
    axis.grid(alpha=0.25, axis="y")
    axis.legend(fontsize=8, frameon=False, loc="upper right")
    pair = f"{common}+{counter}"
    rsg = find_record(document, task="spurious", suite=suite, dataset=pair, metric="rsg", logit_tuned=False)
    delta_rsg = find_record(document, task="spurious", suite=suite, dataset=pair, metric="delta_rsg", logit_tuned=False)
    v_add = find_record(document, task="spurious", suite=suite, dataset=pair, metric="v_add", logit_tuned=False)
    parts = [f"Top-1 accuracy on the common-background group {common} and the counter-background group {counter} of {suite}"]
    if rsg is not None:
        parts.append(f"RSG = (A_N − A_C)/A_N: FP32 {_plain(rsg.get('fp32'))}, quantized {_plain(rsg.get('quantized'))}")
    if delta_rsg is not None:
        parts.append(f"ΔRSG {_plain(delta_rsg.get('value'))}")
    if v_add is not None:
        parts.append(f"V_add {_plain(v_add.get('value'))}")
    return _save(figure, _frame(rows, SPURIOUS_COLUMNS), out_dir, slug("spurious", suite, common, tag or run_tag(document)),
                 f"Spurious correlation: {suite} — {run_label(document)}", "; ".join(parts) + ".")


def _plain(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


# -- weight-dropout probe (scoring.md §4) --------------------------------------------------------
DROPOUT_COLUMNS = ("rate", "repeat", "accuracy", "kept_fraction", "mean_accuracy", "relative_drop")


def dropout_figure(document: Document, entry: Mapping[str, Any], out_dir: Path, tag: str | None = None) -> Figure | None:
    """FP32 zero-shot accuracy against the weight-dropout rate p: each repeat, their mean, and the p = 0 reference."""
    rates = [float(rate) for rate in entry.get("rates") or []]
    if not rates:
        return None
    dataset = entry["dataset"]
    reference = entry.get("reference_accuracy")
    accuracies = entry.get("accuracies") or [[] for _ in rates]
    kept = entry.get("kept_fractions") or [[] for _ in rates]
    means = [_number(value) for value in entry.get("mean_accuracy") or []]
    drops = entry.get("relative_drop") or [None] * len(rates)
    figure, axes = _canvas(1, width=5.4, height=4.0)
    axis = axes[0]
    rows = []
    for rate, repeats, fractions, mean, drop in zip(rates, accuracies, kept, means, drops):
        axis.scatter([rate] * len(repeats), [100 * _number(value) for value in repeats], color=FP32_COLOR, alpha=0.45, s=18,
                     linewidths=0, label="repeat" if not rows else None)
        for repeat, value in enumerate(repeats):
            rows.append({"rate": rate, "repeat": repeat, "accuracy": value,
                         "kept_fraction": fractions[repeat] if repeat < len(fractions) else None,
                         "mean_accuracy": mean, "relative_drop": drop})
    xs, ys = ([0.0] if reference is not None else []) + rates, ([100 * reference] if reference is not None else []) + [100 * m for m in means]
    axis.plot(xs, ys, color=FP32_COLOR, marker="o", linewidth=1.5, label="mean over repeats")
    if reference is not None:
        axis.axhline(100 * reference, color="0.3", linestyle="--", linewidth=1, label=f"no dropout {pct(reference)}")
        rows.append({"rate": 0.0, "repeat": None, "accuracy": reference, "kept_fraction": 1.0, "mean_accuracy": reference,
                     "relative_drop": 0.0})
    axis.set_xlabel("weight dropout rate p")
    axis.set_ylabel("zero-shot top-1 accuracy (%)")
    axis.grid(alpha=0.25)
    axis.legend(fontsize=8, frameon=False)
    towers = ", ".join(entry.get("towers") or [])
    caption = (f"Weight-dropout redundancy probe of the FP32 model on {dataset} ({entry.get('n_images')} images; towers {towers}; "
               f"{entry.get('repeats')} repeats per rate, {'with' if entry.get('rescale') else 'no'} 1/(1−p) rescaling): accuracy "
               "of each repeat (dots) and their mean against the rate; relative drop δ_drop(p): "
               + ", ".join(f"p={rate:.2f} {pct(drop, 2)}" for rate, drop in zip(rates, drops)))
    return _save(figure, _frame(rows, DROPOUT_COLUMNS), out_dir, slug("dropout", entry.get("suite"), dataset, tag or run_tag(document)),
                 f"Weight dropout: {dataset} — {run_label(document)}", caption + ".")


# -- all figures of a run ------------------------------------------------------------------------
def reliability_datasets(document: Document) -> list[str]:
    """Datasets with reliability bins or bin trajectories, in document order."""
    return list(dict.fromkeys([item["dataset"] for item in document.get("reliability", [])]
                              + [item["dataset"] for item in document.get("bin_trajectories", [])]))


def run_figures(document: Document, out_dir: Path, include_robustness: bool = True) -> list[Figure]:
    """Every figure the run's document has data for (file names carry its config hash).

    ``include_robustness=False`` leaves out the robustness bars, for reports that group runs in one chart.
    """
    out_dir = Path(out_dir)
    tag = run_tag(document)
    figures: list[Figure | None] = [reliability_figure(document, dataset, out_dir, tag) for dataset in reliability_datasets(document)]
    figures += [ood_histogram_figure(document, key, out_dir, tag) for key in histogram_groups(document)]
    for entry in document.get("spectral", []) or []:
        figures += [spectral_fixed_figure(document, entry, out_dir, tag), spectral_adaptive_figure(document, entry, out_dir, tag),
                    spectral_fourier_figure(document, entry, out_dir, tag)]
    if include_robustness:
        figures += [robustness_figure([document], suite, out_dir) for suite in robustness_suites([document])]
    figures += [spurious_figure(document, suite, common, counter, out_dir, tag) for suite, common, counter in spurious_pairs(document)]
    figures += [dropout_figure(document, entry, out_dir, tag) for entry in document.get("dropout", []) or []]
    return [figure for figure in figures if figure is not None]
