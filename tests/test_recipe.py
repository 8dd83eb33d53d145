"""Recipes (--config) with per-layer overrides, and --save-recipe replays."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnxprune.analysis.weights import find_prunable_weights

from .conftest import FIXTURES, listing, run_cli

RECIPE = """
method: structured
sparsity: 0.5
overrides:
  - match: "block1.*"
    sparsity: 0.25
  - match: "fc1"
    method: unstructured
    sparsity: 0.8
  - match: "block2.pw*"
    exclude: true
"""


def prune(tmp_path, *args, name="out.onnx"):
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "-o", tmp_path / name, "--no-validate", "--force",
                             "--report", tmp_path / f"{name}.json", *args)
    assert code == 0, err
    return json.loads((tmp_path / f"{name}.json").read_text())


def test_recipe_overrides(tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    report = prune(tmp_path, "--config", tmp_path / "r.yaml")
    structured, unstructured = report["passes"]
    groups = {tuple(g["producers"]): g for g in structured["details"]["groups"]}
    assert groups[("block1.conv1",)]["channels_after"] == 24  # 25 % of 32 removed
    assert groups[("block3.conv", "block4.conv1")]["channels_after"] == 32  # the recipe's 50 %
    reasons = " ".join(f["reason"] for f in structured["details"]["frozen"])
    assert "excluded by recipe override 'block2.pw*'" in reasons and "left to unstructured" in reasons
    tensors = unstructured["details"]["tensors"]
    assert [t["weight"] for t in tensors] == ["fc1.weight"] and abs(tensors[0]["sparsity"] - 0.8) < 1e-3


def test_command_line_wins_over_recipe(tmp_path):
    (tmp_path / "r.yaml").write_text("sparsity: 0.5\ncriterion: l2\n")
    report = prune(tmp_path, "--config", tmp_path / "r.yaml", "--sparsity", "0.3")
    assert report["config"]["sparsity"] == 0.3 and report["config"]["criterion"] == "l2"


@pytest.mark.parametrize("args", [["--structured", "--sparsity", "0.5", "--scope", "global"],
                                  ["--sparsity", "0.6", "--scope", "global"]])
def test_saved_recipe_replays_exactly(tmp_path, args):
    prune(tmp_path, *args, "--save-recipe", tmp_path / "applied.yaml", name="a.onnx")
    prune(tmp_path, "--config", tmp_path / "applied.yaml", name="b.onnx")
    a, b = onnx.load(str(tmp_path / "a.onnx")), onnx.load(str(tmp_path / "b.onnx"))
    assert [i.SerializeToString() for i in a.graph.initializer] == [i.SerializeToString() for i in b.graph.initializer]


def test_json_recipe_with_pattern_override(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"sparsity": 0.5, "overrides": [{"match": "block3.*", "pattern": "2:4"}]}))
    prune(tmp_path, "--config", tmp_path / "r.json")
    weights = {w.name: w for w in find_prunable_weights(onnx.load(str(tmp_path / "out.onnx")))}
    values = np.moveaxis(weights["block3.conv.weight"].weight.array(), 1, -1)
    assert (np.count_nonzero(values.reshape(*values.shape[:-1], -1, 4) == 0, axis=-1) >= 2).all()
    assert abs(np.mean(weights["stem.weight"].weight.array() == 0) - 0.5) < 0.01


@pytest.mark.parametrize("text, words", [
    ("sparsity: 0.5\nbogus: 1\n", "unknown setting"),
    ("sparsity: [0.5\n", "not valid YAML"),
    ("sparsity: 0.5\noverrides:\n  - sparsity: 0.2\n", "match"),
    ("sparsity: 0.5\noverrides:\n  - match: x\n    sparsity: 1.5\n", "sparsity"),
    ("method: magic\n", "method"),
])
def test_bad_recipes(tmp_path, text, words):
    (tmp_path / "r.yaml").write_text(text)
    before = listing(tmp_path)
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "-o", tmp_path / "o.onnx", "--config", tmp_path / "r.yaml")
    assert code == 2 and words in err
    assert listing(tmp_path) == before
