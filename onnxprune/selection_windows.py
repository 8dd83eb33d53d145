"""Windows of the reconstruction-aware selection under ``--low-memory`` (:func:`~onnxprune.scoring.reconstruction_scores`):
consecutive groups whose consumers' Grams or kept inputs fit a budget derived from their weights, and where each
window's capture starts (the inputs, or the frontier the previous capture kept)."""

from __future__ import annotations

import numpy as np
import onnx

from .analysis.groups import Analysis, ChannelGroup
from .consumer_grams import _patch_key
from .graph import free_names, weight_bytes

#: with the heap bounded, a window's consumers hold at most this share of their weights' bytes in Grams and inputs
WINDOW_SHARE = 1.0


#: a kept frontier takes at most this share of the largest consumer input over the calibration feeds (or the model's
#: weight bytes, if more)
FRONTIER_SHARE = 0.5


def _window_budget(consumers: dict[str, tuple]) -> float:
    """Bytes a window's consumers may hold in Grams and inputs: ``WINDOW_SHARE`` of their weights' bytes."""
    return WINDOW_SHARE * sum(matrix.nbytes for _, _, matrix, _ in consumers.values())


def consumer_input_bytes(analysis: Analysis, consumers: dict[str, tuple], feeds: list[dict[str, np.ndarray]]) -> int:
    """The largest consumer input over the calibration feeds, in bytes (float32, from the analysis shapes)."""
    source = CaptureSource(analysis.model, feeds, 0, analysis.shapes)
    return max((source.bytes([node.input[0]]) for node, *_ in consumers.values()), default=0)


def _feed_bytes(shapes: dict, names, feeds: list[dict[str, np.ndarray]]) -> int:
    """Bytes of the tensors ``names`` over every feed, from the analysis shapes (float32, the batch axis the feeds'
    largest, unknown dims counted as 1)."""
    batch = max((int(v.shape[0]) if v.ndim else 1 for feed in feeds for v in feed.values()), default=1)
    return sum(4 * batch * len(feeds) *
               int(np.prod([d if isinstance(d, int) and d > 0 else 1 for d in (shapes.get(n) or [])[1:]]))
               for n in names)


class CaptureSource:
    """Where each window's capture starts: the calibration feeds, or the frontier the previous window's capture kept,
    cut before the next window's first consumer input is computed (the tensors computed before that node that it or
    later nodes read, plus the graph inputs). A frontier is kept when it takes at most ``FRONTIER_SHARE`` of
    ``budget`` bytes over every feed (``budget``: the largest consumer input over the calibration feeds, one layer's
    activations: a capture holds the frontier it starts from and the one it keeps) or, if more, the model's weight
    bytes; else the next capture recomputes from the last kept source. The captures run unoptimised sessions node by
    node, so a tensor computed from a frontier equals the one computed from the inputs bit for bit."""

    def __init__(self, model, feeds: list[dict[str, np.ndarray]], budget: float, shapes: dict):
        self.inputs, self.feeds, self.shapes = feeds, feeds, shapes
        self.budget = max(FRONTIER_SHARE * budget, weight_bytes(model)) if budget else 0
        self.producer = {out: i for i, node in enumerate(model.graph.node) for out in node.output if out}
        self.nodes_outputs = [[out for out in node.output if out] for node in model.graph.node]
        self.reads = [[n for n in node.input if n] + [n for attr in node.attribute for sub in
                       ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs))
                       for n in free_names(sub)] for node in model.graph.node]
        self.last_reads = self._last_reads()

    def bytes(self, names) -> int:
        """Bytes of ``names`` over every feed (:func:`_feed_bytes`)."""
        return _feed_bytes(self.shapes, names, self.inputs)

    def frontier(self, later: set[str], after: set[str] | None = None) -> set[str] | None:
        """The frontier before the first producer of ``later`` (None: nothing to cut, or over the budget); with
        ``after`` (the tensors this capture computes) the narrowest cut from there on, by the bytes it keeps."""
        cut = min((self.producer.get(n, -1) for n in later), default=-1)
        if not self.budget or cut <= 0:
            return None
        if after:
            cut = self._narrowest(max((self.producer.get(n, -1) for n in after), default=-1) + 1, cut)
        names = {n for reads in self.reads[cut:] for n in reads if 0 <= self.producer.get(n, -1) < cut}
        return names if names and self.bytes(names) <= self.budget else None

    def _narrowest(self, start: int, stop: int) -> int:
        """The cut in ``start..stop`` (a node index: the frontier holds what nodes before it computed and nodes
        from it read) whose frontier takes the fewest bytes; the latest of equals. Linear in the nodes passed."""
        last, ends = self.last_reads
        start = max(1, min(start, stop))
        held = {n for n, end in last.items() if self.producer[n] < start <= end}
        size = self.bytes(held)
        best, smallest = start, size
        for cut in range(start + 1, stop + 1):  # node cut - 1 runs: its outputs come in, its last reads go
            outputs = [n for n in self.nodes_outputs[cut - 1] if last.get(n, -1) >= cut]
            gone = [n for n in ends[cut - 1] if n in held]
            held.difference_update(gone)
            held.update(outputs)
            size += self.bytes(outputs) - self.bytes(gone)
            if size <= smallest:
                best, smallest = cut, size
        return best

    def _last_reads(self) -> tuple[dict[str, int], list[list[str]]]:
        """Per computed tensor the index of the last node that reads it, and per node the tensors it reads last."""
        last: dict[str, int] = {}
        for index, reads in enumerate(self.reads):
            for name in reads:
                if 0 <= self.producer.get(name, -1):
                    last[name] = index
        ends: list[list[str]] = [[] for _ in self.reads]
        for name, index in last.items():
            ends[index].append(name)
        return last, ends

    def advance(self, frontier: set[str] | None, values: list[dict[str, np.ndarray]]) -> None:
        """Start later captures from ``values`` (a frontier per feed) when they fit the budget."""
        if frontier is None or len(values) != len(self.inputs):
            return
        if sum(x.nbytes for kept in values for x in kept.values()) <= self.budget:
            self.feeds = [{**feed, **kept} for feed, kept in zip(self.inputs, values)]


def consumer_windows(analysis: Analysis, groups: list[ChannelGroup], consumers: dict[str, tuple],
             readers: dict[str, list[int]], feeds: list[dict[str, np.ndarray]]) -> list[range]:
    """Consecutive groups whose consumers' held bytes (per shared patch the smaller of its Gram, 8·D², and its
    input over the calibration feeds, as :class:`ConsumerGrams` keeps them) stay within the consumers' weight
    bytes (times ``WINDOW_SHARE``); a group over it alone is a window of its own."""
    held: dict[tuple, int] = {}
    for key, (node, _, matrix, _) in consumers.items():
        size = _feed_bytes(analysis.shapes, [node.input[0]], feeds)
        held[_patch_key(node, matrix.shape[0])] = min(8 * matrix.shape[0] ** 2, size)
    budget = _window_budget(consumers)
    patches = {key: _patch_key(node, matrix.shape[0]) for key, (node, _, matrix, _) in consumers.items()}
    of_group: list[set[tuple]] = [set() for _ in groups]
    for key, numbers in readers.items():
        for number in numbers:
            of_group[number].add(patches[key])
    windows, start, window = [], 0, set()
    for number, patches_read in enumerate(of_group):
        union = window | patches_read
        if number > start and sum(held[p] for p in union) > budget:
            windows.append(range(start, number))
            start, union = number, set(patches_read)
        window = union
    windows.append(range(start, len(groups)))
    return windows
