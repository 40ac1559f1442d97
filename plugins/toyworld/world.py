"""A procedurally generated, seeded image-caption world: coloured shapes on textured backgrounds.

Why it exists: qbench must show meaningful numbers offline, in minutes, with no downloaded weights or
data. This module renders 32x32 RGB scenes with plain numpy (vectorised per chunk of images) and writes
a caption for each, so a tiny CLIP can be trained on it (``scripts/train_toy.py``) and every qbench
evaluation role has a split:

* **ID classes** (:data:`ID_CLASSES`): ten shapes, the zero-shot label set of the evaluation.
* **Near-OOD classes** (:data:`NEAR_OOD_CLASSES`): held-out shapes that resemble ID shapes (hexagon ~
  circle, frame ~ square/ring, semicircle ~ crescent, hourglass ~ triangle, ellipse ~ circle).
* **Far-OOD scenes** (:data:`FAR_OOD_KINDS`): a bare background texture, or a scribble with no shape.
* **Nuisances**: object colour (with jitter), size, position, small rotation, background texture and
  its two tones, pixel noise.
* **Spurious correlation**: every ID class has a common background (:data:`COMMON_BACKGROUND`) used
  with probability :data:`COMMON_BACKGROUND_PROB` in training, proxy and ID-test images; otherwise one
  of the other backgrounds is drawn uniformly. Captions mention the background some of the time.

Like web-scale CLIP pre-training, the training captions cover the held-out concepts too (near-OOD
shapes and far-OOD scenes appear in the ``train``/``proxy`` mixture); only the ID label set of the
evaluation excludes them.

Determinism: every split is a stream of fixed-size chunks; chunk ``c`` of stream ``(split, seed)`` is
rendered from its own generator seeded by ``sha256("qbench-toyworld|split|seed|c")``. Hence
``generate(split, n, seed)`` is a pure function, a shorter request is a prefix of a longer one, and
different splits (or seeds) draw from disjoint seed streams: the evaluation splits never share a
generator with ``train`` or ``proxy``.

Rendered once (issue 16): every test, benchmark and toy evaluation reads these splits, and rendering them cost
about half a second per 1,000 images per run. A rendered chunk of every split but ``train`` (a stream read once) is
kept in memory for the process (:data:`MEMORY_CHUNKS`, least recently used first out) and on disk for the machine
under ``<QBENCH_CACHE>/toyworld/<renderer>/`` (:func:`disk_cache_root`), ``renderer`` being a hash of this module's
source and NumPy's version, so a change to the renderer never reads an old chunk. Disk entries are safetensors
(no pickle) written atomically, each with its key and a SHA-256 over its arrays and captions, verified on every
read; a damaged entry is removed with a one-line warning and rendered again. A cached chunk is the rendered chunk,
byte for byte, so fingerprints and images never depend on the cache.

Label conventions of :class:`ToySplit`: ``labels`` index the split's own ``classnames``. ID-label-space
splits (``id-test``, ``spurious-*``) use :data:`ID_CLASSES`; ``ood-near`` uses
:data:`NEAR_OOD_CLASSES`; ``ood-far`` uses :data:`FAR_OOD_KINDS`; ``train``/``proxy`` use
:data:`TRAIN_CLASSES` (all of them). The qbench dataset loaders in ``plugin.py`` expose the OOD splits
with the ID class names and labels ``-1``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 2  # shapes are rasterised at 2x and box-filtered: anti-aliased edges at 32 px
CHUNK = 256  # images per independently seeded chunk of a split's stream

ID_CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "cross", "ring", "star", "diamond", "heart", "crescent", "arrow",
)
NEAR_OOD_CLASSES: tuple[str, ...] = ("hexagon", "frame", "semicircle", "hourglass", "ellipse")
FAR_OOD_KINDS: tuple[str, ...] = ("background", "scribble")
SHAPES: tuple[str, ...] = ID_CLASSES + NEAR_OOD_CLASSES
TRAIN_CLASSES: tuple[str, ...] = SHAPES + FAR_OOD_KINDS

BACKGROUNDS: tuple[str, ...] = (
    "plain", "striped", "checkered", "dotted", "gradient", "grid", "wavy", "speckled", "zigzag", "cloudy",
)
# one distinct common background per ID class (a fixed, arbitrary pairing)
COMMON_BACKGROUND: dict[str, str] = {
    "circle": "checkered", "square": "wavy", "triangle": "dotted", "cross": "cloudy", "ring": "striped",
    "star": "grid", "diamond": "speckled", "heart": "zigzag", "crescent": "gradient", "arrow": "plain",
}
COMMON_BACKGROUND_PROB = 0.85

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 215), "yellow": (235, 210, 40),
    "orange": (240, 135, 30), "purple": (135, 55, 185), "pink": (240, 120, 180), "white": (245, 245, 245),
    "black": (20, 20, 20), "cyan": (40, 195, 210),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

MIN_RADIUS, MAX_RADIUS = 7.0, 13.0  # shape half-extent in pixels
SMALL_RADIUS, LARGE_RADIUS = 8.5, 11.5  # below/above: the caption may say "small"/"large"
MAX_ROTATION = np.deg2rad(15.0)
OBJECT_OPACITY = (1.0, 1.0)  # per-image object opacity range; opaque in the shipped world, lower = faded
NOISE_SIGMA = (2.0, 8.0)  # per-image std of additive Gaussian pixel noise (grey levels)
TEXTURE_CONTRAST = (30.0, 70.0)  # grey-level difference between a background's two tones
FAR_OOD_PROB = 0.14  # share of far-OOD scenes in the train/proxy mixture

# Zero-shot prompt templates; the caption templates below contain these forms.
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a drawing of a {}.",
    "a picture of the {}.",
    "an image of a {}.",
    "a {} shape.",
)
_OBJECT_CAPTIONS: tuple[str, ...] = (
    "a photo of {a} {obj}.",
    "a drawing of {a} {obj}.",
    "a picture of the {obj}.",
    "an image of {a} {obj}.",
    "{a} {obj} shape.",
    "a photo of the {obj}.",
    "the {obj}.",
    "{a} {obj}.",
)
_BACKGROUND_CAPTIONS: tuple[str, ...] = (
    "a photo of {a} {bg} background.",
    "{a} {bg} pattern.",
    "an empty {bg} background.",
    "a picture of {a} {bg} texture with no shape.",
)
_SCRIBBLE_CAPTIONS: tuple[str, ...] = (
    "a scribble on {a} {bg} background.",
    "a photo of {a} {colour} scribble.",
    "a drawing of a scribble.",
    "{a} {colour} scribble.",
)
CAPTION_BACKGROUND_PROB = 0.4
CAPTION_COLOUR_PROB = 0.6
CAPTION_SIZE_PROB = 0.5


@dataclass(frozen=True, eq=False)
class ToySplit:
    """Generated images with captions and the nuisance metadata that produced them.

    ``labels`` index ``classnames`` (see the module docstring for each split's label set);
    ``backgrounds`` index :data:`BACKGROUNDS`, ``colours`` index :data:`COLOUR_NAMES` (-1: no object
    colour, i.e. a bare background), ``radii`` are object half-extents in pixels (0 for far-OOD).
    """

    split: str
    seed: int
    images: np.ndarray
    labels: np.ndarray
    captions: tuple[str, ...]
    classnames: tuple[str, ...]
    backgrounds: np.ndarray
    colours: np.ndarray
    radii: np.ndarray

    def __len__(self) -> int:
        return int(len(self.labels))


@dataclass(frozen=True)
class _Recipe:
    """How a split samples its scenes: label set, class weights and the background rule."""

    classnames: tuple[str, ...]
    weights: tuple[float, ...] | None  # None: balanced labels within each chunk
    background: str  # "correlated" | "uniform" | "common" | "counter"


def _train_weights() -> tuple[float, ...]:
    """Shapes equally likely; the two far-OOD kinds share :data:`FAR_OOD_PROB`."""
    shape = (1.0 - FAR_OOD_PROB) / len(SHAPES)
    return (shape,) * len(SHAPES) + (FAR_OOD_PROB / len(FAR_OOD_KINDS),) * len(FAR_OOD_KINDS)


RECIPES: dict[str, _Recipe] = {
    "train": _Recipe(TRAIN_CLASSES, _train_weights(), "correlated"),
    "proxy": _Recipe(TRAIN_CLASSES, _train_weights(), "correlated"),
    "id-test": _Recipe(ID_CLASSES, None, "correlated"),
    "ood-near": _Recipe(NEAR_OOD_CLASSES, None, "uniform"),
    "ood-far": _Recipe(FAR_OOD_KINDS, None, "uniform"),
    "spurious-common": _Recipe(ID_CLASSES, None, "common"),
    "spurious-counter": _Recipe(ID_CLASSES, None, "counter"),
}
SPLITS: tuple[str, ...] = tuple(RECIPES)


# -- seeding ---------------------------------------------------------------------------------------
def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any labelled parts (split name, user seed, chunk): disjoint streams per label."""
    text = "|".join(["qbench-toyworld", *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


# -- shapes: boolean masks on shape-local coordinates (unit half-extent, y pointing up) -------------
def _circle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return x * x + y * y <= 0.92**2


def _square(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(x), np.abs(y)) <= 0.78


def _triangle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (y >= -0.65) & (np.abs(x) <= 0.98 * (0.95 - y) / 1.6)


def _cross(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    ax, ay = np.abs(x), np.abs(y)
    return ((ax <= 0.28) & (ay <= 0.92)) | ((ay <= 0.28) & (ax <= 0.92))


def _ring(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    r2 = x * x + y * y
    return (r2 <= 0.92**2) & (r2 >= 0.52**2)


def _star(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    sector = 2 * np.pi / 5
    phase = np.mod(np.arctan2(y, x) - np.pi / 2 + sector / 2, sector) / sector  # 0.5 at a tip
    tip = 1.0 - 2.0 * np.abs(phase - 0.5)
    return np.hypot(x, y) <= 0.4 + 0.6 * tip**2


def _diamond(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.abs(x) + np.abs(y) <= 0.98


def _heart(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    hx, hy = x / 0.8, y / 0.8 + 0.12
    return (hx * hx + hy * hy - 1.0) ** 3 - hx * hx * hy**3 <= 0.0


def _crescent(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x * x + y * y <= 0.92**2) & ((x - 0.45) ** 2 + (y - 0.2) ** 2 > 0.72**2)


def _arrow(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    shaft = (np.abs(y) <= 0.22) & (x >= -0.95) & (x <= 0.15)
    head = (x >= 0.05) & (x <= 0.95) & (np.abs(y) <= 0.75 * (0.95 - x) / 0.9)
    return shaft | head


def _hexagon(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    ax, ay = np.abs(x), np.abs(y)
    half_height = 0.9 * np.sqrt(3) / 2
    return (ay <= half_height) & (ax * np.sqrt(3) / 2 + ay / 2 <= half_height)


def _frame(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    extent = np.maximum(np.abs(x), np.abs(y))
    return (extent <= 0.8) & (extent >= 0.48)


def _semicircle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x * x + (y + 0.45) ** 2 <= 1.0) & (y >= -0.45)


def _hourglass(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (np.abs(y) <= 0.85) & (np.abs(x) <= 0.8 * np.abs(y) / 0.85 + 0.08)


def _ellipse(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x / 0.95) ** 2 + (y / 0.5) ** 2 <= 1.0


SHAPE_MASKS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _circle, "square": _square, "triangle": _triangle, "cross": _cross, "ring": _ring,
    "star": _star, "diamond": _diamond, "heart": _heart, "crescent": _crescent, "arrow": _arrow,
    "hexagon": _hexagon, "frame": _frame, "semicircle": _semicircle, "hourglass": _hourglass,
    "ellipse": _ellipse,
}


# -- backgrounds: a mixing field t in [0, 1] between two tones, per texture -------------------------
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(x, y)``, each ``1 x size x size``, in output-pixel units."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) * (IMAGE_SIZE / size)
    return coords[None, None, :], coords[None, :, None]


def _texture_field(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """The ``n x 32 x 32`` mixing field of one texture kind, with random period/phase per image."""
    x, y = _pixel_grid(IMAGE_SIZE)

    def uniform(low: float, high: float) -> np.ndarray:
        return rng.uniform(low, high, size=(n, 1, 1)).astype(np.float32)

    if kind == "plain":
        return np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    if kind == "striped":
        period, phase = uniform(4, 7), uniform(0, 8)
        stripes = np.mod(y + phase, period) < period / 2
        return np.broadcast_to(stripes, (n, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    if kind == "checkered":
        period, px, py = uniform(3, 6), uniform(0, 6), uniform(0, 6)
        return (np.mod(np.floor((x + px) / period) + np.floor((y + py) / period), 2)).astype(np.float32)
    if kind == "dotted":
        spacing, radius, px, py = uniform(5, 8), uniform(1.0, 1.7), uniform(0, 8), uniform(0, 8)
        dx = np.mod(x + px, spacing) - spacing / 2
        dy = np.mod(y + py, spacing) - spacing / 2
        return (dx * dx + dy * dy <= radius * radius).astype(np.float32)
    if kind == "gradient":
        angle = uniform(0, 2 * np.pi)
        ramp = ((x - 16) * np.cos(angle) + (y - 16) * np.sin(angle)) / 16
        return np.clip(0.5 + 0.5 * ramp, 0, 1).astype(np.float32)
    if kind == "grid":
        period, px, py = uniform(5, 8), uniform(0, 8), uniform(0, 8)
        return ((np.mod(x + px, period) < 1.2) | (np.mod(y + py, period) < 1.2)).astype(np.float32)
    if kind == "wavy":
        period, amplitude, wavelength, phase = uniform(5, 8), uniform(1.5, 3), uniform(10, 16), uniform(0, 8)
        return (np.sin(2 * np.pi * (y + phase + amplitude * np.sin(2 * np.pi * x / wavelength)) / period) > 0).astype(
            np.float32
        )
    if kind == "speckled":
        density = uniform(0.2, 0.4)
        return (rng.random((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32) < density).astype(np.float32)
    if kind == "zigzag":
        width, period, phase = uniform(4, 7), uniform(4, 7), uniform(0, 8)
        tooth = np.abs(np.mod(x, width) - width / 2)
        return (np.mod(y + phase + tooth, period) < period / 2).astype(np.float32)
    if kind == "cloudy":
        coarse = rng.random((n, 5, 5), dtype=np.float32)
        return _upsample_bilinear(coarse, IMAGE_SIZE)
    raise ValueError(f"unknown background {kind!r}")


def _upsample_bilinear(coarse: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of ``n x k x k`` to ``n x size x size`` (smooth random fields)."""
    k = coarse.shape[-1]
    pos = (np.arange(size, dtype=np.float32) + 0.5) * (k - 1) / size
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, k - 1)
    frac = pos - lo
    rows = coarse[:, lo, :] * (1 - frac)[None, :, None] + coarse[:, hi, :] * frac[None, :, None]
    return rows[:, :, lo] * (1 - frac)[None, None, :] + rows[:, :, hi] * frac[None, None, :]


def render_backgrounds(kinds: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``n x 32 x 32 x 3`` float backgrounds: two muted tones mixed by each image's texture field."""
    n = len(kinds)
    field = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    for index, kind in enumerate(BACKGROUNDS):
        members = np.flatnonzero(kinds == index)
        if members.size:
            field[members] = _texture_field(kind, members.size, rng)
    grey = rng.uniform(60, 190, size=(n, 1)).astype(np.float32)
    base = grey + rng.uniform(-30, 30, size=(n, 3)).astype(np.float32)
    contrast = rng.uniform(*TEXTURE_CONTRAST, size=(n, 1)).astype(np.float32) * np.where(grey > 125, -1, 1)
    other = base + contrast
    return base[:, None, None, :] + field[..., None] * (other - base)[:, None, None, :]


# -- objects -----------------------------------------------------------------------------------------
def _shape_alpha(
    shapes: np.ndarray, cx: np.ndarray, cy: np.ndarray, radius: np.ndarray, angle: np.ndarray
) -> np.ndarray:
    """Anti-aliased coverage ``n x 32 x 32`` of each image's shape (index into :data:`SHAPES`)."""
    n = len(shapes)
    size = IMAGE_SIZE * SUPERSAMPLE
    gx, gy = _pixel_grid(size)
    dx = gx - cx[:, None, None]
    dy = gy - cy[:, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    scale = radius[:, None, None]
    local_x = ((dx * cos + dy * sin) / scale).astype(np.float32)
    local_y = ((dx * sin - dy * cos) / scale).astype(np.float32)  # image y points down; shape y up
    mask = np.zeros((n, size, size), np.float32)
    for index, name in enumerate(SHAPES):
        members = np.flatnonzero(shapes == index)
        if members.size:
            mask[members] = SHAPE_MASKS[name](local_x[members], local_y[members])
    return mask.reshape(n, IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE).mean(axis=(2, 4))


def _scribble_alpha(n: int, rng: np.random.Generator) -> np.ndarray:
    """Coverage ``n x 32 x 32`` of a random three-segment polyline stroke (far-OOD scribbles)."""
    size = IMAGE_SIZE * SUPERSAMPLE
    gx, gy = _pixel_grid(size)
    points = rng.uniform(4, IMAGE_SIZE - 4, size=(n, 4, 2)).astype(np.float32)
    width = rng.uniform(1.0, 1.7, size=(n, 1, 1)).astype(np.float32)
    distance = np.full((n, size, size), np.inf, np.float32)
    for segment in range(3):
        ax, ay = points[:, segment, 0, None, None], points[:, segment, 1, None, None]
        bx, by = points[:, segment + 1, 0, None, None], points[:, segment + 1, 1, None, None]
        vx, vy = bx - ax, by - ay
        t = np.clip(((gx - ax) * vx + (gy - ay) * vy) / np.maximum(vx * vx + vy * vy, 1e-6), 0, 1)
        distance = np.minimum(distance, np.hypot(gx - ax - t * vx, gy - ay - t * vy))
    mask = (distance <= width).astype(np.float32)
    return mask.reshape(n, IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE).mean(axis=(2, 4))


# -- captions ------------------------------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _caption(
    classname: str, colour: int, radius: float, background: int, rng: np.random.Generator
) -> str:
    """One caption in the toy style; optional size, colour and background words (drawn from ``rng``)."""
    bg = BACKGROUNDS[background]
    if classname == "background":
        template = _BACKGROUND_CAPTIONS[rng.integers(len(_BACKGROUND_CAPTIONS))]
        return template.format(a=_article(bg), bg=bg)
    colour_name = COLOUR_NAMES[colour]
    if classname == "scribble":
        template = _SCRIBBLE_CAPTIONS[rng.integers(len(_SCRIBBLE_CAPTIONS))]
        article = _article(bg) if "{bg}" in template else _article(colour_name)
        return template.format(a=article, bg=bg, colour=colour_name)
    words = [classname]
    if rng.random() < CAPTION_COLOUR_PROB:
        words.insert(0, colour_name)
    if rng.random() < CAPTION_SIZE_PROB and (radius < SMALL_RADIUS or radius > LARGE_RADIUS):
        words.insert(0, "small" if radius < SMALL_RADIUS else "large")
    obj = " ".join(words)
    caption = _OBJECT_CAPTIONS[rng.integers(len(_OBJECT_CAPTIONS))].format(a=_article(obj), obj=obj)
    if rng.random() < CAPTION_BACKGROUND_PROB:
        caption = f"{caption[:-1]} on {_article(bg)} {bg} background."
    return caption


# -- sampling and rendering ---------------------------------------------------------------------------
def _sample_labels(recipe: _Recipe, n: int, rng: np.random.Generator) -> np.ndarray:
    """Labels into ``recipe.classnames``: weighted draws, or balanced and shuffled within the chunk."""
    k = len(recipe.classnames)
    if recipe.weights is None:
        return rng.permutation(np.arange(n) % k).astype(np.int64)
    return rng.choice(k, size=n, p=np.asarray(recipe.weights) / np.sum(recipe.weights)).astype(np.int64)


def _sample_backgrounds(rule: str, names: list[str], rng: np.random.Generator) -> np.ndarray:
    """Background indices for scenes ``names`` under the split's rule (spurious coupling for ID shapes)."""
    n = len(names)
    k = len(BACKGROUNDS)
    uniform = rng.integers(k, size=n)
    other = rng.integers(k - 1, size=n)  # a uniformly drawn background other than the common one
    use_common = rng.random(n) < COMMON_BACKGROUND_PROB
    out = np.empty(n, np.int64)
    for i, name in enumerate(names):
        if name not in COMMON_BACKGROUND or rule == "uniform":
            out[i] = uniform[i]
            continue
        common = BACKGROUNDS.index(COMMON_BACKGROUND[name])
        counter = other[i] + (other[i] >= common)
        if rule == "common" or (rule == "correlated" and use_common[i]):
            out[i] = common
        else:
            out[i] = counter
    return out


def _render_chunk(split: str, seed: int, chunk: int, n: int) -> ToySplit:
    """Render chunk ``chunk`` (``n`` images) of the stream ``(split, seed)`` from its own generator."""
    recipe = RECIPES[split]
    rng = np.random.default_rng(derive_seed(split, seed, chunk))
    labels = _sample_labels(recipe, n, rng)
    names = [recipe.classnames[label] for label in labels]
    backgrounds = _sample_backgrounds(recipe.background, names, rng)
    canvas = render_backgrounds(backgrounds, rng)

    shape_index = np.array([SHAPES.index(name) if name in SHAPES else -1 for name in names], np.int64)
    colours = rng.integers(len(COLOUR_NAMES), size=n).astype(np.int64)
    radius = rng.uniform(MIN_RADIUS, MAX_RADIUS, size=n).astype(np.float32)
    cx = rng.uniform(radius, IMAGE_SIZE - radius).astype(np.float32)
    cy = rng.uniform(radius, IMAGE_SIZE - radius).astype(np.float32)
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION, size=n).astype(np.float32)
    jitter = rng.uniform(-20, 20, size=(n, 3)).astype(np.float32)
    rgb = np.asarray([COLOURS[name] for name in COLOUR_NAMES], np.float32)[colours] + jitter

    alpha = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    is_shape = shape_index >= 0
    if is_shape.any():
        alpha[is_shape] = _shape_alpha(
            shape_index[is_shape], cx[is_shape], cy[is_shape], radius[is_shape], angle[is_shape]
        )
    is_scribble = np.array([name == "scribble" for name in names])
    if is_scribble.any():
        alpha[is_scribble] = _scribble_alpha(int(is_scribble.sum()), rng)
    alpha *= rng.uniform(*OBJECT_OPACITY, size=(n, 1, 1)).astype(np.float32)
    canvas = canvas * (1 - alpha[..., None]) + rgb[:, None, None, :] * alpha[..., None]
    sigma = rng.uniform(*NOISE_SIGMA, size=(n, 1, 1, 1)).astype(np.float32)
    canvas += sigma * rng.standard_normal(canvas.shape, dtype=np.float32)
    images = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)

    is_background = np.array([name == "background" for name in names])
    colours = np.where(is_background, -1, colours)
    radius = np.where(is_shape, radius, 0).astype(np.float32)
    captions = tuple(
        _caption(name, int(colour), float(r), int(bg), rng)
        for name, colour, r, bg in zip(names, colours, radius, backgrounds)
    )
    return ToySplit(split, seed, images, labels, captions, recipe.classnames, backgrounds, colours, radius)


def _concat(parts: list[ToySplit], start: int, stop: int) -> ToySplit:
    """Items ``[start, stop)`` of the concatenation of consecutive chunks of one stream."""
    first = parts[0]

    def cat(field: str) -> np.ndarray:
        return np.concatenate([getattr(part, field) for part in parts])[start:stop]

    captions = tuple(caption for part in parts for caption in part.captions)[start:stop]
    return ToySplit(
        first.split, first.seed, cat("images"), cat("labels"), captions, first.classnames,
        cat("backgrounds"), cat("colours"), cat("radii"),
    )


def stream_window(split: str, seed: int, start: int, stop: int) -> ToySplit:
    """Items ``[start, stop)`` of the fixed stream ``(split, seed)``; disjoint windows never overlap."""
    if split not in RECIPES:
        raise ValueError(f"unknown toy split {split!r}; known: {', '.join(SPLITS)}")
    if not 0 <= start < stop:
        raise ValueError(f"bad window [{start}, {stop}): need 0 <= start < stop")
    first, last = start // CHUNK, (stop - 1) // CHUNK
    parts = [rendered_chunk(split, seed, chunk) for chunk in range(first, last + 1)]
    return _concat(parts, start - first * CHUNK, stop - first * CHUNK)


def generate(split: str, n: int, seed: int = 0) -> ToySplit:
    """The first ``n`` scenes of split ``split`` (one of :data:`SPLITS`) for ``seed``; pure and seeded."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    return stream_window(split, seed, 0, n)


# -- rendered once: chunks cached in memory (per process) and on disk (per machine) -----------------------
UNCACHED_SPLITS = frozenset({"train"})
"""Splits whose chunks are never cached: the training stream is read once, in order, and is far larger than the
evaluation and proxy splits."""
MEMORY_CHUNKS = 96
"""Chunks kept in memory (about 0.8 MB of pixels each): every evaluation split of a 1,000-image toy run and a proxy
window several times over."""
CHUNK_FORMAT = "qbench-toyworld-chunk-v1"
CHUNK_FIELDS = ("images", "labels", "backgrounds", "colours", "radii")
CACHE_ENV = "QBENCH_CACHE"  # the same root as the feature cache (qbench.engine.features.CACHE_ENV)

_memory: "OrderedDict[tuple[str, int, int], ToySplit]" = OrderedDict()
_renderer: str | None = None


def renderer_fingerprint() -> str:
    """16 hex of SHA-256 over this module's source and NumPy's version: what a rendered chunk depends on besides
    its key, so the disk cache of an edited renderer (or of another NumPy's random streams) is a different folder."""
    global _renderer
    if _renderer is None:
        digest = hashlib.sha256(Path(__file__).read_bytes())
        digest.update(f"\0numpy {np.__version__}".encode())
        _renderer = digest.hexdigest()[:16]
    return _renderer


def disk_cache_root() -> Path:
    """``<QBENCH_CACHE>/toyworld/<renderer>`` (``$QBENCH_CACHE`` defaults to ``~/.cache/qbench/features``, the
    feature cache's root)."""
    root = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "qbench" / "features")).expanduser()
    return root / "toyworld" / renderer_fingerprint()


def clear_memory_cache() -> None:
    """Forget the chunks held in memory (tests; the disk cache stays)."""
    _memory.clear()


def rendered_chunk(split: str, seed: int, chunk: int) -> ToySplit:
    """Chunk ``chunk`` of the stream ``(split, seed)``: from memory, else from the disk cache, else rendered (and
    then kept in both). Its arrays are read-only; :func:`stream_window` hands out copies."""
    if split in UNCACHED_SPLITS:
        return _render_chunk(split, seed, chunk, CHUNK)
    key = (split, int(seed), int(chunk))
    if key in _memory:
        _memory.move_to_end(key)
        return _memory[key]
    path = disk_cache_root() / f"{split}-{int(seed)}-{int(chunk)}.safetensors"
    rendered = _read_chunk(path, split, int(seed), int(chunk))
    if rendered is None:
        rendered = _render_chunk(split, seed, chunk, CHUNK)
        _write_chunk(path, rendered, int(chunk))
    for name in CHUNK_FIELDS:
        getattr(rendered, name).setflags(write=False)
    _memory[key] = rendered
    while len(_memory) > MEMORY_CHUNKS:
        _memory.popitem(last=False)
    return rendered


def _chunk_key(split: str, seed: int, chunk: int) -> str:
    """What a disk entry is bound to: the renderer, the stream and the chunk index."""
    return f"{renderer_fingerprint()}/{split}/{seed}/{chunk}/{CHUNK}"


def _chunk_digest(arrays: dict[str, np.ndarray], captions: str, key: str) -> str:
    """SHA-256 over the arrays (names, dtypes, shapes, bytes), the captions' JSON and the key."""
    from qbench.engine.integrity import arrays_digest

    return arrays_digest(arrays, bind=f"{CHUNK_FORMAT}\0{key}\0{captions}")


def _write_chunk(path: Path, rendered: ToySplit, chunk: int) -> None:
    """Store a rendered chunk atomically with its key and checksum; a cache that cannot be written is skipped."""
    from safetensors.numpy import save_file

    from qbench.atomic import write_atomic_with

    key = _chunk_key(rendered.split, rendered.seed, chunk)
    arrays = {name: np.ascontiguousarray(getattr(rendered, name)) for name in CHUNK_FIELDS}
    captions = json.dumps(list(rendered.captions), ensure_ascii=True)
    metadata = {"qbench.format": CHUNK_FORMAT, "qbench.key": key, "qbench.captions": captions,
                "qbench.sha256": _chunk_digest(arrays, captions, key)}
    try:
        # staged under the cache root's .partial folder, which evaluations clean of orphans
        write_atomic_with(path, lambda temporary: save_file(arrays, str(temporary), metadata=metadata),
                          root=path.parent.parent.parent, sync_folder=False)
    except OSError:
        return


def _read_chunk(path: Path, split: str, seed: int, chunk: int) -> ToySplit | None:
    """The cached chunk at ``path``, or None when there is none or it is unusable (then removed with a warning)."""
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
        return _discard_chunk(path, f"is unreadable ({type(error).__name__})")
    key = _chunk_key(split, seed, chunk)
    if metadata.get("qbench.format") != CHUNK_FORMAT or metadata.get("qbench.key") != key:
        return _discard_chunk(path, "holds the entry of another key or format")
    captions = metadata.get("qbench.captions", "")
    if sorted(arrays) != sorted(CHUNK_FIELDS) or _chunk_digest(arrays, captions, key) != metadata.get("qbench.sha256"):
        return _discard_chunk(path, "fails its checksum (corrupt or edited)")
    try:
        texts = json.loads(captions)
    except ValueError:
        return _discard_chunk(path, "has unreadable captions")
    if len(texts) != CHUNK or any(len(arrays[name]) != CHUNK for name in CHUNK_FIELDS):
        return _discard_chunk(path, "has the wrong number of images")
    return ToySplit(split, seed, arrays["images"], arrays["labels"], tuple(str(text) for text in texts),
                    RECIPES[split].classnames, arrays["backgrounds"], arrays["colours"], arrays["radii"])


def _discard_chunk(path: Path, reason: str) -> None:
    """Remove a damaged disk entry and say so in one line; the caller renders the chunk again."""
    from qbench.atomic import remove_path
    from qbench.errors import warn

    remove_path(path)
    warn(f"toy-world cache entry {path} {reason}; removed it, rendering the chunk again")
    return None
