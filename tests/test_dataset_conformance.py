"""Every built-in dataset spec through the conformance kit (:func:`qbench.testing.check_dataset`): identity fields,
a well-formed label fingerprint, and a loader that, with no data root or an empty one, either builds a valid split
(labels, images, fingerprint, the pinned labels) or fails in one line naming ``--data-root`` or the folder it
searched. Broken dataset specs fail with a readable line."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from qbench.data import ArrayImages
from qbench.errors import QbenchError
from qbench.engine.evidence import label_fingerprint
from qbench.plugins import get_plugin_manager
from qbench.registry import build_registry
from qbench.testing import ConformanceError, check_dataset

REGISTRY = build_registry(get_plugin_manager(load_entrypoints=False))
DATASETS = REGISTRY.names("datasets")


@pytest.mark.parametrize("name", DATASETS)
def test_builtin_dataset_conforms(name, tmp_path):
    check_dataset(REGISTRY.get("datasets", name), folder=tmp_path)


def test_every_builtin_dataset_is_checked():
    assert {"toy-id-test", "cifar10-test"} <= set(DATASETS)


def tiny_split(labels=(0, 1, 1, 0), classnames=("cat", "dog")) -> ArrayImages:
    """A black-image split with the given labels and class names."""
    images = np.zeros((len(labels), 8, 8, 3), dtype=np.uint8)
    return ArrayImages("acme", images, labels, classnames, ("a photo of a {}.",))


def spec(loader, **changes):
    """A dataset spec like a plugin registers, with ``loader``."""
    base = dataclasses.replace(REGISTRY.get("datasets", "toy-id-test"), name="acme-set", loader=loader,
                               label_fingerprint=None)
    return dataclasses.replace(base, **changes)


def test_a_generated_split_passes_and_its_pinned_labels_are_checked(tmp_path):
    check_dataset(spec(lambda request: tiny_split(), label_fingerprint=label_fingerprint(np.array([0, 1, 1, 0]))),
                  folder=tmp_path)
    with pytest.raises(ConformanceError, match="not the pinned label_fingerprint"):
        check_dataset(spec(lambda request: tiny_split(), label_fingerprint=label_fingerprint(np.array([0, 1, 0, 0]))),
                      folder=tmp_path)


@pytest.mark.parametrize("fingerprint", ["abc", "A" * 64, label_fingerprint(np.array([1]))[:63] + "g"])
def test_a_malformed_label_fingerprint_fails(fingerprint, tmp_path):
    with pytest.raises(ConformanceError, match="label_fingerprint must be None or 64 lower-case hex"):
        check_dataset(spec(lambda request: tiny_split(), label_fingerprint=fingerprint), folder=tmp_path)


def needs_root(request):
    """A loader of on-disk data that is never there, failing the way built-in loaders do."""
    if request.data_root is None:
        raise QbenchError("dataset 'acme-set' needs a data root: pass --data-root DIR (or set QBENCH_DATA)")
    raise QbenchError(f"acme-set not found: expected {request.data_root}/acme/*.png; pass --data-root DIR")


def test_a_loader_naming_the_fix_passes(tmp_path):
    check_dataset(spec(needs_root), folder=tmp_path)


@pytest.mark.parametrize("loader, message", [
    (lambda request: (_ for _ in ()).throw(FileNotFoundError("acme/")), "raised FileNotFoundError: acme/"),
    (lambda request: (_ for _ in ()).throw(QbenchError("no data\nsee the docs")), "several lines"),
    (lambda request: (_ for _ in ()).throw(QbenchError("no data here")), "names none of --data-root, QBENCH_DATA"),
    (lambda request: tiny_split(labels=(0, 2)), r"labels span \[0, 2\] but there are 2 class names"),
    (lambda request: tiny_split(labels=()), "holds 0 images"),
    (lambda request: "acme", "returned str, not a qbench.data.LabeledImages"),
], ids=["traceback", "multi-line", "no-fix", "label-range", "empty", "not-a-split"])
def test_broken_loaders_fail(loader, message, tmp_path):
    with pytest.raises(ConformanceError, match=message) as raised:
        check_dataset(spec(loader), folder=tmp_path)
    assert str(raised.value).startswith("dataset 'acme-set': ")


def test_an_unknown_role_fails(tmp_path):
    with pytest.raises(ConformanceError, match="role 'OOD' is not one of"):
        check_dataset(spec(needs_root, role="OOD"), folder=tmp_path)
