"""The torch side of ``q-vlm`` (:mod:`qbench_plugins.quantizers.q_vlm`): the per-position input quantizer,
entropies, the block partition and search, and the visual LayerNorm tuning.

Kept apart from the registration module so that registering the plugin (``qbench list``) does not import torch;
the quantizer imports this module when it builds its input quantizers and refines the calibrated model.
"""

from __future__ import annotations

import statistics
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch import nn

from qbench.quant.blockwise import BlockCall, capture_block_inputs, quantizers_enabled, token_rows
from qbench.quant.fake_quant import fake_quantize
from qbench.quant.instance_groups import valid_positions
from qbench.quant.modules import (
    eval_mode,
    Mode,
    QuantModule,
    TensorQuantizer,
    UncalibratedError,
    is_under,
)
from qbench.quant.observers import select_valid_tokens, text_token_mask, valid_tokens
from qbench.quant.spec import FLOAT_ACTIVATION_BITS
from qbench.quant.structure import transformer_blocks
from qbench.vlm import VLM

if TYPE_CHECKING:
    from qbench_plugins.quantizers.q_vlm import QVLMConfig

Layer = tuple[str, QuantModule]


# -- the per-position activation quantizer ---------------------------------------------------------
@dataclass(frozen=True)
class PerPosition:
    """Granularity descriptor of :class:`PositionQuantizer` (what reports print for it)."""

    per_position: bool

    def __str__(self) -> str:
        return "per_position" if self.per_position else "per_tensor"


