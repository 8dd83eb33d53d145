"""Shape chains in int32 (Paddle exports): every constant the structured pass, shape folding or reconstruction
writes into a chain has the chain's integer type, so the pruned model passes the full ONNX check."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

import onnxprune
from onnxprune.analysis.groups import analyse, build_groups
from onnxprune.shapes import fold_static_shape_reads

from .conftest import FIXTURES
from .oracle import choice_to_keep, masked_and_removed, prepared, random_choice, relative_error
from .test_structured_rules import C, G, frozen_reasons, oracle

I32, I64 = TensorProto.INT32, TensorProto.INT64


def i32(g: G, values) -> str:
    return g.c(values, np.int32)


def frozen_inside(model: onnx.ModelProto) -> list[str]:
    """Frozen reasons other than the head's output group (which reaches the graph output)."""
    return [r for r in frozen_reasons(model) if "reaches graph output" not in r]


def int_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every integer constant and integer intermediate tensor (after shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return {k: v for k, v in types.items() if v in (I32, I64)}


def concat_inputs_agree(model: onnx.ModelProto) -> None:
    types = int_types(model)
    for node in model.graph.node:
        if node.op_type == "Concat" and node.input[0] in types:
            assert {types[i] for i in node.input} == {types[node.input[0]]}, node.name


def test_constant_entry_in_an_int32_concat_is_rewritten_in_int32():
    """``Cast(Concat(Slice(Cast32(Shape)), [C*4] int32), int64) -> Reshape``: the C*4 entry shrinks, stays int32."""
    g = G()
    pooled = g.op("MaxPool", [g.x], kernel_shape=[4, 4], strides=[4, 4])  # [N, C, 2, 2]
    shape = g.op("Cast", [g.op("Shape", [pooled])], to=I32)
    batch = g.op("Slice", [shape, g.c([0]), g.c([1]), g.c([0])])
    target = g.op("Cast", [g.op("Concat", [batch, i32(g, [C * 4])], axis=0)], to=I64)
    y = g.op("MatMul", [g.op("Reshape", [pooled, target]), g.w([C * 4, 6])])
    model = g.head(y, 6, spatial=False)
    assert not frozen_inside(model)
    assert oracle(model)
    choice = random_choice(model, 0.5, 0)
    _, removed = masked_and_removed(model, choice)
    kept = int(choice_to_keep(analyse(prepared(model)), choice)[:C].sum())
    rewritten = [i for i in removed.graph.initializer if i.name.endswith(".pruned")]
    assert [(i.data_type, numpy_helper.to_array(i).tolist()) for i in rewritten] == [(I32, [kept * 4])]
    concat_inputs_agree(removed)


def test_int32_constant_cast_on_its_own_into_an_int64_concat():
    """ch_ppocr_mobile_v2.0_cls: ``Concat(Cast64(batch int32), Cast64([C*4] int32))``: the entry is rewritten int64."""
    g = G()
    pooled = g.op("MaxPool", [g.x], kernel_shape=[4, 4], strides=[4, 4])
    shape = g.op("Cast", [g.op("Shape", [pooled])], to=I32)
    batch = g.op("Cast", [g.op("Slice", [shape, g.c([0]), g.c([1]), g.c([0])])], to=I64)
    features = g.op("Cast", [i32(g, [C * 4])], to=I64)
    y = g.op("MatMul", [g.op("Reshape", [pooled, g.op("Concat", [batch, features], axis=-1)]), g.w([C * 4, 6])])
    model = g.head(y, 6, spatial=False)
    assert oracle(model)
    _, removed = masked_and_removed(model, random_choice(model, 0.5, 1))
    assert {i.data_type for i in removed.graph.initializer if i.name.endswith(".pruned")} == {I64}
    concat_inputs_agree(removed)


@pytest.mark.parametrize("spelling", ["gather", "scalar", "slice"])
def test_channel_count_read_at_run_time_in_int32(spelling):
    """``Shape -> Cast32 -> Gather/Slice(/Unsqueeze) -> Concat([-1] int32, count) -> Cast64 -> Reshape``."""
    g = G(opset=17)
    pooled = g.op("GlobalAveragePool", [g.x])
    shape = g.op("Cast", [g.op("Shape", [pooled])], to=I32)
    if spelling == "gather":
        count = g.op("Gather", [shape, i32(g, [1])], axis=0)
    elif spelling == "scalar":
        count = g.op("Unsqueeze", [g.op("Gather", [shape, i32(g, 1)], axis=0), g.c([0])])
    else:
        count = g.op("Slice", [shape, i32(g, [1]), i32(g, [2]), i32(g, [0])])
    target = g.op("Cast", [g.op("Concat", [i32(g, [-1]), count], axis=0)], to=I64)
    model = g.head(g.op("Reshape", [pooled, target]), C, spatial=False)
    assert not frozen_inside(model)
    assert oracle(model)


def test_heads_split_with_int32_div_and_mul():
    """``x.reshape(b, heads, C // heads, h * w)`` in int32, the head count and width from Div/Mul by constants (one
    an int64 constant cast to int32): shape folding writes int32 constants, the head count is rewritten in int32."""
    g = G()
    shape = g.op("Cast", [g.op("Shape", [g.x])], to=I32)
    batch = g.op("Slice", [shape, g.c([0]), g.c([1]), g.c([0])])
    heads = i32(g, [2])
    width = g.op("Div", [g.op("Gather", [shape, i32(g, [1])], axis=0), heads])
    area = g.op("Mul", [g.op("Gather", [shape, i32(g, [2])], axis=0), g.op("Cast", [g.c([8])], to=I32)])
    y = g.op("Reshape", [g.x, g.op("Cast", [g.op("Concat", [batch, heads, width, area], axis=0)], to=I64)])
    y = g.op("Relu", [y])
    back = g.op("Concat", [batch, g.op("Gather", [shape, i32(g, [1])], axis=0), i32(g, [8, 8])], axis=0)
    model = g.head(g.op("Reshape", [y, g.op("Cast", [back], to=I64)]), C)
    folded = prepared(model)
    assert {i.data_type for i in folded.graph.initializer if i.name.endswith(".folded")} == {I32}
    concat_inputs_agree(folded)
    units = {len(ids) for grp in build_groups(analyse(folded)) for ids in grp.units}
    assert C // 2 in units  # a head's channels go together
    assert oracle(model)
    _, removed = masked_and_removed(model, random_choice(model, 0.5, 0))
    concat_inputs_agree(removed)


def test_where_equal_keep_spelling_in_int32():
    """``Where(Equal(t, -1), 1, t)`` over an int32 target (exporters' "-1 means keep")."""
    g = G()
    pooled = g.op("MaxPool", [g.x], kernel_shape=[4, 4], strides=[4, 4])
    shape = g.op("Cast", [g.op("Shape", [pooled])], to=I32)
    t = g.op("Concat", [g.op("Slice", [shape, g.c([0]), g.c([1]), g.c([0])]), i32(g, [C * 4])], axis=0)
    t = g.op("Where", [g.op("Equal", [t, i32(g, [-1])]), i32(g, [1, 1]), t])
    y = g.op("MatMul", [g.op("Reshape", [pooled, g.op("Cast", [t], to=I64)]), g.w([C * 4, 6])])
    model = g.head(y, 6, spatial=False)
    assert not frozen_inside(model)
    assert oracle(model)
    _, removed = masked_and_removed(model, random_choice(model, 0.5, 2))
    concat_inputs_agree(removed)


def test_gather_of_channels_by_int32_indices_keeps_the_index_type():
    g = G()
    y = g.op("Gather", [g.x, i32(g, [0, 2, 3, 5, 6, 7])], axis=1)
    model = g.head(y, 6)
    assert oracle(model)
    _, removed = masked_and_removed(model, random_choice(model, 0.5, 0))
    gathers = [n for n in removed.graph.node if n.op_type == "Gather"]
    index = next(i for i in removed.graph.initializer if i.name == gathers[0].input[1])
    assert index.data_type == I32


def test_shape_folding_keeps_int32():
    """A static value computed in an int32 chain from an int64 constant cast to int32 folds to an int32 constant."""
    g = G()
    shape = g.op("Cast", [g.op("Shape", [g.x])], to=I32)
    flat = g.op("Mul", [g.op("Gather", [shape, i32(g, [1])], axis=0), g.op("Cast", [g.c([64])], to=I32)])
    batch = g.op("Slice", [shape, g.c([0]), g.c([1]), g.c([0])])
    target = g.op("Cast", [g.op("Concat", [batch, flat], axis=0)], to=I64)
    y = g.op("MatMul", [g.op("Reshape", [g.x, target]), g.w([C * 64, 6])])
    model = g.head(y, 6, spatial=False)
    assert fold_static_shape_reads(model) == 1
    folded = [i for i in model.graph.initializer if i.name.endswith(".folded")]
    assert [(i.data_type, numpy_helper.to_array(i).tolist()) for i in folded] == [(I32, [C * 64])]
    onnx.checker.check_model(model, full_check=True)
    assert oracle(model)


# -- the paddle2onnx-style fixtures (fixtures/build_int32_fixtures.py) ---------------------------------------


def run(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("name", ["paddle_cls", "paddle_heads"])
def test_fixture_oracle(name):
    model = onnx.load(FIXTURES / "int32" / f"{name}.onnx")
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    for seed in (0, 1):
        choice = random_choice(model, 0.5, seed)
        assert choice
        masked, removed = masked_and_removed(model, choice)
        onnx.checker.check_model(removed, full_check=True)
        assert relative_error([run(masked, x)], [run(removed, x)]) <= 1e-5


@pytest.mark.parametrize("name, options", [("paddle_cls", {}), ("paddle_heads", {"head_sparsity": 0.5})])
def test_fixture_prunes_structurally(name, options):
    path = FIXTURES / "int32" / f"{name}.onnx"
    pruned, result = onnxprune.prune(path, structured=True, sparsity=0.5, **options)
    onnx.checker.check_model(pruned, full_check=True)
    assert result.to_dict()["passes"][0]["details"]["macs_removed"] > 0
    for batch in (1, 3):  # the batch size is read at run time through the int32 chain
        x = np.random.default_rng(batch).standard_normal((batch, 3, 16, 16)).astype(np.float32)
        assert run(pruned, x).shape == run(str(path), x).shape


def test_fixture_reconstruct(tmp_path):
    path = FIXTURES / "int32" / "paddle_cls.onnx"
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((64, 3, 16, 16)).astype(np.float32))
    x = rng.standard_normal((16, 3, 16, 16)).astype(np.float32)
    plain, _ = onnxprune.prune(path, structured=True, sparsity=0.5)
    rebuilt, result = onnxprune.prune(path, structured=True, sparsity=0.5, reconstruct=True,
                                      calibration_data=str(tmp_path / "calib.npz"))
    onnx.checker.check_model(rebuilt, full_check=True)
    assert result.to_dict()["passes"][0]["details"]["reconstruction"]["layers"] > 0
    reference = run(str(path), x)

    def error(model):
        return float(np.linalg.norm(run(model, x) - reference) / np.linalg.norm(reference))

    assert error(rebuilt) < error(plain)
