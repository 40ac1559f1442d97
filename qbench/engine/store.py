"""The results store: one JSON document per evaluation (the source of truth), indexed by SQLite.

Why files first: a study run is hundreds of thousands of evaluations written by many jobs at once, often
on a cluster file system where SQLite cannot be shared safely. Each finished evaluation is written as
``documents/<h[:2]>/<h>.json`` (``h`` = its config hash) with :func:`qbench.atomic.write_atomic` (temporary
file, fsync, rename), so it is on disk, complete, before anything else happens. The SQLite index (WAL mode,
a busy timeout and retries) only lists what the files hold, for fast tables; if it is locked, read-only or
switched off, the document is still saved and :meth:`ResultStore.reindex` (``qbench results --reindex``)
rebuilds the index from the files at any time.

Layout. ``--store PATH``, else ``$QBENCH_STORE``, else ``~/.cache/qbench/results.sqlite``:

* a path ending in ``.sqlite``/``.sqlite3``/``.db`` is the index file and its documents live in the folder of
  the same name without the suffix (``results.sqlite`` → ``results/``), which keeps earlier stores working:
  their rows (documents inside SQLite) are written out as files the first time the store is opened;
* any other path is the store folder, with the index at ``index.sqlite`` inside it.

``$QBENCH_INDEX`` overrides where the index lives (a file path), or ``off`` writes documents only; cluster
jobs use ``off`` so that only one process, on one machine, ever writes the SQLite file.

Inside the store folder: ``documents/`` (results), ``failures/`` (the one-line error of the last failed
attempt of a configuration), ``locks/`` (one leased lock per configuration being computed, see
:mod:`qbench.engine.locks`), ``corrupt/`` (documents that failed their checksum, kept for inspection) and
``.partial/`` (files being written).

Every document file carries ``integrity.sha256``, the SHA-256 of its canonical JSON; a document whose bytes
changed after writing is reported as corrupt and never served.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from qbench.errors import QbenchError

STORE_ENV = "QBENCH_STORE"
INDEX_ENV = "QBENCH_INDEX"
INDEX_TIMEOUT_ENV = "QBENCH_INDEX_TIMEOUT_S"
DOCUMENT_FORMAT = "qbench-result-v1"
DEPLOY_CHECK_KIND = "deploy_check"
"""``kind`` of a ``qbench deploy-check`` record (:mod:`qbench.engine.deploy.check`)."""
DEPLOY_CHECK_FORMAT = "qbench-deploy-check-v1"
"""Integrity format of a ``qbench deploy-check`` record (another kind than a result document, so neither is ever
read as the other)."""
DEPLOY_CHECKS = "deploy_checks"
"""Store subfolder of the deploy-check records (``deploy_checks/<h[:2]>/<h>.json``); absent in stores without any."""
INTEGRITY_KEY = "integrity"
INDEX_SUFFIXES = (".sqlite", ".sqlite3", ".db")
HASH_PATTERN = re.compile(r"[0-9a-f]{16}")
DEFAULT_INDEX_TIMEOUT_S = 20.0
"""How long a write to a busy index is retried before the store gives up on indexing (the file stays saved)."""

INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    config_hash TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    model TEXT NOT NULL,
    weights_tag TEXT,
    quantizer TEXT NOT NULL,
    bits TEXT NOT NULL,
    scope TEXT NOT NULL,
    seed INTEGER,
    suites TEXT NOT NULL,
    verified INTEGER NOT NULL,
    limit_images INTEGER
)
"""
INDEX_COLUMNS = ("config_hash", "path", "sha256", "size", "mtime_ns", "created_at", "model", "weights_tag", "quantizer",
                 "bits", "scope", "seed", "suites", "verified")
"""Columns a qbench index must have; ``limit_images`` (``--limit`` runs) is added to indexes made before it."""
LEGACY_TABLE = "evaluations"
"""Table of stores written before the files-first layout (one row per evaluation, the document inside)."""

T = TypeVar("T")


