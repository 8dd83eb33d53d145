"""Accuracy validation with labelled data (--eval-data) and the --max-accuracy-drop gate."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from .conftest import FIXTURES, listing, run_cli


@pytest.fixture
def eval_data(tmp_path):
    """Inputs and labels = the original model's own predictions (so its top-1 is 100 %)."""
    x = np.random.default_rng(0).standard_normal((40, 3, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(str(FIXTURES / "cnn.onnx"), providers=["CPUExecutionProvider"])
    labels = session.run(None, {"input": x})[0].argmax(axis=1).astype(np.int64)
    path = tmp_path / "eval.npz"
    np.savez(path, input=x, labels=labels)
    return path


def test_accuracy_reported(tmp_path, eval_data):
    code, out, err = run_cli(FIXTURES / "cnn.onnx", "--structured", "--sparsity", "0.5", "-o", tmp_path / "o.onnx",
                             "--eval-data", eval_data, "--report", tmp_path / "r.json", "--runs", "2")
    assert code == 0, err
    acc = json.loads((tmp_path / "r.json").read_text())["validation"]["accuracy"]
    assert acc["samples"] == 40 and acc["original"]["top1"] == 1.0
    assert acc["original"]["top5"] == 1.0 and acc["pruned"]["top5"] >= acc["pruned"]["top1"]
    assert acc["top1_drop_points"] == pytest.approx(100 * (1 - acc["pruned"]["top1"]))
    assert "accuracy on 40 labelled samples" in out


def test_accuracy_gate(tmp_path, eval_data):
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "--structured", "--sparsity", "0.7", "-o", tmp_path / "o.onnx",
                           "--eval-data", eval_data, "--max-accuracy-drop", "0", "--runs", "2")
    assert code == 6 and "top-1 dropped" in err
    # measured at 5 %: magnitude pruning loses 17.5 points of top-1; the inverted ranking loses 90
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "--sparsity", "0.05", "-o", tmp_path / "o2.onnx",
                           "--eval-data", eval_data, "--max-accuracy-drop", "40", "--runs", "2")
    assert code == 0, err


@pytest.mark.parametrize("arrays, words", [
    ({"input": np.zeros((4, 3, 32, 32), np.float32)}, "labels"),
    ({"input": np.zeros((4, 3, 32, 32), np.float32), "labels": np.zeros(5, np.int64)}, "samples"),
    ({"input": np.zeros((4, 3, 32, 32), np.float32), "labels": np.zeros(4, np.float32)}, "integer"),
])
def test_bad_eval_data_writes_nothing(tmp_path, arrays, words):
    np.savez(tmp_path / "e.npz", **arrays)
    before = listing(tmp_path)
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "--sparsity", "0.5", "-o", tmp_path / "o.onnx", "--eval-data",
                           tmp_path / "e.npz")
    assert code == 8 and words in err
    assert listing(tmp_path) == before


def test_max_accuracy_drop_needs_eval_data(tmp_path):
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "--sparsity", "0.5", "-o", tmp_path / "o.onnx",
                           "--max-accuracy-drop", "1")
    assert code == 2 and "--eval-data" in err
