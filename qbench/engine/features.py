"""Compute once: image and text features per encoder state, in memory and on disk.

Within one ``qbench eval`` each image of each dataset is decoded and preprocessed once and passes
through each image-encoder state (FP32, quantized) exactly once; every prompt set passes through each
text-encoder state once. All logits, scorers, metrics and OOD pairs read these features.

Across runs, an on-disk cache keyed by the *encoder state* (a hash of the tower's parameters, buffers
and module settings — so FP32 weights, quantizer scales and bit formats all count), the dataset's
content fingerprint and the preprocessing makes a second run of the same checkpoint skip the forward
passes. In visual scope the quantized model's text tower is bit-identical to the FP32 one, has the same
fingerprint, and its prompts are encoded once for both states.

Spectral taps (``scoring.md`` §3.1) ride on the same pass: for the datasets a spectral task names, the
forward that makes an image's embedding also records its penultimate visual feature and, for ViT towers,
the per-image Fourier amplitude of its patch-token map (:data:`PATCH_AMPLITUDE`). They are cached beside the
features under their own key, so runs without taps keep their feature cache entries unchanged.

Cache files are safetensors (never pickle), written atomically, each with its key and a SHA-256 of its content
verified on every read (:class:`FeatureCache`): a damaged entry is recomputed, never used.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, NamedTuple, Protocol, Sequence

import numpy as np

from qbench.engine.batching import LEADING_CHUNK, AdaptiveBatch, FixedChunks, model_numeric_batch
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
TAP_FORMAT = "qbench-taps-v1"
"""Part of every tap cache key: bump it when what a tap records changes (e.g. the amplitude definition)."""
PASS_FORMAT = "qbench-passes-v2"
"""Part of every image-feature and tap cache key, with the pass sizes (:func:`pass_layout`): how a split's image
passes are cut. v2: fixed positions, a :data:`~qbench.engine.batching.LEADING_CHUNK` first pass, the last pass at
its own size; v1 (keys without this part) padded the last pass, so its entries are never reused. Kept out of
:data:`CACHE_FORMAT`, which feeds :func:`tower_fingerprint` (state digests stay what they were)."""
PATCH_AMPLITUDE = "patch_amplitude"
"""Tap recorded for the ``patch_tokens`` request: each image's channel-averaged ``|fftshift(fft2(map))|``
(``scoring.md`` §3.4 steps 1-3 without the average over images), ``n x H' x W'``."""


ENTRY_FORMAT = "qbench-cache-entry-v1"
"""Format of a checksummed tensor entry (safetensors metadata ``qbench.format``)."""
ENTRY_FORMAT_KEY, ENTRY_KEY, ENTRY_DIGEST = "qbench.format", "qbench.key", "qbench.sha256"
"""safetensors metadata keys of a tensor entry: its format, the key it was stored under, its SHA-256."""
JSON_FORMAT = "qbench-cache-json-v1"
"""Format of a checksummed JSON entry: ``{"format", "key", "sha256", "value"}``."""
_WRITTEN: dict[Path, tuple[int, int, int]] = {}
"""Entries this process wrote, with their file signature (:func:`_signature`) right after the write: ``--force``
(``FeatureCache.refresh``) recomputes every other entry but reuses these while unchanged, so a grid of
configurations encodes its shared FP32 features once."""


class Progress(Protocol):
    def log(self, message: str) -> None: ...

    def track(self, items: Sequence, description: str) -> Iterator: ...


@dataclass
class EncodeCounter:
    """Forward passes actually run: images per image-encoder state, prompts per text-encoder state.

    Counted at the encoder itself: :meth:`watching` puts a forward hook on each state's tower module (the module
    :meth:`VLM.encode_image` / ``encode_text`` runs, :func:`tower_module`) that adds the batch rows of every
    *completed* forward pass (the halves of a batch retried after an out-of-memory error count, the failed attempt
    does not; padding rows would count, and there are none), so it reports what ran, not what was planned, and
    cannot disagree with any other hook on the same module. ``images_by_dataset[dataset][state]`` breaks the image
    count down per evaluation dataset (passes while :meth:`attributing` a dataset; what a sweep sums to check that
    each FP32 image is encoded once); passes outside any dataset (e.g. logit tuning on proxy images) count in
    ``images`` only.
    """

    images: Counter = field(default_factory=Counter)
    texts: Counter = field(default_factory=Counter)
    cache_hits: Counter = field(default_factory=Counter)
    images_by_dataset: dict[str, Counter] = field(default_factory=dict)
    _hooks: dict[int, Any] = field(default_factory=dict, repr=False, compare=False)
    _datasets: list[str] = field(default_factory=list, repr=False, compare=False)

    def count_images(self, dataset: str, state: str, n: int) -> None:
        """Add ``n`` images of ``dataset`` encoded by ``state`` (what the tower hooks call)."""
        self.images[state] += n
        self.images_by_dataset.setdefault(dataset, Counter())[state] += n

    @contextmanager
    def watching(self, states: "dict[str, VLM]", towers: Sequence[str] = ("visual", "text")) -> Iterator[None]:
        """Count every completed forward pass of ``towers`` of each state while inside; the hooks are removed after.

        Re-entrant: a tower module already watched by this counter is not hooked twice (the run watches its states
        for its whole span, :func:`encode_dataset` and :class:`TextEncoder` again for direct callers). A module two
        states share counts under the first state. A deep copy of a watched tower (the dropout probe's model)
        inherits the hook but is not counted: the hook counts only the very module it was put on.
        """
        added = []
        for state, model in states.items():
            for tower in towers:
                module = tower_module(model, tower)
                if module is None or id(module) in self._hooks:
                    continue
                self._hooks[id(module)] = module.register_forward_hook(self._hook(module, state, tower), with_kwargs=True)
                added.append(id(module))
        try:
            yield
        finally:
            for key in added:
                self._hooks.pop(key).remove()

    @contextmanager
    def attributing(self, dataset: str) -> Iterator[None]:
        """Image passes while inside belong to ``dataset`` (``images_by_dataset``)."""
        self._datasets.append(dataset)
        try:
            yield
        finally:
            self._datasets.pop()

    def _hook(self, target: "torch.nn.Module", state: str, tower: str) -> Callable[..., None]:
        """The forward hook counting ``target``'s completed passes for ``state``'s ``tower``."""

        def counted(module: "torch.nn.Module", args: tuple, kwargs: dict, output: Any) -> None:
            if module is not target:  # a deep copy carrying the hook (copy.deepcopy copies hooks): not this state
                return
            rows = batch_rows(args, kwargs)
            if rows == 0:
                return
            if tower == "text":
                self.texts[state] += rows
            elif self._datasets:
                self.count_images(self._datasets[-1], state, rows)
            else:
                self.images[state] += rows

        return counted


def tower_module(model: "VLM", tower: str) -> "torch.nn.Module | None":
    """The module at the root of ``model``'s ``tower`` (``visual`` or ``text``): the first of the tower's prefixes
    that names a module (open_clip: ``visual``, ``transformer`` or ``text``; ALIGN: ``align.vision_model``,
    ``align.text_model``), which every ``encode_image`` / ``encode_text`` call runs once on the whole batch. None
    when no prefix names a module (then that tower's passes are not counted)."""
    for prefix in getattr(model, "tower_prefixes", {}).get(tower, ()):
        name = prefix.rstrip(".")
        try:
            return model.model.get_submodule(name) if name else None
        except AttributeError:
            continue
    return None


def batch_rows(args: tuple, kwargs: dict) -> int:
    """Rows (the leading dimension) of the first tensor a module was called with, positional or keyword
    (``pixel_values=``, ``input_ids=``); 0 when it got none."""
    import torch

    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 0


class PassObserver(Protocol):
    """Wraps chosen forward passes of a run's encoding in a context (the verification records its kernels there).

    Each method is asked right before the first pass of one encoding and returns the context manager to enter
    around that pass, or None."""

    def image_pass(self, dataset: str, state: str) -> ContextManager[Any] | None: ...

    def text_pass(self, state: str, prompts: Sequence[str]) -> ContextManager[Any] | None: ...


@dataclass
class EncodedSplit:
    """Image features of one dataset for every state; ``kept`` indexes the images that could be read.

    ``taps[state][name]`` holds the spectral taps recorded in the same pass (rows aligned with ``kept``):
    ``penultimate`` (n x D) and, for ViT towers, :data:`PATCH_AMPLITUDE` (n x H' x W'); empty when the
    dataset was encoded without taps.
    """

    kept: np.ndarray
    by_state: dict[str, "torch.Tensor"]
    unreadable: list[str] = field(default_factory=list)
    taps: dict[str, dict[str, "torch.Tensor"]] = field(default_factory=dict)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "qbench" / "features")).expanduser()


