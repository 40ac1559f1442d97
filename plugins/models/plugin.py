"""Register the zoo (``zoo.ENTRIES``) as Model plugins through the same hook as any third-party package.

Only :mod:`.zoo` and :mod:`.weights` are imported here (neither imports torch, open_clip or transformers),
so registering fifteen models costs nothing until one is loaded.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from qbench.hookspecs import hookimpl

from .weights import available_locally
from .zoo import ENTRIES, ZooEntry

if TYPE_CHECKING:
    from qbench.model import LoadRequest, ModelSpec
    from qbench.vlm import VLM


def load_entry(entry: ZooEntry, request: "LoadRequest") -> "VLM":
    """Build ``entry`` with its family's loader."""
    if entry.loader == "hf_align":
        from .align import load_align

        return load_align(entry, request)
    from .open_clip_loader import load_open_clip

    return load_open_clip(entry, request)


def describe(entry: ZooEntry) -> str:
    """One line for ``qbench list models``: parameters, input size, logits, and the entry's note."""
    logits = "sigmoid logits with bias" if entry.logit_kind == "sigmoid" else "softmax logits"
    parts = [f"{entry.tier}", f"vision/text {entry.params} M params", f"{entry.image_size}px", logits,
             f"QuickGELU {'yes' if entry.quick_gelu else 'no'}"]
    return " · ".join(parts + ([entry.note] if entry.note else []))


@hookimpl
def qbench_register_models() -> list["ModelSpec"]:
    from qbench.model import ModelSpec

    return [
        ModelSpec(
            name=entry.name,
            family=entry.family,
            arch=entry.arch,
            weights_tag=entry.weights_tag,
            pretraining_data=entry.data,
            description=describe(entry),
            citation=entry.citation,
            loader=functools.partial(load_entry, entry),
            weights_available=functools.partial(available_locally, entry),
            tier=entry.tier,
        )
        for entry in ENTRIES
    ]
