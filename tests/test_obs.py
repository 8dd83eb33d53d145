"""SparseGPT-style pruning with repair (--criterion obs, onnxprune/obs.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.analysis.weights import find_prunable_weights
from onnxprune.obs import obs_exact_rows, obs_prune_rows

from .conftest import FIXTURES, run_cli


def layer_model(op: str, weight: np.ndarray, x_shape: list, y_shape: list, **attrs) -> onnx.ModelProto:
    """One layer (input ``x`` -> ``op`` with weight ``w`` -> ``y``)."""
    node = helper.make_node(op, ["x", "w"], ["y"], name="layer", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape[1:]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *y_shape[1:]])],
                              [numpy_helper.from_array(weight.astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def correlated(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Inputs whose features are strongly correlated (a random mix of a few latent factors plus noise)."""
    latent = rng.standard_normal((n, max(2, d // 4)))
    return (latent @ rng.standard_normal((latent.shape[1], d)) + 0.1 * rng.standard_normal((n, d))).astype(np.float32)


def prune(model: onnx.ModelProto, calib: np.ndarray, tmp_path, **options) -> tuple[onnx.ModelProto, dict]:
    path = tmp_path / "calib.npz"
    np.savez(path, x=calib)
    pruned, result = onnxprune.prune(model, calibration_data=str(path), **options)
    return pruned, result.passes[0].details


def weight_of(model: onnx.ModelProto) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "w")


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def expected_obs(w_rows: np.ndarray, x: np.ndarray, *, count: int | None = None, nm=None) -> np.ndarray:
    """The OBS sweep written from the paper's formulas: columns in order; the mask from w² / [H_F⁻¹]_jj
    (F = the columns not processed yet); each pruned weight's error goes to F with H_F⁻¹."""
    h = x.astype(np.float64).T @ x.astype(np.float64)
    h += 0.01 * np.mean(np.diag(h)) * np.eye(len(h))
    w = w_rows.astype(np.float64).copy()
    d = w.shape[1]
    inverse_diag = np.array([np.linalg.inv(h[j:, j:])[0, 0] for j in range(d)])
    mask = np.zeros(w.shape, dtype=bool)
    if count is not None:  # one block: the count lowest scores over the whole matrix
        mask.flat[np.argsort((w ** 2 / inverse_diag).ravel(), kind="stable")[:count]] = True
    for j in range(d):
        if nm is not None and j % nm[1] == 0:
            scores = w[:, j:j + nm[1]] ** 2 / inverse_diag[j:j + nm[1]]
            for row, lowest in enumerate(np.argsort(scores, axis=1, kind="stable")[:, :nm[0]]):
                mask[row, j + lowest] = True
        inverse = np.linalg.inv(h[j:, j:])
        for row in np.flatnonzero(mask[:, j]):
            w[row, j:] -= w[row, j] / inverse[0, 0] * inverse[0, :]
            w[row, j] = 0.0
    return w


def expected_exact(w_rows: np.ndarray, x: np.ndarray, per_row: int, nm=None) -> np.ndarray:
    """Greedy OBS per row from the formula, with the inverse of the remaining weights' Hessian recomputed
    at every step: remove argmin w_q² / [H_R⁻¹]_qq, then w_R -= w_q / [H_R⁻¹]_qq · H_R⁻¹[:, q]."""
    h = x.astype(np.float64).T @ x.astype(np.float64)
    h += 0.01 * np.mean(np.diag(h)) * np.eye(len(h))
    out = np.zeros(w_rows.shape)
    for row, w in enumerate(w_rows.astype(np.float64)):
        w, remaining = w.copy(), list(range(len(w)))
        for _ in range(per_row):
            inverse = np.linalg.inv(h[np.ix_(remaining, remaining)])
            scores = w[remaining] ** 2 / np.diag(inverse)
            if nm is not None:
                for i, j in enumerate(remaining):
                    if sum(k not in remaining for k in range(j // nm[1] * nm[1], j // nm[1] * nm[1] + nm[1])) >= nm[0]:
                        scores[i] = np.inf
            q = int(np.argmin(scores))
            w[remaining] -= w[remaining[q]] / inverse[q, q] * inverse[:, q]
            w[remaining[q]] = 0.0
            remaining.pop(q)
        out[row] = w
    return out


@pytest.mark.parametrize("options, per_row, nm", [({"pattern": "2:4"}, 2, (2, 4)), ({"sparsity": 0.5}, 2, None)])
def test_exact_obs_matches_the_formula_on_a_4x4_problem(tmp_path, options, per_row, nm):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((4, 4)).astype(np.float32)  # MatMul [K, N]: rows of OBS are the N outputs
    x = correlated(rng, 64, 4)
    expected = expected_exact(w.T, x, per_row, nm)
    got, mask = obs_exact_rows(w.T, x.astype(np.float64).T @ x, count=None if nm else 8, nm=nm)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(mask, expected == 0)
    # through the pass: the same weights are zeroed; the kept ones are the OBS update or its least-squares refit
    pruned, details = prune(layer_model("MatMul", w, [1, 4], [1, 4]), x, tmp_path, criterion="obs", **options)
    entry = details["obs"]["layers"][0]
    assert entry["algorithm"] == "exact" and entry["choice"] in ("obs", "obs mask, refit")
    np.testing.assert_array_equal(weight_of(pruned) == 0, expected.T == 0)
    if entry["choice"] == "obs":
        np.testing.assert_allclose(weight_of(pruned), expected.T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options, expect", [({"pattern": "2:4"}, {"nm": (2, 4)}),
                                             ({"sparsity": 0.5}, {"count": 8})])
def test_sparsegpt_update_matches_the_formula_on_a_4x4_problem(tmp_path, monkeypatch, options, expect):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 4)).astype(np.float32)  # MatMul [K, N]: rows of the sweep are the N outputs
    x = correlated(rng, 64, 4)
    expected = expected_obs(w.T, x, **expect)
    got, mask = obs_prune_rows(w.T, x.astype(np.float64).T @ x, **expect)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(mask, expected == 0)
    assert not np.allclose(expected[expected != 0], w.T[expected != 0])  # the kept weights did move
    monkeypatch.setattr("onnxprune.obs.EXACT_WORK", 0)  # layers this small normally take the exact path
    pruned, details = prune(layer_model("MatMul", w, [1, 4], [1, 4]), x, tmp_path, criterion="obs", **options)
    assert [(e["layer"], e["algorithm"]) for e in details["obs"]["layers"]] == [("layer", "sparsegpt")]
    if details["obs"]["layers"][0]["choice"] != "row-wise refit":
        np.testing.assert_array_equal(weight_of(pruned) == 0, expected.T == 0)


def output_error(model: onnx.ModelProto, original: onnx.ModelProto, x: np.ndarray) -> float:
    reference = run(original, x)
    return float(np.linalg.norm(run(model, x) - reference) / np.linalg.norm(reference))


@pytest.mark.parametrize("options", [{"sparsity": 0.5}, {"sparsity": 0.7}, {"pattern": "2:4"}])
def test_obs_beats_magnitude_and_the_refit_on_correlated_inputs(tmp_path, options):
    rng = np.random.default_rng(0)
    model = layer_model("Gemm", rng.standard_normal((32, 64)), [1, 64], [1, 32], transB=1)
    x = correlated(rng, 512, 64)
    errors = {}
    for label, extra in (("magnitude", {}), ("refit", {"reconstruct": True}), ("obs", {"criterion": "obs"})):
        pruned, details = prune(model, x, tmp_path, **options, **extra)
        errors[label] = output_error(pruned, model, x)
    assert errors["obs"] < errors["magnitude"]
    assert errors["obs"] <= errors["refit"]
    reported = details["obs"]["layers"][0]
    assert reported["rel_error_repaired"] == pytest.approx(errors["obs"], rel=1e-3)
    assert reported["rel_error_masked"] > reported["rel_error_repaired"]


def test_sparsegpt_beats_magnitude_on_correlated_inputs(tmp_path, monkeypatch):
    """The one-pass sweep (large layers) is far better than magnitude; the exact refit of a magnitude mask
    can be better still on such low-rank inputs, which is why small layers take the exact path."""
    monkeypatch.setattr("onnxprune.obs.EXACT_WORK", 0)
    rng = np.random.default_rng(0)
    model = layer_model("Gemm", rng.standard_normal((32, 64)), [1, 64], [1, 32], transB=1)
    x = correlated(rng, 512, 64)
    obs, details = prune(model, x, tmp_path, sparsity=0.5, criterion="obs")
    magnitude, _ = prune(model, x, tmp_path, sparsity=0.5)
    assert details["obs"]["layers"][0]["algorithm"] == "sparsegpt"
    assert output_error(obs, model, x) < 0.5 * output_error(magnitude, model, x)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("options", [{"sparsity": 0.6}, {"pattern": "2:4"}])
def test_conv_grouped_or_not(tmp_path, monkeypatch, group, options, exact):
    if not exact:
        monkeypatch.setattr("onnxprune.obs.EXACT_WORK", 0)
    rng = np.random.default_rng(1)
    model = layer_model("Conv", rng.standard_normal((8, 8 // group, 3, 3)) * 0.3, [1, 8, 6, 6], [1, 8, 3, 6],
                        group=group,
                        pads=[1, 1, 1, 1], strides=[2, 1])
    x = np.repeat(rng.standard_normal((32, 4, 6, 6)), 2, axis=1) + 0.1 * rng.standard_normal((32, 8, 6, 6))
    x = x.astype(np.float32)
    pruned, details = prune(model, x, tmp_path, criterion="obs", **options)
    onnx.checker.check_model(pruned, full_check=True)
    w = weight_of(pruned)
    if "pattern" in options:
        blocks = np.moveaxis(w, 1, -1).reshape(8, 3, 3, -1, 4)
        assert (np.count_nonzero(blocks == 0, axis=-1) == 2).all()
    else:
        assert np.count_nonzero(w == 0) == round(0.6 * w.size)
    magnitude, _ = prune(model, x, tmp_path, **options)
    error = output_error(pruned, model, x)
    # the report's error (from the Gram matrices, in the sweep's column order) is the model's actual error
    assert details["obs"]["layers"][0]["rel_error_repaired"] == pytest.approx(error, rel=1e-3)
    assert details["obs"]["layers"][0]["algorithm"] == ("exact" if exact else "sparsegpt")
    assert error < output_error(magnitude, model, x)


@pytest.mark.parametrize("exact", [True, False])
def test_gemm_without_transb_and_exact_counts(tmp_path, monkeypatch, exact):
    if not exact:
        monkeypatch.setattr("onnxprune.obs.EXACT_WORK", 0)
    rng = np.random.default_rng(2)
    w = rng.standard_normal((300, 20))  # [K, N]: 300 inputs span three column blocks of 128
    model = layer_model("Gemm", w, [1, 300], [1, 20])
    x = correlated(rng, 400, 300)
    pruned, details = prune(model, x, tmp_path, criterion="obs", sparsity=0.37)
    assert np.count_nonzero(weight_of(pruned) == 0) == round(0.37 * w.size)
    assert details["tensors"][0]["sparsity"] == pytest.approx(round(0.37 * w.size) / w.size)
    magnitude, _ = prune(model, x, tmp_path, sparsity=0.37)
    assert output_error(pruned, model, x) < output_error(magnitude, model, x)


@pytest.fixture(scope="module")
def cnn_calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, input=np.random.default_rng(1).standard_normal((32, 3, 32, 32)).astype(np.float32))
    return str(path)


def test_cnn_fixture_checks_runs_and_reports_every_layer(cnn_calib, tmp_path, monkeypatch):
    monkeypatch.setattr("onnxprune.obs.EXACT_WORK", 0)  # the one-pass sweep: seconds on this fixture
    out = tmp_path / "pruned.onnx"
    code, printed, err = run_cli(FIXTURES / "cnn.onnx", "-o", out, "--sparsity", "0.5", "--criterion", "obs",
                                 "--calibration-data", cnn_calib, "--runs", "1", "--report", tmp_path / "r.json")
    assert code == 0, err
    assert "OBS repaired" in printed
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    import json

    details = json.loads((tmp_path / "r.json").read_text())["passes"][0]["details"]
    repaired = {entry["weight"] for entry in details["obs"]["layers"]}
    prunable = {w.name: w for w in find_prunable_weights(model)}
    assert repaired == set(prunable) - {s["weight"] for s in details["obs"]["skipped"]}
    assert details["obs"]["stages"] == len(repaired)  # a chain of layers: one onnxruntime pass per layer
    for entry in details["obs"]["layers"]:
        assert entry["rel_error_repaired"] < entry["rel_error_masked"]
        values = prunable[entry["weight"]].weight.array()  # (a refit may also zero weights on dead inputs)
        assert np.count_nonzero(values == 0) >= min(round(0.5 * values.size), values.size - 1)


def test_layers_reading_final_inputs_are_measured_in_one_pass(tmp_path):
    """q and k read the same input (one pass, one Gram matrix), o reads their product (a second pass)."""
    rng = np.random.default_rng(5)
    weights = {name: numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), name) for name in "qko"}
    nodes = [helper.make_node("MatMul", ["x", "q"], ["xq"], name="mq"),
             helper.make_node("MatMul", ["x", "k"], ["xk"], name="mk"),
             helper.make_node("Mul", ["xq", "xk"], ["h"], name="mul"),
             helper.make_node("MatMul", ["h", "o"], ["y"], name="mo")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], list(weights.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = correlated(rng, 128, 8)
    pruned, details = prune(model, x, tmp_path, criterion="obs", sparsity=0.5)
    assert details["obs"]["stages"] == 2
    assert [e["layer"] for e in details["obs"]["layers"]] == ["mq", "mk", "mo"]
    onnx.checker.check_model(pruned, full_check=True)
    assert output_error(pruned, model, x) < output_error(prune(model, x, tmp_path, sparsity=0.5)[0], model, x)


def test_obs_with_global_scope_takes_magnitude_ratios(cnn_calib):
    _magnitude, result = onnxprune.prune(FIXTURES / "cnn.onnx", sparsity=0.6, scope="global")
    _obs, obs_result = onnxprune.prune(FIXTURES / "cnn.onnx", sparsity=0.6, scope="global", criterion="obs",
                                       calibration_data=cnn_calib)
    zeros = {t["weight"]: t["zeros_after"] for t in result.passes[0].details["tensors"]}
    assert {t["weight"]: t["zeros_after"] for t in obs_result.passes[0].details["tensors"]} == zeros
    assert len({t["sparsity"] for t in result.passes[0].details["tensors"]}) > 1  # not uniform


@pytest.mark.parametrize("args, words", [
    (["--sparsity", "0.5", "--criterion", "obs"], "--calibration-data"),
    (["--threshold", "0.1", "--criterion", "obs", "--calibration-data", "x.npz"], "--threshold"),
    (["--structured", "--sparsity", "0.5", "--criterion", "obs", "--calibration-data", "x.npz"], "obs"),
])
def test_obs_usage_errors(tmp_path, args, words):
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "-o", tmp_path / "o.onnx", *args)
    assert code == 2 and words in err
    assert not (tmp_path / "o.onnx").exists()


