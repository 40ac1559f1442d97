"""``apq-vit`` — Accurate Post-Training Quantization for Vision Transformers (``quantizers.md`` §2.5).

Y. Ding, H. Qin, Q. Yan, Z. Chai, J. Liu, X. Wei, X. Liu, "Towards Accurate Post-Training Quantization
for Vision Transformer", ACM MM 2022, arXiv:2303.14341. No official code was found: the metric's
bottom-elimination rule and the log2 form of MPQ below are this spec's reconstruction from the paper's
description ("APQ-ViT as specified here", ``quantizers.md`` §6).

Layout: weights per-channel symmetric, activations (Linear/Conv inputs) per-tensor asymmetric static,
both starting from minmax ranges (``quantizers.md`` §1.6), plus a log2 quantizer on every attention
``probs`` slot. Two ingredients:

* **BBC — Bottom-elimination Blockwise Calibration.** Once, on the float model, the contrastive loss of
  the n = 32 calibration pairs (``quantizers.md`` §1.8: symmetric InfoNCE, SigLIP's sigmoid loss when the
  model has a logit bias) is backpropagated to every block output O_b, giving ``G_b = ∂L/∂O_b`` (squared
  gradients as a diagonal-Hessian proxy, as in PTQ4ViT, on which APQ-ViT builds). Then, block by block
  in forward order, with the block's inputs captured from the *already calibrated* quantized prefix, a
  coordinate search (``sweeps`` = 2 sweeps; within a sweep first every weight quantizer of the block,
  then every activation quantizer) picks per quantizer a clip ratio α ∈ {0.30, 0.35, …, 1.00} applied to
  its minmax range, minimising ``M_b = Σ_kept (G_b ⊙ (Ô_b − O_b))²``. ``Ô_b`` is the quantized block on
  the quantized-prefix inputs, ``O_b`` the float model's block output (the point where G_b was taken);
  *kept* = the largest ``keep_ratio`` = 50 % of the element terms (bottom elimination; the paper gives no
  reproducible rule). A candidate replaces the current value only if it lowers M_b, and α = 1 is the
  start, so the search never ends above M_b at α = 1.
* **MPQ — Matthew-effect Preserving Quantization** of post-softmax attention (:class:`MPQLog2Quantizer`):
  levels ``{s·2^−k, k = 0…2^b−2} ∪ {0}`` (2^b values), ``k = clamp(round(−log2(p/s)), 0, 2^b−2)``, values
  below ``s·2^−(2^b−1.5)`` → 0, b = the activation bits. Dense resolution near the large probabilities
  keeps the power-law shape (the few dominant attention weights stay dominant). ``s`` is searched per
  slot in ``{2^(−j/4), j = 0…4}`` with the same metric, after the block's clip search (choose).

Choices recorded here: modules outside the residual blocks (the patch-embedding convolution) keep their
minmax ranges; all n pairs form one batch (the contrastive loss depends on the batch); with float
activations (``a16``) there is no activation or ``probs`` quantizer to search, so only weight clips are
searched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench.lazy import forward_names
from qbench.quant.base import CalibrationData, Quantizer, QuantizerConfig
from qbench.quant.layout import QuantLayout
from qbench.quant.ptq import Additions, PTQQuantizer, PTQRun
from qbench.quant.qat import contrastive_loss
from qbench.quant.spec import BitSpec

if TYPE_CHECKING:
    from torch import nn

    from qbench.quant.blockwise import BlockCall
    from qbench.quant.structure import TransformerBlock
    from qbench.vlm import VLM
    import torch
    from qbench.quant.modules import TensorQuantizer
    from qbench_plugins.quantizers.apq_vit_modules import MPQLog2Quantizer

__getattr__ = forward_names(__name__, {name: 'qbench_plugins.quantizers.apq_vit_modules' for name in ('MPQLog2Quantizer', 'mpq_quantize')})
"""MPQLog2Quantizer, mpq_quantize: in :mod:`qbench_plugins.quantizers.apq_vit_modules` (torch), imported on first use."""

MPQ_SCALES: tuple[float, ...] = tuple(2.0 ** (-j / 4) for j in range(5))
"""Candidate MPQ scales s = 2^(−j/4), j = 0…4 (``quantizers.md`` §2.5)."""


@dataclass(frozen=True)
class APQViTConfig(QuantizerConfig):
    """n calibration pairs (one batch), kept fraction ρ of metric terms, the α grid, sweeps, MPQ on/off."""

    n_calibration: int = 32
    keep_ratio: float = 0.5
    alpha_min: float = 0.30
    alpha_step: float = 0.05
    sweeps: int = 2
    mpq: bool = True


# -- search coordinates ----------------------------------------------------------------------------
@dataclass
class Coordinate:
    """One searched value of a block: a clip ratio of a quantizer or the scale of an MPQ slot."""

    name: str
    kind: str  # "weight", "act" or "mpq"
    candidates: tuple[float, ...]
    apply: Callable[[float], None]
    value: float = 1.0

    def set(self, value: float) -> None:
        self.apply(value)
        self.value = value


def clip_coordinate(name: str, kind: str, quantizer: TensorQuantizer, lo: torch.Tensor, hi: torch.Tensor,
                    grid: Sequence[float]) -> Coordinate:
    """A clip ratio α on ``quantizer``: (s, z) from the range ``α·(lo, hi)`` (its minmax range at α = 1)."""
    lo, hi = lo.detach().float().clone(), hi.detach().float().clone()

    def apply(alpha: float) -> None:
        scale, zero_point = quantizer.fmt.qparams(lo * alpha, hi * alpha)
        quantizer.scale, quantizer.zero_point = scale, zero_point

    return Coordinate(name, kind, tuple(grid), apply)


def mpq_coordinate(name: str, quantizer: MPQLog2Quantizer) -> Coordinate:
    return Coordinate(name, "mpq", MPQ_SCALES, quantizer.set_level_scale, quantizer.level_scale)


def alpha_grid(alpha_min: float, alpha_step: float) -> tuple[float, ...]:
    """``{alpha_min, alpha_min + step, …, 1.0}``; 1.0 always included (so the search starts on the grid)."""
    if not 0.0 < alpha_min <= 1.0 or alpha_step <= 0.0:
        raise QbenchError(f"apq-vit needs 0 < alpha_min <= 1 and alpha_step > 0, got {alpha_min}, {alpha_step}")
    count = int(math.floor((1.0 - alpha_min) / alpha_step + 1e-9))
    values = {round(alpha_min + i * alpha_step, 10) for i in range(count + 1)} | {1.0}
    return tuple(sorted(value for value in values if value <= 1.0))


def coordinate_search(coordinates: Sequence[Coordinate], metric: Callable[[], float], sweeps: int) -> tuple[float, float]:
    """Greedy coordinate descent: each coordinate in turn tries its candidates, keeping strict improvements.

    Returns ``(metric at the start, metric at the end)``; the end is never above the start. A sweep that
    changes nothing ends the search early (the next sweep would evaluate exactly the same settings).
    """
    start = best = metric()
    for _ in range(sweeps):
        changed = False
        for coordinate in coordinates:
            current = coordinate.value
            for candidate in coordinate.candidates:
                if candidate == current:
                    continue
                coordinate.set(candidate)
                value = metric()
                if value < best:
                    best, current, changed = value, candidate, True
            coordinate.set(current)
        if not changed:
            break
    return start, best


# -- BBC: gradients and metric ---------------------------------------------------------------------
@dataclass
class BlockTargets:
    """Float block outputs ``O_b`` and loss gradients ``G_b = ∂L/∂O_b`` (one batch), by block name."""

    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    loss: float = float("nan")


def block_output_gradients(vlm: VLM, blocks: Sequence[TransformerBlock], data: CalibrationData) -> BlockTargets:
    """Backpropagate the contrastive loss of ``data`` (one batch) through the float ``vlm`` to every block output.

    Run before any quantizer is inserted. Parameters keep their ``requires_grad`` flags and get no
    gradient (``torch.autograd.grad`` w.r.t. the block outputs only); a block input that does not require
    grad is made to, so the graph exists even for a frozen model. Only the towers of ``blocks`` record a
    graph (in visual scope the text embeddings are computed without one).
    """
    import torch

    from qbench.quant.modules import eval_mode

    towers = {block.tower for block in blocks}
    targets, outputs, names, handles = BlockTargets(), [], [], []

    def keep_output(name: str):
        def hook(module, args, output):
            outputs.append(output)
            names.append(name)
        return hook

    def need_grad(module, args):
        if args and isinstance(args[0], torch.Tensor) and not args[0].requires_grad:
            return (args[0].detach().requires_grad_(), *args[1:])
        return None

    for block in blocks:
        handles.append(block.module.register_forward_pre_hook(need_grad))
        handles.append(block.module.register_forward_hook(keep_output(block.name)))
    try:
        with eval_mode(vlm), torch.enable_grad():
            with torch.set_grad_enabled("visual" in towers):
                image = vlm.encode_image(data.images)
            with torch.set_grad_enabled("text" in towers):
                text = vlm.encode_text(data.tokens)
            loss = contrastive_loss(image.float(), text.float(), vlm.logit_scale, vlm.logit_bias)
            grads = torch.autograd.grad(loss, outputs, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    for name, output, grad in zip(names, outputs, grads):
        targets.outputs[name] = output.detach()
        targets.grads[name] = torch.zeros_like(output).detach() if grad is None else grad.detach()
    targets.loss = float(loss.detach())
    return targets


def bbc_metric(block: nn.Module, calls: Sequence[BlockCall], target: torch.Tensor, grad: torch.Tensor,
               keep_ratio: float, *, quantized: bool | None = True) -> float:
    """``M_b = Σ_kept (G_b ⊙ (Ô_b − O_b))²``: the quantized block on ``calls`` against the float output.

    ``quantized=None`` runs the block with its quantizer modes as they are (inside a search loop).
    """
    from qbench.quant.blockwise import block_output_error, run_block_calls

    outputs = run_block_calls(block, calls, quantized=quantized)
    return block_output_error(outputs, [target], calls, weights=[grad], keep_ratio=keep_ratio)


# -- the plugin ------------------------------------------------------------------------------------
class APQViTQuantizer(PTQQuantizer):
    """Blockwise gradient-weighted clip search (BBC) + log2 softmax quantizer (MPQ) (Ding et al., ACM MM 2022).

    The :class:`~qbench.quant.ptq.PTQQuantizer` template: :meth:`prepare` takes the float block outputs
    and gradients, :meth:`install` puts MPQ in the ``probs`` slots, :meth:`calibrate` is the minmax pass
    in one batch that also keeps each quantizer's α = 1 range, :meth:`refine` is the BBC search.
    """

    name = "apq-vit"
    citation = (
        "Y. Ding, H. Qin, Q. Yan, Z. Chai, J. Liu, X. Wei, X. Liu, 'Towards Accurate Post-Training "
        "Quantization for Vision Transformer', ACM MM 2022, arXiv:2303.14341"
    )
    summary = "blockwise clip-ratio search on a gradient-weighted, bottom-eliminated block metric + log2 softmax quantizer"
    needs_data = True
    needs_grad = True
    Config = APQViTConfig

    def verification_layout(self, bits: BitSpec) -> QuantLayout:
        """Baseline layout (weights per channel, inputs per tensor) plus, with ``mpq``, a log2 ``probs`` slot:
        levels {s·2^-k} ∪ {0} at A bits (MPQ, Ding et al., ACM MM 2022, arXiv:2303.14341 §3.3)."""
        config: APQViTConfig = self.config  # type: ignore[assignment]
        slots = {"probs": "per_tensor_log2"} if config.mpq and bits.quantizes_activations else {}
        return QuantLayout(weight="per_channel", linear_input="per_tensor", conv_input="per_tensor", slots=slots)

    # -- steps ------------------------------------------------------------------------------------
    def check(self, bits: BitSpec) -> None:
        """A contrastive batch (n >= 2), ``keep_ratio`` in (0, 1], sweeps >= 1, a valid α grid."""
        config: APQViTConfig = self.config  # type: ignore[assignment]
        if config.n_calibration < 2:
            raise QbenchError(f"apq-vit.n_calibration must be >= 2 (a contrastive batch), got {config.n_calibration}")
        if not 0.0 < config.keep_ratio <= 1.0:
            raise QbenchError(f"apq-vit.keep_ratio must be in (0, 1], got {config.keep_ratio}")
        if config.sweeps < 1:
            raise QbenchError(f"apq-vit.sweeps must be >= 1, got {config.sweeps}")
        alpha_grid(config.alpha_min, config.alpha_step)

    def prepare(self, run: PTQRun) -> Additions:
        """The residual blocks in scope, and ``O_b``, ``G_b`` from the float model (before any quantizer)."""
        from qbench.quant.structure import transformer_blocks

        run.state["blocks"] = transformer_blocks(run.model, run.towers)
        run.state["targets"] = block_output_gradients(run.model, run.state["blocks"], run.need_data())
        return Additions()

    def install(self, run: PTQRun) -> Additions:
        """An MPQ quantizer (A bits) in the ``probs`` slot of every block's attention; none with float
        activations or ``mpq=False``."""
        from qbench_plugins.quantizers.apq_vit_modules import MPQLog2Quantizer

        config: APQViTConfig = self.config  # type: ignore[assignment]
        slots: dict[str, MPQLog2Quantizer] = {}
        if config.mpq and run.bits.quantizes_activations:
            for block in run.state["blocks"]:
                reference = next(block.attention.parameters())
                block.attention.probs = MPQLog2Quantizer(run.bits.act_bits).to(reference.device)
                slots[block.name] = block.attention.probs
        run.state["slots"] = slots
        return Additions()

    def calibrate(self, run: PTQRun) -> dict[str, Any]:
        """Minmax statistics on the float pass (all n pairs in one batch), then freeze; keeps each block's
        search coordinates (weights, activations, MPQ) in ``run.state``."""
        from qbench.quant.calibrate import calibrate, freeze_quantizers
        from qbench.quant.fake_quant import group_minmax

        config: APQViTConfig = self.config  # type: ignore[assignment]
        model, data, wrapped, slots = run.model, run.need_data(), run.wrapped, run.state["slots"]
        grid = alpha_grid(config.alpha_min, config.alpha_step)
        calibrate(model, data.images, data.tokens if "text" in run.towers else None, batch_size=len(data))
        act_ranges = {
            name: module.act_quantizer.observer.range()
            for name, module in wrapped.items()
            if module.act_quantizer is not None and module.act_quantizer.observer is not None
            and module.act_quantizer.observer.has_data
        }
        act_ranges = {name: (lo.clone(), hi.clone()) for name, (lo, hi) in act_ranges.items()}
        freeze_quantizers(model.model, strict=False)
        coordinates = {}
        for block in run.state["blocks"]:
            weights, acts = [], []
            for name, _ in block.linears:
                module = wrapped[name]
                quantizer = module.weight_quantizer
                lo, hi = group_minmax(quantizer.group_view(module.weight.detach()))
                weights.append(clip_coordinate(f"{name}.weight", "weight", quantizer, lo, hi, grid))
                if name in act_ranges:
                    acts.append(clip_coordinate(f"{name}.act", "act", module.act_quantizer, *act_ranges[name], grid))
            mpq = [mpq_coordinate(f"{block.name}.attn.probs", slots[block.name])] if block.name in slots else []
            coordinates[block.name] = weights + acts + mpq
        run.state["coordinates"] = coordinates
        return {
            "source": data.source,
            "fingerprint": data.fingerprint,
            "n_images": len(data),
            "n_texts": len(data),
            "texts_quantized": "text" in run.towers,
            "fp_contrastive_loss": run.state["targets"].loss,
        }

    def refine(self, run: PTQRun) -> Additions:
        """BBC block by block in forward order, each on inputs from the already searched prefix."""
        config: APQViTConfig = self.config  # type: ignore[assignment]
        slots = run.state["slots"]
        searched = {
            block.name: self._search_block(
                run.model, block, run.need_data(), run.state["targets"], run.state["coordinates"][block.name], config
            )
            for block in run.state["blocks"]
        }
        return Additions(provenance={
            "mpq": {"bits": run.bits.act_bits, "slots": len(slots)} if slots else "off (mpq=False or float activations)",
            "blocks": searched,
        })

    def _search_block(
        self,
        model: VLM,
        block: TransformerBlock,
        data: CalibrationData,
        targets: BlockTargets,
        coordinates: list[Coordinate],
        config: APQViTConfig,
    ) -> dict[str, Any]:
        """BBC over the clip ratios (weights then activations, ``sweeps`` times), then the MPQ scale."""
        from qbench.quant.blockwise import capture_block_inputs, quantizers_enabled, tower_inputs

        calls = capture_block_inputs(model, block.module, batch_size=len(data), **tower_inputs(block.tower, data))
        target, grad = targets.outputs[block.name], targets.grads[block.name]

        def metric() -> float:
            return bbc_metric(block.module, calls, target, grad, config.keep_ratio, quantized=None)

        clips = [c for c in coordinates if c.kind == "weight"] + [c for c in coordinates if c.kind == "act"]
        mpq = [c for c in coordinates if c.kind == "mpq"]
        with quantizers_enabled(block.module, True):
            start, after_clip = coordinate_search(clips, metric, config.sweeps)
            _, final = coordinate_search(mpq, metric, 1) if mpq else (after_clip, after_clip)
        return {
            "metric_alpha_1": start,
            "metric_after_clip": after_clip,
            "metric": final,
            "alphas": {c.name: c.value for c in clips},
            "mpq_scale": {c.name: c.value for c in mpq},
        }


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [APQViTQuantizer]
