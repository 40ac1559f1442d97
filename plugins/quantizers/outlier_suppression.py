"""``outlier-suppression`` — gamma migration + token-wise clipping + LSQ+ fine-tuning (``quantizers.md`` §2.7).

Outlier Suppression (Wei et al.) traces the activation outliers of transformers to the LayerNorm scale γ,
which amplifies a few channels, and to a few tokens whose values stand far out. Three steps:

1. **Gamma migration** (exact in float): every pre-LN norm becomes ``n + β/γ`` (weight 1, bias β/γ) and
   the Linears reading it absorb γ, ``W ← W·diag(γ)`` (:func:`qbench.quant.transforms.migrate_gamma`;
   |γ| floored at 1e-6, sign kept). Pairs are ``ln_1 → {q, k, v}`` and ``ln_2 → c_fc``; open_clip's
   towers are pre-LN, so no residual fix (the official ``GammaResidual``) is needed.
2. **Token-wise clipping, coarse**: weights per-channel symmetric minmax (fixed first), activations
   per-tensor asymmetric. For each candidate ``α`` from 1.0 down by ``alpha_step`` to ``1 − r_b``
   (r = 0.1, 0.3, 0.9 at A = 8, 6, 4 bits, linear in between, held at the ends), per calibration batch and
   layer: the per-token maxima/minima over channels give ``upper = q_α(|t_max|)``, ``lower = −q_α(|t_min|)``;
   the input clipped to ``[lower, upper]`` gives its min/max, averaged over batches. Score = MSE between the
   normalised embeddings of the quantized and FP model on the calibration set (summed over the towers in
   scope); one α is kept for all layers. The patch-embedding Conv2d reads pixels, which have no token
   structure: its range is the batch-averaged min/max (no clipping), as the official code does for
   activations without a sequence axis.
3. **Fine**: the activation quantizers are LSQ+ (:class:`qbench.quant.lsq.LSQQuantizer`, learnable step s
   and offset β) initialised to reproduce step 2's ranges exactly; only (s, β) train, Adam lr 1e-5 with
   cosine decay to 0 over ``epochs`` passes of the calibration set in batches of ``batch_size``, loss =
   the same embedding MSE. Batches in fixed order (no shuffling), as the official ``learn_scale``, so the
   result does not depend on the seed. LSQ's gradient scale uses the features per example.

Choice recorded here: the weight quantizers are fixed before step 2, and the statistics, the α scores and
the fine-tuning all run on the model as deployed (quantized weights). The official scripts disable weight
fake-quantization during the search and the LSQ+ tuning (activations only) and switch it on afterwards; the
spec scores "the quantized model", which we read as the whole one.

Text-tower statistics use only valid token positions (``quantizers.md`` §1.1). ``epochs=0`` stops after
the coarse search.

X. Wei, Y. Zhang, X. Zhang, R. Gong, S. Zhang, Q. Zhang, F. Yu, X. Liu, "Outlier Suppression: Pushing the
Limit of Low-bit Transformer Language Models", NeurIPS 2022, arXiv:2209.13325;
github.com/wimh966/outlier_suppression (``gamma_migration.py``, ``token_wise_clipping.py``). LSQ+:
Y. Bhalgat et al., CVPRW 2020, arXiv:2004.09576.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench.lazy import no_grad
from qbench.quant.base import CalibrationData, Quantizer, QuantizerConfig
from qbench.quant.ptq import Additions, PTQQuantizer, PTQRun
from qbench.quant.spec import BitSpec

if TYPE_CHECKING:  # the torch side is imported in the functions that use it: registering (qbench list) stays cheap
    from torch import nn

    from qbench.quant.lsq import LSQQuantizer
    from qbench.quant.modules import QuantModule
    from qbench.vlm import VLM

CLIP_SPAN_BY_BITS = {8: 0.1, 6: 0.3, 4: 0.9}
"""``r_b``: how far below 1 the coarse search goes at A bits (official ``a_bit_iters``)."""


@dataclass(frozen=True)
class OutlierSuppressionConfig(QuantizerConfig):
    """``n_calibration`` proxy pairs; coarse α grid step ``alpha_step``; LSQ+ fine-tuning for ``epochs``
    epochs with Adam at ``lr`` (cosine decay) in batches of ``batch_size`` (also the statistics batch)."""

    n_calibration: int = 256
    epochs: int = 3
    lr: float = 1e-5
    batch_size: int = 32
    alpha_step: float = 0.01


# -- coarse search: candidates and token-wise ranges -----------------------------------------------
def clip_span(act_bits: int) -> float:
    """``r_b``: 0.1, 0.3, 0.9 at 8, 6, 4 bits, linear in between, 0.1 above 8 and 0.9 below 4 bits."""
    if act_bits >= 8:
        return CLIP_SPAN_BY_BITS[8]
    if act_bits <= 4:
        return CLIP_SPAN_BY_BITS[4]
    lo_bits = 4 if act_bits < 6 else 6
    hi_bits = lo_bits + 2
    t = (act_bits - lo_bits) / 2
    return CLIP_SPAN_BY_BITS[lo_bits] + t * (CLIP_SPAN_BY_BITS[hi_bits] - CLIP_SPAN_BY_BITS[lo_bits])


def candidate_alphas(act_bits: int, step: float) -> list[float]:
    """``1.0, 1.0 − step, …`` down to ``1 − r_b`` inclusive (rounded to 1e-9 to keep the grid clean)."""
    count = int(math.floor(clip_span(act_bits) / step + 1e-9))
    return [round(1.0 - i * step, 9) for i in range(count + 1)]


@dataclass
class TokenExtremes:
    """Per calibration batch, the per-token minima and maxima over channels of one layer's input."""

    minima: list[torch.Tensor] = field(default_factory=list)
    maxima: list[torch.Tensor] = field(default_factory=list)
    ranges: dict[float, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)
    """Clipped ranges already computed, by α (dropped when a batch is added)."""

    def add(self, x: torch.Tensor, tokens: bool) -> None:
        """One batch: rows of the last dim are tokens (``tokens``), else the whole batch is one row."""
        rows = x.detach().float().reshape(-1, x.shape[-1]) if tokens else x.detach().float().reshape(1, -1)
        if rows.numel() == 0:
            return
        self.minima.append(rows.amin(dim=1))
        self.maxima.append(rows.amax(dim=1))
        self.ranges.clear()

    def clipped_range(self, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-averaged min/max of the input clipped to ``[−q_α(|t_min|), q_α(|t_max|)]``."""
        if alpha not in self.ranges:
            self.clipped_ranges([alpha])
        return self.ranges[alpha]

    def clipped_ranges(self, alphas: Sequence[float]) -> dict[float, tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`clipped_range` for every α of ``alphas`` at once, remembered for later calls.

        Why: the coarse search asks every layer for every α, and each answer took two ``torch.quantile`` calls
        (two sorts) per batch; here each batch is sorted once for all α (``torch.quantile`` with a tensor of
        levels). Each level is interpolated exactly as a single one is (same float32 level, same ranks), and
        each α's batch average is the mean of the same contiguous vector, so every range is bit-identical.
        """
        import torch

        if not self.maxima:
            raise ValueError("no batch was recorded for this layer")
        alphas = [float(alpha) for alpha in alphas]
        lows, highs = [], []
        for t_min, t_max in zip(self.minima, self.maxima):
            levels = torch.tensor(alphas, dtype=t_max.dtype, device=t_max.device)
            upper = torch.quantile(t_max.abs(), levels)
            lower = -torch.quantile(t_min.abs(), levels)
            highs.append(torch.minimum(t_max.max(), upper))
            lows.append(torch.maximum(t_min.min(), lower))
        by_alpha_low = torch.stack(lows).T.contiguous()  # (α, batches): one contiguous row per α
        by_alpha_high = torch.stack(highs).T.contiguous()
        for index, alpha in enumerate(alphas):
            self.ranges[alpha] = (by_alpha_low[index].mean().reshape(1), by_alpha_high[index].mean().reshape(1))
        return {alpha: self.ranges[alpha] for alpha in alphas}


def collect_token_extremes(
    vlm: VLM,
    modules: dict[str, QuantModule],
    images: torch.Tensor,
    tokens: torch.Tensor | None,
    *,
    batch_size: int,
) -> dict[str, TokenExtremes]:
    """Per-token extremes of each module's input (Linear: token rows; Conv2d: one row per batch), per batch.

    Runs the model as it is (activation quantizers should be off); text positions after the end-of-text
    token are skipped.
    """
    from torch import nn

    from qbench.quant.calibrate import calibrate
    from qbench.quant.observers import select_valid_tokens

    extremes = {name: TokenExtremes() for name in modules}
    handles = []

    def hook_for(name: str, is_linear: bool):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = select_valid_tokens(inputs[0]) if is_linear else inputs[0]
            extremes[name].add(x, tokens=is_linear)

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(hook_for(name, isinstance(module, nn.Linear))))
        calibrate(vlm, images, tokens, batch_size=batch_size)
    finally:
        for handle in handles:
            handle.remove()
    return extremes


