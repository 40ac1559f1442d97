"""The ONNX Runtime engine: the image tower as an ONNX QDQ graph carrying qbench's own integers and scales.

How the graph is made. The tower is exported with the TorchScript exporter (``torch.onnx.export(dynamo=False)``)
after every integer layer of the :class:`~qbench.engine.deploy.plan.ExportPlan` has been wrapped so that it exports
as one placeholder node ``qbench::Layer`` (its eager value is the simulated layer's own output, so tracing sees the
real network). The placeholders are then *lowered* with the ``onnx`` package by :func:`layer_nodes`, written from
the plan alone:

* ``[Clip] → QuantizeLinear → DequantizeLinear`` on the input, with the plan's static scale and zero point as
  initializers (uint8 zero points for unsigned grids, int8 for signed ones; a grid narrower than the storage type,
  such as the symmetric ``[-127, 127]``, is clipped to its float range first, so the codes equal qbench's clamp);
* ``DequantizeLinear`` of the weight stored as an int8 initializer, *transposed* to ``(in, out)`` with per-column
  scales (``axis=1``), so nothing stands between it and the ``MatMul`` and ORT's QDQ fusion turns the pair into
  an integer kernel (``MatMulIntegerToFloat``: int32 accumulation, one float multiply by ``s_a·s_w``);
* ``MatMul`` then ``Add`` of the float bias. A patch convolution is the same Linear over non-overlapping patches
  (``Reshape → Transpose → Reshape`` before, the inverse after): its weight integers are the plan's, flattened in
  ``(in, kh, kw)`` order.

No float weight is left for a quantized layer, and every scale and zero point is an initializer holding exactly
the plan's value (:func:`read_back` reads them back from the graph). Float maps (QuaRot rotations, online
Hadamards) are traced through their hooks as float ``MatMul``s; simulated convolutions export as their fake
quantization in float (``Div``, ``Round``, ``Clip``...). Dynamic per-token activations have no ONNX operator
(``DynamicQuantizeLinear`` is per tensor) and are refused.

Running it. An ``onnxruntime.InferenceSession`` (all graph optimizations, so the QDQ pairs fuse) replaces the
tower module; the optimized graph is written once to list which integer operators ran (:attr:`int8_ops`). The same
file with optimizations off is the engine's own simulated twin (:func:`simulated_twin`).
"""

from __future__ import annotations

import copy
import hashlib
import shutil
import tempfile
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qbench.atomic import write_atomic_with
from qbench.engine.deploy.engines import DeployedModel
from qbench.engine.deploy.plan import ExportPlan, LayerExport, move_hooks, set_submodule
from qbench.errors import QbenchError

ENGINE = "onnxruntime"
OPSET = 17
"""ONNX opset of the exported graph (per-axis QuantizeLinear/DequantizeLinear need 13 or later)."""

PLACEHOLDER_DOMAIN = "qbench"
PLACEHOLDER_OP = "Layer"

INTEGER_GEMMS = frozenset({
    "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger", "QLinearConv",
    "ConvInteger", "QAttention",
})
"""The integer operators that take a layer's weight: a plan layer whose weight feeds one of these ran on int8."""

WEIGHT_ONLY_ACCURACY_LEVEL = "1"
"""``session.qdq_matmulnbits_accuracy_level`` for weight-only layers: 1 = float32 compute (ORT's default, 4, would
quantize the float activations to int8)."""

REFUSAL = "not exportable for onnxruntime: {problem}"
PER_TOKEN_REASON = ("{layer}: per-token dynamic activations (ONNX has no per-row dynamic QuantizeLinear); "
                    "use --engine torchao")


# -- the plan's layers as ONNX nodes -----------------------------------------------------------------
def _names(layer: LayerExport) -> dict[str, str]:
    """The initializer names of one layer (prefixed by the layer's name inside ``vlm.model``, so unique)."""
    return {key: f"{layer.name}.{key}" for key in (
        "weight_int8", "weight_scale", "weight_zero_point", "act_scale", "act_zero_point", "act_min", "act_max",
        "bias", "patch_shape", "rows_shape", "grid_shape")}


