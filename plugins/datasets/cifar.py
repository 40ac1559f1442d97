"""CIFAR-10 and CIFAR-100 test sets in torchvision's archive layout (Krizhevsky, "Learning Multiple Layers
of Features from Tiny Images", 2009).

Expected on disk: ``<data root>/cifar-10-batches-py/{batches.meta,test_batch,...}`` and
``<data root>/cifar-100-python/{meta,test,...}`` (or the unopened ``cifar-100-python.tar.gz``), the folders
the official archives unpack to. Nothing is downloaded. Class names come from ``batches.meta`` and from
``meta``'s ``fine_label_names`` (``_`` read as a space: ``aquarium_fish`` -> ``aquarium fish``); prompts are
OpenAI's 18 CIFAR templates (``suites.md`` §6). CIFAR-10 and CIFAR-100 are each other's near-OOD set in
the ``c10-vs-c100`` / ``c100-vs-c10`` suites.

CIFAR's files are Python pickles, and unpickling an arbitrary file runs whatever code it names. They are read
by :class:`CifarUnpickler`, which resolves only the few NumPy globals an array needs (:data:`ALLOWED_GLOBALS`)
and refuses every other one before anything is called, so a planted ``test_batch`` cannot run code; the
result must then be a dict of plain values and arrays (:func:`check_plain`).
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


CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_LAYOUT = f"{CIFAR10_FOLDER}/ with test_batch and batches.meta (unpacked {CIFAR10_ARCHIVE}) or {CIFAR10_ARCHIVE} itself"


def load_cifar10_test(request: DatasetRequest) -> ArrayImages:
    """The 10,000 CIFAR-10 test images from ``cifar-10-batches-py/`` or the unopened ``.tar.gz``.

    Read like CIFAR-100 (pickles validated, not MD5-checked), so a partial or re-packed copy in the same
    format loads too; its image count is then reported like any other split's.
    """
    root = resolve_root(request, "cifar10-test", CIFAR10_LAYOUT)
    test, meta = _cifar_pickles(root, "CIFAR-10", CIFAR10_FOLDER, CIFAR10_ARCHIVE, ("test_batch", "batches.meta"))
    data, labels, names = _cifar_arrays(test, meta, root, "CIFAR-10", "labels", "label_names", CIFAR10_ARCHIVE)
    return ArrayImages("cifar10-test", data, labels, names, CIFAR18_TEMPLATES)


def load_cifar100_test(request: DatasetRequest) -> ArrayImages:
    """The 10,000 CIFAR-100 test images with their 100 fine labels, from the folder or the ``.tar.gz``.

    The pickles are read directly rather than through torchvision, whose MD5 check would reject any copy
    that is not byte-identical to the official archive (including test fixtures); the arrays are
    validated instead.
    """
    root = resolve_root(request, "cifar100-test", CIFAR100_LAYOUT)
    test, meta = _cifar_pickles(root, "CIFAR-100", CIFAR100_FOLDER, CIFAR100_ARCHIVE, ("test", "meta"))
    data, labels, names = _cifar_arrays(test, meta, root, "CIFAR-100", "fine_labels", "fine_label_names", CIFAR100_ARCHIVE)
    return ArrayImages("cifar100-test", data, labels, names, CIFAR18_TEMPLATES)


def _cifar_arrays(test: dict[str, Any], meta: dict[str, Any], root: Path, what: str, label_key: str, names_key: str,
                  archive: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Validated ``N x 32 x 32 x 3`` images, labels and class names from CIFAR's unpickled dicts."""
    try:
        data = np.asarray(test["data"], dtype=np.uint8)
        labels = np.asarray(test[label_key], dtype=np.int64)
        names = tuple(str(name).replace("_", " ") for name in meta[names_key])
    except (KeyError, TypeError, ValueError) as error:
        raise QbenchError(f"{what} under {root} is not in torchvision's format (missing or bad {error})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise QbenchError(
            f"{what} under {root}: expected test data N x 3072 with N labels, got {data.shape} and "
            f"{len(labels)} labels; re-extract {archive}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise QbenchError(f"{what} under {root}: labels outside 0..{len(names) - 1}; re-extract {archive}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels, names


def _cifar_pickles(root: Path, what: str, folder_name: str, archive_name: str,
                   parts: tuple[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The unpickled test and meta dicts, from the unpacked folder or else the archive."""
    folder, archive = root / folder_name, root / archive_name
    try:
        if folder.is_dir():
            return tuple(_unpickle((folder / part).read_bytes(), f"{folder_name}/{part}") for part in parts)
        if archive.is_file():
            with tarfile.open(archive, "r:gz") as tar:
                return tuple(_unpickle(_tar_member(tar, f"{folder_name}/{part}"), f"{archive_name}:{folder_name}/{part}")
                             for part in parts)
    except RefusedPickle as refused:
        raise QbenchError(f"{what} under {root}: {refused}; not loaded (nothing in it was run): replace it with the "
                          f"file from the official {archive_name}") from None
    except (OSError, EOFError, pickle.UnpicklingError, tarfile.TarError, KeyError) as error:
        raise QbenchError(
            f"{what} under {root} is incomplete or corrupted ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'unreadable'}); re-extract {archive_name}"
        ) from None
    raise QbenchError(
        f"{what} not found: expected {folder}/ (unpacked {archive_name}, with {' and '.join(parts)}) or {archive}; "
        "pass --data-root DIR (or QBENCH_DATA) where DIR holds it"
    )


def _tar_member(tar: tarfile.TarFile, member: str) -> bytes:
    handle = tar.extractfile(member)
    if handle is None:
        raise KeyError(member)
    return handle.read()


class RefusedPickle(pickle.UnpicklingError):
    """A CIFAR file names a global that no CIFAR batch holds (a planted payload); the message is one line."""


def _numpy_global(names: tuple[str, ...], attribute: str) -> Any:
    """``attribute`` of the first importable module of ``names`` (NumPy 2 moved ``numpy.core`` to ``numpy._core``;
    the private name is tried first, so the deprecated alias is never imported)."""
    import importlib

    for name in names:
        try:
            return getattr(importlib.import_module(name), attribute)
        except (ImportError, AttributeError):
            continue
    raise RefusedPickle(f"needs {names[0]}.{attribute}, which this NumPy does not have")


def _safe_dtype(*args: Any) -> np.dtype:
    """``numpy.dtype(*args)`` for plain dtypes only: an object dtype would unpickle arbitrary objects into an array."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise RefusedPickle("holds an object array, which a CIFAR batch never does")
    return dtype


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 pickles ``bytes`` at protocols 0-2, restricted to that one use (text to
    latin-1 bytes)."""
    if not isinstance(text, str) or encoding != "latin1":
        raise RefusedPickle(f"calls _codecs.encode with {encoding!r}, which is not how a pickle stores bytes")
    return text.encode("latin1")


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(module, "_reconstruct"): lambda: _numpy_global(("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct")
       for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_frombuffer"): lambda: _numpy_global(("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer")
       for module in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: _safe_dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}
"""The only globals a CIFAR pickle may name, each mapped to what it resolves to: NumPy's array reconstructors
(``_reconstruct`` with ``ndarray``, and ``_frombuffer`` of pickle protocol 5, under NumPy 1 and 2 module names),
``dtype`` (plain dtypes only) and ``_codecs.encode`` (latin-1 only: how protocol 0-2 pickles store bytes)."""


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS` and refuses every other global before calling
    anything (so a payload's ``os.system`` or ``builtins.exec`` is never looked up, let alone run), and that
    has no persistent ids."""

    def find_class(self, module: str, name: str) -> Any:
        resolve = ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise RefusedPickle(f"names {module}.{name}, which a CIFAR batch never holds")
        return resolve()

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle("uses persistent ids, which a CIFAR batch never does")


def check_plain(value: Any, depth: int = 0) -> None:
    """Refuse (:class:`RefusedPickle`) anything but what CIFAR files hold: dicts with str/bytes keys, lists and
    tuples, str, bytes, int, float, bool, None and NumPy arrays of plain (non-object) dtypes."""
    if depth > 8:
        raise RefusedPickle("nests deeper than a CIFAR batch")
    if isinstance(value, np.ndarray):
        if type(value) is not np.ndarray or value.dtype.hasobject:
            raise RefusedPickle(f"holds a {type(value).__name__} of dtype {value.dtype}, not a plain array")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, bytes)):
                raise RefusedPickle(f"has a dict key of type {type(key).__name__}")
            check_plain(item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_plain(item, depth + 1)
    elif value is not None and type(value) not in (str, bytes, int, float, bool):
        raise RefusedPickle(f"holds a {type(value).__name__}, which a CIFAR batch never does")


def _unpickle(raw: bytes, name: str) -> dict[str, Any]:
    """One of CIFAR's Python-2 pickles (``name`` for messages), decoded as torchvision does (``latin1``) but
    through :class:`CifarUnpickler`, and checked to be a dict of plain values (:func:`check_plain`)."""
    try:
        content = CifarUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except RefusedPickle as refused:
        raise RefusedPickle(f"{name} {refused}") from None
    except (pickle.UnpicklingError, EOFError):
        raise
    except (Exception, RecursionError) as error:  # a malformed stream fails in many ways; each is one line
        raise pickle.UnpicklingError(f"{name}: {type(error).__name__}") from None
    if not isinstance(content, dict):
        raise pickle.UnpicklingError(f"{name}: expected a pickled dict, got {type(content).__name__}")
    try:
        check_plain(content)
    except RefusedPickle as refused:
        raise RefusedPickle(f"{name} {refused}") from None
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
