"""Property-based tests: unstructured and N:M pruning of random valid CNN graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnxprune
from onnxprune.analysis.weights import find_prunable_weights

from .graphgen import draw_model as _draw_model
from .graphgen import run_input as _run

CASES = 25


@settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), sparsity=st.sampled_from([0.0, 0.3, 0.7, 0.95]), scope=st.sampled_from(["layer", "global"]))
def test_unstructured_random_graphs(data, sparsity, scope):
    model = _draw_model(data)
    pruned, result = onnxprune.prune(model, sparsity=sparsity, scope=scope)
    onnx.checker.check_model(pruned, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    before, after = _run(model, x), _run(pruned, x)
    assert [a.shape for a in before] == [a.shape for a in after]
    details = result.to_dict()["passes"][0]["details"]
    assert abs(details["achieved_sparsity"] - sparsity) <= 0.01
    if sparsity == 0.0:
        np.testing.assert_array_equal(before[0], after[0])
    for weight in find_prunable_weights(pruned):
        assert np.count_nonzero(weight.weight.array()) > 0, "no layer may be emptied"


@settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), nm=st.sampled_from([(1, 2), (2, 4), (4, 8)]))
def test_nm_random_graphs(data, nm):
    n, m = nm
    model = _draw_model(data)
    pruned, result = onnxprune.prune(model, pattern=f"{n}:{m}")
    onnx.checker.check_model(pruned, full_check=True)
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert [a.shape for a in _run(pruned, x)] == [a.shape for a in _run(model, x)]
    pruned_names = {t["weight"] for t in result.to_dict()["passes"][0]["details"]["tensors"]}
    for item in find_prunable_weights(pruned):
        if item.name not in pruned_names:
            continue
        values = np.moveaxis(item.weight.array(), item.reduction_axis, -1)
        blocks = values.reshape(*values.shape[:-1], values.shape[-1] // m, m)
        assert (np.count_nonzero(blocks == 0, axis=-1) >= n).all()


def test_case_count_is_reported(capsys):
    """The default run exercises a fixed number of random graphs (printed for the CI log)."""
    with capsys.disabled():
        print(f"\nproperty-based unstructured/N:M cases per test: {CASES}")
    assert CASES > 0


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), sparsity=st.floats(0.0, 0.98), pattern=st.sampled_from([None, "2:4", "1:4"]))
def test_unstructured_random_graphs_many(data, sparsity, pattern):
    model = _draw_model(data)
    options = {"pattern": pattern} if pattern else {"sparsity": sparsity}
    pruned, _ = onnxprune.prune(model, **options)
    onnx.checker.check_model(pruned, full_check=True)
    x = np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert [a.shape for a in _run(pruned, x)] == [a.shape for a in _run(model, x)]
