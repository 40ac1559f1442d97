"""Statistics over seeds (qbench.analysis.seed_stats, scoring.md §2.7), the chunked paired accuracy bootstrap, and
``qbench eval --seed ... --seed ...`` on the toy world."""

from __future__ import annotations

import json
import math
import tracemalloc

import numpy as np
import pytest
from scipy import stats as scipy_stats

from cli_runner import run_cli
from qbench.analysis import statistics as S
from qbench.errors import QbenchError
from qbench.analysis.seed_stats import (SEED_TABLE_CAPTION, group_key, seed_groups, seed_statistics, seed_statistics_markdown,
                               seed_table_cells)


def _config(seed: int, quantizer: str = "minmax", **extra) -> dict:
    config = {"model": "toy-clip", "quantizer": quantizer, "quantizer_params": {"n_calibration": 64}, "bits": "w4a8",
              "scope": "visual", "proxy": "toy-proxy", "proxy_n": 60, "seed": seed, "limit": None,
              "suites": [{"name": "toy-id", "version": 1}], **extra}
    config["config_hash"] = f"{quantizer}-{seed}-{json.dumps(extra, sort_keys=True)}"
    return config


def _paired(metric: str, fp32: float, quantized: float, dataset: str = "toy-id-test", **extra) -> dict:
    return {"suite": "toy-id", "suite_version": 1, "task": "zeroshot", "dataset": dataset, "metric": metric,
            "fp32": fp32, "quantized": quantized, "delta": (fp32 - quantized) / fp32, "diff": quantized - fp32,
            "logit_tuned": False, **extra}


def _single(metric: str, value: float | None, param: str | None = None) -> dict:
    return {"suite": "spurious", "suite_version": 1, "task": "spurious", "dataset": "common+counter", "metric": metric,
            "fp32": None, "quantized": None, "delta": None, "diff": None, "value": value, "param": param,
            "logit_tuned": False}


def _document(seed: int, records: list[dict], quantizer: str = "minmax", **extra) -> dict:
    return {"config": _config(seed, quantizer, **extra), "provenance": {"created_at": f"2025-01-0{seed + 1}T00:00:00"},
            "results": records}


def _row(rows: list[dict], metric: str, **where) -> dict:
    (row,) = [row for row in rows if row["metric"] == metric and all(row[k] == v for k, v in where.items())]
    return row


# -- hand-computed three-seed example ---------------------------------------------------------------


def test_three_seeds_by_hand_and_against_scipy():
    quantized = [0.80, 0.82, 0.84]
    documents = [_document(seed, [_paired("accuracy", 0.85, q)]) for seed, q in enumerate(quantized)]
    (row,) = seed_statistics(documents)
    assert (row["suite"], row["task"], row["dataset"], row["metric"], row["param"], row["scorer"], row["ood_dataset"],
            row["logit_tuned"]) == ("toy-id", "zeroshot", "toy-id-test", "accuracy", None, None, None, False)
    assert row["group"] == "toy-clip/minmax/w4a8/visual" and row["kind"] == "paired"
    assert row["n_seeds"] == 3 and row["seeds"] == [0, 1, 2]
    assert row["config_hashes"] == [document["config"]["config_hash"] for document in documents]
    # mean 0.82, sample std 0.02 (deviations ±0.02, 0: sqrt(0.0008/2)), se 0.02/sqrt(3), t_{0.975,2} = 4.302653
    se = 0.02 / math.sqrt(3)
    assert row["quantized_mean"] == pytest.approx(0.82)
    assert row["quantized_std"] == pytest.approx(0.02)
    assert row["quantized_se"] == pytest.approx(se)
    assert row["ci_low"] == pytest.approx(0.82 - 4.302653 * se, abs=1e-6)
    assert row["ci_high"] == pytest.approx(0.82 + 4.302653 * se, abs=1e-6)
    assert (row["fp32_mean"], row["fp32_std"]) == (pytest.approx(0.85), pytest.approx(0.0, abs=1e-15))
    # d_s = q_s - fp = -0.05, -0.03, -0.01: mean -0.03, std 0.02, t = -0.03/se = -2.598 on 2 df
    assert row["diff_mean"] == pytest.approx(-0.03) and row["diff_std"] == pytest.approx(0.02)
    assert row["diff_se"] == pytest.approx(se)
    t = -0.03 / se
    assert t == pytest.approx(-2.598076, abs=1e-6)
    assert row["t_p_value"] == pytest.approx(2 * scipy_stats.t.sf(abs(t), 2))
    assert row["t_p_value"] == pytest.approx(scipy_stats.ttest_1samp([-0.05, -0.03, -0.01], 0.0).pvalue)
    # Student t on 2 df has the closed-form two-sided tail 1 - |t|/sqrt(t^2 + 2) = 1 - 2.598/2.958 = 0.12169
    assert row["t_p_value"] == pytest.approx(1 - abs(t) / math.sqrt(t * t + 2))
    assert row["t_p_value"] == pytest.approx(0.121690, abs=1e-6)
    assert row["wilcoxon_p_value"] is None  # S = 3 < 6
    assert row["p_adjusted"] == pytest.approx(row["t_p_value"])  # a family of one
    assert row["notes"] == []


