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


def open_clip_preprocess(model: nn.Module) -> Callable:
    """open_clip's evaluation transform for the model's final preprocessing config (size, mean, std, resize
    mode, interpolation): what ``create_model_and_transforms`` would return, for a model built alone."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    return open_clip.image_transform(
        cfg["size"], is_train=False, mean=cfg.get("mean"), std=cfg.get("std"),
        resize_mode=cfg.get("resize_mode"), interpolation=cfg.get("interpolation"),
    )


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
