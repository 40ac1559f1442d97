"""Far-OOD sets for ImageNet-1k: the MOS subsets of iNaturalist, SUN and Places, and DTD (``suites.md`` §2.1).

Huang & Li ("MOS: Towards Scaling Out-of-distribution Detection for Large Semantic Space", CVPR 2021)
curated 10,000-image subsets of iNaturalist (110 plant species; Van Horn et al., CVPR 2018), SUN (50
nature/scene concepts; Xiao et al., CVPR 2010) and Places (50 scene concepts; Zhou et al., TPAMI 2017)
whose concepts do not overlap ImageNet-1k. Textures is the entire Describable Textures Dataset (47
categories x 120 = 5,640 images; Cimpoi et al., "Describing Textures in the Wild", CVPR 2014).

Expected under ``<data root>``: ``iNaturalist/``, ``SUN/``, ``Places/`` as unpacked from the MOS authors'
``iNaturalist.tar.gz``, ``SUN.tar.gz``, ``Places.tar.gz`` (images collected recursively, usually from their
``images/`` folder), and ``dtd/images/<category>/*.jpg`` (or ``dtd/`` holding the category folders) from
the Oxford VGG DTD release. The images are unlabelled for OOD scoring (label -1, no class names or
prompts). An image count that differs from the published one is recorded in ``notes`` rather than
failing; per-concept counts, when the archive has concept sub-folders, go to ``info``.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from qbench.data import DatasetRequest, DatasetSpec, FileImages, image_files
from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench_plugins.datasets.cifar import resolve_root
from qbench_plugins.datasets.imagefolder import count_notes, first_folder

MOS_SOURCE = "the MOS authors' released archives (github.com/deeplearning-wisc/large_scale_ood)"


@dataclass(frozen=True)
class FarOODSet:
    """One far-OOD image set: where it may sit under the data root and what the published copy holds."""

    name: str
    title: str
    folders: tuple[str, ...]
    layout: str
    expected_images: int
    source: str
    description: str
    citation: str
    expected_groups: int | None = None


FAR_OOD_SETS: tuple[FarOODSet, ...] = (
    FarOODSet(
        "inaturalist-ood", "MOS iNaturalist", ("iNaturalist", "inaturalist"),
        "iNaturalist/ (unpacked iNaturalist.tar.gz, images anywhere below)", 10_000,
        f"iNaturalist.tar.gz from {MOS_SOURCE}",
        "MOS iNaturalist far-OOD subset: 110 plant species absent from ImageNet-1k, 10,000 images",
        "Huang & Li, CVPR 2021; Van Horn et al., CVPR 2018",
    ),
    FarOODSet(
        "sun-ood", "MOS SUN", ("SUN", "sun"),
        "SUN/ (unpacked SUN.tar.gz, images anywhere below)", 10_000,
        f"SUN.tar.gz from {MOS_SOURCE}",
        "MOS SUN far-OOD subset: 50 nature/scene concepts absent from ImageNet-1k, 10,000 images",
        "Huang & Li, CVPR 2021; Xiao et al., CVPR 2010",
    ),
    FarOODSet(
        "places-ood", "MOS Places", ("Places", "places"),
        "Places/ (unpacked Places.tar.gz, images anywhere below)", 10_000,
        f"Places.tar.gz from {MOS_SOURCE}",
        "MOS Places far-OOD subset: 50 scene concepts absent from ImageNet-1k, 10,000 images",
        "Huang & Li, CVPR 2021; Zhou et al., TPAMI 2017",
    ),
    FarOODSet(
        "dtd-ood", "DTD (Textures)", ("dtd/images", "dtd/dtd/images", "dtd"),
        "dtd/images/<category>/*.jpg (or dtd/<category>/)", 5_640,
        "dtd-r1.0.1.tar.gz from the Oxford VGG DTD page (robots.ox.ac.uk/~vgg/data/dtd)",
        "Describable Textures Dataset, all 47 categories, 5,640 images, as far-OOD for ImageNet-1k",
        "Cimpoi et al., CVPR 2014",
        expected_groups=47,
    ),
)


def load_far_ood(spec: FarOODSet, request: DatasetRequest) -> FileImages:
    """All images of one far-OOD set, label -1, with count and per-concept provenance."""
    root = resolve_root(request, spec.name, spec.layout)
    folder = first_folder(root, spec.folders)
    if folder is None:
        raise QbenchError(
            f"{spec.title} (dataset {spec.name!r}) not found: expected {root}/{spec.layout}; obtain {spec.source} "
            "and pass --data-root DIR (or QBENCH_DATA) where DIR holds it"
        )
    files = image_files(folder)
    if not files:
        raise QbenchError(
            f"{spec.title} (dataset {spec.name!r}): no images in {folder}; expected {root}/{spec.layout}; "
            f"obtain {spec.source} and pass --data-root DIR (or QBENCH_DATA) where DIR holds it"
        )
    groups = concept_counts(folder, files)
    notes = count_notes(spec.name, len(files), spec.expected_images)
    if spec.expected_groups is not None and len(groups) != spec.expected_groups:
        notes += (f"{spec.name}: found {len(groups)} category folders, the published set has {spec.expected_groups}",)
    return FileImages(
        spec.name, folder, files, [-1] * len(files), (), (),
        layout=f"{folder.relative_to(root).as_posix()}/",
        notes=notes,
        info={"expected_images": spec.expected_images, "concept_counts": groups},
    )


def concept_counts(folder: Path, files: list[Path]) -> dict[str, int]:
    """Images per concept sub-folder, below ``folder/images/`` when that exists, else below ``folder``.

    Files lying directly in that base folder belong to no concept; an archive without concept folders
    therefore gives an empty mapping (label-free images, as the MOS archives usually are).
    """
    base = folder / "images" if (folder / "images").is_dir() else folder
    counts: Counter[str] = Counter()
    for path in files:
        try:
            parts = path.relative_to(base).parts
        except ValueError:
            continue
        if len(parts) > 1:
            counts[parts[0]] += 1
    return dict(sorted(counts.items()))


@hookimpl
def qbench_register_datasets() -> list[DatasetSpec]:
    return [
        DatasetSpec(spec.name, "ood", spec.description, spec.citation, functools.partial(load_far_ood, spec))
        for spec in FAR_OOD_SETS
    ]