class FeatureCache:
    """Feature tensors on disk, one safetensors file per (encoder state, content) key; ``None`` disables it.

    Entries are written atomically (:mod:`qbench.atomic`). :meth:`locked` holds the cross-process locks of a
    set of keys (:mod:`qbench.engine.locks`), so that processes needing the same entry compute it once: the others
    wait and read it.

    Integrity (:mod:`qbench.engine.integrity`): every entry records its key and a SHA-256 over the key and its
    tensors (names, dtypes, shapes, bytes; the ``kept`` index included) in its safetensors metadata, JSON
    entries in a wrapper around the value. A read verifies both; an entry that is unreadable, truncated,
    fails its checksum, belongs to another key or holds a NaN or an infinity is removed and reported in one
    line through ``log``, and the caller recomputes it (never a traceback, never a changed value). Entries of
    qbench versions without checksums count as missing. ``refresh`` (``qbench eval --force``) ignores every
    entry this process did not write itself and overwrites it.
    """

    LOCKS = "locks"

    def __init__(self, root: Path | None, *, log: Callable[[str], None] | None = None, refresh: bool = False) -> None:
        self.root = root
        self.log = log or _log_to_stderr
        self.refresh = refresh

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.safetensors"

    def _stale(self, path: Path) -> bool:
        """Whether ``refresh`` makes the entry at ``path`` count as missing: it is not the file this process wrote."""
        return self.refresh and (path not in _WRITTEN or _signature(path) != _WRITTEN[path])

    def get(self, key: str) -> dict[str, "torch.Tensor"] | None:
        """The verified tensors of ``key``; None when missing, written without a checksum, or damaged (then removed)."""
        if self.root is None:
            return None
        path = self._path(key)
        if self._stale(path) or not path.is_file():
            return None
        try:
            tensors, metadata = _read_safetensors(path)
        except FileNotFoundError:  # removed meanwhile by another process
            return None
        except Exception as error:  # safetensors reports truncation and bad headers with its own error types
            return self._damaged(path, f"is unreadable ({type(error).__name__})")
        if ENTRY_DIGEST not in metadata:
            return None  # written before entries carried checksums: recomputed and overwritten
        problem = _entry_problem(key, tensors, metadata)
        return self._damaged(path, problem) if problem else tensors

    def discard(self, key: str, reason: str) -> None:
        """Remove ``key``'s tensor entry because a caller found it unusable (``reason``: one line), and say so."""
        if self.root is not None:
            self._damaged(self._path(key), reason)

    def _damaged(self, path: Path, reason: str) -> None:
        """Remove a damaged entry and log one line: which file, why, and that it is recomputed."""
        from qbench.atomic import remove_path

        remove_path(path)
        self.log(f"warning: cache entry {path} {reason}; removed it, recomputing")
        return None

    def get_json(self, key: str) -> Any:
        """A JSON entry (results derived from cached states, e.g. the dropout probe); None when missing,
        written without a checksum, or damaged (then removed, with a one-line warning)."""
        import json

        if self.root is None:
            return None
        path = self._json_path(key)
        if self._stale(path) or not path.is_file():
            return None
        try:
            wrapper = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            return self._damaged(path, f"is unreadable ({type(error).__name__})")
        if not isinstance(wrapper, dict) or wrapper.get("format") != JSON_FORMAT:
            return None  # written before entries carried checksums: recomputed and overwritten
        problem = _json_problem(key, wrapper)
        return self._damaged(path, problem) if problem else wrapper["value"]

    def put_json(self, key: str, value: Any) -> None:
        """Store a JSON entry atomically with its key and checksum (nothing when the cache is off)."""
        import json

        from qbench.atomic import write_atomic
        from qbench.engine.integrity import json_digest

        if self.root is None:
            return
        value = json.loads(json.dumps(value))  # the value as it will be read back (tuples become lists)
        wrapper = {"format": JSON_FORMAT, "key": key, "sha256": json_digest(value, bind=f"{JSON_FORMAT}\0{key}"),
                   "value": value}
        path = write_atomic(self._json_path(key), json.dumps(wrapper), root=self.root, sync_folder=False)
        _WRITTEN[path] = _signature(path)

    def _json_path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / "json" / f"{key}.json"

    def put(self, key: str, tensors: dict[str, "torch.Tensor"]) -> None:
        """Store ``tensors`` under ``key`` atomically with the key and their checksum in the file's metadata.

        Tensors holding a NaN or an infinity are not stored (a read would reject them): the run that made them
        uses them as they are, and the next run computes them again."""
        if self.root is None:
            return
        from safetensors.torch import save_file

        from qbench.atomic import write_atomic_with
        from qbench.engine.integrity import non_finite, tensors_digest

        contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        bad = non_finite(contiguous)
        if bad is not None:
            self.log(f"warning: {bad} of cache entry {key} holds NaN or infinite values; not cached")
            return
        metadata = {ENTRY_FORMAT_KEY: ENTRY_FORMAT, ENTRY_KEY: key,
                    ENTRY_DIGEST: tensors_digest(contiguous, bind=f"{ENTRY_FORMAT}\0{key}")}
        path = write_atomic_with(self._path(key), lambda temporary: save_file(contiguous, str(temporary), metadata=metadata),
                                 root=self.root, sync_folder=False)
        _WRITTEN[path] = _signature(path)

    @contextmanager
    def locked(self, keys: Sequence[str], progress: "Progress | None" = None, what: str = "") -> Iterator[None]:
        """Hold the locks of ``keys`` (taken in sorted order, so two processes never deadlock); a no-op when the
        cache is off. A wait is logged with the holder's host and pid."""
        if self.root is None or not keys:
            yield
            return
        from qbench.engine.locks import KeyLock

        held = []
        try:
            for key in sorted(set(keys)):
                lock = KeyLock(self.root / self.LOCKS, key)
                lock.acquire(_waiting(progress, what))
                held.append(lock)
            yield
        finally:
            for lock in reversed(held):
                lock.release()

    def compute_once(self, key: str, read: Callable[[], Any], compute: Callable[[], Any],
                     progress: "Progress | None" = None, what: str = "") -> tuple[Any, bool]:
        """``read()`` if the entry is there, else ``compute()`` under the key's lock (a process that waited reads
        what the holder stored); ``(value, computed)``. ``compute`` stores the entry itself."""
        if self.root is None:
            return compute(), True
        from qbench.engine.locks import compute_once

        return compute_once(self.root / self.LOCKS, key, read, compute, _waiting(progress, what))