class CorruptDocument(QbenchError):
    """A stored document whose bytes no longer match its checksum, or that is not a result document at all."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"stored result {path} is corrupt ({reason}); re-run the configuration to replace it "
                         f"(the file is moved to corrupt/ first)")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class SaveResult:
    """Where :meth:`ResultStore.put` wrote a document and whether the index knows it."""

    path: Path
    indexed: bool
    index_note: str | None = None

    def describe(self) -> str:
        """One line for the user; names the fix when the index was not updated."""
        if self.indexed or self.index_note is None:
            return f"saved {self.path}"
        return f"saved {self.path}; the index was not updated ({self.index_note}); run 'qbench results --reindex'"


@dataclass(frozen=True)
class IndexRow:
    """What the index keeps of one document (enough for tables without reading the files)."""

    config_hash: str
    path: str
    created_at: str
    model: str
    quantizer: str
    bits: str
    scope: str
    seed: int | None
    suites: str
    verified: bool
    limit: int | None = None  # config.limit: images per dataset of a partial (--limit) run; None for a full run


@dataclass
class SyncReport:
    """What :meth:`ResultStore.sync_index` changed."""

    added: int = 0
    updated: int = 0
    removed: int = 0
    corrupt: list[str] = field(default_factory=list)
    error: str | None = None


def default_store_path() -> Path:
    configured = os.environ.get(STORE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "qbench" / "results.sqlite"


def stored_text(document: dict[str, Any], integrity_format: str = DOCUMENT_FORMAT) -> str:
    """A document as its store file holds it: canonical JSON with the ``integrity`` record (format and SHA-256), so
    a copy of it placed under a store's ``documents/`` is read back and indexed like any stored result
    (``integrity_format``: :data:`DEPLOY_CHECK_FORMAT` for a deploy-check record)."""
    body = {key: value for key, value in document.items() if key != INTEGRITY_KEY}
    return canonical_text({**body, INTEGRITY_KEY: {"format": integrity_format, "sha256": document_sha256(body)}})


def canonical_text(document: dict[str, Any]) -> str:
    """Sorted-key compact JSON: what document checksums are computed over (NaN and ±inf allowed)."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)


def document_sha256(document: dict[str, Any]) -> str:
    """SHA-256 of a document's canonical JSON, without its own ``integrity`` field."""
    body = {key: value for key, value in document.items() if key != INTEGRITY_KEY}
    return hashlib.sha256(canonical_text(body).encode()).hexdigest()


def check_hash(config_hash: str) -> str:
    """``config_hash`` if it is 16 lowercase hex digits (a config hash), else a one-line error."""
    if not isinstance(config_hash, str) or not HASH_PATTERN.fullmatch(config_hash):
        raise QbenchError(f"bad config hash {config_hash!r}: expected 16 hex digits, see 'qbench results'")
    return config_hash


def index_timeout() -> float:
    raw = os.environ.get(INDEX_TIMEOUT_ENV)
    try:
        return float(raw) if raw is not None else DEFAULT_INDEX_TIMEOUT_S
    except ValueError:
        raise QbenchError(f"bad ${INDEX_TIMEOUT_ENV}={raw!r}: use a number of seconds, e.g. 20") from None


