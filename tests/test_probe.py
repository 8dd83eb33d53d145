"""Sensitivity points from the downstream probe (only the graph after a group's consumers runs, the tensors entering
it from one run of the original) against whole-model runs, and the allocation they lead to."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune import probe as probe_module
from onnxprune.allocation import default_allocation
from onnxprune.analysis.groups import analyse
from onnxprune.config import PruneConfig
from onnxprune.passes.structured import prepare_for_analysis
from onnxprune.sensitivity import around, measure, measure_masked

from .conftest import FIXTURES

RESNET = FIXTURES / "arch" / "resnet50.onnx"  # narrow widths: many groups, small Grams
#: the groups of the last two stages are measured (residual and bottleneck groups, skip tensors crossing the cuts)
LATE = ["/conv1/*", "/layer1/*", "/layer2/*"]


def _config(**options) -> PruneConfig:
    return PruneConfig(structured=True, sparsity=0.3, calibration_data="calib.npz", exclude=LATE, **options)


def _model() -> onnx.ModelProto:
    model = onnx.load(str(RESNET))
    prepare_for_analysis(model)
    return model


def _batches(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal((2, 3, 64, 64)).astype(np.float32)} for _ in range(count)]


def _whole_model(monkeypatch) -> None:
    """Force the whole-model probe (the consumer weights as inputs of one session over the full graph)."""
    monkeypatch.setattr(probe_module.Downstream, "usable", lambda self: False)


def _points(sens: dict) -> dict[int, list[tuple]]:
    return {g["id"]: [(p["ratio"], p["channels_removed"], p["macs_saved"], p["params_saved"], p["rel_l2"])
                      for p in g["points"]] for g in sens["groups"]}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 5
    for gid, points in a.items():
        assert [p[:4] for p in points] == [p[:4] for p in b[gid]]
        # rel_l2 is already relative to the outputs' norm: the runs differ only by float rounding
        assert np.allclose([p[4] for p in points], [p[4] for p in b[gid]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reconstruct", [False, True])
def test_downstream_points_equal_whole_model_runs(monkeypatch, reconstruct):
    config = _config(reconstruct=reconstruct)
    feeds, fit = _batches(2), _batches(3, seed=1)
    cut, _ = measure_masked(_model(), feeds, config, around(0.3), fit_feeds=fit)
    _whole_model(monkeypatch)
    whole, _ = measure_masked(_model(), feeds, config, around(0.3), fit_feeds=fit)
    _same(_points(cut), _points(whole))
    assert all(p[4] > 0 for points in _points(cut).values() for p in points)


def test_downstream_points_equal_the_removed_model():
    """Without a refit the masked points are the removed model's (the oracle): ``measure`` prunes a copy per point."""
    config = _config()
    feeds = _batches(1)
    cut, _ = measure_masked(_model(), feeds, config, (0.25, 0.5))
    removed = measure(_model(), feeds, config, ratios=(0.25, 0.5), include_heads=False)
    removed = {g["id"]: [(p["ratio"], p["channels_removed"], p["macs_saved"], p["params_saved"], p["rel_l2"])
                         for p in g["points"] if p["channels_removed"] > 0] for g in removed["groups"]}
    got = _points(cut)
    assert got.keys() == {gid for gid, points in removed.items() if points}
    for gid, points in got.items():
        assert [p[1] for p in points] == [p[1] for p in removed[gid]]
        assert np.allclose([p[4] for p in points], [p[4] for p in removed[gid]], rtol=1e-4, atol=1e-5)


def test_allocation_chooses_the_same_ratios(monkeypatch):
    config = _config(reconstruct=True)
    batches = _batches(6)
    _, cut = default_allocation(_model(), config, batches, {"input": [1, 3, 64, 64]})
    _whole_model(monkeypatch)
    _, whole = default_allocation(_model(), config, batches, {"input": [1, 3, 64, 64]})
    assert cut["method"] == whole["method"] == "sensitivity"
    assert cut["ratios"] == whole["ratios"]
    assert len({r["ratio"] for r in cut["ratios"]}) > 2  # the groups really got different ratios


