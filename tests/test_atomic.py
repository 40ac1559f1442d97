"""Crash-safe writes (qbench.atomic): exact content, no leftovers, and clean-up after killed writers."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qbench.atomic import (PARTIAL_DIR, host_name, process_alive, remove_legacy_partials, remove_orphan_partials,
                           staged_owner, staging_path, write_atomic, write_atomic_with)

REPO = Path(__file__).resolve().parents[1]

KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from qbench.atomic import staging_path
path = staging_path(Path(sys.argv[1]), "entry.bin")
with open(path, "wb") as handle:
    handle.write(b"half of a file")
    handle.flush()
print(path, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def staged_files(root: Path) -> list[Path]:
    folder = root / PARTIAL_DIR
    return sorted(folder.iterdir()) if folder.is_dir() else []


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_write_atomic_content_is_exact_and_nothing_is_left_staged(tmp_path):
    target = tmp_path / "sub" / "entry.bin"
    payload = bytes(range(256)) * 40
    assert write_atomic(target, payload, root=tmp_path) == target
    assert target.read_bytes() == payload
    assert staged_files(tmp_path) == []
    # replacing keeps exactly the new content; text is written as UTF-8
    write_atomic(target, "zwölf\n", root=tmp_path)
    assert target.read_bytes() == "zwölf\n".encode()
    assert staged_files(tmp_path) == []
    # without a root the file is staged beside it, and that staging folder is left empty too
    write_atomic(tmp_path / "plain.txt", "x", sync_folder=False)
    assert (tmp_path / "plain.txt").read_text() == "x"
    assert staged_files(tmp_path) == []


def test_failing_writer_leaves_the_target_unchanged_and_nothing_staged(tmp_path):
    target = tmp_path / "entry.bin"
    target.write_bytes(b"old content")
    seen = []

    def broken(temporary: Path) -> None:
        seen.append(temporary)
        temporary.write_bytes(b"new but incomplete")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_atomic_with(target, broken, root=tmp_path)
    assert target.read_bytes() == b"old content"
    assert seen and seen[0].parent == tmp_path / PARTIAL_DIR
    assert not seen[0].exists()
    assert staged_files(tmp_path) == []
    # a writer that fails before creating anything, for a file that did not exist, leaves no file at all
    with pytest.raises(ValueError):
        write_atomic_with(tmp_path / "new.bin", lambda temporary: (_ for _ in ()).throw(ValueError("no")), root=tmp_path)
    assert not (tmp_path / "new.bin").exists()
    assert staged_files(tmp_path) == []


def test_killed_writer_leaves_an_orphan_that_is_removed_while_a_live_writers_file_is_kept(tmp_path):
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert killed.returncode == -9, killed.stderr
    orphan = Path(killed.stdout.strip())
    assert orphan.parent == tmp_path / PARTIAL_DIR
    assert orphan.read_bytes() == b"half of a file"
    mine = staging_path(tmp_path, "mine.bin")
    mine.write_bytes(b"in progress")

    removed = remove_orphan_partials(tmp_path)
    assert removed == [orphan]
    assert not orphan.exists()
    assert mine.read_bytes() == b"in progress"
    assert remove_orphan_partials(tmp_path) == []  # nothing else to do the second time
    assert mine.exists()


def test_foreign_host_staged_file_is_removed_only_when_old(tmp_path):
    folder = tmp_path / PARTIAL_DIR
    folder.mkdir()
    foreign = folder / "another-host.12345.0123abcd.entry.json"
    foreign.write_bytes(b"x")
    # its pid may even be dead here (or alive): another host's process cannot be asked, only its age counts
    assert staged_owner(foreign.name).host != host_name()
    assert remove_orphan_partials(tmp_path, max_age_s=60) == []
    assert foreign.exists()
    old = time.time() - 120
    os.utime(foreign, (old, old))
    assert remove_orphan_partials(tmp_path, max_age_s=600) == []
    assert foreign.exists()
    assert remove_orphan_partials(tmp_path, max_age_s=60) == [foreign]
    assert not foreign.exists()


def test_staged_owner_parses_our_names_and_rejects_others(tmp_path):
    mine = staging_path(tmp_path, "entry.tar.gz")
    owner = staged_owner(mine.name)
    assert owner is not None and owner.host == host_name() and owner.pid == os.getpid()
    assert "." not in host_name() and os.sep not in host_name()
    assert staged_owner("node_7.42.deadbeef.a.b.json") == type(owner)("node_7", 42)
    for name in ["entry.json", "node.42.deadbeef", ".42.deadbeef.x", "node.4x2.deadbeef.x", "node.42.dead.x",
                 "node..deadbeef.x", "README"]:
        assert staged_owner(name) is None, name


def test_process_alive_counts_a_zombie_as_gone():
    assert process_alive(os.getpid())
    assert not process_alive(0) and not process_alive(-1)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # exited but not reaped yet: a zombie
            with open(f"/proc/{child.pid}/stat", "rb") as handle:
                if handle.read().split(b") ", 1)[1][:1] == b"Z":
                    break
            time.sleep(0.02)
        else:
            pytest.fail("the child never exited")
        assert not process_alive(child.pid)
    finally:
        child.wait()
    assert not process_alive(child.pid)


def test_remove_legacy_partials_removes_dead_writers_files_only(tmp_path):
    gone, here = dead_pid(), os.getpid()
    dead = tmp_path / "a" / f"entry.npy.{gone}.partial"
    live = tmp_path / "b" / f"entry.npy.{here}.partial"
    staged = tmp_path / PARTIAL_DIR / f"x.{gone}.partial"
    unrelated = tmp_path / "a" / "entry.npy"
    for path in (dead, live, staged, unrelated):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert remove_legacy_partials(tmp_path) == [dead]
    assert not dead.exists() and live.exists() and staged.exists() and unrelated.exists()
