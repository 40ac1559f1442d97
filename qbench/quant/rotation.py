"""Exact rotations of a pre-LN transformer's residual stream (QuaRot steps 1–4, ``quantizers.md`` §2.6).

QuaRot (S. Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", NeurIPS 2024,
arXiv:2404.00456) multiplies the residual stream of a transformer by an orthogonal matrix ``Q`` and folds
``Q`` into the weights that read and write the stream, so the float network computes the same function
while every Linear input is a rotated vector whose outlier channels are spread over all channels. The
trick needs the block norms to commute with ``Q``: RMSNorm does (``‖xQ‖ = ‖x‖``), LayerNorm does not (its
mean subtraction). SliceGPT (S. Ashkboos et al., "SliceGPT: Compress Large Language Models by Deleting
Rows and Columns", ICLR 2024, arXiv:2401.15024) observed that a LayerNorm whose input is already zero-mean
*is* an RMSNorm, and that the stream can be made zero-mean by centring every stream writer. The four steps,
for open_clip towers (image ``VisionTransformer`` and text transformer):

1. :func:`zero_mean_stream` — fold layer-scale vectors into their writer, subtract the output-dim mean of
   every stream writer (``out_proj``, ``c_fc``→``c_proj``, the token/class/positional embeddings and the
   patch-embed conv when no norm starts the stream) and, where a norm starts the stream (``ln_pre``),
   append the float centring map ``h ← h(I − 11ᵀ/d)`` after it.
2. :func:`fold_block_norms` — fold ``ln_1``/``ln_2`` into their readers
   (:func:`qbench.quant.transforms.fold_norm_into_readers`) and replace them by the affine-free
   :class:`RMSNorm` with the same eps.
3. :func:`rotate_stream` — readers ``W ← W·Q``, writers ``W ← Qᵀ·W, b ← Qᵀ·b``, the stream start rotated
   the same way, and the float un-rotation ``h ← h·Qᵀ`` before the final norm (``ln_post``/``ln_final``), so
   the final norm and the head (``visual.proj``, ``text_projection``) see exactly the original stream.
4. :func:`attach_online_hadamards` — a fixed float Hadamard ``x ← x·H`` on the inputs of ``out_proj`` and
   ``c_proj`` (which no stream rotation reaches), with ``W ← W·H`` folded.

:func:`rotate_model` runs all four on the towers in scope and returns a :class:`RotationReport` (what was
added, which matrices were used, which float modules the verifier must list). Quantization (QuaRot step 5)
is the quantizer's business, so a QAT method can reuse the transform unchanged.

The rotation ``Q`` is a seeded random Hadamard matrix ``H·diag(±1)/√d``: Sylvester's construction for
``d = 2^k``, the Kronecker product with Paley's 12×12 matrix for ``d = 12·2^k`` (768, 3072), otherwise a
seeded random orthogonal matrix (QR of a Gaussian matrix with the sign fix that makes it Haar-distributed).

How the float maps are inserted: each map is a small module with a fixed buffer, registered as a *child* of
the module whose input (or output) it transforms and applied by a forward pre-hook (or forward hook) of that
module. So the qualified names of every original module stay the same (``attn.out_proj`` is still the
Linear that gets wrapped; ``ln_post`` is still the LayerNorm), the maps travel with their host through
:func:`qbench.quant.modules.quantize_modules` (which keeps children and hooks), ``deepcopy`` and
``state_dict``, and they compute with ``torch.matmul`` rather than ``F.linear``, so the verifier never takes
them for a quantized kernel. All transform maths runs in float64 and is cast back (``quantizers.md`` §1.1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qbench.model import VLM
from qbench.quant.modules import rewrite_tower_attention
from qbench.quant.structure import NormReaders, TransformerBlock, UnsupportedBlock, transformer_blocks
from qbench.quant.transforms import fold_norm_into_readers

# -- orthogonal matrices ---------------------------------------------------------------------------
PALEY_ORDER = 12
"""The non-power-of-two Hadamard base used here (QuaRot's ``had12``): 768 = 12·64, 3072 = 12·256."""


def sylvester_hadamard(n: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of order ``n = 2^k`` (Sylvester: ``H_2n = [[H, H], [H, −H]]``), float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


def paley_hadamard(q: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of order ``q + 1`` by Paley's first construction, for a prime ``q ≡ 3 (mod 4)``.

    With the Jacobsthal matrix ``J_ij = χ(j − i)`` (χ the quadratic character mod q) and
    ``S = [[0, 1ᵀ], [−1, J]]`` (skew-symmetric), ``H = I + S``. ``paley_hadamard(11)`` is the 12×12 matrix.
    """
    if q < 3 or q % 4 != 3 or any(q % p == 0 for p in range(2, int(math.isqrt(q)) + 1)):
        raise ValueError(f"Paley's first construction needs a prime q ≡ 3 (mod 4), got {q}")
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if r in residues else -1.0 for r in range(1, q)], dtype=torch.float64)
    index = torch.arange(q)
    jacobsthal = chi[(index[None, :] - index[:, None]) % q]
    skew = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    skew[0, 1:] = 1.0
    skew[1:, 0] = -1.0
    skew[1:, 1:] = jacobsthal
    return torch.eye(q + 1, dtype=torch.float64) + skew


def hadamard_kind(n: int) -> str:
    """Which construction :func:`hadamard_matrix` uses for order ``n``: ``sylvester``, ``paley12`` or ``none``."""
    if n >= 1 and not n & (n - 1):
        return "sylvester"
    if n % PALEY_ORDER == 0 and _is_power_of_two(n // PALEY_ORDER):
        return "paley12"
    return "none"


def hadamard_matrix(n: int) -> torch.Tensor:
    """A ±1 Hadamard matrix of order ``n = 2^k`` or ``12·2^k`` (``H Hᵀ = n I``), float64."""
    kind = hadamard_kind(n)
    if kind == "sylvester":
        return sylvester_hadamard(n)
    if kind == "paley12":
        return torch.kron(paley_hadamard(PALEY_ORDER - 1), sylvester_hadamard(n // PALEY_ORDER))
    raise ValueError(f"no Hadamard construction for order {n} (supported: 2^k and 12·2^k)")


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random ``n×n`` orthogonal matrix: QR of a Gaussian matrix, columns' signs fixed by ``diag(R)``."""
    gaussian = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


def random_hadamard(n: int, generator: torch.Generator) -> tuple[torch.Tensor, str]:
    """The orthogonal ``Q = H·diag(±1)/√n`` with seeded signs, or a random orthogonal matrix when no
    Hadamard of order ``n`` is constructible; returns ``(Q, kind)`` with kind as :func:`hadamard_kind` or
    ``random-orthogonal``."""
    kind = hadamard_kind(n)
    if kind == "none":
        return random_orthogonal(n, generator), "random-orthogonal"
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64).to(torch.float64) * 2 - 1
    return hadamard_matrix(n) * signs / math.sqrt(n), kind


def online_hadamard_matrix(n: int, generator: torch.Generator) -> tuple[torch.Tensor, str]:
    """The fixed orthogonal map of step 4: the normalised Hadamard ``H/√n`` (deterministic, as QuaRot's
    online ``had_K`` transforms, so a fast Walsh–Hadamard kernel could apply it), or a seeded random
    orthogonal matrix when no Hadamard of order ``n`` is constructible."""
    kind = hadamard_kind(n)
    if kind == "none":
        return random_orthogonal(n, generator), "random-orthogonal"
    return hadamard_matrix(n) / math.sqrt(n), kind


def derived_generator(seed: int, *labels: object) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``labels`` (stable across processes, unlike ``hash``)."""
    text = ":".join(str(part) for part in (seed, *labels))
    value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(value)


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


# -- float modules inserted by the transform ---------------------------------------------------------
class RMSNorm(nn.LayerNorm):
    """``y = x / sqrt(mean(x²) + eps)`` over the last dim, affine-free: the norm that replaces a folded
    ``ln_1``/``ln_2`` (QuaRot step 2).

    Why not keep the LayerNorm with ``γ = 1, β = 0``: that equals RMSNorm only on a zero-mean input, and the
    rotated stream ``xQ`` is no longer zero-mean (``xQ·1 ≠ 0`` in general), so the mean subtraction would
    change the result; RMSNorm commutes with any orthogonal ``Q``. It subclasses ``nn.LayerNorm`` (with
    ``weight = bias = None``) only so block discovery (:func:`qbench.quant.structure.transformer_blocks`,
    which looks for ``nn.LayerNorm`` ``ln_1``/``ln_2``) still finds the blocks of a rotated tower;
    the forward never subtracts a mean. Computed in float32, returned in the input dtype.
    """

    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=False, device=device, dtype=dtype)

    @classmethod
    def replacing(cls, norm: nn.LayerNorm) -> "RMSNorm":
        """The affine-free RMSNorm with the shape and eps of ``norm`` (its affine part must be folded away)."""
        return cls(norm.normalized_shape, eps=norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, eps=self.eps).to(x.dtype)


class StreamMap(nn.Module):
    """A fixed float linear map on the last dim, applied to a host module's input or output by a hook.

    Subclasses define the map; :meth:`attach_before` / :meth:`attach_after` register the map as a child of
    its host (so it shares the host's name, device moves and state dict) and as its forward pre-hook /
    forward hook. ``reason`` is what :class:`RotationReport` lists for the verifier.
    """

    reason: str = "fixed float map of the rotation transform"

    def attach_before(self, host: nn.Module, name: str) -> None:
        """Apply this map to the first positional input of ``host`` on every call."""
        host.add_module(name, self)
        host.register_forward_pre_hook(self._pre_hook)

    def attach_after(self, host: nn.Module, name: str) -> None:
        """Apply this map to the output of ``host`` on every call."""
        host.add_module(name, self)
        host.register_forward_hook(self._post_hook)

    def _pre_hook(self, host: nn.Module, args: tuple) -> tuple:
        return (self(args[0]), *args[1:])

    def _post_hook(self, host: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self(output)


class CenteringMap(StreamMap):
    """``h ← h(I − 11ᵀ/d)``: subtract each vector's mean over the last dim (QuaRot step 1 after ``ln_pre``).

    Computed as ``h − mean(h)``, the same map without the d×d matrix.
    """

    reason = "QuaRot step 1: float centring map h(I - 11^T/d) after the stream-starting norm (zero-mean stream)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=-1, keepdim=True)


class MatrixMap(StreamMap):
    """``x ← x·M`` with a fixed ``(d, d)`` buffer ``matrix`` (computed with ``torch.matmul`` in x's dtype)."""

    def __init__(self, matrix: torch.Tensor, reason: str) -> None:
        super().__init__()
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"a stream map needs a square matrix, got shape {tuple(matrix.shape)}")
        self.register_buffer("matrix", matrix)
        self.reason = reason

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.matrix.to(x.dtype))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


START_ROTATION_REASON = "QuaRot step 3: float stream rotation h·Q after the stream-starting norm"
UNROTATION_REASON = "QuaRot step 3: float un-rotation h·Q^T before the final norm (head path untouched)"
ONLINE_HADAMARD_REASON = "QuaRot step 4: fixed online Hadamard x·H before the input quantizer (W·H folded)"


class StreamRotation(MatrixMap):
    """``h ← h·Q`` after a stream-starting norm, or ``h ← h·Qᵀ`` before the final norm (QuaRot step 3)."""

    def __init__(self, matrix: torch.Tensor, *, inverse: bool) -> None:
        super().__init__(matrix, UNROTATION_REASON if inverse else START_ROTATION_REASON)


class OnlineHadamard(MatrixMap):
    """``x ← x·H`` on a Linear's input, its ``W·H`` folded into the Linear (QuaRot step 4)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__(matrix, ONLINE_HADAMARD_REASON)


# -- the residual stream of a tower ----------------------------------------------------------------
@dataclass
class ResidualStream:
    """Where one open_clip tower's residual stream starts, what reads/writes it, and where it ends.

    ``start_norm`` is the norm that starts the stream (visual ``ln_pre``) or None; ``start_rows`` are the
    stream-start tensors whose *last* dim is the stream (embeddings, positional/class embeddings) and
    ``start_writers`` the modules whose *dim 0* is the stream (the patch-embed conv), both only used when no
    norm starts the stream. ``final_norm`` is ``ln_post``/``ln_final``.
    """

    tower: str
    width: int
    blocks: list[TransformerBlock]
    final_norm: tuple[str, nn.Module]
    start_norm: tuple[str, nn.Module] | None
    start_rows: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    start_writers: list[tuple[str, nn.Module]] = field(default_factory=list)

    @property
    def writers(self) -> list[tuple[str, nn.Linear]]:
        """The block Linears whose output is added to the stream (``out_proj``, ``c_proj``)."""
        return [linear for block in self.blocks for linear in (block.out, block.fc2)]

    @property
    def readers(self) -> list[tuple[str, nn.Linear]]:
        """The block Linears that read the normalised stream (``q/k/v_proj``, ``c_fc``)."""
        return [linear for block in self.blocks for linear in (*block.attention_readers, block.fc1)]


def residual_stream(vlm: VLM, tower: str) -> ResidualStream:
    """The :class:`ResidualStream` of an open_clip ``visual`` or ``text`` tower (attention rewritten).

    Raises :class:`~qbench.quant.structure.UnsupportedBlock` for layouts the exact transform does not
    cover: attention pooling, CoCa's appended text class token, or resblocks that are not open_clip's
    pre-LN ``ResidualAttentionBlock``.
    """
    blocks = transformer_blocks(vlm, (tower,))
    if tower == "visual":
        return _visual_stream(vlm, blocks)
    if tower == "text":
        return _text_stream(vlm, blocks)
    raise UnsupportedBlock(f"unknown tower {tower!r}")


def _check_blocks(tower: str, holder: nn.Module, blocks: list[TransformerBlock]) -> None:
    resblocks = getattr(getattr(holder, "transformer", None), "resblocks", None)
    if resblocks is None or len(resblocks) != len(blocks) or not blocks:
        raise UnsupportedBlock(
            f"{tower} tower: the rotation transform covers open_clip pre-LN ResidualAttentionBlocks only "
            f"(found {len(blocks)} of {len(resblocks) if resblocks is not None else '?'} blocks)"
        )


def _visual_stream(vlm: VLM, blocks: list[TransformerBlock]) -> ResidualStream:
    visual = getattr(vlm.model, "visual", None)
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "ln_post", "transformer")
    if visual is None or not all(hasattr(visual, attr) for attr in needed):
        raise UnsupportedBlock("visual tower is not an open_clip VisionTransformer")
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedBlock("visual tower uses attention pooling, which reads the stream before ln_post")
    _check_blocks("visual", visual, blocks)
    width = int(visual.class_embedding.numel())
    if isinstance(visual.ln_pre, nn.Identity):
        return ResidualStream(
            tower="visual",
            width=width,
            blocks=blocks,
            final_norm=("visual.ln_post", visual.ln_post),
            start_norm=None,
            start_rows=[
                ("visual.class_embedding", visual.class_embedding),
                ("visual.positional_embedding", visual.positional_embedding),
            ],
            start_writers=[("visual.conv1", visual.conv1)],
        )
    return ResidualStream(
        tower="visual",
        width=width,
        blocks=blocks,
        final_norm=("visual.ln_post", visual.ln_post),
        start_norm=("visual.ln_pre", visual.ln_pre),
    )


def _text_stream(vlm: VLM, blocks: list[TransformerBlock]) -> ResidualStream:
    text = vlm.model.text if isinstance(getattr(vlm.model, "text", None), nn.Module) else vlm.model
    prefix = "text." if text is not vlm.model else ""
    needed = ("token_embedding", "positional_embedding", "ln_final", "transformer")
    if not all(hasattr(text, attr) for attr in needed):
        raise UnsupportedBlock("text tower is not an open_clip text transformer")
    if getattr(text, "cls_emb", None) is not None:
        raise UnsupportedBlock("text tower appends a class token (CoCa), not covered by the rotation transform")
    _check_blocks("text", text, blocks)
    return ResidualStream(
        tower="text",
        width=int(text.token_embedding.weight.shape[1]),
        blocks=blocks,
        final_norm=(f"{prefix}ln_final", text.ln_final),
        start_norm=None,
        start_rows=[
            (f"{prefix}token_embedding.weight", text.token_embedding.weight),
            (f"{prefix}positional_embedding", text.positional_embedding),
        ],
    )


# -- float64 in-place edits ------------------------------------------------------------------------
@torch.no_grad()
def _edit(tensor: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """``tensor ← fn(tensor)`` computed in float64 on the tensor's device, cast back in place."""
    tensor.copy_(fn(tensor.detach().double()).to(tensor.dtype))


def _edit_rows(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Apply ``fn`` to a writer's ``(out, rest)`` weight view and to its bias as a column ``(out, 1)``."""
    _edit(module.weight, lambda w: fn(w.reshape(w.shape[0], -1)).reshape(w.shape))
    if getattr(module, "bias", None) is not None:
        _edit(module.bias, lambda b: fn(b[:, None])[:, 0])


def _center_columns(m: torch.Tensor) -> torch.Tensor:
    """``(I − 11ᵀ/d)·m``: each column minus its mean over the output dim."""
    return m - m.mean(dim=0, keepdim=True)


def _center_last(m: torch.Tensor) -> torch.Tensor:
    """``m·(I − 11ᵀ/d)``: each row minus its mean over the last dim."""
    return m - m.mean(dim=-1, keepdim=True)


# -- step 1: zero-mean stream ------------------------------------------------------------------------
def fold_layer_scale(block: TransformerBlock) -> int:
    """Fold ``ls_1``/``ls_2`` (open_clip ``LayerScale``) into ``out_proj``/``c_proj`` rows and bias and
    replace them by ``nn.Identity``; returns how many were folded."""
    folded = 0
    for attr, (_, writer) in (("ls_1", block.out), ("ls_2", block.fc2)):
        scale = getattr(block.module, attr, None)
        if scale is None or isinstance(scale, nn.Identity):
            continue
        gamma = getattr(scale, "gamma", None)
        if not isinstance(gamma, torch.Tensor) or gamma.numel() != writer.weight.shape[0]:
            raise UnsupportedBlock(f"{block.name}.{attr} is not a per-channel layer scale")
        g = gamma.detach().double().reshape(-1, 1)
        _edit_rows(writer, lambda m, g=g: m * g.to(m.device))
        setattr(block.module, attr, nn.Identity())
        folded += 1
    return folded


def zero_mean_stream(stream: ResidualStream) -> dict[str, str]:
    """QuaRot step 1: make every vector of the residual stream zero-mean, exactly.

    Layer scales are folded first; every writer's rows and bias lose their output-dim mean; the stream start
    is centred (embedding rows / patch-embed rows) or, behind a starting norm, a :class:`CenteringMap` is
    appended to that norm. Every block norm then sees a zero-mean input, where LayerNorm equals RMSNorm.
    Returns the float modules added, ``{name: reason}``.
    """
    for block in stream.blocks:
        fold_layer_scale(block)
    stream.blocks = [_refreshed(block) for block in stream.blocks]
    for _, writer in stream.writers + stream.start_writers:
        _edit_rows(writer, _center_columns)
    for _, rows in stream.start_rows:
        _edit(rows, _center_last)
    if stream.start_norm is None:
        return {}
    name, norm = stream.start_norm
    centering = CenteringMap()
    centering.attach_after(norm, "centering")
    return {f"{name}.centering": centering.reason}


# -- step 2: fold block norms ------------------------------------------------------------------------
def fold_block_norms(stream: ResidualStream) -> int:
    """QuaRot step 2: fold ``ln_1``/``ln_2`` into their readers and swap them for :class:`RMSNorm`.

    Exact only on a zero-mean stream (run :func:`zero_mean_stream` first). Re-discovers the blocks
    afterwards so ``stream.blocks`` names the new norms. Returns the number of norms replaced.
    """
    replaced = 0
    for block in stream.blocks:
        pairs = (
            ("ln_1", NormReaders(block.ln_1[0], block.ln_1[1], block.attention_readers, block.tower)),
            ("ln_2", NormReaders(block.ln_2[0], block.ln_2[1], (block.fc1,), block.tower)),
        )
        for attr, pair in pairs:
            if isinstance(pair.norm, RMSNorm):
                raise ValueError(f"{pair.norm_name} is already an RMSNorm: the tower was transformed twice")
            fold_norm_into_readers(pair)
            setattr(block.module, attr, RMSNorm.replacing(pair.norm))
            replaced += 1
    stream.blocks = [_refreshed(block) for block in stream.blocks]
    return replaced


def _refreshed(block: TransformerBlock) -> TransformerBlock:
    """The block with its norms and layer scales re-read from its module (after they were replaced)."""
    module = block.module
    return dataclasses.replace(
        block,
        ln_1=(block.ln_1[0], module.ln_1),
        ln_2=(block.ln_2[0], module.ln_2),
        ls_1=getattr(module, "ls_1", nn.Identity()),
        ls_2=getattr(module, "ls_2", nn.Identity()),
    )


# -- step 3: rotate ----------------------------------------------------------------------------------
def rotate_stream(stream: ResidualStream, q: torch.Tensor) -> dict[str, str]:
    """QuaRot step 3: rotate the stream by the orthogonal ``q`` (``(d, d)``, float64): ``x ← x·Q``.

    Readers ``W ← W·Q``; writers ``W ← Qᵀ·W, b ← Qᵀ·b``; stream-start rows ``E ← E·Q`` (or start writers
    ``W ← Qᵀ·W``, or a :class:`StreamRotation` ``h ← h·Q`` after the starting norm); a
    :class:`StreamRotation` ``h ← h·Qᵀ`` before the final norm. Exact when the block norms are
    :class:`RMSNorm`. Returns the float modules added.
    """
    if tuple(q.shape) != (stream.width, stream.width):
        raise ValueError(f"{stream.tower}: rotation of shape {tuple(q.shape)} for a stream of width {stream.width}")
    q = q.to(torch.float64)
    for _, reader in stream.readers:
        _edit(reader.weight, lambda w: w @ q.to(w.device))
    for _, writer in stream.writers + stream.start_writers:
        _edit_rows(writer, lambda m: q.to(m.device).T @ m)
    for _, rows in stream.start_rows:
        _edit(rows, lambda e: e @ q.to(e.device))
    added: dict[str, str] = {}
    device, dtype = _param_device_dtype(stream)
    if stream.start_norm is not None:
        name, norm = stream.start_norm
        start = StreamRotation(q.to(device=device, dtype=dtype), inverse=False)
        start.attach_after(norm, "rotation")
        added[f"{name}.rotation"] = start.reason
    name, norm = stream.final_norm
    unrotation = StreamRotation(q.T.contiguous().to(device=device, dtype=dtype), inverse=True)
    unrotation.attach_before(norm, "unrotation")
    added[f"{name}.unrotation"] = unrotation.reason
    return added


def _param_device_dtype(stream: ResidualStream) -> tuple[torch.device, torch.dtype]:
    weight = stream.blocks[0].q[1].weight
    return weight.device, weight.dtype


# -- step 4: online Hadamards ------------------------------------------------------------------------
@dataclass(frozen=True)
class OnlineHadamardSite:
    """One shared :class:`OnlineHadamard`: its role, order, construction and the Linears it feeds."""

    role: str
    dim: int
    kind: str
    targets: tuple[str, ...]


def attach_online_hadamards(
    stream: ResidualStream, generator: torch.Generator
) -> tuple[list[OnlineHadamardSite], dict[str, str]]:
    """QuaRot step 4: ``x ← x·H`` before ``out_proj`` and ``c_proj``, with ``W ← W·H`` folded.

    One :class:`OnlineHadamard` per role (attention output of width d, MLP hidden of width 4d) is shared by
    every block of the tower (one buffer, attached as ``<linear>.online_hadamard`` to each). ``H`` is the
    normalised Hadamard matrix, or a random orthogonal matrix from ``generator`` where none is constructible.
    Returns the maps and the float modules added.
    """
    maps: list[OnlineHadamardSite] = []
    added: dict[str, str] = {}
    roles = (
        ("attention-output", [block.out for block in stream.blocks]),
        ("mlp-hidden", [block.fc2 for block in stream.blocks]),
    )
    device, dtype = _param_device_dtype(stream)
    for role, linears in roles:
        dim = int(linears[0][1].weight.shape[1])
        h, kind = online_hadamard_matrix(dim, generator)
        shared = OnlineHadamard(h.to(device=device, dtype=dtype))
        for name, linear in linears:
            if int(linear.weight.shape[1]) != dim:
                raise UnsupportedBlock(f"{name}: input width {linear.weight.shape[1]} differs from {dim} in its tower")
            _edit(linear.weight, lambda w: w @ h.to(w.device))
            shared.attach_before(linear, "online_hadamard")
            added[f"{name}.online_hadamard"] = shared.reason
        maps.append(OnlineHadamardSite(role, dim, kind, tuple(name for name, _ in linears)))
    return maps, added


# -- the whole transform -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TowerRotation:
    """What :func:`rotate_model` did to one tower."""

    tower: str
    width: int
    blocks: int
    rotation_kind: str
    layer_scales_folded: int
    norms_replaced: int
    start: str
    online: tuple[OnlineHadamardSite, ...]
    fixed_buffer_values: int


@dataclass(frozen=True)
class RotationReport:
    """The outcome of :func:`rotate_model`: per-tower details and the float modules added.

    ``float_extras`` (``{qualified name inside vlm.model: reason}``) is what a quantizer passes on as
    :attr:`qbench.quant.base.QuantizedModel.float_extras`; ``fixed_buffer_values`` counts the values of
    the fixed float matrices added (never trained).
    """

    seed: int
    towers: tuple[TowerRotation, ...]
    float_extras: dict[str, str]
    attention_modules_rewritten: int

    @property
    def fixed_buffer_values(self) -> int:
        return sum(tower.fixed_buffer_values for tower in self.towers)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form for provenance."""
        return {
            "seed": self.seed,
            "attention_modules_rewritten": self.attention_modules_rewritten,
            "fixed_buffer_values": self.fixed_buffer_values,
            "towers": [asdict(tower) for tower in self.towers],
            "float_extras": dict(self.float_extras),
        }


@torch.no_grad()
def rotate_tower(
    vlm: VLM, tower: str, seed: int, *, online_hadamard: bool = True
) -> tuple[TowerRotation, dict[str, str]]:
    """QuaRot steps 1–4 on one tower; returns its :class:`TowerRotation` and the float modules added."""
    stream = residual_stream(vlm, tower)
    if any(isinstance(block.ln_1[1], RMSNorm) for block in stream.blocks):
        raise ValueError(f"{tower} tower is already rotated (its block norms are RMSNorms)")
    layer_scales = sum(1 for block in stream.blocks for attr in ("ls_1", "ls_2")
                       if not isinstance(getattr(block.module, attr, nn.Identity()), nn.Identity))
    added = zero_mean_stream(stream)
    norms = fold_block_norms(stream)
    q, kind = random_hadamard(stream.width, derived_generator(seed, "quarot-rotation", tower))
    added.update(rotate_stream(stream, q))
    online: list[OnlineHadamardSite] = []
    if online_hadamard:
        online, online_added = attach_online_hadamards(stream, derived_generator(seed, "quarot-online", tower))
        added.update(online_added)
    matrices = (1 if stream.start_norm is not None else 0) + 1  # start rotation (if any) + un-rotation
    buffers = matrices * stream.width**2 + sum(item.dim**2 for item in online)
    start = "norm+centering+rotation" if stream.start_norm is not None else "embeddings centred and rotated"
    report = TowerRotation(
        tower=tower,
        width=stream.width,
        blocks=len(stream.blocks),
        rotation_kind=kind,
        layer_scales_folded=layer_scales,
        norms_replaced=norms,
        start=start,
        online=tuple(online),
        fixed_buffer_values=buffers,
    )
    return report, added


def rotate_model(vlm: VLM, towers: Sequence[str], seed: int, *, online_hadamard: bool = True) -> RotationReport:
    """QuaRot steps 1–4 on every tower in ``towers`` (in place); the float model's function is unchanged.

    Rewrites the towers' attention first (a no-op when already done), so q/k/v/out are real Linears. Towers
    not listed are not touched at all. Each tower gets its own rotation, seeded from ``seed`` and the tower
    name. Run before quantizer wrapping (the weights are edited in place).
    """
    rewritten = rewrite_tower_attention(vlm, towers)
    results: list[TowerRotation] = []
    extras: dict[str, str] = {}
    for tower in towers:
        result, added = rotate_tower(vlm, tower, seed, online_hadamard=online_hadamard)
        results.append(result)
        extras.update(added)
    vlm.clear_caches()
    return RotationReport(seed=seed, towers=tuple(results), float_extras=extras, attention_modules_rewritten=rewritten)
