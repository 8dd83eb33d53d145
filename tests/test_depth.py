"""Depth pruning: residual blocks found, scored by block influence, removed (``x + f(x)`` -> ``x``).

The oracle: a model whose chosen block has its branch multiplied by 0 in place (every node kept) must give the
same outputs as the model with the block removed; so the removed block's function is the only change. Which block
goes is checked by weakening one block's branch (times 1e-3) so that its influence is the lowest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml

import onnxprune
from onnxprune.analysis.blocks import ResidualBlock, find_blocks
from onnxprune.config import PruneConfig
from onnxprune.depth_allocation import choose
from onnxprune.errors import UsageError
from onnxprune.html_report import render_html
from onnxprune.inspect import inspect_model, render_inspection
from onnxprune.recipe import applied_recipe, load_recipe
from onnxprune.report import render

from .conftest import run_cli
from .oracle import relative_error
from .test_transformers import feeds as token_feeds

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
SHAPES = {"input": [1, 3, 64, 64], "pixel_values": [1, 3, 32, 32], "input_ids": [1, 16], "attention_mask": [1, 16]}
# (fixture, index of the block weakened among the removable ones, removable blocks expected)
CASES = [("arch/resnet18", 2, 4), ("arch/resnet50", 7, 12), ("arch/mobilenetv2", 5, 11), ("arch/convnext", 3, 5),
         ("transformers/bert_ts", 2, 4), ("transformers/gpt2_ts", 1, 4), ("transformers/llama_ts", 2, 4),
         ("transformers/vit_ts", 3, 4), ("transformers/llama_dynamo", 1, 4), ("transformers/bert_dynamo", 3, 4)]


def load(name: str) -> onnx.ModelProto:
    return onnx.load(str(ROOT / f"{name}.onnx"))


def shapes_of(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {i.name: SHAPES[i.name] for i in model.graph.input}


def sample(model: onnx.ModelProto, batch: int, seed: int) -> dict[str, np.ndarray]:
    names = {i.name for i in model.graph.input}
    if "input_ids" in names or "pixel_values" in names:
        return token_feeds(model, batch, 16, seed)
    return {"input": np.random.default_rng(seed).standard_normal((batch, 3, 64, 64)).astype(np.float32)}


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def scaled_branch(model: onnx.ModelProto, blocks: list[ResidualBlock], factor: float, tag: str = "weak"
                  ) -> onnx.ModelProto:
    """A copy where each block's ``f(x)`` is multiplied by ``factor`` just before its Add (nothing else changes)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    for block in blocks:
        position = next(i for i, n in enumerate(graph.node) if n.output[0] == block.output)
        add = graph.node[position]
        scale, scaled = f"{block.output}/{tag}_scale", f"{block.output}/{tag}_scaled"
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(factor, np.float32), scale))
        graph.node.insert(position, onnx.helper.make_node("Mul", [block.y, scale], [scaled]))
        add.input[list(add.input).index(block.y)] = scaled
    return copy


def calibration(tmp_path: Path, model: onnx.ModelProto, batch: int = 4) -> str:
    path = tmp_path / "calibration.npz"
    np.savez(path, **sample(model, batch, seed=0))
    return str(path)


def depth_details(result) -> dict:
    return next(p.details for p in result.passes if p.name == "depth")


@pytest.mark.parametrize("name,weak,found", CASES, ids=[c[0].split("/")[1] for c in CASES])
def test_the_weakest_block_goes_and_only_its_function_changes(tmp_path, name, weak, found):
    original = load(name)
    blocks = find_blocks(original, shapes_of(original)).blocks
    assert len(blocks) == found
    model = scaled_branch(original, [blocks[weak]], 1e-3)
    pruned, result = onnxprune.prune(model, config=PruneConfig(drop_blocks=1,
                                                               calibration_data=calibration(tmp_path, model)))
    details = depth_details(result)
    assert [b["add"] for b in details["blocks"] if b["removed"]] == [blocks[weak].name]
    assert details["macs_after"] < details["macs_before"] and details["params_after"] < details["params_before"]
    onnx.checker.check_model(pruned, full_check=True)
    assert [(o.name, o.type) for o in pruned.graph.output] == [(o.name, o.type) for o in original.graph.output]
    assert blocks[weak].output not in {o for n in pruned.graph.node for o in n.output}
    reference = scaled_branch(model, [find_blocks(model, shapes_of(model)).blocks[weak]], 0.0, "zero")
    for batch, seed in ((1, 3), (2, 4)):
        feed = sample(original, batch, seed)
        assert relative_error(run(reference, feed), run(pruned, feed)) < 1e-5


