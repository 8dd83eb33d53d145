"""Activation-aware scoring (--criterion activation): Wanda for unstructured/N:M, channel energy for structured."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.analysis.weights import find_prunable_weights

from .conftest import FIXTURES, run_cli


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, input=np.random.default_rng(1).standard_normal((64, 3, 32, 32)).astype(np.float32))
    return str(path)


def fidelity(options, calib):
    val = onnxprune.ValidateConfig(runs=1, input_shapes={"input": [8, 3, 32, 32]})
    _, result = onnxprune.prune(FIXTURES / "cnn.onnx", calibration_data=calib, validate=val, **options)
    return result.validation["worst"]["rel_l2"], result


# Structured pruning is not compared here: on the CNN fixture (random weights, BN statistics of noise) neither
# criterion keeps the function once whole channels go (rel. L2 > 2 at 10 % and at 50 %), and which one loses less
# varies with the ratio; tests/test_choice.py checks the structured activation criterion's exact choice instead.
@pytest.mark.parametrize("options", [{"sparsity": 0.7}, {"pattern": "2:4"}])
def test_activation_beats_magnitude_on_the_cnn(calib, options):
    magnitude, _ = fidelity(options, calib)
    activation, _ = fidelity({**options, "criterion": "activation"}, calib)
    assert activation < magnitude


def test_wanda_ranks_within_each_row(calib):
    pruned, result = onnxprune.prune(FIXTURES / "cnn.onnx", sparsity=0.5, criterion="activation",
                                     calibration_data=calib)
    weights = {w.name: w.weight.array() for w in find_prunable_weights(pruned)}
    conv = weights["block1.conv1.weight"].reshape(32, -1)
    assert (np.count_nonzero(conv == 0, axis=1) == conv.shape[1] // 2).all()
    gemm = weights["fc2.weight"]  # [64, 10], reduction axis 0: rows are the 10 outputs
    assert (np.count_nonzero(gemm == 0, axis=0) == 32).all()
    assert abs(result.to_dict()["summary"]["achieved_sparsity"] - 0.5) < 0.01


def test_wanda_nm_pattern_holds(calib):
    pruned, _ = onnxprune.prune(FIXTURES / "cnn.onnx", pattern="2:4", criterion="activation", calibration_data=calib)
    onnx.checker.check_model(pruned, full_check=True)
    values = {w.name: w.weight.array() for w in find_prunable_weights(pruned)}["block3.conv.weight"]
    blocks = np.moveaxis(values, 1, -1).reshape(64, 3, 3, 16, 4)
    assert (np.count_nonzero(blocks == 0, axis=-1) >= 2).all()


@pytest.mark.parametrize("args, words", [
    (["--sparsity", "0.5", "--criterion", "activation"], "--calibration-data"),
    (["--sparsity", "0.5", "--criterion", "activation", "--scope", "global", "--calibration-data", "x.npz"], "row"),
])
def test_activation_usage_errors(tmp_path, args, words):
    code, _, err = run_cli(FIXTURES / "cnn.onnx", "-o", tmp_path / "o.onnx", *args)
    assert code == 2 and words in err
