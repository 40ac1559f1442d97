"""The ONNX Runtime engine (issue 17): qbench's own integers and scales in an ONNX QDQ graph, run on ORT int8 kernels.

Defining properties, on the built-in toy model quantized W8A8 by minmax and smoothquant: the graph's initializers
read back equal the plan (and the quantizers' frozen state) exactly, and a perturbed one is caught; each integer
layer alone matches the simulated layer on the inputs it really receives to 1e-6 relative L2; the whole tower agrees
with the simulated model on >= 99 % of toy-id predictions while running integer operators; the caller's model is
untouched; per-token dynamic activations (QuaRot) and non-int8 grids are refused in one line.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from qbench.data import DatasetRequest  # noqa: E402
from qbench.engine.deploy import onnx_engine  # noqa: E402
from qbench.engine.deploy.engines import build as build_engine  # noqa: E402
from qbench.engine.deploy.plan import capture_layer_inputs, plan_export  # noqa: E402
from qbench.engine.evaluate import EvalRequest, _calibration, _load, quantize_model, resolve  # noqa: E402
from qbench.errors import QbenchError  # noqa: E402
from qbench.plugins import get_plugin_manager  # noqa: E402
from qbench.registry import build_registry  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

METHODS = ("minmax", "smoothquant")
N_IMAGES = 400


class _Quiet:
    """A progress reporter that reports nothing."""

    def log(self, message: str) -> None:
        """Drop the line."""

    def track(self, items, description):
        """Iterate without drawing anything."""
        return iter(items)


def _quantized(quantizer: str, bits: str = "w8a8"):
    """The toy model and toy-id data, quantized by ``quantizer`` the way ``qbench eval`` does (built-ins only)."""
    registry = build_registry(get_plugin_manager(load_entrypoints=False))
    resolved = resolve(EvalRequest(quantizer=quantizer, bits=bits, suites=("toy-id",), limit=N_IMAGES), registry)
    fp32, datasets, _ = _load(resolved, _Quiet())
    calibration = (_calibration(resolved, fp32, DatasetRequest(None, resolved.request.seed))
                   if resolved.proxy and resolved.quantizer.needs_data else None)
    simulated = quantize_model(resolved, fp32, calibration, _Quiet()).model.eval()
    return simulated, next(iter(datasets.values())), fp32.eval()


@pytest.fixture(scope="module", params=METHODS)
def case(request):
    """(method, simulated model, plan, deployed model, pixels, dataset) for one W8A8 method."""
    simulated, dataset, _ = _quantized(request.param)
    plan = plan_export(simulated)
    assert plan.exportable and all(layer.activation is not None and layer.activation.bits == 8 for layer in plan.layers)
    deployed = onnx_engine.build(simulated, plan)
    pixels = torch.stack([simulated.preprocess(dataset.image(index)) for index in range(N_IMAGES)])
    return request.param, simulated, plan, deployed, pixels, dataset


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against reference ``b``."""
    return float((a - b).norm() / b.norm())


def test_initializers_read_back_equal_the_plan_and_the_quantizers_exactly(case):
    method, simulated, plan, deployed, _, _ = case
    exported = deployed.exported()
    assert set(exported) == {layer.name for layer in plan.layers}
    for layer in plan.layers:
        got, module = exported[layer.name], simulated.model.get_submodule(layer.name)
        assert got["weight_int"].dtype == torch.int16 and torch.equal(got["weight_int"], layer.weight_int)
        assert torch.equal(got["weight_scale"], layer.weight_scale())
        assert torch.equal(got["act_scale"], layer.activation.scale)
        assert torch.equal(got["act_zero_point"], layer.activation.zero_point)
        # and against the quantizers' frozen state itself, not only the plan derived from it
        assert torch.equal(got["act_scale"], module.act_quantizer.scale.float().reshape(1))
        assert torch.equal(got["act_zero_point"], module.act_quantizer.zero_point.float().reshape(1))
        assert torch.equal(got["weight_scale"], module.weight_quantizer.scale.float().reshape(-1))
        with torch.no_grad():
            fake = module.weight_quantizer(module.weight).float().reshape(layer.out_features, -1)
        assert torch.equal(got["weight_scale"][:, None] * got["weight_int"].float(), fake)


def test_graph_stores_int8_weights_and_native_zero_points_only(case):
    _, _, plan, deployed, _, _ = case
    model = onnx.load(str(deployed.vlm.model.visual.path))
    tensors = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    for layer in plan.layers:
        assert tensors[f"{layer.name}.weight_int8"].dtype.name == "int8"
        assert tensors[f"{layer.name}.weight_int8"].shape == (layer.in_features, layer.out_features)
        assert tensors[f"{layer.name}.act_zero_point"].dtype.name == "uint8"  # qbench's asymmetric (0, 255) grid
    weight_shapes = {shape for layer in plan.layers
                     for shape in ((layer.out_features, layer.in_features), (layer.in_features, layer.out_features))}
    float_weights = [name for name, array in tensors.items() if array.dtype.name == "float32" and array.shape in weight_shapes]
    assert float_weights == [], f"float weights left for quantized layers: {float_weights[:3]}"
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}  # no placeholder left