def test_per_seed_fp32_is_paired_and_noted():
    pairs = [(0.90, 0.88), (0.92, 0.89), (0.91, 0.91)]
    documents = [_document(seed, [_paired("accuracy", fp, q)]) for seed, (fp, q) in enumerate(pairs)]
    (row,) = seed_statistics(documents)
    d = [q - fp for fp, q in pairs]
    assert row["diff_mean"] == pytest.approx(np.mean(d)) and row["diff_std"] == pytest.approx(np.std(d, ddof=1))
    assert row["t_p_value"] == pytest.approx(scipy_stats.ttest_1samp(d, 0.0).pvalue)
    assert row["fp32_std"] == pytest.approx(0.01)
    assert any("fp32 differs across seeds" in note for note in row["notes"])


def test_wilcoxon_only_from_six_seeds():
    values = [0.80, 0.83, 0.79, 0.81, 0.78, 0.845]  # d = q - 0.85: distinct magnitudes, no ties
    five = seed_statistics([_document(seed, [_paired("accuracy", 0.85, q)]) for seed, q in enumerate(values[:5])])
    assert five[0]["n_seeds"] == 5 and five[0]["wilcoxon_p_value"] is None and five[0]["wilcoxon_p_adjusted"] is None
    (six,) = seed_statistics([_document(seed, [_paired("accuracy", 0.85, q)]) for seed, q in enumerate(values)])
    d = np.array(values) - 0.85
    assert six["wilcoxon_p_value"] == pytest.approx(scipy_stats.wilcoxon(d, method="exact").pvalue)
    assert six["wilcoxon_p_value"] == pytest.approx(2 / 64)  # every difference negative: 2 * 1/2^6
    assert six["wilcoxon_p_adjusted"] == pytest.approx(six["wilcoxon_p_value"])


# -- Benjamini–Hochberg within one metric x one group -----------------------------------------------


