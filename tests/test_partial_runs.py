"""What a new user sees must be true (issue 14, item 8): a ``--limit`` run is marked partial wherever its
numbers appear, skipped unreadable images are counted on the console, and the change columns of the eval table
point the same way as the leaderboard's (Δ = quantized − fp32)."""

from __future__ import annotations

import copy

import pytest

from qbench.cli import print_document, summary_markdown, summary_rows

DOCUMENT = {
    "config": {"model": "toy-clip", "quantizer": "minmax", "bits": "w8a8", "scope": "visual", "seed": 0, "limit": 5,
               "config_hash": "1be6a7e3b84e2e54", "suites": [{"name": "toy-id", "version": 1}]},
    "verification": {"passed": True, "n_modules": 49, "problems": []},
    "results": [
        {"suite": "toy-id", "dataset": "toy-id-test", "metric": "accuracy", "fp32": 1.0, "quantized": 0.8,
         "delta": 0.2, "diff": -0.2},
        {"suite": "toy-id", "dataset": "toy-id-test", "metric": "nll", "fp32": 0.25, "quantized": 0.25,
         "delta": 0.0, "diff": 0.0},
    ],
    "datasets": {"toy-id-test": {"num_images": 5, "num_scored": 4, "unreadable": 1,
                                 "unreadable_examples": ["broken/003.png: truncated"], "notes": []}},
    "provenance": {"created_at": "2025-01-01T00:00:00+00:00"},
}


def full_run() -> dict:
    document = copy.deepcopy(DOCUMENT)
    document["config"]["limit"] = None
    document["datasets"]["toy-id-test"].update(unreadable=0, unreadable_examples=[], num_scored=5)
    return document


def test_the_console_marks_a_limited_run_and_counts_unreadable_images(capsys):
    print_document(DOCUMENT)
    out = capsys.readouterr().out
    assert "PARTIAL RUN: --limit 5: only the first 5 images of each dataset" in out
    assert "skipped 1 unreadable image(s) of toy-id-test (e.g. broken/003.png: truncated)" in out
    assert "its metrics use the 4 readable ones" in out


def test_a_full_run_has_no_partial_or_skipped_line(capsys):
    print_document(full_run())
    out = capsys.readouterr().out
    assert "PARTIAL" not in out and "unreadable" not in out


def test_the_eval_table_change_has_the_leaderboards_sign(capsys):
    """Accuracy 100 % → 80 %: the leaderboard shows Δ = −20.00; so does the eval table (and Δ/fp32 −20 %)."""
    print_document(full_run())
    out = capsys.readouterr().out
    assert "Δ = q − fp32" in out and "Δ/fp32" in out and "relative change" not in out
    row = next(line for line in out.splitlines() if "accuracy" in line)
    assert "-20.00 pp" in row and "-20.00%" in row
    assert "±0.0000" in next(line for line in out.splitlines() if "│ nll" in line)
    assert "Δ = quantized − fp32, as in the leaderboard" in out


def test_summary_tables_mark_partial_runs_only_when_there_is_one():
    rows = summary_rows([DOCUMENT, full_run()])
    assert [row["images"] for row in rows] == ["first 5 (partial)", "all"]
    assert "images" not in summary_rows([full_run()])[0]
    assert "| first 5 (partial) |" in summary_markdown([DOCUMENT])


def test_qbench_results_shows_which_runs_are_partial(capsys, isolated_store):
    from cli_runner import run_cli

    from qbench.engine.store import ResultStore

    store = ResultStore(isolated_store)
    store.put({**DOCUMENT, "config": {**DOCUMENT["config"], "weights_tag": "t"}})
    full = full_run()
    full["config"].update(config_hash="0123456789abcdef", weights_tag="t")
    store.put(full)
    code, out, _ = run_cli(capsys, "results")
    assert code == 0
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if line.startswith("│")}
    assert "first 5 (partial)" in lines["1be6a7e3b84e2e54"] and "│ all " in lines["0123456789abcdef"]


def test_an_index_made_before_limit_images_gains_the_column(tmp_path):
    import sqlite3

    from qbench.engine.store import ResultStore

    store = ResultStore(tmp_path / "s.sqlite")
    store.put({**DOCUMENT, "config": {**DOCUMENT["config"], "weights_tag": "t"}})
    with sqlite3.connect(store.index_path) as connection:  # the index as qbench wrote it before the column existed
        connection.execute("ALTER TABLE results DROP COLUMN limit_images")
    reopened = ResultStore(tmp_path / "s.sqlite")
    reopened.sync_index()
    assert [row.limit for row in reopened.index_rows()] == [5]


@pytest.mark.parametrize("limit, expected", [(5, "PARTIAL (5 img)"), (None, None)])
def test_reports_and_figures_name_partial_runs(limit, expected):
    from qbench.reporting import plots
    from qbench.reporting.report import config_table, run_heading

    document = copy.deepcopy(DOCUMENT)
    document["config"]["limit"] = limit
    label, heading, table = plots.run_label(document), run_heading(document, 1), config_table(document)
    if expected is None:
        assert "PARTIAL" not in label + heading and "| all |" in table
    else:
        assert label.endswith(expected) and heading.endswith("· PARTIAL (--limit 5)")
        assert "first 5 per dataset (partial run)" in table