# -- --reconstruct: OBS, never worse than the row-wise refit layer by layer ------------------------------------

TRAINED = FIXTURES / "trained"


def digits_mlp(**options) -> tuple[onnx.ModelProto, dict]:
    """The trained digits MLP (64-256-128-10, real weights), pruned with its 256 calibration images."""
    pruned, result = onnxprune.prune(TRAINED / "digits_mlp.onnx", calibration_data=str(TRAINED / "digits_calib.npz"),
                                     **options)
    return pruned, result.passes[0].details


def first_layer_error(model: onnx.ModelProto) -> float:
    """Error of the first Gemm's output against the original on the calibration images, relative to XWᵀ
    (the bias, which no repair changes, left out as in the report)."""
    from onnxprune.calibration import session_with_outputs

    original = onnx.load(str(TRAINED / "digits_mlp.onnx"))
    x = {"input": np.load(TRAINED / "digits_calib.npz")["input"]}
    out = [session_with_outputs(m, ["/1/Gemm_output_0"]).run(["/1/Gemm_output_0"], x)[0] for m in (original, model)]
    bias = next(numpy_helper.to_array(t) for t in original.graph.initializer if t.name == "1.bias")
    return float(np.linalg.norm(out[1] - out[0]) / np.linalg.norm(out[0] - bias))


