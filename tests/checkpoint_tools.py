"""Test helpers that forge quantized checkpoints the way a careful attacker would: edit a file and re-seal every
hash consistently (:func:`reseal`), so a test can reach the checks that stand behind the manifest hash."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qbench.engine.checkpoint import CONFIG_FILE, FORMAT, MANIFEST_KEY, STATE_FILE, manifest_digest
from qbench.engine.integrity import tensors_digest


def reseal(folder: Path, document: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``document`` (and ``tensors``, default: the stored ones) to the checkpoint ``folder`` with the
    tensors' SHA-256 and the manifest hash recomputed in both files, as ``save_checkpoint`` would."""
    tensors = load_file(str(folder / STATE_FILE)) if tensors is None else tensors
    document = json.loads(json.dumps(document))
    document["state"]["sha256"] = tensors_digest(tensors)
    digest = manifest_digest(document)
    document["manifest"] = {"sha256": digest}
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(folder / STATE_FILE),
              metadata={"format": FORMAT, "config_hash": str(document["config"]["config_hash"]), MANIFEST_KEY: digest})
    (folder / CONFIG_FILE).write_text(json.dumps(document, indent=1))
