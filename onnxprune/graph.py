"""The graph layer: walking graphs and subgraphs, weights, attributes, dead-node removal and value shapes.

Weights live either in graph initializers or in ``Constant`` nodes (some exporters store every weight that way);
:class:`Weight` hides the difference. Nothing here reads or writes files (:mod:`onnxprune.model`) or infers shapes
(:mod:`onnxprune.shapes`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import onnx
from onnx import numpy_helper

_Item = TypeVar("_Item")


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph (If/Loop/Scan bodies), depth first (an explicit stack: nesting depth is
    not bounded by Python's recursion limit)."""
    stack = [graph]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(reversed(_subgraphs(current)))


def _subgraphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """The subgraphs directly inside ``graph``'s nodes, in node and attribute order."""
    return [sub for node in graph.node for sub in node_subgraphs(node)]


def node_subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The subgraphs held by ``node``'s attributes (If branches, Loop/Scan bodies), in attribute order."""
    subs: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            subs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            subs.extend(attr.graphs)
    return subs


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor held in ``model``: initializers and tensor attributes (sparse values too), subgraphs included."""
    for graph in iter_graphs(model.graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    yield attr.sparse_tensor.values


@dataclass(eq=False)
class Weight:
    """A constant tensor: an initializer or the value of a ``Constant`` node."""

    name: str
    kind: str  # "initializer" or "constant"
    tensor: onnx.TensorProto
    graph: onnx.GraphProto
    node: onnx.NodeProto | None = None  # the Constant node, for kind == "constant"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensor.dims)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.tensor.data_type))

    @property
    def is_float(self) -> bool:
        return self.tensor.data_type in FLOAT_TYPES

    def array(self) -> np.ndarray:
        """The values as a writable numpy array (original dtype), independent of the proto."""
        values = numpy_helper.to_array(self.tensor)
        return values if values.flags.writeable and values.flags.owndata else values.copy()

    def values(self) -> np.ndarray:
        """The values to read, never to write: where the tensor holds raw bytes, a read-only array over one copy of
        them (no second copy, as :meth:`array` makes), which sessions may be fed without copying
        (:func:`~onnxprune.sessions.shared_weights`)."""
        return numpy_helper.to_array(self.tensor)

    def set_array(self, values: np.ndarray) -> None:
        """Replace the values (and shape); the dtype stays the tensor's own."""
        values = np.ascontiguousarray(values, dtype=self.dtype)
        tensor = self.tensor
        for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            tensor.ClearField(name)
        del tensor.dims[:]
        tensor.dims.extend(values.shape)
        if not values.dtype.isnative:
            values = values.astype(values.dtype.newbyteorder("="))
        tensor.raw_data = values.tobytes()


def weight_bytes(model: onnx.ModelProto) -> int:
    """The main graph's initializers at 4 bytes an element: the float32 size the memory budgets count in."""
    return sum(int(np.prod(t.dims, dtype=np.int64)) * 4 for t in model.graph.initializer)


FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}

#: Ops that pass a weight through unchanged in value order (pruning the source is pruning the use).
PASS_THROUGH_OPS = {"Identity", "Cast", "CastLike"}


@dataclass
class GraphIndex:
    """Producers, consumers and constants of one graph, with its enclosing scope."""

    graph: onnx.GraphProto
    parent: GraphIndex | None = None
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = field(default_factory=dict)
    weights: dict[str, Weight] = field(default_factory=dict)
    node_order: dict[int, int] = field(default_factory=dict)

    @classmethod
    def build(cls, graph: onnx.GraphProto, parent: GraphIndex | None = None) -> GraphIndex:
        index = cls(graph=graph, parent=parent)
        for init in graph.initializer:
            index.weights[init.name] = Weight(init.name, "initializer", init, graph)
        for position, node in enumerate(graph.node):
            index.node_order[id(node)] = position
            for out in node.output:
                if out:
                    index.producer[out] = node
            for slot, name in enumerate(node.input):
                if name:
                    index.consumers.setdefault(name, []).append((node, slot))
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        index.weights[node.output[0]] = Weight(node.output[0], "constant", attr.t, graph, node)
        return index

    def lookup_weight(self, name: str) -> Weight | None:
        """The weight called ``name`` here or in an enclosing graph."""
        scope: GraphIndex | None = self
        while scope is not None:
            if name in scope.weights:
                return scope.weights[name]
            if name in scope.producer:
                return None
            scope = scope.parent
        return None

    def resolve(self, name: str) -> tuple[Weight | None, list[onnx.NodeProto]]:
        """Follow ``name`` back through Identity/Cast/Transpose to a weight.

        Returns the weight (or None) and the chain of nodes between it and ``name``,
        nearest the weight first.
        """
        chain: list[onnx.NodeProto] = []
        seen: set[str] = set()
        while name not in seen:
            seen.add(name)
            weight = self.lookup_weight(name)
            if weight is not None:
                return weight, list(reversed(chain))
            node = self.producer.get(name)
            if node is None or node.op_type not in PASS_THROUGH_OPS | {"Transpose"} or not node.input:
                return None, []
            chain.append(node)
            name = node.input[0]
        return None, []


