"""Regenerate the committed leaderboard from the toy world with the tool itself.

Runs ``benchmarks/sweeps/leaderboard-toy.yaml`` (the 16 study quantizers at W8A8 and W4A8 over the ID, OOD,
robustness and spurious suites) and one logit-tuned MinMax W4A8 evaluation into a fresh results store, submits
every stored configuration with its per-sample evidence (``qbench submit``), and re-renders
``leaderboard/README.md`` (``qbench leaderboard``). Every number in the result can be re-checked from the
evidence with ``qbench leaderboard --check``, which CI runs.

    python scripts/toy_leaderboard.py [--max-parallel 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "benchmarks" / "sweeps" / "leaderboard-toy.yaml"
SUBMISSIONS = REPO / "leaderboard" / "submissions"
SUBMITTER = "qbench maintainers"
SUITES = ("toy-id", "toy-ood", "robustness", "spurious")
TUNED_RUN = ("--model", "toy-clip", "--quantizer", "minmax", "--bits", "w4a8", "--logit-tuning")


def qbench(*args: str, env: dict[str, str]) -> str:
    """Run one ``qbench`` command; its stdout, or exit with its one-line error."""
    done = subprocess.run([sys.executable, "-m", "qbench", *args], env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"qbench {' '.join(args)} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-parallel", default="2")
    parser.add_argument("--threads", default="1", help="torch threads per evaluation")
    parser.add_argument("--work", default=None, help="store and cache folder (default: a new temporary folder)")
    options = parser.parse_args()
    work = Path(options.work or tempfile.mkdtemp(prefix="qbench-leaderboard-"))
    env = {**os.environ, "QBENCH_STORE": str(work / "results.sqlite"), "QBENCH_CACHE": str(work / "cache"),
           "OMP_NUM_THREADS": options.threads}
    env.pop("QBENCH_CONFIG", None)
    env.pop("QBENCH_DATA", None)
    qbench("sweep", "run", str(SWEEP), "--executor", "local", "--max-parallel", options.max_parallel, env=env)
    suites = [argument for suite in SUITES for argument in ("--suite", suite)]
    qbench("eval", *TUNED_RUN, *suites, "--threads", options.threads, "--json", env=env)
    hashes = sorted(path.stem for path in (work / "results" / "documents").glob("*/*.json")
                    if json.loads(path.read_text())["config"]["quantizer"] != "fp32")  # the sweep's warm FP32 unit:
    # every row already shows its FP32 reference
    shutil.rmtree(SUBMISSIONS, ignore_errors=True)
    SUBMISSIONS.mkdir(parents=True)
    for config_hash in hashes:
        qbench("submit", config_hash, "--submitter", SUBMITTER, "--out", str(SUBMISSIONS), env=env)
    qbench("leaderboard", env=env)
    print(json.dumps({"submissions": len(hashes), "work": str(work)}))


if __name__ == "__main__":
    main()
