"""Tiny open_clip CLIPs and proxy batches for quantizer tests (built in milliseconds, no weights).

``outlier_channels`` plants activation outliers the way real CLIPs have them: the LayerNorm gains of
those residual-stream channels are multiplied by ``outlier_gain`` in every block, so the inputs of
q/k/v and fc1 carry a few channels far larger than the rest (the SmoothQuant / QuaRot setting).
"""

from __future__ import annotations

import functools

import open_clip
import torch

from qbench.openclip_vlm import open_clip_vlm
from qbench.quant.base import CalibrationData

WIDTH = 64
CONTEXT = 16


def tiny_vlm(seed: int = 0, outlier_channels: tuple[int, ...] = (), outlier_gain: float = 50.0, layers: int = 2):
    """A 2-layer ViT (32 px, patch 8) and 2-layer text transformer, widths 64, random init."""
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
    tokenizer = functools.partial(open_clip.tokenizer.tokenize, context_length=CONTEXT)
    return open_clip_vlm(model, tokenizer, preprocess=None, name="tiny")


def proxy_batch(vlm, n: int = 16, seed: int = 1) -> CalibrationData:
    """``n`` random images and captions as calibration data (never evaluation data)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    words = ["red", "blue", "circle", "square", "a", "photo", "of", "small", "big", "star"]
    captions = tuple(
        " ".join(words[int(i)] for i in torch.randint(0, len(words), (5,), generator=generator)) for _ in range(n)
    )
    return CalibrationData(source="tiny-random", images=images, tokens=vlm.tokenize(captions),
                           captions=captions, fingerprint=f"tiny-{n}-{seed}")


@torch.no_grad()
def embeddings(vlm, data: CalibrationData) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image and text embeddings of a batch."""
    return vlm.encode_image(data.images), vlm.encode_text(data.tokens)
