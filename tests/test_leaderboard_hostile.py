"""The hostile-submission catalogue: every forgery and malformed file we know of, made from a LEGITIMATE submission.

A real toy evaluation (minmax w4a8, toy-id) is submitted with 'qbench submit' once per session; each case below
changes one thing about it (the document, the raw file bytes, or the folder) and must be refused by
``load_submissions`` with one line that names the file and contains the expected reason. The untouched submission
must still load.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest

from qbench.engine.confighash import config_hash
from qbench.errors import QbenchError
from qbench.reporting.leaderboard import load_submission_file, load_submissions, render_markdown, submission_filename
from qbench.analysis.metrics import relative_change

pytestmark = pytest.mark.usefixtures("single_thread")

try:
    from qbench.engine.evidence import check_evidence  # noqa: F401

    HAS_EVIDENCE = True
except ImportError:
    HAS_EVIDENCE = False

LEGIT_ARGS = ("--quantizer", "minmax", "--bits", "w4a8")


@pytest.fixture(scope="module")
def legit(submission_world):
    return submission_world.submit(*LEGIT_ARGS)


# -- helpers that turn the legitimate submission into a hostile one --------------------------------------------------


def evidence_name(document: dict[str, Any]) -> str:
    return submission_filename(document)[: -len(".json")] + ".evidence.safetensors"


def rehash(document: dict[str, Any]) -> dict[str, Any]:
    """Recompute the config hash after an edit, as a forger would, so the case isolates the edit itself."""
    document["config"]["config_hash"] = config_hash(document["config"])
    return document


def write_document(folder: Path, document: Any, legit, *, name: str | None = None, text: str | None = None) -> Path:
    """Write ``document`` under its derived name (so the name check does not pre-empt the case), with the legit
    evidence beside it under the derived evidence name."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        derived = submission_filename(document)
    except (KeyError, TypeError, AttributeError):  # too broken to derive a name from: keep the legitimate one
        derived = None
    path = folder / (name or derived or legit.path.name)
    path.write_text(text if text is not None else json.dumps(document, indent=2))
    evidence_target = folder / (evidence_name(document) if derived else legit.evidence.name)
    evidence_target.write_bytes(legit.evidence.read_bytes())
    return path


def edit(mutate: Callable[[dict[str, Any]], Any], *, hashed: bool = False):
    """A case that applies ``mutate`` to a copy of the document (and recomputes the hash when ``hashed``)."""

    def make(folder: Path, legit) -> Path:
        document = copy.deepcopy(legit.document)
        mutate(document)
        if hashed:
            rehash(document)
        return write_document(folder, document, legit)

    return make


def text_edit(change: Callable[[str], str | bytes]):
    """A case that rewrites the legitimate file's raw text (literals json.dumps would never write)."""

    def make(folder: Path, legit) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        changed = change(legit.path.read_text())
        path = folder / legit.path.name
        path.write_bytes(changed if isinstance(changed, bytes) else changed.encode())
        (folder / legit.evidence.name).write_bytes(legit.evidence.read_bytes())
        return path

    return make


def record(document: dict[str, Any], metric: str) -> dict[str, Any]:
    return next(item for item in document["results"] if item["metric"] == metric)


def set_number(document: dict[str, Any], metric: str, field: str, value: float) -> None:
    """Set ``field`` of the first ``metric`` record and recompute ``delta``/``diff`` (a careful forger)."""
    item = record(document, metric)
    item[field] = value
    item["delta"] = relative_change(item["fp32"], item["quantized"])
    item["diff"] = item["quantized"] - item["fp32"]


def replace_number(metric: str, field: str, literal: str):
    """Raw-text edit: the ``field`` number of the first ``metric`` record becomes ``literal``."""

    def change(text: str) -> str:
        document = json.loads(text)
        value = record(document, metric)[field]
        needle = f'"{field}": {json.dumps(value)}'
        assert needle in text
        return text.replace(needle, f'"{field}": {literal}', 1)

    return change


def verification_set(**values):
    def mutate(document):
        document["verification"].update(values)
    return mutate


def module_set(index: int, **values):
    def mutate(document):
        document["verification"]["modules"][index].update(values)
    return mutate


