"""Batch size and workers: automatic choices, overrides, parallel decoding that changes nothing, and the
out-of-memory retry that halves the batch without losing or changing results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cli_runner import run_cli
from qbench.engine import batching
from qbench.engine.batching import AdaptiveBatch, auto_batch_size, auto_workers, parse_count, per_image_bytes, plan_batching
from qbench.data import ArrayImages, UnreadableImage
from qbench.errors import QbenchError
from qbench.engine.evaluate import EvalRequest, resolve, run
from qbench.engine.features import EncodeCounter, FeatureCache, PreprocessedImages, TextEncoder, encode_dataset, encode_datasets, image_batches, tower_fingerprint
from qbench.registry import build_registry

pytestmark = pytest.mark.usefixtures("single_thread")

UNREADABLE = {1, 8, 9, 10, 11, 12, 13, 14, 15, 30}  # includes one whole batch of 8 (indices 8-15)


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)

    def track(self, items, description):
        return iter(items)


class SomeUnreadable(ArrayImages):
    """A split whose images in :data:`UNREADABLE` fail to decode, as truncated files do."""

    def image(self, index: int) -> Image.Image:
        if index in UNREADABLE:
            raise UnreadableImage(f"/data/{index}.jpg", "image file is truncated")
        return super().image(index)


class BrokenRoot(ArrayImages):
    """A split whose image 5 raises a user error (as a loader that finds its root gone would)."""

    def image(self, index: int) -> Image.Image:
        if index == 5:
            raise QbenchError("dataset 'broken': its root /data vanished; mount it again")
        return super().image(index)


@pytest.fixture(scope="module")
def toy():
    from qbench_plugins.toyworld.plugin import load_toy_clip
    from qbench.model import LoadRequest

    return load_toy_clip(LoadRequest()).eval()


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=(n, 32, 32, 3), dtype=np.uint8)


def encode(model, dataset, batch_size=8, workers=0, encoder=None, log=None, counter=None):
    states = {"fp32": model}
    prints = {"fp32": tower_fingerprint(model, "visual")}
    return encode_dataset(dataset, states, prints, batch_size, FeatureCache(None), log or Log(), counter or EncodeCounter(),
                          workers=workers, encoder=encoder)


def fail_above(model, monkeypatch, limit: int, error: type[Exception] = torch.cuda.OutOfMemoryError,
               message: str = "CUDA out of memory. Tried to allocate 2.00 GiB") -> list[int]:
    """Make ``model.encode_image`` fail for batches above ``limit``; returns the sizes it encoded."""
    original = model.encode_image
    encoded: list[int] = []

    def encode_image(pixels):
        if len(pixels) > limit:
            raise error(message)
        encoded.append(len(pixels))
        return original(pixels)

    monkeypatch.setattr(model, "encode_image", encode_image)
    return encoded


# -- automatic choices -------------------------------------------------------------------------------
def test_cpu_batch_is_a_power_of_two_within_the_cpu_range():
    one = per_image_bytes((3, 224, 224))
    assert auto_batch_size("cpu", (3, 224, 224), free_bytes=one) == batching.CPU_BATCH_RANGE[0]
    assert auto_batch_size("cpu", (3, 224, 224), free_bytes=10**15) == batching.CPU_BATCH_RANGE[1]
    middle = auto_batch_size("cpu", (3, 224, 224), free_bytes=int(100 * one / batching.CPU_MEMORY_FRACTION))
    assert middle == 64  # 100 images fit: the largest power of two below


def test_cuda_batch_follows_free_gpu_memory(monkeypatch):
    one = per_image_bytes((3, 224, 224))
    calls = []

    def mem_get_info(device):
        calls.append(str(device))
        return int(40 * one / batching.CUDA_MEMORY_FRACTION), 80 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    assert auto_batch_size("cuda:1", (3, 224, 224)) == 32
    assert calls == ["cuda:1"]
    assert auto_batch_size("cuda", (3, 224, 224), free_bytes=one // 4) == 1  # nearly full: one at a time, not zero
    assert auto_batch_size("cuda", (3, 336, 336), free_bytes=10**11) < auto_batch_size("cuda", (3, 224, 224), free_bytes=10**11)


@pytest.mark.parametrize("cpus, device, expected", [(1, "cpu", 0), (2, "cuda", 0), (4, "cpu", 2), (4, "cuda", 3),
                                                    (16, "cpu", 8), (64, "cuda", batching.MAX_WORKERS)])
def test_workers_follow_the_usable_cores(cpus, device, expected):
    assert auto_workers(device, cpus=cpus) == expected


def test_plan_records_where_each_value_came_from(toy):
    chosen = plan_batching("cpu", None, None, (3, 32, 32))
    assert chosen.batch_source.startswith("auto: ") and "RAM" in chosen.batch_source
    assert chosen.workers == auto_workers("cpu") and chosen.workers_source.startswith("auto: ")
    given = plan_batching("cpu", 12, 3)
    assert (given.batch_size, given.workers, given.batch_source, given.workers_source) == (12, 3, "--batch-size", "--workers")
    assert "batch size 12" in given.describe() and "3 data-loader workers" in given.describe()


@pytest.mark.parametrize("value, minimum, expected", [("auto", 1, None), ("AUTO", 0, None), (None, 1, None), ("8", 1, 8),
                                                      (8, 1, 8), ("0", 0, 0)])
def test_counts_parse(value, minimum, expected):
    assert parse_count(value, "--workers", minimum, 4) == expected


@pytest.mark.parametrize("command", [["eval"], ["quantize", "--out", "unused-checkpoint"]])
@pytest.mark.parametrize("args", [["--batch-size", "0"], ["--batch-size", "-3"], ["--batch-size", "abc"],
                                  ["--batch-size", "2.5"], ["--workers", "-3"], ["--workers", "abc"]])
def test_bad_counts_are_one_line_naming_the_fix(capsys, command, args):
    code, out, err = run_cli(capsys, *command, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith(f"qbench: bad {args[0]} '{args[1]}'") and "'auto'" in lines[0] and f"e.g. {args[0]} " in lines[0]
    assert "loaded model" not in err


def test_batch_size_and_workers_stay_out_of_the_config_hash():
    registry = build_registry()
    default = resolve(EvalRequest(), registry).config
    chosen = resolve(EvalRequest(batch_size=7, workers=3), registry).config
    assert chosen["config_hash"] == default["config_hash"]
    assert not {"batch_size", "workers"} & set(chosen)


def test_a_run_prints_and_records_its_batching_once(tmp_path):
    log = Log()
    request = EvalRequest(batch_size=16, workers=0, limit=40, proxy_n=40, cache_dir=str(tmp_path))
    document = run(resolve(request, build_registry()), log)
    recorded = document["provenance"]["batching"]
    assert (recorded["batch_size"], recorded["workers"], recorded["batch_source"]) == (16, 0, "--batch-size")
    assert recorded["image_encode_batch"] == {"initial": 16, "final": 16, "oom_retries": 0, "numeric_batch": 128}
    assert sum("data-loader workers" in line for line in log.lines) == 1


# -- parallel decoding ---------------------------------------------------------------------------------
def test_workers_change_neither_kept_images_nor_features(toy):
    dataset = SomeUnreadable("some-unreadable", images(40), list(range(40)), [str(i) for i in range(40)], ["{}"])
    serial = encode(toy, dataset, workers=0)
    parallel = encode(toy, dataset, workers=2)
    assert serial.kept.tolist() == [index for index in range(40) if index not in UNREADABLE]
    assert parallel.kept.tolist() == serial.kept.tolist()
    assert parallel.unreadable == serial.unreadable and len(serial.unreadable) == len(UNREADABLE)
    assert torch.equal(parallel.by_state["fp32"], serial.by_state["fp32"])


def test_a_user_error_in_a_worker_stays_one_line(toy):
    dataset = BrokenRoot("broken", images(24), list(range(24)), [str(i) for i in range(24)], ["{}"])
    with pytest.raises(QbenchError) as raised:
        encode(toy, dataset, workers=2)
    assert str(raised.value) == "dataset 'broken': its root /data vanished; mount it again"


def test_no_more_workers_than_batches(toy):
    dataset = ArrayImages("small", images(20), [0] * 20, ["a"], ["{}"])
    source = PreprocessedImages(dataset.image, len(dataset), toy.preprocess)
    assert image_batches(source, 32, 4).num_workers == 0  # one batch: nothing to overlap
    assert image_batches(source, 10, 4).num_workers == 2  # two batches: two workers, not four
    assert image_batches(source, 8, 0).num_workers == 0


# -- out-of-memory retry ---------------------------------------------------------------------------------
@pytest.mark.parametrize("error, message", [(torch.cuda.OutOfMemoryError, "CUDA out of memory. Tried to allocate 2.00 GiB"),
                                            (RuntimeError, "CUDA error: out of memory")])
def test_out_of_memory_halves_the_batch_and_keeps_the_results(toy, monkeypatch, error, message):
    dataset = ArrayImages("oom", images(40, seed=1), list(range(40)), [str(i) for i in range(40)], ["{}"])
    expected = encode(toy, dataset, batch_size=16).by_state["fp32"]
    assert torch.equal(encode(toy, dataset, batch_size=4).by_state["fp32"], expected)  # fixed-shape passes
    encoded = fail_above(toy, monkeypatch, 4, error, message)
    log, counter = Log(), EncodeCounter()
    split = encode(toy, dataset, batch_size=16, log=log, counter=counter)
    torch.testing.assert_close(split.by_state["fp32"], expected, rtol=0, atol=1e-6)  # smaller passes: last bits may move
    assert sum(encoded) == 40 and max(encoded) == 4  # passes of 32 and 8 (no padding), no image twice
    assert counter.images["fp32"] == 40  # what the tower ran: the failed attempts do not count
    retries = [line for line in log.lines if "out of memory" in line]
    assert len(retries) == 3  # the 32-image pass -> 16 -> 8 -> 4, each new size said once
    assert [f"encoding {size} at a time" in line for size, line in zip((16, 8, 4), retries)] == [True] * 3


def test_the_reduced_batch_is_kept_for_the_rest_of_the_run(toy, monkeypatch):
    datasets = {name: ArrayImages(name, images(24, seed), [0] * 24, ["a"], ["{}"]) for seed, name in enumerate(("a", "b"))}
    encoded = fail_above(toy, monkeypatch, 8)
    log = Log()
    encoder = AdaptiveBatch(12, log)
    splits = encode_datasets(datasets, {"fp32": toy}, {"fp32": tower_fingerprint(toy, "visual")}, 12, FeatureCache(None),
                             log, EncodeCounter(), encoder=encoder)
    assert encoded == [6] * 8  # a's one 24-image pass (no padding) in 6s; dataset b starts at 6: no second failure
    assert encoder.to_dict() == {"initial": 12, "final": 6, "oom_retries": 2,
                                 "numeric_batch": batching.numeric_batch("cpu", (3, 32, 32))}
    assert len([line for line in log.lines if "out of memory" in line]) == 2  # 24 -> 12 -> 6
    assert all(len(split.kept) == 24 for split in splits.values())


def test_out_of_memory_at_batch_one_is_one_line(toy, monkeypatch):
    dataset = ArrayImages("oom", images(4), [0] * 4, ["a"], ["{}"])
    fail_above(toy, monkeypatch, 0)
    with pytest.raises(QbenchError) as raised:
        encode(toy, dataset, batch_size=4)
    message = str(raised.value)
    assert "\n" not in message and "--device cpu" in message and "--batch-size 4" in message


def test_other_runtime_errors_are_not_retried(toy, monkeypatch):
    dataset = ArrayImages("bug", images(8), [0] * 8, ["a"], ["{}"])
    encoded = fail_above(toy, monkeypatch, 2, RuntimeError, "mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        encode(toy, dataset, batch_size=8)
    assert encoded == []


def test_text_encoding_halves_on_out_of_memory(toy, monkeypatch):
    prompts = [f"a photo of a thing number {index}." for index in range(12)]

    def encoder(batch):
        return TextEncoder({"fp32": toy}, {"fp32": tower_fingerprint(toy, "text")}, FeatureCache(None), Log(),
                           EncodeCounter(), batch)

    expected = encoder(AdaptiveBatch(3)).encode("fp32", prompts)
    original, sizes = toy.encode_text, []

    def encode_text(tokens):
        if len(tokens) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        sizes.append(len(tokens))
        return original(tokens)

    monkeypatch.setattr(toy, "encode_text", encode_text)
    text = encoder(AdaptiveBatch(12))
    assert np.array_equal(text.encode("fp32", prompts), expected)
    assert text.batch.size == 3 and sum(sizes) == 12
