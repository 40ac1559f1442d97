"""ImageNet-1k validation set and the subsets qbench derives from it (``suites.md`` §1, §1.1, §1.3).

- ``imagenet1k-val``: the 50,000 ILSVRC-2012 validation images, 1,000 classes (Russakovsky et al., "ImageNet
  Large Scale Visual Recognition Challenge", IJCV 2015).
- ``imagenet10-val`` / ``imagenet20-val``: MCM's ImageNet-10 (CIFAR-10-like classes) and ImageNet-20 (20
  classes semantically close to them, its hard OOD set), 50 val images per class (Ming et al., "Delving into
  Out-of-Distribution Detection with Vision-Language Representations", NeurIPS 2022).
- ``imagenetx-id-val`` / ``imagenetx-ood-val``: ImageNet-X's 500/500 class split that puts WordNet siblings on
  opposite sides (Noda et al., 2025), 25,000 val images each.

Class index = position of the wnid in the sorted list of the 1,000 ILSVRC-2012 wnids, shipped as
``imagenet_wnids.txt`` (copied from timm's ``imagenet_synsets.txt``; checked by SHA-256 on load). Subsets
never copy images: they filter the val index and relabel to positions in their sorted index list, so
their classifiers are K-way. Class names are OpenAI's curated ``IMAGENET_CLASSNAMES`` and prompts OpenAI's
80 templates, both from ``open_clip.zero_shot_metadata``; MCM's names for ImageNet-10/20 are kept in
:data:`IMAGENET10` / :data:`IMAGENET20` for a ``--classnames mcm`` mode.

Accepted val layouts, under ``<data root>/imagenet/`` (or ``imagenet1k/``, ``ILSVRC2012/``):
(A) ``val/<wnid>/*.JPEG``; (B) torchvision's archives ``ILSVRC2012_img_val.tar`` +
``ILSVRC2012_devkit_t12.tar.gz``, unpacked once into ``val/<wnid>/`` by ``torchvision.datasets.ImageNet``;
(C) flat ``val/*.JPEG`` (or Kaggle's ``ILSVRC/Data/CLS-LOC/val/``) + ``LOC_val_solution.csv``, first wnid of
each row; and at the data root (D) OpenOOD v1.5's ``benchmark_imglist/imagenet/test_imagenet.txt``
(``relative/path label``, split at the first space) with images under ``images_largescale/``.
ImageNet-10/20 also accept MCM's own ``ImageNet10/val/<wnid>/`` and ``ImageNet20/val/<wnid>/`` folders.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterable

from qbench.data import DatasetRequest, DatasetSpec, FileImages, image_files
from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench_plugins.datasets.cifar import resolve_root
from qbench_plugins.datasets.imagefolder import class_folders, count_notes

WNIDS_FILE = "imagenet_wnids.txt"
WNIDS_SHA256 = "385e0240499426c022b773be1ae4da780f057b89c9694c7f47199f62746b6edd"
IMAGENETX_FILE = "imagenetx_id_indices.txt"
IMAGENETX_ID_SHA256 = "7c292cc78052bd5de66951d974924117de16fea5b0af209c254501d29c59a564"
IMAGENETX_OOD_SHA256 = "3fec5ccd862389a41d8a9d0234cc5020846ae6648ffcc000f9477e271f9901a4"

IMAGENET_DIRS = ("imagenet", "imagenet1k", "ILSVRC2012")
VAL_ARCHIVE = "ILSVRC2012_img_val.tar"
DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"
LOC_CSV = "LOC_val_solution.csv"
KAGGLE_VAL = Path("ILSVRC") / "Data" / "CLS-LOC" / "val"
OPENOOD_LIST = Path("benchmark_imglist") / "imagenet" / "test_imagenet.txt"
OPENOOD_IMAGES = "images_largescale"
IMAGENET_LAYOUTS = (
    "imagenet/val/<wnid>/*.JPEG (1,000 folders), "
    f"imagenet/{VAL_ARCHIVE} + imagenet/{DEVKIT_ARCHIVE}, "
    f"imagenet/val/*.JPEG + imagenet/{LOC_CSV}, "
    f"or {OPENOOD_LIST.as_posix()} + {OPENOOD_IMAGES}/"
)
IMAGENET_SOURCE = "ImageNet (ILSVRC-2012) from image-net.org under its terms of access"
IMAGENET_CITATION = "Russakovsky et al., IJCV 2015"

# (wnid, MCM class name) in sorted-wnid order, from suites.md §1.1 (Ming et al., NeurIPS 2022).
IMAGENET10: tuple[tuple[str, str], ...] = (
    ("n01530575", "brambling bird"), ("n01641577", "bull frog"), ("n02107574", "swiss mountain dog"),
    ("n02123597", "Siamese cat"), ("n02389026", "horse"), ("n02422699", "antelope"),
    ("n03095699", "container ship"), ("n03417042", "garbage truck"), ("n04285008", "sports car"),
    ("n04552348", "warplane"),
)
IMAGENET20: tuple[tuple[str, str], ...] = (
    ("n01630670", "common newt"), ("n01631663", "eft"), ("n01632458", "spotted salamander"),
    ("n01693334", "green lizard"), ("n01697457", "African crocodile"), ("n02114367", "timber wolf"),
    ("n02120079", "Arctic fox"), ("n02132136", "brown bear"), ("n02317335", "starfish"),
    ("n02391049", "zebra"), ("n02782093", "balloon"), ("n02917067", "bullet train"),
    ("n02951358", "canoe"), ("n03773504", "missile"), ("n03785016", "moped"),
    ("n04147183", "sailboat"), ("n04252077", "snowmobile"), ("n04266014", "space shuttle"),
    ("n04310018", "steam locomotive"), ("n04389033", "tank"),
)


# --- package data: wnids, names, templates, split lists ------------------------------------------------


def _data_lines(filename: str) -> list[str]:
    """Non-empty, non-comment lines of a text file shipped next to this module."""
    text = resources.files(__package__).joinpath(filename).read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _sha256_lines(entries: Iterable[str]) -> str:
    """SHA-256 of entries joined with ``\\n``, no trailing newline (``suites.md`` §0)."""
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1,000 ILSVRC-2012 wnids in class-index order, verified against :data:`WNIDS_SHA256`."""
    wnids = tuple(_data_lines(WNIDS_FILE))
    if len(wnids) != 1000 or list(wnids) != sorted(set(wnids)) or _sha256_lines(wnids) != WNIDS_SHA256:
        raise QbenchError(f"qbench's {WNIDS_FILE} is damaged (wrong count, order or checksum); reinstall qbench")
    return wnids


