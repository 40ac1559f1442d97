"""Per-sample evidence: written with every evaluation, and every evidence-backed number recomputed from it.

One logit-tuned toy run over the ID, OOD, robustness and spurious suites (module fixture) exercises every
record kind and all three states (fp32, quantized, quantized-tuned); the tests then edit the document or the
evidence the way an attacker or a flipped bit would and check that ``qbench rescore`` notices.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cli_runner import run_cli
from qbench.data import DatasetRequest
from qbench.errors import QbenchError
from qbench.engine.evaluate import EVALUATION_DATA_SEED
from qbench.engine.evidence import (EvidenceRecorder, NOT_EVIDENCE_TASKS, check_evidence, evidence_path_for, label_fingerprint,
                             parse_evidence, read_evidence)
from qbench.plugins import get_plugin_manager
from qbench.registry import build_registry

pytestmark = pytest.mark.usefixtures("single_thread")

SUITES = ("toy-id", "toy-ood", "robustness", "spurious")


@pytest.fixture(scope="module")
def registry():
    return build_registry(get_plugin_manager(load_entrypoints=False))


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory):
    """One logit-tuned minmax w4a8 run through the CLI; the store folder and the document's hash."""
    root = tmp_path_factory.mktemp("evidence")
    patch = pytest.MonkeyPatch()
    patch.setenv("QBENCH_STORE", str(root / "results.sqlite"))
    patch.setenv("QBENCH_CACHE", str(root / "features"))
    patch.setenv("XDG_CONFIG_HOME", str(root / "xdg"))
    patch.delenv("QBENCH_CONFIG", raising=False)
    patch.delenv("QBENCH_DATA", raising=False)
    from qbench.cli import main

    args = ["eval", "--model", "toy-clip", "--quantizer", "minmax", "--bits", "w4a8", "--logit-tuning", "--json"]
    for suite in SUITES:
        args += ["--suite", suite]
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(args)
        except SystemExit as exit_:
            assert not exit_.code
    document = json.loads(out.getvalue())
    yield root, document
    patch.undo()


@pytest.fixture
def copied(stored_run, tmp_path):
    """The run's document and evidence copied into tmp as ``run.json`` + ``run.evidence.safetensors``."""
    root, document = stored_run
    config_hash = document["config"]["config_hash"]
    source = root / "results" / "documents" / config_hash[:2] / f"{config_hash}.json"
    target = tmp_path / "run.json"
    target.write_text(json.dumps(document))
    shutil.copyfile(evidence_path_for(source), evidence_path_for(target))
    return target


def _rescore(capsys, path: Path) -> tuple[int, str]:
    code, _, err = run_cli(capsys, "rescore", str(path))
    return code, err.strip()


def test_every_run_stores_its_evidence_beside_the_document(stored_run):
    root, document = stored_run
    config_hash = document["config"]["config_hash"]
    path = root / "results" / "documents" / config_hash[:2] / f"{config_hash}.evidence.safetensors"
    assert path.is_file()
    assert document["evidence"]["n_bytes"] == path.stat().st_size
    evidence = read_evidence(path, document["evidence"]["sha256"])
    states = {state for state, _ in evidence.outcomes}
    assert states == {"fp32", "quantized", "quantized-tuned"}
    assert {entry["scorer"] for entry in evidence.pairs} >= {"msp", "energy"}
    assert {entry["logit_tuned"] for entry in evidence.pairs} == {False, True}


def test_rescore_by_file_and_by_hash_prefix_matches_every_number(stored_run, copied, capsys, monkeypatch):
    root, document = stored_run
    code, err = _rescore(capsys, copied)
    assert code == 0 and "all match" in err and "\n" not in err
    monkeypatch.setenv("QBENCH_STORE", str(root / "results.sqlite"))
    code, out, err = run_cli(capsys, "rescore", document["config"]["config_hash"][:8], "--json")
    assert code == 0, err
    recomputed = json.loads(out)
    backed = [record for record in document["results"] if record["task"] not in NOT_EVIDENCE_TASKS]
    assert len(recomputed["results"]) == len(backed) > 60
    assert {record["task"] for record in backed} == {"zeroshot", "ood", "robustness", "spurious"}


@pytest.mark.parametrize("edit", [
    ("accuracy", "quantized", lambda value: 0.999),
    ("ece", "fp32", lambda value: value + 2e-9),  # just beyond the 1e-9 tolerance
    ("auroc", "quantized", lambda value: value - 0.01),
    ("v_add", "value", lambda value: 0.0),
    ("accuracy", "delta", lambda value: -value),
])
def test_an_edited_number_fails_rescore_with_its_key_path(copied, capsys, edit):
    metric, field, change = edit
    document = json.loads(copied.read_text())
    index = next(i for i, record in enumerate(document["results"]) if record["metric"] == metric)
    document["results"][index][field] = change(document["results"][index][field])
    copied.write_text(json.dumps(document))
    code, err = _rescore(capsys, copied)
    assert code == 2 and "\n" not in err
    assert f"results[{index}].{field}" in err and "does not match its per-sample evidence" in err


def test_a_difference_within_the_tolerance_passes(copied, capsys):
    document = json.loads(copied.read_text())
    document["results"][1]["fp32"] += 5e-10
    copied.write_text(json.dumps(document))
    assert _rescore(capsys, copied)[0] == 0