def check_layer(layer: LayerExport) -> str | None:
    """Why ONNX Runtime cannot run ``layer`` as exact QDQ, or None."""
    if layer.weight.qmin >= 0 or layer.weight.qmax - layer.weight.qmin > 255:
        return f"{layer.name}: weight grid [{layer.weight.qmin}, {layer.weight.qmax}] is not a signed int8 grid"
    spec = layer.activation
    if spec is None:
        return None
    if spec.dynamic:
        if spec.granularity == "per_token":
            return PER_TOKEN_REASON.format(layer=layer.name)
        return (f"{layer.name}: dynamic {spec.granularity} activations (not implemented for this engine: "
                "ONNX DynamicQuantizeLinear is uint8-only and is not checked against qbench's min/max formula)")
    if spec.granularity != "per_tensor" or spec.scale is None or spec.scale.numel() != 1:
        return f"{layer.name}: static {spec.granularity} activation scales (QuantizeLinear takes one per tensor)"
    if not spec.fits_int8:
        return f"{layer.name}: activation grid [{spec.qmin}, {spec.qmax}] does not fit 8 bits"
    zero = float(spec.zero_point.reshape(()))  # type: ignore[union-attr]
    low, high = (0, 255) if spec.qmin >= 0 else (-128, 127)
    if not (low <= spec.qmin and spec.qmax <= high and low <= zero <= high):
        return f"{layer.name}: activation grid [{spec.qmin}, {spec.qmax}] with zero point {zero:g} is not uint8/int8"
    return None


def refuse_unsupported(layers: Any) -> None:
    """The one-line ``not exportable for onnxruntime: <layer>: <reason>`` for the first layer ORT cannot run."""
    for layer in layers:
        problem = check_layer(layer)
        if problem is not None:
            raise QbenchError(REFUSAL.format(problem=problem))


def _act_zero_dtype(layer: LayerExport) -> np.dtype:
    """uint8 for an unsigned activation grid, int8 for a signed one (the QuantizeLinear output type)."""
    assert layer.activation is not None
    return np.dtype(np.uint8) if layer.activation.qmin >= 0 else np.dtype(np.int8)


def layer_initializers(layer: LayerExport) -> list[onnx.TensorProto]:
    """The layer's integers, scales, zero points, clip bounds and bias as ONNX initializers, straight from the plan.

    The weight is stored transposed, ``(in, out)`` int8 with per-column scales, so its DequantizeLinear feeds the
    MatMul directly. Scalars (per-tensor scales, zero points, bounds) are 0-d tensors.
    """
    names = _names(layer)
    weight = layer.weight
    assert weight.scale is not None
    codes = layer.weight_int - weight.int8_shift
    tensors = [numpy_helper.from_array(codes.to(torch.int8).t().contiguous().numpy(), names["weight_int8"])]
    if weight.scale.numel() == 1:
        scale = weight.scale.reshape(()).to(torch.float32).numpy()
    else:
        scale = layer.weight_scale().to(torch.float32).numpy()
    tensors.append(numpy_helper.from_array(np.asarray(scale, dtype=np.float32), names["weight_scale"]))
    tensors.append(numpy_helper.from_array(np.zeros(scale.shape, dtype=np.int8), names["weight_zero_point"]))
    spec = layer.activation
    if spec is not None:
        assert spec.scale is not None and spec.zero_point is not None
        tensors.append(numpy_helper.from_array(spec.scale.reshape(()).to(torch.float32).numpy(), names["act_scale"]))
        zero = np.asarray(int(spec.zero_point.reshape(())), dtype=_act_zero_dtype(layer))
        tensors.append(numpy_helper.from_array(zero, names["act_zero_point"]))
        if not spec.native_int8:
            low, high = spec.float_bounds()
            tensors.append(numpy_helper.from_array(low.reshape(()).to(torch.float32).numpy(), names["act_min"]))
            tensors.append(numpy_helper.from_array(high.reshape(()).to(torch.float32).numpy(), names["act_max"]))
    if layer.bias is not None:
        tensors.append(numpy_helper.from_array(layer.bias.to(torch.float32).numpy(), names["bias"]))
    return tensors


