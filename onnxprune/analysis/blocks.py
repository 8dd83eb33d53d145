"""Residual blocks: the ``Add(x, f(x))`` points of a residual stream that can be removed whole (depth pruning).

A block is ONE ``x + f(x)``: the Add, its stream input ``x`` and the nodes ``f`` that compute its other input from
``x`` (``f`` = every node both fed by ``x`` and feeding the Add). A transformer layer holds two blocks (attention,
MLP); a ResNet/MobileNetV2/ConvNeXt block is one. Removing a block rewires the Add's readers to ``x``; what follows
the Add (ResNet's Relu, post-LN BERT's LayerNorm) stays. A block is removable when nothing outside ``f`` reads its
intermediates, ``f(x)`` has ``x``'s shape, and ``f`` reads no other point of the stream; shape computations from
``x`` shared with other layers (masks, sizes) and side inputs such as attention masks or rotary tables stay.
This module only reads the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx

from ..graph import GraphIndex, node_subgraphs, subgraph_reads
from .cost import infer_shapes

WEIGHTED_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum"}
SHAPE_OPS = {"Shape", "Size"}
#: single-input ops a projection shortcut may end with (``BN(Conv(x))``)
SHORTCUT_TAIL = {"BatchNormalization", "Identity", "Cast", "Relu"}


@dataclass
class ResidualBlock:
    """One ``out = x + f(x)``: the Add, the stream tensor ``x``, the branch output ``y`` and the nodes of ``f``."""

    add: onnx.NodeProto
    x: str
    y: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    kind: str = "mlp"  # "attention", "mlp" or "conv"
    channel_axis: int = -1  # the axis block influence compares x_in and x_out along
    reason: str | None = None  # why it cannot be removed (None: removable)

    @property
    def output(self) -> str:
        return self.add.output[0]

    @property
    def name(self) -> str:
        return self.add.name or self.output

    def to_dict(self) -> dict[str, Any]:
        info: dict[str, Any] = {"add": self.name, "input": self.x, "output": self.output, "kind": self.kind,
                                "nodes": len(self.nodes)}
        if self.reason:
            info["reason"] = self.reason
        return info


@dataclass
class BlockAnalysis:
    """Every residual Add found: the removable blocks in graph order and the others with why not."""

    blocks: list[ResidualBlock]
    rejected: list[ResidualBlock]

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": [b.to_dict() for b in self.blocks], "not_removable": [b.to_dict() for b in self.rejected]}


def find_blocks(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> BlockAnalysis:
    """The residual blocks of ``model``'s main graph (removable ones and, with a reason, the others)."""
    graph = model.graph
    index = GraphIndex.build(graph)
    shapes = infer_shapes(model, input_shapes)
    constants = _constant_tensors(graph, index)
    position = {id(node): i for i, node in enumerate(graph.node)}
    outputs = {o.name for o in graph.output}
    found: list[ResidualBlock] = []
    for node in graph.node:
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        a, b = node.input
        if not a or not b or a in constants or b in constants or a == b:
            continue
        block = _residual(index, node, a, b, shapes, constants, outputs) or \
            _residual(index, node, b, a, shapes, constants, outputs)
        if block is None:
            block = _projection(index, node, shapes)
        if block is not None:
            block.nodes.sort(key=lambda n: position[id(n)])
            found.append(block)
    _reject_nested(found)
    return BlockAnalysis([b for b in found if b.reason is None], [b for b in found if b.reason is not None])


def _constant_tensors(graph: onnx.GraphProto, index: GraphIndex) -> set[str]:
    """Tensors computed from weights alone (initializers, Constant nodes and what only they feed)."""
    inputs = {i.name for i in graph.input}
    constant = {name for name in index.weights if name not in inputs}
    for node in graph.node:
        reads = [n for n in node.input if n] + subgraph_reads(node)
        if node.op_type == "Constant" or (reads and all(n in constant for n in reads)):
            constant.update(o for o in node.output if o)
    return constant


def _descendants(index: GraphIndex, start: str, through_shapes: bool) -> set[int]:
    """Ids of the nodes fed by ``start`` (directly or not); without ``through_shapes``, Shape/Size end a path."""
    seen: set[int] = set()
    stack = [start]
    while stack:
        for node, _ in index.consumers.get(stack.pop(), []):
            if id(node) in seen or (not through_shapes and node.op_type in SHAPE_OPS):
                continue
            seen.add(id(node))
            stack.extend(o for o in node.output if o)
    return seen


def _ancestors(index: GraphIndex, end: str, stop: str) -> dict[int, onnx.NodeProto]:
    """The nodes feeding ``end`` (``end``'s producer included), not looking past ``stop``."""
    found: dict[int, onnx.NodeProto] = {}
    stack = [end]
    while stack:
        name = stack.pop()
        node = index.producer.get(name)
        if name == stop or node is None or id(node) in found:
            continue
        found[id(node)] = node
        stack.extend(n for n in node.input if n)
    return found


