"""The runs behind each sensitivity point: the model with one group's consumer weights masked (and refitted).

A point changes only the weights of the group's consumers, so only the nodes downstream of those consumers can
change. Where every consumer weight is an initializer of the main graph, :class:`Probe` cuts, per group, the part
of the graph downstream of its consumers into a session of its own (built once per group): the tensors that cross
into it come from one run of the original model (per measured sample, kept until the last group that reads them;
with a bounded heap, ``--low-memory``, one run per window of consecutive groups, :data:`CAPTURE_SHARE`), whose
graph outputs are also the reference the points are compared with; the group's consumer weights are its graph
inputs (fed per point, from the original arrays, held once) and every other weight stays a constant initializer,
so onnxruntime folds BatchNorm into convolutions, fuses activations and prepacks weights. Those constant weights
are declared as external data at their place in the user's model files where they still hold the same bytes
(:mod:`~onnxprune.stored_weights`: onnxruntime then reads them there one at a time instead of copying all of ours
while it optimises), else handed over as OrtValues. Graph outputs outside the cut are the original's. Elsewhere (weights in ``Constant`` nodes or subgraphs) each point serialises the masked
model into a new session. :class:`Savings` counts the MACs and parameters a point saves; the points' refit is
:class:`~onnxprune.probe_refit.Refit`.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from .analysis.cost import node_key
from .analysis.groups import Analysis
from .calibration import StageClock
from .graph import Weight, subgraph_reads, weight_bytes
from .heap import heap_bounded
from .probe_refit import Refit  # noqa: F401  (the points' refit, imported from here)
from .sessions import create_session, inference_session, model_header, owned, session_options
from .stored_weights import IN_MEMORY, StoredWeights, Verified, declare_external

logger = logging.getLogger(__name__)

#: what onnxruntime raises when it refuses a graph or a run (none derives from RuntimeError)
ORT_ERRORS = (ort_state.Fail, ort_state.InvalidGraph, ort_state.InvalidArgument, ort_state.NotImplemented,
              ort_state.RuntimeException, RuntimeError)

Outputs = list[list[np.ndarray]]

#: with a bounded heap (``--low-memory``) a capture run of the original yields the crossing tensors of consecutive
#: plans up to this share of the model's weight bytes (ResNet-50: 144 MB of crossing tensors on 4 samples, 97 MB of
#: weights: 4 runs instead of 1; MiniLM-shaped: 25 MB of 86 MB, one run; at 0.25 MiniLM's second run, late in the
#: loop beside the refit's Grams, raised its allocation peak from 482 to 543 MB)
CAPTURE_SHARE = 0.5


def run_model(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> Outputs:
    """The outputs of ``model`` on each feed (one session, every graph optimisation; the weights handed over as
    arrays, not serialized: the same outputs bit for bit)."""
    session = inference_session(model, options=session_options(log_level=3))
    return [[owned(value) for value in session.run(None, feed)] for feed in feeds]


class Downstream:
    """Per plan (a set of consumer weight names), a session over the nodes downstream of the weights' readers."""

    def __init__(self, model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], plans: list[set[str]],
                 arrays: dict[str, np.ndarray] | None = None, window: int | None = None,
                 sizes: dict[str, int] | None = None, stored: StoredWeights | None = None):
        self.model, self.feeds = model, feeds
        graph = model.graph
        self.initializers = {init.name: init for init in graph.initializer}
        self.stored: Verified | None = (stored.verified(list(graph.initializer), arrays)
                                        if stored is not None else None)
        self.inputs = {i.name: i for i in graph.input if i.name not in self.initializers}
        self.outputs = [o.name for o in graph.output]
        self.reads = [[n for n in [*node.input, *subgraph_reads(node)] if n] for node in graph.node]
        self.cuts = [self._cut(plan) for plan in plans]
        self.arrays = arrays or {}
        self.memory: dict[str, tuple[np.ndarray, ort.OrtValue] | None] = {}
        self.starts = self._windows(window, sizes or {})
        self.values: list[dict[str, np.ndarray]] = []
        self.last_use: dict[str, int] = {}
        self.first: list[dict[str, np.ndarray]] | None = None  # the graph outputs of the first capture run
        self.window = -1
        self._load(0)
        self.current: tuple[int, object] | None = None

    def _windows(self, window: int | None, sizes: dict[str, int]) -> list[int]:
        """The first plan of each capture run: one run for every plan (``window`` None), else runs over consecutive
        plans whose crossing tensors (bytes in ``sizes``) stay within ``window`` bytes (a plan over it alone). The
        windows are cut from the last plan back: the later runs, which come while the refit holds the wider later
        consumers' Grams, are the fewer."""
        if window is None:
            return [0]
        def size(names) -> int:
            return sum(sizes.get(name, 0) for name in names)
        starts, held = [], set()
        for index in range(len(self.cuts) - 1, -1, -1):
            union = held | set(self.cuts[index]["boundary"])
            if held and size(union) > window:
                starts.append(index + 1)
                union = set(self.cuts[index]["boundary"])
            held = union
        return [0, *reversed(starts)]

    def _load(self, window: int) -> None:
        """The crossing tensors of window ``window``'s plans, from a run of the original (the previous window's
        tensors go first); the graph outputs stay those of the first run."""
        first = self.starts[window]
        stop = self.starts[window + 1] if window + 1 < len(self.starts) else len(self.cuts)
        self.values, self.window = [], window
        needed = {name for cut in self.cuts[first:stop] for name in cut["boundary"]}
        self.last_use = {name: max(i for i in range(first, stop) if name in self.cuts[i]["boundary"])
                         for name in needed}
        self.values = self._capture(sorted(needed))
        if self.first is None:
            self.first = [{name: values[name] for name in self.outputs} for values in self.values]
        else:
            for values, outputs in zip(self.values, self.first):
                values.update(outputs)

    def _cut(self, plan: set[str]) -> dict:
        """The nodes downstream of the plan's weights (graph order), the tensors crossing into them, its outputs."""
        produced: set[str] = set()
        nodes, outside = [], set()
        for node, reads in zip(self.model.graph.node, self.reads):
            if any(name in plan or name in produced for name in reads):
                nodes.append(node)
                outside.update(name for name in reads if name not in produced)
                produced.update(node.output)
        constants = [node for node in self.model.graph.node  # a constant stays a constant (shape values fold)
                     if node.op_type == "Constant" and not node.input and outside.intersection(node.output)]
        crossing = outside - {o for c in constants for o in c.output} - set(self.initializers) - set(self.inputs)
        return {"nodes": constants + nodes, "boundary": sorted(crossing), "plan": sorted(plan),
                "graph_inputs": sorted(outside & set(self.inputs)),
                "initializers": sorted((outside & set(self.initializers)) - plan),
                "outputs": [name for name in self.outputs if name in produced]}

    def _capture(self, names: list[str]) -> list[dict[str, np.ndarray]]:
        """The original's graph outputs and the crossing tensors ``names``, per feed (one run each). The session
        is the original's (every graph optimisation), its larger weights handed over as OrtValues: those the cuts
        share (:meth:`_value`), the others made for this session alone; no proto copy, no serialized weights."""
        header = model_header(self.model)
        header.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in self.outputs)
        read = {name for cut in self.cuts for name in cut["initializers"]}
        external: dict[str, tuple[np.ndarray, ort.OrtValue]] = {}  # the arrays live as long as the session
        stored = self._stored()
        for tensor in self.model.graph.initializer:
            if stored is not None and stored.declare(header.graph, tensor):
                continue
            if tensor.name in read:
                self._value(tensor.name)
                held = self.memory[tensor.name]
            else:
                held = _ort_value(tensor, self.arrays.get(tensor.name))
            if held is None:
                header.graph.initializer.append(tensor)
            else:
                declare_external(header.graph, tensor, location=IN_MEMORY)
                external[tensor.name] = held
        options = _probe_options(stored)
        if external:
            options.add_external_initializers(list(external), [value for _, value in external.values()])
        session = create_session(header, options)
        wanted = [o.name for o in session.get_outputs()]
        runs = [dict(zip(wanted, session.run(None, feed))) for feed in self.feeds]
        del session, options, external  # then arrays of their own (owned): one viewing the session's memory keeps
        for values in runs:  # its whole arena after it is gone
            for name, value in values.items():
                values[name] = owned(value)
        return runs

    def reference(self) -> Outputs:
        """The original's graph outputs on each feed, from the capture run (the arrays the runs fall back on)."""
        return [[values[name] for name in self.outputs] for values in self.first]

    def usable(self) -> bool:
        """Every crossing tensor came back as an array (sequences and optionals cannot be fed back as they are)."""
        return all(isinstance(v, np.ndarray) for values in self.values for v in values.values())

    def run(self, index: int, weights: dict[str, np.ndarray]) -> Outputs:
        """The model's outputs with plan ``index``'s weights replaced by ``weights`` (the rest as the original)."""
        cut = self.cuts[index]
        window = bisect.bisect_right(self.starts, index) - 1
        if window != self.window:  # the crossing tensors of the plans from here on
            self.current = None
            self._load(window)
            if not self.usable():
                raise RuntimeError("a crossing tensor is not an array")
        if self.current is None or self.current[0] != index:
            self.current = None  # the previous group's session goes before the next one is built
            self.current = (index, self._session(cut))
        session = self.current[1]
        results = []
        for feed, values in zip(self.feeds, self.values):
            fed = {**{n: values[n] for n in cut["boundary"]}, **{n: feed[n] for n in cut["graph_inputs"]},
                   **{n: weights[n] for n in cut["plan"]}}
            produced = dict(zip(cut["outputs"], map(owned, session.run(cut["outputs"], fed))))  # see _capture
            results.append([produced[name] if name in produced else values[name] for name in self.outputs])
        return results

    def done(self, index: int) -> None:
        """Plan ``index`` is measured: drop its session and the crossing tensors no later plan reads."""
        self.current = None
        for name in [n for n, last in self.last_use.items() if last <= index]:
            del self.last_use[name]
            for values in self.values:
                values.pop(name, None)

    def _sub_model(self, cut: dict, stored: Verified | None) -> onnx.ModelProto:
        """The cut as a model: crossing tensors and plan weights are inputs, other weights initializers (at their
        ranges in ``stored``, else OrtValues handed over at session creation, else in the graph)."""
        def typed(name: str, array: np.ndarray) -> onnx.ValueInfoProto:
            elem = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
            return onnx.helper.make_tensor_value_info(name, elem, [None] * array.ndim)

        first = self.values[0]
        inputs = [self.inputs[n] for n in cut["graph_inputs"]] + [typed(n, first[n]) for n in cut["boundary"]]
        inputs += [onnx.helper.make_tensor_value_info(n, self.initializers[n].data_type, list(self.initializers[n].dims))
                   for n in cut["plan"]]
        outputs = [o for o in self.model.graph.output if o.name in cut["outputs"]]
        graph = onnx.helper.make_graph(cut["nodes"], self.model.graph.name or "probe", inputs, outputs)
        for name in cut["initializers"]:
            tensor = self.initializers[name]
            if stored is not None and stored.declare(graph, tensor):
                continue
            if self._value(name) is None:
                graph.initializer.append(tensor)
            else:  # declared only: its data is handed over at session creation
                declare_external(graph, tensor, location=IN_MEMORY)
        sub = onnx.helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        sub.functions.extend(self.model.functions)
        return sub

    def _session(self, cut: dict) -> ort.InferenceSession:
        """The cut's session; its larger weights read from the model's files (:meth:`_stored`) or the OrtValues
        made once, never serialized per group."""
        stored = self._stored()
        options = _probe_options(stored)
        declared = stored.entries if stored is not None else {}
        names = [n for n in cut["initializers"] if n not in declared and self._value(n) is not None]
        if names:
            options.add_external_initializers(names, [self._value(n) for n in names])
        return create_session(self._sub_model(cut, stored), options)

    def _stored(self) -> Verified | None:
        """The weights' ranges in the model's files while those are unchanged (None: none usable)."""
        return self.stored if self.stored is not None and self.stored.usable() else None

    def _value(self, name: str) -> ort.OrtValue | None:
        """A larger initializer as an OrtValue over its array, made once (None: it stays in the graph). Its values
        are the original's: a point changes only its own plan's weights, which are inputs of its cut."""
        if name not in self.memory:
            self.memory[name] = _ort_value(self.initializers[name], self.arrays.get(name))
        found = self.memory[name]
        return None if found is None else found[1]


