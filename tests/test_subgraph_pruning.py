"""Structured pruning inside If/Loop/Scan bodies (each subgraph its own scope), proven by the oracle."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import onnxprune
from onnxprune.config import PruneConfig
from onnxprune.passes.structured import _analyse_scope, never_empty, remove
from onnxprune.passes.subgraphs import scopes, write_back

from .conftest import FIXTURES, run_cli
from .oracle import mask, relative_error

CF = FIXTURES / "control_flow"


def _load(name: str) -> onnx.ModelProto:
    return onnx.load(str(CF / f"{name}.onnx"))


def _feeds(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input}


def _run(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _edited(model: onnx.ModelProto, seed: int, apply) -> tuple[onnx.ModelProto, list[str]]:
    """A copy with a random half of every scope's prunable units masked or removed (same draws for both)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    rng, edited = np.random.default_rng(seed), []
    for scope in scopes(copy, None):
        analysis, groups, _ = _analyse_scope(scope, PruneConfig(structured=True))
        if analysis is None:
            continue
        keep = np.ones(analysis.num_channels, dtype=bool)
        for group in groups:
            n = min(len(group.units) // 2, group.channels - 1)
            for i in rng.choice(len(group.units), size=n, replace=False) if n > 0 else []:
                keep[group.units[i]] = False
        keep = never_empty(analysis, keep)
        if not keep.all():
            apply(analysis, keep)
            assert write_back(scope) is None
            edited.append(scope.where)
    return copy, edited


@pytest.mark.parametrize("name", ["if_branches", "nested_if", "loop_body", "scan_body"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_equals_removed_inside_subgraphs(name, seed):
    model = _load(name)
    masked, scopes = _edited(model, seed, mask)
    removed, scopes_removed = _edited(model, seed, remove)
    assert scopes and scopes == scopes_removed
    onnx.checker.check_model(removed, full_check=True)
    assert removed.ByteSize() < model.ByteSize()
    for k in range(2):
        feeds = _feeds(model, 10 * seed + k)
        feeds.update({"x": feeds["x"] * (1 if k else -1)} if "x" in feeds and name != "loop_body" else {})
        assert relative_error(_run(masked, feeds), _run(removed, feeds)) < 1e-5
        assert [o.shape for o in _run(removed, feeds)] == [o.shape for o in _run(model, feeds)]


def test_nested_scopes_are_pruned_innermost_first():
    _, scopes = _edited(_load("nested_if"), 0, remove)
    assert scopes == ["If 'choose' else_branch", "If 'choose' then_branch / If 'inner' else_branch",
                      "If 'choose' then_branch / If 'inner' then_branch", "If 'choose' then_branch"]


def _attr(node: onnx.NodeProto, name: str) -> onnx.GraphProto:
    return next(a.g for a in node.attribute if a.name == name)


def _details(model: onnx.ModelProto, **options):
    pruned, result = onnxprune.prune(model, structured=True, **options)
    onnx.checker.check_model(pruned, full_check=True)
    return pruned, result.to_dict()["passes"][0]["details"]


def test_if_branches_pruned_by_the_pass():
    model = _load("if_branches")
    pruned, details = _details(model, sparsity=0.5)
    lines = {line["subgraph"]: line for line in details["subgraphs"]}
    assert lines["If 'choose' then_branch"]["removed"] == 4 and lines["If 'choose' else_branch"]["removed"] == 3
    # the lowest-|w| output channels of the first conv are removed (l1 over its filter and the consumer's slice)
    then = {n.output[0]: numpy_helper.to_array(n.attribute[0].t)
            for n in _attr(model.graph.node[-1], "then_branch").node if n.op_type == "Constant"}
    score = np.abs(then["then.w1"]).reshape(8, -1).sum(1) + np.abs(then["then.w2"]).sum(axis=(0, 2, 3))
    group = next(g for g in details["groups"] if g["id"] == "If 'choose' then_branch #0")
    assert sorted(group["removed_channels"]["then_conv1"]) == sorted(np.argsort(score)[:4].tolist())
    # the outer initializer only the else branch reads is sliced where it lives, in the main graph
    outer = next(i for i in pruned.graph.initializer if i.name == "outer.w1")
    assert list(outer.dims) == [3, 3, 3, 3]
    assert details["macs_removed"] > 0 and details["channels_removed"] == 7
    feeds = _feeds(model, 0)
    for sign in (1, -1):  # both branches run
        out = _run(pruned, {"x": sign * np.abs(feeds["x"])})
        assert out[0].shape == (1, 4, 8, 8)


def test_outer_weight_read_by_both_branches_is_frozen_and_reported(tmp_path):
    model = _load("shared_outer")
    pruned, details = _details(model, sparsity=0.5)
    assert details["channels_removed"] == 0
    reasons = {f["id"]: f["reason"] for f in details["frozen"]}
    for branch in ("then_branch", "else_branch"):
        assert "'shared.w1' is also read outside" in reasons[f"If 'choose' {branch}"]
        assert reasons[f"If 'choose' {branch}"].startswith(f"2 layer(s) inside the If 'choose' {branch} subgraph, "
                                                          "none removed")
    assert next(i for i in pruned.graph.initializer if i.name == "shared.w1").dims == [8, 3, 3, 3]


def test_loop_and_scan_bodies_pruned_and_macs_follow_trips():
    _, loop = _details(_load("loop_body"), sparsity=0.5)
    assert loop["subgraphs"] == [{"subgraph": "Loop 'loop' body", "removed": 8, "reason": ""}]
    assert loop["macs_before"] == 3 * 2 * (4 * 16 + 16 * 4) and loop["macs_after"] == 3 * 2 * (4 * 8 + 8 * 4)
    _, scan = _details(_load("scan_body"), sparsity=0.5)
    assert scan["subgraphs"][0]["removed"] == 6
    assert scan["macs_before"] == 5 * 2 * (4 * 12 + 12 * 4) and scan["macs_after"] == 5 * 2 * (4 * 6 + 6 * 4)


def test_cli_report_and_inspect_name_each_subgraph(tmp_path):
    report = tmp_path / "report.json"
    code, _, stderr = run_cli(CF / "nested_if.onnx", "--structured", "--sparsity", "0.5",
                                   "-o", tmp_path / "out.onnx", "--report", report)
    assert code == 0, stderr
    data = json.loads(report.read_text())
    details = data["passes"][0]["details"]
    assert {line["subgraph"] for line in details["subgraphs"] if line["removed"]} == {
        "If 'choose' else_branch", "If 'choose' then_branch", "If 'choose' then_branch / If 'inner' then_branch",
        "If 'choose' then_branch / If 'inner' else_branch"}
    assert not any("removed nothing" in w for w in data["warnings"])
    code, text, _ = run_cli("inspect", CF / "nested_if.onnx")
    assert code == 0
    assert "group If 'choose' then_branch / If 'inner' else_branch #0: 5 channels" in text
