"""Which channels and weights go: small hand-computed cases for every criterion and scope.

Each model is built so the expected answer can be worked out on paper (the numbers are in the
comments); the weights are not ordered by index, have no ties, and L1/L2, BN scale/weight
magnitude, activation/magnitude and reconstruction/magnitude disagree, so a criterion that is
computed wrongly (or a ranking that is inverted) picks a different set.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune

F = np.float32


def build(nodes: list, inits: dict[str, np.ndarray], inputs: list, outputs: list) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "choice", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v, F), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def removed_slices(original: np.ndarray, pruned: np.ndarray, axis: int) -> set[int]:
    """Positions along ``axis`` of ``original`` whose slice is no longer in ``pruned`` (order is kept)."""
    kept, j = [], 0
    a, b = np.moveaxis(original, axis, 0), np.moveaxis(pruned, axis, 0)
    for i in range(len(a)):
        if j < len(b) and np.array_equal(a[i], b[j]):
            kept.append(i)
            j += 1
    assert j == len(b), "the pruned weight holds slices the original does not have"
    return set(range(len(a))) - set(kept)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def structured(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, dict]:
    pruned, result = onnxprune.prune(model, structured=True, **options)
    onnx.checker.check_model(pruned, full_check=True)
    return pruned, result.to_dict()["passes"][0]["details"]


def reported(details: dict) -> dict[str, set[int]]:
    """Producer -> removed output channels, as the report states them."""
    return {name: set(ids) for g in details["groups"] for name, ids in g["removed_channels"].items()}


# -- one group: Conv -> BN -> Relu -> Conv -----------------------------------------------------------
#
# channel c: (W1[c, 0], W1[c, 1] | W2[0, c], W2[1, c])    L1      L2^2    |gamma|
#   0:        ( 0.5, -0.5 |  0.5,  0.5)                  2.0     1.0     0.1
#   1:        (-1.5,  0.01 | 0.01, 0.01)                 1.53    2.2503  3.0
#   2:        ( 0.3,  0.3 | -0.3,  0.3)                  1.2     0.36    2.0
#   3:        ( 2.2,  0.1 |  0.1, -0.1)                  2.5     4.87    0.5
# half the channels go: l1 -> {2, 1}; l2 -> {2, 0}; bn -> {0, 3}.

W1 = np.array([[0.5, -0.5], [-1.5, 0.01], [0.3, 0.3], [2.2, 0.1]], F).reshape(4, 2, 1, 1)
W2 = np.array([[0.5, 0.01, -0.3, 0.1], [0.5, 0.01, 0.3, -0.1]], F).reshape(2, 4, 1, 1)
GAMMA = np.array([0.1, 3.0, 2.0, -0.5], F)


def conv_bn_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn"], name="bn1"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["output"], name="conv2")]
    inits = {"w1": W1, "gamma": GAMMA, "beta": np.zeros(4), "mean": np.zeros(4), "var": np.ones(4), "w2": W2}
    return build(nodes, inits, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2, 3, 3])],
                 [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 2, 3, 3])])


@pytest.mark.parametrize("criterion, expected", [("l1", {1, 2}), ("l2", {0, 2}), ("bn", {0, 3})])
def test_structured_single_group(criterion, expected):
    model = conv_bn_model()
    pruned, details = structured(model, sparsity=0.5, criterion=criterion)
    after = weights(pruned)
    assert removed_slices(W1, after["w1"], 0) == expected
    assert removed_slices(W2, after["w2"], 1) == expected
    kept = sorted(set(range(4)) - expected)
    np.testing.assert_array_equal(after["gamma"], GAMMA[kept])  # the BN parameters follow the conv's channels
    assert reported(details) == {"conv1": expected}


def test_structured_random_criterion_follows_the_seed():
    """Random scores are ``numpy.random.default_rng(seed).random(units)`` drawn group by group."""
    model = conv_bn_model()
    seen = set()
    for seed in range(6):
        pruned, details = structured(model, sparsity=0.5, criterion="random", seed=seed)
        expected = {int(i) for i in np.argsort(np.random.default_rng(seed).random(4), kind="stable")[:2]}
        assert removed_slices(W1, weights(pruned)["w1"], 0) == expected == reported(details)["conv1"]
        again, _ = structured(model, sparsity=0.5, criterion="random", seed=seed)
        assert removed_slices(W1, weights(again)["w1"], 0) == expected
        seen.add(frozenset(expected))
    assert len(seen) >= 3  # the seed changes the choice


# -- a residual Add ties two producers: the unit's score sums both producers and the consumer --------
#
# unit c: (Wa[c, :] | Wb[c, :] | Wc[:, c])          L1     L2^2    |ga| + |gb|
#   0:    ( 1.0, 0.0 | 0.0,  0.2 | 0.1,  0.1)       1.4    1.06    1.0 + 0.1  = 1.1
#   1:    ( 0.3, 0.3 | 0.3, -0.3 | 0.2,  0.2)       1.6    0.44    0.2 + 1.0  = 1.2
#   2:    ( 0.1, 0.1 | 1.3,  0.1 | 0.1, -0.1)       1.8    1.74    0.9 + 0.05 = 0.95
#   3:    ( 0.2, 0.2 | 0.2,  0.2 | 0.15, 0.15)      1.1    0.205   0.4 + 0.3  = 0.7
# half go: l1 -> {3, 0}; l2 -> {3, 1}; bn -> {3, 2}. Producer a alone would say {2, 3} (L1) and
# gamma_a alone {1, 3}: the score must combine the tied producers.

WA = np.array([[1.0, 0.0], [0.3, 0.3], [0.1, 0.1], [0.2, 0.2]], F).reshape(4, 2, 1, 1)
WB = np.array([[0.0, 0.2], [0.3, -0.3], [1.3, 0.1], [0.2, 0.2]], F).reshape(4, 2, 1, 1)
WC = np.array([[0.1, 0.2, 0.1, 0.15], [0.1, 0.2, -0.1, 0.15]], F).reshape(2, 4, 1, 1)
GA = np.array([1.0, 0.2, 0.9, 0.4], F)
GB = np.array([0.1, -1.0, 0.05, 0.3], F)


def residual_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["input", "wa"], ["a"], name="conv_a"),
             helper.make_node("BatchNormalization", ["a", "ga", "zero", "zero", "one"], ["an"], name="bn_a"),
             helper.make_node("Conv", ["input", "wb"], ["b"], name="conv_b"),
             helper.make_node("BatchNormalization", ["b", "gb", "zero", "zero", "one"], ["bn"], name="bn_b"),
             helper.make_node("Add", ["an", "bn"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "wc"], ["output"], name="conv_c")]
    inits = {"wa": WA, "wb": WB, "wc": WC, "ga": GA, "gb": GB, "zero": np.zeros(4), "one": np.ones(4)}
    return build(nodes, inits, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2, 3, 3])],
                 [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 2, 3, 3])])


@pytest.mark.parametrize("criterion, expected", [("l1", {0, 3}), ("l2", {1, 3}), ("bn", {2, 3})])
def test_structured_residual_group_combines_tied_producers(criterion, expected):
    pruned, details = structured(residual_model(), sparsity=0.5, criterion=criterion)
    after = weights(pruned)
    assert removed_slices(WA, after["wa"], 0) == expected
    assert removed_slices(WB, after["wb"], 0) == expected
    assert removed_slices(WC, after["wc"], 1) == expected
    assert reported(details) == {"conv_a": expected, "conv_b": expected}


# -- two independent groups: per-layer vs global scope ------------------------------------------------
#
# Each hidden channel's L1 (producer column + consumer row) is set to t: column (t/2, -t/4, t/8),
# row (t/16, -t/16).
#   group a: t = 0.3, 3.4, 0.1, 0.2        (mean 1.0)     -> normalised 0.3, 3.4, 0.1, 0.2
#   group b: t = 0.021, 0.018, 0.020, 0.022 (mean 0.02025) -> normalised 1.037, 0.889, 0.988, 1.086
# per layer, half of each: a -> {2, 3}, b -> {1, 2}.
# global, 4 of 8 by the score normalised within its group: a2, a3, a0, b1 -> a {0, 2, 3}, b {1}
# (raw scores would take three of group b first).

TA = [0.3, 3.4, 0.1, 0.2]
TB = [0.021, 0.018, 0.020, 0.022]


def _column_row(totals: list[float]) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(totals, F)
    return np.stack([t / 2, -t / 4, t / 8]).astype(F), np.stack([t / 16, -t / 16], axis=1).astype(F)


def two_branch_model() -> onnx.ModelProto:
    (pa, ca), (pb, cb) = _column_row(TA), _column_row(TB)
    nodes = [helper.make_node("MatMul", ["input", "pa"], ["ha"], name="prod_a"),
             helper.make_node("Relu", ["ha"], ["ra"], name="relu_a"),
             helper.make_node("MatMul", ["ra", "ca"], ["out_a"], name="cons_a"),
             helper.make_node("MatMul", ["input", "pb"], ["hb"], name="prod_b"),
             helper.make_node("Relu", ["hb"], ["rb"], name="relu_b"),
             helper.make_node("MatMul", ["rb", "cb"], ["out_b"], name="cons_b")]
    return build(nodes, {"pa": pa, "ca": ca, "pb": pb, "cb": cb},
                 [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3])],
                 [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 2]) for n in ("out_a", "out_b")])


@pytest.mark.parametrize("scope, expected_a, expected_b", [("layer", {2, 3}, {1, 2}), ("global", {0, 2, 3}, {1})])
def test_structured_scope(scope, expected_a, expected_b):
    model = two_branch_model()
    before = weights(model)
    pruned, details = structured(model, sparsity=0.5, scope=scope, criterion="l1")
    after = weights(pruned)
    assert removed_slices(before["pa"], after["pa"], 1) == expected_a
    assert removed_slices(before["ca"], after["ca"], 0) == expected_a
    assert removed_slices(before["pb"], after["pb"], 1) == expected_b
    assert reported(details) == {"prod_a": expected_a, "prod_b": expected_b}


# -- activation-aware: energy of the consumer's input times its weights ---------------------------------
#
# Calibration: the three unit vectors, so the hidden activations are relu(W1) row by row.
# channel c: W1[:, c]              energy = sum relu^2    W2[c, :]      |W2|^2   score = energy * |W2|^2   L1
#   0:       ( 1.0, -1.0, 0.5)     1.25                   ( 0.3, 0.1)   0.10     0.125                     2.9
#   1:       (-0.5, -0.4, -0.3)    0 (dead on the data)   ( 1.5, -1.0)  3.25     0                         3.7
#   2:       ( 0.3,  0.2, 0.1)     0.14                   ( 0.5, 0.5)   0.50     0.07                      1.6
#   3:       ( 1.0,  1.0, -2.0)    2.0                    ( 1.0, -0.8)  1.64     3.28                      5.8
# half go: activation -> {1, 2}; l1 -> {2, 0}.

M1 = np.array([[1.0, -0.5, 0.3, 1.0], [-1.0, -0.4, 0.2, 1.0], [0.5, -0.3, 0.1, -2.0]], F)
M2 = np.array([[0.3, 0.1], [1.5, -1.0], [0.5, 0.5], [1.0, -0.8]], F)


def mlp_model(w1: np.ndarray = M1, w2: np.ndarray = M2) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["input", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["output"], name="fc2")]
    return build(nodes, {"w1": w1, "w2": w2},
                 [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", w1.shape[0]])],
                 [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", w2.shape[1]])])


@pytest.mark.parametrize("criterion, expected", [("activation", {1, 2}), ("l1", {0, 2})])
def test_structured_activation_criterion(tmp_path, criterion, expected):
    data = tmp_path / "calibration.npz"
    np.savez(data, input=np.eye(3, dtype=F))
    pruned, details = structured(mlp_model(), sparsity=0.5, criterion=criterion, calibration_data=str(data))
    after = weights(pruned)
    assert removed_slices(M1, after["w1"], 1) == expected
    assert removed_slices(M2, after["w2"], 0) == expected
    assert reported(details) == {"fc1": expected}


# -- selection for least-squares repair (--reconstruct) -------------------------------------------------
#
# Hidden channel 3 is an exact copy of channel 0 (same column of W1), so refitting the consumer moves
# channel 3's weights onto channel 0 and removing it costs nothing but the ridge term; of the two copies,
# channel 3 has the smaller consumer row, hence the smaller cost. Channels 1 and 2 are independent of the
# rest and cannot be refitted away. L1 instead removes channel 2 (the smallest weights).
#   L1 per channel: 0: 2.5 + 2.0 = 4.5   1: 1.9 + 1.6 = 3.5   2: 0.6 + 0.9 = 1.5   3: 2.5 + 1.2 = 3.7

R1 = np.array([[1.0, -0.6, 0.2, 1.0], [0.7, 0.9, -0.1, 0.7], [-0.8, 0.4, 0.3, -0.8]], F)
R2 = np.array([[1.2, -0.8], [0.9, 0.7], [0.5, -0.4], [0.7, 0.5]], F)


@pytest.mark.parametrize("criterion, expected", [("reconstruction", {3}), ("l1", {2})])
def test_structured_reconstruction_criterion(tmp_path, criterion, expected):
    model = mlp_model(R1, R2)
    x = np.random.default_rng(0).standard_normal((64, 3)).astype(F)
    data = tmp_path / "calibration.npz"
    np.savez(data, input=x)
    pruned, details = structured(model, sparsity=0.25, criterion=criterion, reconstruct=True,
                                 calibration_data=str(data))
    assert removed_slices(R1, weights(pruned)["w1"], 1) == expected
    assert reported(details) == {"fc1": expected}
    held_out = np.random.default_rng(1).standard_normal((32, 3)).astype(F)
    reference, candidate = run(model, held_out), run(pruned, held_out)
    error = np.linalg.norm(candidate - reference) / np.linalg.norm(reference)
    if criterion == "reconstruction":  # the copy's weights moved onto its twin: the function is kept
        assert error < 1e-2
    else:  # an independent channel is gone: least squares can only approximate it
        assert error > 0.02


# -- unstructured: which weights are zeroed -------------------------------------------------------------
#
# |U1| sorted: 0.04 (2,2) 0.05 (1,0) 0.1 (0,1) 0.15 (3,2) 0.2 (1,3) 0.3 (2,0) 0.35 (3,3) 0.5 (0,2) | 0.6 ...
# |U2| sorted: 0.01 (1,1) 0.02 (3,1) 0.03 (0,0) 0.08 (2,1) | 0.12 (3,0) 0.25 (1,0) 1.4 2.0
# global 12 of 24: 0.01 0.02 0.03 (U2) 0.04 0.05 (U1) 0.08 (U2) 0.1 (U1) 0.12 (U2) 0.15 0.2 (U1) 0.25 (U2) 0.3 (U1)

U1 = np.array([[0.9, -0.1, 0.5, -1.3], [-0.05, 1.1, -0.7, 0.2], [0.3, -1.6, 0.04, 0.8], [-1.2, 0.6, -0.15, 0.35]], F)
U2 = np.array([[0.03, -2.0], [-0.25, 0.01], [1.4, -0.08], [0.12, -0.02]], F)

LAYER_ZEROS = ([[0, 1, 1, 0], [1, 0, 0, 1], [1, 0, 1, 0], [0, 0, 1, 1]], [[1, 0], [0, 1], [0, 1], [0, 1]])
GLOBAL_ZEROS = ([[0, 1, 0, 0], [1, 0, 0, 1], [1, 0, 1, 0], [0, 0, 1, 0]], [[1, 0], [1, 1], [0, 1], [1, 1]])
# 2:4 along the reduction axis (MatMul B: axis 0), i.e. the two smallest of each column
NM_ZEROS = ([[0, 1, 0, 0], [1, 0, 0, 1], [1, 0, 1, 0], [0, 1, 1, 1]], [[1, 0], [0, 1], [0, 0], [1, 1]])
# activation (Wanda, per output column): calibration rows diag(10, 1, 0.1, 2) give input norms (10, 1, 0.1, 2)
#   U1 scores by column: (9, .05, .03, 2.4) (1, 1.1, .16, 1.2) (5, .7, .004, .3) (13, .2, .08, .7)
#   hidden norms (9.00005, 1.628, 5.0, 0.7321); U2 scores: (.27, .407, 7.0, .0879) (18, .01628, .4, .01464)
WANDA_ZEROS = ([[0, 1, 0, 0], [1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 1, 0]], [[1, 0], [0, 1], [0, 0], [1, 1]])


def zeros_of(model: onnx.ModelProto) -> list[list]:
    after = weights(model)
    return [(after["w1"] == 0).astype(int).tolist(), (after["w2"] == 0).astype(int).tolist()]


@pytest.mark.parametrize("options, expected", [
    ({"sparsity": 0.5, "criterion": "l1"}, LAYER_ZEROS),
    ({"sparsity": 0.5, "criterion": "l2"}, LAYER_ZEROS),
    ({"sparsity": 0.5, "criterion": "l1", "scope": "global"}, GLOBAL_ZEROS),
    ({"sparsity": 0.5, "criterion": "l2", "scope": "global"}, GLOBAL_ZEROS),
    ({"pattern": "2:4"}, NM_ZEROS),
])
def test_unstructured_zeroes_exactly_the_smallest(options, expected):
    model = mlp_model(U1, U2)
    pruned, result = onnxprune.prune(model, **options)
    assert zeros_of(pruned) == [list(map(list, e)) for e in expected]
    tensors = {t["weight"]: t["zeros_after"] for t in result.to_dict()["passes"][0]["details"]["tensors"]}
    assert tensors == {"w1": int(np.sum(expected[0])), "w2": int(np.sum(expected[1]))}
    # the kept weights are untouched
    for name, original in (("w1", U1), ("w2", U2)):
        after = weights(pruned)[name]
        np.testing.assert_array_equal(after[after != 0], original[after != 0])


def test_unstructured_activation_criterion(tmp_path):
    data = tmp_path / "calibration.npz"
    np.savez(data, input=np.diag([10.0, 1.0, 0.1, 2.0]).astype(F))
    pruned, _ = onnxprune.prune(mlp_model(U1, U2), sparsity=0.5, criterion="activation", calibration_data=str(data))
    assert zeros_of(pruned) == [list(map(list, e)) for e in WANDA_ZEROS]


def test_unstructured_random_criterion_follows_the_seed():
    """Random scores: one ``default_rng(seed)`` stream, ``random(size, float32)`` per tensor in graph order."""
    seen = set()
    for seed in range(4):
        pruned, _ = onnxprune.prune(mlp_model(U1, U2), sparsity=0.5, criterion="random", seed=seed)
        rng = np.random.default_rng(seed)
        expected = []
        for w in (U1, U2):
            mask = np.zeros(w.size, dtype=int)
            mask[np.argsort(rng.random(w.size, dtype=np.float32), kind="stable")[: w.size // 2]] = 1
            expected.append(mask.reshape(w.shape).tolist())
        assert zeros_of(pruned) == expected
        seen.add(str(expected))
    assert len(seen) == 4 and str([list(map(list, e)) for e in LAYER_ZEROS]) not in seen


# -- folding: a removed channel that is constant moves into the next layer's bias -------------------------
#
# Channels 1 and 3 of conv1 have zero weights and biases 0.7 and -0.3: after Relu they are the constants 0.7 and
# 0, so L1 (consumer weights only: 0.2 and 0.3, against >= 1.3 for the others) removes them, and folding adds
# 0.7 * W2[:, 1] to conv2's bias: the pruned model computes exactly what the original does.

F1 = np.array([[0.9, -0.4], [0.0, 0.0], [-0.6, 1.1], [0.0, 0.0]], F).reshape(4, 2, 1, 1)
B1 = np.array([0.1, 0.7, -0.2, -0.3], F)
F2 = np.array([[0.8, 0.1, -0.5, 0.2], [-0.7, 0.1, 0.9, -0.1]], F).reshape(2, 4, 1, 1)
B2 = np.array([0.05, -0.05], F)


def constant_channel_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["output"], name="conv2")]
    return build(nodes, {"w1": F1, "b1": B1, "w2": F2, "b2": B2},
                 [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2, 3, 3])],
                 [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 2, 3, 3])])


@pytest.mark.parametrize("fold", [True, False])
def test_structured_folds_constant_channels_into_the_next_bias(fold):
    model = constant_channel_model()
    pruned, details = structured(model, sparsity=0.5, criterion="l1", fold_constants=fold)
    assert reported(details) == {"conv1": {1, 3}}
    x = np.random.default_rng(0).standard_normal((4, 2, 3, 3)).astype(F)
    difference = np.abs(run(pruned, x) - run(model, x)).max()
    if fold:
        assert details["folded_constants"]["consumers"] == 1
        np.testing.assert_allclose(weights(pruned)["b2"], B2 + 0.7 * F2[:, 1, 0, 0], rtol=1e-6)
        assert difference < 1e-5
    else:
        assert difference == pytest.approx(0.07, rel=1e-4)  # 0.7 * |W2[:, 1]| = 0.07 on both outputs
