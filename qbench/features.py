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
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Protocol, Sequence

import numpy as np

from qbench.batching import AdaptiveBatch
from qbench.data import LabeledImages, UnreadableImage
from qbench.errors import QbenchError

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader

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


class SkippedImage(NamedTuple):
    """Stands in for an image that could not be decoded: the :class:`UnreadableImage` message."""

    reason: str


class FailedImage(NamedTuple):
    """A user error (:class:`QbenchError`) met in a loader worker, carried to the main process as one line."""

    message: str


class DecodedBatch(NamedTuple):
    """One loader batch: the readable images' indices and stacked pixels, and the images skipped."""

    indices: list[int]
    pixels: "torch.Tensor | None"
    skipped: list[tuple[int, str]]
    failure: str | None = None


class PreprocessedImages:
    """A map-style dataset of ``(index, pixels)``: decoding and preprocessing one image, in a loader worker or
    in this process. An unreadable image becomes a :class:`SkippedImage` marker instead of an exception, so
    it is counted exactly as without workers."""

    def __init__(self, image: Callable[[int], "Image.Image"], count: int, preprocess: Callable) -> None:
        self.image = image
        self.count = count
        self.preprocess = preprocess

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[int, Any]:
        try:
            return index, self.preprocess(self.image(index))
        except UnreadableImage as problem:
            return index, SkippedImage(str(problem))
        except QbenchError as error:  # a worker would otherwise re-raise it with a multi-line traceback text
            return index, FailedImage(str(error))


def collate_decoded(items: list[tuple[int, Any]]) -> DecodedBatch:
    """Stack the readable images of a batch in index order; keep the markers of the others."""
    import torch

    failures = [value.message for _, value in items if isinstance(value, FailedImage)]
    skipped = [(index, value.reason) for index, value in items if isinstance(value, SkippedImage)]
    kept = [(index, value) for index, value in items if not isinstance(value, (SkippedImage, FailedImage))]
    pixels = torch.stack([value for _, value in kept]) if kept else None
    return DecodedBatch([index for index, _ in kept], pixels, skipped, failures[0] if failures else None)


def image_batches(images: PreprocessedImages, batch_size: int, workers: int) -> "DataLoader":
    """Consecutive batches of ``images`` in order, decoded by ``workers`` processes (0: in this process).

    No more workers than batches are started, and none for a single batch, where there is nothing to overlap.
    """
    from torch.utils.data import DataLoader

    n_batches = math.ceil(len(images) / batch_size)
    workers = min(workers, n_batches) if n_batches > 1 else 0
    return DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_decoded)


def preprocess_images(images: Sequence["Image.Image"], preprocess: Callable, batch_size: int = 256,
                      workers: int = 0) -> "torch.Tensor":
    """``N x C x H x W``: in-memory images (proxy pairs) preprocessed in order, by ``workers`` processes."""
    import torch

    batches = list(image_batches(PreprocessedImages(images.__getitem__, len(images), preprocess), batch_size, workers))
    for batch in batches:
        if batch.failure or batch.skipped:
            raise QbenchError(batch.failure or batch.skipped[0][1])
    return torch.cat([batch.pixels for batch in batches])


def encode_datasets(
    datasets: dict[str, LabeledImages],
    states: dict[str, "VLM"],
    fingerprints: dict[str, str],
    batch_size: int,
    cache: FeatureCache,
    progress: Progress,
    counter: EncodeCounter,
    *,
    workers: int = 0,
    encoder: AdaptiveBatch | None = None,
) -> dict[str, EncodedSplit]:
    """Image features of every dataset for every state, from the disk cache where possible.

    One :class:`AdaptiveBatch` serves every dataset, so a batch size reduced by an out-of-memory error stays
    reduced for the rest of the run.
    """
    encoder = encoder or AdaptiveBatch(batch_size, progress, "image")
    return {
        name: encode_dataset(dataset, states, fingerprints, batch_size, cache, progress, counter, workers=workers,
                             encoder=encoder)
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
    *,
    workers: int = 0,
    encoder: AdaptiveBatch | None = None,
) -> EncodedSplit:
    """One dataset: cached states are read, the others share one decode + preprocess of every image.

    Images are decoded in batches of ``batch_size`` by ``workers`` loader processes; the kept indices, their
    order and the features are the same for any number of workers. ``encoder`` encodes each batch, in
    smaller pieces after an out-of-memory error.
    """
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
    encoder = encoder or AdaptiveBatch(batch_size, progress, "image")
    loader = image_batches(PreprocessedImages(dataset.image, len(dataset), preprocess), batch_size, workers)
    kept, unreadable, chunks = [], [], {state: [] for state in missing}
    with torch.no_grad():
        for batch in progress.track(loader, f"encoding {dataset.name}"):
            if batch.failure:
                raise QbenchError(batch.failure)
            unreadable.extend(batch.skipped)
            if not batch.indices:
                continue
            kept.extend(batch.indices)
            for state in missing:
                chunks[state].append(encoder.apply(_image_features(states[state]), batch.pixels))
                counter.images[state] += len(batch.indices)
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


def _image_features(model: "VLM") -> Callable[["torch.Tensor"], "torch.Tensor"]:
    """``pixels -> float32 CPU embeddings`` of ``model``'s image tower."""
    return lambda pixels: model.encode_image(pixels).float().cpu()


def _text_features(model: "VLM") -> Callable[["torch.Tensor"], "torch.Tensor"]:
    """``tokens -> float32 CPU embeddings`` of ``model``'s text tower."""
    return lambda tokens: model.encode_text(tokens).float().cpu()


class TextEncoder:
    """Prompt embeddings per text-encoder state, each distinct (state, prompt list) encoded once."""

    def __init__(self, states: dict[str, "VLM"], fingerprints: dict[str, str], cache: FeatureCache,
                 progress: Progress, counter: EncodeCounter, batch: AdaptiveBatch | None = None) -> None:
        self.states = states
        self.fingerprints = fingerprints
        self.cache = cache
        self.progress = progress
        self.counter = counter
        self.batch = batch or AdaptiveBatch(TEXT_BATCH, progress, "prompt")
        """Prompts per forward pass: :data:`TEXT_BATCH`, halved for the rest of the run on out-of-memory."""
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
                    chunks.append(self.batch.apply(_text_features(model), model.tokenize(chunk)))
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
