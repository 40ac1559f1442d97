"""One computation per key across processes and hosts: leased lock files with heartbeats (``filelock``).

A configuration (its config hash), a quantization (its quantization hash) and an FP32 feature-cache entry are
each computed by one process at a time; every other process that needs the same thing waits and then reads
the first one's result from disk. The locks are :class:`filelock.SoftFileLease` markers: a file holding the
owner's host, pid and process start, refreshed by a heartbeat thread. A contender takes a lock over

* at once when its owner ran on this host and that process is gone (``kill -9``, OOM killer, a crashed node's
  requeued job landing on the same host), and
* after :data:`LEASE_S` seconds without a heartbeat when the owner ran on another host (the node died or
  lost the shared file system).

A holder that is merely slow keeps its lease by heartbeating. A holder frozen for longer than the lease
(SIGSTOP, a suspended VM) can be overtaken; the two then compute the same deterministic result and the
atomic rename of :mod:`qbench.atomic` keeps one complete copy, so the cost is time, never a wrong file.

Every peer must use the same lease length: set ``QBENCH_LOCK_LEASE_S`` for all jobs of a cluster alike.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from qbench.errors import QbenchError

LEASE_ENV = "QBENCH_LOCK_LEASE_S"
LEASE_S = 120.0
"""Default lease: a holder on another host is presumed dead after this many seconds without a heartbeat."""
POLL_S = 0.2
"""How often a waiting process retries a held lock."""
WAIT_REPORT_S = 30.0
"""How often a waiting process says again whom it is waiting for."""

T = TypeVar("T")


def lease_seconds() -> float:
    """The lease length from ``$QBENCH_LOCK_LEASE_S`` (default :data:`LEASE_S`)."""
    raw = os.environ.get(LEASE_ENV)
    if raw is None:
        return LEASE_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 1.0 or value != value or value == float("inf"):
        raise QbenchError(f"bad ${LEASE_ENV}={raw!r}: use a number of seconds above 1, e.g. 120")
    return value


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: the owner recorded in the marker and how long ago it last heartbeat."""

    host: str
    pid: int
    heartbeat_age_s: float

    def describe(self) -> str:
        return f"{self.host}:{self.pid} (heartbeat {self.heartbeat_age_s:.0f} s ago)"


def read_holder(path: Path) -> Holder | None:
    """The owner of the lock file ``path``, or None when nobody holds it (no marker, or an unreadable one)."""
    try:
        text = Path(path).read_text(errors="replace")
        age = time.time() - Path(path).stat().st_mtime
    except OSError:
        return None
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    try:
        return Holder(fields["host"], int(fields["pid"]), max(0.0, age))
    except (KeyError, ValueError):
        return None


def holder_alive(holder: Holder, lease_s: float | None = None) -> bool:
    """Whether ``holder`` still looks alive: its process runs (same host) or its heartbeat is recent (other host)."""
    import socket

    from qbench.atomic import process_alive

    try:  # the name filelock records in markers (inside a container it carries a PID-namespace suffix)
        from filelock._identity import host_name as marker_host

        here = marker_host()
    except (ImportError, AttributeError):
        here = socket.gethostname()
    if holder.host == here:
        return process_alive(holder.pid)
    return holder.heartbeat_age_s < (lease_s if lease_s is not None else lease_seconds())


_HELD: "set[KeyLock]" = set()
"""Locks this process holds (for :func:`release_all`)."""


def release_all() -> int:
    """Release every lock this process holds; returns how many. A job about to be requeued by SLURM calls it, so
    that its successor (possibly on another node) need not wait for the lease to expire."""
    held = list(_HELD)
    for lock in held:
        lock.release()
    return len(held)


class KeyLock:
    """A leased lock on one key, stored as ``<folder>/<key>.lock``."""

    def __init__(self, folder: Path, key: str) -> None:
        from filelock import SoftFileLease

        self.path = Path(folder) / f"{key}.lock"
        self.key = key
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise QbenchError(f"cannot create the lock folder {self.path.parent} ({error.strerror or error}); fix its "
                              "permissions or pass --store / --cache-dir to a writable folder") from None
        lease = lease_seconds()
        self._lease = SoftFileLease(str(self.path), lease_duration=lease, thread_local=False)

    def try_acquire(self) -> bool:
        """Take the lock if it is free (or its holder is dead); False when a live process holds it. A holder that
        uses another lease length is a one-line :class:`QbenchError` (every peer must set the same one)."""
        from filelock import LeaseSettingsMismatch, Timeout

        try:
            self._lease.acquire(timeout=0, poll_interval=POLL_S)
        except Timeout:
            return False
        except LeaseSettingsMismatch as error:
            raise QbenchError(f"{' '.join(str(error).split())}; set ${LEASE_ENV} to the same value for every job "
                              "that shares this store or cache") from None
        except OSError as error:  # a read-only store or cache: one line before anything is computed
            raise QbenchError(f"cannot take the lock {self.path} ({error.strerror or error}); the folder "
                              f"{self.path.parent} must be writable: fix its permissions or pass --store / --cache-dir "
                              "to a writable folder") from None
        _HELD.add(self)
        return True

    def acquire(self, on_wait: Callable[[Holder | None], None] | None = None) -> None:
        """Wait for the lock, calling ``on_wait(holder)`` when the wait starts and every :data:`WAIT_REPORT_S`."""
        reported = None
        while not self.try_acquire():
            now = time.monotonic()
            if on_wait is not None and (reported is None or now - reported >= WAIT_REPORT_S):
                on_wait(self.holder())
                reported = now
            time.sleep(POLL_S)

    def release(self) -> None:
        _HELD.discard(self)
        if self._lease.is_locked:
            self._lease.release(force=True)

    @property
    def held(self) -> bool:
        return bool(self._lease.is_locked)

    def holder(self) -> Holder | None:
        return read_holder(self.path)


@contextmanager
def locked(folder: Path, key: str, on_wait: Callable[[Holder | None], None] | None = None) -> Iterator[KeyLock]:
    """Hold the lock on ``key`` (waiting for it) for the duration of the block."""
    lock = KeyLock(folder, key)
    lock.acquire(on_wait)
    try:
        yield lock
    finally:
        lock.release()


def compute_once(folder: Path, key: str, read: Callable[[], T | None], compute: Callable[[], T],
                 on_wait: Callable[[Holder | None], None] | None = None) -> tuple[T, bool]:
    """``read()`` if it has the value, else ``compute()`` under the key's lock; ``(value, computed)``.

    A process that finds the lock held waits, then reads what the holder stored; only if the holder died
    without storing it does this process compute it.
    """
    value = read()
    if value is not None:
        return value, False
    with locked(folder, key, on_wait):
        value = read()
        if value is not None:
            return value, False
        return compute(), True