def _signature(path: Path) -> tuple[int, int, int]:
    """Inode, modification time (ns) and size of a file: what changes when anyone replaces or rewrites it."""
    try:
        info = path.stat()
    except OSError:
        return (-1, -1, -1)
    return (info.st_ino, info.st_mtime_ns, info.st_size)


def _log_to_stderr(message: str) -> None:
    """Where a :class:`FeatureCache` without a progress log reports a damaged entry: one ``qbench:`` line on stderr."""
    import sys

    print(f"qbench: {message}", file=sys.stderr)


def _read_safetensors(path: Path) -> tuple[dict[str, "torch.Tensor"], dict[str, str]]:
    """Every tensor of a safetensors file and its metadata (no pickle); raises what safetensors raises."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    return tensors, metadata


def _entry_problem(key: str, tensors: dict[str, "torch.Tensor"], metadata: dict[str, str]) -> str | None:
    """Why a checksummed tensor entry read under ``key`` must not be used (one line), or None when it is sound."""
    from qbench.engine.integrity import non_finite, tensors_digest

    if metadata.get(ENTRY_FORMAT_KEY) != ENTRY_FORMAT:
        return f"has format {metadata.get(ENTRY_FORMAT_KEY)!r}, not {ENTRY_FORMAT!r}"
    if metadata.get(ENTRY_KEY) != key:
        return f"holds the entry of another key ({str(metadata.get(ENTRY_KEY))[:32]})"
    if tensors_digest(tensors, bind=f"{ENTRY_FORMAT}\0{key}") != metadata.get(ENTRY_DIGEST):
        return "fails its checksum (corrupt or edited)"
    bad = non_finite(tensors)
    if bad is not None:
        return f"holds NaN or infinite values in {bad}"
    return None


def _json_problem(key: str, wrapper: dict[str, Any]) -> str | None:
    """Why a checksummed JSON entry read under ``key`` must not be used (one line), or None when it is sound."""
    from qbench.engine.integrity import json_digest

    if wrapper.get("key") != key:
        return f"holds the entry of another key ({str(wrapper.get('key'))[:32]})"
    if "value" not in wrapper or json_digest(wrapper["value"], bind=f"{JSON_FORMAT}\0{key}") != wrapper.get("sha256"):
        return "fails its checksum (corrupt or edited)"
    return None


def _waiting(progress: "Progress | None", what: str) -> Callable[[Any], None] | None:
    """The wait message of a cache lock: who holds it and what it computes."""
    if progress is None:
        return None
    return lambda holder: progress.log(f"waiting for {holder.describe() if holder else 'another process'} to compute "
                                       f"{what or 'a cache entry'}")


def tower_fingerprint(vlm: "VLM", tower: str) -> str:
    """Hash of everything that determines one tower's output: its modules' settings, parameters, buffers.

    Modules outside both towers (shared parameters such as the logit scale) are included for either
    tower. The quantized model's fake-quant settings enter through each module's ``extra_repr`` and its
    (scale, zero-point) buffers. Non-persistent buffers count too (the open_clip text tower's causal
    ``attn_mask`` is one, so leaving them out would change every existing key): derived caches that must
    not change the key belong in plain attributes, not buffers.
    """
    return _stream_digest(_fingerprint_stream(vlm, tower))


def state_fingerprints(states: "dict[str, VLM]", tower: str) -> dict[str, str]:
    """:func:`tower_fingerprint` of ``tower`` for every state, hashing each distinct content once.

    Why: the FP32 baseline's two states are one object, and a quantizer in ``visual`` scope leaves the text
    tower shared with (or byte-equal to) the float model's, so hashing every state again costs a full SHA-256
    pass over weights already hashed. A state whose hashed stream (module headers, tensor headers, tensor
    bytes) equals an earlier state's, the same object or compared byte for byte now, gets that state's digest,
    which is then exactly what :func:`tower_fingerprint` would return.
    """
    prints: dict[str, str] = {}
    hashed: list[tuple[object, list, str]] = []  # (model, stream, digest) of every state hashed so far
    for state, model in states.items():
        same = next((digest for other, _, digest in hashed if other is model), None)
        if same is None:
            stream = _fingerprint_stream(model, tower)
            same = next((digest for _, other, digest in hashed if _same_stream(stream, other)), None)
            if same is None:
                same = _stream_digest(stream)
                hashed.append((model, stream, same))
        prints[state] = same
    return prints


def _fingerprint_stream(vlm: "VLM", tower: str) -> list:
    """What :func:`tower_fingerprint` hashes, in order: header strings and each tensor's bytes as a flat uint8 tensor
    on the tensor's own device (a view, not a copy, of a contiguous tensor: a GPU model is not copied to host memory
    all at once). The stream, and so the digest, is that of the original implementation, which copied every tensor
    to ``bytes`` first."""
    import torch

    stream: list = [f"{CACHE_FORMAT}:{tower}"]
    for name, module in vlm.model.named_modules():
        owner = vlm.tower_of(name + ".") if name else None
        if owner not in (tower, None):
            continue
        stream.append(f"{name}|{type(module).__name__}|{module.extra_repr()}")
        for tensor_name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tensor is None:
                continue
            data = tensor.detach().contiguous()
            stream.append(f"{tensor_name}|{data.dtype}|{tuple(data.shape)}")
            stream.append(data.view(-1).view(torch.uint8))
    return stream


def _stream_digest(stream: list) -> str:
    """SHA-256 of a fingerprint stream, fed straight from the tensors' memory (no intermediate ``bytes``; a tensor on
    an accelerator is copied to the host one at a time)."""
    digest = hashlib.sha256()
    for item in stream:
        digest.update(item.encode() if isinstance(item, str) else item.cpu().numpy())
    return digest.hexdigest()[:24]


def _same_stream(first: list, second: list) -> bool:
    """True when two fingerprint streams hold the same strings and the same tensor bytes (same memory, or equal
    bit for bit: compared as integers, so NaN payloads and signed zeros count as the bytes they are)."""
    if len(first) != len(second):
        return False
    for a, b in zip(first, second):
        if isinstance(a, str) or isinstance(b, str):
            if a != b:
                return False
        elif a.numel() != b.numel() or not ((a.device, a.data_ptr()) == (b.device, b.data_ptr())
                                            or _equal_bytes(a, b.to(a.device))):
            return False
    return True


def _equal_bytes(first: "torch.Tensor", second: "torch.Tensor") -> bool:
    """Bitwise equality of two flat uint8 tensors of one length, compared as 64-bit words where they align
    (several times faster than byte-wise)."""
    import torch

    try:
        return torch.equal(first.view(torch.int64), second.view(torch.int64))
    except RuntimeError:  # a length or offset that is not a whole number of words
        return torch.equal(first, second)


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
    taps: dict[str, tuple[str, ...]] | None = None,
    observer: PassObserver | None = None,
) -> dict[str, EncodedSplit]:
    """Image features of every dataset for every state, from the disk cache where possible.

    One :class:`AdaptiveBatch` serves every dataset, so a batch size reduced by an out-of-memory error stays
    reduced for the rest of the run. ``taps`` maps a dataset name to the spectral taps
    (``spectral.PENULTIMATE``, ``spectral.PATCH_TOKENS``) to record while encoding it. ``observer`` may wrap the
    first pass of each (dataset, state) encoding (:class:`PassObserver`).
    """
    encoder = encoder or AdaptiveBatch(batch_size, progress, "image")
    taps = taps or {}
    return {
        name: encode_dataset(dataset, states, fingerprints, batch_size, cache, progress, counter, workers=workers,
                             encoder=encoder, taps=taps.get(name, ()), observer=observer)
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
    taps: Sequence[str] = (),
    observer: PassObserver | None = None,
) -> EncodedSplit:
    """One dataset: cached states are read, the others share one decode + preprocess of every image.

    Images are decoded in batches of ``batch_size`` by ``workers`` loader processes; the kept indices, their
    order and the features are the same for any number of workers. ``encoder`` encodes each batch, in
    smaller pieces after an out-of-memory error. With ``taps`` (``spectral.PENULTIMATE``,
    ``spectral.PATCH_TOKENS``) the same forward passes also record the spectral taps of every state
    (:func:`tap_plan`); a state whose features are cached but whose taps are not is encoded again.

    Compute once, also across processes: states with the same encoder fingerprint (the ``fp32`` baseline's
    untouched twin) are encoded once and share the features; a state missing from the cache is encoded under
    the cache lock of its key, so a second process needing the same FP32 features waits and reads them
    instead of encoding them again.

    Passes are cut at fixed positions of the split (:func:`pass_layout`; the cache keys name the layout), counted
    by hooks on the towers (:meth:`EncodeCounter.watching`), and ``observer`` may wrap each state's first pass.
    """
    first_model = next(iter(states.values()))
    preprocess = first_model.preprocess
    passes = pass_key(pass_layout(first_model))
    plans = {state: tap_plan(model, taps) for state, model in states.items()} if taps else {}
    keys = {state: image_key(fingerprints[state], dataset.fingerprint, repr(preprocess), passes) for state in states}
    tap_keys = {state: _tap_key(fingerprints[state], dataset.fingerprint, repr(preprocess), taps, passes) for state in plans}
    twin = {state: next(other for other in states if (keys[other], tap_keys.get(other)) == (keys[state], tap_keys.get(state)))
            for state in states}
    unique = [state for state in states if twin[state] == state]
    entries = {state: _cached_entry(cache, keys[state], tap_keys.get(state), len(dataset)) for state in unique}
    computed: _Encoded | None = None
    missing = [state for state in unique if entries[state] is None]
    if missing:
        wanted = [keys[state] for state in missing] + [tap_keys[state] for state in missing if state in tap_keys]
        with cache.locked(wanted, progress, f"the image features of {dataset.name}"):
            entries.update({state: _cached_entry(cache, keys[state], tap_keys.get(state), len(dataset)) for state in missing})
            missing = [state for state in missing if entries[state] is None]  # a peer may have stored some meanwhile
            if missing:
                computed = _encode_states(dataset, {state: states[state] for state in missing}, plans, batch_size,
                                          workers, encoder or AdaptiveBatch(batch_size, progress, "image"), progress, counter,
                                          observer)
                for state in missing:
                    entries[state] = computed.entry(state)
                    cache.put(keys[state], entries[state].stored_features())
                    if state in plans:
                        cache.put(tap_keys[state], entries[state].stored_taps())
    for state in unique:
        if state not in missing:
            counter.cache_hits[state] += 1
    first = entries[unique[0]]
    unreadable = computed.unreadable_reasons if computed is not None else [f"{int(index)}" for index in first.unreadable.tolist()]
    return EncodedSplit(
        kept=first.kept.numpy(),
        by_state={state: entries[twin[state]].features for state in states},
        unreadable=unreadable,
        taps={state: entries[twin[state]].taps for state in plans},
    )


@dataclass
class _Entry:
    """One state's features of one dataset (and its taps), as cached or as just computed."""

    features: "torch.Tensor"
    kept: "torch.Tensor"
    unreadable: "torch.Tensor"
    taps: dict[str, "torch.Tensor"] = field(default_factory=dict)

    def stored_features(self) -> dict[str, "torch.Tensor"]:
        return {"features": self.features, "kept": self.kept, "unreadable": self.unreadable}

    def stored_taps(self) -> dict[str, "torch.Tensor"]:
        return {**{f"tap.{name}": value for name, value in self.taps.items()}, "kept": self.kept}