def test_bh_within_one_metric_and_one_group_by_hand():
    # three accuracy rows (datasets a, b, c) and one ece row in one group, plus a second group
    shifts = {"a": [-0.05, -0.04, -0.06], "b": [-0.01, 0.02, -0.02], "c": [-0.03, -0.01, -0.02]}
    documents = []
    for quantizer in ("minmax", "percentile"):
        for seed in range(3):
            records = [_paired("accuracy", 0.9, 0.9 + shifts[name][seed], dataset=name) for name in shifts]
            records.append(_paired("ece", 0.05, 0.05 + 0.01 * (seed + 1)))
            documents.append(_document(seed, records, quantizer=quantizer))
    rows = seed_statistics(documents)
    assert len(rows) == 2 * 4
    minmax = [row for row in rows if row["group"] == "toy-clip/minmax/w4a8/visual"]
    raw = {row["dataset"]: row["t_p_value"] for row in minmax if row["metric"] == "accuracy"}
    for name, values in shifts.items():
        assert raw[name] == pytest.approx(scipy_stats.ttest_1samp(values, 0.0).pvalue)
    # hand BH on m = 3: sort ascending, p_(i) * m / i, then the running minimum from the largest down
    order = sorted(raw, key=raw.get)
    scaled = [raw[name] * 3 / (i + 1) for i, name in enumerate(order)]
    expected = {order[2]: min(1.0, scaled[2])}
    expected[order[1]] = min(expected[order[2]], scaled[1])
    expected[order[0]] = min(expected[order[1]], scaled[0])
    for row in minmax:
        if row["metric"] == "accuracy":
            assert row["p_adjusted"] == pytest.approx(expected[row["dataset"]])
            assert row["p_adjusted"] >= row["t_p_value"] - 1e-15
    ece = _row(minmax, "ece")
    assert ece["p_adjusted"] == pytest.approx(ece["t_p_value"])  # its own family of one, not with the accuracies
    # the other group is adjusted on its own: identical values, identical adjustments (not m = 6)
    other = {row["dataset"]: row["p_adjusted"] for row in rows if row["group"].startswith("toy-clip/percentile")
             and row["metric"] == "accuracy"}
    assert other == pytest.approx(expected)


def test_bh_numbers_hand_example():
    # p = 0.01, 0.04, 0.03, 0.20 -> sorted 0.01, 0.03, 0.04, 0.20 -> x4/i: 0.04, 0.06, 0.0533, 0.20
    # -> running minimum from the top: 0.04, 0.0533, 0.0533, 0.20
    np.testing.assert_allclose(S.benjamini_hochberg([0.01, 0.04, 0.03, 0.20]), [0.04, 0.16 / 3, 0.16 / 3, 0.20])


# -- grouping ----------------------------------------------------------------------------------------


def test_grouping_ignores_seed_hash_and_provenance_but_separates_quantizers():
    documents = [_document(seed, [_paired("accuracy", 0.9, 0.88 + 0.01 * seed)], quantizer=quantizer)
                 for quantizer in ("minmax", "fp32") for seed in (0, 1)]
    assert len({document["config"]["config_hash"] for document in documents}) == 4
    assert group_key(documents[0]["config"]) == group_key(documents[1]["config"])
    groups = seed_groups(documents)
    assert [(group.description, group.seeds) for group in groups] == [
        ("toy-clip/minmax/w4a8/visual", (0, 1)), ("toy-clip/fp32/w4a8/visual", (0, 1))]
    rows = seed_statistics(documents)
    assert [row["group"] for row in rows] == ["toy-clip/minmax/w4a8/visual", "toy-clip/fp32/w4a8/visual"]
    assert all(row["n_seeds"] == 2 for row in rows)


def test_other_settings_split_groups_and_get_distinct_names():
    documents = [_document(seed, [_paired("accuracy", 0.9, 0.88 + 0.01 * seed)], limit=limit)
                 for limit in (None, 40) for seed in (0, 1)]
    groups = seed_groups(documents)
    assert len(groups) == 2 and groups[0].description != groups[1].description
    assert all(group.description.startswith("toy-clip/minmax/w4a8/visual #") for group in groups)


def test_one_seed_per_group_gives_no_rows_and_repeats_are_counted():
    documents = [_document(0, [_paired("accuracy", 0.9, 0.88)], quantizer=q) for q in ("minmax", "fp32")]
    assert seed_statistics(documents) == []
    repeated = [_document(0, [_paired("accuracy", 0.9, 0.88)]), _document(0, [_paired("accuracy", 0.9, 0.80)]),
                _document(1, [_paired("accuracy", 0.9, 0.86)])]
    (row,) = seed_statistics(repeated)
    assert row["seeds"] == [0, 1] and row["quantized_mean"] == pytest.approx(0.87)  # the first seed-0 document kept
    assert any("repeated document" in note for note in row["notes"])


