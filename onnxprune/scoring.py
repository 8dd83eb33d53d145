"""Importance of removable channel units: L1/L2 magnitude over every coupled weight, BN scale, random."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from functools import partial

import numpy as np

from .analysis.groups import Analysis, ChannelGroup
from .calibration import StageClock
from .consumer_grams import CAPTURE_BYTES, ConsumerGrams, _capture_chunks, _consumer_grams, _patch_key
from .gram import _reconstructable, product_pool
from .heap import heap_bounded
from .row_parts import ROW_ALIGN, in_halves, rows_product
from .selection_windows import CaptureSource, consumer_input_bytes, consumer_windows
from .spd_solve import cholesky_in_place

__all__ = ["CAPTURE_BYTES", "ConsumerGrams", "_capture_chunks", "_consumer_grams", "_patch_key", "channel_scores",
           "reconstruction_scores", "unit_scores"]


def channel_scores(analysis: Analysis, criterion: str, energy: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Per channel id: summed |w| (l1) or w^2 (l2) of every producer and consumer slice, |gamma| (bn), or
    (activation) the energy each channel sends through its consumers: ||X_c||^2 * ||W[:, c]||^2."""
    acc = np.zeros(analysis.num_channels, dtype=np.float64)
    if criterion == "activation":
        for edit in analysis.edits:
            x = (energy or {}).get(edit.node.input[0])
            if edit.role != "consumer" or x is None or len(x) != len(edit.ids):
                continue
            values = np.moveaxis(edit.weight.array().astype(np.float32), edit.axis, 0).reshape(len(edit.ids), -1)
            np.add.at(acc, edit.ids, x * np.square(values).sum(axis=1))
        return acc
    for edit in analysis.edits:
        if criterion == "bn":
            gamma = analysis.index.resolve(edit.node.input[1])[0] if edit.node.op_type == "BatchNormalization" else None
            if gamma is None or gamma.tensor is not edit.weight.tensor:
                continue
        elif edit.role == "param":
            continue
        values = np.moveaxis(edit.weight.array().astype(np.float32), edit.axis, 0).reshape(len(edit.ids), -1)
        per = np.abs(values).sum(axis=1) if criterion in ("l1", "bn") else np.square(values).sum(axis=1)
        np.add.at(acc, edit.ids, per)
    return acc


def unit_scores(analysis: Analysis, groups: list[ChannelGroup], criterion: str, seed: int = 0,
                energy: dict[str, np.ndarray] | None = None) -> dict[int, np.ndarray]:
    """Group id -> score of each prunable unit (same order as ``group.units``)."""
    rng = np.random.default_rng(seed)
    per_channel = channel_scores(analysis, criterion, energy) if criterion != "random" else None
    scores: dict[int, np.ndarray] = {}
    for group in groups:
        if criterion == "random":
            scores[group.id] = rng.random(len(group.units))
            continue
        values = np.array([per_channel[ids].sum() for ids in group.units], dtype=np.float64)
        scores[group.id] = np.sqrt(values) if criterion == "l2" else values
    return scores


# -- selection aware of the least-squares repair (--criterion reconstruction) ----------------------


