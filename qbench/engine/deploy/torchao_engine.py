"""The torchao engine: qbench's quantized image tower on real int8 matrix multiplies (``--engine torchao``).

Every integer layer of the :class:`~qbench.engine.deploy.plan.ExportPlan` becomes an :class:`Int8Linear` whose
weight is a torchao :class:`~torchao.quantization.Int8Tensor` built with ``Int8Tensor.from_hp`` from qbench's own
per-channel scales and the dequantized integer weight, so torchao's codes *are* ``layer.weight_int`` (checked at
build time); a static activation's scale and zero point are stored on the same tensor (``act_quant_scale``,
``act_quant_zero_point``, zero points shifted into int8 by :attr:`AffineSpec.int8_shift`). Nothing is calibrated
again: :func:`exported` reads all of it back from the torchao tensors.

How a layer computes. The matrix multiply is torch's int8 GEMM (``torch._int_mm``: oneDNN/VNNI on CPU, cuBLASLt
on CUDA through torchao's ``safe_int_mm``), int8 codes times int8 weights accumulated exactly in int32. The
activation codes are made with qbench's own formula ``clamp(round(x/s) + z, q_min, q_max)`` (division, round half
to even), with ``(s, z)`` the calibrated ones (static) or :meth:`~qbench.quant.fake_quant.QuantFormat.qparams` of
each token's min/max (dynamic, QuaRot's per-token activations), the zero point folded into the int32 accumulator
(``acc − (z − shift)·Σ_k q_w``, exact), and one float rescale ``acc·(s_a·s_w) + b``. The codes are clamped to
qbench's own grid, so grids that are not a full int8/uint8 range (symmetric narrow ``[−127, 127]``) are exact too.
So the only departures from the fake-quantized float layer are the float summation of the simulated layer and the
final rescale rounding (measured 1.4e-7 to 2.8e-7 relative L2 per layer on the toy model, eager and compiled).
torchao's own activation path (``Int8Tensor`` with ``act_quant_kwargs``) was measured and is *not*
used: it quantizes by reciprocal multiplication ``round(x·(1/s))``, which rounds a few codes differently from
qbench's ``round(x/s)``, its dynamic scale is ``amax/127.5`` rather than qbench's ``amax/127`` and it applies the
zero-point correction in float after scaling; :data:`TORCHAO_ACTIVATION_NOTE` records why.

A ``patch_conv`` layer (a patch embedding) unfolds its image into non-overlapping ``(in, kh, kw)`` patches, runs
the same int8 linear and folds the result back to ``(N, out, H/kh, W/kw)``. Forward pre-hooks, hooks and the
non-quantizer children of a replaced module (QuaRot's online Hadamard) move to the integer module, so the float
maps still run; :attr:`ExportPlan.simulated` convolutions stay the simulated fake-quant modules.

``compile=True`` compiles the image tower with :func:`torch.compile` (inductor fuses the quantize/rescale element-wise
work around the int8 GEMMs; eager int8 is not faster than float). Inductor's caches stay where torch puts them
(under the system temporary directory), never in the working tree.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from qbench.engine.deploy.engines import DeployedModel
from qbench.engine.deploy.plan import AffineSpec, ExportPlan, LayerExport, move_hooks, set_submodule
from qbench.errors import QbenchError
from qbench.quant.fake_quant import QuantFormat
from qbench.quant.modules import QuantModule, TensorQuantizer

ENGINE = "torchao"

INT8_OP_MARKERS = ("_int_mm", "qlinear", "int_scaled_matmul", "int_matmul")
"""Substrings of profiler event names that identify an integer GEMM (``aten::_int_mm``, a oneDNN ``qlinear``,
torchao's own matmul ops); lower case."""

PROFILER_NOISE = re.compile(r"^(USDT|STAGE|INFO):|gpuGetDeviceCount|SyncActivityProfilerHandler|IpcFabricConfigClient")
"""Lines the profiler's native library (kineto) prints to stderr on every start, whatever its log level."""

TORCHAO_ACTIVATION_NOTE = (
    "activation codes are made with qbench's formula clamp(round(x/s)+z, qmin, qmax) in torch, not torchao's "
    "activation quantizer (which rounds x*(1/s), takes amax/127.5 as the dynamic symmetric scale and corrects the "
    "zero point in float); the int8 GEMM is torch._int_mm, accumulated exactly in int32 with the zero point folded "
    "into the accumulator"
)
RESCALE_NOTE = (
    "the int32 accumulator is rescaled once in float32, acc*(s_a*s_w) + b, where the simulated layer sums float "
    "products s_a*(q_x - z)*s_w*q_w: the two differ only by float rounding (relative ~1e-7 per layer), which can "
    "flip single roundings in later layers"
)


def _import_torchao() -> Any:
    """Import torchao (a missing one is the one-line error naming the ``deploy`` extra), hiding torch's
    registration warning that torchao's import prints on recent torch versions."""
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        import torchao
        import torchao.quantization  # noqa: F401
    except ImportError:
        raise QbenchError("--engine torchao needs 'torchao', which is not installed; install the extra: "
                          "pip install 'qbench[deploy]'") from None
    finally:
        pytree_log.setLevel(level)
    return torchao


def int8_matmul(codes: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """``codes (M, K) int8 @ weight_t (K, N) int8`` accumulated exactly in int32 on the integer GEMM.

    CPU: ``torch._int_mm`` (oneDNN, VNNI where the CPU has it). CUDA: torchao's ``safe_int_mm`` (cuBLASLt int8;
    where cuBLAS's shape rules, K and N multiples of 8, are not met it multiplies in int32 on the CPU, and where
    cuBLAS refuses it multiplies in float32, exact while the sums stay below 2^24).
    """
    if codes.device.type == "cpu":
        return torch._int_mm(codes, weight_t)
    from torchao.kernel.intmm import safe_int_mm

    return safe_int_mm(codes, weight_t)


class Int8Linear(nn.Module):
    """One plan layer on int8 kernels: ``y = s_a·s_w·(Σ_k (q_x − z)·q_w) + b`` (a Linear, or a patch embedding).

    :attr:`torchao_weight` is a torchao ``Int8Tensor`` built by ``Int8Tensor.from_hp`` from qbench's scales
    (``qdata`` the int8 codes, ``scale`` the ``(out, 1)`` per-row scales; for a static input quantizer also
    ``act_quant_scale`` / ``act_quant_zero_point``, zero point in int8 convention). Its inner tensors are this
    module's buffers ``weight_int8``, ``weight_scale``, ``act_scale``, ``act_zero_point`` (the same tensor
    objects), so what the layer runs is what :meth:`exported` reads back, and the module hashes, copies and moves
    like any module (qbench's feature-cache fingerprint reads buffers as plain tensors, which a torchao tensor
    subclass is not). With no input quantizer the layer is torchao's weight-only int8 path (float activations).
    """

    def __init__(self, layer: LayerExport, device: torch.device | str = "cpu") -> None:
        """The integer twin of plan layer ``layer`` on ``device``; refuses if torchao's codes differ from qbench's."""
        super().__init__()
        from torchao.quantization import Int8Tensor, MappingType, PerRow, PerTensor
        from torchao.quantization.quantize_.workflows import QuantizeTensorToInt8Kwargs

        self.kernel = layer.kernel if layer.kind == "patch_conv" else None
        self.out_features, self.in_features = layer.out_features, layer.in_features
        spec = layer.activation
        self.spec: AffineSpec | None = spec
        self.dynamic = spec is not None and spec.dynamic
        self.shift = 0 if spec is None else spec.int8_shift
        self.act_kwargs = act_scale = act_zero = None
        if spec is not None and not spec.dynamic:
            assert spec.scale is not None and spec.zero_point is not None
            mapping = MappingType.SYMMETRIC if spec.symmetric else MappingType.ASYMMETRIC
            self.act_kwargs = QuantizeTensorToInt8Kwargs(PerTensor(), mapping)
            act_scale = spec.scale.float().reshape(1, 1).clone().to(device)
            act_zero = (spec.zero_point.reshape(1, 1) - self.shift).to(torch.int8).to(device)
        weight_scale = layer.weight_scale().float().reshape(-1, 1).clone().to(device)
        tensor = Int8Tensor.from_hp(
            layer.dequantized_weight().to(device), PerRow(), scale=weight_scale, zero_point=None,
            act_quant_kwargs=self.act_kwargs, act_quant_scale=act_scale, act_quant_zero_point=act_zero,
        )
        if not torch.equal(tensor.qdata.to(torch.int16).cpu(), layer.weight_int.to(torch.int16)):
            raise QbenchError(f"torchao re-quantized the integer weight of {layer.name} to other codes; "
                              "report this with the model and quantizer (the engine refuses to run other weights)")
        self.torchao_weight = tensor
        self.register_buffer("weight_int8", tensor.qdata)
        self.register_buffer("weight_scale", tensor.scale)
        self.register_buffer("act_scale", tensor.act_quant_scale)
        self.register_buffer("act_zero_point", tensor.act_quant_zero_point)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.clone().to(device), requires_grad=False)
        # Σ_k q_w per output channel (int32): folds the activation zero point into the integer accumulator
        self.register_buffer("weight_row_sum", layer.weight_int.to(torch.int32).sum(dim=1).to(device), persistent=False)
        if spec is not None:
            self.fmt = QuantFormat(spec.bits, spec.symmetric, narrow=spec.qmin != -(2 ** (spec.bits - 1)))
            self.qmin, self.qmax = spec.qmin, spec.qmax

    def _apply(self, fn: Callable, recurse: bool = True) -> "Int8Linear":
        """Move/convert the buffers as any module does, then re-wrap them as the torchao tensor (same objects)."""
        from torchao.quantization import Int8Tensor

        super()._apply(fn, recurse)
        old = self.torchao_weight
        self.torchao_weight = Int8Tensor(
            self.weight_int8, self.weight_scale, old.block_size, old.dtype, act_quant_scale=self.act_scale,
            act_quant_zero_point=self.act_zero_point, act_quant_kwargs=old.act_quant_kwargs,
        )
        return self

    # -- the three pieces ------------------------------------------------------------------------
    def activation_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (M, K)`` as int8 codes (shifted by :attr:`shift`), their scale ``(M, 1)`` or ``(1, 1)`` and zero
        point in int8 convention, with qbench's exact formula (``round(x/s)``, half to even, then clamp)."""
        x = x.float()
        if self.dynamic:
            scale, zero = self.fmt.qparams(x.amin(dim=1), x.amax(dim=1))
            scale, zero = scale.reshape(-1, 1), zero.reshape(-1, 1)
        else:
            scale, zero = self.act_scale, self.act_zero_point.float() + self.shift
        codes = torch.clamp(torch.round(x / scale) + zero, self.qmin, self.qmax)
        if self.shift:
            codes, zero = codes - self.shift, zero - self.shift
        return codes.to(torch.int8), scale, zero

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """The integer layer on ``x`` of shape ``(M, K)``: int8 GEMM, zero point folded in int32, one rescale."""
        if self.spec is None:  # weight-only int8: torchao's own path (float activations)
            return F.linear(x, self.torchao_weight, self.bias)
        codes, scale, zero = self.activation_codes(x)
        acc = int8_matmul(codes, self.weight_int8.t())
        if self.shift or not self.spec.symmetric:
            acc = acc - zero.to(torch.int32) * self.weight_row_sum
        out = acc.float() * (scale * self.weight_scale.reshape(1, -1))
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Linear: ``(..., K) -> (..., out)``. Patch embedding: ``(N, C, H, W) -> (N, out, H/kh, W/kw)``."""
        if self.kernel is None:
            return self.linear(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)
        kh, kw = self.kernel
        n, c, h, w = x.shape
        rows, cols = h // kh, w // kw
        x = x[:, :, : rows * kh, : cols * kw]  # a strided conv drops the remainder too
        patches = x.reshape(n, c, rows, kh, cols, kw).permute(0, 2, 4, 1, 3, 5).reshape(n * rows * cols, c * kh * kw)
        out = self.linear(patches)
        return out.reshape(n, rows, cols, self.out_features).permute(0, 3, 1, 2)

    def exported(self) -> dict[str, torch.Tensor | None]:
        """What the torchao tensor holds, in qbench's convention (codes int16, scales float32, unsigned zero
        points unshifted): ``weight_int``, ``weight_scale``, ``act_scale``, ``act_zero_point``."""
        tensor = self.torchao_weight
        act_scale, act_zero = tensor.act_quant_scale, tensor.act_quant_zero_point
        return {
            "weight_int": tensor.qdata.detach().to(torch.int16).cpu(),
            "weight_scale": tensor.scale.detach().float().reshape(-1).cpu(),
            "act_scale": None if act_scale is None else act_scale.detach().float().reshape(-1).cpu(),
            "act_zero_point": None if act_zero is None else (act_zero.detach().float().reshape(-1) + self.shift).cpu(),
        }

    def extra_repr(self) -> str:
        """Kind, sizes and input grid (part of the module's fingerprint, like a quantized module's settings)."""
        kind = "patch" if self.kernel else "linear"
        act = "float" if self.spec is None else ("dynamic" if self.dynamic else "static") + f" [{self.qmin}, {self.qmax}]"
        return f"{kind}, in={self.in_features}, out={self.out_features}, activation={act}"


def _carry_over(old: nn.Module, new: Int8Linear) -> None:
    """Move ``old``'s hooks and non-quantizer children (QuaRot's online Hadamard and its pre-hook) to ``new``."""
    for name, child in old.named_children():
        if not isinstance(child, TensorQuantizer):
            new.add_module(name, child)
    move_hooks(old, new)


def _tower_roots(vlm: Any, tower: str) -> list[nn.Module]:
    """The top modules of ``tower`` inside ``vlm.model`` (``visual`` for open_clip), the unit that is compiled."""
    roots = []
    for prefix in vlm.tower_prefixes.get(tower, ()):
        name = prefix.rstrip(".")
        try:
            roots.append(vlm.model.get_submodule(name))
        except AttributeError:
            continue
    return roots


def _keep_simulated_layers_eager(vlm: Any, tower: str) -> list[str]:
    """Exclude the tower's remaining fake-quant modules (:attr:`ExportPlan.simulated`) from compilation.

    Why: a :class:`~qbench.quant.modules.QuantModule` reuses its fake-quantized weight through a cache keyed by
    tensor identities and version counters, which dynamo cannot trace; run eagerly, the module computes exactly
    what the simulated model does. Returns their names.
    """
    names = []
    for name, module in vlm.model.named_modules():
        if isinstance(module, QuantModule) and vlm.tower_of(name) == tower:
            module.forward = torch.compiler.disable(module.forward)
            names.append(name)
    return names


def int8_op_names(events: Any) -> list[str]:
    """The profiler event names (``key_averages()``) that are integer kernels, sorted and deduplicated."""
    names = {event.key for event in events if any(marker in event.key.lower() for marker in INT8_OP_MARKERS)}
    return sorted(names)


class _RecordingEncoder:
    """``encode_image`` of the deployed VLM: on its first call it runs the batch once more under
    :mod:`torch.profiler` (after any compilation, so compile-time tracing is not counted) and records which
    integer kernels actually ran in ``ops``; afterwards it is the plain encoder."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], ops: list[str], notes: list[str],
                 device: str) -> None:
        """Wrap ``encode``; ``ops`` and ``notes`` are the :class:`DeployedModel`'s lists, filled in place."""
        self.encode = encode
        self.ops = ops
        self.notes = notes
        self.device = device
        self.recorded = False

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encode ``pixels``; the first time, also record the int8 ops of one more pass."""
        out = self.encode(pixels)
        if not self.recorded:
            self.recorded = True
            try:
                self.ops[:] = record_int8_ops(self.encode, pixels, self.device)
            except RuntimeError as error:  # another profiler already running in this process
                self.notes.append(f"int8 ops not recorded: torch.profiler could not run ({error})")
        return out


@contextmanager
def _filtered_native_stderr() -> Iterator[None]:
    """Send file descriptor 2 to a temporary file for the duration, then pass on every line but the profiler's
    start/stop chatter (:data:`PROFILER_NOISE`): kineto writes it from C++, past Python's ``sys.stderr``, and
    a user of ``qbench deploy-check`` would read ``ERROR: gpuGetDeviceCount failed`` on a CPU-only machine."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().decode(errors="replace").splitlines() if not PROFILER_NOISE.search(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")


