"""Broadcast operands without channel ids: per-channel constants, their lineage, masks that broadcast."""

from __future__ import annotations

import numpy as np
import onnx

from ...graph import get_attr
from ..registry import Analysis, Freeze, transpose_perm
from ._common import ELEMENTWISE, LINEAGE_BINARY, _axes, _rank
from .shape_plumbing import _count_entry, _follow_read, _shape_entry


def _elementwise_constant(a: Analysis, node: onnx.NodeProto, slot: int, axis: int, rank: int, ids: np.ndarray) -> None:
    """A broadcast operand that is not annotated: slice it if it is per-channel, else it must broadcast."""
    shape = a.shape(node.input[slot])
    if shape is None:
        raise Freeze(f"{node.op_type} {node.name!r}: shape of {node.input[slot]!r} unknown")
    pos = axis - (rank - len(shape))
    if pos < 0 or shape[pos] == 1 or (shape[pos] is None and _at_most_one(a, node.input[slot], pos)):
        return
    if a.weight(node.input[slot])[0] is not None:
        a.add_weight_edit(node.input[slot], pos, ids, "param", node)
        return
    found: list[tuple] = []
    tensors: list[tuple[str, int]] = []
    if not _lineage(a, node.input[slot], pos, node, found, tensors):
        raise Freeze(f"{node.op_type} {node.name!r} mixes these channels with {node.input[slot]!r}, which has no channel "
                     f"ids{_origin(a, node.input[slot])}")
    for name, where, reader in found:
        if name != "shape":
            a.add_weight_edit(name, where, ids, "param", reader)
            continue
        owner, (entry_slot, position, j) = where, reader
        if entry_slot is None:
            _follow_read(a, owner, j, position, ids)
            continue
        _count_entry(a, owner, entry_slot, position, ids)
    _guard_lineage(a, node, tensors, ids)


#: binary ops a size-1 axis passes through (comparisons too: a boolean mask has the shape of its operands)
_MASK_BINARY = LINEAGE_BINARY | {"Equal", "Less", "Greater", "And", "Or"}


def axis_inputs(a: Analysis, node: onnx.NodeProto, pos: int, rank: int, binary: set[str]
                ) -> list[tuple[str, int]] | None:
    """One step of the backward axis walk: the (input, axis) pairs axis ``pos`` of ``node``'s output (of rank
    ``rank``) comes from, through element-wise ops, the broadcasting ``binary`` ops (an input broadcast over the
    axis is left out) and Transpose; None for any other op or a binary input of unknown shape."""
    op, inputs = node.op_type, list(node.input)
    if op in ELEMENTWISE:
        return [(inputs[0], pos)]
    if op == "Transpose":
        return [(inputs[0], int(transpose_perm(node, rank)[pos]))]
    if op not in binary:
        return None
    pairs = []
    for inp in inputs:
        if not inp:
            continue
        src = a.shape(inp)
        if src is None:
            return None
        if pos - (rank - len(src)) >= 0:
            pairs.append((inp, pos - (rank - len(src))))
    return pairs


def _at_most_one(a: Analysis, name: str, pos: int) -> bool:
    """Is axis ``pos`` of ``name`` (size unknown to shape inference) provably of size 1 or 0? A causal mask
    sliced at run time from a ``[1, 1, max, max]`` buffer broadcasts over heads (GPT-Neo). Iterative: every
    (tensor, axis) on the stack must hold."""
    todo = [(name, pos, 0)]
    while todo:
        name, pos, depth = todo.pop()
        shape = a.shape(name)
        if shape is None or not 0 <= pos < len(shape) or depth > 32:
            return False
        if shape[pos] is not None:
            if shape[pos] > 1:
                return False
            continue
        producer = a.index.producer.get(name)
        if producer is None or producer.domain not in ("", "ai.onnx"):
            return False
        if producer.op_type == "Slice":  # a slice never grows an axis
            todo.append((producer.input[0], pos, depth + 1))
        elif producer.op_type == "Expand":
            if not _expand_at_most_one(a, producer, shape, pos, depth, todo):
                return False
        else:
            sources = axis_inputs(a, producer, pos, len(shape), _MASK_BINARY)
            if sources is None:
                return False
            todo.extend((inp, p, depth + 1) for inp, p in reversed(sources))
    return True


