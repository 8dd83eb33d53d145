"""Gram matrices of the refit consumers in bounded memory (onnxprune/consumer_grams.py): deep layers keep their
few inputs and build their Gram when a group needs it, equal bit for bit to the Gram summed during the capture;
the selection and the allocation's refit hold the Grams of one group at a time, not every consumer's."""

from __future__ import annotations

import functools
import sys
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import numpy as np
import onnx
import pytest

from onnxprune import consumer_grams, probe, probe_refit, scoring, selection_windows, spd_solve
from onnxprune.activation_stream import ActivationStream
from onnxprune.analysis.groups import analyse, build_groups
from onnxprune.config import PruneConfig
from onnxprune.consumer_grams import ConsumerGrams
from onnxprune.passes.structured import prepare_for_analysis
from onnxprune.sensitivity import around, measure_masked

from .conftest import FIXTURES

RESNET18 = FIXTURES / "arch" / "resnet18.onnx"  # narrow widths: 21 consumers, 3×3 convs of up to 2,304 features


def _model(path=RESNET18) -> onnx.ModelProto:
    model = onnx.load(str(path))
    prepare_for_analysis(model)
    return model


def _feeds(sizes=(3, 2), seed: int = 7) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal((n, 3, 64, 64)).astype(np.float32)} for n in sizes]


class _Recorded(ConsumerGrams):
    """ConsumerGrams that remembers its instances (to read their byte counts after a run)."""

    made: ClassVar[list[ConsumerGrams]] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _Recorded.made.append(self)


def _gram_bytes(grams: ConsumerGrams, patches) -> int:
    return sum(8 * patch[1] ** 2 for patch in set(patches))


def test_deferred_grams_equal_the_grams_summed_during_capture():
    model = _model()
    analysis = analyse(model)
    consumers = scoring.refit_consumers(analysis)
    whole = ConsumerGrams(model, consumers, _feeds(), 1e-3, shapes=analysis.shapes, defer=False)
    bounded = ConsumerGrams(model, consumers, _feeds(), 1e-3, shapes=analysis.shapes)
    every = _gram_bytes(whole, whole.patch.values())
    assert not whole.deferred and whole.live_bytes == every
    assert len(bounded.deferred) >= 10  # the deep 3×3 convs: a few positions, thousands of features
    assert bounded.live_bytes < every / 20  # after the capture: only the shallow layers' Grams are held
    assert list(bounded) == list(whole) and len(whole) == len(consumers) > 15
    for key in whole:
        np.testing.assert_array_equal(bounded[key], whole[key])
    assert bounded.live_bytes == every  # every Gram asked for is now held ...
    bounded.release(list(bounded))
    assert bounded.live_bytes == _gram_bytes(bounded, set(bounded.patch.values()) - bounded.deferred)  # ... until released
    key = next(k for k in bounded if bounded.patch[k] in bounded.deferred)
    np.testing.assert_array_equal(bounded[key], whole[key])  # built again from the kept inputs
    bounded.forget(list(bounded))
    assert bounded.live_bytes == 0 and not bounded.inputs and not len(bounded)


def test_selection_holds_the_grams_of_one_group_at_a_time(monkeypatch):
    """The greedy selection's scores equal those from every Gram held at once, and the Grams held at any time are
    at most the shallow (summed during the capture) ones plus the deferred Grams of the one group being scored."""
    model = _model()
    analysis = analyse(model)
    groups = build_groups(analysis)
    feeds = _feeds()
    monkeypatch.setattr(scoring, "ConsumerGrams", functools.partial(ConsumerGrams, defer=False))
    whole = scoring.reconstruction_scores(analysis, groups, feeds, stop=0.6)
    _Recorded.made = []
    monkeypatch.setattr(scoring, "ConsumerGrams", _Recorded)
    bounded = scoring.reconstruction_scores(analysis, groups, feeds, stop=0.6, threads=1)  # one group at a time
    assert whole.keys() == bounded.keys() and len(whole) == len(groups) > 10
    for gid, scores in whole.items():
        np.testing.assert_array_equal(bounded[gid], scores)
    grams = _Recorded.made[0]
    consumers = scoring.refit_consumers(analysis)
    patches = {key: scoring._patch_key(node, matrix.shape[0]) for key, (node, _, matrix, _) in consumers.items()}
    shallow = _gram_bytes(grams, set(patches.values()) - grams.deferred)
    per_group = []
    for group in groups:
        ids = {int(i) for unit in group.units for i in np.asarray(unit).ravel()}
        read = {patches[key] for key, (*_, feature_ids) in consumers.items() if ids.intersection(feature_ids.tolist())}
        per_group.append(_gram_bytes(grams, read & grams.deferred))
    every = _gram_bytes(grams, patches.values())
    assert grams.peak_bytes <= shallow + max(per_group) < every / 4
    assert grams.live_bytes == 0  # each Gram dropped after the last group that reads it


