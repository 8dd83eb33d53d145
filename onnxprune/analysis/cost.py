"""Parameters and multiply-accumulates (MACs) per node, from ONNX shape inference.

Shape inference runs on a *skeleton* of the model (large tensors keep their dims but not
their bytes), so it costs memory proportional to the graph, not to the weights.
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx

from ..graph import constant_shapes, get_attr, iter_graphs, node_subgraphs, value_shapes
from ..shapes import SKELETON_MAX_ELEMENTS, fold_static_shape_reads, skeleton, symbolic_inference
from ..specs import ORT_TYPES, input_specs
from ..synthetic import integer_rules


def infer_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> dict[str, list[int | None]]:
    """Static shape of every tensor that shape inference can resolve (dims may be None)."""
    return _inferred(model, input_shapes)[0]


def _inferred(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None
              ) -> tuple[dict[str, list[int | None]], dict[str, bool]]:
    """Shapes as :func:`infer_shapes` gives them, and the condition of each If (by its first output) that the
    resolved inputs decide (see :func:`resolve_control_flow`)."""
    skel = skeleton(model, input_shapes)
    weights_as_inputs(skel)
    if any(n.op_type == "Shape" for n in skel.graph.node):  # sizes computed from shapes become known
        fold_static_shape_reads(skel)
    conditions: dict[str, bool] = {}
    if any(node_subgraphs(node) for node in skel.graph.node):
        skel, conditions = resolve_control_flow(skel, input_values(model, skel))
        return _all_shapes(skel), conditions
    shapes = _all_shapes(skel)
    if _unresolved_layers(skel.graph, shapes):  # sizes computed at run time: evaluate them at the skeleton's dims
        skel, conditions = resolve_control_flow(skel, input_values(model, skel))
        shapes = {**shapes, **_all_shapes(skel)}
    return shapes, conditions


def _all_shapes(skel: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Shapes after symbolic and onnx inference of ``skel`` (left as it is), subgraph tensors included."""
    inferred = symbolic_inference(skel)
    with contextlib.suppress(Exception):  # shapes are best effort for cost figures
        inferred = onnx.shape_inference.infer_shapes(inferred, data_prop=True)
    shapes: dict[str, list[int | None]] = {}
    for graph in iter_graphs(inferred.graph):  # subgraphs too: their nodes' MACs count where they run
        main = graph is inferred.graph
        shapes.update((name, dims) for name, dims in value_shapes(graph).items() if main or name not in shapes)
        shapes.update(constant_shapes(graph))
    return shapes


def _unresolved_layers(graph: onnx.GraphProto, shapes: dict[str, list[int | None]]) -> bool:
    """Does a layer of the main graph count 0 MACs because a shape it needs stays unknown?"""
    return any(n.op_type in LAYER_OPS and not _macs(n, shapes) for n in graph.node)


def weights_as_inputs(skel: onnx.ModelProto) -> int:
    """In place: every tensor of a skeleton whose bytes were stripped (initializers, and weights held as Constant
    nodes as Paddle and old torch exports do; in any graph) becomes an input of the main graph with its type and
    dims. onnxruntime's symbolic inference reads the value of every Constant and of every initializer an
    element-wise op meets (a 6,625-class bias) and gives up on the whole graph at an empty one, which left every
    layer behind a run-time computed shape uncounted; an input has a shape and no value. Returns how many moved."""
    main = skel.graph
    moved: list[onnx.TensorProto] = []
    for graph in iter_graphs(main):
        stripped = [t for t in graph.initializer if not _small(t)]
        if stripped:
            names = {t.name for t in stripped}
            kept_inits = [t for t in graph.initializer if t.name not in names]
            del graph.initializer[:]
            graph.initializer.extend(kept_inits)
            moved.extend(stripped)
        kept = []
        for node in graph.node:
            tensor = node.attribute[0].t if node.op_type == "Constant" and len(node.attribute) == 1 \
                and node.attribute[0].name == "value" and node.output else None
            if tensor is None or _small(tensor):
                kept.append(node)
                continue
            moved.append(onnx.TensorProto(name=node.output[0], data_type=tensor.data_type, dims=tensor.dims))
        if len(kept) != len(graph.node):
            copies = [onnx.NodeProto() for _ in kept]
            for copy, node in zip(copies, kept):
                copy.CopyFrom(node)
            del graph.node[:]
            graph.node.extend(copies)
    listed = {v.name for v in main.input}
    main.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                      for t in moved if t.name not in listed)
    return len(moved)


