"""Exporter quirks (guide section 3): quantized models, subgraphs, custom ops, fp16/bf16, odd weight paths."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxprune
from onnxprune.analysis.weights import find_prunable_weights
from onnxprune.errors import UnsupportedError

from .conftest import FIXTURES, run_cli
from .oracle import masked_and_removed, random_choice, relative_error

Q = FIXTURES / "quirks"


def feeds(model: onnx.ModelProto, seed: int = 0):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    out = {}
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) else 2 for d in arg.shape]
        dtype = np.float16 if arg.type == "tensor(float16)" else np.float32
        out[arg.name] = rng.standard_normal(shape).astype(dtype)
    return out


def run(model, inputs):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)


def same_outputs_shape(a, b):
    inputs = feeds(a)
    assert [o.shape for o in run(a, inputs)] == [o.shape for o in run(b, inputs)]


@pytest.mark.parametrize("kind", ["qdq", "qoperator", "dynamic"])
def test_quantized_structured_is_refused_naming_ops(tmp_path, kind):
    code, _, err = run_cli(Q / f"quantized_{kind}.onnx", "--structured", "--sparsity", "0.5", "-o", tmp_path / "o.onnx")
    assert code == UnsupportedError.exit_code
    assert "quantized" in err and ("QuantizeLinear" in err or "ConvInteger" in err or "QLinearConv" in err)
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("kind", ["qdq", "qoperator"])
def test_quantized_unstructured_without_float_weights_is_refused(tmp_path, kind):
    code, _, err = run_cli(Q / f"quantized_{kind}.onnx", "--sparsity", "0.5", "-o", tmp_path / "o.onnx")
    assert code == UnsupportedError.exit_code and "no float weights" in err


def test_dynamic_quantized_prunes_only_float_weights():
    model = onnx.load(str(Q / "quantized_dynamic.onnx"))
    pruned, result = onnxprune.prune(model, sparsity=0.5)
    onnx.checker.check_model(pruned, full_check=True)
    names = {t["weight"] for t in result.to_dict()["passes"][0]["details"]["tensors"]}
    assert names == {"fc1.weight", "fc2.weight"}  # the convs became ConvInteger with int8 weights
    for init in pruned.graph.initializer:
        if init.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            original = next(i for i in model.graph.initializer if i.name == init.name)
            assert init.SerializeToString() == original.SerializeToString(), "quantized weights untouched"
    same_outputs_shape(model, pruned)


@pytest.mark.parametrize("name, subgraph_weights", [("if_subgraph", {"then.weight", "else.weight"}),
                                                     ("loop_subgraph", {"body.weight"})])
def test_unstructured_reaches_subgraph_weights(name, subgraph_weights):
    model = onnx.load(str(Q / f"{name}.onnx"))
    pruned, result = onnxprune.prune(model, sparsity=0.5)
    onnx.checker.check_model(pruned, full_check=True)
    names = {t["weight"] for t in result.to_dict()["passes"][0]["details"]["tensors"]}
    assert subgraph_weights <= names
    same_outputs_shape(model, pruned)


@pytest.mark.parametrize("name", ["if_subgraph", "loop_subgraph"])
def test_structured_leaves_control_flow_intact(name):
    model = onnx.load(str(Q / f"{name}.onnx"))
    pruned, result = onnxprune.prune(model, structured=True, sparsity=0.5)
    onnx.checker.check_model(pruned, full_check=True)
    frozen = result.to_dict()["passes"][0]["details"]["frozen"]
    assert any("control-flow" in f["reason"] for f in frozen)
    inputs = feeds(model)
    np.testing.assert_allclose(run(model, inputs)[0], run(pruned, inputs)[0], rtol=1e-6)


def test_onnxruntime_fused_activation_prunes_and_model_runs():
    """com.microsoft::FastGelu between two MatMuls has a rule: the neurons prune (unknown custom ops freeze:
    see test_structured_oracle's com.example::FancyNorm)."""
    model = onnx.load(str(Q / "custom_domain.onnx"))
    pruned, result = onnxprune.prune(model, structured=True, sparsity=0.5)
    details = result.to_dict()["passes"][0]["details"]
    assert details["channels_removed"] == 16  # half the 32 neurons; the output channels stay (graph output)
    same_outputs_shape(model, pruned)
    pruned, _ = onnxprune.prune(model, pattern="2:4")
    same_outputs_shape(model, pruned)


def test_weight_paths_transpose_bf16_fp16():
    model = onnx.load(str(Q / "weight_paths.onnx"))
    pruned, result = onnxprune.prune(model, pattern="2:4")
    tensors = {t["weight"]: t for t in result.to_dict()["passes"][0]["details"]["tensors"]}
    assert set(tensors) == {"t.weight", "bf16.weight", "fp16.weight"}
    weights = {w.name: w for w in find_prunable_weights(pruned)}
    assert weights["t.weight"].reduction_axis == 1  # MatMul reads the transposed weight along its rows
    values = weights["t.weight"].weight.array()
    assert (np.count_nonzero(values.reshape(32, 4, 4) == 0, axis=-1) >= 2).all()
    assert weights["bf16.weight"].weight.tensor.data_type == onnx.TensorProto.BFLOAT16
    assert weights["fp16.weight"].weight.tensor.data_type == onnx.TensorProto.FLOAT16
    same_outputs_shape(model, pruned)


def test_weight_paths_structured_oracle():
    model = onnx.load(str(Q / "weight_paths.onnx"))
    inputs = feeds(model)
    for seed in (0, 1):
        choice = random_choice(model, 0.5, seed)
        assert choice
        masked, removed = masked_and_removed(model, choice)
        onnx.checker.check_model(removed, full_check=True)
        assert relative_error(run(masked, inputs), run(removed, inputs)) <= 1e-5


def test_float16_model_structured_oracle():
    model = onnx.load(str(Q / "float16.onnx"))
    inputs = feeds(model)
    choice = random_choice(model, 0.5, 0)
    masked, removed = masked_and_removed(model, choice)
    onnx.checker.check_model(removed, full_check=True)
    assert relative_error(run(masked, inputs), run(removed, inputs)) <= 1e-3  # float16 arithmetic
    pruned, _ = onnxprune.prune(model, sparsity=0.5, validate=True)
    assert pruned.graph.initializer[0].data_type == onnx.TensorProto.FLOAT16


def test_scan_subgraph_weights():
    """A Scan whose body multiplies each step by a body-local weight: unstructured reaches it, structured leaves it."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(9)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "scan.weight"], ["mm"], name="scan_mm"),
         helper.make_node("Add", ["state_in", "mm"], ["state_out"], name="scan_add"),
         helper.make_node("Identity", ["mm"], ["y_t"], name="scan_out")],
        "body", [helper.make_tensor_value_info("state_in", TensorProto.FLOAT, [8]),
                 helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [8])],
        [helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [8]),
         helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [8])],
        [numpy_helper.from_array((rng.standard_normal((8, 8)) * 0.3).astype(np.float32), "scan.weight")])
    nodes = [helper.make_node("MatMul", ["input", "in.weight"], ["seq"], name="in_mm"),
             helper.make_node("Scan", ["init", "seq"], ["final", "ys"], body=body, num_scan_inputs=1, name="scan")]
    graph = helper.make_graph(nodes, "scan", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [5, 8])],
                              [helper.make_tensor_value_info("ys", TensorProto.FLOAT, [5, 8])],
                              [numpy_helper.from_array((rng.standard_normal((8, 8)) * 0.3).astype(np.float32), "in.weight"),
                               numpy_helper.from_array(np.zeros(8, np.float32), "init")])
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info("final", TensorProto.FLOAT, [8]),
                         helper.make_tensor_value_info("ys", TensorProto.FLOAT, [5, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    pruned, result = onnxprune.prune(model, sparsity=0.5)
    assert {t["weight"] for t in result.to_dict()["passes"][0]["details"]["tensors"]} == {"in.weight", "scan.weight"}
    same_outputs_shape(model, pruned)
    pruned, result = onnxprune.prune(model, structured=True, sparsity=0.5)
    assert any("control-flow" in f["reason"] for f in result.to_dict()["passes"][0]["details"]["frozen"])
    inputs = feeds(model)
    np.testing.assert_allclose(run(model, inputs)[1], run(pruned, inputs)[1], rtol=1e-6)
