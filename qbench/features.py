"""Compute once: image and text features per encoder state, in memory and on disk.

Within one ``qbench eval`` each image of each dataset is decoded and preprocessed once and passes
through each image-encoder state (FP32, quantized) exactly once; every prompt set passes through each
text-encoder state once. All logits, scorers, metrics and OOD pairs read these features.

Across runs, an on-disk cache keyed by the *encoder state* (a hash of the tower's parameters, buffers
and module settings — so FP32 weights, quantizer scales and bit formats all count), the dataset's
content fingerprint and the preprocessing makes a second run of the same checkpoint skip the forward
passes. In visual scope the quantized model's text tower is bit-identical to the FP32 one, has the same
fingerprint, and its prompts are encoded once for both states.

Cache files are safetensors (never pickle), written atomically.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence

import numpy as np

from qbench.data import LabeledImages, UnreadableImage
from qbench.errors import QbenchError

if TYPE_CHECKING:
    import torch

    from qbench.model import VLM

CACHE_ENV = "QBENCH_CACHE"
CACHE_FORMAT = "qbench-features-v1"
TEXT_BATCH = 1024


class Progress(Protocol):
    def log(self, message: str) -> None: ...

    def track(self, items: Sequence, description: str) -> Iterator: ...


@dataclass
class EncodeCounter:
    """Forward passes actually run: images per image-encoder state, prompts per text-encoder state."""

    images: Counter = field(default_factory=Counter)
    texts: Counter = field(default_factory=Counter)
    cache_hits: Counter = field(default_factory=Counter)


@dataclass
class EncodedSplit:
    """Image features of one dataset for every state; ``kept`` indexes the images that could be read."""

    kept: np.ndarray
    by_state: dict[str, "torch.Tensor"]
    unreadable: list[str] = field(default_factory=list)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "qbench" / "features")).expanduser()


class FeatureCache:
    """Feature tensors on disk, one safetensors file per (encoder state, content) key; ``None`` disables it."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, "torch.Tensor"] | None:
        if self.root is None or not self._path(key).is_file():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(self._path(key)))
        except (SafetensorError, OSError, ValueError):
            return None  # a damaged entry is recomputed and overwritten, never fatal

    def put(self, key: str, tensors: dict[str, "torch.Tensor"]) -> None:
        if self.root is None:
            return
        from safetensors.torch import save_file

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(partial))
        partial.replace(path)


def tower_fingerprint(vlm: "VLM", tower: str) -> str:
    """Hash of everything that determines one tower's output: its modules' settings, parameters, buffers.

    Modules outside both towers (shared parameters such as the logit scale) are included for either
    tower. The quantized model's fake-quant settings enter through each module's ``extra_repr`` and its
    (scale, zero-point) buffers.
    """
    digest = hashlib.sha256(f"{CACHE_FORMAT}:{tower}".encode())
    for name, module in vlm.model.named_modules():
        owner = vlm.tower_of(name + ".") if name else None
        if owner not in (tower, None):
            continue
        digest.update(f"{name}|{type(module).__name__}|{module.extra_repr()}".encode())
        for tensor_name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tensor is None:
                continue
            data = tensor.detach().cpu().contiguous()
            digest.update(f"{tensor_name}|{data.dtype}|{tuple(data.shape)}".encode())
            digest.update(data.view(-1).view(torch_uint8()).numpy().tobytes())
    return digest.hexdigest()[:24]


def torch_uint8():
    import torch

    return torch.uint8


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def encode_datasets(
    datasets: dict[str, LabeledImages],
    states: dict[str, "VLM"],
    fingerprints: dict[str, str],
    batch_size: int,
    cache: FeatureCache,
    progress: Progress,
    counter: EncodeCounter,
) -> dict[str, EncodedSplit]:
    """Image features of every dataset for every state, from the disk cache where possible."""
    return {
        name: encode_dataset(dataset, states, fingerprints, batch_size, cache, progress, counter)
        for name, dataset in datasets.items()
    }


