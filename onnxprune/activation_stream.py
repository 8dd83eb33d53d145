"""Activations streamed through a model layer after layer (:class:`ActivationStream`): each node runs once per
calibration feed, and the tensors later steps still read are kept between steps within a byte budget
(:class:`KeptBudget`), the rest recomputed from the feeds where it does not fit."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from .graph import free_names
from .heap import trim_heap
from .sample_parts import per_sample, placeholder, run_in_parts
from .sessions import FedSession, fed_session, lean_options, samples_independent

#: the share of the largest tensor over the calibration set a derived :class:`KeptBudget` allows
DERIVED_SHARE = 0.75


class KeptBudget:
    """Bytes the :class:`ActivationStream` objects sharing it may keep between steps, all feeds and streams together.
    ``limit`` None: derived from the data, ``DERIVED_SHARE`` of the largest tensor the streams have computed so far
    (or a caller allows, see :meth:`allow`) over the whole calibration set (``--low-memory``): what the streams keep
    and what a step computes beside it stay within about one layer's activations."""

    def __init__(self, limit: int | None = None):
        self.limit, self.derived = limit, 0
        self.reserved = 0  # bytes held beside the streams' within the budget (a caller's, counted in held())
        self.streams: weakref.WeakSet[ActivationStream] = weakref.WeakSet()  # no cycle: streams go with their owner

    def allowed(self) -> int:
        """The bytes that may be kept now."""
        return self.limit if self.limit is not None else int(DERIVED_SHARE * self.derived)

    def held(self) -> int:
        """The bytes the streams keep now, and those :attr:`reserved`."""
        return self.reserved + sum(stream.kept_bytes() for stream in self.streams)

    def note(self, values: Iterable[np.ndarray], share: float) -> None:
        """Derive the limit from computed tensors of one feed holding ``share`` of the calibration samples."""
        self.allow(max((v.nbytes for v in values), default=0) / max(share, 1e-12))

    def allow(self, nbytes: float) -> None:
        """Raise the derived limit to ``nbytes`` (a caller knows a larger tensor the streams do not compute)."""
        self.derived = max(self.derived, int(nbytes))


#: ops whose output is no larger than their largest input: the stream runs them ahead of a step when they free
#: every computed tensor they read (a residual Add's output is kept instead of both of its inputs)
AHEAD_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Erf", "Gelu",
                       "Clip", "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus", "Neg", "Abs", "Sqrt", "Exp",
                       "Identity", "BatchNormalization", "Softmax", "LayerNormalization"})


#: ops whose kernels give other bits for a sample's values in a batch of another size (onnxruntime's matrix products
#: pick their path by the rows: a Gemm over 3 samples differs from those samples' rows of a batch of 16), and
#: recurrent or attention ops built on them: a stream session running one runs whole feeds
WHOLE_BATCH_OPS = frozenset({"Gemm", "MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "Einsum", "Attention",
                             "MultiHeadAttention", "LSTM", "GRU", "RNN", "ConvTranspose", "ConvInteger", "QLinearConv"})


@dataclass
class _Step:
    """One step of an :class:`ActivationStream`: the tensors asked for, the nodes it runs, the frontier after it, the
    segment, available names and outputs of a feed keeping the frontier, and the sessions built, per path (True: a
    feed keeping the frontier, else the names the feed keeps)."""

    names: list[str]
    ids: set[int]
    frontier: set[str]
    whole: tuple[list[onnx.NodeProto], set[str], list[str]]
    sessions: dict[bool | frozenset[str], tuple[Any, list[str], list[str]]] = field(default_factory=dict)


