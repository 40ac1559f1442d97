"""The results store: one SQLite row per evaluation, keyed by its configuration hash.

A repeated ``qbench eval`` with the same resolved configuration is served from here unless ``--force``.
The store lives at ``--store PATH``, else ``$QBENCH_STORE``, else ``~/.cache/qbench/results.sqlite``.
Rows export to a long-form pandas DataFrame (one row per result record, configuration as columns).
"""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

from qbench.errors import QbenchError

STORE_ENV = "QBENCH_STORE"
SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    config_hash TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    model TEXT NOT NULL,
    quantizer TEXT NOT NULL,
    bits TEXT NOT NULL,
    scope TEXT NOT NULL,
    document TEXT NOT NULL
)
"""


def default_store_path() -> Path:
    configured = os.environ.get(STORE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "qbench" / "results.sqlite"


class ResultStore:
    """Evaluation documents (the ``qbench eval --json`` object) in an embedded SQLite database."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else default_store_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(self._connect()) as connection, connection:
                connection.execute(SCHEMA)
        except (OSError, sqlite3.Error) as error:
            raise QbenchError(
                f"cannot open the results store {self.path} ({error}); pass --store PATH to a writable file"
            ) from None

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path)

    def get(self, config_hash: str) -> dict[str, Any] | None:
        with closing(self._connect()) as connection:
            row = connection.execute(
                "SELECT document FROM evaluations WHERE config_hash = ?", (config_hash,)
            ).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, document: dict[str, Any]) -> None:
        """Insert or replace the evaluation document under its configuration hash."""
        config = document["config"]
        with closing(self._connect()) as connection, connection:
            connection.execute(
                "INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    config["config_hash"],
                    document["provenance"]["created_at"],
                    config["model"],
                    config["quantizer"],
                    config["bits"],
                    config["scope"],
                    json.dumps(document, sort_keys=True),
                ),
            )

    def documents(self) -> list[dict[str, Any]]:
        with closing(self._connect()) as connection:
            rows = connection.execute("SELECT document FROM evaluations ORDER BY created_at").fetchall()
        return [json.loads(row[0]) for row in rows]

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
        frame = self.to_dataframe()
        frame.to_csv(path, index=False)
        return len(frame)


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
