"""The export plan: qbench's own integers, scales and zero points, layer by layer, and what cannot be exported.

Why a plan. A deployed engine must run *the* quantized model qbench measured, not a re-calibrated cousin: every
weight integer, every static activation scale and zero point comes from the frozen fake quantizers, and is checked
here to reproduce them bit for bit before any engine sees it (:func:`plan_export`):

* a weight's integers ``q = clamp(round(W/s) + z, q_min, q_max)`` must give back the fake-quantized weight exactly,
  ``s·(q − z) == Q_w(W)``;
* an activation quantizer must equal the affine formula with the extracted (s, z) (static) or with per-group
  min/max (s, z) (dynamic) on probe inputs that cover its grid and beyond (:func:`affine_spec`).

A quantizer that fails either check, or that no integer engine runs (attention-map, softmax or per-instance-group
quantizers, learned non-integer zero points, a Linear subclass that computes more than ``Q_a(x)·Q_w(W)ᵀ``), makes
the model *not exportable* with its reason (:attr:`ExportPlan.problems`): an engine never approximates it. Two
things are run by the engine in float and listed, never hidden: fixed float maps (QuaRot's rotations and online
Hadamards, :attr:`ExportPlan.float_ops`) and a quantized convolution that is not a patch embedding or whose input
quantizer is not per tensor (:attr:`ExportPlan.simulated`: the same fake quantization in float, so exact, but not
on integer kernels). Methods whose float transforms are folded into weights (SmoothQuant, QuaRot's fused
rotations, Outlier Suppression, logit tuning) need nothing here: the folded weights are the model.

Affine quantization as in B. Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018, arXiv:1712.05877 (integer GEMM with per-layer (s, z)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from qbench.quant.fake_quant import Granularity, QuantFormat
from qbench.quant.modules import Mode, QuantConv2d, QuantLinear, QuantModule, TensorQuantizer

INT8_RANGE = (-128, 127)
UINT8_RANGE = (0, 255)
PROBE_SEED = 20261207
"""Seed of the probe inputs an activation quantizer must reproduce (fixed: a plan is deterministic)."""


@dataclass(frozen=True)
class AffineSpec:
    """One quantizer as an affine integer grid, ``x̂ = s·(clamp(round(x/s) + z, q_min, q_max) − z)``.

    ``granularity`` is ``per_tensor``, ``per_channel`` (dim 0 of a weight) or ``per_token`` (rows of the last
    dimension). Static specs carry ``scale`` and ``zero_point`` (float32, one per group, integer-valued zero
    points); dynamic specs compute them per input from each group's min and max with
    :meth:`qbench.quant.fake_quant.QuantFormat.qparams` (``scale``/``zero_point`` None).
    """

    bits: int
    qmin: int
    qmax: int
    symmetric: bool
    granularity: str
    dynamic: bool
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None

    @property
    def fits_int8(self) -> bool:
        """Whether every code fits an int8 after the shift :meth:`int8_shift` (any grid of at most 8 bits)."""
        return self.qmax - self.qmin <= 255

    @property
    def int8_shift(self) -> int:
        """What to subtract from codes and zero points to store them as int8: 128 for unsigned grids, else 0."""
        return 128 if self.qmin >= 0 else 0

    @property
    def native_int8(self) -> bool:
        """Whether the grid is a full int8/uint8 range, so an engine's own saturation equals qbench's clamp
        (otherwise the engine must clamp the float input to the grid first: :meth:`float_bounds`)."""
        return (self.qmin, self.qmax) in (INT8_RANGE, UINT8_RANGE)

    def float_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s·(q_min − z), s·(q_max − z))`` per group: the float range the grid represents (static only)."""
        if self.scale is None or self.zero_point is None:
            raise ValueError("a dynamic spec has no fixed float range")
        return self.scale * (self.qmin - self.zero_point), self.scale * (self.qmax - self.zero_point)

    def to_dict(self) -> dict[str, Any]:
        """Settings and, for static specs, the scales and zero points (lists), for records and tests."""
        record: dict[str, Any] = {
            "bits": self.bits, "qmin": self.qmin, "qmax": self.qmax, "symmetric": self.symmetric,
            "granularity": self.granularity, "dynamic": self.dynamic,
        }
        if self.scale is not None and self.scale.numel() <= 1:
            record["scale"] = float(self.scale.reshape(-1)[0])
            record["zero_point"] = float(self.zero_point.reshape(-1)[0])  # type: ignore[union-attr]
        return record


