"""Probe for ``benchmarks/perf/sweep.py``: installed as ``sitecustomize.py`` in the processes a benchmark starts.

``sweep.py`` copies this file to ``<temp>/sitecustomize.py`` and puts ``<temp>`` on ``PYTHONPATH`` for the
``qbench`` subprocesses it runs; submitit's local workers inherit the environment, so Python imports it at the
start of every process. It does nothing unless the process's command line has an argument listed in
``$QBENCH_PROBE_MATCH`` (comma-separated; e.g. ``submitit.core._submit`` for sweep workers, ``eval`` for
``qbench eval``). In a matching process it wraps a few qbench functions (qbench itself is not edited) to

* record, independently of qbench's own counters, one JSON line per event in ``$QBENCH_PROBE_EVENTS/<pid>.jsonl``
  (written with one ``os.write`` each, so a SIGKILL loses nothing already recorded):

  - ``run_start`` / ``run_end``: every call of :func:`qbench.engine.evaluate.run` (config hash at start and at return),
  - ``saved``: :func:`qbench.engine.execution.save_or_rescue` returned (the document is in the store),
  - ``images``: rows that went through an image encoder, per state and dataset (each batch that completed),
  - ``qat_step``: a Light-QAT optimizer step finished (:func:`qbench.quant.qat.save_step` is called after each),
  - ``qat_resume``: :func:`qbench.quant.qat.resume_training` returned the step training continues from,
  - ``kill``: the probe is about to SIGKILL this process;

* SIGKILL the process at one chosen moment, given by ``$QBENCH_PROBE_KILL`` (JSON)::

      {"phase": "load" | "calibrate" | "qat_step" | "encode" | "write",
       "nth": 1,                 # the n-th matching occurrence of the phase in this process
       "quantizer": "qat-ste",   # optional: only in units of this quantizer
       "step": 7,                # qat_step only: kill after this optimizer step
       "marker": "/path/file"}   # created (O_EXCL) just before the kill: at most one kill per marker

  Phases: ``load`` — :func:`qbench.engine.evaluate.load_request` (the model loader is called next); ``calibrate`` —
  :func:`qbench.quant.calibrate.calibrate` (the calibration pass of ``calibrate_and_freeze``, which PTQ and QAT
  plugins import by name, so it is patched one level lower); ``qat_step`` — after optimizer step ``step`` (the
  kill only fires if a step checkpoint file exists by then); ``encode`` — :func:`qbench.engine.features._encode_states`
  (decode + encode of a dataset); ``write`` — :func:`qbench.atomic.write_atomic` of a result document: the
  staged file under ``<store>/.partial/`` is written and fsynced, the rename has not happened.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

MATCH_ENV = "QBENCH_PROBE_MATCH"
EVENTS_ENV = "QBENCH_PROBE_EVENTS"
KILL_ENV = "QBENCH_PROBE_KILL"

_current: dict[str, Any] = {}
_occurrences: dict[str, int] = {}


def _command_line() -> list[str]:
    try:
        with open("/proc/self/cmdline", "rb") as handle:
            return [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
    except OSError:
        return []


def _matches() -> bool:
    wanted = [token for token in os.environ.get(MATCH_ENV, "").split(",") if token]
    arguments = _command_line()
    return bool(wanted) and any(argument in wanted for argument in arguments)


def record(event: str, **fields: Any) -> None:
    """Append one event line to this process's file (a single write: complete or absent)."""
    folder = os.environ.get(EVENTS_ENV)
    if not folder:
        return
    line = json.dumps({"event": event, "pid": os.getpid(), "t": time.time(), **_current, **fields}) + "\n"
    descriptor = os.open(os.path.join(folder, f"{os.getpid()}.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(descriptor, line.encode())
    finally:
        os.close(descriptor)


def _kill_spec() -> dict[str, Any] | None:
    raw = os.environ.get(KILL_ENV)
    return json.loads(raw) if raw else None


def maybe_kill(phase: str, **detail: Any) -> None:
    """SIGKILL this process if ``phase`` is the chosen one and this is its chosen occurrence (once per marker)."""
    spec = _kill_spec()
    if spec is None or spec.get("phase") != phase:
        return
    if spec.get("quantizer") and spec["quantizer"] != _current.get("quantizer"):
        return
    if phase == "qat_step" and detail.get("step") != spec.get("step"):
        return
    _occurrences[phase] = _occurrences.get(phase, 0) + 1
    if _occurrences[phase] != int(spec.get("nth", 1)):
        return
    marker = spec.get("marker")
    if marker:
        try:
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            return  # this kill already happened (an earlier process)
    record("kill", phase=phase, **detail)
    os.kill(os.getpid(), signal.SIGKILL)


def _wrap(module: Any, name: str, make: Callable[[Callable], Callable]) -> None:
    original = getattr(module, name)
    wrapper = make(original)
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(module, name, wrapper)


def _patch_run(evaluate: Any) -> None:
    def make(original: Callable) -> Callable:
        def run(resolved, *args, **kwargs):
            _current.clear()
            _current.update(config=resolved.config["config_hash"], quantizer=resolved.quantizer.name,
                            model=resolved.model.name)
            record("run_start")
            document = original(resolved, *args, **kwargs)
            record("run_end")
            return document
        return run

    _wrap(evaluate, "run", make)

    def make_load(original: Callable) -> Callable:
        def load_request(request):
            maybe_kill("load")
            return original(request)
        return load_request

    _wrap(evaluate, "load_request", make_load)


def _patch_saved(execution: Any) -> None:
    def make(original: Callable) -> Callable:
        def save_or_rescue(store, document):
            saved = original(store, document)
            record("saved", config=document["config"]["config_hash"])
            return saved
        return save_or_rescue

    _wrap(execution, "save_or_rescue", make)


def _patch_features(features: Any) -> None:
    def make_counted(original: Callable) -> Callable:
        def counted(dataset: str, state: str, counter) -> Callable:
            hook = original(dataset, state, counter)

            def probed(images: int) -> None:
                hook(images)
                record("images", dataset=dataset, state=state, n=int(images))
            return probed
        return counted

    _wrap(features, "_counted", make_counted)

    def make_encode(original: Callable) -> Callable:
        def encode_states(dataset, states, *args, **kwargs):
            maybe_kill("encode", dataset=dataset.name, states=sorted(states))
            return original(dataset, states, *args, **kwargs)
        return encode_states

    _wrap(features, "_encode_states", make_encode)


def _patch_calibrate(calibrate_module: Any) -> None:
    def make(original: Callable) -> Callable:
        def calibrate(*args, **kwargs):
            maybe_kill("calibrate")
            return original(*args, **kwargs)
        return calibrate

    _wrap(calibrate_module, "calibrate", make)


def _patch_qat(qat: Any) -> None:
    def make_step(original: Callable) -> Callable:
        def save_step(checkpoints, identity, step, student, optimizer, record_):
            original(checkpoints, identity, step, student, optimizer, record_)
            record("qat_step", step=step, total=record_.steps)
            if checkpoints.path.is_file():
                maybe_kill("qat_step", step=step, checkpoint=str(checkpoints.path))
        return save_step

    _wrap(qat, "save_step", make_step)

    def make_resume(original: Callable) -> Callable:
        def resume_training(checkpoints, identity, student, optimizer, record_):
            start = original(checkpoints, identity, student, optimizer, record_)
            record("qat_resume", start=start, total=record_.steps)
            return start
        return resume_training

    _wrap(qat, "resume_training", make_resume)


def _patch_write(atomic: Any) -> None:
    def make(original: Callable) -> Callable:
        def write_atomic(path, data, *, root=None, sync_folder=True):
            target = Path(path)
            if target.parent.parent.name != "documents" or target.suffix != ".json":
                return original(path, data, root=root, sync_folder=sync_folder)
            payload = data.encode() if isinstance(data, str) else data

            def write_then_maybe_die(temporary: Path) -> None:
                with open(temporary, "wb") as handle:
                    handle.write(payload)
                    handle.flush()
                    os.fsync(handle.fileno())
                maybe_kill("write", path=str(target), staged=str(temporary))

            return atomic.write_atomic_with(target, write_then_maybe_die, root=root, sync_folder=sync_folder)
        return write_atomic

    _wrap(atomic, "write_atomic", make)


def install() -> None:
    """Patch qbench in this process (only called when the command line matches)."""
    import qbench.atomic
    import qbench.engine.evaluate
    import qbench.engine.execution
    import qbench.engine.features
    import qbench.quant.calibrate
    import qbench.quant.qat

    _patch_run(qbench.engine.evaluate)
    _patch_saved(qbench.engine.execution)
    _patch_features(qbench.engine.features)
    _patch_calibrate(qbench.quant.calibrate)
    _patch_qat(qbench.quant.qat)
    _patch_write(qbench.atomic)
    record("probe_installed", argv=_command_line()[1:4])


if _matches():
    try:
        install()
    except Exception as error:  # never break the process under test; the benchmark sees the missing events
        record("probe_failed", error=f"{type(error).__name__}: {error}")
