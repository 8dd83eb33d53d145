"""Property-based tests: structured pruning of random CNN graphs passes the checker, runs, and the oracle holds."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxprune.analysis.groups import analyse, build_groups
from onnxprune.compensation import fold_removed_constants
from onnxprune.config import PruneConfig
from onnxprune.passes.manager import PassContext
from onnxprune.passes.structured import StructuredPrunePass

from .graphgen import draw_model as _draw_model
from .graphgen import run_input as _run
from .oracle import mask, masked_and_removed, prepared, random_choice, relative_error

CASES = 40


def check_oracle(model: onnx.ModelProto, fraction: float, seed: int) -> None:
    choice = random_choice(model, fraction, seed)
    masked, removed = masked_and_removed(model, choice)
    onnx.checker.check_model(removed, full_check=True)
    x = np.random.default_rng(seed).standard_normal((2, 3, 16, 16)).astype(np.float32)
    a, b, original = _run(masked, x), _run(removed, x), _run(model, x)
    assert [o.shape for o in b] == [o.shape for o in original]
    # float32 summation order differs between the two; where most channels are gone the outputs can nearly
    # cancel, so the noise is measured against the original outputs' scale, not the (tiny) remainder's
    scale = max(float(np.abs(o).max()) for o in original)
    worst = max(float(np.abs(p - q).max()) for p, q in zip(a, b))
    assert relative_error(a, b) <= 1e-5 or worst <= 1e-5 * scale, (relative_error(a, b), worst, scale)


@settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), fraction=st.sampled_from([0.25, 0.5, 0.75]), seed=st.integers(0, 3))
def test_oracle_random_graphs(data, fraction, seed):
    check_oracle(_draw_model(data), fraction, seed)


def _feeds(seed: int, batches: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)} for _ in range(batches)]


def run_pass(model: onnx.ModelProto, calibration: list[dict[str, np.ndarray]],
             **options) -> tuple[onnx.ModelProto, dict]:
    """The real :class:`StructuredPrunePass` on a copy of ``model`` (the calibration batches feed the activation
    criterion and the folding of removed channels' constants)."""
    config = PruneConfig(structured=True, calibration_data="batches in the pass context", **options).validate()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    ctx = PassContext(model=copy, calibration=calibration)
    details = StructuredPrunePass(config).run(ctx).details
    onnx.checker.check_model(copy, full_check=True)
    return copy, details


def reported_keep(analysis, details: dict) -> np.ndarray:
    """The keep-mask over the analysis' channel ids that the pass's report states (``removed_channels``)."""
    keep = np.ones(analysis.num_channels, dtype=bool)
    spaces = {s.node.name or s.node.output[0]: s for s in analysis.spaces}
    for group in details["groups"]:
        for producer, lost in group["removed_channels"].items():
            space = spaces[producer]
            assert max(lost) < space.size
            keep[space.start + np.asarray(lost, dtype=np.int64)] = False
    return keep


def masked_model(model: onnx.ModelProto, details: dict, calibration, fold: bool) -> onnx.ModelProto:
    """The oracle's masked model for the pass's choice: the original (prepared as the pass prepares it) with the
    consumer slices of the removed channels zeroed; with folding, their constants folded the same way first."""
    masked = prepared(model)
    analysis = analyse(masked)
    keep = reported_keep(analysis, details)
    if fold and not keep.all() and fold_removed_constants(masked, keep, calibration)["consumers"]:
        analysis = analyse(masked)
    mask(analysis, keep)
    return masked


def independent_scores(analysis, criterion: str) -> np.ndarray:
    """Per channel id, as docs/structured.md defines the criteria: summed |w| (l1) or w^2 (l2) over the producer
    and consumer slices, |gamma| of BatchNormalization (bn)."""
    acc = np.zeros(analysis.num_channels)
    for edit in analysis.edits:
        node = edit.node
        if criterion == "bn":
            gamma = analysis.index.resolve(node.input[1])[0] if node.op_type == "BatchNormalization" else None
            if gamma is None or gamma.tensor is not edit.weight.tensor:
                continue
        elif edit.role not in ("producer", "consumer"):
            continue
        values = np.moveaxis(edit.weight.array().astype(np.float64), edit.axis, 0).reshape(len(edit.ids), -1)
        np.add.at(acc, edit.ids, np.square(values).sum(axis=1) if criterion == "l2" else np.abs(values).sum(axis=1))
    return acc


def check_lowest_scores_go(analysis, keep: np.ndarray, criterion: str) -> None:
    """In every group no kept unit scores below a removed one, unless the kept unit holds the last kept channels
    of some tensor (the pass never empties a tensor: a Split part, a Concat input, a picked subset)."""
    per_channel = independent_scores(analysis, criterion)
    arrays = [ann.ids for ann in analysis.ann.values()] + [edit.ids for edit in analysis.edits]
    for group in build_groups(analysis):
        unit_of = {int(i): u for u, ids in enumerate(group.units) for i in ids}
        scores = np.array([per_channel[ids].sum() for ids in group.units])
        removed = [u for u, ids in enumerate(group.units) if not keep[ids[0]]]
        if not removed:
            continue
        worst = max(scores[u] for u in removed)
        for u, ids in enumerate(group.units):
            if not keep[ids[0]] or scores[u] >= worst * (1 - 1e-6):
                continue
            needed = any(len(kept) and all(unit_of.get(int(i)) == u for i in kept)
                         for kept in (a[keep[a]] for a in arrays))
            assert needed, (criterion, group.id, u, scores[u], worst)


@settings(max_examples=CASES // 2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), sparsity=st.sampled_from([0.3, 0.5, 0.8]), scope=st.sampled_from(["layer", "global"]),
       round_to=st.sampled_from([1, 2, 4]), criterion=st.sampled_from(["l1", "l2", "bn", "random", "activation"]),
       fold=st.booleans(), seed=st.integers(0, 3))
def test_structured_pass_random_graphs(data, sparsity, scope, round_to, criterion, fold, seed):
    """The real pass with options that change the choice: its output equals the masked original for the channels
    its report says it removed, the lowest-scored units go, and every group keeps ``round_to``."""
    model = _draw_model(data)
    calibration = _feeds(seed)
    pruned, details = run_pass(model, calibration, sparsity=sparsity, scope=scope, round_to=round_to,
                               criterion=criterion, fold_constants=fold, seed=seed)
    x = np.random.default_rng(seed + 10).standard_normal((2, 3, 16, 16)).astype(np.float32)
    original, removed = _run(model, x), _run(pruned, x)
    assert [o.shape for o in removed] == [o.shape for o in original]
    masked = _run(masked_model(model, details, calibration, fold), x)
    scale = max(float(np.abs(o).max()) for o in original)
    worst = max(float(np.abs(p - q).max()) for p, q in zip(masked, removed))
    assert relative_error(masked, removed) <= 1e-5 or worst <= 1e-5 * scale, (relative_error(masked, removed), worst)
    for group in details["groups"]:
        assert group["channels_after"] >= 1
        assert bool(group["removed_channels"]) == (group["channels_after"] < group["channels_before"])
        if round_to > 1 and group["channels_after"] != group["channels_before"]:
            assert group["channels_after"] % round_to == 0
    if criterion in ("l1", "l2", "bn"):
        analysis = analyse(prepared(model))
        check_lowest_scores_go(analysis, reported_keep(analysis, details), criterion)
    assert details["params_after"] <= details["params_before"]


@pytest.mark.slow
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), fraction=st.floats(0.05, 0.95), seed=st.integers(0, 1000))
def test_oracle_random_graphs_many(data, fraction, seed):
    check_oracle(_draw_model(data), fraction, seed)
