"""Dynamic instance-aware group quantization of activations (IGQ-ViT, ``quantizers.md`` §1.3 and §2.3).

An activation tensor is viewed, per *input instance* (batch element), as ``R`` *units* of ``E`` elements:

* ``channels_last`` (Linear inputs ``(N, ..., C)``): a unit is a channel, its elements the tokens;
* ``channels_first`` (Conv2d inputs ``(N, C, H, W)``): a unit is a channel, its elements the spatial
  positions;
* ``rows`` (post-softmax attention ``(N, heads, L, S)``): a unit is one attention row (a query of one
  head), its elements the ``S`` keys.

Calibration collects one point per (instance, unit): ``(m, M)`` = the unit's min and max over its elements
for channels, the row maximum ``M`` for rows. Lloyd's k-means (k = G, initialised at quantiles of ``M``)
turns those points into G centroids, which are the G *static* quantizer ranges ``(l_g, u_g)`` (``l_g = 0``
for rows: softmax outputs are non-negative, so their quantizers are unsigned ``[0, u_g]``). At run time the
*assignment* is dynamic: for every instance, unit ``r`` goes to ``argmin_g (m_r − l_g)² + (M_r − u_g)²``
(rows: ``(M_r − u_g)²``) and is fake-quantized with group g's asymmetric quantizer.

With G = 1 every unit uses the single centroid, so the quantizer reduces to *static per-tensor asymmetric*
quantization with the range ``(mean m, mean M)`` over all calibration (instance, unit) points — not to
per-instance min/max: IGQ's ranges are calibrated, only the grouping is dynamic.

Method: J. Moon, D. Kim, J. Cheon, B. Ham, "Instance-Aware Group Quantization for Vision Transformers",
CVPR 2024, arXiv:2404.00928. The assignment distance and the k-means initialisation are ``quantizers.md``'s
reading of the paper (no public code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qbench.quant.fake_quant import fake_quantize
from qbench.quant.modules import Mode, TensorQuantizer, UncalibratedError
from qbench.quant.observers import select_valid_tokens

LAYOUTS = ("channels_last", "channels_first", "rows")


# -- valid text positions --------------------------------------------------------------------------
def valid_positions(x: torch.Tensor) -> torch.Tensor | None:
    """Bool mask of shape ``x.shape[:-1]``: which rows of ``x`` are valid text positions, or None.

    None when no :func:`qbench.quant.observers.valid_tokens` mask is active or it does not fit ``x``.
    Uses only the public :func:`~qbench.quant.observers.select_valid_tokens`: a tensor of flat row
    indices shaped like ``x``'s rows goes through it, and the indices that come back are the valid rows.
    Unlike ``select_valid_tokens`` itself this keeps which instance (and position) each row belongs to.
    """
    if x.dim() < 3:
        return None
    rows = x.shape[:-1]
    ids = torch.arange(rows.numel(), device=x.device).reshape(*rows, 1)
    kept = select_valid_tokens(ids)
    if kept.shape == ids.shape:
        return None
    mask = torch.zeros(rows.numel(), dtype=torch.bool, device=x.device)
    mask[kept.reshape(-1)] = True
    return mask.reshape(rows)


# -- k-means ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KMeansResult:
    """Centroids ``(k, D)``, the final assignment of every point, and the assignment cost
    ``Σ_points min_g ‖p − c_g‖²`` at the initial and at the final centroids."""

    centroids: torch.Tensor
    assignment: torch.Tensor
    init_cost: float
    cost: float


def nearest_centroid(points: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and squared distance to the nearest centroid for each point (``(..., D)`` vs ``(k, D)``).

    Ties go to the lowest index, so the assignment is deterministic.
    """
    distances = (points.unsqueeze(-2) - centroids).pow(2).sum(dim=-1)
    best, index = distances.min(dim=-1)
    return index, best


def quantile_init(points: torch.Tensor, k: int, key_dim: int) -> torch.Tensor:
    """k initial centroids: the points at the quantiles ``(g + ½)/k`` of coordinate ``key_dim`` (the max M).

    Spreading the seeds over the range of M lets outlier channels get their own cluster early.
    """
    order = points[:, key_dim].argsort(stable=True)
    ranks = ((torch.arange(k, dtype=torch.float64) + 0.5) / k * (points.shape[0] - 1)).round().long()
    return points[order[ranks.to(order.device)]].clone()