def encode_dataset(
    dataset: LabeledImages,
    states: dict[str, "VLM"],
    fingerprints: dict[str, str],
    batch_size: int,
    cache: FeatureCache,
    progress: Progress,
    counter: EncodeCounter,
) -> EncodedSplit:
    """One dataset: cached states are read, the others share one decode + preprocess of every image."""
    import torch

    preprocess = next(iter(states.values())).preprocess
    keys = {state: _key("image", fingerprints[state], dataset.fingerprint, repr(preprocess)) for state in states}
    cached = {state: cache.get(key) for state, key in keys.items()}
    missing = [state for state, entry in cached.items() if entry is None]
    for state in states:
        if cached[state] is not None:
            counter.cache_hits[state] += 1
    if not missing:
        first = next(iter(cached.values()))
        return EncodedSplit(
            kept=first["kept"].numpy(),
            by_state={state: entry["features"] for state, entry in cached.items()},
            unreadable=[f"{int(index)}" for index in first["unreadable"].tolist()],
        )
    kept, unreadable, chunks = [], [], {state: [] for state in missing}
    with torch.no_grad():
        for start in progress.track(range(0, len(dataset), batch_size), f"encoding {dataset.name}"):
            pixels, indices = [], []
            for index in range(start, min(start + batch_size, len(dataset))):
                try:
                    pixels.append(preprocess(dataset.image(index)))
                    indices.append(index)
                except UnreadableImage as problem:
                    unreadable.append((index, str(problem)))
            if not indices:
                continue
            batch = torch.stack(pixels)
            kept.extend(indices)
            for state in missing:
                chunks[state].append(states[state].encode_image(batch).float().cpu())
                counter.images[state] += len(indices)
    if not kept:
        first = unreadable[0][1] if unreadable else "the split is empty"
        raise QbenchError(f"dataset {dataset.name!r}: no image could be read ({first}); check the files under its root")
    kept_array = np.asarray(kept, dtype=np.int64)
    by_state = {}
    for state in states:
        if cached[state] is not None:
            by_state[state] = cached[state]["features"]
            continue
        by_state[state] = torch.cat(chunks[state])
        cache.put(keys[state], {
            "features": by_state[state],
            "kept": torch.from_numpy(kept_array),
            "unreadable": torch.tensor([index for index, _ in unreadable], dtype=torch.int64),
        })
    return EncodedSplit(kept=kept_array, by_state=by_state, unreadable=[reason for _, reason in unreadable])


class TextEncoder:
    """Prompt embeddings per text-encoder state, each distinct (state, prompt list) encoded once."""

    def __init__(self, states: dict[str, "VLM"], fingerprints: dict[str, str], cache: FeatureCache,
                 progress: Progress, counter: EncodeCounter) -> None:
        self.states = states
        self.fingerprints = fingerprints
        self.cache = cache
        self.progress = progress
        self.counter = counter
        self._memory: dict[str, np.ndarray] = {}

    def encode(self, state: str, prompts: Sequence[str]) -> np.ndarray:
        """``len(prompts) x d`` float64 L2-normalised embeddings from ``state``'s text tower."""
        import torch

        if not prompts:
            raise ValueError("no prompts to encode")
        key = _key("text", self.fingerprints[state], "\n".join(prompts))
        if key in self._memory:
            return self._memory[key]
        entry = self.cache.get(key)
        if entry is not None:
            self.counter.cache_hits[f"text:{state}"] += 1
            features = entry["features"]
        else:
            model = self.states[state]
            chunks = []
            batches = range(0, len(prompts), TEXT_BATCH)
            tracked = self.progress.track(batches, f"encoding {len(prompts)} prompts") if len(prompts) > TEXT_BATCH else batches
            with torch.no_grad():
                for start in tracked:
                    chunk = list(prompts[start:start + TEXT_BATCH])
                    chunks.append(model.encode_text(model.tokenize(chunk)).float().cpu())
                    self.counter.texts[state] += len(chunk)
            features = torch.cat(chunks)
            self.cache.put(key, {"features": features})
        array = features.double().numpy()
        self._memory[key] = array
        return array


def ensemble_head(embeddings: np.ndarray, n_classes: int, n_templates: int) -> np.ndarray:
    """Zero-shot classifier ``K x d`` from ``K*T`` prompt embeddings (class-major order): each template
    embedding normalised, averaged over templates, renormalised (``suites.md`` §6)."""
    grouped = embeddings.reshape(n_classes, n_templates, -1)
    grouped = grouped / np.linalg.norm(grouped, axis=-1, keepdims=True)
    mean = grouped.mean(axis=1)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def zero_shot_head(text: TextEncoder, state: str, classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """The ensemble classifier of ``state``'s text tower, through the compute-once text encoder."""
    prompts = [template.format(name) for name in classnames for template in templates]
    return ensemble_head(text.encode(state, prompts), len(classnames), len(templates))
