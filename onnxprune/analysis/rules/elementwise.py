"""Element-wise ops and activations: channels pass through, broadcast operands follow or tie them."""

from __future__ import annotations

import onnx

from ..registry import Analysis, Freeze, rule
from ._common import UNARY, _ann, _only_slot, _rank, _set
from .operands import _elementwise_constant


@rule(*UNARY, does="element-wise or per-channel spatial op: channels pass through")
def passthrough_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0) if node.op_type not in ("Clip", "CastLike", "Dropout") else _ann(a, node, 0)
    if ann is None:
        raise Freeze(f"{node.op_type} {node.name!r}: channels reach a parameter input")
    if node.op_type in ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"):
        if ann.axis != 1:
            raise Freeze(f"{node.op_type} {node.name!r}: channels not on axis 1")
        if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
            raise Freeze(f"MaxPool {node.name!r}: pooling indices depend on the channel count")
    _set(a, node, ann.axis, ann.ids)


@rule("PRelu", does="per-channel slope follows the channels")
def prelu_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    _elementwise_constant(a, node, 1, ann.axis, _rank(a, node.output[0]), ann.ids)
    _set(a, node, ann.axis, ann.ids)


@rule("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Greater", "Less",
      "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "BitShift", "Mod", "BitwiseAnd", "BitwiseOr", "BitwiseXor",
      does="broadcasting element-wise: ties channels of its inputs (residual Add, SE Mul); per-channel constants follow")
def elementwise_rule(a: Analysis, node: onnx.NodeProto) -> None:
    rank = _rank(a, node.output[0])
    annotated = [(slot, a.ann[name]) for slot, name in enumerate(node.input) if name in a.ann]
    axes = {ann.axis + rank - _rank(a, node.input[slot]) for slot, ann in annotated}
    if len(axes) != 1:
        raise Freeze(f"{node.op_type} {node.name!r}: inputs carry channels on different axes")
    axis = axes.pop()
    ids = annotated[0][1].ids
    for _, ann in annotated[1:]:
        if len(ann.ids) != len(ids):
            raise Freeze(f"{node.op_type} {node.name!r}: inputs carry different channel counts")
        a.tie(ids, ann.ids)
    for slot, name in enumerate(node.input):
        if name and name not in a.ann:
            _elementwise_constant(a, node, slot, axis, rank, ids)
    _set(a, node, axis, ids)