def test_two_chained_blocks_are_removed_together(tmp_path):
    """MobileNetV2's blocks 2.1 and 2.2 follow each other (2.2 reads 2.1's output): both go, 2.3's input resolves to
    2.1's input."""
    original = load("arch/mobilenetv2")
    blocks = find_blocks(original, shapes_of(original)).blocks
    chain = [blocks[2], blocks[3]]
    assert chain[1].x == chain[0].output
    model = scaled_branch(original, chain, 1e-3)
    pruned, result = onnxprune.prune(model, config=PruneConfig(drop_blocks=2,
                                                               calibration_data=calibration(tmp_path, model)))
    assert [b["add"] for b in depth_details(result)["blocks"] if b["removed"]] == [b.name for b in chain]
    onnx.checker.check_model(pruned, full_check=True)
    reference = scaled_branch(model, find_blocks(model, shapes_of(model)).blocks[2:4], 0.0, "zero")
    feed = sample(original, 2, 5)
    assert relative_error(run(reference, feed), run(pruned, feed)) < 1e-5


def test_blocks_found_and_why_others_are_not_removable():
    resnet = find_blocks(load("arch/resnet18"), SHAPES)
    assert [b.name for b in resnet.blocks] == [f"/layer{i}/layer{i}.1/Add" for i in range(1, 5)]
    assert [b.name for b in resnet.rejected] == [f"/layer{i}/layer{i}.0/Add" for i in range(1, 5)]
    assert all(b.reason.startswith("projection shortcut") for b in resnet.rejected)
    bert = find_blocks(load("transformers/bert_ts"), SHAPES)
    assert [b.kind for b in bert.blocks] == ["attention", "mlp", "attention", "mlp"]
    assert all(b.channel_axis == -1 for b in bert.blocks) and all(b.channel_axis == 1 for b in resnet.blocks)
    gpt2 = find_blocks(load("transformers/gpt2_ts"), SHAPES)  # GELU's x + 0.044715 x^3 has no weighted layer
    assert [b.kind for b in gpt2.blocks] == ["attention", "mlp", "attention", "mlp"] and not gpt2.rejected


def _tiny(read_outside: bool = False, output_is_add: bool = False) -> onnx.ModelProto:
    """x -> MatMul -> Relu -> Add(x, .) -> MatMul -> y; optionally the MatMul's result is also a graph output, or the
    Add itself is the graph output."""
    rng = np.random.default_rng(0)
    weights = [onnx.numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), n) for n in ("w1", "w2")]
    nodes = [onnx.helper.make_node("MatMul", ["x", "w1"], ["h"]), onnx.helper.make_node("Relu", ["h"], ["f"]),
             onnx.helper.make_node("Add", ["x", "f"], ["s"], name="residual")]
    outputs = [onnx.helper.make_tensor_value_info("s" if output_is_add else "y", onnx.TensorProto.FLOAT, [2, 8])]
    if not output_is_add:
        nodes.append(onnx.helper.make_node("MatMul", ["s", "w2"], ["y"]))
    if read_outside:
        outputs.append(onnx.helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, [2, 8]))
    graph = onnx.helper.make_graph(nodes, "tiny", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                       [2, 8])], outputs, weights)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)


def test_an_intermediate_read_outside_the_block_keeps_it():
    analysis = find_blocks(_tiny(read_outside=True), {"x": [2, 8]})
    assert not analysis.blocks and analysis.rejected[0].reason == "intermediate 'h' is a graph output"
    assert [b.name for b in find_blocks(_tiny(), {"x": [2, 8]}).blocks] == ["residual"]


def test_a_removed_add_that_is_a_graph_output_keeps_its_name(tmp_path):
    model = _tiny(output_is_add=True)
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    pruned, _ = onnxprune.prune(model, config=PruneConfig(drop_blocks=1, calibration_data=str(tmp_path / "c.npz")))
    onnx.checker.check_model(pruned, full_check=True)
    assert [n.op_type for n in pruned.graph.node] == ["Identity"] and not pruned.graph.initializer
    assert np.array_equal(run(pruned, {"x": x})[0], x)


