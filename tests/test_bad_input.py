"""Every bad input: a one-line error, its documented exit code, and nothing written."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import helper

from .conftest import FIXTURES, listing, run_cli, run_subprocess

CNN = FIXTURES / "cnn.onnx"


@pytest.fixture
def work(tmp_path):
    """A folder holding a copy of the CNN fixture; tests check that nothing new appears in it."""
    shutil.copy(CNN, tmp_path / "model.onnx")
    return tmp_path


def assert_error(code: int, err: str, expected_code: int, *words: str) -> None:
    # progress lines ("[  0.01s] loading model") may precede the error; the error itself is one line
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("[")]
    assert code == expected_code, err
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert lines[0].startswith("onnxprune: error: ")
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


def assert_nothing_written(directory, before):
    assert listing(directory) == before


def check(directory, args, expected_code, *words):
    before = listing(directory)
    code, _, err = run_cli(*args)
    assert_error(code, err, expected_code, *words)
    assert_nothing_written(directory, before)


def test_missing_file(tmp_path):
    check(tmp_path, [tmp_path / "nope.onnx", "--sparsity", "0.5"], 3, "not found")


def test_directory_instead_of_file(tmp_path):
    (tmp_path / "dir.onnx").mkdir()
    check(tmp_path, [tmp_path / "dir.onnx", "--sparsity", "0.5"], 3, "directory")


def test_empty_file(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    check(tmp_path, [tmp_path / "empty.onnx", "--sparsity", "0.5"], 3, "empty")


def test_not_onnx(tmp_path):
    (tmp_path / "text.onnx").write_text("this is not a model\n" * 20)
    check(tmp_path, [tmp_path / "text.onnx", "--sparsity", "0.5"], 3, "not an ONNX model")


def test_truncated_protobuf(tmp_path):
    data = CNN.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    check(tmp_path, [tmp_path / "cut.onnx", "--sparsity", "0.5"], 3)


def test_corrupt_protobuf(tmp_path):
    data = bytearray(CNN.read_bytes())
    data[:64] = bytes(np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8))
    (tmp_path / "corrupt.onnx").write_bytes(bytes(data))
    before = listing(tmp_path)
    code, _, err = run_cli(tmp_path / "corrupt.onnx", "--sparsity", "0.5")
    assert code in (3, 4)
    assert_error(code, err, code)
    assert_nothing_written(tmp_path, before)


@pytest.mark.parametrize("start", [2, 20, 200])
def test_flipped_bytes(tmp_path, start):
    data = bytearray(CNN.read_bytes())
    for i in range(start, start + 16):
        data[i] ^= 0xFF
    (tmp_path / "flipped.onnx").write_bytes(bytes(data))
    before = listing(tmp_path)
    code, _, err = run_cli(tmp_path / "flipped.onnx", "--sparsity", "0.5")
    assert code in (3, 4), err
    assert_error(code, err, code)
    assert_nothing_written(tmp_path, before)


def test_truncated_external_data(tmp_path):
    shutil.copytree(FIXTURES / "cnn_external", tmp_path / "ext")
    data = (tmp_path / "ext" / "model.onnx.data").read_bytes()
    (tmp_path / "ext" / "model.onnx.data").write_bytes(data[: len(data) // 2])
    check(tmp_path, [tmp_path / "ext" / "model.onnx", "--sparsity", "0.5"], 3)


def test_report_directory_missing(work):
    check(work, [work / "model.onnx", "--sparsity", "0.5", "--report", work / "nodir" / "r.json"], 7, "does not exist")


def test_output_is_input_spelled_differently(work, monkeypatch):
    monkeypatch.chdir(work)
    check(work, ["model.onnx", "--sparsity", "0.5", "-o", "./sub/../model.onnx", "--force"], 7, "overwrite the input")


def test_wrong_raw_data_size(tmp_path):
    model = onnx.load(CNN)
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    onnx.save(model, tmp_path / "bad.onnx")
    check(tmp_path, [tmp_path / "bad.onnx", "--sparsity", "0.5"], 4, "bytes of data")


def test_model_failing_checker(tmp_path):
    model = onnx.load(CNN)
    model.graph.node[1].input[0] = "does_not_exist"
    onnx.save(model, tmp_path / "dangling.onnx")
    check(tmp_path, [tmp_path / "dangling.onnx", "--sparsity", "0.5"], 4, "checker")


def test_missing_external_data(tmp_path):
    shutil.copy(FIXTURES / "cnn_external" / "model.onnx", tmp_path / "model.onnx")
    check(tmp_path, [tmp_path / "model.onnx", "--sparsity", "0.5"], 3, "external data")


def test_unknown_input_shape_name(work):
    check(work, [work / "model.onnx", "--sparsity", "0.5", "--input-shape", "nosuch:1x3x32x32"], 8, "nosuch")


def test_malformed_input_shape(work):
    check(work, [work / "model.onnx", "--sparsity", "0.5", "--input-shape", "input=1,3,32,32"], 2, "input-shape")


def test_input_shape_conflicts_with_model(work):
    check(work, [work / "model.onnx", "--sparsity", "0.5", "--input-shape", "input:1x3x64x64"], 8, "fixed")


@pytest.mark.parametrize("arrays, words", [
    ({"wrong_name": np.zeros((1, 3, 32, 32), np.float32)}, ["missing input", "unknown wrong_name"]),
    ({"input": np.zeros((1, 3, 16, 16), np.float32)}, ["shape"]),
    ({"input": np.zeros((1, 3, 32, 32), np.float64)}, ["dtype"]),
])
def test_bad_data(work, arrays, words):
    np.savez(work / "data.npz", **arrays)
    check(work, [work / "model.onnx", "--sparsity", "0.5", "--data", work / "data.npz"], 8, *words)


def test_data_not_npz(work):
    (work / "data.npz").write_text("nope")
    check(work, [work / "model.onnx", "--sparsity", "0.5", "--data", work / "data.npz"], 8, "npz")


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5"])
def test_sparsity_out_of_range(work, value):
    check(work, [work / "model.onnx", "--sparsity", value], 2, "--sparsity")


@pytest.mark.parametrize("pattern", ["2-4", "4:2", "0:4", "a:b", "2:2"])
def test_malformed_pattern(work, pattern):
    check(work, [work / "model.onnx", "--pattern", pattern], 2, "--pattern")


def test_nothing_to_do(work):
    check(work, [work / "model.onnx"], 2, "nothing to do")


def test_unknown_criterion(work):
    check(work, [work / "model.onnx", "--sparsity", "0.5", "--criterion", "bn"], 2, "criterion")


def test_output_directory_missing(work):
    check(work, [work / "model.onnx", "--sparsity", "0.5", "-o", work / "nodir" / "out.onnx"], 7, "does not exist")


def test_output_under_a_file(work):
    check(work, [work / "model.onnx", "--sparsity", "0.5", "-o", work / "model.onnx" / "out.onnx"], 7)


def test_unwritable_output_directory(work):
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere: use a directory no one can create files in
            before = listing(work)
            code, _, err = run_cli(work / "model.onnx", "--sparsity", "0.5", "-o", "/proc/onnxprune-out.onnx")
            assert_error(code, err, 7, "cannot write")
            assert_nothing_written(work, before)
        else:
            check(work, [work / "model.onnx", "--sparsity", "0.5", "-o", locked / "out.onnx"], 7, "not writable")
    finally:
        locked.chmod(0o700)


def test_existing_output_without_force(work):
    (work / "out.onnx").write_bytes(b"keep me")
    check(work, [work / "model.onnx", "--sparsity", "0.5", "-o", work / "out.onnx"], 7, "--force")
    assert (work / "out.onnx").read_bytes() == b"keep me"


def test_default_output_exists(work):
    (work / "model.pruned.onnx").write_bytes(b"keep me")
    check(work, [work / "model.onnx", "--sparsity", "0.5"], 7, "exists")


def test_output_is_input(work):
    original = (work / "model.onnx").read_bytes()
    check(work, [work / "model.onnx", "--sparsity", "0.5", "-o", work / "model.onnx", "--force"], 7, "overwrite the input")
    assert (work / "model.onnx").read_bytes() == original


def test_unavailable_provider(work):
    check(work, [work / "model.onnx", "--sparsity", "0.5", "--providers", "NoSuchExecutionProvider"], 5, "not available")


def test_bad_report_extension(work):
    check(work, [work / "model.onnx", "--sparsity", "0.5", "--report", work / "r.txt"], 2, ".html")


def test_gate_failure_writes_output_and_exits_6(work):
    code, _out, err = run_cli(work / "model.onnx", "--sparsity", "0.9", "--min-cosine", "0.9999",
                             "--report", work / "r.json")
    assert code == 6, err
    assert "gates missed" in err and "--min-cosine" in err
    assert (work / "model.pruned.onnx").exists() and (work / "r.json").exists()


def test_debug_shows_traceback(tmp_path):
    proc = run_subprocess(tmp_path / "nope.onnx", "--sparsity", "0.5", "--debug")
    assert proc.returncode == 3
    assert "Traceback" in proc.stderr


def test_subprocess_error_is_one_line(tmp_path):
    (tmp_path / "text.onnx").write_text("garbage")
    proc = run_subprocess(tmp_path / "text.onnx", "--sparsity", "0.5")
    assert proc.returncode == 3
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("[")]
    assert len(errors) == 1 and errors[0].startswith("onnxprune: error: ")


def test_cycle_in_graph(tmp_path):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Relu", ["b"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Add", ["x", "b"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "cycle", [x], [y]), ir_version=8,
                              opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, tmp_path / "cycle.onnx")
    check(tmp_path, [tmp_path / "cycle.onnx", "--sparsity", "0.5"], 4)


def test_duplicate_output_names(tmp_path):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Sigmoid", ["x"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "dup", [x], [y]), ir_version=8,
                              opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, tmp_path / "dup.onnx")
    check(tmp_path, [tmp_path / "dup.onnx", "--sparsity", "0.5"], 4)


def test_output_is_the_inputs_external_data_file(tmp_path):
    """The input's external data file is part of the input: never overwritten, even with --force."""
    shutil.copytree(FIXTURES / "cnn_external", tmp_path / "ext")
    data = tmp_path / "ext" / "model.onnx.data"
    original = data.read_bytes()
    check(tmp_path, [tmp_path / "ext" / "model.onnx", "--sparsity", "0.5", "-o", data, "--force"], 7, "input")
    assert data.read_bytes() == original


