"""All speed goals of issue 16 in one run: one line per goal, in a fixed order.

Usage: ``python benchmarks/perf/run_all.py [--quick] [--json] [--only P1,P2,P3,P4,startup]``

Printed, in this order (each with its goal)::

    P1 fp32 <passes per image> quantized <passes per image>   (goal 1.00 each, independent hook count)
    P2 toy <ratio>        (goal <= 1.10)     qbench eval without load/quantize over the bare forward passes
    P2 vitb32 <ratio>     (goal <= 1.10)     the same on a random-init ViT-B/32 at 224 px
    P3 <ratio>            (goal <= 1.0)      qbench / CLIP_benchmark user CPU, same weights and images
    P4 toy <ratio>        (goal <= 1.5)      fake-quant W8A8 forward / FP32 forward
    P4 vitb32 <ratio>     (goal <= 1.5)
    startup list <cpu-s> <MB>   (goal <= 1 CPU-s, <= 200 MB)   a fresh ``qbench list`` process
    startup help <cpu-s> <MB>   (no goal)                      a fresh ``qbench --help`` process

The contract with the benchmark scripts. Each goal's numbers come from its own script in ``benchmarks/perf``,
started as a child process ``python benchmarks/perf/<script>.py --quick --json`` (``--quick`` only when this
script has it) with ``OMP_NUM_THREADS=1``; each script runs its own interleaved repetitions (A, B, A, B, ...)
and must print **one JSON object on the last line of its stdout**, with these keys (numbers; ``null`` or absent
when not measured, optionally with a ``<key>_skipped`` reason)::

    benchmarks/perf/compute_once.py            p1_fp32, p1_quantized
    benchmarks/perf/p2.py                      p2_toy, p2_vitb32
    benchmarks/perf/clip_benchmark_compare.py  p3
    benchmarks/perf/fakequant.py               p4_toy, p4_vitb32

A missing script, a failing one, a last line that is not a JSON object or a missing key prints
``<name> not measured: <why>`` in that goal's place; the other goals are still measured. The startup lines are
measured here: ``qbench list`` and ``qbench --help`` alternate (list, help, list, ...; 3 times each with
``--quick``, else 5), and ``os.wait4`` gives each child's own user+system CPU and peak RSS (medians). This
process imports neither torch nor qbench, so a child's peak RSS is its own (a child inherits its parent's
high-water mark as a floor). ``--json`` adds one JSON object of every number as the last line; each script's
full output is kept under ``$OUT`` (or a temporary folder, printed) as ``<script>.out`` / ``<script>.err``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PERF = Path(__file__).resolve().parent
ROOT = PERF.parents[1]
SCRIPT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Benchmark:
    """A benchmark script and the JSON keys it owes this script."""

    goal: str
    script: str
    keys: tuple[str, ...]


BENCHMARKS = (
    Benchmark("P1", "compute_once.py", ("p1_fp32", "p1_quantized")),
    Benchmark("P2", "p2.py", ("p2_toy", "p2_vitb32")),
    Benchmark("P3", "clip_benchmark_compare.py", ("p3",)),
    Benchmark("P4", "fakequant.py", ("p4_toy", "p4_vitb32")),
)
GOALS = ("P1", "P2", "P3", "P4", "startup")


def child_environment(work: Path) -> dict[str, str]:
    """One torch thread, offline, and qbench's store, cache and config under ``work`` for every child."""
    environment = dict(os.environ)
    environment.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                        "TRANSFORMERS_OFFLINE": "1", "QBENCH_STORE": str(work / "store.sqlite"),
                        "QBENCH_CACHE": str(work / "cache"), "XDG_CONFIG_HOME": str(work / "xdg-config")})
    environment.pop("QBENCH_CONFIG", None)
    environment.pop("QBENCH_DATA", None)
    return environment


def supports(script: Path, flag: str) -> bool:
    """Whether ``script`` declares ``flag`` (read from its source: starting it just to ask costs its imports)."""
    return flag in script.read_text(encoding="utf-8", errors="replace")


