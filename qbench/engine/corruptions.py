"""Corrupted copies of image splits, generated on the fly (``suites.md`` §3.3).

:class:`CorruptedImages` wraps any :class:`~qbench.data.LabeledImages` split and serves its images resized to the
evaluation size and then corrupted with the ``imagecorruptions`` package (Michaelis et al., 2019, a re-packaging
of the ImageNet-C code of Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions
and Perturbations", ICLR 2019). This is how corrupted suites are generated on the fly: the severity-3 parameters
were calibrated for 224-px ImageNet images, so the image is resized *first* (a radius-6 defocus blur on a 32x32
image would destroy it) and corrupted *second*. Corrupted pixels are cached on disk (checksummed safetensors).

imagecorruptions draws its noise from NumPy's *global* RNG. To make every corrupted image a pure
function of ``(seed, corruption, index)`` — independent of evaluation order, batching, worker count and
whatever else the process did with ``np.random`` — the global state is replaced by one seeded from
``SeedSequence([seed, corruption_id, index])`` for the single call and restored afterwards, under a lock
so concurrent threads cannot interleave (``suites.md`` §3.3, "Determinism").

imagecorruptions is imported lazily: importing this module stays cheap, and a broken install (its
import needs ``pkg_resources``, gone from setuptools >= 81) becomes a one-line :class:`QbenchError`.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import numpy as np
from PIL import Image

from qbench.data import LabeledImages
from qbench.errors import QbenchError

STUDY_CORRUPTIONS: tuple[str, ...] = ("gaussian_noise", "defocus_blur", "brightness", "contrast")
"""The four corruptions of the study's corruption protocol (``suites.md`` §3.3); the others of imagecorruptions
1.1.2 fail under NumPy 2."""

STUDY_SEVERITY = 3
"""Severity of the study's corruption protocol (ImageNet-C scale 1-5, ``suites.md`` §3.3)."""

DEFAULT_SIZE = 224
"""Resize target before corrupting: the crop size of CLIP and SigLIP models (ALIGN uses 289)."""

DEFAULT_INTERPOLATION = "bicubic"
"""Interpolation of the resize, the one CLIP and SigLIP preprocessing use."""

MIN_CORRUPTION_SIZE = 32
"""imagecorruptions refuses images whose height or width is below 32 px."""

CORRUPTION_CITATION = (
    "Hendrycks & Dietterich, Benchmarking Neural Network Robustness to Common Corruptions and Perturbations, "
    "ICLR 2019 (imagecorruptions by Michaelis et al., 2019)"
)

_INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

_GLOBAL_RNG_LOCK = threading.Lock()  # NumPy's global RNG is process-wide; one corruption call at a time


# --------------------------------------------------------------------------------------------------
# imagecorruptions access
# --------------------------------------------------------------------------------------------------


def _imagecorruptions() -> ModuleType:
    """The imported ``imagecorruptions`` module, or a one-line QbenchError naming the fix."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it imports the deprecated pkg_resources
            import imagecorruptions
    except ModuleNotFoundError as error:
        if error.name == "pkg_resources":
            raise QbenchError(
                "imagecorruptions cannot be imported: it needs pkg_resources, removed in setuptools >= 81; "
                "run: pip install 'setuptools<81'"
            ) from None
        raise QbenchError(
            f"imagecorruptions cannot be imported (missing module {error.name!r}); run: pip install imagecorruptions"
        ) from None
    except ImportError as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise QbenchError(f"imagecorruptions cannot be imported ({first}); reinstall it: pip install imagecorruptions") from None
    return imagecorruptions


def corruption_names() -> tuple[str, ...]:
    """Every corruption imagecorruptions knows, in its own order (15 common + 4 validation ones).

    The position in this tuple is the package's ``corruption_number`` and the ``corruption_id`` that
    enters the per-image seed, so ids stay stable whichever subset a suite uses.
    """
    return tuple(_imagecorruptions().get_corruption_names("all"))


def corruption_id(corruption: str) -> int:
    """The package's index of ``corruption``; an unknown name is a one-line QbenchError listing the known ones."""
    names = corruption_names()
    if corruption not in names:
        raise QbenchError(f"unknown corruption {corruption!r}; known: {', '.join(names)}")
    return names.index(corruption)


