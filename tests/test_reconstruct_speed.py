"""The fast paths of structured --reconstruct compute what the plain algorithms compute.

- greedy selection (batched OBS block costs, compacted inverse-Gram downdates) against a brute-force greedy that
  refits every candidate subset from scratch;
- buffered Gram sums against XᵀX / XᵀY of the stacked rows;
- the refit in waves (one run of each model per wave and feed, refitted weights fed as session inputs) against a
  layer-by-layer refit that builds a fresh session of the pruned model for every layer.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune import gram as gram_module
from onnxprune.activation_stream import ActivationStream
from onnxprune.analysis.groups import analyse, build_groups
from onnxprune.config import PruneConfig
from onnxprune.gram import GramSum, _im2col, _reconstructable
from onnxprune.graph import GraphIndex
from onnxprune.passes.structured import _reconstruction_layers, allocate_safe, prepare_for_analysis, remove
from onnxprune.refit import _waves, _write_solution, reconstruct
from onnxprune.scoring import _greedy_order, unit_scores
from onnxprune.sessions import session_with_outputs

from .conftest import FIXTURES


def _objective(H: np.ndarray, W: np.ndarray, alive: np.ndarray) -> float:
    """min over V (zero outside ``alive``) of tr((W - V)ᵀ H (W - V)): the output error after the best refit."""
    s = np.flatnonzero(alive)
    V = np.zeros_like(W)
    if s.size:
        V[s] = np.linalg.solve(H[np.ix_(s, s)], H[s] @ W)
    return float(np.sum((W - V) * (H @ (W - V))))


def _brute_force_order(states: list[tuple[np.ndarray, np.ndarray, np.ndarray]], n: int) -> list[int]:
    alive_units = list(range(n))
    order = []
    masks = [np.ones(len(units), dtype=bool) for _, _, units in states]
    while alive_units:
        costs = {u: sum(_objective(H, W, m & (units != u)) for (H, W, units), m in zip(states, masks))
                 for u in alive_units}
        best = min(alive_units, key=costs.__getitem__)
        order.append(best)
        alive_units.remove(best)
        masks = [m & (units != best) for (_, _, units), m in zip(states, masks)]
    return order


@pytest.mark.parametrize("block", [1, 3])
def test_greedy_selection_matches_brute_force(block):
    """Two consumers share a group of 7 units (blocks of ``block`` features, as a k×k Conv has); the fast greedy
    removes units in the order a from-scratch refit of every candidate gives, and scores are the summed errors."""
    rng = np.random.default_rng(block)
    n = 7
    units = [np.array([i]) for i in range(n)]
    consumers, grams, states = {}, {}, []
    for key, outputs in (("a", 4), ("b", 2)):
        feature_ids = np.repeat(np.arange(n), block)
        x = rng.standard_normal((200, n * block)) @ rng.standard_normal((n * block, n * block)) * 0.3
        x[:, :block] += x[:, -block:]  # correlated features: refitting matters
        H = x.T @ x + 0.05 * np.eye(n * block)
        W = rng.standard_normal((n * block, outputs))
        consumers[key] = (None, None, W, feature_ids)
        grams[key] = H
        states.append((H, W, feature_ids))
    scores = _greedy_order(SimpleNamespace(units=units), consumers, grams)
    assert np.argsort(scores).tolist() == _brute_force_order(states, n)
    full = sum(_objective(H, W, np.zeros(len(u), dtype=bool)) for H, W, u in states)
    assert scores.max() == pytest.approx(full, rel=1e-6)  # everything removed: the whole output is the error


def _wide_group(rng, n: int, block: int, outputs: int = 6):
    """One consumer reading ``n`` units of ``block`` features each, with correlated inputs and a few units whose
    weights are nearly zero (they must go first)."""
    features = n * block
    x = rng.standard_normal((4 * features, features)) @ rng.standard_normal((features, features)) * 0.2
    H = x.T @ x + 0.05 * np.eye(features)
    W = rng.standard_normal((features, outputs))
    W[:3 * block] *= 1e-3  # units 0, 1, 2
    return SimpleNamespace(units=[np.array([i]) for i in range(n)]), {"c": (None, None, W, np.repeat(np.arange(n),
                                                                                                   block))}, {"c": H}


@pytest.mark.parametrize("n, block", [(200, 1), (150, 4)])
def test_batched_greedy_close_to_exact(n, block, monkeypatch):
    """Past SELECTION_STEPS steps several units go per step (here 2): the near-zero units still go first, and the
    set removed at the cut leaves a refit error close to the one-unit-per-step order's (each set's error computed
    from scratch)."""
    from onnxprune import scoring

    group, consumers, grams = _wide_group(np.random.default_rng(block), n, block)
    (H, W, feature_ids), = [(grams["c"], consumers["c"][2], consumers["c"][3])]
    steps = 2 * scoring.SELECTION_STEPS + 2
    narrow = _greedy_order(group, consumers, grams, steps=steps)  # narrower than BATCH_FEATURES
    monkeypatch.setattr(scoring, "BATCH_FEATURES", 100)
    batched = _greedy_order(group, consumers, grams, steps=steps)
    monkeypatch.setattr(scoring, "SELECTION_STEPS", steps)  # no more steps than the limit: one unit per step
    exact = _greedy_order(group, consumers, grams, steps=steps)
    assert np.array_equal(narrow, exact)  # a narrow consumer keeps one unit per step past SELECTION_STEPS
    assert not np.allclose(exact, batched)  # a different path was taken
    errors = []
    for scores in (exact, batched):
        assert set(np.argsort(scores)[:3].tolist()) == {0, 1, 2}
        removed = np.argsort(scores, kind="stable")[:steps - 1]
        errors.append(_objective(H, W, ~np.isin(feature_ids, removed)))
    assert errors[1] <= 1.03 * errors[0]


def test_wide_consumer_costs_and_inverse_match_the_narrow_path(monkeypatch):
    """Consumers of at least WIDE_FEATURES features cost units by k×k inverses and take the Cholesky inverse: the
    same order and scores (to rounding) as the batched solves and the LU inverse of narrower ones."""
    from onnxprune import scoring

    group, consumers, grams = _wide_group(np.random.default_rng(5), 30, 9)
    narrow = _greedy_order(group, consumers, grams)
    monkeypatch.setattr(scoring, "WIDE_FEATURES", 64)
    wide = _greedy_order(group, consumers, grams)
    np.testing.assert_allclose(wide, narrow, rtol=1e-8)
    assert np.argsort(wide).tolist() == np.argsort(narrow).tolist()
    H = grams["c"]
    np.testing.assert_allclose(scoring.spd_inverse(H), np.linalg.inv(H), rtol=1e-9, atol=1e-12 * np.abs(
        np.linalg.inv(H)).max())
    indefinite = H - 2 * np.linalg.eigvalsh(H).max() * np.eye(len(H)) * (np.arange(len(H)) == 0)
    np.testing.assert_allclose(scoring.spd_inverse(indefinite) @ indefinite, np.eye(len(H)), atol=1e-8)  # LU fallback


def _row_parts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` with the rows of ``a`` in the two parts the wide products use (:func:`~onnxprune.row_parts.rows_product`
    without a pool): the products the in-place inverse makes, out of place."""
    from onnxprune.row_parts import rows_product

    return rows_product(a, b)


