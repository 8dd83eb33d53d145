"""Hidden size by rotation (``--hidden-sparsity S``): computational invariance of the residual stream.

Norm scales/shifts are folded into the linear layers that read the norms, LayerNorm streams are centred at every
writer (so each LayerNorm becomes an RMSNorm over the original width), and the stream is carried in an orthogonal
basis taken from the PCA of calibration activations. Keeping the first k = H - round(S*H) basis directions deletes
the least used ones; with S = 0 the model computes what it computed before. Row-vector convention: activations are
[..., H], weights [in, out]; arithmetic in float64, weights written in their own dtype.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..analysis.cost import infer_shapes, total_macs
from ..analysis.stream import find_streams
from ..analysis.stream_model import Linear, Stream, describe_stream
from ..config import PruneConfig
from ..graph import count_params, get_attr, opset_version, remove_dead_nodes
from ..sessions import session_with_outputs
from ..shapes import refresh_value_info
from .hidden_refit import ReaderTarget, refit_readers
from .hidden_widths import candidate_widths, choose_widths, measure_cuts
from .manager import PassContext, PassResult
from .structured import prepare_for_analysis

logger = logging.getLogger(__name__)


def stream_covariances(model: onnx.ModelProto, stream: Stream, feeds: Iterable[dict[str, np.ndarray]]
                       ) -> dict[str, np.ndarray]:
    """Per segment tensor: the float64 Gram matrix n^T n of its normalized rows (centred for LayerNorm streams),
    accumulated feed after feed (one feed's activations in memory at a time). Where the model has an
    ``attention_mask`` input of the stream's leading shape, the padded positions are left out."""
    return tensor_grams(model, [s.tensor for s in stream.segments], stream.hidden, stream.centered, feeds)


def tensor_grams(model: onnx.ModelProto, names: list[str], hidden: int, centered: bool,
                 feeds: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The Gram matrices of ``stream_covariances`` for the [..., hidden] tensors ``names`` of ``model``."""
    session = session_with_outputs(model, names)
    grams = {name: np.zeros((hidden, hidden)) for name in names}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            rows = value.astype(np.float64).reshape(-1, hidden)
            mask = feed.get("attention_mask")
            if mask is not None and tuple(mask.shape) == tuple(value.shape[:-1]):
                rows = rows[mask.reshape(-1) != 0]  # padding positions carry no text: left out of the PCA
            if centered:
                rows = rows - rows.mean(axis=1, keepdims=True)
            rows /= np.sqrt(np.mean(rows * rows, axis=1, keepdims=True)) + 1e-12
            grams[name] += rows.T @ rows
    return grams


def principal_basis(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvectors (columns) of a Gram matrix by descending eigenvalue, and the eigenvalues."""
    values, vectors = np.linalg.eigh(gram)
    order = np.argsort(values)[::-1]
    return vectors[:, order], np.clip(values[order], 0.0, None)


@dataclass
class Bases:
    """The kept basis P_s (H x k) of every segment, and the explained variance each keeps."""

    of: dict[str, np.ndarray]
    kept_variance: dict[str, float]

    def shortcut_needed(self, source: str, target: str) -> bool:
        return self.of[source] is not self.of[target]


def _halves(feed: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One calibration batch as two (its samples split along the batch axis), or as is with a single sample."""
    size = min(len(v) for v in feed.values()) if feed else 0
    if size < 2 or any(len(v) != size for v in feed.values()):
        return [feed]
    half = size // 2
    return [{k: v[:half] for k, v in feed.items()}, {k: v[half:] for k, v in feed.items()}]


def segment_widths(stream: Stream, keep: int, tail: int = 2) -> dict[str, int]:
    """Kept width per segment, ``keep`` on average: the last ``tail`` segments (the output's and the one feeding the
    last block's MLP, whose lost directions reach the output unmixed) keep the full width, the others share the rest
    equally; fewer full segments when the others would fall below keep / 2, uniform when none fits."""
    names, hidden = [s.tensor for s in stream.segments], stream.hidden
    for full in range(min(tail, len(names) - 1), 0, -1):
        budget = len(names) * keep - full * hidden
        rest = len(names) - full
        if keep < hidden and budget // rest >= max(keep // 2, 1):
            widths = [budget // rest + (1 if i < budget % rest else 0) for i in range(rest)]
            return dict(zip(names, widths + [hidden] * full))
    return {name: keep for name in names}


def choose_bases(stream: Stream, grams: dict[str, np.ndarray], keep: int | dict[str, int], per_segment: bool
                 ) -> Bases:
    """One basis for the whole stream (the PCA of every segment's activations together) or one per segment
    (``keep``: one width, or a width per segment)."""
    if not per_segment:
        basis, values = principal_basis(sum(grams.values()))
        share = float(values[:keep].sum() / max(values.sum(), 1e-300))
        kept = basis[:, :keep]  # one object: shortcuts between segments need no matrix
        return Bases({name: kept for name in grams}, {name: share for name in grams})
    bases, shares = {}, {}
    for name, gram in grams.items():
        basis, values = principal_basis(gram)
        width = keep[name] if isinstance(keep, dict) else keep
        bases[name], shares[name] = basis[:, :width], float(values[:width].sum() / max(values.sum(), 1e-300))
    return Bases(bases, shares)


def sequential_bases(model: onnx.ModelProto, stream: Stream, shapes: dict[str, list] | None,
                     feeds: list[dict[str, np.ndarray]], keep: dict[str, int]) -> Bases:
    """A basis per segment, each the PCA of that segment as the model sliced up to it computes it (SliceGPT): a copy
    of ``model`` is rotated with the bases found so far and the identity for the rest, then the next segment's Gram
    matrix is read from it, so each basis also captures the error the earlier slicing left in the stream."""
    full = np.eye(stream.hidden)
    bases: dict[str, np.ndarray] = {}
    shares: dict[str, float] = {}
    for position, segment in enumerate(stream.segments):
        if position == 0:
            gram = tensor_grams(model, [segment.tensor], stream.hidden, stream.centered, feeds)[segment.tensor]
        else:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            copied = next(s for s in find_streams(copy, infer_shapes(copy, shapes)).streams
                          if s.segments[0].tensor == stream.segments[0].tensor)
            rotate_stream(copy, copied, Bases({s.tensor: bases.get(s.tensor, full) for s in copied.segments}, {}))
            gram = tensor_grams(copy, [segment.tensor], stream.hidden, stream.centered, feeds)[segment.tensor]
        basis, values = principal_basis(gram)
        width = keep[segment.tensor]
        bases[segment.tensor] = basis[:, :width]
        shares[segment.tensor] = float(values[:width].sum() / max(values.sum(), 1e-300))
    return Bases(bases, shares)


class _Editor:
    """Adds initializers and nodes with fresh names; keeps the weights' dtype."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.graph = model, model.graph
        self.names = {n for node in model.graph.node for n in list(node.input) + list(node.output)}
        self.names |= {i.name for i in model.graph.initializer} | {i.name for i in model.graph.input}
        self.new_nodes: list[onnx.NodeProto] = []
        self.removed: set[int] = set()  # ids of original nodes to drop
        self.rewritten: dict[str, int] = {}  # original weight name -> rotated copies written
        self.producers = {o: n for n in model.graph.node for o in n.output}
        self.opset = opset_version(model)

    def fresh(self, base: str) -> str:
        name, count = base, 0
        while name in self.names:
            count += 1
            name = f"{base}.{count}"
        self.names.add(name)
        return name

    def constant(self, base: str, value: np.ndarray, dtype=np.float32) -> str:
        name = self.fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: list[str], base: str, output: str | None = None, **attrs) -> str:
        output = output or self.fresh(base)
        self.new_nodes.append(helper.make_node(op, inputs, [output], name=self.fresh(base + "/" + op), **attrs))
        return output

    def matmul(self, x: str, matrix: np.ndarray, shift: np.ndarray | None, base: str, output: str | None = None
               ) -> str:
        """``x @ matrix (+ shift)`` as new nodes."""
        if shift is None or not np.any(shift):
            return self.node("MatMul", [x, self.constant(base + ".weight", matrix)], base, output)
        product = self.node("MatMul", [x, self.constant(base + ".weight", matrix)], base)
        return self.node("Add", [product, self.constant(base + ".bias", shift)], base, output)

    def rms_norm(self, x: str, hidden: int, eps: float, base: str) -> str:
        """x / sqrt(sum(x^2, last axis) / hidden + eps): the RMSNorm over the original width of a sliced stream."""
        square = self.node("Mul", [x, x], base + "/square")
        axes = self.constant(base + ".axes", np.array([-1]), np.int64) if self.opset >= 13 else None
        if axes is None:
            total = self.node("ReduceSum", [square], base + "/sum", axes=[-1], keepdims=1)
        else:
            total = self.node("ReduceSum", [square, axes], base + "/sum", keepdims=1)
        mean = self.node("Mul", [total, self.constant(base + ".inv_width", np.array(1.0 / hidden))], base + "/mean")
        shifted = self.node("Add", [mean, self.constant(base + ".epsilon", np.array(eps))], base + "/eps")
        return self.node("Div", [x, self.node("Sqrt", [shifted], base + "/sqrt")], base + "/normalized")

    def set_weight(self, node: onnx.NodeProto, slot: int, value: np.ndarray, like: str) -> None:
        """Give ``node`` a new initializer at ``slot`` (a weight shared with other layers, e.g. a tied embedding,
        gets one rotated copy per use)."""
        root = self._root(node.input[slot])
        self.rewritten[root] = self.rewritten.get(root, 0) + 1
        node.input[slot] = self.constant(like + ".rotated", value, self._dtype(node.input[slot]))

    def _root(self, name: str) -> str:
        """The initializer behind ``name`` through Identity/Cast/Transpose (``name`` itself when there is none)."""
        for _ in range(8):
            node = self.producers.get(name)
            if node is None or node.op_type not in ("Identity", "Cast", "Transpose"):
                break
            name = node.input[0]
        return name

    def _dtype(self, name: str):
        for tensor in self.graph.initializer:
            if tensor.name == name:
                return helper.tensor_dtype_to_np_dtype(tensor.data_type)
        return np.float32

    def constant_value(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant output ``name``, or None."""
        for tensor in self.graph.initializer:
            if tensor.name == name:
                return numpy_helper.to_array(tensor)
        for node in self.graph.node:
            if node.op_type == "Constant" and node.output[0] == name and node.attribute[0].name == "value":
                return numpy_helper.to_array(node.attribute[0].t)
        return None

    def resize_last(self, reshape: onnx.NodeProto, width: int) -> None:
        """Make a Reshape that keeps the last axis produce ``width`` on it: the shape's last entry becomes width."""
        shape = reshape.input[1]
        init = {t.name: t for t in self.graph.initializer}.get(shape)
        if init is not None:
            value = numpy_helper.to_array(init).copy()
            if value[-1] > 0:
                value[-1] = width
            reshape.input[1] = self.constant(shape + ".sliced", value, value.dtype)
            return
        concat = next((n for n in self.graph.node if shape in n.output and n.op_type == "Concat"), None)
        last = self.constant_value(concat.input[-1]) if concat is not None else None
        if last is not None and last.ndim == 1 and last[-1] > 0:
            value = last.copy()
            value[-1] = width  # the exporter's Concat(sizes..., [H]): the same Concat with [k], shapes stay inferable
            inputs = [*concat.input[:-1], self.constant(concat.input[-1] + ".sliced", value, value.dtype)]
            reshape.input[1] = self.node("Concat", inputs, shape + "/sliced", axis=get_attr(concat, "axis", 0))
            return
        head = self.node("Slice", [shape, self.constant(shape + ".start", np.array([0]), np.int64),
                                   self.constant(shape + ".end", np.array([-1]), np.int64)], shape + "/head")
        reshape.input[1] = self.node("Concat", [head, self.constant(shape + ".width", np.array([width]), np.int64)],
                                     shape + "/sliced", axis=0)

    def finish(self) -> None:
        """Insert the new nodes and sort the graph topologically (original order kept where it is free)."""
        nodes = []
        for original in [n for n in self.graph.node if id(n) not in self.removed] + self.new_nodes:
            nodes.append(onnx.NodeProto())
            nodes[-1].CopyFrom(original)
        del self.graph.node[:]
        self.graph.node.extend(toposort(nodes, {i.name for i in self.graph.input} |
                                        {i.name for i in self.graph.initializer}))


def toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Nodes in an order where each runs after its inputs' producers (stable: earlier nodes first when free)."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    waiting = [sum(1 for name in set(n.input) if name and name in producer and name not in available)
               for n in nodes]
    readers: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in set(n.input):
            if name and name in producer and name not in available:
                readers.setdefault(producer[name], []).append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for j in readers.get(i, []):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise RuntimeError("rotation left a cycle in the graph")
    return order


def rotate_stream(model: onnx.ModelProto, stream: Stream, bases: Bases) -> dict[str, Any]:
    """Rewrite ``model`` in place so that the stream is carried as x C P_s (P_s: the segment's kept basis): writers
    centred and rotated, norms as RMSNorms over the original width, readers with the norm's scale and the basis
    folded in, shortcuts between different bases as MatMuls, norm outputs read by anything else rotated back."""
    edit = _Editor(model)
    hidden = stream.hidden
    centering = np.eye(hidden) - np.full((hidden, hidden), 1.0 / hidden) if stream.centered else np.eye(hidden)
    counts = {"writers": 0, "embeddings": 0, "readers": 0, "shortcut_matrices": 0, "restored": 0, "shape_reads": 0}
    segment_of = {n.name: s.tensor for s in stream.segments for n in s.norms}
    normalized: dict[str, str] = {}
    for segment in stream.segments:
        for norm in segment.norms:
            normalized[norm.name] = edit.rms_norm(segment.tensor, hidden, norm.epsilon, norm.name + "/rotated")
    for segment in stream.segments:
        target = bases.of[segment.tensor]
        into = centering @ target
        for writer in segment.writers:
            _write(edit, writer, into, into.shape[1])
            counts["writers"] += 1
        for embedding in segment.embeddings:
            edit.set_weight(embedding.node, 0, embedding.table @ into, embedding.node.input[0])
            counts["embeddings"] += 1
        for term in segment.constants:
            edit.set_weight(term.node, term.slot, term.value @ into, term.node.input[term.slot])
            counts["embeddings"] += 1
        for shortcut in segment.shortcuts:
            if shortcut.norm is not None:
                source = bases.of[segment_of[shortcut.norm.name]]
                matrix = source.T @ np.diag(shortcut.norm.gamma) @ into
                shift = shortcut.norm.beta @ into
                shortcut.add.input[shortcut.slot] = edit.matmul(normalized[shortcut.norm.name], matrix, shift,
                                                               shortcut.norm.name + "/shortcut")
                counts["shortcut_matrices"] += 1
            elif bases.shortcut_needed(shortcut.source, segment.tensor):
                matrix = bases.of[shortcut.source].T @ target
                shortcut.add.input[shortcut.slot] = edit.matmul(shortcut.source, matrix, None,
                                                               shortcut.source + "/shortcut")
                counts["shortcut_matrices"] += 1
    for norm in stream.norms:
        basis = bases.of[segment_of[norm.name]]
        fold = basis.T * norm.gamma[None, :]  # P^T diag(gamma): [k, H]
        for reader in stream.readers[norm.name]:
            _read(edit, reader, fold, norm.beta, normalized[norm.name], fold.shape[0])
            counts["readers"] += 1
        edit.removed |= {id(n) for n in norm.nodes}
        if stream.restored[norm.name]:
            edit.matmul(normalized[norm.name], fold, norm.beta, norm.name + "/restore", output=norm.output)
            counts["restored"] += 1
    by_output = {n.output: n.name for n in stream.norms}
    for name, node, width in stream.shape_reads:
        source = normalized[by_output[name]] if name in by_output else name
        if width:
            _exact_shape(edit, node, source, hidden)
            counts["shape_reads"] += 1
        else:
            node.input[0] = source
    edit.finish()
    counts["untied"] = sorted(name for name, copies in edit.rewritten.items() if copies > 1)
    return counts


def _write(edit: _Editor, writer: Linear, into: np.ndarray, width: int) -> None:
    """A linear layer writing the stream: W C P, b C P; its Reshapes produce ``width``."""
    weight = writer.weight @ into
    node = writer.node
    if writer.conv:  # [C_in * kh * kw, k] back to [k, C_in, kh, kw]
        shape = [int(d) for d in _initializer(edit, node.input[1]).dims]
        weight = weight.T.reshape([into.shape[1], *shape[1:]])
    edit.set_weight(node, 1, weight.T if node.op_type == "Gemm" and get_attr(node, "transB", 0) else weight,
                    node.input[1])
    if writer.bias is not None:
        holder, slot = writer.bias
        value = numpy_helper.to_array(_initializer(edit, holder.input[slot])).astype(np.float64)
        edit.set_weight(holder, slot, np.broadcast_to(value, (into.shape[0],)) @ into, holder.input[slot])
    for reshape in writer.reshapes:
        edit.resize_last(reshape, width)


def _read(edit: _Editor, reader: Linear, fold: np.ndarray, beta: np.ndarray, source: str, width: int) -> None:
    """A linear layer reading a norm's output: reads the rotated normalized stream with P^T diag(gamma) W and
    b + beta W."""
    node = reader.node
    first = reader.reshapes[0] if reader.reshapes else node
    first.input[0] = source
    weight = fold @ reader.weight
    edit.set_weight(node, 1, weight.T if node.op_type == "Gemm" and get_attr(node, "transB", 0) else weight,
                    node.input[1])
    shift = beta @ reader.weight
    if reader.bias is not None:
        holder, slot = reader.bias
        value = numpy_helper.to_array(_initializer(edit, holder.input[slot])).astype(np.float64)
        edit.set_weight(holder, slot, np.broadcast_to(value, shift.shape) + shift, holder.input[slot])
    elif np.any(shift):
        if node.op_type == "Gemm":
            node.input.append(edit.constant(node.input[1] + ".bias", shift))
        else:
            product = edit.fresh(node.output[0] + ".unshifted")
            output, node.output[0] = node.output[0], product
            edit.node("Add", [product, edit.constant(node.input[1] + ".bias", shift)], output, output=output)
    for reshape in reader.reshapes:
        edit.resize_last(reshape, width)


def _exact_shape(edit: _Editor, node: onnx.NodeProto, name: str, hidden: int) -> None:
    """A Shape of a stream tensor keeps its value: the last entry is the original width again."""
    if edit.opset >= 15:  # Shape(end=-1): shape inference follows it
        head = edit.node("Shape", [name], node.name + "/head", end=-1)
    else:
        full = edit.node("Shape", [name], node.name + "/sliced")
        head = edit.node("Slice", [full, edit.constant(name + ".start", np.array([0]), np.int64),
                                   edit.constant(name + ".end", np.array([-1]), np.int64)], node.name + "/head")
    value = edit.node("Concat", [head, edit.constant(name + ".width", np.array([hidden]), np.int64)],
                      node.name + "/original", axis=0)
    start, end = get_attr(node, "start"), get_attr(node, "end")
    del node.attribute[:]
    if start is None and end is None:
        node.op_type = "Identity"
        node.input[:] = [value]
        return
    node.op_type = "Slice"
    node.input[:] = [value, edit.constant(name + ".from", np.array([start or 0]), np.int64),
                     edit.constant(name + ".to", np.array([end if end is not None else np.iinfo(np.int64).max]),
                                   np.int64)]


def _initializer(edit: _Editor, name: str) -> onnx.TensorProto:
    for tensor in edit.graph.initializer:
        if tensor.name == name:
            return tensor
    for node in edit.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return helper.get_attribute_value(node.attribute[0])
    producer = next((n for n in edit.graph.node if name in n.output), None)
    if producer is not None and producer.op_type in ("Identity", "Cast"):
        return _initializer(edit, producer.input[0])
    raise KeyError(name)


class HiddenRotationPass:
    """Delete the least used directions of the residual stream after rotating it into its PCA basis."""

    name = "hidden"

    def __init__(self, config: PruneConfig, per_segment: bool | None = None, sequential: bool = False,
                 measure: bool | None = None):
        """``per_segment`` None: a basis per segment in post-LN streams (their shortcuts carry a matrix anyway), one
        basis for pre-LN streams (their shortcuts then need none). ``sequential``: per-segment bases measured on the
        model sliced up to each segment (``sequential_bases``) rather than all on the original. ``measure`` None: as
        ``config.hidden_widths`` says; False: the tail rule's per-segment widths (``segment_widths``); True: measured."""
        self.config = config
        self.measure = config.hidden_widths == "measured" if measure is None else measure
        self.per_segment = per_segment
        self.sequential = sequential

    def run(self, ctx: PassContext) -> PassResult:
        model, shapes = ctx.model, ctx.input_shapes or None
        prepare_for_analysis(model)
        macs_before, params_before = total_macs(model, shapes), count_params(model)[0]
        found = find_streams(model, infer_shapes(model, shapes))
        details: dict[str, Any] = {"kind": "hidden", "hidden_sparsity": self.config.hidden_sparsity,
                                   "macs_before": int(macs_before), "params_before": int(params_before),
                                   "refused": found.refused, "streams": []}
        if not found.streams:
            reason = "; ".join(found.refused) or "no residual stream found"
            logger.warning("hidden size: nothing rotated: %s", reason)
            return PassResult(False, {**details, "reason": reason, "macs_after": int(macs_before),
                                      "params_after": int(params_before)})
        self.config.require_calibration(bool(ctx.calibration), ("hidden",))
        for stream in found.streams:
            details["streams"].append(self._rotate(ctx, stream))
        remove_dead_nodes(model)
        refresh_value_info(model)
        details["macs_after"] = int(total_macs(model, shapes))
        details["params_after"] = int(count_params(model)[0])
        return PassResult(True, details)

    def _rotate(self, ctx: PassContext, stream: Stream) -> dict[str, Any]:
        logger.info("hidden size: PCA of %d stream segments on calibration data", len(stream.segments))
        keep = max(stream.hidden - round(self.config.hidden_sparsity * stream.hidden), 1)
        per_segment = stream.post_ln if self.per_segment is None else self.per_segment
        sequential = per_segment and self.sequential and keep < stream.hidden  # nothing to measure when nothing goes
        feeds = list(ctx.iterate(ctx.calibration, "stream PCA", len(ctx.calibration)))
        if len(feeds) == 1 and self.measure and per_segment:
            feeds = _halves(feeds[0])  # measured widths need a batch the bases did not see
        folds = [feeds[0::2], feeds[1::2]]
        grams = [stream_covariances(ctx.model, stream, fold) for fold in folds]
        total = {name: grams[0][name] + grams[1][name] for name in grams[0]}
        widths = {s.tensor: keep for s in stream.segments}
        choice: dict[str, Any] = {"widths_chosen": "uniform"}
        if per_segment and keep < stream.hidden:
            widths, choice = self._widths(ctx.model, stream, keep, grams[0], folds[1])
        if sequential:
            bases = sequential_bases(ctx.model, stream, ctx.input_shapes or None, feeds, widths)
        else:
            bases = choose_bases(stream, total, widths if per_segment else keep, per_segment)
        targets = [ReaderTarget(r.node.name, r.bias[0].output[0] if r.bias else r.node.output[0])
                   for readers in stream.readers.values() for r in readers if r.node.name]
        original = None
        if self.config.reconstruct and keep < stream.hidden:
            original = onnx.ModelProto()
            original.CopyFrom(ctx.model)
        counts = rotate_stream(ctx.model, stream, bases)
        if original is not None:
            logger.info("hidden size: refitting %d stream readers by least squares on calibration data", len(targets))
            choice["reconstruction"] = refit_readers(original, ctx.model, targets, feeds)
        shares = list(bases.kept_variance.values())
        kind = "per segment" + (", sequential" if sequential else "")
        return {**describe_stream(stream), "hidden_before": stream.hidden, "hidden_after": keep,
                "bases": kind if per_segment else "one for the stream",
                "widths": [bases.of[s.tensor].shape[1] for s in stream.segments], **choice,
                "explained_variance_kept": round(float(np.mean(shares)), 6),
                "explained_variance_min": round(float(np.min(shares)), 6), **counts}

    def _widths(self, model: onnx.ModelProto, stream: Stream, keep: int, grams: dict[str, np.ndarray],
                held: list[dict[str, np.ndarray]]) -> tuple[dict[str, int], dict[str, Any]]:
        """Per-segment widths measured (bases from every other calibration feed, each segment cut alone on the
        rest: :mod:`.hidden_widths`), or the default tail rule (``segment_widths``) with fewer than two feeds."""
        if not self.measure:
            return segment_widths(stream, keep), {"widths_chosen": "default (last two segments whole)"}
        if not held:
            return segment_widths(stream, keep), {"widths_chosen": "default (last two segments whole): measured "
                                                  "widths need at least two calibration samples"}
        ordered = {name: principal_basis(gram)[0] for name, gram in grams.items()}
        candidates = candidate_widths(stream.hidden, 1.0 - keep / stream.hidden)
        logger.info("hidden size: probing %d widths of %d segments on calibration data", len(candidates),
                    len(stream.segments))
        probe = measure_cuts(model, stream, ordered, held, candidates)
        widths = choose_widths(probe, stream.hidden, keep)
        errors = [{str(w): round(e, 6) for w, e in sorted(probe.errors[s.tensor].items(), reverse=True)}
                  for s in stream.segments]
        return widths, {"widths_chosen": "measured", "probe_errors": errors}