def test_a_perturbed_initializer_is_caught_by_the_read_back(case):
    _, _, plan, deployed, _, _ = case
    model = onnx.load(str(deployed.vlm.model.visual.path))
    layer = plan.layers[1]
    for tensor in model.graph.initializer:
        if tensor.name == f"{layer.name}.weight_int8":
            codes = numpy_helper.to_array(tensor).copy()
            codes[0, 0] = codes[0, 0] + 1 if codes[0, 0] < 127 else codes[0, 0] - 1
            tensor.CopyFrom(numpy_helper.from_array(codes, tensor.name))
        if tensor.name == f"{layer.name}.act_zero_point":
            zero = numpy_helper.to_array(tensor).copy()
            tensor.CopyFrom(numpy_helper.from_array(zero + 1, tensor.name))
    got = onnx_engine.read_back(model, plan)[layer.name]
    assert not torch.equal(got["weight_int"], layer.weight_int)
    assert not torch.equal(got["act_zero_point"], layer.activation.zero_point)
    untouched = onnx_engine.read_back(model, plan)[plan.layers[0].name]
    assert torch.equal(untouched["weight_int"], plan.layers[0].weight_int)


def test_each_integer_layer_matches_the_simulated_layer_on_its_real_inputs(case):
    _, simulated, plan, deployed, pixels, _ = case
    inputs = capture_layer_inputs(simulated, plan, pixels[:8]).inputs
    assert set(inputs) == {layer.name for layer in plan.layers}
    errors = {}
    for layer in plan.layers:
        for scale in (1, 4):  # the real inputs, and inputs far outside the calibrated range (saturation)
            x = scale * inputs[layer.name]
            with torch.no_grad():
                reference = simulated.model.get_submodule(layer.name)(x)
            engine = deployed.run_layer(layer.name, x)
            assert engine.shape == reference.shape
            errors[(layer.name, scale)] = _rel(engine, reference)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-6, (worst, errors[worst])


def test_whole_tower_agrees_with_the_simulated_model_on_integer_kernels(case):
    _, simulated, plan, deployed, pixels, dataset = case
    assert "MatMulIntegerToFloat" in deployed.int8_ops
    assert deployed.int8_layers == [layer.name for layer in plan.layers]  # every layer fused, the patch conv included
    assert deployed.engine == "onnxruntime" and deployed.version == ort.__version__
    with torch.no_grad():
        reference = simulated.encode_image(pixels)
        real = deployed.vlm.encode_image(pixels)
        few = deployed.vlm.encode_image(pixels[:3])  # another batch size through the same graph
    head = simulated.zero_shot_head(dataset.classnames, dataset.templates)
    agreement = float(((reference @ head.T).argmax(1) == (real @ deployed.vlm.zero_shot_head(
        dataset.classnames, dataset.templates).T).argmax(1)).float().mean())
    assert agreement >= 0.99
    assert 0 < _rel(real, reference) < 0.05  # real int8 is not bit-exact, but close
    assert torch.allclose(few, real[:3], atol=1e-6)
    assert torch.equal(deployed.vlm.encode_text(simulated.tokenize(["a photo"])),
                       simulated.encode_text(simulated.tokenize(["a photo"])))


def test_the_callers_model_is_unchanged_and_the_deployed_one_copies_but_never_pickles(case):
    _, simulated, plan, deployed, pixels, _ = case
    before = {name: tensor.clone() for name, tensor in simulated.state_dict().items()}
    with torch.no_grad():
        expected = simulated.encode_image(pixels[:4])
    again = onnx_engine.build(simulated, plan)
    assert all(torch.equal(before[name], tensor) for name, tensor in simulated.state_dict().items())
    assert type(simulated.model.visual).__name__ == "VisionTransformer"
    with torch.no_grad():
        assert torch.equal(simulated.encode_image(pixels[:4]), expected)
        assert torch.equal(copy.deepcopy(again.vlm).encode_image(pixels[:4]), again.vlm.encode_image(pixels[:4]))
    with pytest.raises(TypeError):
        pickle.dumps(again.vlm.model.visual)


