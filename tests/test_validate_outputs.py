"""Validation's outputs run a few samples at a time (onnxprune.sessions.run_outputs): bit-identical to the whole
batch, in arrays that hold no session memory, and the whole batch whenever the parts could differ."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxprune
from onnxprune.config import ValidateConfig
from onnxprune.model_file import read_structure
from onnxprune.sessions import ModelSource, output_sample_axes, run_outputs, samples_independent
from onnxprune.specs import batch_axes, input_specs

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
validate_module = sys.modules["onnxprune.validate"]


def save(path, nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, list(inits))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def two_axes_model(path):
    """x [N, 8] -> h = Relu(x W) [N, 16] and its transpose [16, N]: the sample axis is 0 in one output, 1 in the
    other."""
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["h"]),
             helper.make_node("Transpose", ["h"], ["ht"], perm=[1, 0])]
    return save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 16]),
                 helper.make_tensor_value_info("ht", TensorProto.FLOAT, [16, "N"])], [w])


def whole(session, batches):
    return [session.run(None, batch) for batch in batches]


def assert_same(got, want):
    assert len(got) == len(want)
    for got_batch, want_batch in zip(got, want):
        assert len(got_batch) == len(want_batch)
        for a, b in zip(got_batch, want_batch):
            assert a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
            assert a.base is None  # its own memory, not a view of the session's


def session_and_axes(path, threads=1):
    session = ModelSource(path=Path(path)).session("CPUExecutionProvider", threads)
    return session, batch_axes(input_specs(onnx.load(str(path), load_external_data=False)))


def test_sample_axis_of_each_output(tmp_path):
    session, axes = session_and_axes(two_axes_model(tmp_path / "m.onnx"))
    assert output_sample_axes(session, axes) == [0, 1]
    session, axes = session_and_axes(FIXTURES / "transformers" / "bert_ts.onnx")
    assert output_sample_axes(session, axes) == [0, 0]


@pytest.mark.parametrize("samples", [1, 3, 4])
def test_parts_equal_the_whole_batch_bit_for_bit(tmp_path, samples):
    session, axes = session_and_axes(two_axes_model(tmp_path / "m.onnx"))
    rng = np.random.default_rng(1)
    batches = [{"x": rng.standard_normal((n, 8)).astype(np.float32)} for n in (10, 1, 4)]
    assert_same(run_outputs(session, batches, axes, samples), whole(session, batches))


@pytest.mark.parametrize("threads", [1, 2])
def test_conv_net_in_parts_equals_the_whole_batch(threads):
    session, axes = session_and_axes(FIXTURES / "cnn.onnx", threads)
    batches = [{"input": np.random.default_rng(2).standard_normal((9, 3, 32, 32)).astype(np.float32)}]
    assert_same(run_outputs(session, batches, axes, 2), whole(session, batches))


def test_encoder_in_parts_equals_the_whole_batch():
    session, axes = session_and_axes(FIXTURES / "transformers" / "bert_ts.onnx")
    rng = np.random.default_rng(3)
    mask = np.ones((7, 12), np.int64)
    mask[::2, 9:] = 0
    batches = [{"input_ids": rng.integers(0, 100, (7, 12)).astype(np.int64), "attention_mask": mask}]
    assert_same(run_outputs(session, batches, axes, 3), whole(session, batches))


def test_undeclared_sample_axis_runs_the_whole_batch(tmp_path):
    """An output without the inputs' batch name, or one that only claims it: the whole batch's outputs."""
    shape = onnx.numpy_helper.from_array(np.array([2, -1], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]  # [N, 4] -> [2, 2N]: no sample axis
    batches = [{"x": np.random.default_rng(4).standard_normal((6, 4)).astype(np.float32)}]
    for name, dims in (("unnamed", [2, None]), ("claimed", [2, "N"])):
        path = save(tmp_path / f"{name}.onnx", nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)], [shape])
        session, axes = session_and_axes(path)
        assert output_sample_axes(session, axes) == (None if name == "unnamed" else [1])
        for samples in (2, 4):
            assert_same(run_outputs(session, batches, axes, samples), whole(session, batches))


def test_model_that_runs_whole_batches_only(tmp_path):
    """A Reshape to a fixed leading size accepts the whole batch, not its parts: the whole batch runs."""
    shape = onnx.numpy_helper.from_array(np.array([6, -1], np.int64), "shape")
    path = save(tmp_path / "m.onnx", [helper.make_node("Reshape", ["x", "shape"], ["y"])],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [shape])
    session, axes = session_and_axes(path)
    batches = [{"x": np.arange(24, dtype=np.float32).reshape(6, 4)}]
    assert_same(run_outputs(session, batches, axes, 4), whole(session, batches))


@pytest.mark.parametrize("quantize", [None, "dynamic"])
def test_validation_report_does_not_depend_on_the_part_size(tmp_path, monkeypatch, quantize):
    """Dynamic quantization scales each activation over the whole batch: that model runs its batches whole."""
    src = FIXTURES / "cnn.onnx"
    onnxprune.prune(src, tmp_path / "o.onnx", sparsity=0.5, structured=True, quantize=quantize, validate=False)
    np.savez(tmp_path / "data.npz", input=np.random.default_rng(5).standard_normal((11, 3, 32, 32)).astype(np.float32))
    config = ValidateConfig(data=str(tmp_path / "data.npz"), runs=1, warmup=0)
    reports = []
    for samples in (0, 1, 4):
        monkeypatch.setattr(validate_module, "FIDELITY_SAMPLES", samples)
        reports.append(onnxprune.validate(src, tmp_path / "o.onnx", config)["providers"]["CPUExecutionProvider"])
    assert reports[0]["outputs"]["logits"]["cosine"] < 1
    assert all(report["outputs"] == reports[0]["outputs"] for report in reports)


def node_model(*nodes, inits=()):
    graph = helper.make_graph(list(nodes), "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def axes(name, values):
    return onnx.numpy_helper.from_array(np.array(values, np.int64), name)


def test_samples_independent():
    assert samples_independent(onnx.load(str(FIXTURES / "cnn.onnx")))
    assert samples_independent(onnx.load(str(FIXTURES / "transformers" / "bert_ts.onnx")))
    assert not samples_independent(onnx.load(str(FIXTURES / "quirks" / "quantized_dynamic.onnx")))
    mean = helper.make_node("ReduceMean", ["x", "a"], ["y"])
    assert samples_independent(node_model(mean, inits=[axes("a", [-1])]))
    assert samples_independent(node_model(mean, inits=[axes("a", [1])]))
    assert not samples_independent(node_model(mean, inits=[axes("a", [0, 1])]))
    assert not samples_independent(node_model(mean, inits=[axes("a", [-2])]))  # axis 0 of a 2-d tensor
    assert not samples_independent(node_model(helper.make_node("ReduceMean", ["x"], ["y"])))  # every axis
    assert not samples_independent(node_model(mean))  # axes computed at run time: unknown
    constant = helper.make_node("Constant", [], ["a"], value=axes("v", [1]))
    assert samples_independent(node_model(constant, mean))
    assert not samples_independent(node_model(helper.make_node("ArgMax", ["x"], ["y"])))  # axis 0 by default
    assert samples_independent(node_model(helper.make_node("ArgMax", ["x"], ["y"], axis=1)))
    assert not samples_independent(node_model(helper.make_node("Softmax", ["x"], ["y"], axis=0)))
    assert samples_independent(node_model(helper.make_node("Softmax", ["x"], ["y"])))
    then = helper.make_graph([helper.make_node("ReduceMax", ["x"], ["t"], keepdims=1)], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    branch = helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=then)
    assert not samples_independent(node_model(branch))  # inside a subgraph too


def test_read_structure_skips_large_weights_only():
    path = FIXTURES / "transformers" / "bert_ts.onnx"
    full, structure = onnx.load(str(path)), read_structure(path)
    assert structure.graph.node == full.graph.node and structure.graph.input == full.graph.input
    assert structure.graph.output == full.graph.output and structure.opset_import == full.opset_import
    small = [t for t in full.graph.initializer if t.ByteSize() <= 4096]
    assert list(structure.graph.initializer) == small and len(small) < len(full.graph.initializer)
