"""Dataset contract: labelled images, proxy caption sources, and their registered specs.

A Dataset plugin returns a :class:`DatasetSpec` whose loader builds a :class:`LabeledImages` (images with
integer labels, class names and the prompt templates of its zero-shot classifier). Loaders fail with a
one-line :class:`~qbench.errors.QbenchError` that names the expected on-disk layout when the data are
absent. Unreadable images are counted in ``unreadable`` and skipped, never fatal.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image


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
        return Image.fromarray(self.images[index])

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(self.images.tobytes())
        digest.update(self.labels.tobytes())
        digest.update("\n".join(self.classnames + self.templates).encode())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: name, role (``id``/``ood``/``shift``/``spurious``), and its loader."""

    name: str
    role: str
    description: str
    citation: str
    loader: Callable[[DatasetRequest], LabeledImages] = field(compare=False, repr=False)


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
