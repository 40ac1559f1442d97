"""``qbench report`` and ``qbench eval --plots``: report.md embeds every figure, tables read the records
generically, documents come from a JSON file, a stored hash or prefix, or a query; errors are one line."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from cli_runner import run_cli
from qbench.reporting import report
from qbench.errors import QbenchError
from qbench.engine.store import ResultStore
from test_plots import COMMON, COUNTER, assert_png_has_content, synthetic_document


def slim_document(**kwargs) -> dict:
    """A synthetic document with one reliability dataset, robustness and spurious records, and no histogram,
    spectral or dropout section: fewer figures to draw where a test is about choosing or grouping runs."""
    document = synthetic_document(**kwargs)
    keep = {"toy-id-test"}
    return {**document, "reliability": [s for s in document["reliability"] if s["dataset"] in keep],
            "bin_trajectories": [s for s in document["bin_trajectories"] if s["dataset"] in keep],
            "ood_histograms": [], "spectral": [], "dropout": []}


def embedded(path) -> list[str]:
    return report.EMBEDDED_IMAGE.findall(path.read_text())


def assert_report_complete(folder) -> str:
    """report.md embeds every PNG of the folder (and nothing missing) and links each figure's CSV."""
    page = (folder / "report.md").read_text()
    images = embedded(folder / "report.md")
    assert images and sorted(images) == sorted(path.name for path in folder.glob("*.png"))
    for image in images:
        assert_png_has_content(folder / image)
        csv = image[:-4] + ".csv"
        assert f"]({csv})" in page
        assert len(pd.read_csv(folder / csv)) > 0
    return page


@pytest.fixture(scope="module")
def single_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    document = synthetic_document()
    return document, report.write_report([document], folder), folder


def test_report_embeds_every_figure_with_its_data(single_report):
    _, path, folder = single_report
    assert path == folder / "report.md"
    assert_report_complete(folder)
    assert len(embedded(path)) == 7 + 6 + 3 + 3  # reliability, histograms, spectral, robustness+spurious+dropout


def test_report_tables_cover_every_record_kind(single_report):
    document, path, _ = single_report
    page = path.read_text()
    for heading in ("## Run 1: toy-clip · minmax w4a8 (visual scope) · seed 0", "### Zero-shot classification",
                    "### OOD detection", "### Shift detection (clean as ID, shifted as OOD)", "### Robustness",
                    "### Spurious correlation", "### Spurious correlation: single-value records", "### Spectral analysis",
                    "### Spectral analysis: single-value records", "### Weight-dropout probe: single-value records",
                    "### Notes"):
        assert heading in page, heading
    assert f"`{document['config']['config_hash']}`" in page
    rsg = next(r for r in document["results"] if r["metric"] == "rsg")
    assert f"| spurious-toy | {COMMON}+{COUNTER} | rsg | {100 * rsg['fp32']:.2f}% | {100 * rsg['quantized']:.2f}% |" in page
    sqnr = next(r for r in document["results"] if r["metric"] == "sqnr_db" and r["param"] == "ranks=all")
    assert f"| sqnr_db | ranks=all | {sqnr['value']:.2f} dB |" in page
    k_sat = next(r for r in document["results"] if r["metric"] == "k_sat")
    assert f"| k_sat |  | {k_sat['value']} |" in page
    accuracy = next(r for r in document["results"] if r["task"] == "zeroshot" and r["metric"] == "accuracy")
    assert f"{100 * accuracy['fp32']:.2f}% | {100 * accuracy['quantized']:.2f}% | {100 * accuracy['delta']:+.2f}%" in page
    assert "synthetic features for the plot tests" in page  # spectral notes reach the page


def test_record_kinds_are_told_apart():
    paired = {"metric": "rsg", "fp32": 0.2, "quantized": 0.3}
    single = {"metric": "delta_rsg", "fp32": None, "quantized": None, "value": 0.1}
    unknown_single = {"metric": "new_thing", "fp32": None, "quantized": None, "value": 3.0}
    assert not report.is_single_value(paired)
    assert report.is_single_value(single) and report.is_single_value(unknown_single)
    assert report.format_value(None, "sqnr_db") == "-"  # an infinite SQNR is stored as null
    assert report.format_value(0.1234, "accuracy") == "12.34%" and report.format_value(12.345, "sqnr_db") == "12.35 dB"