def _blocked_inverse(lower: np.ndarray) -> np.ndarray:
    """L⁻¹ by halves, out of place: the reference for the in-place inverse."""
    n = lower.shape[0]
    if n <= 256:
        return np.linalg.inv(lower)
    m = n // 2
    top, bottom = _blocked_inverse(lower[:m, :m]), _blocked_inverse(lower[m:, m:])
    out = np.zeros_like(lower)
    out[:m, :m], out[m:, m:] = top, bottom
    out[m:, :m] = -_row_parts(bottom, _row_parts(lower[m:, :m], top))
    return out


def _blocked_gram(lower: np.ndarray) -> np.ndarray:
    """MᵀM of a lower-triangular M by halves, out of place: the reference for the in-place product."""
    n = lower.shape[0]
    if n <= 256:
        return lower.T @ lower
    m = n // 2
    a, b, c = lower[:m, :m], lower[m:, :m], lower[m:, m:]
    out = np.empty_like(lower)
    out[:m, :m] = _blocked_gram(a) + b.T @ b
    out[:m, m:] = _row_parts(b.T, c)
    out[m:, :m] = out[:m, m:].T
    out[m:, m:] = _blocked_gram(c)
    return out


@pytest.mark.parametrize("n", [257, 700, 1100, 2100])
def test_cholesky_inverse_in_place_equals_the_blocked_products(monkeypatch, n):
    """The wide consumers' inverse, computed in place over the blocked Cholesky factor, is bit for bit the
    out-of-place blocked inverse and product (and the inverse to rounding); the factor is LAPACK's to rounding, and
    written over the Gram (``overwrite``) it is the same bit for bit, the Gram's array returned."""
    from onnxprune import scoring
    from onnxprune.spd_solve import cholesky_in_place

    monkeypatch.setattr(scoring, "WIDE_FEATURES", 256)
    x = np.random.default_rng(n).standard_normal((n + 40, n)).astype(np.float32)
    H = x.T.astype(np.float64) @ x
    H[np.diag_indices_from(H)] += 1e-3 * np.trace(H) / n
    factor = cholesky_in_place(H.copy())
    np.testing.assert_allclose(factor, np.linalg.cholesky(H), rtol=1e-9, atol=1e-9 * np.abs(factor).max())
    expected = _blocked_gram(_blocked_inverse(factor))
    got = scoring.spd_inverse(H)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(got @ H, np.eye(n), atol=1e-6)
    overwritten = H.copy()
    in_place = scoring.spd_inverse(overwritten, overwrite=True)
    assert in_place is overwritten
    np.testing.assert_array_equal(in_place, expected)
    # with the product pool (the factor's strips, the halves of the inverse and of the product on its threads)
    pool = _CountingPool()
    np.testing.assert_array_equal(cholesky_in_place(H.copy(), pool=pool), factor)
    np.testing.assert_array_equal(scoring.spd_inverse(H, pool=pool), expected)
    overwritten = H.copy()
    assert scoring.spd_inverse(overwritten, overwrite=True, pool=pool) is overwritten
    np.testing.assert_array_equal(overwritten, expected)
    assert pool.calls >= 4 and all(name.startswith("onnxprune-gram") for name in pool.threads)