class ActivationStream:
    """Runs ``model`` on every feed step by step, computing each node once.

    A step (:meth:`run`) computes only what its requested tensors need beyond the tensors kept from earlier steps;
    the tensors that nodes not yet run still read (the frontier) are kept, per feed, for later steps, and nothing
    else: a feed's consumed tensors go as soon as its step has run. Nodes that only shrink the frontier (an
    elementwise op reading no ``live`` value that frees every computed tensor it reads) run with the step. Capturing
    the inputs of layer after layer thus costs about one forward pass over the calibration data instead of one per
    step. Kept tensors are bounded by ``budget`` (bytes, or a :class:`KeptBudget` shared with other streams): a feed
    whose frontier does not fit keeps what it kept when it last fitted (nothing at first) and later steps recompute
    it from there, its frontier too, kept again once it fits. Values must not change once computed: a caller that changes weights (fed through
    ``live``) only changes those of nodes that have not run yet. Streams over two versions of one model may share
    ``shared`` (see :func:`~onnxprune.sessions.fed_session`): the weights both hold unchanged are then held once.
    ``weights`` holds the values of initializers ``model`` only declares (see :func:`~onnxprune.refit.detach_weights`),
    fed to the sessions as they are. ``samples`` > 0: where ``model`` computes every sample on its own, a feed of more
    samples runs ``samples`` at a time (:func:`~onnxprune.sample_parts.run_in_parts`) in the sessions that run no
    :data:`WHOLE_BATCH_OPS` node: the same values, a run's memory for a few samples."""

    def __init__(self, model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
                 budget: int | KeptBudget = 1 << 30, shared: Mapping[str, tuple[bytes, np.ndarray]] | None = None,
                 weights: dict[str, np.ndarray] | None = None, samples: int = 0):
        self.model, self.feeds, self.shared, self.weights = model, feeds, shared, weights or {}
        self.declared = set(self.weights)
        self.samples = samples if samples > 0 and samples_independent(model) else 0
        self.whole_runs: weakref.WeakSet[FedSession] = weakref.WeakSet()  # sessions whose runs do not part
        #: tensor -> consumer(part, start, stop) -> taken, set by a caller: a computed tensor no later step reads is
        #: handed over sample part by sample part (the whole feed's at once where runs do not part) and yielded as a
        #: placeholder (:func:`~onnxprune.sample_parts.placeholder`), never joined, where the consumer takes it: the
        #: refit gathers a Conv's sampled targets so
        self.consumers: dict[str, Any] = {}
        self.budget = budget if isinstance(budget, KeptBudget) else KeptBudget(budget)
        self.budget.streams.add(self)
        self.kept: list[dict[str, np.ndarray]] = [{} for _ in feeds]
        self.whole = [True] * len(feeds)  # whether the feed keeps the frontier (else it is recomputed)
        self.frontier: set[str] = set()
        self.producer = {out: node for node in model.graph.node for out in node.output if out}
        self.position = {id(node): i for i, node in enumerate(model.graph.node)}
        self.nodes = {id(node): node for node in model.graph.node}
        self.constants = {i.name for i in model.graph.initializer}
        self.reads: dict[int, list[str]] = {}
        self.readers: dict[str, list[int]] = {}
        for node in model.graph.node:
            names = [n for n in node.input if n]
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    names.extend(free_names(sub))
            self.reads[id(node)] = names
            for name in names:
                self.readers.setdefault(name, []).append(id(node))
        self.done: set[int] = set()
        self.released: set[str] = set()  # initializers no later step reads (see release_weights)
        self.counts = [next(iter(feed.values())).shape[0] if feed else 1 for feed in feeds]
        self.shares = [n / max(sum(self.counts), 1) for n in self.counts]
        self.sampled = set(feeds[0]) if feeds else set()  # the tensors computed from the inputs: per sample
        for node in model.graph.node:
            if any(name in self.sampled for name in self.reads[id(node)]):
                self.sampled.update(out for out in node.output if out)

    def kept_bytes(self, number: int | None = None) -> int:
        """Bytes of the tensors kept between steps, every feed's or feed ``number``'s."""
        kept = self.kept if number is None else [self.kept[number]]
        return sum(v.nbytes for values in kept for v in values.values())

    def run(self, names: list[str], live: dict[str, np.ndarray] | None = None,
            clock: Any = None) -> Iterator[dict[str, np.ndarray]]:
        """Per feed, the tensors ``names``; ``live`` maps constants (initializers, Constant outputs) to values fed as
        session inputs instead, so weights that change between steps need no new model copy. ``clock`` (a
        :class:`~onnxprune.calibration.StageClock`) times session building and runs as ``capture``."""
        live = live or {}
        step = self._step(names, live)
        self._commit(step)
        for number in range(len(self.feeds)):
            values = self._compute(step, number, live, clock)
            result = [{n: values[n] for n in names}]
            self._keep(number, {n: values[n] for n in step.frontier})
            del values
            yield result.pop()  # not held here while the caller computes the next feed

    def advance(self, names: list[str], live: dict[str, np.ndarray] | None = None, clock: Any = None) -> bool:
        """Take now the step a later :meth:`run` of ``names`` would take, returning nothing, when that shrinks what
        the first feed keeps (a layer's output kept instead of its wider input); False when it would not (nothing
        changed but the first feed's time)."""
        live = live or {}
        if not self.feeds or not self.whole[0]:
            return False
        step = self._step(names, live)
        values = self._compute(step, 0, live, clock)
        frontier = {n: values[n] for n in step.frontier}
        del values
        if sum(v.nbytes for v in frontier.values()) > sum(v.nbytes for v in self.kept[0].values()):
            return False
        self._commit(step)
        self._keep(0, frontier)
        del frontier
        for number in range(1, len(self.feeds)):
            values = self._compute(step, number, live, clock)
            self._keep(number, {n: values[n] for n in step.frontier})
            del values
        return True

    def stale_bytes(self) -> int:
        """Bytes kept by the feeds that no longer keep their frontier (what :meth:`forget_stale` would free)."""
        return 0 if self.released else sum(self.kept_bytes(n) for n, whole in enumerate(self.whole) if not whole)

    def forget_stale(self) -> None:
        """Drop what the feeds that no longer keep their frontier kept: each is recomputed from its inputs at the
        next step instead of from a tensor of an earlier step. Nothing once weights were released
        (:meth:`release_weights`: the inputs could not be run again)."""
        if not self.released:
            self.kept = [kept if whole else {} for kept, whole in zip(self.kept, self.whole)]

    def release_weights(self) -> set[str]:
        """Drop from :attr:`weights` the initializers no later step reads, returning every name released so far: once
        every feed keeps its frontier, each later step (a recomputed feed too) starts from tensors past the nodes
        run, so a weight whose readers have all run is not read again."""
        if all(self.whole):
            self.released |= {name for name in self.constants - self.released
                              if all(r in self.done for r in self.readers.get(name, []))}
            for name in self.released & set(self.weights):
                del self.weights[name]
        return self.released

    def _step(self, names: list[str], live: dict[str, np.ndarray]) -> _Step:
        """What computing ``names`` takes: the nodes to run beyond the frontier (with those run ahead), the session
        outputs of a feed keeping the frontier and of one recomputed from its inputs, the frontier after it."""
        available = set(self.feeds[0]) | self.frontier | set(live)
        segment = self._segment(names, available)
        segment = sorted(segment + self._ahead(segment, live), key=lambda node: self.position[id(node)])
        ids = {id(node) for node in segment}
        produced = [out for node in segment for out in node.output if out]
        wanted = [n for n in names if n not in available]
        later = [out for out in produced if out not in wanted and
                 any(r not in self.done and r not in ids for r in self.readers.get(out, []))]
        frontier = {out for out in self.frontier | set(produced)
                    if any(r not in self.done and r not in ids for r in self.readers.get(out, []))}
        return _Step(names, ids, frontier, (segment, available, wanted + later))

    def _commit(self, step: _Step) -> None:
        self.done |= step.ids
        self.frontier = step.frontier

    def _compute(self, step: _Step, number: int, live: dict[str, np.ndarray], clock: Any) -> dict[str, np.ndarray]:
        """Feed ``number``'s values after ``step``: its inputs, kept tensors, ``live`` and the step's outputs."""
        path = True if self.whole[number] else frozenset(self.kept[number])
        values = {**self.feeds[number], **self.kept[number], **live}
        if path not in step.sessions:
            if path is True:
                segment, available, outputs = step.whole
            else:  # from the tensors the feed kept when it last fitted (none: its inputs)
                segment, available = None, set(self.feeds[number]) | set(path) | set(live)
                outputs = list(dict.fromkeys(n for n in [*step.names, *sorted(step.frontier)] if n not in available))
            step.sessions[path] = self._path_session(segment, available, outputs, live, values, clock)
        session, inputs, outputs = step.sessions[path]
        if session is not None:
            with clock.stage("capture") if clock is not None else contextlib.nullcontext():
                consumers = [self.consumers.get(n) if n not in step.frontier else None for n in outputs]
                values.update(zip(outputs, self._run(session, outputs, {k: values[k] for k in inputs}, number,
                                                     consumers)))
            self.budget.note((values[n] for n in outputs), self.shares[number])
        return values

    def _run(self, session: FedSession, outputs: list[str], feed: dict[str, np.ndarray], number: int,
             consumers: list | None = None) -> list:
        """``session``'s ``outputs`` on feed ``number``: in parts of :attr:`samples` samples where they join; an output
        with a ``consumers`` entry handed to it (see :attr:`consumers`)."""
        count = self.counts[number]
        consumers = [c if c is not None and out in self.sampled else None
                     for c, out in zip(consumers or [None] * len(outputs), outputs)]
        if self.samples and count > self.samples and session not in self.whole_runs:
            joined = run_in_parts(session.run, outputs, feed, {k for k in feed if k in self.sampled},
                                  [out in self.sampled for out in outputs], count, self.samples, consumers)
            if joined is not None:
                trim_heap()  # a part's tensors are smaller: many came from the heap, whose freed pages stay
                return joined
            self.whole_runs.add(session)
        values = session.run(outputs, feed)
        for i, consumer in enumerate(consumers):
            if consumer is not None and per_sample(values[i], count) and consumer(values[i], 0, count):
                values[i] = placeholder(values[i], count)
        return values

    def _keep(self, number: int, frontier: dict[str, np.ndarray]) -> None:
        """Keep feed ``number``'s frontier when it fits the budget beside everything else kept; else the feed keeps
        what it kept before (counted when the others were kept: the budget holds), recomputed from there."""
        previous, self.kept[number] = self.kept[number], {}
        self.whole[number] = self.budget.held() + sum(v.nbytes for v in frontier.values()) <= self.budget.allowed()
        self.kept[number] = frontier if self.whole[number] else previous

    def _path_session(self, segment: list[onnx.NodeProto] | None, available: set[str], outputs: list[str],
                      live: dict[str, np.ndarray], values: dict[str, np.ndarray], clock: Any
                      ) -> tuple[FedSession | None, list[str], list[str]]:
        """The session of one path of a step (``segment`` None: the nodes computing ``outputs`` from ``available``),
        its inputs and outputs."""
        if segment is None:
            segment = self._segment(outputs, available)
        if not outputs:
            return None, [], []
        with clock.stage("capture") if clock is not None else contextlib.nullcontext():
            session = self._session(segment, available, live, outputs, values)
        if any(node.op_type in WHOLE_BATCH_OPS or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                      for a in node.attribute) for node in segment):
            self.whole_runs.add(session)  # its values may differ in the last bits in parts: whole feeds
        return session, [i.name for i in session.get_inputs()], outputs

    def _ahead(self, segment: list[onnx.NodeProto], live: dict[str, np.ndarray]) -> list[onnx.NodeProto]:
        """Nodes not yet run that may run with ``segment`` because they shrink the frontier: an :data:`AHEAD_OPS`
        node reading no ``live`` value, only constants and computed tensors, each of which it frees (no other
        reader left to run)."""
        ran = self.done | {id(node) for node in segment}
        computed = self.frontier | {out for node in segment for out in node.output if out}
        ahead: list[onnx.NodeProto] = []
        queue = sorted(computed)
        while queue:
            for reader in self.readers.get(queue.pop(), []):
                node = self.nodes[reader]
                if reader in ran or node.op_type not in AHEAD_OPS or len([o for o in node.output if o]) != 1:
                    continue
                reads = self.reads[reader]
                if any(n in live or (n not in computed and n not in self.constants) for n in reads):
                    continue
                if not any(n in computed for n in reads) or any(
                        r not in ran and r != reader for n in reads if n in computed for r in self.readers[n]):
                    continue
                ran.add(reader)
                ahead.append(node)
                computed.add(node.output[0])
                queue.append(node.output[0])
        return ahead

    def by_feed(self, chunks: list[list[str]], clock: Any = None, keep_sessions: bool = True
                ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(chunk index, the chunk's tensors) for every feed, feed after feed, chunk after chunk: each feed runs the
        forward pass once, in one onnxruntime run per chunk, and only the tensors later chunks still read are kept
        between chunks, for that feed alone (memory holds one feed's captured tensors, never every feed's). The
        chunks' sessions are built on the first feed and reused; without ``keep_sessions`` each is built again for
        every run and dropped after it (only one chunk's session, and its weights, is alive at a time). Not
        combinable with :meth:`run` on this stream."""
        plans: list[tuple[list[onnx.NodeProto], set[str], list[str]]] = []
        sessions: dict[int, FedSession] = {}
        done: list[set[int]] = []  # nodes run once chunk i is done
        for number, feed in enumerate(self.feeds):
            values: dict[str, np.ndarray] = dict(feed)
            for i, names in enumerate(chunks):
                if number == 0:
                    done.append(set(done[-1]) if done else set())
                    plans.append(self._chunk_plan(names, set(values), done[-1]))
                segment, available, outputs = plans[i]
                if outputs:
                    with clock.stage("capture") if clock is not None else contextlib.nullcontext():
                        session = sessions[i] if i in sessions else self._session(segment, available, {}, outputs, values)
                        if keep_sessions:
                            sessions[i] = session
                        inputs = [x.name for x in session.get_inputs()]
                        values.update(zip(outputs, session.run(outputs, {k: values[k] for k in inputs})))
                        del session
                yield i, {n: values[n] for n in names}
                later = {n for chunk in chunks[i + 1:] for n in chunk}
                for name in [n for n in values if n not in feed and n not in later]:
                    if all(r in done[i] for r in self.readers.get(name, [])):
                        del values[name]

    def _chunk_plan(self, names: list[str], available: set[str], done: set[int]
                    ) -> tuple[list[onnx.NodeProto], set[str], list[str]]:
        """The nodes computing chunk ``names`` from ``available`` (added to ``done``), the available names and the
        outputs of the chunk's session: the chunk's tensors and those that nodes not yet run read."""
        segment = self._segment(names, available)
        done |= {id(node) for node in segment}
        produced = [out for node in segment for out in node.output if out]
        wanted = [n for n in names if n not in available]
        later = [out for out in produced if out not in wanted and
                 any(r not in done for r in self.readers.get(out, []))]
        return segment, available, wanted + later

    def _segment(self, names: list[str], available: set[str]) -> list[onnx.NodeProto]:
        """The nodes that compute ``names`` from what is available, in graph order."""
        chosen: dict[int, onnx.NodeProto] = {}
        stack = [n for n in names if n not in available]
        while stack:
            node = self.producer.get(stack.pop())
            if node is None or id(node) in chosen:
                continue
            chosen[id(node)] = node
            stack.extend(n for n in self.reads[id(node)] if n not in available)
        return sorted(chosen.values(), key=lambda node: self.position[id(node)])

    def _session(self, segment: list[onnx.NodeProto], available: set[str], live: dict[str, np.ndarray],
                 outputs: list[str], values: dict[str, np.ndarray] | None = None) -> FedSession:
        """A session over ``segment`` returning ``outputs``, built with :func:`~onnxprune.sessions.lean_options`
        (no arena: each run's memory goes back when it ends; no prepacking) from the segment's nodes and the
        initializers they read, fed in place as arrays (:func:`~onnxprune.sessions.fed_session`): neither a copy of
        the weights in a second proto, serialized bytes of them nor onnxruntime's own copy."""
        model = self.model
        values = values if values is not None else {**self.feeds[0], **self.kept[0], **live}
        read = {n for node in segment for n in self.reads[id(node)]}
        part = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name)
        part.opset_import.extend(model.opset_import)
        part.functions.extend(model.functions)
        part.graph.name = model.graph.name
        part.graph.node.extend(segment)
        part.graph.input.extend(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(values[name].dtype), None) for name in sorted(read & available))
        part.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in outputs)
        initializers = [i for i in model.graph.initializer if i.name in read and i.name not in available]
        held = [i for i in initializers if i.name in self.declared]  # declared only: fed from ``weights``
        if any(i.name not in self.weights for i in held):
            raise RuntimeError("a weight released by the stream is read again")
        part.graph.input.extend(onnx.helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in held)
        session = fed_session(part, (i for i in initializers if i.name not in self.weights), lean_options(),
                              shared=self.shared)
        session.weights.update((i.name, self.weights[i.name]) for i in held)
        return session
