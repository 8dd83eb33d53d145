"""Shape plumbing: Reshape, Expand, Tile, Shape, and where the entries of a shape tensor come from.

:func:`_shape_entry` (backward) and :func:`_size_sinks` (forward) do not use the shared backward axis walker
(``operands.axis_inputs``, behind ``_lineage`` and ``_at_most_one``), and cannot: that walker maps an *axis* of
an N-d tensor through ops that keep axes (element-wise ops, Transpose, broadcasting binaries). These two follow one
*entry* (an element) of a 1-D shape vector, whose position changes where an axis walk sees no axis at all: a
``Concat`` shifts it by the lengths of the pieces before it, a ``Slice`` by its start, a ``Gather`` picks it, a
``Shape`` turns an axis into an entry, a ``Where`` picks a branch per entry. The one step they share with the axis
walker (``Cast``/``Identity``) passes values unchanged; the walker's other element-wise ops (``Neg``, ``Relu``...)
would change the value an entry carries, so they must stop an entry walk.
"""

from __future__ import annotations

import numpy as np
import onnx

from ...graph import get_attr
from ..registry import Analysis, Annotation, CountEntry, Freeze, rule
from ._common import _clip, _only_slot, _rank, _set, _vector_slice


@rule("Reshape", does="keeps the channel axis, or merges it with the axes after it (blocks of features)")
def reshape_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    src, dst = a.shape(node.input[0]), a.shape(node.output[0])
    if src is None or dst is None or any(d is None for d in src[ann.axis:]):
        raise Freeze(f"Reshape {node.name!r}: shapes unknown")
    c, n = ann.axis, len(ann.ids)
    inner = int(np.prod(src[c + 1:], dtype=np.int64))
    if any(d is None for d in dst[c:]):
        dst = _complete_reshape_target(a, node, src, dst, c)
    # sizes of the trailing output axes (leading ones may be unknown, e.g. batch x windows): the output axes
    # from j on hold exactly the channel axis and what follows it when their product is n * inner
    suffix = [None if any(d is None for d in dst[j:]) else int(np.prod(dst[j:], dtype=np.int64))
              for j in range(len(dst) + 1)]
    if n * inner not in suffix[:-1] and _merge_before_channels(a, node, ann, src, dst, suffix):
        return
    if n * inner not in suffix[:-1]:
        raise Freeze(f"Reshape {node.name!r} mixes the channel axis with the axes before it"
                     if None not in suffix else f"Reshape {node.name!r}: shapes unknown")

    def fits(j: int) -> bool:
        return suffix[j] == n * inner and dst[j] % n == 0 and dst[j] > 0 and inner % (dst[j] // n) == 0 and \
            suffix[j + 1] == inner // (dst[j] // n)

    j = next((j for j in range(len(dst)) if fits(j)), None)
    if j is None:
        _split_into_heads(a, node, ann, dst, suffix, inner)
        return
    out_ids = np.repeat(ann.ids, dst[j] // n)
    slot, position, value = _shape_entry(a, node, j)
    if slot is None:
        _follow_read(a, node, j, position, out_ids)
    elif value not in (-1, 0) or (value == 0 and j != c):
        _count_entry(a, node, slot, position, out_ids)
    _set(a, node, j, out_ids)


def _merge_before_channels(a: Analysis, node: onnx.NodeProto, ann: Annotation, src: list, dst: list,
                           suffix: list[int | None]) -> bool:
    """Reshape merging the channel axis with known axes before it (a bidirectional recurrent layer's
    [.., D, .., H] -> [.., D*H]): the ids repeat once per position of those axes. False when not so."""
    c, n = ann.axis, len(ann.ids)
    inner = int(np.prod(src[c + 1:], dtype=np.int64))
    for k in range(c - 1, -1, -1):
        if src[k] is None:
            return False
        outer = int(np.prod(src[k:c], dtype=np.int64))
        for j in range(len(dst)):
            if suffix[j] != outer * n * inner or dst[j] % (outer * n) or inner % (dst[j] // (outer * n)) \
                    or suffix[j + 1] != inner // (dst[j] // (outer * n)):
                continue
            out_ids = np.tile(np.repeat(ann.ids, dst[j] // (outer * n)), outer)
            slot, position, value = _shape_entry(a, node, j)
            if slot is None:
                _follow_read(a, node, j, position, out_ids)
            elif value == 0:
                raise Freeze(f"Reshape {node.name!r}: the merged channel axis copies the input's size")
            elif value != -1:
                _count_entry(a, node, slot, position, out_ids)
            _set(a, node, j, out_ids)
            return True
    return False


def _complete_reshape_target(a: Analysis, node: onnx.NodeProto, src: list, dst: list, c: int) -> list:
    """Output sizes shape inference left unknown, from the target's entries: constants, ``0`` (copy),
    run-time reads of a known size; one ``-1`` after axis ``c`` is resolved when the entries before ``c``
    are the input's own sizes (``x.view(*x.shape[:c], -1)``)."""
    dst = list(dst)
    if len(dst) <= c:
        return dst
    def entry(i: int):
        try:
            return _shape_entry(a, node, i)
        except Freeze:
            return None, None, None
    lead = True
    for i in range(c):
        reader, position, value = entry(i)
        if reader is None and position is not None:
            lead &= position == (node.input[0], i)
        else:
            lead &= value == 0 or (value is not None and value > 0 and value == src[i])
    unknown = []
    for i in range(c, len(dst)):
        if dst[i] is not None:
            continue
        reader, position, value = entry(i)
        if reader is None and position is not None:
            size = (a.shape(position[0]) or [None] * (position[1] + 1))[position[1]]
        elif value is not None and value > 0:
            size = value
        elif value == 0 and i < len(src):
            size = src[i]
        else:
            size = None
        dst[i] = size
        if size is None:
            unknown.append(i)
    if lead and len(unknown) == 1 and None not in src[c:]:
        known = int(np.prod([d for i, d in enumerate(dst[c:], c) if i != unknown[0]], dtype=np.int64))
        total = int(np.prod(src[c:], dtype=np.int64))
        if known and total % known == 0:
            dst[unknown[0]] = total // known
    return dst


def _split_into_heads(a: Analysis, node: onnx.NodeProto, ann: Annotation, dst: list[int], suffix: list[int | None],
                      inner: int) -> None:
    """Reshape [.., H*D, ..] -> [.., H, D, ..] (attention heads): each head's D channels go together."""
    n = len(ann.ids)
    j = next((j for j in range(len(dst) - 1) if suffix[j] == n * inner and dst[j] * dst[j + 1] == n and dst[j] > 1
              and suffix[j + 2] == inner), None)
    if j is None:
        raise Freeze(f"Reshape {node.name!r} splits the channel axis")
    heads, width = dst[j], dst[j + 1]
    for h in range(heads):
        a.tie(np.full(width, ann.ids[h * width]), ann.ids[h * width:(h + 1) * width])
    slot, position, value = _shape_entry(a, node, j)
    if value == 0:
        raise Freeze(f"Reshape {node.name!r}: the head count is copied from the input")
    representatives = ann.ids[::width].copy()
    a.head_ids.update(int(i) for i in representatives)
    if slot is None:
        _follow_read(a, node, j, position, representatives)
    elif value != -1:
        _count_entry(a, node, slot, position, representatives)
    a.mark(ann.ids, "Reshape")
    _set(a, node, j, representatives)


def _shape_entry(a: Analysis, node: onnx.NodeProto, j: int, slot: int = 1
                 ) -> tuple[tuple[onnx.NodeProto, int], int, int]:
    """Where entry ``j`` of the shape tensor read by input ``slot`` lives: ((reader, its input), position, value).

    Follows a run-time shape through the pieces of a ``Concat``, 1-D ``Reshape``/``Cast``/``Identity``,
    and ``Where(Equal(t, c), ..., t)`` (how exporters spell "-1 means keep") down to a constant; through
    ``Slice``/``Gather``/``Unsqueeze``/``Squeeze`` to a ``Shape`` read of another tensor, returned as
    ``(None, (tensor, axis), size)`` (see :func:`_follow_read`).
    """
    reader, name, pos = (node, slot), node.input[slot], j
    for _ in range(16):
        value = a.constant(name)
        if value is not None:
            return reader, pos, int(np.atleast_1d(value).reshape(-1)[pos])
        producer = a.index.producer.get(name)
        op = producer.op_type if producer is not None else None
        if op == "Concat":
            offset = 0
            for piece_slot, piece in enumerate(producer.input):
                shape = a.shape(piece)
                if not shape or shape[0] is None:
                    break
                if offset <= pos < offset + shape[0]:
                    reader, name, pos = (producer, piece_slot), piece, pos - offset
                    break
                offset += shape[0]
            else:
                break
            if reader[0] is not producer:
                break
        elif op in ("Cast", "Identity") or (op == "Reshape" and a.shape(producer.input[0]) == a.shape(name)):
            reader, name = (producer, 0), producer.input[0]
        elif op == "Where" and _where_branch(a, producer, pos) is not None:
            branch = _where_branch(a, producer, pos)
            reader, name = (producer, branch), producer.input[branch]
        elif op == "Shape":
            rank = _rank(a, producer.input[0])
            axis = _clip(int(get_attr(producer, "start", 0)), rank) + pos
            size = (a.shape(producer.input[0]) or [None] * rank)[axis]
            return None, (producer.input[0], axis), size if size is not None else -2
        elif op in ("Unsqueeze", "Squeeze") and a.shape(name) in ([1], []):
            reader, name, pos = (producer, 0), producer.input[0], 0
        elif op == "Slice" and a.shape(producer.input[0]) and a.shape(producer.input[0])[0] is not None \
                and (bounds := _vector_slice(a, producer, a.shape(producer.input[0])[0])):
            reader, name, pos = (producer, 0), producer.input[0], pos + bounds[0]
        elif op == "Gather" and int(get_attr(producer, "axis", 0)) == 0 and a.constant(producer.input[1]) is not None \
                and a.shape(producer.input[0]) and a.shape(producer.input[0])[0]:
            picks = np.atleast_1d(a.constant(producer.input[1])).reshape(-1)
            reader, name, pos = (producer, 0), producer.input[0], int(picks[pos]) % a.shape(producer.input[0])[0]
        else:
            break
    raise Freeze(f"{node.op_type} {node.name!r}: the size of the channel axis is computed at run time")


def _where_branch(a: Analysis, where: onnx.NodeProto, pos: int) -> int | None:
    """The input of a 1-D ``Where`` that entry ``pos`` comes from: by a constant condition, or
    ``Where(Equal(t, c), other, t)`` (exporters' "-1 means keep"), whose entries of ``t`` pass unchanged."""
    cond = a.constant(where.input[0])
    if cond is not None:
        cond = np.broadcast_to(np.atleast_1d(cond), a.shape(where.output[0]) or np.shape(cond)).reshape(-1)
        return 1 if bool(cond[pos]) else 2
    test = a.index.producer.get(where.input[0])
    return 2 if test is not None and test.op_type == "Equal" and where.input[2] in test.input else None


@rule("Expand", "Tile", does="Expand passes when the channel axis is not expanded, its shape is rewritten (also "
      "pieces of run-time targets); Tile copies the ids of a repeated channel axis (the repeat count stays)")
def expand_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    rank_in, rank_out = _rank(a, node.input[0]), _rank(a, node.output[0])
    axis = ann.axis + rank_out - rank_in
    n = len(ann.ids)
    out = a.shape(node.output[0])
    if node.op_type == "Tile":  # repeats of the channel axis copy the ids (K/V heads tiled for grouped queries)
        value = a.constant(node.input[1])
        if value is None:
            raise Freeze(f"Tile {node.name!r}: repeats computed at run time")
        _set(a, node, ann.axis, np.tile(ann.ids, int(value[ann.axis])))
        return
    if out is None or out[axis] != n:
        raise Freeze(f"{node.op_type} {node.name!r} repeats the channel axis")
    target = a.shape(node.input[1])
    pos = axis - (rank_out - target[0]) if target and target[0] is not None else None
    if pos is None:
        raise Freeze(f"Expand {node.name!r}: shape computed at run time")
    if pos >= 0 and n > 1:
        slot, position, value = _shape_entry(a, node, pos)
        if slot is None:
            _follow_read(a, node, pos, position, ann.ids)
        elif value not in (1, n):
            raise Freeze(f"Expand {node.name!r} expands the channel axis")
        elif value == n:
            _count_entry(a, node, slot, position, ann.ids)
    _set(a, node, axis, ann.ids)


@rule("Shape", does="allowed when only other axes' sizes are read, or when the channel count read goes "
      "(through Slice/Gather/Concat/Unsqueeze/Cast) only into Reshape/Expand shapes whose channels follow it")
def shape_rule(a: Analysis, node: onnx.NodeProto) -> None:
    ann = _only_slot(a, node, 0)
    rank = _rank(a, node.input[0])
    start, end = _clip(int(get_attr(node, "start", 0)), rank), _clip(int(get_attr(node, "end", rank)), rank)
    if not start <= ann.axis < end:
        return
    sinks, reader = _size_sinks(a, node.output[0], ann.axis - start)
    if sinks is None:
        raise Freeze(f"the channel count is read at run time (Shape {node.name!r} -> {reader})")
    for sink, position in sinks:
        def check(sink=sink, position=position, ids=ann.ids) -> None:
            if (id(sink), position) not in a.size_reads:
                a.freeze(ids, f"the channel count is read at run time (Shape {node.name!r}) to shape "
                              f"{sink.op_type} {sink.name!r}, whose channels do not follow it")

        a.deferred.append(check)


def _size_sinks(a: Analysis, name: str, pos: int) -> tuple[list[tuple[onnx.NodeProto, int]] | None, str]:
    """Follow entry ``pos`` of the shape vector ``name`` forward through shape plumbing (Slice, Gather,
    Concat, Unsqueeze, Squeeze, Cast, Identity): the (Reshape/Expand, entry of its shape input) it ends
    in, or None with the op that computes with it (then the channel count cannot change)."""
    sinks: list[tuple[onnx.NodeProto, int]] = []
    todo, seen = [(name, pos)], set()
    while todo:
        name, pos = todo.pop()
        if (name, pos) in seen:
            continue
        seen.add((name, pos))
        shape = a.shape(name)
        length = int(np.prod(shape, dtype=np.int64)) if shape is not None and None not in shape else None
        for consumer, slot in a.index.consumers.get(name, []):
            op, out = consumer.op_type, consumer.output[0] if consumer.output else ""
            if op in ("Reshape", "Expand") and slot == 1:
                sinks.append((consumer, pos))
            elif op in ("Cast", "Identity") or (op in ("Unsqueeze", "Squeeze") and slot == 0 and length == 1):
                todo.append((out, pos))
            elif op == "Slice" and slot == 0 and length is not None and (bounds := _vector_slice(a, consumer, length)):
                lo, hi = bounds
                if lo <= pos < hi:
                    todo.append((out, pos - lo))
            elif op == "Gather" and slot == 0 and length and a.constant(consumer.input[1]) is not None \
                    and int(get_attr(consumer, "axis", 0)) == 0:
                picks = np.atleast_1d(a.constant(consumer.input[1])).reshape(-1) % length
                todo.extend((out, int(k)) for k in np.flatnonzero(picks == pos))
            elif op == "Concat" and all(a.shape(x) is not None and len(a.shape(x)) == 1 and a.shape(x)[0] is not None
                                        for x in consumer.input):
                offset = sum(a.shape(x)[0] for x in consumer.input[:slot])
                todo.append((out, offset + pos))
            else:
                return None, op
    return sinks, ""


def _count_entry(a: Analysis, node: onnx.NodeProto, slot: tuple[onnx.NodeProto, int], position: int,
                 ids: np.ndarray) -> None:
    """At removal, entry ``position`` of the constant read by ``slot`` (a (node, input) pair, as
    :func:`_shape_entry` finds it) becomes the number of ``ids`` kept."""
    owner, input_slot = slot
    a.node_edits.append((node, CountEntry(owner, input_slot, position, ids, f"shape{input_slot}")))


def _follow_read(a: Analysis, node: onnx.NodeProto, j: int, read: tuple[str, int], ids: np.ndarray) -> None:
    """Entry ``j`` of ``node``'s shape is the size of axis ``read[1]`` of ``read[0]``, read at run time: fine
    when that axis carries channels that go with ``ids`` (the ones the entry sizes); they are tied."""
    source, axis = read
    src = a.ann.get(source)
    if src is None or src.axis != axis or len(src.ids) != len(ids):
        raise Freeze(f"{node.op_type} {node.name!r}: the size of the channel axis is read at run time from "
                     f"{source!r}, whose channels do not follow")
    a.tie(src.ids, ids)
    a.size_reads.add((id(node), j))