def _check_severity(severity: int) -> int:
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise QbenchError(f"corruption severity must be an integer from 1 to 5, got {severity!r}")
    return int(severity)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise QbenchError(f"corruption seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def seeded_state(seed: int, corruption: str, index: int) -> dict:
    """A legacy NumPy RNG state (``np.random.get_state(legacy=False)`` form) seeded from
    ``SeedSequence([seed, corruption_id, index])`` (``suites.md`` §3.3).

    MT19937 is initialised from the whole SeedSequence (not from one 32-bit integer), so nearby
    ``(seed, index)`` pairs give unrelated streams.
    """
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise QbenchError(f"image index must be a non-negative integer, got {index!r}")
    sequence = np.random.SeedSequence([_check_seed(seed), corruption_id(corruption), int(index)])
    return np.random.RandomState(np.random.MT19937(sequence)).get_state(legacy=False)


def corrupt_array(image: np.ndarray, corruption: str, severity: int, seed: int, index: int) -> np.ndarray:
    """``image`` (H x W x 3 uint8, H, W >= 32) corrupted by imagecorruptions, deterministic in ``(seed, corruption, index)``.

    NumPy's global RNG is set to :func:`seeded_state` for the call and restored afterwards, so the
    caller's own ``np.random`` stream is untouched and the output does not depend on it. Deterministic
    corruptions (``defocus_blur``, ``brightness``, ``contrast``) ignore the seed by construction.
    """
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise QbenchError(f"corruption input must be an H x W x 3 uint8 array, got {array.shape} {array.dtype}")
    height, width = array.shape[:2]
    if height < MIN_CORRUPTION_SIZE or width < MIN_CORRUPTION_SIZE:
        raise QbenchError(
            f"imagecorruptions needs images of at least {MIN_CORRUPTION_SIZE}x{MIN_CORRUPTION_SIZE} px, got {width}x{height}; "
            "resize first"
        )
    severity = _check_severity(severity)
    package = _imagecorruptions()
    state = seeded_state(seed, corruption, index)
    with _GLOBAL_RNG_LOCK:
        saved = np.random.get_state(legacy=False)
        np.random.set_state(state)
        try:
            out = package.corrupt(np.ascontiguousarray(array), corruption_name=corruption, severity=severity)
        except Exception as error:  # imagecorruptions' own failures (e.g. NumPy-2 incompatibilities)
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise QbenchError(
                f"imagecorruptions failed on {corruption!r} at severity {severity} ({first}); "
                f"use one of {', '.join(STUDY_CORRUPTIONS)}"
            ) from None
        finally:
            np.random.set_state(saved)
    out = np.asarray(out)
    if out.shape != array.shape:  # never seen for the supported corruptions; guard the contract
        raise QbenchError(f"imagecorruptions returned shape {out.shape} for input {array.shape} ({corruption!r})")
    return out.astype(np.uint8, copy=False)


def resize_for_corruption(image: Image.Image, size: int, interpolation: str = DEFAULT_INTERPOLATION) -> Image.Image:
    """``image`` as RGB ``size x size``: shorter side resized to ``size``, then centre-cropped.

    For square inputs such as CIFAR (32x32) this is a plain resize to ``size x size``, as
    ``suites.md`` §3.3 prescribes; the crop only matters for non-square bases and matches the
    Resize + CenterCrop of CLIP preprocessing, whose own resize and crop are then no-ops.
    """
    if interpolation not in _INTERPOLATIONS:
        raise QbenchError(f"unknown interpolation {interpolation!r}; known: {', '.join(_INTERPOLATIONS)}")
    rgb = image.convert("RGB")
    width, height = rgb.size
    if (width, height) == (size, size):
        return rgb
    short = min(width, height)
    new_width, new_height = (size, max(size, int(size * height / width))) if width == short else (
        max(size, int(size * width / height)),
        size,
    )
    resized = rgb.resize((new_width, new_height), _INTERPOLATIONS[interpolation])
    left = int(round((new_width - size) / 2.0))
    top = int(round((new_height - size) / 2.0))
    return resized.crop((left, top, left + size, top + size))


class CorruptedImages(LabeledImages):
    """A split whose images are resized to ``size`` and then corrupted (``suites.md`` §3.3).

    Labels, class names and templates are the base split's. ``image(i)`` decodes base image ``i`` (an
    unreadable base file raises exactly what the base raises, e.g. :class:`~qbench.data.UnreadableImage`,
    so the engine drops it as for the clean split), resizes it with ``interpolation`` and corrupts it
    with :func:`corrupt_array` seeded by ``(seed, corruption, i)``. ``size=None`` corrupts at the base
    resolution (not the suite pipeline; inputs below 32 px then fail with a one-line error).

    The fingerprint hashes the base fingerprint with corruption, severity, seed, size and interpolation,
    so cached features of clean and corrupted splits, or of two seeds, never mix. Corrupted pixels are
    cached only with :meth:`with_pixel_cache` (checksummed entries); the feature cache keyed by the
    fingerprint makes a second evaluation of the same encoder free.
    """

    def __init__(
        self,
        base: LabeledImages,
        corruption: str,
        severity: int = STUDY_SEVERITY,
        seed: int = 0,
        *,
        size: int | None = DEFAULT_SIZE,
        interpolation: str = DEFAULT_INTERPOLATION,
        name: str | None = None,
        follow_model: bool = False,
        pixel_cache: Path | None = None,
    ) -> None:
        self.follow_model = follow_model
        self.pixel_cache = None if pixel_cache is None else Path(pixel_cache)
        self.corruption_id = corruption_id(corruption)
        self.severity = _check_severity(severity)
        self.seed = _check_seed(seed)
        if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_CORRUPTION_SIZE):
            raise QbenchError(f"corruption image size must be an integer >= {MIN_CORRUPTION_SIZE} (imagecorruptions' minimum), got {size!r}")
        if interpolation not in _INTERPOLATIONS:
            raise QbenchError(f"unknown interpolation {interpolation!r}; known: {', '.join(_INTERPOLATIONS)}")
        self.base = base
        self.corruption = corruption
        self.size = None if size is None else int(size)
        self.interpolation = interpolation
        self.name = name or f"{base.name}-{corruption}-{self.severity}"
        self.labels = np.asarray(base.labels)
        self.classnames = tuple(base.classnames)
        self.templates = tuple(base.templates)
        self.unreadable = int(getattr(base, "unreadable", 0))
        self.notes = tuple(getattr(base, "notes", ())) + (
            f"{corruption} at severity {self.severity}, seed {self.seed}, "
            + (f"after resizing to {self.size} px ({interpolation})" if self.size else "at the base resolution"),
        )

    def _with(self, **changes: Any) -> "CorruptedImages":
        """A copy with some keyword arguments changed (the split's settings are its constructor arguments)."""
        settings = {"size": self.size, "interpolation": self.interpolation, "name": self.name,
                    "follow_model": self.follow_model, "pixel_cache": self.pixel_cache, **changes}
        return CorruptedImages(self.base, self.corruption, self.severity, self.seed, **settings)

    def at_size(self, size: int, interpolation: str | None = None) -> "CorruptedImages":
        """The same corrupted split resized to ``size`` (the model's crop) before corrupting."""
        return self._with(size=size, interpolation=interpolation or self.interpolation, follow_model=False)

    def with_pixel_cache(self, root: Path | str | None) -> "CorruptedImages":
        """The same split keeping every corrupted image as a uint8 safetensors entry under ``root/<fingerprint>/``.

        ``suites.md`` §3.3: corruption costs 3–45 ms per 224-px image (about 11 minutes for the 4 x 10,000 images of a CIFAR-10 corruption suite),
        and every new quantized model must re-encode the corrupted images, so they are corrupted once and
        read back (~0.2 ms) afterwards. The key is the split's fingerprint (base content, corruption,
        severity, seed, size, interpolation) and the image index. Files are written atomically, so loader
        workers can share it, and each records its key and a SHA-256 of its pixels, verified on every read
        (:func:`_read_pixels`): a damaged entry is removed and the image corrupted again.
        """
        return self._with(pixel_cache=None if root is None else Path(root))

    def _cached_path(self, index: int) -> Path | None:
        return None if self.pixel_cache is None else self.pixel_cache / self.fingerprint / f"{index:07d}.safetensors"

    def _pixel_key(self, index: int) -> str:
        """What a pixel cache entry is bound to: the split's fingerprint and the image index."""
        return f"{self.fingerprint}/{index}"

    def array(self, index: int) -> np.ndarray:
        """The corrupted ``index``-th image as an H x W x 3 uint8 array (from the pixel cache when it has a sound entry)."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        path = self._cached_path(int(index))
        key = self._pixel_key(int(index))
        if path is not None:
            cached = _read_pixels(path, key, self.size)
            if cached is not None:
                return cached
        corrupted = self._corrupt(int(index))
        if path is not None:
            _write_pixels(path, corrupted, key)
        return corrupted

    def _corrupt(self, index: int) -> np.ndarray:
        image = self.base.image(index)  # base errors propagate unchanged
        if self.size is not None:
            image = resize_for_corruption(image, self.size, self.interpolation)
        else:
            image = image.convert("RGB")
        return corrupt_array(np.asarray(image, dtype=np.uint8), self.corruption, self.severity, self.seed, int(index))

    def image(self, index: int) -> Image.Image:
        """The corrupted ``index``-th image, RGB."""
        return Image.fromarray(self.array(index))

    @property
    def fingerprint(self) -> str:
        text = (
            f"{self.base.fingerprint}|corrupt|{self.corruption}|severity={self.severity}|seed={self.seed}"
            f"|size={self.size}|{self.interpolation}"
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


PIXEL_FORMAT = "qbench-pixels-v1"
"""Format of a corrupted-image cache entry (safetensors metadata ``qbench.format``)."""
PIXELS = "pixels"
"""Name of the one array of a pixel cache entry."""


def _read_pixels(path: Path, key: str, size: int | None = None) -> np.ndarray | None:
    """A cached corrupted image, or None when it is missing or unusable.

    An entry is used only when it is readable, was stored for ``key``, matches its SHA-256 and is an
    H x W x 3 uint8 image (``size`` x ``size`` when the split has a size). Anything else is removed with a
    one-line warning (:func:`_discard_pixels`) and the caller corrupts the image again.
    """
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = dict(handle.metadata() or {})
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}
    except FileNotFoundError:
        return None
    except Exception as error:  # safetensors reports truncation and bad headers with its own error types
        return _discard_pixels(path, f"is unreadable ({type(error).__name__})")
    problem = _pixels_problem(arrays, metadata, key, size)
    return _discard_pixels(path, problem) if problem else arrays[PIXELS]


def _pixels_problem(arrays: dict[str, np.ndarray], metadata: dict[str, str], key: str, size: int | None) -> str | None:
    """Why a pixel cache entry read under ``key`` must not be used (one line), or None when it is sound."""
    from qbench.engine.integrity import arrays_digest

    if metadata.get("qbench.format") != PIXEL_FORMAT or metadata.get("qbench.key") != key:
        return f"holds the entry of another key or format ({str(metadata.get('qbench.key'))[:40]})"
    if arrays_digest(arrays, bind=f"{PIXEL_FORMAT}\0{key}") != metadata.get("qbench.sha256"):
        return "fails its checksum (corrupt or edited)"
    array = arrays.get(PIXELS)
    if array is None or array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        return "is not an H x W x 3 uint8 image"
    if size is not None and array.shape[:2] != (size, size):
        return f"is {array.shape[0]} x {array.shape[1]} px, not {size} x {size}"
    return None


def _discard_pixels(path: Path, reason: str) -> None:
    """Remove a damaged pixel cache entry and say so in one line on stderr (it may be read in a loader worker,
    which has no progress log)."""
    import sys

    from qbench.atomic import remove_path

    remove_path(path)
    print(f"qbench: warning: corrupted-image cache entry {path} {reason}; removed it, corrupting the image again",
          file=sys.stderr)
    return None


def _write_pixels(path: Path, array: np.ndarray, key: str) -> None:
    """Store one corrupted image atomically with its key and checksum (staged under the pixel cache root's
    ``.partial`` folder); a cache that cannot be written is skipped, never fatal."""
    from safetensors.numpy import save_file

    from qbench.atomic import write_atomic_with
    from qbench.engine.integrity import arrays_digest

    arrays = {PIXELS: np.ascontiguousarray(array)}
    metadata = {"qbench.format": PIXEL_FORMAT, "qbench.key": key,
                "qbench.sha256": arrays_digest(arrays, bind=f"{PIXEL_FORMAT}\0{key}")}
    try:
        write_atomic_with(path, lambda temporary: save_file(arrays, str(temporary), metadata=metadata),
                          root=path.parent.parent, sync_folder=False)
    except OSError:
        return


def model_input_size(preprocess) -> tuple[int, str]:
    """The crop size and resize interpolation of a torchvision preprocessing pipeline (``suites.md`` §3.3:
    CIFAR images are resized "to the model's crop size with the model's interpolation").

    The size is read from the transformed tensor of a blank image; the interpolation from the first
    ``Resize`` transform (bicubic when there is none, as for CLIP and SigLIP).
    """
    from qbench.engine.batching import image_shape_of

    shape = image_shape_of(preprocess)
    interpolation = DEFAULT_INTERPOLATION
    for transform in getattr(preprocess, "transforms", ()):
        mode = getattr(transform, "interpolation", None)
        if mode is not None and type(transform).__name__ == "Resize":
            name = str(getattr(mode, "value", mode)).lower()
            interpolation = name if name in _INTERPOLATIONS else DEFAULT_INTERPOLATION
            break
    return int(shape[-1]), interpolation


def default_pixel_cache(feature_cache: Path) -> Path:
    """Where corrupted images are kept: ``corrupted/`` inside the feature cache folder (``--cache-dir``)."""
    return Path(feature_cache) / "corrupted"


def with_pixel_cache(dataset: LabeledImages, root: Path | None) -> LabeledImages:
    """``dataset`` with the corrupted-image cache under ``root`` when it is a corrupted split (else unchanged)."""
    return dataset.with_pixel_cache(root) if isinstance(dataset, CorruptedImages) and root is not None else dataset


def follow_model_size(dataset: LabeledImages, preprocess) -> LabeledImages:
    """``dataset`` resized to the model's crop before corrupting, when it is a model-following corrupted split.

    Corrupted suites (a corrupted CIFAR-10 test split, say) are registered before the model is known; the
    engine calls this once the model is loaded, so resize-then-corrupt uses the crop size and
    interpolation of the model under test, and the fingerprint (hence the feature cache) records them.
    """
    if not isinstance(dataset, CorruptedImages) or not dataset.follow_model:
        return dataset
    size, interpolation = model_input_size(preprocess)
    return dataset.at_size(max(size, MIN_CORRUPTION_SIZE), interpolation)


def corrupted_splits(
    base: LabeledImages,
    seed: int = 0,
    *,
    size: int = DEFAULT_SIZE,
    interpolation: str = DEFAULT_INTERPOLATION,
    corruptions: Sequence[str] = STUDY_CORRUPTIONS,
    severity: int = STUDY_SEVERITY,
) -> dict[str, CorruptedImages]:
    """The study's corruption suite for a clean split: one :class:`CorruptedImages` per corruption, at severity 3."""
    return {
        corruption: CorruptedImages(base, corruption, severity, seed, size=size, interpolation=interpolation)
        for corruption in corruptions
    }
