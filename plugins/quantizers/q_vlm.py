"""``q-vlm`` — cross-layer dependency mining for post-training quantization (``quantizers.md`` §2.8).

Q-VLM searches quantization ranges jointly over *blocks of layers* instead of layer by layer. Which
layers belong together is decided by activation entropy, the paper's proxy for cross-layer error
dependency; the visual encoder is then lightly tuned to lower that entropy, and the search redone.

Layout: weights per-channel symmetric minmax; every Linear input asymmetric *static* with one range per
token position (the official CLIP path's "row-wise" ranges, e.g. 577 positions for a 336-px L/14),
:class:`PositionQuantizer`. Conv inputs (the patch embedding: pixels, no token axis) get one range per
tensor (choose).

Procedure (:class:`QVLMQuantizer`, n = 256 proxy samples):

1. minmax calibration; per quantized layer l the entropy ``H_l`` = mean over (instances, channels) of
   ``−Σ_t p_t log p_t`` with ``p = |x̂| / Σ_t |x̂|`` along tokens (:func:`token_entropy`);
2. partition each tower's layers, in forward order, into blocks: a block closes after layer l when
   ``H_l < τ`` (median H of the tower) or when it holds ``max_block_layers`` = 3 layers
   (:func:`entropy_partition`);
3. per block, coordinate search (``sweeps`` = 2) of one shrink factor ``c ∈ {1.0, 0.9, …, 0.4}`` per
   layer range, minimising the block-output MSE against the float model on the same input, the input
   coming from the already searched (quantized) prefix (:func:`search_block`). Layers after the block stay
   float during its search. "Block output" = the residual stream after the last transformer block the
   group touches (captured and replayed with :mod:`qbench.quant.blockwise`);
4. visual tower only: train the visual LayerNorm affine parameters (``ln_steps`` = 50 AdamW steps,
   lr 1e-4, batch 32, weight decay 0) with quantizers frozen (STE), loss
   ``L_feat + λ_H · mean_l H_l`` (``L_feat`` = mean ‖ẑ_q − ẑ_fp‖² of normalised image embeddings,
   λ_H = 0.01), then redo steps 2–3 from c = 1 (:func:`tune_visual_layernorms`). The text tower (joint
   scope) gets steps 1–3 only.

C. Wang, Z. Wang, X. Xu, Y. Tang, J. Zhou, J. Lu, "Q-VLM: Post-training Quantization for Large
Vision-Language Models", NeurIPS 2024, arXiv:2410.08119; github.com/ChangyuanWang17/QVLM. The official
code is LLaVA-specific (entropy threshold 37, L2-normalised "entropy", auto-regressive guidance); the
partition rule, the objective and the LN-only visual tuning here are ``quantizers.md``'s adaptation to
dual encoders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qbench.errors import QbenchError
from qbench.hookspecs import hookimpl
from qbench.lazy import forward_names
from qbench.quant.base import Quantizer, QuantizerConfig
from qbench.quant.layout import QuantLayout
from qbench.quant.ptq import Additions, PTQQuantizer, PTQRun
from qbench.quant.spec import BitSpec

if TYPE_CHECKING:  # the torch side is imported where it is used: registering (qbench list) stays cheap
    from torch import nn

    from qbench_plugins.quantizers.q_vlm_modules import PositionQuantizer

__getattr__ = forward_names(__name__, {
    name: "qbench_plugins.quantizers.q_vlm_modules"
    for name in ("Layer", "PerPosition", "PositionQuantizer", "TowerRunner", "block_mse", "entropy_hooks",
                 "entropy_partition", "forward_order", "layer_entropies", "partition_and_search", "search_block",
                 "search_tower", "shrink_grid", "token_entropy", "tune_visual_layernorms", "visual_layernorms")
})
"""The per-position quantizer, entropies, partition, search and LN tuning live in
:mod:`qbench_plugins.quantizers.q_vlm_modules` (torch)."""


# -- the plugin ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QVLMConfig(QuantizerConfig):
    """``n_calibration`` proxy samples (batches of ``batch_size``, also the LN-tuning batch); blocks of at
    most ``max_block_layers``; shrink grid ``1.0, 1 − shrink_step, …, shrink_min`` searched for ``sweeps``
    sweeps; visual LN tuning ``ln_steps`` AdamW steps at ``ln_lr`` with entropy weight ``entropy_weight``."""

    n_calibration: int = 256
    max_block_layers: int = 3
    entropy_weight: float = 0.01
    ln_steps: int = 50
    ln_lr: float = 1e-4
    batch_size: int = 32
    shrink_min: float = 0.4
    shrink_step: float = 0.1
    sweeps: int = 2


class QVLMQuantizer(PTQQuantizer):
    """Entropy-guided block partition, blockwise range search and visual LN tuning (Wang et al., NeurIPS 2024).

    The :class:`~qbench.quant.ptq.PTQQuantizer` template: its minmax calibration pass is step 1's starting
    point; this method's own steps are the per-position input quantizer (:meth:`act_quantizer`) and
    steps 1-4 in :meth:`refine`.
    """

    name = "q-vlm"
    citation = (
        "C. Wang, Z. Wang, X. Xu, Y. Tang, J. Zhou, J. Lu, 'Q-VLM: Post-training Quantization for Large "
        "Vision-Language Models', NeurIPS 2024, arXiv:2410.08119"
    )
    summary = "entropy-guided block partition, blockwise range search and visual LayerNorm tuning"
    needs_data = True
    needs_grad = True
    Config = QVLMConfig

    def verification_layout(self, bits: BitSpec) -> QuantLayout:
        """Weights per channel; Linear inputs with one static range per token position (the official CLIP path
        is row-wise: Wang et al., NeurIPS 2024, arXiv:2410.08119), conv inputs per tensor (no token axis)."""
        return QuantLayout(weight="per_channel", linear_input="per_position", conv_input="per_tensor")

    def check(self, bits: BitSpec) -> None:
        """Block size, grid, sweeps and LN-tuning settings in range (one line listing every problem)."""
        _check_config(self.config)  # type: ignore[arg-type]

    def act_quantizer(self, bits: BitSpec, name: str, module: nn.Module) -> PositionQuantizer | None:
        """Per-position for Linear inputs, per-tensor for the patch conv; None at 16 bits."""
        from qbench_plugins.quantizers.q_vlm_modules import _input_quantizer

        return _input_quantizer(module, bits.act_bits)

    def refine(self, run: PTQRun) -> Additions:
        """Steps 1-3 per tower in scope, then step 4 (visual LN tuning) and steps 2-3 again on the image tower."""
        from qbench.quant.blockwise import tower_inputs
        from qbench_plugins.quantizers.q_vlm_modules import forward_order, partition_and_search, tune_visual_layernorms

        config: QVLMConfig = self.config  # type: ignore[assignment]
        model, subset, wrapped = run.model, run.need_data(), run.wrapped
        towers_report = {}
        for tower in run.towers:
            layers = forward_order(model, tower, wrapped, tower_inputs(tower, subset))
            towers_report[tower] = partition_and_search(model, tower, layers, tower_inputs(tower, subset), config)
        tuning = None
        if "visual" in run.towers:
            layers = forward_order(model, "visual", wrapped, tower_inputs("visual", subset))
            tuning = tune_visual_layernorms(model, layers, subset.images, config, run.seed)
            if tuning["steps"]:
                towers_report["visual"] = {
                    "before_tuning": towers_report["visual"],
                    **partition_and_search(model, "visual", layers, tower_inputs("visual", subset), config, reset=True),
                }
        return Additions(provenance={"towers": towers_report, "ln_tuning": tuning})

    def module_settings(self, run: PTQRun) -> dict[str, Any]:
        """The first module's weight quantizer (input ranges are per position, reported per tower)."""
        return {"weights": next(iter(run.wrapped.values())).weight_quantizer.describe() if run.wrapped else None}


def _check_config(config: QVLMConfig) -> None:
    problems = []
    if config.n_calibration < 1 or config.batch_size < 1:
        problems.append("n_calibration and batch_size must be >= 1")
    if config.max_block_layers < 1:
        problems.append("max_block_layers must be >= 1")
    if not 0.0 < config.shrink_min <= 1.0 or config.shrink_step <= 0.0:
        problems.append("shrink_min must be in (0, 1] and shrink_step > 0")
    if config.sweeps < 0 or config.ln_steps < 0 or config.ln_lr <= 0.0 or config.entropy_weight < 0.0:
        problems.append("sweeps and ln_steps must be >= 0, ln_lr > 0, entropy_weight >= 0")
    if problems:
        raise QbenchError(f"q-vlm: {'; '.join(problems)}")


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [QVLMQuantizer]
