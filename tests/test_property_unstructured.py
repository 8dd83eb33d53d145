"""Property-based tests: unstructured and N:M pruning of random valid CNN graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import onnxprune
from onnxprune.analysis.weights import find_prunable_weights

from .graphgen import draw_model as _draw_model
from .graphgen import run_input as _run

CASES = 25


def changed_weights(model: onnx.ModelProto, pruned: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Name -> (original, pruned) of every initializer the pass changed; the changes may only be new zeros."""
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert before.keys() == after.keys()
    changed = {}
    for name, original in before.items():
        values = after[name]
        if not np.array_equal(values, original):
            np.testing.assert_array_equal(values[values != 0], original[values != 0])
            changed[name] = (original, values)
    return changed


def check_smallest_zeroed(changed: dict[str, tuple[np.ndarray, np.ndarray]], caps: dict[str, int] | None) -> None:
    """Per tensor, every zeroed weight is no larger than every kept one; with one global ranking (``caps``) the
    same holds across the tensors that did not reach their cap."""
    pooled_zeroed, pooled_kept = [0.0], [np.inf]
    for name, (original, values) in changed.items():
        magnitude = np.abs(original.astype(np.float64))
        zeroed, kept = magnitude[values == 0], magnitude[values != 0]
        assert zeroed.max(initial=0.0) <= kept.min(initial=np.inf), name
        if caps is not None and int(np.count_nonzero(values == 0)) < caps[name]:
            pooled_zeroed.append(zeroed.max(initial=0.0))
            pooled_kept.append(kept.min(initial=np.inf))
    assert max(pooled_zeroed) <= min(pooled_kept)


@settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), sparsity=st.sampled_from([0.0, 0.3, 0.7, 0.95]), scope=st.sampled_from(["layer", "global"]),
       criterion=st.sampled_from(["l1", "l2", "random"]))
def test_unstructured_random_graphs(data, sparsity, scope, criterion):
    model = _draw_model(data)
    pruned, result = onnxprune.prune(model, sparsity=sparsity, scope=scope, criterion=criterion)
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
    changed = changed_weights(model, pruned)
    assert set(changed) <= {t["weight"] for t in details["tensors"]}
    if criterion != "random":  # magnitude: the smallest weights go, and only those
        caps = {t["weight"]: int(np.floor(0.99 * t["params"])) for t in details["tensors"]}
        check_smallest_zeroed(changed, caps if scope == "global" else None)


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
    originals = {item.name: item.weight.array() for item in find_prunable_weights(model)}
    assert set(changed_weights(model, pruned)) <= pruned_names
    for item in find_prunable_weights(pruned):
        if item.name not in pruned_names:
            continue
        values = np.moveaxis(item.weight.array(), item.reduction_axis, -1)
        blocks = values.reshape(*values.shape[:-1], values.shape[-1] // m, m)
        assert (np.count_nonzero(blocks == 0, axis=-1) >= n).all()
        original = np.abs(np.moveaxis(originals[item.name], item.reduction_axis, -1)).reshape(blocks.shape)
        # in every block of M, the N smallest magnitudes went: no zeroed weight is larger than a kept one
        zeroed = np.where(blocks == 0, original, -np.inf).max(axis=-1)
        kept = np.where(blocks != 0, original, np.inf).min(axis=-1)
        assert (zeroed <= kept).all(), item.name


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