def _residual(index: GraphIndex, add: onnx.NodeProto, x: str, y: str, shapes: dict, constants: set[str],
              outputs: set[str]) -> ResidualBlock | None:
    """The block ``add = x + f(x)`` with ``y = f(x)``, or None when ``y`` is not computed from ``x`` with a weighted
    layer on the way (a GELU's ``x + 0.044715 x^3`` is no block)."""
    x_shape, out_shape = shapes.get(x), shapes.get(add.output[0])
    if x_shape is not None and out_shape is not None and list(x_shape) != list(out_shape):
        return None  # x is broadcast (an attention mask added to scores): not a stream
    data = _descendants(index, x, through_shapes=False)
    if index.producer.get(y) is None or id(index.producer[y]) not in data:
        return None
    every = _descendants(index, x, through_shapes=True)
    cone = _ancestors(index, y, x)
    nodes = {key: node for key, node in cone.items() if key in every}
    if not any(n.op_type in WEIGHTED_OPS and any(i in constants for i in n.input) for n in nodes.values()):
        return None
    block = ResidualBlock(add, x, y, kind=_kind(nodes.values()))
    block.channel_axis = 1 if any(n.op_type in ("Conv", "ConvTranspose") for n in nodes.values()) else -1
    nodes = _shed_shared_shape_nodes(index, nodes, data, add)
    block.nodes = list(nodes.values())
    block.reason = _why_not(index, block, nodes, shapes, constants, outputs)
    return block


def _kind(nodes) -> str:
    ops = {n.op_type for n in nodes}
    if "Softmax" in ops or ops & {"Attention", "MultiHeadAttention", "GroupQueryAttention"}:
        return "attention"
    return "conv" if ops & {"Conv", "ConvTranspose"} else "mlp"


def _shed_shared_shape_nodes(index: GraphIndex, nodes: dict[int, onnx.NodeProto], data: set[int],
                             add: onnx.NodeProto) -> dict[int, onnx.NodeProto]:
    """Drop from ``f`` the shape-only nodes (reading ``x`` only through Shape/Size) whose outputs nodes outside
    ``f`` also read: shared size computations (masks, position ids) stay in the graph."""
    nodes = dict(nodes)
    changed = True
    while changed:
        changed = False
        for key, node in list(nodes.items()):
            if key in data:
                continue
            if any(id(reader) not in nodes and reader is not add for out in node.output if out
                   for reader, _ in index.consumers.get(out, [])):
                del nodes[key]
                changed = True
    return nodes


def _why_not(index: GraphIndex, block: ResidualBlock, nodes: dict[int, onnx.NodeProto], shapes: dict,
             constants: set[str], outputs: set[str]) -> str | None:
    """Why the block cannot be removed (None: it can)."""
    produced = {o for node in nodes.values() for o in node.output if o}
    for node in nodes.values():
        if node_subgraphs(node):
            return f"control flow inside the block ({node.op_type} {node.name!r})"
        for out in node.output:
            if out in outputs:
                return f"intermediate {out!r} is a graph output"
            readers = [r for r, _ in index.consumers.get(out, []) if id(r) not in nodes]
            if any(r is not block.add or out != block.y for r in readers):
                outside = next(r for r in readers if r is not block.add or out != block.y)
                return f"intermediate read outside the block ({out!r} by {outside.op_type} {outside.name!r})"
    if block.output in {n for node in index.graph.node for n in subgraph_reads(node)}:
        return "its output is read inside a control-flow subgraph"
    x_shape, y_shape = shapes.get(block.x), shapes.get(block.y)
    if x_shape is not None and y_shape is not None and list(x_shape) != list(y_shape):
        return f"f(x) has shape {y_shape}, not x's {x_shape} (broadcast into the stream)"
    for node in nodes.values():
        for name in node.input:
            if not name or name in produced or name == block.x or name in constants:
                continue
            if _stream_like(index, name, block, shapes):
                return f"reads another point of the residual stream ({name!r}), not only x"
    return None


def _stream_like(index: GraphIndex, name: str, block: ResidualBlock, shapes: dict) -> bool:
    """Whether a side input of ``f`` carries stream data: a float tensor of ``x``'s shape that is not a graph input
    (attention masks, rotary tables and shape tensors have other shapes)."""
    if name in {i.name for i in index.graph.input}:
        return False
    x_shape, shape = shapes.get(block.x), shapes.get(name)
    return x_shape is not None and shape is not None and list(shape) == list(x_shape)


def _projection(index: GraphIndex, add: onnx.NodeProto, shapes: dict) -> ResidualBlock | None:
    """An Add whose one input is a weighted layer (``BN(Conv(x))``) of a tensor the other input derives from: a
    projection shortcut, reported as not removable."""
    for short, long in (add.input, reversed(add.input)):
        node = index.producer.get(short)
        while node is not None and node.op_type in SHORTCUT_TAIL and node.input:
            node = index.producer.get(node.input[0])
        if node is None or node.op_type not in WEIGHTED_OPS or not node.input:
            continue
        source = node.input[0]
        long_node = index.producer.get(long)
        if long_node is not None and id(long_node) in _descendants(index, source, through_shapes=False):
            block = ResidualBlock(add, source, long, kind="conv" if node.op_type == "Conv" else "mlp")
            block.reason = f"projection shortcut ({node.op_type} {node.name!r} on the skip path changes the stream)"
            return block
    return None


def _reject_nested(blocks: list[ResidualBlock]) -> None:
    """A block whose ``f`` holds other residual Adds is not removable as one (its inner blocks are counted)."""
    adds = {id(b.add) for b in blocks}
    for block in blocks:
        inner = sum(1 for n in block.nodes if id(n) in adds)
        if inner and block.reason is None:
            block.reason = f"holds {inner} other residual block(s), counted on their own"


def describe_blocks(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """``inspect``'s view: the removable blocks with their kind, the others with why not, or why none were found."""
    analysis = find_blocks(model, input_shapes)
    info = analysis.to_dict()
    if not analysis.blocks:
        info["reason"] = ("no residual Add of the form x + f(x) with a weighted layer in f" if not analysis.rejected
                          else "every residual Add found is not removable (see not_removable)")
    return info
