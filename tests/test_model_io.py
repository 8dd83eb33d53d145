"""Loading and saving: external data, automatic external data, atomic writes, Constant weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune import model as model_io
from onnxprune.errors import InvalidModelError
from onnxprune.model import GraphIndex, load_model, save_model

from .conftest import FIXTURES, listing


def run(path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    return session.run(None, {"input": x})[0]


def test_external_data_round_trip(tmp_path):
    loaded = load_model(FIXTURES / "cnn_external" / "model.onnx")
    assert loaded.has_external_data and loaded.file_bytes > 300_000
    written = save_model(loaded.model, tmp_path / "out.onnx", external_data=True)
    assert [p.name for p in written] == ["out.onnx", "out.onnx.data"]
    assert (tmp_path / "out.onnx").stat().st_size < 20_000
    np.testing.assert_array_equal(run(tmp_path / "out.onnx"), run(FIXTURES / "cnn.onnx"))
    # the in-memory model keeps its data after an external save
    assert all(t.HasField("raw_data") for t in loaded.model.graph.initializer if t.dims)
    assert listing(tmp_path) == ["out.onnx", "out.onnx.data"], "no temporary files left"


def test_automatic_external_data_above_threshold(tmp_path, monkeypatch):
    loaded = load_model(FIXTURES / "cnn.onnx")
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 100_000)
    save_model(loaded.model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 10**12)
    save_model(loaded.model, tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx.data").exists()
    np.testing.assert_array_equal(run(tmp_path / "big.onnx"), run(tmp_path / "small.onnx"))


def test_failed_verification_writes_nothing(tmp_path):
    loaded = load_model(FIXTURES / "cnn.onnx")

    def reject(path):
        raise InvalidModelError("rejected")

    with pytest.raises(InvalidModelError):
        save_model(loaded.model, tmp_path / "out.onnx", external_data=True, verify=reject)
    assert listing(tmp_path) == []


def test_constant_weights_are_indexed():
    loaded = load_model(FIXTURES / "cnn_constant_weights.onnx")
    index = GraphIndex.build(loaded.model.graph)
    weight, chain = index.resolve("block4.conv1.weight")
    assert weight.kind == "constant" and weight.name == "block4.conv1.weight_fp16"
    assert [n.op_type for n in chain] == ["Cast"]
    weight, chain = index.resolve("block1.conv1.weight")
    assert weight.name == "block1.conv1.weight_raw" and [n.op_type for n in chain] == ["Identity"]
    values = weight.array()
    values[0] = 0
    weight.set_array(values)
    assert np.all(index.weights["block1.conv1.weight_raw"].array()[0] == 0)


def test_initializers_listed_as_inputs(tmp_path):
    model = onnx.load(str(FIXTURES / "mlp_gemm.onnx"))
    for init in model.graph.initializer:
        model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    model.ir_version = 3
    onnx.save(model, tmp_path / "old_ir.onnx")
    import onnxprune

    _, result = onnxprune.prune(tmp_path / "old_ir.onnx", tmp_path / "out.onnx", sparsity=0.5, validate=True)
    assert result.validation["inputs"]["shapes"] == {"input": [1, 64]}
    assert onnx.load(str(tmp_path / "out.onnx")).ir_version == 3
