"""Envisioned outlier labels shipped with the toy world, for the EOE scorer (``scoring.md`` §1.6, §7).

The toy world has no published EOE label file and qbench runs no LLM by default, so it ships a
hand-written substitute: what an LLM could envision from the ten ID class names alone (3 near-OOD
labels per class, 50 far-OOD labels), never the generator's held-out classes. The file's
``_provenance`` says so, and the EOE scorer copies that into every result. The toy dataset plugin
ships :data:`EOE_LABELS` with its ID split (``DatasetSpec.resources``) under the EOE scorer's resource key
:data:`EOE_RESOURCE_KEY`, so the scorer finds it in ``ScoreContext.dataset_resources``.
"""

from __future__ import annotations

from pathlib import Path

EOE_LABELS_DIR = Path(__file__).resolve().parent / "eoe"
EOE_LABELS: Path = EOE_LABELS_DIR / "toy-ood.json"
EOE_RESOURCE_KEY = "eoe_labels"  # qbench_plugins.scorers.eoe_envision.LABELS_KEY (not imported: this module stays light)
