"""Attention heads: q/k/v -> Reshape [B, S, H, D] -> Transpose -> MatMul -> Softmax -> MatMul -> Reshape -> out-proj."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.analysis.groups import analyse, build_groups

from .oracle import masked_and_removed, random_choice, relative_error

E, H, D, FF = 32, 4, 8, 64


def attention_block(runtime_shapes: bool, bias: str | None = None) -> onnx.ModelProto:
    """One pre-LN attention + MLP block; ``bias``: a per-head score bias computed at run time from constants
    ("table": gathered from a [buckets, H] table by relative position, T5/Swin style; "zeros":
    ConstantOfShape([1, H, S, S]); "leak": the table bias, also read by a node that knows no heads)."""
    rng = np.random.default_rng(0)
    inits = []

    def w(name, shape, scale=0.2):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def c(name, values, dtype=np.int64):
        inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    nodes = [helper.make_node("LayerNormalization", ["x", w("ln.g", [E]), w("ln.b", [E])], ["h"], axis=-1, name="ln")]
    if runtime_shapes:  # Shape -> Gather -> Concat with constant head pieces, as torch exports
        nodes += [helper.make_node("Shape", ["h"], ["hs"], name="shape"),
                  helper.make_node("Gather", ["hs", c("i0", [0])], ["bsz"], axis=0, name="g0"),
                  helper.make_node("Gather", ["hs", c("i1", [1])], ["seq"], axis=0, name="g1"),
                  helper.make_node("Concat", ["bsz", "seq", c("heads", [H]), c("hd", [D])], ["split_shape"], axis=0,
                                   name="split_shape"),
                  helper.make_node("Concat", ["bsz", "seq", c("hidden", [H * D])], ["merge_shape"], axis=0,
                                   name="merge_shape")]
        split, merge = "split_shape", "merge_shape"
    else:
        split, merge = c("split", [0, 0, H, D]), c("merge", [0, 0, H * D])
    for p in "qkv":
        nodes += [helper.make_node("MatMul", ["h", w(f"{p}.w", [E, H * D])], [f"{p}0"], name=f"{p}_proj"),
                  helper.make_node("Add", [f"{p}0", w(f"{p}.b", [H * D], 0.1)], [f"{p}1"], name=f"{p}_bias"),
                  helper.make_node("Reshape", [f"{p}1", split], [f"{p}2"], name=f"{p}_split")]
    scaled = "scaled"
    if bias:
        nodes += [helper.make_node("Shape", ["x"], ["xs"], name="bias_shape"),
                  helper.make_node("Gather", ["xs", c("one_i", 1)], ["seq_len"], axis=0, name="bias_seq"),
                  helper.make_node("Unsqueeze", ["seq_len", c("ax0", [0])], ["seq_1d"], name="bias_seq_1d")]
        if bias == "zeros":
            nodes += [helper.make_node("Concat", [c("unit_dim", [1]), c("nh", [H]), "seq_1d", "seq_1d"], ["bias_dims"],
                                       axis=0, name="bias_dims"),
                      helper.make_node("ConstantOfShape", ["bias_dims"], ["bias"], name="bias_zeros",
                                       value=numpy_helper.from_array(np.array([0.25], np.float32)))]
        else:
            nodes += [helper.make_node("Range", [c("zero_i", 0), "seq_len", c("step", 1)], ["pos"], name="bias_range"),
                      helper.make_node("Unsqueeze", ["pos", c("ax1", [1])], ["pos_q"], name="bias_q"),
                      helper.make_node("Unsqueeze", ["pos", c("ax0b", [0])], ["pos_k"], name="bias_k"),
                      helper.make_node("Sub", ["pos_q", "pos_k"], ["rel"], name="bias_rel"),
                      helper.make_node("Clip", ["rel", c("lo", -7), c("hi", 7)], ["rel_c"], name="bias_clip"),
                      helper.make_node("Add", ["rel_c", c("seven", 7)], ["bucket"], name="bias_bucket"),
                      helper.make_node("Gather", [w("table", [15, H], 1.0), "bucket"], ["bias_sqh"], axis=0,
                                       name="bias_gather"),
                      helper.make_node("Transpose", ["bias_sqh"], ["bias_hqk"], perm=[2, 0, 1], name="bias_t"),
                      helper.make_node("Unsqueeze", ["bias_hqk", c("ax0c", [0])], ["bias"], name="bias_u")]
        scaled = "biased"
    nodes += [
        helper.make_node("Transpose", ["q2"], ["q"], perm=[0, 2, 1, 3], name="q_t"),
        helper.make_node("Transpose", ["k2"], ["k"], perm=[0, 2, 3, 1], name="k_t"),
        helper.make_node("Transpose", ["v2"], ["v"], perm=[0, 2, 1, 3], name="v_t"),
        helper.make_node("MatMul", ["q", "k"], ["scores"], name="qk"),
        helper.make_node("Div", ["scores", c("scale", np.sqrt(D), np.float32)], ["scaled"], name="scale"),
        helper.make_node("Add", [scaled, "mask"], ["masked"], name="mask_add"),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="pv"),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3], name="ctx_t"),
        helper.make_node("Reshape", ["ctx_t", merge], ["ctx_m"], name="merge"),
        helper.make_node("MatMul", ["ctx_m", w("o.w", [H * D, E])], ["o0"], name="o_proj"),
        helper.make_node("Add", ["o0", w("o.b", [E], 0.1)], ["attn"], name="o_bias"),
        helper.make_node("Add", ["x", "attn"], ["res"], name="residual"),
        # MLP: up -> Gelu (erf spelling) -> down
        helper.make_node("MatMul", ["res", w("up.w", [E, FF])], ["u0"], name="up"),
        helper.make_node("Div", ["u0", c("sqrt2", np.sqrt(2.0), np.float32)], ["u1"], name="gelu_div"),
        helper.make_node("Erf", ["u1"], ["u2"], name="gelu_erf"),
        helper.make_node("Add", ["u2", c("one", 1.0, np.float32)], ["u3"], name="gelu_add"),
        helper.make_node("Mul", ["u0", "u3"], ["u4"], name="gelu_mul"),
        helper.make_node("Mul", ["u4", c("half", 0.5, np.float32)], ["u5"], name="gelu_half"),
        helper.make_node("MatMul", ["u5", w("down.w", [FF, E])], ["d0"], name="down"),
        helper.make_node("Add", ["res", "d0"], ["y"], name="residual2"),
    ]
    if bias:
        at = next(i for i, n in enumerate(nodes) if n.name == "scale") + 1
        nodes.insert(at, helper.make_node("Add", ["scaled", "bias"], ["biased"], name="bias_add"))
    if bias == "leak":  # the bias also feeds a node that knows nothing of heads
        nodes[-1].input[1] = "d1"
        nodes[-1:-1] = [helper.make_node("ReduceMean", ["bias_sqh"], ["bias_mean"], keepdims=0, name="bias_mean"),
                        helper.make_node("Add", ["d0", "bias_mean"], ["d1"], name="leak")]
    graph = helper.make_graph(nodes, "attention", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", E]),
        helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", 1, 1, "S"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", E])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model, batch, seq):
    rng = np.random.default_rng(batch * 100 + seq)
    feeds = {"x": rng.standard_normal((batch, seq, E)).astype(np.float32),
             "mask": np.where(rng.random((batch, 1, 1, seq)) < 0.2, -1e4, 0).astype(np.float32)}
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("runtime_shapes", [False, True])
def test_heads_are_units_and_oracle_holds(runtime_shapes):
    model = attention_block(runtime_shapes)
    groups = build_groups(analyse(model))
    head_group = next(g for g in groups if any(s.node.name == "q_proj" for s in g.spaces))
    assert {s.node.name for s in head_group.spaces} == {"q_proj", "k_proj", "v_proj"}
    assert len(head_group.units) == H and all(len(u) == 3 * D for u in head_group.units)
    mlp = next(g for g in groups if any(s.node.name == "up" for s in g.spaces))
    assert len(mlp.units) == FF
    for seed in (0, 1, 2):
        choice = random_choice(model, 0.5, seed)
        masked, removed = masked_and_removed(model, choice)
        onnx.checker.check_model(removed, full_check=True)
        for batch, seq in ((1, 5), (2, 7), (3, 16)):
            assert relative_error(run(masked, batch, seq), run(removed, batch, seq)) <= 1e-5


@pytest.mark.parametrize("bias", ["table", "zeros"])
def test_per_head_bias_computed_from_constants_follows_the_heads(bias):
    model = attention_block(runtime_shapes=True, bias=bias)
    groups = build_groups(analyse(model))
    head_group = next(g for g in groups if any(s.node.name == "q_proj" for s in g.spaces))
    assert len(head_group.units) == H and not head_group.frozen_units
    for seed in (0, 1):
        choice = random_choice(model, 0.5, seed)
        masked, removed = masked_and_removed(model, choice)
        onnx.checker.check_model(removed, full_check=True)
        for batch, seq in ((1, 5), (2, 7), (3, 16)):
            assert relative_error(run(masked, batch, seq), run(removed, batch, seq)) <= 1e-5
    if bias == "table":
        pruned, _ = onnxprune.prune(model, structured=True, sparsity=0.5, head_sparsity=0.5)
        assert {i.name: list(i.dims) for i in pruned.graph.initializer}["table"] == [15, H // 2]


def test_per_head_bias_read_elsewhere_freezes_the_heads():
    model = attention_block(runtime_shapes=True, bias="leak")
    groups = build_groups(analyse(model))
    head_group = next(g for g in groups if any(s.node.name == "q_proj" for s in g.spaces))
    assert not head_group.units
    assert any("also read by ReduceMean 'bias_mean'" in r for _, r in head_group.frozen_units)


def test_prune_heads_and_neurons():
    model = attention_block(runtime_shapes=True)
    kept_heads, _ = onnxprune.prune(model, structured=True, sparsity=0.5)  # heads stay unless asked for
    assert {i.name: list(i.dims) for i in kept_heads.graph.initializer}["q.w"] == [E, H * D]
    pruned, result = onnxprune.prune(model, structured=True, sparsity=0.5, head_sparsity=0.5)
    onnx.checker.check_model(pruned, full_check=True)
    shapes = {i.name: list(i.dims) for i in pruned.graph.initializer}
    assert shapes["q.w"] == [E, H // 2 * D] and shapes["o.w"] == [H // 2 * D, E]
    assert shapes["up.w"] == [E, FF // 2] and shapes["down.w"] == [FF // 2, E]
    for batch, seq in ((1, 5), (2, 9), (4, 32)):
        assert run(pruned, batch, seq)[0].shape == (batch, seq, E)
    frozen = " ".join(f["reason"] for f in result.to_dict()["passes"][0]["details"]["frozen"])
    assert "residual" in frozen  # the hidden size (residual stream) stays
    assert shapes["o.b"] == [E] and shapes["ln.g"] == [E]


def test_fused_attention_head_pruning_is_refused(tmp_path):
    from onnxprune.errors import UnsupportedError

    from .conftest import listing, run_cli

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((E, 3 * E)) * 0.2).astype(np.float32), "qkv.w"),
             numpy_helper.from_array(np.zeros(3 * E, np.float32), "qkv.b")]
    # MultiHeadAttention takes projected q, k, v: its head count has no rule (com.microsoft::Attention has one)
    nodes = [helper.make_node("MatMul", ["x", "qkv.w"], ["qkv"], name="qkv_proj"),
             helper.make_node("MultiHeadAttention", ["qkv", "", "", "qkv.b"], ["y"], domain="com.microsoft",
                              num_heads=H, name="fused_attention")]
    graph = helper.make_graph(nodes, "fused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, E])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, E])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    onnx.save(model, tmp_path / "fused.onnx")
    before = listing(tmp_path)
    code, _, err = run_cli(tmp_path / "fused.onnx", "--structured", "--sparsity", "0.5", "--head-sparsity", "0.25",
                           "-o", tmp_path / "o.onnx")
    assert code == UnsupportedError.exit_code and "com.microsoft::MultiHeadAttention" in err
    assert listing(tmp_path) == before
    _, result = onnxprune.prune(tmp_path / "fused.onnx", structured=True, sparsity=0.5)  # no heads asked for
    assert result.to_dict()["passes"][0]["details"]["channels_removed"] == 0  # the fused op is left as it is


def gqa_block(hkv: int = 2, tile: bool = False) -> onnx.ModelProto:
    """LLaMA-style grouped-query attention: K/V have fewer heads, repeated by Unsqueeze -> Expand -> Reshape
    (each K/V head next to its copies), or by Tile (the K/V heads repeated as a block)."""
    rng = np.random.default_rng(1)
    rep = H // hkv
    inits = []

    def w(name, shape, scale=0.2):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def c(name, values, dtype=np.int64):
        inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    nodes = [helper.make_node("MatMul", ["x", w("q.w", [E, H * D])], ["q0"], name="q_proj"),
             helper.make_node("Reshape", ["q0", c("qs", [0, 0, H, D])], ["q1"], name="q_split"),
             helper.make_node("Transpose", ["q1"], ["q"], perm=[0, 2, 1, 3], name="q_t")]
    for p in "kv":
        nodes += [helper.make_node("MatMul", ["x", w(f"{p}.w", [E, hkv * D])], [f"{p}0"], name=f"{p}_proj"),
                  helper.make_node("Reshape", [f"{p}0", c(f"{p}s", [0, 0, hkv, D])], [f"{p}1"], name=f"{p}_split"),
                  helper.make_node("Transpose", [f"{p}1"], [f"{p}2"], perm=[0, 2, 1, 3], name=f"{p}_t")]
        if tile:
            nodes.append(helper.make_node("Tile", [f"{p}2", c(f"{p}rep", [1, rep, 1, 1])], [f"{p}5"], name=f"{p}_tile"))
            continue
        nodes += [helper.make_node("Unsqueeze", [f"{p}2", c(f"{p}ax", [2])], [f"{p}3"], name=f"{p}_unsq"),
                  helper.make_node("Expand", [f"{p}3", c(f"{p}ex", [1, hkv, rep, 1, 1])], [f"{p}4"], name=f"{p}_expand"),
                  helper.make_node("Reshape", [f"{p}4", c(f"{p}rs", [0, H, -1, D])], [f"{p}5"], name=f"{p}_repeat")]
    nodes += [helper.make_node("Transpose", ["k5"], ["kt"], perm=[0, 1, 3, 2], name="k_tt"),
              helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
              helper.make_node("Softmax", ["scores"], ["probs"], axis=-1, name="softmax"),
              helper.make_node("MatMul", ["probs", "v5"], ["ctx"], name="pv"),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3], name="ctx_t"),
              helper.make_node("Reshape", ["ctx_t", c("ms", [0, 0, H * D])], ["ctx_m"], name="merge"),
              helper.make_node("MatMul", ["ctx_m", w("o.w", [H * D, E])], ["y"], name="o_proj")]
    graph = helper.make_graph(nodes, "gqa", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", E])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", E])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("tile", [False, True])
def test_grouped_query_attention_units_and_oracle(tile):
    model = gqa_block(tile=tile)
    groups = build_groups(analyse(model))
    group = next(g for g in groups if any(s.node.name == "q_proj" for s in g.spaces))
    assert {s.node.name for s in group.spaces} == {"q_proj", "k_proj", "v_proj"}
    # one unit per K/V head: its D key and D value channels and the 2 query heads that share it
    assert len(group.units) == 2 and all(len(u) == 2 * D + 2 * D for u in group.units)
    rng = np.random.default_rng(0)
    for seed in (0, 1):
        choice = random_choice(model, 0.5, seed)
        masked, removed = masked_and_removed(model, choice)
        onnx.checker.check_model(removed, full_check=True)
        for batch, seq in ((1, 3), (2, 6)):
            feeds = {"x": rng.standard_normal((batch, seq, E)).astype(np.float32)}

            def go(m, feeds=feeds):
                return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)

            assert relative_error(go(masked), go(removed)) <= 1e-5
    pruned, _ = onnxprune.prune(model, structured=True, sparsity=0.0, head_sparsity=0.5)
    dims = {i.name: list(i.dims) for i in pruned.graph.initializer}
    assert dims["k.w"] == [E, D] and dims["q.w"] == [E, 2 * D] and dims["o.w"] == [2 * D, E]


def test_onnxruntime_fused_attention_heads_oracle():
    """com.microsoft::Attention (fused QKV weight, v wider than q/k): heads go with their q, k, v columns and
    bias; num_heads and qkv_hidden_sizes are rewritten; removal equals zeroing the out-projection rows."""
    from .oracle import list_groups, masked_and_removed, random_choice

    rng = np.random.default_rng(0)
    dq, dv = 8, 12
    sizes = [H * dq, H * dq, H * dv]
    inits = [numpy_helper.from_array((rng.standard_normal((E, sum(sizes))) * 0.2).astype(np.float32), "qkv.w"),
             numpy_helper.from_array((rng.standard_normal(sum(sizes)) * 0.1).astype(np.float32), "qkv.b"),
             numpy_helper.from_array((rng.standard_normal((H * dv, E)) * 0.2).astype(np.float32), "o.w")]
    nodes = [helper.make_node("Attention", ["x", "qkv.w", "qkv.b"], ["ctx"], domain="com.microsoft", num_heads=H,
                              qkv_hidden_sizes=sizes, name="fused_attention"),
             helper.make_node("MatMul", ["ctx", "o.w"], ["y"], name="o_proj")]
    graph = helper.make_graph(nodes, "fused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", E])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", E])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    heads = [g for g in list_groups(model) if "Attention" in g["ops"]]
    assert len(heads) == 1 and heads[0]["prunable"] == H and not heads[0]["frozen"]
    choice = random_choice(model, 0.5, 0)
    masked, removed = masked_and_removed(model, choice)
    attention = next(n for n in removed.graph.node if n.op_type == "Attention")
    attrs = {a.name: helper.get_attribute_value(a) for a in attention.attribute}
    assert attrs["num_heads"] == H // 2 and list(attrs["qkv_hidden_sizes"]) == [H // 2 * dq, H // 2 * dq, H // 2 * dv]
    for shape in [(1, 5, E), (2, 9, E)]:
        x = rng.standard_normal(shape).astype(np.float32)
        want, got = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
                     for m in (masked, removed))
        assert relative_error(want, got) < 1e-5