@pytest.mark.parametrize("options", [{"sparsity": 0.7}, {"pattern": "2:4"}])
def test_reconstruct_repairs_by_obs_never_worse_than_rowwise_per_layer(options):
    obs, details = digits_mlp(reconstruct=True, **options)
    rowwise, rowwise_details = digits_mlp(reconstruct=True, repair="rowwise", **options)
    assert details["reconstruction"] is None  # every layer is covered by OBS: no row-wise pass after it
    assert rowwise_details["reconstruction"]["layers"] == 3 and "obs" not in rowwise_details
    layers = details["obs"]["layers"]
    assert [e["weight"] for e in layers] == ["1.weight", "3.weight", "5.weight"]
    for entry in layers:
        candidates = entry["rel_error_candidates"]
        assert set(candidates) == {"obs", "obs mask, refit", "row-wise refit"}
        assert entry["rel_error_repaired"] == min(candidates.values()) <= candidates["row-wise refit"]
    # the row-wise candidate is scored on the same Gram the row-wise refit solves: for the first layer (same
    # inputs in both runs) its error is the row-wise model's actual error, and the chosen one is no larger
    assert layers[0]["rel_error_candidates"]["row-wise refit"] == pytest.approx(first_layer_error(rowwise), rel=1e-3)
    assert first_layer_error(obs) == pytest.approx(layers[0]["rel_error_repaired"], rel=1e-3)
    assert first_layer_error(obs) < first_layer_error(rowwise)
    if "pattern" in options:  # N:M: at most 2 nonzeros in every 4 consecutive inputs of each output row
        for init in obs.graph.initializer:  # (3 or 4 zeros where digits' border pixels are never lit)
            if init.name.endswith("weight"):
                blocks = numpy_helper.to_array(init).reshape(init.dims[0], -1, 4)
                assert (np.count_nonzero(blocks == 0, axis=-1) >= 2).all(), init.name
                assert np.mean(np.count_nonzero(blocks == 0, axis=-1) == 2) > 0.8, init.name