def drop_last_module(document):
    document["verification"]["modules"].pop()
    document["verification"]["n_modules"] -= 1


def invented_minimal(folder: Path, legit) -> Path:
    """The attack from the issue: an invented document with only a config, results and a bare verification."""
    document = {"config": copy.deepcopy(legit.document["config"]),
                "verification": {"passed": True, "n_modules": 0},
                "results": copy.deepcopy(legit.document["results"])}
    return write_document(folder, document, legit)


def huge_file(folder: Path, legit) -> Path:
    """A 200 MB string, streamed to disk in 1 MiB pieces (never held in memory)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / legit.path.name
    chunk = "A" * (1 << 20)
    with open(path, "w") as handle:
        handle.write('{"submitter": "')
        for _ in range(200):
            handle.write(chunk)
        handle.write('"}')
    return path


def long_string(document):
    document["provenance"]["platform"] = "x" * (1 << 20)


def extra_records(count: int):
    def change(text: str) -> str:
        assert text.count('"results": [') == 1
        return text.replace('"results": [', '"results": [' + "{}," * count, 1)
    return change


def many_records(document):
    template = copy.deepcopy(document["results"][0])
    template.pop("bootstrap", None)
    document["results"] += [dict(template, param=f"p={index}") for index in range(6000)]


def deep_array(folder: Path, legit) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / legit.path.name
    path.write_text('{"config": ' + "[" * 200_000 + "]" * 200_000 + "}")
    return path


def duplicate_key(text: str) -> str:
    """A second ``submitter`` key: a reviewer reads the first, the parser would keep the last."""
    assert text.startswith("{\n")
    return '{\n  "submitter": "Ada Lovelace",\n' + text[2:]


def non_utf8(text: str) -> bytes:
    return text.encode().replace(b'"Ada Lovelace"', b'"Ada \xff Lovelace"')


def symlinked(folder: Path, legit) -> Path:
    """The derived name, but a symbolic link to a file outside the folder."""
    outside = legit.copy_into(folder.parent / "outside")
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / legit.path.name
    os.symlink(outside, link)
    return link


def hard_linked(folder: Path, legit) -> Path:
    outside = legit.copy_into(folder.parent / "outside-hard")
    folder.mkdir(parents=True, exist_ok=True)
    os.link(outside, folder / legit.path.name)
    return folder / legit.path.name


def wrong_name(folder: Path, legit) -> Path:
    return write_document(folder, copy.deepcopy(legit.document), legit, name="toy-clip-best-ever.json")


def folder_entry(folder: Path, legit) -> Path:
    legit.copy_into(folder)
    (folder / "nested.json").mkdir()
    return folder / "nested.json"


def set_path(path: list, value: Any):
    def mutate(document):
        target = document
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def w2a2(document):
    """Relabel a w4a8 run as w2a2 everywhere a careful forger would (config, plan), hash recomputed."""
    document["config"]["bits"] = "w2a2"
    document["quantizer_provenance"]["bits"] = "w2a2"
    document["verification"]["expected"]["bits"] = "w2a2"


def expected_plan_edited(document):
    document["verification"]["expected"]["bits"] = "w8a8"


def limited(document):
    document["config"]["limit"] = 1000


def suite_version(document):
    document["config"]["suites"][0]["version"] = 7
    for item in document["results"]:
        item["suite_version"] = 7


def old_version(document):
    document["config"]["qbench_version"] = document["provenance"]["qbench_version"] = "0.0.9"


def exempting_extras(document):
    document["verification"]["float_extras"] = {"visual.transformer": "kept in float"}


CASES: dict[str, tuple[Callable[[Path, Any], Path], str]] = {
    # name: (make the hostile file in a folder from the legitimate submission, expected fragment of the reason)
    "edited accuracy (evidence)": (edit(lambda d: set_number(d, "accuracy", "quantized", 0.999)),
                                   "evidence"),
    "w2a2 with hash recomputed": (edit(w2a2, hashed=True), "carries w4a8 (expected w4a8) but the run's config.bits w2a2 requires w2a2"),
    "minimal invented document": (invented_minimal, "missing key provenance"),
    "bare verification passed n_modules 0": (edit(set_path(["verification"], {"passed": True, "n_modules": 0})),
                                             "missing key verification.towers"),
    "verification with no modules": (edit(verification_set(n_modules=0, modules=[])), "verification.n_modules is 0"),
    "passed beside problems": (edit(verification_set(problems=["visual.conv1: never ran"])),
                               "verification.passed is true beside 1 problems"),
    "failed verification": (edit(verification_set(passed=False)), "verification.passed is false"),
    "n_modules disagrees with modules": (edit(verification_set(n_modules=50)), "verification.n_modules is 50 but"),
    "200 MB string": (huge_file, "more than the 5.0 MiB"),
    "1 MiB string": (edit(long_string), "provenance.platform is a string of 1,048,576 characters"),
    "300,000 extra records": (text_edit(extra_records(300_000)), "results is an array of 300,003 entries"),
    "6,000 extra records": (edit(many_records), "results has 6,003 entries, more than the 5,000"),
    "HTML in submitter": (edit(set_path(["submitter"], "<img src=x onerror=alert(1)>")),
                          "character '<' is not allowed"),
    "markdown link in submitter": (edit(set_path(["submitter"], "[winner](https://evil.example)")),
                                   "character '[' is not allowed"),
    "mention in submitter": (edit(set_path(["submitter"], "ada@example")), "character '@' is not allowed"),
    "bidi override in submitter": (edit(set_path(["submitter"], "Ada \u202eecalevoL")),
                                   "character '\\u202e' is not allowed"),
    "markdown in model": (edit(set_path(["config", "model"], "toy-clip](https://evil.example)"), hashed=True),
                          "config.model: unknown model"),
    "HTML in result dataset": (edit(set_path(["results", 0, "dataset"], "<b>toy-id-test</b>")),
                               "results[0].dataset \"<b>toy-id-test</b>\" is not a dataset"),
    "NLL 1.8e308": (text_edit(replace_number("nll", "quantized", "1.8e308")), "overflows a 64-bit float"),
    "NLL 1e300": (edit(lambda d: set_number(d, "nll", "quantized", 1e300)), "is above 10000"),
    "accuracy in percent": (edit(lambda d: set_number(d, "accuracy", "quantized", 86.9)), "outside [0, 1]"),
    "NaN literal": (text_edit(replace_number("ece", "fp32", "NaN")), "is NaN, which is not JSON"),
    "-Infinity literal": (text_edit(replace_number("ece", "fp32", "-Infinity")), "is -Infinity, which is not JSON"),
    "5000-digit integer": (text_edit(lambda t: t.replace('"seed": 0', '"seed": ' + "9" * 5000, 1)),
                           "number literal of 5000 characters"),
    "200,000-deep array": (deep_array, "nests deeper than 32 levels"),
    "duplicate keys": (text_edit(duplicate_key), 'repeats the key "submitter"'),
    "non-UTF-8 bytes": (text_edit(non_utf8), "is not UTF-8 text (byte 0xff"),
    "top level is an array": (text_edit(lambda t: "[" + t + "]"), "expected a JSON object"),
    "unknown top-level field": (edit(set_path(["verified_by"], "the authors")), "verified_by is not a field qbench writes"),
    "unknown config field": (edit(set_path(["config", "reviewed"], True), hashed=True),
                             "config.reviewed is not a field qbench writes"),
    "unknown provenance field": (edit(set_path(["provenance", "gpu_hours"], 1)),
                                 "provenance.gpu_hours is not a field"),
    "unknown verification field": (edit(set_path(["verification", "audited"], True)),
                                   "verification.audited is not a field"),
    "unknown module field": (edit(module_set(0, trusted=True)), "verification.modules[0].trusted is not a field"),
    "unknown result field": (edit(set_path(["results", 0, "note"], "best run")), "results[0].note is not a field"),
    "symlink": (symlinked, "is a symbolic link"),
    "hard link to a file outside": (hard_linked, "is a hard link"),
    "wrong file name": (wrong_name, "the file name must be toy-clip-minmax-w4a8-visual-"),
    "folder named like a submission": (folder_entry, "nested.json: is not a regular file"),
    "random_init true": (edit(set_path(["config", "random_init"], True), hashed=True), "config.random_init is true"),
    "file: weights": (edit(set_path(["config", "weights_tag"], "file:/tmp/tuned.safetensors"), hashed=True),
                      "names a local weights file"),
    "random-init weights tag": (edit(set_path(["config", "weights_tag"], "toy-v1:random-init"), hashed=True),
                                "marks randomly initialised weights"),
    "other weights tag": (edit(set_path(["config", "weights_tag"], "toy-v2-finetuned"), hashed=True),
                          "is not the registered weights of 'toy-clip'"),
    "random-init weights source": (edit(set_path(["model", "weights_source"], "random-init")),
                                   "model.weights_source is \"random-init\""),
    "unknown quantizer": (edit(set_path(["config", "quantizer"], "magic-q"), hashed=True),
                          "config.quantizer: unknown quantizer 'magic-q'"),
    "unknown suite": (edit(set_path(["config", "suites", 0, "name"], "toy-easy"), hashed=True),
                      "config.suites[0].name: unknown suite 'toy-easy'"),
    "suite version that does not exist": (edit(suite_version, hashed=True),
                                          "config.suites[0].version is 7 but suite 'toy-id' is registered at version 1"),
    "--limit run": (edit(limited, hashed=True), "config.limit is 1000: a --limit run"),
    "images left out": (edit(set_path(["datasets", "toy-id-test", "num_scored"], 900)),
                        "datasets.toy-id-test.num_scored 900 is not num_images 1000"),
    "unreadable images skipped": (edit(set_path(["datasets", "toy-id-test", "unreadable"], 3)),
                                  "datasets.toy-id-test.unreadable is 3"),
    "delta edited": (edit(set_path(["results", 0, "delta"], -0.5)), "results[0].delta is -0.5 but"),
    "diff edited": (edit(set_path(["results", 0, "diff"], 0.07)), "results[0].diff is 0.07 but"),
    "module not in inventory": (edit(module_set(3, name="visual.transformer.resblocks.9.attn.q_proj")),
                                "is not a quantizable module of 'toy-clip' in scope visual"),
    "module bits not config bits": (edit(module_set(0, weight_bits=8, expected_weight_bits=8, weight_max_unique=200)),
                                    "carries w8a8 (expected w8a8) but the run's config.bits w4a8 requires w4a8"),
    "verification plan edited": (edit(expected_plan_edited), "verification.expected is"),
    "in-scope module missing": (edit(drop_last_module), "verification.modules lacks 1 of the 49"),
    "module listed twice": (edit(module_set(1, name="visual.conv1", kind="Conv2d")),
                            "verification.modules[1].name \"visual.conv1\" is listed twice"),
    "too many distinct values": (edit(module_set(2, weight_max_unique=255)), "a 4-bit tensor holds 2 to 16"),
    "float extras exempting the model": (edit(exempting_extras), "would exempt the in-scope module"),
    "null proxy for a calibrating quantizer": (edit(set_path(["config", "proxy"], None), hashed=True),
                                               "config.proxy is null but this qbench resolves \"toy-proxy\""),
    "old qbench version": (edit(old_version, hashed=True),
                           "config.qbench_version is \"0.0.9\" but this qbench resolves"),
    "foreign scorer resources": (edit(set_path(["config", "scorer_resources"], {"neglabel_lexicon": "0" * 16}),
                                      hashed=True), "config.scorer_resources is"),
    "tampered hash": (edit(set_path(["config", "seed"], 7)), "does not match the config (expected "),
    "device with markup": (edit(set_path(["config", "device"], "cuda:<b>0</b>"), hashed=True),
                           "config.device must be cpu, cuda or cuda:N"),
    "missing config field": (edit(lambda d: d["config"].pop("bits"), hashed=True), "missing key config.bits"),
    "missing result field": (edit(lambda d: d["results"][1].pop("quantized")), "missing key results[1].quantized"),
    "wrong type": (edit(set_path(["config", "proxy_n"], "1000"), hashed=True),
                   'config.proxy_n must be an integer, got string "1000"'),
    "bool is not an int": (edit(set_path(["config", "seed"], True), hashed=True), "config.seed must be an integer"),
    "result not an object": (edit(set_path(["results", 0], 0.5)), "results[0] must be an object"),
    "empty results": (edit(set_path(["results"], [])), "results is empty"),
    "duplicate record": (edit(lambda d: d["results"].append(copy.deepcopy(d["results"][0]))),
                         "results[3] repeats results[0]"),
    "bad timestamp": (edit(set_path(["provenance", "created_at"], "yesterday")), "provenance.created_at must be an ISO-8601"),
    "timestamp in the future": (edit(set_path(["provenance", "created_at"], "2999-01-01T00:00:00+00:00")),
                                "lies in the future"),
}


@pytest.mark.parametrize("case", [
    pytest.param(name, marks=pytest.mark.xfail(not HAS_EVIDENCE, reason="needs evidence", strict=True))
    if name == "edited accuracy (evidence)" else name
    for name in CASES
])
def test_hostile_submission_is_refused_with_one_line(tmp_path, legit, case):
    make, fragment = CASES[case]
    folder = tmp_path / "submissions"
    path = make(folder, legit)
    with pytest.raises(QbenchError) as error:
        load_submissions(folder)
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(str(path) + ": "), message
    assert fragment in message, message


@pytest.mark.xfail(not HAS_EVIDENCE, reason="needs evidence", strict=True)
def test_a_limited_run_relabelled_as_full_is_caught_by_its_evidence(tmp_path, submission_world, legit):
    """--limit 60 with ``config.limit`` set to null and the hash recomputed: the document alone looks like a full run
    (60 of 60 images scored); the evidence labels are not the registered split's."""
    document, evidence = submission_world.evaluate(*LEGIT_ARGS, "--limit", "60")
    assert document["datasets"]["toy-id-test"]["num_scored"] == 60
    document["config"]["limit"] = None
    rehash(document)
    document["submitter"] = "Ada Lovelace"
    folder = tmp_path / "submissions"
    folder.mkdir()
    path = folder / submission_filename(document)
    path.write_text(json.dumps(document, indent=2))
    (folder / evidence_name(document)).write_bytes(evidence.read_bytes())
    with pytest.raises(QbenchError) as error:
        load_submissions(folder)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and "evidence" in message, message


