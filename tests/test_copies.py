"""Copies of the model that peak memory does without (docs/benchmarks.md, "Memory, sixth round"): the file's bytes
while it is parsed, the analysed copy and the protobuf writes of sensitivity points, the serialized model behind the
capture session. Each test fails when its copy comes back; all run real graphs in onnxruntime."""

from __future__ import annotations

import importlib
import tracemalloc

import numpy as np
import onnx
import pytest
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from onnxprune import graph as graph_module
from onnxprune import probe as probe_module
from onnxprune.config import PruneConfig
from onnxprune.errors import ModelReadError
from onnxprune.model import load_model
from onnxprune.model_file import read_model
from onnxprune.sensitivity import around, measure_masked

from .conftest import FIXTURES
from .test_probe import _batches
from .test_probe import _model as _resnet

#: the module (the package exports the function ``sensitivity`` under that name)
sensitivity_module = importlib.import_module("onnxprune.sensitivity")


def _wide_model(path, tensors: int = 6, width: int = 256) -> onnx.ModelProto:
    """MatMul layers of ``width`` x ``width`` float32 weights, saved to ``path``."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(tensors):
        inits.append(numpy_helper.from_array(rng.standard_normal((width, width), dtype=np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", width])], inits,
                              doc_string="doc")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    helper.set_model_props(model, {"labels": "a,b"})
    onnx.save(model, str(path))
    return model


@pytest.mark.parametrize("name", ["cnn.onnx", "mlp_gemm.onnx", "cnn_constant_weights.onnx", "embedding.onnx",
                                  "arch/resnet50.onnx"])
def test_read_model_gives_the_message_onnx_load_gives(name):
    path = FIXTURES / name
    assert read_model(path).SerializeToString() == onnx.load(str(path), load_external_data=False).SerializeToString()


def test_read_model_holds_one_tensor_of_the_file_at_a_time(tmp_path):
    """Python-side bytes while loading (and checking): one tensor (256 KiB) and small change, not the 1.5 MiB
    file."""
    path = tmp_path / "wide.onnx"
    model = _wide_model(path)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        read = load_model(path).model
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        onnx.load(str(path))
        _, whole = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert read.SerializeToString() == model.SerializeToString()
    assert whole > size  # the measure sees the whole-file read
    assert peak < size / 4


def test_read_model_reads_an_empty_graph_and_falls_back_on_what_it_does_not_parse(tmp_path):
    empty = helper.make_model(helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("", 17)])
    empty.graph.Clear()  # present but empty: its has-bit survives
    (tmp_path / "empty.onnx").write_bytes(empty.SerializeToString())
    read = read_model(tmp_path / "empty.onnx")
    assert read.HasField("graph") and read.SerializeToString() == empty.SerializeToString()
    whole = (tmp_path / "wide.onnx")
    _wide_model(whole)
    data = whole.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[:len(data) // 2])
    with pytest.raises(DecodeError):
        read_model(tmp_path / "cut.onnx")  # onnx.load's own error: the reader fell back
    with pytest.raises(ModelReadError, match="corrupt/truncated"):
        load_model(tmp_path / "cut.onnx")


def test_sensitivity_points_neither_copy_nor_write_the_model(monkeypatch):
    """Masks, refits and restores go to arrays (protobuf would keep each write's bytes until the model is freed):
    no ``Weight.set_array`` on a proto, the caller's model analysed as it is, and left byte-identical."""
    model = _resnet()
    before = model.SerializeToString()
    writes, analysed = [], []
    original_set = graph_module.Weight.set_array
    monkeypatch.setattr(graph_module.Weight, "set_array", lambda self, values: (writes.append(self.name),
                                                                                original_set(self, values)))
    original_analyse = sensitivity_module.analyse
    monkeypatch.setattr(sensitivity_module, "analyse", lambda m, *a, **k: (analysed.append(m),
                                                                           original_analyse(m, *a, **k))[1])
    config = PruneConfig(structured=True, sparsity=0.3, calibration_data="calib.npz", reconstruct=True,
                         exclude=["/conv1/*", "/layer1/*", "/layer2/*"])
    sens, _ = measure_masked(model, _batches(2), config, around(0.3), fit_feeds=_batches(2, seed=1))
    assert sens["evaluations"] > 10
    assert writes == []
    assert len(analysed) == 1 and analysed[0] is model
    assert model.SerializeToString() == before


def test_held_weights_read_and_write_arrays_only():
    model = _resnet()
    weight = next(w for w in graph_module.GraphIndex.build(model.graph).weights.values() if w.size > 1000)
    held = probe_module.HeldWeight.of(weight)
    raw = weight.tensor.raw_data
    values = held.array()
    values[...] = 0
    assert np.any(held.array() != 0)  # array() hands out a copy
    held.set_array(values)
    assert not np.any(held.array()) and held.shape == weight.shape and weight.tensor.raw_data == raw


def test_capture_session_serializes_no_weights(monkeypatch):
    """The session that captures the tensors crossing into each cut holds the graph, not the weights (they are the
    cuts' OrtValues), and captures what a session over the serialized model gives, bit for bit."""
    model = _resnet()
    sizes = []
    original_create = probe_module.create_session
    monkeypatch.setattr(probe_module, "create_session", lambda m, *a, **k: (
        sizes.append(len(m.SerializeToString()) if isinstance(m, onnx.ModelProto) else -1),
        original_create(m, *a, **k))[1])
    analysis = sensitivity_module.analyse(model, None, ["/conv1/*", "/layer1/*"], False)
    consumers = sorted({e.weight.name for e in analysis.edits if e.role == "consumer"})
    plans = [{name} for name in consumers[::4]]
    feeds = _batches(2)
    downstream = probe_module.Downstream(model, feeds, plans)
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    assert sizes and sizes[0] < weights / 10
    names = sorted({n for cut in downstream.cuts for n in cut["boundary"]})
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    outputs = [o.name for o in model.graph.output]
    reference.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in outputs)
    session = original_create(reference, probe_module.session_options(log_level=3))
    wanted = [o.name for o in session.get_outputs()]
    for feed, captured in zip(feeds, downstream.values):
        expected = dict(zip(wanted, session.run(None, feed)))
        assert captured.keys() == expected.keys()
        assert all(np.array_equal(captured[k], expected[k]) for k in expected)


def test_structured_runs_continue_on_compacted_models(tmp_path, monkeypatch):
    """A run that owns its model refits it with its large weights detached (put back after the refit in a new arena:
    the removal's replaced bytes freed with the old one) and saves a compacted copy; the pruned model is
    byte-identical to a run on a caller's model, which is changed in place."""
    from onnxprune import api
    from onnxprune.passes import reconstruction

    compacted = []
    for module, name in ((api, "compacted"), (reconstruction, "attach_weights")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, original=original, where=module.__name__: (
            compacted.append(where), original(*args))[1])
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.random.default_rng(1).standard_normal((16, 3, 32, 32)).astype(np.float32))
    config = PruneConfig(structured=True, sparsity=0.5, reconstruct=True, calibration_data=str(calib), uniform=True)
    owned, _ = api.prune(FIXTURES / "cnn.onnx", config=config)
    assert compacted == ["onnxprune.passes.reconstruction", "onnxprune.api"]
    compacted.clear()
    loaded = load_model(FIXTURES / "cnn.onnx")
    theirs, _ = api.prune(loaded, config=config)
    assert compacted == [] and theirs is loaded.model
    assert owned.SerializeToString() == theirs.SerializeToString()
