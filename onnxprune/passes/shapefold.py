"""Fold run-time reads of static sizes (``Shape -> Gather``) into constants before channel analysis.

Exporters compute chunk sizes and slice bounds from the tensor itself (``torch.chunk`` becomes
``Shape -> Gather(axis 1) -> Div -> Slice``). When the gathered sizes are static in the model
(not batch or other dynamic dims), the whole little computation is a constant. Folding it lets
the Slice/Split/Reshape rules rewrite those bounds when channels are removed, instead of
freezing the channels. A fold is applied only when every value it produces ends in a
Slice/Split/Reshape shape input, which the rules know how to rewrite.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..analysis.cost import _skeleton, symbolic_inference
from ..model import GraphIndex, get_attr

FOLDABLE = {"Gather", "Slice", "Add", "Sub", "Mul", "Div", "Unsqueeze", "Squeeze", "Concat", "Cast", "Floor", "Ceil"}
SINKS = {("Slice", 1), ("Slice", 2), ("Split", 1), ("Reshape", 1)}


def _symbolic_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Shapes with dynamic dims left unknown (nothing is concretised)."""
    skel = _skeleton(model, None)
    del skel.graph.input[:]
    skel.graph.input.extend(model.graph.input)
    skel = symbolic_inference(skel)
    try:
        skel = onnx.shape_inference.infer_shapes(skel)
    except Exception:  # noqa: BLE001 - keep what symbolic inference found
        pass
    shapes = {}
    for value in [*skel.graph.input, *skel.graph.value_info, *skel.graph.output]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                                  for d in value.type.tensor_type.shape.dim]
    return shapes


def fold_static_shape_reads(model: onnx.ModelProto) -> int:
    """Replace foldable ``Shape -> Gather -> arithmetic`` chains by constants; returns how many chains."""
    shape_nodes = [n for n in model.graph.node if n.op_type == "Shape" and n.domain in ("", "ai.onnx")]
    if not shape_nodes:
        return 0
    shapes = _symbolic_shapes(model)
    folded = 0
    for shape_node in shape_nodes:
        index = GraphIndex.build(model.graph)
        values = _evaluate_chain(model, index, shape_node, shapes)
        if not values:
            continue
        for name, value in values.items():
            const = f"{name}.folded"
            model.graph.initializer.append(numpy_helper.from_array(value, const))
            for consumer, slot in index.consumers.get(name, []):
                if (consumer.op_type, slot) in SINKS:
                    consumer.input[slot] = const
        folded += 1
    return folded


def _evaluate_chain(model, index: GraphIndex, shape_node: onnx.NodeProto,
                    shapes: dict[str, list[int | None]]) -> dict[str, np.ndarray] | None:
    """Values of the chain's outputs that feed sinks, or None when the chain cannot be folded.

    The chain is evaluated twice, with the dynamic dims set to two different sizes: a sink value
    that changes between the two depends on a dynamic dim and is not a constant.
    """
    dims = shapes.get(shape_node.input[0])
    if dims is None:
        return None
    runs = [_evaluate_with(model, index, shape_node, dims, probe) for probe in _PROBES]
    if any(run is None for run in runs) or runs[0].keys() != runs[1].keys():
        return None
    if any(not np.array_equal(runs[0][name], runs[1][name]) for name in runs[0]):
        return None
    return runs[0] or None


_PROBES = (1_000_003, 1_000_033)  # stand-in sizes for dynamic dims


def _evaluate_with(model, index: GraphIndex, shape_node: onnx.NodeProto, dims: list[int | None],
                   probe: int) -> dict[str, np.ndarray] | None:
    start = int(get_attr(shape_node, "start", 0))
    end = get_attr(shape_node, "end")
    full = np.array([d if d is not None else probe for d in dims], dtype=np.int64)[start:end]
    order = {id(n): i for i, n in enumerate(model.graph.node)}
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    frontier: dict[str, np.ndarray] = {}
    pending = [shape_node.output[0]]
    value_of = {shape_node.output[0]: full}
    while pending:
        name = pending.pop()
        for consumer, slot in sorted(index.consumers.get(name, []), key=lambda c: order.get(id(c[0]), 0)):
            if (consumer.op_type, slot) in SINKS:
                frontier[name] = value_of[name]
                continue
            if consumer.op_type not in FOLDABLE or consumer.domain not in ("", "ai.onnx"):
                return None
            inputs = []
            for other in consumer.input:
                if other in value_of:
                    inputs.append(value_of[other])
                else:
                    weight, _ = index.resolve(other)
                    if weight is None:
                        return None
                    inputs.append(weight.array())
            result = _run(consumer, inputs, opset)
            if result is None:
                return None
            if consumer.output[0] not in value_of:
                value_of[consumer.output[0]] = result
                pending.append(consumer.output[0])
    return frontier


def _run(node: onnx.NodeProto, inputs: list[np.ndarray], opset: int) -> np.ndarray | None:
    """Evaluate one small node with onnx's reference implementation."""
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" for i in range(len(inputs))]
    copy = onnx.helper.make_node(node.op_type, names, ["out"], **{a.name: onnx.helper.get_attribute_value(a)
                                                                   for a in node.attribute})
    graph = onnx.helper.make_graph([copy], "fold", [], [onnx.helper.make_empty_tensor_value_info("out")],
                                   [numpy_helper.from_array(np.asarray(v), n) for n, v in zip(names, inputs)])
    try:
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=8)
        return np.asarray(ReferenceEvaluator(model).run(None, {})[0])
    except Exception:  # noqa: BLE001 - anything odd: do not fold
        return None
