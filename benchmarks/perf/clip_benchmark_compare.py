"""P3: qbench against LAION's CLIP_benchmark on zero-shot classification, same weights, same images.

What is compared. Both tools, each through its own command line and as its own child process, classify the
same 100 CIFAR-format images with the same random-init open_clip ViT-B-32 weights:

* CLIP_benchmark: ``clip_benchmark eval --dataset=cifar10 --model=ViT-B-32 --pretrained=FILE
  --dataset_root=ROOT --task=zeroshot_classification --no_amp --num_workers=0`` (float32 on the CPU);
* qbench: ``qbench eval --model clip-vit-b32-laion2b --quantizer fp32 --suite cifar10 --data-root ROOT
  --weights FILE --limit 100 --workers 0 --threads 1 --no-feature-cache`` (a fresh store every run, so nothing
  is served from an earlier one).

The weights are one random-init ``ViT-B-32`` state dict saved once as ``.safetensors`` (open_clip reads it for
both tools; nothing is unpickled). The images are a synthetic CIFAR-10 test set written in the official on-disk
layout, ``cifar-10-batches-py/{test_batch,batches.meta}`` (Python pickles of plain dicts and uint8 arrays,
protocol 2 like the official files): qbench reads it with its restricted unpickler
(``plugins/datasets/cifar.py``), CLIP_benchmark through torchvision's ``CIFAR10``, which unpickles it; the
file is our own, written by this script. torchvision also checks the MD5 of the official archive's files,
which a synthetic file cannot match, so CLIP_benchmark is started as ``python -c`` that switches that check
off (``CIFAR10._check_integrity`` and ``cifar.check_integrity``), replaces CLIP_benchmark 1.6.2's top-k
``accuracy`` helper (which fails under NumPy 2) by the same computation, and then calls
``clip_benchmark.cli.main`` with the arguments above: everything else is CLIP_benchmark's own code path.

How it is measured. Both children run with ``OMP_NUM_THREADS=1`` (and qbench ``--threads 1``), decode in
their own process (no loader workers), and run interleaved (qbench, CLIP_benchmark, qbench, ...). For each
child, ``os.wait4`` gives its own user and system CPU and peak RSS (children of the child that it waited for
included); the weights and images are written by a separate child, so this process imports neither torch nor
NumPy and its small footprint is the only floor under a child's peak RSS. Printed: the median CPU of each tool, ``P3 <qbench / CLIP_benchmark user CPU>`` (the issue's
measure; goal <= 1.0), the same ratio for user+system, peak RSS, and both top-1 accuracies (they differ when
the prompt templates differ: issue 18 notes qbench's CIFAR templates are not CLIP_benchmark's).

Usage: ``python benchmarks/perf/clip_benchmark_compare.py [--quick] [--repeats 3] [--json] [--keep DIR]``
(``--quick``: one run of each; ``--json``: a single JSON object on the last stdout line; files go under
``$OUT`` if set, else a temporary folder that is removed afterwards). Without CLIP_benchmark installed it
prints ``P3 skipped: <reason and fix>``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCH = "ViT-B-32"
QBENCH_MODEL = "clip-vit-b32-laion2b"
"""The zoo entry whose architecture is open_clip's ``ViT-B-32`` (no QuickGELU), as CLIP_benchmark builds it."""
N_IMAGES = 100
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
GOAL = 1.0
CHILD_TIMEOUT_S = 1200

CLIP_BENCHMARK_LAUNCHER = """
import sys
import torchvision.datasets.cifar as cifar
# A synthetic CIFAR-10 cannot match the official archive's MD5 sums; only that check is switched off.
cifar.CIFAR10._check_integrity = lambda self: True
cifar.check_integrity = lambda *args, **kwargs: True
import clip_benchmark.metrics.zeroshot_classification as zeroshot


def accuracy(output, target, topk=(1,)):
    # CLIP_benchmark 1.6.2's top-k accuracy with .item() for float(array of shape (1,)), an error under NumPy 2
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


zeroshot.accuracy = accuracy
from clip_benchmark.cli import main
sys.argv = ["clip_benchmark", *sys.argv[1:]]
sys.exit(main())
"""
"""``python -c`` source that runs CLIP_benchmark's own command line with torchvision's MD5 check disabled and its
top-k accuracy helper made NumPy-2 safe (1.6.2 calls ``float()`` on a 1-element array, a TypeError under NumPy 2;
the replacement computes the same number)."""


