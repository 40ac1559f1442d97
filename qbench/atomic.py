"""Crash-safe files: write to a private temporary name, fsync, rename into place; clean up after killed writers.

Every file qbench writes for later reuse (result documents, feature and pixel cache entries, quantized
checkpoints, QAT step checkpoints) goes through :func:`write_atomic` or :func:`write_atomic_with`, so a
reader sees either the old file or the complete new one, never a half-written file, even when the writer is
killed (``kill -9``, preemption, a node failure) in the middle.

Why a staging folder: a writer builds its file under ``<root>/.partial/`` with a name that records its host and
process (``<host>.<pid>.<token>.<final name>``) and renames it into place (same file system, so the rename is
atomic). A killed writer leaves its temporary file in that one small folder, and :func:`remove_orphan_partials`
finds and deletes it without walking the whole cache: a file of this host whose process is gone is removed at
once; a file of another host (a shared cluster file system) only once it is older than ``max_age_s``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

PARTIAL_DIR = ".partial"
"""Folder, directly under a cache or store root, where writers stage their files before the rename."""
FOREIGN_PARTIAL_AGE_S = 24 * 3600.0
"""Age after which a staged file of another host is considered orphaned (its writer cannot be asked)."""


def host_name() -> str:
    """This machine's name as recorded in staged file names: dots and path separators become ``_``, so the
    name splits back into host, pid and token unambiguously."""
    return socket.gethostname().replace(os.sep, "_").replace(".", "_") or "localhost"


def process_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().split(b") ", 1)[1][:1] != b"Z"
    except (OSError, IndexError):
        return True


def staging_path(root: Path, final_name: str) -> Path:
    """A fresh, private temporary path under ``root/.partial`` for a file that will become ``final_name``."""
    folder = Path(root) / PARTIAL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{host_name()}.{os.getpid()}.{secrets.token_hex(4)}.{final_name}"


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's) content to stable storage; folders are best effort (not every FS allows it)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else 0)
    try:
        descriptor = os.open(path, flags)
    except OSError:
        if Path(path).is_dir():
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError:
        if not Path(path).is_dir():
            raise
    finally:
        os.close(descriptor)


def write_atomic_with(path: Path, writer: Callable[[Path], None], *, root: Path | None = None,
                      sync_folder: bool = True) -> Path:
    """Create ``path`` through ``writer(temporary_path)``, then fsync and rename it into place.

    ``root`` is the cache or store root whose ``.partial`` folder stages the file (default: the parent of
    ``path``); it must be on the same file system as ``path``. A failure leaves ``path`` as it was.
    ``sync_folder`` also fsyncs the folder, so the rename itself survives a power cut (results and
    checkpoints); caches skip it, since a lost cache entry is only recomputed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = staging_path(root if root is not None else path.parent, path.name)
    try:
        writer(temporary)
        fsync_path(temporary)
        os.replace(temporary, path)
    except BaseException:
        remove_path(temporary)
        raise
    if sync_folder:
        fsync_path(path.parent)
    return path


def write_atomic(path: Path, data: bytes | str, *, root: Path | None = None, sync_folder: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`write_atomic_with`)."""
    payload = data.encode() if isinstance(data, str) else data

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as handle:
            handle.write(payload)

    return write_atomic_with(path, write, root=root, sync_folder=sync_folder)


def write_output(path: Path, data: bytes | str) -> Path:
    """Write a file the user asked for (a CSV export, a markdown table, a submission) atomically.

    Unlike :func:`write_atomic` it stages beside the file, under a hidden name in the same folder, so no
    ``.partial`` folder is left in the user's folder; a failure leaves ``path`` as it was and removes the
    temporary file. The folder must exist.
    """
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    temporary = path.parent / f".{path.name}.{host_name()}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(temporary, "wb") as handle:
            handle.write(payload)
        fsync_path(temporary)
        os.replace(temporary, path)
    except BaseException:
        remove_path(temporary)
        raise
    return path


def remove_path(path: Path) -> None:
    """Delete a file or folder if it exists; never raises."""
    try:
        if Path(path).is_dir() and not Path(path).is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            Path(path).unlink()
    except OSError:
        pass


@dataclass(frozen=True)
class StagedOwner:
    """Who staged a temporary file, read from its name: ``host.pid.token.final-name``."""

    host: str
    pid: int


def staged_owner(name: str) -> StagedOwner | None:
    """The owner recorded in a staged file's name (``host.pid.token.final-name``, the host without dots), or
    None when the name is not one of ours."""
    parts = name.split(".", 3)
    if len(parts) < 4 or not parts[0] or not parts[1].isdigit() or len(parts[2]) != 8:
        return None
    return StagedOwner(parts[0], int(parts[1]))


def remove_orphan_partials(root: Path, *, max_age_s: float = FOREIGN_PARTIAL_AGE_S) -> list[Path]:
    """Delete staged files under ``root/.partial`` whose writer is gone; returns what was removed.

    A file of this host is orphaned when its process no longer runs; a file of another host when it has not
    changed for ``max_age_s`` seconds. Files of live writers are left alone.
    """
    folder = Path(root) / PARTIAL_DIR
    if not folder.is_dir():
        return []
    here, now, removed = host_name(), time.time(), []
    for entry in list(os.scandir(folder)):
        owner = staged_owner(entry.name)
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if owner is not None and owner.host == here:
            orphaned = not process_alive(owner.pid)
        else:
            orphaned = age > max_age_s
        if orphaned:
            remove_path(Path(entry.path))
            removed.append(Path(entry.path))
    return removed


def remove_legacy_partials(root: Path) -> list[Path]:
    """Delete ``*.<pid>.partial`` files that qbench versions before the staging folder left beside cache entries.

    Walks the whole tree (slow on a large cache), so only ``qbench sweep run`` and ``qbench results --reindex``
    call it. A legacy file is removed when its pid is not running on this host.
    """
    removed = []
    for path in Path(root).rglob("*.partial*"):
        if PARTIAL_DIR in path.parts:
            continue
        fields = path.name.split(".")
        pids = [field for field in fields if field.isdigit()]
        if "partial" in fields and pids and not process_alive(int(pids[-1])):
            remove_path(path)
            removed.append(path)
    return removed
