"""Running a sweep's units as jobs with submitit: SLURM job arrays, local worker processes, or in-process (debug).

qbench does not schedule anything itself; submitit does, as SLURM users already know it:

* ``slurm``: one job array for the warm units and one for the configurations (``--dependency=afterany`` on the
  first), at most ``--max-parallel`` tasks at a time (``#SBATCH --array=0-N%P``), each task running
  ``--units-per-job`` units. submitit asks SLURM for a signal before the time limit or on preemption and
  requeues the task (:class:`SweepJob` is ``Checkpointable``); the requeued task skips what is stored, restores
  the kept quantized model and resumes QAT from its step checkpoint. Jobs write result files only (the
  SQLite index is written by ``qbench sweep status``/``qbench results --reindex`` on the submitting machine).
* ``local``: ``--max-parallel`` worker processes on this machine (submitit's ``LocalExecutor``); each walks the
  whole unit list and takes the next unit nobody holds (its lock), so fast and slow units balance themselves.
* ``debug``: the same workers, run one after the other inside this process (submitit's ``DebugExecutor``).

Every unit goes through :func:`qbench.engine.execution.evaluate_once`, so a unit that is stored is never computed
again, a unit that another worker holds is never computed twice, and a failure is one line in the store.
Workers set their torch threads from ``--threads``, ``$SLURM_CPUS_PER_TASK`` or their share of the cores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from qbench.errors import QbenchError

try:  # submitit is a dependency; the fallback keeps ``import qbench.engine.sweep_jobs`` cheap to reason about
    from submitit.helpers import Checkpointable, DelayedSubmission
except ImportError:  # pragma: no cover
    Checkpointable = object  # type: ignore[misc,assignment]
    DelayedSubmission = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from qbench.engine.sweep import ExpandedSweep, Unit

EXECUTORS = ("local", "slurm", "debug")
LOCAL_TIMEOUT_MIN = 60 * 24 * 30
"""submitit's local jobs default to a 2-minute limit; sweep workers run until their units are done."""
DEFAULT_MAX_ARRAY = 1000
"""Units are packed so that a job array has at most this many tasks (SLURM's MaxArraySize is often 1001)."""


@dataclass(frozen=True)
class JobUnit:
    """What a job needs of one unit (plain data, pickled by submitit into the sweep folder)."""

    config_hash: str
    request: Any  # qbench.engine.evaluate.EvalRequest
    siblings: tuple[str, ...]
    label: str


@dataclass(frozen=True)
class JobSettings:
    """Settings shared by every job of one submission."""

    store: str
    index: bool  # False on clusters: jobs write result files only
    threads: int | None  # --threads
    executor_threads: int | None  # a local worker's share of the cores
    keep_quantized: bool = False
    allow_download: bool = False