@dataclass(frozen=True)
class ChildUsage:
    """What one child process cost: CPU seconds (user, system), peak resident memory and wall time."""

    user_s: float
    system_s: float
    max_rss_mb: float
    wall_s: float

    @property
    def cpu_s(self) -> float:
        """User plus system CPU seconds."""
        return self.user_s + self.system_s


def clip_benchmark_missing() -> str | None:
    """Why CLIP_benchmark's command line cannot start here (one line naming the fix), or None if it can.

    Checked in a child process, so a failing import (e.g. a missing dependency) is reported, not raised, and
    the parent's imports stay unchanged."""
    probe = subprocess.run([sys.executable, "-c", "import clip_benchmark.cli"], capture_output=True, text=True,
                           timeout=300)
    if probe.returncode == 0:
        return None
    lines = [line for line in probe.stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else f"exit status {probe.returncode}"
    return (f"cannot import clip_benchmark.cli ({last}); install it with: pip install clip_benchmark requests "
            "(or pip install -e '.[perf]')")


def write_weights(path: Path, seed: int = 0) -> None:
    """A random-init open_clip ``ViT-B-32`` state dict as ``.safetensors`` (written atomically), the one set of
    weights both tools load."""
    import open_clip
    import torch
    from safetensors.torch import save

    from qbench.atomic import write_atomic

    torch.manual_seed(seed)
    model = open_clip.create_model(ARCH, pretrained=None)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    write_atomic(path, save(state))


def synthetic_images(n: int, seed: int = 0) -> "Any":
    """``n`` smooth random 32x32 RGB images as CIFAR's ``n x 3072`` uint8 rows (channel-major R, G, B planes)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(n, 3, 8, 8))
    images = coarse.repeat(4, axis=2).repeat(4, axis=3) + rng.normal(0, 12, size=(n, 3, 32, 32))
    return np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072)


def write_cifar10(root: Path, n: int = N_IMAGES, seed: int = 0) -> None:
    """A synthetic CIFAR-10 test set in the official layout ``root/cifar-10-batches-py/{test_batch,batches.meta}``.

    Pickles of plain dicts (str keys, lists, uint8 arrays) at protocol 2, as the official Python 2 files are;
    qbench's restricted unpickler and torchvision both read them. Labels cycle through the 10 classes."""
    from qbench.atomic import write_atomic

    folder = root / "cifar-10-batches-py"
    test = {"batch_label": "synthetic testing batch 1 of 1", "labels": [index % 10 for index in range(n)],
            "data": synthetic_images(n, seed), "filenames": [f"synthetic_{index:05d}.png" for index in range(n)]}
    meta = {"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": n, "num_vis": 3072}
    write_atomic(folder / "test_batch", pickle.dumps(test, protocol=2))
    write_atomic(folder / "batches.meta", pickle.dumps(meta, protocol=2))


def console_script(name: str) -> str:
    """The path of an installed console script, preferring the one beside this interpreter (the same venv)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} is not installed in this environment; pip install it first")
    return found


def child_environment(work: Path) -> dict[str, str]:
    """The environment of both children: one thread, offline, and qbench's store and caches under ``work``."""
    environment = dict(os.environ)
    environment.update({
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "QBENCH_CACHE": str(work / "qbench-cache"), "QBENCH_STORE": str(work / "qbench-store.sqlite"),
        "XDG_CONFIG_HOME": str(work / "xdg"), "TQDM_DISABLE": "1",
    })
    environment.pop("QBENCH_CONFIG", None)
    environment.pop("QBENCH_DATA", None)
    return environment


def measure_child(label: str, command: list[str], environment: dict[str, str], stdout: Path,
                  stderr: Path) -> ChildUsage:
    """Run ``command`` to completion and return its own CPU and peak RSS (``os.wait4`` on its pid).

    A non-zero exit raises ``SystemExit`` with the tail of its stderr, so a broken run never yields a ratio."""
    started = time.perf_counter()
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=environment)
        try:
            _pid, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            process.wait()
            raise
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    wall = time.perf_counter() - started
    if process.returncode != 0:
        tail = "\n".join(stderr.read_text(errors="replace").strip().splitlines()[-8:])
        raise SystemExit(f"{label} exited {process.returncode} (log: {stderr}):\n{tail}")
    return ChildUsage(usage.ru_utime, usage.ru_stime, usage.ru_maxrss / 1024, wall)