def test_wide_greedy_order_splits_its_products_with_the_pool():
    """A consumer of SPLIT_FEATURES features or more computes each step's columns, refit and costs in two parts:
    ordered with the product pool (one part on its threads) the scores are those of the order without it, bit for
    bit, and equal to rounding the order computed in one piece."""
    from onnxprune import scoring

    group, consumers, grams = _wide_group(np.random.default_rng(11), 128, 9, outputs=40)  # 1,152 features
    assert grams["c"].shape[0] >= scoring.SPLIT_FEATURES
    alone = _greedy_order(group, consumers, grams, steps=80)
    pool = _CountingPool()
    pooled = _greedy_order(group, consumers, grams, steps=80, pool=pool)
    np.testing.assert_array_equal(pooled, alone)
    assert pool.calls >= 2 * 80  # each step's columns and refit (and the costs of 64 units or more)
    assert all(name.startswith("onnxprune-gram") for name in pool.threads)
    with pytest.MonkeyPatch.context() as patch:  # in one piece: the same to rounding
        patch.setattr(scoring, "SPLIT_FEATURES", 1 << 20)
        one_piece = _greedy_order(group, consumers, grams, steps=80)
    np.testing.assert_allclose(one_piece, alone, rtol=1e-9)
    assert np.argsort(one_piece, kind="stable")[:40].tolist() == np.argsort(alone, kind="stable")[:40].tolist()