def test_depth_sparsity_rounds_down_and_too_many_is_capped(tmp_path):
    model = load("arch/resnet50")
    data = calibration(tmp_path, model, batch=2)
    _, result = onnxprune.prune(model, config=PruneConfig(depth_sparsity=0.2, calibration_data=data))
    details = depth_details(result)
    assert details["asked"] == 2 and details["removed"] == 2  # floor(0.2 * 12)
    kept = sorted(b["influence"] for b in details["blocks"] if not b["removed"])
    assert max(b["influence"] for b in details["blocks"] if b["removed"]) <= kept[0]
    _, result = onnxprune.prune(load("arch/resnet18"), config=PruneConfig(drop_blocks=9, calibration_data=data))
    details = depth_details(result)
    assert details["removed"] == 4 and details["reason"] == "asked for 9 block(s), only 4 removable"


@pytest.mark.parametrize("settings,words", [
    ({"drop_blocks": 1}, "drop_blocks needs calibration_data"),
    ({"depth_sparsity": 0.5}, "depth_sparsity needs calibration_data"),
    ({"drop_blocks": -1, "calibration_data": "c.npz"}, "whole number >= 0"),
    ({"depth_sparsity": 1.0, "calibration_data": "c.npz"}, "must be in [0, 1)"),
    ({"drop_blocks": 1, "depth_sparsity": 0.5, "calibration_data": "c.npz"}, "either drop_blocks or depth_sparsity"),
    ({"drop_blocks": 1, "structured": True, "calibration_data": "c.npz"}, "nothing to do"),
    ({"drop_blocks": 1, "structured": True, "target_params": 0.5, "calibration_data": "c.npz"},
     "allocates width only"),
    ({"blocks_chosen": ["a"], "structured": True, "sparsity": 0.5}, "blocks_chosen applies to depth pruning"),
    ({"blocks_chosen": "a", "drop_blocks": 1, "calibration_data": "c.npz"}, "must be a list of block output names"),
])
def test_bad_depth_settings(settings, words):
    with pytest.raises(UsageError) as info:
        PruneConfig(**settings).validate()
    assert words in str(info.value).replace("{", "").replace("}", "")


def test_cli_without_calibration_data_is_a_usage_error(tmp_path):
    code, _, err = run_cli(ROOT / "arch/resnet18.onnx", "-o", tmp_path / "out.onnx", "--drop-blocks", "1")
    assert code == 2 and err.strip() == ("onnxprune: error: --drop-blocks needs --calibration-data: blocks are chosen "
                                         "by their influence measured on it")
    assert not (tmp_path / "out.onnx").exists()


def test_cli_with_structured_heads_and_report(tmp_path):
    """Depth then width and heads in one run on BERT: the passes after depth work on the smaller graph; the report
    splits what went by kind in the text, Markdown and HTML renderings."""
    model = load("transformers/bert_ts")
    data = calibration(tmp_path, model, batch=8)
    out = tmp_path / "out.onnx"
    code, stdout, err = run_cli(ROOT / "transformers/bert_ts.onnx", "-o", out, "--drop-blocks", "1", "--structured",
                                "--sparsity", "0.5", "--head-sparsity", "0.5", "--calibration-data", data,
                                "--report", tmp_path / "r.json", "--runs", "2", "--warmup", "1")
    assert code == 0, err
    report = __import__("json").loads((tmp_path / "r.json").read_text())
    kinds = report["summary"]["removed_by_kind"]
    assert kinds["depth"]["macs"] > 0 and kinds["width"]["macs"] > 0 and kinds["heads"]["macs"] > 0
    assert kinds["vocabulary"] == {"macs": 0, "params": 0} and report["summary"]["blocks_removed"] == 1
    assert [p["name"] for p in report["passes"]] == ["depth", "structured"]
    assert "Depth pruning: removed 1 of 4" in stdout and "Removed by kind" in stdout
    assert "## Removed by kind" in render(report, markdown=True) and "<h2>Depth pruning</h2>" in render_html(report)
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    feed = sample(model, 2, 7)
    assert [a.shape for a in run(pruned, feed)] == [a.shape for a in run(model, feed)]


