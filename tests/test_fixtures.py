"""The foundation fixtures: valid, runnable, small, reproducible, and shaped as their names promise."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from .conftest import FIXTURES

FOUNDATION = ["cnn.onnx", "cnn_constant_weights.onnx", "cnn_external/model.onnx", "mlp_gemm.onnx", "mlp_matmul.onnx",
              "mlp_dynamic.onnx", "cnn_opset11.onnx", "cnn_opset21.onnx", "shared_weight.onnx", "embedding.onnx"]

#: name -> (IR version, ONNX opset)
VERSIONS = {"cnn.onnx": (8, 13), "cnn_constant_weights.onnx": (8, 13), "cnn_external/model.onnx": (8, 13),
            "mlp_gemm.onnx": (8, 13), "mlp_matmul.onnx": (8, 13), "mlp_dynamic.onnx": (8, 13),
            "cnn_opset11.onnx": (6, 11), "cnn_opset21.onnx": (10, 21), "shared_weight.onnx": (8, 13),
            "embedding.onnx": (8, 13)}


def load_builder():
    spec = importlib.util.spec_from_file_location("build_fixtures", FIXTURES / "build_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def random_feeds(sess: ort.InferenceSession, dynamic: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in sess.get_inputs():
        shape = [d if isinstance(d, int) else dynamic for d in arg.shape]
        if arg.type == "tensor(int64)":
            feeds[arg.name] = rng.integers(0, 100, shape).astype(np.int64)
        else:
            feeds[arg.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def attr(node: onnx.NodeProto, name: str, default=None):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def dims(value_info: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def n_params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if len(t.dims) > 1)


@pytest.mark.parametrize("name", FOUNDATION)
def test_passes_full_checker(name):
    onnx.checker.check_model(str(FIXTURES / name), full_check=True)  # by path: external data is resolved


@pytest.mark.parametrize("name", FOUNDATION)
def test_runs_in_onnxruntime_with_declared_shapes(name):
    sess = session(FIXTURES / name)
    outputs = sess.run(None, random_feeds(sess))
    for value, declared in zip(outputs, sess.get_outputs(), strict=True):
        assert np.isfinite(value).all() and value.std() > 0
        assert [d for d in declared.shape if isinstance(d, int)] == [
            s for s, d in zip(value.shape, declared.shape, strict=True) if isinstance(d, int)]


@pytest.mark.parametrize("name", FOUNDATION)
def test_small_and_versioned(name):
    path = FIXTURES / name
    size = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))
    assert size < 512_000, f"{name} is {size} bytes"  # the CNNs are ~410 KB; everything else < 110 KB
    model = onnx.load(str(path), load_external_data=False)
    assert (model.ir_version, model.opset_import[0].version) == VERSIONS[name]
    assert model.opset_import[0].domain in ("", "ai.onnx") and len(model.opset_import) == 1
    assert model.doc_string and {p.key: p.value for p in model.metadata_props}["labels"].startswith("zero,")


def test_builder_reproduces_committed_files_byte_for_byte(tmp_path):
    written = load_builder().build_all(tmp_path)
    names = sorted(str(p.relative_to(tmp_path)) for p in written)
    assert names == sorted(FOUNDATION)
    for rel in [*FOUNDATION, "cnn_external/model.onnx.data"]:
        assert (tmp_path / rel).read_bytes() == (FIXTURES / rel).read_bytes(), f"{rel}: rerun fixtures/build_fixtures.py"


def test_cnn_is_the_promised_demo_network():
    model = onnx.load(str(FIXTURES / "cnn.onnx"))
    assert {"Conv", "BatchNormalization", "Relu", "Add", "MaxPool", "GlobalAveragePool", "Flatten", "Gemm"} <= set(
        ops(model))
    assert model.graph.input[0].name == "input" and dims(model.graph.input[0]) == ["N", 3, 32, 32]
    assert dims(model.graph.output[0]) == ["N", 10]
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    depthwise = [n for n in model.graph.node if n.op_type == "Conv" and attr(n, "group", 1) > 1]
    assert depthwise and all(attr(n, "group") == shapes[n.input[1]][0] and shapes[n.input[1]][1] == 1
                             for n in depthwise)
    residual = [n for n in model.graph.node if n.op_type == "Add"]
    assert len(residual) == 2
    assert 50_000 <= n_params(model) <= 150_000


def test_cnn_predictions_depend_on_the_input():
    """Top-1 agreement and accuracy on random inputs only mean something if the arg-max depends on the input."""
    x = np.random.default_rng(5).standard_normal((40, 3, 32, 32)).astype(np.float32)
    for name in ("cnn.onnx", "cnn_opset21.onnx", "cnn_constant_weights.onnx", "cnn_external/model.onnx"):
        classes = session(FIXTURES / name).run(None, {"input": x})[0].argmax(axis=1)
        assert len(set(classes.tolist())) >= 5, name
        assert np.bincount(classes, minlength=10).max() <= 20, name  # no class takes half of the inputs


def test_cnn_variants_compute_the_same_function():
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    reference = session(FIXTURES / "cnn.onnx").run(None, {"input": x})[0]
    for name in ("cnn_external/model.onnx", "cnn_opset21.onnx"):
        np.testing.assert_allclose(session(FIXTURES / name).run(None, {"input": x})[0], reference, rtol=1e-5,
                                   atol=1e-5)
    # one weight went through float16: close, not equal
    constants = session(FIXTURES / "cnn_constant_weights.onnx").run(None, {"input": x})[0]
    np.testing.assert_allclose(constants, reference, rtol=1e-2, atol=1e-2)


def test_constant_weights_has_no_initializers_and_messy_weight_paths():
    model = onnx.load(str(FIXTURES / "cnn_constant_weights.onnx"))
    assert len(model.graph.initializer) == 0
    producer = {out: node for node in model.graph.node for out in node.output}
    weight_inputs = [n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(weight_inputs) == 9
    chains = {}
    for name in weight_inputs:
        node, chain = producer[name], []
        while node.op_type != "Constant":
            chain.append(node.op_type)
            node = producer[node.input[0]]
        chains[name] = chain
        if chain == ["Cast"]:
            assert node.attribute[0].t.data_type == onnx.TensorProto.FLOAT16
            assert attr(producer[name], "to") == onnx.TensorProto.FLOAT
    assert sorted(map(tuple, chains.values())).count(()) == 7
    assert ["Identity"] in chains.values() and ["Cast"] in chains.values()


def test_external_data_layout():
    model = onnx.load(str(FIXTURES / "cnn_external" / "model.onnx"), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert not any(t.raw_data for t in model.graph.initializer)


def test_mlp_gemm_layers():
    model = onnx.load(str(FIXTURES / "mlp_gemm.onnx"))
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 3 and "Relu" in ops(model)
    assert {attr(n, "transB", 0) for n in gemms} == {0, 1}
    assert model.graph.input[0].name == "input" and dims(model.graph.input[0]) == ["N", 64]


def test_mlp_matmul_layers():
    model = onnx.load(str(FIXTURES / "mlp_matmul.onnx"))
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    assert len(matmuls) == len(adds) == 3
    assert all(len(inits[n.input[1]]) == 2 for n in matmuls) and all(len(inits[n.input[1]]) == 1 for n in adds)


@pytest.mark.parametrize("batch, seq", [(1, 1), (3, 7)])
def test_mlp_dynamic_batch_and_sequence(batch, seq):
    model = onnx.load(str(FIXTURES / "mlp_dynamic.onnx"))
    assert dims(model.graph.input[0]) == ["batch", "seq", 32]
    x = np.random.default_rng(0).standard_normal((batch, seq, 32)).astype(np.float32)
    assert session(FIXTURES / "mlp_dynamic.onnx").run(None, {"input": x})[0].shape == (batch, seq, 32)


def test_opset11_uses_attribute_forms():
    model = onnx.load(str(FIXTURES / "cnn_opset11.onnx"))
    by_op = {n.op_type: n for n in model.graph.node}
    assert attr(by_op["Split"], "split") == [8, 8] and len(by_op["Split"].input) == 1
    assert attr(by_op["Squeeze"], "axes") == [2, 3] and len(by_op["Squeeze"].input) == 1
    assert attr(by_op["Unsqueeze"], "axes") == [2] and len(by_op["Unsqueeze"].input) == 1


def test_shared_weight_read_by_two_matmuls():
    model = onnx.load(str(FIXTURES / "shared_weight.onnx"))
    assert len(model.graph.initializer) == 1
    readers = [n for n in model.graph.node if model.graph.initializer[0].name in n.input]
    assert [n.op_type for n in readers] == ["MatMul", "MatMul"]


def test_embedding_int64_tokens():
    model = onnx.load(str(FIXTURES / "embedding.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    gather = next(n for n in model.graph.node if n.op_type == "Gather")
    table = next(t for t in model.graph.initializer if t.name == gather.input[0])
    assert list(table.dims) == [100, 32] and ops(model) == ["Gather", "MatMul"]
    tokens = np.array([[0, 99, 5]], np.int64)
    out = session(FIXTURES / "embedding.onnx").run(None, {"tokens": tokens})[0]
    proj = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name != table.name))
    np.testing.assert_allclose(out, numpy_helper.to_array(table)[tokens] @ proj, rtol=1e-5, atol=1e-6)
