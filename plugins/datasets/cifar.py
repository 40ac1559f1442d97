"""CIFAR-10 test set in torchvision's archive layout (Krizhevsky, "Learning Multiple Layers of Features
from Tiny Images", 2009).

Expected on disk: ``<data root>/cifar-10-batches-py/{batches.meta,test_batch,...}``, the folder that the
official ``cifar-10-python.tar.gz`` unpacks to. Nothing is downloaded. Class names come from
``batches.meta``; prompts are OpenAI's 18 CIFAR templates (``suites.md`` §6).
"""

from __future__ import annotations

from pathlib import Path

from qbench.data import ArrayImages, DatasetRequest, DatasetSpec
from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl

CIFAR10_FOLDER = "cifar-10-batches-py"
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
        raise QbenchError(f"data root {root} does not exist; pass --data-root DIR where DIR holds {layout}")
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


@hookimpl
def qbench_register_datasets() -> list[DatasetSpec]:
    return [
        DatasetSpec(
            name="cifar10-test",
            role="id",
            description="CIFAR-10 test split, 10 classes, 10,000 images (torchvision archive layout)",
            citation="Krizhevsky, 2009",
            loader=load_cifar10_test,
        )
    ]