def _cached_entry(cache: FeatureCache, key: str, tap_key: str | None, n_images: int) -> _Entry | None:
    """A state's cached features (and taps, when ``tap_key`` is given); None unless everything is cached.

    Beyond each entry's checksum (:meth:`FeatureCache.get`), the entries must fit the split of ``n_images``
    images they were made from (:func:`_features_problem`, :func:`_taps_problem`); one that does not is
    removed with a one-line warning and recomputed."""
    features = cache.get(key)
    if features is None:
        return None
    problem = _features_problem(features, n_images)
    if problem is not None:
        cache.discard(key, problem)
        return None
    taps = {}
    if tap_key is not None:
        tapped = cache.get(tap_key)
        if tapped is None:
            return None
        problem = _taps_problem(tapped, features["kept"])
        if problem is not None:
            cache.discard(tap_key, problem)
            return None
        taps = _tap_tensors(tapped)
    return _Entry(features["features"], features["kept"], features["unreadable"], taps)


def _features_problem(entry: dict[str, "torch.Tensor"], n_images: int) -> str | None:
    """Why a feature entry cannot be the features of a split of ``n_images`` images (None when it can): it
    needs ``features`` (one row per kept image), ``kept`` (strictly increasing indices) and ``unreadable``,
    which together index every image once."""
    import torch

    if not {"features", "kept", "unreadable"} <= entry.keys():
        return "lacks features, kept or unreadable"
    features, kept, unreadable = entry["features"], entry["kept"], entry["unreadable"]
    if kept.dim() != 1 or unreadable.dim() != 1 or features.dim() != 2 or features.shape[0] != kept.shape[0]:
        return f"has {tuple(features.shape)} features for {tuple(kept.shape)} kept images"
    indices = torch.cat([kept, unreadable]).long()
    if kept.dtype != torch.int64 or indices.numel() != n_images or not torch.equal(indices.sort().values, torch.arange(n_images)):
        return f"does not index the {n_images} images of its split once each"
    if kept.numel() > 1 and not bool((kept[1:] > kept[:-1]).all()):
        return "has a kept index out of order"
    return None