def test_a_layer_keeps_the_rowwise_refit_where_obs_is_worse(tmp_path, monkeypatch):
    """With the OBS solver made poor (it zeroes the largest weights), the rule falls back to the row-wise refit
    of the magnitude mask: same weights zeroed and the same refitted values as ``--repair rowwise``."""
    import onnxprune.obs as obs_module

    exact = obs_module.obs_exact_rows

    def largest(rows, hessian, *, count=None, nm=None, damp=obs_module.DAMP):
        order = np.argsort(-np.abs(rows), axis=None)[:count]
        mask = np.zeros(rows.shape, dtype=bool)
        mask.flat[order] = True
        return np.where(mask, 0.0, rows).astype(np.float32), mask

    rng = np.random.default_rng(6)
    model = layer_model("Gemm", rng.standard_normal((16, 32)), [1, 32], [1, 16], transB=1)
    x = correlated(rng, 256, 32)
    rowwise, _ = prune(model, x, tmp_path, sparsity=0.5, reconstruct=True, repair="rowwise")
    good, good_details = prune(model, x, tmp_path, sparsity=0.5, reconstruct=True)
    monkeypatch.setattr(obs_module, "obs_exact_rows", largest)
    fallback, details = prune(model, x, tmp_path, sparsity=0.5, reconstruct=True)
    assert details["obs"]["layers"][0]["choice"] == "row-wise refit"
    np.testing.assert_array_equal(weight_of(fallback) == 0, weight_of(rowwise) == 0)
    np.testing.assert_allclose(weight_of(fallback), weight_of(rowwise), rtol=1e-3, atol=1e-4)
    assert good_details["obs"]["layers"][0]["choice"] != "row-wise refit"  # the real solver wins here
    assert output_error(good, model, x) < output_error(rowwise, model, x)
    assert exact is not largest


