"""Built-in benchmark suites: every versioned YAML file in the ``benchmarks/`` folder."""

from __future__ import annotations

from qbench.hookspecs import hookimpl
from qbench.suites import SuiteSpec, load_suite_dir


@hookimpl
def qbench_register_suites() -> list[SuiteSpec]:
    from qbench_benchmarks import SUITE_DIR

    return load_suite_dir(SUITE_DIR)
