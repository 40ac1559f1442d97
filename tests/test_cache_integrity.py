"""Integrity of what is read back from the caches: feature and prompt-embedding entries, JSON entries (the
dropout probe) and the corrupted-pixel cache carry their key and a checksum verified on every read. Flipped
bytes, truncation, an entry swapped under another key, NaN values or a reversed ``kept`` index are detected,
removed with one warning line and recomputed, so the metrics equal a clean run's; ``eval --force``
recomputes cached features too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_runner import run_cli
from qbench.engine import corruptions as C
from qbench.engine.evaluate import EvalRequest, Progress, resolve, run
from qbench.engine.features import ENTRY_DIGEST, ENTRY_FORMAT, ENTRY_FORMAT_KEY, ENTRY_KEY, EncodeCounter, FeatureCache
from qbench.engine.integrity import tensors_digest
from qbench.registry import build_registry

pytestmark = pytest.mark.usefixtures("single_thread")
LIMIT = 100


class Recorder(Progress):
    """A silent progress that keeps every log line."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)

    def warnings(self) -> list[str]:
        return [line for line in self.lines if line.startswith("warning: cache entry")]


# -- helpers: find, damage and forge entries -------------------------------------------------------
def entries(root: Path) -> dict[Path, tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """Every tensor entry of a feature cache: its tensors and metadata by path."""
    from safetensors import safe_open

    found = {}
    for path in sorted(root.glob("??/*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            found[path] = ({name: handle.get_tensor(name) for name in handle.keys()}, dict(handle.metadata() or {}))
    return found


def image_entries(root: Path) -> list[Path]:
    return [path for path, (tensors, _) in entries(root).items() if "kept" in tensors and "unreadable" in tensors]


def text_entries(root: Path) -> list[Path]:
    return [path for path, (tensors, _) in entries(root).items() if set(tensors) == {"features"}]


def forge(path: Path, change) -> None:
    """Rewrite an entry with ``change(tensors)`` applied and its checksum recomputed (a consistent forgery)."""
    tensors = load_file(str(path))
    key = path.stem
    change(tensors)
    tensors = {name: value.contiguous() for name, value in tensors.items()}
    save_file(tensors, str(path), metadata={ENTRY_FORMAT_KEY: ENTRY_FORMAT, ENTRY_KEY: key,
                                            ENTRY_DIGEST: tensors_digest(tensors, bind=f"{ENTRY_FORMAT}\0{key}")})


def flip_data_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start + (len(raw) - start) // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 64])


def swap(first: Path, second: Path) -> None:
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)


def set_nan(tensors):
    tensors["features"][0, 0] = float("nan")


def reverse_kept(tensors):
    tensors["kept"] = tensors["kept"].flip(0)


# -- the evaluation end to end --------------------------------------------------------------------
def evaluate(cache: Path, progress: Progress | None = None, **overrides):
    request = EvalRequest(suites=("toy-id",), cache_dir=str(cache), limit=LIMIT, proxy_n=100, **overrides)
    counter = EncodeCounter()
    document = run(resolve(request, build_registry()), progress=progress, counter=counter)
    return document, counter


def metrics(document) -> list[tuple]:
    return [(record["metric"], record.get("dataset"), record["fp32"], record["quantized"]) for record in document["results"]]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A clean run's metrics and the feature cache it left (copied by each test before damaging it)."""
    folder = tmp_path_factory.mktemp("clean") / "features"
    document, counter = evaluate(folder)
    assert counter.images["fp32"] == counter.images["quantized"] == LIMIT
    return metrics(document), folder


def damaged_copy(clean, tmp_path) -> Path:
    _, folder = clean
    copy = tmp_path / "features"
    shutil.copytree(folder, copy)
    return copy


DAMAGES = {
    "flipped-byte": (lambda root: [flip_data_byte(path) for path in image_entries(root)], "fails its checksum"),
    "truncated": (lambda root: [truncate(path) for path in image_entries(root)], "unreadable"),
    "swapped": (lambda root: swap(*image_entries(root)), "another key"),
    "nan": (lambda root: forge(image_entries(root)[0], set_nan), "NaN"),
    "reversed-kept": (lambda root: forge(image_entries(root)[0], reverse_kept), "out of order"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_feature_entries_are_recomputed_with_one_warning(damage, clean, tmp_path):
    expected, _ = clean
    root = damaged_copy(clean, tmp_path)
    assert len(image_entries(root)) == 2  # the FP32 and the quantized features of toy-id-test
    apply, reason = DAMAGES[damage]
    apply(root)
    progress = Recorder()
    document, counter = evaluate(root, progress)
    assert metrics(document) == expected  # never a silent change
    warnings = progress.warnings()
    assert warnings and all(reason in line and "recomputing" in line and "\n" not in line for line in warnings)
    assert sum(counter.images.values()) >= LIMIT  # the damaged features were encoded again
    for path, (tensors, metadata) in entries(root).items():  # the cache holds sound entries again
        assert metadata[ENTRY_KEY] == path.stem and tensors_digest(tensors, bind=f"{ENTRY_FORMAT}\0{path.stem}") == metadata[ENTRY_DIGEST]


def test_a_damaged_prompt_embedding_entry_is_recomputed(clean, tmp_path):
    expected, _ = clean
    root = damaged_copy(clean, tmp_path)
    texts = text_entries(root)
    assert texts
    for path in texts:
        flip_data_byte(path)
    progress = Recorder()
    document, counter = evaluate(root, progress)
    assert metrics(document) == expected
    assert len(progress.warnings()) == len(texts) and counter.texts["fp32"] > 0 and counter.images == {}


def test_entries_without_a_checksum_count_as_missing(clean, tmp_path):
    """Entries of qbench versions before checksums are recomputed silently and overwritten with checksums."""
    expected, _ = clean
    root = damaged_copy(clean, tmp_path)
    for path, (tensors, _) in entries(root).items():
        save_file(tensors, str(path))  # the same tensors, no metadata
    progress = Recorder()
    document, counter = evaluate(root, progress)
    assert metrics(document) == expected and progress.warnings() == []
    assert counter.images == {"fp32": LIMIT, "quantized": LIMIT}
    assert all(ENTRY_DIGEST in metadata for _, metadata in entries(root).values())


def test_refresh_ignores_sound_entries_and_overwrites_forged_ones(clean, tmp_path):
    """A consistent forgery passes every check, so only a refresh (``--force``) replaces it; the forged run differs."""
    expected, _ = clean
    root = damaged_copy(clean, tmp_path)
    for path in image_entries(root):
        forge(path, lambda tensors: tensors.update(features=tensors["features"].flip(0)))
    forged, _ = evaluate(root)
    assert metrics(forged) != expected  # the forgery is read back as valid: it would change the metrics
    document, counter = evaluate(root, refresh_cache=True)
    assert metrics(document) == expected
    assert counter.images == {"fp32": LIMIT, "quantized": LIMIT} and counter.cache_hits["fp32"] == 0
    again, counter = evaluate(root)
    assert metrics(again) == expected and counter.images == {}


def test_eval_force_recomputes_the_feature_cache(tmp_path, capsys):
    cache = tmp_path / "features"
    args = ("eval", "--suite", "toy-id", "--limit", str(LIMIT), "--proxy-n", "100", "--cache-dir", str(cache), "--json")
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    expected = metrics(json.loads(out))
    originals = {path: load_file(str(path))["features"] for path in image_entries(cache)}
    for path in originals:
        forge(path, lambda tensors: tensors.update(features=-tensors["features"]))
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and "served from the store" in " ".join(err.split())
    code, out, err = run_cli(capsys, *args, "--force")
    assert code == 0, err
    assert metrics(json.loads(out)) == expected  # a forced run read the forged entries would differ
    assert all(torch.equal(load_file(str(path))["features"], features) for path, features in originals.items())


# -- FeatureCache on its own -----------------------------------------------------------------------
def test_round_trip_and_every_damage_on_the_cache_itself(tmp_path):
    lines: list[str] = []
    cache = FeatureCache(tmp_path, log=lines.append)
    tensors = {"features": torch.randn(4, 3), "kept": torch.arange(4), "unreadable": torch.zeros(0, dtype=torch.int64)}
    cache.put("a" * 32, tensors)
    cache.put("b" * 32, {"features": torch.randn(2, 3)})
    got = cache.get("a" * 32)
    assert got is not None and all(torch.equal(got[name], tensors[name]) for name in tensors)
    assert lines == []
    swap(cache._path("a" * 32), cache._path("b" * 32))
    assert cache.get("a" * 32) is None and cache.get("b" * 32) is None
    assert len(lines) == 2 and all("another key" in line for line in lines)
    assert not cache._path("a" * 32).exists()  # removed, so the next writer replaces it
    cache.put("c" * 32, {"features": torch.tensor([1.0, float("inf")])})
    assert not cache._path("c" * 32).exists() and "not cached" in lines[-1]


def test_json_entries_carry_their_key_and_checksum(tmp_path):
    lines: list[str] = []
    cache = FeatureCache(tmp_path, log=lines.append)
    value = {"records": [{"metric": "acc", "value": 0.5}], "section": {"rates": [0.1, 0.2]}}
    cache.put_json("k1", value)
    cache.put_json("k2", {"records": [], "section": {}})
    assert cache.get_json("k1") == value and lines == []
    path = cache._json_path("k1")
    wrapper = json.loads(path.read_text())
    wrapper["value"]["records"][0]["value"] = 0.99  # an edited number, checksum left as it was
    path.write_text(json.dumps(wrapper))
    assert cache.get_json("k1") is None and "fails its checksum" in lines[-1] and not path.exists()
    shutil.copy(cache._json_path("k2"), path)
    assert cache.get_json("k1") is None and "another key" in lines[-1]
    path.write_text('{"records": [], "section"')  # truncated
    assert cache.get_json("k1") is None and "unreadable" in lines[-1]
    path.write_text(json.dumps(value))  # written before checksums: missing, silently
    count = len(lines)
    assert cache.get_json("k1") is None and len(lines) == count
    assert all("\n" not in line for line in lines)


def test_refresh_reads_only_what_this_process_wrote(tmp_path):
    FeatureCache(tmp_path).put_json("old", [1])
    FeatureCache(tmp_path).put("d" * 32, {"features": torch.ones(1, 2)})
    import qbench.engine.features as F

    F._WRITTEN.clear()  # as in a new process
    refreshing = FeatureCache(tmp_path, refresh=True)
    assert refreshing.get_json("old") is None and refreshing.get("d" * 32) is None
    refreshing.put_json("old", [2])
    assert refreshing.get_json("old") == [2] and FeatureCache(tmp_path).get("d" * 32) is not None


# -- the corrupted-pixel cache ---------------------------------------------------------------------
@pytest.fixture
def pixel_split(tmp_path):
    from qbench.data import ArrayImages

    rng = np.random.default_rng(0)
    base = ArrayImages("base", rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), np.array([0, 1, 0]), ("a", "b"), ("{}",))
    split = C.CorruptedImages(base, "gaussian_noise", 3, 0, size=40).with_pixel_cache(tmp_path)
    clean = [split.array(index) for index in range(3)]
    return split, clean, tmp_path / split.fingerprint


def pixel_damages():
    def flip(folder):
        flip_data_byte(folder / "0000001.safetensors")

    def cut(folder):
        truncate(folder / "0000001.safetensors")

    def swapped(folder):
        swap(folder / "0000001.safetensors", folder / "0000002.safetensors")

    return {"flipped-byte": (flip, "fails its checksum"), "truncated": (cut, "unreadable"),
            "swapped": (swapped, "another key")}


@pytest.mark.parametrize("damage", sorted(pixel_damages()))
def test_damaged_pixel_entries_are_corrupted_again_with_one_warning(damage, pixel_split, capsys):
    split, clean, folder = pixel_split
    apply, reason = pixel_damages()[damage]
    apply(folder)
    capsys.readouterr()
    again = [split.array(index) for index in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(again, clean))
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and all(line.startswith("qbench: warning: corrupted-image cache entry") and reason in line for line in lines)
    capsys.readouterr()
    assert all(np.array_equal(split.array(index), clean[index]) for index in range(3))  # rewritten sound
    assert capsys.readouterr().err == ""
