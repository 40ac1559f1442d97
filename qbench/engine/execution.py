"""One configuration, computed once and saved: the lock-and-store step shared by ``qbench eval`` and sweep jobs.

:func:`evaluate_once` is what every process runs for a configuration:

1. a stored document of the config hash is served (unless ``force``);
2. otherwise the configuration's lock (:mod:`qbench.engine.locks`) is taken; a process that finds it held waits and
   then serves what the holder stored, so identical configurations started together compute once;
3. under the lock the evaluation runs (:func:`qbench.engine.evaluate.run`), its document is written to the store's
   files first and indexed second (:class:`qbench.engine.store.ResultStore`); a failure is recorded as one line
   (``failures/<hash>.json``, shown by ``qbench sweep status``) and re-raised;
4. the quantized model kept for resuming (:mod:`qbench.engine.quantized_cache`) is dropped once every configuration
   that shares it is stored (``quantization_siblings``; for a lone ``qbench eval`` just itself).

If the document cannot be written to the store at all, it is written to a file in the temporary folder and
the error names it: a computed result is never lost.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from qbench.atomic import remove_orphan_partials
from qbench.errors import QbenchError

if TYPE_CHECKING:
    from qbench.engine.evaluate import Progress, ResolvedRun
    from qbench.engine.features import EncodeCounter
    from qbench.engine.store import ResultStore, SaveResult


@dataclass(frozen=True)
class Outcome:
    """A configuration's document and how it was obtained (``computed`` False: served from the store)."""

    document: dict[str, Any]
    computed: bool
    saved: "SaveResult | None" = None


def evaluate_once(resolved: "ResolvedRun", store: "ResultStore", progress: "Progress", *, force: bool = False,
                  quantization_siblings: Sequence[str] | None = None, keep_quantized: bool = False,
                  counter: "EncodeCounter | None" = None, held_lock=None) -> Outcome:
    """The document of ``resolved``: served from ``store``, or computed under its lock and saved there.

    ``held_lock``: the configuration's lock, already taken by the caller (a sweep worker claiming units)."""
    from qbench.engine.store import CorruptDocument

    config_hash = resolved.config["config_hash"]
    started = time.time()
    if not force:
        stored = _stored(store, config_hash, progress)
        if stored is not None:
            return Outcome(stored, computed=False)
    remove_orphan_partials(store.root)
    lock = held_lock if held_lock is not None else store_lock(store, config_hash)
    if not lock.held:
        lock.acquire(lambda holder: progress.log(
            f"waiting for {holder.describe() if holder else 'another process'}, which is computing config {config_hash}"))
    try:
        try:
            stored = _stored(store, config_hash, progress, newer_than=started if force else None)
        except CorruptDocument:
            stored = None
        if stored is not None:
            return Outcome(stored, computed=False)
        document = _compute(resolved, store, progress, counter)
        saved = save_or_rescue(store, document)
    finally:
        lock.release()
    _release_quantized(resolved, store, quantization_siblings, keep_quantized)
    return Outcome(document, computed=True, saved=saved)


def store_lock(store: "ResultStore", config_hash: str):
    """The leased lock of ``config_hash`` in ``store`` (:class:`qbench.engine.locks.KeyLock`)."""
    from qbench.engine.locks import KeyLock

    return KeyLock(store.locks_dir, config_hash)


def _stored(store: "ResultStore", config_hash: str, progress: "Progress", newer_than: float | None = None) -> dict | None:
    """The stored document (a corrupt one is moved aside and reported, then treated as missing); with
    ``newer_than``, only a document written after that time (``--force``: another process just computed it)."""
    from qbench.engine.store import CorruptDocument

    try:
        document = store.get(config_hash)
        if document is not None:
            store.check_evidence_file(document)
    except CorruptDocument as problem:
        moved = store.quarantine(config_hash)
        where = f"moved to {moved}" if moved is not None else f"left in place ({problem.path})"
        progress.log(f"the stored result of config {config_hash} is corrupt ({problem.reason}); {where}, "
                     "computing it again")
        return None
    if document is None or newer_than is None:
        return document
    try:
        written = store.document_path(config_hash).stat().st_mtime
    except OSError:
        return None
    return document if written >= newer_than else None


