"""Results store: round trip, replacement by hash, pandas and CSV export."""

import pandas as pd
import pytest

from qbench.confighash import config_hash
from qbench.errors import QbenchError
from qbench.store import ResultStore


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
