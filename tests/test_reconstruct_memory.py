"""What the refit's activation streams keep between steps, and that keeping less changes no value.

- a stream under a byte budget (:class:`~onnxprune.calibration.KeptBudget`) keeps the frontier of the feeds that fit
  and recomputes the others from their inputs: the same tensors, bit for bit, and never more kept than the budget;
- nodes run ahead (a residual Add's output kept instead of both of its inputs) and layers advanced after their refit
  keep fewer bytes;
- the structured refit gives the same weights, bit for bit, with the budget derived from the data (``--low-memory``)
  as with the default one.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune import heap
from onnxprune.analysis.groups import analyse, build_groups
from onnxprune.calibration import ActivationStream, KeptBudget, session_with_outputs
from onnxprune.config import PruneConfig
from onnxprune.passes.structured import _reconstruction_layers, allocate_safe, prepare_for_analysis, remove
from onnxprune.refit import reconstruct
from onnxprune.scoring import unit_scores

from .conftest import FIXTURES


def _resnet18_feeds(seed: int, sizes: tuple[int, ...] = (3, 2, 2)) -> tuple[onnx.ModelProto, list[dict]]:
    model = onnx.load(str(FIXTURES / "arch" / "resnet18.onnx"))
    rng = np.random.default_rng(seed)
    return model, [{"input": rng.standard_normal((n, 3, 64, 64)).astype(np.float32)} for n in sizes]


def _steps(model: onnx.ModelProto, side: str) -> list[list[str]]:
    """Every conv's input (``side`` "input", as the pruned model's stream) or output ("output", as the original's)."""
    return [[node.input[0] if side == "input" else node.output[0]] for node in model.graph.node
            if node.op_type == "Conv"]


def _stream_all(stream: ActivationStream, steps: list[list[str]]) -> tuple[list[np.ndarray], list[int]]:
    """Every step's tensors, feed after feed, and the bytes the stream keeps after each feed."""
    got, kept = [], []
    for names in steps:
        for values in stream.run(names):
            got.append(values[names[0]])
            kept.append(stream.kept_bytes())
    return got, kept


@pytest.mark.parametrize("side", ["input", "output"])
def test_budgeted_stream_recomputes_bit_identical_tensors_within_the_budget(side):
    """Under a budget a third of what the unbounded stream keeps at most, some feeds keep their tensors and the
    others are recomputed from their inputs (and kept again where the frontier narrows): every tensor equals the
    unbounded stream's and one full run's, and the kept bytes never exceed the budget."""
    model, feeds = _resnet18_feeds(6)
    steps = _steps(model, side)
    free, free_kept = _stream_all(ActivationStream(model, feeds), steps)
    limit = max(free_kept) // 3
    budget = KeptBudget(limit)
    stream = ActivationStream(model, feeds, budget)
    dropped = []
    real_keep = stream._keep

    def keep(number, frontier):
        real_keep(number, frontier)
        assert budget.held() <= limit
        dropped.append(not stream.whole[number] and bool(frontier))
    stream._keep = keep
    bounded, bounded_kept = _stream_all(stream, steps)
    assert any(dropped) and not all(dropped) and max(bounded_kept) <= limit
    full = session_with_outputs(model, [names[0] for names in steps])
    expected = [value for names in steps for feed in feeds for value in full.run(names, feed)]
    for a, b, c in zip(free, bounded, expected, strict=True):
        assert np.array_equal(a, b) and np.array_equal(a, c)


def test_run_ahead_keeps_fewer_bytes(monkeypatch):
    """The original model's stream, asked for one conv output after another, runs the residual Adds and ReLUs that
    free their inputs ahead of the next step: it never keeps more bytes and over the run fewer, and yields the same
    tensors."""
    model, feeds = _resnet18_feeds(7)
    steps = _steps(model, "output")
    ahead, ahead_kept = _stream_all(ActivationStream(model, feeds), steps)
    monkeypatch.setattr(ActivationStream, "_ahead", lambda self, segment, live: [])
    plain, plain_kept = _stream_all(ActivationStream(model, feeds), steps)
    assert all(a <= b for a, b in zip(ahead_kept, plain_kept)) and sum(ahead_kept) < sum(plain_kept)
    for a, b in zip(ahead, plain, strict=True):
        assert np.array_equal(a, b)


def _pruned_resnet18() -> tuple[onnx.ModelProto, onnx.ModelProto, list]:
    model = onnx.load(str(FIXTURES / "arch" / "resnet18.onnx"))
    prepare_for_analysis(model)
    analysis = analyse(model)
    groups = build_groups(analysis)
    keep = allocate_safe(analysis, groups, unit_scores(analysis, groups, "l1"), PruneConfig(structured=True, sparsity=0.4))
    original = onnx.ModelProto()
    original.CopyFrom(model)
    layers = _reconstruction_layers(analysis, keep)
    remove(analysis, keep)
    return original, model, layers


def test_refit_with_a_derived_budget_gives_the_same_weights(monkeypatch):
    """The refit under a budget derived from the data (about one layer's input over the calibration set, shared by
    both streams) or a tighter one that recomputes some feeds writes the weights of the default refit bit for bit;
    advancing the pruned model's stream past each wave's layers keeps fewer bytes than leaving them to the next
    wave."""
    original, pruned, layers = _pruned_resnet18()
    rng = np.random.default_rng(8)
    feeds = [{"input": rng.standard_normal((n, 3, 64, 64)).astype(np.float32)} for n in (3, 3, 2, 2)]
    held: dict[str, list[tuple[int, int, bool]]] = {}
    real_keep = ActivationStream._keep

    def keep(self, number, frontier):
        real_keep(self, number, frontier)
        held.setdefault(mode, []).append((self.budget.held(), self.budget.allowed(), self.whole[number]))
    monkeypatch.setattr(ActivationStream, "_keep", keep)
    results = {}
    for mode, budget in (("default", 1 << 30), ("derived", KeptBudget()), ("tight", KeptBudget(1 << 18))):
        model = onnx.ModelProto()
        model.CopyFrom(pruned)
        summary = reconstruct(original, model, layers, feeds, budget=budget)
        assert summary["layers"] > 10 and not summary["skipped"]
        results[mode] = {i.name: i.SerializeToString() for i in model.graph.initializer}
    assert results["derived"] == results["default"] == results["tight"]
    assert all(used <= allowed for mode in ("derived", "tight") for used, allowed, _ in held[mode])
    assert held["derived"][-1][1] > 1 << 18  # about one layer's input over the feeds
    assert not all(whole for _, _, whole in held["tight"])  # some feeds were recomputed
    assert all(whole for _, _, whole in held["default"])

    monkeypatch.setattr(ActivationStream, "advance", lambda self, names, live=None, clock=None: False)
    mode = "kept"
    model = onnx.ModelProto()
    model.CopyFrom(pruned)
    reconstruct(original, model, layers, feeds)
    assert {i.name: i.SerializeToString() for i in model.graph.initializer} == results["default"]
    assert max(used for used, _, _ in held["default"]) <= max(used for used, _, _ in held["kept"])
    assert sum(used for used, _, _ in held["default"]) < sum(used for used, _, _ in held["kept"])


def test_reconstruction_pass_budget_follows_the_bounded_heap(monkeypatch):
    """``bound_heap`` (``--low-memory``) is recorded for the stages that trade time for memory."""
    monkeypatch.setitem(heap._requested, "bounded", False)
    monkeypatch.setattr(heap, "_libc", lambda: None)  # the allocator of this test process is left as it is
    assert not heap.heap_bounded()
    assert not heap.bound_heap()
    assert heap.heap_bounded()
