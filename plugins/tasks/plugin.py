"""Registers the six built-in task types through the same hook a third-party package uses."""

from __future__ import annotations

from qbench.hookspecs import hookimpl
from qbench.tasks import TaskType


@hookimpl
def qbench_register_task_types() -> list[type[TaskType]]:
    """zeroshot, ood, robustness, spurious, spectral and dropout."""
    from qbench_plugins.tasks.dropout import Dropout
    from qbench_plugins.tasks.ood import OODDetection
    from qbench_plugins.tasks.robustness import Robustness
    from qbench_plugins.tasks.spectral import Spectral
    from qbench_plugins.tasks.spurious import Spurious
    from qbench_plugins.tasks.zeroshot import ZeroShot

    return [ZeroShot, OODDetection, Robustness, Spurious, Spectral, Dropout]
