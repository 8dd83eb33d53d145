"""Allocation by default: structured pruning with calibration data spreads the uniform plan's MACs by measured
sensitivity; ``--uniform`` keeps equal ratios (fixture: fixtures/build_alloc_fixture.py)."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxprune
from onnxprune.analysis.cost import total_macs

from .conftest import FIXTURES, run_cli

MLP = FIXTURES / "structured" / "fragile_mlp.onnx"


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("alloc") / "calib.npz"
    np.savez(path, input=np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32))
    return path


def _prune(calib, **options):
    config = onnxprune.PruneConfig(structured=True, sparsity=0.5, calibration_data=str(calib), **options)
    return onnxprune.prune(onnx.load(str(MLP)), config=config)


def _kept(result, producer: str) -> int:
    details = next(p.details for p in result.passes if p.name == "structured")
    return next(g["channels_after"] for g in details["groups"] if g["producers"][0] == producer)


def _rel_l2(model: onnx.ModelProto) -> float:
    x = np.random.default_rng(7).standard_normal((256, 16)).astype(np.float32)
    ref = ort.InferenceSession(str(MLP)).run(None, {"input": x})[0]
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})[0]
    return float(np.linalg.norm(ref - got) / np.linalg.norm(ref))


def test_sensitivity_keeps_the_fragile_group_at_equal_macs(calib):
    original = onnx.load(str(MLP))
    uniform, uniform_result = _prune(calib, uniform=True)
    allocated, result = _prune(calib)
    onnx.checker.check_model(allocated, full_check=True)
    alloc = result.allocation
    assert alloc["method"] == "sensitivity" and alloc["groups_measured"] == 2 and alloc["evaluations"] == 8
    ratio = {entry["producers"][0]: entry["ratio"] for entry in alloc["ratios"]}
    assert ratio["fc1"] < 0.5 < ratio["fc2"]  # the fragile layer keeps more, the redundant one gives more
    assert _kept(uniform_result, "fc1") == _kept(uniform_result, "fc2") == 16
    assert _kept(result, "fc1") > 16 > _kept(result, "fc2")
    base = total_macs(original)
    assert total_macs(allocated) <= total_macs(uniform) + 0.02 * base  # the uniform plan's MACs, not more
    assert total_macs(allocated) >= total_macs(uniform) - 0.05 * base  # ... and not much fewer
    assert _rel_l2(allocated) < 0.7 * _rel_l2(uniform)  # measured: 0.36 against 0.61


def test_uniform_flag_is_the_uniform_plan(calib):
    """``uniform=True`` gives the same model as ratios fixed by a recipe override (the path that never allocates)."""
    uniform, result = _prune(calib, uniform=True)
    fixed, fixed_result = _prune(calib, overrides=[{"match": "*", "sparsity": 0.5}])
    assert result.allocation == {"method": "uniform", "reason": "asked for"}
    assert fixed_result.allocation["method"] == "uniform" and "overrides" in fixed_result.allocation["reason"]
    assert uniform.SerializeToString() == fixed.SerializeToString()


def test_config_is_not_mutated(calib):
    config = onnxprune.PruneConfig(structured=True, sparsity=0.5, calibration_data=str(calib))
    before = copy.deepcopy(config)
    _, result = onnxprune.prune(onnx.load(str(MLP)), config=config)
    assert result.allocation["method"] == "sensitivity"
    assert config == before
    assert result.config.overrides and not before.overrides  # the run's own config carries the ratios


@pytest.mark.parametrize("options, reason", [
    ({}, "no calibration data"),
    ({"scope": "global"}, "global scope"),
])
def test_uniform_reasons(calib, options, reason):
    calibration = {} if not options else {"calibration_data": str(calib)}
    config = onnxprune.PruneConfig(structured=True, sparsity=0.5, **calibration, **options)
    _, result = onnxprune.prune(onnx.load(str(MLP)), config=config)
    assert result.allocation["method"] == "uniform" and reason in result.allocation["reason"]


def test_cli_reports_allocation(calib, tmp_path):
    code, out, err = run_cli(MLP, "--structured", "--sparsity", "0.5", "--calibration-data", calib, "-o",
                             tmp_path / "a.onnx", "--report", tmp_path / "a.json", "--runs", "1", "--warmup", "0")
    assert code == 0, err
    assert "allocation: sensitivity (2 groups measured, " in out
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["allocation"]["method"] == "sensitivity" and report["config"]["sparsity"] == 0.5
    # the measurement is timed apart from the pass, stage by stage (8 probe points: 2 groups x 4 ratios)
    stages = report["allocation"]["stages"]
    assert {"reference", "analysis", "refit", "probe"} <= set(stages)
    assert all(entry["wall_s"] >= 0 and entry["cpu_s"] >= 0 for entry in stages.values())
    assert report["timings"]["allocation"] >= sum(entry["wall_s"] for entry in stages.values()) - 1e-3
    assert {"load", "allocation", "prune", "check_and_save", "validate"} == set(report["timings"])
    code, out, err = run_cli(MLP, "--structured", "--sparsity", "0.5", "--calibration-data", calib, "--uniform",
                             "-o", tmp_path / "u.onnx", "--runs", "1", "--warmup", "0", "--report", tmp_path / "u.json")
    assert code == 0, err
    assert "allocation: uniform (asked for)" in out
    assert "allocation" not in json.loads((tmp_path / "u.json").read_text())["timings"]  # nothing measured


def test_cli_uniform_with_target_is_a_usage_error(calib, tmp_path):
    code, _, err = run_cli(MLP, "--structured", "--target-macs", "0.5", "--uniform", "-o", tmp_path / "x.onnx")
    assert code == 2 and "--uniform" in err and not (tmp_path / "x.onnx").exists()
