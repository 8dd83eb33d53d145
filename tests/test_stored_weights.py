"""Weights read by onnxruntime from the user's model files (their byte ranges, recorded at load) instead of handed
over from memory: the ranges found, the checks before they are used, and the probe's points equal bit for bit."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune import probe as probe_module
from onnxprune.allocation import default_allocation
from onnxprune.model import load_model
from onnxprune.model_file import tensor_data_ranges
from onnxprune.sensitivity import around, measure_masked
from onnxprune.stored_weights import StoredWeights

from .test_probe import RESNET, _batches, _config, _points


def _copy(tmp_path) -> os.PathLike:
    path = tmp_path / "model.onnx"
    shutil.copyfile(RESNET, path)
    return path


def _loaded(path):
    from onnxprune.passes.structured import prepare_for_analysis

    loaded = load_model(path)
    prepare_for_analysis(loaded.model)
    return loaded


def test_ranges_are_each_initializers_raw_bytes(tmp_path):
    path = _copy(tmp_path)
    model = onnx.load(str(path))
    ranges = tensor_data_ranges(path)
    data = path.read_bytes()
    raw = [t for t in model.graph.initializer if t.HasField("raw_data")]
    assert len(raw) > 50 and set(ranges) == {t.name for t in raw}
    for tensor in raw:
        start, length = ranges[tensor.name]
        assert data[start:start + length] == tensor.raw_data


def test_ranges_leave_out_repeated_names_and_unreadable_files(tmp_path):
    weight = numpy_helper.from_array(np.arange(600, dtype=np.float32).reshape(20, 30), "w")
    again = numpy_helper.from_array(np.ones((20, 30), np.float32), "w")
    other = numpy_helper.from_array(np.full((30, 5), 2.0, np.float32), "v")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"]), onnx.helper.make_node("MatMul", ["y", "v"], ["z"])],
        "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 20])],
        [onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 5])], [weight, again, other])
    path = tmp_path / "twice.onnx"
    path.write_bytes(onnx.helper.make_model(graph, ir_version=8).SerializeToString())
    ranges = tensor_data_ranges(path)
    assert set(ranges) == {"v"}  # "w" is given twice: which bytes protobuf keeps is not this reader's to guess
    start, length = ranges["v"]
    assert path.read_bytes()[start:start + length] == other.raw_data
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff" * 64)
    assert tensor_data_ranges(garbage) == {}
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(path.read_bytes()[:-7])
    assert tensor_data_ranges(truncated) == {}


@pytest.mark.parametrize("location", ["ext.data", "weights/ext.data"])
def test_external_data_ranges_come_from_the_data_file(tmp_path, location):
    path = tmp_path / "ext.onnx"
    (tmp_path / "weights").mkdir()
    onnx.save(onnx.load(str(RESNET)), str(path), save_as_external_data=True, location=location,
              size_threshold=1024)
    model = onnx.load(str(RESNET))
    loaded = load_model(path)
    stored = loaded.stored
    assert stored is not None and stored.folder == tmp_path
    large = [t for t in model.graph.initializer if len(t.raw_data) >= 1024]
    assert len(large) > 40
    data = (tmp_path / location).read_bytes()
    for tensor in large:
        where, start, length = stored.entries[tensor.name]
        assert where == location and data[start:start + length] == tensor.raw_data
    verified = stored.verified(list(loaded.model.graph.initializer))
    large = {t.name for t in loaded.model.graph.initializer if int(np.prod(t.dims)) > 256}
    assert set(verified.entries) == large & set(stored.entries) and len(verified.entries) > 40
    feeds = _batches(1)
    model = _loaded(path).model
    conv = [n for n in model.graph.node if n.op_type == "Conv"][5]
    cut = probe_module.Downstream(model, feeds, [{conv.input[1]}], stored=stored)
    assert cut._stored() is not None
    declared = [n for n in cut.cuts[0]["initializers"] if n in cut.stored.entries]
    assert len(declared) > 40
    cut._session(cut.cuts[0])  # onnxruntime reads them from the data file (it raises if it cannot)
    from_file, _ = measure_masked(model, feeds, _config(), (0.25,), stored=stored)
    from_memory, _ = measure_masked(_loaded(RESNET).model, feeds, _config(), (0.25,))
    assert _points(from_file) == _points(from_memory)


def test_probe_points_equal_bit_for_bit_with_weights_read_from_the_file(tmp_path, monkeypatch):
    """The probe's sessions declare the unchanged weights as external data at their place in the model file; the
    points (and so the allocation) are those of sessions handed the weights from memory, bit for bit."""
    loaded = _loaded(_copy(tmp_path))
    assert loaded.stored is not None
    config = _config(reconstruct=True)
    feeds, fit = _batches(2), _batches(3, seed=1)
    declared = []
    declare = probe_module.Verified.declare

    def counted(self, graph, tensor):
        found = declare(self, graph, tensor)
        declared.append(found)
        return found
    monkeypatch.setattr(probe_module.Verified, "declare", counted)
    from_file, _ = measure_masked(loaded.model, feeds, config, around(0.3), fit_feeds=fit, stored=loaded.stored)
    assert sum(declared) > 100  # the capture and every cut read weights from the file
    from_memory, _ = measure_masked(_loaded(RESNET).model, feeds, config, around(0.3), fit_feeds=fit)
    assert _points(from_file) == _points(from_memory)
    batches = _batches(6)
    _, with_file = default_allocation(loaded.model, config, batches, {"input": [1, 3, 64, 64]}, stored=loaded.stored)
    _, without = default_allocation(_loaded(RESNET).model, config, batches, {"input": [1, 3, 64, 64]})
    assert with_file["ratios"] == without["ratios"] and with_file["sensitivity"] == without["sensitivity"]


def test_a_weight_changed_in_memory_is_read_from_memory(tmp_path):
    """A tensor whose values differ from its bytes in the file is not declared there: the points see its values."""
    loaded = _loaded(_copy(tmp_path))
    model = loaded.model
    conv = [t for t in model.graph.initializer if len(t.dims) == 4][-3]
    conv.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(conv) * 2.0, conv.name))
    verified = loaded.stored.verified(list(model.graph.initializer))
    assert conv.name not in verified.entries and len(verified.entries) > 40
    feeds = _batches(2)
    changed, _ = measure_masked(model, feeds, _config(), around(0.3), stored=loaded.stored)
    same = _loaded(RESNET).model
    twice = next(t for t in same.graph.initializer if t.name == conv.name)
    twice.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(twice) * 2.0, twice.name))
    from_memory, _ = measure_masked(same, feeds, _config(), around(0.3))
    original, _ = measure_masked(_loaded(RESNET).model, feeds, _config(), around(0.3))
    assert _points(changed) == _points(from_memory) != _points(original)


@pytest.mark.parametrize("change", ["rewrite", "remove"])
def test_a_file_changed_after_the_check_is_not_read(tmp_path, change):
    """Once the model file changes (size, inode or modification time), the ranges are no longer used: the sessions
    are handed the weights from memory and give the same outputs."""
    path = _copy(tmp_path)
    loaded = _loaded(path)
    model = loaded.model
    fc = next(n for n in model.graph.node if n.op_type == "Gemm")
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    plans = [{convs[-6].input[1]}, {fc.input[1]}]
    feeds = _batches(1)
    stored = probe_module.Downstream(model, feeds, plans, stored=loaded.stored)
    plain = probe_module.Downstream(model, feeds, plans)
    assert stored._stored() is not None and plain._stored() is None
    weights = {fc.input[1]: np.zeros_like(numpy_helper.to_array(
        next(i for i in model.graph.initializer if i.name == fc.input[1])))}
    if change == "rewrite":  # other weights, same size, a later modification time
        blob = bytearray(path.read_bytes())
        start, length = tensor_data_ranges(path)[convs[-1].input[1]]
        blob[start:start + length] = bytes(length)
        path.write_bytes(bytes(blob))
        os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    else:
        path.unlink()
    assert stored._stored() is None
    got, want = stored.run(1, weights), plain.run(1, weights)
    assert all(np.array_equal(a, b) for a, b in zip(got[0], want[0]))


def test_only_the_files_the_model_was_read_from_are_named(tmp_path):
    """The ranges name the model file and its external data files by their names inside the model's folder."""
    loaded = _loaded(_copy(tmp_path))
    assert {entry[0] for entry in loaded.stored.entries.values()} == {"model.onnx"}
    assert isinstance(loaded.stored, StoredWeights) and loaded.stored.folder == tmp_path


def test_an_onnxruntime_without_the_folder_setting_reads_from_memory(tmp_path, monkeypatch):
    """An onnxruntime older than the folder setting would resolve the locations against the working folder: with
    it no range is used (the sessions are handed the weights from memory)."""
    from onnxprune import stored_weights

    loaded = _loaded(_copy(tmp_path))
    assert stored_weights.folder_setting_supported()
    assert loaded.stored.verified(list(loaded.model.graph.initializer)).usable()
    monkeypatch.setattr(stored_weights.metadata, "version", lambda name: "1.19.2")
    assert not stored_weights.folder_setting_supported()
    verified = loaded.stored.verified(list(loaded.model.graph.initializer))
    assert verified.entries == {} and not verified.usable()
