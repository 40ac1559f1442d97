"""CIFAR-10-C generated on the fly (``suites.md`` §3.3): the CIFAR-10 test split under four corruptions.

Each ``cifar10c-ic-<corruption>`` dataset is :class:`qbench.engine.corruptions.CorruptedImages` over
``cifar10-test``: every 32x32 image is resized to the crop size of the model under test (with its
interpolation; the engine fills both in once the model is loaded), then corrupted by ``imagecorruptions``
at severity 3 with a per-image seed. The "-ic" marks that these are the ImageNet-C parameters of the
``imagecorruptions`` package, not the milder ones of the published CIFAR-10-C release.
"""

from __future__ import annotations

from typing import Callable

from qbench.data import DatasetRequest, DatasetSpec, LabeledImages
from qbench.hookspecs import hookimpl
from qbench.engine.corruptions import CORRUPTION_CITATION, DEFAULT_SIZE, STUDY_CORRUPTIONS, STUDY_SEVERITY

from .cifar import load_cifar10_test


def cifar10c_name(corruption: str) -> str:
    return f"cifar10c-ic-{corruption}"


def load_cifar10c(corruption: str, request: DatasetRequest) -> LabeledImages:
    """CIFAR-10 test under ``corruption`` (severity 3, seeded by the request), resized to the model's crop."""
    from qbench.engine.corruptions import CorruptedImages

    return CorruptedImages(load_cifar10_test(request), corruption, STUDY_SEVERITY, request.seed, size=DEFAULT_SIZE,
                           name=cifar10c_name(corruption), follow_model=True)


def _loader(corruption: str) -> Callable[[DatasetRequest], LabeledImages]:
    def load(request: DatasetRequest) -> LabeledImages:
        return load_cifar10c(corruption, request)

    load.__name__ = f"load_cifar10c_{corruption}"
    load.__doc__ = f"CIFAR-10 test with {corruption} at severity {STUDY_SEVERITY}, resize-then-corrupt."
    return load


@hookimpl
def qbench_register_datasets() -> list[DatasetSpec]:
    return [
        DatasetSpec(
            name=cifar10c_name(corruption),
            role="shift",
            description=(f"CIFAR-10 test with {corruption.replace('_', ' ')} at severity {STUDY_SEVERITY}, generated on the fly "
                         "(resized to the model's crop, then corrupted); 10,000 images"),
            citation=f"Krizhevsky, 2009; {CORRUPTION_CITATION}",
            loader=_loader(corruption),
        )
        for corruption in STUDY_CORRUPTIONS
    ]