def _taps_problem(entry: dict[str, "torch.Tensor"], kept: "torch.Tensor") -> str | None:
    """Why a tap entry does not belong to the features with ``kept`` (None when it does): same ``kept``
    index, one row per kept image in every tap."""
    import torch

    if "kept" not in entry or not torch.equal(entry["kept"], kept):
        return "has another kept index than its features"
    for name, value in _tap_tensors(entry).items():
        if value.dim() < 1 or value.shape[0] != kept.shape[0]:
            return f"has {tuple(value.shape)} rows of tap {name} for {kept.shape[0]} kept images"
    return None


@dataclass
class _Encoded:
    """The result of one decoding pass that encoded several states."""

    kept: "torch.Tensor"
    unreadable: "torch.Tensor"
    unreadable_reasons: list[str]
    features: dict[str, "torch.Tensor"]
    taps: dict[str, dict[str, "torch.Tensor"]]

    def entry(self, state: str) -> _Entry:
        return _Entry(self.features[state], self.kept, self.unreadable, self.taps.get(state, {}))


def _encode_states(dataset: LabeledImages, states: dict[str, "VLM"], plans: dict[str, "TapPlan"], batch_size: int,
                   workers: int, encoder: AdaptiveBatch, progress: Progress, counter: EncodeCounter,
                   observer: PassObserver | None = None) -> _Encoded:
    """Decode and preprocess every image of ``dataset`` once and encode it with each of ``states``, in passes cut
    at the fixed positions of :func:`pass_layout` (the same features for any batch size; the last pass at its own
    size, no padding), counted by the towers' hooks."""
    import torch

    preprocess = next(iter(states.values())).preprocess
    loader = image_batches(PreprocessedImages(dataset.image, len(dataset), preprocess), batch_size, workers)
    kept, unreadable = [], []
    tap_chunks: dict[str, list[dict[str, torch.Tensor]]] = {state: [] for state in states if state in plans}
    chunked = {}
    for state, model in states.items():
        lead, size = pass_layout(model)
        chunked[state] = FixedChunks(_tapped_image_features(model, plans[state], tap_chunks[state]) if state in plans
                                     else _image_features(model), encoder, size, lead=lead, pad=False,
                                     first_pass=_first_pass(observer, dataset.name, state))
    with torch.no_grad(), counter.watching(states, ("visual",)), counter.attributing(dataset.name):
        for batch in progress.track(loader, f"encoding {dataset.name}"):
            if batch.failure:
                raise QbenchError(batch.failure)
            unreadable.extend(batch.skipped)
            if not batch.indices:
                continue
            kept.extend(batch.indices)
            for state in states:
                chunked[state].feed(batch.pixels)
        features = {state: chunked[state].finish() for state in states} if kept else {}
    if not kept:
        first = unreadable[0][1] if unreadable else "the split is empty"
        raise QbenchError(f"dataset {dataset.name!r}: no image could be read ({first}); check the files under its root")
    taps = {state: {name: torch.cat([piece[name] for piece in tap_chunks[state]]) for name in plans[state].recorded}
            for state in tap_chunks}
    return _Encoded(
        kept=torch.tensor(kept, dtype=torch.int64),
        unreadable=torch.tensor([index for index, _ in unreadable], dtype=torch.int64),
        unreadable_reasons=[reason for _, reason in unreadable],
        features=features,
        taps=taps,
    )