def test_allocation_refit_equals_the_refit_from_grams_held_at_once(monkeypatch):
    """The allocation's sensitivity points with --reconstruct are the same, bit for bit, whether the refit's Grams
    are all summed during the capture or deferred and built group by group; the deferred ones are released when
    the points move on to another group's consumers."""
    config = PruneConfig(structured=True, sparsity=0.3, calibration_data="calib.npz", reconstruct=True)
    feeds, fit = _feeds((2,), seed=1), _feeds((3, 2), seed=2)
    monkeypatch.setattr(probe_refit, "ConsumerGrams", functools.partial(ConsumerGrams, defer=False))
    whole, _ = measure_masked(_model(), feeds, config, around(0.3), fit_feeds=fit)
    _Recorded.made = []
    monkeypatch.setattr(probe_refit, "ConsumerGrams", _Recorded)
    bounded, _ = measure_masked(_model(), feeds, config, around(0.3), fit_feeds=fit)
    points = [[(p["channels_removed"], p["rel_l2"]) for p in g["points"]] for g in whole["groups"]]
    assert points == [[(p["channels_removed"], p["rel_l2"]) for p in g["points"]] for g in bounded["groups"]]
    assert len(points) > 10
    grams = _Recorded.made[0]
    every = _gram_bytes(grams, grams.node)  # every patch (the consumers are forgotten after their last group)
    assert grams.deferred and grams.peak_bytes < every / 4
    assert not grams.patch and grams.live_bytes == 0  # each Gram dropped after the last group that refits with it


def test_capture_chunks_are_read_from_the_module_budget(monkeypatch):
    """The capture budget lives in consumer_grams (scoring re-exports it for callers that read it)."""
    model = _model()
    analysis = analyse(model)
    names = {node.input[0] for node, *_ in scoring.refit_consumers(analysis).values()}
    assert len(consumer_grams._capture_chunks(model, names, analysis.shapes, _feeds())) == 1
    monkeypatch.setattr(consumer_grams, "CAPTURE_BYTES", 1)
    assert len(consumer_grams._capture_chunks(model, names, analysis.shapes, _feeds())) == len(names)


def _counting_sessions(monkeypatch) -> list[weakref.ref]:
    """Record every capture session built (weak references: whether it is still alive)."""
    built: list[weakref.ref] = []
    original = ActivationStream._session

    def counted(self, *args, **kwargs):
        session = original(self, *args, **kwargs)
        built.append((weakref.ref(session), sum(ref() is not None for ref, _ in built)))
        return session

    monkeypatch.setattr(ActivationStream, "_session", counted)
    return built


def test_low_memory_capture_builds_one_session_at_a_time_and_gives_the_same_grams(monkeypatch):
    """With the heap bounded (``--low-memory``) the capture runs in chunks of the smaller budget, builds each chunk's
    session for one run and drops it before the next is built; its Grams equal the default capture's bit for bit."""
    model = _model()
    analysis = analyse(model)
    consumers = scoring.refit_consumers(analysis)
    feeds = _feeds()
    built = _counting_sessions(monkeypatch)
    kept = ConsumerGrams(model, consumers, feeds, 1e-3, shapes=analysis.shapes)
    assert len(built) == 1  # default: one run per feed, its session reused
    monkeypatch.setattr(consumer_grams, "heap_bounded", lambda: True)
    monkeypatch.setattr(consumer_grams, "LOW_MEMORY_CAPTURE_BYTES", 60_000)
    names = {node.input[0] for node, *_ in consumers.values()}
    chunks = consumer_grams._capture_chunks(model, names, analysis.shapes, feeds, 60_000)
    assert 3 < len(chunks) < len(names)
    built.clear()
    low = ConsumerGrams(model, consumers, feeds, 1e-3, shapes=analysis.shapes)
    assert len(built) == len(chunks) * len(feeds)  # built for every run ...
    assert all(alive == 0 for _, alive in built)  # ... and gone before the next one is built
    assert low.deferred == kept.deferred and list(low) == list(kept) and len(kept) > 15
    for key in kept:
        np.testing.assert_array_equal(low[key], kept[key])


