"""Where the transformer blocks, their norms and the Linears that read and write the residual stream are.

Transform-based PTQ methods (SmoothQuant, Outlier Suppression, QuaRot, QwT, APQ-ViT, Q-VLM) need more
than the flat layer inventory of :meth:`qbench.model.VLM.quantizable_modules`: which LayerNorm feeds
which Linears (so a scale can be folded across the pair exactly), which Linears write back into the
residual stream, and the blocks in forward order. This module finds them once, for every supported
block type, so no method re-implements the traversal.

Supported today: open_clip's pre-LN ``ResidualAttentionBlock`` (``ln_1 → attn → ls_1``, ``ln_2 → mlp →
ls_2``) with its attention rewritten by :func:`qbench.quant.modules.rewrite_tower_attention` into
separate ``q_proj``/``k_proj``/``v_proj``/``out_proj`` Linears. Works before and after the Linears are
wrapped as quantized modules (those subclass ``nn.Linear``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from torch import nn

from qbench.model import VLM
from qbench.quant.modules import QuantizableMultiheadAttention

NamedLinear = tuple[str, nn.Linear]


@dataclass(frozen=True)
class TransformerBlock:
    """One pre-LN residual block: ``x + ls_1(attn(ln_1(x)))`` then ``x + ls_2(mlp(ln_2(x)))``.

    Names are qualified inside ``vlm.model``. ``q``, ``k``, ``v`` and ``fc1`` read the normalised
    stream; ``out`` and ``fc2`` write into it (through the layer-scale modules ``ls_1``/``ls_2``, which
    are ``nn.Identity`` unless the model uses layer scale).
    """

    name: str
    tower: str
    module: nn.Module
    ln_1: tuple[str, nn.LayerNorm]
    q: NamedLinear
    k: NamedLinear
    v: NamedLinear
    out: NamedLinear
    ln_2: tuple[str, nn.LayerNorm]
    fc1: NamedLinear
    fc2: NamedLinear
    ls_1: nn.Module
    ls_2: nn.Module
    attention: QuantizableMultiheadAttention

    @property
    def attention_readers(self) -> tuple[NamedLinear, ...]:
        return (self.q, self.k, self.v)

    @property
    def linears(self) -> tuple[NamedLinear, ...]:
        """Every Linear of the block in forward order."""
        return (self.q, self.k, self.v, self.out, self.fc1, self.fc2)


@dataclass(frozen=True)
class NormReaders:
    """A LayerNorm and the Linears that read its output directly (a pair a scale can be folded across)."""

    norm_name: str
    norm: nn.LayerNorm
    readers: tuple[NamedLinear, ...]
    tower: str


class UnsupportedBlock(ValueError):
    """A tower holds attention blocks of a type this module cannot decompose yet."""


def transformer_blocks(vlm: VLM, towers: Sequence[str]) -> list[TransformerBlock]:
    """The residual blocks of ``towers`` in forward order (tower order as given, then depth)."""
    blocks: list[TransformerBlock] = []
    for tower in towers:
        for name, module in _modules_of(vlm, tower):
            if isinstance(module, nn.MultiheadAttention):
                raise UnsupportedBlock(f"{name} is an nn.MultiheadAttention: call rewrite_tower_attention first")
            if _is_open_clip_block(module):
                blocks.append(_open_clip_block(name, tower, module))
    return blocks


def norm_reader_pairs(vlm: VLM, towers: Sequence[str]) -> list[NormReaders]:
    """``ln_1 → (q, k, v)`` and ``ln_2 → (fc1,)`` of every block of ``towers``, in forward order."""
    pairs = []
    for block in transformer_blocks(vlm, towers):
        pairs.append(NormReaders(block.ln_1[0], block.ln_1[1], block.attention_readers, block.tower))
        pairs.append(NormReaders(block.ln_2[0], block.ln_2[1], (block.fc1,), block.tower))
    return pairs


def _modules_of(vlm: VLM, tower: str) -> Iterator[tuple[str, nn.Module]]:
    for name, module in vlm.model.named_modules():
        if name and vlm.tower_of(name + ".") == tower:
            yield name, module


def _is_open_clip_block(module: nn.Module) -> bool:
    mlp = getattr(module, "mlp", None)
    return (
        isinstance(getattr(module, "ln_1", None), nn.LayerNorm)
        and isinstance(getattr(module, "ln_2", None), nn.LayerNorm)
        and isinstance(getattr(module, "attn", None), QuantizableMultiheadAttention)
        and mlp is not None
        and isinstance(getattr(mlp, "c_fc", None), nn.Linear)
        and isinstance(getattr(mlp, "c_proj", None), nn.Linear)
    )


def _open_clip_block(name: str, tower: str, module: nn.Module) -> TransformerBlock:
    attn = module.attn
    return TransformerBlock(
        name=name,
        tower=tower,
        module=module,
        ln_1=(f"{name}.ln_1", module.ln_1),
        q=(f"{name}.attn.q_proj", attn.q_proj),
        k=(f"{name}.attn.k_proj", attn.k_proj),
        v=(f"{name}.attn.v_proj", attn.v_proj),
        out=(f"{name}.attn.out_proj", attn.out_proj),
        ln_2=(f"{name}.ln_2", module.ln_2),
        fc1=(f"{name}.mlp.c_fc", module.mlp.c_fc),
        fc2=(f"{name}.mlp.c_proj", module.mlp.c_proj),
        ls_1=getattr(module, "ls_1", nn.Identity()),
        ls_2=getattr(module, "ls_2", nn.Identity()),
        attention=attn,
    )