def test_gram_sum_matches_stacked_rows():
    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((rows, 40)).astype(np.float32) for rows in (3, 17, 50, 1, 90)]
    targets = [rng.standard_normal((b.shape[0], 5)).astype(np.float32) for b in blocks]
    total = GramSum()
    for b, t in zip(blocks, targets):
        total.add(b, t)
    gram, cross = total.result()
    x, y = np.concatenate(blocks).astype(np.float64), np.concatenate(targets).astype(np.float64)
    np.testing.assert_allclose(gram, x.T @ x, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(cross, x.T @ y, rtol=1e-5, atol=1e-4)


def test_wide_gram_sums_flush_bounded_rows_and_add_the_product_by_column_blocks(monkeypatch):
    """A Gram wider than FLUSH_ROWS flushes every FLUSH_ROWS rows and adds its product PRODUCT_COLUMNS columns at a
    time (no D×D float32 product): the same sums as the stacked rows, to float32 rounding, and as the one-block
    product of the same flushes, to rounding."""
    from onnxprune import gram as gram_module

    rng = np.random.default_rng(3)
    blocks = [rng.standard_normal((rows, 90)).astype(np.float32) + 2.0 for rows in (40, 70, 10, 100, 33)]
    def sums(columns: int) -> np.ndarray:
        monkeypatch.setattr(gram_module, "PRODUCT_COLUMNS", columns)
        total = GramSum()
        for b in blocks:
            total.add(b)
        return total.result()[0]

    monkeypatch.setattr(gram_module, "FLUSH_ROWS", 64)
    blocked = sums(32)
    whole = sums(90)
    x = np.concatenate(blocks).astype(np.float64)
    np.testing.assert_allclose(blocked, x.T @ x, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(blocked, whole, rtol=1e-12, atol=1e-9)


class _CountingPool:
    """The product pool, counting the products handed to it and the threads that ran them."""

    def __init__(self):
        from onnxprune.gram import product_pool

        self.pool, self.threads, self.calls = product_pool(), set(), 0

    def _record(self, fn):
        def run(*args):
            import threading

            self.threads.add(threading.current_thread().name)
            return fn(*args)
        return run

    def submit(self, fn, *args):
        self.calls += 1
        return self.pool.submit(self._record(fn), *args)

    def map(self, fn, items):
        items = list(items)
        self.calls += len(items)
        return self.pool.map(self._record(fn), items)


@pytest.mark.parametrize("features", [40, 90])
def test_gram_products_on_the_pool_give_the_same_sums(monkeypatch, features):
    """Products run on the product pool (a narrow flush's while the caller makes the next rows, a wide flush's
    column blocks at once) give the sums of the products run in place, bit for bit, XᵀY too."""
    from onnxprune import gram as gram_module

    monkeypatch.setattr(gram_module, "FLUSH_ROWS", 64)  # 90 features: wide, 40: narrow
    monkeypatch.setattr(gram_module, "PRODUCT_COLUMNS", 32)
    rng = np.random.default_rng(5)
    blocks = [rng.standard_normal((rows, features)).astype(np.float32) + 1.5 for rows in (30, 45, 70, 5, 66, 12, 90)]
    targets = [rng.standard_normal((b.shape[0], 6)).astype(np.float32) for b in blocks]
    pool = _CountingPool()
    plain, pooled = GramSum(), GramSum(pool=pool)
    for b, t in zip(blocks, targets):
        plain.add(b, t)
        pooled.add(b, t)
    (gram, cross), (pooled_gram, pooled_cross) = plain.result(), pooled.result()
    np.testing.assert_array_equal(pooled_gram, gram)
    np.testing.assert_array_equal(pooled_cross, cross)
    assert pool.calls >= 4 and all(name.startswith("onnxprune-gram") for name in pool.threads)
    assert not pooled.flights
    waiting = _CountingPool()  # nothing left in flight: narrow products in place, wide blocks still on the pool
    inline = GramSum(pool=waiting, in_flight=0)
    for b, t in zip(blocks, targets):
        inline.add(b, t)
        assert not inline.flights
    inline_gram, inline_cross = inline.result()
    np.testing.assert_array_equal(inline_gram, gram)
    np.testing.assert_array_equal(inline_cross, cross)
    assert (waiting.calls > 0) == (features > gram_module.FLUSH_ROWS)
    x = np.concatenate(blocks).astype(np.float64)
    np.testing.assert_allclose(pooled_gram, x.T @ x, rtol=1e-5, atol=1e-3)


def test_downdate_factor_gives_the_downdate_term():
    """A wide consumer's downdate is held as z with z zᵀ = column · block⁻¹ · columnᵀ (Cholesky of the block); a
    block rounding left indefinite keeps its positive part."""
    from onnxprune.scoring import _downdate_factor

    rng = np.random.default_rng(4)
    a = rng.standard_normal((30, 30))
    P = a @ a.T + 30 * np.eye(30)
    q = np.array([3, 7, 8])
    column, block = P[:, q], P[np.ix_(q, q)]
    z = _downdate_factor(column, block)
    np.testing.assert_allclose(z @ z.T, column @ np.linalg.inv(block) @ column.T, rtol=1e-10, atol=1e-10)
    vectors = np.linalg.eigh(block)[1]
    indefinite = vectors @ np.diag([-1.0, 2.0, 5.0]) @ vectors.T
    z = _downdate_factor(column, indefinite)
    positive = vectors[:, 1:] @ np.diag([0.5, 0.2]) @ vectors[:, 1:].T
    np.testing.assert_allclose(z @ z.T, column @ positive @ column.T, rtol=1e-8, atol=1e-8)


def test_buffered_blocks_centred_in_place_give_the_same_sums():
    """Small blocks buffered until they hold as many rows as features (concatenated, then centred in place) give
    the sums of the same rows added as whole blocks (centred into a copy), bit for bit; the blocks are unchanged."""
    rng = np.random.default_rng(3)
    blocks = [rng.standard_normal((rows, 40)).astype(np.float32) + 2 for rows in (7, 11, 30, 45, 5, 9, 40)]
    copies = [b.copy() for b in blocks]
    buffered, whole = GramSum(), GramSum()
    for b in blocks:
        buffered.add(b)
    for stacked in (np.concatenate(blocks[:3]), blocks[3], np.concatenate(blocks[4:])):  # the same flushes
        whole.add(stacked)
    np.testing.assert_array_equal(buffered.result()[0], whole.result()[0])
    for b, c in zip(blocks, copies):
        np.testing.assert_array_equal(b, c)


def _layer_by_layer(original, pruned, layers, feeds, ridge=1e-3):
    """Each layer solved on the pruned model's own inputs (a fresh session after every refit), in float64."""
    reference = session_with_outputs(original, [name for name, _ in layers])
    nodes = {out: node for node in pruned.graph.node for out in node.output}
    for name, out_mask in layers:
        node = nodes[name]
        if not _reconstructable(node):
            continue
        index = GraphIndex.build(pruned.graph)
        weight, _ = index.resolve(node.input[1])
        current = session_with_outputs(pruned, [node.input[0]])
        rows, targets = [], []
        for feed in feeds:
            x = current.run([node.input[0]], feed)[0].astype(np.float64)
            y = reference.run([name], feed)[0].astype(np.float64)
            if node.op_type == "Conv":
                rows.append(_im2col(x, node, weight.shape[2:4]))
                targets.append(np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])[:, out_mask])
            else:
                rows.append(x.reshape(-1, x.shape[-1]))
                targets.append(y.reshape(-1, y.shape[-1])[:, out_mask])
        a, t = np.concatenate(rows), np.concatenate(targets)
        if node.op_type != "MatMul":
            a = np.hstack([a, np.ones((a.shape[0], 1))])
        gram = a.T @ a
        lam = ridge * np.trace(gram) / gram.shape[0] + 1e-12
        _write_solution(pruned, index, node, weight, np.linalg.solve(gram + lam * np.eye(len(gram)), a.T @ t))


