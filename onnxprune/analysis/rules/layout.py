"""Layout ops: Concat, Split, Slice, Transpose, Squeeze, Reduce, axis ops, Resize, Pad, Flatten, Gather,
DepthToSpace, SpaceToDepth."""

from __future__ import annotations

import numpy as np
import onnx

from ...graph import get_attr, opset_version
from ..registry import Analysis, CountEntry, Freeze, Reindex, SliceBounds, SplitSizes, rule, transpose_perm
from ._common import REDUCE, _axes, _clip, _only_slot, _rank, _set, slice_params
from .operands import _elementwise_constant


@rule("Concat", does="places each input's channels at its offset; other axes tie the inputs")
def concat_rule(a: Analysis, node: onnx.NodeProto) -> None:
    known = [a.shape(n) for n in (node.output[0], *node.input) if a.shape(n) is not None]
    if not known:
        raise Freeze(f"Concat {node.name!r}: ranks unknown")
    rank = len(known[0])
    axis = int(get_attr(node, "axis")) % rank
    annotated = {slot: a.ann[name] for slot, name in enumerate(node.input) if name in a.ann}
    if any(ann.axis != next(iter(annotated.values())).axis for ann in annotated.values()):
        raise Freeze(f"Concat {node.name!r}: inputs carry channels on different axes")
    ch_axis = next(iter(annotated.values())).axis
    if ch_axis == axis:
        parts = []
        for slot, name in enumerate(node.input):
            if slot in annotated:
                parts.append(annotated[slot].ids)
            else:
                shape = a.shape(name)
                if shape is None or shape[axis] is None:
                    raise Freeze(f"Concat {node.name!r}: shape of {name!r} unknown")
                foreign = a.new_space(node, int(shape[axis]))
                a.freeze(foreign, f"Concat {node.name!r}: channels of {name!r} come from no prunable layer")
                parts.append(foreign)
        _set(a, node, axis, np.concatenate(parts))
        return
    ids = next(iter(annotated.values())).ids
    for ann in annotated.values():
        a.tie(ids, ann.ids)
    for slot, name in enumerate(node.input):
        if slot not in annotated:
            _elementwise_constant(a, node, slot, ch_axis, rank, ids)
    _set(a, node, ch_axis, ids)


