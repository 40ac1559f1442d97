"""Quantize once per quantization hash, even across crashes: quantized models kept as checkpoints.

An evaluation's expensive first half is calibration and, for QAT, training. Its result depends only on the
*quantization* part of the configuration (model and weights, quantizer and hyperparameters, bits, scope,
proxy, seed, device: :data:`qbench.engine.evaluate.QUANTIZATION_KEYS`), so it is kept under
``<cache>/quantized/<quantization hash>/`` in the ``qbench quantize --out`` format (safetensors + JSON,
never pickle) as soon as it exists. A later attempt of the same configuration, killed or preempted after
that point, and every configuration that shares the quantization (the same quantized model evaluated on
other suites) restore it instead of calibrating or training again. While a QAT method trains, its step
checkpoints live in ``<cache>/quantized/<hash>.training/`` (:mod:`qbench.quant.training_state`) and a
killed run resumes from the last one, bit-identically.

One process quantizes a given hash at a time (a leased lock, :mod:`qbench.engine.locks`); another that needs it
waits and restores the saved model. The restored model computes exactly what the freshly quantized one
does (the checkpoint round trip is tested bit for bit) and carries the same provenance, so a resumed
evaluation's document equals an uninterrupted one's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from qbench.errors import QbenchError

if TYPE_CHECKING:
    from qbench.model import VLM
    from qbench.quant.base import QuantizedModel
    from qbench.quant.training_state import TrainingCheckpoints

QUANTIZED_DIR = "quantized"
QAT_CHECKPOINT_EVERY = 50
"""Default number of QAT optimizer steps between step checkpoints."""


class Log:
    """What the cache needs of a progress reporter."""

    def log(self, message: str) -> None: ...


def default_quantized_cache(feature_root: Path) -> Path:
    """``quantized/`` inside the feature cache folder (``--cache-dir`` / ``$QBENCH_CACHE``)."""
    return Path(feature_root) / QUANTIZED_DIR


@dataclass(frozen=True)
class QuantizedCache:
    """Quantized models by quantization hash under ``root``; QAT step checkpoints every ``qat_every`` steps."""

    root: Path
    qat_every: int = QAT_CHECKPOINT_EVERY

    def folder(self, key: str) -> Path:
        return self.root / key

    def training_folder(self, key: str) -> Path:
        return self.root / f"{key}.training"

    def obtain(self, key: str, fp32: "VLM", quantize: Callable[["TrainingCheckpoints"], "QuantizedModel"],
               save: Callable[["QuantizedModel", Path], None], progress: Log) -> "QuantizedModel":
        """The quantized model of ``key``: restored when saved, else ``quantize(step_checkpoints)`` and
        ``save(model, folder)``, under the key's lock."""
        from qbench.atomic import remove_orphan_partials
        from qbench.engine.locks import compute_once

        remove_orphan_partials(self.root)
        training = self._training(key, progress)

        def make() -> "QuantizedModel":
            quantized = quantize(training)
            save(quantized, self.folder(key))
            training.clear()
            return quantized

        def waiting(holder) -> None:
            who = holder.describe() if holder is not None else "another process"
            progress.log(f"waiting for {who}, which is quantizing the same model (quantization {key})")

        quantized, _ = compute_once(self.root / "locks", key, lambda: self.restore(key, fp32, progress), make, waiting)
        return quantized

    def restore(self, key: str, fp32: "VLM", progress: Log) -> "QuantizedModel | None":
        """The saved quantized model of ``key``, or None when there is none or it cannot be used (then it is
        removed and the caller quantizes again)."""
        from qbench.atomic import remove_path
        from qbench.engine.checkpoint import CONFIG_FILE, read_checkpoint, restore_quantized

        folder = self.folder(key)
        if not (folder / CONFIG_FILE).is_file():
            return None
        try:
            checkpoint = read_checkpoint(folder)
            if checkpoint.config_hash != key:
                raise QbenchError(f"it holds quantization {checkpoint.config_hash}")
            quantized = restore_quantized(checkpoint, fp32, record_source=False)
        except QbenchError as problem:
            progress.log(f"the kept quantized model {folder} cannot be used ({problem}); quantizing again")
            remove_path(folder)
            return None
        progress.log(f"restored the quantized model from {folder} (kept from an earlier attempt); no calibration or training")
        return quantized

    def discard(self, key: str) -> None:
        """Remove the kept model of ``key`` (and any step checkpoint), once no configuration needs it."""
        from qbench.atomic import remove_path

        remove_path(self.folder(key))
        remove_path(self.training_folder(key))

    def _training(self, key: str, progress: Log) -> "TrainingCheckpoints":
        from qbench.quant.training_state import TrainingCheckpoints

        return TrainingCheckpoints(
            folder=self.training_folder(key), every_steps=self.qat_every, root=self.root,
            on_resume=lambda step, total: progress.log(f"resuming training from its step checkpoint: step {step} of {total}"),
            on_discard=lambda reason: progress.log(f"ignoring the step checkpoint in {self.training_folder(key)}: {reason}"),
        )