def test_wave_refit_equals_layer_by_layer(monkeypatch):
    """With every row in the Gram (no row sampling), the refit in waves (shifted float32 products summed in float64)
    gives the weights of a float64 layer-by-layer refit: equal to a small fraction of each weight's scale (float32
    rounding compounds over 20 layers), and model outputs whose difference is under 1 % of the repair's own error."""
    monkeypatch.setattr(gram_module, "GRAM_MIN_ROWS", 1 << 40)
    model = onnx.load(str(FIXTURES / "arch" / "resnet18.onnx"))
    prepare_for_analysis(model)
    analysis = analyse(model)
    groups = build_groups(analysis)
    keep = allocate_safe(analysis, groups, unit_scores(analysis, groups, "l1"),
                         PruneConfig(structured=True, sparsity=0.4))
    original = onnx.ModelProto()
    original.CopyFrom(model)
    layers = _reconstruction_layers(analysis, keep)
    remove(analysis, keep)
    rng = np.random.default_rng(3)
    feeds = [{"input": rng.standard_normal((8, 3, 64, 64)).astype(np.float32)} for _ in range(3)]
    slow, fast = onnx.ModelProto(), onnx.ModelProto()
    slow.CopyFrom(model)
    fast.CopyFrom(model)
    _layer_by_layer(original, slow, layers, feeds)

    runs = []
    real_run = ort.InferenceSession.run

    def counting_run(self, *args, **kwargs):
        runs.append(1)
        return real_run(self, *args, **kwargs)
    monkeypatch.setattr(ort.InferenceSession, "run", counting_run)
    summary = reconstruct(original, fast, layers, feeds)
    monkeypatch.setattr(ort.InferenceSession, "run", real_run)

    assert summary["layers"] == len(layers) > 10 and not summary["skipped"]
    plan = [SimpleNamespace(node=n) for n in fast.graph.node if any(n.output[0] == name for name, _ in layers)]
    waves = _waves(fast, plan)
    assert len(waves) < len(layers)  # a stage's first conv and its downsample read one tensor: one wave
    # at most one run of each model per wave and feed, and one of the pruned model past the wave's refitted layers
    assert len(runs) <= 3 * len(waves) * len(feeds)
    slow_w = {i.name: onnx.numpy_helper.to_array(i) for i in slow.graph.initializer}
    fast_w = {i.name: onnx.numpy_helper.to_array(i) for i in fast.graph.initializer}
    assert slow_w.keys() == fast_w.keys()
    for name, value in slow_w.items():
        np.testing.assert_allclose(fast_w[name], value, rtol=1e-2, atol=2e-3 * max(1.0, np.abs(value).max()))
    onnx.checker.check_model(fast, full_check=True)
    out = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
           for m in (original, slow, fast)]
    assert np.abs(out[2] - out[1]).max() < 0.01 * np.abs(out[1] - out[0]).max()