def test_catalogue_is_large_enough():
    assert len(CASES) >= 25


def test_the_legitimate_submission_passes_and_renders(tmp_path, legit):
    folder = tmp_path / "submissions"
    legit.copy_into(folder)
    (submission,) = load_submissions(folder)
    assert submission.submitter == "Ada Lovelace"
    assert submission.config_hash == legit.document["config"]["config_hash"]
    assert legit.path.name == submission_filename(legit.document)
    row = next(line for line in render_markdown([submission]).splitlines() if line.startswith("| toy-clip"))
    assert "| minmax | w4a8 | visual | toy-id@1 | toy-id-test |" in row and "| Ada Lovelace |" in row


def test_a_file_outside_the_folder_is_refused(tmp_path, legit):
    outside = legit.copy_into(tmp_path / "elsewhere")
    folder = tmp_path / "submissions"
    folder.mkdir()
    with pytest.raises(QbenchError, match="is not directly inside"):
        load_submission_file(outside, folder)
    with pytest.raises(QbenchError, match="is not directly inside"):
        load_submission_file(folder / ".." / "elsewhere" / outside.name, folder)


def test_a_symlinked_folder_is_refused(tmp_path, legit):
    real = tmp_path / "real"
    legit.copy_into(real)
    (tmp_path / "linked").symlink_to(real, target_is_directory=True)
    with pytest.raises(QbenchError, match="is a symbolic link"):
        load_submissions(tmp_path / "linked")


def test_hostile_file_through_the_cli_is_one_line_exit_2(tmp_path, legit):
    from submission_factory import run_qbench

    folder = tmp_path / "submissions"
    CASES["200,000-deep array"][0](folder, legit)
    for extra in ((), ("--check",)):
        code, out, err = run_qbench("leaderboard", "--submissions", str(folder), "--out", str(tmp_path / "README.md"),
                                    *extra)
        assert code == 2 and out == ""
        assert len(err.strip().splitlines()) == 1 and "nests deeper than 32 levels" in err and "Traceback" not in err