# -- single-value records, missing and undefined values ------------------------------------------------


def test_single_value_records_are_tested_against_zero():
    values = [0.01, 0.03, 0.02]
    documents = [_document(seed, [_single("v_add", value)]) for seed, value in enumerate(values)]
    (row,) = seed_statistics(documents)
    assert row["kind"] == "value" and row["fp32_mean"] is None and row["quantized_mean"] is None
    assert row["diff_mean"] == pytest.approx(0.02) and row["diff_std"] == pytest.approx(0.01)
    assert row["diff_se"] == pytest.approx(0.01 / math.sqrt(3))
    half = scipy_stats.t.ppf(0.975, 2) * 0.01 / math.sqrt(3)
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(0.02 - half), pytest.approx(0.02 + half))
    assert row["t_p_value"] == pytest.approx(scipy_stats.ttest_1samp(values, 0.0).pvalue)


def test_undefined_values_are_skipped_and_counted():
    values = [40.0, None, 42.0, float("inf")]
    documents = [_document(seed, [_single("sqnr_db", value, param="ranks=all")]) for seed, value in enumerate(values)]
    (row,) = seed_statistics(documents)
    assert row["param"] == "ranks=all" and row["seeds"] == [0, 2] and row["n_seeds"] == 2
    assert row["diff_mean"] == pytest.approx(41.0)
    assert any("undefined" in note and "1, 3" in note for note in row["notes"])
    lonely = [_document(seed, [_single("sqnr_db", value)]) for seed, value in enumerate([40.0, None])]
    (row,) = seed_statistics(lonely)
    assert row["n_seeds"] == 1 and row["t_p_value"] is None and row["p_adjusted"] is None
    assert any("fewer than 2 seeds" in note for note in row["notes"])


def test_records_in_only_some_seeds_use_those_seeds_and_say_so():
    documents = []
    for seed in range(3):
        records = [_paired("accuracy", 0.9, 0.85 + 0.01 * seed)]
        if seed < 2:
            records.append(_paired("accuracy", 0.8, 0.7 + 0.02 * seed, dataset="toy-shift"))
        documents.append(_document(seed, records))
    rows = seed_statistics(documents)
    full, partial = _row(rows, "accuracy", dataset="toy-id-test"), _row(rows, "accuracy", dataset="toy-shift")
    assert full["seeds"] == [0, 1, 2] and full["notes"] == []
    assert partial["seeds"] == [0, 1] and partial["quantized_mean"] == pytest.approx(0.71)
    assert any("missing in seed(s) 2" in note for note in partial["notes"])


def test_logit_tuned_and_ood_records_are_separate_identities():
    documents = []
    for seed in range(2):
        ood = {"task": "ood", "scorer": "msp", "id_dataset": "toy-id-test", "ood_dataset": "toy-ood-near"}
        documents.append(_document(seed, [
            _paired("accuracy", 0.9, 0.88 + 0.01 * seed), _paired("accuracy", 0.9, 0.89 + 0.005 * seed, logit_tuned=True),
            _paired("auroc", 0.8, 0.78 + 0.01 * seed, dataset="toy-ood-near", **ood)]))
    rows = seed_statistics(documents)
    assert sorted((row["metric"], row["logit_tuned"], row["scorer"]) for row in rows) == [
        ("accuracy", False, None), ("accuracy", True, None), ("auroc", False, "msp")]


# -- tables ---------------------------------------------------------------------------------------------


