"""ImageNet variants for covariate-shift robustness (``suites.md`` §3.1-3.2), role ``shift``.

- ``imagenet-v2``: ImageNetV2 matched-frequency, 10,000 new test images collected like the original val set,
  1,000 classes (Recht et al., "Do ImageNet Classifiers Generalize to ImageNet?", ICML 2019).
- ``imagenet-a``: 7,500 natural adversarial examples of 200 classes that ResNet-50s misclassify (Hendrycks et
  al., "Natural Adversarial Examples", CVPR 2021).
- ``imagenet-r``: 30,000 renditions (art, cartoons, sketches, toys, ...) of 200 classes (Hendrycks et al.,
  "The Many Faces of Robustness: A Critical Analysis of Out-of-Distribution Generalization", ICCV 2021).
- ``imagenet-sketch``: 50,889 black-and-white sketches of the 1,000 classes (Wang et al., "Learning Robust
  Global Representations by Penalizing Local Predictive Power", NeurIPS 2019).

Expected under ``<data root>``: ``imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg`` (the unpacked
``imagenetv2-matched-frequency.tar.gz``), ``imagenet-a/<wnid>/``, ``imagenet-r/<wnid>/`` (the unpacked
``imagenet-a.tar`` / ``imagenet-r.tar``), and ``sketch/<wnid>/`` or ``imagenet-sketch/<wnid>/`` (also
``imagenet-sketch/sketch/<wnid>/``). Nothing is downloaded or unpacked.

Labels: ImageNetV2's folder name *is* the ImageNet-1k class index, ``int(folder)`` -- never ImageFolder's
lexical order, which would put ``10`` before ``2``. The other sets name folders by wnid, mapped to the index
with ``imagenet.py``'s shipped wnid list. ImageNet-A and -R are 200-way: label = position of the class in the
sorted subset shipped as ``imagenet_a_indices.txt`` / ``imagenet_r_indices.txt`` (checked on load against the
SHA-256 of the sorted wnids in ``suites.md`` §3.2); ``info["imagenet_indices"]`` (and :func:`subset_indices`)
map labels back to the 1,000-class label space, which robustness metrics compare against. A classifier
built from the subset's class names equals the 1,000-class classifier restricted to those columns (each
class's text embedding is computed independently). Class names are OpenAI's, prompts OpenAI's 80 templates.
A folder that is not a class of the set is a one-line error; missing classes and an image count that
differs from the published one are reported in ``notes``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from qbench.data import DatasetRequest, DatasetSpec, FileImages, image_files
from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench_plugins.datasets.cifar import resolve_root
from qbench_plugins.datasets.imagefolder import class_folders, count_notes, first_folder
from qbench_plugins.datasets.imagenet import (
    _data_lines, _sha256_lines, imagenet_wnids, openai_classnames, openai_templates, wnid_index,
)

V2_FOLDER = "imagenetv2-matched-frequency-format-val"


@dataclass(frozen=True)
class ClassSubset:
    """A shipped list of ImageNet-1k class indices and the SHA-256 of its sorted wnids (``suites.md`` §3.2)."""

    title: str
    filename: str
    wnids_sha256: str
    size: int = 200


IMAGENET_A_CLASSES = ClassSubset(
    "ImageNet-A", "imagenet_a_indices.txt", "f6aa4b23244554d9b864fd715ae20048f6a9686388911b2dfbf1ada01bf0f520"
)
IMAGENET_R_CLASSES = ClassSubset(
    "ImageNet-R", "imagenet_r_indices.txt", "e19a59d84e3746fafd34d2ccf6ae604a44e9a0500a596f343c878a89e30ce624"
)


@functools.cache
def _subset(subset: ClassSubset) -> tuple[int, ...]:
    """The subset's class indices, sorted, verified by count and by the checksum of their sorted wnids."""
    indices = tuple(sorted(int(line) for line in _data_lines(subset.filename)))
    wnids = imagenet_wnids()
    valid = len(set(indices)) == subset.size and all(0 <= index < 1000 for index in indices)
    if not valid or _sha256_lines(sorted(wnids[index] for index in indices)) != subset.wnids_sha256:
        raise QbenchError(f"qbench's {subset.filename} is damaged (wrong count or checksum); reinstall qbench")
    return indices


@dataclass(frozen=True)
class Variant:
    """One ImageNet variant: where it may sit under the data root, how folders map to labels, its published size.

    ``label_rule`` is ``"index"`` (folder name = ImageNet-1k class index, ImageNetV2) or ``"wnid"``.
    """

    name: str
    title: str
    folders: tuple[str, ...]
    layout: str
    label_rule: str
    expected_images: int
    source: str
    description: str
    citation: str
    subset: ClassSubset | None = None


