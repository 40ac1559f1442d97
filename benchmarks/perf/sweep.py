"""Sweep robustness and throughput benchmark: crash and resume, concurrent writers and evaluations, local parallelism.

Everything runs through the real command line (``qbench sweep run``, ``qbench eval``) in subprocesses, each with a
fresh store and feature cache under one temporary folder. What runs is counted independently of qbench's own
counters by a probe (``benchmarks/perf/sweep_probe.py``, installed as ``sitecustomize.py`` on ``PYTHONPATH`` of
the subprocesses; submitit's local workers inherit it): every call of ``qbench.engine.evaluate.run`` (start and return),
every stored document, every batch of images through an image encoder (by state and dataset), every QAT
optimizer step, and SIGKILLs at chosen moments. qbench itself is not modified.

A. Crash and resume (``--crash``). A 12-configuration toy sweep (toy-clip; fp32, minmax, smoothquant and
   qat-ste x w8a8/w4a8 on toy-id, plus minmax and qat-ste on toy-ood; 1 warm unit) is run uninterrupted into
   store/cache R (the reference), then into a fresh store/cache S where the local worker (every worker, with
   ``--crash-parallel N``) is SIGKILLed at five moments — model load, calibration, a QAT step after a step
   checkpoint was written, encoding, and the result write (staged file fsynced, rename not done) — each kill in
   its own ``qbench sweep run``, whose successor resumes the sweep, and a last run to finish. Prints
   configurations lost, duplicated, completed-and-recomputed, whether the killed QAT training resumed from its
   step checkpoint, orphan ``.partial`` files, and whether every document of S equals R's bit for bit once the
   volatile fields are removed (see :data:`VOLATILE_FIELDS`).
B. Concurrency (``--concurrency``). (1) 8 writer processes x 50 ``ResultStore.put`` of small documents while
   another process holds a read transaction open on the index: files and index rows lost. (2) 4 identical
   ``qbench eval`` started together on one fresh store/cache: evaluations computed (must be 1) and processes
   served from the store. (3) 4 ``qbench eval`` of different quantizers started together on one fresh cache:
   FP32 image forwards per image (must be 1.00).
C. Parallel efficiency (``--parallel``). An 8-configuration PTQ sweep run with ``--max-parallel 2 --threads 1``
   and ``--max-parallel 1 --threads 1``, interleaved (1, 2, 1, 2, ...), each in a fresh store and cache; prints
   wall times, efficiency = T1 / (2 * T2) per pair and the median (also over the units alone: first ``run``
   start to last stored document, without the driver's planning, worker start-up and polling), and FP32 image
   forwards per image per (model, dataset) over each sweep from the documents'
   ``encoder_calls.images_by_dataset`` and from the probe.

The machine may be shared, so absolute times are noisy: compare the ratios of interleaved runs. Every qbench
process gets ``--threads`` torch threads explicitly.

Usage: ``python benchmarks/perf/sweep.py [--crash] [--concurrency] [--parallel] [--threads 1] [--reps 2]
[--qat-steps 40] [--crash-parallel 1] [--workdir DIR] [--keep]`` (no section flag: all three).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

PROBE_SOURCE = Path(__file__).with_name("sweep_probe.py")
VOLATILE_FIELDS = {
    "provenance": "creation time, platform, torch threads and the batch plan chosen from the free RAM at run time",
    "timing": "wall-clock seconds of each phase",
    "encoder_calls": "forward passes this attempt ran and its feature-cache hits: an attempt after a kill may find "
                     "features an earlier attempt cached",
    "integrity": "the SHA-256 over the whole document, so it changes with the fields above",
}
"""Top-level document fields left out of the bit-identity comparison, and why they legitimately differ."""
RUN_TIMEOUT_S = 900


# -- subprocesses, probe and events ------------------------------------------------------------------------
@dataclass(frozen=True)
class Env:
    """A fresh store, feature cache and probe event folder, and the environment a qbench subprocess runs in."""

    root: Path
    probe: Path
    match: str

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def events(self) -> Path:
        return self.root / "events"

    def variables(self, kill: dict[str, Any] | None = None) -> dict[str, str]:
        """The process environment: probe on PYTHONPATH, store, cache, offline, and the kill spec if any."""
        env = dict(os.environ)
        env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(self.probe), env.get("PYTHONPATH", "")])),
                   QBENCH_STORE=str(self.store), QBENCH_CACHE=str(self.cache), HF_HUB_OFFLINE="1",
                   QBENCH_PROBE_EVENTS=str(self.events), QBENCH_PROBE_MATCH=self.match)
        env.pop("QBENCH_PROBE_KILL", None)
        env.pop("QBENCH_INDEX", None)
        if kill is not None:
            env["QBENCH_PROBE_KILL"] = json.dumps(kill)
        return env


def make_env(workdir: Path, name: str, match: str) -> Env:
    """A new folder ``workdir/name`` with the probe installed as ``sitecustomize.py`` beside it."""
    root = workdir / name
    if root.exists():
        shutil.rmtree(root)
    probe = root / "probe"
    probe.mkdir(parents=True)
    shutil.copyfile(PROBE_SOURCE, probe / "sitecustomize.py")
    env = Env(root, probe, match)
    env.events.mkdir()
    return env


@dataclass
class Finished:
    """A finished subprocess: exit status, wall seconds and its stderr."""

    rc: int
    seconds: float
    stderr: str
    stdout: str = ""


def qbench(*args: str) -> list[str]:
    return [sys.executable, "-m", "qbench", *args]


def run_command(command: list[str], env: dict[str, str], cwd: Path) -> Finished:
    """Run ``command`` to its end (a hang beyond :data:`RUN_TIMEOUT_S` is killed and reported as rc -9)."""
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        rc, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:
        rc, out, err = -9, str(expired.stdout or ""), f"timed out after {RUN_TIMEOUT_S} s\n{expired.stderr or ''}"
    return Finished(rc, time.perf_counter() - started, err, out)


def start_together(commands: list[list[str]], env: dict[str, str], cwd: Path) -> list[Finished]:
    """Start every command at once and wait for all. Output goes to files (``cwd/process-N.out|err``), so no
    process can block on a full pipe while another waits for its lock; ``seconds`` is each one's own run time."""
    started = time.perf_counter()
    processes = []
    for number, command in enumerate(commands):
        with open(cwd / f"process-{number}.out", "w") as out, open(cwd / f"process-{number}.err", "w") as err:
            processes.append(subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=err))
    ended: dict[int, float] = {}
    deadline = started + RUN_TIMEOUT_S
    while len(ended) < len(processes) and time.perf_counter() < deadline:
        for number, process in enumerate(processes):
            if number not in ended and process.poll() is not None:
                ended[number] = time.perf_counter() - started
        time.sleep(0.05)
    finished = []
    for number, process in enumerate(processes):
        if number not in ended:
            process.kill()
            process.wait()
        err, out = (cwd / f"process-{number}.err").read_text(), (cwd / f"process-{number}.out").read_text()
        finished.append(Finished(process.returncode if number in ended else -9, ended.get(number, float("nan")), err, out))
    return finished


