"""Every bad input of issue 14 items 7 and 9, as a new user would try it: each ends in one line on stderr,
``qbench: <what is wrong and how to fix it>``, exit status 2, no traceback; where something was computed, the
result is still on disk (in the store, or in the rescue file the line names).

Cases that need no evaluation run in milliseconds; the few that compute use ``--limit 5`` and a small calibration.
"""

from __future__ import annotations

import errno
import json
import socket
import sqlite3
import tempfile
from pathlib import Path

import pytest
from cli_runner import run_cli

from qbench.errors import QbenchError

QUICK_EVAL = ("eval", "--limit", "5", "--proxy-n", "32", "--qparam", "n_calibration=32")
"""A toy evaluation small enough for a test (5 images per dataset, 32 calibration pairs)."""


def one_line_error(code: int, err: str) -> str:
    """The error line, after checking the promised format: status 2, one ``qbench:`` line, nothing else."""
    assert code == 2, err
    assert "Traceback" not in err and "Usage:" not in err, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("qbench: "), err
    return err.strip()


def last_line_error(code: int, err: str) -> str:
    """For commands that computed first (progress lines on stderr): the last line is the only ``qbench:`` line."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("qbench: ") and sum(line.startswith("qbench: ") for line in lines) == 1, err
    return lines[-1]


def stored_documents(store_file: Path) -> list[Path]:
    """The document files of the store named by ``store_file`` (``NAME.sqlite`` → ``NAME/documents``)."""
    return sorted((store_file.with_suffix("") / "documents").rglob("*.json"))


# -- item 9: click's Usage/Error blocks become one line -------------------------------------------
@pytest.mark.parametrize("args, expected", [
    (("eval", "--limit", "abc"), "'abc' is not a valid integer"),
    (("eval", "--seed", "abc"), "'abc' is not a valid integer"),
    (("eval", "--seed", "99999999999999999999"), "99999999999999999999 is not in the range"),
    (("eval", "--seeds", "2.5"), "'2.5' is not a valid integer"),
    (("quantize", "--seed", "-1", "--out", "x"), "-1 is not in the range"),
    (("submit",), "Missing argument 'CONFIG_HASH'"),
    (("report", "--out", "x"), "Missing argument 'RUN_OR_QUERY'"),
    (("envision",), "Missing argument 'SUITE'"),
    (("no-such-command",), "No such command 'no-such-command'"),
    (("list", "gadgets"), "'gadgets' is not one of"),
])
def test_click_usage_errors_are_one_line(capsys, args, expected):
    line = one_line_error(*run_cli(capsys, *args)[::2])
    assert expected in line and "--help'" in line


def _every_command() -> list[tuple[str, ...]]:
    import click

    from qbench.cli import cli

    paths = []
    for name, command in sorted(cli.commands.items()):
        if isinstance(command, click.Group):
            paths += [(name, sub) for sub in sorted(command.commands)]
        else:
            paths.append((name,))
    return paths


@pytest.mark.parametrize("command", _every_command(), ids=" ".join)
def test_an_unknown_option_is_one_line_for_every_command(capsys, command):
    line = one_line_error(*run_cli(capsys, *command, "--no-such-option")[::2])
    assert "No such option" in line and f"qbench {' '.join(command)} --help" in line


# -- item 9 and 7: run config files ---------------------------------------------------------------
@pytest.mark.parametrize("content, expected", [
    ("limit: abc\n", "limit: 'abc' is not a valid integer"),
    ("limit: 5.5\n", "limit: 5.5 is not a whole number"),
    ("seed: 99999999999999999999\n", "seed: 99999999999999999999 is not in the range"),
    ("batch-size: 5.5\n", "batch-size: bad --batch-size"),
    ("quantizer: nosuch\n", "unknown quantizer 'nosuch'"),
    ("bits: w9a8\n", "bad bit spec 'w9a8'"),
])
def test_a_bad_value_in_a_run_config_names_the_file_and_key(capsys, tmp_path, content, expected):
    config = tmp_path / "run.yaml"
    config.write_text(content)
    line = one_line_error(*run_cli(capsys, "eval", "--config", str(config))[::2])
    key = content.split(":")[0]
    assert expected in line and str(config) in line and key in line


def test_a_binary_run_config_is_one_line(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_bytes(bytes(range(128, 256)) * 4)
    line = one_line_error(*run_cli(capsys, "eval", "--config", str(config))[::2])
    assert str(config) in line and "not UTF-8" in line


def test_a_fractional_limit_from_a_settings_mapping_is_refused():
    from qbench.cli import eval_options_from_settings

    with pytest.raises(QbenchError, match="5.5 is not a whole number"):
        eval_options_from_settings({"limit": 5.5}, "sweep.yaml")


# -- item 9: suite files --------------------------------------------------------------------------
GOOD_SUITE = "name: mine\nversion: 1\ntasks:\n  - {dataset: toy-id-test}\n"


def test_unknown_top_level_suite_fields_are_rejected_with_the_allowed_list(tmp_path):
    from qbench.suites import load_suite

    path = tmp_path / "mine.yaml"
    path.write_text(GOOD_SUITE + "limit: 5.5\n")
    with pytest.raises(QbenchError) as caught:
        load_suite(path)
    assert str(caught.value) == (f"suite {path}: unknown field(s) limit (allowed: name, version, description, tasks)")


def test_a_fractional_count_in_a_suite_task_is_an_error(tmp_path):
    from qbench.suites import load_suite

    path = tmp_path / "spectral.yaml"
    path.write_text("name: s\nversion: 1\ntasks:\n  - {type: spectral, dataset: toy-id-test, max_images: 5.5}\n")
    with pytest.raises(QbenchError, match="max_images must be a positive integer, got 5.5"):
        load_suite(path)


def test_one_malformed_suite_file_is_reported_and_skipped(tmp_path, capsys):
    from qbench.suites import load_suite_dir

    (tmp_path / "a-good.yaml").write_text(GOOD_SUITE)
    (tmp_path / "b-bad.yaml").write_text("name: [unclosed\n")
    (tmp_path / "c-binary.yaml").write_bytes(b"\xff\xfe\x00bad")
    suites = load_suite_dir(tmp_path)
    assert [suite.name for suite in suites] == ["mine"]
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("qbench: warning: ") for line in lines)
    assert "b-bad.yaml" in lines[0] and "c-binary.yaml" in lines[1] and "skipped" in lines[0]


def test_a_plugin_whose_suite_file_is_malformed_does_not_disable_the_other_suites(tmp_path, capsys):
    from qbench.hookspecs import hookimpl
    from qbench.plugins import get_plugin_manager
    from qbench.registry import build_registry
    from qbench.suites import load_suite

    bad = tmp_path / "broken.yaml"
    bad.write_text("name: broken\nversion: one\ntasks: []\n")

    class BrokenSuitePlugin:
        @hookimpl
        def qbench_register_suites(self):
            return [load_suite(bad)]

    registry = build_registry(get_plugin_manager(load_entrypoints=False, extra_plugins=(BrokenSuitePlugin(),)))
    assert "toy-id" in registry.names("suites") and "broken" not in registry.names("suites")
    assert registry.names("models")  # every other kind still works
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qbench: warning: plugin ") and str(bad) in err


def test_the_cli_keeps_working_with_a_malformed_suite_under_benchmarks(tmp_path, capsys, monkeypatch):
    import qbench_benchmarks

    from qbench import cli

    folder = tmp_path / "benchmarks"
    folder.mkdir()
    (folder / "toy-id.yaml").write_text((Path(qbench_benchmarks.SUITE_DIR) / "toy-id.yaml").read_text())
    (folder / "zz-broken.yaml").write_text("name: zz\nversion: 1\ntasks: [{type: teleport}]\n")
    monkeypatch.setattr(qbench_benchmarks, "SUITE_DIR", folder)
    cli.registry.cache_clear()
    try:
        code, out, err = run_cli(capsys, "list", "suites")
    finally:
        cli.registry.cache_clear()
    assert code == 0 and "toy-id" in out
    assert err.count("\n") == 1 and err.startswith("qbench: warning: suite ") and "zz-broken.yaml" in err


# -- item 9: --allow-download without a network ---------------------------------------------------
def test_allow_download_without_a_network_is_one_line(capsys, tmp_path, monkeypatch):
    def no_network(*_args, **_kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    code, _, err = run_cli(capsys, "eval", "--model", "clip-vit-b32-openai", "--allow-download",
                           "--hf-cache", str(tmp_path / "empty-hub"), "--limit", "5")
    line = one_line_error(code, err)
    assert "--allow-download: cannot reach" in line and "Name or service not known" in line
    assert "hf download" in line and "--weights PATH" in line


# -- item 7: the results store --------------------------------------------------------------------
def _foreign_index(path: Path, statement: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as connection:
        connection.execute(statement)
    return path


@pytest.mark.parametrize("statement, detail", [
    ("CREATE TABLE results (a INTEGER)", "its results table lacks the columns config_hash, path, sha256, size and 10 more"),
    ("CREATE TABLE evaluations (a INTEGER)", "its evaluations table lacks the columns config_hash and document"),
    ("CREATE TABLE invoices (id INTEGER)", "it holds other tables: invoices"),
])
@pytest.mark.parametrize("command", [("results",), ("eval", "--limit", "5")], ids=["results", "eval"])
def test_a_store_whose_table_has_another_schema_is_one_line(capsys, tmp_path, statement, detail, command):
    index = _foreign_index(tmp_path / "other" / "x.sqlite", statement)
    line = one_line_error(*run_cli(capsys, *command, "--store", str(index))[::2])
    assert f"{index} is not a qbench results index ({detail})" in line and "move it aside" in line
    assert stored_documents(index) == []  # refused before anything was computed
    with sqlite3.connect(index) as connection:  # and the other program's database is untouched
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {statement.split()[2]}


def test_a_file_that_is_not_sqlite_as_the_index_is_one_line(capsys, tmp_path):
    index = tmp_path / "notes.sqlite"
    index.write_text("these are my notes, not a database\n" * 100)
    line = one_line_error(*run_cli(capsys, "results", "--store", str(index))[::2])
    assert "it is not an SQLite database" in line


def _legacy_store_with_corrupt_row(path: Path, config_hash: str) -> Path:
    return _store_with_rows(path, [(config_hash, "{not json")])


def _store_with_rows(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE evaluations (config_hash TEXT PRIMARY KEY, document TEXT)")
        connection.executemany("INSERT INTO evaluations VALUES (?, ?)", rows)
    return path


def test_results_with_a_corrupt_row_lists_the_rest_and_says_so_in_one_line(capsys, tmp_path):
    index = tmp_path / "old" / "x.sqlite"
    document = {"config": {"config_hash": "aaaaaaaaaaaaaaaa", "model": "toy-clip", "quantizer": "minmax", "bits": "w8a8",
                           "scope": "visual", "seed": 0, "suites": [], "limit": None},
                "provenance": {"created_at": "2025-01-01T00:00:00+00:00"}, "verification": {"passed": True}, "results": []}
    _store_with_rows(index, [("aaaaaaaaaaaaaaaa", json.dumps(document)), ("bbbbbbbbbbbbbbbb", "{not json")])
    code, out, err = run_cli(capsys, "results", "--store", str(index))
    line = one_line_error(code, err)
    assert "aaaaaaaaaaaaaaaa" in out  # the readable evaluation is still listed
    assert "1 stored result(s) are corrupt" in line and "re-run their configurations" in line
    kept = list((index.with_suffix("") / "corrupt").glob("bbbbbbbbbbbbbbbb.*.legacy-row.json"))
    assert len(kept) == 1 and kept[0].read_text() == "{not json" and str(kept[0]) in line


def test_eval_with_a_corrupt_row_of_its_configuration_recomputes_and_keeps_both(capsys, tmp_path):
    """The documented recovery (README, 'Results store'): a corrupt stored result is never served; it is moved to
    corrupt/ (the bytes kept) and the configuration computed again, and that result is stored."""
    import dataclasses

    from qbench.cli import eval_base_request, eval_options_from_settings, registry
    from qbench.engine.evaluate import resolve

    options = eval_options_from_settings({"limit": 5, "proxy_n": 32}, "test")
    request = dataclasses.replace(eval_base_request(options), quantizer_params=(("n_calibration", "32"),))
    config_hash = resolve(request, registry()).config["config_hash"]
    index = _legacy_store_with_corrupt_row(tmp_path / "old" / "x.sqlite", config_hash)
    code, out, err = run_cli(capsys, *QUICK_EVAL, "--store", str(index))
    assert code == 0 and "Traceback" not in err
    corrupt_lines = [line for line in err.splitlines() if "corrupt" in line]
    assert len(corrupt_lines) == 1 and "moved to" in corrupt_lines[0] and "re-run its configuration" in corrupt_lines[0]
    assert [path.stem for path in stored_documents(index)] == [config_hash]  # recomputed and stored
    assert len(list((index.with_suffix("") / "corrupt").glob(f"{config_hash}.*.legacy-row.json"))) == 1


def test_a_read_only_store_is_refused_before_computing(capsys, tmp_path, monkeypatch):
    import os

    store = tmp_path / "ro" / "x.sqlite"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if str(path).startswith(str(store.with_suffix("")))
                        and mode == os.W_OK else real_access(path, mode, **kw))
    line = one_line_error(*run_cli(capsys, *QUICK_EVAL, "--store", str(store))[::2])
    assert "is read-only" in line and "pass --store PATH to a writable folder" in line


def test_a_store_that_fails_while_saving_keeps_the_result_in_the_rescue_file(capsys, tmp_path, monkeypatch):
    """The store turns read-only during the evaluation: the result goes to $TMPDIR/qbench-unsaved/, in the store's
    format, and the one line names that file and how to bring it back."""
    import qbench.atomic
    from qbench.engine.store import parse_document

    store = tmp_path / "ro" / "x.sqlite"
    documents = store.with_suffix("") / "documents"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    real_write = qbench.atomic.write_atomic

    def read_only_documents(path, data, **kwargs):
        if str(path).startswith(str(documents)):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_write(path, data, **kwargs)

    monkeypatch.setattr(qbench.atomic, "write_atomic", read_only_documents)
    code, _, err = run_cli(capsys, *QUICK_EVAL, "--store", str(store))
    line = last_line_error(code, err)
    rescue = next((tmp_path / "tmp" / "qbench-unsaved").glob("*.json"))
    assert f"saved to {rescue} instead" in line and "Read-only file system" in line and "--reindex" in line
    document = parse_document(rescue.read_bytes(), rescue, rescue.stem)  # checksummed, like a stored file
    assert document["config"]["limit"] == 5 and document["results"]


def test_an_unwritable_lock_folder_is_one_line(tmp_path):
    from qbench.engine.locks import KeyLock

    folder = tmp_path / "locks-file"
    folder.write_text("a file where the lock folder should be")
    with pytest.raises(QbenchError) as caught:
        KeyLock(folder / "sub", "0123456789abcdef").acquire()
    assert "\n" not in str(caught.value) and "writable folder" in str(caught.value)


# -- item 7: output paths that do not exist or are files ----------------------------------------
@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "afile"
    path.write_text("in the way\n")
    return path


@pytest.mark.parametrize("target, expected", [
    ("{tmp}/missing/rows.csv", "the folder {tmp}/missing does not exist; create it (mkdir -p {tmp}/missing)"),
    ("{file}/rows.csv", "{file} is a file, not a folder"),
    ("{file}/deeper/rows.csv", "{file} is a file, not a folder"),
    ("{tmp}", "is a directory"),
])
def test_results_csv_into_a_missing_folder_or_a_file(capsys, tmp_path, a_file, target, expected):
    target = target.format(tmp=tmp_path, file=a_file)
    line = one_line_error(*run_cli(capsys, "results", "--csv", target)[::2])
    assert expected.format(tmp=tmp_path, file=a_file) in line


@pytest.mark.parametrize("option, target, expected", [
    ("--markdown", "{tmp}/missing/table.md", "the folder {tmp}/missing does not exist"),
    ("--markdown", "{file}/table.md", "{file} is a file, not a folder"),
    ("--plots", "{file}", "is a file"),
    ("--plots", "{file}/figures", "cannot be created: {file} is a file"),
])
def test_eval_outputs_are_checked_before_computing(capsys, tmp_path, a_file, isolated_store, option, target, expected):
    target = target.format(tmp=tmp_path, file=a_file)
    line = one_line_error(*run_cli(capsys, *QUICK_EVAL, option, target)[::2])
    assert expected.format(tmp=tmp_path, file=a_file) in line
    assert stored_documents(isolated_store) == []  # nothing was computed, so nothing could be lost


def test_markdown_that_fails_after_computing_keeps_the_result_in_the_store(capsys, tmp_path, isolated_store,
                                                                           monkeypatch):
    import qbench.atomic

    target = tmp_path / "table.md"

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(qbench.atomic, "write_output", disk_full)
    code, out, err = run_cli(capsys, *QUICK_EVAL, "--markdown", str(target))
    line = last_line_error(code, err)
    [document] = stored_documents(isolated_store)
    assert f"cannot write --markdown {target} (No space left on device)" in line
    assert f"the evaluations are in the store {isolated_store.with_suffix('')} (config {document.stem})" in line
    assert "PARTIAL RUN" in out  # the tables were printed before the file failed
    assert not target.exists()


@pytest.mark.parametrize("target, expected", [
    ("{file}", "is a file"),
    ("{file}/submissions", "cannot be created: {file} is a file"),
])
def test_submit_out_into_a_file(capsys, a_file, target, expected):
    target = target.format(file=a_file)
    line = one_line_error(*run_cli(capsys, "submit", "0123456789abcdef", "--out", target)[::2])
    assert expected.format(file=a_file) in line