def qbench_command(root: Path, weights: Path, store: Path, limit: int) -> list[str]:
    """``qbench eval`` of the FP32 model on the synthetic CIFAR-10, JSON on stdout."""
    return [console_script("qbench"), "eval", "--model", QBENCH_MODEL, "--quantizer", "fp32", "--suite", "cifar10",
            "--data-root", str(root), "--weights", str(weights), "--limit", str(limit), "--json",
            "--no-feature-cache", "--threads", "1", "--workers", "0", "--store", str(store)]


def clip_benchmark_command(root: Path, weights: Path, output: Path) -> list[str]:
    """CLIP_benchmark's ``eval`` (through :data:`CLIP_BENCHMARK_LAUNCHER`) on the same files, float32."""
    return [sys.executable, "-c", CLIP_BENCHMARK_LAUNCHER, "eval", "--dataset=cifar10", f"--dataset_root={root}",
            f"--model={ARCH}", f"--pretrained={weights}", "--task=zeroshot_classification", "--no_amp",
            "--num_workers=0", f"--output={output}", "--quiet"]


def qbench_top1(stdout: Path) -> float:
    """The FP32 top-1 accuracy of the qbench run (its ``--json`` document's accuracy record)."""
    document = json.loads(stdout.read_text())
    for record in document["results"]:
        if record.get("metric") == "accuracy":
            return float(record["fp32"])
    raise SystemExit("qbench's document has no accuracy record")


def clip_benchmark_top1(output: Path) -> float:
    """CLIP_benchmark's ``acc1`` from its ``--output`` JSON."""
    return float(json.loads(output.read_text())["metrics"]["acc1"])


def prepare(work: Path, weights: Path, root: Path, environment: dict[str, str]) -> None:
    """Write the weights and the images in a child process (``--prepare``).

    Why a child: a process started by this one inherits its peak RSS as a floor of ``ru_maxrss`` (the kernel
    carries the pre-``exec`` high-water mark over), so this process imports neither torch nor NumPy and stays
    small, and the peak RSS measured for each tool is the tool's own."""
    command = [sys.executable, str(Path(__file__).resolve()), "--prepare", str(work), str(weights), str(root)]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if done.returncode != 0:
        raise SystemExit(f"preparing the weights and images failed:\n{done.stderr.strip()[-2000:]}")