def _expand_at_most_one(a: Analysis, node: onnx.NodeProto, shape: list, pos: int, depth: int, todo: list) -> bool:
    """Expand: the larger of the input's size (pushed on ``todo``) and the target's entry (at most 1 here)."""
    src, target = a.shape(node.input[0]), a.shape(node.input[1])
    if src is None or not target or target[0] is None:
        return False
    j = pos - (len(shape) - target[0])
    if j >= 0:
        try:
            reader, _, value = _shape_entry(a, node, j)
        except Freeze:
            return False
        if reader is None or not 0 <= value <= 1:
            return False
    if pos - (len(shape) - len(src)) >= 0:
        todo.append((node.input[0], pos - (len(shape) - len(src)), depth + 1))
    return True


def _lineage(a: Analysis, name: str, pos: int, reader: onnx.NodeProto, found: list, tensors: list) -> bool:
    """Is axis ``pos`` of ``name`` computed from constants only, along that axis? Records the constants to
    slice (weight, axis, reader) in ``found`` and the tensors in between in ``tensors``: a per-head bias
    gathered from a table at run time (T5, Swin), a constant plus a mask that broadcasts over heads.
    Iterative, depth first in input order (the order ``found`` and ``tensors`` are recorded in)."""
    todo = [(name, pos, reader, 0)]
    while todo:
        name, pos, reader, depth = todo.pop()
        shape = a.shape(name)
        if shape is None or not 0 <= pos < len(shape) or depth > 32 or name in a.ann:
            return False
        if shape[pos] == 1:
            continue
        if a.weight(name)[0] is not None:
            found.append((name, pos, reader))
            continue
        producer = a.index.producer.get(name)
        if producer is None or producer.domain not in ("", "ai.onnx") or shape[pos] is None:
            return False
        tensors.append((name, pos))
        sources = _lineage_step(a, producer, shape, pos, found)
        if sources is None:
            return False
        todo.extend((inp, p, producer, depth + 1) for inp, p in reversed(sources))
    return True


def _lineage_step(a: Analysis, node: onnx.NodeProto, shape: list, pos: int, found: list
                  ) -> list[tuple[str, int]] | None:
    """The (input, axis) pairs a lineage continues to from axis ``pos`` of ``node``'s output; [] where it ends
    in a rewritten shape entry (recorded in ``found``); None where it is not computed from constants."""
    op, inputs = node.op_type, list(node.input)
    sources = axis_inputs(a, node, pos, len(shape), LINEAGE_BINARY)
    if sources is not None:
        return sources
    if op in ("Unsqueeze", "Squeeze"):
        axes = _axes(a, node, 1)
        rank_in = len(a.shape(inputs[0]) or [])
        if op == "Unsqueeze":
            axes = sorted(x % len(shape) for x in axes)
            return None if pos in axes else [(inputs[0], pos - sum(x < pos for x in axes))]
        src = a.shape(inputs[0])
        axes = sorted(x % rank_in for x in axes) if axes is not None else [i for i, d in enumerate(src) if d == 1]
        return [(inputs[0], [i for i in range(rank_in) if i not in axes][pos])]
    if op == "Gather":
        data, indices = a.shape(inputs[0]), a.shape(inputs[1])
        if data is None or indices is None:
            return None
        g = int(get_attr(node, "axis", 0)) % len(data)
        if pos < g:
            return [(inputs[0], pos)]
        return [(inputs[0], pos - len(indices) + 1)] if pos >= g + len(indices) else None
    if op == "Expand":
        src = a.shape(inputs[0])
        p = pos - (len(shape) - len(src or []))
        if src is not None and p >= 0 and src[p] == shape[pos]:
            return [(inputs[0], p)]
        ok = (src is not None and (p < 0 or src[p] == 1)) and _lineage_shape(a, node, 1, pos, len(shape), found)
        return [] if ok else None
    if op == "ConstantOfShape":
        return [] if _lineage_shape(a, node, 0, pos, len(shape), found) else None
    return None


def _lineage_shape(a: Analysis, node: onnx.NodeProto, slot: int, pos: int, rank: int, found: list) -> bool:
    """The channel axis of a lineage is created by a shape input (ConstantOfShape, Expand from size 1): the
    entry that sizes it is rewritten (a constant), or read at run time from a tensor with these channels."""
    target = a.shape(node.input[slot])
    if not target or target[0] is None:
        return False
    try:
        reader, position, _ = _shape_entry(a, node, pos - (rank - target[0]), slot)
    except Freeze:
        return False
    found.append(("shape", node, (reader, position, pos - (rank - target[0]))))
    return True