def reconstruction_scores(analysis: Analysis, groups: list[ChannelGroup], feeds: list[dict[str, np.ndarray]],
                          ridge: float = 1e-3, stop: float | None = None, clock=None,
                          threads: int | None = None) -> dict[int, np.ndarray]:
    """Group id -> unit scores from greedy elimination that knows the consumers will be refitted.

    For each consumer layer of a group, its input features X on the calibration data give the Gram
    matrix H = XᵀX. Removing a unit (its block q of input features) and refitting the rest by least
    squares raises the consumer's output error by wᵀ (H⁻¹_qq)⁻¹ w (the optimal-brain-surgeon block
    formula, w the unit's current weight rows), summed over the group's consumers. Units are removed
    greedily, cheapest first, updating H⁻¹ and the refitted weights after each removal (He et al.'s
    channel selection for reconstruction, ThiNet's greedy order). A unit's score is the accumulated
    error when it went, so lower-scored units go first. Groups whose consumers cannot be refitted
    (grouped convs, batched MatMuls) keep L1 scores. With ``stop`` (the largest share of a group's channels the
    allocation may remove), the order stops one unit past that share: the remaining units score above every
    removed one (accumulated error plus their cost at that point), so the removed set is the same. ``clock`` (a
    :class:`~onnxprune.calibration.StageClock`) times capture, Gram and selection.

    Each group's order reads only the original weights and its consumers' Grams, so groups are independent: by
    default (``threads`` None) two threads order them (numpy's LAPACK/BLAS calls release the GIL), each group's
    scores bit-identical to a sequential run's. With the heap bounded (``--low-memory``) one thread orders them,
    in windows of consecutive groups (:func:`consumer_windows`) whose consumers' Grams or kept inputs fit in the
    consumers' weight bytes: each window's capture, selection and release run before the next window's capture
    (a consumer read from two windows is captured in both, the same Gram bit for bit), which starts from the
    frontier the previous capture kept (:class:`CaptureSource`: the narrowest cut between the window's consumer
    inputs and the next window's) instead of the inputs where that fits; a deferred Gram
    whose last reader is the group being ordered is inverted in place (:func:`spd_inverse`).
    The consumers' weight matrices are read when a group's order needs them (:class:`_LazyMatrix`): no copy of the
    model's weights is held through the selection.
    """
    clock = clock or StageClock()
    fallback = unit_scores(analysis, groups, "l1")
    consumers = refit_consumers(analysis, lazy=True)
    if not consumers:
        return fallback
    readers = _readers(groups, consumers)
    low = heap_bounded()
    threads = (1 if low else SELECTION_THREADS) if threads is None else max(1, threads)
    windows = consumer_windows(analysis, groups, consumers, readers, feeds) if low else [range(len(groups))]
    products = product_pool() if threads == 1 else None  # one thread orders: products and inverses use the other core
    scores: dict[int, np.ndarray] = {}
    source = CaptureSource(analysis.model, feeds,
                           consumer_input_bytes(analysis, consumers, feeds) if len(windows) > 1 else 0, analysis.shapes)
    names = [{consumers[key][0].input[0] for key, numbers in readers.items() if set(numbers) & set(window)}
             for window in windows]
    for number_of_window, window in enumerate(windows):
        inside = {key: [n for n in numbers if n in window] for key, numbers in readers.items()}
        keys = [key for key in consumers if inside.get(key)]
        if not keys:
            continue
        later = set().union(*names[number_of_window + 1:])
        frontier = source.frontier(later, {consumers[key][0].input[0] for key in keys}) if later else None
        with clock.stage("gram"):
            grams = ConsumerGrams(analysis.model, {key: consumers[key] for key in keys}, source.feeds, ridge, clock,
                                  analysis.shapes, frontier=frontier, pool=products)
        source.advance(frontier, grams.frontier)
        grams.frontier = []
        if not later:  # no capture after this one: the kept frontier is not held through the selection
            source.feeds = source.inputs
        pending = {key: len(inside[key]) for key in keys}  # groups of the window that have still to read each
        lock = threading.Lock()

        def inverted(number: int, grams=grams, pending=pending, lock=lock, inside=inside, keys=keys) -> None:
            """Group ``number`` holds its inverses: the Grams no other group of the window reads may go."""
            with lock:
                done = []
                for key in keys:
                    if number in inside[key]:
                        pending[key] -= 1
                        if not pending[key]:
                            done.append(key)
                grams.forget(done)

        def last_use(number: int, key: str, grams=grams, pending=pending, inside=inside, keys=keys) -> bool:
            """Whether group ``number`` is the last to read the Gram of ``key`` (of every key of its patch) and the
            Gram can be built again from kept inputs: then it may be inverted in place."""
            patch = grams.patch.get(key)
            return patch in grams.deferred and all(pending[k] == (number in inside[k]) for k in keys
                                                   if grams.patch.get(k) == patch)

        def order(number: int, alone: bool = True, grams=grams, inverted=inverted, last_use=last_use) -> np.ndarray:
            group = groups[number]
            steps = None if stop is None else math.ceil(stop * max(group.channels, len(group.units))) + 1
            result = _greedy_order(group, consumers, grams, steps, partial(inverted, number),
                                   partial(last_use, number) if low else None,
                                   products if alone else None) if group.units else None
            if not group.units:
                inverted(number)
            return fallback[group.id] if result is None else result

        with clock.stage("selection"):
            if threads == 1 and low:
                results = _narrow_in_pairs(window, order, partial(_widest, consumers, readers))
            elif threads == 1 or len(window) < 2:
                results = [order(number) for number in window]
            else:
                with ThreadPoolExecutor(threads) as workers:
                    results = list(workers.map(order, window))
        for number, result in zip(window, results):
            scores[groups[number].id] = result
        del grams
    for group in groups:  # groups no consumer reads: their L1 scores
        scores.setdefault(group.id, fallback[group.id])
    return {group.id: scores[group.id] for group in groups}