# -- the embedding loss ----------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbeddingBatches:
    """The calibration set cut into batches, with the FP model's normalised embeddings as targets."""

    images: tuple[torch.Tensor, ...]
    tokens: tuple[torch.Tensor, ...] | None
    image_targets: tuple[torch.Tensor, ...]
    text_targets: tuple[torch.Tensor, ...] | None

    @classmethod
    @no_grad
    def from_model(cls, vlm: VLM, data: CalibrationData, towers: Sequence[str], batch_size: int) -> "EmbeddingBatches":
        from qbench.quant.modules import eval_mode

        images = tuple(data.images.split(batch_size))
        tokens = tuple(data.tokens.split(batch_size)) if "text" in towers else None
        with eval_mode(vlm):
            image_targets = tuple(vlm.encode_image(batch) for batch in images)
            text_targets = tuple(vlm.encode_text(batch) for batch in tokens) if tokens is not None else None
        return cls(images, tokens, image_targets, text_targets)

    def __len__(self) -> int:
        return len(self.images)

    def loss(self, vlm: VLM, index: int) -> torch.Tensor:
        """Embedding MSE of batch ``index``, summed over the towers in scope (differentiable)."""
        import torch.nn.functional as F

        loss = F.mse_loss(vlm.encode_image(self.images[index]), self.image_targets[index])
        if self.tokens is not None:
            loss = loss + F.mse_loss(vlm.encode_text(self.tokens[index]), self.text_targets[index])
        return loss

    @no_grad
    def score(self, vlm: VLM) -> float:
        """Embedding MSE over the whole calibration set (size-weighted over batches), summed over towers."""
        import torch.nn.functional as F

        from qbench.quant.modules import eval_mode

        with eval_mode(vlm):
            total_images = sum(batch.shape[0] for batch in self.images)
            image = sum(
                F.mse_loss(vlm.encode_image(x), y, reduction="sum") for x, y in zip(self.images, self.image_targets)
            )
            score = float(image) / (total_images * self.image_targets[0].shape[1])
            if self.tokens is not None:
                total_texts = sum(batch.shape[0] for batch in self.tokens)
                text = sum(
                    F.mse_loss(vlm.encode_text(x), y, reduction="sum") for x, y in zip(self.tokens, self.text_targets)
                )
                score += float(text) / (total_texts * self.text_targets[0].shape[1])
        return score



