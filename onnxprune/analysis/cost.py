"""Parameters and multiply-accumulates (MACs) per node, from ONNX shape inference.

Shape inference runs on a *skeleton* of the model (large tensors keep their dims but not
their bytes), so it costs memory proportional to the graph, not to the weights.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..model import get_attr, iter_graphs
from ..shapes import fold_static_shape_reads, skeleton, symbolic_inference


def infer_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> dict[str, list[int | None]]:
    """Static shape of every tensor that shape inference can resolve (dims may be None)."""
    skel = skeleton(model, input_shapes)
    if any(n.op_type == "Shape" for n in skel.graph.node):  # sizes computed from shapes become known
        fold_static_shape_reads(skel)
    skel = symbolic_inference(skel)
    try:
        inferred = onnx.shape_inference.infer_shapes(skel, data_prop=True)
    except Exception:  # noqa: BLE001 - shapes are best effort for cost figures
        inferred = skel
    shapes: dict[str, list[int | None]] = {}
    for graph in iter_graphs(inferred.graph):  # subgraphs too: their nodes' MACs count where they run
        for value in [*graph.input, *graph.value_info, *graph.output]:
            if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
                continue
            if value.name not in shapes or graph is inferred.graph:
                shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None
                                      for d in value.type.tensor_type.shape.dim]
        for init in graph.initializer:
            shapes[init.name] = list(init.dims)
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.TENSOR:
                        shapes[node.output[0]] = list(attr.t.dims)
    return shapes


def _known(shape) -> bool:
    return shape is not None and all(d is not None for d in shape)


def node_key(node: onnx.NodeProto, position: int) -> str:
    """The key a node has in cost tables: its name, or ``#position`` when unnamed."""
    return node.name or f"#{position}"


def node_macs(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None,
              shapes: dict[str, list[int | None]] | None = None, notes: list[str] | None = None) -> dict[str, int]:
    """MACs of each Conv, ConvTranspose, Gemm, MatMul and LSTM/GRU/RNN node of the main graph; an
    If/Loop/Scan node counts the MACs of its subgraphs as they run (see :func:`_control_flow_macs`, which
    appends to ``notes`` how each was counted)."""
    shapes = shapes if shapes is not None else infer_shapes(model, input_shapes)
    if any(_subgraphs(node) for node in model.graph.node):
        shapes = {**infer_shapes(model, input_shapes), **shapes}  # the subgraphs' own tensors
    constants = {init.name: init for init in model.graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in model.graph.node
                      if n.op_type == "Constant" and n.output and n.attribute and n.attribute[0].HasField("t")})
    macs: dict[str, int] = {}
    for position, node in enumerate(model.graph.node):
        if _subgraphs(node):
            value = _control_flow_macs(node, shapes, constants, notes if notes is not None else [])
        else:
            value = _macs(node, shapes)
        if value:
            macs[node_key(node, position)] = value
    return macs


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    graphs: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attr.graphs)
    return graphs


def _graph_macs(graph: onnx.GraphProto, shapes: dict, constants: dict, notes: list[str]) -> int:
    """MACs of a subgraph's nodes; layers whose shapes stay unknown are named in ``notes``."""
    total, unknown = 0, []
    for n in graph.node:
        value = _control_flow_macs(n, shapes, constants, notes) if _subgraphs(n) else _macs(n, shapes)
        if not value and n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN"):
            unknown.append(n.name or n.output[0])
        total += value
    if unknown:
        notes.append(f"subgraph {graph.name!r}: {len(unknown)} layer(s) with shapes unknown before run time are not "
                     f"counted ({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''})")
    return total