#: threads that order the groups in the default mode (one with the heap bounded, but for narrow groups)
SELECTION_THREADS = 2


def _widest(consumers: dict[str, tuple], readers: dict[str, list[int]], number: int) -> int:
    """The most features of a consumer that reads group ``number``: the side of its largest inverse."""
    return max((len(consumers[key][3]) for key, numbers in readers.items() if number in numbers), default=0)


def _narrow_in_pairs(window: range, order: Callable[[int], np.ndarray], widest: Callable[[int], int]
                     ) -> list[np.ndarray]:
    """The window's groups ordered in their order, one at a time, but consecutive narrow groups (every consumer
    below ``WIDE_FEATURES`` features: inverses of at most 32 MB) two at a time on two threads (the memory-bounded
    mode's one thread leaves the other core idle there: ``order(number, False)`` keeps their inverses and downdates
    off the product pool); a group ordered alone (``order(number)``) splits its wide products with the pool. Each
    group's scores are its own, bit for bit, whichever thread orders it."""
    results: list[np.ndarray] = []
    numbers = list(window)
    with ThreadPoolExecutor(1, thread_name_prefix="onnxprune-narrow") as other:
        i = 0
        while i < len(numbers):
            pair = numbers[i:i + 2]
            if len(pair) == 2 and all(widest(n) < WIDE_FEATURES for n in pair):
                second = other.submit(order, pair[1], False)
                results.append(order(pair[0], False))
                results.append(second.result())
                i += 2
            else:
                results.append(order(numbers[i]))
                i += 1
    return results


def _readers(groups: list[ChannelGroup], consumers: dict[str, tuple]) -> dict[str, list[int]]:
    """Consumer -> indices of the groups whose units are among its input channels (consumers no group reads are
    left out)."""
    readers: dict[str, list[int]] = {}
    features = {key: set(np.unique(feature_ids).tolist()) for key, (_, _, _, feature_ids) in consumers.items()}
    for number, group in enumerate(groups):
        ids = {int(i) for unit in group.units for i in np.asarray(unit).ravel()}
        for key in consumers:
            if ids & features[key]:
                readers.setdefault(key, []).append(number)
    return readers