def test_existing_external_data_file_without_force(work):
    """With external data the output is two files; an existing ``<output>.data`` is refused like the model file."""
    (work / "out.onnx.data").write_bytes(b"keep me")
    check(work, [work / "model.onnx", "--sparsity", "0.5", "-o", work / "out.onnx", "--external-data"], 7, "--force")
    assert (work / "out.onnx.data").read_bytes() == b"keep me"


def _model_rejecting_synthetic_inputs(path):
    """An MLP plus a second output that needs len(m) == len(s) + 1 (as a KV cache needs mask = past + new)."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w1", [8, 16]), ("b1", [16]), ("w2", [16, 4]))]
    inits += [onnx.numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("one", [1]), ("end", [2**62]), ("axis", [1]))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "w2"], ["y"]),
             helper.make_node("Slice", ["m", "one", "end", "axis"], ["m1"]),
             helper.make_node("Add", ["m1", "s"], ["z"])]
    graph = helper.make_graph(nodes, "kv", [
        helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8]),
        helper.make_tensor_value_info("m", onnx.TensorProto.FLOAT, ["N", "T"]),
        helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, ["N", "S"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["N", "S"])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def test_model_that_rejects_synthetic_inputs(tmp_path):
    """Validation cannot run: the model is written, a warning names the fix (exit 0); with a gate, exit 8 says so."""
    src, out = tmp_path / "kv.onnx", tmp_path / "kv.pruned.onnx"
    _model_rejecting_synthetic_inputs(src)
    code, stdout, err = run_cli(src, "--structured", "--sparsity", "0.5", "-o", out)
    assert code == 0, err
    assert "warning: not validated: the original model does not run on the synthetic inputs" in stdout
    assert "--input-shape" in stdout
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    code, _, err = run_cli(src, "--structured", "--sparsity", "0.5", "-o", out, "--force", "--min-cosine", "0.9")
    assert_error(code, err, 8, "not validated", "does not run on the synthetic inputs", f"written to {out}")
    code, _, err = run_cli(src, "--structured", "--sparsity", "0.5", "-o", out, "--force",
                                "--input-shape", "m:1x17", "--input-shape", "s:1x16", "--report", tmp_path / "r.json")
    assert code == 0, err
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passes"][0]["details"]["groups"][0]["channels_after"] == 8
    assert report["validation"]["providers"]["CPUExecutionProvider"]["outputs"]["z"]["rel_l2"] == 0


def _model_with_default_domain_op(path, op):
    """RMSNorm as onnxruntime's optimizer writes it (``op`` in the ONNX domain), then an MLP."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("g", [8]), ("w1", [8, 16]), ("w2", [16, 4]))]
    nodes = [helper.make_node(op, ["x", "g"], ["n"], axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["n", "w1"], ["h0"]), helper.make_node("Relu", ["h0"], ["h1"]),
             helper.make_node("MatMul", ["h1", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def test_onnxruntime_default_domain_op_is_accepted_with_a_warning(tmp_path):
    """onnxruntime's SimplifiedLayerNormalization in the ONNX domain (its transformer optimizer writes it):
    onnxruntime runs the model, so it is pruned, with a warning; an op nobody knows still fails."""
    import onnxruntime as ort

    src, out = tmp_path / "rms.onnx", tmp_path / "rms.pruned.onnx"
    _model_with_default_domain_op(src, "SimplifiedLayerNormalization")
    code, stdout, err = run_cli(src, "--structured", "--sparsity", "0.5", "-o", out)
    assert code == 0, err
    assert "SimplifiedLayerNormalization in the ONNX domain" in stdout + err
    pruned = onnx.load(str(out))
    assert {i.name: list(i.dims) for i in pruned.graph.initializer}["w1"] == [8, 8]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones((2, 8), np.float32)})[0].shape == (2, 4)
    bad = tmp_path / "bad.onnx"
    _model_with_default_domain_op(bad, "NoSuchNormalization")
    check(tmp_path, [bad, "--sparsity", "0.5"], 4, "No Op registered for NoSuchNormalization")


# --------------------------------------------------------------------------------------
# Malformed tensors: exit 4 naming the tensor, never "internal error", nothing written
# --------------------------------------------------------------------------------------


def _mlp(tmp_path, weight, extra_inputs=(), name="bad.onnx"):
    """x[1, 4] @ weight -> y, with ``weight`` (a TensorProto) as the initializer; returns the saved path."""
    graph = helper.make_graph([helper.make_node("MatMul", ["x", weight.name], ["y"])], "mlp",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4]), *extra_inputs],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])], [weight])
    path = tmp_path / name
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                                       ir_version=8).SerializeToString())
    return path


