"""Loading and saving: external data, automatic external data, atomic writes, Constant weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune import model as model_io
from onnxprune.errors import InvalidModelError, OutputError
from onnxprune.graph import GraphIndex
from onnxprune.model import check_output_path, default_output_path, load_model, save_model

from .conftest import FIXTURES, listing

FOUNDATION = ["cnn.onnx", "cnn_constant_weights.onnx", "cnn_external/model.onnx", "mlp_gemm.onnx", "mlp_matmul.onnx",
              "mlp_dynamic.onnx", "cnn_opset11.onnx", "cnn_opset21.onnx", "shared_weight.onnx", "embedding.onnx"]


def run(path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    return session.run(None, {"input": x})[0]


def test_external_data_round_trip(tmp_path):
    source = FIXTURES / "cnn_external" / "model.onnx"
    loaded = load_model(source)
    data_bytes = (source.parent / "model.onnx.data").stat().st_size
    assert loaded.has_external_data and loaded.file_bytes == source.stat().st_size + data_bytes > 200_000
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


def header(model: onnx.ModelProto) -> dict:
    """What a load/save round trip must keep, as comparable values."""
    return {
        "ir_version": model.ir_version,
        "opset_import": [(o.domain, o.version) for o in model.opset_import],
        "metadata_props": [(p.key, p.value) for p in model.metadata_props],
        "doc_string": model.doc_string,
        "producer": (model.producer_name, model.producer_version),
        "graph": (model.graph.name, model.graph.doc_string),
        "inputs": [i.SerializeToString() for i in model.graph.input],
        "outputs": [o.SerializeToString() for o in model.graph.output],
        "nodes": [(n.name, n.op_type, n.domain, n.doc_string, list(n.input), list(n.output),
                   [attribute_value(a) for a in n.attribute]) for n in model.graph.node],
    }


def attribute_value(attribute: onnx.AttributeProto):
    """Tensor attributes by value (an external save moves their bytes), the rest as serialised."""
    if attribute.type == onnx.AttributeProto.TENSOR:
        t = attribute.t
        return attribute.name, t.name, t.data_type, list(t.dims), onnx.numpy_helper.to_array(t).tobytes()
    return attribute.SerializeToString()


@pytest.mark.parametrize("name", FOUNDATION)
@pytest.mark.parametrize("external", [False, True])
def test_load_save_round_trip_keeps_everything(tmp_path, name, external):
    source = FIXTURES / name
    loaded = load_model(source)
    original = onnx.load(str(source))
    original.graph.doc_string = "graph doc kept"
    loaded.model.graph.doc_string = "graph doc kept"
    written = save_model(loaded.model, tmp_path / "out.onnx", external_data=external)
    assert written[0] == tmp_path / "out.onnx"
    assert listing(tmp_path) == (["out.onnx", "out.onnx.data"] if external else ["out.onnx"])
    again = onnx.load(str(tmp_path / "out.onnx"))
    assert header(again) == header(original)
    values = {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in original.graph.initializer}
    assert {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in again.graph.initializer} == values
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


def test_metadata_with_odd_bytes_is_kept(tmp_path):
    model = onnx.load(str(FIXTURES / "mlp_gemm.onnx"))
    odd = {"labels": "ünïcödé\tlabels\n\u2028", "dict": "a" * 5000, "empty": ""}
    onnx.helper.set_model_props(model, odd)
    onnx.save(model, tmp_path / "in.onnx")
    import onnxprune

    onnxprune.prune(tmp_path / "in.onnx", tmp_path / "out.onnx", sparsity=0.5)
    assert {p.key: p.value for p in onnx.load(str(tmp_path / "out.onnx")).metadata_props} == odd


def test_external_data_not_forced_when_saving_an_external_model_inline(tmp_path):
    loaded = load_model(FIXTURES / "cnn_external" / "model.onnx")
    save_model(loaded.model, tmp_path / "inline.onnx", external_data=False)
    assert listing(tmp_path) == ["inline.onnx"]
    reloaded = onnx.load(str(tmp_path / "inline.onnx"), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in reloaded.graph.initializer)
    np.testing.assert_array_equal(run(tmp_path / "inline.onnx"), run(FIXTURES / "cnn.onnx"))


def test_save_replaces_existing_output_atomically(tmp_path):
    (tmp_path / "out.onnx").write_bytes(b"old")
    (tmp_path / "out.onnx.data").write_bytes(b"old data")
    loaded = load_model(FIXTURES / "cnn.onnx")
    save_model(loaded.model, tmp_path / "out.onnx", external_data=True)
    assert listing(tmp_path) == ["out.onnx", "out.onnx.data"]
    np.testing.assert_array_equal(run(tmp_path / "out.onnx"), run(FIXTURES / "cnn.onnx"))


def test_save_into_missing_directory_writes_nothing(tmp_path):
    loaded = load_model(FIXTURES / "mlp_gemm.onnx")
    with pytest.raises(OutputError):
        save_model(loaded.model, tmp_path / "missing" / "out.onnx")
    assert listing(tmp_path) == []


def test_output_path_rules(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"x")
    assert default_output_path(model) == tmp_path / "model.pruned.onnx"
    assert default_output_path(tmp_path / "weights") == tmp_path / "weights.pruned.onnx"
    check_output_path(tmp_path / "new.onnx", input_path=model, force=False)
    for output, force in [(model, True), (tmp_path / "." / "model.onnx", True), (tmp_path, True),
                          (tmp_path / "nodir" / "o.onnx", False), (model / "o.onnx", False)]:
        with pytest.raises(OutputError):
            check_output_path(output, input_path=model, force=force)
    (tmp_path / "exists.onnx").write_bytes(b"y")
    with pytest.raises(OutputError, match="--force"):
        check_output_path(tmp_path / "exists.onnx", input_path=model, force=False)
    check_output_path(tmp_path / "exists.onnx", input_path=model, force=True)
    assert listing(tmp_path) == ["exists.onnx", "model.onnx"]


def test_prune_keeps_external_data_for_external_input(tmp_path):
    import onnxprune

    onnxprune.prune(FIXTURES / "cnn_external" / "model.onnx", tmp_path / "p.onnx", sparsity=0.5)
    assert listing(tmp_path) == ["p.onnx", "p.onnx.data"]
    onnxprune.prune(FIXTURES / "cnn_external" / "model.onnx", tmp_path / "q.onnx", sparsity=0.5, external_data=False)
    assert "q.onnx.data" not in listing(tmp_path)
    np.testing.assert_array_equal(run(tmp_path / "p.onnx"), run(tmp_path / "q.onnx"))
