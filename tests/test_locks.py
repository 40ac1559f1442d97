"""Leased per-key locks (qbench.engine.locks): exclusivity, takeover from dead holders, compute_once across processes."""

import multiprocessing
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qbench.errors import QbenchError
from qbench.engine.locks import Holder, KeyLock, compute_once, holder_alive, lease_seconds, locked, read_holder

REPO = Path(__file__).resolve().parents[1]
LEASE = "2"

HOLDER = """
import os, signal, sys
from qbench.engine.locks import KeyLock
lock = KeyLock(sys.argv[1], sys.argv[2])
if not lock.try_acquire():
    print("busy", flush=True)
    sys.exit(3)
print("held", os.getpid(), flush=True)
command = sys.stdin.readline().strip()
if command == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
lock.release()
print("released", flush=True)
"""

TRY = """
import sys
from qbench.engine.locks import KeyLock
print(KeyLock(sys.argv[1], sys.argv[2]).try_acquire(), flush=True)
"""


@pytest.fixture(autouse=True)
def short_lease(monkeypatch):
    monkeypatch.setenv("QBENCH_LOCK_LEASE_S", LEASE)


def start_holder(folder: Path, key: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), key], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    line = child.stdout.readline().split()
    assert line and line[0] == "held", line
    assert int(line[1]) == child.pid
    return child


def marker_host(tmp_path: Path) -> str:
    """This host as filelock writes it into lock markers."""
    lock = KeyLock(tmp_path / "probe", "probe")
    assert lock.try_acquire()
    try:
        return read_holder(lock.path).host
    finally:
        lock.release()