def test_fp32_twin_and_simulated_twin():
    simulated, dataset, fp32 = _quantized("minmax")
    plan = plan_export(simulated)
    pixels = torch.stack([simulated.preprocess(dataset.image(index)) for index in range(16)])
    twin = onnx_engine.build(fp32, None)
    assert twin.int8_ops == [] and twin.exported() == {}
    with torch.no_grad():
        assert _rel(twin.vlm.encode_image(pixels), fp32.encode_image(pixels)) < 1e-5
    own = onnx_engine.simulated_twin(simulated, plan)
    assert own.int8_ops == [] and own.int8_layers == []
    with torch.no_grad():
        assert _rel(own.vlm.encode_image(pixels), simulated.encode_image(pixels)) < 0.05
    layer = plan.layers[3]
    x = capture_layer_inputs(simulated, plan, pixels[:4]).inputs[layer.name]
    with torch.no_grad():
        assert _rel(own.run_layer(layer.name, x), simulated.model.get_submodule(layer.name)(x)) <= 1e-6


def test_narrow_grids_are_clipped_and_stay_exact():
    """w4a4: 4-bit weights in int8 storage, activations on (0, 15) stored as uint8 behind a Clip to the grid."""
    simulated, dataset, _ = _quantized("minmax", bits="w4a4")
    plan = plan_export(simulated)
    assert all((layer.activation.qmin, layer.activation.qmax) == (0, 15) for layer in plan.layers)
    deployed = onnx_engine.build(simulated, plan)
    pixels = torch.stack([simulated.preprocess(dataset.image(index)) for index in range(4)])
    inputs = capture_layer_inputs(simulated, plan, pixels).inputs
    for layer in plan.layers:
        for x in (inputs[layer.name], 4 * inputs[layer.name]):  # and far outside the calibrated range: clamping
            with torch.no_grad():
                reference = simulated.model.get_submodule(layer.name)(x)
            assert _rel(deployed.run_layer(layer.name, x), reference) <= 1e-6, layer.name
    exported = deployed.exported()
    assert all(torch.equal(exported[layer.name]["weight_int"], layer.weight_int) for layer in plan.layers)
    model = onnx.load(str(deployed.vlm.model.visual.path))
    assert sum(node.op_type == "Clip" for node in model.graph.node) >= len(plan.layers)


def test_per_token_activations_are_refused_in_one_line():
    simulated, _, _ = _quantized("quarot")
    plan = plan_export(simulated)
    assert plan.exportable  # torchao can run it; ONNX cannot
    with pytest.raises(QbenchError) as caught:
        build_engine("onnxruntime", simulated, plan)
    message = str(caught.value)
    first = plan.layers[0].name
    assert message == (f"not exportable for onnxruntime: {first}: per-token dynamic activations (ONNX has no "
                       "per-row dynamic QuantizeLinear); use --engine torchao")
    assert "\n" not in message


def test_no_cuda_provider_is_one_line():
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    with pytest.raises(QbenchError, match="no CUDAExecutionProvider") as caught:
        onnx_engine.providers_for("cuda")
    assert "\n" not in str(caught.value)


def test_float_maps_hooked_on_integer_layers_run_in_the_graph():
    """A float map attached before one integer layer and after another (QuaRot's mechanism) is traced into the
    graph: the engine follows the mapped model, and the per-layer check sees the mapped input."""
    from qbench.quant.rotation import MatrixMap, derived_generator, random_orthogonal

    simulated, dataset, _ = _quantized("minmax")
    pixels = torch.stack([simulated.preprocess(dataset.image(index)) for index in range(64)])
    with torch.no_grad():
        unmapped = simulated.encode_image(pixels)
    block = simulated.model.visual.transformer.resblocks[0].mlp
    width = block.c_fc.out_features
    MatrixMap(random_orthogonal(width, derived_generator(0, "pre")).float(), "test map").attach_before(block.c_proj, "pre_map")
    MatrixMap(random_orthogonal(width, derived_generator(0, "post")).float(), "test map").attach_after(block.c_fc, "post_map")
    plan = plan_export(simulated)
    assert len(plan.float_ops) == 2
    deployed = onnx_engine.build(simulated, plan)
    assert any("test map" in note for note in deployed.notes)
    with torch.no_grad():
        mapped = simulated.encode_image(pixels)
        real = deployed.vlm.encode_image(pixels)
    assert _rel(mapped, unmapped) > 0.05  # the maps matter ...
    assert _rel(real, mapped) < 0.02  # ... and the engine runs them
    name = "visual.transformer.resblocks.0.mlp.c_proj"
    x = capture_layer_inputs(simulated, plan, pixels[:4]).inputs[name]
    with torch.no_grad():
        reference = block.c_proj.forward(x)  # the kernel alone: x is already mapped
    assert _rel(deployed.run_layer(name, x), reference) <= 1e-6