def _weight(values=None, dims=None, data_type=None):
    tensor = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32) if values is None else values, "w")
    if dims is not None:
        del tensor.dims[:]
        tensor.dims.extend(dims)
    if data_type is not None:
        tensor.data_type = data_type
    return tensor


def _typed_short():
    tensor = helper.make_tensor("w", onnx.TensorProto.FLOAT, [4, 4], [1.0] * 16)
    del tensor.float_data[-1]
    return tensor


@pytest.mark.parametrize("weight, words", [
    (_weight(dims=[9, 4099276460824344832]), ["'w'", f"expected {9 * 4099276460824344832 * 4} for"]),  # wraps in int64
    (_weight(dims=[-4, -4]), ["'w'", "negative dimension"]),
    (_weight(data_type=999), ["'w'", "unknown data type 999"]),
    (_weight(np.ones((4, 3), np.float32), dims=[4, 4]), ["'w'", "48 bytes of data, expected 64"]),
    (_typed_short(), ["'w'", "15 values in float_data, expected 16"]),
], ids=["wrapped-dims", "negative-dims", "unknown-dtype", "raw-size", "typed-size"])
def test_malformed_tensor(tmp_path, weight, words):
    check(tmp_path, [_mlp(tmp_path, weight), "--sparsity", "0.5"], 4, *words)


