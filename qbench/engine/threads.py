"""Torch CPU threads per process, chosen from the allocation and recorded in every result's provenance.

Left alone, torch starts one thread per visible core in every process. Two jobs on a shared node, or eight
local sweep workers on eight cores, then oversubscribe the CPU: on a busy machine the same 100 QAT steps cost
~400 CPU-seconds with default threads and 34 with one. qbench therefore always sets the thread count, in
this order of precedence:

1. ``--threads N`` (or ``threads:`` in a run or sweep file),
2. ``$SLURM_CPUS_PER_TASK`` inside a SLURM job (what the job was allocated),
3. the cores a sweep worker was given by its executor (``cores // max-parallel`` for local workers),
4. the cores this process may run on (``os.sched_getaffinity``), i.e. torch's own default, made explicit.

Training-based quantizers (``needs_grad``) quantize with :data:`TRAINING_THREADS` threads whatever the setting
(:func:`training_threads`): several of torch's CPU backward kernels sum in per-thread pieces (softmax and
LayerNorm backward, reductions of large tensors to one value), and a training run amplifies those last-bit
differences — measured on the built-in toy model: LSQ w4a8 accuracy 92.5 % vs 92.2 % with 1 and 2 threads, Q-ViT and
Q-VLM models differing after a few steps. The count does not enter the config hash because it does not vary:
the same hash gives the same trained model for any ``--threads``. Encoding still uses every thread.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from qbench.errors import QbenchError

TRAINING_THREADS = 1
"""Torch threads while a training-based quantizer quantizes (module notes): fixed, so never part of the hash."""
THREADS_ENV = "QBENCH_THREADS"
"""Set by sweep executors for the worker processes they start (precedence 3)."""


@dataclass(frozen=True)
class ThreadSetting:
    """How many torch threads this process uses and where that number came from (for provenance)."""

    threads: int
    source: str

    def to_dict(self) -> dict[str, object]:
        return {"torch_threads": self.threads, "source": self.source}


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a cgroup or ``taskset`` limit), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def choose_threads(requested: int | None = None) -> ThreadSetting:
    """The thread count by the precedence of the module docstring (nothing is changed yet)."""
    if requested is not None:
        if requested < 1:
            raise QbenchError(f"bad --threads {requested}: use a positive number of threads, e.g. --threads 4")
        return ThreadSetting(int(requested), "flag")
    for variable, source in (("SLURM_CPUS_PER_TASK", "slurm"), (THREADS_ENV, "executor")):
        raw = os.environ.get(variable, "").strip()
        if raw:
            if not raw.isdigit() or int(raw) < 1:
                raise QbenchError(f"bad ${variable}={raw!r}: it must be a positive number of CPUs")
            return ThreadSetting(int(raw), source)
    return ThreadSetting(usable_cores(), "cores")


def apply_threads(requested: int | None = None) -> ThreadSetting:
    """Choose the thread count and set it for torch (intra-op; inter-op too where torch still allows it)."""
    import torch

    setting = choose_threads(requested)
    torch.set_num_threads(setting.threads)
    try:
        torch.set_num_interop_threads(setting.threads)
    except RuntimeError:
        pass  # only settable before the first parallel region; intra-op threads are what matters here
    return setting


@contextmanager
def training_threads(trains: bool) -> Iterator[bool]:
    """Run the body with :data:`TRAINING_THREADS` torch threads when ``trains`` (a ``needs_grad`` quantizer), so
    its trained model does not depend on ``--threads``; the previous count is restored. Yields whether it pinned."""
    import torch

    previous = torch.get_num_threads()
    pinned = trains and previous != TRAINING_THREADS
    if pinned:
        torch.set_num_threads(TRAINING_THREADS)
    try:
        yield pinned
    finally:
        if pinned:
            torch.set_num_threads(previous)