class PositionQuantizer(TensorQuantizer):
    """Static asymmetric minmax with one range per token position of a ``(N, T, C)`` input, or per tensor.

    Calibration keeps the running min/max of every position over instances and channels (text: valid
    positions only; a position no calibration caption reaches gets the union of the observed ranges).
    The frozen base range ``[lower, upper]`` is kept; :meth:`set_shrink` scales it by ``c`` (Q-VLM's range
    search) and recomputes ``scale``/``zero_point``. :meth:`group_view` is ``(T, N·C)``: one row per
    position, each sharing one (s, z), so the verifier counts at most 2^b values per position.
    """

    def __init__(self, bits: int, *, per_position: bool = True) -> None:
        super().__init__(bits, symmetric=False, granularity="per_tensor", dynamic=False)
        self.observer = None
        self.granularity = PerPosition(per_position)  # type: ignore[assignment]
        self.per_position = per_position
        self.shrink = 1.0
        self.register_buffer("lower", None)
        self.register_buffer("upper", None)
        self._lo: torch.Tensor | None = None
        self._hi: torch.Tensor | None = None

    def group_view(self, t: torch.Tensor) -> torch.Tensor:
        """``(T, N·C)`` (one row per token position) or ``(1, numel)`` per tensor."""
        if not self.per_position:
            return t.reshape(1, -1)
        if t.dim() != 3:
            raise ValueError(f"a per-position quantizer needs (N, T, C) inputs, got shape {tuple(t.shape)}")
        return t.transpose(0, 1).reshape(t.shape[1], -1)

    def observe(self, x: torch.Tensor) -> None:
        """Fold one calibration batch into the running per-position (or per-tensor) min/max."""
        x = x.detach().float()
        if self.per_position:
            lo, hi = self._position_minmax(x)
        else:
            rows = select_valid_tokens(x)
            lo, hi = rows.amin().reshape(1), rows.amax().reshape(1)
        if self._lo is not None and self._lo.shape != lo.shape:
            raise ValueError(f"per-position quantizer saw {lo.numel()} positions after {self._lo.numel()}")
        self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)

    def _position_minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per position min/max over instances and channels, valid text positions only (others ±inf)."""
        columns = self.group_view(x).reshape(x.shape[1], x.shape[0], -1)
        valid = valid_positions(x)
        if valid is None:
            return columns.amin(dim=(1, 2)), columns.amax(dim=(1, 2))
        keep = valid.t()[..., None]
        lo = torch.where(keep, columns, torch.inf).amin(dim=(1, 2))
        hi = torch.where(keep, columns, -torch.inf).amax(dim=(1, 2))
        return lo, hi

    def freeze(self) -> bool:
        """Fix the base ranges (unobserved positions get the union of the others) at shrink 1."""
        self.mode = Mode.QUANTIZE
        if self._lo is None:
            return self.scale is not None
        lo, hi = self._lo, self._hi
        seen = torch.isfinite(lo) & torch.isfinite(hi)
        if not seen.any():
            return self.scale is not None
        lo = torch.where(seen, lo, lo[seen].min())
        hi = torch.where(seen, hi, hi[seen].max())
        self.lower, self.upper = lo, hi
        self._lo = self._hi = None
        self.set_shrink(1.0)
        return True

    def set_shrink(self, factor: float) -> None:
        """Use the range ``factor · [lower, upper]`` (per position)."""
        if self.lower is None:
            raise UncalibratedError(f"static {self.extra_repr()} quantizer has no range to shrink")
        self.shrink = float(factor)
        self.scale, self.zero_point = self.fmt.qparams(self.lower * factor, self.upper * factor)

    def qparams_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scale is None:
            raise UncalibratedError(f"static {self.extra_repr()} quantizer used before calibration")
        return self.scale, self.zero_point

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self.qparams_for(x)
        if self.per_position:
            if x.dim() != 3 or x.shape[1] != scale.numel():
                raise ValueError(
                    f"per-position quantizer calibrated for {scale.numel()} positions got shape {tuple(x.shape)}"
                )
            shape = (1, -1, 1)
        else:
            shape = (1,) * x.dim()
        return fake_quantize(x, scale.reshape(shape), zero_point.reshape(shape), self.fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is Mode.QUANTIZE:
            return self.quantize(x)
        if self.mode is Mode.CALIBRATE:
            self.observe(x)
        return x

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "bits": self.bits,
            "format": str(self.fmt),
            "granularity": str(self.granularity),
            "dynamic": False,
            "observer": "minmax",
            "shrink": self.shrink,
        }
        if self.lower is not None:
            info["positions"] = int(self.lower.numel())
        return info

    def extra_repr(self) -> str:
        return f"{self.fmt}, {self.granularity}, static, shrink={self.shrink}, mode={self.mode.value}"


# -- entropy ---------------------------------------------------------------------------------------
def token_entropy(
    x: torch.Tensor, valid: torch.Tensor | None = None, channels_first: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ H, count)`` over the (instance, channel) columns of ``x`` whose mass Σ_t |x| is nonzero.

    ``H = −Σ_t p_t log p_t`` with ``p = |x| / Σ_t |x|`` along tokens: dim 1 of ``(N, T, C)`` (Linear inputs)
    or the spatial positions of ``(N, C, H, W)`` (``channels_first``). ``valid`` (``(N, T)``) restricts the
    tokens to valid text positions. All-zero columns have no distribution and are left out. Differentiable
    (Q-VLM's step 4 back-propagates it).
    """
    a = x.abs().float()
    if channels_first:
        columns = a.reshape(a.shape[0], a.shape[1], -1)
    else:
        columns = a.reshape(a.shape[0], -1, a.shape[-1]).transpose(1, 2)
        if valid is not None:
            columns = columns * valid.reshape(a.shape[0], 1, -1).to(columns.dtype)
    mass = columns.sum(dim=-1, keepdim=True)
    p = columns / mass.clamp_min(1e-30)
    h = -(p * p.clamp_min(1e-30).log()).sum(dim=-1)
    counted = mass.squeeze(-1) > 0
    return (h * counted).sum(), counted.sum()


