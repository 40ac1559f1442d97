"""Logit tuning (``quantizers.md`` §5): re-fit only the logit scale of a frozen model on the proxy pairs.

Temperature scaling after C. Guo, G. Pleiss, Y. Sun, K. Q. Weinberger, "On Calibration of Modern Neural
Networks", ICML 2017, arXiv:1706.04599. Quantization perturbs the embedding geometry, so the logit scale
``s`` the FP32 model was trained with may no longer be the one that gives calibrated probabilities;
re-fitting that single scalar is cheap, cannot change accuracy (the arg-max of ``s·f·W`` does not move),
and shows how much of a quantizer's calibration damage is just a temperature shift.

Only ``t = log s`` is optimised; the towers are frozen, and their proxy embeddings are computed once
from the model as deployed (the quantized towers). The objective is the full-batch symmetric InfoNCE
``½[CE(s·Z_I·Z_Tᵀ) + CE(s·Z_T·Z_Iᵀ)]`` with the diagonal as targets (SigLIP: its sigmoid loss with the
model's fixed ``logit_bias``), minimised with LBFGS (lr 1, max_iter 100, strong-Wolfe line search) in
float64 from the current ``t``. ``s`` is clamped to ``[1, 100]`` (CLIP's cap). Both losses are convex
in ``s``, so the clamped minimiser is the constrained optimum.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

S_MIN = 1.0
S_MAX = 100.0
MAX_ITER = 100
ENCODE_BATCH = 256
# Tighter than torch's defaults (1e-7, 1e-9): the proxy loss of well-separated pairs is tiny near the
# optimum, and the defaults would stop LBFGS short of it. Float64 makes these reachable.
TOLERANCE_GRAD = 1e-12
TOLERANCE_CHANGE = 1e-15


@dataclass(frozen=True)
class LogitTuning:
    """The outcome of one fit: scale and proxy loss before and after, and LBFGS function evaluations."""

    s_before: float
    s_after: float
    loss_before: float
    loss_after: float
    iterations: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def proxy_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor, bias: float | None = None) -> torch.Tensor:
    """The contrastive loss of ``quantizers.md`` §1.8 over all pairs, the diagonal being the true pairs.

    Without ``bias``: symmetric InfoNCE ``½[CE(S, diag) + CE(Sᵀ, diag)]``, ``S = s·Z_I·Z_Tᵀ``. With a
    (SigLIP) bias: ``−mean_ij log σ(y_ij·(S_ij + b))``, ``y`` = +1 on the diagonal and −1 elsewhere.
    """
    logits = scale * image_emb @ text_emb.T
    if bias is not None:
        signs = 2.0 * torch.eye(logits.shape[0], dtype=logits.dtype) - 1.0
        return -F.logsigmoid(signs * (logits + bias)).mean()
    targets = torch.arange(logits.shape[0])
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def fit_logit_scale(
    image_emb: np.ndarray | torch.Tensor,
    text_emb: np.ndarray | torch.Tensor,
    init_scale: float,
    *,
    bias: float | None = None,
    s_min: float = S_MIN,
    s_max: float = S_MAX,
) -> LogitTuning:
    """The logit scale in ``[s_min, s_max]`` minimising :func:`proxy_loss` on matched ``(image, text)`` rows.

    Embeddings are ``n x d`` (row ``i`` of each is pair ``i``), used as given (already L2-normalised by
    the towers). Deterministic: float64 on the CPU, LBFGS from ``t = log(init_scale)`` (clamped into the
    range). The result never has a higher loss than ``init_scale`` when ``init_scale`` lies in the range.
    """
    if not s_min > 0 or not s_max >= s_min:
        raise ValueError(f"bad scale range [{s_min}, {s_max}]: need 0 < s_min <= s_max")
    if not init_scale > 0:
        raise ValueError(f"logit scale must be positive, got {init_scale}")
    image, text = _float64(image_emb), _float64(text_emb)
    if image.ndim != 2 or image.shape != text.shape or image.shape[0] < 2:
        raise ValueError(f"need matched n x d embeddings with n >= 2, got {tuple(image.shape)} and {tuple(text.shape)}")
    log_min, log_max = math.log(s_min), math.log(s_max)

    def loss_at(log_scale: torch.Tensor) -> torch.Tensor:
        # Clamped one nat beyond the range: the gradient still flows at the range's ends (so a start
        # at s = 1 or s = 100 can move), and the loss stays finite however far a line search probes.
        # Convex in s, so clamping the minimiser of this flat-extended loss gives the constrained optimum.
        return proxy_loss(image, text, log_scale.clamp(log_min - 1.0, log_max + 1.0).exp(), bias)

    with torch.no_grad():
        loss_before = float(proxy_loss(image, text, torch.tensor(float(init_scale), dtype=torch.float64), bias))
    t = torch.tensor(min(max(math.log(init_scale), log_min), log_max), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([t], lr=1.0, max_iter=MAX_ITER, line_search_fn="strong_wolfe",
                                  tolerance_grad=TOLERANCE_GRAD, tolerance_change=TOLERANCE_CHANGE)
    evaluations = 0

    def closure() -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        optimizer.zero_grad()
        loss = loss_at(t)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        s_after = min(max(math.exp(float(t.detach())), s_min), s_max)
        loss_after = float(proxy_loss(image, text, torch.tensor(s_after, dtype=torch.float64), bias))
    if loss_after > loss_before and s_min <= init_scale <= s_max:  # a line search never should, but never worse
        s_after, loss_after = float(init_scale), loss_before
    return LogitTuning(float(init_scale), s_after, loss_before, loss_after, evaluations)


def _float64(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A detached float64 CPU tensor (the fit runs in float64 whatever the towers computed in)."""
    if torch.is_tensor(values):
        return values.detach().double().cpu()
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


@torch.no_grad()
def encode_pairs(model, images: torch.Tensor, tokens: torch.Tensor, batch_size: int = ENCODE_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """Proxy embeddings from ``model``'s towers as they are (the deployed, quantized model), once, in float64.

    Both towers run in fixed-shape passes (:class:`~qbench.engine.batching.FixedChunks`), so the fitted scale is the
    same for any ``batch_size``, which only bounds a pass after an out-of-memory error."""
    from qbench.engine.batching import AdaptiveBatch, FixedChunks, model_numeric_batch

    embeddings, size = [], model_numeric_batch(model)
    for rows, tower in ((images, model.encode_image), (tokens, model.encode_text)):
        chunks = FixedChunks(lambda part, tower=tower: tower(part).double().cpu(), AdaptiveBatch(batch_size), size)
        chunks.feed(rows)
        embeddings.append(chunks.finish())
    return embeddings[0], embeddings[1]


def tune_model_scale(model, images: torch.Tensor, tokens: torch.Tensor, batch_size: int = ENCODE_BATCH) -> LogitTuning:
    """Fit the logit scale of ``model`` (a :class:`~qbench.model.VLM`) on proxy pairs; the model is not modified.

    The fitted scale is applied by the caller at scoring time (only the logits change), so the model
    and every parameter of it stay bit-identical.
    """
    image, text = encode_pairs(model, images, tokens, batch_size)
    return fit_logit_scale(image, text, model.logit_scale, bias=model.logit_bias)