def _control_flow_macs(node: onnx.NodeProto, shapes: dict, constants: dict, notes: list[str]) -> int:
    """MACs of the subgraphs that run: If's branch chosen by a constant condition, else the larger one;
    a Loop body times its constant trip count (else once); a Scan body times the scanned length."""
    what = f"{node.op_type} {node.name!r}"
    if node.op_type == "If":
        branches = {a.name: _graph_macs(a.g, shapes, constants, notes) for a in node.attribute
                    if a.type == onnx.AttributeProto.GRAPH}
        cond = constants.get(node.input[0])
        if cond is not None:
            chosen = "then_branch" if bool(onnx.numpy_helper.to_array(cond).reshape(-1)[0]) else "else_branch"
            notes.append(f"{what}: the {chosen.split('_')[0]} branch runs (constant condition)")
            return branches.get(chosen, 0)
        larger = max(branches, key=branches.get) if branches else ""
        if len(set(branches.values())) > 1:
            notes.append(f"{what}: the condition is known only at run time; the larger branch "
                         f"({larger.split('_')[0]}, {branches[larger]:,} MACs) is counted")
        return max(branches.values(), default=0)
    body = sum(_graph_macs(g, shapes, constants, notes) for g in _subgraphs(node))
    if node.op_type == "Loop":
        trips = constants.get(node.input[0]) if node.input and node.input[0] else None
        if trips is None:
            if body:
                notes.append(f"{what}: the trip count is known only at run time; the body is counted once")
            return body
        return body * int(onnx.numpy_helper.to_array(trips).reshape(-1)[0])
    if node.op_type == "Scan":
        count = int(get_attr(node, "num_scan_inputs", 0) or 0)
        axes = get_attr(node, "scan_input_axes") or [0] * count
        first = node.input[len(node.input) - count] if count else ""
        shape = shapes.get(first)
        length = shape[int(axes[0]) % len(shape)] if shape else None
        if length is None:
            if body:
                notes.append(f"{what}: the scanned length is unknown; the body is counted once")
            return body
        return body * int(length)
    return body


def _macs(node: onnx.NodeProto, shapes: dict[str, list[int | None]]) -> int:
    op = node.op_type
    get = shapes.get
    if node.domain == "com.microsoft" and op == "Attention" and len(node.input) > 1:
        return _fused_attention_macs(node, get(node.input[0]), get(node.input[1]))
    weight_slot = {"QLinearConv": 3, "QLinearMatMul": 3}.get(op, 1)
    op = {"ConvInteger": "Conv", "QLinearConv": "Conv", "MatMulInteger": "MatMul", "QLinearMatMul": "MatMul"}.get(op, op)
    if op in ("Conv", "ConvTranspose") and len(node.input) > weight_slot:
        w, y, x = get(node.input[weight_slot]), get(node.output[0]), get(node.input[0])
        if not _known(w):
            return 0
        kernel = int(np.prod(w[2:], dtype=np.int64))
        if op == "Conv" and _known(y):
            return int(np.prod(y, dtype=np.int64)) * int(w[1]) * kernel
        if op == "ConvTranspose" and _known(x):
            return int(np.prod(x, dtype=np.int64)) * int(w[1]) * kernel
        return 0
    if op == "Gemm" and len(node.input) > 1:
        a, y = get(node.input[0]), get(node.output[0])
        if not (_known(a) and _known(y)):
            return 0
        k = a[0] if get_attr(node, "transA", 0) else a[1]
        return int(np.prod(y, dtype=np.int64)) * int(k)
    if op in ("LSTM", "GRU", "RNN") and len(node.input) > 2:
        return _recurrent_macs(node, get(node.input[0]), get(node.input[1]), get(node.input[2]))
    if op == "MatMul" and len(node.input) > weight_slot:
        a, y = get(node.input[0]), get(node.output[0])
        if not (_known(a) and _known(y)) or not a:
            return 0
        return int(np.prod(y, dtype=np.int64)) * int(a[-1])
    return 0


def _recurrent_macs(node: onnx.NodeProto, x, w, r) -> int:
    """LSTM/GRU/RNN: every step of every direction multiplies X_t by W and H_{t-1} by R (gate rows)."""
    if not (_known(x) and _known(w) and _known(r)) or len(x) != 3 or len(w) != 3:
        return 0
    steps, batch = (x[1], x[0]) if get_attr(node, "layout", 0) else (x[0], x[1])
    return int(steps * batch * w[0] * w[1] * (w[2] + r[2]))


def _fused_attention_macs(node: onnx.NodeProto, x, w) -> int:
    """onnxruntime's Attention: the QKV projection plus scores (q.k) and context (p.v) per head."""
    if not (_known(x) and _known(w)) or len(x) != 3 or len(w) != 2:
        return 0
    batch, seq, hidden = x
    sizes = [int(v) for v in (get_attr(node, "qkv_hidden_sizes") or [w[1] // 3] * 3)]
    projection = batch * seq * hidden * int(w[1])
    return int(projection + batch * seq * seq * (sizes[0] + sizes[2]))


def total_macs(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> int:
    """Sum of :func:`node_macs`."""
    return int(sum(node_macs(model, input_shapes).values()))
