"""Gram matrices XᵀX of consumer layers' input features on calibration data, held in bounded memory.

One capture pass over the calibration feeds serves every consumer. Consumers that read the same features (the same
tensor, for a Conv the same patch geometry) share one Gram. While the pass runs, each shared patch keeps whichever
is smaller: its running Gram sum (D×D float64) or the captured input tensors themselves (float32, every feed). A
kept-input ("deferred") Gram is built when first asked for and dropped by :meth:`ConsumerGrams.release`: deep Conv
layers (D = C·k² features on a few positions) hold a few MB of inputs instead of hundreds of MB of Grams, and only
the Grams of the group being worked on are in memory at once. A deferred Gram is summed from the same rows (the
patch's seeded :class:`~onnxprune.gram.RowSampler`, drawn feed after feed) in the same order as during the pass:
both ways give the same array, bit for bit.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Executor

import numpy as np

from .activation_stream import ActivationStream
from .calibration import StageClock
from .gram import GramSum, RowSampler, _patches
from .graph import get_attr
from .heap import heap_bounded

#: bytes of consumer inputs captured per onnxruntime run and calibration batch (and kept between runs); at 256 MiB
#: ResNet-50's selection capture peaked 1,445 MB (16-sample batches at 224², 3 runs per batch), at 64 MiB 1,130 MB
CAPTURE_BYTES = 64 << 20
#: the same when memory comes before time (:func:`~onnxprune.heap.heap_bounded`, ``--low-memory``), where each
#: run's session is also built for that run alone
LOW_MEMORY_CAPTURE_BYTES = 16 << 20


def _capture_chunks(model, names: set[str], shapes: dict, feeds: list[dict[str, np.ndarray]],
                    budget: int | None = None) -> list[list[str]]:
    """``names`` in graph order, split so each chunk's tensors for one calibration batch (float32, sizes from the
    analysis shapes; unknown dims count as 1) fit in ``budget`` bytes (default ``CAPTURE_BYTES``)."""
    budget = CAPTURE_BYTES if budget is None else budget
    order = {out: i for i, node in enumerate(model.graph.node) for out in node.output}
    batch = max((int(v.shape[0]) if v.ndim else 1 for feed in feeds for v in feed.values()), default=1)
    chunks: list[list[str]] = [[]]
    used = 0
    for name in sorted(names, key=lambda n: (order.get(n, -1), n)):
        dims = shapes.get(name) or []
        size = 4 * batch * int(np.prod([d if isinstance(d, int) and d > 0 else 1 for d in dims[1:]]))
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += size
    return [c for c in chunks if c]


class ConsumerGrams(Mapping):
    """Consumer name -> XᵀX of its input features on ``feeds`` (+ ridge), float64; a read-only mapping.

    ``consumers`` maps a name to (node, edit, weight matrix [features, outputs], channel id per feature), as
    :func:`~onnxprune.scoring.refit_consumers` builds them. With ``defer`` a patch keeps its captured inputs when
    they take fewer bytes than its Gram; such a Gram is computed on first access and held until :meth:`release`.
    ``shapes`` (the analysis shapes) split the capture into onnxruntime runs of at most ``CAPTURE_BYTES`` per batch
    (``LOW_MEMORY_CAPTURE_BYTES`` with the heap bounded, each run's session then built for it alone). ``feeds``
    may hold intermediate tensors (a frontier) besides or instead of graph inputs: the runs start from them. With
    ``frontier`` (tensor names) :attr:`frontier` holds those tensors of every feed after the capture. ``shared``
    (see :func:`~onnxprune.sessions.fed_session`) feeds the capture sessions the weights the caller holds as arrays
    already, instead of a copy of each per session. ``pool`` (:func:`~onnxprune.gram.product_pool`): the products
    of deferred Grams built on the thread that made the object run on its threads while that thread makes the next
    rows (:class:`~onnxprune.gram.GramSum`; the same sums bit for bit), for a caller that would leave the other core
    idle; the capture's own sums use it only for the column blocks of wide flushes, done before the next run (a
    narrow product in flight beside an onnxruntime run raised a MiniLM-shaped encoder's selection peak by 20-30 MB).
    ``live_bytes``/``peak_bytes`` count the Gram arrays held (finished and running sums).

    After the capture, lookups, :meth:`release` and :meth:`forget` may come from several threads: the bookkeeping
    is locked, a deferred Gram is built once (other threads asking for it wait), builds of different patches run
    at once; only builds on the thread that made the object are timed as "gram" (a worker's count in the stage
    its caller times)."""

    def __init__(self, model, consumers: dict[str, tuple], feeds: list[dict[str, np.ndarray]], ridge: float,
                 clock: StageClock | None = None, shapes: dict | None = None, defer: bool = True,
                 frontier: set[str] | None = None, shared: Mapping[str, tuple[bytes, np.ndarray]] | None = None,
                 pool: Executor | None = None):
        self.ridge, self.feeds, self.clock = ridge, len(feeds), clock or StageClock()
        self.pool = pool
        self.shared = shared
        self.patch = {key: _patch_key(node, matrix.shape[0]) for key, (node, _, matrix, _) in consumers.items()}
        self.node = {self.patch[key]: node for key, (node, *_) in consumers.items()}
        self.live_bytes = self.peak_bytes = 0
        self.grams: dict[tuple, np.ndarray] = {}  # finished Grams by patch
        self.inputs: dict[str, list[np.ndarray]] = {}  # kept input tensors of deferred patches, per feed
        self.deferred: set[tuple] = set()
        self.failed: set[tuple] = set()  # features that do not match the weight
        self.lock = threading.RLock()
        self.building: dict[tuple, threading.Lock] = {}  # deferred patches being built, one lock each
        self.owner = threading.get_ident()
        self.frontier: list[dict[str, np.ndarray]] = []  # per feed, the ``frontier`` tensors after the capture
        self._capture(model, consumers, feeds, shapes or {}, defer, frontier)

    def _capture(self, model, consumers, feeds, shapes, defer, frontier=None) -> None:
        sums: dict[tuple, GramSum] = {}
        samplers = {patch: RowSampler(patch[1], len(feeds)) for patch in self.patch.values()}
        names = {node.input[0] for node, *_ in consumers.values()}
        low = heap_bounded()
        chunks = _capture_chunks(model, names, shapes, feeds, LOW_MEMORY_CAPTURE_BYTES if low else None)
        readers = [{self.patch[key]: item[0] for key, item in consumers.items() if item[0].input[0] in chunk}
                   for chunk in chunks]
        if frontier:  # one more run per feed: the tensors a later capture starts from (no consumer reads them here)
            chunks, readers = [*chunks, sorted(frontier)], [*readers, {}]
        for i, values in ActivationStream(model, feeds, shared=self.shared).by_feed(chunks, self.clock,
                                                                                   keep_sessions=not low):
            if frontier and i == len(chunks) - 1:
                self.frontier.append(values)
                continue
            for patch, node in readers[i].items():
                if patch in self.failed:
                    continue
                x = values[node.input[0]]
                if _width(node, x, patch[1]) != patch[1]:  # features that do not match the weight
                    self.failed.add(patch)
                    if sums.pop(patch, None) is not None:
                        self.live_bytes -= 8 * patch[1] ** 2
                    continue
                if patch not in sums and patch not in self.deferred:  # first feed: which to keep
                    if defer and x.nbytes * len(feeds) < 8 * patch[1] ** 2:
                        self.deferred.add(patch)
                    else:
                        # no narrow product in flight: it would add to the next onnxruntime run's peak
                        sums[patch] = GramSum(pool=self.pool, in_flight=0)
                        self._count(8 * patch[1] ** 2)
                if patch in self.deferred:
                    kept = self.inputs.setdefault(node.input[0], [])
                    if not kept or kept[-1] is not x:  # once per feed when several patches read the tensor
                        kept.append(x)
                else:
                    sums[patch].add(_features(node, x, patch[1], samplers[patch]))
            values = x = None  # not held while the stream computes the next chunk
        for patch, total in sums.items():
            self.grams[patch] = self._finish(total)
        self.inputs = {name: kept for name, kept in self.inputs.items()
                       if any(self.node[p].input[0] == name for p in self.deferred - self.failed)}

    def _finish(self, total: GramSum) -> np.ndarray:
        gram = total.result()[0]
        gram[np.diag_indices_from(gram)] += self.ridge * float(np.trace(gram)) / gram.shape[0] + 1e-12
        return gram

    def _count(self, nbytes: int) -> None:
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def __getitem__(self, key: str) -> np.ndarray:
        with self.lock:
            patch = self.patch.get(key)
            if patch is None or patch in self.failed:
                raise KeyError(key)
            if patch in self.grams:
                return self.grams[patch]
            building = self.building.setdefault(patch, threading.Lock())
        with building:  # deferred: summed now from the kept inputs, as the capture would have
            with self.lock:
                if patch in self.grams:  # built by another thread meanwhile
                    return self.grams[patch]
                node, kept = self.node[patch], self.inputs[self.node[patch].input[0]]
                self._count(8 * patch[1] ** 2)
            mine = threading.get_ident() == self.owner
            with self.clock.stage("gram") if mine else contextlib.nullcontext():
                gram = self._sum_kept(node, kept, patch[1])
            with self.lock:
                self.grams[patch] = gram
                self.building.pop(patch, None)
        return gram

    def permuted(self, key: str, order: np.ndarray) -> np.ndarray:
        """A new array: the Gram of ``key`` with its features in ``order`` (``gram[order][:, order]``). A deferred
        Gram not held is summed from the kept inputs with its columns already in that order (the same sums up to
        rounding; the unpermuted Gram is never built), else the held Gram is indexed."""
        patch = self.patch.get(key)
        if patch is None or patch in self.failed:
            raise KeyError(key)
        if patch in self.grams or patch not in self.deferred:
            return self[key][np.ix_(order, order)]
        node = self.node[patch]
        with self.clock.stage("gram"):
            return self._sum_kept(node, self.inputs[node.input[0]], patch[1], order)

    def _sum_kept(self, node, kept: list[np.ndarray], features: int, order: np.ndarray | None = None) -> np.ndarray:
        """The Gram of ``node``'s features summed from its kept input tensors (one per feed), rows sampled as the
        capture samples them; with ``order`` its features (columns) taken in that order."""
        total = GramSum(pool=self.pool if threading.get_ident() == self.owner else None)
        sampler = RowSampler(features, self.feeds)
        for x in kept:
            rows = _features(node, x, features, sampler)
            total.add(rows if order is None else rows[:, order])
        return self._finish(total)

    def __contains__(self, key: object) -> bool:
        patch = self.patch.get(key)  # one lookup: another thread may forget the key meanwhile
        return patch is not None and patch not in self.failed

    def __iter__(self) -> Iterator[str]:
        return (key for key in self.patch if self.patch[key] not in self.failed)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def release(self, keys, keep=()) -> None:
        """Drop the deferred Grams of ``keys`` but those ``keep`` reads (built again from the kept inputs if asked
        for again); Grams summed during the capture stay until :meth:`forget`."""
        with self.lock:
            kept = {self.patch.get(key) for key in keep}
            for key in keys:
                patch = self.patch.get(key)
                if patch in self.deferred and patch in self.grams and patch not in kept:
                    self.live_bytes -= self.grams.pop(patch).nbytes

    def forget(self, keys) -> None:
        """``keys`` will not be asked for again: the Grams and kept inputs no other consumer reads are dropped."""
        with self.lock:
            gone = {self.patch.pop(key) for key in set(keys) & set(self.patch)}
            remaining = set(self.patch.values())
            for patch in gone - remaining:
                if patch in self.grams:
                    self.live_bytes -= self.grams.pop(patch).nbytes
            needed = {self.node[patch].input[0] for patch in remaining & self.deferred}
            for name in [n for n in self.inputs if n not in needed]:
                del self.inputs[name]


def _consumer_grams(model, consumers: dict[str, tuple], feeds: list[dict[str, np.ndarray]],
                    ridge: float, clock=None, shapes: dict | None = None) -> dict[str, np.ndarray]:
    """Every consumer's Gram at once (one array per shared patch), without deferral: what the tests compare the
    bounded :class:`ConsumerGrams` against."""
    grams = ConsumerGrams(model, consumers, feeds, ridge, clock, shapes, defer=False)
    return {key: grams[key] for key in grams}


def _patch_key(node, features: int) -> tuple:
    """What decides a consumer's input features: the tensor, and for a Conv its patch geometry."""
    if node.op_type != "Conv":
        return (node.input[0], features)
    return (node.input[0], features, tuple(get_attr(node, "kernel_shape") or ()), tuple(get_attr(node, "pads") or ()),
            tuple(get_attr(node, "strides") or ()), tuple(get_attr(node, "dilations") or ()))


def _width(node, x: np.ndarray, features: int) -> int:
    """The number of input features the consumer's rows of ``x`` have (im2col patch width for a Conv)."""
    if node.op_type == "Conv":
        kh, kw = _kernel(node, features, x.shape[1])
        return int(x.shape[1]) * kh * kw
    return int(x.shape[-1])


def _features(node, x: np.ndarray, features: int, sampler=None) -> np.ndarray | None:
    """The consumer's input as float32 rows of features (im2col patches for a Conv), only the rows ``sampler``
    picks; None if they do not match."""
    x = x.astype(np.float32, copy=False)
    if node.op_type == "Conv":
        rows = _patches(x, node, _kernel(node, features, x.shape[1]), sampler)[0]
    else:
        rows = x.reshape(-1, x.shape[-1])
        picked = sampler.pick(rows.shape[0]) if sampler is not None else None
        rows = rows if picked is None else rows[picked]
    return rows if rows.shape[1] == features else None


def _kernel(node, features: int, channels: int) -> tuple[int, int]:
    shape = get_attr(node, "kernel_shape")
    if shape:
        return int(shape[0]), int(shape[1])
    side = round(float(np.sqrt(features // channels)))
    return side, side