def kmeans(points: torch.Tensor, k: int, iters: int = 20, key_dim: int = -1) -> KMeansResult:
    """Lloyd's k-means on ``points`` ``(P, D)`` with quantile initialisation (:func:`quantile_init`).

    Each iteration assigns every point to its nearest centroid and moves each centroid to the mean of its
    points; a centroid that loses all its points stays where it is. Deterministic; computed in float64.
    """
    if points.dim() != 2 or points.shape[0] == 0:
        raise ValueError(f"kmeans needs a non-empty (P, D) tensor, got shape {tuple(points.shape)}")
    if k < 1 or iters < 0:
        raise ValueError(f"kmeans needs k >= 1 and iters >= 0, got k={k}, iters={iters}")
    points = points.double()
    centroids = quantile_init(points, k, key_dim % points.shape[1])
    assignment, distance = nearest_centroid(points, centroids)
    init_cost = float(distance.sum())
    for _ in range(iters):
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=k).to(points.dtype)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        assignment, distance = nearest_centroid(points, centroids)
    return KMeansResult(centroids.float(), assignment, init_cost, float(distance.sum()))


# -- the quantizer ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class InstanceGroups:
    """Granularity descriptor of :class:`InstanceGroupQuantizer` (what reports print for it)."""

    n_groups: int
    layout: str

    def __str__(self) -> str:
        unit = "row" if self.layout == "rows" else "channel"
        return f"instance-{unit}-groups-{self.n_groups}"


