"""Layer weights read through constant Slice/Concat of a stored tensor: unstructured and N:M pruning score each
block as its layer's weight and zero the entries in the stored tensor (union where blocks overlap)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.analysis.weights import find_prunable_weights
from onnxprune.passes.unstructured import nm_mask, zero_smallest


def _slice(name: str, src: str, start: int, end: int, axis: int, step: int = 1):
    consts = [numpy_helper.from_array(np.array([v], np.int64), f"{name}.{k}")
              for k, v in (("s", start), ("e", end), ("a", axis), ("p", step))]
    return helper.make_node("Slice", [src, *(c.name for c in consts)], [name], name=name), consts


def _model(blocks: list[tuple[int, int, int, int]], stored: tuple[int, int], k: int, seed: int = 0):
    """x [2, k] -> one MatMul per block (start, end, axis, step) of the stored weight W; outputs y0, y1..."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(stored).astype(np.float32)
    nodes, inits, outputs = [], [numpy_helper.from_array(w, "W")], []
    for i, (start, end, axis, step) in enumerate(blocks):
        node, consts = _slice(f"block{i}", "W", start, end, axis, step)
        nodes += [node, helper.make_node("MatMul", ["x", f"block{i}"], [f"y{i}"], name=f"mm{i}")]
        inits += consts
        width = w[_block(w, start, end, axis, step)].shape[1]
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2, width]))
    graph = helper.make_graph(nodes, "sliced", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), w


def _stored(model: onnx.ModelProto) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "W"))


def _block(w: np.ndarray, start: int, end: int, axis: int, step: int) -> tuple:
    index = [slice(None)] * w.ndim
    index[axis] = slice(start, end, step)
    return tuple(index)


def test_each_block_is_a_layer_weight_read_along_its_consumer_axis():
    model, _ = _model([(0, 4, 1, 1), (4, 8, 1, 1)], (6, 8), 6)
    found = {p.name: p for p in find_prunable_weights(model)}
    assert set(found) == {"block0", "block1"}
    assert found["block0"].weight.kind == "sliced" and found["block0"].weight.shape == (6, 4)
    assert found["block0"].reduction_axis == 0 and [s.name for s in found["block0"].weight.sources] == ["W"]


def test_sparsity_zeroes_the_smallest_of_each_block_in_the_stored_tensor():
    blocks = [(0, 4, 1, 1), (4, 8, 1, 1)]
    model, w = _model(blocks, (6, 8), 6)
    pruned, result = onnxprune.prune(model, sparsity=0.5)
    expected = np.zeros_like(w, dtype=bool)
    for start, end, axis, step in blocks:
        where = _block(w, start, end, axis, step)
        block = w[where]
        expected[where] = zero_smallest(np.abs(block).reshape(-1), block.size // 2).reshape(block.shape)
    np.testing.assert_array_equal(_stored(pruned) == 0, expected)
    tensors = result.to_dict()["passes"][0]["details"]["tensors"]
    assert {t["weight"]: t["sources"] for t in tensors} == {"block0": ["W"], "block1": ["W"]}
    onnx.checker.check_model(pruned, full_check=True)


def test_nm_groups_run_along_the_consumer_input_axis_of_strided_blocks():
    blocks = [(0, 8, 0, 2), (1, 8, 0, 2)]  # even rows and odd rows: each MatMul's K axis is every other stored row
    model, w = _model(blocks, (8, 6), 4)
    pruned, _ = onnxprune.prune(model, pattern="2:4")
    expected = np.zeros_like(w, dtype=bool)
    for start, end, axis, step in blocks:
        where = _block(w, start, end, axis, step)
        expected[where] = nm_mask(w[where], 0, 2, 4)
    got = _stored(pruned) == 0
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, nm_mask(w, 0, 2, 4))  # not the stored tensor's own consecutive groups
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    out = ort.InferenceSession(pruned.SerializeToString()).run(None, {"x": x})
    np.testing.assert_allclose(out[0], x @ (_stored(pruned)[0::2]), rtol=1e-5)


def test_overlapping_blocks_zero_the_union_of_their_masks():
    blocks = [(0, 6, 1, 1), (2, 8, 1, 1)]  # columns 2..5 are read by both layers
    model, w = _model(blocks, (6, 8), 6)
    pruned, _ = onnxprune.prune(model, sparsity=0.5)
    expected = np.zeros_like(w, dtype=bool)
    for start, end, axis, step in blocks:
        where = _block(w, start, end, axis, step)
        block = w[where]
        expected[where] |= zero_smallest(np.abs(block).reshape(-1), block.size // 2).reshape(block.shape)
    np.testing.assert_array_equal(_stored(pruned) == 0, expected)
    for start, end, axis, step in blocks:  # every layer reaches at least its share
        assert np.mean(_stored(pruned)[_block(w, start, end, axis, step)] == 0) >= 0.5
