"""Layers that consume and produce channels: Conv, ConvTranspose, Gemm, MatMul (also batched, attention)."""

from __future__ import annotations

import numpy as np
import onnx

from ...graph import get_attr
from ..registry import Analysis, Freeze, SetCount, producer, rule
from ._common import _only_slot, _rank, _set
from .operands import _repeated_for_heads


@producer("Conv", "ConvTranspose")
def conv_produce(a: Analysis, node: onnx.NodeProto) -> None:
    """New channel ids for the outputs of a (transposed) convolution with a constant weight."""
    op = node.op_type
    weight, _ = a.weight(node.input[1])
    if weight is None or len(weight.shape) < 3:
        return
    group = int(get_attr(node, "group", 1))
    size = weight.shape[0] if op == "Conv" else weight.shape[1] * group
    ids = a.new_space(node, size)
    if group != 1:
        a.freeze(ids, f"{op} {node.name!r} is grouped (group={group}): its output channels stay")
        _set(a, node, 1, ids)
        return
    a.add_weight_edit(node.input[1], 0 if op == "Conv" else 1, ids, "producer", node)
    if len(node.input) > 2 and node.input[2]:
        a.add_weight_edit(node.input[2], 0, ids, "param", node)
    _set(a, node, 1, ids)


@producer("Gemm")
def gemm_produce(a: Analysis, node: onnx.NodeProto) -> None:
    """New channel ids for the outputs of a Gemm with a constant weight."""
    weight, _ = a.weight(node.input[1])
    if weight is None or len(weight.shape) != 2:
        return
    axis = 0 if get_attr(node, "transB", 0) else 1
    ids = a.new_space(node, weight.shape[axis])
    a.add_weight_edit(node.input[1], axis, ids, "producer", node)
    if len(node.input) > 2 and node.input[2]:
        bias = a.shape(node.input[2])
        if bias and bias[-1] == len(ids) and len(ids) > 1:
            a.add_weight_edit(node.input[2], len(bias) - 1, ids, "param", node)
    _set(a, node, 1, ids)


@producer("MatMul")
def matmul_produce(a: Analysis, node: onnx.NodeProto) -> None:
    """New channel ids for the outputs of a MatMul of an activation by a constant 2-D weight."""
    weight, _ = a.weight(node.input[1])
    out = a.shape(node.output[0])
    if weight is None or len(weight.shape) != 2 or out is None or a.weight(node.input[0])[0] is not None:
        return
    ids = a.new_space(node, weight.shape[1])
    a.add_weight_edit(node.input[1], 1, ids, "producer", node)
    _set(a, node, len(out) - 1, ids)


def _conv_input(a: Analysis, node: onnx.NodeProto):
    """Channels entering a (transposed) convolution: (annotation, weight, group, input channels)."""
    ann = _only_slot(a, node, 0)
    if ann.axis != 1:
        raise Freeze(f"{node.op_type} {node.name!r}: channels on axis {ann.axis}, not 1")
    weight, _ = a.weight(node.input[1])
    if weight is None:
        raise Freeze(f"{node.op_type} {node.name!r}: weight computed at run time")
    return ann, weight, int(get_attr(node, "group", 1)), len(ann.ids)


def _consume(a: Analysis, node: onnx.NodeProto, ids: np.ndarray, axis: int) -> None:
    """An ungrouped (transposed) convolution reads ``ids`` on its weight's ``axis`` and starts channels of its own."""
    a.add_weight_edit(node.input[1], axis, ids, "consumer", node)
    a.mark(ids, node.op_type)
    conv_produce(a, node)


@rule("Conv", does="consumes input channels (weight axis 1); grouped/depthwise: a group's channels go together")
def conv_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann, weight, group, cin = _conv_input(a, node)
    if group == 1:
        _consume(a, node, ann.ids, 1)
    elif cin % group == 0 and weight.shape[1] == cin // group and weight.shape[0] % group == 0:
        _grouped_conv(a, node, ann.ids, group, weight.shape[0])
    else:
        raise Freeze(f"Conv {node.name!r}: group={group} does not match its {cin} input channels")


def _grouped_conv(a: Analysis, node: onnx.NodeProto, in_ids: np.ndarray, group: int, cout: int) -> None:
    """Grouped and depthwise convs: a group's input and output channels form one unit; `group` is rewritten."""
    co = cout // group
    out_ids = a.new_space(node, cout)
    _tie_groups(a, group, in_ids, out_ids)
    a.add_weight_edit(node.input[1], 0, out_ids, "consumer", node)
    if len(node.input) > 2 and node.input[2]:
        a.add_weight_edit(node.input[2], 0, out_ids, "param", node)
    a.node_edits.append((node, SetCount("group", out_ids, per=co)))
    a.mark(in_ids, "Conv")
    _set(a, node, 1, out_ids)