def write_marker(path: Path, *, host: str, pid: int, duration: str = "2.0") -> None:
    """A marker in filelock's protocol, as a real SoftFileLease holder writes it (copied from one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"filelock/2\npid={pid}\nhost={host}\nmode=lease\ntoken={secrets.token_hex(16)}\n"
                    f"duration={duration}\nstart=3537365637849389812115848713817633073554806143351982791014\n")


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_two_lock_objects_exclude_each_other(tmp_path):
    first, second = KeyLock(tmp_path, "cfg"), KeyLock(tmp_path, "cfg")
    assert first.try_acquire() and first.held
    try:
        assert not second.try_acquire() and not second.held
        assert KeyLock(tmp_path, "other").try_acquire()  # another key is independent
        holder = second.holder()
        assert holder is not None and holder.pid == os.getpid() and holder_alive(holder)
    finally:
        first.release()
    assert not first.held and not first.path.exists()
    assert second.holder() is None
    assert second.try_acquire()
    second.release()


def test_waiting_acquire_reports_the_holder_and_gets_the_lock_after_release(tmp_path):
    first, second = KeyLock(tmp_path, "cfg"), KeyLock(tmp_path, "cfg")
    assert first.try_acquire()
    reports = []
    waiter = threading.Thread(target=second.acquire, args=(reports.append,))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and not second.held
    first.release()
    waiter.join(timeout=10)
    assert not waiter.is_alive() and second.held
    assert len(reports) == 1 and reports[0] is not None and reports[0].pid == os.getpid()
    second.release()


def test_locked_releases_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with locked(tmp_path, "cfg") as lock:
            assert lock.held
            raise RuntimeError("boom")
    assert not lock.held
    assert KeyLock(tmp_path, "cfg").try_acquire()


def test_lock_held_by_another_process_is_exclusive_both_ways(tmp_path):
    child = start_holder(tmp_path, "cfg")
    try:
        lock = KeyLock(tmp_path, "cfg")
        assert not lock.try_acquire()
        holder = lock.holder()
        assert holder is not None and holder.pid == child.pid and holder_alive(holder)
        child.stdin.write("release\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "released"
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert lock.try_acquire()
    try:  # and the other way round: a process cannot take the lock this one holds
        tried = subprocess.run([sys.executable, "-c", TRY, str(tmp_path), "cfg"], cwd=REPO, capture_output=True,
                               text=True, timeout=60)
        assert tried.stdout.strip() == "False", tried.stderr
    finally:
        lock.release()


def test_lock_of_a_killed_process_on_this_host_is_taken_over_at_once(tmp_path):
    child = start_holder(tmp_path, "cfg")
    lock = KeyLock(tmp_path, "cfg")
    assert not lock.try_acquire()
    child.stdin.write("kill\n")
    child.stdin.flush()
    assert child.wait(timeout=30) == -signal.SIGKILL
    assert lock.path.exists()  # the dead holder's marker is still there...
    holder = lock.holder()
    assert holder.pid == child.pid and not holder_alive(holder)
    assert lock.try_acquire()  # ...and is taken over on the first try, without waiting for the lease (2 s) to end
    assert lock.holder().pid == os.getpid()
    lock.release()


def test_lock_of_another_host_is_taken_over_only_after_the_lease(tmp_path):
    lock = KeyLock(tmp_path, "cfg")
    write_marker(lock.path, host="another-host", pid=os.getpid())  # even a pid that runs here: another host's
    holder = lock.holder()
    assert holder.host == "another-host" and holder_alive(holder)
    started = time.monotonic()
    attempts = 0
    while not lock.try_acquire():
        attempts += 1
        assert time.monotonic() - started < 15, "the expired lease of another host was never taken over"
        time.sleep(0.1)
    waited = time.monotonic() - started
    assert attempts >= 5 and waited >= lease_seconds() - 0.05, (attempts, waited)
    assert lock.holder().host != "another-host" and lock.holder().pid == os.getpid()
    lock.release()


def test_a_peer_with_another_lease_length_is_a_one_line_error(tmp_path, monkeypatch):
    lock = KeyLock(tmp_path, "cfg")
    write_marker(lock.path, host="another-host", pid=4242, duration="5.0")
    with pytest.raises(QbenchError, match="QBENCH_LOCK_LEASE_S") as caught:
        lock.try_acquire()
    assert "\n" not in str(caught.value)
    # the same between two processes of this host with different settings
    lock.path.unlink()
    holder = KeyLock(tmp_path, "cfg")
    assert holder.try_acquire()
    try:
        monkeypatch.setenv("QBENCH_LOCK_LEASE_S", "3")
        with pytest.raises(QbenchError, match="QBENCH_LOCK_LEASE_S"):
            KeyLock(tmp_path, "cfg").try_acquire()
    finally:
        holder.release()


def test_read_holder_and_holder_alive(tmp_path):
    here = marker_host(tmp_path)
    assert read_holder(tmp_path / "missing.lock") is None
    (tmp_path / "garbage.lock").write_text("not a marker\n")
    assert read_holder(tmp_path / "garbage.lock") is None

    path = tmp_path / "other.lock"
    write_marker(path, host="another-host", pid=77)
    holder = read_holder(path)
    assert (holder.host, holder.pid) == ("another-host", 77) and holder.heartbeat_age_s < 2
    assert holder_alive(holder)
    old = time.time() - 100
    os.utime(path, (old, old))
    holder = read_holder(path)
    assert 99 < holder.heartbeat_age_s < 110
    assert not holder_alive(holder)
    assert holder_alive(holder, lease_s=1000)
    assert "another-host:77" in holder.describe()

    # this host: only whether the process runs counts, not the heartbeat
    assert holder_alive(Holder(here, os.getpid(), 10_000.0))
    assert not holder_alive(Holder(here, dead_pid(), 0.0))


@pytest.mark.parametrize("raw", ["abc", "", "0", "1", "-5", "nan", "inf"])
def test_bad_lease_setting_is_a_one_line_error(tmp_path, monkeypatch, raw):
    monkeypatch.setenv("QBENCH_LOCK_LEASE_S", raw)
    with pytest.raises(QbenchError, match="QBENCH_LOCK_LEASE_S") as caught:
        lease_seconds()
    assert "\n" not in str(caught.value)
    with pytest.raises(QbenchError):
        KeyLock(tmp_path, "cfg")


def test_lease_setting(monkeypatch):
    monkeypatch.setenv("QBENCH_LOCK_LEASE_S", "7.5")
    assert lease_seconds() == 7.5
    monkeypatch.delenv("QBENCH_LOCK_LEASE_S")
    assert lease_seconds() == 120.0


def test_compute_once_in_one_process(tmp_path):
    calls = []
    assert compute_once(tmp_path, "k", lambda: None, lambda: calls.append(1) or "v") == ("v", True)
    assert compute_once(tmp_path, "k", lambda: "stored", lambda: calls.append(1) or "v") == ("stored", False)
    assert calls == [1]


def _compute_once_worker(folder: str, start, results) -> None:
    from qbench.atomic import write_atomic

    root = Path(folder)
    value_path, log_path = root / "value.txt", root / "computed.log"

    def read():
        return value_path.read_text() if value_path.exists() else None

    def compute():
        with open(log_path, "a") as log:
            log.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough that every other worker finds the lock held
        write_atomic(value_path, "the value", root=root)
        return "the value"

    start.wait(60)
    waits = []
    value, computed = compute_once(root / "locks", "key", read, compute, waits.append)
    results.put((os.getpid(), value, computed, len(waits)))


def test_compute_once_across_four_processes_computes_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    workers = [context.Process(target=_compute_once_worker, args=(str(tmp_path), start, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        start.set()
        outcomes = [results.get(timeout=60) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    assert all(worker.exitcode == 0 for worker in workers)
    computed_by = (tmp_path / "computed.log").read_text().split()
    assert len(computed_by) == 1
    assert [value for _, value, _, _ in outcomes] == ["the value"] * 4
    assert [str(pid) for pid, _, computed, _ in outcomes if computed] == computed_by
    assert sum(computed for _, _, computed, _ in outcomes) == 1
