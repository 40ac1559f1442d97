"""One computation per configuration, saved whatever happens: ``evaluate_once`` and ``qbench eval`` against a
shared store — interrupted runs resume (kept quantized model, QAT step checkpoints) to the same document, a
busy index never loses a result, identical configurations started together compute once, a corrupt stored
document is recomputed, and an unwritable store still leaves the result on disk."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from qbench.errors import QbenchError
from qbench.engine.evaluate import EvalRequest, Progress, resolve
from qbench.engine.execution import evaluate_once
from qbench.registry import build_registry
from qbench.engine.store import ResultStore

pytestmark = pytest.mark.usefixtures("single_thread")

VOLATILE = ("provenance", "timing", "encoder_calls")
"""What differs between two runs of one configuration by nature: when and where it ran, how long each
phase took, and how many forward passes the cache saved. Everything else must be identical."""


def comparable(document: dict) -> str:
    return json.dumps({key: value for key, value in document.items() if key not in VOLATILE}, sort_keys=True, default=str)


class Recorder(Progress):
    """Keeps log lines; with ``stop_at`` its training callback raises after that optimizer step (a crash)."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.lines: list[str] = []
        self.stop_at = stop_at

    def log(self, message: str) -> None:
        self.lines.append(message)

    @contextmanager
    def training(self, description: str):
        def update(step: int, total: int, loss: float) -> None:
            if self.stop_at is not None and step == self.stop_at:
                raise KeyboardInterrupt(f"simulated crash after step {step}")

        yield update

    def text(self) -> str:
        return "\n".join(self.lines)