def test_allocation_refit_captures_in_chunks(monkeypatch):
    """The allocation's refit sizes its capture runs by the analysis shapes like the selection (not one run over
    every consumer input), with the same Grams bit for bit."""
    model = _model()
    analysis = analyse(model)
    fit = _feeds((3, 2), seed=2)
    monkeypatch.setattr(consumer_grams, "CAPTURE_BYTES", 60_000)
    built = _counting_sessions(monkeypatch)
    refit = probe.Refit(analysis, fit)
    names = {node.input[0] for node, *_ in refit.consumers.values()}
    assert len(built) == len(consumer_grams._capture_chunks(model, names, analysis.shapes, fit)) > 3
    whole = ConsumerGrams(model, refit.consumers, fit, 1e-3)  # no shapes: one run per feed
    assert list(refit.grams) == list(whole) and len(whole) > 15
    for key in whole:
        np.testing.assert_array_equal(refit.grams[key], whole[key])


def test_wide_consumers_refit_from_one_factor_per_group_as_the_direct_solve(monkeypatch):
    """A wide consumer's points solve from one in-place Cholesky factor of its permuted Gram per group (each point's
    kept features a leading block): the points equal the direct LU solves' up to rounding, the same under a bounded
    heap (``--low-memory``) bit for bit."""
    config = PruneConfig(structured=True, sparsity=0.3, calibration_data="calib.npz", reconstruct=True)
    feeds, fit = _feeds((2,), seed=1), _feeds((3, 2), seed=2)
    direct, _ = measure_masked(_model(), feeds, config, around(0.3), fit_feeds=fit)
    factored = []
    original = probe_refit.Refit._factor

    def counted(self, key, kept, matrix):
        found = original(self, key, kept, matrix)
        factored.append(found is not None)
        return found

    monkeypatch.setattr(probe_refit, "WIDE_FEATURES", 100)  # every 3×3 conv of the fixture from 144 features
    monkeypatch.setattr(probe_refit.Refit, "_factor", counted)
    wide, _ = measure_masked(_model(), feeds, config, around(0.3), fit_feeds=fit)
    assert sum(factored) > 20  # the factored path ran
    points = [[p["rel_l2"] for p in g["points"]] for g in wide["groups"]]
    assert [[p["channels_removed"] for p in g["points"]] for g in wide["groups"]] == \
        [[p["channels_removed"] for p in g["points"]] for g in direct["groups"]]
    np.testing.assert_allclose([r for row in points for r in row], [p["rel_l2"] for g in direct["groups"] for p in g["points"]],
                               rtol=1e-7)
    monkeypatch.setattr(consumer_grams, "heap_bounded", lambda: True)
    monkeypatch.setattr(probe, "heap_bounded", lambda: True)
    monkeypatch.setattr(sys.modules["onnxprune.sensitivity"], "heap_bounded", lambda: True)  # the probe first, its weights read by the refit
    low, _ = measure_masked(_model(), feeds, config, around(0.3), fit_feeds=fit)
    assert [[p["rel_l2"] for p in g["points"]] for g in low["groups"]] == points


def test_refit_matrices_view_the_probe_weights():
    """With the probe's weight arrays given, the refit's consumer matrices are views of them (no second copy of the
    consumer weights), with the same values as the copies."""
    model = _model()
    analysis = analyse(model)
    fit = _feeds((2,), seed=2)
    copied = scoring.refit_consumers(analysis)
    originals = {edit.weight.name: edit.weight.array() for _, edit, _, _ in copied.values()}
    refit = probe_refit.Refit(analysis, fit, originals=originals)
    assert refit.consumers.keys() == copied.keys() and len(copied) > 15
    for key, (_, edit, matrix, _) in refit.consumers.items():
        assert np.shares_memory(matrix, originals[edit.weight.name])
        np.testing.assert_array_equal(matrix, copied[key][2])


