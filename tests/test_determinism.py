"""Same input and options give byte-identical outputs; sparsity 0 changes nothing; re-pruning is safe."""

from __future__ import annotations

import random

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxprune
from onnxprune.analysis.weights import find_prunable_weights

from .graphgen import random_cnn


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    rnd = random.Random(7)
    model = random_cnn(rnd.randint, rnd.choice, seed=7)
    path = tmp_path_factory.mktemp("det") / "model.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("options", [
    {"sparsity": 0.6}, {"sparsity": 0.6, "scope": "global"}, {"pattern": "2:4"},
    {"sparsity": 0.5, "criterion": "random", "seed": 3}, {"threshold": 0.05},
])
def test_byte_identical_outputs(model_path, tmp_path, options):
    onnxprune.prune(model_path, tmp_path / "a.onnx", **options)
    onnxprune.prune(model_path, tmp_path / "b.onnx", **options)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_random_criterion_depends_on_seed(model_path, tmp_path):
    onnxprune.prune(model_path, tmp_path / "a.onnx", sparsity=0.5, criterion="random", seed=1)
    onnxprune.prune(model_path, tmp_path / "b.onnx", sparsity=0.5, criterion="random", seed=2)
    assert (tmp_path / "a.onnx").read_bytes() != (tmp_path / "b.onnx").read_bytes()


def _outputs(model):
    session = ort.InferenceSession(model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model),
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    return session.run(None, {"input": x})[0]


def test_sparsity_zero_keeps_outputs(model_path):
    pruned, result = onnxprune.prune(model_path, sparsity=0.0)
    np.testing.assert_array_equal(_outputs(model_path), _outputs(pruned))
    assert result.to_dict()["passes"][0]["changed"] is False


def test_repruning_reaches_new_target(model_path, tmp_path):
    first = tmp_path / "first.onnx"
    onnxprune.prune(model_path, first, sparsity=0.5)
    second, result = onnxprune.prune(first, sparsity=0.7)
    assert abs(result.to_dict()["summary"]["achieved_sparsity"] - 0.7) < 0.005
    # every weight zeroed the first time stays zero
    before = {w.name: w.weight.array() for w in find_prunable_weights(onnx.load(first))}
    for item in find_prunable_weights(second):
        assert np.all(item.weight.array()[before[item.name] == 0] == 0)
    _again, result = onnxprune.prune(first, sparsity=0.5)
    assert result.to_dict()["passes"][0]["changed"] is False