def qat_request(cache: Path, **overrides) -> EvalRequest:
    return EvalRequest(quantizer="qat-ste", quantizer_params=(("steps", "12"), ("batch_size", "20")), limit=60,
                       proxy_n=60, cache_dir=str(cache), qat_checkpoint_every=5, **overrides)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The QAT configuration evaluated once without interruption (own store and cache)."""
    folder = tmp_path_factory.mktemp("reference")
    resolved = resolve(qat_request(folder / "cache"), build_registry())
    return evaluate_once(resolved, ResultStore(folder / "store"), Recorder()).document


def test_a_crash_during_qat_resumes_from_the_step_checkpoint_to_the_same_document(tmp_path, reference):
    store, cache = ResultStore(tmp_path / "store"), tmp_path / "cache"
    resolved = resolve(qat_request(cache), build_registry())
    with pytest.raises(KeyboardInterrupt):
        evaluate_once(resolved, store, Recorder(stop_at=8))
    config_hash = resolved.config["config_hash"]
    assert store.get(config_hash) is None and store.failure(config_hash)["kind"] == "interrupted"
    assert (cache / "quantized" / f"{resolved.quantization_config['config_hash']}.training").is_dir()
    progress = Recorder()
    outcome = evaluate_once(resolved, store, progress)
    assert "resuming training from its step checkpoint: step 5 of 12" in progress.text()
    assert outcome.computed and comparable(outcome.document) == comparable(reference)
    assert comparable(store.get(config_hash)) == comparable(reference)
    assert store.failure(config_hash) is None  # the success clears the failure record
    assert not any((cache / "quantized").glob("*.training/*"))  # step checkpoint cleared once the model was kept
    assert not list((cache / "quantized").glob("[0-9a-f]*[0-9a-f]"))  # and the kept model dropped once stored
    assert not any((cache / ".partial").iterdir())


def test_a_crash_after_quantization_restores_the_kept_model_without_training(tmp_path, reference, monkeypatch):
    import qbench.engine.evaluate as evaluate

    store, cache = ResultStore(tmp_path / "store"), tmp_path / "cache"
    resolved = resolve(qat_request(cache), build_registry())

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash while encoding")

    with monkeypatch.context() as patch:
        patch.setattr(evaluate, "encode_datasets", crash)
        with pytest.raises(KeyboardInterrupt):
            evaluate_once(resolved, store, Recorder())
    assert (cache / "quantized" / resolved.quantization_config["config_hash"] / "model.safetensors").is_file()
    progress = Recorder()
    outcome = evaluate_once(resolved, store, progress)
    assert "restored the quantized model" in progress.text() and "quantizing with" not in progress.text()
    assert comparable(outcome.document) == comparable(reference)


def test_a_busy_index_does_not_lose_the_result(tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_INDEX_TIMEOUT_S", "0.5")
    store = ResultStore(tmp_path / "store")
    blocker = sqlite3.connect(store.index_path, timeout=0.1)
    blocker.execute("BEGIN EXCLUSIVE")  # a writer that never lets go (a crashed tool, a DB browser)
    try:
        resolved = resolve(EvalRequest(limit=40, cache_dir=str(tmp_path / "cache")), build_registry())
        outcome = evaluate_once(resolved, store, Recorder())
    finally:
        blocker.rollback()
        blocker.close()
    assert outcome.computed and outcome.saved is not None and not outcome.saved.indexed
    assert "qbench results --reindex" in outcome.saved.describe()
    assert store.get(resolved.config["config_hash"]) == json.loads(json.dumps(outcome.document, default=str))
    assert store.reindex().added == 1
    assert [row.config_hash for row in store.index_rows()] == [resolved.config["config_hash"]]


def test_a_corrupt_stored_result_is_moved_aside_and_recomputed(tmp_path):
    store = ResultStore(tmp_path / "store")
    resolved = resolve(EvalRequest(limit=40, cache_dir=str(tmp_path / "cache")), build_registry())
    first = evaluate_once(resolved, store, Recorder())
    path = store.document_path(resolved.config["config_hash"])
    path.write_text(path.read_text().replace('"accuracy"', '"accuracz"', 1))
    progress = Recorder()
    second = evaluate_once(resolved, store, progress)
    assert second.computed and "is corrupt (checksum mismatch)" in progress.text()
    assert comparable(second.document) == comparable(first.document)
    moved = sorted(path.name for path in (store.root / "corrupt").iterdir())  # the document and its evidence, together
    assert len(moved) == 2 and moved[0].endswith(".evidence.safetensors") and moved[1].endswith(".json")


def test_an_unwritable_store_leaves_the_result_in_a_rescue_file(tmp_path, monkeypatch):
    store = ResultStore(tmp_path / "store")
    resolved = resolve(EvalRequest(limit=40, cache_dir=str(tmp_path / "cache")), build_registry())

    def refuse(document):
        raise QbenchError(f"cannot write the result {store.root} (No space left on device); free space")

    monkeypatch.setattr(store, "put", refuse)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    with pytest.raises(QbenchError) as caught:
        evaluate_once(resolved, store, Recorder())
    rescue = tmp_path / "tmp" / "qbench-unsaved" / f"{resolved.config['config_hash']}.json"
    assert str(rescue) in str(caught.value) and "\n" not in str(caught.value)
    assert json.loads(rescue.read_text())["config"]["config_hash"] == resolved.config["config_hash"]


def _eval_process(store: Path, cache: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "QBENCH_STORE": str(store), "QBENCH_CACHE": str(cache), "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "qbench", "eval", "--limit", "60", "--proxy-n", "60", "--threads", "1",
                             "--json", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_four_identical_evaluations_started_together_compute_once(tmp_path):
    processes = [_eval_process(tmp_path / "store", tmp_path / "cache", "--quantizer", "smoothquant") for _ in range(4)]
    outputs = [process.communicate(timeout=600) for process in processes]
    assert all(process.returncode == 0 for process in processes), [err for _, err in outputs]
    served = [" ".join(err.split()) for _, err in outputs if "served from the store" in " ".join(err.split())]
    assert len(served) == 3, [err for _, err in outputs]
    documents = [json.loads(out) for out, _ in outputs]
    assert len({comparable(document) for document in documents}) == 1
    assert len({document["provenance"]["created_at"] for document in documents}) == 1  # one computation, served 3x


def test_concurrent_evaluations_of_one_model_encode_each_fp32_image_once(tmp_path):
    processes = [_eval_process(tmp_path / "store", tmp_path / "cache", "--quantizer", name)
                 for name in ("minmax", "smoothquant", "fp32")]
    outputs = [process.communicate(timeout=600) for process in processes]
    assert all(process.returncode == 0 for process in processes), [err for _, err in outputs]
    # a process that found every feature in the cache ran no forward pass and has no entry for the dataset
    forwards = sum(json.loads(out)["encoder_calls"]["images_by_dataset"].get("toy-id-test", {}).get("fp32", 0)
                   for out, _ in outputs)
    assert forwards == 60  # 3 processes, 60 images: the FP32 features were encoded by one of them
