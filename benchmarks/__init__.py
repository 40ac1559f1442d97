"""Declarative suite definitions shipped with qbench (``*.yaml`` in this folder)."""

from pathlib import Path

SUITE_DIR = Path(__file__).resolve().parent
