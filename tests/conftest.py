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
    monkeypatch.delenv("QBENCH_CONFIG", raising=False)  # never read the developer's config file or data root
    monkeypatch.delenv("QBENCH_DATA", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("QBENCH_STORE", str(path))
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path / "features"))
    return path


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine thread hand-offs
    cost milliseconds per op; a module opts in with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def float_model():
    """A tiny random-init open_clip CLIP (``tiny_models.tiny_vlm``), one per test module; modules that need
    another model (planted outliers, another seed) define their own ``float_model``."""
    from tiny_models import tiny_vlm

    return tiny_vlm()


@pytest.fixture(scope="module")
def calibration(float_model):
    """16 random proxy pairs for ``float_model``; override in a module for another size."""
    from tiny_models import proxy_batch

    return proxy_batch(float_model, n=16)


@pytest.fixture(scope="session")
def submission_world(tmp_path_factory):
    """Real toy evaluations submitted with 'qbench submit' in an isolated store and cache, each made once per
    session (``tests/submission_factory.py``); ``submission_world.submit(*eval_args)`` returns one."""
    from submission_factory import SubmissionWorld

    return SubmissionWorld(tmp_path_factory.mktemp("submission-world"))