def input_values(model: onnx.ModelProto, skel: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Integer inputs the graph compares with constants (a sample rate against 8000/16000), at the value the input
    resolution tries first (:func:`onnxprune.feeds.integer_rules`), in the skeleton's concrete shapes."""
    specs = input_specs(model)
    rules = integer_rules(model, specs)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in skel.graph.input}
    values = {}
    for spec in specs:
        rule = rules.get(spec.name)
        if rule is not None and rule[0] == "values" and spec.name in dims:
            values[spec.name] = np.full(dims[spec.name], rule[1][0], dtype=ORT_TYPES[spec.type])
    return values


def resolve_control_flow(skel: onnx.ModelProto, values: dict[str, np.ndarray]
                         ) -> tuple[onnx.ModelProto, dict[str, bool]]:
    """The skeleton with every If whose condition follows from constants, ``values`` and known shapes replaced by the
    branch it takes (repeated while that decides more), and those conditions by the If's first output. Only the
    small constant/shape sub-graphs are evaluated, by onnx's reference implementation; no layer runs."""
    conditions: dict[str, bool] = {}
    graph = skel.graph
    if values:
        kept = [v for v in graph.input if v.name not in values]
        nodes = [onnx.helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(value))
                 for name, value in values.items()]
        del graph.input[:]
        graph.input.extend(kept)
        nodes.extend(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    for _ in range(16):
        fold_small_constants(skel)
        changed = _inline_decided_ifs(skel, conditions)
        with contextlib.suppress(Exception):
            inferred = onnx.shape_inference.infer_shapes(skel, data_prop=True)
            changed += _fold_shapes(skel, inferred)
        if not changed:
            break
    return skel, conditions


def _fold_shapes(skel: onnx.ModelProto, inferred: onnx.ModelProto) -> int:
    """Replace Shape nodes (any graph) whose input shape ``inferred`` knows fully by Constants."""
    known = {}
    for graph in iter_graphs(inferred.graph):
        known.update((name, dims) for name, dims in value_shapes(graph).items() if None not in dims)
    folded = 0
    for graph in iter_graphs(skel.graph):
        for position, node in enumerate(graph.node):
            if node.op_type != "Shape" or node.input[0] not in known:
                continue
            dims = known[node.input[0]]
            start, end = get_attr(node, "start", 0), get_attr(node, "end", len(dims))
            value = np.array(dims[start:end], dtype=np.int64)
            graph.node[position].CopyFrom(onnx.helper.make_node(
                "Constant", [], [node.output[0]], name=node.name, value=onnx.numpy_helper.from_array(value)))
            folded += 1
    return folded


def _inline_decided_ifs(skel: onnx.ModelProto, conditions: dict[str, bool]) -> int:
    """Replace each If whose condition is a Constant of its graph by the nodes of the branch it takes."""
    inlined = 0
    for graph in reversed(list(iter_graphs(skel.graph))):  # children first: a parent's edit leaves them behind
        consts = {n.output[0]: n.attribute[0].t for n in graph.node
                  if n.op_type == "Constant" and n.output and n.attribute and n.attribute[0].HasField("t")}
        consts.update({i.name: i for i in graph.initializer})
        nodes, changed = [], False
        for node in graph.node:
            cond = consts.get(node.input[0]) if node.op_type == "If" else None
            if cond is None or not cond.ByteSize():
                nodes.append(node)
                continue
            taken = bool(onnx.numpy_helper.to_array(cond).reshape(-1)[0])
            conditions[node.output[0]] = taken
            branch = get_attr(node, "then_branch" if taken else "else_branch")
            nodes.extend(branch.node)
            graph.initializer.extend(branch.initializer)
            nodes.extend(onnx.helper.make_node("Identity", [inner.name], [outer])
                         for inner, outer in zip(branch.output, node.output) if outer)
            changed = True
        if changed:
            copies = [onnx.NodeProto() for _ in nodes]
            for copy, node in zip(copies, nodes):
                copy.CopyFrom(node)
            del graph.node[:]
            graph.node.extend(copies)
            inlined += 1
    return inlined


#: ops never folded (state, randomness, subgraphs) when evaluating constant chains
_NOT_FOLDED = {"If", "Loop", "Scan", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
               "Multinomial", "Bernoulli", "Constant"}


def fold_small_constants(model: onnx.ModelProto) -> int:
    """In place, in every graph: replace each node whose inputs are all small constants by a Constant holding its
    value (evaluated by onnx's reference implementation), so shape inference sees pads, axes and sizes that an
    exporter computes from constants. Returns how many nodes were folded."""
    folded = 0
    known: dict[str, np.ndarray] = {}
    for graph in iter_graphs(model.graph):  # parents before children: outer constants are known inside
        for init in graph.initializer:
            if _small(init):
                known[init.name] = onnx.numpy_helper.to_array(init)
        for position, node in enumerate(graph.node):
            if node.op_type == "Constant" and node.output and node.attribute and node.attribute[0].HasField("t") \
                    and node.attribute[0].name == "value" and _small(node.attribute[0].t):
                known[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
                continue
            if node.op_type in _NOT_FOLDED or node.domain not in ("", "ai.onnx") or len(node.output) != 1 \
                    or not node.input or not all(name in known for name in node.input if name):
                continue
            value = evaluate_node(model, node, known)
            if value is None:
                continue
            if value.size > SKELETON_MAX_ELEMENTS or value.dtype == object:
                continue
            known[node.output[0]] = value
            graph.node[position].CopyFrom(onnx.helper.make_node(
                "Constant", [], [node.output[0]], name=node.name, value=onnx.numpy_helper.from_array(value)))
            folded += 1
    return folded


def _small(tensor: onnx.TensorProto) -> bool:
    """A tensor whose values the skeleton keeps (small enough, data present)."""
    return int(np.prod(tensor.dims, dtype=np.int64)) <= SKELETON_MAX_ELEMENTS and tensor.data_location == \
        onnx.TensorProto.DEFAULT and tensor.ByteSize() > 0


def evaluate_node(model: onnx.ModelProto, node: onnx.NodeProto, known: dict[str, np.ndarray]) -> np.ndarray | None:
    """The first output of ``node`` on the constant inputs ``known``, by onnx's reference implementation at the
    model's opsets (None where it cannot evaluate it)."""
    from onnx.reference import ReferenceEvaluator

    names = list(dict.fromkeys(n for n in node.input if n))
    inputs = [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(known[n].dtype),
                                                 known[n].shape) for n in names]
    tiny = onnx.helper.make_model(onnx.helper.make_graph(
        [node], "fold", inputs, [onnx.helper.make_empty_tensor_value_info(node.output[0])]),
        opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        with np.errstate(all="ignore"):  # a log of 0 in a mask is -inf by design, not a warning for the user
            return np.asarray(ReferenceEvaluator(tiny).run(None, {n: known[n] for n in names})[0])
    except Exception:  # noqa: BLE001 - an op the reference cannot evaluate stays as it is
        return None


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
    conditions: dict[str, bool] = {}
    if any(node_subgraphs(node) for node in model.graph.node):
        inferred, conditions = _inferred(model, input_shapes)
        shapes = {**inferred, **(shapes or {})}  # the subgraphs' own tensors
    shapes = shapes if shapes is not None else infer_shapes(model, input_shapes)
    constants = {init.name: init for init in model.graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in model.graph.node
                      if n.op_type == "Constant" and n.output and n.attribute and n.attribute[0].HasField("t")})
    constants.update({name: onnx.numpy_helper.from_array(np.array(taken)) for name, taken in conditions.items()})
    macs: dict[str, int] = {}
    for position, node in enumerate(model.graph.node):
        if node_subgraphs(node):
            value = _control_flow_macs(node, shapes, constants, notes if notes is not None else [])
        else:
            value = _macs(node, shapes)
        if value:
            macs[node_key(node, position)] = value
    return macs


#: ops whose MACs are counted (with their integer and quantized spellings, see :func:`_macs`)
LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN"}


def _graph_macs(graph: onnx.GraphProto, shapes: dict, constants: dict, notes: list[str]) -> int:
    """MACs of a subgraph's nodes; layers whose shapes stay unknown are named in ``notes``."""
    total, unknown = 0, []
    for n in graph.node:
        value = _control_flow_macs(n, shapes, constants, notes) if node_subgraphs(n) else _macs(n, shapes)
        if not value and n.op_type in LAYER_OPS:
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
        cond = constants.get(node.output[0]) if node.output[0] in constants else constants.get(node.input[0])
        branches = {a.name: _graph_macs(a.g, shapes, constants, notes) for a in node.attribute
                    if a.type == onnx.AttributeProto.GRAPH and (cond is None or a.name == _taken(cond))}
        cond = constants.get(node.output[0]) if node.output[0] in constants else constants.get(node.input[0])
        if cond is not None:
            chosen = _taken(cond)
            how = "constant condition" if node.input[0] in constants else "condition computed from the resolved inputs"
            notes.append(f"{what}: the {chosen.split('_')[0]} branch runs ({how})")
            return branches.get(chosen, 0)
        larger = max(branches, key=branches.get) if branches else ""
        if len(set(branches.values())) > 1:
            notes.append(f"{what}: the condition is known only at run time; the larger branch "
                         f"({larger.split('_')[0]}, {branches[larger]:,} MACs) is counted")
        return max(branches.values(), default=0)
    body = sum(_graph_macs(g, shapes, constants, notes) for g in node_subgraphs(node))
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


def _taken(cond: onnx.TensorProto) -> str:
    return "then_branch" if bool(onnx.numpy_helper.to_array(cond).reshape(-1)[0]) else "else_branch"


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
