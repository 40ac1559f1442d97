"""Reusable builders for image datasets stored as folders (no registered datasets of its own).

:func:`folder_dataset` reads torchvision's ``ImageFolder`` layout, ``<root>/<class>/**/<image>``, with
labels given by the class folders in sorted order: the layout of most released evaluation sets (MCM's
ImageNet-10/20, ImageNet-A/R, DTD's ``images/``). Users and third-party plugins can wrap it in a
:class:`~qbench.data.DatasetSpec` for their own data. :func:`count_notes` phrases the "found N images,
expected M" remark that loaders attach to a split instead of failing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from qbench.data import FileImages, image_files
from qbench.errors import QbenchError


def class_folders(root: Path) -> list[str]:
    """Names of the non-hidden sub-folders of ``root``, sorted (``ImageFolder``'s class order)."""
    return sorted(entry.name for entry in Path(root).iterdir() if entry.is_dir() and not entry.name.startswith("."))


def first_folder(root: Path, candidates: Sequence[str]) -> Path | None:
    """The first of ``candidates`` (paths relative to ``root``) that is a folder, else None: releases unpack
    under several names, and loaders accept each."""
    return next((Path(root) / candidate for candidate in candidates if (Path(root) / candidate).is_dir()), None)


def count_notes(what: str, found: int, expected: int | None) -> tuple[str, ...]:
    """A one-element note when ``found`` differs from the published ``expected`` count, else nothing."""
    if expected is None or found == expected:
        return ()
    return (f"{what}: found {found:,} images, the published split has {expected:,} (partial or modified copy?)",)


def folder_dataset(
    name: str,
    root: Path,
    templates: Sequence[str],
    classnames: Sequence[str] | None = None,
    *,
    expected_images: int | None = None,
    layout: str = "",
) -> FileImages:
    """An ``ImageFolder``-style split: one label per class folder of ``root``, in sorted folder order.

    ``classnames`` defaults to the folder names; when given it must list one name per folder, in the
    sorted folder order. Images are collected recursively inside each class folder. Class folders without
    images keep their label (the classifier is still K-way) and are reported in ``notes``, as is an image
    count that differs from ``expected_images``. A missing root or one without class folders is a one-line
    :class:`~qbench.errors.QbenchError`.
    """
    root = Path(root)
    expected_layout = f"{root}/<class>/<images> (ImageFolder layout)"
    if not root.is_dir():
        raise QbenchError(f"dataset {name!r}: folder {root} not found; expected {expected_layout}")
    folders = class_folders(root)
    if not folders:
        raise QbenchError(f"dataset {name!r}: no class folders in {root}; expected {expected_layout}")
    names = tuple(folders) if classnames is None else tuple(classnames)
    if len(names) != len(folders):
        raise QbenchError(
            f"dataset {name!r}: {len(names)} class names given for {len(folders)} class folders in {root}"
        )
    paths, labels, empty = [], [], []
    for label, folder in enumerate(folders):
        files = image_files(root / folder)
        if not files:
            empty.append(folder)
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        raise QbenchError(f"dataset {name!r}: no images in the class folders of {root}; expected {expected_layout}")
    notes = count_notes(name, len(paths), expected_images)
    if empty:
        notes += (f"{name}: {len(empty)} class folder(s) without images: {', '.join(empty[:5])}",)
    return FileImages(
        name, root, paths, labels, names, templates,
        layout=layout or "imagefolder",
        notes=notes,
        info={"classes": len(folders), "expected_images": expected_images},
    )