def _guard_lineage(a: Analysis, user: onnx.NodeProto, tensors: list[tuple[str, int]], ids: np.ndarray) -> None:
    """Slicing a constant along a lineage changes every reader of the tensors in it: each must be another
    link of a lineage or a node that uses it with these channels (checked once the walk is done). Users of
    one lineage tensor (a bias shared by several layers) have their channels tied."""
    if not tensors:
        return
    a.lineage_users.add(id(user))
    for name, pos in tensors:
        a.lineage_nodes.add(id(a.index.producer[name]))
        seen = a.lineage_ids.setdefault(name, (pos, ids))
        if seen[0] != pos or len(seen[1]) != len(ids):
            raise Freeze(f"{user.op_type} {user.name!r}: {name!r} is used with channels on another axis")
        a.tie(seen[1], ids)

    def check(tensors=tensors, ids=ids) -> None:
        outputs = {o.name for o in a.model.graph.output}
        for name, _ in tensors:
            for consumer, _ in a.index.consumers.get(name, []):
                if id(consumer) not in a.lineage_users and id(consumer) not in a.lineage_nodes:
                    a.freeze(ids, f"{user.op_type} {user.name!r}: the per-channel operand {name!r} is also read by "
                                  f"{consumer.op_type} {consumer.name!r}")
                    return
            if name in outputs:
                a.freeze(ids, f"{user.op_type} {user.name!r}: the per-channel operand {name!r} is a graph output")
                return

    a.deferred.append(check)


_ORIGINS = {"Gather": "an embedding lookup", "LayerNormalization": "a normalization over these channels",
            "SimplifiedLayerNormalization": "a normalization over these channels",
            "SkipLayerNormalization": "a normalization over these channels",
            "ReduceMean": "a normalization over these channels (mean/RMS)", "Sqrt": "a normalization (RMS)",
            "Reciprocal": "a normalization (RMS)"}


def _origin(a: Analysis, name: str) -> str:
    """Where a tensor without channel ids comes from, when that explains a frozen stream (norms, embeddings)."""
    for _ in range(24):
        producer = a.index.producer.get(name)
        if producer is None:
            return f" (graph input {name!r})" if name in {i.name for i in a.model.graph.input} else ""
        if producer.op_type in _ORIGINS:
            what = _ORIGINS[producer.op_type]
            return f" (it comes from {what}, {producer.op_type} {producer.name!r}: this stream's width stays)"
        inputs = [i for i in producer.input if i and a.weight(i)[0] is None]
        if not inputs:
            return ""
        name = inputs[0]
    return ""


def _repeated_for_heads(a: Analysis, user: onnx.NodeProto, name: str, pos: int, ids: np.ndarray) -> bool:
    """Axis ``pos`` of ``name`` repeats one tensor once per head (multi-query attention's K/V expanded to
    the query heads: Unsqueeze -> Expand -> Reshape, Transposes): the sizes that make the repeat (the
    Expand target's entry, the Reshape's) are rewritten to the heads kept. False when not so spelled."""
    edits: list[tuple[onnx.NodeProto, int]] = []
    tensors: list[tuple[str, int]] = []
    for _ in range(8):
        shape = a.shape(name)
        producer = a.index.producer.get(name)
        if shape is None or producer is None or shape[pos] is None:
            return False
        tensors.append((name, pos))
        if producer.op_type == "Transpose":
            perm = transpose_perm(producer, len(shape))
            name, pos = producer.input[0], int(perm[pos])
        elif producer.op_type == "Reshape":  # [.., 1, H, ..] -> [.., H, ..]: the same axis without a size-1 one
            src = a.shape(producer.input[0])
            if src is None or len(src) != len(shape) + 1:
                return False
            j = next((j for j in range(len(src) - 1) if src[j] == 1 and src[j + 1] == shape[pos]
                      and list(src[:j]) == list(shape[:pos]) and list(src[j + 2:]) == list(shape[pos + 1:])), None)
            if j is None:
                return False
            edits.append((producer, pos))
            name, pos = producer.input[0], j + 1
        elif producer.op_type == "Expand":
            src = a.shape(producer.input[0])
            p = pos - (len(shape) - len(src or []))
            if src is None or (p >= 0 and src[p] != 1):
                return False
            edits.append((producer, pos))
            break
        else:
            return False
    else:
        return False
    for owner, axis in edits:
        target = a.shape(owner.input[1])
        if not target or target[0] is None:
            return False
        j = axis - (_rank(a, owner.output[0]) - target[0])
        reader, position, value = _shape_entry(a, owner, j)
        if reader is None or value != len(ids):
            return False
        _count_entry(a, owner, reader, position, ids)
    _guard_lineage(a, user, tensors, ids)
    return True

