"""Block-level machinery shared by blockwise PTQ methods (QwT, APQ-ViT, Q-VLM; ``quantizers.md`` §2.4–2.8).

Blockwise methods fit something per block (a compensation, clip ratios, ranges) from what the block sees
on the calibration set *inside the model as it stands*, i.e. with every earlier block already quantized
and fitted. They all need the same four operations, implemented once here:

* :func:`capture_block_inputs` / :func:`capture_block_outputs` — run the calibration batches through the
  tower that owns a block and record, per batch, the arguments the block was called with (the residual
  stream *and* its keyword arguments such as the text tower's causal ``attn_mask``) or the tensor it
  returned. The forward stops right there (nothing after the block runs), so capturing block k of a
  K-block tower costs the prefix only.
* :func:`run_block` — call one block on captured arguments with its quantizers on (``quantized=True``)
  or off (the float block), restoring every quantizer's mode afterwards (:func:`quantizers_enabled`).
* :func:`token_rows` — the ``(rows, d)`` view of a block tensor over the positions that count: every
  token of an image, the text positions up to and including end-of-text (``quantizers.md`` §1.1), using
  the same mask helpers as the observers (:mod:`qbench.quant.observers`).
* :func:`block_output_error` — ``Σ (w ⊙ (Ô − O))²`` over those rows, optionally gradient-weighted and
  keeping only the largest fraction of element terms (APQ-ViT's bottom elimination); plain squared error
  (Q-VLM, QwT diagnostics) with the defaults.

A "block" is any ``nn.Module`` called once per forward of its tower (open_clip's residual blocks as found
by :func:`qbench.quant.structure.transformer_blocks`, or any other module a method groups layers into).
Forward hooks registered on the block (e.g. a QwT compensation) run as part of it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from qbench.model import VLM
from qbench.quant.base import CalibrationData
from qbench.quant.modules import Mode, eval_mode, tensor_quantizers
from qbench.quant.observers import select_valid_tokens, text_token_mask, valid_tokens


@dataclass(frozen=True)
class BlockCall:
    """The arguments one block received on one calibration batch.

    ``args``/``kwargs`` are exactly what the tower passed (tensors detached); ``valid`` is the ``(B, L)``
    mask of text positions that count (up to end-of-text), None for images (every token counts).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    valid: torch.Tensor | None = None

    @property
    def x(self) -> torch.Tensor:
        """The residual stream entering the block (its first tensor argument)."""
        return stream_input(self.args, self.kwargs)

    def with_x(self, x: torch.Tensor) -> "BlockCall":
        """The same call with another residual stream (e.g. to propagate a block's output to the next)."""
        if self.args:
            return replace(self, args=(x, *self.args[1:]))
        key = next(key for key, value in self.kwargs.items() if isinstance(value, torch.Tensor))
        return replace(self, kwargs={**self.kwargs, key: x})


def stream_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The first tensor among a call's positional, then keyword, arguments (the block's input stream)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise ValueError("the block was called without a tensor argument")


class _StopForward(Exception):
    """Raised by a capture hook once the block has been seen, to skip the rest of the tower."""


def tower_inputs(tower: str | None, data: CalibrationData) -> dict[str, torch.Tensor]:
    """``{"images": ...}`` for the image tower, ``{"tokens": ...}`` for the text tower (capture keywords)."""
    if tower == "visual":
        return {"images": data.images}
    if tower == "text":
        return {"tokens": data.tokens}
    raise ValueError(f"no calibration input for tower {tower!r} (expected 'visual' or 'text')")