def build_indexes(model: onnx.ModelProto) -> list[GraphIndex]:
    """A :class:`GraphIndex` for the main graph and each subgraph (main graph first)."""
    indexes: list[GraphIndex] = []
    stack: list[tuple[onnx.GraphProto, GraphIndex | None]] = [(model.graph, None)]
    while stack:  # depth first, as nested; no recursion on nesting depth
        graph, parent = stack.pop()
        index = GraphIndex.build(graph, parent)
        indexes.append(index)
        stack.extend((sub, index) for sub in reversed(_subgraphs(graph)))
    return indexes


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    """The model's opset version for ``domain`` (default: the ONNX domain)."""
    for entry in model.opset_import:
        if entry.domain in (domain, "ai.onnx" if domain == "" else domain):
            return int(entry.version)
    return 0


def get_attr(node: onnx.NodeProto, name: str, default=None):
    """An attribute's Python value, or ``default``."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


QUANTIZED_WEIGHT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def count_params(model: onnx.ModelProto) -> tuple[int, int]:
    """(parameters, non-zero parameters): float weights and quantized (8/4-bit) weights of more than one element."""
    total = nonzero = 0
    for graph in iter_graphs(model.graph):
        index = GraphIndex.build(graph)
        for weight in index.weights.values():
            if weight.size <= 1 or not (weight.is_float or weight.tensor.data_type in QUANTIZED_WEIGHT_TYPES):
                continue
            arr = numpy_helper.to_array(weight.tensor)  # read only: a view of the raw bytes, not a copy of it
            total += arr.size
            nonzero += int(np.count_nonzero(arr))
    return total, nonzero


def transpose_perm(node: onnx.NodeProto, rank: int) -> list[int]:
    """A Transpose's ``perm``; without one, the axes reversed (the ONNX default)."""
    return list(get_attr(node, "perm") or range(rank)[::-1])


def subgraph_reads(node: onnx.NodeProto) -> list[str]:
    """The outer tensors the subgraphs of ``node`` (If/Loop/Scan bodies) read, in reading order."""
    return [name for sub in node_subgraphs(node) for name in free_names(sub)]


def free_names(graph: onnx.GraphProto) -> list[str]:
    """Names ``graph`` (and the subgraphs inside it) read from enclosing scopes, in reading order."""
    free: list[str] = []
    # explicit stack of (graph, names defined so far as seen from it, next node position): no recursion on nesting
    stack: list[tuple[onnx.GraphProto, set[str], int]] = [(graph, {i.name for i in graph.input} |
                                                           {i.name for i in graph.initializer}, 0)]
    while stack:
        current, defined, position = stack.pop()
        if position >= len(current.node):
            continue
        node = current.node[position]
        free.extend(name for name in node.input if name and name not in defined)
        stack.append((current, defined, position + 1))
        for sub in reversed(node_subgraphs(node)):
            stack.append((sub, defined | {i.name for i in sub.input} | {i.name for i in sub.initializer}, 0))
        defined.update(node.output)
    return free


def remove_dead_nodes(model: onnx.ModelProto) -> int:
    """Drop main-graph nodes and initializers nothing reads any more (e.g. shape constants that were replaced)."""
    graph = model.graph
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(subgraph_reads(node))
    dead_nodes = []
    for position in range(len(graph.node) - 1, -1, -1):
        node = graph.node[position]
        if any(out and out in used for out in node.output):
            used.update(n for n in node.input if n)
        else:
            dead_nodes.append(position)
    for position in dead_nodes:  # descending, so earlier positions stay valid
        del graph.node[position]
    removed = len(dead_nodes)
    inputs = {i.name for i in graph.input}
    dead = [i for i, init in enumerate(graph.initializer) if init.name not in used and init.name not in inputs]
    for i in reversed(dead):
        del graph.initializer[i]
    return removed + len(dead)


def value_shapes(graph: onnx.GraphProto, *, symbolic: bool = False) -> dict[str, list]:
    """Declared shapes of ``graph``'s inputs, value_info and outputs (later entries win); an unknown dim is None, or
    with ``symbolic`` its name (a dim_value of 0 or less counts as unknown then)."""
    shapes: dict[str, list] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            dims = value.type.tensor_type.shape.dim
            shapes[value.name] = ([d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                                   for d in dims] if symbolic else
                                  [d.dim_value if d.HasField("dim_value") else None for d in dims])
    return shapes


def constant_shapes(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """Shapes of ``graph``'s initializers and ``Constant`` tensor outputs."""
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    shapes[node.output[0]] = list(attr.t.dims)
    return shapes


def first_match(items: list[_Item], names: list[str], pattern: Callable[[_Item], Any] = str) -> _Item | None:
    """The first of ``items`` whose glob (``pattern(item)``, case-sensitive) matches one of the non-empty ``names``
    (tensor and node names): ``--exclude`` patterns and recipe overrides."""
    return next((item for item in items if any(n and fnmatch.fnmatchcase(n, str(pattern(item))) for n in names)), None)