class _Recording(ActivationStream):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.computed: list[int] = []

    def _segment(self, names, available):
        segment = super()._segment(names, available)
        self.computed.extend(id(node) for node in segment)
        return segment


@pytest.mark.parametrize("budget", [1 << 30, 0])
def test_activation_stream_runs_each_node_once(budget):
    """Capturing every conv input of ResNet-18 step by step gives the values of one full run; with room to keep
    tensors between steps every node runs once per feed, without room (budget 0) steps recompute and agree."""
    model = onnx.load(str(FIXTURES / "arch" / "resnet18.onnx"))
    rng = np.random.default_rng(4)
    feeds = [{"input": rng.standard_normal((n, 3, 64, 64)).astype(np.float32)} for n in (4, 3)]
    steps = [[node.input[0]] for node in model.graph.node if node.op_type == "Conv"]
    full = session_with_outputs(model, sorted({s[0] for s in steps}))
    stream = _Recording(model, feeds, budget)
    for names in steps:
        for feed, got in zip(feeds, stream.run(names)):
            np.testing.assert_array_equal(got[names[0]], full.run(names, feed)[0])
    if budget:
        assert len(stream.computed) == len(set(stream.computed))  # no node ran twice
    else:
        assert len(stream.computed) > len(set(stream.computed))


