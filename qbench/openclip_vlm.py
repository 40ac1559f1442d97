"""Wrap an open_clip model as a :class:`qbench.model.VLM`.

open_clip has two layouts: ``CLIP`` keeps the text tower's modules at top level (``transformer``,
``token_embedding``, ``ln_final``, the ``text_projection`` Parameter); ``CustomTextCLIP`` and ``CoCa``
keep them under ``text``. Both keep the image tower under ``visual``. CLIP/CoCa projections are
Parameters, not modules, so a module scan never reaches them; timm towers project with a Linear that
callers list in ``head_modules`` (``models.md`` §6.3).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from qbench.model import VLM


def text_tower_prefixes(model: nn.Module) -> tuple[str, ...]:
    if hasattr(model, "text") and isinstance(model.text, nn.Module):
        return ("text.",)
    return ("transformer.",)


def open_clip_vlm(
    model: nn.Module,
    tokenizer: Callable,
    preprocess: Callable,
    *,
    name: str,
    head_modules: frozenset[str] = frozenset(),
) -> VLM:
    """A VLM over an open_clip model in eval mode, with the tower prefixes of its layout."""
    model.eval()
    return VLM(
        model,
        tokenizer,
        preprocess,
        name=name,
        tower_prefixes={"visual": ("visual.",), "text": text_tower_prefixes(model)},
        head_modules=head_modules,
    )
