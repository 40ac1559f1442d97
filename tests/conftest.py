"""Test setup: offline, deterministic, small thread count, and an isolated results store."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def isolated_store(tmp_path, monkeypatch):
    """Every test gets its own results database and feature cache, so nothing is served from a
    developer's store or cache."""
    path = tmp_path / "results.sqlite"
    monkeypatch.setenv("QBENCH_STORE", str(path))
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path / "features"))
    return path