def test_capture_by_feed_runs_each_node_once_per_feed():
    """Capturing ResNet-18's conv inputs chunk by chunk, feed after feed, gives the values of one full run; each
    chunk's session is built once, each node runs once per feed, and between chunks only the current feed's tensors
    that later chunks read are kept (never another feed's)."""
    model = onnx.load(str(FIXTURES / "arch" / "resnet18.onnx"))
    rng = np.random.default_rng(5)
    feeds = [{"input": rng.standard_normal((n, 3, 64, 64)).astype(np.float32)} for n in (4, 3, 2)]
    names = [node.input[0] for node in model.graph.node if node.op_type == "Conv"]
    chunks = [names[i:i + 3] for i in range(0, len(names), 3)]
    full = session_with_outputs(model, sorted(set(names)))
    stream = _Recording(model, feeds)
    built = []
    original = stream._session
    stream._session = lambda *args, **kwargs: built.append(1) or original(*args, **kwargs)
    seen = []
    for i, got in stream.by_feed(chunks):
        feed = feeds[len(seen) // len(chunks)]
        seen.append(i)
        reference = dict(zip(chunks[i], full.run(chunks[i], feed)))
        for name in chunks[i]:
            np.testing.assert_array_equal(got[name], reference[name])
    assert seen == list(range(len(chunks))) * len(feeds) and len(chunks) > 3
    assert len(built) == len(chunks)
    assert len(stream.computed) == len(set(stream.computed))  # segments planned once: no node recomputed


@pytest.mark.parametrize("share", [0.25, 0.5, 0.75])
def test_stopped_order_removes_the_same_units(share):
    """Stopping the greedy order one unit past the share the allocation removes keeps the removed set and its order."""
    from onnxprune.calibration import load_calibration
    from onnxprune.scoring import reconstruction_scores

    trained = FIXTURES / "trained"
    model = onnx.load(str(trained / "digits_cnn.onnx"))
    analysis = analyse(model)
    groups = [g for g in build_groups(analysis) if g.units]
    feeds = load_calibration(trained / "digits_calib.npz", model)[:4]
    full = reconstruction_scores(analysis, groups, feeds)
    stopped = reconstruction_scores(analysis, groups, feeds, stop=share)
    for group in groups:
        n = int(np.floor(share * group.channels))
        assert np.argsort(stopped[group.id], kind="stable")[:n].tolist() == \
            np.argsort(full[group.id], kind="stable")[:n].tolist()
        assert not np.array_equal(stopped[group.id], full[group.id])  # the tail was not ordered


def test_sampled_patches_are_im2col_rows(monkeypatch):
    """Over the row budget, a Conv's Gram reads a seeded sample of im2col rows: exactly the full im2col rows at the
    picked positions, the same picks on every run, and the refit targets taken at the same positions."""
    from onnxprune.gram import RowSampler, _patches
    from onnxprune.refit import _refit_rows

    monkeypatch.setattr(gram_module, "GRAM_MIN_ROWS", 100)
    monkeypatch.setattr(gram_module, "GRAM_ROWS_PER_FEATURE", 2)
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 5, 11, 9)).astype(np.float32)
    full = _im2col(x, node, (3, 3))
    rows, picked = _patches(x, node, (3, 3), RowSampler(features=45, batches=2))
    assert picked is not None and len(picked) == round(full.shape[0] * 100 / (2 * full.shape[0]))
    np.testing.assert_array_equal(rows, full[picked])
    again = _patches(x, node, (3, 3), RowSampler(features=45, batches=2))[1]
    np.testing.assert_array_equal(picked, again)
    assert _patches(x, node, (3, 3), RowSampler(features=45, batches=1))[1] is not None  # 100 of 120 rows
    monkeypatch.setattr(gram_module, "GRAM_MIN_ROWS", 10_000)
    assert _patches(x, node, (3, 3), RowSampler(features=45, batches=2))[1] is None  # under the budget: all rows

    monkeypatch.setattr(gram_module, "GRAM_MIN_ROWS", 100)
    y = rng.standard_normal((4, 6, 6, 5)).astype(np.float32)
    item = SimpleNamespace(node=node, weight=SimpleNamespace(shape=(6, 5, 3, 3)), out_mask=np.ones(6, dtype=bool))
    got_rows, got_target = _refit_rows(item, x, y, RowSampler(features=45, batches=2))
    np.testing.assert_array_equal(got_rows[:, :-1], full[picked])
    np.testing.assert_array_equal(got_target, np.moveaxis(y, 1, -1).reshape(-1, 6)[picked])