def compare(work: Path, repeats: int, log) -> dict[str, Any]:
    """Write the weights and images under ``work``, run both tools ``repeats`` times interleaved, and return the
    medians, ratios and accuracies."""
    weights, root = work / "vit-b-32-random.safetensors", work / "data"
    environment = child_environment(work)
    prepare(work, weights, root, environment)
    runs: dict[str, list[ChildUsage]] = {"qbench": [], "clip_benchmark": []}
    accuracy: dict[str, float] = {}
    for repeat in range(repeats):
        store = work / f"store-{repeat}.sqlite"  # a fresh store: the run is never skipped as already stored
        usage = measure_child("qbench eval", qbench_command(root, weights, store, N_IMAGES), environment,
                              work / f"qbench-{repeat}.json", work / f"qbench-{repeat}.log")
        runs["qbench"].append(usage)
        accuracy["qbench"] = qbench_top1(work / f"qbench-{repeat}.json")
        log(f"  qbench         run {repeat + 1}: user {usage.user_s:6.2f} s  sys {usage.system_s:5.2f} s  "
            f"peak RSS {usage.max_rss_mb:6.0f} MB  wall {usage.wall_s:6.1f} s")
        output = work / f"clip_benchmark-{repeat}.json"
        usage = measure_child("clip_benchmark eval", clip_benchmark_command(root, weights, output), environment,
                              work / f"clip_benchmark-{repeat}.out", work / f"clip_benchmark-{repeat}.log")
        runs["clip_benchmark"].append(usage)
        accuracy["clip_benchmark"] = clip_benchmark_top1(output)
        log(f"  CLIP_benchmark run {repeat + 1}: user {usage.user_s:6.2f} s  sys {usage.system_s:5.2f} s  "
            f"peak RSS {usage.max_rss_mb:6.0f} MB  wall {usage.wall_s:6.1f} s")
    median = {tool: {"user_s": statistics.median(u.user_s for u in usages),
                     "cpu_s": statistics.median(u.cpu_s for u in usages),
                     "max_rss_mb": max(u.max_rss_mb for u in usages)}
              for tool, usages in runs.items()}
    return {
        "p3": median["qbench"]["user_s"] / median["clip_benchmark"]["user_s"],
        "p3_user_system": median["qbench"]["cpu_s"] / median["clip_benchmark"]["cpu_s"],
        "qbench_user_s": median["qbench"]["user_s"], "clip_benchmark_user_s": median["clip_benchmark"]["user_s"],
        "qbench_cpu_s": median["qbench"]["cpu_s"], "clip_benchmark_cpu_s": median["clip_benchmark"]["cpu_s"],
        "qbench_peak_rss_mb": median["qbench"]["max_rss_mb"],
        "clip_benchmark_peak_rss_mb": median["clip_benchmark"]["max_rss_mb"],
        "qbench_top1": accuracy["qbench"], "clip_benchmark_top1": accuracy["clip_benchmark"],
        "repeats": repeats, "images": N_IMAGES,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the comparison in ``$OUT`` or a temporary folder, print the P3 lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run of each tool (default: --repeats)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each tool (median)")
    parser.add_argument("--json", action="store_true", help="also print one JSON object as the last stdout line")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep its files")
    parser.add_argument("--prepare", nargs=3, type=Path, metavar=("WORK", "WEIGHTS", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:  # the child of prepare(): the only place that imports torch, NumPy and qbench
        _work, weights, root = args.prepare
        write_weights(weights)
        write_cifar10(root)
        return 0
    repeats = 1 if args.quick else max(1, args.repeats)
    log = (lambda message: print(message, file=sys.stderr)) if args.json else print

    missing = clip_benchmark_missing()
    if missing is not None:
        print(f"P3 skipped: {missing}")
        if args.json:
            print(json.dumps({"p3": None, "p3_skipped": missing}))
        return 0
    base = args.keep or (Path(os.environ["OUT"]) / "p3" if os.environ.get("OUT") else None)
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="p3-", dir=base))
    else:
        work = Path(tempfile.mkdtemp(prefix="qbench-p3-"))
    try:
        log(f"P3: {N_IMAGES} synthetic CIFAR-10 images, random-init {ARCH}, {repeats} interleaved run(s) of each "
            f"tool, 1 thread each (files in {work})")
        result = compare(work, repeats, log)
    finally:
        if base is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"P3 {result['p3']:.2f} (goal <= {GOAL:.1f}; qbench / CLIP_benchmark user CPU, median of {repeats}: "
          f"{result['qbench_user_s']:.1f} s / {result['clip_benchmark_user_s']:.1f} s; user+system "
          f"{result['p3_user_system']:.2f})")
    print(f"P3 peak RSS: qbench {result['qbench_peak_rss_mb']:.0f} MB, CLIP_benchmark "
          f"{result['clip_benchmark_peak_rss_mb']:.0f} MB")
    print(f"P3 top-1: qbench {result['qbench_top1']:.4f}, CLIP_benchmark {result['clip_benchmark_top1']:.4f} "
          "(templates differ until issue 18 is fixed)")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
