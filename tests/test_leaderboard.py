"""Tests for qbench.reporting.leaderboard: loading real submissions, 'qbench submit' and 'qbench leaderboard [--check]', the
generated Markdown table, and the safe JSON reader underneath. Hostile submissions are catalogued in
tests/test_leaderboard_hostile.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from qbench.engine.confighash import config_hash
from qbench.errors import QbenchError
from qbench.reporting.leaderboard import (
    GENERATED_MARKER,
    ResultRecord,
    Submission,
    check_submitter,
    load_submissions,
    render_markdown,
    submission_filename,
    submission_from_eval,
    validate_submission,
)
from qbench.reporting.markdown_text import markdown_cell
from qbench.engine.safe_json import MAX_JSON_DEPTH, nesting_depth, parse_json_text
from submission_factory import run_qbench

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def legit(submission_world):
    return submission_world.submit("--quantizer", "minmax", "--bits", "w4a8")


def table_rows(markdown: str) -> list[list[str]]:
    """Data rows of the overview table (the first table), split into stripped cells (escaped pipes kept inside
    their cell); the task-family sections below it are tested in test_leaderboard_sections."""
    lines = []
    for line in markdown.splitlines():
        if line.startswith("| "):
            lines.append(line)
        elif lines and not line.startswith("|"):
            break
    lines = [line for line in lines if "---" not in line]
    return [[cell.strip() for cell in line.strip("|").replace("\\|", "\0").split(" | ")] for line in lines[1:]]


# ------------------------------------------------------------------ real submissions


def test_submitted_run_loads_and_renders(tmp_path, legit):
    legit.copy_into(tmp_path)
    (submission,) = load_submissions(tmp_path)
    assert submission.submitter == "Ada Lovelace"
    assert Path(submission.source).name == submission_filename(legit.document)
    markdown = render_markdown([submission])
    assert markdown.splitlines()[0] == GENERATED_MARKER
    (row,) = table_rows(markdown)
    accuracy = next(record for record in submission.results if record.metric == "accuracy")
    assert row[:6] == ["toy-clip", "minmax", "w4a8", "visual", "toy-id@1", "toy-id-test"]
    assert row[6].startswith(f"{accuracy.fp32 * 100:.2f} → {accuracy.quantized * 100:.2f} (")
    assert row[9:] == [f"`{submission.config_hash}`", "cpu", submission.config["qbench_version"], "Ada Lovelace"]


def test_leaderboard_check_passes_on_a_freshly_generated_folder(tmp_path, legit):
    folder, readme = tmp_path / "submissions", tmp_path / "README.md"
    legit.copy_into(folder)
    code, _, err = run_qbench("leaderboard", "--submissions", str(folder), "--out", str(readme))
    assert code == 0, err
    code, _, err = run_qbench("leaderboard", "--submissions", str(folder), "--out", str(readme), "--check")
    assert code == 0 and "is up to date (1 submissions)" in " ".join(err.split())
    readme.write_text(readme.read_text().replace("Ada Lovelace", "Someone Else"))
    code, _, err = run_qbench("leaderboard", "--submissions", str(folder), "--out", str(readme), "--check")
    assert code == 2 and "is out of date" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("quantizer", ["fp32", "quarot"])
def test_submit_works_for_quantizers_without_calibration(tmp_path, submission_world, quantizer):
    submission = submission_world.submit("--quantizer", quantizer, "--bits", "w4a8")
    assert submission.document["config"]["proxy"] is None  # no calibration data: no proxy, and that is valid
    submission.copy_into(tmp_path)
    (loaded,) = load_submissions(tmp_path)
    assert loaded.config["quantizer"] == quantizer


def test_submit_accepts_a_hash_prefix_and_writes_evidence_beside(legit):
    # submission_world ran 'qbench submit <first 7 hex digits>'
    assert legit.path.name == submission_filename(legit.document)
    assert legit.evidence.is_file() and legit.evidence.name == legit.path.name[:-5] + ".evidence.safetensors"
    assert legit.path.read_text().endswith("}\n")


def test_submit_into_a_file_is_one_line(tmp_path, submission_world, legit):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with submission_world.environment():
        code, _, err = run_qbench("submit", legit.document["config"]["config_hash"], "--out", str(blocker))
        assert code == 2 and len(err.strip().splitlines()) == 1 and "is a file" in err
        code, _, err = run_qbench("submit", "ffffffffffff")
        assert code == 2 and "no evaluation 'ffffffffffff'" in err


def test_include_store_lists_valid_runs_and_leaves_out_the_rest(tmp_path, submission_world, legit):
    submission_world.evaluate("--quantizer", "minmax", "--bits", "w4a8", "--limit", "60")  # a run no leaderboard takes
    (tmp_path / "empty").mkdir()
    readme = tmp_path / "README.md"
    with submission_world.environment():
        code, _, err = run_qbench("leaderboard", "--submissions", str(tmp_path / "empty"), "--out", str(readme),
                                  "--include-store")
    assert code == 0, err
    assert f"`{legit.document['config']['config_hash']}`" in readme.read_text()
    assert "left out" in err and "config.limit is 60" in " ".join(err.split())


def test_submission_from_eval_adds_submitter_without_touching_input(legit):
    eval_json = {key: value for key, value in legit.document.items() if key != "submitter"}
    before = copy.deepcopy(eval_json)
    document = submission_from_eval(eval_json, " Grace Hopper ")
    assert eval_json == before
    assert document["submitter"] == "Grace Hopper"
    assert document["config"] == before["config"]  # the submitter is not part of the configuration
    assert validate_submission(document, "x.json").submitter == "Grace Hopper"
    assert "submitter" not in submission_from_eval(eval_json, None)


def test_submission_from_eval_rejects_random_init(legit):
    document = copy.deepcopy(legit.document)
    document["config"]["random_init"] = True
    document["config"]["config_hash"] = config_hash(document["config"])
    with pytest.raises(QbenchError, match="random_init"):
        submission_from_eval(document, "me")


def test_tampered_hash_message_names_both_hashes(tmp_path, legit):
    path = legit.copy_into(tmp_path)
    document = json.loads(path.read_text())
    original = document["config"]["config_hash"]
    document["config"]["seed"] = 7
    path.write_text(json.dumps(document))
    expected = config_hash(document["config"])
    with pytest.raises(QbenchError) as error:
        load_submissions(tmp_path)
    assert str(error.value) == (f"{path}: config_hash \"{original}\" does not match the config (expected {expected}); "
                                "re-export it with qbench")


def test_other_regular_files_are_left_alone(tmp_path, legit):
    legit.copy_into(tmp_path)
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / ".partial").mkdir()  # qbench.atomic's staging folder
    assert len(load_submissions(tmp_path)) == 1


def test_empty_folder_renders_an_empty_table(tmp_path):
    assert load_submissions(tmp_path) == []
    markdown = render_markdown([])
    assert GENERATED_MARKER in markdown and "No submissions yet" in markdown


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(QbenchError, match="does not exist"):
        load_submissions(tmp_path / "nope")


def test_bad_json_syntax_reports_line_and_column(tmp_path):
    (tmp_path / "broken.json").write_text('{\n  "config": {\n    "model": "x",,\n  }\n}\n')
    with pytest.raises(QbenchError) as error:
        load_submissions(tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'broken.json'}: invalid JSON at line 3 column 18")


# ------------------------------------------------------------------ rendering (from in-memory submissions)


def fake_submission(model="toy-clip", quantizer="minmax", acc=(0.6125, 0.5810), extra=(), submitter=None,
                    hash_="0123456789abcdef") -> Submission:
    """A :class:`Submission` built directly (not validated): for rendering tests only."""
    config = {"model": model, "quantizer": quantizer, "bits": "w8a8", "scope": "visual", "device": "cpu",
              "qbench_version": "0.1.0", "suites": [{"name": "toy-id", "version": 1}], "config_hash": hash_}
    records = [ResultRecord("toy-id", "toy-id-test", "accuracy", *acc, None)]
    records += [ResultRecord("toy-id", dataset, metric, fp, q, None) for dataset, metric, fp, q in extra]
    return Submission(f"{quantizer}.json", {"config": config}, tuple(records), submitter)


def test_rows_are_sorted_and_zero_delta_has_no_sign():
    submissions = [
        fake_submission(model="z-model", acc=(0.5, 0.4)),
        fake_submission(quantizer="gptq", acc=(0.6125, 0.6125)),
        fake_submission(quantizer="awq", acc=(0.6125, 0.60)),
        fake_submission(quantizer="smooth", acc=(0.6125, 0.30), extra=[("another", "ece", 0.05, 0.07)]),
    ]
    rows = table_rows(render_markdown(submissions))
    assert [(row[0], row[1], row[5]) for row in rows] == [
        ("toy-clip", "smooth", "another"),
        ("toy-clip", "gptq", "toy-id-test"),  # quantized accuracy 61.25
        ("toy-clip", "awq", "toy-id-test"),  # 60.00
        ("toy-clip", "smooth", "toy-id-test"),  # 30.00
        ("z-model", "minmax", "toy-id-test"),
    ]
    assert rows[1][6] == "61.25 → 61.25 (±0.00)"
    assert rows[0][6] == "—" and rows[0][7] == "5.00 → 7.00 (+2.00)"
    assert rows[0][-1] == "—"  # no submitter


def test_every_rendered_string_is_escaped():
    hostile = "<img src=x onerror=alert(1)> | [link](https://x) `code` *em* _u_ &amp;\nnext"
    markdown = render_markdown([fake_submission(model=hostile, submitter=hostile, hash_="<b>")])
    row = markdown.splitlines()[-1]
    for raw in ("<img", "<b>", "[link]", "`code`", "*em*", "_u_", " &amp; ", " | [", "\nnext"):
        assert raw not in row
    assert "&lt;img src=x onerror=alert(1)&gt; \\| \\[link\\](https://x) \\`code\\` \\*em\\* \\_u\\_ &amp;amp; next" in row
    assert len(table_rows(markdown)[0]) == 13  # the pipe stayed inside its cell


def test_markdown_cell_limits_length_and_drops_control_characters():
    assert markdown_cell("a\tb\x00c\u202e") == "a bc"
    assert len(markdown_cell("x" * 1000)) == 200


def test_submitter_charset():
    assert check_submitter(" José O'Neil-Smith (team 2) ") == "José O'Neil-Smith (team 2)"
    for bad in ("", "a\nb", "x" * 101, "<b>", "a|b", "[x](y)", "@ada", "\u202eabc", "a`b", "a&b", 7):
        with pytest.raises(QbenchError, match="submitter must"):
            check_submitter(bad)


# ------------------------------------------------------------------ safe JSON


def test_nesting_depth_is_found_without_recursion():
    deep = "[" * 200_000 + "]" * 200_000
    assert nesting_depth(deep) == (MAX_JSON_DEPTH + 1, MAX_JSON_DEPTH)
    assert nesting_depth('{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\"]]"}') is None  # brackets in strings
    with pytest.raises(QbenchError, match="nests deeper than"):
        parse_json_text(deep, "deep.json")


def test_duplicate_keys_are_reported_with_their_path():
    with pytest.raises(QbenchError, match=r'^x\.json: results\[1\] repeats the key "fp32"'):
        parse_json_text('{"results": [{"fp32": 1}, {"fp32": 1, "fp32": 2}]}', "x.json")


@pytest.mark.parametrize("literal, fragment", [
    ("NaN", "a.b is NaN"), ("Infinity", "a.b is Infinity"), ("-Infinity", "a.b is -Infinity"),
    ("1e999", "a.b is 1e999, which overflows"), ("-1.8e308", "overflows"), ("1" * 41, "number literal of 41"),
])
def test_non_finite_and_oversized_numbers_are_refused(literal, fragment):
    with pytest.raises(QbenchError, match=fragment):
        parse_json_text('{"a": {"b": %s}}' % literal, "x.json")


def test_valid_json_round_trips_as_plain_objects():
    value = parse_json_text('{"a": [1, 2.5, {"b": null, "c": "é"}], "d": true}', "ok.json")
    assert value == {"a": [1, 2.5, {"b": None, "c": "é"}], "d": True}
    assert type(value) is dict and type(value["a"][2]) is dict
