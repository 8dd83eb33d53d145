"""LSTM/GRU/RNN: W and R pruned by unstructured/N:M pruning per gate block; hidden units removed structurally."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxprune
from onnxprune.analysis.cost import node_macs
from onnxprune.analysis.weights import find_prunable_weights

from .conftest import FIXTURES, run_cli
from .oracle import list_groups, masked_and_removed, random_choice, relative_error

sys.path.insert(0, str(FIXTURES))
import build_recurrent as builder

OPS = ["LSTM", "GRU", "RNN"]


def feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input}


def run(model: onnx.ModelProto, inputs) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)


def recurrent_node(model: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type in OPS)


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.parametrize("name", sorted(builder.FIXTURES))
def test_fixture_file_is_current(name):
    path = FIXTURES / "recurrent" / f"{name}.onnx"
    assert onnx.load(str(path)).SerializeToString() == builder.FIXTURES[name]().SerializeToString(), (
        "run python fixtures/build_recurrent.py")


# -- unstructured ----------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_w_and_r_are_prunable_along_the_input_axis(op):
    model = builder.recurrent(op, "bidirectional")
    found = {p.name: p for p in find_prunable_weights(model)}
    gates = builder.GATES[op]
    for name in ("rnn0.W", "rnn0.R"):
        assert found[name].reduction_axis == 2 and found[name].gate_blocks == builder.HIDDEN
        assert found[name].weight.shape[1] == gates * builder.HIDDEN
    assert "rnn0.B" not in found  # the bias stays dense


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_sparsity_reaches_every_gate_block(op, direction):
    model = builder.recurrent(op, direction, "matmul", "const")
    original = weights(model)
    pruned_model, result = onnxprune.prune(model, sparsity=0.5)
    pruned = weights(pruned_model)
    tensors = {t["weight"]: t for t in result.passes[0].details["tensors"]}
    assert {"rnn0.W", "rnn0.R"} <= tensors.keys()
    for name in ("rnn0.W", "rnn0.R"):
        w, before = pruned[name], original[name]
        blocks = w.reshape(w.shape[0], builder.GATES[op], builder.HIDDEN, -1)
        for d in range(w.shape[0]):
            for g in range(builder.GATES[op]):
                block, was = blocks[d, g], before.reshape(blocks.shape)[d, g]
                assert np.count_nonzero(block == 0) == block.size // 2
                # the zeros are the block's smallest magnitudes
                assert np.abs(was[block == 0]).max() <= np.abs(was[block != 0]).min()
    assert np.array_equal(pruned["rnn0.B"], original["rnn0.B"])
    out = run(pruned_model, feeds(model))
    assert out[0].shape == run(model, feeds(model))[0].shape


def test_nm_pattern_along_the_last_axis():
    model = builder.recurrent("LSTM", "bidirectional")
    pruned, result = onnxprune.prune(model, pattern="2:4")
    for name in ("rnn0.W", "rnn0.R"):
        w = weights(pruned)[name]
        if w.shape[-1] % 4:
            assert any(s["weight"] == name for s in result.passes[0].details["skipped"])
            continue
        quads = w.reshape(*w.shape[:-1], -1, 4)
        assert (np.count_nonzero(quads == 0, axis=-1) == 2).all()


def test_activation_criterion_scores_w_and_says_why_r_keeps_magnitude(tmp_path):
    model = builder.recurrent("LSTM", "forward", "matmul")
    calib = tmp_path / "calib.npz"
    np.savez(calib, **feeds(model, 3))
    pruned, result = onnxprune.prune(model, sparsity=0.5, criterion="activation", calibration_data=str(calib))
    tensors = {t["weight"]: t for t in result.passes[0].details["tensors"]}
    assert "note" not in tensors["rnn0.W"]
    assert "hidden state" in tensors["rnn0.R"]["note"]
    w = weights(pruned)["rnn0.W"]
    # Wanda: each row of each gate block keeps half of its inputs
    assert (np.count_nonzero(w.reshape(-1, w.shape[-1]) == 0, axis=1) == w.shape[-1] // 2).all()


def test_cli_reports_w_and_r(tmp_path):
    out = tmp_path / "out.onnx"
    code, stdout, _ = run_cli(FIXTURES / "recurrent" / "lstm_bidirectional.onnx", "--sparsity", "0.5", "-o", out)
    assert code == 0
    assert "rnn0.W" in stdout and "rnn0.R" in stdout
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


# -- structured ------------------------------------------------------------------------------

CASES = [(op, direction, head, state) for op in OPS for direction in ("forward", "bidirectional")
         for head in ("matmul", "gemm") for state in ("none", "const", "zeros")]


@pytest.mark.parametrize("op,direction,head,state", CASES)
def test_masked_equals_removed(op, direction, head, state):
    model = builder.recurrent(op, direction, head, state, peepholes=op == "LSTM", linear_before_reset=int(op == "GRU"))
    groups = [g for g in list_groups(model) if op in g["ops"] and g["channels"] == builder.HIDDEN]
    assert groups and groups[0]["prunable"] == builder.HIDDEN
    for seed in (0, 1):
        choice = random_choice(model, 0.5, seed)
        assert any(g["id"] in choice for g in groups)
        masked, removed = masked_and_removed(model, choice)
        onnx.checker.check_model(removed, full_check=True)
        x = feeds(model, seed)
        assert relative_error(run(masked, x), run(removed, x)) <= 1e-5
        kept = builder.HIDDEN - len(choice[groups[0]["id"]])
        node = recurrent_node(removed)
        assert next(a.i for a in node.attribute if a.name == "hidden_size") == kept
        w = weights(removed)
        assert w["rnn0.R"].shape[1:] == (builder.GATES[op] * kept, kept)


def test_removed_units_are_the_chosen_rows_of_every_gate():
    model = builder.recurrent("LSTM", "bidirectional", "matmul", "const", peepholes=True)
    group = next(g for g in list_groups(model) if "LSTM" in g["ops"] and g["channels"] == builder.HIDDEN)
    _, removed = masked_and_removed(model, {group["id"]: [1, 4]})
    keep = [0, 2, 3, 5]
    before, after = weights(model), weights(removed)
    rows = [g * builder.HIDDEN + j for g in range(4) for j in keep]
    assert np.array_equal(after["rnn0.W"], before["rnn0.W"][:, rows])
    assert np.array_equal(after["rnn0.R"], before["rnn0.R"][:, rows][:, :, keep])
    assert np.array_equal(after["rnn0.B"], before["rnn0.B"][:, rows + [r + 4 * builder.HIDDEN for r in rows]])
    assert np.array_equal(after["rnn0.P"], before["rnn0.P"][:, [g * builder.HIDDEN + j for g in range(3) for j in keep]])
    assert np.array_equal(after["rnn0.initial_h"], before["rnn0.initial_h"][:, :, keep])
    # the head reads [dirs * hidden]: unit j of both directions goes
    head_rows = keep + [builder.HIDDEN + j for j in keep]
    assert np.array_equal(after["head.weight"], before["head.weight"][head_rows])


def test_masking_only_the_consumers_is_not_enough():
    """A unit's output also feeds the recurrence: the oracle's masked model zeroes R's column too."""
    model = builder.recurrent("GRU", "forward", "matmul")
    group = next(g for g in list_groups(model) if "GRU" in g["ops"] and g["channels"] == builder.HIDDEN)
    choice = {group["id"]: [0, 3]}
    masked, removed = masked_and_removed(model, choice)
    assert not weights(masked)["rnn0.R"][:, :, [0, 3]].any()
    heads_only = onnx.ModelProto()
    heads_only.CopyFrom(model)
    for init in heads_only.graph.initializer:
        if init.name == "head.weight":
            values = onnx.numpy_helper.to_array(init).copy()
            values[[0, 3]] = 0
            init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    x = feeds(model)
    assert relative_error(run(masked, x), run(removed, x)) <= 1e-5
    assert relative_error(run(heads_only, x), run(removed, x)) > 1e-3