def _encoder_batches(
    vlm: VLM, images: torch.Tensor | None, tokens: torch.Tensor | None, batch_size: int
) -> Iterator[tuple[Callable[[], Any], torch.Tensor | None]]:
    """``(run one batch through its encoder, valid-position mask)`` per batch of the given input."""
    if (images is None) == (tokens is None):
        raise ValueError("pass exactly one of images (image tower) or tokens (text tower)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images is not None:
        for batch in images.split(batch_size):
            yield (lambda batch=batch: vlm.encode_image(batch)), None
        return
    for batch in tokens.split(batch_size):
        yield (lambda batch=batch: vlm.encode_text(batch)), text_token_mask(batch).to(vlm.device)


@torch.no_grad()
def _capture(
    vlm: VLM,
    block: nn.Module,
    images: torch.Tensor | None,
    tokens: torch.Tensor | None,
    batch_size: int,
    record: Callable[[tuple, dict, Any], Any],
    before: bool,
) -> list[tuple[Any, torch.Tensor | None]]:
    """Run each batch until ``block`` is reached (``before``) or has run, keeping ``record(args, kwargs, out)``."""
    seen: list[Any] = []

    def pre_hook(module, args, kwargs):
        seen.append(record(args, kwargs, None))
        raise _StopForward

    def post_hook(module, args, kwargs, output):
        seen.append(record(args, kwargs, output))
        raise _StopForward

    handle = (
        block.register_forward_pre_hook(pre_hook, with_kwargs=True)
        if before
        else block.register_forward_hook(post_hook, with_kwargs=True)
    )
    captured = []
    try:
        with eval_mode(vlm):
            for run, valid in _encoder_batches(vlm, images, tokens, batch_size):
                seen.clear()
                try:
                    run()
                except _StopForward:
                    pass
                if not seen:
                    raise RuntimeError(f"{type(block).__name__} never ran: is it part of the tower that was fed?")
                captured.append((seen[0], valid))
    finally:
        handle.remove()
    return captured


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def capture_block_inputs(
    vlm: VLM,
    block: nn.Module,
    *,
    images: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    batch_size: int = 100,
) -> list[BlockCall]:
    """The arguments ``block`` receives in ``vlm`` as it stands, one :class:`BlockCall` per batch.

    Pass ``images`` for an image-tower block or ``tokens`` for a text-tower block; text calls carry the
    valid-position mask. Quantizers run in whatever mode they are in, so with the prefix quantized and
    fitted these are the "inputs from the already calibrated prefix". Runs without gradients in eval mode.
    """

    def record(args, kwargs, output):
        return tuple(_detached(a) for a in args), {k: _detached(v) for k, v in kwargs.items()}

    captured = _capture(vlm, block, images, tokens, batch_size, record, before=True)
    return [BlockCall(args, kwargs, valid) for (args, kwargs), valid in captured]


def capture_block_outputs(
    vlm: VLM,
    block: nn.Module,
    *,
    images: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    batch_size: int = 100,
) -> list[torch.Tensor]:
    """What ``block`` returns in ``vlm`` as it stands, one detached tensor per batch (see :func:`capture_block_inputs`)."""
    captured = _capture(vlm, block, images, tokens, batch_size, lambda a, k, out: _detached(out), before=False)
    return [output for output, _ in captured]


# -- running one block -----------------------------------------------------------------------------
@contextmanager
def quantizers_enabled(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Every tensor quantizer below ``module`` in ``quantize`` (``enabled``) or ``off`` mode; modes restored after.

    Use after the quantizers are frozen: a static quantizer switched on without (s, z) raises.
    """
    quantizers = [quantizer for _, quantizer in tensor_quantizers(module)]
    previous = [quantizer.mode for quantizer in quantizers]
    target = Mode.QUANTIZE if enabled else Mode.OFF
    try:
        for quantizer in quantizers:
            quantizer.set_mode(target)
        yield
    finally:
        for quantizer, mode in zip(quantizers, previous):
            quantizer.set_mode(mode)


def run_block(block: nn.Module, call: BlockCall, *, quantized: bool | None, grad: bool = False) -> torch.Tensor:
    """``block(*call.args, **call.kwargs)`` with its quantizers on (``quantized=True``), off (``False``: the
    float block) or as they are (``None``: cheapest inside a search loop that set the modes once).

    Without ``grad`` the block runs in inference mode (no autograd bookkeeping).
    """
    if quantized is None:
        return _call_block(block, call, grad)
    with quantizers_enabled(block, quantized):
        return _call_block(block, call, grad)


def _call_block(block: nn.Module, call: BlockCall, grad: bool) -> torch.Tensor:
    if grad:
        with torch.enable_grad():
            return block(*call.args, **call.kwargs)
    with torch.inference_mode():
        return block(*call.args, **call.kwargs)


def run_block_calls(block: nn.Module, calls: Sequence[BlockCall], *, quantized: bool | None) -> list[torch.Tensor]:
    """:func:`run_block` on every captured batch (modes switched once for all of them)."""
    if quantized is None:
        return [_call_block(block, call, False) for call in calls]
    with quantizers_enabled(block, quantized):
        return [_call_block(block, call, False) for call in calls]


# -- rows and errors -------------------------------------------------------------------------------
def token_rows(t: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``t`` as ``(rows, d)`` over the positions that count: all of them, or the ``valid`` text positions.

    Handles batch-first ``(B, L, d)`` and sequence-first ``(L, B, d)`` layouts (the observers' rule).
    """
    if valid is not None:
        with valid_tokens(valid):
            t = select_valid_tokens(t)
    return t.reshape(-1, t.shape[-1])


def block_output_error(
    outputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    calls: Sequence[BlockCall],
    *,
    weights: Sequence[torch.Tensor] | None = None,
    keep_ratio: float = 1.0,
) -> float:
    """``Σ_kept (w ⊙ (Ô − O))²`` over the valid rows of every batch (terms in float32, summed in float64).

    ``outputs`` Ô and ``targets`` O are per-batch block outputs aligned with ``calls`` (whose masks pick
    the rows); ``weights`` w (e.g. loss gradients at the block output) default to 1. ``keep_ratio`` < 1
    keeps only the largest ``⌈keep_ratio · N⌉`` of the N element terms (bottom elimination), pooled over
    all batches.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    terms = []
    for index, (output, target, call) in enumerate(zip(outputs, targets, calls, strict=True)):
        diff = output.float() - target.float()
        if weights is not None:
            diff = diff * weights[index].float()
        terms.append(token_rows(diff, call.valid).pow(2).flatten())
    flat = torch.cat(terms) if len(terms) > 1 else terms[0]
    if keep_ratio < 1.0 and flat.numel() > 0:
        keep = max(1, math.ceil(keep_ratio * flat.numel()))
        flat = torch.topk(flat, keep, sorted=False).values
    return float(flat.sum(dtype=torch.float64))
