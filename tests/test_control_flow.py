"""Control flow (If/Loop/Scan): MACs counted where subgraphs run; structured pruning says why subgraphs stay."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.analysis.cost import node_macs

from .conftest import FIXTURES, run_cli

IF_CONV = FIXTURES / "recurrent" / "if_conv.onnx"
LOOP = FIXTURES / "recurrent" / "loop_mlp.onnx"
#: conv1 (8 out, 3 in, 3x3) and conv2 (4 out, 8 in, 1x1) on 8x8 outputs
BRANCH_MACS = 8 * 3 * 9 * 64 + 4 * 8 * 64


def _branch(tag: str, width: int) -> onnx.GraphProto:
    w = numpy_helper.from_array(np.ones((4, width), np.float32), f"{tag}.w")
    nodes = [helper.make_node("MatMul", ["x", f"{tag}.w"], [f"{tag}.y"], name=f"{tag}_mm")]
    if width == 4:
        nodes.append(helper.make_node("MatMul", [f"{tag}.y", f"{tag}.w"], [f"{tag}.z"], name=f"{tag}_mm2"))
    out = nodes[-1].output[0]
    return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, [2, width])], [w])


def _if_model(cond: bool | None) -> onnx.ModelProto:
    """x [2, 4]; then: one MatMul 4 -> 16; else: two MatMuls 4 -> 4 -> 4; the condition constant or computed."""
    inits = []
    if cond is None:
        nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
                 helper.make_node("Greater", ["s", "zero"], ["c"])]
        inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    else:
        nodes = []
        inits.append(numpy_helper.from_array(np.array(cond), "c"))
    nodes.append(helper.make_node("If", ["c"], ["y"], name="choose", then_branch=_branch("then", 16),
                                  else_branch=_branch("else", 4)))
    graph = helper.make_graph(nodes, "if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


def test_if_macs_count_the_branch_that_runs():
    then_macs, else_macs = 2 * 4 * 16, 2 * 4 * 4 * 2
    for cond, expected, word in ((True, then_macs, "then"), (False, else_macs, "else")):
        notes: list[str] = []
        assert node_macs(_if_model(cond), notes=notes) == {"choose": expected}
        assert any(f"the {word} branch runs" in n for n in notes)
    notes = []
    assert node_macs(_if_model(None), notes=notes) == {"choose": max(then_macs, else_macs)}
    assert any("larger branch" in n and "then" in n for n in notes)


def test_loop_and_scan_macs_multiply_the_body():
    assert node_macs(onnx.load(str(LOOP))) == {"loop": 3 * (2 * 8 * 16 + 2 * 16 * 8)}
    body = helper.make_graph(
        [helper.make_node("MatMul", ["row", "w"], ["out"], name="scan_mm"),
         helper.make_node("Identity", ["acc"], ["acc_out"])],
        "body", [helper.make_tensor_value_info("acc", TensorProto.FLOAT, [1]),
                 helper.make_tensor_value_info("row", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 6])],
        [numpy_helper.from_array(np.ones((4, 6), np.float32), "w")])
    graph = helper.make_graph(
        [helper.make_node("Scan", ["acc0", "rows"], ["acc", "outs"], name="scan", body=body, num_scan_inputs=1)],
        "scan", [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [7, 1, 4])],
        [helper.make_tensor_value_info("outs", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.zeros(1, np.float32), "acc0")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)
    assert node_macs(model) == {"scan": 7 * 4 * 6}


def test_inspect_shows_subgraph_macs(tmp_path):
    code, out, _ = run_cli("inspect", IF_CONV, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["macs"] == BRANCH_MACS
    assert info["subgraph_macs"] == {"branch": BRANCH_MACS}
    groups = {g["id"]: g["prunable"] for g in info["structured"]["groups"]}
    assert groups == {"If 'branch' then_branch #0": 8, "If 'branch' else_branch #0": 8}
    frozen = {f["id"]: f["reason"] for f in info["structured"]["frozen"]}
    assert frozen == {"If 'branch' then_branch #1": "reaches graph output 'then.out'",
                      "If 'branch' else_branch #1": "reaches graph output 'else.out'"}
    code, text, _ = run_cli("inspect", IF_CONV)
    assert f"MACs in the subgraphs of branch: {BRANCH_MACS:,}" in text
    assert "the condition is known only at run time" not in text  # both branches cost the same


def test_structured_prunes_inside_each_branch_and_names_it(tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code, _, _ = run_cli(IF_CONV, "--structured", "--sparsity", "0.5", "-o", out, "--report", report)
    assert code == 0
    data = json.loads(report.read_text())
    details = data["passes"][0]["details"]
    assert details["channels_removed"] == 8
    assert sorted(details["subgraphs"], key=lambda line: line["subgraph"]) == [
        {"subgraph": "If 'branch' else_branch", "removed": 4, "reason": ""},
        {"subgraph": "If 'branch' then_branch", "removed": 4, "reason": ""}]
    assert details["macs_after"] == BRANCH_MACS // 2
    assert not any("removed nothing" in w for w in data["warnings"])
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    for attr in pruned.graph.node[-1].attribute:
        dims = {i.name: list(i.dims) for i in attr.g.initializer}
        assert dims[f"{attr.g.name}.conv1.weight"] == [4, 3, 3, 3] and dims[f"{attr.g.name}.conv2.weight"] == [4, 4, 1, 1]


def test_structured_warns_when_no_subgraph_channel_can_go(tmp_path):
    report = tmp_path / "report.json"
    path = FIXTURES / "control_flow" / "shared_outer.onnx"  # both branches read one outer weight: frozen
    code, stdout, stderr = run_cli(path, "--structured", "--sparsity", "0.5", "-o", tmp_path / "o.onnx",
                                   "--report", report)
    assert code == 0
    data = json.loads(report.read_text())
    reasons = {f["id"]: f["reason"] for f in data["passes"][0]["details"]["frozen"]}
    assert "none removed: outer-scope weight 'shared.w1'" in reasons["If 'choose' then_branch"]
    assert "structured pruning removed nothing" in stdout + stderr


def test_no_warning_when_structured_pruning_removes_channels(tmp_path):
    report = tmp_path / "report.json"
    code, _, _ = run_cli(FIXTURES / "recurrent" / "gru_forward.onnx", "--structured", "--sparsity", "0.5",
                         "-o", tmp_path / "out.onnx", "--report", report)
    assert code == 0
    assert not any("removed nothing" in w for w in json.loads(report.read_text())["warnings"])


def test_unstructured_reaches_the_branches(tmp_path):
    out = tmp_path / "out.onnx"
    code, _, _ = run_cli(IF_CONV, "--sparsity", "0.5", "-o", out)
    assert code == 0
    pruned = onnx.load(str(out))
    for attr in pruned.graph.node[-1].attribute:
        for init in attr.g.initializer:
            values = numpy_helper.to_array(init)
            assert np.count_nonzero(values == 0) == values.size // 2


def test_if_on_an_integer_input_counts_the_branch_the_resolved_value_takes(tmp_path):
    """sr is compared with 16000 (then: a conv) and, in the else branch, with 8000: the resolution feeds 16000 first,
    so the then branch's conv is counted (not the larger of the two), the same in inspect and prune."""
    path = FIXTURES / "feeds" / "samplerate.onnx"
    notes: list[str] = []
    macs = node_macs(onnx.load(str(path)), {"audio": [1, 512], "sr": []}, notes=notes)
    assert macs == {"if16k": 8 * 64 * 512 // 64}  # 8 filters x 64 taps x (512 / 64 stride) frames
    assert "If 'if16k': the then branch runs (condition computed from the resolved inputs)" in notes
    code, out, _ = run_cli("inspect", path, "--json", "--input-shape", "audio:1x512")
    assert code == 0 and json.loads(out)["macs"] == macs["if16k"]
    report = tmp_path / "r.json"
    code, _, _ = run_cli(path, "--sparsity", "0.5", "--input-shape", "audio:1x512", "-o", tmp_path / "o.onnx",
                         "--report", report)
    assert code == 0
    assert json.loads(report.read_text())["validation"]["model"]["original"]["macs"] == macs["if16k"]