def test_a_simulated_convolution_exports_as_its_float_fake_quantization():
    """A quantized conv no integer GEMM takes (here: per-token dynamic input) stays the simulated module and is
    exported as its fake quantization in float ops; the rest still runs on integer kernels."""
    from qbench.quant.modules import TensorQuantizer

    simulated, dataset, _ = _quantized("minmax")
    conv = simulated.model.visual.conv1
    conv.act_quantizer = TensorQuantizer(8, symmetric=True, granularity="per_token", dynamic=True)
    conv.act_quantizer.set_mode("quantize")
    plan = plan_export(simulated)
    assert [entry.name for entry in plan.simulated] == ["visual.conv1"] and plan.exportable
    deployed = onnx_engine.build(simulated, plan)
    assert "visual.conv1" not in deployed.int8_layers and len(deployed.int8_layers) == len(plan.layers)
    assert any(note.startswith("simulated in float") for note in deployed.notes)
    pixels = torch.stack([simulated.preprocess(dataset.image(index)) for index in range(32)])
    with torch.no_grad():
        assert _rel(deployed.vlm.encode_image(pixels), simulated.encode_image(pixels)) < 0.02
    # the exported convolution alone (pixels -> Conv output, cut out of the graph) is the simulated layer's value
    model = onnx.load(str(deployed.vlm.model.visual.path))
    node = next(node for node in model.graph.node if node.op_type == "Conv")
    assert {"Round", "ReduceMax", "ReduceMin"} <= {node.op_type for node in model.graph.node}  # fake quant in float
    piece = onnx.utils.Extractor(model).extract_model(["pixels"], [node.output[0]])
    session = ort.InferenceSession(piece.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = conv(pixels)
    assert _rel(torch.from_numpy(session.run(None, {"pixels": pixels.numpy()})[0]), expected) <= 1e-6


def test_grids_onnx_cannot_hold_are_refused_in_one_line(case):
    import dataclasses

    _, simulated, plan, _, _, _ = case
    layer = plan.layers[2]
    dynamic = dataclasses.replace(layer, activation=dataclasses.replace(layer.activation, dynamic=True, scale=None,
                                                                          zero_point=None))
    wide = dataclasses.replace(layer, activation=dataclasses.replace(layer.activation, qmin=-300, qmax=300))
    for broken, reason in ((dynamic, "dynamic per_tensor activations"), (wide, "does not fit 8 bits")):
        with pytest.raises(QbenchError) as caught:
            onnx_engine.build(simulated, dataclasses.replace(plan, layers=(broken,) + plan.layers[3:]))
        assert str(caught.value).startswith(f"not exportable for onnxruntime: {layer.name}: ")
        assert reason in str(caught.value) and "\n" not in str(caught.value)


def test_an_exporter_failure_is_one_line_and_leaves_no_file(case, monkeypatch, tmp_path):
    _, simulated, plan, _, _, _ = case

    def fail(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::weird' to ONNX opset version 17 is not supported\n<graph dump>")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(QbenchError) as caught:
        onnx_engine.build(simulated, plan, workdir=tmp_path / "onnx")
    assert str(caught.value) == ("not exportable for onnxruntime: the ONNX exporter failed on the visual tower "
                                 "(RuntimeError: Exporting the operator 'aten::weird' to ONNX opset version 17 is "
                                 "not supported)")
    assert not list((tmp_path / "onnx").glob("*.onnx"))


def test_weight_only_layers_keep_float_activations():
    """w8a16: int8 weight initializers, float inputs. ORT's MatMulNBits fusion must not quantize the activations
    (its default accuracy level would), so each layer and the tower equal the simulated model to float rounding."""
    simulated, dataset, _ = _quantized("minmax", bits="w8a16")
    plan = plan_export(simulated)
    assert all(layer.activation is None for layer in plan.layers)
    deployed = onnx_engine.build(simulated, plan)
    assert deployed.int8_layers == [] and any("MatMulNBits" in note for note in deployed.notes)
    pixels = torch.stack([simulated.preprocess(dataset.image(index)) for index in range(16)])
    inputs = capture_layer_inputs(simulated, plan, pixels).inputs
    for layer in plan.layers:
        with torch.no_grad():
            reference = simulated.model.get_submodule(layer.name)(inputs[layer.name])
        assert _rel(deployed.run_layer(layer.name, inputs[layer.name]), reference) <= 1e-6, layer.name
    with torch.no_grad():
        assert _rel(deployed.vlm.encode_image(pixels), simulated.encode_image(pixels)) <= 1e-5
    exported = deployed.exported()
    assert all(exported[layer.name]["act_scale"] is None for layer in plan.layers)
    assert all(torch.equal(exported[layer.name]["weight_int"], layer.weight_int) for layer in plan.layers)