def test_markdown_has_the_caption_cells_and_notes():
    documents = [_document(seed, [_paired("accuracy", 0.85, q), _single("v_add", 0.01 * (seed + 1))])
                 for seed, q in enumerate([0.80, 0.82, 0.84])]
    documents[2]["results"].append(_paired("ece", 0.05, 0.06))
    rows = seed_statistics(documents)
    text = seed_statistics_markdown(rows)
    assert text.startswith(SEED_TABLE_CAPTION) and "sample standard deviation over seeds" in text
    cells = {cell["metric"]: cell for cell in seed_table_cells(rows)}
    assert cells["accuracy"]["quantized mean ± std"] == "82.00% ± 2.00 pp"
    assert cells["accuracy"]["Δ (or value) mean ± std"] == "-3.00 pp ± 2.00 pp"
    assert cells["v_add"]["quantized mean ± std"] == "-" and cells["v_add"]["Δ (or value) mean ± std"] == "2.00% ± 1.00 pp"
    assert "| toy-clip/minmax/w4a8/visual | toy-id | zeroshot | toy-id-test | accuracy |" in text
    assert "- toy-clip/minmax/w4a8/visual toy-id/toy-id-test ece: fewer than 2 seeds" in text
    assert seed_statistics_markdown([]) == ""


# -- chunked paired accuracy bootstrap ------------------------------------------------------------------


@pytest.mark.parametrize("chunk_bytes", [1, 9 * 37 * 3, 10**9])
def test_paired_accuracy_bootstrap_equals_paired_bootstrap(chunk_bytes):
    correct_fp = np.arange(37) < 30  # 30 of 37 right in FP32
    correct_q = correct_fp.copy()
    correct_q[[2, 5, 11, 17, 23, 29]] = False  # quantized loses six of them and gains none
    indices = S.bootstrap_indices(37, 200, seed=3)
    reference = S.paired_bootstrap(lambda rows: correct_fp[rows].mean(), lambda rows: correct_q[rows].mean(), 37, indices)
    fp_summary = S.bootstrap_summary(lambda rows: correct_fp[rows].mean(), 37, indices)
    q_summary = S.bootstrap_summary(lambda rows: correct_q[rows].mean(), 37, indices)
    result = S.paired_accuracy_bootstrap(correct_fp, correct_q.astype(np.int64), resamples=200, seed=3,
                                         chunk_bytes=chunk_bytes)
    assert result["diff"] == reference.difference == pytest.approx(correct_q.mean() - correct_fp.mean())
    assert result["diff_se"] == pytest.approx(reference.se, rel=1e-12)
    assert (result["ci_low"], result["ci_high"]) == (reference.ci_low, reference.ci_high)
    assert result["p_value"] == reference.p_value and result["resamples"] == 200
    assert result["se_fp"] == pytest.approx(fp_summary.se, rel=1e-12)
    assert result["se_q"] == pytest.approx(q_summary.se, rel=1e-12)
    assert result["p_value"] < 0.05 and result["ci_high"] < 0  # a loss on six images and no gain: detected


def test_paired_accuracy_bootstrap_is_reproducible_and_seeded():
    rng = np.random.default_rng(1)
    fp, q = rng.random(100) < 0.7, rng.random(100) < 0.7
    first = S.paired_accuracy_bootstrap(fp, q, resamples=100, seed=7)
    assert S.paired_accuracy_bootstrap(fp, q, resamples=100, seed=7) == first
    assert S.paired_accuracy_bootstrap(fp, q, resamples=100, seed=8)["diff_se"] != first["diff_se"]


