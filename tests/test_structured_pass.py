"""Structured pruning end to end: CLI, report, allocation, exclusions, fixtures."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxprune

from .conftest import FIXTURES, run_cli
from .oracle import masked_and_removed, random_choice, relative_error

STRUCTURED_FIXTURES = ["cnn.onnx", "cnn_constant_weights.onnx", "cnn_external/model.onnx", "mlp_gemm.onnx",
                       "mlp_matmul.onnx", "mlp_dynamic.onnx", "cnn_opset11.onnx", "cnn_opset21.onnx"]


def io_signature(path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ([(i.name, i.shape, i.type) for i in session.get_inputs()],
            [(o.name, o.shape, o.type) for o in session.get_outputs()])


@pytest.mark.parametrize("name", STRUCTURED_FIXTURES)
def test_cli_structured(tmp_path, name):
    source = FIXTURES / name
    out = tmp_path / "pruned.onnx"
    code, stdout, err = run_cli(source, "--structured", "--sparsity", "0.5", "-o", out, "--report",
                                tmp_path / "r.json", "--runs", "3")
    assert code == 0, err
    assert "Structured pruning" in stdout
    onnx.checker.check_model(str(out), full_check=True)
    assert io_signature(out) == io_signature(source)
    report = json.loads((tmp_path / "r.json").read_text())
    details = report["passes"][0]["details"]
    assert details["channels_removed"] > 0 and details["params_removed"] > 0
    model = report["validation"]["model"]
    assert model["pruned"]["params"] < model["original"]["params"]
    assert model["pruned"]["macs"] < model["original"]["macs"]
    assert all(f["reason"] for f in details["frozen"])


@pytest.mark.parametrize("name", STRUCTURED_FIXTURES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oracle_on_fixtures(name, seed):
    model = onnx.load(str(FIXTURES / name))
    choice = random_choice(model, 0.5, seed)
    assert choice
    masked, removed = masked_and_removed(model, choice)
    session = ort.InferenceSession(str(FIXTURES / name), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feeds = {i.name: rng.standard_normal([d if isinstance(d, int) else 2 for d in i.shape]).astype(np.float32)
             for i in session.get_inputs()}

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)

    assert relative_error(run(masked), run(removed)) <= 1e-5


def test_layer_scope_halves_every_group():
    _, result = onnxprune.prune(FIXTURES / "cnn.onnx", structured=True, sparsity=0.5)
    groups = result.to_dict()["passes"][0]["details"]["groups"]
    assert groups
    for g in groups:
        assert g["channels_after"] == g["channels_before"] - g["channels_before"] // 2


def test_residual_group_spans_both_branches():
    _, result = onnxprune.prune(FIXTURES / "cnn.onnx", structured=True, sparsity=0.5)
    groups = result.to_dict()["passes"][0]["details"]["groups"]
    assert any({"stem", "block1.conv2", "block2.dw"} == set(g["producers"]) for g in groups)  # depthwise joins
    assert any(set(g["producers"]) == {"block3.conv", "block4.conv1"} for g in groups)


def test_global_scope_and_cap():
    _, result = onnxprune.prune(FIXTURES / "cnn.onnx", structured=True, sparsity=0.5, scope="global",
                                max_layer_sparsity=0.8)
    details = result.to_dict()["passes"][0]["details"]
    removed = sum(g["channels_before"] - g["channels_after"] for g in details["groups"])
    total = sum(g["channels_before"] for g in details["groups"])
    assert abs(removed - 0.5 * total) <= 1
    for g in details["groups"]:
        assert g["channels_after"] >= max(1, int(np.ceil(0.2 * g["channels_before"])))


def test_round_to():
    _, result = onnxprune.prune(FIXTURES / "cnn.onnx", structured=True, sparsity=0.4, round_to=8)
    for g in result.to_dict()["passes"][0]["details"]["groups"]:
        assert g["channels_after"] % 8 == 0


def test_exclude_freezes_group():
    _, result = onnxprune.prune(FIXTURES / "cnn.onnx", structured=True, sparsity=0.5, exclude=["block2.*"])
    details = result.to_dict()["passes"][0]["details"]
    assert not any("block2.pw" in g["producers"] for g in details["groups"])
    assert any("excluded" in f["reason"] for f in details["frozen"])


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn", "random"])
def test_criteria_choose_different_channels(criterion):
    model, result = onnxprune.prune(FIXTURES / "cnn.onnx", structured=True, sparsity=0.5, criterion=criterion)
    onnx.checker.check_model(model, full_check=True)
    assert result.to_dict()["passes"][0]["details"]["channels_removed"] > 0


def test_bn_criterion_removes_smallest_gamma():
    model = onnx.load(str(FIXTURES / "cnn.onnx"))
    gamma = next(onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name == "block2.pw.bn.scale")
    pruned, _ = onnxprune.prune(model, structured=True, sparsity=0.5, criterion="bn")
    kept = next(onnx.numpy_helper.to_array(i) for i in pruned.graph.initializer if i.name == "block2.pw.bn.scale")
    np.testing.assert_array_equal(np.sort(np.abs(kept)), np.sort(np.abs(gamma))[len(gamma) // 2:])


def test_sparsity_zero_changes_nothing():
    model = onnx.load(str(FIXTURES / "cnn.onnx"))
    pruned, result = onnxprune.prune(model, structured=True, sparsity=0.0)
    assert result.to_dict()["passes"][0]["changed"] is False
    assert [i.SerializeToString() for i in pruned.graph.initializer] == [
        i.SerializeToString() for i in model.graph.initializer]


def test_inspect_lists_groups_and_frozen():
    code, out, err = run_cli("inspect", FIXTURES / "cnn.onnx")
    assert code == 0, err
    assert "prunable channel groups" in out and "reaches graph output" in out
    code, out, err = run_cli("inspect", FIXTURES / "cnn.onnx", "--json")
    info = json.loads(out)
    assert info["structured"]["groups"] and info["structured"]["frozen"]


# -- the pass itself on every fixture under fixtures/structured ------------------------------------------------

STRUCTURED_DIR = FIXTURES / "structured"
PASS_FIXTURES = sorted(p.stem for p in STRUCTURED_DIR.glob("*.onnx") if p.stem != "custom_op")
REQUIRED_KEYS = {"changed", "criterion", "scope", "target_sparsity", "round_to", "groups", "frozen", "channels_total",
                 "channels_removed", "channels_frozen", "params_removed", "macs_removed"}


def run_pass(model, **config):
    from onnxprune.config import PruneConfig
    from onnxprune.passes.manager import PassContext
    from onnxprune.passes.structured import StructuredPrunePass

    ctx = PassContext(model=model)
    result = StructuredPrunePass(PruneConfig(structured=True, **config)).run(ctx)
    return ctx.model, {"changed": result.modified, **result.details}


@pytest.mark.parametrize("name", PASS_FIXTURES)
def test_pass_on_structured_fixtures(name):
    original = onnx.load(str(STRUCTURED_DIR / f"{name}.onnx"))
    model = onnx.load(str(STRUCTURED_DIR / f"{name}.onnx"))
    model, details = run_pass(model, sparsity=0.5)
    assert REQUIRED_KEYS <= set(details)
    json.dumps(details)
    onnx.checker.check_model(model, full_check=True)
    assert [(v.name, str(v.type)) for v in [*model.graph.input, *model.graph.output]] == [
        (v.name, str(v.type)) for v in [*original.graph.input, *original.graph.output]]
    assert details["changed"] and details["channels_removed"] > 0 and details["params_removed"] > 0
    assert details["macs_removed"] > 0
    for g in details["groups"]:
        assert {"id", "channels_before", "channels_after", "params_removed", "macs_removed", "ops", "producers"} <= set(g)
        assert 1 <= g["channels_after"] <= g["channels_before"]
    assert all(f["reason"] and f["channels"] > 0 for f in details["frozen"])
    assert details["channels_total"] == sum(g["channels_before"] for g in details["groups"]) + sum(
        f["channels"] for f in details["frozen"] if not any(g["id"] == f["id"] for g in details["groups"]))
    x = {i.name: np.random.default_rng(0).standard_normal([d.dim_value or 2 for d in i.type.tensor_type.shape.dim])
         .astype(np.float32) for i in original.graph.input}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [o.shape for o in session.run(None, x)] == [o.shape for o in reference.run(None, x)]


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("round_to", [1, 4])
def test_pass_allocation_on_mlp(scope, round_to):
    _, details = run_pass(onnx.load(str(STRUCTURED_DIR / "mlp.onnx")), sparsity=0.5, scope=scope, round_to=round_to)
    for g in details["groups"]:
        assert g["channels_after"] >= 1
        if round_to > 1:
            assert g["channels_after"] % round_to == 0
    total = sum(g["channels_before"] for g in details["groups"])
    removed = sum(g["channels_before"] - g["channels_after"] for g in details["groups"])
    assert abs(removed - 0.5 * total) <= round_to * len(details["groups"])


def test_pass_exclude_by_weight_glob_and_bn_criterion():
    model = onnx.load(str(STRUCTURED_DIR / "residual.onnx"))
    _, details = run_pass(model, sparsity=0.5, criterion="bn", exclude=["conv2*"])
    assert any("excluded by pattern 'conv2*'" in f["reason"] for f in details["frozen"])
    assert not any("conv2" in g["producers"] for g in details["groups"])


@pytest.mark.parametrize("name", ["opset11", "opset13", "opset18"])
def test_pass_rewrites_split_in_each_opset_form(name):
    model, _ = run_pass(onnx.load(str(STRUCTURED_DIR / f"{name}.onnx")), sparsity=0.5)
    split = next(n for n in model.graph.node if n.op_type == "Split")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    sizes = [shapes[o][1] for o in split.output]
    assert min(sizes) >= 1 and sum(sizes) == shapes[split.input[0]][1] < 8  # no part emptied; sizes rewritten
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})[0].shape == (2, 5)


def test_emptied_split_part_keeps_its_best_channel():
    from onnxprune.analysis.groups import analyse, build_groups
    from onnxprune.passes.structured import never_empty

    model = onnx.load(str(STRUCTURED_DIR / "opset13.onnx"))
    analysis = analyse(model)
    group = next(g for g in build_groups(analysis) if "Split" in g.ops)
    split = next(n for n in model.graph.node if n.op_type == "Split")
    second = analysis.ann[split.output[1]].ids  # the part that feeds the Concat directly
    keep = np.ones(analysis.num_channels, dtype=bool)
    keep[second] = False
    score = np.zeros(analysis.num_channels)
    score[second[2]] = 1.0
    keep = never_empty(analysis, keep, score)
    assert keep[second].tolist() == [False, False, True, False] and len(group.units) == 8


@pytest.mark.parametrize("name", ["arch/yolo.onnx", "arch/convnext.onnx", "cnn_opset11.onnx"])
def test_no_dead_nodes_or_initializers_after_pruning(name):
    model, _ = onnxprune.prune(FIXTURES / name, structured=True, sparsity=0.5, prune_layernorm=True)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    assert [i.name for i in model.graph.initializer if i.name not in used] == []
    assert [n.name for n in model.graph.node if not any(o in used for o in n.output)] == []


def test_fold_into_shared_bias_adds_no_node():
    """ConvNeXt's exporter shares one zero bias between blocks (through Identity): folds get private copies."""
    model, _ = onnxprune.prune(FIXTURES / "arch" / "convnext.onnx", structured=True, sparsity=0.5,
                               prune_layernorm=True)
    assert not [n.name for n in model.graph.node if n.name.endswith("folded_bias_add")]


