"""CounterAnimal's common and counter groups (``suites.md`` §4), role ``spurious``.

Wang et al., "A Sober Look at the Robustness of CLIPs to Spurious Features" (NeurIPS 2024): iNaturalist
photos of 45 ImageNet-1k animal classes, each labelled with its background. Per class two background groups
were kept whose CLIP accuracy differs sharply: the **common** group (typical background, "easy", 7,174
images) and the **counter** group (unusual background, "hard", 5,926 images); 13,100 in all.

Expected under ``<data root>`` (the public release): ``counteranimal/LAION-final/<idx> <class name>/`` with a
sub-folder whose name contains ``common`` and one whose name contains ``counter``, followed by the background
(``common-snow``, ``counter-grass``), plus ``imagenet_names.txt``. The data root may also be
``counteranimal/`` itself or ``LAION-final/`` itself. ``<idx>`` is the ImageNet-1k class index and is the
label: both groups are **1,000-way** with the full ImageNet-1k classifier (OpenAI's class names, OpenAI's 80
templates), not 45-way. Per-class image counts and backgrounds go to ``info`` (for class-balanced means and
the RSG metrics of ``scoring.md`` §2.6); counts that differ from the published ones (45 classes, 7,174 /
5,926 images) are reported in ``notes``. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from qbench.data import DatasetRequest, DatasetSpec, FileImages, image_files
from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench_plugins.datasets.cifar import resolve_root
from qbench_plugins.datasets.imagefolder import class_folders, count_notes, first_folder
from qbench_plugins.datasets.imagenet import openai_classnames, openai_templates

RELEASE_FOLDER = "LAION-final"
ROOT_CANDIDATES: tuple[str, ...] = (f"counteranimal/{RELEASE_FOLDER}", f"CounterAnimal/{RELEASE_FOLDER}", RELEASE_FOLDER)
NAMES_FILE = "imagenet_names.txt"
LAYOUT = (
    f"counteranimal/{RELEASE_FOLDER}/<idx> <class name>/{{common-<background>,counter-<background>}}/*.jpg "
    f"(+ {NAMES_FILE}); the data root may also be counteranimal/ or {RELEASE_FOLDER}/ itself"
)
SOURCE = "the CounterAnimal release (LAION-final/) from the authors' project page"
CITATION = "Wang et al., NeurIPS 2024"
EXPECTED_CLASSES = 45
CLASS_FOLDER = re.compile(r"^(\d+) +(\S.*)$")


@dataclass(frozen=True)
class Group:
    """One background group of CounterAnimal and its published image count."""

    name: str
    group: str
    expected_images: int
    description: str


GROUPS: tuple[Group, ...] = (
    Group("counteranimal-common", "common", 7_174,
          "CounterAnimal common group (typical backgrounds, 'easy'), 45 animal classes, 7,174 images, 1,000-way"),
    Group("counteranimal-counter", "counter", 5_926,
          "CounterAnimal counter group (unusual backgrounds, 'hard'), 45 animal classes, 5,926 images, 1,000-way"),
)


@dataclass(frozen=True)
class AnimalClass:
    """A class folder ``<idx> <class name>/`` and its background sub-folders by group."""

    index: int
    name: str
    folder: Path
    groups: dict[str, tuple[str, ...]]


def load_group(group: Group, request: DatasetRequest) -> FileImages:
    """Every image of one group, labelled with its ImageNet-1k class index (1,000-way)."""
    root = resolve_root(request, group.name, LAYOUT)
    release = locate_release(root, group.name)
    classes = animal_classes(release, group.name)
    paths, labels, counts, backgrounds, without = [], [], {}, {}, []
    for animal in classes:
        folders = animal.groups[group.group]
        if not folders:
            without.append(animal.folder.name)
        files = [path for sub in folders for path in image_files(animal.folder / sub)]
        paths.extend(files)
        labels.extend([animal.index] * len(files))
        counts[animal.index] = counts.get(animal.index, 0) + len(files)
        backgrounds[animal.index] = [background(sub, group.group) for sub in folders]
    if not paths:
        raise QbenchError(
            f"CounterAnimal (dataset {group.name!r}): no images in the {group.group} sub-folders of {release}; "
            f"expected {root}/{LAYOUT}; pass --data-root DIR (or QBENCH_DATA) where DIR holds it"
        )
    return FileImages(
        group.name, release, paths, labels, openai_classnames(), openai_templates(),
        layout=f"{_relative(release, root)}<idx> <class name>/{group.group}-<background>/",
        notes=_notes(group, len(paths), len(classes), without),
        info={
            "expected_images": group.expected_images,
            "group": group.group,
            "label_space": "imagenet-1k",
            "classes": len(classes),
            "class_counts": counts,
            "backgrounds": backgrounds,
            "imagenet_names_file": (release / NAMES_FILE).is_file(),
        },
    )


def locate_release(root: Path, dataset: str) -> Path:
    """The ``LAION-final/`` folder under ``root``, or ``root`` itself when it holds the class folders."""
    release = first_folder(root, ROOT_CANDIDATES)
    if release is not None:
        return release
    if (root / NAMES_FILE).is_file() or any(CLASS_FOLDER.match(name) for name in class_folders(root)):
        return root
    raise QbenchError(
        f"CounterAnimal (dataset {dataset!r}) not found: expected {root}/{LAYOUT}; obtain {SOURCE} "
        "and pass --data-root DIR (or QBENCH_DATA) where DIR holds it"
    )


def animal_classes(release: Path, dataset: str) -> list[AnimalClass]:
    """The ``<idx> <class name>/`` folders of the release, by class index; any other folder is an error."""
    classes = []
    for name in class_folders(release):
        match = CLASS_FOLDER.match(name)
        if match is None or int(match.group(1)) >= 1000:
            raise QbenchError(
                f"{release / name} (for {dataset!r}) is not a CounterAnimal class folder '<ImageNet index 0-999> <class name>'; "
                f"expected {LAYOUT}"
            )
        subfolders = class_folders(release / name)
        groups = {key: tuple(sub for sub in subfolders if key in sub.lower()) for key in ("common", "counter")}
        classes.append(AnimalClass(int(match.group(1)), match.group(2), release / name, groups))
    if not classes:
        raise QbenchError(
            f"CounterAnimal (dataset {dataset!r}): no class folders in {release}; expected {LAYOUT}; "
            "pass --data-root DIR (or QBENCH_DATA) where DIR holds it"
        )
    return sorted(classes, key=lambda animal: (animal.index, animal.name))


def background(subfolder: str, group: str) -> str:
    """The background named by a group sub-folder: ``common-snow`` -> ``snow`` (``""`` when it names none)."""
    start = subfolder.lower().index(group) + len(group)
    return subfolder[start:].strip(" -_")


def _relative(folder: Path, root: Path) -> str:
    relative = folder.relative_to(root).as_posix()
    return "" if relative == "." else f"{relative}/"


def _notes(group: Group, images: int, classes: int, without: list[str]) -> tuple[str, ...]:
    notes = count_notes(group.name, images, group.expected_images)
    if classes != EXPECTED_CLASSES:
        notes += (f"{group.name}: found {classes} class folders, the published set has {EXPECTED_CLASSES}",)
    if without:
        notes += (f"{group.name}: {len(without)} class folder(s) without a {group.group} sub-folder: {', '.join(without[:5])}",)
    return notes


@hookimpl
def qbench_register_datasets() -> list[DatasetSpec]:
    return [
        DatasetSpec(group.name, "spurious", group.description, CITATION, functools.partial(load_group, group))
        for group in GROUPS
    ]