def test_lazy_consumer_matrices_read_the_weights_when_used_and_equal_the_copies(monkeypatch):
    """The selection's consumer matrices (``lazy``) hold no copy of their weights: each is read when used, with the
    copies' shape, dtype, bytes and values; a deferred or captured wide Gram summed with the wide flush (bounded rows,
    column blocks of the product) is the same bit for bit both ways."""
    model = _model()
    analysis = analyse(model)
    copied = scoring.refit_consumers(analysis)
    lazy = scoring.refit_consumers(analysis, lazy=True)
    assert lazy.keys() == copied.keys() and len(copied) > 15
    forms = set()
    for key, (_, _, matrix, feature_ids) in lazy.items():
        assert isinstance(matrix, scoring._LazyMatrix) and not hasattr(matrix, "values")
        forms.add(matrix.form)
        expected = copied[key][2]
        assert (matrix.shape, matrix.dtype, matrix.nbytes) == (expected.shape, expected.dtype, expected.nbytes)
        np.testing.assert_array_equal(np.asarray(matrix), expected)
        np.testing.assert_array_equal(np.array(matrix, dtype=np.float64, order="C"), expected.astype(np.float64))
        np.testing.assert_array_equal(feature_ids, copied[key][3])
    assert forms >= {"conv", "transposed"}  # the 3×3/1×1 convs and the classifier Gemm (transB)
    from onnxprune import gram

    monkeypatch.setattr(gram, "FLUSH_ROWS", 300)  # the 3×3 convs of 576+ features flush wide, by column blocks
    monkeypatch.setattr(gram, "PRODUCT_COLUMNS", 100)
    whole = ConsumerGrams(model, lazy, _feeds(), 1e-3, shapes=analysis.shapes, defer=False)
    bounded = ConsumerGrams(model, lazy, _feeds(), 1e-3, shapes=analysis.shapes)
    assert bounded.deferred
    for key in whole:
        np.testing.assert_array_equal(bounded[key], whole[key])


