"""Compute once: each image passes through each encoder state once per run, each prompt set once per
text-encoder state, and a second run of the same checkpoint is served from the on-disk feature cache."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qbench.data import ArrayImages, DatasetRequest, UnreadableImage
from qbench.errors import QbenchError
from qbench.engine.evaluate import EvalRequest, resolve, run
from qbench.engine.features import EncodeCounter, FeatureCache, encode_dataset, tower_fingerprint
from qbench.registry import build_registry

SCORERS = ("msp", "mcm")
REFERENCE_MCM = (("mcm", "prompt_mode", "reference"),)


LIMIT = 200  # images per split: every property below is about counts, not accuracy


def run_counted(tmp_path, **overrides):
    request = EvalRequest(suites=("toy-ood",), scorers=SCORERS, scorer_params=REFERENCE_MCM,
                          cache_dir=str(tmp_path / "features"), limit=LIMIT, proxy_n=100, **overrides)
    counter = EncodeCounter()
    document = run(resolve(request, build_registry()), counter=counter)
    return document, counter


@pytest.fixture(scope="module")
def first_and_second(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    first = run_counted(folder)
    second = run_counted(folder)
    return first, second


def test_every_image_is_encoded_once_per_state(first_and_second):
    (document, counter), _ = first_and_second
    total = sum(info["num_images"] for info in document["datasets"].values())
    assert total == 3 * LIMIT  # toy-id-test shared by both pairs, plus the near and far OOD splits
    assert counter.images == {"fp32": total, "quantized": total}


def test_visual_scope_encodes_each_prompt_set_once(first_and_second):
    (document, counter), _ = first_and_second
    id_split = build_registry().get("datasets", "toy-id-test").loader(DatasetRequest())
    prints = document["encoder_calls"]["state_fingerprints"]["text"]
    assert prints["fp32"] == prints["quantized"]  # the text tower is untouched in visual scope
    assert set(counter.texts) == {"fp32"}
    plans = document["scorers"]["mcm"]["plans"]
    assert len(plans) == 1  # one reference-prompt set, shared by the near and the far pair
    n_classes, n_templates = len(id_split.classnames), len(id_split.templates)
    # the ensemble classifier (every class x template) plus one reference prompt per class, each once
    assert counter.texts["fp32"] == n_classes * n_templates + n_classes


def test_second_run_skips_every_forward_pass_and_reproduces_the_results(first_and_second):
    (first, _), (second, counter) = first_and_second
    assert counter.images == {} and counter.texts == {}
    assert counter.cache_hits["fp32"] == 3 and counter.cache_hits["quantized"] == 3
    assert [record["quantized"] for record in second["results"]] == [record["quantized"] for record in first["results"]]
    assert len(first["results"]) == 3 + len(SCORERS) * 2 * 4  # zero-shot + scorers x pairs x metrics


def test_a_different_quantizer_state_is_a_cache_miss(tmp_path):
    run_counted(tmp_path)
    _, counter = run_counted(tmp_path, bits="w4a8")
    assert "fp32" not in counter.images  # FP32 features come from the cache
    assert counter.images["quantized"] == 3 * LIMIT  # new quantizer state: encoded again


def test_joint_scope_encodes_prompts_with_both_text_towers(tmp_path):
    document, counter = run_counted(tmp_path, scope="joint")
    prints = document["encoder_calls"]["state_fingerprints"]["text"]
    assert prints["fp32"] != prints["quantized"]
    assert counter.texts["fp32"] == counter.texts["quantized"] > 0


class OneBrokenImage(ArrayImages):
    """A split whose image 1 cannot be decoded, as a truncated file would behave."""

    def image(self, index: int) -> Image.Image:
        if index == 1:
            raise UnreadableImage(f"/data/{index}.jpg", "image file is truncated")
        return super().image(index)


def toy_states():
    from qbench_plugins.toyworld.plugin import load_toy_clip
    from qbench.model import LoadRequest

    model = load_toy_clip(LoadRequest())
    return {"fp32": model}


class Silent:
    def log(self, message):
        pass

    def track(self, items, description):
        return iter(items)


def test_unreadable_images_are_counted_and_dropped_not_fatal():
    states = toy_states()
    images = np.random.default_rng(0).integers(0, 255, size=(4, 32, 32, 3), dtype=np.uint8)
    dataset = OneBrokenImage("broken", images, [0, 1, 2, 3], ["a", "b", "c", "d"], ["{}"])
    prints = {"fp32": tower_fingerprint(states["fp32"], "visual")}
    split = encode_dataset(dataset, states, prints, 2, FeatureCache(None), Silent(), EncodeCounter())
    assert split.kept.tolist() == [0, 2, 3]
    assert split.by_state["fp32"].shape[0] == 3
    assert len(split.unreadable) == 1 and "truncated" in split.unreadable[0]


def test_a_split_with_no_readable_image_is_one_clear_error():
    states = toy_states()

    class NothingReadable(ArrayImages):
        def image(self, index):
            raise UnreadableImage(f"/data/{index}.jpg", "not an image")

    dataset = NothingReadable("empty", np.zeros((2, 8, 8, 3), np.uint8), [0, 1], ["a", "b"], ["{}"])
    with pytest.raises(QbenchError, match="no image could be read"):
        encode_dataset(dataset, states, {"fp32": "x"}, 2, FeatureCache(None), Silent(), EncodeCounter())