def _probe_options(stored: Verified | None = None) -> ort.SessionOptions:
    """The probe's session options: every graph optimisation; with the heap bounded (``--low-memory``) no CPU memory
    arena (a run's activations go back when it ends instead of staying with the session; the same outputs); the
    folder of ``stored``'s files where weights are read there."""
    options = session_options(log_level=3)
    if heap_bounded():
        options.enable_cpu_mem_arena = False
    if stored is not None:
        stored.configure(options)
    return options


def _ort_value(tensor: onnx.TensorProto, array: np.ndarray | None = None
               ) -> tuple[np.ndarray, ort.OrtValue] | None:
    """A larger initializer's values (``array`` when given) and an OrtValue over them; None for a small,
    external, string or bfloat16 tensor (it stays in the graph)."""
    if (int(np.prod(tensor.dims, dtype=np.int64)) <= 256 or tensor.data_location == onnx.TensorProto.EXTERNAL
            or tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.BFLOAT16)):
        return None
    array = np.ascontiguousarray(numpy_helper.to_array(tensor) if array is None else array)
    return array, ort.OrtValue.ortvalue_from_numpy(array)


def capture_window(analysis: Analysis, feeds: list[dict[str, np.ndarray]]) -> tuple[int, dict[str, int]]:
    """The bytes of crossing tensors one capture run may yield (:data:`CAPTURE_SHARE` of the weights) and each
    tensor's estimated bytes on ``feeds``: its analysed shape's elements (4 bytes each) scaled by the feeds' size
    against the analysed inputs'."""
    shapes = analysis.shapes or {}
    weights = weight_bytes(analysis.model)
    scale = 1.0
    for name in feeds[0] if feeds else []:
        dims = shapes.get(name)
        if dims and None not in dims and int(np.prod(dims)) > 0:
            scale = sum(feed[name].size for feed in feeds) / int(np.prod(dims))
            break
    sizes = {name: int(4 * scale * np.prod([d or 1 for d in dims], dtype=np.int64))
             for name, dims in shapes.items() if dims is not None}
    return int(CAPTURE_SHARE * weights), sizes


