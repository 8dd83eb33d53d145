"""Samples in calibration and validation data: each input's sample axis (axis 0, a state's batch axis, none)."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxprune.calibration import load_calibration
from onnxprune.feeds import batch_axes, input_specs
from onnxprune.validate import holdout

from .conftest import run_cli


def _model(inputs, nodes, outputs, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _recurrent_like() -> onnx.ModelProto:
    """input [n, t], state [2, n, 4], sr a 0-d int64 (shared by every sample), like a streaming VAD."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "t"]),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "n", 4]),
              helper.make_tensor_value_info("sr", TensorProto.INT64, [])]
    nodes = [helper.make_node("ReduceSum", ["state"], ["s"], axes=[0, 2], keepdims=0),
             helper.make_node("Unsqueeze", ["s", "one"], ["s1"]),
             helper.make_node("Add", ["x", "s1"], ["y"])]
    one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    return _model(inputs, nodes, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "t"])], [one])


def test_batch_axes_follow_the_declared_shapes():
    axes = batch_axes(input_specs(_recurrent_like()))
    assert axes == {"x": 0, "state": 1, "sr": None}


def test_calibration_splits_each_input_along_its_own_sample_axis():
    rng = np.random.default_rng(0)
    feed = {"x": rng.normal(size=(5, 8)).astype(np.float32),
            "state": rng.normal(size=(2, 5, 4)).astype(np.float32),
            "sr": np.array(16000, dtype=np.int64)}
    batches = load_calibration([feed], _recurrent_like(), batch=2)
    assert [b["x"].shape[0] for b in batches] == [2, 2, 1]
    assert [b["state"].shape for b in batches] == [(2, 2, 4), (2, 2, 4), (2, 1, 4)]
    assert all(b["sr"].shape == () and int(b["sr"]) == 16000 for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["state"] for b in batches], axis=1), feed["state"])
    kept, (validation, info) = holdout(batches, "calib.npz", batch_axes(input_specs(_recurrent_like())))
    assert info["of"] == 5 and info["samples"] == 1 and info["held_out"] == [4, 4]
    np.testing.assert_array_equal(validation[0]["state"], feed["state"][:, 4:5])
    assert sum(b["x"].shape[0] for b in kept) == 4 and int(validation[0]["sr"]) == 16000


def test_data_with_several_samples_for_a_one_sample_model(tmp_path):
    """A model fixed to batch 1 validates each sample of --data in its own run (it used to exit 8)."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32).tolist())
    model = _model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                   [helper.make_node("MatMul", ["x", "w"], ["y"])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w])
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32))
    code, _, err = run_cli(tmp_path / "m.onnx", "--sparsity", "0.5", "-o", tmp_path / "o.onnx",
                             "--data", tmp_path / "d.npz", "--report", tmp_path / "r.json", "--runs", "1")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["validation"]["inputs"]["samples"] == 3
    assert report["validation"]["inputs"]["shapes"] == {"x": [1, 4]}
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 5), dtype=np.float32))  # a wrong non-sample dim still fails
    code, _, err = run_cli(tmp_path / "m.onnx", "--sparsity", "0.5", "-o", tmp_path / "o2.onnx",
                           "--data", tmp_path / "bad.npz")
    assert code == 8 and "has shape [3, 5]" in err and not (tmp_path / "o2.onnx").exists()
