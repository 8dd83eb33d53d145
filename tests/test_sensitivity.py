"""Sensitivity analysis (onnxprune sensitivity) and automatic allocation (--target-macs / --target-params)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.analysis.cost import total_macs
from onnxprune.graph import count_params

from .conftest import FIXTURES, listing, run_cli


def test_sensitivity_table_json_plot(tmp_path):
    code, out, err = run_cli("sensitivity", FIXTURES / "cnn.onnx", "--json", tmp_path / "s.json", "--plot",
                             tmp_path / "s.png", "--ratios", "0.25,0.5")
    assert code == 0, err
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["macs"] > 0 and len(data["groups"]) == 5
    for group in data["groups"]:
        assert [p["ratio"] for p in group["points"]] == [0.25, 0.5]
        assert all(p["rel_l2"] > 0 and p["macs_saved"] > 0 for p in group["points"])
        assert group["points"][1]["macs_saved"] > group["points"][0]["macs_saved"]
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "relative L2 error" in out and "block3.conv" in out


def test_sensitivity_with_labels(tmp_path):
    x = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    import onnxruntime as ort

    labels = ort.InferenceSession(str(FIXTURES / "cnn.onnx")).run(None, {"input": x})[0].argmax(1)
    np.savez(tmp_path / "e.npz", input=x, labels=labels.astype(np.int64))
    code, _out, err = run_cli("sensitivity", FIXTURES / "cnn.onnx", "--eval-data", tmp_path / "e.npz", "--json",
                             tmp_path / "s.json", "--ratios", "0.5")
    assert code == 0, err
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["top1"] == 1.0 and all(0 <= g["points"][0]["top1"] <= 1 for g in data["groups"])


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_target_macs_is_met(target):
    model = onnx.load(str(FIXTURES / "cnn.onnx"))
    pruned, result = onnxprune.prune(model, structured=True, target_macs=target)
    onnx.checker.check_model(pruned, full_check=True)
    kept = total_macs(pruned) / total_macs(model)
    assert abs(kept - target) <= 0.02  # the README's promise (measured: 0.503 and 0.690)
    assert result.to_dict()["allocation"]["ratios"]


def test_target_params_is_met():
    model = onnx.load(str(FIXTURES / "arch" / "resnet18.onnx"))
    pruned, _ = onnxprune.prune(model, structured=True, target_params=0.5)
    assert count_params(pruned)[0] <= 0.5 * 1.02 * count_params(model)[0]


def test_target_allocation_beats_uniform_at_equal_macs():
    """Measured allocation loses less fidelity than a uniform ratio with no fewer MACs removed.

    At 90 % of the MACs, where the CNN fixture's function survives (measured rel. L2: 1.15 targeted, 2.58
    uniform); at 50 % both lose it (~3.5) and the comparison says nothing."""
    model = onnx.load(str(FIXTURES / "cnn.onnx"))
    val = onnxprune.ValidateConfig(runs=1, input_shapes={"input": [8, 3, 32, 32]})
    _, targeted = onnxprune.prune(model, structured=True, target_macs=0.9, validate=val)
    kept = targeted.validation["model"]["pruned"]["macs"] / targeted.validation["model"]["original"]["macs"]
    for sparsity in np.arange(0.02, 0.7, 0.02):
        _, uniform = onnxprune.prune(model, structured=True, sparsity=float(sparsity), validate=val)
        if uniform.validation["model"]["pruned"]["macs"] / uniform.validation["model"]["original"]["macs"] <= kept:
            break
    assert targeted.validation["worst"]["rel_l2"] < uniform.validation["worst"]["rel_l2"]


@pytest.mark.parametrize("args, words", [
    (["--target-macs", "0.5"], "--structured"),
    (["--structured", "--target-macs", "1.5"], "(0, 1]"),
    (["--structured", "--target-macs", "0.5", "--sparsity", "0.3"], "not both"),
])
def test_target_usage_errors(tmp_path, args, words):
    before = listing(tmp_path)
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "-o", tmp_path / "o.onnx", *args)
    assert code == 2 and words in err
    assert listing(tmp_path) == before


def test_sensitivity_bad_ratios(tmp_path):
    code, _, err = run_cli("sensitivity", FIXTURES / "cnn.onnx", "--ratios", "0.5,abc")
    assert code == 2 and "--ratios" in err
    code, _, err = run_cli("sensitivity", FIXTURES / "cnn.onnx", "--ratios", "1.5")
    assert code == 2
    code, _, err = run_cli("sensitivity", tmp_path / "missing.onnx")
    assert code == 3