@pytest.mark.parametrize("args, words", [
    (["--sparsity", "0.5", "--repair", "rowwise", "--calibration-data", "x.npz"], "--reconstruct"),
    (["--structured", "--sparsity", "0.5", "--reconstruct", "--repair", "obs", "--calibration-data", "x.npz"],
     "--structured"),
])
def test_repair_usage_errors(tmp_path, args, words):
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "-o", tmp_path / "o.onnx", *args)
    assert code == 2 and words in err
    assert not (tmp_path / "o.onnx").exists()


# --- recurrent W/R and weights shared by unrolled steps --------------------------------------------------------


def rnn_model(direction: str, layout: int, with_state: bool, rng: np.random.Generator) -> onnx.ModelProto:
    """One RNN (Tanh) whose hidden sequence Y is the output: atanh(Y) is linear in x_t and h_{t-1}."""
    dirs, steps, batch, features, hidden = (2 if direction == "bidirectional" else 1), 4, 3, 5, 6
    inits = [numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
             for name, shape in [("W", [dirs, hidden, features]), ("R", [dirs, hidden, hidden]), ("B", [dirs, 2 * hidden])]]
    x_shape = [batch, steps, features] if layout else [steps, batch, features]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    names = ["x", "W", "R", "B", ""]
    if with_state:
        inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, [batch, dirs, hidden] if layout
                                                    else [dirs, batch, hidden]))
        names.append("h0")
    node = helper.make_node("RNN", names, ["y"], hidden_size=hidden, direction=direction, layout=layout)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