class ResultStore:
    """Evaluation documents as checksummed JSON files under a store folder, with a SQLite index beside them."""

    def __init__(self, path: Path | str | None = None, *, index: Path | str | bool | None = None) -> None:
        """``index``: None follows ``$QBENCH_INDEX`` (default: beside the documents); False writes documents only;
        a path puts the index there."""
        given = Path(path).expanduser() if path is not None else default_store_path()
        self.path = given
        if given.suffix in INDEX_SUFFIXES:
            self.root, default_index = given.with_suffix(""), given
        else:
            self.root, default_index = given, given / "index.sqlite"
        self.index_path = _index_choice(index, default_index)
        try:
            for folder in (self.documents_dir, self.failures_dir, self.locks_dir):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise QbenchError(f"cannot open the results store {self.root} ({error.strerror or error}); "
                              "pass --store PATH to a writable folder") from None
        for folder in (self.root, self.documents_dir, self.locks_dir):
            if not os.access(folder, os.W_OK):
                raise QbenchError(f"cannot write to the results store {self.root} ({folder} is read-only); "
                                  "pass --store PATH to a writable folder")
        self.index_note: str | None = None
        self._no_legacy = False
        self.set_aside: list[Path] = []  # corrupt rows of an earlier store's table, moved to corrupt/ on opening
        if self.index_path is not None:
            self._open_index()

    # -- layout ------------------------------------------------------------------------------------
    @property
    def documents_dir(self) -> Path:
        return self.root / "documents"

    @property
    def failures_dir(self) -> Path:
        return self.root / "failures"

    @property
    def locks_dir(self) -> Path:
        return self.root / "locks"

    @property
    def corrupt_dir(self) -> Path:
        return self.root / "corrupt"

    def document_path(self, config_hash: str) -> Path:
        check_hash(config_hash)
        return self.documents_dir / config_hash[:2] / f"{config_hash}.json"

    def evidence_path(self, config_hash: str) -> Path:
        """The per-sample evidence file beside the document (:mod:`qbench.engine.evidence`)."""
        from qbench.engine.evidence import evidence_path_for

        return evidence_path_for(self.document_path(config_hash))

    def check_evidence_file(self, document: dict[str, Any]) -> None:
        """Raise :class:`CorruptDocument` when ``document`` names evidence whose file is missing or altered."""
        import hashlib

        summary = document.get("evidence")
        if not isinstance(summary, dict):
            return
        config_hash = document["config"]["config_hash"]
        path = self.evidence_path(config_hash)
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as error:
            raise CorruptDocument(path, f"its evidence file cannot be read ({error.strerror or error})") from None
        if digest != summary.get("sha256"):
            raise CorruptDocument(path, "its evidence file fails its SHA-256 check")

    # -- documents ---------------------------------------------------------------------------------
    def get(self, config_hash: str) -> dict[str, Any] | None:
        """The stored document of ``config_hash``, None when there is none; :class:`CorruptDocument` when its
        file fails its checksum (never served)."""
        path = self.document_path(config_hash)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return self._legacy_document(config_hash)
        except OSError as error:
            raise QbenchError(f"cannot read stored result {path} ({error.strerror or error}); check the store's permissions") from None
        return parse_document(raw, path, config_hash)

    def has(self, config_hash: str) -> bool:
        """Whether a document file exists for ``config_hash`` (not checked; :meth:`get` checks)."""
        return self.document_path(config_hash).is_file()

    def put(self, document: dict[str, Any]) -> SaveResult:
        """Write ``document`` atomically under its config hash (replacing an earlier one), then index it.

        Raises only when the file could not be written; an index that is locked, read-only or off is
        reported in the returned :class:`SaveResult`.
        """
        from qbench.atomic import write_atomic

        config_hash = check_hash(str(document.get("config", {}).get("config_hash")))
        body = {key: value for key, value in document.items() if key != INTEGRITY_KEY}
        text = stored_text(document)
        path = self.document_path(config_hash)
        evidence = getattr(document, "evidence_bytes", None)
        try:
            if evidence is not None:  # first, so a document on disk always has its evidence beside it
                write_atomic(self.evidence_path(config_hash), evidence, root=self.root)
            write_atomic(path, text + "\n", root=self.root)
        except OSError as error:
            raise QbenchError(f"cannot write the result {path} ({error.strerror or error}); free space or pass --store "
                              "PATH to a writable folder") from None
        self.clear_failure(config_hash)
        if self.index_path is None:
            return SaveResult(path, False, self.index_note)
        try:
            self._retry(lambda: self._index_document(body, path))
        except sqlite3.Error as error:
            return SaveResult(path, False, f"{self.index_path}: {error}")
        return SaveResult(path, True)

    def match_hash(self, prefix: str) -> str:
        """The stored config hash equal to ``prefix`` or uniquely starting with it (a folder listing, no file read)."""
        stored = self.stored_hashes()
        matches = [prefix] if prefix in stored else sorted(h for h in stored if h.startswith(prefix.lower()))
        if len(matches) == 1 and prefix:
            return matches[0]
        if not matches:
            raise QbenchError(f"no evaluation {prefix!r} in the store {self.root}; see 'qbench results' for stored hashes")
        raise QbenchError(f"config hash prefix {prefix!r} is ambiguous: it matches {', '.join(matches[:5])}"
                          f"{' …' if len(matches) > 5 else ''}; give more characters")

    def stored_hashes(self) -> set[str]:
        """Config hashes with a document file (one folder listing per shard, no file is opened), and those of an
        earlier store's table that could not be written out (index off or elsewhere)."""
        return {config_hash for config_hash, _ in self._document_entries()} | self._legacy_hashes()

    def _document_entries(self) -> Iterator[tuple[str, os.DirEntry]]:
        """``(config hash, directory entry)`` of every document file."""
        for shard in _subfolders(self.documents_dir):
            for entry in os.scandir(shard):
                stem = entry.name[:-5] if entry.name.endswith(".json") else ""
                if HASH_PATTERN.fullmatch(stem):
                    yield stem, entry

    def documents(self, on_corrupt: Callable[[CorruptDocument], None] | None = None) -> list[dict[str, Any]]:
        """Every stored document, oldest first; corrupt files are skipped (``on_corrupt`` hears of each)."""
        found = []
        for config_hash in sorted(self.stored_hashes()):
            try:
                document = self.get(config_hash)
            except CorruptDocument as problem:
                if on_corrupt is not None:
                    on_corrupt(problem)
                continue
            if document is not None:
                found.append(document)
        return sorted(found, key=lambda doc: (str(doc.get("provenance", {}).get("created_at", "")), doc["config"]["config_hash"]))

    def quarantine(self, config_hash: str) -> Path | None:
        """Move a corrupt document to ``corrupt/<hash>.<time>.json`` (kept for inspection); its new path."""
        source = self.document_path(config_hash)
        if not source.exists():
            return None
        self.corrupt_dir.mkdir(parents=True, exist_ok=True)
        target = self.corrupt_dir / f"{config_hash}.{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%f')}.json"
        os.replace(source, target)
        evidence = self.evidence_path(config_hash)
        if evidence.exists():
            from qbench.engine.evidence import evidence_path_for

            os.replace(evidence, evidence_path_for(target))
        self._drop_from_index(config_hash)
        return target

    # -- failures ----------------------------------------------------------------------------------
    def record_failure(self, config_hash: str, message: str, **details: Any) -> Path:
        """Remember the one-line error of a failed attempt (shown by ``qbench sweep status``)."""
        import socket

        from qbench.atomic import write_atomic

        record = {"config_hash": check_hash(config_hash), "error": " ".join(str(message).split()) or "unknown error",
                  "host": socket.gethostname(), "pid": os.getpid(),
                  "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **details}
        path = self.failures_dir / f"{config_hash}.json"
        write_atomic(path, json.dumps(record, sort_keys=True) + "\n", root=self.root)
        return path

    def failure(self, config_hash: str) -> dict[str, Any] | None:
        """The last failure record of ``config_hash`` (None if it never failed or has since succeeded)."""
        try:
            record = json.loads((self.failures_dir / f"{check_hash(config_hash)}.json").read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def failed_hashes(self) -> set[str]:
        return {entry.name[:-5] for entry in os.scandir(self.failures_dir)
                if entry.name.endswith(".json") and HASH_PATTERN.fullmatch(entry.name[:-5])}

    def clear_failure(self, config_hash: str) -> None:
        try:
            (self.failures_dir / f"{check_hash(config_hash)}.json").unlink()
        except FileNotFoundError:
            pass

    # -- deploy checks -----------------------------------------------------------------------------
    # ``qbench deploy-check`` records (qbench.engine.deploy.check): files like the result documents (atomic,
    # checksummed, named by their config hash) in their own folder, not in the SQLite index (the folder is listed).
    @property
    def deploy_checks_dir(self) -> Path:
        """Where deploy-check records live (created by the first one written)."""
        return self.root / DEPLOY_CHECKS

    def deploy_check_path(self, check_hash: str) -> Path:
        """The file of the deploy-check record ``check_hash`` (checked to be a hash, so never outside the store)."""
        check_hash = check_hash_of(check_hash)
        return self.deploy_checks_dir / check_hash[:2] / f"{check_hash}.json"

    def put_deploy_check(self, record: dict[str, Any]) -> Path:
        """Write a deploy-check record atomically under its config hash (replacing an earlier one); its path."""
        from qbench.atomic import write_atomic

        path = self.deploy_check_path(str(record.get("config", {}).get("config_hash")))
        text = stored_text(record, DEPLOY_CHECK_FORMAT)
        try:
            write_atomic(path, text + "\n", root=self.root)
        except OSError as error:
            raise QbenchError(f"cannot write the deploy check {path} ({error.strerror or error}); free space or pass "
                              "--store PATH to a writable folder") from None
        return path

    def get_deploy_check(self, check_hash: str) -> dict[str, Any] | None:
        """The stored deploy-check record of ``check_hash`` (None when there is none; :class:`CorruptDocument` when
        its file fails its checksum)."""
        path = self.deploy_check_path(check_hash)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise QbenchError(f"cannot read stored deploy check {path} ({error.strerror or error}); check the store's "
                              "permissions") from None
        return parse_deploy_check(raw, path, check_hash)

    def deploy_checks(self, on_corrupt: Callable[[CorruptDocument], None] | None = None) -> list[dict[str, Any]]:
        """Every stored deploy-check record, oldest first; corrupt files are skipped (``on_corrupt`` hears of each).
        A store without the folder (made before deploy checks existed) has none."""
        found = []
        for shard in _subfolders(self.deploy_checks_dir):
            for entry in sorted(os.scandir(shard), key=lambda item: item.name):
                stem = entry.name[:-5] if entry.name.endswith(".json") else ""
                if not HASH_PATTERN.fullmatch(stem):
                    continue
                try:
                    found.append(parse_deploy_check(Path(entry.path).read_bytes(), Path(entry.path), stem))
                except CorruptDocument as problem:
                    if on_corrupt is not None:
                        on_corrupt(problem)
                except OSError:
                    continue
        return sorted(found, key=lambda record: (str(record.get("provenance", {}).get("created_at", "")),
                                                 record["config"]["config_hash"]))

    # -- exports -----------------------------------------------------------------------------------
    def to_dataframe(self):
        """Long-form results: one row per result record, with the configuration columns beside it."""
        import pandas as pd

        rows = [
            {**_config_columns(document), **record}
            for document in self.documents()
            for record in document["results"]
        ]
        return pd.DataFrame(rows)

    def export_csv(self, path: Path | str) -> int:
        """Write every result record as CSV to ``path`` (atomically; its folder must exist); the row count."""
        from qbench.atomic import write_output

        frame = self.to_dataframe()
        write_output(Path(path), frame.to_csv(index=False))
        return len(frame)

    # -- index -------------------------------------------------------------------------------------
    def index_rows(self) -> list[IndexRow]:
        """The index's rows, oldest first (bring it up to date with :meth:`sync_index` first)."""
        if self.index_path is None or not self.index_path.exists():
            return []
        with closing(self._connect()) as connection:
            rows = self._retry(lambda: connection.execute(
                "SELECT config_hash, path, created_at, model, quantizer, bits, scope, seed, suites, verified, limit_images "
                "FROM results ORDER BY created_at, config_hash").fetchall())
        return [IndexRow(*row[:9], bool(row[9]), row[10]) for row in rows]

    def sync_index(self, *, rebuild: bool = False) -> SyncReport:
        """Make the index list exactly the document files: add new ones, refresh changed ones, drop rows whose
        file is gone. ``rebuild`` re-reads every file. Errors end up in the report, never raised."""
        report = SyncReport()
        if self.index_path is None:
            report.error = self.index_note or "the index is off"
            return report
        try:
            self._retry(lambda: self._sync(report, rebuild))
        except sqlite3.Error as error:
            report.error = f"{self.index_path}: {error}"
        return report

    def reindex(self) -> SyncReport:
        """Rebuild the index from the document files (``qbench results --reindex``)."""
        from qbench.atomic import remove_orphan_partials

        remove_orphan_partials(self.root)
        if self.index_path is None:
            raise QbenchError(f"the index is off (${INDEX_ENV}=off); unset it or set it to an index file path to reindex")
        self._migrate_legacy()
        return self.sync_index(rebuild=True)

    def _sync(self, report: SyncReport, rebuild: bool) -> None:
        on_disk = {}
        for config_hash, entry in self._document_entries():
            stat = entry.stat()
            on_disk[config_hash] = (Path(entry.path), stat.st_size, stat.st_mtime_ns)
        with closing(self._connect()) as connection, connection:
            known = {row[0]: (row[1], row[2]) for row in connection.execute("SELECT config_hash, size, mtime_ns FROM results")}
            for config_hash in set(known) - set(on_disk):
                connection.execute("DELETE FROM results WHERE config_hash = ?", (config_hash,))
                report.removed += 1
            for config_hash, (path, size, mtime) in sorted(on_disk.items()):
                if not rebuild and known.get(config_hash) == (size, mtime):
                    continue
                try:
                    document = parse_document(path.read_bytes(), path, config_hash)
                except (CorruptDocument, OSError) as problem:
                    report.corrupt.append(str(getattr(problem, "path", path)))
                    connection.execute("DELETE FROM results WHERE config_hash = ?", (config_hash,))
                    continue
                if config_hash in known:
                    report.updated += 1
                else:
                    report.added += 1
                connection.execute(_UPSERT, _index_values(document, path, self.root))

    def _open_index(self) -> None:
        """Create the index table (WAL mode when nobody else has the file open); a failure only disables indexing.

        A file that is not a qbench index (another program's database, a table of another schema, not SQLite at
        all) is a one-line :class:`QbenchError` before anything is written or computed: writing our table into
        it would damage it, and results could never be indexed there."""
        foreign = None
        try:
            self.index_path.parent.mkdir(parents=True, exist_ok=True)
            with closing(self._connect()) as connection:
                foreign = self._retry(lambda: foreign_schema(connection))
                if foreign is None:
                    try:
                        connection.execute("PRAGMA journal_mode=WAL")
                    except sqlite3.OperationalError:
                        pass  # another connection holds the database; keep its journal mode
                    self._retry(lambda: _create_schema(connection))
        except sqlite3.DatabaseError as error:
            if "not a database" in str(error):
                foreign = "it is not an SQLite database"
            else:
                self.index_note = f"cannot open the index {self.index_path}: {error}"
                return
        except (OSError, sqlite3.Error) as error:
            self.index_note = f"cannot open the index {self.index_path}: {error}"
            return
        if foreign is not None:
            raise QbenchError(f"{self.index_path} is not a qbench results index ({foreign}); move it aside or pass "
                              "--store to another path, then 'qbench results --reindex' rebuilds the index from the "
                              f"result files under {self.documents_dir}")
        self._migrate_legacy()

    def _connect(self) -> sqlite3.Connection:
        timeout = min(index_timeout(), 5.0)
        connection = sqlite3.connect(self.index_path, timeout=timeout)
        connection.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        return connection

    def _retry(self, action: Callable[[], T]) -> T:
        """``action()``, retried with backoff while the database is busy or locked, for up to the index timeout."""
        deadline = time.monotonic() + index_timeout()
        pause = 0.05
        while True:
            try:
                return action()
            except sqlite3.OperationalError as error:
                text = str(error)
                if ("locked" not in text and "busy" not in text) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 1.0)

    def _index_document(self, document: dict[str, Any], path: Path) -> None:
        with closing(self._connect()) as connection, connection:
            connection.execute(_UPSERT, _index_values(document, path, self.root))

    def _drop_from_index(self, config_hash: str) -> None:
        if self.index_path is None:
            return
        try:
            with closing(self._connect()) as connection, connection:
                self._retry(lambda: connection.execute("DELETE FROM results WHERE config_hash = ?", (config_hash,)))
        except sqlite3.Error:
            pass

    # -- stores written before the files-first layout ----------------------------------------------
    @property
    def _legacy_path(self) -> Path:
        """Where a store of the earlier layout kept its documents: the ``.sqlite`` file the store is named by."""
        return self.path if self.path.suffix in INDEX_SUFFIXES else self.root / "index.sqlite"

    def _legacy_connection(self, *, writable: bool = False) -> sqlite3.Connection | None:
        """A connection to the earlier layout's table, or None. Read-only unless ``writable`` (the migration,
        which only runs where this process also owns the index: with the index off or elsewhere, cluster jobs
        read the old documents but never write that file)."""
        path = self._legacy_path
        if self._no_legacy or not path.is_file() or (writable and self.index_path != path):
            return None
        timeout = min(index_timeout(), 5.0)
        target = str(path) if writable else f"{path.resolve().as_uri()}?mode=ro"
        connection = sqlite3.connect(target, timeout=timeout, uri=not writable)
        found = connection.execute("SELECT name FROM sqlite_master WHERE type='table' AND name=?", (LEGACY_TABLE,)).fetchone()
        if found is None:
            connection.close()
            self._no_legacy = True  # no version writes that table any more: asking once per store object is enough
            return None
        return connection

    def _legacy_hashes(self) -> set[str]:
        try:
            connection = self._legacy_connection()
            if connection is None:
                return set()
            with closing(connection):
                return {row[0] for row in connection.execute(f"SELECT config_hash FROM {LEGACY_TABLE}")}
        except sqlite3.Error:
            return set()

    def _legacy_document(self, config_hash: str) -> dict[str, Any] | None:
        try:
            connection = self._legacy_connection()
            if connection is None:
                return None
            with closing(connection):
                row = connection.execute(f"SELECT document FROM {LEGACY_TABLE} WHERE config_hash = ?", (config_hash,)).fetchone()
        except sqlite3.Error:
            return None
        if row is None:
            return None
        problem = legacy_row_problem(row[0])
        if problem is not None:
            raise CorruptDocument(Path(f"{self._legacy_path}#{config_hash}"), problem)
        return json.loads(row[0])

    def _migrate_legacy(self) -> int:
        """Write every document of an earlier store's table out as a file (once; rows then point at files)."""
        try:
            connection = self._legacy_connection(writable=True)
            if connection is None:
                return 0
            with closing(connection):
                rows = connection.execute(f"SELECT config_hash, document FROM {LEGACY_TABLE}").fetchall()
                migrated = 0
                for config_hash, text in rows:
                    problem = legacy_row_problem(text, config_hash)
                    if problem is not None:  # kept for inspection, never lost: the table is dropped below
                        self.set_aside.append(self._set_aside_row(config_hash, text))
                    elif not self.document_path(config_hash).exists():
                        self.put(json.loads(text))
                        migrated += 1
                with connection:
                    connection.execute(f"DROP TABLE {LEGACY_TABLE}")
                return migrated
        except (sqlite3.Error, OSError, ValueError, QbenchError):
            return 0  # read-only or busy: documents stay readable from the table; retried next time


    def _set_aside_row(self, config_hash: Any, text: Any) -> Path:
        """Write a corrupt row of an earlier store's table to ``corrupt/`` (its text as it was); the new path."""
        from qbench.atomic import write_atomic

        name = str(config_hash) if HASH_PATTERN.fullmatch(str(config_hash)) else "row"
        stamp = datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%f')
        target = self.corrupt_dir / f"{name}.{stamp}.legacy-row.json"
        payload = text if isinstance(text, (str, bytes)) else str(text)
        write_atomic(target, payload, root=self.root)
        return target


def legacy_row_problem(text: Any, config_hash: Any = None) -> str | None:
    """Why a row of an earlier store's ``evaluations`` table is not a usable document (None when it is)."""
    if config_hash is not None and not HASH_PATTERN.fullmatch(str(config_hash)):
        return f"bad config hash {config_hash!r}"
    try:
        document = json.loads(text)
    except (TypeError, ValueError) as error:
        return f"not valid JSON: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    if not isinstance(document, dict) or not isinstance(document.get("config"), dict):
        return "not a qbench result document"
    if not HASH_PATTERN.fullmatch(str(document["config"].get("config_hash"))):
        return "its config has no valid config_hash"
    return None


def foreign_schema(connection: sqlite3.Connection) -> str | None:
    """Why the database behind ``connection`` is not a qbench index (None when it is one, or is empty): tables of
    another program, or a ``results``/``evaluations`` table without the columns qbench writes."""
    names = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    tables = {name: {row[1] for row in connection.execute(f"PRAGMA table_info('{name}')")}
              for name in names if not name.startswith("sqlite_") and "'" not in name}
    others = sorted(set(tables) - {"results", LEGACY_TABLE}) + [name for name in names if "'" in name]
    if others:
        return f"it holds other tables: {', '.join(others[:5])}"
    missing = [column for column in INDEX_COLUMNS if "results" in tables and column not in tables["results"]]
    if missing:
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        return f"its results table lacks the columns {', '.join(missing[:4])}{more}"
    if LEGACY_TABLE in tables and not {"config_hash", "document"} <= tables[LEGACY_TABLE]:
        return f"its {LEGACY_TABLE} table lacks the columns config_hash and document"
    return None


def _create_schema(connection: sqlite3.Connection) -> None:
    """The index table; an index made before ``limit_images`` existed gains the column, and its rows are marked
    stale (mtime -1) so the next sync re-reads their files."""
    with connection:
        connection.execute(INDEX_SCHEMA)
        columns = {row[1] for row in connection.execute("PRAGMA table_info('results')")}
        if "limit_images" not in columns:
            try:
                connection.execute("ALTER TABLE results ADD COLUMN limit_images INTEGER")
            except sqlite3.OperationalError as error:
                if "duplicate column" not in str(error):  # another process added it just now
                    raise
            connection.execute("UPDATE results SET mtime_ns = -1")


_UPSERT = ("INSERT OR REPLACE INTO results (config_hash, path, sha256, size, mtime_ns, created_at, model, weights_tag, "
           "quantizer, bits, scope, seed, suites, verified, limit_images) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def _index_values(document: dict[str, Any], path: Path, root: Path) -> tuple:
    config = document["config"]
    stat = path.stat()
    return (config["config_hash"], str(path.relative_to(root)), document_sha256(document), stat.st_size,
            stat.st_mtime_ns, str(document.get("provenance", {}).get("created_at", "")), config["model"],
            config.get("weights_tag"), config["quantizer"], config["bits"], config["scope"], config.get("seed"),
            suites_label(config), int(bool(document.get("verification", {}).get("passed"))), _limit_value(config))


def _limit_value(config: dict[str, Any]) -> int | None:
    """``config.limit`` as the index stores it: images per dataset of a ``--limit`` run, None for a full run."""
    limit = config.get("limit")
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


def suites_label(config: dict[str, Any]) -> str:
    """``name@version, …`` of a configuration's suites, as tables show them."""
    return ", ".join(f"{suite['name']}@{suite['version']}" for suite in config.get("suites", []))


def parse_document(raw: bytes, path: Path, config_hash: str | None = None) -> dict[str, Any]:
    """A stored document from its file bytes, checked: valid JSON, a result document, the checksum and the
    config hash (the file's name) match. Raises :class:`CorruptDocument` otherwise."""
    return _parse_checked(raw, path, config_hash, DOCUMENT_FORMAT, kind=None, what="qbench result document",
                          integrity="no integrity record", holds="config")


def _parse_checked(raw: bytes, path: Path, expected_hash: str | None, integrity_format: str, *, kind: str | None,
                   what: str, integrity: str, holds: str) -> dict[str, Any]:
    """The checks every stored JSON file gets (:func:`parse_document`, :func:`parse_deploy_check`): valid JSON, an
    object with a ``config`` (and ``kind``, when given), the integrity record of ``integrity_format`` and its
    checksum, and the config hash its file is named by; :class:`CorruptDocument` with what failed otherwise."""
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptDocument(path, f"not valid JSON: {str(error).splitlines()[0]}") from None
    if (not isinstance(document, dict) or (kind is not None and document.get("kind") != kind)
            or not isinstance(document.get("config"), dict)):
        raise CorruptDocument(path, f"not a {what}")
    record = document.pop(INTEGRITY_KEY, None)
    if not isinstance(record, dict) or record.get("format") != integrity_format:
        raise CorruptDocument(path, integrity)
    if record.get("sha256") != document_sha256(document):
        raise CorruptDocument(path, "checksum mismatch")
    if expected_hash is not None and document["config"].get("config_hash") != expected_hash:
        raise CorruptDocument(path, f"it holds {holds} {document['config'].get('config_hash')!r}, not {expected_hash}")
    return document


def check_hash_of(check_hash: str) -> str:
    """``check_hash`` if it is a config hash (16 lowercase hex digits), else a one-line error naming deploy checks."""
    if not isinstance(check_hash, str) or not HASH_PATTERN.fullmatch(check_hash):
        raise QbenchError(f"bad deploy-check hash {check_hash!r}: expected 16 hex digits (the record's config hash)")
    return check_hash


def parse_deploy_check(raw: bytes, path: Path, check_hash: str | None = None) -> dict[str, Any]:
    """A stored deploy-check record from its file bytes, checked like :func:`parse_document` (valid JSON, the
    ``deploy_check`` kind, its integrity format and checksum, the hash its file is named by); else
    :class:`CorruptDocument`."""
    return _parse_checked(raw, path, check_hash, DEPLOY_CHECK_FORMAT, kind=DEPLOY_CHECK_KIND,
                          what="qbench deploy-check record", integrity="no deploy-check integrity record",
                          holds="deploy check")


def _index_choice(index: Path | str | bool | None, default: Path) -> Path | None:
    if index is False:
        return None
    if index is not None and index is not True:
        return Path(index).expanduser()
    configured = os.environ.get(INDEX_ENV, "").strip()
    if configured.lower() == "off":
        return None
    return Path(configured).expanduser() if configured else default


def _subfolders(folder: Path) -> Iterator[Path]:
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir() and not entry.name.startswith("."):
            yield Path(entry.path)


def _config_columns(document: dict[str, Any]) -> dict[str, Any]:
    config = document["config"]
    return {
        "config_hash": config["config_hash"],
        "model": config["model"],
        "weights_tag": config["weights_tag"],
        "quantizer": config["quantizer"],
        "bits": config["bits"],
        "scope": config["scope"],
        "seed": config["seed"],
        "created_at": document["provenance"]["created_at"],
        "verification_passed": document["verification"]["passed"],
    }