def test_shifted_gram_sum_is_exact_in_float64():
    """Shifted float32 products: XᵀX and XᵀY of data with a large common offset (after a ReLU, a bias column)
    agree with float64 products far better than unshifted float32 products do."""
    rng = np.random.default_rng(6)
    blocks = [np.abs(rng.standard_normal((300, 40))).astype(np.float32) + 50 for _ in range(4)]
    targets = [rng.standard_normal((300, 3)).astype(np.float32) + 20 for _ in range(4)]
    total = GramSum()
    for b, t in zip(blocks, targets):
        total.add(b, t)
    gram, cross = total.result()
    x, y = np.concatenate(blocks).astype(np.float64), np.concatenate(targets).astype(np.float64)
    centred = x - x.mean(0)
    exact = centred.T @ centred
    shifted_error = np.abs((gram - np.outer(x.sum(0), x.mean(0))) - exact).max()
    plain = np.concatenate(blocks).T @ np.concatenate(blocks)
    plain_error = np.abs((plain.astype(np.float64) - np.outer(x.sum(0), x.mean(0))) - exact).max()
    assert shifted_error < 1e-3 * np.abs(exact).max() < plain_error
    np.testing.assert_allclose(cross, x.T @ y, rtol=1e-6)


def test_chunked_capture_gives_the_same_grams(monkeypatch):
    """Selection Grams captured one consumer input per onnxruntime run (a tiny capture budget) equal those of one
    run capturing every input."""
    from onnxprune import consumer_grams, scoring

    model = onnx.load(str(FIXTURES / "arch" / "resnet18.onnx"))
    prepare_for_analysis(model)
    analysis = analyse(model)
    consumers = scoring.refit_consumers(analysis)
    rng = np.random.default_rng(7)
    feeds = [{"input": rng.standard_normal((n, 3, 64, 64)).astype(np.float32)} for n in (3, 2)]
    whole = scoring._consumer_grams(model, consumers, feeds, 1e-3, shapes=analysis.shapes)
    assert len(scoring._capture_chunks(model, {n.input[0] for n, *_ in consumers.values()}, analysis.shapes,
                                       feeds)) == 1
    monkeypatch.setattr(consumer_grams, "CAPTURE_BYTES", 1)
    chunks = scoring._capture_chunks(model, {n.input[0] for n, *_ in consumers.values()}, analysis.shapes, feeds)
    assert len(chunks) == len({n.input[0] for n, *_ in consumers.values()}) > 10
    split = scoring._consumer_grams(model, consumers, feeds, 1e-3, shapes=analysis.shapes)
    assert whole.keys() == split.keys() and len(whole) > 10
    for key, gram in whole.items():
        np.testing.assert_array_equal(split[key], gram)