class InstanceGroupQuantizer(TensorQuantizer):
    """IGQ-ViT activation quantizer: G static asymmetric ranges, channels (or rows) assigned per instance.

    ``layout`` says what a unit is (module docstring). Lifecycle as :class:`TensorQuantizer`: in
    ``calibrate`` mode it records the (instance, unit) points (text: valid positions only) and passes float
    through; :meth:`freeze` runs k-means and fixes ``lower``/``upper`` (the centroids, ``(G,)``) and the
    ``scale``/``zero_point`` of each group. In ``quantize`` mode every call assigns units to groups from
    that input's own statistics.

    For the verifier, :meth:`group_view` returns one row per (instance, group) of the *last* quantized
    input — every element of a row shares one (s, z), so a row holds at most 2^b values. The view pads
    short rows by repeating one of the row's own elements (no new value); an empty group repeats a single
    element.
    """

    def __init__(self, bits: int, n_groups: int = 8, *, layout: str = "channels_last", kmeans_iters: int = 20) -> None:
        super().__init__(bits, symmetric=False, granularity="per_tensor", dynamic=False)
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        self.observer = None
        self.granularity = InstanceGroups(n_groups, layout)  # type: ignore[assignment]
        self.n_groups, self.layout, self.kmeans_iters = n_groups, layout, kmeans_iters
        self.register_buffer("lower", None)
        self.register_buffer("upper", None)
        self._points: list[torch.Tensor] = []
        self._last: tuple[torch.Size, torch.Tensor] | None = None
        self.kmeans_cost: tuple[float, float] | None = None

    @property
    def point_dims(self) -> int:
        """2 for channels (m, M), 1 for attention rows (M only, l = 0)."""
        return 1 if self.layout == "rows" else 2

    # -- units -------------------------------------------------------------------------------------
    def units(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``(N, R, E)``: instances, units, elements of a unit."""
        n = x.shape[0]
        if self.layout == "channels_last":
            return x.reshape(n, -1, x.shape[-1]).transpose(1, 2)
        if self.layout == "channels_first":
            return x.reshape(n, x.shape[1], -1)
        return x.reshape(n, -1, x.shape[-1])

    def unit_stats(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, R, D)`` points: (min, max) per unit for channels, (max,) per row.

        ``valid`` (shape ``x.shape[:-1]``, channels_last and rows only) excludes invalid text positions:
        for channels they are left out of the min/max; for rows the caller drops invalid rows.
        """
        x = x.detach().float()
        if self.layout == "rows":
            return x.amax(dim=-1).reshape(x.shape[0], -1, 1)
        units = self.units(x)
        if valid is not None and self.layout == "channels_last":
            keep = valid.reshape(x.shape[0], 1, -1)
            lo = torch.where(keep, units, torch.inf).amin(dim=-1)
            hi = torch.where(keep, units, -torch.inf).amax(dim=-1)
            return torch.stack([lo, hi], dim=-1)
        return torch.stack([units.amin(dim=-1), units.amax(dim=-1)], dim=-1)

    def centroids(self) -> torch.Tensor:
        """``(G, D)`` centroids in the space of :meth:`unit_stats`."""
        if self.upper is None:
            raise UncalibratedError(f"{self.extra_repr()} quantizer used before calibration")
        return self.upper[:, None] if self.layout == "rows" else torch.stack([self.lower, self.upper], dim=-1)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, R)`` group index of every unit of every instance of ``x`` (nearest centroid)."""
        return nearest_centroid(self.unit_stats(x), self.centroids().to(x.device))[0]

    # -- lifecycle -----------------------------------------------------------------------------------
    def observe(self, x: torch.Tensor) -> None:
        """Record the (instance, unit) points of one calibration batch (valid text positions only)."""
        valid = valid_positions(x)
        stats = self.unit_stats(x, valid)
        if self.layout == "rows" and valid is not None:
            points = stats.reshape(-1, 1)[valid.reshape(-1)]
        else:
            points = stats.reshape(-1, self.point_dims)
        self._points.append(points)

    def freeze(self) -> bool:
        """k-means on all recorded points; the centroids become the G ranges. False if it saw no data."""
        self.mode = Mode.QUANTIZE
        if not self._points:
            return self.scale is not None
        points = torch.cat(self._points)
        self._points = []
        result = kmeans(points, self.n_groups, self.kmeans_iters)
        centroids = result.centroids.to(points.device)
        upper = centroids[:, -1]
        lower = torch.zeros_like(upper) if self.layout == "rows" else centroids[:, 0]
        self.lower, self.upper = lower, upper
        self.scale, self.zero_point = self.fmt.qparams(lower, upper)
        self.kmeans_cost = (result.init_cost, result.cost)
        return True

    # -- forward ---------------------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Assign units to groups for this input, then fake-quantize each with its group's (s, z)."""
        if self.scale is None:
            raise UncalibratedError(f"{self.extra_repr()} quantizer used before calibration")
        assignment = self.assign(x)
        self._last = (x.shape, assignment)
        shape = self._broadcast_shape(x)
        scale = self.scale.to(x.device)[assignment].reshape(shape)
        zero_point = self.zero_point.to(x.device)[assignment].reshape(shape)
        return fake_quantize(x, scale, zero_point, self.fmt)

    def _broadcast_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """Shape under which an ``(N, R)`` per-unit tensor broadcasts against ``x``."""
        if self.layout == "channels_last":
            return (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        if self.layout == "channels_first":
            return (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        return tuple(x.shape[:-1]) + (1,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is Mode.QUANTIZE:
            return self.quantize(x)
        if self.mode is Mode.CALIBRATE:
            self.observe(x)
        return x

    def qparams_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-unit (s, z) for ``x``, shaped ``(N, R)``."""
        if self.scale is None:
            raise UncalibratedError(f"{self.extra_repr()} quantizer used before calibration")
        assignment = self.assign(x)
        return self.scale.to(x.device)[assignment], self.zero_point.to(x.device)[assignment]

    # -- verification and provenance -----------------------------------------------------------------
    def group_view(self, t: torch.Tensor) -> torch.Tensor:
        """``(N·G, n)``: one row per (instance, group) of the last quantized input (``t`` is that output)."""
        if self._last is None or self._last[0] != t.shape:
            raise RuntimeError(
                "InstanceGroupQuantizer.group_view needs the output of this quantizer's last quantize call "
                f"(got shape {tuple(t.shape)}); the grouping is per input"
            )
        return grouped_rows(self.units(t), self._last[1].to(t.device), self.n_groups)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "bits": self.bits,
            "format": str(self.fmt),
            "granularity": str(self.granularity),
            "dynamic": "assignment per instance; ranges static (k-means centroids)",
            "groups": self.n_groups,
            "kmeans_iters": self.kmeans_iters,
        }
        if self.upper is not None:
            info["lower"] = [round(float(v), 6) for v in self.lower]
            info["upper"] = [round(float(v), 6) for v in self.upper]
        if self.kmeans_cost is not None:
            info["kmeans_cost_init"], info["kmeans_cost"] = self.kmeans_cost
        return info

    def extra_repr(self) -> str:
        return f"{self.fmt}, {self.granularity}, mode={self.mode.value}"


def grouped_rows(units: torch.Tensor, assignment: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``(N, R, E)`` units and their ``(N, R)`` groups as ``(N·G, n)`` rows, one per (instance, group).

    Units are sorted by group within each instance (stable), so each (instance, group) is a contiguous run
    of the flattened instance; rows shorter than the longest are padded by repeating their last element.
    """
    n, r, e = units.shape
    order = assignment.argsort(dim=1, stable=True)
    flat = units.gather(1, order[..., None].expand(n, r, e)).reshape(n, r * e)
    lengths = torch.nn.functional.one_hot(assignment, n_groups).sum(dim=1) * e
    starts = lengths.cumsum(dim=1) - lengths
    width = max(int(lengths.max()), 1)
    offsets = torch.minimum(torch.arange(width, device=units.device), (lengths[..., None] - 1).clamp(min=0))
    index = (starts[..., None] + offsets).clamp(max=r * e - 1).reshape(n, -1)
    return flat.gather(1, index).reshape(n * n_groups, width)
