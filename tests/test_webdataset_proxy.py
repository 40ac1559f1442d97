"""WebDataset proxy sources (``suites.md`` §5, fixture §7): streaming, key rule, seed windows, errors, CLI."""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qbench.cli import main
from qbench.data import DatasetRequest
from qbench.errors import QbenchError
from qbench.plugins import get_plugin_manager
from qbench.registry import build_registry
from qbench_plugins.datasets.webdataset_proxy import SOURCES, load_webdataset_proxy, split_key

CC3M = next(source for source in SOURCES if source.name == "cc3m")


def image_bytes(index: int, fmt: str = "JPEG") -> bytes:
    """A tiny image whose colour encodes ``index`` (so windows can be told apart by pixels too)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (index * 20 % 256, 255 - index * 20 % 256, 90)).save(buffer, format=fmt)
    return buffer.getvalue()


def sample(index: int, *, caption: bool = True, image: bytes | None = None) -> list[tuple[str, bytes]]:
    """The members img2dataset writes for one sample: ``key.jpg``, ``key.txt``, ``key.json``."""
    key = f"{index:09d}"
    members = [(f"{key}.jpg", image_bytes(index) if image is None else image)]
    if caption:
        members.append((f"{key}.txt", f"  a photo number {index}\n".encode()))
    members.append((f"{key}.json", json.dumps({"key": key, "status": "success"}).encode()))
    return members


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_fixture(root: Path, folder: str = "cc3m") -> Path:
    """§7: two tars with 5 samples each, one missing its caption (#2), one with an undecodable image (#7)."""
    first = [member for index in range(5) for member in sample(index, caption=index != 2)]
    second = [member for index in range(5, 10) for member in sample(index, image=b"not an image" if index == 7 else None)]
    write_tar(root / folder / "000000.tar", first)
    write_tar(root / folder / "000001.tar", second)
    return root


VALID = [0, 1, 3, 4, 5, 6, 8, 9]  # stream order of the fixture's valid samples


def load(root: Path | None, n: int, seed: int = 0, source=CC3M):
    return load_webdataset_proxy(source, DatasetRequest(data_root=root, seed=seed), n)


def expected_fingerprint(indices: list[int]) -> str:
    lines = "".join(f"{'000000' if index < 5 else '000001'}.tar/{index:09d}\n" for index in indices)
    return hashlib.sha256(lines.encode()).hexdigest()


def one_line_error(call) -> str:
    with pytest.raises(QbenchError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_fixture_keeps_eight_valid_pairs_and_counts_two_skipped(tmp_path):
    pairs = load(write_fixture(tmp_path), 8)
    assert pairs.captions == tuple(f"a photo number {index}" for index in VALID)
    assert all(image.mode == "RGB" and image.size == (8, 8) for image in pairs.images)
    assert pairs.fingerprint == expected_fingerprint(VALID)
    assert pairs.source.startswith("cc3m ")
    for part in ("N=8", "seed=0", "2 invalid samples skipped", "1 no caption", "1 undecodable image", "2 of 2 shards"):
        assert part in pairs.source


def test_too_few_valid_pairs_is_one_line_with_the_count_and_the_fix(tmp_path):
    message = one_line_error(lambda: load(write_fixture(tmp_path), 9))
    for part in ("only 8 valid", "[0, 9)", "--proxy-n", "add shards", "2 invalid samples skipped"):
        assert part in message


def test_key_is_the_path_up_to_the_first_dot_of_the_basename():
    assert split_key("a/b.c.jpg") == ("a/b", "c.jpg")
    assert split_key("x.y/000001.txt") == ("x.y/000001", "txt")
    assert split_key("dir/._000001.jpg") is None  # macOS AppleDouble stub: ignored, as in WebDataset
    assert split_key("dir/README") is None


def test_dotted_extensions_group_under_their_key(tmp_path):
    write_tar(tmp_path / "cc3m" / "000000.tar", [
        ("a/b.c.jpg", image_bytes(1)), ("a/b.txt", b"first"),
        ("a/d.PNG", image_bytes(2, "PNG")), ("a/d.en.txt", b"second"),
        ("e.webp", image_bytes(3, "WEBP")), ("e.txt", b"third"),
    ])
    pairs = load(tmp_path, 3)
    assert pairs.captions == ("first", "second", "third")
    expected = hashlib.sha256(b"000000.tar/a/b\n000000.tar/a/d\n000000.tar/e\n").hexdigest()
    assert pairs.fingerprint == expected


def test_bad_captions_are_skipped_with_their_reason(tmp_path):
    write_tar(tmp_path / "cc3m" / "000000.tar", [
        ("k1.jpg", image_bytes(1)), ("k1.txt", b" \n\t"),
        ("k2.jpg", image_bytes(2)), ("k2.txt", b"\xff\xfe caption"),
        ("k3.txt", b"no image here"),
        ("k4.jpg", image_bytes(4)), ("k4.txt", b"kept"),
        ("k1.txt", b"not consecutive: a new sample k1 without image"),
    ])
    message = one_line_error(lambda: load(tmp_path, 2))
    for part in ("only 1 valid", "1 empty caption", "1 caption not UTF-8", "2 no image"):
        assert part in message
    assert load(tmp_path, 1).captions == ("kept",)


def test_seed_windows_are_disjoint_and_reproducible(tmp_path):
    root = write_fixture(tmp_path)
    first, second = load(root, 3, seed=0), load(root, 3, seed=1)
    assert first.captions == tuple(f"a photo number {index}" for index in VALID[:3])
    assert second.captions == tuple(f"a photo number {index}" for index in VALID[3:6])
    assert second.fingerprint == expected_fingerprint(VALID[3:6]) != first.fingerprint
    again = load(root, 3, seed=1)
    assert again.captions == second.captions and again.fingerprint == second.fingerprint
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(again.images, second.images))
    assert "stream positions [3, 6)" in second.source
    assert "[6, 9)" in one_line_error(lambda: load(root, 3, seed=2))


def test_reading_stops_once_the_window_is_full(tmp_path, monkeypatch):
    root = write_fixture(tmp_path)
    (root / "cc3m" / "000002.tar").write_bytes(b"corrupt beyond the window " * 40)
    opened: list[str] = []
    real_open = tarfile.open

    def spy(*args, **kwargs):
        name = kwargs["fileobj"].name if "fileobj" in kwargs else (args[0] if args else kwargs["name"])
        opened.append(Path(name).name)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(tarfile, "open", spy)
    pairs = load(root, 4)
    assert opened == ["000000.tar"] and "1 of 3 shards read" in pairs.source
    opened.clear()
    pairs = load(root, 8)
    assert opened == ["000000.tar", "000001.tar"] and "damaged" not in pairs.source
    opened.clear()
    message = one_line_error(lambda: load(root, 9))  # control: a window reaching it does open it and says so
    assert opened == ["000000.tar", "000001.tar", "000002.tar"]
    assert "damaged shards: 000002.tar" in message


def test_reading_stops_inside_a_shard_before_its_damaged_tail(tmp_path):
    shard = write_tar(tmp_path / "cc3m" / "000000.tar", [member for index in range(10) for member in sample(index)])
    raw = shard.read_bytes()
    shard.write_bytes(raw[: raw.index(b"000000008.txt") + 700])  # cut inside sample 8
    pairs = load(tmp_path, 4)
    assert "damaged" not in pairs.source and "no invalid samples" in pairs.source
    message = one_line_error(lambda: load(tmp_path, 9))
    assert "only 8 valid" in message and "1 cut by shard damage" in message and "000000.tar" in message


@pytest.mark.parametrize("cut", ["in member data", "at a header boundary", "not a tar"])
def test_damaged_shard_is_reported_and_the_stream_goes_on(tmp_path, cut):
    root = write_fixture(tmp_path)
    first = root / "cc3m" / "000000.tar"
    raw = first.read_bytes()
    header = raw.index(b"000000003.jpg")  # sample 3's first member header (a 512-byte block boundary)
    damaged = {"in member data": raw[: header + 600], "at a header boundary": raw[:header], "not a tar": b"<html>"}[cut]
    first.write_bytes(damaged)
    kept = {"in member data": [0, 1], "at a header boundary": [0, 1], "not a tar": []}[cut]
    later = [index for index in VALID if index >= 5]
    pairs = load(root, len(kept) + len(later))
    assert pairs.captions == tuple(f"a photo number {index}" for index in kept + later)
    assert "damaged shards: 000000.tar (" in pairs.source


def test_missing_data_root_folder_or_shards_is_one_line_naming_the_layout(tmp_path):
    message = one_line_error(lambda: load(None, 8))
    assert "--data-root DIR" in message and "QBENCH_DATA" in message and "cc3m/000000.tar" in message
    message = one_line_error(lambda: load(tmp_path / "absent", 8))
    assert "does not exist" in message and "img2dataset" in message
    message = one_line_error(lambda: load(tmp_path, 8))
    for part in (str(tmp_path / "cc3m"), "cc3m/000000.tar", "key.jpg + key.txt", "img2dataset", "--data-root DIR", "QBENCH_DATA"):
        assert part in message
    (tmp_path / "cc3m").mkdir()
    (tmp_path / "cc3m" / "000000.parquet").write_bytes(b"metadata, not a shard")
    assert "no *.tar shards" in one_line_error(lambda: load(tmp_path, 8))


def test_bad_size_or_seed_is_one_line(tmp_path):
    root = write_fixture(tmp_path)
    assert "bad proxy size 0" in one_line_error(lambda: load(root, 0))
    assert "bad seed -1" in one_line_error(lambda: load(root, 2, seed=-1))


def test_fingerprint_follows_content_not_location(tmp_path):
    reference = load(write_fixture(tmp_path / "a"), 8).fingerprint
    assert load(write_fixture(tmp_path / "b"), 8).fingerprint == reference  # another root, same shards
    changed = write_fixture(tmp_path / "c")
    write_tar(changed / "cc3m" / "000000.tar", [member for index in range(5) for member in sample(index)])  # caption back
    assert load(changed, 8).fingerprint == expected_fingerprint([0, 1, 2, 3, 4, 5, 6, 8]) != reference


def test_every_source_reads_its_own_folder(tmp_path):
    root = write_fixture(tmp_path, folder="sbu")
    sbu = next(source for source in SOURCES if source.name == "sbu")
    assert load(root, 8, source=sbu).source.startswith("sbu (WebDataset sbu/*.tar)")
    assert "cc3m" in one_line_error(lambda: load(root, 8))


def test_sources_are_registered_builtins():
    registry = build_registry(get_plugin_manager(load_entrypoints=False))
    for name in ("cc3m", "yfcc", "sbu"):
        entry = registry.entry("proxies", name)
        assert entry.source == "builtin:qbench_plugins.datasets.webdataset_proxy"
    assert "Sharma" in registry.get("proxies", "cc3m").description


def test_eval_calibrates_on_the_shards_and_records_their_provenance(tmp_path, capsys):
    root = write_fixture(tmp_path / "data")
    try:
        main(["eval", "--proxy", "cc3m", "--data-root", str(root), "--proxy-n", "8", "--limit", "50", "--json",
              "--no-feature-cache"])
    except SystemExit as exit_:
        assert not exit_.code, capsys.readouterr().err
    document = json.loads(capsys.readouterr().out)
    calibration = document["quantizer_provenance"]["calibration"]
    assert document["config"]["proxy"] == "cc3m"
    assert calibration["source"].startswith("cc3m (WebDataset cc3m/*.tar): N=8, seed=0")
    assert calibration["fingerprint"] == expected_fingerprint(VALID)
    assert calibration["n_images"] == 8