def _tie_groups(a: Analysis, group: int, in_ids: np.ndarray, out_ids: np.ndarray) -> None:
    """A grouped (transposed) convolution: group k's input and output channels form one unit."""
    ci, co = len(in_ids) // group, len(out_ids) // group
    for k in range(group):
        unit = np.concatenate([in_ids[k * ci:(k + 1) * ci], out_ids[k * co:(k + 1) * co]])
        a.tie(np.full(ci + co, in_ids[k * ci]), unit)


@rule("ConvTranspose", does="consumes input channels (weight axis 0); grouped: a group's input and output channels "
      "go together and `group` is rewritten")
def conv_transpose_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann, weight, group, cin = _conv_input(a, node)
    if group == 1:
        _consume(a, node, ann.ids, 0)
        return
    if cin % group or weight.shape[0] != cin:
        raise Freeze(f"ConvTranspose {node.name!r}: group={group} does not match its {cin} input channels")
    ci = cin // group
    out_ids = a.new_space(node, weight.shape[1] * group)
    _tie_groups(a, group, ann.ids, out_ids)
    a.add_weight_edit(node.input[1], 0, ann.ids, "consumer", node)
    if len(node.input) > 2 and node.input[2]:
        a.add_weight_edit(node.input[2], 0, out_ids, "param", node)
    a.node_edits.append((node, SetCount("group", ann.ids, per=ci)))
    a.mark(ann.ids, "ConvTranspose")
    _set(a, node, 1, out_ids)


@rule("Gemm", does="consumes input features (B axis by transB); produces new output channels")
def gemm_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    if ann.axis != (0 if get_attr(node, "transA", 0) else 1):
        raise Freeze(f"Gemm {node.name!r}: channels are not on the reduction axis of A")
    a.add_weight_edit(node.input[1], 1 if get_attr(node, "transB", 0) else 0, ann.ids, "consumer", node)
    a.mark(ann.ids, "Gemm")
    gemm_produce(a, node)


@rule("MatMul", does="consumes the last axis against a 2-D weight (rows); other axes pass through")
def matmul_rule(a: Analysis, node: onnx.NodeProto) -> None:
    weight, _ = a.weight(node.input[1])
    if node.input[1] in a.ann or weight is None:
        _batched_matmul(a, node)
        return
    ann = _only_slot(a, node, 0)
    rank = _rank(a, node.input[0])
    if weight is None or len(weight.shape) != 2:
        raise Freeze(f"MatMul {node.name!r}: B is not a 2-D constant weight")
    if ann.axis == rank - 1:
        a.add_weight_edit(node.input[1], 0, ann.ids, "consumer", node)
        a.mark(ann.ids, "MatMul")
        matmul_produce(a, node)
    elif ann.axis < rank - 2 or (ann.axis == rank - 2 and rank > 2):
        _set(a, node, ann.axis + _rank(a, node.output[0]) - rank, ann.ids)
    else:
        raise Freeze(f"MatMul {node.name!r}: channels on the row axis of A")


def _batched_matmul(a: Analysis, node: onnx.NodeProto) -> None:
    """MatMul of two activations (attention): channels on a shared batch axis (heads) pass through and tie."""
    out_rank = _rank(a, node.output[0])
    anns = {slot: a.ann[name] for slot, name in enumerate(node.input[:2]) if name in a.ann}
    blocked = {slot for slot, ann in anns.items() if ann.axis >= _rank(a, node.input[slot]) - 2}
    if blocked and len(blocked) == len(anns):
        raise Freeze(f"MatMul {node.name!r}: channels on a matrix axis of input {min(blocked)}")
    for slot in blocked:  # multi-query attention: the one K/V head's channels stay, the query heads go on
        a.freeze(anns.pop(slot).ids, f"MatMul {node.name!r}: channels on a matrix axis of input {slot} (a K/V "
                                     "head shared by every query head stays)")
    axes = set()
    for slot, ann in anns.items():
        rank = _rank(a, node.input[slot])
        axes.add(ann.axis + out_rank - rank)
    if len(axes) != 1:
        raise Freeze(f"MatMul {node.name!r}: inputs carry channels on different axes")
    axis = axes.pop()
    ids = next(iter(anns.values())).ids
    for ann in anns.values():
        if len(ann.ids) != len(ids):
            raise Freeze(f"MatMul {node.name!r}: inputs carry different channel counts")
        a.tie(ids, ann.ids)
    for slot in (0, 1):
        if slot not in anns:
            shape = a.shape(node.input[slot])
            pos = axis - (out_rank - len(shape)) if shape is not None else 0
            if shape is None or (pos >= 0 and shape[pos] not in (1,) and not _repeated_for_heads(
                    a, node, node.input[slot], pos, ids)):
                raise Freeze(f"MatMul {node.name!r} mixes these channels with {node.input[slot]!r}, "
                             "which has no channel ids")
    _set(a, node, axis, ids)