def pass_layout(model: "VLM") -> tuple[int, int]:
    """``(first, later)``: rows of the first image pass of a split and of every later one on ``model``'s device
    (:data:`~qbench.engine.batching.LEADING_CHUNK`, :func:`~qbench.engine.batching.numeric_batch` of its input shape)."""
    size = model_numeric_batch(model)
    return min(LEADING_CHUNK, size), size


def pass_key(layout: tuple[int, int]) -> str:
    """The cache-key part naming a pass layout: :data:`PASS_FORMAT` and the pass sizes."""
    return f"{PASS_FORMAT}:{layout[0]}+{layout[1]}"


def image_key(fingerprint: str, dataset_fingerprint: str, preprocess: str, passes: str) -> str:
    """Cache key of one state's image features of one split: the tower state, the split's content, the
    preprocessing and how the passes were cut (:func:`pass_key`)."""
    return _key("image", passes, fingerprint, dataset_fingerprint, preprocess)


def _first_pass(observer: PassObserver | None, dataset: str, state: str) -> Callable[[], ContextManager[Any]] | None:
    """The ``first_pass`` context factory of :class:`~qbench.engine.batching.FixedChunks` asking ``observer``."""
    if observer is None:
        return None
    return lambda: observer.image_pass(dataset, state) or nullcontext()