def test_stacked_layers_and_state_outputs():
    stacked = builder.recurrent("LSTM", "bidirectional", state="zeros", stacked=True)
    assert sum(1 for g in list_groups(stacked) if "LSTM" in g["ops"] and g["prunable"] == builder.HIDDEN) == 2
    choice = random_choice(stacked, 0.5, 3)
    x = feeds(stacked)
    assert relative_error(*(run(m, x) for m in masked_and_removed(stacked, choice))) <= 1e-5
    with_state = builder.recurrent("GRU", "forward", state_output=True)
    frozen = next(g for g in list_groups(with_state) if "GRU" in g["ops"] and g["channels"] == builder.HIDDEN)
    assert frozen["prunable"] == 0 and any("state_h" in r for r in frozen["frozen"])


def test_initial_state_given_as_input_freezes_the_units():
    model = builder.recurrent("LSTM", "forward", state="input")
    group = next(g for g in list_groups(model) if "LSTM" in g["ops"] and g["channels"] == builder.HIDDEN)
    assert group["prunable"] == 0
    assert any("graph input" in r for r in group["frozen"])


@pytest.mark.parametrize("name", ["lstm_bidirectional", "gru_forward", "rnn_bidirectional_gemm"])
def test_structured_cli_removes_hidden_units(tmp_path, name):
    path = FIXTURES / "recurrent" / f"{name}.onnx"
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code, _, _ = run_cli(path, "--structured", "--sparsity", "0.5", "-o", out, "--report", report)
    assert code == 0
    model, pruned = onnx.load(str(path)), onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    node = recurrent_node(pruned)
    assert next(a.i for a in node.attribute if a.name == "hidden_size") == builder.HIDDEN // 2
    x = feeds(model)
    assert [o.shape for o in run(pruned, x)] == [o.shape for o in run(model, x)]
    before, after = sum(node_macs(model).values()), sum(node_macs(pruned).values())
    assert after < before


def test_recurrent_macs():
    model = builder.recurrent("LSTM", "bidirectional")
    macs = node_macs(model)
    s, n, d, h, i = builder.SEQ, builder.BATCH, 2, builder.HIDDEN, builder.INNER
    assert macs["lstm0"] == s * n * d * 4 * h * (i + h)