def test_static_shape_reads_fold_and_oracle_holds():
    """torch.chunk exports Shape -> Gather -> Div -> Slice; folded, its channels prune and the oracle holds."""
    from onnxprune.graph import remove_dead_nodes
    from onnxprune.shapes import fold_static_shape_reads

    model = onnx.load(str(FIXTURES / "arch" / "yolo.onnx"))
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert fold_static_shape_reads(folded) == 6  # the start and end of each of the three chunk slices
    remove_dead_nodes(folded)
    assert not [n for n in folded.graph.node if n.op_type == "Shape"]
    onnx.checker.check_model(folded, full_check=True)
    rng = np.random.default_rng(0)
    feeds = {"input": rng.standard_normal((2, 3, 64, 64)).astype(np.float32)}  # batch stays dynamic

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)

    for a, b in zip(run(model), run(folded)):
        np.testing.assert_array_equal(a, b)
    for seed in (0, 1):
        choice = random_choice(folded, 0.5, seed)
        masked, removed = masked_and_removed(folded, choice)
        assert relative_error(run(masked), run(removed)) <= 1e-5


def test_dynamic_batch_shape_reads_are_not_folded():
    from onnx import TensorProto, helper

    from onnxprune.shapes import fold_static_shape_reads

    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
             helper.make_node("Concat", ["b", "minus1"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                              [onnx.numpy_helper.from_array(np.array([0], np.int64), "zero"),
                               onnx.numpy_helper.from_array(np.array([-1], np.int64), "minus1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    assert fold_static_shape_reads(model) == 0
