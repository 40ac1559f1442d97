"""The torch side of ``q-vit`` (:mod:`qbench_plugins.quantizers.q_vit`): IRM, the rectified slot quantizer and DGD.

Kept apart from the registration module so that registering the plugin (``qbench list``) does not import torch;
the quantizer imports this module when it installs its slot quantizers and builds its distillation term.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qbench.errors import QbenchError
from qbench.quant.modules import Mode, QuantizableMultiheadAttention, is_under, rewrite_tower_attention
from qbench.quant.observers import select_valid_tokens, text_token_mask
from qbench.vlm import VLM
from qbench_plugins.quantizers.lsq_qat_modules import LSQActivationQuantizer

__all__ = ["DistributionGuidedDistillation", "InformationRectification", "RectifiedSlotQuantizer", "capture_qk",
           "gram_distance", "normalized_gram", "qk_attention", "token_rows"]


# -- IRM -------------------------------------------------------------------------------------------
def token_rows(x: torch.Tensor) -> torch.Tensor:
    """The per-head tokens of ``x`` ``(N, heads, L, head_dim)`` as ``(n, heads, head_dim)`` rows, only the
    valid text positions when a :func:`~qbench.quant.observers.valid_tokens` mask is active and fits."""
    per_token = x.transpose(1, 2)  # (N, L, heads, head_dim): batch-first, so the mask selects (N, L)
    selected = select_valid_tokens(per_token)
    if selected.dim() == 3:
        return selected
    return per_token.reshape(-1, x.shape[1], x.shape[3])


class InformationRectification(nn.Module):
    """Q-ViT's IRM on per-head ``(N, heads, L, head_dim)`` queries or keys:
    ``γ ⊙ (x − μ)/√(σ² + ε) + β`` with μ, σ², γ, β per (head, channel).

    Lifecycle: :meth:`observe` accumulates the exact mean and variance over every calibration token
    (Chan's parallel update in float64); :meth:`finish_calibration` makes them the running statistics and
    sets γ = √(σ²+ε), β = μ, so the module is then the identity in eval mode. Afterwards, in training
    mode it normalises with the batch statistics (valid text tokens only) and updates the running averages
    with ``momentum`` (unbiased variance, as ``nn.BatchNorm``); in eval mode it uses the running averages.
    γ and β are Parameters; statistics are buffers (the calibration accumulators exist only while
    calibrating).
    """

    def __init__(self, num_heads: int, head_dim: int, *, momentum: float = 0.1, eps: float = 1e-5,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim = int(num_heads), int(head_dim)
        self.momentum, self.eps = float(momentum), float(eps)
        self.gamma = nn.Parameter(torch.ones(num_heads, head_dim, device=device))
        self.beta = nn.Parameter(torch.zeros(num_heads, head_dim, device=device))
        self.register_buffer("running_mean", None)
        self.register_buffer("running_var", None)
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("calibration_count", None)
        self.register_buffer("calibration_mean", None)
        self.register_buffer("calibration_m2", None)

    @property
    def is_initialised(self) -> bool:
        return self.running_mean is not None

    # -- calibration ------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Fold one calibration batch into the exact mean / variance per (head, channel)."""
        rows = token_rows(x.detach()).double()
        n = rows.shape[0]
        if n == 0:
            return
        mean = rows.mean(dim=0)
        m2 = (rows - mean).pow(2).sum(dim=0)
        if self.calibration_count is None:
            self.calibration_count = torch.tensor(float(n), dtype=torch.float64, device=rows.device)
            self.calibration_mean, self.calibration_m2 = mean, m2
            return
        total = self.calibration_count + n
        delta = mean - self.calibration_mean
        self.calibration_mean = self.calibration_mean + delta * (n / total)
        self.calibration_m2 = self.calibration_m2 + m2 + delta.pow(2) * (self.calibration_count * n / total)
        self.calibration_count = total

    @torch.no_grad()
    def finish_calibration(self) -> bool:
        """Running statistics from the calibration pass, γ = √(σ²+ε), β = μ (IRM = identity); False if
        nothing was observed (then it stays uninitialised and raises when used)."""
        if self.calibration_count is None:
            return self.is_initialised
        mean = self.calibration_mean.float()
        var = (self.calibration_m2 / self.calibration_count).float()
        self.running_mean, self.running_var = mean.clone(), var.clone()
        self.gamma.copy_(torch.sqrt(var + self.eps))
        self.beta.copy_(mean)
        self.num_batches_tracked.zero_()
        self.calibration_count = self.calibration_mean = self.calibration_m2 = None
        return True

    # -- forward ----------------------------------------------------------------------------------
    def statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, σ²) applied to ``x``: the batch's (updating the running averages) in training, else the running ones."""
        if not self.is_initialised:
            raise RuntimeError("IRM used before its calibration statistics were set")
        if not self.training:
            return self.running_mean, self.running_var
        rows = token_rows(x).float()
        n = rows.shape[0]
        mean = rows.mean(dim=0)
        var = rows.var(dim=0, unbiased=False)
        with torch.no_grad():
            unbiased = var.detach() * (n / max(n - 1, 1))
            self.running_mean.mul_(1.0 - self.momentum).add_(mean.detach(), alpha=self.momentum)
            self.running_var.mul_(1.0 - self.momentum).add_(unbiased, alpha=self.momentum)
            self.num_batches_tracked.add_(1)
        return mean, var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_heads or x.shape[3] != self.head_dim:
            raise ValueError(f"IRM expects (N, {self.num_heads}, L, {self.head_dim}), got {tuple(x.shape)}")
        mean, var = self.statistics(x)
        shape = (1, self.num_heads, 1, self.head_dim)
        out = (x.float() - mean.view(shape)) / torch.sqrt(var + self.eps).view(shape)
        return (out * self.gamma.view(shape) + self.beta.view(shape)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, momentum={self.momentum}, eps={self.eps}"


class RectifiedSlotQuantizer(LSQActivationQuantizer):
    """The q or k slot quantizer of Q-ViT: IRM (child ``irm``) then LSQ at A bits.

    In ``calibrate`` mode the IRM gathers its statistics and both pass float through; :meth:`freeze`
    initialises the IRM (identity) and the LSQ step. Because IRM is a child of this quantizer, Light QAT's
    training state (quantizers and their children in training mode) gives it batch statistics while
    training. The verifier checks this slot on its output, which the attention matmul consumes.
    """

    def __init__(self, bits: int, irm: InformationRectification) -> None:
        super().__init__(bits)
        self.irm = irm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is Mode.CALIBRATE:
            self.irm.observe(x)
        elif self.irm.is_initialised or self.mode is Mode.QUANTIZE:
            x = self.irm(x)
        return super().forward(x)

    def freeze(self) -> bool:
        return self.irm.finish_calibration() and super().freeze()


# -- DGD -------------------------------------------------------------------------------------------
def normalized_gram(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``G̃``: per example and head, ``G = x xᵀ`` (tokens × tokens) with rows L2-normalised.

    ``x`` is ``(N, heads, L, d)``; ``mask`` ``(N, L)`` bool zeroes the excluded tokens first, which removes
    their rows and columns from G (a zero row stays zero after normalisation), exactly as if G were
    restricted to the valid tokens.
    """
    x = x.float()
    if mask is not None:
        x = x * mask.to(device=x.device, dtype=x.dtype)[:, None, :, None]
    return F.normalize(x @ x.transpose(-2, -1), dim=-1)


def gram_distance(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``‖G̃^S − G̃^T‖_F`` per example and head, shape ``(N, heads)``."""
    difference = normalized_gram(student, mask) - normalized_gram(teacher.detach(), mask)
    return torch.linalg.vector_norm(difference, dim=(-2, -1))


def qk_attention(vlm: VLM, towers: Sequence[str]) -> dict[str, QuantizableMultiheadAttention]:
    """The rewritten attention modules of ``towers`` (heads excluded), by name inside ``vlm.model``."""
    return {
        name: module
        for name, module in vlm.model.named_modules()
        if isinstance(module, QuantizableMultiheadAttention)
        and vlm.tower_of(name) in towers
        and not is_under(name, vlm.head_modules)
    }


@contextmanager
def capture_qk(attention: dict[str, QuantizableMultiheadAttention],
               store: dict[str, list[torch.Tensor]]) -> Iterator[None]:
    """Record the outputs of every ``q`` and ``k`` slot (what the attention consumes) into ``store``
    (``"{name}.q"`` → one tensor per call) while active; the hooks are removed on exit."""
    handles = []

    def recorder(key: str):
        def hook(module, inputs, output):
            store.setdefault(key, []).append(output)

        return hook

    try:
        for name, module in attention.items():
            for slot in ("q", "k"):
                handles.append(getattr(module, slot).register_forward_hook(recorder(f"{name}.{slot}")))
        yield
    finally:
        for handle in handles:
            handle.remove()


class DistributionGuidedDistillation:
    """Q-ViT's DGD as a Light-QAT auxiliary term: ``weight · mean_{l,h}(‖G̃_q^S − G̃_q^T‖_F + ‖G̃_k^S − G̃_k^T‖_F)``.

    :meth:`capture` hooks the student's ``q``/``k`` slot outputs during its forward; calling the object
    with the batch runs the FP teacher (attention rewritten, exact) on the same images (and, in joint
    scope, captions), captures its per-head q/k, and returns the weighted term. Text positions after
    end-of-text are excluded from G. Nothing is kept on the model: hooks live only inside the two captures.
    """

    name = "dgd"

    def __init__(self, student: VLM, teacher: VLM, towers: Sequence[str], weight: float) -> None:
        self.towers = tuple(towers)
        self.weight = float(weight)
        rewrite_tower_attention(teacher, self.towers)  # no-op where already rewritten
        self.student, self.teacher = student, teacher
        self.student_attention = qk_attention(student, self.towers)
        self.teacher_attention = qk_attention(teacher, self.towers)
        if self.student_attention.keys() != self.teacher_attention.keys():
            raise QbenchError("q-vit: student and teacher attention modules do not match; cannot distil q/k")
        self.text_attention = {name for name in self.student_attention if student.tower_of(name) == "text"}
        self._student: dict[str, list[torch.Tensor]] | None = None

    @property
    def n_blocks(self) -> int:
        return len(self.student_attention)

    @contextmanager
    def capture(self) -> Iterator[None]:
        store: dict[str, list[torch.Tensor]] = {}
        with capture_qk(self.student_attention, store):
            yield
        self._student = store

    @torch.no_grad()
    def teacher_qk(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """The teacher's per-head q/k of one batch (its identity slots' outputs)."""
        store: dict[str, list[torch.Tensor]] = {}
        with capture_qk(self.teacher_attention, store):
            self.teacher.encode_image(images)
            if "text" in self.towers and self.text_attention:
                self.teacher.encode_text(tokens)
        return store

    def unweighted(self, student: dict[str, list[torch.Tensor]], teacher: dict[str, list[torch.Tensor]],
                   tokens: torch.Tensor | None) -> torch.Tensor:
        """``L_DGD`` from captured student and teacher q/k (mean over blocks, heads and the batch)."""
        mask = text_token_mask(tokens) if tokens is not None and self.text_attention else None
        total: torch.Tensor | None = None
        pairs = 0
        for name in self.student_attention:
            text = name in self.text_attention and mask is not None
            for slot in ("q", "k"):
                key = f"{name}.{slot}"
                for s, t in zip(student.get(key, []), teacher.get(key, []), strict=True):
                    valid = mask if text and mask.shape == (s.shape[0], s.shape[2]) else None
                    term = gram_distance(s, t, valid).mean(dim=0).sum()  # batch mean, summed over heads
                    total = term if total is None else total + term
            calls = len(student.get(f"{name}.q", []))
            pairs += calls * self.student_attention[name].num_heads
        if total is None or pairs == 0:
            raise RuntimeError("q-vit DGD: no q/k was captured (call inside capture() around the student's forward)")
        return total / pairs

    def __call__(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self._student is None:
            raise RuntimeError("q-vit DGD called without a captured student forward")
        student, self._student = self._student, None
        teacher = self.teacher_qk(images, tokens)
        return self.weight * self.unweighted(student, teacher, tokens if "text" in self.towers else None)
