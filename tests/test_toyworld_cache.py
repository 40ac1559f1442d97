"""The toy world is rendered once (issue 16): chunks kept in memory and on disk are the rendered chunks, byte for byte,
and a damaged disk entry is rendered again with one warning line."""

from __future__ import annotations

import numpy as np
import pytest

from qbench.data import ArrayImages
from qbench_plugins.toyworld import world

FIELDS = ("images", "labels", "backgrounds", "colours", "radii")
CACHED_SPLITS = ("id-test", "ood-near", "ood-far", "spurious-common", "spurious-counter", "proxy")


def assert_same(cached: world.ToySplit, fresh: world.ToySplit) -> None:
    """Every array byte-identical (dtype and shape included), the same captions and label names."""
    for name in FIELDS:
        a, b = getattr(cached, name), getattr(fresh, name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
    assert cached.captions == fresh.captions and cached.classnames == fresh.classnames
    assert (cached.split, cached.seed) == (fresh.split, fresh.seed)


def fresh_window(split: str, seed: int, start: int, stop: int) -> world.ToySplit:
    """The window rendered without any cache (the renderer itself)."""
    first, last = start // world.CHUNK, (stop - 1) // world.CHUNK
    parts = [world._render_chunk(split, seed, chunk, world.CHUNK) for chunk in range(first, last + 1)]
    return world._concat(parts, start - first * world.CHUNK, stop - first * world.CHUNK)


def entries() -> list:
    """The disk cache's chunk files."""
    root = world.disk_cache_root()
    return sorted(root.glob("*.safetensors")) if root.is_dir() else []


@pytest.fixture(autouse=True)
def empty_memory():
    """Each test starts (and leaves) without chunks in memory, so the disk path is what it exercises."""
    world.clear_memory_cache()
    yield
    world.clear_memory_cache()


@pytest.mark.parametrize("split", CACHED_SPLITS)
def test_memory_and_disk_chunks_equal_fresh_renders(split):
    fresh = fresh_window(split, 0, 100, 600)
    rendered = world.stream_window(split, 0, 100, 600)  # rendered, then written to disk and kept in memory
    assert len(entries()) == 3  # chunks 0, 1 and 2
    from_memory = world.stream_window(split, 0, 100, 600)
    world.clear_memory_cache()
    from_disk = world.stream_window(split, 0, 100, 600)
    for window in (rendered, from_memory, from_disk):
        assert_same(window, fresh)
        assert window.images.flags.writeable  # callers get their own copies, as before
    fingerprints = {ArrayImages("toy", window.images, window.labels, world.ID_CLASSES, world.TEMPLATES).fingerprint
                    for window in (fresh, rendered, from_disk)}
    assert len(fingerprints) == 1


def test_a_cached_window_is_read_from_disk_not_rendered(monkeypatch):
    world.generate("id-test", 300, 0)
    world.clear_memory_cache()
    monkeypatch.setattr(world, "_render_chunk", lambda *args: pytest.fail("rendered although the chunk is on disk"))
    assert len(world.generate("id-test", 300, 0)) == 300


def test_the_training_stream_is_never_cached():
    world.generate("train", 10, 0)
    assert entries() == [] and not world._memory


def damage_truncate(path):
    """Cut the file short (a killed copy, a full disk)."""
    path.write_bytes(path.read_bytes()[:1000])


def damage_flip(path):
    """Flip one byte in the middle of the pixels (a bad disk)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one pixel byte
    path.write_bytes(bytes(data))


def damage_move(path):
    """Put chunk 0's entry where chunk 1's belongs (a copied or renamed file); returns the moved file."""
    other = path.with_name(path.name.replace("-0.safetensors", "-1.safetensors"))
    other.write_bytes(path.read_bytes())  # chunk 0's entry under chunk 1's name
    path.unlink()
    return other


@pytest.mark.parametrize("damage,reason", [(damage_truncate, "is unreadable"), (damage_flip, "fails its checksum"),
                                           (damage_move, "holds the entry of another key")])
def test_a_damaged_entry_is_rendered_again_with_one_warning_line(damage, reason, capsys):
    fresh = fresh_window("ood-far", 0, 0, 2 * world.CHUNK)
    world.generate("ood-far", 2 * world.CHUNK, 0)
    path = world.disk_cache_root() / "ood-far-0-0.safetensors"
    damaged = damage(path) or path
    world.clear_memory_cache()
    capsys.readouterr()
    again = world.generate("ood-far", 2 * world.CHUNK, 0)
    assert_same(again, fresh)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qbench: warning: toy-world cache entry") and reason in lines[0]
    assert damaged.is_file()  # rendered again and rewritten: the next read is clean
    world.clear_memory_cache()
    assert_same(world.generate("ood-far", 2 * world.CHUNK, 0), fresh)
    assert capsys.readouterr().err == ""


def test_the_disk_cache_lives_under_the_cache_root_and_names_the_renderer(tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path / "elsewhere"))
    root = world.disk_cache_root()
    assert root.parent == tmp_path / "elsewhere" / "toyworld"
    assert root.name == world.renderer_fingerprint() and len(root.name) == 16
    world.generate("spurious-common", 5, 0)
    assert [path.name for path in entries()] == ["spurious-common-0-0.safetensors"]