@functools.cache
def wnid_index() -> dict[str, int]:
    """wnid -> ImageNet-1k class index."""
    return {wnid: index for index, wnid in enumerate(imagenet_wnids())}


@functools.cache
def _zero_shot_metadata() -> ModuleType:
    """``open_clip.zero_shot_metadata``, without importing ``open_clip`` itself when it is not loaded yet.

    The module is plain data (no imports), but importing it through the package first runs
    ``open_clip/__init__``, which pulls in torch, timm and the model registry (seconds). Loading the file
    directly keeps dataset loading cheap; once open_clip is imported, its own module object is used.
    """
    if "open_clip" in sys.modules:
        return importlib.import_module("open_clip.zero_shot_metadata")
    package = importlib.util.find_spec("open_clip")
    if package is None or not package.submodule_search_locations:
        raise QbenchError("ImageNet class names come from open_clip: pip install open_clip_torch")
    path = Path(next(iter(package.submodule_search_locations))) / "zero_shot_metadata.py"
    spec = importlib.util.spec_from_file_location("qbench_open_clip_zero_shot_metadata", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise QbenchError(f"open_clip is missing {path}; reinstall open_clip_torch")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def openai_classnames() -> tuple[str, ...]:
    """OpenAI's curated names for the 1,000 classes, in class-index order (``open_clip``)."""
    names = tuple(_zero_shot_metadata().IMAGENET_CLASSNAMES)
    if len(names) != 1000:
        raise QbenchError(f"open_clip's IMAGENET_CLASSNAMES has {len(names)} entries, expected 1,000")
    return names


@functools.cache
def openai_templates() -> tuple[str, ...]:
    """OpenAI's 80 ImageNet prompts as ``str.format`` templates (open_clip stores them as callables)."""
    return tuple(template("{}") for template in _zero_shot_metadata().OPENAI_IMAGENET_TEMPLATES)


@functools.cache
def imagenetx_id_indices() -> tuple[int, ...]:
    """ImageNet-X's 500 ID class indices, sorted, verified against the published lists' checksum."""
    indices = tuple(sorted(int(line) for line in _data_lines(IMAGENETX_FILE)))
    if len(indices) != 500 or _sha256_lines(map(str, indices)) != IMAGENETX_ID_SHA256:
        raise QbenchError(f"qbench's {IMAGENETX_FILE} is damaged (wrong count or checksum); reinstall qbench")
    return indices


@functools.cache
def imagenetx_ood_indices() -> tuple[int, ...]:
    """ImageNet-X's 500 OOD class indices: the complement of the ID list, verified by checksum."""
    chosen = set(imagenetx_id_indices())
    indices = tuple(index for index in range(1000) if index not in chosen)
    if _sha256_lines(map(str, indices)) != IMAGENETX_OOD_SHA256:
        raise QbenchError("ImageNet-X OOD list does not match its published checksum; reinstall qbench")
    return indices


# --- finding the val images ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValIndex:
    """The located val images: their ImageNet-1k class indices, the folder paths are relative to, the layout."""

    root: Path
    paths: tuple[Path, ...]
    classes: tuple[int, ...]
    layout: str
    notes: tuple[str, ...] = ()


def find_val(data_root: Path, dataset: str, wanted: frozenset[int] | None = None) -> ValIndex:
    """Locate ImageNet-1k val under ``data_root`` in any accepted layout, keeping only classes in ``wanted``."""
    for name in IMAGENET_DIRS:
        base = data_root / name
        if not base.is_dir():
            continue
        val = base / "val"
        if val.is_dir() and _wnid_folders(val, dataset):
            return _index_class_folders(val, wanted, dataset, f"{name}/val/<wnid>/ (A)")
        csv_path = base / LOC_CSV
        for flat in (val, base / KAGGLE_VAL):
            if csv_path.is_file() and flat.is_dir():
                return _index_loc_csv(flat, csv_path, wanted, dataset, f"{flat.relative_to(data_root)}/ + {LOC_CSV} (C)")
        if (base / VAL_ARCHIVE).is_file() and (base / DEVKIT_ARCHIVE).is_file() and not val.exists():
            _unpack_archives(base, dataset)
            return _index_class_folders(val, wanted, dataset, f"{name}/{VAL_ARCHIVE} unpacked to {name}/val/ (B)")
    if (data_root / OPENOOD_LIST).is_file():
        return _index_image_list(data_root / OPENOOD_LIST, data_root / OPENOOD_IMAGES, wanted, dataset)
    raise QbenchError(
        f"ImageNet-1k val (needed by {dataset!r}) not found under {data_root}: expected {IMAGENET_LAYOUTS}; "
        f"obtain {IMAGENET_SOURCE} and pass --data-root DIR (or QBENCH_DATA)"
    )


def _wnid_folders(folder: Path, dataset: str) -> list[str]:
    """The class folders of ``folder``; any non-hidden folder that is not an ILSVRC-2012 wnid is an error."""
    names = class_folders(folder)
    unknown = [name for name in names if name not in wnid_index()]
    if names and unknown:
        raise QbenchError(
            f"{folder} (for {dataset!r}) holds folder(s) that are not ILSVRC-2012 wnids: {', '.join(unknown[:3])}; "
            "expected only the 1,000 val class folders <wnid>/"
        )
    return names


def _index_class_folders(folder: Path, wanted: frozenset[int] | None, dataset: str, layout: str) -> ValIndex:
    """Layouts A and B, and MCM's subset folders: one ``<wnid>/`` folder per class."""
    paths: list[Path] = []
    classes: list[int] = []
    for wnid in _wnid_folders(folder, dataset):
        index = wnid_index()[wnid]
        if wanted is not None and index not in wanted:
            continue
        files = image_files(folder / wnid)
        paths.extend(files)
        classes.extend([index] * len(files))
    return ValIndex(folder, tuple(paths), tuple(classes), layout)


def _index_loc_csv(flat: Path, csv_path: Path, wanted: frozenset[int] | None, dataset: str, layout: str) -> ValIndex:
    """Layout C: flat images named ``<ImageId>.<ext>``, labelled by the first wnid of their csv row."""
    labels: dict[str, int] = {}
    try:
        with csv_path.open(newline="") as handle:
            for row_number, row in enumerate(csv.DictReader(handle), start=2):
                words = (row.get("PredictionString") or "").split()
                if not row.get("ImageId") or not words or words[0] not in wnid_index():
                    raise QbenchError(
                        f"{csv_path} line {row_number} (for {dataset!r}) is not 'ImageId,<wnid> x y x y ...'"
                    )
                labels[row["ImageId"]] = wnid_index()[words[0]]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise QbenchError(f"cannot read {csv_path} (for {dataset!r}): {str(error).splitlines()[0]}") from None
    paths, classes, unlabelled = [], [], 0
    for path in image_files(flat):
        if path.parent != flat:
            continue
        index = labels.get(path.stem)
        if index is None:
            unlabelled += 1
        elif wanted is None or index in wanted:
            paths.append(path)
            classes.append(index)
    notes = (f"{unlabelled} image(s) in {flat} have no row in {LOC_CSV} and were left out",) if unlabelled else ()
    return ValIndex(flat, tuple(paths), tuple(classes), layout, notes)


def _index_image_list(listing: Path, images: Path, wanted: frozenset[int] | None, dataset: str) -> ValIndex:
    """Layout D: OpenOOD's ``path label`` list (split at the first space) with paths under ``images``."""
    paths, classes, missing = [], [], 0
    try:
        lines = listing.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise QbenchError(f"cannot read {listing} (for {dataset!r}): {error}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        relative, _, label = line.strip().partition(" ")
        try:
            index = int(label.strip())
        except ValueError:
            index = -1
        if not 0 <= index < 1000:
            raise QbenchError(f"{listing} line {number} (for {dataset!r}) is not 'relative/path <class index 0-999>'")
        if wanted is not None and index not in wanted:
            continue
        path = images / relative
        if not path.is_file():
            missing += 1
            continue
        paths.append(path)
        classes.append(index)
    notes = (f"{missing} image(s) listed in {listing} are missing under {images} and were left out",) if missing else ()
    return ValIndex(images, tuple(paths), tuple(classes), f"{OPENOOD_LIST.as_posix()} + {OPENOOD_IMAGES}/ (D)", notes)


def _torchvision_imagenet() -> Callable[..., object]:
    """``torchvision.datasets.ImageNet``, imported only when archives must be unpacked (a slow import)."""
    import torchvision.datasets

    return torchvision.datasets.ImageNet


def _unpack_archives(base: Path, dataset: str) -> None:
    """Layout B: let torchvision check the archives' MD5 and unpack the val tar into ``val/<wnid>/`` once."""
    try:
        _torchvision_imagenet()(str(base), split="val")
    except (RuntimeError, OSError, ValueError) as error:
        raise QbenchError(
            f"cannot unpack the ImageNet archives in {base} (for {dataset!r}): {str(error).splitlines()[0]}; "
            f"check {VAL_ARCHIVE} and {DEVKIT_ARCHIVE} and that the folder is writable, or unpack val/<wnid>/ yourself"
        ) from None


# --- splits ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageNetSplit:
    """A named selection of ImageNet-1k classes (``None`` = all 1,000) and its published image count."""

    name: str
    indices: Callable[[], tuple[int, ...]] | None
    expected_images: int
    mcm_folder: str | None = None


def _fixed(indices: Iterable[str]) -> Callable[[], tuple[int, ...]]:
    """Sorted class indices of a wnid list, resolved lazily (the wnid table is read on first use)."""
    wnids = tuple(indices)
    return lambda: tuple(sorted(wnid_index()[wnid] for wnid in wnids))


SPLITS: dict[str, ImageNetSplit] = {
    split.name: split
    for split in (
        ImageNetSplit("imagenet1k-val", None, 50_000),
        ImageNetSplit("imagenet10-val", _fixed(wnid for wnid, _ in IMAGENET10), 500, "ImageNet10"),
        ImageNetSplit("imagenet20-val", _fixed(wnid for wnid, _ in IMAGENET20), 1_000, "ImageNet20"),
        ImageNetSplit("imagenetx-id-val", imagenetx_id_indices, 25_000),
        ImageNetSplit("imagenetx-ood-val", imagenetx_ood_indices, 25_000),
    )
}


def load_split(split: ImageNetSplit, request: DatasetRequest) -> FileImages:
    """Build a split: locate the val images, keep its classes, relabel to positions in its sorted index list."""
    root = resolve_root(request, split.name, IMAGENET_LAYOUTS)
    subset = split.indices() if split.indices is not None else tuple(range(1000))
    index = _find_split_images(root, split, subset)
    if not index.paths:
        raise QbenchError(
            f"dataset {split.name!r}: no val images of its {len(subset)} classes in {index.root} (layout {index.layout}); "
            f"expected {IMAGENET_LAYOUTS}; pass --data-root DIR (or QBENCH_DATA)"
        )
    position = {imagenet_index: label for label, imagenet_index in enumerate(subset)}
    names = openai_classnames()
    found_classes = len(set(index.classes))
    notes = index.notes + count_notes(split.name, len(index.paths), split.expected_images)
    if found_classes != len(subset):
        notes += (f"{split.name}: images found for {found_classes} of its {len(subset)} classes",)
    return FileImages(
        split.name,
        index.root,
        index.paths,
        [position[imagenet_index] for imagenet_index in index.classes],
        [names[imagenet_index] for imagenet_index in subset],
        openai_templates(),
        layout=index.layout,
        notes=notes,
        info={
            "expected_images": split.expected_images,
            "imagenet_indices": list(subset) if split.indices is not None else "all",
            "classes_found": found_classes,
        },
    )


def _find_split_images(root: Path, split: ImageNetSplit, subset: tuple[int, ...]) -> ValIndex:
    """MCM's dedicated ``ImageNet10/val/`` style folder when present, else the ImageNet-1k val index."""
    if split.mcm_folder and (root / split.mcm_folder / "val").is_dir():
        folder = root / split.mcm_folder / "val"
        index = _index_class_folders(folder, None, split.name, f"{split.mcm_folder}/val/<wnid>/ (MCM)")
        outside = sorted(set(index.classes) - set(subset))
        if outside:
            raise QbenchError(
                f"{folder} holds class {imagenet_wnids()[outside[0]]}, which is not in {split.name}; "
                f"expected only its {len(subset)} wnid folders"
            )
        return index
    return find_val(root, split.name, frozenset(subset) if split.indices is not None else None)


def mcm_classnames(split_name: str) -> tuple[str, ...]:
    """MCM's class names for ImageNet-10 or ImageNet-20, in label order (for ``--classnames mcm``)."""
    table = {"imagenet10-val": IMAGENET10, "imagenet20-val": IMAGENET20}.get(split_name)
    if table is None:
        raise QbenchError(f"MCM class names exist only for imagenet10-val and imagenet20-val, not {split_name!r}")
    return tuple(name for _, name in sorted(table))


_DESCRIPTIONS = {
    "imagenet1k-val": ("id", "ImageNet-1k (ILSVRC-2012) val, 1,000 classes, 50,000 images", IMAGENET_CITATION),
    "imagenet10-val": ("id", "MCM ImageNet-10 (CIFAR-10-like classes) from ImageNet val, 10 classes, 500 images",
                       "Ming et al., NeurIPS 2022"),
    "imagenet20-val": ("id", "MCM ImageNet-20 (near neighbours of ImageNet-10) from ImageNet val, 20 classes, 1,000 images",
                       "Ming et al., NeurIPS 2022"),
    "imagenetx-id-val": ("id", "ImageNet-X ID half: 500 classes of ImageNet val, 25,000 images", "Noda et al., 2025"),
    "imagenetx-ood-val": ("ood", "ImageNet-X OOD half: the other 500 classes of ImageNet val, 25,000 images",
                          "Noda et al., 2025"),
}


@hookimpl
def qbench_register_datasets() -> list[DatasetSpec]:
    specs = []
    for name, split in SPLITS.items():
        role, description, citation = _DESCRIPTIONS[name]
        specs.append(DatasetSpec(name, role, description, citation, functools.partial(load_split, split)))
    return specs