def record_int8_ops(encode: Callable[[torch.Tensor], Any], pixels: torch.Tensor, device: str) -> list[str]:
    """Run ``encode(pixels)`` once under :mod:`torch.profiler` and return the integer kernels it dispatched."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with _filtered_native_stderr(), torch.no_grad(), profile(activities=activities) as prof:
        encode(pixels)
    return int8_op_names(prof.key_averages())


def build(vlm: Any, plan: ExportPlan | None, *, device: str = "cpu", compile: bool = True) -> DeployedModel:
    """``vlm``'s image tower on torchao int8 (``plan``) or as its FP32 twin (``plan=None``), on ``device``.

    The caller's model is never modified: everything happens on a deep copy. ``compile`` compiles the image
    tower with :func:`torch.compile` in place (module names and the state dict stay the same). ``int8_ops`` is
    filled by the deployed model's first ``encode_image`` call (one more pass of that batch under the profiler,
    after compilation), so it lists the kernels that ran, not those that might.
    """
    torchao = _import_torchao()
    deployed = copy.deepcopy(vlm).eval()
    notes: list[str] = []
    replaced: dict[str, Int8Linear] = {}
    tower = "visual" if plan is None else plan.tower
    if plan is not None:
        if not plan.exportable:
            raise QbenchError(plan.not_exportable_line())
        for layer in plan.layers:
            old = deployed.model.get_submodule(layer.name)
            new = Int8Linear(layer)
            _carry_over(old, new)
            set_submodule(deployed.model, layer.name, new)
            replaced[layer.name] = new
        notes.append(TORCHAO_ACTIVATION_NOTE)
        notes.append(RESCALE_NOTE)
        weight_only = [name for name, module in replaced.items() if module.spec is None]
        if weight_only:
            notes.append(f"{len(weight_only)} layer(s) have float inputs (no input quantizer): torchao's weight-only "
                         f"int8 path, float matmul on dequantized int8 weights ({weight_only[0]}, ...)")
        notes.extend(f"simulated in float (fake quantization, not integer kernels): {entry}" for entry in plan.simulated)
        notes.extend(f"float map run in float: {entry}" for entry in plan.float_ops)
    deployed = deployed.to(device)
    if compile:
        eager = _keep_simulated_layers_eager(deployed, tower)
        for root in _tower_roots(deployed, tower):
            root.compile()
        notes.append("image tower compiled with torch.compile (inductor); float ops may be fused and reordered"
                     + (f"; {len(eager)} simulated layer(s) run eagerly outside the compiled graph" if eager else ""))
    ops: list[str] = []
    deployed.encode_image = _RecordingEncoder(deployed.encode_image, ops, notes, device)

    def run_layer(name: str, x: torch.Tensor) -> torch.Tensor:
        """The engine's integer module ``name`` on ``x`` (its input after the pre-hooks, as captured)."""
        if name not in replaced:
            raise KeyError(f"no int8 layer {name!r} in the torchao model ({len(replaced)} layers)")
        with torch.no_grad():
            return replaced[name].forward(x.to(device))

    def exported() -> dict[str, dict[str, Any]]:
        """Every int8 layer's integers, scales and zero points, read back from its torchao tensor."""
        return {name: module.exported() for name, module in replaced.items()}

    return DeployedModel(
        vlm=deployed, engine=ENGINE, version=str(torchao.__version__), device=device,
        int8_layers=list(replaced), int8_ops=ops, notes=notes, run_layer=run_layer, exported=exported,
    )