@rule("Split", does="gives each output its range of channels; split sizes are rewritten")
def split_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    rank = _rank(a, node.input[0])
    axis = int(get_attr(node, "axis", 0)) % rank
    if axis != ann.axis:
        for slot in range(len(node.output)):
            _set(a, node, ann.axis, ann.ids, slot)
        return
    sizes = get_attr(node, "split")
    from_input = sizes is None and len(node.input) > 1 and node.input[1]
    if from_input:
        sizes = a.constant(node.input[1])
        if sizes is None:
            raise Freeze(f"Split {node.name!r}: sizes computed at run time")
    if sizes is None:
        n = len(node.output)
        sizes = [len(ann.ids) // n + (1 if i < len(ann.ids) % n else 0) for i in range(n)]
        if len(ann.ids) % n:
            raise Freeze(f"Split {node.name!r}: uneven equal split")
    bounds = np.cumsum([0, *[int(s) for s in sizes]])
    parts = [ann.ids[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]
    for slot, part in enumerate(parts):
        _set(a, node, axis, part, slot)

    a.node_edits.append((node, SplitSizes(parts, bool(from_input))))


@rule("Slice", does="takes a range of channels (step 1); bounds are rewritten")
def slice_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    rank = _rank(a, node.input[0])
    params = slice_params(a, node)
    if params is None:
        raise Freeze(f"Slice {node.name!r}: bounds computed at run time")
    starts, ends, axes, steps = params
    axes = [int(x) % rank for x in axes]
    if ann.axis not in axes:
        _set(a, node, ann.axis, ann.ids)
        return
    k = axes.index(ann.axis)
    if steps[k] != 1:
        raise Freeze(f"Slice {node.name!r}: step {steps[k]} on the channel axis")
    n = len(ann.ids)
    start, end = _clip(int(starts[k]), n), _clip(int(ends[k]), n)
    _set(a, node, ann.axis, ann.ids[start:end])

    a.node_edits.append((node, SliceBounds(k, start, end, ann.ids)))


@rule("Transpose", does="moves the channel axis")
def transpose_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    rank = _rank(a, node.input[0])
    perm = transpose_perm(node, rank)
    _set(a, node, perm.index(ann.axis), ann.ids)


@rule("Squeeze", "Unsqueeze", does="shifts the channel axis")
def squeeze_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    out_rank = _rank(a, node.output[0])
    axes = _axes(a, node, 1)
    if node.op_type == "Squeeze":
        in_rank = _rank(a, node.input[0])
        axes = [x % in_rank for x in axes] if axes is not None else [
            i for i, d in enumerate(a.shape(node.input[0])) if d == 1]
        if ann.axis in axes:
            raise Freeze(f"Squeeze {node.name!r} removes the channel axis")
        _set(a, node, ann.axis - sum(1 for x in axes if x < ann.axis), ann.ids)
    else:
        pos = ann.axis
        for x in sorted(v % out_rank for v in axes):
            if x <= pos:
                pos += 1
        _set(a, node, pos, ann.ids)


@rule(*REDUCE, does="passes when reducing other axes; frozen when reducing the channel axis")
def reduce_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    rank = _rank(a, node.input[0])
    axes = _axes(a, node, 1)
    if not axes and int(get_attr(node, "noop_with_empty_axes", 0)):
        _set(a, node, ann.axis, ann.ids)  # no axes and noop: an identity
        return
    if not axes:
        raise Freeze(f"{node.op_type} {node.name!r} reduces every axis, the channel axis too")
    axes = [x % rank for x in axes]
    if ann.axis in axes:
        raise Freeze(f"{node.op_type} {node.name!r} reduces over the channel axis")
    keep = int(get_attr(node, "keepdims", 1))
    _set(a, node, ann.axis if keep else ann.axis - sum(1 for x in axes if x < ann.axis), ann.ids)


@rule("Softmax", "LogSoftmax", "Hardmax", "ArgMax", "ArgMin", "CumSum",
      does="passes when working along another axis; frozen along the channel axis")
def axis_op_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    rank = _rank(a, node.input[0])
    default = -1 if node.op_type in ("Softmax", "LogSoftmax", "Hardmax") and opset_version(a.model) >= 13 else (
        1 if node.op_type in ("Softmax", "LogSoftmax", "Hardmax") else 0)
    if node.op_type == "CumSum":
        const = a.constant(node.input[1])
        if const is None:
            raise Freeze(f"CumSum {node.name!r}: axis computed at run time")
        axis = int(const) % rank
    else:
        axis = int(get_attr(node, "axis", default)) % rank
    if axis == ann.axis or (node.op_type in ("Softmax", "LogSoftmax", "Hardmax") and opset_version(a.model) < 13
                            and ann.axis >= axis):
        raise Freeze(f"{node.op_type} {node.name!r} works along the channel axis")
    out = ann.axis
    if node.op_type in ("ArgMax", "ArgMin") and not int(get_attr(node, "keepdims", 1)) and axis < ann.axis:
        out -= 1
    _set(a, node, out, ann.ids)


@rule("Trilu", does="passes when the channels are on neither of its last two axes; frozen on them (the triangle)")
def trilu_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    if ann.axis >= _rank(a, node.input[0]) - 2:
        raise Freeze(f"Trilu {node.name!r} keeps a triangle of the channel axis")
    _set(a, node, ann.axis, ann.ids)


@rule("Resize", "Upsample", does="passes when the channel axis is not resized; `sizes` are rewritten")
def resize_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    scales_slot = 2 if node.op_type == "Resize" and len(node.input) > 2 else 1
    if len(node.input) > scales_slot and node.input[scales_slot]:
        scales = a.constant(node.input[scales_slot])
        if scales is None:
            raise Freeze(f"{node.op_type} {node.name!r}: scales computed at run time")
        if scales.size and scales[ann.axis] != 1:
            raise Freeze(f"{node.op_type} {node.name!r} resizes the channel axis")
    if node.op_type == "Resize" and len(node.input) > 3 and node.input[3]:
        sizes = a.constant(node.input[3])
        if sizes is None:
            raise Freeze(f"Resize {node.name!r}: sizes computed at run time")
        if get_attr(node, "axes") is not None:
            raise Freeze(f"Resize {node.name!r}: sizes with axes")
        a.node_edits.append((node, CountEntry(node, 3, ann.axis, ann.ids, "sizes")))
    _set(a, node, ann.axis, ann.ids)


@rule("Pad", does="passes when the channel axis is not padded")
def pad_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    rank = _rank(a, node.input[0])
    pads = get_attr(node, "pads")
    if pads is None:
        pads = a.constant(node.input[1]) if len(node.input) > 1 else None
        if pads is None:
            raise Freeze(f"Pad {node.name!r}: pads computed at run time")
        pads = pads.tolist()
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        const = a.constant(node.input[3])
        if const is None:
            raise Freeze(f"Pad {node.name!r}: axes computed at run time")
        axes = [int(x) % rank for x in const.tolist()]
    half = len(pads) // 2
    for i, axis in enumerate(axes[:half]):
        if axis == ann.axis and (pads[i] or pads[i + half]):
            raise Freeze(f"Pad {node.name!r} pads the channel axis")
    _set(a, node, ann.axis, ann.ids)


@rule("Flatten", does="turns each channel into a block of features for the next Gemm/MatMul")
def flatten_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    shape = a.shape(node.input[0])
    if shape is None or any(d is None for d in shape[1:]):
        raise Freeze(f"Flatten {node.name!r}: input shape unknown")
    axis = int(get_attr(node, "axis", 1))
    axis = axis + len(shape) if axis < 0 else axis
    if ann.axis < axis:
        raise Freeze(f"Flatten {node.name!r}: channel axis before the flatten axis")
    inner = int(np.prod(shape[ann.axis + 1:], dtype=np.int64))
    outer = int(np.prod(shape[axis:ann.axis], dtype=np.int64))
    _set(a, node, 1, np.tile(np.repeat(ann.ids, inner), outer))


@rule("Gather", does="picks along another axis: channels pass; constant picks along the channel axis: the "
      "picked channels follow (indices rewritten), a single pick keeps its channel")
def gather_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    rank = _rank(a, node.input[0])
    axis = int(get_attr(node, "axis", 0)) % rank
    indices = a.constant(node.input[1])
    index_rank = len(a.shape(node.input[1]) or []) if indices is None else np.ndim(indices)
    if axis != ann.axis:
        _set(a, node, ann.axis + (index_rank - 1 if axis < ann.axis else 0), ann.ids)
        return
    if indices is None or np.ndim(indices) > 1:
        raise Freeze(f"Gather {node.name!r} picks channels at run time")
    n = len(ann.ids)
    picks = np.atleast_1d(indices).astype(np.int64) % n
    index_type = np.asarray(indices).dtype  # int32 indices stay int32
    if np.ndim(indices) == 0:  # one channel, its axis dropped: that channel stays; its position may move
        picked = ann.ids[picks]
        a.freeze(picked, f"Gather {node.name!r} reads this channel at a fixed position")
        ids = ann.ids
    else:
        ids = ann.ids
        _set(a, node, axis, ann.ids[picks])

    a.node_edits.append((node, Reindex(ids, picks, bool(np.ndim(indices) == 0), index_type)))


@rule("DepthToSpace", does="block-aware: the blocksize^2 input channels that form one output channel go together")
def depth_to_space_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    b2 = int(get_attr(node, "blocksize")) ** 2
    if ann.axis != 1 or len(ann.ids) % b2:
        raise Freeze(f"DepthToSpace {node.name!r}: channels not on axis 1 or not a multiple of blocksize^2")
    mode = get_attr(node, "mode", b"DCR")
    crd = (mode.decode() if isinstance(mode, bytes) else mode) == "CRD"
    blocks = ann.ids.reshape(-1, b2) if crd else ann.ids.reshape(b2, -1).T  # row c': the inputs of output c'
    for row in blocks:
        a.tie(np.full(b2, row[0]), row)
    _set(a, node, 1, blocks[:, 0].copy())


@rule("SpaceToDepth", does="block-aware: each input channel becomes blocksize^2 output channels (at stride C)")
def space_to_depth_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    if ann.axis != 1:
        raise Freeze(f"SpaceToDepth {node.name!r}: channels not on axis 1")
    _set(a, node, 1, np.tile(ann.ids, int(get_attr(node, "blocksize")) ** 2))