def layer_nodes(layer: LayerExport, x: str, y: str, spatial: tuple[int, int] | None = None,
                ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes (and initializers) computing plan layer ``layer`` from value ``x`` into value ``y``.

    ``spatial`` is the input's ``(H, W)`` for a patch convolution (its input is ``(N, C, H, W)``, its output
    ``(N, out, H/kh, W/kw)``); a Linear takes ``(..., in)`` to ``(..., out)``.
    """
    refuse_unsupported((layer,))
    names = _names(layer)
    tensors = layer_initializers(layer)
    nodes: list[onnx.NodeProto] = []
    prefix = f"{layer.name}/"
    current = x
    patch = layer.kind == "patch_conv"
    if patch:
        if spatial is None or layer.kernel is None:
            raise ValueError(f"{layer.name}: a patch convolution needs its input's (H, W)")
        (kh, kw), (height, width) = layer.kernel, spatial
        channels = layer.in_features // (kh * kw)
        grid = (height // kh, width // kw)
        tensors += [
            numpy_helper.from_array(np.array([-1, channels, grid[0], kh, grid[1], kw], np.int64), names["patch_shape"]),
            numpy_helper.from_array(np.array([-1, grid[0] * grid[1], layer.in_features], np.int64), names["rows_shape"]),
            numpy_helper.from_array(np.array([-1, grid[0], grid[1], layer.out_features], np.int64), names["grid_shape"]),
        ]
        nodes += [
            helper.make_node("Reshape", [current, names["patch_shape"]], [prefix + "patches6"], prefix + "patches6"),
            helper.make_node("Transpose", [prefix + "patches6"], [prefix + "patches_t"], prefix + "patches_t",
                             perm=[0, 2, 4, 1, 3, 5]),
            helper.make_node("Reshape", [prefix + "patches_t", names["rows_shape"]], [prefix + "rows"], prefix + "rows"),
        ]
        current = prefix + "rows"
    spec = layer.activation
    if spec is not None:
        if not spec.native_int8:
            nodes.append(helper.make_node("Clip", [current, names["act_min"], names["act_max"]], [prefix + "x_clip"],
                                          prefix + "x_clip"))
            current = prefix + "x_clip"
        nodes += [
            helper.make_node("QuantizeLinear", [current, names["act_scale"], names["act_zero_point"]], [prefix + "x_q"],
                             prefix + "x_q"),
            helper.make_node("DequantizeLinear", [prefix + "x_q", names["act_scale"], names["act_zero_point"]],
                             [prefix + "x_dq"], prefix + "x_dq"),
        ]
        current = prefix + "x_dq"
    axis = {"axis": 1} if layer.weight.scale is not None and layer.weight.scale.numel() > 1 else {}
    nodes.append(helper.make_node("DequantizeLinear", [names["weight_int8"], names["weight_scale"],
                                                       names["weight_zero_point"]], [prefix + "w_dq"], prefix + "w_dq",
                                  **axis))
    out = prefix + "mm" if (layer.bias is not None or patch) else y
    nodes.append(helper.make_node("MatMul", [current, prefix + "w_dq"], [out], prefix + "mm"))
    if layer.bias is not None:
        biased = prefix + "biased" if patch else y
        nodes.append(helper.make_node("Add", [out, names["bias"]], [biased], prefix + "bias"))
        out = biased
    if patch:
        nodes += [
            helper.make_node("Reshape", [out, names["grid_shape"]], [prefix + "grid"], prefix + "grid"),
            helper.make_node("Transpose", [prefix + "grid"], [y], prefix + "to_nchw", perm=[0, 3, 1, 2]),
        ]
    return nodes, tensors


def lower_placeholders(model: onnx.ModelProto, plan: ExportPlan) -> onnx.ModelProto:
    """Replace every ``qbench::Layer`` placeholder of ``model`` by :func:`layer_nodes` of its plan layer, drop the
    initializers nothing reads any more (the simulated layers' float weights), re-infer shapes."""
    graph = model.graph
    layers = {layer.name: layer for layer in plan.layers}
    new_nodes: list[onnx.NodeProto] = []
    added: list[onnx.TensorProto] = []
    lowered = set()
    for node in graph.node:
        if node.domain != PLACEHOLDER_DOMAIN:
            new_nodes.append(node)
            continue
        attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
        name = attributes["layer"].decode() if isinstance(attributes["layer"], bytes) else attributes["layer"]
        spatial = tuple(attributes["spatial"]) if attributes.get("spatial") else None
        nodes, tensors = layer_nodes(layers[name], node.input[0], node.output[0], spatial)  # type: ignore[arg-type]
        new_nodes += nodes
        added += tensors
        lowered.add(name)
    missing = sorted(set(layers) - lowered)
    if missing:
        raise QbenchError(f"not exportable for onnxruntime: {missing[0]} never ran in the exported graph "
                          f"({len(missing)} plan layer(s) missing)")
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(added)
    used = {name for node in graph.node for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]
    for index in reversed(range(len(model.opset_import))):
        if model.opset_import[index].domain == PLACEHOLDER_DOMAIN:
            del model.opset_import[index]
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    return model


def single_layer_model(layer: LayerExport, shape: tuple[int, ...]) -> onnx.ModelProto:
    """A one-layer ONNX model of ``layer`` built by :func:`layer_nodes` (the model's own code) for inputs of
    ``shape`` (every dimension but the features dynamic; a patch convolution's ``(H, W)`` fixed)."""
    patch = layer.kind == "patch_conv"
    dims: list[Any] = [f"d{index}" for index in range(len(shape) - 1)] + [shape[-1]]
    out_dims = dims[:-1] + [layer.out_features]
    if patch:
        assert layer.kernel is not None
        dims = ["n", shape[1], shape[2], shape[3]]
        out_dims = ["n", layer.out_features, shape[2] // layer.kernel[0], shape[3] // layer.kernel[1]]
    nodes, tensors = layer_nodes(layer, "x", "y", (shape[2], shape[3]) if patch else None)
    graph = helper.make_graph(nodes, f"qbench-{layer.name}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_dims)], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="qbench")
    onnx.checker.check_model(model)
    return model


# -- reading the exported integers back ---------------------------------------------------------------
def read_back(model: onnx.ModelProto, plan: ExportPlan) -> dict[str, dict[str, Any]]:
    """Per plan layer, the integers, scales and zero points *as the graph holds them*, in qbench's convention:
    ``weight_int`` ``(out, in)`` int16 codes, ``weight_scale`` ``(out,)``, ``act_scale``/``act_zero_point``
    ``(1,)`` float32 (None without an input quantizer).

    Found by following the graph, not by name alone: the initializer feeding the layer's weight
    DequantizeLinear, the MatMul it feeds, the DequantizeLinear on the MatMul's other input and the
    QuantizeLinear before it (whose scale and zero point must be the same initializers).
    """
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def array(name: str) -> np.ndarray:
        """The initializer ``name`` as a numpy array."""
        return numpy_helper.to_array(initializers[name])

    result: dict[str, dict[str, Any]] = {}
    for layer in plan.layers:
        weight_name = _names(layer)["weight_int8"]
        if weight_name not in initializers:
            raise KeyError(f"{layer.name}: no weight initializer {weight_name!r} in the ONNX graph")
        dq = next(node for node in consumers[weight_name] if node.op_type == "DequantizeLinear")
        matmul = next(node for node in consumers[dq.output[0]] if node.op_type == "MatMul")
        codes = array(dq.input[0])
        if codes.dtype != np.int8:
            raise ValueError(f"{layer.name}: weight initializer is {codes.dtype}, not int8")
        weight_int = torch.from_numpy(codes.astype(np.int16)).t().contiguous() + layer.weight.int8_shift
        scale = torch.from_numpy(array(dq.input[1]).astype(np.float32)).reshape(-1)
        if scale.numel() == 1:
            scale = scale.expand(weight_int.shape[0]).contiguous()
        entry: dict[str, Any] = {"weight_int": weight_int, "weight_scale": scale,
                                 "weight_zero_point": torch.from_numpy(array(dq.input[2]).astype(np.float32)).reshape(-1),
                                 "act_scale": None, "act_zero_point": None}
        other = producers.get(matmul.input[0])
        if other is not None and other.op_type == "DequantizeLinear":
            quantize = producers[other.input[0]]
            if quantize.op_type != "QuantizeLinear" or list(quantize.input[1:]) != list(other.input[1:]):
                raise ValueError(f"{layer.name}: the input's QuantizeLinear/DequantizeLinear disagree")
            entry["act_scale"] = torch.from_numpy(array(other.input[1]).astype(np.float32)).reshape(1)
            entry["act_zero_point"] = torch.from_numpy(array(other.input[2]).astype(np.float32)).reshape(1)
        result[layer.name] = entry
    return result


# -- export ---------------------------------------------------------------------------------------------
class _PlaceholderFn(torch.autograd.Function):
    """Eager: returns the simulated layer's output. Export: one ``qbench::Layer`` node (lowered afterwards)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, simulated: torch.Tensor, name: str, spatial: tuple[int, ...]) -> torch.Tensor:  # type: ignore[override]
        """The simulated layer's output (what tracing needs to follow the real network)."""
        return simulated.clone()

    @staticmethod
    def symbolic(g: Any, x: Any, simulated: Any, name: str, spatial: tuple[int, ...]) -> Any:
        """The placeholder node, typed like the simulated output (its shape is re-inferred after lowering)."""
        node = g.op(f"{PLACEHOLDER_DOMAIN}::{PLACEHOLDER_OP}", x, layer_s=name, spatial_i=list(spatial))
        node.setType(simulated.type())
        return node


class _ExportLayer(nn.Module):
    """Stands in for one plan layer during export: the simulated module's value, exported as a placeholder.

    The host's hooks (QuaRot's online Hadamard pre-hooks, output hooks) move to this wrapper, so the placeholder
    receives exactly the input the simulated layer's kernel saw; the maps themselves stay children of the host.
    """

    def __init__(self, name: str, host: nn.Module) -> None:
        super().__init__()
        self.layer_name = name
        self.host = host
        self.patch = isinstance(host, nn.Conv2d)
        move_hooks(host, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The placeholder on ``x`` (the input after the moved pre-hooks), valued as the simulated layer."""
        spatial = tuple(int(size) for size in x.shape[-2:]) if self.patch else ()
        return _PlaceholderFn.apply(x, self.host.forward(x), self.layer_name, spatial)


def tower_module_name(vlm: Any, tower: str) -> str:
    """The attribute path of ``tower`` inside ``vlm.model`` (one prefix such as ``visual.``), or a one-line error."""
    prefixes = tuple(prefix.rstrip(".") for prefix in vlm.tower_prefixes.get(tower, ()))
    if len(prefixes) != 1:
        raise QbenchError(f"not exportable for onnxruntime: the {tower} tower is not one module ({prefixes})")
    return prefixes[0]


def example_pixels(tower: nn.Module) -> torch.Tensor:
    """A batch of two images of the tower's input size (open_clip ``image_size``), for tracing."""
    size = getattr(tower, "image_size", None)
    if size is None:
        raise QbenchError("not exportable for onnxruntime: the image tower does not say its input size (image_size)")
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    channels = 3
    for module in tower.modules():
        if isinstance(module, nn.Conv2d):
            channels = module.in_channels
            break
    return torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(0))


def export_tower(vlm: Any, plan: ExportPlan | None, path: Path, tower: str = "visual") -> onnx.ModelProto:
    """Export ``vlm``'s (a copy's) ``tower`` to ``path``: placeholders for the plan's layers, lowered to QDQ."""
    refuse_unsupported(plan.layers if plan is not None else ())
    root = tower_module_name(vlm, tower)
    work = copy.deepcopy(vlm.model.get_submodule(root)).eval()
    for layer in plan.layers if plan is not None else ():
        inner = layer.name[len(root) + 1:]
        set_submodule(work, inner, _ExportLayer(layer.name, work.get_submodule(inner)))
    pixels = example_pixels(work)
    result: dict[str, onnx.ModelProto] = {}

    def write(temporary: Path) -> None:
        """Trace into ``temporary``, then lower the placeholders there (the file appears at ``path`` complete)."""
        _trace(work, pixels, temporary, plan is not None, tower)
        model = onnx.load(str(temporary))
        if plan is not None:
            model = lower_placeholders(model, plan)
            onnx.save(model, str(temporary))
        result["model"] = model

    write_atomic_with(path, write, sync_folder=False)
    return result["model"]


def _trace(work: nn.Module, pixels: torch.Tensor, path: Path, placeholders: bool, tower: str) -> None:
    """``torch.onnx.export`` (TorchScript exporter) of ``work`` with a dynamic batch axis; a one-line error if the
    exporter fails."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        # nn.MultiheadAttention's inference fast path (aten::_native_multi_head_attention) has no ONNX symbolic;
        # its regular path computes the same attention with exportable ops
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(work, (pixels,), str(path), dynamo=False, opset_version=OPSET,
                              input_names=["pixels"], output_names=["embedding"],
                              dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}},
                              do_constant_folding=True,
                              custom_opsets={PLACEHOLDER_DOMAIN: 1} if placeholders else None)
    except Exception as error:  # the exporter's own failure, e.g. an op it has no symbolic for
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise QbenchError(f"not exportable for onnxruntime: the ONNX exporter failed on the {tower} tower "
                          f"({type(error).__name__}: {first[:300]})") from error
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


# -- running it -----------------------------------------------------------------------------------------
def providers_for(device: str) -> list[str]:
    """ORT execution providers for ``device``; a one-line error when this onnxruntime has no CUDA provider."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise QbenchError(f"--engine onnxruntime --device {device}: this onnxruntime has no CUDAExecutionProvider "
                          "(install onnxruntime-gpu); use --device cpu")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def session_options(optimize: bool = True, optimized_path: Path | None = None) -> ort.SessionOptions:
    """All graph optimizations (the QDQ fusion into integer kernels) or none (the simulated twin); intra-op
    threads = torch's thread count, so the engine and torch are timed on the same cores."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # a weight-only layer (float input) has DequantizeLinear -> MatMul, which ORT fuses into MatMulNBits; at its
    # default accuracy level 4 that kernel quantizes the float activations to int8, which qbench's layer does not:
    # level 1 keeps float32 activations (the same values as the simulated layer)
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", WEIGHT_ONLY_ACCURACY_LEVEL)
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return options


class OnnxRuntimeTower(nn.Module):
    """An image tower running as an ORT session: pixels in (float32), the tower's output out, as torch tensors.

    Holds no parameters. Deep copies share the session (it is immutable); the ONNX files live in ``workdir``,
    removed when the last copy is collected unless the caller chose the directory.
    """

    def __init__(self, session: ort.InferenceSession, path: Path, attributes: dict[str, Any], optimize: bool) -> None:
        super().__init__()
        self.session = session
        self.path = path
        self.optimize = optimize
        self.input_name = session.get_inputs()[0].name
        # the graph's content in a buffer, so feature-cache fingerprints of two deployments differ when their
        # graphs do (the module has no parameters of its own)
        digest = hashlib.sha256(path.read_bytes()).digest()
        self.register_buffer("onnx_sha256", torch.tensor(list(digest), dtype=torch.uint8))
        for key, value in attributes.items():
            setattr(self, key, value)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Run the session on ``pixels`` (copied to host float32) and return its output on ``pixels``' device."""
        array = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
        output = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(output).to(pixels.device)

    def __deepcopy__(self, memo: dict) -> "OnnxRuntimeTower":
        """A copy sharing the (immutable) session: an ORT session cannot be deep-copied."""
        clone = OnnxRuntimeTower.__new__(OnnxRuntimeTower)
        clone.__dict__.update(self.__dict__)
        clone._modules = OrderedDict()
        clone._parameters = OrderedDict()
        clone._buffers = OrderedDict((name, buffer.clone()) for name, buffer in self._buffers.items())
        memo[id(self)] = clone
        return clone

    def __getstate__(self) -> dict:
        """Refuse: a live session has no pickled form."""
        raise TypeError("an ONNX Runtime tower cannot be pickled (it holds a live session)")

    def extra_repr(self) -> str:
        """Engine version, file and optimization level (part of the feature-cache fingerprint)."""
        level = "all graph optimizations" if self.optimize else "graph optimizations off"
        return f"onnxruntime {ort.__version__} session on {self.path.name}, {level}"


def optimized_ops(path: Path) -> list[str]:
    """The integer GEMM operator type of every such node of the optimized graph at ``path``."""
    model = onnx.load(str(path), load_external_data=False)
    return [node.op_type for node in model.graph.node if node.op_type in INTEGER_GEMMS]


def integer_layers(path: Path, plan: ExportPlan) -> list[str]:
    """Plan layers whose int8 weight initializer feeds an integer GEMM of the optimized graph at ``path``."""
    model = onnx.load(str(path), load_external_data=False)
    fed = {name for node in model.graph.node if node.op_type in INTEGER_GEMMS for name in node.input}
    return [layer.name for layer in plan.layers if _names(layer)["weight_int8"] in fed]


def _workdir(workdir: str | Path | None) -> tuple[Path, bool]:
    """The directory for the ONNX files and whether this module owns it (temporary: removed later)."""
    if workdir is not None:
        path = Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        return path, False
    return Path(tempfile.mkdtemp(prefix="qbench-onnx-")), True


def _listed(names: list[str]) -> str:
    """The first five names, comma-separated, with ``...`` when there are more."""
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


def _notes(plan: ExportPlan | None, optimize: bool, int8_layers: list[str]) -> list[str]:
    """Every way this engine's arithmetic departs from qbench's fake quantization, in words."""
    threads = torch.get_num_threads()
    if plan is None:
        return [f"FP32 twin: the float tower exported to ONNX (opset {OPSET}) and run by ORT (float kernels, "
                f"graph optimizations {'all' if optimize else 'off'}, {threads} intra-op thread(s))"]
    notes = [
        f"ONNX QDQ graph (opset {OPSET}); every scale and zero point is an initializer holding qbench's value; "
        f"weights are int8 initializers stored transposed (in, out) with per-column scales",
        "QuantizeLinear: round(x/s) half-to-even + z, saturated to uint8/int8 (qbench: the same formula); a grid "
        "narrower than its storage type is clipped to its float range s*(qmin - z)..s*(qmax - z) first",
    ]
    if optimize:
        notes.append("integer GEMM: int32 accumulation of (q_x - z_x)*q_w, then one float multiply by s_x*s_w and "
                      "the float bias (qbench: a float GEMM of the dequantized operands; the two differ by float "
                      "rounding only)")
    else:
        notes.append("simulated twin: the same QDQ file with graph optimizations off, so ORT dequantizes and runs a "
                     "float MatMul (no integer kernels)")
    if any(layer.kind == "patch_conv" for layer in plan.layers):
        notes.append("patch convolution run as Reshape/Transpose + MatMul over non-overlapping patches "
                     "(the same products as the convolution, summed in another order)")
    weight_only = [layer.name for layer in plan.layers if layer.activation is None]
    if weight_only:
        notes.append(f"{len(weight_only)} weight-only layer(s) (float inputs) run on float activations: ORT fuses "
                     f"their DequantizeLinear + MatMul into MatMulNBits with accuracy_level "
                     f"{WEIGHT_ONLY_ACCURACY_LEVEL} (int8 weights, float32 compute), not an integer GEMM "
                     f"({_listed(weight_only)})")
    missing = [layer.name for layer in plan.layers if layer.name not in int8_layers and layer.name not in weight_only]
    if optimize and missing:
        notes.append(f"{len(missing)} plan layer(s) with quantized inputs did not fuse into an integer kernel and ran "
                     f"as QuantizeLinear/DequantizeLinear + float MatMul ({_listed(missing)})")
    notes += [f"float op: {entry}" for entry in plan.float_ops]
    notes += [f"simulated in float (fake quantization as ONNX float ops): {entry}" for entry in plan.simulated]
    notes.append(f"{threads} intra-op thread(s), graph optimizations {'all' if optimize else 'off'}")
    return notes


def _deploy(vlm: Any, plan: ExportPlan | None, *, device: str, optimize: bool,
            workdir: str | Path | None) -> DeployedModel:
    """Export, lower, open the session and wrap the copy of ``vlm`` (shared by :func:`build` and
    :func:`simulated_twin`)."""
    refuse_unsupported(plan.layers if plan is not None else ())
    providers = providers_for(device)
    directory, owned = _workdir(workdir)
    tower = plan.tower if plan is not None else "visual"
    try:
        root = tower_module_name(vlm, tower)
        original = vlm.model.get_submodule(root)
        path = directory / ("tower_qdq.onnx" if plan is not None else "tower_fp32.onnx")
        export_tower(vlm, plan, path, tower)  # works on its own copy of the tower
        # the integer ops are read from the optimized graph ORT writes (not needed for the float twin)
        optimized_path = directory / (path.stem + "_optimized.onnx") if plan is not None and optimize else None
        session = ort.InferenceSession(str(path), session_options(optimize, optimized_path), providers=providers)
        ops = optimized_ops(optimized_path) if optimized_path is not None else []
        attributes = {key: getattr(original, key) for key in ("image_size", "output_dim", "patch_size")
                      if hasattr(original, key)}
        # copy everything but the tower, which the session replaces
        deployed = copy.deepcopy(vlm, {id(original): nn.Identity()}).eval()
        module = OnnxRuntimeTower(session, path, attributes, optimize)
        set_submodule(deployed.model, root, module)
        if hasattr(deployed, "clear_caches"):
            deployed.clear_caches()
    except BaseException:
        if owned:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    if owned:
        weakref.finalize(module, shutil.rmtree, str(directory), True)
    int8_layers = integer_layers(optimized_path, plan) if plan is not None and optimized_path is not None else []
    int8_ops = ops

    layer_sessions: dict[tuple[str, tuple[int, ...]], ort.InferenceSession] = {}

    def run_layer(name: str, x: torch.Tensor) -> torch.Tensor:
        """Plan layer ``name`` alone on ``x``, as a one-layer ORT model built by the same lowering code."""
        if plan is None:
            raise KeyError("the FP32 twin has no integer layers")
        layer = plan.layer(name)
        shape = tuple(int(size) for size in x.shape)
        key = (name, shape[1:] if layer.kind == "patch_conv" else (len(shape), shape[-1]))
        if key not in layer_sessions:
            model = single_layer_model(layer, shape)
            layer_sessions[key] = ort.InferenceSession(model.SerializeToString(), session_options(optimize),
                                                       providers=providers)
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(layer_sessions[key].run(None, {"x": array})[0]).to(x.device)

    def exported() -> dict[str, dict[str, Any]]:
        """The integers, scales and zero points read back from the ONNX file the session was built from."""
        if plan is None:
            return {}
        return read_back(onnx.load(str(path)), plan)

    return DeployedModel(vlm=deployed, engine=ENGINE, version=ort.__version__, device=device,
                         int8_layers=int8_layers, int8_ops=int8_ops, notes=_notes(plan, optimize, int8_layers),
                         run_layer=run_layer, exported=exported)


def build(vlm: Any, plan: ExportPlan | None, *, device: str = "cpu", compile: bool = True,
          workdir: str | Path | None = None) -> DeployedModel:
    """``vlm`` with its image tower on ONNX Runtime (the engine contract of :mod:`qbench.engine.deploy.engines`).

    ``plan`` None: the FP32 twin (the float tower on ORT). ``compile`` is accepted for the contract; ORT always
    runs its graph optimizations (they are what fuses the QDQ pairs into integer kernels). ``workdir``: where the
    ONNX files go (default: a temporary directory removed with the model; never the repository).
    """
    return _deploy(vlm, plan, device=device, optimize=True, workdir=workdir)


def simulated_twin(vlm: Any, plan: ExportPlan, *, device: str = "cpu",
                   workdir: str | Path | None = None) -> DeployedModel:
    """The same QDQ graph run with ORT's graph optimizations off: the engine's own simulated model (Q/DQ in float,
    float MatMul), for separating "integer kernel" from "ONNX export" differences."""
    return _deploy(vlm, plan, device=device, optimize=False, workdir=workdir)