def test_several_runs_group_robustness_and_keep_per_run_figures(tmp_path):
    runs = [slim_document(seed=0), slim_document(seed=0, noise=1.1, bits="w4a4")]
    path = report.write_report(runs, tmp_path)
    assert_report_complete(tmp_path)
    page = path.read_text()
    assert "## Robustness across runs" in page and "## Statistics over seeds" not in page
    images = embedded(path)
    assert "robustness-delta-robustness-toy.png" in images
    assert not any(re.fullmatch(r"robustness-delta-robustness-toy-[0-9a-f]{16}\.png", name) for name in images)
    for run in runs:
        tag = run["config"]["config_hash"]
        assert f"reliability-toy-id-test-{tag}.png" in images and f"## Run {runs.index(run) + 1}:" in page


def test_same_configuration_at_several_seeds_adds_the_seed_table(tmp_path):
    runs = [slim_document(seed=seed) for seed in (0, 1, 2)]
    page = report.write_report(runs, tmp_path).read_text()
    assert "## Statistics over seeds" in page
    table = page.split("## Statistics over seeds", 1)[1].split("\n## ", 1)[0]
    assert "sample standard deviation over seeds" in table  # the caption says what "±" is
    assert "toy-id-test" in table and "accuracy" in table


def test_no_documents_is_an_error(tmp_path):
    with pytest.raises(QbenchError, match="nothing to report"):
        report.write_report([], tmp_path)


# -- choosing documents -------------------------------------------------------------------------
def _stored(isolated_store, *documents):
    store = ResultStore(isolated_store)
    for document in documents:
        store.put(document)
    return store


def _with_hash(document, config_hash):
    return {**document, "config": {**document["config"], "config_hash": config_hash}}


def test_json_files_of_every_shape(tmp_path):
    one, two = synthetic_document(seed=0), synthetic_document(seed=1)
    for name, content, expected in (("eval.json", one, [one]), ("runs.json", {"runs": [one, two]}, [one, two]),
                                    ("submission.json", {**one, "submitter": "someone"}, [{**one, "submitter": "someone"}])):
        (tmp_path / name).write_text(json.dumps(content))
        assert report.select_documents(str(tmp_path / name)) == json.loads(json.dumps(expected))
    (tmp_path / "other.json").write_text('{"rows": []}')
    with pytest.raises(QbenchError, match="is not an evaluation"):
        report.select_documents(str(tmp_path / "other.json"))


def test_hash_prefix_and_query_select_stored_runs(isolated_store):
    first = _with_hash(synthetic_document(seed=0), "abc1000000000000")
    second = _with_hash(synthetic_document(seed=1, bits="w8a8"), "abc2000000000000")
    _stored(isolated_store, first, second)
    assert report.select_documents("abc2")[0]["config"]["config_hash"] == "abc2000000000000"
    assert report.select_documents("abc1000000000000")[0]["config"]["seed"] == 0
    with pytest.raises(QbenchError, match="ambiguous: it matches abc1000000000000, abc2000000000000"):
        report.select_documents("abc")
    assert [d["config"]["seed"] for d in report.select_documents("model=toy-clip")] == [0, 1]
    assert [d["config"]["seed"] for d in report.select_documents("bits=w8a8,suite=spurious-toy")] == [1]
    assert [d["config"]["seed"] for d in report.select_documents("seed=0, quantizer=minmax")] == [0]
    with pytest.raises(QbenchError, match=r"no stored evaluation matches bits=w2a8 .*stored: abc1000000000000"):
        report.select_documents("bits=w2a8")
    with pytest.raises(QbenchError, match="bad query key 'colour'"):
        report.select_documents("colour=red")
    with pytest.raises(QbenchError, match="no evaluation 'fff' in the store"):
        report.select_documents("fff")


# -- the command line ---------------------------------------------------------------------------
def one_line_error(code, out, err, expected):
    assert code == 2 and out == "" and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qbench: ") and expected in lines[0], err


def test_report_command_from_the_store(capsys, isolated_store, tmp_path):
    document = slim_document()
    _stored(isolated_store, document)
    code, _, err = run_cli(capsys, "report", document["config"]["config_hash"][:6], "--out", str(tmp_path / "r"))
    assert code == 0 and "wrote" in err and "3 figures" in err
    assert_report_complete(tmp_path / "r")


