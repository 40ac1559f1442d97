"""CIFAR's pickles are read by a restricted unpickler: a planted payload in ``cifar-10-batches-py/test_batch`` is
refused with one line and its side effect never happens; genuine batches (Python 2 and 3 pickles, every
protocol) load as before."""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cli_runner import run_cli
from qbench.data import DatasetRequest
from qbench.errors import QbenchError
from qbench_plugins.datasets.cifar import CIFAR10_FOLDER, RefusedPickle, _unpickle, load_cifar10_test

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class SystemPayload:
    """Unpickling runs ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class ExecPayload:
    """Unpickling runs ``builtins.exec(source)``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self):
        import builtins

        return (builtins.exec, (self.source,))


def batch(n: int = 6) -> dict:
    rng = np.random.default_rng(0)
    return {"batch_label": "testing batch 1 of 1", "labels": [i % 10 for i in range(n)],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [f"{i}.png" for i in range(n)]}


def write_cifar10(root: Path, test_batch: bytes, archive: bool = False) -> None:
    parts = {"test_batch": test_batch, "batches.meta": pickle.dumps({"label_names": NAMES, "num_vis": 3072})}
    if archive:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            for name, raw in parts.items():
                info = tarfile.TarInfo(f"{CIFAR10_FOLDER}/{name}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
        return
    folder = root / CIFAR10_FOLDER
    folder.mkdir(parents=True)
    for name, raw in parts.items():
        (folder / name).write_bytes(raw)


def payloads(marker: Path) -> dict[str, bytes]:
    python = f"open({str(marker)!r}, 'w').write('ran')"
    return {
        "os.system": pickle.dumps({**batch(), "data": SystemPayload(f"touch {marker}")}),
        "builtins.exec": pickle.dumps({**batch(), "labels": ExecPayload(python)}),
        "payload-alone": pickle.dumps(ExecPayload(python), protocol=0),
        "object-array": pickle.dumps({**batch(), "data": np.array([ExecPayload(python)], dtype=object)}),
    }


@pytest.mark.parametrize("archive", [False, True], ids=["folder", "archive"])
@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "payload-alone", "object-array"])
def test_a_planted_payload_is_refused_without_running(kind, archive, tmp_path):
    marker = tmp_path / "marker"
    data = tmp_path / "data"
    data.mkdir()
    write_cifar10(data, payloads(marker)[kind], archive=archive)
    with pytest.raises(QbenchError) as raised:
        load_cifar10_test(DatasetRequest(data))
    message = str(raised.value)
    assert "\n" not in message and "test_batch" in message and "official cifar-10-python.tar.gz" in message
    assert not marker.exists()


def test_the_cli_refuses_a_planted_batch_with_exit_2(tmp_path, capsys):
    marker = tmp_path / "marker"
    data = tmp_path / "data"
    data.mkdir()
    write_cifar10(data, payloads(marker)["os.system"])
    code, out, err = run_cli(capsys, "eval", "--suite", "cifar10", "--data-root", str(data), "--limit", "5")
    assert code == 2 and out == ""
    assert err.startswith("qbench: ") and len(err.strip().splitlines()) == 1 and "system" in err
    assert not marker.exists()


def python2_pickle(value) -> bytes:
    """``value`` pickled the way Python 2's cPickle wrote CIFAR (protocol 2, byte strings as BINSTRING, NumPy 1
    module names), so the loader is tested on the real files' form."""

    class Python2Pickler(pickle._Pickler):
        dispatch = dict(pickle._Pickler.dispatch)

        def save_str_as_bytes(self, text: str) -> None:
            self.save_bytes_as_py2(text.encode("latin1"))

        def save_bytes_as_py2(self, raw: bytes) -> None:
            if len(raw) < 256:
                self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
            else:
                self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
            self.memoize(raw)

        dispatch[bytes] = save_bytes_as_py2
        dispatch[str] = save_str_as_bytes

    handle = io.BytesIO()
    Python2Pickler(handle, protocol=2).dump(value)
    return handle.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


@pytest.mark.parametrize("protocol", ["python2", 0, 2, 4, 5])
def test_genuine_batches_load_at_every_protocol(protocol, tmp_path):
    value = batch()
    raw = python2_pickle(value) if protocol == "python2" else pickle.dumps(value, protocol=protocol)
    if protocol == "python2":
        assert b"cnumpy.core.multiarray\n_reconstruct" in raw and pickle.BINSTRING in raw
    write_cifar10(tmp_path, raw)
    dataset = load_cifar10_test(DatasetRequest(tmp_path))
    assert len(dataset) == 6 and dataset.labels.tolist() == value["labels"]
    assert np.array_equal(np.asarray(dataset.image(4)), value["data"][4].reshape(3, 32, 32).transpose(1, 2, 0))


@pytest.mark.parametrize("value, reason", [
    ({"data": {1, 2}}, "holds a set"),  # protocol 4 has a set opcode: no global, caught by the check
    ({"data": np.ma.masked_array([1, 2])}, "numpy.ma"),
    ({"data": np.float64(1.5)}, "scalar"),
    ({1: "int key"}, "dict key"),
])
def test_anything_but_plain_values_and_arrays_is_refused(value, reason):
    with pytest.raises(RefusedPickle) as raised:
        _unpickle(pickle.dumps(value), "test_batch")
    assert reason in str(raised.value) and "\n" not in str(raised.value)