def test_cholesky_in_place_and_leading_solves_match_numpy():
    """The blocked in-place factor equals numpy's Cholesky up to rounding (upper triangle zeroed), and each leading
    block's least-squares refit from it equals the direct solve of that block's normal equations."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((700, 300))
    gram = x.T @ x + 1e-3 * np.eye(300)
    weights = rng.standard_normal((300, 7))
    lower = spd_solve.cholesky_in_place(gram.copy(), block=64)
    np.testing.assert_allclose(lower, np.linalg.cholesky(gram), rtol=1e-10, atol=1e-10)
    assert not np.triu(lower, 1).any()
    c = lower.T @ weights
    for k in (300, 211, 64, 5):
        expected = np.linalg.solve(gram[:k, :k], (gram @ weights)[:k])
        np.testing.assert_allclose(spd_solve.solve_leading(lower, c, k, block=64), expected, rtol=1e-9, atol=1e-9)
    with pytest.raises(np.linalg.LinAlgError):
        spd_solve.cholesky_in_place(-np.eye(4), block=2)


def test_permuted_gram_of_a_deferred_patch_is_summed_in_that_order():
    """``permuted`` gives ``gram[order][:, order]``: summed from the kept inputs with its columns permuted for a
    deferred Gram not held (equal up to rounding, the unpermuted Gram never built), indexed from a held one."""
    model = _model()
    analysis = analyse(model)
    consumers = scoring.refit_consumers(analysis)
    grams = ConsumerGrams(model, consumers, _feeds(), 1e-3, shapes=analysis.shapes)
    deferred = [key for key in grams if grams.patch[key] in grams.deferred]
    held = [key for key in grams if grams.patch[key] not in grams.deferred]
    assert deferred and held
    rng = np.random.default_rng(0)
    for key in deferred[:3] + held[:3]:
        order = rng.permutation(grams.patch[key][1])
        before = grams.live_bytes
        permuted = grams.permuted(key, order)
        assert grams.live_bytes == before  # nothing held for it
        full = grams[key]
        if key in held:
            np.testing.assert_array_equal(permuted, full[np.ix_(order, order)])
        else:
            np.testing.assert_allclose(permuted, full[np.ix_(order, order)], rtol=1e-9, atol=1e-9 * np.abs(full).max())
            grams.release([key])
def test_threaded_selection_gives_the_sequential_scores():
    """Ordering the groups on two threads (the default mode) gives every group's scores bit for bit as one thread
    does, and every Gram is dropped once the groups that read it hold their inverses."""
    model = _model()
    analysis = analyse(model)
    groups = build_groups(analysis)
    feeds = _feeds()
    sequential = scoring.reconstruction_scores(analysis, groups, feeds, stop=0.6, threads=1)
    _Recorded.made = []
    original = scoring.ConsumerGrams
    scoring.ConsumerGrams = _Recorded
    try:
        threaded = scoring.reconstruction_scores(analysis, groups, feeds, stop=0.6, threads=2)
    finally:
        scoring.ConsumerGrams = original
    assert list(threaded) == list(sequential) == [g.id for g in groups] and len(groups) > 10
    for gid, scores in sequential.items():
        np.testing.assert_array_equal(threaded[gid], scores)
    assert len(_Recorded.made) == 1 and _Recorded.made[0].live_bytes == 0 and not _Recorded.made[0].inputs


def test_grams_with_their_products_on_the_pool_equal_the_plain_ones():
    """With the product pool, the deferred Grams built on the thread that made the object (their products on the
    pool) equal those without it, bit for bit, as do the Grams summed during the capture (no narrow product left in flight there); a
    deferred Gram built on another thread does not use the pool."""
    from onnxprune.gram import product_pool

    model = _model()
    analysis = analyse(model)
    consumers = scoring.refit_consumers(analysis)
    plain = ConsumerGrams(model, consumers, _feeds(), 1e-3, shapes=analysis.shapes)
    pooled = ConsumerGrams(model, consumers, _feeds(), 1e-3, shapes=analysis.shapes, pool=product_pool())
    assert pooled.deferred == plain.deferred and len(plain.deferred) >= 10
    for key in plain:
        np.testing.assert_array_equal(pooled[key], plain[key])
    used = []
    sums = consumer_grams.GramSum

    class Recording(sums):
        def __init__(self, *args, pool=None, **kwargs):
            used.append(pool)
            super().__init__(*args, pool=pool, **kwargs)

    deferred = next(k for k in plain if plain.patch[k] in plain.deferred)
    pooled.release(list(pooled))
    try:
        consumer_grams.GramSum = Recording
        with ThreadPoolExecutor(1) as other:
            np.testing.assert_array_equal(other.submit(pooled.__getitem__, deferred).result(), plain[deferred])
        pooled.release(list(pooled))
        np.testing.assert_array_equal(pooled[deferred], plain[deferred])
    finally:
        consumer_grams.GramSum = sums
    assert used == [None, pooled.pool]


def _selection_setup(monkeypatch) -> tuple:
    """The test model's analysis, groups, feeds, default-mode scores, refit consumers and their readers, with its 3×3
    convs (576 features) counting as wide."""
    analysis = analyse(_model())
    groups = build_groups(analysis)
    feeds = _feeds()
    monkeypatch.setattr(scoring, "WIDE_FEATURES", 512)
    plain = scoring.reconstruction_scores(analysis, groups, feeds, stop=0.6)
    consumers = scoring.refit_consumers(analysis)
    return analysis, groups, feeds, plain, consumers, scoring._readers(groups, consumers)


def test_low_memory_selection_runs_in_windows_with_the_same_scores(monkeypatch):
    """With the heap bounded the groups are scored in windows of consecutive groups, each window's consumers
    captured (from the frontier an earlier capture kept, where it fits the budget), selected and released before the
    next window's capture; the scores equal the default mode's bit for bit, and each window's held bytes stay within
    its budget unless one group alone is over it."""
    analysis, groups, feeds, plain, consumers, readers = _selection_setup(monkeypatch)
    monkeypatch.setattr(scoring, "heap_bounded", lambda: True)
    monkeypatch.setattr(selection_windows, "WINDOW_SHARE", 0.1)
    windows = selection_windows.consumer_windows(analysis, groups, consumers, readers, feeds)
    assert len(windows) > 3 and [n for w in windows for n in w] == list(range(len(groups)))
    _Recorded.made = []
    starts = []  # the tensors each window's capture starts from

    kept = []  # the frontier each window's capture keeps for the next

    def recorded(model, consumers, sources, *args, **kwargs):
        starts.append(set(sources[0]))
        kept.append(kwargs.get("frontier"))
        assert kwargs.get("pool") is not None  # one thread orders the groups: Gram products on the product pool
        return _Recorded(model, consumers, sources, *args, **kwargs)

    monkeypatch.setattr(scoring, "ConsumerGrams", recorded)
    overwritten = []
    plain_inverse = scoring.spd_inverse

    def inverse(gram, overwrite=False, pool=None):
        overwritten.append(overwrite and gram.shape[0] >= scoring.WIDE_FEATURES)
        assert pool is not None or gram.shape[0] < scoring.WIDE_FEATURES  # wide inverses use the other core too
        return plain_inverse(gram, overwrite, pool)

    monkeypatch.setattr(scoring, "spd_inverse", inverse)
    windowed = scoring.reconstruction_scores(analysis, groups, feeds, stop=0.6)
    assert any(overwritten)  # a wide deferred Gram at its last reader: inverted in place, the same scores
    assert list(windowed) == list(plain)
    assert starts[0] == {"input"} and any(len(names) > 1 for names in starts[1:])  # later ones from a frontier
    # each kept frontier is the narrowest cut after the window's consumer inputs, not the one just before the next
    # window's first input: never wider, narrower somewhere
    source = selection_windows.CaptureSource(analysis.model, feeds, 1 << 40, analysis.shapes)
    inputs = [{consumers[key][0].input[0] for key, numbers in readers.items() if set(numbers) & set(window)}
              for window in windows]
    latest = [source.frontier(set().union(*inputs[i + 1:])) for i in range(len(windows) - 1)]
    pairs = [(source.bytes(k), source.bytes(last)) for k, last in zip(kept, latest) if k and last]
    assert pairs and all(a <= b for a, b in pairs) and any(a < b for a, b in pairs)
    for gid, scores in plain.items():
        np.testing.assert_array_equal(windowed[gid], scores)
    made = iter(_Recorded.made)
    budget = 0.1 * sum(matrix.nbytes for _, _, matrix, _ in consumers.values())
    for window in windows:
        keys = {key for key, numbers in readers.items() if set(numbers) & set(window)}
        if not keys:
            continue
        grams = next(made)
        assert set(grams.node) == {scoring._patch_key(consumers[k][0], consumers[k][2].shape[0]) for k in keys}
        held = sum(8 * p[1] ** 2 for p in set(grams.node) - grams.deferred) + \
            sum(x.nbytes for kept in grams.inputs.values() for x in kept)
        assert held <= budget or len(window) == 1
        assert grams.live_bytes == 0 and not grams.inputs  # released before the next window
    assert next(made, None) is None


def test_low_memory_selection_orders_narrow_groups_two_at_a_time(monkeypatch):
    """With the heap bounded, consecutive narrow groups (every consumer below ``WIDE_FEATURES`` features) are ordered
    two at a time, one on a second thread, the wide ones alone on the caller's thread; the scores equal the default
    mode's bit for bit."""
    import threading

    analysis, groups, feeds, plain, consumers, readers = _selection_setup(monkeypatch)
    widest = {g.id: scoring._widest(consumers, readers, n) for n, g in enumerate(groups)}
    assert min(widest.values()) < 512 <= max(widest.values())
    monkeypatch.setattr(scoring, "heap_bounded", lambda: True)
    where: dict[int, str] = {}
    real = scoring._greedy_order

    def recorded(group, *args, **kwargs):
        where[group.id] = threading.current_thread().name
        return real(group, *args, **kwargs)

    monkeypatch.setattr(scoring, "_greedy_order", recorded)
    bounded = scoring.reconstruction_scores(analysis, groups, feeds, stop=0.6)
    assert all(where[gid] == threading.current_thread().name for gid, width in widest.items()
               if width >= 512 and gid in where)
    assert any(name.startswith("onnxprune-narrow") for name in where.values())
    assert list(bounded) == list(plain)
    for gid, scores in plain.items():
        np.testing.assert_array_equal(bounded[gid], scores)


def test_in_place_inverse_equals_the_plain_one():
    """``spd_inverse(overwrite=True)`` writes the factor and the inverse over the Gram, bit for bit the plain inverse;
    a Gram that is not positive definite raises ``_Overwritten`` (a ``LinAlgError``)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((scoring.WIDE_FEATURES + 300, scoring.WIDE_FEATURES + 40))
    gram = x.T @ x
    plain = scoring.spd_inverse(gram)
    work = gram.copy()
    inverse = scoring.spd_inverse(work, overwrite=True)
    assert inverse is work
    np.testing.assert_array_equal(inverse, plain)
    work = -gram
    with pytest.raises(scoring._Overwritten):
        scoring.spd_inverse(work, overwrite=True)
    assert issubclass(scoring._Overwritten, np.linalg.LinAlgError)