def refit_consumers(analysis: Analysis, originals: dict[str, np.ndarray] | None = None,
                     lazy: bool = False) -> dict[str, tuple]:
    """Consumer node name -> (node, edit, weight matrix [features, outputs] in the weight's float type, channel id
    per feature); users upcast the matrices they work on (:func:`as_float64`), not every consumer's at once. A
    weight named in ``originals`` is read from that array (the matrix a view of it, never written), others copied;
    with ``lazy`` (and no ``originals`` entry) the matrix is a :class:`_LazyMatrix`, read when used."""
    found = {}
    for edit in analysis.edits:
        node = edit.node
        if edit.role != "consumer" or not _reconstructable(node) or node.input[0] not in analysis.ann:
            continue
        _, chain = analysis.index.resolve(node.input[1])
        form = _matrix_form(node, edit.axis, edit.weight.shape)
        if chain or form is None:
            continue
        if originals and edit.weight.name in originals:
            matrix = _as_matrix(originals[edit.weight.name], form)
        else:
            matrix = _LazyMatrix(edit.weight, form) if lazy else _as_matrix(edit.weight.array(), form)
        shape = edit.weight.shape
        feature_ids = np.repeat(edit.ids, shape[2] * shape[3]) if form == "conv" else edit.ids
        found[node.name or node.output[0]] = (node, edit, matrix, np.asarray(feature_ids))
    return found


def _matrix_form(node, axis: int, shape: tuple[int, ...]) -> str | None:
    """How a consumer's weight of ``shape`` reads as [features, outputs]: "conv" (a Conv's [O, C, kh, kw], features
    C·kh·kw), "transposed" (Gemm with transB), "plain" (Gemm, MatMul); None where it does not."""
    if node.op_type == "Conv" and axis == 1 and len(shape) == 4:
        return "conv"
    if node.op_type == "Gemm" and len(shape) == 2:
        return "transposed" if axis == 1 else "plain"  # transB: B is [N, K]
    if node.op_type == "MatMul" and len(shape) == 2 and axis == 0:
        return "plain"
    return None


def _as_matrix(w: np.ndarray, form: str) -> np.ndarray:
    """The [features, outputs] view of weight ``w`` (:func:`_matrix_form`)."""
    if form == "conv":
        return w.reshape(w.shape[0], -1).T
    return w.T if form == "transposed" else w


class _LazyMatrix:
    """A consumer's weight matrix read from its weight when used (``np.asarray``, ``np.array``): no copy of it is
    held between uses. ``shape``, ``dtype`` and ``nbytes`` are the matrix's, from the weight's declared shape."""

    ndim = 2

    def __init__(self, weight, form: str):
        self.weight, self.form = weight, form
        shape = weight.shape
        self.shape = (int(np.prod(shape[1:])), shape[0]) if form == "conv" else (
            (shape[1], shape[0]) if form == "transposed" else tuple(shape))
        self.dtype = weight.dtype
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        matrix = _as_matrix(self.weight.values(), self.form)
        return matrix if dtype is None else matrix.astype(dtype)


def as_float64(matrix: np.ndarray) -> np.ndarray:
    """A consumer's weight matrix in float64, laid out as the matrix is (a transposed view stays transposed)."""
    return matrix.astype(np.float64)


#: a :class:`_State` over at least this many features computes its step products in two row parts
#: (:func:`~onnxprune.row_parts.in_halves`, one on the pool when it has one); its costs in two halves once at least
#: ``SPLIT_UNITS`` units share a block size
SPLIT_FEATURES = 1024
SPLIT_UNITS = 64

#: consumers with at least this many input features cost units by k×k inverses and products (faster than a solve
#: per output at D = C·k², equal up to rounding); narrower ones keep the batched solve
WIDE_FEATURES = 2048

#: a group whose greedy order runs more steps than this, with a consumer of at least ``BATCH_FEATURES`` features,
#: removes several units per step (the cheapest by the costs before the step, removed jointly by one block
#: downdate), so each consumer's O(D²)-sized step work runs at most about this many times: wide groups (1,024 and
#: 2,048 residual channels, 512 channels of 3×3 patches) stay fast; every other group keeps the exact
#: one-unit-per-step order
SELECTION_STEPS = 64
BATCH_FEATURES = 1024