def test_paired_accuracy_bootstrap_memory_stays_bounded():
    """50,000 images x 1000 resamples would be a 400 MB index matrix at once; chunks keep the peak small."""
    rng = np.random.default_rng(0)
    fp = rng.random(50_000) < 0.75
    q = fp ^ (rng.random(50_000) < 0.02)
    tracemalloc.start()
    try:
        result = S.paired_accuracy_bootstrap(fp, q, resamples=1000, seed=0, chunk_bytes=16 * 2**20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2**20, peak
    assert result["resamples"] == 1000
    assert 0.0 < result["se_fp"] < 0.01 and 0.0 < result["diff_se"] < 0.01


@pytest.mark.parametrize("fp, q, kwargs, message", [
    ([1, 0, 1], [1, 0], {}, "same images"),
    ([1, 0, 2], [1, 0, 1], {}, "only 0/1"),
    ([1.0, 0.5], [1, 0], {}, "only 0/1"),
    ([], [], {}, "non-empty"),
    ([1, 0], [1, 0], {"resamples": 1}, "at least 2 resamples"),
])
def test_paired_accuracy_bootstrap_rejects_bad_input(fp, q, kwargs, message):
    with pytest.raises(QbenchError, match=message):
        S.paired_accuracy_bootstrap(np.array(fp), np.array(q), **kwargs)


# -- the CLI -------------------------------------------------------------------------------------------


def test_eval_over_seeds_stores_each_run_and_reports_statistics(capsys, tmp_path):
    store = str(tmp_path / "s.sqlite")
    quick = ("--suite", "toy-id", "--limit", "60", "--proxy-n", "60", "--store", store)
    code, out, err = run_cli(capsys, "eval", *quick, "--seed", "0", "--seed", "1", "--json")
    assert code == 0, err
    result = json.loads(out)
    runs = result["runs"]
    assert [run["config"]["seed"] for run in runs] == [0, 1]
    hashes = [run["config"]["config_hash"] for run in runs]
    assert len(set(hashes)) == 2
    from qbench.engine.store import ResultStore

    stored = ResultStore(store)
    assert all(stored.get(config_hash) is not None for config_hash in hashes)
    accuracy = _row(result["seed_statistics"], "accuracy")
    assert accuracy["n_seeds"] == 2 and accuracy["seeds"] == [0, 1] and accuracy["config_hashes"] == hashes
    per_seed = [{r["metric"]: r for r in run["results"]}["accuracy"] for run in runs]
    assert accuracy["quantized_mean"] == pytest.approx(np.mean([r["quantized"] for r in per_seed]))
    assert accuracy["diff_mean"] == pytest.approx(np.mean([r["quantized"] - r["fp32"] for r in per_seed]))
    assert accuracy["group"] == "toy-clip/minmax/w8a8/visual"
    assert {row["metric"] for row in result["seed_statistics"]} == {"accuracy", "ece", "nll"}

    # --seeds 2 and a config file's seed list name the same runs: served from the store
    code, out, err = run_cli(capsys, "eval", *quick, "--seeds", "2", "--json")
    assert code == 0 and err.count("served from the store") == 2
    assert [run["config"]["config_hash"] for run in json.loads(out)["runs"]] == hashes
    config = tmp_path / "run.yaml"
    config.write_text("seed: [0, 1]\n")
    code, out, err = run_cli(capsys, "eval", "--config", str(config), *quick)
    assert code == 0 and err.count("served from the store") == 2
    assert "statistics over seeds" in out and '"±" is the sample standard deviation over seeds' in out
    assert hashes[0] in out and hashes[1] in out

    # one seed keeps the single-document JSON
    code, out, _ = run_cli(capsys, "eval", *quick, "--seed", "1", "--json")
    assert code == 0 and json.loads(out)["config"]["config_hash"] == hashes[1]


@pytest.mark.parametrize("args, expected", [
    (["--seed", "0", "--seeds", "2"], "--seed and --seeds both choose the seeds"),
    (["--seeds", "0"], "--seeds"),
])
def test_conflicting_or_bad_seed_options_are_one_line(capsys, args, expected):
    code, out, err = run_cli(capsys, "eval", *args)
    assert code != 0 and out == "" and expected in err and "loaded model" not in err
    assert "Traceback" not in err
