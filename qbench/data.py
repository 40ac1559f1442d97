"""Dataset contract: labelled images, proxy caption sources, and their registered specs.

A Dataset plugin returns a :class:`DatasetSpec` whose loader builds a :class:`LabeledImages` (images with
integer labels, class names and the prompt templates of its zero-shot classifier). Loaders fail with a
one-line :class:`~qbench.errors.QbenchError` that names the expected on-disk layout when the data are
absent. Unreadable images are counted in ``unreadable`` and skipped, never fatal.

Real datasets on disk are :class:`FileImages`: a list of image files opened lazily, so building a 50,000-image
split costs one directory walk, and a corrupt file surfaces as :class:`UnreadableImage` from ``image(i)`` when
(and only when) that image is needed; the evaluation engine counts it and drops the image consistently.

The data root comes from :func:`resolve_data_root`: ``--data-root DIR``, else ``$QBENCH_DATA``, else the
``data_root:`` key of the user config file (:func:`config_path`).
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import yaml

from qbench.errors import QbenchError

if TYPE_CHECKING:  # PIL is imported where images are made: dataset registration (qbench list) stays cheap
    from PIL import Image

__all__ = ["ArrayImages", "DatasetRequest", "DatasetSpec", "FileImages", "LabeledImages", "ProxySpec"]


DATA_ENV = "QBENCH_DATA"
CONFIG_ENV = "QBENCH_CONFIG"
CONFIG_EXAMPLE = "data_root: /path/to/datasets"


def config_path() -> Path:
    """The user config file: ``$QBENCH_CONFIG``, else ``$XDG_CONFIG_HOME/qbench/config.yaml``, else
    ``~/.config/qbench/config.yaml`` (a relative ``XDG_CONFIG_HOME`` is ignored, as the XDG spec says)."""
    explicit = os.environ.get(CONFIG_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME", "").strip()
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".config"
    return base / "qbench" / "config.yaml"


def read_config() -> dict[str, Any]:
    """The user config file as a mapping; ``{}`` when the default file does not exist.

    A ``$QBENCH_CONFIG`` that names no file, invalid YAML, or a top level that is not a mapping is a
    one-line :class:`QbenchError` naming the file and the fix.
    """
    path = config_path()
    if not path.is_file():
        if os.environ.get(CONFIG_ENV, "").strip():
            raise QbenchError(f"config file {path} (from ${CONFIG_ENV}) not found; create it or unset {CONFIG_ENV}")
        return {}
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise QbenchError(f"config file {path} is not readable YAML ({first}); fix it (e.g. '{CONFIG_EXAMPLE}') or remove it") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise QbenchError(f"config file {path} must be a YAML mapping such as '{CONFIG_EXAMPLE}'; fix it or remove it")
    return raw


def config_data_root() -> str | None:
    """The ``data_root:`` of the config file (``~`` expanded, relative paths taken from the file's folder)."""
    config = read_config()
    value = config.get("data_root")
    if value is None:
        return None
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise QbenchError(
            f"config file {config_path()}: data_root must be a folder path such as '{CONFIG_EXAMPLE}', got {value!r}; fix it"
        )
    root = Path(str(value).strip()).expanduser()
    return str(root if root.is_absolute() else config_path().parent / root)


def resolve_data_root(option: str | Path | None) -> str | None:
    """The dataset root: ``--data-root`` (``option``), else ``$QBENCH_DATA``, else the config file's
    ``data_root:``, else ``None`` (loaders then ask for one). Empty values count as unset; the config file is
    read only when neither of the others is given."""
    if option is not None and str(option).strip():
        return str(option)
    environment = os.environ.get(DATA_ENV, "").strip()
    if environment:
        return environment
    return config_data_root()


@dataclass(frozen=True)
class DatasetRequest:
    """Where datasets live and the seed for anything generated or sampled."""

    data_root: Path | None = None
    seed: int = 0


class LabeledImages(ABC):
    """An evaluation split: ``image(i)`` as RGB PIL image, ``labels[i]`` in ``range(len(classnames))``."""

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    labels: np.ndarray
    unreadable: int = 0

    def __len__(self) -> int:
        return int(len(self.labels))

    @abstractmethod
    def image(self, index: int) -> Image.Image:
        """The ``index``-th image, RGB."""

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """A stable hash of the split's content, for cache keys and provenance."""


class ArrayImages(LabeledImages):
    """Labelled images held in memory as a ``N x H x W x 3`` uint8 array (generated data, tests)."""

    def __init__(
        self,
        name: str,
        images: np.ndarray,
        labels: Sequence[int],
        classnames: Sequence[str],
        templates: Sequence[str],
    ) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"{name}: images must be an N x H x W x 3 uint8 array, got {images.shape} {images.dtype}")
        self.name = name
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classnames = tuple(classnames)
        self.templates = tuple(templates)

    def image(self, index: int) -> Image.Image:
        from PIL import Image

        return Image.fromarray(self.images[index])

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(self.images.tobytes())
        digest.update(self.labels.tobytes())
        digest.update("\n".join(self.classnames + self.templates).encode())
        return digest.hexdigest()[:16]


IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
"""Image file suffixes, compared lower-cased (so ``.JPEG`` as in ImageNet's val set matches too)."""


class UnreadableImage(Exception):
    """An image file that PIL cannot decode (truncated, corrupt, not an image); carries the path and why."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot decode image {self.path}: {reason}")


def image_files(folder: Path) -> list[Path]:
    """Every image file below ``folder`` (recursively), sorted by path relative to ``folder``.

    Suffixes are those of :data:`IMAGE_EXTENSIONS`, case-insensitive. Hidden files and folders (names
    starting with ``.``) are skipped: archives packed on macOS carry ``._name.jpg`` AppleDouble stubs that
    look like images but are not. Symbolic links to folders are followed, as data roots are often assembled
    from links. Sorting by relative POSIX path makes the order identical on every filesystem.
    """
    folder = Path(folder)
    found: list[tuple[str, Path]] = []
    for directory, subdirectories, filenames in os.walk(folder, followlinks=True):
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        for filename in filenames:
            if filename.startswith(".") or Path(filename).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(directory) / filename
            found.append((path.relative_to(folder).as_posix(), path))
    return [path for _, path in sorted(found, key=lambda item: item[0])]


class FileImages(LabeledImages):
    """Labelled images stored as files under ``root``, decoded lazily with PIL and converted to RGB.

    ``labels[i]`` is a class index into ``classnames``, or ``-1`` for unlabelled images (OOD-only sets,
    whose ``classnames`` and ``templates`` are empty). ``layout`` says which on-disk layout was found,
    ``notes`` are human-readable remarks the engine reports (e.g. an image count that differs from the
    published one), and ``info`` holds structured provenance (expected count, per-folder counts, ...).
    """

    def __init__(
        self,
        name: str,
        root: Path,
        paths: Sequence[Path],
        labels: Sequence[int],
        classnames: Sequence[str],
        templates: Sequence[str],
        *,
        layout: str = "",
        notes: Sequence[str] = (),
        info: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.root = Path(root)
        self.paths = tuple(Path(path) for path in paths)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.classnames = tuple(classnames)
        self.templates = tuple(templates)
        self.layout = layout
        self.notes = tuple(notes)
        self.info = dict(info or {})
        self._fingerprint: str | None = None
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{name}: {len(self.paths)} paths but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < -1 or self.labels.max() >= len(self.classnames)):
            raise ValueError(
                f"{name}: labels must be -1 (unlabelled) or in [0, {len(self.classnames)}), "
                f"got range [{self.labels.min()}, {self.labels.max()}]"
            )
        self._relative = tuple(self._relative_path(path) for path in self.paths)

    def _relative_path(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            raise ValueError(f"{self.name}: image {path} is not under the dataset root {self.root}") from None

    def image(self, index: int) -> Image.Image:
        """Decode the ``index``-th file now; any decoding failure is an :class:`UnreadableImage`."""
        from PIL import Image

        path = self.paths[index]
        try:
            with Image.open(path) as opened:
                opened.load()
                return opened.convert("RGB")
        except MemoryError:
            raise
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UnreadableImage(path, reason) from error

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the sorted (relative path, file size, label) records, class names and templates.

        Sizes rather than pixels: hashing 50,000 JPEGs would take minutes, while a re-encoded or
        truncated file almost always changes size. Paths are relative to ``root``, so moving the data
        root keeps the fingerprint.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for relative, label, size in sorted(zip(self._relative, self.labels.tolist(), self._sizes())):
                digest.update(f"{relative}\t{size}\t{label}\n".encode())
            digest.update("\n".join(self.classnames + ("",) + self.templates).encode())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def _sizes(self) -> list[int]:
        sizes = []
        for path in self.paths:
            try:
                sizes.append(path.stat().st_size)
            except OSError as error:
                raise QbenchError(f"dataset {self.name!r}: image {path} disappeared ({error.strerror})") from None
        return sizes


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: name, role (``id``/``ood``/``shift``/``spurious``), and its loader.

    ``resources`` are files the plugin ships for scorers, keyed like scorer resources
    (:class:`qbench.scoring.ResourceOption`): when this dataset is the ID side of an OOD pair, a scorer finds
    them in ``ScoreContext.dataset_resources`` and uses them when the user gives no file of that key (a
    label file written for this label set, say).

    ``label_fingerprint`` pins the split's labels in order (:func:`qbench.engine.evidence.label_fingerprint`, SHA-256 of
    the little-endian int64 labels): a leaderboard submission's per-sample evidence must carry exactly these
    labels, so results cannot be scored against other labels. ``None`` means not pinned (such datasets can be
    evaluated and rescored, but not submitted to the leaderboard).
    """

    name: str
    role: str
    description: str
    citation: str
    loader: Callable[[DatasetRequest], LabeledImages] = field(compare=False, repr=False)
    resources: Mapping[str, Path] = field(default_factory=dict, hash=False)
    label_fingerprint: str | None = None

    def __post_init__(self) -> None:
        """Freeze ``resources`` into a read-only mapping of key -> Path (a frozen spec must not change)."""
        if not isinstance(self.resources, Mapping):
            raise QbenchError(f"dataset {self.name!r}: resources must be a mapping of key -> file path, "
                              f"got {type(self.resources).__name__}")
        frozen = {str(key): Path(value) for key, value in self.resources.items() if value is not None}
        object.__setattr__(self, "resources", MappingProxyType(frozen))