@pytest.mark.parametrize("direction, with_state", [("forward", False), ("reverse", True), ("bidirectional", True)])
def test_previous_states_are_the_inputs_of_r(direction, with_state):
    """h_{t-1} built from Y and the initial state reproduces every step: atanh(Y_t) = W x_t + R h_{t-1} + b."""
    from onnxprune.obs import _previous_states

    rng = np.random.default_rng(3)
    model = rnn_model(direction, 0, with_state, rng)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in model.graph.input}
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    node = model.graph.node[0]
    previous = _previous_states(node, y, feeds.get("h0"))  # [steps x batch, directions, hidden]
    w, r, b = (numpy_helper.to_array(t) for t in model.graph.initializer)
    x = feeds["x"]
    for d in range(len(w)):
        hidden = w.shape[1]
        pre = x.reshape(-1, x.shape[-1]) @ w[d].T + previous[:, d] @ r[d].T + b[d, :hidden] + b[d, hidden:]
        np.testing.assert_allclose(np.tanh(pre), y[:, d].reshape(-1, hidden), atol=1e-5)
    # batch-first layout (layout=1, which onnxruntime does not run): the same states from the transposed tensors
    batch_first = rnn_model(direction, 1, with_state, rng).graph.node[0]
    state = feeds["h0"].transpose(1, 0, 2) if with_state else None
    np.testing.assert_array_equal(_previous_states(batch_first, y.transpose(2, 0, 1, 3), state), previous)