def test_malformed_constant_node(tmp_path):
    """The same checks reach Constant nodes (weights some exporters store that way)."""
    value = helper.make_tensor("c", onnx.TensorProto.INT64, [2], [1, 2])
    value.dims[0] = 2**62  # 2 * 2**62 elements wrap to 0 in int64
    value.dims.append(4)
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Constant", [], ["c"], value=value), helper.make_node("Identity", ["x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "const.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                                       ir_version=8).SerializeToString())
    check(tmp_path, [path, "--sparsity", "0.5"], 4, "'c'", "int64_data")


def test_inspect_does_not_skip_an_unknown_dtype(tmp_path):
    check(tmp_path, ["inspect", _mlp(tmp_path, _weight(data_type=999))], 4, "unknown data type 999")


@pytest.mark.parametrize("declared, words", [
    (helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [8, 8]), ["'w'", "[4, 4]", "[8, 8]"]),
    (helper.make_tensor_value_info("w", onnx.TensorProto.INT64, [4, 4]), ["'w'", "data type"]),
], ids=["shape", "dtype"])
def test_initializer_clashing_with_a_graph_input(tmp_path, declared, words):
    """It used to end in "internal error" with model.pruned.onnx left on disk."""
    check(tmp_path, [_mlp(tmp_path, _weight(), [declared]), "--sparsity", "0.5"], 4, *words)