def test_reliability_bins_are_checked_too(copied, capsys):
    document = json.loads(copied.read_text())
    document["reliability"][0]["bins"][-1]["count"] += 1
    copied.write_text(json.dumps(document))
    code, err = _rescore(capsys, copied)
    assert code == 2 and "reliability[0].bins[14].count" in err


def test_a_flipped_evidence_byte_is_refused(copied, capsys):
    evidence = evidence_path_for(copied)
    data = bytearray(evidence.read_bytes())
    data[len(data) // 2] ^= 0x01
    evidence.write_bytes(bytes(data))
    code, err = _rescore(capsys, copied)
    assert code == 2 and "SHA-256" in err and "\n" not in err


def test_missing_evidence_is_one_line(copied, capsys, tmp_path, monkeypatch):
    evidence_path_for(copied).unlink()
    monkeypatch.setenv("QBENCH_STORE", str(tmp_path / "empty.sqlite"))
    code, err = _rescore(capsys, copied)
    assert code == 2 and "evidence file missing" in err


def _rewrite(copied: Path, change) -> None:
    """Re-serialise the evidence with ``change(recorder_like_index, tensors)`` applied, and fix up the document's
    SHA-256, as an attacker who controls both files would."""
    from safetensors.numpy import save

    from qbench.engine.evidence import _header_metadata, evidence_summary

    path = evidence_path_for(copied)
    data = path.read_bytes()
    metadata = _header_metadata(data)
    from safetensors.numpy import load

    tensors = {name: np.array(value) for name, value in load(data).items()}
    index = json.loads(metadata["qbench"])
    change(index, tensors)
    data = save(tensors, metadata={"qbench": json.dumps(index)})
    path.write_bytes(data)
    document = json.loads(copied.read_text())
    document["evidence"] = evidence_summary(data)
    copied.write_text(json.dumps(document))


def test_consistently_rewritten_evidence_that_changes_predictions_is_caught(copied, capsys):
    def flip_predictions(index, tensors):
        entry = next(item for item in index["outcomes"] if item["state"] == "quantized" and item["dataset"] == "toy-id-test")
        labels = tensors[index["labels"]["toy-id-test"]]
        tensors[entry["prediction"]] = labels.copy()  # every quantized prediction now correct
    _rewrite(copied, flip_predictions)
    code, err = _rescore(capsys, copied)
    assert code == 2 and "does not match its per-sample evidence" in err


def test_evidence_with_other_labels_is_refused(copied, capsys):
    def relabel(index, tensors):
        key = index["labels"]["toy-id-test"]
        tensors[key] = np.roll(tensors[key], 1)
    _rewrite(copied, relabel)
    code, err = _rescore(capsys, copied)
    assert code == 2 and "not the dataset's registered labels" in err


@pytest.mark.parametrize("change, message", [
    (lambda index, tensors: tensors.__setitem__(index["outcomes"][0]["confidence"],
                                                np.full_like(tensors[index["outcomes"][0]["confidence"]], np.nan)), "NaN"),
    (lambda index, tensors: index["outcomes"][0].__setitem__("confidence", "t9999"), "names no tensor"),
    (lambda index, tensors: index.__setitem__("extra", 1), "unknown evidence index field"),
    (lambda index, tensors: index["pairs"].pop(0), "has no"),
    (lambda index, tensors: index["outcomes"][0].__setitem__("state", "quantized-2"), "unknown state"),
])
def test_malformed_evidence_is_one_line(copied, capsys, change, message):
    _rewrite(copied, change)
    code, err = _rescore(capsys, copied)
    assert code == 2 and message in err and "\n" not in err


def test_not_safetensors_at_all_is_one_line():
    with pytest.raises(QbenchError, match="not a readable safetensors evidence file"):
        parse_evidence(b"\x00" * 7, "x", None)
    deep = b"[" * 200_000
    data = len(deep).to_bytes(8, "little") + deep
    with pytest.raises(QbenchError):
        parse_evidence(data, "x", None)


def test_the_pinned_toy_labels_are_the_generated_labels():
    from qbench_plugins.toyworld.plugin import toy_dataset_specs

    pinned = [spec for spec in toy_dataset_specs() if spec.label_fingerprint]
    assert len(pinned) >= 7
    for spec in pinned:
        labels = spec.loader(DatasetRequest(None, EVALUATION_DATA_SEED)).labels
        assert label_fingerprint(labels) == spec.label_fingerprint, spec.name


def test_a_served_document_whose_evidence_vanished_is_recomputed(capsys):
    args = ("eval", "--model", "toy-clip", "--quantizer", "fp32", "--suite", "toy-id", "--json")
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    from qbench.engine.store import ResultStore

    store = ResultStore()
    config_hash = json.loads(out)["config"]["config_hash"]
    store.evidence_path(config_hash).unlink()
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    err = " ".join(err.split())
    assert "evidence file cannot be read" in err and "computing it again" in err
    assert store.evidence_path(config_hash).is_file()
    check_evidence(store.get(config_hash), store.evidence_path(config_hash))


def test_recorder_stores_each_distinct_array_once():
    from qbench.engine.ood_eval import PairScores

    recorder = EvidenceRecorder()
    scores = np.linspace(0, 1, 5)
    for target in ("a", "b"):
        recorder.add_pairs([PairScores("s", 1, "ood", "msp", "id", target, "far", ("auroc",),
                                       {"fp32": (scores, scores + 1), "quantized": (scores, scores + 1)})], tuned=False)
    evidence = parse_evidence(recorder.to_bytes("0" * 16), "x", None)
    assert len(evidence.tensors) == 2
