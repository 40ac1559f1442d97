"""Tiny random-init VLMs for tests and conformance checks (built in milliseconds, no weights, no network).

:func:`tiny_vlm` is the workhorse: a 2-layer open_clip ViT-CLIP (32 px, patch 8) with a 2-layer text tower,
widths 64, on which every quantizer is checked. :func:`tiny_family_vlm` builds the tiny architecture of each
open_clip family qbench evaluates (``qbench/model_configs/qbench-tiny-*.json``): ViT-CLIP with and without
QuickGELU, SigLIP-style sigmoid logits with a bias and average pooling, CoCa with its attentional pooler, and
ConvNeXt (a timm tower: needs ``timm`` installed). All use open_clip's BPE tokenizer with their config's
context length.

``outlier_channels`` plants activation outliers the way real CLIPs have them: the LayerNorm gains of those
residual-stream channels are multiplied by ``outlier_gain`` in every block, so the inputs of q/k/v and fc1
carry a few channels far larger than the rest (the setting outlier-aware PTQ methods target).
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import TYPE_CHECKING

from qbench.errors import QbenchError

if TYPE_CHECKING:  # torch is imported when a model is built, never when this module is imported
    import torch

    from qbench.model import VLM

WIDTH = 64
CONTEXT = 16

TINY_ARCHITECTURES: dict[str, str] = {
    "clip": "qbench-tiny-vit",
    "clip-quickgelu": "qbench-tiny-vit-quickgelu",
    "siglip": "qbench-tiny-sigmoid",
    "coca": "qbench-tiny-coca",
    "convnext": "qbench-tiny-convnext",
}
"""Family -> the tiny open_clip config (shipped in ``qbench/model_configs``) that :func:`tiny_family_vlm` builds."""

TINY_HEADS: dict[str, frozenset[str]] = {
    "coca": frozenset({"visual.attn_pool"}),
    "convnext": frozenset({"visual.head.proj"}),
}
"""Modules of a tiny family that project into the joint space and stay in float, as in the full-size models."""


def _tokenizer(context: int = CONTEXT):
    """open_clip's BPE tokenizer with the tiny models' context (16 tokens; CoCa's 15 plus its class token)."""
    import open_clip

    return functools.partial(open_clip.tokenizer.tokenize, context_length=context)


def tiny_vlm(seed: int = 0, outlier_channels: tuple[int, ...] = (), outlier_gain: float = 50.0,
             layers: int = 2) -> "VLM":
    """A 2-layer ViT (32 px, patch 8) and 2-layer text transformer, widths 64, random init from ``seed``.

    Built with ``torch.manual_seed(seed)`` so the same seed gives the same weights in every process; no
    preprocessing transform (inputs are already ``N x 3 x 32 x 32`` tensors).
    """
    import open_clip
    import torch

    from qbench.openclip_vlm import open_clip_vlm

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=WIDTH,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": WIDTH, "head_width": 32, "layers": layers},
        text_cfg={"context_length": CONTEXT, "vocab_size": 49408, "width": WIDTH, "heads": 2, "layers": layers},
    )
    if outlier_channels:
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.LayerNorm) and (".ln_1" in name or ".ln_2" in name):
                    module.weight[list(outlier_channels)] *= outlier_gain
    model.eval()
    return open_clip_vlm(model, _tokenizer(), preprocess=None, name="tiny")


def tiny_config(family: str) -> dict:
    """The open_clip model config of ``family``'s tiny architecture (a fresh dict, safe to modify)."""
    if family not in TINY_ARCHITECTURES:
        known = ", ".join(TINY_ARCHITECTURES)
        raise QbenchError(f"no tiny architecture for model family {family!r}; use one of {known}")
    name = f"{TINY_ARCHITECTURES[family]}.json"
    return json.loads(resources.files("qbench").joinpath("model_configs", name).read_text(encoding="utf-8"))


def tiny_family_vlm(family: str = "clip", seed: int = 0) -> "VLM":
    """The tiny random-init model of ``family`` (see :data:`TINY_ARCHITECTURES`) as a :class:`VLM`.

    ConvNeXt's tower comes from timm; without timm installed that family is a one-line error naming the fix.
    The preprocessing transform is open_clip's evaluation transform for the model (resize, crop, normalise).
    """
    import open_clip
    import torch

    from qbench.openclip_vlm import open_clip_preprocess, open_clip_vlm

    config = tiny_config(family)
    custom_text = config.pop("custom_text", False)
    if "timm_model_name" in config.get("vision_cfg", {}):
        try:
            import timm  # noqa: F401
        except ImportError:
            raise QbenchError(f"the tiny {family} model needs timm for its vision tower; pip install timm") from None
    torch.manual_seed(seed)
    if family == "coca":
        model = open_clip.CoCa(**config)
    elif custom_text:
        model = open_clip.CustomTextCLIP(**config)
    else:
        model = open_clip.CLIP(**config)
    model.eval()
    context = int(config.get("text_cfg", {}).get("context_length", CONTEXT))
    return open_clip_vlm(model, _tokenizer(context), open_clip_preprocess(model), name=f"tiny-{family}",
                         head_modules=TINY_HEADS.get(family, frozenset()))


def embeddings(vlm: "VLM", data) -> "tuple[torch.Tensor, torch.Tensor]":
    """Normalised image and text embeddings of a :class:`~qbench.quant.base.CalibrationData` batch, no grad."""
    import torch

    with torch.no_grad():
        return vlm.encode_image(data.images), vlm.encode_text(data.tokens)
