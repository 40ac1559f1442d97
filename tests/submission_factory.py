"""Real leaderboard submissions for tests: a toy evaluation run through the CLI, then 'qbench submit'.

Used by the session fixture ``submission_world`` (``tests/conftest.py``), so the leaderboard and hostile-catalogue
tests judge what the tool actually writes today, not a hand-made imitation that drifts from it.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


def run_qbench(*args: str) -> tuple[int, str, str]:
    """Run one ``qbench`` command in-process: exit code, stdout, stderr."""
    from qbench.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
            code = 0
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    return code, out.getvalue(), err.getvalue()


@dataclass(frozen=True)
class LegitSubmission:
    """A submission written by 'qbench submit' from a real toy evaluation: its JSON file and evidence file."""

    path: Path
    evidence: Path
    document: dict[str, Any]

    def copy_into(self, folder: Path) -> Path:
        """Copy the JSON and evidence files into ``folder`` (created); returns the JSON file's new path."""
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, folder / self.path.name)
        if self.evidence.is_file():
            shutil.copyfile(self.evidence, folder / self.evidence.name)
        return folder / self.path.name


class SubmissionWorld:
    """An isolated store, feature cache and config home; :meth:`submit` evaluates and submits once per setting."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[tuple[str, ...], LegitSubmission] = {}

    @contextlib.contextmanager
    def environment(self):
        """The world's store, cache and config home for the commands run inside (restored afterwards)."""
        with pytest.MonkeyPatch.context() as patch:
            patch.delenv("QBENCH_CONFIG", raising=False)
            patch.delenv("QBENCH_DATA", raising=False)
            patch.setenv("XDG_CONFIG_HOME", str(self.root / "xdg-config"))
            patch.setenv("QBENCH_STORE", str(self.root / "results.sqlite"))
            patch.setenv("QBENCH_CACHE", str(self.root / "features"))
            yield

    def evaluate(self, *eval_args: str) -> tuple[dict[str, Any], Path]:
        """``qbench eval --json EVAL_ARGS`` in the world: the document and the store's evidence file for it."""
        from qbench.engine.store import ResultStore

        with self.environment():
            code, out, err = run_qbench("eval", "--json", *eval_args)
            assert code == 0, err
            document = json.loads(out)
            return document, ResultStore().evidence_path(document["config"]["config_hash"])

    def submit(self, *eval_args: str, submitter: str = "Ada Lovelace") -> LegitSubmission:
        """``qbench eval --json EVAL_ARGS`` then ``qbench submit <hash prefix> --out <folder>``, memoised."""
        key = (*eval_args, submitter)
        if key not in self._made:
            with self.environment():
                code, out, err = run_qbench("eval", "--json", *eval_args)
                assert code == 0, err
                config_hash = json.loads(out)["config"]["config_hash"]
                folder = self.root / f"submitted-{len(self._made)}"
                code, _, err = run_qbench("submit", config_hash[:7], "--submitter", submitter, "--out", str(folder))
                assert code == 0, err
            (path,) = folder.glob("*.json")
            evidence = path.with_name(path.name[: -len(".json")] + ".evidence.safetensors")
            self._made[key] = LegitSubmission(path, evidence, json.loads(path.read_text()))
        return self._made[key]