def test_downstream_cuts_only_what_follows_the_consumers():
    """A group's session holds the nodes after its consumers; the crossing tensors go once no later group reads them."""
    model = _model()
    feeds = _batches(1)
    names = [n.name for n in model.graph.node]
    fc = next(n for n in model.graph.node if n.op_type == "Gemm")
    first_conv = next(n for n in model.graph.node if n.op_type == "Conv" and n is not model.graph.node[0])
    plans = [{first_conv.input[1]}, {fc.input[1]}]
    cut = probe_module.Downstream(model, feeds, plans)
    early, late = cut.cuts
    assert late["nodes"] and [n.name for n in late["nodes"]] == names[names.index(fc.name):]
    assert set(late["boundary"]) == {fc.input[0]} and late["plan"] == [fc.input[1]]
    assert len(early["nodes"]) > len(late["nodes"]) and early["outputs"] == [model.graph.output[0].name]
    whole = probe_module.run_model(model, feeds)
    weights = {name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer for name in [i.name]}
    for index in (0, 1):
        got = cut.run(index, weights)
        assert np.allclose(got[0][0], whole[0][0], rtol=1e-4, atol=1e-5)
    cut.done(0)
    assert fc.input[0] in cut.values[0] and not set(early["boundary"]) - set(late["boundary"]) & set(cut.values[0])
    cut.done(1)
    assert set(cut.values[0]) == {o.name for o in model.graph.output}



def test_a_cut_onnxruntime_refuses_falls_back_to_the_whole_model(monkeypatch):
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    model = onnx.load(str(FIXTURES / "cnn.onnx"))
    prepare_for_analysis(model)
    config = PruneConfig(structured=True, sparsity=0.5)
    feeds = [{"input": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)}]
    cut, _ = measure_masked(copy_of(model), feeds, config, (0.25, 0.5))

    def refuse(self, cut):
        raise Fail("refused")
    monkeypatch.setattr(probe_module.Downstream, "_session", refuse)
    whole, _ = measure_masked(copy_of(model), feeds, config, (0.25, 0.5))
    assert _points(cut).keys() == _points(whole).keys() and len(_points(cut)) == 5
    for gid, points in _points(cut).items():
        assert [p[:4] for p in points] == [p[:4] for p in _points(whole)[gid]]
        assert np.allclose([p[4] for p in points], [p[4] for p in _points(whole)[gid]], rtol=1e-5, atol=1e-5)