def _greedy_order(group: ChannelGroup, consumers: dict[str, tuple], grams: dict[str, np.ndarray],
                  steps: int | None = None, inverted=None, overwritable=None, pool: Executor | None = None
                  ) -> np.ndarray | None:
    """Greedy OBS elimination over the group's units: each step removes the unit whose block costs least,
    summed over the consumers, then downdates each consumer's inverse Gram and refitted weights (``steps``:
    stop after that many; the rest score the accumulated error plus their current cost). Past
    ``SELECTION_STEPS`` steps on a consumer of ``BATCH_FEATURES`` features or more, each step removes the ``batch``
    cheapest units together. ``inverted`` is called once the inverses are taken (the Grams may then go);
    ``overwritable`` (see :func:`_states`) says which Grams may be inverted in place; ``pool``: wide inverses run
    partly on it (:func:`spd_inverse`), and so do half the rows of each wide state's step products (:class:`_State`)."""
    states = _states(group, consumers, grams, steps, overwritable, pool)
    if inverted is not None:
        inverted()
    if not states:
        return None
    n = len(group.units)
    wide = max(state.P0.shape[0] for state in states) >= BATCH_FEATURES
    batch = max(1, min(n, steps or n) // SELECTION_STEPS) if wide else 1
    alive = np.ones(n, dtype=bool)
    scores = np.zeros(n)
    total, removed = 0.0, 0
    while removed < n:
        cost = np.zeros(n)
        for state in states:
            state.add_costs(cost)
        cost[~alive] = np.inf
        if steps is not None and removed >= steps:
            rest = np.flatnonzero(alive)
            scores[rest] = total + np.maximum(cost[rest], 0.0) + 1e-12 * (removed + 1)
            break
        take = min(batch, n - removed, n if steps is None else steps - removed)
        if take == 1:
            chosen = [int(np.argmin(cost))]
        else:  # among the surviving units only (a removed unit's cost is inf, and so may a surviving one's be)
            survivors = np.flatnonzero(alive)
            chosen = survivors[np.argsort(cost[survivors], kind="stable")[:take]].tolist()
        for u in chosen:
            total += max(float(cost[u]), 0.0)
            scores[u] = total + 1e-12 * removed
            alive[u] = False
            removed += 1
        for state in states:
            state.remove(chosen)
    return scores


def _states(group: ChannelGroup, consumers: dict[str, tuple], grams: dict[str, np.ndarray],
            steps: int | None = None, overwritable=None, pool: Executor | None = None) -> list | None:
    """One :class:`_State` per consumer that reads the group's units (None: a Gram cannot be inverted); each
    state's downdate columns are sized for the most features ``steps`` removals can take from it. A Gram for
    whose key ``overwritable(key)`` is true (no later reader, built again from kept inputs if asked for again) is
    inverted in place (:func:`spd_inverse` with ``overwrite``); where its Cholesky fails it is built again and
    inverted as without."""
    unit_of = {}
    for u, ids in enumerate(group.units):
        for i in np.asarray(ids).tolist():
            unit_of[int(i)] = u
    states = []
    inverses: dict[int, np.ndarray] = {}  # consumers of one shared patch share one Gram array: invert it once
    for key, (_, _, matrix, feature_ids) in consumers.items():
        if key not in grams:
            continue
        units = np.array([unit_of.get(int(i), -1) for i in feature_ids])
        if not (units >= 0).any():
            continue
        if id(grams[key]) not in inverses:
            gram = grams[key]
            try:
                if overwritable is not None and overwritable(key):
                    try:
                        inverses[id(gram)] = spd_inverse(gram, overwrite=True, pool=pool)
                    except _Overwritten:
                        grams.release([key])  # the failed factor: the Gram is built again, as the plain path reads it
                        gram = grams[key]
                        inverses[id(gram)] = np.linalg.inv(gram)
                else:
                    inverses[id(gram)] = spd_inverse(gram, pool=pool)
            except np.linalg.LinAlgError:
                return None
        sizes = np.sort(np.bincount(units[units >= 0]))[::-1]
        rank = int(sizes[:len(sizes) if steps is None else steps].sum())
        states.append(_State(inverses[id(grams[key])], np.array(matrix, dtype=np.float64, order="C"), units, rank,
                             pool))
    return states


def spd_inverse(gram: np.ndarray, overwrite: bool = False, pool: Executor | None = None) -> np.ndarray:
    """The inverse of a symmetric positive definite (ridge-regularised) Gram: ``np.linalg.inv`` below
    ``WIDE_FEATURES``; above, by Cholesky (H = L Lᵀ, H⁻¹ = L⁻ᵀ L⁻¹) with blocked products that use the triangles
    (about half the flops of an LU inverse, same float64 accuracy); LU where Cholesky fails. The factor is the
    blocked one of :func:`~onnxprune.spd_solve.cholesky_in_place`, written over a copy of the Gram (LAPACK's own
    would take a work copy besides), L is inverted and multiplied in place: besides the Gram, one D×D array and a
    quarter-sized temporary are alive. With ``overwrite`` (a C-contiguous float64 Gram above ``WIDE_FEATURES``)
    the factor is written over the Gram itself (the same factor, bit for bit; no other D×D array) and the inverse
    returned is the Gram's array; where the factor fails :class:`_Overwritten` is raised (the Gram is lost).
    With ``pool`` (:func:`~onnxprune.gram.product_pool`) the factor's strips and the halves of the inverse and of
    the product run partly on it: the same inverse bit for bit."""
    if gram.shape[0] < WIDE_FEATURES:
        return np.linalg.inv(gram)
    if overwrite and gram.dtype == np.float64 and gram.flags.c_contiguous:
        try:
            lower = cholesky_in_place(gram, pool=pool)
        except np.linalg.LinAlgError as exc:
            raise _Overwritten("Gram not positive definite") from exc
    else:
        try:
            lower = cholesky_in_place(np.array(gram, dtype=np.float64, order="C"), pool=pool)
        except np.linalg.LinAlgError:
            return np.linalg.inv(gram)
    _invert_lower(lower, pool)
    return _lower_gram(lower, pool)


class _Overwritten(np.linalg.LinAlgError):
    """An in-place Cholesky failed: the Gram it was written over is lost."""


def _invert_lower(lower: np.ndarray, pool: Executor | None = None) -> None:
    """L⁻¹ of a lower-triangular L, in place, by halves: [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹ B A⁻¹, C⁻¹]]
    (the same products as out of place: ``B A⁻¹`` first). With ``pool`` the two halves are inverted at once (one
    on the pool; the same arrays bit for bit)."""
    n = lower.shape[0]
    if n <= 256:
        lower[...] = np.linalg.inv(lower)
        return
    m = n // 2
    if pool is None:
        _invert_lower(lower[:m, :m])
        _invert_lower(lower[m:, m:])
    else:
        other = pool.submit(_invert_lower, lower[m:, m:])
        _invert_lower(lower[:m, :m])
        other.result()
    block = lower[m:, :m]
    scaled = rows_product(block, lower[:m, :m], pool)  # B A⁻¹
    rows_product(lower[m:, m:], scaled, pool, out=block)
    np.negative(block, out=block)


def _lower_gram(lower: np.ndarray, pool: Executor | None = None) -> np.ndarray:
    """MᵀM of a lower-triangular M, in place (returned), by halves, skipping the zero triangle:
    [[A, 0], [B, C]] → [[AᵀA + BᵀB, BᵀC], [CᵀB, CᵀC]] (each block from the input blocks, as out of place). With
    ``pool`` the CᵀC half runs on the pool while the AᵀA + BᵀB half runs here (the same arrays bit for bit)."""
    n = lower.shape[0]
    if n <= 256:
        lower[...] = lower.T @ lower
        return lower
    m = n // 2
    a, b, c = lower[:m, :m], lower[m:, :m], lower[m:, m:]
    rows_product(b.T, c, pool, out=lower[:m, m:])  # into the zero triangle: B and C are still read below
    other = pool.submit(_lower_gram, c) if pool is not None else None
    _lower_gram(a)
    a += b.T @ b
    b[...] = lower[:m, m:].T
    if other is None:
        _lower_gram(c)
    else:
        other.result()
    return lower


class _State:
    """One consumer's refitted weights ``W`` and its inverse Gram in low-rank form, P = P₀ − U Vᵀ.

    Removing a unit's block q of features is the block OBS downdate P ← P − P[:, q] P_qq⁻¹ P[q, :]; instead of
    rewriting the D×D matrix each step (memory-bound at D = C·k²), the downdate is appended to U and V, and only
    what the costs read is kept current: the k×k diagonal block of every unit, updated from the new rank-k term.
    A step costs O(D · rank · k) instead of O(D² · k); P₀ is never written. Units with blocks of equal size are
    costed in one batched solve. A wide consumer (``WIDE_FEATURES`` or more) holds the downdates as one factor Z,
    P = P₀ − Z Zᵀ: a step's term P[:, q] P_qq⁻¹ P[q, :] is z zᵀ with z = P[:, q] C⁻ᵀ (P_qq = C Cᵀ, Cholesky), so the
    D × rank columns are held once instead of twice (ResNet-50's layer4: 85 MB instead of 170).

    A consumer of ``SPLIT_FEATURES`` features or more computes the rows of a step's products (the current columns,
    the refit of W) and the units of its costs in two parts (:func:`~onnxprune.row_parts.in_halves`); with ``pool``
    (a group ordered while the other core would idle) one part runs on the pool: the same products of views of the
    same arrays, so the same results bit for bit."""

    def __init__(self, inverse: np.ndarray, weights: np.ndarray, units: np.ndarray, rank: int = 16,
                 pool: Executor | None = None):
        self.P0, self.W, self.units = inverse, weights, units
        self.pool, self.split = pool, inverse.shape[0] >= SPLIT_FEATURES
        self.factored = inverse.shape[0] >= WIDE_FEATURES  # P = P₀ − Z Zᵀ (Z held in U), else P₀ − U Vᵀ
        self.U = np.empty((inverse.shape[0], max(rank, 1)))  # the columns the downdates will take (grown if short)
        self.V = self.U if self.factored else np.empty((inverse.shape[0], max(rank, 1)))
        self.rank = 0
        self.groups = []  # (unit ids, feature index [units, k], current diagonal blocks [units, k, k])
        present = units >= 0
        order = np.argsort(units, kind="stable")
        order = order[present[order]]
        ids, starts, sizes = np.unique(units[order], return_index=True, return_counts=True)
        for size in np.unique(sizes):
            chosen = np.flatnonzero(sizes == size)
            index = order[starts[chosen][:, None] + np.arange(size)[None, :]]
            self.groups.append([ids[chosen], index, inverse[index[:, :, None], index[:, None, :]]])

    def add_costs(self, cost: np.ndarray) -> None:
        """cost[u] += wᵀ (P_qq)⁻¹ w for every surviving unit u of this consumer (its block q of features)."""
        for unit_ids, index, blocks in self.groups:
            if not len(unit_ids):
                continue
            if index.shape[1] == 1:  # one feature per unit (neurons, Gemm/MatMul inputs): ‖w‖² / P_uu
                rows, diag = self.W[index[:, 0]], blocks[:, 0, 0]
                with np.errstate(divide="ignore", invalid="ignore"):
                    cost[unit_ids] += np.where(diag > 0, np.einsum("uj,uj->u", rows, rows) / diag, np.inf)
                continue
            w = self.W[index]  # [units, k, outputs]
            added = np.empty(len(unit_ids))

            def quadratic(lo: int, hi: int, w=w, blocks=blocks, added=added) -> None:
                part, parts = w[lo:hi], blocks[lo:hi]
                if self.P0.shape[0] < WIDE_FEATURES:
                    added[lo:hi] = np.einsum("ukj,ukj->u", part, np.linalg.solve(parts, part))
                else:  # the same quadratic form as trace(P_qq⁻¹ · w wᵀ): k×k products instead of solves per output
                    added[lo:hi] = np.einsum("ukl,ukl->u", np.linalg.inv(parts), np.matmul(part, part.transpose(0, 2, 1)))

            try:
                self._parts(len(unit_ids), quadratic, least=SPLIT_UNITS, align=1)  # units: one by one
                cost[unit_ids] += added
            except np.linalg.LinAlgError:
                cost[unit_ids] += [_removal_cost(b, self.W[q]) for b, q in zip(blocks, index)]

    def remove(self, units: list[int]) -> None:
        """Drop the units' features q together: refit W ← W − P[:, q] P_qq⁻¹ W[q], append the downdate to U, V."""
        q = np.flatnonzero(self.units == units[0]) if len(units) == 1 else np.flatnonzero(np.isin(self.units, units))
        if not q.size:
            return
        rows, rank, taken = self.P0.shape[0], self.rank, self.V[q, :self.rank]
        column = np.empty((rows, q.size))

        def current(lo: int, hi: int) -> None:  # rows lo:hi of the current P[:, q]
            np.subtract(self.P0[lo:hi, q], self.U[lo:hi, :rank] @ taken.T, out=column[lo:hi])

        self._parts(rows, current)
        block = column[q]
        try:
            inv = np.linalg.inv(block)
        except np.linalg.LinAlgError:
            inv = np.linalg.pinv(block)
        scaled = column @ inv
        removed = self.W[q]

        def refit(lo: int, hi: int) -> None:
            self.W[lo:hi] -= scaled[lo:hi] @ removed

        self._parts(rows, refit)
        self.W[q] = 0.0
        if self.factored:
            self._append(_downdate_factor(column, block))
        else:
            self._append(scaled, column)
        self.units[q] = -1
        for entry in self.groups:
            unit_ids, index, blocks = entry
            alive = unit_ids != units[0] if len(units) == 1 else ~np.isin(unit_ids, units)
            if not alive.all():
                entry[0], entry[1], entry[2] = unit_ids[alive], index[alive], blocks[alive]
                unit_ids, index, blocks = entry
            blocks -= np.einsum("ukr,ulr->ukl", scaled[index], column[index])

    def _parts(self, count: int, work: Callable[[int, int], None], least: int = 0, align: int = ROW_ALIGN) -> None:
        """``work`` over ``range(count)`` in two parts (:func:`~onnxprune.row_parts.in_halves`) for a consumer of
        ``SPLIT_FEATURES`` features or more, else at once."""
        if self.split:
            in_halves(self.pool, count, work, least, align)
        else:
            work(0, count)

    def _append(self, scaled: np.ndarray, column: np.ndarray | None = None) -> None:
        """Append a downdate's columns: ``scaled`` to U and ``column`` to V, or (factored) ``scaled`` to Z alone."""
        k = scaled.shape[1]
        if self.rank + k > self.U.shape[1]:
            grow = max(self.U.shape[1], k)
            self.U = np.hstack([self.U, np.empty((self.U.shape[0], grow))])
            self.V = self.U if self.factored else np.hstack([self.V, np.empty((self.V.shape[0], grow))])
        self.U[:, self.rank:self.rank + k] = scaled
        if not self.factored:
            self.V[:, self.rank:self.rank + k] = column
        self.rank += k


def _downdate_factor(column: np.ndarray, block: np.ndarray) -> np.ndarray:
    """z with z zᵀ = column · block⁻¹ · columnᵀ: column · C⁻ᵀ for block = C Cᵀ; a block rounding left not positive
    definite keeps its positive eigenvalues (column · Q Λ₊^(-1/2))."""
    try:
        return column @ np.linalg.inv(np.linalg.cholesky(block)).T
    except np.linalg.LinAlgError:
        values, vectors = np.linalg.eigh((block + block.T) / 2)
        positive = values > values.max(initial=0.0) * 1e-12
        return (column @ vectors[:, positive]) / np.sqrt(values[positive])


def _removal_cost(block: np.ndarray, w: np.ndarray) -> float:
    try:
        return float(np.sum(w * np.linalg.solve(block, w)))
    except np.linalg.LinAlgError:
        return float("inf")