@dataclass(frozen=True)
class ProxyPairs:
    """Image-caption pairs for calibration and QAT (``suites.md`` §5): PIL images and their captions."""

    source: str
    images: tuple[Image.Image, ...]
    captions: tuple[str, ...]
    fingerprint: str


@dataclass(frozen=True)
class ProxySpec:
    """A registered proxy source; ``loader(request, n)`` returns the seed's deterministic window of n pairs."""

    name: str
    description: str
    loader: Callable[[DatasetRequest, int], ProxyPairs] = field(compare=False, repr=False)


class LimitedImages(LabeledImages):
    """The first ``n`` images of a split (``qbench eval --limit N``): quick looks and smoke tests.

    The fingerprint differs from the full split's, so cached features of the two never mix.
    """

    def __init__(self, base: LabeledImages, n: int) -> None:
        self.base = base
        self.n = min(int(n), len(base))
        self.name = base.name
        self.classnames = base.classnames
        self.templates = base.templates
        self.labels = np.asarray(base.labels)[: self.n]
        self.notes = tuple(getattr(base, "notes", ())) + (f"limited to the first {self.n} of {len(base)} images (--limit)",)

    def image(self, index: int) -> Image.Image:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.base.image(index)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.base.fingerprint}:first:{self.n}".encode()).hexdigest()[:16]
