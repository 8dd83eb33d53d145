"""Residual streams of transformer graphs, read only: the norms that read a stream, the linear layers and embedding
tables that write it, the linear layers that read the norms' outputs, and whatever else touches it.

A stream is found from its norms (``LayerNormalization`` over the last axis, or the decomposed RMSNorm
``Pow → ReduceMean → Add eps → Sqrt → Div|Reciprocal → Mul → Mul γ``). The tensor a norm reads is a *segment*; it is
decomposed, through residual ``Add`` nodes and same-type ``Cast`` nodes, into *terms*: linear writers
(``MatMul``/``Gemm`` with a constant weight, an optional bias ``Add``, ``Reshape`` nodes that keep the last axis),
embedding ``Gather`` rows, and shortcuts from an earlier segment (pre-LN) or from a norm's output (post-LN). The
hidden axis is the last axis. Anything else that touches the stream makes it not rotatable, with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import GraphIndex, get_attr
from .stream_model import (
    FLOAT,
    ConstantTerm,
    Embedding,
    Linear,
    Norm,
    NotRotatable,
    Segment,
    Shortcut,
    Stream,
    StreamReport,
)

# ---------------------------------------------------------------- norms


def _const(index: GraphIndex, name: str) -> np.ndarray | None:
    """The value behind ``name`` (through Identity/Cast), or None when it is not a constant."""
    weight, chain = index.resolve(name)
    if weight is None or any(n.op_type == "Transpose" for n in chain):
        return None
    return weight.array().astype(np.float64)


def _scalar(index: GraphIndex, name: str) -> float | None:
    value = _const(index, name)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _only(index: GraphIndex, name: str, op: str | tuple[str, ...]) -> onnx.NodeProto | None:
    """The single consumer of ``name`` when it is one of ``op``."""
    users = index.consumers.get(name, [])
    ops = (op,) if isinstance(op, str) else op
    return users[0][0] if len(users) == 1 and users[0][0].op_type in ops else None


def _other(node: onnx.NodeProto, name: str) -> str:
    return node.input[1] if node.input[0] == name else node.input[0]


def _reduce_axes(index: GraphIndex, node: onnx.NodeProto) -> list[int] | None:
    axes = get_attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = _const(index, node.input[1])
        axes = None if value is None else [int(v) for v in value.reshape(-1)]
    return None if axes is None else list(axes)


def _skip_casts(index: GraphIndex, name: str, nodes: list[onnx.NodeProto]) -> str:
    """Follow single-consumer float Casts forward from ``name``, collecting them."""
    while (cast := _only(index, name, "Cast")) is not None and get_attr(cast, "to") == FLOAT:
        nodes.append(cast)
        name = cast.output[0]
    return name


def _rms_norm(index: GraphIndex, pow_node: onnx.NodeProto, hidden: dict[str, int]) -> Norm | None:
    """The decomposed RMSNorm starting at ``pow_node`` (x ** 2), or None when the pattern does not match."""
    x = pow_node.input[0]
    if _scalar(index, pow_node.input[1]) != 2.0:
        return None
    mean = _only(index, pow_node.output[0], "ReduceMean")
    if mean is None or get_attr(mean, "keepdims", 1) != 1 or _reduce_axes(index, mean) not in ([-1], [len_of(hidden,
                                                                                                          x) - 1]):
        return None
    add = _only(index, mean.output[0], "Add")
    eps = _scalar(index, _other(add, mean.output[0])) if add is not None else None
    sqrt = _only(index, add.output[0], "Sqrt") if add is not None else None
    if eps is None or sqrt is None:
        return None
    nodes = [pow_node, mean, add, sqrt]
    step = _only(index, sqrt.output[0], ("Div", "Reciprocal"))
    if step is None:
        return None
    nodes.append(step)
    if step.op_type == "Div" and step.input[0] == x and step.input[1] == sqrt.output[0]:
        normalized = step.output[0]
    else:
        if step.op_type == "Div" and (step.input[1] != sqrt.output[0] or _scalar(index, step.input[0]) != 1.0):
            return None
        mul = _only(index, step.output[0], "Mul")
        if mul is None or _other(mul, step.output[0]) != x:
            return None
        nodes.append(mul)
        normalized = mul.output[0]
    out = _skip_casts(index, normalized, nodes)
    size = hidden.get(x)
    gamma = np.ones(size or 0)
    scale = _only(index, out, "Mul")
    if scale is not None and (value := _const(index, _other(scale, out))) is not None and value.ndim == 1:
        gamma, out = value, scale.output[0]
        nodes.append(scale)
    if size is None or gamma.shape != (size,):
        return None
    name = pow_node.name.rsplit("/", 1)[0] if "/" in pow_node.name else pow_node.name or out
    return Norm(name, "rmsnorm", x, out, gamma, np.zeros(size), eps, nodes)


def len_of(hidden: dict[str, int], name: str) -> int:
    """The rank recorded for ``name`` (``hidden`` keeps ``name#rank`` entries), or -1."""
    return hidden.get(name + "#rank", -1)


def _layer_norm(index: GraphIndex, node: onnx.NodeProto, hidden: dict[str, int]) -> Norm | None:
    x = node.input[0]
    size, rank = hidden.get(x), len_of(hidden, x)
    axis = get_attr(node, "axis", -1)
    if size is None or axis not in (-1, rank - 1) or any(o for o in node.output[1:]):
        return None
    gamma = _const(index, node.input[1])
    beta = _const(index, node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(size)
    if gamma is None or beta is None:
        return None
    gamma, beta = np.broadcast_to(gamma, (size,)).copy(), np.broadcast_to(beta, (size,)).copy()
    return Norm(node.name or node.output[0], "layernorm", x, node.output[0], gamma, beta,
                float(get_attr(node, "epsilon", 1e-5)), [node])


def find_norms(index: GraphIndex, hidden: dict[str, int]) -> list[Norm]:
    """Every norm over the last axis in graph order (LayerNormalization and decomposed RMSNorm)."""
    norms = []
    for node in index.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "LayerNormalization":
            norm = _layer_norm(index, node, hidden)
        elif node.op_type == "Pow":
            norm = _rms_norm(index, node, hidden)
        else:
            continue
        if norm is not None:
            norms.append(norm)
    return norms


# ---------------------------------------------------------------- writers and readers


def _matrix(index: GraphIndex, node: onnx.NodeProto, slot: int) -> np.ndarray | None:
    """The constant 2-D weight read by ``node`` at ``slot`` as [in, out] float64, or None."""
    weight, chain = index.resolve(node.input[slot])
    if weight is None or not weight.is_float or len(weight.shape) != 2:
        return None
    value = weight.array().astype(np.float64)
    for step in chain:
        if step.op_type == "Transpose":
            value = value.T
    if node.op_type == "Gemm":
        if get_attr(node, "transA", 0) or get_attr(node, "alpha", 1.0) != 1.0 or get_attr(node, "beta", 1.0) != 1.0:
            return None
        if get_attr(node, "transB", 0):
            value = value.T
    return value


def _bias_of(index: GraphIndex, linear: onnx.NodeProto, out_size: int) -> tuple[tuple | None, str]:
    """The bias of ``linear`` (Gemm C, or a following single-consumer Add of an [out] constant) and the tensor after
    it."""
    if linear.op_type == "Gemm":
        if len(linear.input) > 2 and linear.input[2]:
            value = _const(index, linear.input[2])
            if value is None or value.size not in (1, out_size):
                raise NotRotatable(f"Gemm {linear.name} has a bias that is not a constant [{out_size}] vector")
            return (linear, 2), linear.output[0]
        return None, linear.output[0]
    add = _only(index, linear.output[0], "Add")
    if add is not None:
        value = _const(index, _other(add, linear.output[0]))
        if value is not None and value.shape == (out_size,):
            return (add, list(add.input).index(_other(add, linear.output[0]))), add.output[0]
    return None, linear.output[0]


def _writer(index: GraphIndex, name: str, hidden: int) -> Linear | Embedding | None:
    """The writer behind a term tensor: [Reshape|Cast]* ← [bias Add] ← MatMul/Gemm, or ← Gather of a table."""
    reshapes: list[onnx.NodeProto] = []
    node = index.producer.get(name)
    while node is not None and (node.op_type == "Reshape" or (node.op_type == "Cast" and get_attr(node, "to") == FLOAT)):
        if node.op_type == "Reshape":
            reshapes.append(node)
        node = index.producer.get(node.input[0])
    if node is None:
        return None
    if node.op_type == "Gather" and not reshapes and get_attr(node, "axis", 0) == 0:
        weight, chain = index.resolve(node.input[0])
        if weight is not None and weight.is_float and len(weight.shape) == 2 and weight.shape[1] == hidden \
                and not any(n.op_type == "Transpose" for n in chain):
            return Embedding(node, weight.array().astype(np.float64))
        return None
    bias = None
    if node.op_type == "Add":
        for slot in (0, 1):
            value = _const(index, node.input[slot])
            linear = index.producer.get(node.input[1 - slot])
            if value is not None and value.shape == (hidden,) and linear is not None \
                    and linear.op_type == "MatMul" and len(index.consumers.get(linear.output[0], [])) == 1:
                bias, node = (node, slot), linear
                break
        else:
            return None
    if node.op_type not in ("MatMul", "Gemm"):
        return None
    weight = _matrix(index, node, 1)
    if weight is None or weight.shape[1] != hidden:
        return None
    if node.op_type == "Gemm":
        bias, _ = _bias_of(index, node, hidden)
    return Linear(node, weight, bias, list(reversed(reshapes)), name)


def _patch_writer(index: GraphIndex, name: str, hidden: int) -> Linear | None:
    """``Transpose(perm 0,2,1) <- Reshape/Flatten to [B, H, P] <- Conv`` with H output channels (ViT patches); the
    Reshape's size may come from a Shape of the Conv's output (it then reads the kept width)."""
    transpose = index.producer.get(name)
    if transpose is None or transpose.op_type != "Transpose" or list(get_attr(transpose, "perm", [])) != [0, 2, 1]:
        return None
    flat = index.producer.get(transpose.input[0])
    conv = index.producer.get(flat.input[0]) if flat is not None and flat.op_type in ("Reshape", "Flatten") else None
    if conv is None or conv.op_type != "Conv" or get_attr(conv, "group", 1) != 1:
        return None
    weight = index.lookup_weight(conv.input[1])
    others = [n for n, _ in index.consumers.get(conv.output[0], []) if n is not flat]
    if weight is None or weight.shape[0] != hidden or any(n.op_type != "Shape" for n in others) \
            or (flat.op_type == "Flatten" and get_attr(flat, "axis", 1) != 2):
        return None
    value = weight.array().astype(np.float64).reshape(hidden, -1).T
    bias = (conv, 2) if len(conv.input) > 2 and conv.input[2] else None
    return Linear(conv, value, bias, [], name, conv=True)


def _reader(index: GraphIndex, name: str, hidden: int) -> tuple[Linear | None, onnx.NodeProto]:
    """The linear reader starting at the consumer of ``name`` ([Reshape]* → MatMul/Gemm as input A), or None and the
    first node that is not part of one."""
    first = None
    reshapes: list[onnx.NodeProto] = []
    current = name
    while True:
        users = index.consumers.get(current, [])
        node, slot = users[0] if users else (None, -1)
        first = first or node
        if node is not None and node.op_type == "Reshape" and slot == 0 and len(users) == 1:
            reshapes.append(node)
            current = node.output[0]
            continue
        break
    if node is None or node.op_type not in ("MatMul", "Gemm") or slot != 0 or len(users) != 1:
        return None, first
    weight = _matrix(index, node, 1)
    if weight is None or weight.shape[0] != hidden:
        return None, first
    bias, _ = _bias_of(index, node, weight.shape[1])
    return Linear(node, weight, bias, reshapes, name), first


# ---------------------------------------------------------------- streams


class _Finder:
    """Decomposes the norms' inputs into terms and checks that nothing else touches the stream."""

    def __init__(self, index: GraphIndex, hidden: dict[str, int], norms: list[Norm]):
        self.index, self.hidden = index, hidden
        self.by_input: dict[str, list[Norm]] = {}
        for norm in norms:
            self.by_input.setdefault(norm.input, []).append(norm)
        self.by_output = {n.output: n for n in norms}

    def segment(self, tensor: str) -> Segment:
        """The terms of segment ``tensor``: Adds and float Casts are walked back to writers and shortcuts."""
        segment = Segment(tensor, norms=self.by_input.get(tensor, []))
        size, rank = self.hidden[tensor], len_of(self.hidden, tensor)
        stack: list[tuple[str, onnx.NodeProto | None, int]] = [(tensor, None, -1)]
        while stack:
            name, consumer, slot = stack.pop()
            if consumer is not None and (name in self.by_input or name in self.by_output):
                segment.shortcuts.append(Shortcut(consumer, slot, name, self.by_output.get(name)))
                continue
            node = self.index.producer.get(name)
            if node is not None and node.op_type == "Cast" and get_attr(node, "to") == FLOAT:
                segment.nodes.append(node)
                stack.append((node.input[0], node, 0))
                continue
            if node is not None and node.op_type == "Add" and all(
                    self.hidden.get(t) == size and len_of(self.hidden, t) == rank for t in node.input[:2]):
                segment.nodes.append(node)
                stack.extend((t, node, i) for i, t in enumerate(node.input[:2]))
                continue
            if consumer is not None and (value := _const(self.index, name)) is not None and value.shape[-1:] == (size,):
                segment.constants.append(ConstantTerm(consumer, slot, value))
                continue
            if node is not None and node.op_type == "Expand" and (value := _const(self.index, node.input[0])) \
                    is not None and value.shape[-1:] == (size,):
                segment.constants.append(ConstantTerm(node, 0, value))
                segment.nodes.append(node)
                continue
            if node is not None and node.op_type == "Concat" and get_attr(node, "axis") not in (-1, rank - 1):
                segment.nodes.append(node)
                stack.extend((t, node, i) for i, t in enumerate(node.input))
                continue
            writer = _writer(self.index, name, size) or _patch_writer(self.index, name, size)
            if isinstance(writer, Embedding):
                segment.embeddings.append(writer)
            elif isinstance(writer, Linear):
                segment.writers.append(writer)
            else:
                what = f"{node.op_type} {node.name}" if node is not None else f"the graph input {name}"
                raise NotRotatable(f"{what} writes into the stream and is not a linear layer or an embedding")
        return segment


def _hidden_sizes(index: GraphIndex, shapes: dict[str, list]) -> dict[str, int]:
    """Last-axis size and rank of every tensor with a known last dim (``name#rank`` keys hold ranks)."""
    sizes: dict[str, int] = {}
    for name, shape in shapes.items():
        if shape and isinstance(shape[-1], int) and shape[-1] > 0:
            sizes[name] = int(shape[-1])
            sizes[name + "#rank"] = len(shape)
    return sizes


def find_streams(model: onnx.ModelProto, shapes: dict[str, list]) -> StreamReport:
    """The residual streams of the main graph (``shapes``: inferred tensor shapes), or why there are none."""
    index = GraphIndex.build(model.graph)
    hidden = _hidden_sizes(index, shapes)
    norms = find_norms(index, hidden)
    contrib = sorted({n.op_type for n in model.graph.node if n.op_type in (
        "SkipLayerNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
        "EmbedLayerNormalization")})
    if contrib:
        return StreamReport([], [(f"fused norm ops ({', '.join(contrib)}) hide the residual stream; export without "
                                  "onnxruntime's transformer fusions")])
    if not norms:
        return StreamReport([], ["no LayerNormalization or RMSNorm over the last axis"])
    depthwise = _depthwise_on_stream(index)
    if depthwise:
        return StreamReport([], [depthwise])
    finder = _Finder(index, hidden, norms)
    try:
        stream = _build(finder, norms, model)
    except NotRotatable as exc:
        return StreamReport([], [str(exc)])
    return StreamReport([stream], [])


def _depthwise_on_stream(index: GraphIndex) -> str | None:
    """Why rotation does not apply to a CNN stream (ConvNeXt): a depthwise Conv reads a tensor that a residual Add
    also reads. A per-channel filter does not commute with a rotation that mixes channels."""
    for node in index.graph.node:
        if node.op_type != "Add" or any(index.lookup_weight(name) is not None for name in node.input):
            continue
        for name in node.input:
            for reader, slot in index.consumers.get(name, []):
                weight = index.lookup_weight(reader.input[1]) if reader.op_type == "Conv" and slot == 0 else None
                group = get_attr(reader, "group", 1) if weight is not None else 1
                if group > 1 and group == weight.shape[0]:
                    return (f"rotation does not apply: depthwise Conv {reader.name} reads the residual stream "
                            f"({name}); a per-channel filter does not commute with a rotation of the channels")
    return None


def _build(finder: _Finder, norms: list[Norm], model: onnx.ModelProto) -> Stream:
    index = finder.index
    kinds = {n.kind for n in norms}
    if len(kinds) > 1:
        raise NotRotatable("the stream mixes LayerNorm and RMSNorm")
    sizes = {n.gamma.shape[0] for n in norms}
    if len(sizes) > 1:
        raise NotRotatable(f"norms over different sizes {sorted(sizes)}: more than one stream")
    hidden = sizes.pop()
    order = {n.input: index.node_order[id(n.nodes[0])] for n in norms}
    segments = [finder.segment(t) for t in sorted(order, key=order.get)]
    readers: dict[str, list[Linear]] = {}
    hidden_of = finder.hidden
    restored: dict[str, list[str]] = {}
    shape_reads: list[tuple[str, onnx.NodeProto, bool]] = []
    shortcut_adds = {(id(c.add), c.slot) for s in segments for c in s.shortcuts}
    outputs = {o.name for o in model.graph.output}
    for norm in norms:
        readers[norm.name], restored[norm.name] = [], []
        for node, slot in index.consumers.get(norm.output, []):
            if (id(node), slot) in shortcut_adds:
                continue
            if node.op_type == "Shape":
                shape_reads.append((norm.output, node, _reads_width(index, node, len_of(hidden_of, norm.output))))
                continue
            reader, first = _reader_from(index, node, slot, norm.output, hidden)
            if reader is not None:
                readers[norm.name].append(reader)
            else:
                restored[norm.name].append(f"{first.op_type} {first.name}")
        if norm.output in outputs:
            restored[norm.name].append(f"output {norm.output}")
    shape_reads += _check_raw_consumers(index, segments, norms, outputs, finder.hidden)
    return Stream(hidden, "layernorm" in kinds, segments, readers, restored, shape_reads)


def _reader_from(index: GraphIndex, node: onnx.NodeProto, slot: int, name: str, hidden: int):
    """The linear reader starting with ``node`` reading ``name`` at ``slot`` (one consumer entry of a norm output)."""
    if node.op_type in ("MatMul", "Gemm") and slot == 0:
        weight = _matrix(index, node, 1)
        if weight is not None and weight.shape[0] == hidden:
            bias, _ = _bias_of(index, node, weight.shape[1])
            return Linear(node, weight, bias, [], name), node
        return None, node
    if node.op_type == "Reshape" and slot == 0:
        reader, _ = _reader(index, node.output[0], hidden)
        if reader is not None:
            reader.reshapes.insert(0, node)
            reader.entry = name
            return reader, node
    return None, node


def _reads_width(index: GraphIndex, shape: onnx.NodeProto, rank: int) -> bool:
    """Whether the value of ``shape`` (a Shape of a stream tensor) may be read at the hidden axis: False when every
    reader is a Gather of a constant index of another axis (the batch and sequence sizes do not change)."""
    if get_attr(shape, "start") is not None or get_attr(shape, "end") is not None or rank < 1:
        return True
    for node, slot in index.consumers.get(shape.output[0], []):
        index_value = _const(index, node.input[1]) if node.op_type == "Gather" and slot == 0 else None
        if index_value is None or index_value.size != 1 or int(index_value.reshape(-1)[0]) in (-1, rank - 1):
            return True
    return False


def _check_raw_consumers(index: GraphIndex, segments: list[Segment], norms: list[Norm], outputs: set[str],
                         hidden_of: dict[str, int]) -> list[tuple[str, onnx.NodeProto, bool]]:
    """Every consumer of a segment tensor (and the partial sums and casts building it) is a norm, a stream Add or a
    Shape (returned: its value is rebuilt); anything else raises :class:`NotRotatable`."""
    shape_reads = []
    allowed = {id(n) for norm in norms for n in norm.nodes}
    allowed |= {id(n) for s in segments for n in s.nodes}
    raw = {s.tensor for s in segments} | {o for s in segments for n in s.nodes for o in n.output}
    for name in raw:
        if name in outputs:
            raise NotRotatable(f"the stream tensor {name} is a graph output (its mean cannot be rotated back)")
        for node, _ in index.consumers.get(name, []):
            if node.op_type == "Shape":
                if _reads_width(index, node, len_of(hidden_of, name)):
                    shape_reads.append((name, node, True))
            elif id(node) not in allowed:
                raise NotRotatable(f"{node.op_type} {node.name} reads the stream tensor {name} directly")
    return shape_reads
