"""Figures of qbench.reporting.plots on synthetic evaluation documents: each PNG opens and is not blank, each CSV
holds the numbers drawn, figures appear only when the document has their section.

:func:`synthetic_document` fills every section of the issue 7 contract with small plausible numbers,
computed with the library itself (reliability bins, bin trajectories, OOD metrics, spectral curves)
from seeded random logits and features, so the sections agree with each other like a real run's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from qbench.analysis import metrics

from qbench.reporting import plots

from qbench.analysis import spectral
from qbench.analysis.ood_metrics import ood_metrics

N_CLASSES = 10
SHIFTED = ("toy-gaussian_noise", "toy-defocus_blur", "toy-brightness", "toy-contrast")
COMMON, COUNTER = "toy-spurious-common", "toy-spurious-counter"


# -- the synthetic document -----------------------------------------------------------------------
def _plain(item) -> dict:
    return {key: (None if isinstance(value, float) and math.isnan(value) else list(value) if isinstance(value, tuple) else value)
            for key, value in dataclasses.asdict(item).items()}


def _paired(suite, task, dataset, metric, fp, q, tuned=False, **extra) -> dict:
    return {"suite": suite, "suite_version": 1, "task": task, "dataset": dataset, "metric": metric, "fp32": fp,
            "quantized": q, "delta": metrics.relative_change(fp, q), "diff": q - fp, "logit_tuned": tuned, **extra}


def _single(suite, task, dataset, metric, value, param=None) -> dict:
    return {"suite": suite, "suite_version": 1, "task": task, "dataset": dataset, "metric": metric, "fp32": None,
            "quantized": None, "delta": None, "diff": None, "logit_tuned": False, "value": value,
            **({"param": param} if param else {})}


def _logits(rng, n: int, strength: float, noise: float):
    labels = rng.integers(0, N_CLASSES, n)
    clean = rng.normal(0, 1.0, (n, N_CLASSES)) + strength * np.eye(N_CLASSES)[labels]
    return labels, 3.0 * clean, 3.0 * (clean + noise * rng.normal(0, 1.0, clean.shape))


def _classification(rng, suite, task, dataset, strength, noise, tuned_scale, state):
    """Accuracy/ECE/NLL records, reliability bins and trajectories of one dataset."""
    labels, fp, q = _logits(rng, 400, strength, noise)
    tuned = q * tuned_scale
    records = []
    for is_tuned, logits_q in ((False, q), (True, tuned)):
        for metric, fn in (("accuracy", metrics.accuracy), ("ece", metrics.expected_calibration_error),
                           ("nll", metrics.negative_log_likelihood)):
            records.append(_paired(suite, task, dataset, metric, fn(fp, labels), fn(logits_q, labels), is_tuned))
    if dataset not in state["reliability_done"]:
        state["reliability_done"].add(dataset)
        for name, logits, is_tuned in (("fp32", fp, False), ("quantized", q, False), ("quantized", tuned, True)):
            section = {"dataset": dataset, "state": name, "bins": [_plain(b) for b in metrics.reliability_bins(logits, labels)]}
            state["reliability"].append({**section, "logit_tuned": True} if is_tuned else section)
        for target, logits in (("quantized", q), ("quantized-tuned", tuned)):
            trajectory = metrics.bin_trajectory(fp, logits, labels)
            state["trajectories"].append({"dataset": dataset, "target": target, "n_bins": trajectory.n_bins,
                                          "flip_rate": trajectory.flip_rate, "bins": [_plain(b) for b in trajectory.bins]})
    return records, fp, q, tuned


def _msp(logits):
    return metrics.softmax(logits).max(axis=1)


def _detection(suite, task, id_name, ood_name, kind, id_logits, ood_logits, state):
    """AUROC/FPR@95 records (untuned and tuned) and histograms of the MSP score for one ID/OOD pair."""
    records = []
    for tuned in (False, True):
        values = {name: ood_metrics(_msp(id_logits[name]), _msp(ood_logits[name])) for name in ("fp32", "quantized" if not tuned else "tuned")}
        q_name = "tuned" if tuned else "quantized"
        for metric in ("auroc", "fpr95"):
            records.append(_paired(suite, task, ood_name, metric, values["fp32"][metric], values[q_name][metric], tuned,
                                   scorer="msp", id_dataset=id_name, ood_dataset=ood_name, ood_kind=kind))
    for name, tuned in (("fp32", False), ("quantized", False), ("tuned", True)):
        id_scores, ood_scores = _msp(id_logits[name]), _msp(ood_logits[name])
        edges = np.linspace(min(id_scores.min(), ood_scores.min()), max(id_scores.max(), ood_scores.max()), 31)
        state["histograms"].append({
            "suite": suite, "task": task, "scorer": "msp", "id_dataset": id_name, "ood_dataset": ood_name, "ood_kind": kind,
            "state": "fp32" if name == "fp32" else "quantized", "logit_tuned": tuned, "edges": edges.tolist(),
            "id_counts": np.histogram(id_scores, edges)[0].tolist(), "ood_counts": np.histogram(ood_scores, edges)[0].tolist()})
    return records


def _spectral_entry(rng, noise: float) -> tuple[dict, list[dict]]:
    """Fixed/adaptive/Fourier sections and their records from features with a decaying spectrum plus noise."""
    dim, n = 32, 256
    scales = 1.0 / np.arange(1, dim + 1) ** 0.8
    h_fp = rng.normal(0, 1, (n, dim)) * scales + 0.3
    h_q = h_fp + noise * 0.05 * rng.normal(0, 1, (n, dim))
    basis_fp, basis_q = spectral.eigenbasis(h_fp), spectral.eigenbasis(h_q)
    fixed = spectral.fixed_basis_spectrum(h_fp, h_q, basis_fp)
    similarity = spectral.subspace_similarity(basis_fp.basis, basis_q.basis)
    k_sat = spectral.saturation_rank(similarity)
    energy = spectral.energy_deviation(basis_fp.singular_values, basis_q.singular_values)
    intervals = list(dict.fromkeys(spectral.octave_intervals(dim) + spectral.cumulative_intervals(dim)))
    accuracy_fp = [min(0.95, 0.2 + 0.12 * math.log2(b - a + 2) + (0.25 if a == 1 else 0)) for a, b in intervals]
    accuracy_q = [max(0.0, value - 0.03 * noise * (1 + math.log2(a))) for value, (a, _) in zip(accuracy_fp, intervals)]
    maps_fp = rng.normal(0, 1, (8, 16, 7, 7)) + 2.0
    maps_q = maps_fp + noise * 0.3 * rng.normal(0, 1, maps_fp.shape)
    amplitude_fp, amplitude_q = spectral.fourier_amplitude(maps_fp), spectral.fourier_amplitude(maps_q)
    rse = spectral.relative_spectral_error(amplitude_fp, amplitude_q)
    bands = spectral.radial_bands(rse)
    sqnr = [None if math.isinf(value) else float(value) for value in fixed.sqnr_db]
    entry = {
        "suite": "spectral-toy", "dataset": "toy-id-test", "n_images": n, "dim": dim,
        "fixed": {"magnitude_fp": fixed.magnitude_fp.tolist(), "magnitude_q": fixed.magnitude_q.tolist(),
                  "distortion": fixed.distortion.tolist(), "sqnr_db": sqnr, "similarity": similarity.tolist(), "k_sat": k_sat},
        "adaptive": {"intervals": [list(item) for item in intervals], "accuracy_fp": accuracy_fp, "accuracy_q": accuracy_q,
                     "energy_fp": spectral.cumulative_energy(basis_fp.singular_values).tolist(),
                     "energy_q": spectral.cumulative_energy(basis_q.singular_values).tolist(),
                     "energy_deviation": energy.curve.tolist(), "csed": energy.csed, "max_abs_deviation": energy.max_abs},
        "fourier": {"grid": [7, 7], "n_images": 8, "amplitude_fp": amplitude_fp.tolist(), "amplitude_q": amplitude_q.tolist(),
                    "rse": rse.tolist(), "radial_rse": spectral.radial_profile(rse).tolist(),
                    "radial_amplitude_fp": spectral.radial_profile(amplitude_fp).tolist(),
                    "radial_amplitude_q": spectral.radial_profile(amplitude_q).tolist(),
                    "bands": {"low": bands.low, "mid": bands.mid, "high": bands.high},
                    "dc_fp": spectral.dc_term(amplitude_fp), "dc_q": spectral.dc_term(amplitude_q)},
        "notes": ["synthetic features for the plot tests"],
    }
    suite, task, dataset = "spectral-toy", "spectral", "toy-id-test"
    records = []
    for a, b in spectral.octave_intervals(dim):
        finite = [value for value in sqnr[a - 1:b] if value is not None]
        records.append(_single(suite, task, dataset, "sqnr_db", float(np.mean(finite)) if finite else None, f"ranks={a}-{b}"))
        records.append(_single(suite, task, dataset, "spectral_distortion", float(np.mean(fixed.distortion[a - 1:b])), f"ranks={a}-{b}"))
    records.append(_single(suite, task, dataset, "sqnr_db", float(np.mean([v for v in sqnr if v is not None])), "ranks=all"))
    k = 1
    while k <= dim:
        records.append(_single(suite, task, dataset, "subspace_similarity", float(similarity[k - 1]), f"k={k}"))
        k *= 2
    records.append(_single(suite, task, dataset, "k_sat", k_sat))
    for (a, b), fp, q in zip(intervals, accuracy_fp, accuracy_q):
        records.append(_paired(suite, task, dataset, "subspace_accuracy", fp, q, param=f"ranks={a}-{b}"))
    records += [_single(suite, task, dataset, "csed", energy.csed), _single(suite, task, dataset, "max_energy_deviation", energy.max_abs)]
    for band in ("low", "mid", "high"):
        records.append(_single(suite, task, dataset, "rse", getattr(bands, band), f"band={band}"))
    records.append(_single(suite, task, dataset, "rse", float(rse.mean()), "band=all"))
    records.append(_paired(suite, task, dataset, "dc_amplitude", spectral.dc_term(amplitude_fp), spectral.dc_term(amplitude_q)))
    return entry, records


def _dropout_entry(rng) -> tuple[dict, list[dict]]:
    rates, reference = [0.05, 0.10, 0.20, 0.30], 0.93
    accuracies = [[reference * (1 - 0.9 * rate ** 1.5) + rng.normal(0, 0.004) for _ in range(3)] for rate in rates]
    means = [float(np.mean(row)) for row in accuracies]
    drops = [(reference - mean) / reference for mean in means]
    entry = {"suite": "spectral-toy", "dataset": "toy-id-test", "n_images": 400, "towers": ["visual", "text"], "rescale": False,
             "rates": rates, "repeats": 3, "seed": 0, "reference_accuracy": reference, "accuracies": accuracies,
             "mean_accuracy": means, "relative_drop": drops,
             "kept_fractions": [[1 - rate + rng.normal(0, 1e-3) for _ in range(3)] for rate in rates]}
    records = [_single("spectral-toy", "dropout", "toy-id-test", "dropout_accuracy", means[1], "p=0.10"),
               _single("spectral-toy", "dropout", "toy-id-test", "dropout_delta", drops[1], "p=0.10")]
    return entry, records


def synthetic_document(seed: int = 0, noise: float = 0.6, quantizer: str = "minmax", bits: str = "w4a8") -> dict:
    """A complete evaluation document (every section of the issue 7 contract) from seeded random numbers."""
    rng = np.random.default_rng(seed)
    config = {"model": "toy-clip", "weights_tag": "toy-v1-synthetic", "quantizer": quantizer, "quantizer_params": {},
              "bits": bits, "scope": "visual", "proxy": "toy-proxy", "proxy_n": 100, "seed": seed, "limit": None,
              "suites": [{"name": name, "version": 1} for name in ("toy-ood", "robustness-toy", "spurious-toy", "spectral-toy")],
              "logit_tuning": True}
    config["config_hash"] = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    state = {"reliability": [], "trajectories": [], "histograms": [], "reliability_done": set()}
    results, logits = [], {}
    records, fp, q, tuned = _classification(rng, "toy-ood", "zeroshot", "toy-id-test", 2.5, noise, 0.8, state)
    results += records
    logits["toy-id-test"] = {"fp32": fp, "quantized": q, "tuned": tuned}
    for ood_name, kind, strength in (("toy-ood-near", "near", 0.8), ("toy-ood-far", "far", 0.0)):
        _, fp_o, q_o = _logits(rng, 300, strength, noise)
        results += _detection("toy-ood", "ood", "toy-id-test", ood_name, kind, logits["toy-id-test"],
                              {"fp32": fp_o, "quantized": q_o, "tuned": 0.8 * q_o}, state)
    clean_fp = [r for r in results if r["task"] == "zeroshot" and r["metric"] == "accuracy" and not r["logit_tuned"]][0]
    results.append(_paired("robustness-toy", "robustness", "toy-id-test", "accuracy", clean_fp["fp32"], clean_fp["quantized"]))
    shifted = []
    for position, name in enumerate(SHIFTED):
        records, fp, q, tuned = _classification(rng, "robustness-toy", "robustness", name, 2.0 - 0.3 * position,
                                                noise * (1 + 0.4 * position), 0.8, state)
        results += [r for r in records if r["metric"] == "accuracy"]
        shifted += [r for r in records if r["metric"] == "accuracy" and not r["logit_tuned"]]
        results += _detection("robustness-toy", "robustness", "toy-id-test", name, "shift", logits["toy-id-test"],
                              {"fp32": fp, "quantized": q, "tuned": tuned}, state)
    mean_fp, mean_q = float(np.mean([r["fp32"] for r in shifted])), float(np.mean([r["quantized"] for r in shifted]))
    results.append(_paired("robustness-toy", "robustness", "shifted-mean", "accuracy", mean_fp, mean_q))
    groups = {}
    for name, strength in ((COMMON, 2.6), (COUNTER, 1.4)):
        records, *_ = _classification(rng, "spurious-toy", "spurious", name, strength, noise, 0.8, state)
        accuracy = [r for r in records if r["metric"] == "accuracy" and not r["logit_tuned"]][0]
        groups[name] = accuracy
        results += [accuracy, {**accuracy, "metric": "accuracy_balanced"}]
    a_n, a_c = groups[COMMON], groups[COUNTER]
    rsg_fp, rsg_q = (a_n["fp32"] - a_c["fp32"]) / a_n["fp32"], (a_n["quantized"] - a_c["quantized"]) / a_n["quantized"]
    pair = f"{COMMON}+{COUNTER}"
    results += [_paired("spurious-toy", "spurious", pair, "rsg", rsg_fp, rsg_q),
                _single("spurious-toy", "spurious", pair, "delta_rsg", rsg_q - rsg_fp),
                _single("spurious-toy", "spurious", pair, "v_add", a_c["delta"] - a_n["delta"])]
    spectral_entry, spectral_records = _spectral_entry(rng, noise)
    dropout_entry, dropout_records = _dropout_entry(rng)
    results += spectral_records + dropout_records
    return {"config": config, "provenance": {"created_at": f"2025-01-0{1 + seed % 9}T00:00:00+00:00"},
            "verification": {"passed": True, "n_modules": 12, "problems": []}, "results": results, "skipped": [],
            "reliability": state["reliability"], "bin_trajectories": state["trajectories"],
            "ood_histograms": state["histograms"], "spectral": [spectral_entry], "dropout": [dropout_entry],
            "datasets": {}}


# -- checks shared with the report and CLI tests --------------------------------------------------
def assert_png_has_content(path) -> None:
    """The PNG opens with PIL and is not one flat colour."""
    with Image.open(path) as image:
        image.load()
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100, path
    assert pixels.var() > 1.0, f"{path} looks blank"


def assert_csv_columns(path, columns) -> pd.DataFrame:
    frame = pd.read_csv(path)
    assert list(frame.columns) == list(columns), path
    assert len(frame) > 0, path
    return frame


@pytest.fixture(scope="module")
def document():
    return synthetic_document()


@pytest.fixture(scope="module")
def figures(document, tmp_path_factory):
    out = tmp_path_factory.mktemp("plots")
    return {figure.name: figure for figure in plots.run_figures(document, out)}


# -- tests --------------------------------------------------------------------------------------
def test_every_section_gives_its_figures(document, figures):
    tag = document["config"]["config_hash"]
    expected = {f"reliability-{name}-{tag}" for name in ("toy-id-test", *SHIFTED, COMMON, COUNTER)}
    expected |= {f"ood-toy-ood-msp-toy-id-test-vs-{name}-{tag}" for name in ("toy-ood-near", "toy-ood-far")}
    expected |= {f"ood-robustness-toy-msp-toy-id-test-vs-{name}-{tag}" for name in SHIFTED}
    expected |= {f"spectral-{kind}-spectral-toy-toy-id-test-{tag}" for kind in ("fixed", "adaptive", "fourier")}
    expected |= {f"robustness-delta-robustness-toy-{tag}", f"spurious-spurious-toy-{COMMON}-{tag}",
                 f"dropout-spectral-toy-toy-id-test-{tag}"}
    assert set(figures) == expected
    for figure in figures.values():
        assert figure.png.name == f"{figure.name}.png" and figure.csv.name == f"{figure.name}.csv"
        assert figure.title and figure.caption.endswith(".")
        assert_png_has_content(figure.png)


def test_reliability_csv_and_caption_follow_the_sections(document, figures):
    figure = figures[f"reliability-toy-id-test-{document['config']['config_hash']}"]
    frame = assert_csv_columns(figure.csv, plots.RELIABILITY_COLUMNS)
    bars = frame[frame.panel == "reliability"]
    assert set(bars.series) == {"FP32", "quantized", "quantized (logit-tuned)"}
    assert (bars.groupby("series").n.sum() == 400).all()
    arrows = frame[frame.panel == "trajectory"]
    trajectory = next(t for t in document["bin_trajectories"] if t["dataset"] == "toy-id-test" and t["target"] == "quantized")
    mine = arrows[arrows.series == "FP32 → quantized"].sort_values("bin")
    assert mine.conf_q.tolist() == pytest.approx([b["conf_q"] for b in trajectory["bins"]])
    ece = plots.find_record(document, dataset="toy-id-test", metric="ece", logit_tuned=False)
    assert f"FP32 {plots.pct(ece['fp32'], 2)}" in figure.caption and f"quantized {plots.pct(ece['quantized'], 2)}" in figure.caption
    assert "logit-tuned quantized" in figure.caption and "flip rate" in figure.caption


def test_histogram_panels_carry_auroc_from_the_results(document, figures):
    figure = figures[f"ood-toy-ood-msp-toy-id-test-vs-toy-ood-near-{document['config']['config_hash']}"]
    frame = assert_csv_columns(figure.csv, plots.HISTOGRAM_COLUMNS)
    assert len(frame) == 3 * 30 and frame.groupby(["state", "logit_tuned"]).id_fraction.sum().round(9).eq(1).all()
    auroc = plots.find_record(document, task="ood", scorer="msp", ood_dataset="toy-ood-near", metric="auroc", logit_tuned=False)
    assert f"FP32 AUROC {plots.pct(auroc['fp32'])}" in figure.caption
    assert f"quantized AUROC {plots.pct(auroc['quantized'])}" in figure.caption
    shift = figures[f"ood-robustness-toy-msp-toy-id-test-vs-{SHIFTED[0]}-{document['config']['config_hash']}"]
    assert "shift detection" in shift.caption


def test_spectral_and_dropout_csvs_hold_the_curves(document, figures):
    tag, entry = document["config"]["config_hash"], document["spectral"][0]
    fixed = assert_csv_columns(figures[f"spectral-fixed-spectral-toy-toy-id-test-{tag}"].csv, plots.FIXED_COLUMNS)
    assert fixed["rank"].tolist() == list(range(1, 33))
    assert fixed.similarity.tolist() == pytest.approx(entry["fixed"]["similarity"])
    assert f"k_sat = {entry['fixed']['k_sat']}" in figures[f"spectral-fixed-spectral-toy-toy-id-test-{tag}"].caption
    adaptive = assert_csv_columns(figures[f"spectral-adaptive-spectral-toy-toy-id-test-{tag}"].csv, plots.ADAPTIVE_COLUMNS)
    assert len(adaptive[adaptive.part == "interval"]) == len(entry["adaptive"]["intervals"])
    fourier = assert_csv_columns(figures[f"spectral-fourier-spectral-toy-toy-id-test-{tag}"].csv, plots.FOURIER_COLUMNS)
    cells = fourier[fourier.part == "map"]
    assert len(cells) == 49 and cells.rse.max() == pytest.approx(np.max(entry["fourier"]["rse"]))
    dropout = assert_csv_columns(figures[f"dropout-spectral-toy-toy-id-test-{tag}"].csv, plots.DROPOUT_COLUMNS)
    assert len(dropout) == 4 * 3 + 1


def test_robustness_bars_show_every_shift_and_the_mean(document, figures):
    figure = figures[f"robustness-delta-robustness-toy-{document['config']['config_hash']}"]
    frame = assert_csv_columns(figure.csv, plots.ROBUSTNESS_COLUMNS)
    assert frame.dataset.tolist() == [*SHIFTED, "shifted-mean", "toy-id-test"]
    assert frame.role.tolist() == ["shifted"] * 4 + ["mean", "clean"]
    mean = plots.find_record(document, task="robustness", dataset="shifted-mean", metric="accuracy")
    assert plots.pct(mean["delta"], 2) in figure.caption


def test_robustness_bars_group_several_runs(tmp_path):
    runs = [synthetic_document(seed=0), synthetic_document(seed=1, noise=1.2, bits="w4a4")]
    figure = plots.robustness_figure(runs, "robustness-toy", tmp_path)
    frame = assert_csv_columns(figure.csv, plots.ROBUSTNESS_COLUMNS)
    assert set(frame.config_hash) == {run["config"]["config_hash"] for run in runs}
    assert figure.name == "robustness-delta-robustness-toy"
    assert_png_has_content(figure.png)


def test_spurious_caption_states_rsg(document, figures):
    figure = figures[f"spurious-spurious-toy-{COMMON}-{document['config']['config_hash']}"]
    frame = assert_csv_columns(figure.csv, plots.SPURIOUS_COLUMNS)
    assert set(frame.group) == {"common", "counter"}
    rsg = plots.find_record(document, task="spurious", metric="rsg")
    assert f"FP32 {rsg['fp32']:+.4f}" in figure.caption and "ΔRSG" in figure.caption and "V_add" in figure.caption


def test_a_document_without_sections_draws_nothing(tmp_path):
    bare = {"config": {"config_hash": "abc"}, "results": []}
    assert plots.run_figures(bare, tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_identical_models_give_zero_length_arrows(tmp_path):
    """q = fp: every trajectory bin stays put (scoring.md §2.4), and the figure still draws the FP32 points."""
    rng = np.random.default_rng(3)
    labels, fp, _ = _logits(rng, 200, 2.0, 0.0)
    trajectory = metrics.bin_trajectory(fp, fp, labels)
    document = {"config": {"config_hash": "same"}, "results": [],
                "bin_trajectories": [{"dataset": "d", "target": "quantized", "n_bins": 15, "flip_rate": 0.0,
                                      "bins": [_plain(b) for b in trajectory.bins]}]}
    figure = plots.reliability_figure(document, "d", tmp_path)
    frame = pd.read_csv(figure.csv)
    assert (frame.conf_fp == frame.conf_q).all() and "mean arrow length over images 0.0000" in figure.caption
    assert_png_has_content(figure.png)


def test_importing_plots_does_not_import_matplotlib():
    import subprocess
    import sys

    code = "import sys, qbench.reporting.plots, qbench.reporting.report; print('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