@contextmanager
def only_trainable(model: nn.Module, parameters: Sequence[nn.Parameter]) -> Iterator[None]:
    """Gradients for ``parameters`` only while active; every parameter's ``requires_grad`` is restored after."""
    keep = {id(p) for p in parameters}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


# -- steps -----------------------------------------------------------------------------------------
def migrate(vlm: VLM, towers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Gamma migration on every LN → readers pair of ``towers``; returns ``{norm name: migrated γ}``."""
    from qbench.quant.structure import norm_reader_pairs
    from qbench.quant.transforms import migrate_gamma

    pairs = [pair for pair in norm_reader_pairs(vlm, towers) if pair.norm.weight is not None]
    return {pair.norm_name: migrate_gamma(pair) for pair in pairs}


def freeze_weights(modules: dict[str, QuantModule]) -> None:
    """Fix every weight quantizer from its (already migrated) weight."""
    for module in modules.values():
        module.weight_quantizer.observe(module.weight.detach())
        module.weight_quantizer.freeze()


def activation_quantizers(modules: dict[str, QuantModule]) -> dict[str, LSQQuantizer]:
    from qbench.quant.lsq import LSQQuantizer

    return {name: m.act_quantizer for name, m in modules.items() if isinstance(m.act_quantizer, LSQQuantizer)}


def apply_ranges(quantizers: dict[str, LSQQuantizer], extremes: dict[str, TokenExtremes], alpha: float) -> None:
    """Set every activation quantizer to the token-wise clipped range at ``alpha`` and switch it on."""
    from qbench.quant.modules import Mode

    for name, quantizer in quantizers.items():
        quantizer.set_range(*extremes[name].clipped_range(alpha))
        quantizer.set_mode(Mode.QUANTIZE)


def coarse_search(
    vlm: VLM,
    quantizers: dict[str, LSQQuantizer],
    extremes: dict[str, TokenExtremes],
    batches: EmbeddingBatches,
    alphas: Sequence[float],
) -> tuple[float, dict[float, float]]:
    """Score every α; keep the first minimum (largest α on ties); leaves the quantizers at the chosen α."""
    scores: dict[float, float] = {}
    for name in quantizers:
        extremes[name].clipped_ranges(alphas)  # all α per layer at once; apply_ranges then looks them up
    for alpha in alphas:
        apply_ranges(quantizers, extremes, alpha)
        scores[alpha] = batches.score(vlm)
    best = min(alphas, key=lambda a: (scores[a], -a))
    apply_ranges(quantizers, extremes, best)
    return best, scores


def finetune_lsq_plus(
    vlm: VLM,
    quantizers: dict[str, LSQQuantizer],
    batches: EmbeddingBatches,
    *,
    epochs: int,
    lr: float,
) -> int:
    """Adam on the LSQ+ (s, β) only, cosine decay to 0 over ``epochs × batches`` steps; returns the step count."""
    import torch

    from qbench.quant.modules import eval_mode

    parameters = [p for q in quantizers.values() for p in (q.step, q.offset) if p is not None]
    total = epochs * len(batches)
    if not parameters or total == 0:
        return 0
    optimizer = torch.optim.Adam(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=0.0)
    with eval_mode(vlm), only_trainable(vlm.model, parameters), torch.enable_grad():
        for _ in range(epochs):
            for index in range(len(batches)):
                optimizer.zero_grad(set_to_none=True)
                batches.loss(vlm, index).backward()
                optimizer.step()
                schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return total


# -- plugin ----------------------------------------------------------------------------------------
class OutlierSuppressionQuantizer(PTQQuantizer):
    """Gamma migration, token-wise clipping search and LSQ+ activation tuning (Wei et al., NeurIPS 2022).

    The :class:`~qbench.quant.ptq.PTQQuantizer` template: :meth:`prepare` takes the FP embedding targets
    and migrates γ (step 1); :meth:`calibrate` fixes the weights and runs the token-wise clipping search
    (step 2) instead of a minmax pass; :meth:`refine` is the LSQ+ fine-tuning (step 3).
    """

    name = "outlier-suppression"
    citation = (
        "X. Wei, Y. Zhang, X. Zhang, R. Gong, S. Zhang, Q. Zhang, F. Yu, X. Liu, 'Outlier Suppression: "
        "Pushing the Limit of Low-bit Transformer Language Models', NeurIPS 2022, arXiv:2209.13325"
    )
    summary = "LN gamma migrated into weights, token-wise clipping search, LSQ+ fine-tuning of activation ranges"
    needs_data = True
    needs_grad = True
    Config = OutlierSuppressionConfig

    def check(self, bits: BitSpec) -> None:
        """Positive batch sizes, non-negative epochs and lr, ``alpha_step`` in (0, 1)."""
        config: OutlierSuppressionConfig = self.config  # type: ignore[assignment]
        if config.batch_size < 1 or config.n_calibration < 1:
            raise QbenchError(
                "outlier-suppression.batch_size and n_calibration must be >= 1, "
                f"got {config.batch_size}, {config.n_calibration}"
            )
        if config.epochs < 0 or config.lr < 0:
            raise QbenchError(f"outlier-suppression.epochs and lr must be >= 0, got {config.epochs}, {config.lr}")
        if not 0.0 < config.alpha_step < 1.0:
            raise QbenchError(f"outlier-suppression.alpha_step must be in (0, 1), got {config.alpha_step}")

    def prepare(self, run: PTQRun) -> Additions:
        """FP embedding targets of the calibration batches (the loss of steps 2-3), then gamma migration."""
        import torch

        config: OutlierSuppressionConfig = self.config  # type: ignore[assignment]
        run.state["batches"] = EmbeddingBatches.from_model(run.model, run.need_data(), run.towers, config.batch_size)
        gammas = migrate(run.model, run.towers)
        all_gamma = torch.cat([g.abs().flatten().cpu() for g in gammas.values()]) if gammas else None
        return Additions(provenance={
            "seed_used": False,
            "migrated_pairs": len(gammas),
            "migrated_pairs_by_tower": {
                tower: sum(run.model.tower_of(name + ".") == tower for name in gammas) for tower in run.towers
            },
            "migrated_gamma_abs": (
                {"min": float(all_gamma.min()), "median": float(all_gamma.median()), "max": float(all_gamma.max())}
                if all_gamma is not None
                else None
            ),
        })

    def act_quantizer(self, bits: BitSpec, name: str, module: nn.Module) -> LSQQuantizer | None:
        """LSQ+ (learnable step and offset), initialised from the ranges the clipping search sets."""
        from qbench.quant.lsq import LSQQuantizer

        if not bits.quantizes_activations:
            return None
        return LSQQuantizer(bits.act_bits, signed=False, offset=True, init="minmax", features_per_example=True)

    def calibrate(self, run: PTQRun) -> dict[str, Any]:
        """Weights fixed from their migrated values, then step 2 (token-wise statistics, coarse α search)."""
        config: OutlierSuppressionConfig = self.config  # type: ignore[assignment]
        data = run.need_data()
        freeze_weights(run.wrapped)
        quantizers = activation_quantizers(run.wrapped)
        run.state["fit"] = {"alpha": None, "scores": {}, "loss_before": None, "loss_after": None, "steps": 0}
        if quantizers:
            run.state["fit"] = self._coarse(run, quantizers, config)
        return {
            "source": data.source,
            "fingerprint": data.fingerprint,
            "n_images": len(data),
            "n_texts": len(data) if "text" in run.towers else 0,
            "batch_size": config.batch_size,
        }

    def refine(self, run: PTQRun) -> Additions:
        """Step 3, LSQ+ fine-tuning of the activation (s, β); then the search and tuning record."""
        config: OutlierSuppressionConfig = self.config  # type: ignore[assignment]
        fit = run.state["fit"]
        quantizers = activation_quantizers(run.wrapped)
        if quantizers:
            batches: EmbeddingBatches = run.state["batches"]
            steps = finetune_lsq_plus(run.model, quantizers, batches, epochs=config.epochs, lr=config.lr)
            fit["loss_after"] = batches.score(run.model) if steps else fit["loss_before"]
            fit["steps"] = steps
        scores = fit["scores"]
        return Additions(provenance={
            "clip_span": clip_span(run.bits.act_bits) if run.bits.quantizes_activations else None,
            "chosen_alpha": fit["alpha"],
            "score_chosen": scores.get(fit["alpha"]) if fit["alpha"] is not None else None,
            "score_alpha_1": scores.get(1.0),
            "scores_by_alpha": {f"{alpha:.4f}": score for alpha, score in scores.items()},
            "finetune_steps": fit["steps"],
            "loss_before_finetune": fit["loss_before"],
            "loss_after_finetune": fit["loss_after"],
        })

    def extra_parameters(self, run: PTQRun) -> int:
        """A learnable step and offset per activation quantizer."""
        return 2 * len(activation_quantizers(run.wrapped))

    def _coarse(
        self, run: PTQRun, quantizers: dict[str, LSQQuantizer], config: OutlierSuppressionConfig
    ) -> dict[str, Any]:
        """Step 2: token-wise statistics with activations off, then the coarse α search (quantizers left at
        the chosen α)."""
        from qbench.quant.modules import Mode

        data, batches = run.need_data(), run.state["batches"]
        for quantizer in quantizers.values():
            quantizer.set_mode(Mode.OFF)
        tokens = data.tokens if batches.tokens is not None else None
        modules = {name: run.wrapped[name] for name in quantizers}
        extremes = collect_token_extremes(run.model, modules, data.images, tokens, batch_size=config.batch_size)
        unseen = [name for name, record in extremes.items() if not record.maxima]
        if unseen:
            raise QbenchError(
                f"outlier-suppression: {len(unseen)} quantized modules never ran on the calibration data "
                f"({unseen[0]}, ...)"
            )
        alphas = candidate_alphas(run.bits.act_bits, config.alpha_step)
        alpha, scores = coarse_search(run.model, quantizers, extremes, batches, alphas)
        before = scores[alpha]
        return {"alpha": alpha, "scores": scores, "loss_before": before, "loss_after": before, "steps": 0}


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [OutlierSuppressionQuantizer]