def relative(model: onnx.ModelProto, original: onnx.ModelProto, feeds: list[dict]) -> float:
    run_a = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    run_b = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    got = np.concatenate([run_a.run(None, f)[0].ravel() for f in feeds])
    want = np.concatenate([run_b.run(None, f)[0].ravel() for f in feeds])
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("name", ["lstm_bidirectional", "gru_forward", "rnn_bidirectional_gemm"])
def test_recurrent_w_and_r_are_repaired(name):
    """W and R of LSTM/GRU/RNN are repaired (their layer error falls), each at the requested sparsity, and the
    repaired model is closer to the original than the same sparsity without repair."""
    original = onnx.load(str(FIXTURES / "recurrent" / f"{name}.onnx"))
    shape = [d.dim_value for d in original.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(11)
    calib = [{"input": rng.standard_normal(shape).astype(np.float32)} for _ in range(24)]
    held_out = [{"input": rng.standard_normal(shape).astype(np.float32)} for _ in range(8)]
    repaired, result = onnxprune.prune(original, sparsity=0.5, reconstruct=True, calibration_data=calib)
    plain, _ = onnxprune.prune(original, sparsity=0.5)
    details = result.passes[0].details
    layers = {entry["weight"]: entry for entry in details["obs"]["layers"]}
    assert {"rnn0.W", "rnn0.R"} <= set(layers)
    for weight in ("rnn0.W", "rnn0.R"):
        assert layers[weight]["rel_error_repaired"] < layers[weight]["rel_error_masked"]
        values = numpy_helper.to_array(next(t for t in repaired.graph.initializer if t.name == weight))
        assert np.count_nonzero(values == 0) == round(0.5 * values.size)
    onnx.checker.check_model(repaired, full_check=True)
    assert relative(repaired, original, held_out) < 0.8 * relative(plain, original, held_out)


def test_weight_shared_by_unrolled_steps_is_repaired_on_all_its_inputs(tmp_path):
    """One Gemm weight read at two steps (an unrolled recurrence): its Gram sums both steps' inputs, so the
    repaired weight fits both; a refit on one step's inputs only would not."""
    rng = np.random.default_rng(8)
    w = numpy_helper.from_array(rng.standard_normal((6, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h1"], name="step1", transB=1),
             helper.make_node("Tanh", ["h1"], ["t1"]),
             helper.make_node("MatMul", ["t1", "expand"], ["x2"], name="expand"),
             helper.make_node("Gemm", ["x2", "w"], ["y"], name="step2", transB=1)]
    expand = numpy_helper.from_array(np.eye(6, 8, dtype=np.float32), "expand")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], [w, expand])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = correlated(rng, 256, 8)
    pruned, details = prune(model, x, tmp_path, sparsity=0.5, reconstruct=True)
    entry = next(e for e in details["obs"]["layers"] if e["weight"] == "w")
    assert entry["rel_error_repaired"] < entry["rel_error_masked"]
    assert not any(s["weight"] == "w" for s in details["obs"]["skipped"])
    assert np.count_nonzero(weight_of(pruned) == 0) == 24
    plain, _ = prune(model, x, tmp_path, sparsity=0.5)
    assert output_error(pruned, model, x[:64]) < output_error(plain, model, x[:64])


@pytest.mark.slow
def test_ddddocr_lstm_repaired_closer_to_the_original():
    """The trained ddddocr CRNN (torch 1.9 export, bidirectional LSTM 512): only its LSTM W and R pruned to 50 %
    (recipe overrides); with repair the logits on held-out rendered captchas are closer to the original's."""
    from tests.corpus.models import BY_NAME, INSTALL

    entry = BY_NAME["ddddocr"]
    path = entry.locate()
    if path is None:
        pytest.skip(f"corpus package {entry.dist} is not installed; install the corpus with: {INSTALL}")
    original = onnx.load(str(path))
    lstm = next(node for node in original.graph.node if node.op_type == "LSTM")
    w_name, r_name = lstm.input[1], lstm.input[2]
    overrides = [{"match": w_name, "sparsity": 0.5}, {"match": r_name, "sparsity": 0.5}, {"match": "*", "exclude": True}]
    calib, _ = entry.make(np.random.default_rng(2), 64, 0)  # 64 x 16 steps: twice the 512 inputs of W and R
    held_out, _ = entry.make(np.random.default_rng(1), 4, 0)
    samples = [{"input1": calib["input1"][i:i + 1]} for i in range(64)]
    checks = [{"input1": held_out["input1"][i:i + 1]} for i in range(4)]
    repaired, result = onnxprune.prune(original, overrides=overrides, reconstruct=True, calibration_data=samples)
    plain, _ = onnxprune.prune(original, overrides=overrides)
    layers = {entry["weight"]: entry for entry in result.passes[0].details["obs"]["layers"]}
    assert set(layers) == {w_name, r_name}
    for name in (w_name, r_name):
        assert layers[name]["rel_error_repaired"] < layers[name]["rel_error_masked"]
        values = numpy_helper.to_array(next(t for t in repaired.graph.initializer if t.name == name))
        assert np.count_nonzero(values == 0) == round(0.5 * values.size)
    assert relative(repaired, original, checks) < 0.8 * relative(plain, original, checks)


def test_too_few_calibration_vectors_are_reported(tmp_path, caplog):
    """Fewer input vectors than inputs: the Gram matrix is singular, the repair can fit the calibration data
    and generalise worse (ddddocr's LSTM with 8 captchas); the report and the log say so."""
    rng = np.random.default_rng(4)
    model = layer_model("Gemm", rng.standard_normal((8, 32)), [1, 32], [1, 8], transB=1)
    with caplog.at_level("WARNING", logger="onnxprune.obs"):
        _, details = prune(model, correlated(rng, 12, 32), tmp_path, sparsity=0.5, reconstruct=True)
    entry = details["obs"]["layers"][0]
    assert (entry["input_vectors"], entry["inputs"]) == (12, 32)
    assert "only 12 input vectors" in caplog.text
    _, details = prune(model, correlated(rng, 64, 32), tmp_path, sparsity=0.5, reconstruct=True)
    assert details["obs"]["layers"][0]["input_vectors"] == 64


def test_too_few_calibration_vectors_keep_the_obs_solution(tmp_path):
    """With fewer calibration vectors than inputs the refits interpolate the calibration data (near-zero error
    there) and generalise worse: the layer keeps the dampened OBS solution, which on held-out inputs of the same
    distribution is closer to the original than the row-wise refit (``--repair rowwise``) of the same data."""
    rng = np.random.default_rng(7)
    mixing = rng.standard_normal((48, 64))
    x = (rng.standard_normal((24 + 512, 48)) @ mixing + 0.1 * rng.standard_normal((24 + 512, 64))).astype(np.float32)
    calib, held_out = x[:24], x[24:]
    model = layer_model("Gemm", rng.standard_normal((32, 64)), [1, 64], [1, 32], transB=1)
    repaired, details = prune(model, calib, tmp_path, sparsity=0.5, reconstruct=True)
    entry = details["obs"]["layers"][0]
    assert (entry["input_vectors"], entry["inputs"], entry["choice"]) == (24, 64, "obs")
    assert set(entry["rel_error_candidates"]) == {"obs"}
    rowwise, _ = prune(model, calib, tmp_path, sparsity=0.5, reconstruct=True, repair="rowwise")
    assert output_error(rowwise, model, calib) < 0.02 and output_error(repaired, model, calib) < 0.02  # both fit
    assert output_error(repaired, model, held_out) < 0.7 * output_error(rowwise, model, held_out)  # OBS generalises
    # enough vectors: the refits are candidates again
    _, details = prune(model, x[:128], tmp_path, sparsity=0.5, reconstruct=True)
    assert set(details["obs"]["layers"][0]["rel_error_candidates"]) == {"obs", "obs mask, refit", "row-wise refit"}


def wide_problem(seed: int = 5, inputs: int = 1100, rows: int = 6, samples: int = 700):
    """A refit problem like the unrolled LSTM's: rows keeping about WIDE + 50 of ``inputs`` weights, some
    narrow rows, and a rank-deficient Gram (fewer input vectors than inputs) with drift (P != H)."""
    from onnxprune import obs_solve

    rng = np.random.default_rng(seed)
    x = correlated(rng, samples, inputs).astype(np.float64)
    x_orig = x + 0.05 * rng.standard_normal(x.shape)
    h, p, g = x.T @ x, x.T @ x_orig, x_orig.T @ x_orig
    weights = rng.standard_normal((rows, inputs)).astype(np.float32)
    mask = np.zeros((rows, inputs), dtype=bool)
    for r in range(rows):
        kept = obs_solve.WIDE + 50 if r % 3 else 300  # rows 0 and 3 narrow
        mask[r, rng.permutation(inputs)[kept:]] = True
    return weights, mask, h, p, g


def test_wide_rows_agree_with_the_exact_per_row_solve():
    from onnxprune import obs_solve

    weights, mask, h, p, g = wide_problem()
    fast = obs_solve.refit_masked(weights, mask, h, p)
    lam = obs_solve.RIDGE * float(np.mean(np.diag(h))) + 1e-12
    exact = np.zeros(weights.shape, dtype=np.float32)
    obs_solve._refit_exact(exact, mask, (~mask).sum(axis=1), h, weights.astype(np.float64) @ p.T, lam)
    assert np.all(fast[mask] == 0) and np.all(exact[~mask] != 0)
    wide = (~mask).sum(axis=1) >= obs_solve.WIDE
    assert wide.sum() == 4
    assert np.linalg.norm(fast[wide] - exact[wide]) <= 1e-5 * np.linalg.norm(exact[wide])
    assert np.array_equal(fast[~wide], exact[~wide])  # narrow rows: the same stacked LU solve, bit for bit
    errors = [obs_solve.output_error([weights], [w], [(h, p, g)]) for w in (fast, exact)]
    assert abs(errors[0] - errors[1]) <= 1e-5 * errors[1]


def test_wide_rows_take_the_cholesky_path(monkeypatch):
    from onnxprune import obs_solve

    weights, mask, h, p, _ = wide_problem(inputs=1080, rows=3)
    seen = {"wide": [], "exact": []}
    wide_solve, exact_solve = obs_solve.solve_wide_rows, obs_solve._refit_exact

    def spy_wide(h, lam, keep, rhs):
        seen["wide"].append(keep.sum(axis=1).tolist())
        return wide_solve(h, lam, keep, rhs)

    def spy_exact(out, mask, kept_counts, *args):
        seen["exact"].append(kept_counts.tolist())
        return exact_solve(out, mask, kept_counts, *args)

    monkeypatch.setattr(obs_solve, "solve_wide_rows", spy_wide)
    monkeypatch.setattr(obs_solve, "_refit_exact", spy_exact)
    obs_solve.refit_masked(weights, mask, h, p)
    wide = obs_solve.WIDE + 50
    assert seen["wide"] == [[wide, wide]]  # rows 1 and 2, in one call
    assert seen["exact"] == [[300, 0, 0]]  # only the narrow row 0 reaches the stacked LU solve