@pytest.mark.parametrize("argument, expected", [
    ("0123", "no evaluation '0123' in the store"),
    ("bits=w2a2", "no stored evaluation matches bits=w2a2"),
    ("bits", "no evaluation 'bits'"),
    ("model=", "bad query 'model='"),
    ("missing.json", "no file missing.json"),
])
def test_report_command_errors_are_one_line(capsys, argument, expected, tmp_path):
    one_line_error(*run_cli(capsys, "report", argument, "--out", str(tmp_path / "r")), expected)


def test_report_failure_is_one_line_and_keeps_the_store(capsys, isolated_store, tmp_path):
    document = synthetic_document()
    _stored(isolated_store, document)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    one_line_error(*run_cli(capsys, "report", document["config"]["config_hash"], "--out", str(blocker / "sub")),
                   "cannot write the report to")
    assert ResultStore(isolated_store).get(document["config"]["config_hash"]) is not None


def test_eval_plots_on_the_toy_world(capsys, isolated_store, tmp_path):
    """A real toy-ood evaluation writes its report; a second run served from the store writes it again."""
    args = ("eval", "--suite", "toy-ood", "--limit", "200", "--proxy-n", "100", "--scorer", "msp", "--json")
    code, out, err = run_cli(capsys, *args, "--plots", str(tmp_path / "first"))
    assert code == 0, err
    document = json.loads(out)
    tag = document["config"]["config_hash"]
    page = assert_report_complete(tmp_path / "first")
    images = set(embedded(tmp_path / "first" / "report.md"))
    if document.get("reliability"):
        assert f"reliability-toy-id-test-{tag}.png" in images
        frame = pd.read_csv(tmp_path / "first" / f"reliability-toy-id-test-{tag}.csv")
        assert set(frame.panel) >= {"reliability"} and frame[frame.panel == "reliability"].n.sum() == 2 * 200
    for item in document.get("ood_histograms", []):
        assert f"ood-toy-ood-msp-toy-id-test-vs-{item['ood_dataset']}-{tag}.png" in images
    assert "### OOD detection" in page and "| toy-ood | msp | toy-id-test | toy-ood-near | near |" in page

    code, _, err = run_cli(capsys, *args, "--plots", str(tmp_path / "again"))
    assert code == 0 and "served from the store" in err
    assert sorted(embedded(tmp_path / "again" / "report.md")) == sorted(images)

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, out, err = run_cli(capsys, *args, "--plots", str(blocker / "sub"))
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1  # checked before anything is computed
    assert f"--plots {blocker / 'sub'} cannot be created: {blocker} is a file" in err
    assert ResultStore(isolated_store).get(tag) is not None


def _model_run(model: str, ptq_delta: float, dropout_delta: float) -> dict:
    """A slim run of ``model`` whose first accuracy record has δ = ``ptq_delta`` and whose dropout δ(0.10) is given."""
    document = slim_document(seed=0)
    document = {**document, "config": {**document["config"], "model": model, "config_hash": f"{abs(hash(model)) % 16**16:016x}"}}
    results = [dict(record) for record in document["results"] if record.get("task") != "dropout"]
    first = next(r for r in results if r["metric"] == "accuracy" and r.get("task", "zeroshot") == "zeroshot"
                 and not r.get("logit_tuned"))
    first["delta"] = ptq_delta
    results.append({"suite": "spectral-toy", "suite_version": 1, "task": "dropout", "dataset": "toy-id-test",
                    "metric": "dropout_delta", "param": "p=0.10", "fp32": None, "quantized": None, "delta": None,
                    "diff": None, "value": dropout_delta, "logit_tuned": False})
    return {**document, "results": results}


def test_dropout_redundancy_is_correlated_with_ptq_degradation_across_models(tmp_path):
    from qbench.analysis.statistics import redundancy_correlation

    dropout = [0.05, 0.20, 0.10, 0.40]
    ptq = [0.01, 0.03, 0.02, 0.02]
    runs = [_model_run(f"model-{i}", d, v) for i, (d, v) in enumerate(zip(ptq, dropout))]
    [row] = report.redundancy_rows(runs)
    expected = redundancy_correlation(dropout, ptq)
    assert row["models"] == "4" and row["Spearman ρ (p)"] == f"{expected.spearman:+.3f} ({expected.spearman_p:.3g})"
    assert row["permutations"] == "24 (exact)"
    page = report.write_report(runs, tmp_path).read_text()
    assert "## Weight-dropout redundancy vs PTQ degradation" in page
    assert report.redundancy_rows(runs[:2]) == []  # two models cannot make a correlation
