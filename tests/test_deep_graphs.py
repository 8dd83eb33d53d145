"""Graph size is not recursion depth: a 10,000-node element-wise chain between two layers prunes structurally."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxprune

CHAIN = 10_000
C = 8


def deep_chain(length: int = CHAIN) -> onnx.ModelProto:
    """Conv (C channels, with bias) -> Add(constant) -> (Relu, Mul(constant), LeakyRelu) repeated -> 1x1 Conv -> output.

    The chain maps zero to zero except for the first Add, so deciding whether removed channels are silent walks
    back through the whole chain; the Add makes them carry a constant, which folding must measure and fold."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((C, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(C).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((4, C, 1, 1)) * 0.3).astype(np.float32), "w2"),
             numpy_helper.from_array(np.float32(0.5), "shift"), numpy_helper.from_array(np.float32(1.0001), "gain")]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["t0"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["t0", "shift"], ["t1"], name="shift")]
    for i in range(1, length):
        op = ("Relu", "Mul", "LeakyRelu")[i % 3]
        nodes.append(helper.make_node(op, [f"t{i}"] + (["gain"] if op == "Mul" else []), [f"t{i + 1}"], name=f"n{i}"))
    nodes.append(helper.make_node("Conv", [f"t{length}", "w2"], ["output"], name="conv2"))
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # 10,000 nodes: build quickly
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]


def test_ten_thousand_elementwise_ops_between_two_convs_prune_with_folding():
    model = deep_chain()
    pruned, result = onnxprune.prune(model, structured=True, sparsity=0.5)  # constant folding is on by default
    details = result.to_dict()["passes"][0]["details"]
    assert details["folded_constants"]["exact"] == 1  # the constant the removed channels carry went into conv2's bias
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    kept_w1 = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer}["w1"]
    # l1 keeps the half of conv1's filters with the largest absolute sums
    expected = np.sort(np.argsort(-np.abs(weights["w1"]).reshape(C, -1).sum(axis=1), kind="stable")[:C // 2])
    kept = [int(np.flatnonzero((weights["w1"] == row).all(axis=(1, 2, 3)))[0]) for row in kept_w1]
    assert kept == expected.tolist()
    assert len(pruned.graph.node) == CHAIN + 2  # every link of the chain stays, now C/2 wide
    onnx.checker.check_model(pruned, full_check=True)
    # oracle with compensation: the removed channels' filters zeroed, shapes unchanged; each still outputs its bias,
    # shifted and scaled along the chain (a constant), which the pruned model carries in conv2's folded bias
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    w1 = next(init for init in zeroed.graph.initializer if init.name == "w1")
    values = weights["w1"].copy()
    values[np.setdiff1d(np.arange(C), expected)] = 0
    w1.CopyFrom(numpy_helper.from_array(values, "w1"))
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    reference, candidate = run(zeroed, x), run(pruned, x)
    assert candidate.shape == (1, 4, 8, 8)
    assert np.linalg.norm(candidate - reference) <= 1e-5 * np.linalg.norm(reference)
