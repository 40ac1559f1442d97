"""The offline toy world: seeded generation, split semantics, the proxy stream and the shipped toy-clip."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time

import numpy as np
import pytest

from qbench.data import DatasetRequest, LabeledImages, ProxyPairs
from qbench.errors import QbenchError
from qbench_plugins.toyworld import plugin, world

ID_K = len(world.ID_CLASSES)


# -- generation ----------------------------------------------------------------------------------------
def test_same_seed_gives_identical_splits():
    first, second = world.generate("id-test", 300, seed=3), world.generate("id-test", 300, seed=3)
    assert np.array_equal(first.images, second.images)
    assert np.array_equal(first.labels, second.labels)
    assert np.array_equal(first.backgrounds, second.backgrounds)
    assert first.captions == second.captions


def test_shorter_request_is_a_prefix():
    long, short = world.generate("train", 600, seed=0), world.generate("train", 100, seed=0)
    assert np.array_equal(long.images[:100], short.images)
    assert long.captions[:100] == short.captions


def test_different_split_or_seed_gives_different_images():
    base = world.generate("id-test", 200, seed=0).images
    for other in (world.generate("train", 200, seed=0).images, world.generate("id-test", 200, seed=1).images,
                  world.generate("spurious-common", 200, seed=0).images):
        assert not np.array_equal(base, other)
        assert (base != other).mean() > 0.5


@pytest.mark.parametrize("split", world.SPLITS)
def test_shapes_dtypes_and_label_ranges(split):
    data = world.generate(split, 300, seed=0)
    assert data.images.shape == (300, world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64 and data.labels.shape == (300,)
    assert len(data.captions) == 300 and all(isinstance(caption, str) and caption for caption in data.captions)
    assert data.labels.min() >= 0 and data.labels.max() < len(data.classnames)
    assert data.backgrounds.min() >= 0 and data.backgrounds.max() < len(world.BACKGROUNDS)
    expected = {"ood-near": world.NEAR_OOD_CLASSES, "ood-far": world.FAR_OOD_KINDS,
                "train": world.TRAIN_CLASSES, "proxy": world.TRAIN_CLASSES}.get(split, world.ID_CLASSES)
    assert data.classnames == expected
    if data.classnames != world.TRAIN_CLASSES:  # evaluation splits are class-balanced
        counts = np.bincount(data.labels, minlength=len(data.classnames))
        assert counts.min() >= 300 // len(data.classnames) - 8


def test_held_out_concepts_are_disjoint_from_id_but_in_training_captions():
    assert not set(world.ID_CLASSES) & set(world.NEAR_OOD_CLASSES)
    captions = " ".join(world.generate("train", 1000, seed=0).captions)
    for concept in world.NEAR_OOD_CLASSES + ("scribble", "background"):
        assert concept in captions


def test_far_ood_scenes_have_no_shape():
    data = world.generate("ood-far", 200, seed=0)
    bare = data.labels == world.FAR_OOD_KINDS.index("background")
    assert bare.any() and (~bare).any()
    assert np.all(data.radii == 0) and np.all(data.colours[bare] == -1)


def test_spurious_splits_use_the_right_backgrounds():
    common_of = np.array([world.BACKGROUNDS.index(world.COMMON_BACKGROUND[name]) for name in world.ID_CLASSES])
    common = world.generate("spurious-common", 500, seed=0)
    counter = world.generate("spurious-counter", 500, seed=0)
    assert np.array_equal(common.backgrounds, common_of[common.labels])
    assert np.all(counter.backgrounds != common_of[counter.labels])
    assert len(np.unique(counter.backgrounds)) == len(world.BACKGROUNDS)
    id_test = world.generate("id-test", 1000, seed=0)
    share = np.mean(id_test.backgrounds == common_of[id_test.labels])
    assert abs(share - world.COMMON_BACKGROUND_PROB) < 0.04


def test_generation_is_fast():
    started = time.perf_counter()
    world.generate("train", 2000, seed=7)
    assert time.perf_counter() - started < 2.0


def test_toy_shifts_are_seeded_corruptions_of_the_id_split():
    from qbench.engine.corruptions import CorruptedImages

    request = DatasetRequest(seed=0)
    clean = plugin.toy_dataset("toy-id-test", "id-test", request)
    shifted = plugin.shifted_dataset("gaussian_noise", request)
    assert isinstance(shifted, CorruptedImages) and shifted.follow_model
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = shifted.array(3)
    assert np.array_equal(np.random.get_state()[1], before)
    assert np.array_equal(first, plugin.shifted_dataset("gaussian_noise", request).array(3))
    assert not np.array_equal(first, plugin.shifted_dataset("gaussian_noise", DatasetRequest(seed=1)).array(3))
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert not np.array_equal(first, np.asarray(clean.image(3)))
    assert np.array_equal(shifted.labels, clean.labels)


# -- qbench datasets and proxy -----------------------------------------------------------------------------
EXPECTED_ROLES = {
    "toy-id-test": "id", "toy-ood-near": "ood", "toy-ood-far": "ood",
    "toy-spurious-common": "spurious", "toy-spurious-counter": "spurious",
    "toy-shift-gaussian_noise": "shift", "toy-shift-defocus_blur": "shift",
    "toy-shift-brightness": "shift", "toy-shift-contrast": "shift",
}


def test_dataset_specs_and_loaders():
    specs = {spec.name: spec for spec in plugin.qbench_register_datasets()}
    assert {name: spec.role for name, spec in specs.items()} == EXPECTED_ROLES
    request = DatasetRequest(seed=0)
    loaded = {name: spec.loader(request) for name, spec in specs.items()}
    id_test = loaded["toy-id-test"]
    for name, data in loaded.items():
        assert isinstance(data, LabeledImages) and data.name == name and len(data) == plugin.EVAL_IMAGES
        assert data.classnames == world.ID_CLASSES and data.templates == world.TEMPLATES
        assert data.image(0).size == (world.IMAGE_SIZE, world.IMAGE_SIZE) and data.image(0).mode == "RGB"
        if specs[name].role == "ood":
            assert np.all(data.labels == -1)
        else:
            assert data.labels.min() >= 0 and data.labels.max() < ID_K
        if specs[name].role == "shift":
            assert np.array_equal(data.labels, id_test.labels)
            shifted_pixels = np.stack([data.array(index) for index in range(20)])
            assert (shifted_pixels != id_test.images[:20]).mean() > 0.2
    assert len({data.fingerprint for data in loaded.values()}) == len(loaded)
    assert specs["toy-shift-contrast"].loader(request).fingerprint == loaded["toy-shift-contrast"].fingerprint
    assert specs["toy-id-test"].loader(DatasetRequest(seed=1)).fingerprint != id_test.fingerprint


def test_proxy_windows_are_disjoint_and_reproducible():
    (spec,) = plugin.qbench_register_proxies()
    assert spec.name == "toy-proxy"
    zero, one = spec.loader(DatasetRequest(seed=0), 200), spec.loader(DatasetRequest(seed=1), 200)
    assert isinstance(zero, ProxyPairs) and len(zero.images) == len(zero.captions) == 200
    assert zero.images[0].size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
    assert spec.loader(DatasetRequest(seed=0), 200).fingerprint == zero.fingerprint
    assert zero.fingerprint != one.fingerprint and len(zero.fingerprint) == 16
    hashes = lambda pairs: {hashlib.sha256(image.tobytes()).hexdigest() for image in pairs.images}  # noqa: E731
    assert not hashes(zero) & hashes(one)
    stream = world.stream_window("proxy", 0, 0, 400)
    assert np.array_equal(np.asarray(one.images[0]), stream.images[200]) and one.captions == stream.captions[200:]
    assert not hashes(zero) & {hashlib.sha256(image.tobytes()).hexdigest() for image in world.generate("id-test", 1000).images}


# -- the shipped model ------------------------------------------------------------------------------------------
def test_model_spec():
    spec, outliers = plugin.qbench_register_models()
    assert (spec.name, spec.family, spec.arch) == ("toy-clip", "clip", "qbench-toy-vit")
    assert (outliers.name, outliers.arch) == ("toy-clip-outliers", "qbench-toy-vit")
    assert outliers.weights_tag.startswith(spec.weights_tag) and outliers.weights_tag != spec.weights_tag
    assert "siglip" not in (spec.name + spec.arch).lower()
    digest = hashlib.sha256(plugin.WEIGHTS_PATH.read_bytes()).hexdigest()
    assert spec.weights_tag == f"toy-v1-{digest[:12]}"
    assert spec.weights_available() and "Radford" in spec.citation and "Ilharco" in spec.citation
    assert plugin.WEIGHTS_PATH.stat().st_size <= 16 * 10**6


@pytest.fixture(scope="module")
def toy_clip():
    from qbench.model import LoadRequest

    return plugin.load_toy_clip(LoadRequest())


def test_shipped_model_zero_shot_accuracy(toy_clip):
    """Regression guard for the shipped weights: template-averaged zero-shot top-1 on toy-id-test."""
    import torch

    data = plugin.toy_dataset("toy-id-test", "id-test", DatasetRequest(seed=0))
    assert len(data) == 1000
    head = toy_clip.zero_shot_head(data.classnames, data.templates)
    with torch.no_grad():
        pixels = torch.stack([toy_clip.preprocess(data.image(i)) for i in range(len(data))])
        features = toy_clip.encode_image(pixels).float()
    predictions = (features @ head.T).argmax(dim=1).numpy()
    accuracy = float(np.mean(predictions == data.labels))
    assert accuracy >= 0.8, f"toy-clip zero-shot accuracy {accuracy:.3f} < 0.8; retrain with scripts/train_toy.py"
    assert len(toy_clip.tokenize(["a photo of a circle."])[0]) == 20


def test_model_inventory(toy_clip):
    assert toy_clip.name == "toy-clip" and 1.0 < toy_clip.logit_scale <= 100.0 and toy_clip.logit_bias is None
    visual = [name for name, _ in toy_clip.quantizable_modules(["visual"])]
    text = [name for name, _ in toy_clip.quantizable_modules(["text"])]
    assert visual and text and all(name.startswith("visual.") for name in visual)


def test_missing_weights_is_one_line_error(tmp_path):
    from qbench.model import LoadRequest

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(QbenchError) as error:
        plugin.load_toy_clip(LoadRequest(weights=str(missing)))
    message = str(error.value)
    assert str(missing) in message and "\n" not in message and "--weights" in message


def test_corrupt_weights_is_one_line_error(tmp_path):
    from qbench.model import LoadRequest

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(QbenchError) as error:
        plugin.load_toy_clip(LoadRequest(weights=str(broken)))
    assert str(broken) in str(error.value) and "\n" not in str(error.value)


def test_config_registration_is_idempotent():
    import open_clip

    plugin.register_model_config()
    plugin.register_model_config()
    assert plugin.ARCH in open_clip.list_models()


def test_import_is_lazy():
    code = "import sys, qbench_plugins.toyworld.plugin; print('open_clip' in sys.modules, 'torch' in sys.modules)"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert completed.stdout.split() == ["False", "False"], completed.stderr