VARIANTS: tuple[Variant, ...] = (
    Variant(
        "imagenet-v2", "ImageNetV2 matched-frequency", (V2_FOLDER,),
        f"{V2_FOLDER}/<0..999>/*.jpeg (folder name = class index)", "index", 10_000,
        "imagenetv2-matched-frequency.tar.gz from the authors' release (Hub vaishaal/ImageNetV2), unpacked",
        "ImageNetV2 matched-frequency test set, 1,000 classes, 10,000 images (label = int(folder))",
        "Recht et al., ICML 2019",
    ),
    Variant(
        "imagenet-a", "ImageNet-A", ("imagenet-a",),
        "imagenet-a/<wnid>/*.jpg (200 wnid folders)", "wnid", 7_500,
        "imagenet-a.tar from the authors' release (github.com/hendrycks/natural-adv-examples), unpacked",
        "ImageNet-A natural adversarial examples, 200 ImageNet classes (200-way), 7,500 images",
        "Hendrycks et al., CVPR 2021", IMAGENET_A_CLASSES,
    ),
    Variant(
        "imagenet-r", "ImageNet-R", ("imagenet-r",),
        "imagenet-r/<wnid>/*.jpg (200 wnid folders)", "wnid", 30_000,
        "imagenet-r.tar from the authors' release (github.com/hendrycks/imagenet-r), unpacked",
        "ImageNet-R renditions, 200 ImageNet classes (200-way), 30,000 images",
        "Hendrycks et al., ICCV 2021", IMAGENET_R_CLASSES,
    ),
    Variant(
        "imagenet-sketch", "ImageNet-Sketch", ("sketch", "imagenet-sketch/sketch", "imagenet-sketch"),
        "sketch/<wnid>/* or imagenet-sketch/<wnid>/* (1,000 wnid folders)", "wnid", 50_889,
        "ImageNet-Sketch from the authors' release (github.com/HaohanWang/ImageNet-Sketch; Hub imagenet_sketch), unpacked",
        "ImageNet-Sketch, sketches of the 1,000 ImageNet classes, 50,889 images",
        "Wang et al., NeurIPS 2019",
    ),
)
VARIANTS_BY_NAME: dict[str, Variant] = {variant.name: variant for variant in VARIANTS}


def subset_indices(name: str) -> tuple[int, ...]:
    """ImageNet-1k class index of each label of ``name`` (label ``k`` is class ``subset_indices(name)[k]``)."""
    variant = VARIANTS_BY_NAME.get(name)
    if variant is None:
        raise QbenchError(f"no ImageNet variant {name!r} (available: {', '.join(VARIANTS_BY_NAME)})")
    return _subset(variant.subset) if variant.subset is not None else tuple(range(1000))


def load_variant(variant: Variant, request: DatasetRequest) -> FileImages:
    """All images of one variant, labelled in its own label space (1,000-way, or 200-way for A and R)."""
    root = resolve_root(request, variant.name, variant.layout)
    folder = _locate(root, variant)
    subset = subset_indices(variant.name)
    position = {imagenet_index: label for label, imagenet_index in enumerate(subset)}
    paths, labels, empty, found = [], [], [], set()
    for name in class_folders(folder):
        imagenet_index = _class_index(folder, name, variant)
        if imagenet_index not in position:
            raise QbenchError(
                f"{folder / name} (for {variant.name!r}) is not one of the {len(subset)} {variant.title} classes; "
                f"expected only its class folders, {root}/{variant.layout}"
            )
        files = image_files(folder / name)
        found.add(imagenet_index)
        if not files:
            empty.append(name)
        paths.extend(files)
        labels.extend([position[imagenet_index]] * len(files))
    if not paths:
        raise QbenchError(
            f"{variant.title} (dataset {variant.name!r}): no images in the class folders of {folder}; expected "
            f"{root}/{variant.layout}; obtain {variant.source} and pass --data-root DIR (or QBENCH_DATA) where DIR holds it"
        )
    names = openai_classnames()
    return FileImages(
        variant.name, folder, paths, labels, [names[index] for index in subset], openai_templates(),
        layout=f"{folder.relative_to(root).as_posix()}/<{'class index' if variant.label_rule == 'index' else 'wnid'}>/",
        notes=_notes(variant, len(paths), len(found), len(subset), empty),
        info={
            "expected_images": variant.expected_images,
            "label_rule": "int(folder)" if variant.label_rule == "index" else "wnid -> ImageNet-1k index",
            "label_space": "imagenet-1k" if variant.subset is None else f"{variant.title} subset of imagenet-1k",
            "imagenet_indices": list(subset) if variant.subset is not None else "all",
            "classes_found": len(found),
        },
    )


def _locate(root: Path, variant: Variant) -> Path:
    """The first accepted folder of the variant under ``root``, or a one-line error naming the layout."""
    folder = first_folder(root, variant.folders)
    if folder is not None:
        return folder
    raise QbenchError(
        f"{variant.title} (dataset {variant.name!r}) not found: expected {root}/{variant.layout}; obtain "
        f"{variant.source} and pass --data-root DIR (or QBENCH_DATA) where DIR holds it"
    )


def _class_index(folder: Path, name: str, variant: Variant) -> int:
    """The ImageNet-1k class index a class folder stands for: ``int(name)`` or the wnid's index."""
    if variant.label_rule == "index":
        if name.isascii() and name.isdigit() and int(name) < 1000:
            return int(name)
        raise QbenchError(
            f"{folder / name} (for {variant.name!r}) is not a class-index folder 0..999; expected {variant.layout}"
        )
    index = wnid_index().get(name)
    if index is None:
        raise QbenchError(
            f"{folder / name} (for {variant.name!r}) is not an ILSVRC-2012 wnid folder; expected {variant.layout}"
        )
    return index


def _notes(variant: Variant, images: int, classes: int, expected_classes: int, empty: list[str]) -> tuple[str, ...]:
    """Count remarks: images vs the published count, classes found, class folders without images."""
    notes = count_notes(variant.name, images, variant.expected_images)
    if classes != expected_classes:
        notes += (f"{variant.name}: class folders found for {classes} of its {expected_classes} classes",)
    if empty:
        notes += (f"{variant.name}: {len(empty)} class folder(s) without images: {', '.join(empty[:5])}",)
    return notes


@hookimpl
def qbench_register_datasets() -> list[DatasetSpec]:
    return [
        DatasetSpec(variant.name, "shift", variant.description, variant.citation, functools.partial(load_variant, variant))
        for variant in VARIANTS
    ]