@contextmanager
def entropy_hooks(layers: Sequence[Layer]) -> Iterator[dict[str, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """While active, every forward of a layer appends ``token_entropy`` of its consumed input to a list.

    The consumed input is the act quantizer's output (or the raw input when activations stay float).
    Text positions are masked when a :func:`~qbench.quant.observers.valid_tokens` mask is active.
    """
    records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name, _ in layers}

    def record(name: str, x: torch.Tensor, channels_first: bool) -> None:
        valid = None if channels_first else valid_positions(x)
        records[name].append(token_entropy(x, valid, channels_first))

    with ExitStack() as stack:
        for name, module in layers:
            channels_first = isinstance(module, nn.Conv2d)
            if module.act_quantizer is not None:
                hook = module.act_quantizer.register_forward_hook(
                    lambda m, args, out, name=name, cf=channels_first: record(name, out, cf)
                )
            else:
                hook = module.register_forward_pre_hook(
                    lambda m, args, name=name, cf=channels_first: record(name, args[0], cf)
                )
            stack.callback(hook.remove)
        yield records


def _layer_means(records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Per layer ``Σ H / count`` over every recorded call (0 when nothing was counted)."""
    means = {}
    for name, calls in records.items():
        total = sum(h for h, _ in calls)
        count = sum(c for _, c in calls)
        means[name] = total / count.clamp_min(1) if calls else torch.tensor(0.0)
    return means


@torch.no_grad()
def layer_entropies(
    vlm: VLM, layers: Sequence[Layer], inputs: dict[str, torch.Tensor], batch_size: int
) -> dict[str, float]:
    """``H_l`` of every layer of one tower on the calibration inputs, quantizers as they stand."""
    with entropy_hooks(layers) as records:
        for run in _tower_batches(vlm, inputs, batch_size):
            run()
    return {name: float(value) for name, value in _layer_means(records).items()}


def _tower_batches(vlm: VLM, inputs: dict[str, torch.Tensor], batch_size: int) -> Iterator[Callable[[], torch.Tensor]]:
    """One callable per batch that encodes it (text: under its valid-position mask)."""
    if "images" in inputs:
        for batch in inputs["images"].split(batch_size):
            yield lambda batch=batch: vlm.encode_image(batch)
        return
    for batch in inputs["tokens"].split(batch_size):

        def run(batch: torch.Tensor = batch) -> torch.Tensor:
            with valid_tokens(text_token_mask(batch).to(vlm.device)):
                return vlm.encode_text(batch)

        yield run


# -- partition -------------------------------------------------------------------------------------
def entropy_partition(names: Sequence[str], entropies: dict[str, float], max_block_layers: int = 3) -> list[list[str]]:
    """Consecutive blocks of ``names`` (forward order): a block closes after layer l when ``H_l < τ``,
    τ = median of the given entropies (weak dependency on what follows), or when it holds
    ``max_block_layers`` layers. Every name lands in exactly one block; deterministic."""
    if max_block_layers < 1:
        raise ValueError(f"max_block_layers must be >= 1, got {max_block_layers}")
    if not names:
        return []
    tau = statistics.median(entropies[name] for name in names)
    blocks: list[list[str]] = [[]]
    for name in names:
        blocks[-1].append(name)
        if entropies[name] < tau or len(blocks[-1]) >= max_block_layers:
            blocks.append([])
    return [block for block in blocks if block]


# -- block search ----------------------------------------------------------------------------------
def shrink_grid(shrink_min: float, shrink_step: float) -> tuple[float, ...]:
    """``(1.0, 1 − step, …)`` down to ``shrink_min`` inclusive (official grid: 1.0 … 0.4 by 0.1)."""
    count = int((1.0 - shrink_min) / shrink_step + 1e-9) + 1
    return tuple(round(1.0 - i * shrink_step, 6) for i in range(count))


class TowerRunner:
    """Runs a stretch of one tower on the calibration inputs: from the stem (raw inputs) or from the
    captured input of a residual block, up to the output of a later residual block.

    Units: ``-1`` = the stem (everything before the first residual block, e.g. the patch embedding),
    ``0 … B−1`` the residual blocks, ``B`` the tail (after the last block; its output is the tower's
    embedding, computed by a full forward). :meth:`entry_calls` caches the input of a block in the model
    as it stands and advances the cache by replaying blocks, which is valid because blocks are searched
    in forward order (everything before the cached block is final).
    """

    def __init__(self, vlm: VLM, blocks: Sequence[nn.Module], inputs: dict[str, torch.Tensor], batch_size: int) -> None:
        self.vlm, self.blocks, self.inputs, self.batch_size = vlm, list(blocks), inputs, batch_size
        self._cached: tuple[int, list[BlockCall]] | None = None

    @property
    def tail(self) -> int:
        return len(self.blocks)

    def entry_calls(self, unit: int) -> list[BlockCall] | None:
        """Captured inputs of block ``unit`` (None for the stem and the tail, which start from raw inputs)."""
        if unit < 0 or unit >= self.tail:
            return None
        if self._cached is not None and 0 <= self._cached[0] <= unit:
            start, calls = self._cached
            calls = self._replay(calls, start, unit - 1) if start < unit else calls
        else:
            calls = capture_block_inputs(self.vlm, self.blocks[unit], batch_size=self.batch_size, **self.inputs)
        self._cached = (unit, calls)
        return calls

    @torch.no_grad()
    def _replay(self, calls: list[BlockCall], first: int, last: int) -> list[BlockCall]:
        """The calls after running blocks ``first … last`` on ``calls`` (each block's output feeds the next)."""
        for index in range(first, last + 1):
            calls = [call.with_x(self.blocks[index](*call.args, **call.kwargs)) for call in calls]
        return calls

    @torch.no_grad()
    def outputs(self, first: int, last: int, calls: list[BlockCall] | None) -> tuple[list[torch.Tensor], list]:
        """Per-batch outputs of units ``first … last`` (with their valid masks), quantizers as they stand."""
        if last >= self.tail or not self.blocks:
            batches = list(_tower_batches(self.vlm, self.inputs, self.batch_size))
            return [run() for run in batches], [None] * len(batches)
        if calls is None:  # the stretch starts in the stem: run it from raw inputs up to block 0
            calls = capture_block_inputs(self.vlm, self.blocks[0], batch_size=self.batch_size, **self.inputs)
            first = 0
        calls = self._replay(calls, first, last) if last >= first else calls
        return [call.x for call in calls], [call.valid for call in calls]


def block_mse(outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], valid: Sequence) -> float:
    """Mean squared error over the valid rows of every batch (float64)."""
    total, count = 0.0, 0
    for output, target, mask in zip(outputs, targets, valid, strict=True):
        diff = output.double() - target.double()
        rows = token_rows(diff, mask) if diff.dim() > 2 else diff
        total += float(rows.pow(2).sum())
        count += rows.numel()
    return total / max(count, 1)


def search_block(
    quantizers: Sequence[PositionQuantizer], evaluate: Callable[[], float], grid: Sequence[float], sweeps: int
) -> tuple[list[float], float, float]:
    """Coordinate search of one shrink factor per quantizer; returns (factors, error at c = 1, final error).

    Starts from c = 1 everywhere; a candidate replaces the current factor only if it strictly lowers the
    error, and the grid contains the current value, so the final error never exceeds the error at c = 1.
    ``evaluate`` is deterministic, so a configuration already evaluated is not run again and a sweep that
    changes nothing ends the search (both exact shortcuts: later sweeps would repeat it).
    """
    errors: dict[tuple[float, ...], float] = {}

    def error_at(factors: list[float]) -> float:
        key = tuple(factors)
        if key not in errors:
            for quantizer, factor in zip(quantizers, factors):
                quantizer.set_shrink(factor)
            errors[key] = evaluate()
        return errors[key]

    current = [1.0] * len(quantizers)
    start = best = error_at(current)
    for _ in range(sweeps):
        changed = False
        for index in range(len(quantizers)):
            for factor in grid:
                trial = current[:index] + [factor] + current[index + 1 :]
                error = error_at(trial)
                if error < best:
                    best, current, changed = error, trial, True
        if not changed:
            break
    for quantizer, factor in zip(quantizers, current):
        quantizer.set_shrink(factor)
    return current, start, best


def _set_modes(layers: Sequence[Layer], mode: Mode) -> None:
    for _, module in layers:
        for _, quantizer in module.quantizers():
            quantizer.set_mode(mode)


def _unit_of_layers(layers: Sequence[Layer], block_names: Sequence[str]) -> dict[str, int]:
    """Residual-block index of every layer; layers outside blocks: −1 before the first block, B after."""
    tail = len(block_names)
    units: dict[str, int] = {}
    seen_block = False
    for name, _ in layers:
        index = next((i for i, block in enumerate(block_names) if is_under(name, [block])), None)
        if index is not None:
            seen_block = True
            units[name] = index
        else:
            units[name] = tail if seen_block or not block_names else -1
    return units


def search_tower(
    vlm: VLM,
    tower: str,
    layers: Sequence[Layer],
    partition: Sequence[Sequence[str]],
    inputs: dict[str, torch.Tensor],
    config: "QVLMConfig",
) -> dict[str, Any]:
    """Step 3 on one tower: search every block of ``partition`` in forward order.

    During a block's search the layers of earlier blocks and of this block are quantized, later layers
    float; the target is the same stretch run fully float on the same (quantized-prefix) input. Leaves
    every layer quantized. Returns the chosen factors and the per-block MSE at c = 1 and after search.
    """
    blocks = transformer_blocks(vlm, [tower])
    runner = TowerRunner(vlm, [block.module for block in blocks], inputs, config.batch_size)
    units = _unit_of_layers(layers, [block.name for block in blocks])
    by_name = dict(layers)
    grid = shrink_grid(config.shrink_min, config.shrink_step)
    factors: dict[str, float] = {}
    reports = []
    done: list[Layer] = []
    for names in partition:
        group = [(name, by_name[name]) for name in names]
        quantizers = [m.act_quantizer for _, m in group if isinstance(m.act_quantizer, PositionQuantizer)]
        later = [layer for layer in layers if layer[0] not in factors and layer[0] not in names]
        _set_modes(done + group, Mode.QUANTIZE)
        _set_modes(later, Mode.OFF)
        first, last = units[names[0]], units[names[-1]]
        calls = runner.entry_calls(first)
        with quantizers_enabled(vlm.model, False):
            targets, valid = runner.outputs(first, last, calls)

        def evaluate() -> float:
            return block_mse(runner.outputs(first, last, calls)[0], targets, valid)

        before, after = search_block(quantizers, evaluate, grid, config.sweeps)[1:] if quantizers else (0.0, 0.0)
        for name, _ in group:
            factors[name] = by_name[name].act_quantizer.shrink if quantizers else 1.0
        reports.append({"layers": list(names), "units": [first, last], "mse_at_1": before, "mse": after})
        done += group
    _set_modes(layers, Mode.QUANTIZE)
    return {"shrink": factors, "blocks": reports, "residual_blocks": len(blocks)}


# -- visual LayerNorm tuning -----------------------------------------------------------------------
def visual_layernorms(vlm: VLM) -> list[tuple[str, nn.LayerNorm]]:
    """Every LayerNorm of the image tower (heads excluded), in module order."""
    return [
        (name, module)
        for name, module in vlm.model.named_modules()
        if isinstance(module, nn.LayerNorm) and vlm.tower_of(name) == "visual" and not is_under(name, vlm.head_modules)
    ]


def tune_visual_layernorms(
    vlm: VLM, layers: Sequence[Layer], images: torch.Tensor, config: "QVLMConfig", seed: int
) -> dict[str, Any]:
    """Step 4: AdamW on the visual LayerNorm affine parameters only, quantizers frozen (STE).

    Loss ``L_feat + λ_H · mean_l H_l`` on batches of ``batch_size`` images drawn from seeded reshuffles of
    ``images``; the target is the float model *before* tuning (embeddings computed once with every
    quantizer off). Every other parameter keeps its value and its ``requires_grad`` flag. Returns the
    mean entropy over the layers on all images before and after (same quantizer state) and the losses.
    """
    norms = visual_layernorms(vlm)
    params = [param for _, norm in norms for param in (norm.weight, norm.bias) if param is not None]
    inputs = {"images": images}
    entropy_before = _mean(layer_entropies(vlm, layers, inputs, config.batch_size))
    if not params or config.ln_steps == 0:
        return {"steps": 0, "parameters": sum(p.numel() for p in params), "entropy_mean_before": entropy_before,
                "entropy_mean_after": entropy_before}
    with torch.no_grad(), quantizers_enabled(vlm.model, False):
        teacher = torch.cat([vlm.encode_image(batch) for batch in images.split(config.batch_size)])
    losses = _train_norms(vlm, layers, params, images, teacher, config, seed)
    entropy_after = _mean(layer_entropies(vlm, layers, inputs, config.batch_size))
    return {
        "steps": config.ln_steps,
        "parameters": sum(p.numel() for p in params),
        "norms": [name for name, _ in norms],
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "entropy_mean_before": entropy_before,
        "entropy_mean_after": entropy_after,
    }


def _train_norms(
    vlm: VLM,
    layers: Sequence[Layer],
    params: Sequence[nn.Parameter],
    images: torch.Tensor,
    teacher: torch.Tensor,
    config: "QVLMConfig",
    seed: int,
) -> list[float]:
    """The AdamW loop; returns the loss of every step."""
    flags = {id(p): p.requires_grad for p in vlm.parameters()}
    for param in vlm.parameters():
        param.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.ln_lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    batches = _batch_indices(len(images), config.batch_size, config.ln_steps, seed)
    losses = []
    try:
        with eval_mode(vlm):
            for index in batches:
                with entropy_hooks(layers) as records:
                    embedding = vlm.encode_image(images[index])
                target = teacher[index.to(teacher.device)]
                feat = (embedding - target).pow(2).sum(dim=-1).mean()
                entropy = torch.stack(list(_layer_means(records).values())).mean()
                loss = feat + config.entropy_weight * entropy
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
    finally:
        for param in vlm.parameters():
            param.requires_grad_(flags[id(param)])
            param.grad = None
    return losses


def _batch_indices(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """``steps`` batches of indices from seeded reshuffled passes over ``range(n)``."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    batches = []
    size = min(batch_size, n)
    for _ in range(steps):
        if order.numel() < size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        batches.append(order[:size])
        order = order[size:]
    return batches


def _mean(values: dict[str, float]) -> float:
    return float(sum(values.values()) / len(values)) if values else 0.0


def _input_quantizer(module: nn.Module, act_bits: int) -> PositionQuantizer | None:
    """Per-position for Linear inputs, per-tensor for conv inputs (no token axis); None at 16 bits."""
    if act_bits >= FLOAT_ACTIVATION_BITS:
        return None
    return PositionQuantizer(act_bits, per_position=not isinstance(module, nn.Conv2d))


@torch.no_grad()
def forward_order(
    vlm: VLM, tower: str, wrapped: dict[str, QuantModule], inputs: dict[str, torch.Tensor]
) -> list[Layer]:
    """The quantized layers of ``tower`` in the order they first run (one sample is enough)."""
    order: list[str] = []
    members = {name: module for name, module in wrapped.items() if vlm.tower_of(name) == tower}
    with ExitStack() as stack:
        for name, module in members.items():
            hook = module.register_forward_pre_hook(
                lambda m, args, name=name: order.append(name) if name not in order else None
            )
            stack.callback(hook.remove)
        sample = {key: value[:1] for key, value in inputs.items()}
        next(_tower_batches(vlm, sample, 1))()
    return [(name, members[name]) for name in order]


def partition_and_search(
    vlm: VLM,
    tower: str,
    layers: Sequence[Layer],
    inputs: dict[str, torch.Tensor],
    config: QVLMConfig,
    reset: bool = False,
) -> dict[str, Any]:
    """Steps 1 (entropies, at c = 1), 2 (partition) and 3 (block search) on one tower."""
    quantizers = [module.act_quantizer for _, module in layers if isinstance(module.act_quantizer, PositionQuantizer)]
    if reset:
        for quantizer in quantizers:
            quantizer.set_shrink(1.0)
    entropies = layer_entropies(vlm, layers, inputs, config.batch_size)
    names = [name for name, _ in layers]
    partition = entropy_partition(names, entropies, config.max_block_layers)
    report: dict[str, Any] = {
        "entropy": entropies,
        "entropy_mean": _mean(entropies),
        "tau": statistics.median(entropies.values()) if entropies else None,
        "partition": partition,
    }
    if quantizers:
        report.update(search_tower(vlm, tower, layers, partition, inputs, config))
    else:
        report["search"] = "activations stay float: no ranges to search"
    return report