def fed_consumers(analysis: Analysis) -> bool:
    """Whether every consumer weight is an initializer of the main graph: a :class:`Probe` then feeds them to its
    sessions from :class:`HeldWeight` arrays and never writes the analysed model (no copy of it is needed)."""
    return all(e.weight.kind == "initializer" and e.weight.graph is analysis.model.graph
               for e in analysis.edits if e.role == "consumer")


@dataclass(eq=False)
class HeldWeight(Weight):
    """A weight whose values live in a numpy array: writing it leaves the protobuf alone. upb keeps every byte
    string ever assigned to a model's tensors until the whole model is freed, so a point's mask, refit and restore
    written into the proto would add three copies of its consumer weights per point (ResNet-50: ~1.2 GB over the
    default allocation)."""

    values: np.ndarray | None = None

    @classmethod
    def of(cls, weight: Weight, values: np.ndarray | None = None) -> HeldWeight:
        """``weight`` held in ``values`` (default: a copy of its own). The array is never written in place: a
        write replaces it, so an array shared with others (the probe's originals) stays as it is."""
        return cls(weight.name, weight.kind, weight.tensor, weight.graph, weight.node,
                   weight.array() if values is None else values)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def array(self) -> np.ndarray:
        return self.values.copy()

    def set_array(self, values: np.ndarray) -> None:
        self.values = np.array(values, dtype=self.dtype, order="C", copy=True)


