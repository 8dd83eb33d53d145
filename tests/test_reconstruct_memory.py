"""What the refit's activation streams keep between steps, and that keeping less changes no value.

- a stream under a byte budget (:class:`~onnxprune.activation_stream.KeptBudget`) keeps the frontier of the feeds that fit
  and recomputes the others from their inputs: the same tensors, bit for bit, and never more kept than the budget;
- nodes run ahead (a residual Add's output kept instead of both of its inputs) and layers advanced after their refit
  keep fewer bytes;
- the structured refit gives the same weights, bit for bit, with the budget derived from the data (``--low-memory``)
  as with the default one;
- streams running each feed a few samples at a time yield the whole feeds' tensors bit for bit (and run whole feeds
  where parts do not join), and the refit over the original's detached weights, in parts, writes the same weights;
- the reconstruction pass over a model it owns detaches the pruned model's weights (unchanged ones shared with the
  original's arrays) and gives the model refitted in place byte for byte;
- a Conv's targets are gathered at the sampled positions as the original's stream runs, its output never joined.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune import activation_stream, heap
from onnxprune.activation_stream import ActivationStream, KeptBudget
from onnxprune.analysis.groups import analyse, build_groups
from onnxprune.config import PruneConfig
from onnxprune.passes.structured import _reconstruction_layers, allocate_safe, prepare_for_analysis, remove
from onnxprune.refit import detach_weights, reconstruct
from onnxprune.sample_parts import part_bounds
from onnxprune.scoring import unit_scores
from onnxprune.sessions import session_with_outputs

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


def _pruned(path) -> tuple[onnx.ModelProto, onnx.ModelProto, list]:
    model = onnx.load(str(path))
    prepare_for_analysis(model)
    analysis = analyse(model)
    groups = build_groups(analysis)
    keep = allocate_safe(analysis, groups, unit_scores(analysis, groups, "l1"), PruneConfig(structured=True, sparsity=0.4))
    original = onnx.ModelProto()
    original.CopyFrom(model)
    layers = _reconstruction_layers(analysis, keep)
    remove(analysis, keep)
    return original, model, layers


def _pruned_resnet18() -> tuple[onnx.ModelProto, onnx.ModelProto, list]:
    return _pruned(FIXTURES / "arch" / "resnet18.onnx")


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


def _bert_feeds(sizes: tuple[int, ...]) -> tuple[onnx.ModelProto, list[dict]]:
    model = onnx.load(str(FIXTURES / "transformers" / "bert_ts.onnx"))
    rng = np.random.default_rng(11)
    feeds = []
    for n in sizes:
        mask = np.ones((n, 12), dtype=np.int64)
        mask[:, 9:] = rng.integers(0, 2, (n, 3))
        feeds.append({"input_ids": rng.integers(0, 100, (n, 12)).astype(np.int64), "attention_mask": mask})
    return model, feeds


@pytest.mark.parametrize("arch", ["resnet18", "bert"])
def test_stream_in_parts_gives_the_whole_feeds_tensors(monkeypatch, arch):
    """A stream that runs each feed two samples at a time (``--low-memory``) yields every layer's input and output
    equal bit for bit to the stream running whole feeds, under a budget that recomputes some feeds too. The CNN's
    runs were joined from parts but those of its last layer (a Gemm: :data:`WHOLE_BATCH_OPS`); the encoder's, all
    matrix products, run whole feeds."""
    model, feeds = _resnet18_feeds(9, (5, 3)) if arch == "resnet18" else _bert_feeds((5, 3))
    layers = [node for node in model.graph.node if node.op_type in ("Conv", "MatMul", "Gemm")]
    steps = [[node.input[0], node.output[0]] for node in layers]
    joined = []
    real = activation_stream.run_in_parts

    def counted(*args):
        joined.append(real(*args))
        return joined[-1]
    monkeypatch.setattr(activation_stream, "run_in_parts", counted)
    whole, whole_kept = _stream_all(ActivationStream(model, feeds), steps)
    assert not joined
    parted = ActivationStream(model, feeds, KeptBudget(max(whole_kept) // 2), samples=2)
    recomputed, real_keep = [], parted._keep

    def keep(number, frontier):
        real_keep(number, frontier)
        recomputed.append(not parted.whole[number])
    parted._keep = keep
    got, _ = _stream_all(parted, steps)
    assert all(values is not None for values in joined) and bool(joined) == (arch == "resnet18")
    assert any(recomputed)  # some feeds were recomputed (in parts too)
    for a, b in zip(whole, got, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_matrix_products_run_whole_feeds():
    """onnxruntime's matrix products pick their path by the rows: a Gemm over a few samples gives other bits than
    those samples' rows of a larger batch, so a stream session running one takes whole feeds. Parts never hold a
    single sample of a larger feed (a last one joins the part before it)."""
    assert part_bounds(16, 4) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert part_bounds(5, 2) == [(0, 2), (2, 5)] and part_bounds(9, 4) == [(0, 4), (4, 9)]
    assert part_bounds(3, 2) == [(0, 3)] and part_bounds(1, 4) == [(0, 1)]
    rng = np.random.default_rng(13)
    gemm = onnx.helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    graph = onnx.helper.make_graph(
        [gemm], "gemm", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 300])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(rng.standard_normal((40, 300)).astype(np.float32), "w"),
         onnx.numpy_helper.from_array(rng.standard_normal(40).astype(np.float32), "b")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    feeds = [{"x": rng.standard_normal((n, 300)).astype(np.float32)} for n in (5, 7)]
    whole = [values["y"] for values in ActivationStream(model, feeds).run(["y"])]
    parted = [values["y"] for values in ActivationStream(model, feeds, samples=2).run(["y"])]
    for a, b in zip(whole, parted, strict=True):
        assert np.array_equal(a, b)


def test_stream_in_parts_falls_back_to_whole_feeds(monkeypatch):
    """A graph whose outputs do not hold their samples along axis 0 (a flattening Reshape) runs whole feeds: the
    same values as without parts."""
    node = onnx.helper.make_node("Reshape", ["x", "flat"], ["y"])
    relu = onnx.helper.make_node("Relu", ["y"], ["z"])
    graph = onnx.helper.make_graph(
        [node, relu], "flat", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])],
        [onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    feeds = [{"x": np.arange(n * 4, dtype=np.float32).reshape(n, 4) - 5} for n in (6, 3)]
    tried = []
    real = activation_stream.run_in_parts
    monkeypatch.setattr(activation_stream, "run_in_parts", lambda *args: tried.append(real(*args)) or tried[-1])
    stream = ActivationStream(model, feeds, samples=2)
    got = [values["z"] for values in stream.run(["z"])]
    assert stream.samples == 2 and tried == [None]  # tried once, then whole feeds only
    for feed, value in zip(feeds, got, strict=True):
        assert np.array_equal(value, np.maximum(feed["x"].reshape(-1), 0))


def test_refit_with_detached_weights_in_parts_gives_the_same_weights():
    """The refit as ``--low-memory`` runs it (the original's weights detached from its proto, both streams two
    samples at a time, a derived budget) writes the default refit's weights bit for bit; the detached original
    declares its large weights without data."""
    original, pruned, layers = _pruned_resnet18()
    rng = np.random.default_rng(12)
    feeds = [{"input": rng.standard_normal((n, 3, 64, 64)).astype(np.float32)} for n in (5, 3)]
    default = onnx.ModelProto()
    default.CopyFrom(pruned)
    reconstruct(original, default, layers, feeds)
    header, weights = detach_weights(original)
    assert weights and all(not t.HasField("raw_data") for t in header.graph.initializer if t.name in weights)
    assert all(np.array_equal(weights[t.name], onnx.numpy_helper.to_array(t))
               for t in original.graph.initializer if t.name in weights)
    summary = reconstruct(header, pruned, layers, feeds, budget=KeptBudget(), original_weights=weights, samples=2)
    assert summary["layers"] > 10 and not summary["skipped"]
    assert ({i.name: i.SerializeToString() for i in pruned.graph.initializer}
            == {i.name: i.SerializeToString() for i in default.graph.initializer})



@pytest.mark.parametrize("arch", ["resnet18", "bert"])
def test_reconstruction_pass_detaches_the_pruned_weights_and_gives_the_same_model(arch):
    """The reconstruction pass over a model it owns detaches the pruned model's large weights for the refit (those
    pruning left unchanged held as the original's arrays, the refit layers' kept in the proto) and puts them back
    after it: the model equals, byte for byte, the one refitted in place; detaching and attaching alone give the
    same bytes."""
    from onnxprune.calibration import StageClock
    from onnxprune.passes.manager import PassContext, ReconstructionRequest
    from onnxprune.passes.reconstruction import ReconstructionPass
    from onnxprune.refit import attach_weights, refit_weight_names

    path = FIXTURES / "arch" / "resnet18.onnx" if arch == "resnet18" else FIXTURES / "transformers" / "bert_ts.onnx"
    original, pruned, layers = _pruned(path)
    assert layers
    feeds = _resnet18_feeds(14, (3, 2))[1] if arch == "resnet18" else _bert_feeds((3, 2))[1]
    in_place = onnx.ModelProto()
    in_place.CopyFrom(pruned)
    reconstruct(original, in_place, layers, feeds)

    kept = refit_weight_names(pruned, layers)
    orig_header, orig_weights = detach_weights(original)
    header, weights = detach_weights(pruned, kept, orig_weights)
    assert weights and not kept & set(weights)
    assert all(not t.HasField("raw_data") for t in header.graph.initializer if t.name in weights)
    shared = [name for name in weights if weights[name] is orig_weights.get(name)]
    unchanged = [t.name for t in pruned.graph.initializer if t.name in orig_weights and any(
        o.name == t.name and o.raw_data == t.raw_data for o in original.graph.initializer)]
    assert set(shared) == set(unchanged) - kept and (shared or arch == "resnet18")
    assert attach_weights(header, weights).SerializeToString() == pruned.SerializeToString()
    del orig_header, orig_weights, header, weights

    request = ReconstructionRequest("structured", original, layers, {"params_before": 0}, StageClock())
    ctx = PassContext(model=pruned, calibration=feeds, owns_model=True, reconstruction=request)
    ReconstructionPass().run(ctx)
    assert ctx.model is not pruned and ctx.model.SerializeToString() == in_place.SerializeToString()


@pytest.mark.parametrize("samples", [0, 2])
@pytest.mark.parametrize("conv", [4, 3])
def test_conv_targets_are_gathered_without_the_whole_output(samples, conv):
    """The refit's original stream hands a Conv output no later step reads (the 5th conv's: its ReLU runs ahead) to
    the target gatherer part by part (or whole, without parts) and yields a placeholder holding no memory, of the
    output's shape and bytes; the gathered rows equal the whole output's at the sampled positions. An output the
    stream keeps (the 4th conv's, read by a residual Add not yet run) is yielded whole and not gathered."""
    from onnxprune.refit import _TargetGather

    model, feeds = _resnet18_feeds(15, (5, 4))
    name = [node for node in model.graph.node if node.op_type == "Conv"][conv].output[0]
    whole = [values[name] for values in ActivationStream(model, feeds).run([name])]
    stream = ActivationStream(model, feeds, samples=samples)
    rng = np.random.default_rng(3)
    values = stream.run([name])
    for number, expected in enumerate(whole):
        n, _, ho, wo = expected.shape
        picked = np.sort(rng.choice(n * ho * wo, size=50, replace=False))
        gather = stream.consumers[name] = _TargetGather(picked, n)
        got = next(values)[name]
        stream.consumers.clear()
        assert got.shape == expected.shape and got.nbytes == expected.nbytes
        if conv == 3:
            assert gather.result() is None and np.array_equal(got, expected)
            continue
        assert not any(got.strides)
        b, rest = np.divmod(picked, ho * wo)
        i, j = np.divmod(rest, wo)
        assert np.array_equal(gather.result(), expected[b, :, i, j])


@pytest.mark.parametrize("sizes", [(7, 7, 6), (1,) * 20])
def test_original_outputs_gathered_ahead_give_the_same_weights(monkeypatch, sizes):
    """Under a derived budget (``--low-memory``) the original's stream runs once through several waves of Convs,
    keeping of each layer's output only the rows its sampler draws (the kept channels): it takes fewer steps than
    there are waves, the pruned model's inputs are sampled at the same rows (some layers sampled, not whole), the
    rows stay within the budget beside the kept tensors, and the weights equal the default refit's bit for bit;
    with feeds of one sample too, whose unsampled rows the default refit lays out otherwise (the bias's sums
    depend on it)."""
    from onnxprune import refit as refit_module

    original, pruned, layers = _pruned_resnet18()
    rng = np.random.default_rng(16)
    feeds = [{"input": rng.standard_normal((n, 3, 128, 128)).astype(np.float32)} for n in sizes]
    default = onnx.ModelProto()
    default.CopyFrom(pruned)
    reconstruct(original, default, layers, feeds)

    windows, drawn, steps, held = [], [], {}, []
    real_ahead, real_draw, real_run, real_keep = (refit_module._gather_ahead, refit_module._Picks.draw,
                                                  ActivationStream.run, ActivationStream._keep)
    monkeypatch.setattr(refit_module, "_gather_ahead",
                        lambda window, reference, clock: windows.append(len(window)) or real_ahead(window, reference, clock))
    monkeypatch.setattr(refit_module._Picks, "draw",
                        lambda self, number, rows: drawn.append(real_draw(self, number, rows)) or drawn[-1])

    def run(self, names, live=None, clock=None):
        steps[id(self.model)] = steps.get(id(self.model), 0) + 1
        return real_run(self, names, live, clock)

    def keep(self, number, frontier):
        real_keep(self, number, frontier)
        held.append(self.budget.held() <= self.budget.allowed())
    monkeypatch.setattr(ActivationStream, "run", run)
    monkeypatch.setattr(ActivationStream, "_keep", keep)
    header, weights = detach_weights(original)
    summary = reconstruct(header, pruned, layers, feeds, budget=KeptBudget(), original_weights=weights, samples=2)
    assert summary["layers"] > 10 and not summary["skipped"]
    assert max(windows) >= 2 and steps[id(header)] < steps[id(pruned)]  # the pruned model's stream: one per wave
    assert any(picked is None for picked in drawn) and any(picked is not None for picked in drawn)
    assert held and all(held)
    assert ({i.name: i.SerializeToString() for i in pruned.graph.initializer}
            == {i.name: i.SerializeToString() for i in default.graph.initializer})


@pytest.mark.parametrize("count, size, parts", [(1, 5, 1), (5, 5, 1), (5, 5, 2), (1, 130, 1), (5, 80, 1), (5, 80, 2)])
def test_gathered_rows_are_the_default_refits_rows_laid_out_alike(count, size, parts):
    """The original's Conv output gathered ahead, whole or part by part, sampled (over 16,384 positions) or not,
    gives the rows and the layout the default refit takes from the whole output: the same values, strides and
    column sums bit for bit (the refit's bias comes from those sums; a single sample's unsampled rows are a
    column-major view there)."""
    from types import SimpleNamespace

    from onnxprune.gram import RowSampler
    from onnxprune.refit import _AheadGather, _conv_rows, _Picks

    rng = np.random.default_rng(17)
    y = rng.standard_normal((count, 6, size, size + 3)).astype(np.float32) * rng.uniform(0.1, 1e3, (1, 6, 1, 1))
    out_mask = np.array([True, False, True, True, False, True])
    ahead = SimpleNamespace(out_mask=out_mask, picks=_Picks(RowSampler(8, 1)), node=SimpleNamespace(op_type="Conv"))
    plain = SimpleNamespace(out_mask=out_mask, node=ahead.node)
    gather = _AheadGather(ahead, 0, count)
    for start, stop in part_bounds(count, parts) if parts > 1 else [(0, count)]:
        assert gather(y[start:stop], start, stop)
    got = gather.result()
    picked = RowSampler(8, 1).pick(count * size * (size + 3))
    assert (picked is None) == (count * size * (size + 3) <= 16384)
    _, expected = _conv_rows(plain, np.zeros((count * size * (size + 3) if picked is None else len(picked), 2),
                                              np.float32), picked, y)
    assert np.array_equal(got, expected) and got.strides == expected.strides
    assert np.array_equal(got.sum(axis=0, dtype=np.float64), expected.sum(axis=0, dtype=np.float64))
