"""Normalizations: per-channel parameters follow the channels; over the channel axis they freeze."""

from __future__ import annotations

import numpy as np
import onnx

from ...graph import get_attr
from ..registry import Analysis, Freeze, SetCount, rule
from ._common import _only_slot, _rank, _set


@rule("BatchNormalization", does="per-channel scale, bias, mean, var follow the channels")
def batchnorm_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    if ann.axis != 1:
        raise Freeze(f"BatchNormalization {node.name!r}: channels not on axis 1")
    for slot in range(1, 5):
        a.add_weight_edit(node.input[slot], 0, ann.ids, "param", node)
    _set(a, node, 1, ann.ids)


@rule("InstanceNormalization", does="per-channel scale and bias follow the channels")
def instancenorm_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    if ann.axis != 1:
        raise Freeze(f"InstanceNormalization {node.name!r}: channels not on axis 1")
    for slot in (1, 2):
        a.add_weight_edit(node.input[slot], 0, ann.ids, "param", node)
    _set(a, node, 1, ann.ids)


@rule("GroupNormalization", does="a group's channels go together (whole groups are removed); `num_groups` is "
      "rewritten; per-group (opset 18) or per-channel (opset 21) scale and bias follow")
def groupnorm_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    groups, n = int(get_attr(node, "num_groups", 0)), len(ann.ids)
    if ann.axis != 1 or groups <= 0 or n % groups:
        raise Freeze(f"GroupNormalization {node.name!r}: {groups} groups do not divide its {n} channels")
    size = n // groups
    heads = ann.ids[::size]
    for k in range(groups):
        a.tie(np.full(size, heads[k]), ann.ids[k * size:(k + 1) * size])
    for slot in (1, 2):
        shape = a.shape(node.input[slot])
        a.add_weight_edit(node.input[slot], 0, ann.ids if shape and shape[0] == n else heads, "param", node)
    a.node_edits.append((node, SetCount("num_groups", heads)))
    _set(a, node, 1, ann.ids)


@rule("LayerNormalization", does="passes when it normalizes axes after the channel axis; over the channel axis frozen "
      "(or, with --prune-layernorm, its scale and bias follow the channels: approximate)")
def layernorm_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    rank = _rank(a, node.input[0])
    axis = int(get_attr(node, "axis", -1)) % rank
    if ann.axis < axis:
        _set(a, node, ann.axis, ann.ids)
        return
    if not a.approximate_layernorm or axis != rank - 1 or ann.axis != rank - 1:
        raise Freeze(f"LayerNormalization {node.name!r} normalizes over the channel axis (mean/variance change)")
    for slot in (1, 2):
        if len(node.input) > slot and node.input[slot]:
            a.add_weight_edit(node.input[slot], 0, ann.ids, "param", node)
    a.approximations.append(node.name)
    _set(a, node, ann.axis, ann.ids)


@rule("MeanVarianceNormalization", "LpNormalization",
      does="passes when normalizing over other axes; frozen over the channel axis")
def normalize_axes_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    rank = _rank(a, node.input[0])
    if node.op_type == "LpNormalization":
        axes = [int(get_attr(node, "axis", -1)) % rank]
    else:
        axes = [int(x) % rank for x in (get_attr(node, "axes") or [0, 2, 3])]
    if ann.axis in axes:
        raise Freeze(f"{node.op_type} {node.name!r} normalizes over the channel axis")
    _set(a, node, ann.axis, ann.ids)