def copy_of(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def test_the_capture_run_gives_the_reference_outputs_bit_for_bit():
    """The downstream capture runs the original with more outputs: its graph outputs are the reference the points are
    compared with, equal to a run of the serialized model's own session; the captured tensors and the points'
    outputs are arrays of their own (not views of a session's memory)."""
    from onnxprune.sessions import create_session, session_options

    model = _model()
    feeds = _batches(2)
    fc = next(n for n in model.graph.node if n.op_type == "Gemm")
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    cut = probe_module.Downstream(model, feeds, [{convs[5].input[1]}, {fc.input[1]}])
    session = create_session(model, session_options(log_level=3))
    serialized = [session.run(None, feed) for feed in feeds]
    for got, whole, want in zip(cut.reference(), probe_module.run_model(model, feeds), serialized):
        assert len(got) == len(want) == 1
        assert all(np.array_equal(a, b) and np.array_equal(c, b) for a, c, b in zip(got, whole, want))
    # arrays that outlive their session own their memory: one viewing onnxruntime's keeps the session's whole arena
    assert all(a.flags.owndata for values in cut.values for a in values.values())
    assert all(a.flags.owndata for outputs in probe_module.run_model(model, feeds) for a in outputs)
    points = cut.run(1, {fc.input[1]: np.zeros_like(numpy_helper.to_array(
        next(i for i in model.graph.initializer if i.name == fc.input[1])))})
    assert all(a.flags.owndata for outputs in points for a in outputs)


def test_points_restore_the_original_arrays():
    """A point writes new arrays for the weights it changes and gives back the originals after it (no copies)."""
    from onnxprune.analysis.groups import analyse, build_groups
    from onnxprune.passes.structured import mask

    model = _model()
    analysis = analyse(model, {"input": [1, 3, 64, 64]}, LATE)
    group = next(g for g in build_groups(analysis) if len(g.units) > 2)
    keep = np.ones(analysis.num_channels, dtype=bool)
    keep[group.units[0]] = False
    probe = probe_module.Probe(analysis, _batches(1))
    first = probe.outputs(keep, lambda: mask(analysis, keep))
    held = [e.weight for e in probe.edits]
    assert all(isinstance(w, probe_module.HeldWeight) and w.values is probe.weights[w.name] for w in held)
    assert any(not keep[e.ids].all() for e in probe.edits)
    second = probe.outputs(keep, lambda: mask(analysis, keep))
    assert all(np.array_equal(a, b) for a, b in zip(first[0], second[0]))
    assert all(w.values is probe.weights[w.name] for w in held)
    untouched = probe.outputs(np.ones_like(keep), lambda: None)
    assert not np.array_equal(untouched[0][0], first[0][0])


def test_capture_windows_give_the_same_points(monkeypatch):
    """With a bounded heap (--low-memory) several capture runs each give the crossing tensors of a few consecutive
    plans: the points are those of one run for all, bit for bit."""
    config = _config()
    feeds = _batches(2)
    one, _ = measure_masked(_model(), feeds, config, around(0.3))
    windows, starts = probe_module.Downstream._windows, []

    def recorded(self, *args):
        starts.append(windows(self, *args))
        return starts[-1]
    monkeypatch.setattr(probe_module, "heap_bounded", lambda: True)
    monkeypatch.setattr(probe_module, "CAPTURE_SHARE", 1e-4)
    monkeypatch.setattr(probe_module.Downstream, "_windows", recorded)
    several, _ = measure_masked(_model(), feeds, config, around(0.3))
    assert len(starts) == 1 and len(starts[0]) > 3
    assert _points(several) == _points(one)


def test_low_memory_refit_captures_grams_per_window(monkeypatch):
    """With a bounded heap (--low-memory) the refit's Grams are captured per window of consecutive groups (later
    windows from the frontier the previous capture kept), each window's released before the next is captured: the
    points equal those of one capture for all groups, bit for bit, and a window holds at most its budget of Grams
    and kept inputs unless one group alone is over it."""
    import importlib

    from onnxprune import probe_refit, selection_windows
    sensitivity = importlib.import_module("onnxprune.sensitivity")  # the package exports a function of that name
    config = _config(reconstruct=True)
    feeds, fit = _batches(1), _batches(2, seed=1)
    monkeypatch.setattr(sensitivity, "heap_bounded", lambda: True)
    monkeypatch.setattr(selection_windows, "WINDOW_SHARE", 1e3)  # one window: every Gram captured at once
    one, _ = measure_masked(_model(), feeds, config, around(0.3), fit_feeds=fit)
    made, starts = [], []

    class Recorded(probe_refit.ConsumerGrams):
        def __init__(self, model, consumers, sources, *args, **kwargs):
            starts.append(set(sources[0]))
            super().__init__(model, consumers, sources, *args, **kwargs)
            made.append(self.live_bytes + sum(x.nbytes for kept in self.inputs.values() for x in kept))
    monkeypatch.setattr(selection_windows, "WINDOW_SHARE", 0.05)
    monkeypatch.setattr(probe_refit, "ConsumerGrams", Recorded)
    windowed, _ = measure_masked(_model(), feeds, config, around(0.3), fit_feeds=fit)
    assert len(made) > 3 and starts[0] == {"input"} and any(len(names) > 1 for names in starts[1:])
    assert _points(windowed) == _points(one)
    model = _model()
    consumers = probe_refit.refit_consumers(analyse(model, None, config.exclude))
    budget = 0.05 * sum(matrix.nbytes for _, _, matrix, _ in consumers.values())
    assert sum(held <= budget for held in made) >= len(made) - 2  # a group alone over the budget: its own window


def test_the_narrowest_frontier_keeps_fewer_bytes():
    """Between two windows' consumer inputs the frontier is cut where it keeps the fewest bytes: no more than the
    cut just before the later window's first input, and what it keeps is computed before that input."""
    from onnxprune.selection_windows import CaptureSource

    model = _model()
    analysis = analyse(model, None)
    feeds = _batches(2)
    source = CaptureSource(model, feeds, 1 << 40, analysis.shapes)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    early, late = {convs[3].input[0]}, {convs[12].input[0]}
    latest, narrowest = source.frontier(late), source.frontier(late, early)
    assert latest and narrowest and source.bytes(narrowest) < source.bytes(latest)
    first = min(source.producer[n] for n in late)
    assert all(source.producer[n] < first for n in narrowest)


def test_the_narrowest_cut_is_the_smallest_frontier_by_its_definition():
    """Every start..stop range of a residual CNN and a transformer: the cut chosen holds the fewest bytes among
    the range's cuts, counted from the definition (tensors computed before the cut that it or later nodes read),
    the latest of equals."""
    from onnxprune.selection_windows import CaptureSource

    for model in (_model(), onnx.load(FIXTURES / "transformers" / "bert_ts.onnx")):
        analysis = analyse(model, None)
        source = CaptureSource(model, [{"batch": np.zeros(2, np.float32)}], 1 << 40, analysis.shapes)
        count = len(model.graph.node)
        sizes = [source.bytes({n for reads in source.reads[cut:] for n in reads
                               if 0 <= source.producer.get(n, -1) < cut}) for cut in range(count + 1)]
        step = max(1, count // 25)
        for start in range(1, count, step):
            for stop in range(start, count + 1, step):
                best = min(sizes[start:stop + 1])
                assert source._narrowest(start, stop) == max(c for c in range(start, stop + 1) if sizes[c] == best)


def test_refit_captures_keep_no_copies_of_other_weights(monkeypatch):
    """The allocation refit's capture sessions are fed the probe's original consumer arrays, and the copies they make
    of the other weights go with the sessions: after the windows' captures the refit holds the originals alone (it
    held a copy of every weight a capture read, through the whole measurement)."""
    import importlib
    from types import MappingProxyType

    from onnxprune import selection_windows
    from onnxprune.sessions import fed_session, model_header, shared_weights
    sensitivity = importlib.import_module("onnxprune.sensitivity")
    monkeypatch.setattr(sensitivity, "heap_bounded", lambda: True)
    monkeypatch.setattr(selection_windows, "WINDOW_SHARE", 0.05)
    made = []
    refit_class = sensitivity.Refit

    def recorded(*args, **kwargs):
        made.append(refit_class(*args, **kwargs))
        return made[-1]
    monkeypatch.setattr(sensitivity, "Refit", recorded)
    measure_masked(_model(), _batches(1), _config(reconstruct=True), around(0.3), fit_feeds=_batches(2, seed=1))
    refit = made[0]
    assert len(refit.windows) > 3 and len(refit.shared) > 5
    assert all(isinstance(refit.shared[name][0], bytes) for name in refit.shared)
    assert set(refit.shared) <= {e.weight.name for e in refit.analysis.edits if e.role == "consumer"}
    # the rule itself: a dict gains the arrays a session makes, a read-only mapping is only read
    model = _model()
    weight = next(t for t in model.graph.initializer if len(t.dims) == 4)
    given = shared_weights({weight.name: numpy_helper.to_array(weight)})
    gained: dict = {}
    fed_session(model_header(model), model.graph.initializer, shared=gained)
    read_only = fed_session(model_header(model), model.graph.initializer, shared=MappingProxyType(given))
    assert len(gained) > 40 and set(given) == {weight.name}
    assert read_only.weights[weight.name] is given[weight.name][1]