class LineProgress:
    """Progress as timestamped lines on stderr (submitit keeps them in the job's log file)."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def log(self, message: str) -> None:
        stamp = datetime.now().strftime("%H:%M:%S")
        print(f"{stamp} {self.prefix}{message}", file=sys.stderr, flush=True)

    def track(self, items, description: str):
        self.log(description)
        return iter(items)


class SweepJob(Checkpointable):
    """A job: evaluate ``units`` in order, each once across all jobs; returns a summary of what it did.

    With ``claim`` (local workers) a unit held by another worker is skipped at first and waited for at the end;
    without it (a SLURM task's own units) each unit is waited for in turn.
    """

    def __init__(self, units: Sequence[JobUnit], settings: JobSettings, claim: bool = False) -> None:
        self.units = list(units)
        self.settings = settings
        self.claim = claim

    def __call__(self) -> dict[str, Any]:
        from qbench.engine.threads import THREADS_ENV, apply_threads

        if self.settings.executor_threads is not None and self.settings.threads is None:
            os.environ.setdefault(THREADS_ENV, str(self.settings.executor_threads))
        if not self.settings.allow_download:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        threads = apply_threads(self.settings.threads)
        progress = LineProgress()
        progress.log(f"worker {os.getpid()} on {os.uname().nodename}: {len(self.units)} unit(s), "
                     f"{threads.threads} torch thread(s) ({threads.source})")
        return run_units(self.units, self.settings, threads, progress, claim=self.claim)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Requeue after preemption or the time limit with the same units: everything stored is skipped, the kept
        quantized model and QAT step checkpoints resume the unit that was running. The locks this job holds are
        released first, so the requeued task (on whichever node) takes its unit over at once."""
        from qbench.engine.locks import release_all

        release_all()
        return DelayedSubmission(self, *args, **kwargs)


def run_units(units: Sequence[JobUnit], settings: JobSettings, threads, progress: LineProgress, *,
              claim: bool = False) -> dict[str, Any]:
    """Evaluate each unit once (served, computed or failed); the summary counts each outcome."""
    from qbench.registry import shared_registry as registry
    from qbench.engine.store import ResultStore

    store = ResultStore(settings.store, index=None if settings.index else False)
    summary = {"computed": [], "served": [], "failed": [], "skipped": []}
    deferred = []
    for unit in units:
        if store.has(unit.config_hash):
            summary["skipped"].append(unit.config_hash)
            continue
        lock = None
        if claim:
            from qbench.engine.execution import store_lock

            lock = store_lock(store, unit.config_hash)
            if not lock.try_acquire():
                deferred.append(unit)
                continue
        try:
            _run_unit(unit, store, settings, threads, progress, summary, registry(), lock)
        finally:
            if lock is not None:
                lock.release()
    for unit in deferred:  # held by another worker when first met: wait for it (or take over from a dead one)
        _run_unit(unit, store, settings, threads, progress, summary, registry())
    return summary


def _run_unit(unit: JobUnit, store, settings: JobSettings, threads, progress: LineProgress, summary: dict,
              registry, lock=None) -> None:
    from qbench.engine.evaluate import resolve
    from qbench.engine.execution import evaluate_once

    progress.log(f"unit {unit.config_hash}: {unit.label}")
    try:
        resolved = resolve(dataclasses.replace(unit.request, threads=threads), registry)
        if resolved.config["config_hash"] != unit.config_hash:
            raise QbenchError(f"this configuration now hashes to {resolved.config['config_hash']}, not "
                              f"{unit.config_hash} (qbench or a plugin changed since the sweep was planned); "
                              "plan and run the sweep again")
        outcome = evaluate_once(resolved, store, progress, quantization_siblings=unit.siblings,
                                keep_quantized=settings.keep_quantized, held_lock=lock)
    except QbenchError as error:
        store.record_failure(unit.config_hash, str(error), kind="error")
        progress.log(f"unit {unit.config_hash} failed: {error}")
        summary["failed"].append(unit.config_hash)
        return
    except Exception as error:  # noqa: BLE001 - one broken unit must not stop the others; recorded in one line
        import traceback

        traceback.print_exc()
        store.record_failure(unit.config_hash, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                             kind="crash")
        summary["failed"].append(unit.config_hash)
        return
    if outcome.computed:
        note = f"; {outcome.saved.describe()}" if outcome.saved is not None else ""
        progress.log(f"unit {unit.config_hash} computed{note}")
        summary["computed"].append(unit.config_hash)
    else:
        progress.log(f"unit {unit.config_hash} served from the store (computed by another process)")
        summary["served"].append(unit.config_hash)


# -- submission ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlurmOptions:
    """``--partition/--gpus/--cpus/--time/--account/--qos/--mem`` and extras, as submitit's SlurmExecutor wants them."""

    partition: str | None = None
    gpus: int | None = None
    cpus: int | None = None
    time_min: int = 240
    account: str | None = None
    qos: str | None = None
    mem: str | None = None
    constraint: str | None = None
    setup: tuple[str, ...] = ()
    additional: dict[str, Any] = field(default_factory=dict)

    def parameters(self) -> dict[str, Any]:
        """Keyword arguments of ``SlurmExecutor.update_parameters``."""
        parameters: dict[str, Any] = {"time": self.time_min, "job_name": "qbench-sweep",
                                      "additional_parameters": {"requeue": True, **self.additional}}
        for key, value in (("partition", self.partition), ("gpus_per_node", self.gpus), ("cpus_per_task", self.cpus),
                           ("account", self.account), ("qos", self.qos), ("mem", self.mem),
                           ("constraint", self.constraint)):
            if value is not None:
                parameters[key] = value
        if self.setup:
            parameters["setup"] = list(self.setup)
        return parameters


def parse_time_minutes(value: Any) -> int:
    """SLURM time limits: minutes (``240``), ``H:MM:SS``, ``MM:SS`` or ``D-HH:MM[:SS]``, as whole minutes."""
    text = str(value).strip()
    try:
        if text.isdigit():
            return max(1, int(text))
        days = 0
        if "-" in text:
            day_text, text = text.split("-", 1)
            days = int(day_text)
        parts = [int(part) for part in text.split(":")]
        if len(parts) == 3:
            hours, minutes, seconds = parts
        elif len(parts) == 2:
            hours, minutes, seconds = (parts[0], parts[1], 0) if days else (0, parts[0], parts[1])
        else:
            raise ValueError
    except ValueError:
        raise QbenchError(f"bad --time {value!r}: use minutes (240) or H:MM:SS (4:00:00) or D-HH:MM") from None
    return max(1, days * 1440 + hours * 60 + minutes + math.ceil(seconds / 60))


@dataclass
class Submission:
    """What one ``qbench sweep run`` submitted, appended to ``<sweep dir>/submissions.jsonl``."""

    executor: str
    jobs: list[str]
    units: list[str]
    at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def record(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "submissions.jsonl", "a") as handle:
            handle.write(json.dumps(dataclasses.asdict(self)) + "\n")


def job_units(units: Sequence["Unit"]) -> list[JobUnit]:
    return [JobUnit(unit.config_hash, unit.request, unit.siblings, unit.label) for unit in units]


def submit_local(units: Sequence["Unit"], settings: JobSettings, folder: Path, max_parallel: int):
    """``max_parallel`` local worker processes, each over every unit (claiming them one by one)."""
    import submitit

    executor = submitit.LocalExecutor(folder=str(folder / "logs" / "%j"))
    executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
    payload = job_units(units)
    with executor.batch():
        jobs = [executor.submit(SweepJob(payload, settings, claim=True)) for _ in range(max_parallel)]
    return jobs


def submit_debug(units: Sequence["Unit"], settings: JobSettings, folder: Path, max_parallel: int):
    """The local workers' code, run in this process one worker after the other (tests, debugging)."""
    import submitit

    executor = submitit.DebugExecutor(folder=str(folder / "logs" / "%j"))
    payload = job_units(units)
    return [executor.submit(SweepJob(payload, settings, claim=True)) for _ in range(max_parallel)]


def submit_slurm(stages: Sequence[Sequence["Unit"]], settings: JobSettings, folder: Path, slurm: SlurmOptions,
                 max_parallel: int, units_per_job: int | None, max_array: int = DEFAULT_MAX_ARRAY) -> list:
    """One job array per non-empty stage, each stage after the previous one (``afterany``)."""
    import submitit

    try:
        executor = submitit.SlurmExecutor(folder=str(folder / "logs" / "%j"))
    except RuntimeError:
        raise QbenchError("--executor slurm needs SLURM's srun and sbatch on PATH (run on a cluster login node), "
                          "or use --executor local") from None
    jobs: list = []
    dependency = None
    for units in stages:
        if not units:
            continue
        per_job = units_per_job or max(1, math.ceil(len(units) / max_array))
        chunks = [job_units(units[start:start + per_job]) for start in range(0, len(units), per_job)]
        parameters = slurm.parameters()
        parameters["array_parallelism"] = max_parallel
        if dependency is not None:
            parameters["dependency"] = f"afterany:{dependency}"
        executor.update_parameters(**parameters)
        try:
            with executor.batch():
                stage_jobs = [executor.submit(SweepJob(chunk, settings)) for chunk in chunks]
        except Exception as error:  # sbatch refused the array: one line, nothing else was submitted after it
            detail = (str(error).strip().splitlines() or [""])[-1]
            raise QbenchError(f"sbatch refused the job array ({type(error).__name__}: {detail}); check --partition, "
                              f"--account, --qos and --time") from None
        jobs += stage_jobs
        dependency = stage_jobs[0].job_id.split("_")[0]
    return jobs


def wait_for(jobs: Sequence, status, interval: float = 0.5, on_change=None) -> None:
    """Poll until every job has ended; ``status()`` returns the counts printed by ``on_change`` when they change."""
    last = None
    while True:
        counts = status()
        if counts != last and on_change is not None:
            on_change(counts)
            last = counts
        if all(job.done() for job in jobs):
            counts = status()
            if counts != last and on_change is not None:
                on_change(counts)
            return
        time.sleep(interval)