@dataclass(frozen=True)
class LayerExport:
    """One quantized layer an integer engine runs: ``y = s_a·s_w·((q_x − z_a)·q_wᵀ) + b``.

    ``name`` is the module's name inside ``vlm.model`` (``visual.transformer.resblocks.0.attn.q_proj``). For a
    ``patch_conv`` (a convolution whose stride equals its kernel, no padding, dilation or groups) ``weight_int``
    is the conv weight flattened to ``(out, in·kh·kw)`` in ``(in, kh, kw)`` order, so the layer is a Linear over
    non-overlapping patches.
    """

    name: str
    kind: str
    weight_int: torch.Tensor
    weight: AffineSpec
    bias: torch.Tensor | None
    activation: AffineSpec | None
    kernel: tuple[int, int] | None = None

    @property
    def in_features(self) -> int:
        return int(self.weight_int.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight_int.shape[0])

    def weight_scale(self) -> torch.Tensor:
        """Per-output-channel weight scales ``(out,)`` (a per-tensor scale repeated)."""
        scale = self.weight.scale
        assert scale is not None
        return scale.reshape(-1).expand(self.out_features).contiguous() if scale.numel() == 1 else scale.reshape(-1)

    def dequantized_weight(self) -> torch.Tensor:
        """``s_w·(q_w − z_w)`` in float32: the fake-quantized weight (in patch layout for a patch conv)."""
        zero = self.weight.zero_point
        assert zero is not None
        zero = zero.reshape(-1, 1) if zero.numel() > 1 else zero.reshape(1, 1)
        return self.weight_scale().reshape(-1, 1) * (self.weight_int.float() - zero)


@dataclass(frozen=True)
class Unexportable:
    """A module an engine cannot run on integer kernels, and why."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


@dataclass(frozen=True)
class ExportPlan:
    """What an integer engine runs of one tower: integer layers, float maps, simulated layers, problems."""

    tower: str
    layers: tuple[LayerExport, ...]
    float_ops: tuple[Unexportable, ...] = ()
    simulated: tuple[Unexportable, ...] = ()
    problems: tuple[Unexportable, ...] = ()

    @property
    def exportable(self) -> bool:
        """No problem and at least one integer layer."""
        return not self.problems and bool(self.layers)

    def not_exportable_line(self) -> str:
        """The one-line ``not exportable: <reason>`` (first problem, and how many more)."""
        if self.exportable:
            return ""
        if not self.problems:
            return f"not exportable: the {self.tower} tower has no quantized Linear or patch convolution"
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return f"not exportable: {self.problems[0]}{more}"

    def layer(self, name: str) -> LayerExport:
        """The integer layer called ``name`` (KeyError naming the known ones otherwise)."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no integer layer {name!r}; the plan has {len(self.layers)}: {[l.name for l in self.layers][:5]}")

    def to_dict(self) -> dict[str, Any]:
        """A summary for records: counts, every simulated/float/problem entry, each layer's grids."""
        return {
            "tower": self.tower,
            "exportable": self.exportable,
            "int8_layers": [{"name": layer.name, "kind": layer.kind, "weight": layer.weight.to_dict(),
                             "activation": None if layer.activation is None else layer.activation.to_dict()}
                            for layer in self.layers],
            "float_ops": [str(entry) for entry in self.float_ops],
            "simulated": [str(entry) for entry in self.simulated],
            "problems": [str(entry) for entry in self.problems],
        }


