"""Helpers every rule family uses: annotations, ranks, axes inputs, slice bounds, the op sets."""

from __future__ import annotations

import numpy as np
import onnx

from ...graph import get_attr
from ..registry import Analysis, Annotation, Freeze


def _ann(a: Analysis, node: onnx.NodeProto, slot: int = 0) -> Annotation | None:
    return a.ann.get(node.input[slot]) if len(node.input) > slot and node.input[slot] else None


def _only_slot(a: Analysis, node: onnx.NodeProto, slot: int = 0) -> Annotation:
    for i, name in enumerate(node.input):
        if i != slot and name in a.ann:
            raise Freeze(f"{node.op_type} {node.name!r}: channels reach input {i}, which has no channel rule")
    ann = _ann(a, node, slot)
    if ann is None:
        raise Freeze(f"{node.op_type} {node.name!r}: channels reach an unsupported input")
    return ann


def _rank(a: Analysis, name: str) -> int:
    shape = a.shape(name)
    if shape is None:
        raise Freeze(f"shape of {name!r} is unknown")
    return len(shape)


def _set(a: Analysis, node: onnx.NodeProto, axis: int, ids: np.ndarray, slot: int = 0) -> None:
    a.ann[node.output[slot]] = Annotation(axis, ids)
    a.mark(ids, node.op_type)


def _axes(a: Analysis, node: onnx.NodeProto, input_slot: int, attr: str = "axes") -> list[int] | None:
    """Axes given as an attribute (old opsets) or as a constant input (new opsets)."""
    value = get_attr(node, attr)
    if value is not None:
        return [int(v) for v in value]
    if len(node.input) > input_slot and node.input[input_slot]:
        const = a.constant(node.input[input_slot])
        if const is None:
            raise Freeze(f"{node.op_type} {node.name!r}: axes computed at run time")
        return [int(v) for v in np.atleast_1d(const)]
    return None


def _clip(index: int, rank: int) -> int:
    return int(np.clip(index + rank if index < 0 else index, 0, rank))


def slice_params(a: Analysis, node: onnx.NodeProto) -> tuple[list, list, list, list] | None:
    """(starts, ends, axes, steps) of a ``Slice``: attributes (opset < 10) or constant inputs, with the defaults
    (every axis from 0, step 1); None when a bound is computed at run time."""
    if len(node.input) < 3:  # opset < 10: attributes
        starts, ends = list(get_attr(node, "starts")), list(get_attr(node, "ends"))
        return starts, ends, list(get_attr(node, "axes") or range(len(starts))), [1] * len(starts)
    values = [a.constant(node.input[i]) if len(node.input) > i and node.input[i] else None for i in range(1, 5)]
    if values[0] is None or values[1] is None or any(
            len(node.input) > i + 1 and node.input[i + 1] and values[i] is None for i in (2, 3)):
        return None
    starts, ends = values[0].tolist(), values[1].tolist()
    axes = values[2].tolist() if values[2] is not None else list(range(len(starts)))
    steps = values[3].tolist() if values[3] is not None else [1] * len(starts)
    return starts, ends, axes, steps


def _vector_slice(a: Analysis, node: onnx.NodeProto, length: int) -> tuple[int, int] | None:
    """(start, end) of a step-1 ``Slice`` of a 1-D tensor with constant bounds, else None."""
    params = slice_params(a, node)
    if params is None:
        return None
    starts, ends, axes, steps = params
    if len(starts) != 1 or len(axes) != 1 or list(steps) != [1]:
        return None
    return _clip(int(starts[0]), length), _clip(int(ends[0]), length)


# -- op sets (one place; the rule families and the shape completion in groups use them) -----------------

#: element-wise activations
ACTIVATIONS = [
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Gelu", "Mish",
    "Softplus", "Softsign", "Erf", "Exp", "Log", "Sqrt", "Abs", "Neg", "Reciprocal",
]
#: one-input ops that keep the channels where they are (element-wise, per-channel pools)
UNARY = [
    *ACTIVATIONS, "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "ThresholdedRelu", "Shrink", "Swish", "Identity",
    "Dropout", "Cast", "CastLike", "Not",
    "IsNaN", "IsInf", "Clip", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
    "GlobalLpPool", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Cosh", "Sinh", "Tan", "BitwiseNot",
]


#: the normalizations of the ONNX domain
NORMALIZATIONS = ["BatchNormalization", "InstanceNormalization", "GroupNormalization", "LayerNormalization",
                  "LpNormalization", "MeanVarianceNormalization"]
#: ops whose output has the shape of input 0 (the shape completion where onnx shape inference gives up)
SAME_SHAPE = {*ACTIVATIONS, "PRelu", "Clip", "Identity", "Dropout", "Cast", "Swish", *NORMALIZATIONS, "Softmax",
              "LogSoftmax"}
REDUCE = ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"]


#: binary ops a per-channel operand's lineage passes through (broadcasting, values per position)
LINEAGE_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where"}


#: element-wise one-input ops (UNARY without the pools, which change other axes)
ELEMENTWISE = {op for op in UNARY if not op.endswith("Pool")}