def test_recipe_sets_depth_and_saved_recipe_replays_it(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"drop-blocks": 2}))
    settings = load_recipe(recipe)
    assert settings == {"drop_blocks": 2}
    model = load("arch/resnet18")
    _, result = onnxprune.prune(model, config=PruneConfig(**settings, calibration_data=calibration(tmp_path, model)))
    assert depth_details(result)["removed"] == 2
    assert applied_recipe(result.to_dict())["drop_blocks"] == 2


def test_inspect_lists_blocks_or_why_none():
    info = inspect_model(ROOT / "arch/resnet18.onnx")
    assert len(info["depth"]["blocks"]) == 4 and len(info["depth"]["not_removable"]) == 4
    assert "depth: 4 removable residual blocks" in render_inspection(info)
    none = inspect_model(ROOT / "mlp_gemm.onnx")["depth"]
    assert none["blocks"] == [] and none["reason"].startswith("no residual Add")


def test_target_macs_weighs_blocks_against_width_by_cost_per_mac(tmp_path):
    """--target-macs with --drop-blocks 1 on BERT whose first MLP block is nearly inert: that block is the one
    removed (the lowest measured loss per MAC saved), width covers the rest, and the MACs kept meet the target."""
    original = load("transformers/bert_ts")
    blocks = find_blocks(original, shapes_of(original)).blocks
    model = scaled_branch(original, [blocks[1]], 1e-3)
    source = tmp_path / "weak.onnx"
    onnx.save(model, str(source))
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, err = run_cli(source, "-o", out, "--structured", "--target-macs", "0.6", "--drop-blocks", "1",
                                "--calibration-data", calibration(tmp_path, model, batch=8), "--report", report_path,
                                "--runs", "2", "--warmup", "1")
    assert code == 0, err
    report = __import__("json").loads(report_path.read_text())
    depth = report["allocation"]["depth"]
    assert [b["add"] for b in depth["blocks"] if b["chosen"]] == [blocks[1].name]
    assert min(depth["blocks"], key=lambda b: b["cost_per_mac"])["add"] == blocks[1].name
    assert report["config"]["blocks_chosen"] == [blocks[1].output]
    assert [b["add"] for b in depth_details_of(report)["blocks"] if b["removed"]] == [blocks[1].name]
    assert report["summary"]["removed_by_kind"]["width"]["macs"] > 0  # one block alone keeps 0.77: width the rest
    assert report["validation"]["model"]["pruned"]["macs"] <= 0.6 * report["validation"]["model"]["original"]["macs"]
    assert "blocks: 1 of 4 removable chosen (at most 1)" in stdout and "the limit of 1 block(s) was reached" in stdout
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    feed = sample(model, 2, 7)
    assert [a.shape for a in run(pruned, feed)] == [a.shape for a in run(model, feed)]


def depth_details_of(report: dict) -> dict:
    return next(p["details"] for p in report["passes"] if p["name"] == "depth")


def _group(gid: int, producers: list[str], points: list[tuple[float, float]]) -> dict:
    return {"id": gid, "producers": producers,
            "points": [{"ratio": 0.5 * (i + 1), "rel_l2": loss, "macs_saved": macs} for i, (loss, macs) in
                       enumerate(points)]}


def test_choice_takes_steps_by_cost_per_mac_and_a_block_replaces_width_inside_it():
    """The greedy on measured numbers: width steps at 2e-4 to 2.8e-3 per MAC, block 0 at 6.5e-4 net of the width
    step already taken inside it (taken, replacing that step), block 1 at 1e-2 (left); with a limit of 0 only width."""
    groups = [_group(7, ["inner"], [(0.02, 100.0), (0.3, 200.0)]), _group(8, ["outer"], [(0.1, 100.0), (0.2, 200.0)])]
    blocks = [{"rel_l2": 0.15, "macs_saved": 300.0}, {"rel_l2": 3.0, "macs_saved": 300.0}]
    inside = {0: {7}, 1: set()}
    choice = choose(blocks, groups, inside, needed=450.0, limit=1)
    assert choice.blocks == [0] and 7 in choice.dead and 7 not in choice.points
    assert [(s.kind, s.key) for s in choice.steps] == [("width", 7), ("block", 0), ("width", 8), ("width", 8)]
    assert choice.steps[1].macs == 200.0 and choice.steps[1].loss == pytest.approx(0.13)  # net of the width step
    only_width = choose(blocks, groups, inside, needed=300.0, limit=0)
    assert only_width.blocks == [] and only_width.points == {7: 0, 8: 1}