# -- quantizers -> affine specs --------------------------------------------------------------------
def _frozen_params(quantizer: TensorQuantizer) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The static (s, z) a quantizer applies (its ``qparams_for`` on a probe), or why there are none."""
    if quantizer.mode is not Mode.QUANTIZE:
        return f"quantizer in {quantizer.mode.value} mode (not frozen)"
    try:
        scale, zero_point = quantizer.qparams_for(torch.zeros(1))
    except Exception as error:  # an uncalibrated or unusual quantizer
        return f"{type(quantizer).__name__} gives no fixed (scale, zero point): {error}"
    return scale.detach().float().reshape(-1).cpu(), zero_point.detach().float().reshape(-1).cpu()


def _reference(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The affine formula itself, written out independently of :mod:`qbench.quant.fake_quant`."""
    codes = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return scale * (codes - zero_point)


def _grouped_reference(x: torch.Tensor, spec: AffineSpec) -> torch.Tensor:
    """The affine formula of ``spec`` applied to ``x`` (its groups as :class:`Granularity` views them)."""
    granularity = Granularity.parse(spec.granularity)
    groups = granularity.view(x.float())
    if spec.dynamic:
        fmt = QuantFormat(spec.bits, spec.symmetric, narrow=spec.qmin != -(2 ** (spec.bits - 1)))
        scale, zero_point = fmt.qparams(groups.amin(dim=1), groups.amax(dim=1))  # each group's own range
    else:
        scale, zero_point = spec.scale, spec.zero_point
        assert scale is not None and zero_point is not None
    out = _reference(groups, scale.reshape(-1, 1).to(groups), zero_point.reshape(-1, 1).to(groups), spec.qmin, spec.qmax)
    return granularity.unview(out, x)