def run_benchmark(benchmark: Benchmark, quick: bool, work: Path,
                  environment: dict[str, str]) -> tuple[dict[str, Any], str | None]:
    """Start one benchmark script; its last-line JSON object, or an empty dict and why there is none."""
    script = PERF / benchmark.script
    if not script.is_file():
        return {}, f"benchmarks/perf/{benchmark.script} does not exist"
    command = [sys.executable, str(script), "--json"] + (["--quick"] if quick and supports(script, "--quick") else [])
    stem = script.stem
    started = time.perf_counter()
    print(f"... {benchmark.goal}: {' '.join(['python', f'benchmarks/perf/{benchmark.script}', *command[2:]])}",
          file=sys.stderr, flush=True)
    try:
        done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True,
                              timeout=SCRIPT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {}, f"{benchmark.script} ran past {SCRIPT_TIMEOUT_S} s"
    (work / f"{stem}.out").write_text(done.stdout)
    (work / f"{stem}.err").write_text(done.stderr)
    print(f"... {benchmark.goal}: exit {done.returncode} after {time.perf_counter() - started:.0f} s", file=sys.stderr,
          flush=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return {}, f"{benchmark.script} exited {done.returncode}: {lines[-1][:200] if lines else 'no message'}"
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    try:
        values = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        values = None
    if not isinstance(values, dict):
        return {}, f"{benchmark.script} --json printed no JSON object on its last stdout line"
    return values, None


@dataclass(frozen=True)
class Usage:
    """One child's own CPU seconds (user + system) and peak RSS in MB."""

    cpu_s: float
    max_rss_mb: float


def measure_child(command: list[str], environment: dict[str, str]) -> Usage:
    """Run ``command`` (output discarded) and return its own CPU and peak RSS from ``os.wait4``."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment, cwd=ROOT)
    stderr = process.stderr.read() if process.stderr else b""
    _pid, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[1:])} exited {process.returncode}: "
                           f"{stderr.decode(errors='replace').strip()[-200:]}")
    return Usage(usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def measure_startup(quick: bool, environment: dict[str, str]) -> tuple[dict[str, Any], str | None]:
    """``qbench list`` and ``qbench --help`` as fresh processes, alternating; medians of CPU and peak RSS."""
    qbench = Path(sys.executable).parent / "qbench"
    executable = str(qbench) if qbench.is_file() else shutil.which("qbench")
    if executable is None:
        return {}, "the qbench command is not installed in this environment (pip install -e .)"
    commands = {"list": [executable, "list"], "help": [executable, "--help"]}
    usages: dict[str, list[Usage]] = {name: [] for name in commands}
    try:
        for _ in range(3 if quick else 5):
            for name, command in commands.items():
                usages[name].append(measure_child(command, environment))
    except RuntimeError as error:
        return {}, str(error)
    values = {}
    for name, measured in usages.items():
        values[f"startup_{name}_cpu_s"] = statistics.median(usage.cpu_s for usage in measured)
        values[f"startup_{name}_mb"] = statistics.median(usage.max_rss_mb for usage in measured)
    return values, None


def number(values: dict[str, Any], key: str) -> float | None:
    """``values[key]`` as a float, or None when absent, null or not a number."""
    value = values.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def why_missing(values: dict[str, Any], reasons: dict[str, str], goal: str, key: str, script: str) -> str:
    """The reason a number is absent: the script's failure, its own ``<key>_skipped`` note, or a missing key."""
    if goal in reasons:
        return reasons[goal]
    for note in (f"{key}_skipped", f"{key.split('_')[0]}_skipped"):
        if values.get(note):
            return str(values[note])
    return f"{script} --json printed no number for {key!r}"


def report(values: dict[str, Any], reasons: dict[str, str], goals: tuple[str, ...]) -> list[str]:
    """The goal lines, in the fixed order; a ``not measured`` line wherever a number is missing."""
    lines = []

    def ratio(name: str, goal: str, key: str, script: str, target: str) -> None:
        """Append the line of one ratio, or why it was not measured."""
        value = number(values, key)
        if value is None:
            lines.append(f"{name} not measured: {why_missing(values, reasons, goal, key, script)}")
        else:
            lines.append(f"{name} {value:.2f} ({target})")

    if "P1" in goals:
        fp32, quantized = number(values, "p1_fp32"), number(values, "p1_quantized")
        if fp32 is None or quantized is None:
            key = "p1_fp32" if fp32 is None else "p1_quantized"
            lines.append(f"P1 not measured: {why_missing(values, reasons, 'P1', key, 'compute_once.py')}")
        else:
            lines.append(f"P1 fp32 {fp32:.2f} quantized {quantized:.2f} (goal 1.00 each; forward passes per image, "
                         "independent hook count)")
    if "P2" in goals:
        ratio("P2 toy", "P2", "p2_toy", "p2.py", "goal <= 1.10")
        ratio("P2 vitb32", "P2", "p2_vitb32", "p2.py", "goal <= 1.10")
    if "P3" in goals:
        ratio("P3", "P3", "p3", "clip_benchmark_compare.py", "goal <= 1.0; qbench / CLIP_benchmark user CPU")
    if "P4" in goals:
        ratio("P4 toy", "P4", "p4_toy", "fakequant.py", "goal <= 1.5")
        ratio("P4 vitb32", "P4", "p4_vitb32", "fakequant.py", "goal <= 1.5")
    if "startup" in goals:
        for name, target in (("list", "goal <= 1 CPU-s, <= 200 MB"), ("help", "no goal")):
            cpu, memory = number(values, f"startup_{name}_cpu_s"), number(values, f"startup_{name}_mb")
            if cpu is None or memory is None:
                lines.append(f"startup {name} not measured: {reasons.get('startup', 'no measurement')}")
            else:
                lines.append(f"startup {name} {cpu:.2f} CPU-s {memory:.0f} MB ({target})")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run every selected benchmark once, then print the goal lines (and the JSON object with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each script's --quick setting (about 10 minutes here)")
    parser.add_argument("--json", action="store_true", help="also print every number as one JSON object, last line")
    parser.add_argument("--only", default=",".join(GOALS), type=lambda text: tuple(text.split(",")),
                        help=f"goals to measure, comma-separated (default: {','.join(GOALS)})")
    args = parser.parse_args(argv)
    unknown = [goal for goal in args.only if goal not in GOALS]
    if unknown:
        parser.error(f"unknown goal {', '.join(unknown)}; use some of {', '.join(GOALS)}")
    if os.environ.get("OUT"):
        work = Path(os.environ["OUT"]) / "run_all"
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="qbench-run-all-"))
    environment = child_environment(work)
    started = time.perf_counter()
    values: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    for benchmark in BENCHMARKS:
        if benchmark.goal not in args.only:
            continue
        measured, why = run_benchmark(benchmark, args.quick, work, environment)
        values.update({key: measured[key] for key in measured if key.startswith(benchmark.goal.lower())})
        if why is not None:
            reasons[benchmark.goal] = why
    if "startup" in args.only:
        measured, why = measure_startup(args.quick, environment)
        values.update(measured)
        if why is not None:
            reasons["startup"] = why
    for text in report(values, reasons, args.only):
        print(text)
    print(f"({'quick' if args.quick else 'full'} run, {time.perf_counter() - started:.0f} s; outputs in {work})")
    if args.json:
        print(json.dumps({key: value for key, value in values.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