class Probe:
    """Runs the analysed model with some consumer weights masked (and refitted) by ``change``; the weights are
    restored after each point. Where the consumer weights are fed (:func:`fed_consumers`), ``change`` writes
    :class:`HeldWeight` arrays, else the analysed model's weights."""

    def __init__(self, analysis, feeds: list[dict[str, np.ndarray]], plans: list[set[str]] | None = None,
                 clock: StageClock | None = None, stored: StoredWeights | None = None):
        self.analysis, self.feeds, self.clock = analysis, feeds, clock or StageClock()
        self.edits = [e for e in analysis.edits if e.role == "consumer"]
        weights = {e.weight.name: e.weight for e in self.edits}
        self.downstream = self.session = None
        if weights and fed_consumers(analysis):
            self.weights = {name: w.values() for name, w in weights.items()}  # the originals, never written
            held = {name: HeldWeight.of(w, self.weights[name]) for name, w in weights.items()}
            for edit in self.edits:  # points write these arrays, never the protobuf (whose arena would keep each)
                edit.weight = held[edit.weight.name]
            if plans is not None:
                window, sizes = capture_window(analysis, feeds) if heap_bounded() else (None, None)
                self.downstream = Downstream(analysis.model, feeds, plans, self.weights, window, sizes, stored)
                if not self.downstream.usable():
                    self.downstream = None
            if self.downstream is None:
                self._whole_model()

    def reference(self) -> Outputs | None:
        """The original model's outputs on the feeds when the downstream capture ran them (the same session as
        :func:`run_model`'s, with more outputs: the same values bit for bit), else None."""
        return self.downstream.reference() if self.downstream is not None else None

    def _whole_model(self) -> None:
        """One session over the whole model with every consumer weight as an input (the other weights never change,
        so it may be built while a point's change is applied)."""
        self.downstream = None
        self.session = create_session(weights_as_inputs(self.analysis.model, set(self.weights)),
                                      session_options(log_level=3))

    def outputs(self, keep: np.ndarray, change: Callable[[], None], plan: int | None = None) -> Outputs:
        """The model's outputs on the feeds after ``change`` (the mask of ``keep`` and a refit, timed as ``refit``;
        the runs as ``probe``); ``plan`` is the index of the plan covering ``keep``'s weights (downstream runs)."""
        stage = self.clock.stage
        touched = [e for e in self.edits if not keep[e.ids].all()]
        saved = [(e.weight, self.weights[e.weight.name] if isinstance(e.weight, HeldWeight) else e.weight.array())
                 for e in touched]  # a held weight goes back to its original array, not to a copy of it
        with stage("refit"):
            change()
        try:
            with stage("probe"):
                if self.downstream is not None and plan is not None:
                    try:
                        return self.downstream.run(plan, self._fed(touched))
                    except ORT_ERRORS as exc:  # onnxruntime refused a cut: measure on the whole model instead
                        logger.debug("downstream probe off: %s", exc)
                        self._whole_model()
                if self.session is not None:
                    return [self.session.run(None, {**feed, **self._fed(touched)}) for feed in self.feeds]
                return run_model(self.analysis.model, self.feeds)
        finally:
            for weight, values in reversed(saved):
                if isinstance(weight, HeldWeight):
                    weight.values = values
                else:
                    weight.set_array(values)

    def _fed(self, touched: list) -> dict[str, np.ndarray]:
        """Every consumer weight as fed: the changed ones as the point left them, the rest original."""
        return {**self.weights, **{e.weight.name: e.weight.values for e in touched}}  # read in place

    def done(self, plan: int) -> None:
        """Plan ``plan``'s points are measured (frees its session and tensors)."""
        if self.downstream is not None:
            self.downstream.done(plan)