def _probe(spec: AffineSpec, shape: tuple[int, ...]) -> torch.Tensor:
    """Inputs of ``shape`` that cover the grid and beyond: uniform over 1.5x the float range (static) or
    heavy-tailed normals (dynamic), with exact ties of the grid mixed in."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    x = torch.randn(shape, generator=generator) * torch.rand(shape[:-1] + (1,), generator=generator).mul(4).exp()
    if not spec.dynamic and spec.granularity == "per_tensor":
        lo, hi = (bound.reshape(()) for bound in spec.float_bounds())
        centre, half = (lo + hi) / 2, (hi - lo) * 0.75
        x = centre + half * (2 * torch.rand(shape, generator=generator) - 1)
        ties = spec.scale.reshape(()) * (torch.randint(spec.qmin, spec.qmax + 1, shape, generator=generator)  # type: ignore[union-attr]
                                         - spec.zero_point.reshape(()) + 0.5)  # type: ignore[union-attr]
        x = torch.where(torch.rand(shape, generator=generator) < 0.1, ties, x)
    return x


def affine_spec(quantizer: TensorQuantizer, role: str, probe_shape: tuple[int, ...] | None = None) -> AffineSpec | str:
    """``quantizer`` as an :class:`AffineSpec`, or the reason it is not one.

    ``role`` is ``weight`` or ``activation``. Weights must be static; activations static per tensor or dynamic
    per tensor/token. An activation spec is accepted only if the quantizer reproduces the written-out affine
    formula bit for bit on probe inputs of ``probe_shape`` (:func:`_probe`), so a subclass that quantizes
    differently (power-of-two levels, learned offsets, clipping ratios) is refused, never approximated.
    """
    fmt, granularity = quantizer.fmt, quantizer.granularity
    name = type(quantizer).__name__
    if not isinstance(granularity, Granularity):
        return f"{name} quantizes in {type(granularity).__name__} groups (per instance), which no int8 GEMM takes"
    if fmt.qmax - fmt.qmin > 255:
        return f"{fmt} needs more than 8 bits (integer engines here run int8)"
    if granularity.kind == "group":
        return f"{granularity} {role} quantization has no int8 GEMM (one scale per group of inputs)"
    if quantizer.dynamic:
        if role == "weight":
            return f"dynamic weight quantizer ({name})"
        spec = AffineSpec(fmt.bits, fmt.qmin, fmt.qmax, fmt.symmetric, granularity.kind, True)
    else:
        params = _frozen_params(quantizer)
        if isinstance(params, str):
            return params
        scale, zero_point = params
        if not torch.equal(zero_point, zero_point.round()):
            return f"{name} has a non-integer zero point (a learned float offset), which no integer grid holds"
        if role == "activation" and granularity.kind != "per_tensor":
            return f"static {granularity} activation scales ({name}) are not supported by the engines"
        spec = AffineSpec(fmt.bits, fmt.qmin, fmt.qmax, fmt.symmetric, granularity.kind, False, scale, zero_point)
    if role == "activation" and probe_shape is not None:
        probe = _probe(spec, probe_shape)
        with torch.no_grad():
            produced = quantizer(probe)
        if not torch.equal(produced.float(), _grouped_reference(probe, spec)):
            return (f"{name} ({quantizer.extra_repr()}) does not quantize as the affine formula with its "
                    f"{'per-input min/max' if spec.dynamic else 'frozen'} (scale, zero point)")
    return spec


# -- layers ------------------------------------------------------------------------------------------
def integer_weight(module: QuantModule, spec: AffineSpec) -> torch.Tensor | str:
    """The weight's integer codes (int16 to hold any 8-bit grid before the int8 shift), checked to give back the
    fake-quantized weight exactly; or why not."""
    weight = module.weight.detach().float().cpu()
    granularity = Granularity.parse(spec.granularity)
    groups = granularity.view(weight)
    assert spec.scale is not None and spec.zero_point is not None
    scale, zero = spec.scale.reshape(-1, 1), spec.zero_point.reshape(-1, 1)
    codes = torch.clamp(torch.round(groups / scale) + zero, spec.qmin, spec.qmax)
    with torch.no_grad():
        fake = module.weight_quantizer(module.weight.detach()).float().cpu()
    if not torch.equal(granularity.unview(scale * (codes - zero), weight), fake):
        return "its integer weights do not reproduce the fake-quantized weight exactly"
    return granularity.unview(codes, weight).to(torch.int16)


def _is_patch_conv(module: nn.Conv2d) -> bool:
    """A convolution over non-overlapping patches: a Linear over each flattened ``(in, kh, kw)`` patch."""
    return (tuple(module.stride) == tuple(module.kernel_size) and tuple(module.dilation) == (1, 1)
            and module.groups == 1 and module.padding in ((0, 0), 0, "valid") and module.padding_mode == "zeros")


def plan_layer(name: str, module: QuantModule) -> LayerExport | Unexportable:
    """One quantized Linear/Conv2d as a :class:`LayerExport`, or why an engine cannot run it on int8."""
    cls = type(module)
    if cls not in (QuantLinear, QuantConv2d):
        return Unexportable(name, f"{cls.__name__} computes more than Q_a(x)·Q_w(W) (no integer engine mapping)")
    if getattr(module.weight_quantizer.granularity, "kind", None) not in ("per_channel", "per_tensor"):
        return Unexportable(name, f"{module.weight_quantizer.granularity} weights have no int8 GEMM")
    weight = affine_spec(module.weight_quantizer, "weight")
    if isinstance(weight, str):
        return Unexportable(name, weight)
    if not weight.symmetric or weight.zero_point is None or bool(weight.zero_point.abs().max() > 0):
        return Unexportable(name, "asymmetric weights (int8 GEMMs take symmetric weights; zero point must be 0)")
    conv = isinstance(module, nn.Conv2d)
    if conv and not _is_patch_conv(module):  # type: ignore[arg-type]
        return Unexportable(name, "a convolution that is not a patch embedding (stride != kernel, padding, groups)")
    kernel = tuple(module.kernel_size) if conv else None  # type: ignore[attr-defined]
    in_features = module.weight.shape[1] if not conv else module.weight[0].numel()
    probe_shape = (2, module.weight.shape[1], 2 * kernel[0], 2 * kernel[1]) if conv else (3, 5, in_features)  # type: ignore[index]
    activation = None
    if module.act_quantizer is not None:
        activation = affine_spec(module.act_quantizer, "activation", probe_shape)
        if isinstance(activation, str):
            return Unexportable(name, activation)
        if conv and activation.granularity != "per_tensor":
            return Unexportable(name, f"{activation.granularity} input quantization over image rows (not patches)")
    codes = integer_weight(module, weight)
    if isinstance(codes, str):
        return Unexportable(name, codes)
    bias = None if module.bias is None else module.bias.detach().float().cpu().clone()
    return LayerExport(name, "patch_conv" if conv else "linear", codes.reshape(codes.shape[0], -1), weight, bias,
                       activation, kernel)  # type: ignore[arg-type]


def _tower_modules(vlm: Any, tower: str) -> Iterator[tuple[str, nn.Module]]:
    """``(name inside vlm.model, module)`` of every module of ``tower``."""
    for name, module in vlm.model.named_modules():
        if name and vlm.tower_of(name) == tower:
            yield name, module


def plan_export(vlm: Any, tower: str = "visual") -> ExportPlan:
    """The :class:`ExportPlan` of ``vlm``'s ``tower`` (the quantized model as qbench evaluates it, in eval mode)."""
    from qbench.quant.rotation import StreamMap

    if vlm.training:
        raise ValueError("plan_export needs the model in eval mode (training-mode quantizers update their ranges)")
    modules = dict(_tower_modules(vlm, tower))
    owned = {f"{name}.{role}" for name, module in modules.items() if isinstance(module, QuantModule)
             for role in ("weight_quantizer", "act_quantizer")}
    layers: list[LayerExport] = []
    simulated, problems, float_ops = [], [], []
    for name, module in modules.items():
        if isinstance(module, QuantModule):
            entry = plan_layer(name, module)
            if isinstance(entry, LayerExport):
                layers.append(entry)
            elif isinstance(module, nn.Conv2d):
                simulated.append(Unexportable(name, f"{entry.reason}; runs as simulated fake quantization in float"))
            else:
                problems.append(entry)
        elif isinstance(module, TensorQuantizer) and name not in owned:
            problems.append(Unexportable(name, f"{type(module).__name__} quantizes a tensor inside attention or a "
                                               "norm (q/k/v, attention probabilities, groups): no engine runs it"))
        elif isinstance(module, StreamMap):
            float_ops.append(Unexportable(name, getattr(module, "reason", "fixed float map")))
    return ExportPlan(tower, tuple(layers), tuple(float_ops), tuple(simulated), tuple(problems))


HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called")
"""The ``nn.Module`` attributes that hold forward hooks (QuaRot's float maps run as a host module's hooks)."""


def move_hooks(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` every forward hook of ``source`` (same order) and leave ``source`` without any, so an engine's
    module that replaces or wraps a plan layer still runs the float maps attached to it."""
    for attribute in HOOK_TABLES:
        if hasattr(source, attribute):
            getattr(target, attribute).update(getattr(source, attribute))
            setattr(source, attribute, type(getattr(source, attribute))())


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` below ``root`` (replacing what is there)."""
    parent_name, _, attribute = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attribute, module)


@dataclass
class LayerInputs:
    """The inputs each integer layer received on one forward pass of the simulated model (for the per-layer check)."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


def capture_layer_inputs(vlm: Any, plan: ExportPlan, pixels: torch.Tensor) -> LayerInputs:
    """Run ``vlm.encode_image(pixels)`` once and keep every plan layer's input (after its pre-hooks: the online
    Hadamard is applied), so an engine's layer can be fed exactly what the simulated layer saw."""
    captured = LayerInputs()
    names = {layer.name for layer in plan.layers}
    handles = []
    for name, module in vlm.model.named_modules():
        if name in names:
            def keep(module: nn.Module, args: tuple, name: str = name) -> None:
                captured.inputs[name] = args[0].detach().clone()
            handles.append(module.register_forward_pre_hook(keep))
    # pre-hooks run in registration order: ours come after the stream maps', so the input is post-map
    try:
        with torch.no_grad():
            vlm.encode_image(pixels)
    finally:
        for handle in handles:
            handle.remove()
    return captured
