"""Which weights unstructured pruning may touch, and along which axis each one is reduced.

A weight is prunable when it is a float tensor of rank >= 2 that feeds the weight input of
Conv, ConvTranspose, Gemm or MatMul (directly or through Identity/Cast/Transpose), the input
(``W``) or recurrence (``R``) weight of LSTM/GRU/RNN (``[directions, gates * hidden, inputs]``,
reduced along the last axis; the bias ``B`` stays dense), or, opt-in, the data input of an
embedding ``Gather``. A weight shared by several layers is
one :class:`PrunableWeight` with several uses, so it is pruned once, consistently.

A layer whose weight is *assembled* from stored tensors by ops that only move entries (constant ``Slice``,
``Concat``, ``Unsqueeze``, ``Squeeze``, ``Reshape``, ``Transpose``, ``Flatten``; e.g. an LSTM cell exported as
per-gate Slices of ``weight_ih``) reads a :class:`WeightView`: it is scored and grouped along that layer's own
input axis, and the entries it zeroes are zeroed in the source tensors. Where blocks overlap (one stored entry read
at two positions, or by two layers), the zeros are the union of the uses' masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..graph import PASS_THROUGH_OPS, GraphIndex, Weight, build_indexes, first_match, get_attr, transpose_perm
from .cost import evaluate_node

#: ops that only move a constant's entries: a layer weight computed from stored tensors through them is a view
MOVE_OPS = {"Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Transpose", "Flatten"}


@dataclass
class WeightUse:
    """One layer that reads a weight."""

    node: onnx.NodeProto
    slot: int
    role: str  # conv | conv_transpose | gemm | matmul | recurrent | embedding
    reduction_axis: int | None  # axis of the stored weight summed over by this layer
    position: int = 0  # the reader's position in its graph's node list


@dataclass
class WeightView:
    """A layer's weight assembled from stored tensors by :data:`MOVE_OPS`: ``index`` (the assembled shape) holds,
    per entry, its position in the flattened ``sources`` laid end to end."""

    name: str  # the tensor the layer reads
    sources: list[Weight]
    index: np.ndarray
    kind: str = "sliced"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.index.shape)

    @property
    def size(self) -> int:
        return int(self.index.size)

    @property
    def dtype(self) -> np.dtype:
        return self.sources[0].dtype

    @property
    def is_float(self) -> bool:
        return all(source.is_float for source in self.sources)

    @property
    def overlapping(self) -> bool:
        """Some stored entry appears at two positions of the view."""
        return len(np.unique(self.index)) != self.index.size

    def _flat(self) -> np.ndarray:
        return np.concatenate([source.array().reshape(-1) for source in self.sources])

    def array(self) -> np.ndarray:
        return self._flat()[self.index]

    def set_array(self, values: np.ndarray) -> None:
        """Write ``values`` back into the sources; where entries overlap, only the zeros (the union of masks)."""
        flat = self._flat()
        values = np.asarray(values).reshape(self.index.shape)
        if self.overlapping:
            flat[self.index[values == 0]] = 0
        else:
            flat[self.index.reshape(-1)] = values.reshape(-1)
        start = 0
        for source in self.sources:
            source.set_array(flat[start:start + source.size].reshape(source.shape))
            start += source.size


def trace_view(model: onnx.ModelProto, index: GraphIndex, name: str, max_nodes: int = 64) -> WeightView | None:
    """The :class:`WeightView` behind ``name`` when it is computed from stored tensors by :data:`MOVE_OPS` with
    constant parameters (at least one such op on the way), else None. Index arrays, not values, go through the
    ops (onnx's reference implementation), so every entry's source position is known."""
    sources: list[Weight] = []
    positions: dict[str, np.ndarray] = {}
    stack, moved = [name], False
    while stack:
        current = stack[-1]
        if current in positions:
            stack.pop()
            continue
        weight = index.lookup_weight(current)
        if weight is not None:
            offset = sum(s.size for s in sources)
            sources.append(weight)
            positions[current] = offset + np.arange(weight.size, dtype=np.int64).reshape(weight.shape)
            stack.pop()
            continue
        node = index.producer.get(current)
        if node is None or node.op_type not in MOVE_OPS | PASS_THROUGH_OPS or len(positions) > max_nodes:
            return None
        data = _data_inputs(node)
        missing = [i for i in data if i not in positions]
        if missing:
            stack.extend(missing)
            continue
        value = _moved(model, index, node, data, positions)
        if value is None:
            return None
        moved |= node.op_type in MOVE_OPS
        positions[current] = value
        stack.pop()
    if not moved or not sources or len({s.dtype for s in sources}) > 1:
        return None
    return WeightView(name, sources, positions[name])


def _data_inputs(node: onnx.NodeProto) -> list[str]:
    """The inputs whose entries an entry-moving op moves (the rest are its constant parameters)."""
    if node.op_type == "Concat":
        return [i for i in node.input if i]
    return [node.input[0]]


def _moved(model, index: GraphIndex, node: onnx.NodeProto, data: list[str], positions: dict) -> np.ndarray | None:
    """``node`` applied to the position arrays of its data inputs (parameters read as constants)."""
    if node.op_type in PASS_THROUGH_OPS:
        return positions[data[0]]
    known = {name: positions[name] for name in data}
    for name in node.input:
        if name and name not in known:
            weight, chain = index.resolve(name)
            if weight is None or chain:
                return None
            known[name] = weight.array()
    value = evaluate_node(model, node, known)
    return None if value is None or value.dtype != np.int64 else value


@dataclass
class PrunableWeight:
    """A weight with every layer that reads it."""

    weight: Weight | WeightView
    uses: list[WeightUse] = field(default_factory=list)
    order: int = 0  # topological position of its first reader (main graph), for first/last
    in_subgraph: bool = False

    @property
    def name(self) -> str:
        return self.weight.name

    @property
    def reduction_axis(self) -> int | None:
        axes = {use.reduction_axis for use in self.uses}
        return axes.pop() if len(axes) == 1 else None

    @property
    def gate_blocks(self) -> int:
        """Rows of a recurrent W/R per (direction, gate) block; 0 for any other weight."""
        use = self.uses[0]
        if use.role != "recurrent" or len(self.uses) > 1 or len(self.weight.shape) != 3:
            return 0
        return self.weight.shape[1] // RECURRENT_GATES[use.node.op_type]

    @property
    def is_embedding(self) -> bool:
        return all(use.role == "embedding" for use in self.uses)

    def node_names(self) -> list[str]:
        return [use.node.name for use in self.uses]


#: Gate blocks stacked in the rows of W, R (and each half of B) of the recurrent ops (LSTM: i, o, f, c;
#: GRU: z, r, h; RNN: one).
RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _consumer_axis(node: onnx.NodeProto, slot: int, rank: int) -> tuple[str, int | None] | None:
    """(role, reduction axis of the consumed tensor) when ``slot`` of ``node`` is a weight input."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return None
    if op == "Conv" and slot == 1:
        return "conv", 1
    if op == "ConvTranspose" and slot == 1:
        return "conv_transpose", 0
    if op == "Gemm" and slot in (0, 1):
        if slot == 1:
            return "gemm", 1 if get_attr(node, "transB", 0) else 0
        return "gemm", 0 if get_attr(node, "transA", 0) else 1
    if op == "MatMul" and slot in (0, 1):
        return "matmul", rank - 2 if slot == 1 else rank - 1
    if op in RECURRENT_GATES and slot in (1, 2) and rank == 3:
        return "recurrent", 2
    if op == "Gather" and slot == 0:
        return "embedding", None
    return None


def _map_axis_through_chain(axis: int | None, chain: list[onnx.NodeProto], rank: int) -> int | None:
    """Map an axis of the consumed tensor back to the stored weight, through Transposes."""
    if axis is None:
        return None
    for node in reversed(chain):  # from the consumer back toward the weight
        if node.op_type == "Transpose":
            perm = transpose_perm(node, rank)
            axis = int(perm[axis])
    return axis


def find_prunable_weights(model: onnx.ModelProto) -> list[PrunableWeight]:
    """Every float weight of rank >= 2 read by a weight input of a supported layer."""
    found: dict[int, PrunableWeight] = {}
    indexes = build_indexes(model)
    for depth, index in enumerate(indexes):
        _collect(model, index, found, in_subgraph=depth > 0)
    return sorted(found.values(), key=lambda p: (p.in_subgraph, p.order, p.name))


def _collect(model: onnx.ModelProto, index: GraphIndex, found: dict, *, in_subgraph: bool) -> None:
    for position, node in enumerate(index.graph.node):
        for slot, name in enumerate(node.input):
            if not name or slot > (2 if node.op_type in RECURRENT_GATES else 1):
                continue
            weight, chain = index.resolve(name)
            if weight is None and node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul", *RECURRENT_GATES) \
                    and slot >= 1:
                weight, chain = trace_view(model, index, name), []
            if weight is None or not weight.is_float or len(weight.shape) < 2:
                continue
            # A MatMul/Gemm with two constant inputs is constant folding, not a layer.
            if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
                other = node.input[1 - slot]
                if other and index.resolve(other)[0] is not None:
                    continue
            role_axis = _consumer_axis(node, slot, len(weight.shape))
            if role_axis is None:
                continue
            role, axis = role_axis
            axis = _map_axis_through_chain(axis, chain, len(weight.shape))
            key = id(weight.tensor) if isinstance(weight, Weight) else (id(node), slot)
            entry = found.get(key)
            if entry is None:
                entry = PrunableWeight(weight=weight, order=position, in_subgraph=in_subgraph)
                found[key] = entry
            entry.uses.append(WeightUse(node=node, slot=slot, role=role, reduction_axis=axis, position=position))


@dataclass
class Selection:
    """Weights chosen for pruning and those left alone, each with a reason."""

    selected: list[PrunableWeight]
    skipped: list[tuple[PrunableWeight, str]]


def select_weights(
    prunable: list[PrunableWeight],
    *,
    exclude: list[str] = (),
    min_params: int = 0,
    prune_first: bool = True,
    prune_last: bool = True,
    include_embeddings: bool = False,
) -> Selection:
    """Apply the user's filters: name globs, size floor, first/last layer, embeddings."""
    layers = [p for p in prunable if not p.is_embedding and not p.in_subgraph]
    first = layers[0] if layers else None
    last = max(layers, key=lambda p: max(u.position for u in p.uses)) if layers else None
    selected: list[PrunableWeight] = []
    skipped: list[tuple[PrunableWeight, str]] = []
    for item in prunable:
        names = [item.name, *item.node_names()]
        pattern = first_match(exclude, names)
        if pattern is not None:
            skipped.append((item, f"excluded by pattern {pattern!r}"))
        elif item.is_embedding and not include_embeddings:
            skipped.append((item, "embedding (Gather) weights are opt-in: --include-embeddings"))
        elif item.weight.size < min_params:
            skipped.append((item, f"smaller than --min-params {min_params}"))
        elif item is first and not prune_first:
            skipped.append((item, "first layer (--no-prune-first)"))
        elif item is last and not prune_last:
            skipped.append((item, "last layer (--no-prune-last)"))
        else:
            # A weight shared by an embedding and a layer (tied LM head) is selected for the
            # layer's sake; the embedding then reads the same pruned tensor.
            selected.append(item)
    return Selection(selected, skipped)



def tied_copies(prunable: list[PrunableWeight]) -> dict[str, tuple[PrunableWeight, bool]]:
    """Embeddings stored twice: embedding name -> (the layer weight holding the same values, transposed?).

    Exporters often write a tied LM head (``lm_head.weight is wte.weight``) as a second initializer,
    transposed for MatMul. Such a pair is one parameter to the user and is pruned alike.
    """
    layers: dict[tuple[int, ...], list[PrunableWeight]] = {}
    for item in prunable:
        if len(item.weight.shape) == 2 and not item.is_embedding and item.weight.is_float:
            layers.setdefault(item.weight.shape, []).append(item)
    tied: dict[str, tuple[PrunableWeight, bool]] = {}
    for item in prunable:
        if not item.is_embedding or len(item.weight.shape) != 2:
            continue
        shape = item.weight.shape
        values = None
        for transposed, candidates in ((True, layers.get(shape[::-1], [])), (False, layers.get(shape, []))):
            for other in candidates:
                if values is None:
                    values = item.weight.array()
                theirs = other.weight.array()
                if np.array_equal(values, theirs.T if transposed else theirs):
                    tied[item.name] = (other, transposed)
                    break
            if item.name in tied:
                break
    return tied