def read_events(env: Env) -> list[dict[str, Any]]:
    """Every probe event of every process, in time order."""
    events = []
    for path in sorted(env.events.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                events.append(json.loads(line))
    return sorted(events, key=lambda event: event["t"])


def fp32_rows(events: Iterable[dict[str, Any]]) -> Counter:
    """(model, dataset) -> rows the FP32 image encoder processed, from the probe."""
    rows: Counter = Counter()
    for event in events:
        if event["event"] == "images" and event["state"] == "fp32":
            rows[(event.get("model", "?"), event["dataset"])] += event["n"]
    return rows


# -- sweeps ---------------------------------------------------------------------------------------------------
def write_sweep(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def sweep_run(env: Env, sweep_file: Path, parallel: int, threads: int, kill: dict[str, Any] | None = None,
              label: str = "run") -> Finished:
    """``qbench sweep run FILE --executor local --max-parallel P --threads T``; its stderr is kept in
    ``<env>/driver-<label>.log``."""
    done = run_command(qbench("sweep", "run", str(sweep_file), "--executor", "local", "--max-parallel", str(parallel),
                              "--threads", str(threads)), env.variables(kill), env.root)
    (env.root / f"driver-{label}.log").write_text(done.stderr)
    return done


def last_counts(stderr: str) -> str:
    """The driver's last ``N/M done, ...`` line (what it last saw before it exited)."""
    lines = [line.strip() for line in stderr.splitlines() if " done, " in line and "pending" in line]
    return lines[-1] if lines else "no counts line"


def sweep_json(env: Env, sweep_file: Path, command: str) -> dict[str, Any]:
    """``qbench sweep plan|status FILE --json`` as a mapping."""
    done = run_command(qbench("sweep", command, str(sweep_file), "--json"), env.variables(), env.root)
    if done.rc != 0:
        raise SystemExit(f"qbench sweep {command} failed (rc {done.rc}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def stored_documents(store: Path) -> dict[str, dict[str, Any]]:
    """config hash -> the raw JSON of its document file."""
    return {path.stem: json.loads(path.read_text()) for path in sorted((store / "documents").glob("*/*.json"))}


def partial_files(*roots: Path) -> list[Path]:
    """Staged files left under ``.partial`` folders and legacy ``*.partial`` files anywhere below ``roots``."""
    found = []
    for root in roots:
        if not root.exists():
            continue
        for path in root.rglob("*"):
            if path.is_file() and (".partial" in path.parts or ".partial" in path.name):
                found.append(path)
    return found


def worker_logs(env: Env) -> str:
    """Every submitit worker log (stderr and stdout) of the sweeps run in ``env``."""
    return "\n".join(path.read_text(errors="replace") for path in sorted(env.store.glob("sweeps/*/logs/*/*_log.*")))


# -- A: crash and resume --------------------------------------------------------------------------------------
CRASH_SWEEP = """\
version: 1
name: crash-resume
models: [toy-clip]
quantizers: [fp32, minmax, smoothquant, qat-ste]
bits: [w8a8, w4a8]
suites: [toy-id]
qparams:
  qat-ste: {{steps: {steps}, batch_size: 20}}
settings: {{qat_checkpoint_every: {every}, limit: 200, proxy_n: 200}}
include:
  - {{quantizer: [minmax, qat-ste], bits: [w8a8, w4a8], suites: toy-ood}}
"""
CHECKPOINT_EVERY = 5


def crash_plan(qat_kill_step: int) -> list[dict[str, Any]]:
    """The five kills, in order; every worker of the run it is given to dies at its first matching moment."""
    return [
        {"phase": "load", "nth": 1},
        {"phase": "calibrate", "nth": 1},
        {"phase": "qat_step", "nth": 1, "quantizer": "qat-ste", "step": qat_kill_step},
        {"phase": "encode", "nth": 1},
        {"phase": "write", "nth": 1},
    ]


def section_crash(workdir: Path, threads: int, qat_steps: int, parallel: int) -> None:
    print("\n== A. crash and resume ==")
    started = time.perf_counter()
    reference = make_env(workdir, "A-reference", "submitit.core._submit")
    crashed = make_env(workdir, "A-crashed", "submitit.core._submit")
    sweep_file = write_sweep(workdir / "crash.yaml", CRASH_SWEEP.format(steps=qat_steps, every=CHECKPOINT_EVERY))
    plan = sweep_json(reference, sweep_file, "plan")
    units = {unit["config_hash"]: unit for unit in plan["units"]}
    configs = [unit for unit in plan["units"] if unit["stage"] == "config"]
    print(f"sweep: {len(configs)} configurations + {len(units) - len(configs)} warm unit(s) "
          f"(qbench sweep plan); QAT {qat_steps} steps, step checkpoint every {CHECKPOINT_EVERY}; {threads} torch thread(s)")

    done = sweep_run(reference, sweep_file, 1, threads)
    print(f"reference R: 1 worker, uninterrupted: rc {done.rc}, {done.seconds:.1f} s")

    kill_step = CHECKPOINT_EVERY + 2
    for number, kill in enumerate(crash_plan(kill_step), start=1):
        before = len(kill_events(crashed))
        done = sweep_run(crashed, sweep_file, parallel, threads, kill, label=f"{number}-{kill['phase']}")
        victims = [describe_unit(units, event.get("config")) for event in kill_events(crashed)[before:]]
        extra = ""
        if kill["phase"] == "write":
            extra = f"; staged files in the store's .partial after the kill: {len(partial_files(crashed.store))}"
        silent = " (exit 0 with units pending: the driver did not report its dead workers)" if (
            done.rc == 0 and victims and not last_counts(done.stderr).endswith(" 0 pending")) else ""
        print(f"run {number}: kill at {kill['phase']:9s} killed {len(victims)} worker(s) in {', '.join(victims) or '-'}: "
              f"driver rc {done.rc} after '{last_counts(done.stderr)}'{silent}, {done.seconds:.1f} s{extra}")
    for attempt in range(1, 4):
        done = sweep_run(crashed, sweep_file, parallel, threads, label=f"finish-{attempt}")
        status = sweep_json(crashed, sweep_file, "status")
        print(f"finishing run {attempt}: rc {done.rc}, {done.seconds:.1f} s; {status['counts']}")
        if status["counts"]["done"] == len(configs) and done.rc == 0:
            break
    report_crash(reference, crashed, units, kill_step)
    print(f"section A took {time.perf_counter() - started:.0f} s")


def leftovers(env: Env) -> str:
    """Lock files and kept quantized models (or QAT step folders) still on disk once the sweep is done."""
    locks = [path for folder in (env.store / "locks", env.cache / "locks", env.cache / "quantized" / "locks")
             if folder.is_dir() for path in folder.iterdir()]
    quantized = env.cache / "quantized"
    kept = [path.name for path in quantized.iterdir() if path.name not in ("locks", ".partial")] if quantized.is_dir() else []
    return f"lock files {len(locks)}, kept quantized models / QAT step folders {len(kept)} {kept if kept else ''}"


def kill_events(env: Env) -> list[dict[str, Any]]:
    return [event for event in read_events(env) if event["event"] == "kill"]


def describe_unit(units: dict[str, dict[str, Any]], config: str | None) -> str:
    unit = units.get(config or "", {})
    return f"{unit.get('quantizer', '?')} {unit.get('bits', '')} {'+'.join(unit.get('suites', []))} ({config})"


def report_crash(reference: Env, crashed: Env, units: dict[str, dict[str, Any]], kill_step: int) -> None:
    """Lost, duplicated and recomputed configurations, QAT resume, orphans and the document comparison."""
    events = read_events(crashed)
    stored = stored_documents(crashed.store)
    expected = stored_documents(reference.store)
    lost = sorted(set(units) - set(stored))
    print(f"units stored at the end: {len(set(units) & set(stored))}/{len(units)} (reference: "
          f"{len(set(units) & set(expected))}/{len(units)}); lost: {len(lost)} {lost if lost else ''}")

    completions = Counter(event["config"] for event in events if event["event"] == "run_end")
    saves = Counter(event["config"] for event in events if event["event"] == "saved")
    killed_after_return = {event["config"] for event in events if event["event"] == "kill" and event["phase"] == "write"}
    duplicated = sorted(config for config, count in completions.items() if count > 1)
    unexpected = sorted(config for config in duplicated
                        if completions[config] - (1 if config in killed_after_return else 0) > 1 or saves[config] > 1)
    print(f"duplicated (run completed more than once): {len(duplicated)}; of which expected, because the kill came "
          f"after 'run' returned, while its document was written: {len(set(duplicated) & killed_after_return)}; "
          f"unexpected: {len(unexpected)} {unexpected if unexpected else ''}")
    first_saved: dict[str, float] = {}
    for event in events:
        if event["event"] == "saved":
            first_saved.setdefault(event["config"], event["t"])
    recomputed = sorted({event["config"] for event in events
                         if event["event"] == "run_start" and event["config"] in first_saved
                         and event["t"] > first_saved[event["config"]]})
    starts = Counter(event["config"] for event in events if event["event"] == "run_start")
    print(f"completed configurations recomputed (run started after its document was stored): {len(recomputed)} "
          f"{recomputed if recomputed else ''}; 'run' calls: {sum(starts.values())} started, "
          f"{sum(completions.values())} returned, {sum(saves.values())} documents stored, for {len(units)} units")
    report_qat_resume(crashed, events, kill_step)
    orphans = partial_files(crashed.store, crashed.cache)
    print(f"orphan .partial files at the end: {len(orphans)} {[str(path) for path in orphans[:5]] if orphans else ''}")
    print(f"other leftovers in S: {leftovers(crashed)}")
    report_forwards("FP32 image forwards per image (probe)", fp32_rows(read_events(reference)), expected, label="R")
    report_forwards("FP32 image forwards per image (probe)", fp32_rows(events), stored, label="S")
    compare_documents(expected, stored)


def report_qat_resume(crashed: Env, events: list[dict[str, Any]], kill_step: int) -> None:
    """Whether the QAT configuration killed after step ``kill_step`` continued from its step checkpoint."""
    kill = next((event for event in events if event["event"] == "kill" and event["phase"] == "qat_step"), None)
    if kill is None:
        print("QAT resume: the QAT kill did not fire")
        return
    config = kill["config"]
    resumes = [event["start"] for event in events if event["event"] == "qat_resume" and event["config"] == config
               and event["t"] > kill["t"]]
    steps = [event["step"] for event in events if event["event"] == "qat_step" and event["config"] == config]
    line = "resuming training from its step checkpoint"
    logged = [text.strip() for text in worker_logs(crashed).splitlines() if line in text]
    total = next((event["total"] for event in events if event["event"] == "qat_step" and event["config"] == config), 0)
    print(f"QAT resume: killed after step {kill_step} of {total} with a checkpoint at {kill.get('checkpoint', '?')}; next "
          f"attempt started from step {resumes[0] if resumes else '?'} (probe), log: {logged[0] if logged else 'no line'}; "
          f"optimizer steps run for it in all: {len(steps)} (uninterrupted: {total}; redone: {len(steps) - total})")


def fp32_rows_in_documents(documents: dict[str, dict[str, Any]]) -> Counter:
    """(model, dataset) -> FP32 image forwards the documents report (``encoder_calls.images_by_dataset``), summed."""
    rows: Counter = Counter()
    for document in documents.values():
        for dataset, counts in document["encoder_calls"]["images_by_dataset"].items():
            rows[(document["config"]["model"], dataset)] += counts.get("fp32", 0)
    return rows


def report_forwards(title: str, rows: Counter, documents: dict[str, dict[str, Any]], label: str) -> None:
    """FP32 image forwards per image for every (model, dataset), against the dataset sizes in the documents."""
    sizes = dataset_sizes(documents)
    parts = [f"{model}/{dataset} {rows.get((model, dataset), 0) / size:.2f}" for (model, dataset), size in sorted(sizes.items())]
    print(f"{title} {label}: {', '.join(parts)}")


def dataset_sizes(documents: dict[str, dict[str, Any]]) -> dict[tuple[str, str], int]:
    """(model, dataset) -> images evaluated, from the documents' ``datasets`` sections."""
    sizes = {}
    for document in documents.values():
        for name, info in document.get("datasets", {}).items():
            sizes[(document["config"]["model"], name)] = info["num_images"]
    return sizes


def stable(document: dict[str, Any]) -> dict[str, Any]:
    """The document without :data:`VOLATILE_FIELDS`."""
    return {key: value for key, value in document.items() if key not in VOLATILE_FIELDS}


def canonical(value: Any) -> str:
    """Sorted-key JSON text; floats are written with their shortest round-trip repr, so equal text means equal bits."""
    return json.dumps(value, sort_keys=True)


def differing_paths(first: Any, second: Any, path: str = "", limit: int = 10) -> list[str]:
    """Up to ``limit`` JSON paths where two values differ."""
    if isinstance(first, dict) and isinstance(second, dict):
        found: list[str] = []
        for key in sorted(set(first) | set(second), key=str):
            if key not in first or key not in second:
                found.append(f"{path}.{key} (only in one)")
            else:
                found += differing_paths(first[key], second[key], f"{path}.{key}", limit - len(found))
            if len(found) >= limit:
                break
        return found
    if isinstance(first, list) and isinstance(second, list) and len(first) == len(second):
        found = []
        for index, (a, b) in enumerate(zip(first, second)):
            found += differing_paths(a, b, f"{path}[{index}]", limit - len(found))
            if len(found) >= limit:
                break
        return found
    return [] if canonical(first) == canonical(second) else [path or "."]


def compare_documents(expected: dict[str, dict[str, Any]], actual: dict[str, dict[str, Any]]) -> None:
    """Each document of S against R's, as canonical JSON without :data:`VOLATILE_FIELDS`."""
    common = sorted(set(expected) & set(actual))
    different = {}
    for config in common:
        a, b = stable(expected[config]), stable(actual[config])
        if canonical(a) != canonical(b):
            different[config] = differing_paths(a, b)
    excluded = ", ".join(f"{key} ({why})" for key, why in VOLATILE_FIELDS.items())
    print(f"documents bit-identical to the reference without the volatile fields: {len(common) - len(different)}/"
          f"{len(common)}; excluded: {excluded}")
    for config, paths in different.items():
        print(f"  DIFFERS {config}: {', '.join(paths)}")
    volatile = Counter(key for config in common for key in VOLATILE_FIELDS
                       if canonical(expected[config].get(key)) != canonical(actual[config].get(key)))
    print(f"  (volatile fields that did differ, documents: {dict(volatile)})")


# -- B: concurrency ------------------------------------------------------------------------------------------
WRITERS, PUTS = 8, 50


def small_document(writer: int, number: int) -> dict[str, Any]:
    """A minimal result document with a unique config hash."""
    config_hash = f"{writer:04x}{number:04x}{'0' * 8}"
    return {"config": {"config_hash": config_hash, "model": "bench", "weights_tag": "bench", "quantizer": "none",
                       "bits": "w8a8", "scope": "visual", "seed": writer, "suites": []},
            "provenance": {"created_at": f"2024-01-01T00:00:{number:02d}+00:00"}, "verification": {"passed": True},
            "results": [{"writer": writer, "number": number}]}


def writer_process(store: str, writer: int, queue) -> None:
    """``PUTS`` puts into ``store``; reports how many were not indexed."""
    from qbench.engine.store import ResultStore

    result = ResultStore(store)
    not_indexed = 0
    for number in range(PUTS):
        saved = result.put(small_document(writer, number))
        not_indexed += 0 if saved.indexed else 1
    queue.put(not_indexed)


def reader_process(index: str, ready, stop) -> None:
    """Hold a read transaction on the index until ``stop`` is set."""
    connection = sqlite3.connect(index, timeout=30)
    connection.execute("BEGIN")
    connection.execute("SELECT count(*) FROM results").fetchone()
    ready.set()
    stop.wait(300)
    connection.rollback()
    connection.close()


def concurrent_puts(workdir: Path) -> None:
    """B1: 8 writer processes x 50 puts while a reader holds a transaction open; files and index rows lost."""
    from qbench.engine.store import ResultStore

    folder = workdir / "B1-store"
    shutil.rmtree(folder, ignore_errors=True)
    store = ResultStore(folder)  # creates the index (WAL) before anyone else opens it
    context = multiprocessing.get_context("spawn")
    ready, stop, queue = context.Event(), context.Event(), context.Queue()
    reader = context.Process(target=reader_process, args=(str(store.index_path), ready, stop))
    reader.start()
    ready.wait(60)
    started = time.perf_counter()
    writers = [context.Process(target=writer_process, args=(str(folder), writer, queue)) for writer in range(WRITERS)]
    for process in writers:
        process.start()
    not_indexed = sum(queue.get(timeout=RUN_TIMEOUT_S) for _ in writers)
    for process in writers:
        process.join()
    seconds = time.perf_counter() - started
    with sqlite3.connect(store.index_path) as connection:
        rows_while_reading = connection.execute("SELECT count(*) FROM results").fetchone()[0]
    stop.set()
    reader.join()
    expected = {small_document(w, n)["config"]["config_hash"] for w in range(WRITERS) for n in range(PUTS)}
    readable = sum(1 for config in expected if store.get(config) is not None)
    files = len(list(store.documents_dir.glob("*/*.json")))
    print(f"B1 {WRITERS} writers x {PUTS} puts with a read transaction open on the index: {seconds:.1f} s; "
          f"files {files}/{len(expected)} (readable {readable}), lost {len(expected) - readable}; index rows "
          f"{rows_while_reading}/{len(expected)} before any sync, lost {len(expected) - rows_while_reading}; "
          f"puts reporting 'not indexed': {not_indexed}; writer exit codes {sorted({p.exitcode for p in writers})}")


def eval_args(quantizer: str, threads: int) -> list[str]:
    return qbench("eval", "--quantizer", quantizer, "--limit", "100", "--proxy-n", "100", "--threads", str(threads),
                  "--json")


def identical_evals(workdir: Path, threads: int) -> None:
    """B2: 4 identical evaluations started together compute once; the others are served from the store."""
    env = make_env(workdir, "B2-identical", "eval")
    finished = start_together([eval_args("minmax", threads) for _ in range(4)], env.variables(), env.root)
    events = read_events(env)
    computed = sum(1 for event in events if event["event"] == "run_end")
    started = sum(1 for event in events if event["event"] == "run_start")
    served = sum(1 for item in finished if "served from the store" in item.stderr)
    documents = [json.loads(item.stdout) for item in finished if item.rc == 0 and item.stdout.strip()]
    same = len({canonical(stable(document)) for document in documents}) == 1
    print(f"B2 4 identical 'qbench eval' at once: computed {computed} (run started {started}; must be 1), served from "
          f"the store {served}, exit codes {[item.rc for item in finished]}, documents identical: {same}; "
          f"{max(item.seconds for item in finished):.1f} s")
    report_failures(finished)


def different_evals(workdir: Path, threads: int) -> None:
    """B3: 4 quantizers of one model started together share the FP32 features: 1 FP32 forward per image."""
    env = make_env(workdir, "B3-quantizers", "eval")
    quantizers = ["minmax", "smoothquant", "quarot", "fp32"]
    finished = start_together([eval_args(name, threads) for name in quantizers], env.variables(), env.root)
    documents = stored_documents(env.store)
    from_documents, probe = fp32_rows_in_documents(documents), fp32_rows(read_events(env))
    per_image = ", ".join(f"{model}/{dataset} probe {probe[(model, dataset)] / size:.2f}, documents "
                          f"{from_documents[(model, dataset)] / size:.2f}"
                          for (model, dataset), size in sorted(dataset_sizes(documents).items()))
    print(f"B3 4 quantizers ({', '.join(quantizers)}) of toy-clip at once on one cache: FP32 image forwards per image: "
          f"{per_image} (must be 1.00); exit codes {[item.rc for item in finished]}; "
          f"{max(item.seconds for item in finished):.1f} s")
    report_failures(finished)


def report_failures(finished: list[Finished]) -> None:
    for item in finished:
        if item.rc != 0:
            print(f"  FAILED rc {item.rc}: {item.stderr.strip()[-600:]}")


def section_concurrency(workdir: Path, threads: int) -> None:
    print("\n== B. concurrency ==")
    started = time.perf_counter()
    concurrent_puts(workdir)
    identical_evals(workdir, threads)
    different_evals(workdir, threads)
    print(f"section B took {time.perf_counter() - started:.0f} s")


# -- C: parallel efficiency ------------------------------------------------------------------------------------
PARALLEL_SWEEP = """\
version: 1
name: parallel
models: [toy-clip]
quantizers: [minmax, smoothquant, quarot, outlier-suppression]
bits: [w8a8, w4a8]
suites: [toy-id]
"""
"""Default-size toy configurations (the 1,000-image ID split, 1,000 proxy pairs), as 'qbench eval' runs them."""


@dataclass
class Timed:
    """One sweep run of section C."""

    parallel: int
    seconds: float
    rc: int
    span: float
    """Seconds from the first ``run`` start to the last stored document (no driver or worker start-up)."""
    forwards: dict[str, str] = field(default_factory=dict)


def timed_sweep(workdir: Path, sweep_file: Path, parallel: int, repetition: int, threads: int) -> Timed:
    """One run of the sweep in a fresh store and cache, with FP32 forwards per image from documents and probe."""
    env = make_env(workdir, f"C-p{parallel}-r{repetition}", "submitit.core._submit")
    done = sweep_run(env, sweep_file, parallel, threads)
    documents = stored_documents(env.store)
    from_documents = fp32_rows_in_documents(documents)
    events = read_events(env)
    probe = fp32_rows(events)
    starts = [event["t"] for event in events if event["event"] == "run_start"]
    stores = [event["t"] for event in events if event["event"] == "saved"]
    span = max(stores) - min(starts) if starts and stores else float("nan")
    forwards = {f"{model}/{dataset}": f"documents {from_documents[(model, dataset)] / size:.2f}, probe "
                                      f"{probe[(model, dataset)] / size:.2f}"
                for (model, dataset), size in sorted(dataset_sizes(documents).items())}
    if done.rc != 0:
        print(f"  sweep run failed (rc {done.rc}): {done.stderr.strip()[-600:]}")
    return Timed(parallel, done.seconds, done.rc, span, forwards)


def section_parallel(workdir: Path, threads: int, repetitions: int) -> None:
    print("\n== C. parallel efficiency of the local executor ==")
    started = time.perf_counter()
    sweep_file = write_sweep(workdir / "parallel.yaml", PARALLEL_SWEEP)
    runs: list[Timed] = []
    for repetition in range(repetitions):
        for parallel in (1, 2):
            timed = timed_sweep(workdir, sweep_file, parallel, repetition, threads)
            runs.append(timed)
            forwards = "; ".join(f"{key}: {value}" for key, value in timed.forwards.items())
            print(f"rep {repetition} --max-parallel {parallel} --threads {threads}: {timed.seconds:6.1f} s wall, "
                  f"{timed.span:5.1f} s from first unit start to last store (rc {timed.rc}); FP32 image forwards per image: {forwards}")
    efficiencies, span_efficiencies = [], []
    for repetition in range(repetitions):
        one, two = runs[2 * repetition], runs[2 * repetition + 1]
        efficiencies.append(one.seconds / (2 * two.seconds))
        span_efficiencies.append(one.span / (2 * two.span))
        print(f"pair {repetition}: T1 {one.seconds:.1f} s, T2 {two.seconds:.1f} s, speed-up {one.seconds / two.seconds:.2f}, "
              f"efficiency T1/(2*T2) = {efficiencies[-1]:.2f} (units only: {span_efficiencies[-1]:.2f})")
    print(f"median efficiency over {repetitions} pair(s): {statistics.median(efficiencies):.2f} wall, "
          f"{statistics.median(span_efficiencies):.2f} units only (1.00: two workers twice as fast; "
          f"{os.cpu_count()} cores, shared)")
    print(f"section C took {time.perf_counter() - started:.0f} s")


# -- main ------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crash", action="store_true", help="section A: crash and resume")
    parser.add_argument("--concurrency", action="store_true", help="section B: concurrent writers and evaluations")
    parser.add_argument("--parallel", action="store_true", help="section C: parallel efficiency of local workers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every qbench process (default 1)")
    parser.add_argument("--reps", type=int, default=2, help="section C: repetitions of each setting (default 2)")
    parser.add_argument("--qat-steps", type=int, default=40, help="section A: QAT steps of qat-ste (default 40)")
    parser.add_argument("--crash-parallel", type=int, default=1,
                        help="section A: local workers of the killed sweep (default 1; each worker dies at the moment)")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for stores and caches (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed) for inspection")
    args = parser.parse_args()
    everything = not (args.crash or args.concurrency or args.parallel)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qbench-sweep-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"work folder {workdir}; {os.cpu_count()} cores; torch threads per qbench process: {args.threads}")
    try:
        if everything or args.crash:
            section_crash(workdir, args.threads, args.qat_steps, args.crash_parallel)
        if everything or args.concurrency:
            section_concurrency(workdir, args.threads)
        if everything or args.parallel:
            section_parallel(workdir, args.threads, args.reps)
    finally:
        if args.keep or args.workdir is not None:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
