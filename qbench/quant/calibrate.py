"""Post-training calibration: stream proxy data through a model whose quantizers observe, then freeze.

PTQ methods build their quantizers in ``calibrate`` mode (float pass-through while observers collect
statistics), call :func:`calibrate` with the proxy images (and, in joint scope, the tokenized captions,
which exercise the text tower), then :func:`freeze_quantizers` to fix every (s, z). Text statistics skip
positions after the end-of-text token / padding (``quantizers.md`` §1.1) through
:func:`qbench.quant.observers.valid_tokens`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from qbench.errors import QbenchError
from qbench.model import VLM
from qbench.quant.base import CalibrationData
from qbench.quant.modules import Mode, eval_mode, quant_modules, tensor_quantizers
from qbench.quant.observers import text_token_mask, valid_tokens

__all__ = ["calibrate_and_freeze", "freeze_quantizers"]


@torch.no_grad()
def calibrate(
    vlm: VLM,
    images: torch.Tensor | None,
    tokens: torch.Tensor | None = None,
    *,
    batch_size: int = 100,
) -> dict[str, int]:
    """Encode ``images`` (and ``tokens``) in batches of ``batch_size`` so calibrating quantizers observe them.

    The model runs in eval mode (restored afterwards) without gradients. Returns how many images and
    texts went through.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with eval_mode(vlm):
        n_images = n_texts = 0
        if images is not None:
            for batch in images.split(batch_size):
                vlm.encode_image(batch)
                n_images += batch.shape[0]
        if tokens is not None:
            for batch in tokens.split(batch_size):
                with valid_tokens(text_token_mask(batch).to(vlm.device)):
                    vlm.encode_text(batch)
                n_texts += batch.shape[0]
    return {"images": n_images, "texts": n_texts}


def freeze_quantizers(model: nn.Module, *, strict: bool = True) -> list[str]:
    """Fix (s, z) of every quantizer still calibrating; returns the names of those that saw no data.

    Quantized modules freeze first (each observes its current weight), then remaining quantizers such as
    attention slots. With ``strict`` a quantizer without statistics is an error; otherwise it is left
    without (s, z) (it raises if ever used) and its name is returned, e.g. for a module the towers never
    execute.
    """
    missing: list[str] = []
    for name, module in quant_modules(model):
        missing += [f"{name}.{role}" for role in module.freeze()]
    for name, quantizer in tensor_quantizers(model):
        if quantizer.mode is Mode.CALIBRATE and not quantizer.freeze():
            missing.append(name)
    if strict and missing:
        raise RuntimeError(f"{len(missing)} quantizers saw no calibration data: {', '.join(missing[:5])}")
    return missing


def needs_calibration(model: nn.Module) -> bool:
    """Whether a static quantizer that needs data (anything but a module's weight quantizer) is calibrating.

    Weight quantizers observe their weight at freeze time and dynamic quantizers need no statistics, so a
    weight-only setting (``w4a16``) needs no calibration pass.
    """
    weights = {id(module.weight_quantizer) for _, module in quant_modules(model)}
    return any(
        quantizer.mode is Mode.CALIBRATE and not quantizer.dynamic and id(quantizer) not in weights
        for _, quantizer in tensor_quantizers(model)
    )


def calibrate_and_freeze(
    vlm: VLM,
    calibration: CalibrationData | None,
    towers: Sequence[str],
    *,
    n: int,
    batch_size: int,
    method: str,
) -> dict[str, Any]:
    """The standard PTQ pass: the first ``n`` proxy pairs through the towers in scope, then freeze.

    Images always go through (the image tower is always in scope); captions go through the text tower
    only when ``"text"`` is in ``towers``; the pass is skipped when no quantizer needs activation
    statistics (:func:`needs_calibration`). Returns a provenance fragment: source, fingerprint, counts and
    any quantizer left uncalibrated. Missing calibration data is a :class:`QbenchError`.
    """
    if calibration is None or len(calibration) == 0:
        raise QbenchError(f"quantizer {method!r} needs calibration data: pass a proxy (--proxy) with image-caption pairs")
    if n < 1:
        raise QbenchError(f"{method}: n_calibration must be >= 1, got {n}")
    subset = calibration.take(n)
    tokens = subset.tokens if "text" in towers else None
    if needs_calibration(vlm.model):
        counts = calibrate(vlm, subset.images, tokens, batch_size=batch_size)
    else:
        counts = {"images": 0, "texts": 0}  # weight-only: nothing observes activations
    uncalibrated = freeze_quantizers(vlm.model, strict=False)
    return {
        "source": subset.source,
        "fingerprint": subset.fingerprint,
        "n_images": counts["images"],
        "n_texts": counts["texts"],
        "batch_size": batch_size,
        "uncalibrated": uncalibrated,
    }