def weights_as_inputs(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers ``names`` are graph inputs instead (fed on every run)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph = probe.graph
    listed = {i.name for i in graph.input}
    kept = []
    for init in graph.initializer:
        if init.name not in names:
            kept.append(init)
        elif init.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return probe


class Savings:
    """MACs and params a point saves, summed over the groups, as ``StructuredPrunePass._group_stats`` counts them
    (the same sums in the same order), with what does not change between points computed once."""

    def __init__(self, analysis: Analysis, groups: list, macs: dict[str, int]):
        positions = {id(n): i for i, n in enumerate(analysis.model.graph.node)}
        self.group_of = np.full(analysis.num_channels, -1, dtype=np.int64)
        for g in groups:
            for ids in g.units:
                self.group_of[ids] = g.id
            for ids, _ in g.frozen_units:
                self.group_of[ids] = g.id
        self.counted = [g.id for g in groups if g.units]
        self.size = len(groups)
        edits = [e for e in analysis.edits if len(e.ids)]  # an edit without channels never counts
        self.edits = [(e.ids, e.weight.size / len(e.ids), e.role != "param",
                       macs.get(node_key(e.node, positions.get(id(e.node), -1)), 0)) for e in edits]
        self.flat = np.concatenate([e.ids for e in edits]) if edits else np.zeros(0, np.int64)
        self.starts = np.cumsum([0] + [len(e.ids) for e in edits])[:-1]

    def __call__(self, keep: np.ndarray) -> tuple[int, int]:
        params, macs_removed = np.zeros(self.size), np.zeros(self.size)
        hit = np.logical_or.reduceat(~keep[self.flat], self.starts) if len(self.flat) else []
        for index in np.flatnonzero(hit):
            ids, per_slice, counts_macs, node_mac = self.edits[index]
            dropped = ~keep[ids]
            for gid, count in zip(*np.unique(self.group_of[ids[dropped]], return_counts=True)):
                params[gid] += per_slice * count
                if counts_macs:
                    macs_removed[gid] += node_mac * count / len(ids)
        return sum(int(macs_removed[g]) for g in self.counted), sum(int(params[g]) for g in self.counted)