def _compute(resolved: "ResolvedRun", store: "ResultStore", progress: "Progress", counter: "EncodeCounter | None") -> dict:
    """Run the evaluation; a failure leaves a one-line record in the store and propagates."""
    from qbench.engine.evaluate import run

    config_hash = resolved.config["config_hash"]
    try:
        return run(resolved, progress, counter)
    except QbenchError as error:
        _record(store, config_hash, str(error), "error")
        raise
    except KeyboardInterrupt:
        _record(store, config_hash, "interrupted (Ctrl-C or SIGINT)", "interrupted")
        raise
    except Exception as error:  # a bug or a library failure: recorded in one line, the traceback still shown
        detail = (str(error).splitlines() or [""])[0]
        _record(store, config_hash, f"{type(error).__name__}: {detail}", "crash")
        raise


def _record(store: "ResultStore", config_hash: str, message: str, kind: str) -> None:
    try:
        store.record_failure(config_hash, message, kind=kind)
    except OSError:
        pass  # the failure itself is what the user sees; a missing record only hides it from 'sweep status'


def save_or_rescue(store: "ResultStore", document: dict[str, Any]) -> "SaveResult":
    """``store.put(document)``; if the store cannot take it, the document goes to a temporary file and the raised
    error says where, so the computation is not lost."""
    from qbench.atomic import write_atomic
    from qbench.engine.store import stored_text

    try:
        return store.put(document)
    except QbenchError as error:
        config_hash = document["config"]["config_hash"]
        rescue = rescue_path(config_hash)
        try:
            evidence = getattr(document, "evidence_bytes", None)
            if evidence is not None:  # first, as in the store: the document never lies beside missing evidence
                from qbench.engine.evidence import evidence_path_for

                write_atomic(evidence_path_for(rescue), evidence)
            write_atomic(rescue, stored_text(document) + "\n")  # the store's format: it can be copied back as is
        except OSError:
            raise error from None
        raise QbenchError(f"{error}; the computed result was saved to {rescue} instead: copy it (and any "
                          f".evidence file beside it) to {store.document_path(config_hash).parent}/ once the store "
                          "is writable, then run 'qbench results --reindex'") from None


RESCUE_FOLDER = "qbench-unsaved"
"""Folder under the temporary directory (``$TMPDIR``) where results the store could not take are saved."""


def rescue_path(config_hash: str) -> Path:
    """Where :func:`save_or_rescue` saves the document of ``config_hash`` when the store refuses it."""
    return Path(tempfile.gettempdir()) / RESCUE_FOLDER / f"{config_hash}.json"


def _release_quantized(resolved: "ResolvedRun", store: "ResultStore", siblings: Sequence[str] | None,
                       keep: bool) -> None:
    """Drop the kept quantized model once every configuration that shares it is stored."""
    from qbench.engine.evaluate import feature_cache_root
    from qbench.engine.locks import KeyLock
    from qbench.engine.quantized_cache import QuantizedCache, default_quantized_cache

    root = feature_cache_root(resolved.request)
    if keep or root is None or resolved.checkpoint is not None:
        return
    if siblings is not None and not all(store.has(config_hash) for config_hash in siblings):
        return
    cache = QuantizedCache(default_quantized_cache(root))
    key = resolved.quantization_config["config_hash"]
    if not cache.folder(key).exists():
        return
    lock = KeyLock(cache.root / "locks", key)
    if lock.try_acquire():  # a process restoring or making it now holds the lock: leave the model to it
        try:
            cache.discard(key)
        finally:
            lock.release()