@dataclass(frozen=True)
class TapPlan:
    """The spectral taps one encoder state records: ``hooks`` (names for ``spectral.feature_taps``) and
    ``recorded`` (names of the stored tensors: ``penultimate``, :data:`PATCH_AMPLITUDE`)."""

    hooks: tuple[str, ...]
    recorded: tuple[str, ...]


def tap_plan(model: "VLM", taps: Sequence[str]) -> TapPlan:
    """Which of the requested ``taps`` ``model``'s image tower can give (``scoring.md`` §3.1).

    A tower without a penultimate tap is a one-line error naming the model (the spectral analyses cannot run
    without it). ``patch_tokens`` is honoured only for towers with a patch grid (ViTs): the Fourier analysis
    of §3.4 is defined on patch-token maps, so a ConvNeXt or ALIGN tower records no :data:`PATCH_AMPLITUDE`
    and the analysis reports why.
    """
    from qbench.analysis import spectral

    unknown = [name for name in taps if name not in spectral.TAP_POINTS]
    if unknown:
        raise QbenchError(f"unknown spectral taps {', '.join(unknown)}; choose from {', '.join(sorted(spectral.TAP_POINTS))}")
    hooks, recorded = [], []
    if spectral.PENULTIMATE in taps:
        try:
            spectral.penultimate_tap(model)
        except ValueError as reason:
            raise QbenchError(f"model {model.name!r} has no penultimate visual tap for the spectral analysis "
                              f"({str(reason).splitlines()[0]})") from None
        hooks.append(spectral.PENULTIMATE)
        recorded.append(spectral.PENULTIMATE)
    if spectral.PATCH_TOKENS in taps and has_patch_grid(model):
        hooks.append(spectral.PATCH_TOKENS)
        recorded.append(PATCH_AMPLITUDE)
    return TapPlan(tuple(hooks), tuple(recorded))


def has_patch_grid(model: "VLM") -> bool:
    """Whether ``model``'s image tower is a ViT with a patch grid (the precondition of the Fourier taps)."""
    from qbench.analysis import spectral

    try:
        spectral.patch_grid(model)
        spectral.patch_tokens_tap(model)
    except ValueError:
        return False
    return True


def patch_amplitudes(maps: "torch.Tensor") -> "torch.Tensor":
    """``n x H' x W'``: each image's ``|fftshift(fft2(map))|`` averaged over channels (``scoring.md`` §3.4
    steps 1-3, float64 on CPU) via :func:`qbench.analysis.spectral.fourier_amplitude` on one image at a time, so the
    image average of step 3 is left to the analysis and the channel maps need not be kept."""
    import torch

    from qbench.analysis import spectral

    rows = [spectral.fourier_amplitude(maps[index:index + 1]) for index in range(maps.shape[0])]
    return torch.from_numpy(np.stack(rows)).float()


def _tap_key(fingerprint: str, dataset_fingerprint: str, preprocess: str, taps: Sequence[str], passes: str) -> str:
    """Cache key of a state's taps: the feature key's parts plus :data:`TAP_FORMAT` and the tap names."""
    return _key("taps", TAP_FORMAT, passes, fingerprint, dataset_fingerprint, preprocess, ",".join(sorted(set(taps))))


