"""Which weights unstructured pruning may touch, and along which axis each one is reduced.

A weight is prunable when it is a float tensor of rank >= 2 that feeds the weight input of
Conv, ConvTranspose, Gemm or MatMul (directly or through Identity/Cast/Transpose), the input
(``W``) or recurrence (``R``) weight of LSTM/GRU/RNN (``[directions, gates * hidden, inputs]``,
reduced along the last axis; the bias ``B`` stays dense), or, opt-in, the data input of an
embedding ``Gather``. A weight shared by several layers is
one :class:`PrunableWeight` with several uses, so it is pruned once, consistently.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..model import GraphIndex, Weight, build_indexes, get_attr


@dataclass
class WeightUse:
    """One layer that reads a weight."""

    node: onnx.NodeProto
    slot: int
    role: str  # conv | conv_transpose | gemm | matmul | recurrent | embedding
    reduction_axis: int | None  # axis of the stored weight summed over by this layer
    position: int = 0  # the reader's position in its graph's node list


@dataclass
class PrunableWeight:
    """A weight with every layer that reads it."""

    weight: Weight
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
            perm = get_attr(node, "perm") or list(reversed(range(rank)))
            axis = int(perm[axis])
    return axis


def find_prunable_weights(model: onnx.ModelProto) -> list[PrunableWeight]:
    """Every float weight of rank >= 2 read by a weight input of a supported layer."""
    found: dict[int, PrunableWeight] = {}
    indexes = build_indexes(model)
    for depth, index in enumerate(indexes):
        _collect(index, found, in_subgraph=depth > 0)
    return sorted(found.values(), key=lambda p: (p.in_subgraph, p.order, p.name))


def _collect(index: GraphIndex, found: dict[int, PrunableWeight], *, in_subgraph: bool) -> None:
    for position, node in enumerate(index.graph.node):
        for slot, name in enumerate(node.input):
            if not name or slot > (2 if node.op_type in RECURRENT_GATES else 1):
                continue
            weight, chain = index.resolve(name)
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
            entry = found.get(id(weight.tensor))
            if entry is None:
                entry = PrunableWeight(weight=weight, order=position, in_subgraph=in_subgraph)
                found[id(weight.tensor)] = entry
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
        pattern = next((pat for pat in exclude for n in names if n and fnmatch.fnmatchcase(n, pat)), None)
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
