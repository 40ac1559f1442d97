"""CIFAR-10 and CIFAR-100 test sets in torchvision's archive layout (Krizhevsky, "Learning Multiple Layers
of Features from Tiny Images", 2009).

Expected on disk: ``<data root>/cifar-10-batches-py/{batches.meta,test_batch,...}`` and
``<data root>/cifar-100-python/{meta,test,...}`` (or the unopened ``cifar-100-python.tar.gz``), the folders
the official archives unpack to. Nothing is downloaded. Class names come from ``batches.meta`` and from
``meta``'s ``fine_label_names`` (``_`` read as a space: ``aquarium_fish`` -> ``aquarium fish``); prompts are
OpenAI's 18 CIFAR templates (``suites.md`` §6). CIFAR-10 and CIFAR-100 are each other's near-OOD set in
the ``c10-vs-c100`` / ``c100-vs-c10`` suites.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from qbench.data import ArrayImages, DatasetRequest, DatasetSpec
from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_LAYOUT = f"{CIFAR100_FOLDER}/ with test and meta (unpacked {CIFAR100_ARCHIVE}) or {CIFAR100_ARCHIVE} itself"
CIFAR18_TEMPLATES: tuple[str, ...] = tuple(
    template.format(article=article)
    for article in ("a", "the")
    for template in (
        "{article} photo of {article} {{}}.",
        "{article} blurry photo of {article} {{}}.",
        "{article} black and white photo of {article} {{}}.",
        "{article} low contrast photo of {article} {{}}.",
        "{article} high contrast photo of {article} {{}}.",
        "{article} bad photo of {article} {{}}.",
        "{article} good photo of {article} {{}}.",
        "{article} photo of {article} small {{}}.",
        "{article} photo of {article} big {{}}.",
    )
)


def resolve_root(request: DatasetRequest, dataset: str, layout: str) -> Path:
    """The data root, or a one-line error naming the dataset, the expected layout and how to pass it."""
    if request.data_root is None:
        raise QbenchError(
            f"dataset {dataset!r} needs a data root: pass --data-root DIR (or set QBENCH_DATA) where DIR holds {layout}"
        )
    root = Path(request.data_root).expanduser()
    if not root.is_dir():
        raise QbenchError(
            f"data root {root} does not exist; dataset {dataset!r} needs --data-root DIR (or QBENCH_DATA) "
            f"where DIR holds {layout}"
        )
    return root


def load_cifar10_test(request: DatasetRequest) -> ArrayImages:
    """The 10,000 CIFAR-10 test images from the torchvision archive layout under the data root."""
    layout = f"{CIFAR10_FOLDER}/ (unpacked cifar-10-python.tar.gz)"
    root = resolve_root(request, "cifar10-test", layout)
    if not (root / CIFAR10_FOLDER).is_dir():
        raise QbenchError(f"CIFAR-10 not found: expected {root / CIFAR10_FOLDER}/ (unpacked cifar-10-python.tar.gz)")
    from torchvision.datasets import CIFAR10

    try:
        dataset = CIFAR10(str(root), train=False, download=False)
    except (RuntimeError, OSError, ValueError) as error:
        raise QbenchError(
            f"CIFAR-10 under {root / CIFAR10_FOLDER} is incomplete or corrupted ({str(error).splitlines()[0]}); "
            "re-extract cifar-10-python.tar.gz there"
        ) from None
    classnames = tuple(name.replace("_", " ") for name in dataset.classes)
    return ArrayImages("cifar10-test", dataset.data, dataset.targets, classnames, CIFAR18_TEMPLATES)


def load_cifar100_test(request: DatasetRequest) -> ArrayImages:
    """The 10,000 CIFAR-100 test images with their 100 fine labels, from the folder or the ``.tar.gz``.

    The pickles are read directly rather than through torchvision, whose MD5 check would reject any copy
    that is not byte-identical to the official archive (including test fixtures); the arrays are
    validated instead.
    """
    root = resolve_root(request, "cifar100-test", CIFAR100_LAYOUT)
    test, meta = _cifar100_pickles(root)
    try:
        data = np.asarray(test["data"], dtype=np.uint8)
        labels = np.asarray(test["fine_labels"], dtype=np.int64)
        names = tuple(str(name).replace("_", " ") for name in meta["fine_label_names"])
    except (KeyError, TypeError, ValueError) as error:
        raise QbenchError(f"CIFAR-100 under {root} is not in torchvision's format (missing or bad {error})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise QbenchError(
            f"CIFAR-100 under {root}: expected test data N x 3072 with N fine labels, got {data.shape} and "
            f"{len(labels)} labels; re-extract {CIFAR100_ARCHIVE}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise QbenchError(f"CIFAR-100 under {root}: fine labels outside 0..{len(names) - 1}; re-extract {CIFAR100_ARCHIVE}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return ArrayImages("cifar100-test", np.ascontiguousarray(images), labels, names, CIFAR18_TEMPLATES)


def _cifar100_pickles(root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The unpickled ``test`` and ``meta`` dicts, from ``cifar-100-python/`` or else the archive."""
    folder, archive = root / CIFAR100_FOLDER, root / CIFAR100_ARCHIVE
    try:
        if folder.is_dir():
            return _unpickle((folder / "test").read_bytes()), _unpickle((folder / "meta").read_bytes())
        if archive.is_file():
            with tarfile.open(archive, "r:gz") as tar:
                return tuple(_unpickle(_tar_member(tar, f"{CIFAR100_FOLDER}/{part}")) for part in ("test", "meta"))
    except (OSError, EOFError, pickle.UnpicklingError, tarfile.TarError, KeyError) as error:
        raise QbenchError(
            f"CIFAR-100 under {root} is incomplete or corrupted ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'unreadable'}); re-extract {CIFAR100_ARCHIVE}"
        ) from None
    raise QbenchError(
        f"CIFAR-100 not found: expected {folder}/ (unpacked {CIFAR100_ARCHIVE}, with test and meta) or {archive}; "
        "pass --data-root DIR (or QBENCH_DATA) where DIR holds it"
    )


def _tar_member(tar: tarfile.TarFile, member: str) -> bytes:
    handle = tar.extractfile(member)
    if handle is None:
        raise KeyError(member)
    return handle.read()


def _unpickle(raw: bytes) -> dict[str, Any]:
    """One of CIFAR's Python-2 pickles, decoded as torchvision does (``latin1``)."""
    content = pickle.load(io.BytesIO(raw), encoding="latin1")
    if not isinstance(content, dict):
        raise pickle.UnpicklingError(f"expected a pickled dict, got {type(content).__name__}")
    return content


@hookimpl
def qbench_register_datasets() -> list[DatasetSpec]:
    return [
        DatasetSpec(
            name="cifar10-test",
            role="id",
            description="CIFAR-10 test split, 10 classes, 10,000 images (torchvision archive layout)",
            citation="Krizhevsky, 2009",
            loader=load_cifar10_test,
        ),
        DatasetSpec(
            name="cifar100-test",
            role="id",
            description="CIFAR-100 test split, 100 fine classes, 10,000 images (torchvision archive layout)",
            citation="Krizhevsky, 2009",
            loader=load_cifar100_test,
        ),
    ]