def test_initializer_matching_its_graph_input_is_fine(tmp_path):
    declared = helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [4, "n"])
    code, _, err = run_cli(_mlp(tmp_path, _weight(np.arange(16, dtype=np.float32).reshape(4, 4)), [declared]),
                           "--sparsity", "0.5", "--no-validate")
    assert code == 0, err


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_prunable_weight(tmp_path, bad):
    values = np.arange(16, dtype=np.float32).reshape(4, 4)
    values[2, 1] = bad
    path = _mlp(tmp_path, _weight(values))
    check(tmp_path, [path, "--sparsity", "0.5"], 4, "'w'", "NaN or infinite")
    check(tmp_path, [path, "--structured", "--sparsity", "0.5"], 4, "'w'")


def test_non_finite_constant_that_is_not_a_weight_is_fine(tmp_path):
    """-inf in a mask-like constant (not a prunable weight) does not stop pruning."""
    mask = onnx.numpy_helper.from_array(np.array([0, -np.inf, 0, 0], np.float32), "mask")
    w = _weight(np.arange(16, dtype=np.float32).reshape(4, 4))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "mask"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])], [w, mask])
    path = tmp_path / "mask.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    code, _, err = run_cli(path, "--sparsity", "0.5", "--no-validate")
    assert code == 0, err
    pruned = onnx.numpy_helper.to_array(onnx.load(str(tmp_path / "mask.pruned.onnx")).graph.initializer[0])
    assert int((pruned == 0).sum()) == 8 and pruned[3].all()  # the 8 smallest of 0..15 went, the largest row stays


def test_internal_error_asks_for_a_report_with_debug(tmp_path, monkeypatch):
    """Exit 1 is for onnxprune's own bugs: the one line says so and asks for --debug output."""
    from onnxprune import cli

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "prune", broken)
    shutil.copy(CNN, tmp_path / "model.onnx")
    check(tmp_path, [tmp_path / "model.onnx", "--sparsity", "0.5"], 1, "bug in onnxprune", "ZeroDivisionError",
          "report it", "--debug")
