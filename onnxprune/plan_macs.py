"""MACs left by a pruning plan without a pruned copy of the model's weights.

The MACs of a pruned model come from shape inference on a weight-less skeleton (:mod:`onnxprune.analysis.cost`),
so the channels a plan keeps are applied to a *light copy* of the model: every tensor the skeleton strips is
there with its type and dims only, the rest as it is. The light copy is analysed again; where its analysis
records the same weight and node edits as the model's (the channel ids the plan refers to), the weight edits
shrink the light tensors' dims, the node edits and dead-node removal run as in :func:`~.passes.structured.remove`,
and the MACs are counted on the result: the count of the pruned copy, exactly. Anything else (an analysis that
read a stripped tensor, an integer tensor pruned small enough for the skeleton to keep its values) returns None:
the caller counts on a real pruned copy.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from .analysis.cost import total_macs
from .analysis.groups import Analysis, analyse
from .graph import Weight, iter_graphs, remove_dead_nodes
from .passes.removal import apply_node_edit, own_copy
from .sessions import model_header
from .shapes import SKELETON_MAX_ELEMENTS


def light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the bytes of every tensor over :data:`SKELETON_MAX_ELEMENTS` elements left out (initializers
    and ``Constant`` values of the main graph; type and dims kept), everything else copied."""
    light = model_header(model, skip=("node",))
    light.graph.initializer.extend(_light(t) for t in model.graph.initializer)
    for node in model.graph.node:
        new = light.graph.node.add()
        new.CopyFrom(node)
        for attr in new.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and _large(attr.t):
                attr.t.CopyFrom(_light(attr.t))
    return light


def _large(tensor: onnx.TensorProto) -> bool:
    return int(np.prod(tensor.dims, dtype=np.int64)) > SKELETON_MAX_ELEMENTS


def _light(tensor: onnx.TensorProto) -> onnx.TensorProto:
    if not _large(tensor):
        return tensor
    return onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)


def plan_macs(model: onnx.ModelProto, analysis: Analysis, keep: np.ndarray, input_shapes: dict[str, list[int]] | None,
              exclude=(), prune_layernorm: bool = False, overrides=()) -> int | None:
    """MACs of ``model`` with the channels ``keep`` marks False removed (``analysis`` is the model's, analysed with
    these settings), counted on a light copy; None where that cannot be exact."""
    light = light_copy(model)
    try:
        shadow = analyse(light, input_shapes, exclude, prune_layernorm, overrides)
    except Exception:  # noqa: BLE001 - a rule that read a stripped tensor: count on a real copy
        return None
    if signature(shadow) != signature(analysis):
        return None
    if not keep.all():
        for edit in shadow.edits:
            mask = keep[edit.ids]
            if mask.all():
                continue
            if edit.private:
                own_copy(shadow, edit)
            if not _shrink(edit.weight, mask, edit.axis):
                return None
        for node, node_edit in shadow.node_edits:
            apply_node_edit(shadow, node, node_edit, keep)
        remove_dead_nodes(light)
    return total_macs(light, input_shapes)


def _shrink(weight: Weight, mask: np.ndarray, axis: int) -> bool:
    """Remove the channels ``mask`` leaves out on ``axis`` of a light tensor: a small one's values are compressed
    as removal does, a stripped one's dims set. A stripped float weight that gets small enough for the skeleton to
    keep its values gets zeros (shape inference reads no float values); any other such tensor: False."""
    tensor = weight.tensor
    if not _large(tensor):
        weight.set_array(np.compress(mask, weight.array(), axis=axis))
        return True
    dims = list(tensor.dims)
    dims[axis] = int(mask.sum())
    if int(np.prod(dims, dtype=np.int64)) > SKELETON_MAX_ELEMENTS:
        del tensor.dims[:]
        tensor.dims.extend(dims)
        return True
    if not weight.is_float:
        return False
    weight.set_array(np.zeros(dims, dtype=weight.dtype))
    return True


def signature(analysis: Analysis) -> tuple:
    """What removal reads from an analysis: channel count, weight edits (by weight name) and node edits."""
    edits = [_plain((e.weight.name, e.axis, e.ids, e.role, e.node, e.private)) for e in analysis.edits]
    node_edits = [(_plain(node), type(edit).__name__, _plain([getattr(edit, f.name) for f in dataclasses.fields(edit)]))
                  for node, edit in analysis.node_edits]
    graphs = sum(1 for _ in iter_graphs(analysis.model.graph))
    return analysis.num_channels, graphs, edits, node_edits


def _plain(value):
    """``value`` as comparable data: arrays by dtype, shape and bytes, nodes by type, name and outputs."""
    if isinstance(value, np.ndarray):
        return value.dtype.str, value.shape, value.tobytes()
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, onnx.NodeProto):
        return value.op_type, value.name, tuple(value.output)
    if isinstance(value, np.dtype):
        return value.str
    return value