def _tap_tensors(entry: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    return {name[len("tap."):]: value for name, value in entry.items() if name.startswith("tap.")}


def _tapped_image_features(model: "VLM", plan: TapPlan, committed: list) -> Callable[["torch.Tensor"], "torch.Tensor"]:
    """Like :func:`_image_features`, also recording ``plan``'s taps of the same forward pass.

    The hooks live for one call only and their records are appended to ``committed`` after the whole call
    succeeded: when :class:`AdaptiveBatch` retries a piece in halves after an out-of-memory error, the
    failed attempt leaves nothing behind, and the committed pieces stay in image order.
    """
    from qbench.analysis import spectral

    def encode(pixels: "torch.Tensor") -> "torch.Tensor":
        with spectral.feature_taps(model, plan.hooks) as recorder:
            embeddings = model.encode_image(pixels).float().cpu()
        piece = {}
        if spectral.PENULTIMATE in plan.hooks:
            piece[spectral.PENULTIMATE] = recorder.features(spectral.PENULTIMATE)
        if spectral.PATCH_TOKENS in plan.hooks:
            piece[PATCH_AMPLITUDE] = patch_amplitudes(recorder.features(spectral.PATCH_TOKENS))
        recorder.clear()
        for name, value in piece.items():
            if value.shape[0] != pixels.shape[0]:
                raise ValueError(f"tap {name} recorded {value.shape[0]} rows for {pixels.shape[0]} images")
        committed.append(piece)
        return embeddings

    return encode


def _image_features(model: "VLM") -> Callable[["torch.Tensor"], "torch.Tensor"]:
    """``pixels -> float32 CPU embeddings`` of ``model``'s image tower."""
    return lambda pixels: model.encode_image(pixels).float().cpu()


def _text_features(model: "VLM") -> Callable[["torch.Tensor"], "torch.Tensor"]:
    """``tokens -> float32 CPU embeddings`` of ``model``'s text tower."""
    return lambda tokens: model.encode_text(tokens).float().cpu()


class TextEncoder:
    """Prompt embeddings per text-encoder state, each distinct (state, prompt list) encoded once.

    Prompts are counted by hooks on the text towers (:meth:`EncodeCounter.watching`); ``observer`` may wrap the
    first pass of each prompt set's encoding (:class:`PassObserver`)."""

    def __init__(self, states: dict[str, "VLM"], fingerprints: dict[str, str], cache: FeatureCache,
                 progress: Progress, counter: EncodeCounter, batch: AdaptiveBatch | None = None,
                 observer: PassObserver | None = None) -> None:
        self.states = states
        self.fingerprints = fingerprints
        self.cache = cache
        self.progress = progress
        self.counter = counter
        self.observer = observer
        self.batch = batch or AdaptiveBatch(TEXT_BATCH, progress, "prompt")
        """Prompts per forward pass: :data:`TEXT_BATCH`, halved for the rest of the run on out-of-memory."""
        self._memory: dict[str, np.ndarray] = {}

    def encode(self, state: str, prompts: Sequence[str]) -> np.ndarray:
        """``len(prompts) x d`` float64 L2-normalised embeddings from ``state``'s text tower (computed under the
        cache lock of its key, so concurrent processes encode a prompt set once)."""
        if not prompts:
            raise ValueError("no prompts to encode")
        key = _key("text", self.fingerprints[state], "\n".join(prompts))
        if key in self._memory:
            return self._memory[key]
        def encode() -> dict[str, "torch.Tensor"]:
            entry = {"features": self._encode_prompts(state, prompts)}
            self.cache.put(key, entry)
            return entry

        entry, computed = self.cache.compute_once(key, lambda: self._cached(key, len(prompts)), encode, self.progress,
                                                  f"the embeddings of {len(prompts)} prompts")
        if not computed:
            self.counter.cache_hits[f"text:{state}"] += 1
        features = entry["features"]
        array = features.double().numpy()
        self._memory[key] = array
        return array

    def _cached(self, key: str, n_prompts: int) -> dict[str, "torch.Tensor"] | None:
        """The verified cache entry of a prompt set: one ``features`` row per prompt, else removed (one-line
        warning) and None, so the prompts are encoded again."""
        entry = self.cache.get(key)
        if entry is None:
            return None
        features = entry.get("features")
        if features is None or features.dim() != 2 or features.shape[0] != n_prompts:
            shape = None if features is None else tuple(features.shape)
            self.cache.discard(key, f"has prompt embeddings of shape {shape} for {n_prompts} prompts")
            return None
        return entry

    def _encode_prompts(self, state: str, prompts: Sequence[str]) -> "torch.Tensor":
        """One forward pass per :data:`TEXT_BATCH` prompts through ``state``'s text tower (the first one inside
        the observer's context, if it gives one)."""
        import torch

        model = self.states[state]
        chunks = []
        batches = range(0, len(prompts), TEXT_BATCH)
        tracked = self.progress.track(batches, f"encoding {len(prompts)} prompts") if len(prompts) > TEXT_BATCH else batches
        with torch.no_grad(), self.counter.watching({state: model}, ("text",)):
            for start in tracked:
                chunk = list(prompts[start:start + TEXT_BATCH])
                context = self.observer.text_pass(state, prompts) if start == 0 and self.observer is not None else None
                with context or nullcontext():
                    chunks.append(self.batch.apply(_text_features(model), model.tokenize(chunk)))
        return torch.cat(chunks)


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
