"""Results store: round trip, replacement by hash, pandas and CSV export."""

import pandas as pd
import pytest

from qbench.engine.confighash import config_hash
from qbench.errors import QbenchError
from qbench.engine.store import ResultStore


def make_document(seed: int, accuracy: float) -> dict:
    config = {"model": "toy-clip", "weights_tag": "t", "quantizer": "minmax", "quantizer_params": {},
              "bits": "w8a8", "scope": "visual", "proxy": "toy-proxy", "proxy_n": 1000, "seed": seed,
              "suites": [{"name": "toy-id", "version": 1}], "device": "cpu", "qbench_version": "0",
              "random_init": False}
    config["config_hash"] = config_hash(config)
    return {
        "config": config,
        "provenance": {"created_at": f"2026-01-0{seed + 1}T00:00:00+00:00"},
        "verification": {"passed": True, "n_modules": 3},
        "results": [
            {"suite": "toy-id", "dataset": "toy-id-test", "metric": "accuracy", "fp32": 0.9,
             "quantized": accuracy, "delta": (0.9 - accuracy) / 0.9},
            {"suite": "toy-id", "dataset": "toy-id-test", "metric": "nll", "fp32": 0.3,
             "quantized": 0.4, "delta": -1 / 3},
        ],
    }


def test_round_trip_and_replace(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    first = make_document(0, 0.8)
    assert store.get(first["config"]["config_hash"]) is None
    store.put(first)
    assert store.get(first["config"]["config_hash"]) == first
    updated = make_document(0, 0.85)
    store.put(updated)
    assert len(store.documents()) == 1
    assert store.get(first["config"]["config_hash"])["results"][0]["quantized"] == 0.85
    # a second handle on the same file sees the same rows (the store is on disk, not in memory)
    assert ResultStore(tmp_path / "r.sqlite").get(first["config"]["config_hash"]) == updated


def test_hash_depends_on_every_setting():
    assert make_document(0, 0.8)["config"]["config_hash"] != make_document(1, 0.8)["config"]["config_hash"]


def test_dataframe_and_csv_export(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    store.put(make_document(0, 0.8))
    store.put(make_document(1, 0.7))
    frame = store.to_dataframe()
    assert len(frame) == 4
    assert set(frame.columns) >= {"config_hash", "model", "quantizer", "bits", "metric", "fp32", "quantized"}
    accuracy = frame[frame.metric == "accuracy"].sort_values("seed")
    assert accuracy.quantized.tolist() == [0.8, 0.7]
    csv = tmp_path / "out.csv"
    assert store.export_csv(csv) == 4
    assert pd.read_csv(csv).shape[0] == 4


def test_unwritable_store_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(QbenchError, match="cannot open the results store") as caught:
        ResultStore(blocker / "sub" / "r.sqlite")
    assert "\n" not in str(caught.value)


# -- files first: integrity, corruption, concurrency, the index, legacy stores, failures ----------------------

import json  # noqa: E402
import os  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from qbench.engine.store import INTEGRITY_KEY, CorruptDocument, canonical_text, document_sha256  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

WRITER = """
import json, sys
from qbench.engine.confighash import config_hash
from qbench.engine.store import ResultStore

store_path, worker, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = ResultStore(store_path)
outcomes = []
for i in range(count):
    config = {"model": "toy-clip", "weights_tag": "t", "quantizer": "minmax", "quantizer_params": {}, "bits": "w8a8",
              "scope": "visual", "seed": i, "worker": worker, "suites": [{"name": "toy-id", "version": 1}]}
    config["config_hash"] = config_hash(config)
    saved = store.put({"config": config, "provenance": {"created_at": f"2026-02-01T00:00:{i:02d}+00:00"},
                       "verification": {"passed": True}, "results": [{"metric": "accuracy", "quantized": worker + i / 100}]})
    outcomes.append([config["config_hash"], saved.indexed, saved.index_note])
print(json.dumps(outcomes), flush=True)
"""

READER = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN")
print(connection.execute("SELECT count(*) FROM results").fetchone()[0], flush=True)
sys.stdin.readline()  # the read transaction stays open until the test says so
print(connection.execute("SELECT count(*) FROM results").fetchone()[0], flush=True)
connection.execute("COMMIT")
"""


def stored_file(store: ResultStore, config_hash: str) -> Path:
    return store.documents_dir / config_hash[:2] / f"{config_hash}.json"


def test_round_trip_keeps_the_document_and_the_file_is_canonical_with_a_checksum(tmp_path):
    store = ResultStore(tmp_path / "store")
    document = make_document(0, 0.8)
    config_hash = document["config"]["config_hash"]
    saved = store.put(document)
    assert saved.path == stored_file(store, config_hash) == store.document_path(config_hash)
    assert saved.indexed and saved.describe() == f"saved {saved.path}"
    loaded = store.get(config_hash)
    assert loaded == document and INTEGRITY_KEY not in loaded
    assert INTEGRITY_KEY not in document  # put does not change the caller's dictionary
    raw = saved.path.read_text()
    on_disk = json.loads(raw)
    assert raw == canonical_text(on_disk) + "\n"
    assert on_disk[INTEGRITY_KEY]["sha256"] == document_sha256(document) == document_sha256(on_disk)
    assert {key: value for key, value in on_disk.items() if key != INTEGRITY_KEY} == document
    # a document read back (even one still carrying an integrity record) is stored the same way again
    store.put({**loaded, INTEGRITY_KEY: {"format": "whatever", "sha256": "0" * 64}})
    assert saved.path.read_text() == raw
    assert store.has(config_hash) and not store.has(make_document(1, 0.8)["config"]["config_hash"])
    assert not list((store.root / ".partial").iterdir())


def flip_byte(path: Path, old: bytes, new: bytes) -> None:
    raw = path.read_bytes()
    assert raw.count(old) >= 1
    path.write_bytes(raw.replace(old, new, 1))


def test_a_changed_byte_makes_the_document_corrupt_everywhere(tmp_path):
    store = ResultStore(tmp_path / "store")
    good, bad, garbled = make_document(0, 0.8), make_document(1, 0.7), make_document(2, 0.6)
    for document in (good, bad, garbled):
        store.put(document)
    bad_hash, garbled_hash = bad["config"]["config_hash"], garbled["config"]["config_hash"]
    flip_byte(stored_file(store, bad_hash), b'"quantized":0.7', b'"quantized":0.9')  # still valid JSON
    flip_byte(stored_file(store, garbled_hash), b'"model"', b'"model\xff')  # not JSON (nor UTF-8) any more

    for config_hash, reason in ((bad_hash, "checksum mismatch"), (garbled_hash, "not valid JSON")):
        with pytest.raises(CorruptDocument, match=reason) as caught:
            store.get(config_hash)
        assert "\n" not in str(caught.value) and caught.value.path == stored_file(store, config_hash)
        assert isinstance(caught.value, QbenchError)

    reported = []
    assert store.documents(on_corrupt=reported.append) == [good]
    assert sorted(problem.path for problem in reported) == sorted(stored_file(store, h) for h in (bad_hash, garbled_hash))
    assert store.documents() == [good]

    report = store.reindex()
    assert sorted(report.corrupt) == sorted(str(stored_file(store, h)) for h in (bad_hash, garbled_hash))
    assert report.error is None
    assert [row.config_hash for row in store.index_rows()] == [good["config"]["config_hash"]]

    moved = store.quarantine(bad_hash)
    assert moved.parent == store.corrupt_dir and moved.name.startswith(bad_hash) and moved.suffix == ".json"
    assert not stored_file(store, bad_hash).exists()
    assert store.get(bad_hash) is None and bad_hash not in store.stored_hashes()
    assert b'"quantized":0.9' in moved.read_bytes()  # kept as it was, for inspection
    assert store.quarantine(bad_hash) is None


def test_a_document_under_another_hash_is_corrupt(tmp_path):
    store = ResultStore(tmp_path / "store")
    document = make_document(0, 0.8)
    store.put(document)
    other = make_document(1, 0.8)["config"]["config_hash"]
    target = stored_file(store, other)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(stored_file(store, document["config"]["config_hash"]), target)
    with pytest.raises(CorruptDocument, match="holds config") as caught:
        store.get(other)
    assert "\n" not in str(caught.value)
    assert store.documents() == []
    assert store.reindex().corrupt == [str(target)]


@pytest.mark.parametrize("bad", ["../x", "../../../../etc/passwd", "abc", "0123456789abcdeF", "0123456789abcdef0",
                                 "0123456789abcde/", "", "0123456789abcdef\n"])
def test_bad_hashes_are_one_line_errors(tmp_path, bad):
    store = ResultStore(tmp_path / "store")
    calls = [store.get, store.has, store.quarantine, store.failure, store.clear_failure, store.document_path,
             lambda h: store.record_failure(h, "boom"), lambda h: store.put({"config": {"config_hash": h}})]
    for call in calls:
        with pytest.raises(QbenchError, match="bad config hash") as caught:
            call(bad)
        assert "\n" not in str(caught.value).replace(repr(bad), "")
    assert not any(path.is_file() for path in tmp_path.rglob("*") if path.suffix == ".json")


def test_concurrent_writers_past_an_open_reader_lose_nothing(tmp_path):
    """8 processes x 50 puts while another process keeps a read transaction open on the index: every document
    is on disk and checks out, and the puts themselves indexed every one (WAL lets writers pass readers)."""
    store = ResultStore(tmp_path / "store")
    with sqlite3.connect(store.index_path) as connection:  # without WAL the reader would stall every writer
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    connection.close()
    reader = subprocess.Popen([sys.executable, "-c", READER, str(store.index_path)], cwd=REPO, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    writers = []
    try:
        assert reader.stdout.readline().strip() == "0"  # its read transaction is open now
        writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(store.root), str(worker), "50"], cwd=REPO,
                                    text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for worker in range(8)]
        outputs = [writer.communicate(timeout=300) for writer in writers]
        assert [writer.returncode for writer in writers] == [0] * 8, [err[-2000:] for _, err in outputs]
        assert reader.poll() is None  # the reader held its transaction through the whole write phase
        reader.stdin.write("done\n")
        reader.stdin.flush()
        assert reader.stdout.readline().strip() == "0"  # a snapshot: it never saw the writes
        assert reader.wait(timeout=60) == 0
    finally:
        for process in [reader, *writers]:
            if process.poll() is None:
                process.kill()
                process.wait()
    outcomes = [outcome for out, _ in outputs for outcome in json.loads(out)]
    hashes = {config_hash for config_hash, _, _ in outcomes}
    assert len(outcomes) == len(hashes) == 400
    assert [note for _, indexed, note in outcomes if not indexed] == []  # every put indexed its document itself
    assert store.stored_hashes() == hashes
    assert all(store.get(config_hash)["config"]["config_hash"] == config_hash for config_hash in hashes)
    assert {row.config_hash for row in store.index_rows()} == hashes  # no sync_index() needed
    assert store.sync_index().added == 0
    assert not list((store.root / ".partial").iterdir())


def test_a_locked_index_never_loses_the_document(tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_INDEX_TIMEOUT_S", "1")
    store = ResultStore(tmp_path / "store")
    document = make_document(0, 0.8)
    config_hash = document["config"]["config_hash"]
    blocker = sqlite3.connect(store.index_path, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        blocker.execute("DELETE FROM results")
        saved = store.put(document)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert saved.path.is_file() and store.get(config_hash) == document
    assert saved.indexed is False and saved.index_note and "locked" in saved.index_note
    assert "qbench results --reindex" in saved.describe() and "\n" not in saved.describe()
    assert store.index_rows() == []
    report = store.reindex()
    assert (report.added, report.corrupt, report.error) == (1, [], None)
    assert [row.config_hash for row in store.index_rows()] == [config_hash]


def test_index_off_writes_files_only_until_an_indexed_store_reindexes(tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_INDEX", "off")
    store = ResultStore(tmp_path / "store")
    assert store.index_path is None
    documents = [make_document(seed, 0.8) for seed in range(3)]
    for document in documents:
        saved = store.put(document)
        assert saved.path.is_file() and not saved.indexed
    assert not (tmp_path / "store" / "index.sqlite").exists()
    assert not list(tmp_path.rglob("*.sqlite*"))
    assert store.index_rows() == []
    assert store.documents() == documents
    with pytest.raises(QbenchError, match="QBENCH_INDEX"):
        store.reindex()
    monkeypatch.delenv("QBENCH_INDEX")
    indexed = ResultStore(tmp_path / "store")
    assert indexed.index_rows() == []
    assert indexed.reindex().added == 3
    assert [row.config_hash for row in indexed.index_rows()] == [d["config"]["config_hash"] for d in documents]
    # an index elsewhere
    elsewhere = ResultStore(tmp_path / "store", index=tmp_path / "other" / "i.sqlite")
    assert elsewhere.index_path == tmp_path / "other" / "i.sqlite"
    assert elsewhere.index_rows() == [] and elsewhere.reindex().added == 3


def legacy_store(path, documents):
    """An SQLite file in the layout of qbench versions before the files-first store."""
    with sqlite3.connect(path) as legacy:
        legacy.execute("CREATE TABLE evaluations (config_hash TEXT PRIMARY KEY, created_at TEXT, model TEXT, "
                       "quantizer TEXT, bits TEXT, scope TEXT, document TEXT)")
        for document in documents:
            config = document["config"]
            legacy.execute("INSERT INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (config["config_hash"], document["provenance"]["created_at"], config["model"],
                            config["quantizer"], config["bits"], config["scope"], json.dumps(document)))
    legacy.close()


def test_legacy_store_is_migrated_to_files(tmp_path):
    path = tmp_path / "results.sqlite"
    documents = [make_document(0, 0.8), make_document(1, 0.7)]
    legacy_store(path, documents)
    store = ResultStore(path)
    assert store.root == tmp_path / "results" and store.index_path == path
    hashes = {document["config"]["config_hash"] for document in documents}
    for document in documents:
        config_hash = document["config"]["config_hash"]
        assert stored_file(store, config_hash).is_file()
        assert store.get(config_hash) == document
    with sqlite3.connect(path) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    connection.close()
    assert "evaluations" not in tables and "results" in tables
    assert store.stored_hashes() == hashes
    assert {row.config_hash for row in store.index_rows()} == hashes
    assert ResultStore(path).documents() == documents  # opening it again changes nothing


def test_legacy_results_are_served_read_only_when_the_index_is_off(tmp_path):
    """Cluster jobs (index off) see an old store's results, and never write its SQLite file."""
    path = tmp_path / "results.sqlite"
    documents = [make_document(0, 0.8), make_document(1, 0.7)]
    legacy_store(path, documents)
    before = path.read_bytes()
    store = ResultStore(path, index=False)
    hashes = {document["config"]["config_hash"] for document in documents}
    assert store.stored_hashes() == hashes
    assert all(store.get(document["config"]["config_hash"]) == document for document in documents)
    assert path.read_bytes() == before and not any(store.documents_dir.iterdir())
    assert ResultStore(path).stored_hashes() == hashes  # an indexed open then migrates them
    assert len(list(store.documents_dir.glob("*/*.json"))) == 2


def test_failures_round_trip_and_a_successful_put_clears_them(tmp_path):
    store = ResultStore(tmp_path / "store")
    document = make_document(0, 0.8)
    config_hash = document["config"]["config_hash"]
    other = make_document(1, 0.8)["config"]["config_hash"]
    assert store.failure(config_hash) is None and store.failed_hashes() == set()
    store.record_failure(config_hash, "CUDA out of memory\n  while quantizing", kind="crash")
    store.record_failure(other, "bad bits", kind="error")
    record = store.failure(config_hash)
    assert record["error"] == "CUDA out of memory while quantizing" and record["kind"] == "crash"
    assert record["config_hash"] == config_hash and record["pid"] == os.getpid()
    assert store.failed_hashes() == {config_hash, other}
    store.record_failure(config_hash, "second try failed too", kind="error")
    assert store.failure(config_hash)["error"] == "second try failed too"
    store.put(document)
    assert store.failure(config_hash) is None
    assert store.failed_hashes() == {other}
    assert store.failure(other)["error"] == "bad bits"


def test_stored_hashes_lists_exactly_the_stored_documents(tmp_path):
    store = ResultStore(tmp_path / "store")
    assert store.stored_hashes() == set()
    hashes = set()
    for seed in range(5):
        document = make_document(seed, 0.5)
        store.put(document)
        store.put(document)  # replacing is not a second document
        hashes.add(document["config"]["config_hash"])
    some_shard = stored_file(store, next(iter(hashes))).parent
    (some_shard / "notes.txt").write_text("not a document")
    (some_shard / "0123456789abcdef.json.tmp").write_text("{}")
    (store.documents_dir / "README.json").write_text("{}")
    store.record_failure("fedcba9876543210", "a failure is not a result")
    assert store.stored_hashes() == hashes
    assert {document["config"]["config_hash"] for document in store.documents()} == hashes
    assert ResultStore(tmp_path / "store", index=False).stored_hashes() == hashes
